"""The rating page: HTTP behaviour through the app (sign-in, validation, one rating per pair,
skips, never a hint of the key), and the real thing in headless Chromium: two raters rate five
pairs each by keyboard, one reloads mid-way, the server is killed and restarted, nothing is lost,
and `ab results` counts exactly what was typed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from finished_runs import write_run

from evalsuite.ab.blindset import RATINGS_FILE, create_set, load_key
from evalsuite.ab.dimensions import DIMENSIONS
from evalsuite.ab.store import SCORE_FIELDS, RatingStore
from evalsuite.ab.webapp import create_app, next_pair
from evalsuite.cli import main

REPO = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def rating_set(tmp_path: Path) -> Path:
    create_set([write_run(tmp_path / "run", conversations=4, turns=2)], tmp_path / "set", seed=3)
    return tmp_path / "set"


def form(pair: str, choice: str = "left", score: str = "3") -> dict[str, str]:
    return {"pair": pair, "choice": choice, **{f: score for f in SCORE_FIELDS}}


def shown_pair(page: str) -> str:
    return re.search(r'name="pair" id="pair" value="([^"]+)"', page).group(1)


# ---------------------------------------------------------------- HTTP, in process

def test_a_rater_signs_in_rates_skips_and_finishes(rating_set: Path) -> None:
    (rating_set / "key.json").unlink()  # the page works without the key: it never reads it
    client = TestClient(create_app(rating_set))
    assert client.get("/rate", follow_redirects=False).headers["location"] == "/"
    bad = client.post("/signin", data={"name": "   "})
    assert bad.status_code == 400 and "rater name must not be empty" in bad.text
    page = client.post("/signin", data={"name": "Zoë Lee"}).text
    assert "Pair 1 of 8" in page and "Zoë Lee" in page and shown_pair(page) == "p1"
    assert "alpha" not in page and "__base__" not in page
    assert client.post("/skip", data={"pair": "p1"}).status_code == 200
    page = client.post("/rate", data=form("p2")).text
    assert shown_pair(page) == "p3" and '<b id="rated">1</b>' in page
    again = client.post("/rate", data=form("p2", "right"))
    assert again.status_code == 409 and "Zoë Lee has already rated pair p2" in again.text
    missing = client.post("/rate", data={**form("p3"), "right_tone": ""})
    assert missing.status_code == 400
    assert "right_tone needs a score 1-5, got nothing" in missing.text
    assert client.post("/rate", data=form("p99")).status_code == 400
    assert client.post("/rate", data={**form("p3"), "choice": "up"}).status_code == 400
    for pair in ("p3", "p4", "p5", "p6", "p7"):
        page = client.post("/rate", data=form(pair)).text
    assert shown_pair(page) == "p8"
    page = client.post("/rate", data=form("p8")).text
    assert shown_pair(page) == "p1" and "a pair you skipped before" in page
    assert "you rated all 8 pairs" in client.post("/rate", data=form("p1", "tie")).text
    stored = RatingStore(rating_set / RATINGS_FILE).ratings()
    assert [(r.rater, r.pair, r.choice) for r in stored][-1] == ("Zoë Lee", "p1", "tie")
    assert len(stored) == 8
    anonymous = TestClient(create_app(rating_set)).post("/rate", data=form("p1"))
    assert anonymous.status_code == 401


def test_next_pair_prefers_fresh_pairs_then_skipped_ones(rating_set: Path) -> None:
    from evalsuite.ab.blindset import load_pairs

    pairs = load_pairs(rating_set)
    progress = next_pair(pairs, rated={"p1"}, skipped={"p2", "p1"})
    assert (progress.pair.id, progress.position, progress.rated, progress.skipped) == (
        "p3", 3, 1, 1)
    everything_else = {p.id for p in pairs} - {"p2"}
    assert next_pair(pairs, everything_else, {"p2"}).revisiting
    assert next_pair(pairs, {p.id for p in pairs}, set()).pair is None


# ---------------------------------------------------------------- the browser, end to end

class RatingServer:
    """`evalsuite ab serve` in a subprocess; the port comes from its ready line."""

    def __init__(self, set_dir: Path, port: int = 0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "evalsuite.cli", "ab", "serve", "--set", str(set_dir),
             "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        line = self.process.stdout.readline()
        found = re.search(r"ready on http://127\.0\.0\.1:(\d+)/", line)
        if not found:
            self.process.kill()
            pytest.fail(f"rating server did not start: {line}{self.process.stdout.read()}")
        self.port = int(found.group(1))
        self.url = f"http://127.0.0.1:{self.port}/"

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: nothing gets a chance to flush
        self.process.wait()
        self.process.stdout.close()


def chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


class Rater:
    """One person at the keyboard, remembering what they typed for each pair."""

    def __init__(self, name: str, url: str) -> None:
        from selenium.webdriver.common.by import By

        self.by = By
        self.name, self.typed = name, {}
        self.driver = chrome()
        self.driver.get(url)
        self.driver.find_element(By.ID, "name").send_keys(name + "\n")
        self.wait_for(lambda: self.driver.find_elements(By.ID, "pair"))

    def wait_for(self, condition, timeout: float = 20.0):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout).until(lambda _: condition())

    def pair(self) -> str:
        return self.driver.find_element(self.by.ID, "pair").get_attribute("value")

    def rate(self, key: str, choice: str, scores: list[int]) -> None:
        """Type the scores (cell by cell), the choice key and Enter; wait for the next page."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        pair = self.pair()
        keys = [str(s) for s in scores] + [key, Keys.ENTER]
        ActionChains(self.driver).send_keys(*keys).perform()
        self.wait_for(lambda: "/rate" in self.driver.current_url and self._moved_on(pair))
        # Cells go relevance L, R, consistency L, R, ... (dimension by dimension).
        order = [f"{side}_{d}" for d in DIMENSIONS for side in ("left", "right")]
        self.typed[pair] = (choice, dict(zip(order, scores, strict=True)))

    def skip(self) -> None:
        from selenium.webdriver.common.action_chains import ActionChains

        pair = self.pair()
        ActionChains(self.driver).send_keys("s").perform()
        self.wait_for(lambda: self._moved_on(pair))

    def _moved_on(self, pair: str) -> bool:
        found = self.driver.find_elements(self.by.ID, "pair")
        done = self.driver.find_elements(self.by.ID, "done")
        try:
            return bool(done) or (bool(found) and found[0].get_attribute("value") != pair)
        except Exception:  # the old page went away mid-read: look again
            return False

    def rated_shown(self) -> int:
        return int(self.driver.find_element(self.by.ID, "rated").text)

    def quit(self) -> None:
        self.driver.quit()


def plan(n: int) -> tuple[str, str, list[int]]:
    keys = [("a", "left"), ("l", "right"), ("t", "tie"), ("b", "both_bad"),
            ("\ue012", "left")]  # the last: the Left arrow key
    key, choice = keys[n % len(keys)]
    return key, choice, [(n + k) % 5 + 1 for k in range(8)]


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="SKIPPED LOUDLY: Debian's chromium and chromium-driver are not "
                           "installed (`make tools` installs them); the browser test needs them")
def test_two_raters_by_keyboard_survive_a_reload_and_a_server_kill(
    rating_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("selenium", reason="selenium is not installed (test extra)")
    server = RatingServer(rating_set)
    ann = bob = None
    try:
        ann, bob = Rater("ann", server.url), Rater("bob", server.url)
        n = 0
        for _ in range(2):
            ann.rate(*plan(n))
            n += 1
        assert "alpha" not in ann.driver.page_source
        before = ann.pair()
        ann.driver.refresh()  # a reload mid-way shows the same next pair, nothing lost
        ann.wait_for(lambda: ann.driver.find_elements(ann.by.ID, "pair"))
        assert (ann.pair(), ann.rated_shown()) == (before, 2)
        bob.rate(*plan(n))
        bob.skip()
        bob.rate(*plan(n + 1))
        n += 2

        server.kill()
        server = RatingServer(rating_set, port=server.port)
        for rater, count in ((ann, 3), (bob, 3)):
            for _ in range(count):
                rater.rate(*plan(n))
                n += 1
        assert (ann.rated_shown(), bob.rated_shown()) == (5, 5)
    finally:
        for rater in (ann, bob):
            if rater is not None:
                rater.quit()
        server.kill()

    stored = {(r.rater, r.pair): (r.choice, dict(r.scores))
              for r in RatingStore(rating_set / RATINGS_FILE).ratings()}
    typed = {(r.name, pair): v for r in (ann, bob) for pair, v in r.typed.items()}
    assert len(typed) == 10 and stored == typed

    assert main(["ab", "results", "--set", str(rating_set), "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    human = json.loads((rating_set / "results" / "human.json").read_text())
    (summary,) = human.values()
    key = load_key(rating_set)
    outcomes = [key.pairs[pair].outcome(choice) for (_, pair), (choice, _) in typed.items()]
    counts = summary["human"]["people"]["candidates"]["alpha@1"]["outcomes"]
    assert {o: counts[o]["count"] for o in counts} == {
        o: outcomes.count(o) for o in ("win", "tie", "loss", "both_bad")}
    assert summary["human"]["people"]["raters"] == ["ann", "bob"]
    assert "| alpha@1 | __base__ | 10 |" in printed
