"""`ab results`: people's ratings merged into the run's report (Markdown, HTML with a plot, JSON),
the report's gate applied again so human rules decide `promote`; and the whole loop as a new user
meets it: `evalsuite run` on the real server, `ab create`, `ab judge` on the real server, ratings
through the real page, `ab results`, `promote`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from finished_runs import write_run

from evalsuite.ab.blindset import RATINGS_FILE, create_set, load_key
from evalsuite.ab.store import SCORE_FIELDS, Rating, RatingStore
from evalsuite.ab.webapp import create_app
from evalsuite.cli import main
from evalsuite.gate import gate_from_mapping
from evalsuite.promote import PromotionRefused, check_report

HUMAN_GATE = {"failure_rate": {"max_value": 0}, "human_win_rate": {"min_value": 0.5},
              "human_accuracy": {"max_drop": 0.2}}


def rate_everything(set_dir: Path, rater: str, candidate_wins: bool) -> None:
    """`rater` picks the candidate (or the baseline) every time and scores the pick higher."""
    store = RatingStore(set_dir / RATINGS_FILE)
    for pair, key in load_key(set_dir).pairs.items():
        side = key.candidate_side if candidate_wins else (
            "right" if key.candidate_side == "left" else "left")
        scores = {f: 5 if f.startswith(side) else 3 for f in SCORE_FIELDS}
        store.add(Rating(rater, pair, side, scores))


def report_of(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def test_people_decide_the_gate_once_their_ratings_are_merged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "run", conversations=5, gate=gate_from_mapping(HUMAN_GATE))
    with pytest.raises(PromotionRefused, match="waiting for people's ratings for alpha@1: "
                                               "human_win_rate.min_value \\(pending"):
        check_report(report_of(run), "alpha@1")
    create_set([run], tmp_path / "set")
    assert main(["ab", "results", "--set", str(tmp_path / "set")]) == 2
    assert "no ratings yet" in capsys.readouterr().err

    rate_everything(tmp_path / "set", "ann", candidate_wins=True)
    rate_everything(tmp_path / "set", "bob", candidate_wins=True)
    assert main(["ab", "results", "--set", str(tmp_path / "set"), "--bootstrap", "100"]) == 0
    printed = capsys.readouterr().out
    assert "| alpha@1 | __base__ | 20 | 5 | 1 [1, 1] |" in printed
    assert "gate alpha@1: PASS" in printed
    report = report_of(run)
    people = report["human"]["people"]
    assert people["candidates"]["alpha@1"]["dimensions"]["accuracy"]["delta"] == 2.0
    assert people["agreement"]["method"] == "cohen" and people["agreement"]["items"] == 10
    assert report["passed"] and check_report(report, "alpha@1") == "alpha@1"
    md = (run / "report.md").read_text()
    assert "## People's blind ratings" in md and "20 ratings by 2 raters (ann, bob)" in md
    assert "| alpha@1 | factual accuracy | 5 [5, 5] | 3 [3, 3] | 2 [2, 2] |" in md
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "People&#x27;s blind ratings" not in page
    assert "<h2>People's blind ratings</h2>" in page
    assert (tmp_path / "set" / "results" / "human.md").read_text().startswith(
        "# People's blind ratings")


def test_people_preferring_the_baseline_fail_the_gate_and_block_promotion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "run", conversations=4, gate=gate_from_mapping(HUMAN_GATE))
    create_set([run], tmp_path / "set")
    rate_everything(tmp_path / "set", "ann", candidate_wins=False)
    assert main(["ab", "results", "--set", str(tmp_path / "set"), "--bootstrap", "100",
                 "--out", str(tmp_path / "summary")]) == 1
    assert "gate alpha@1: FAIL: human_win_rate.min_value (0 is below 0.5)" in \
        capsys.readouterr().out
    with pytest.raises(PromotionRefused, match="the gate failed for alpha@1: human_win_rate"):
        check_report(report_of(run), "alpha@1")
    assert (tmp_path / "summary" / "human.json").exists()


# ---------------------------------------------------------------- the loop, real server

@pytest.fixture(scope="module")
def server(tiny_base: Path, adapters_root: Path, tmp_path_factory: pytest.TempPathFactory):
    from server.app import start_in_thread
    from server.config import ServerConfig

    root = tmp_path_factory.mktemp("ab-adapters") / "adapters"
    shutil.copytree(adapters_root, root)  # promotion moves an alias: keep the shared root as is
    running = start_in_thread(ServerConfig.build(base=str(tiny_base), adapters_root=root,
                                                 port=0, device="cpu", max_batch=8,
                                                 sessions_db=None))
    yield running
    running.stop()


def rate_through_the_page(set_dir: Path, rater: str) -> int:
    """Sign in and rate every pair through the real app, picking the candidate each time."""
    key = load_key(set_dir)
    client = TestClient(create_app(set_dir))
    page = client.post("/signin", data={"name": rater}).text
    n = 0
    while 'id="pair"' in page:
        pair = page.split('id="pair" value="')[1].split('"')[0]
        side = key.pairs[pair].candidate_side
        page = client.post("/rate", data={"pair": pair, "choice": side,
                                          **{f: "4" for f in SCORE_FIELDS}}).text
        n += 1
    assert "you rated all" in page
    return n


def test_from_a_finished_run_to_a_promotion_decided_by_people(
    server, bundled_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clients.client import SwitchboardClient

    domain = sorted(p for p in bundled_data.iterdir() if (p / "test.jsonl").exists())[0]
    gate = tmp_path / "gate.yaml"
    gate.write_text("failure_rate: {max_value: 0}\nhuman_win_rate: {min_value: 0.5}\n")
    run = tmp_path / "run"
    argv = ["run", "--target", server.target, "--testset", str(domain / "test.jsonl"),
            "--limit", "3", "--adapters", "__base__,alpha@1", "--max-new-tokens", "6",
            "--bootstrap", "100", "--out", str(run), "--no-progress"]

    # Report only, then the safe default gate (its exit follows what it found), then the file.
    assert main([*argv, "--gate", "none"]) == 0
    assert "no gate (--gate none): report only" in capsys.readouterr().out
    code = main(argv)
    default = report_of(run)
    assert default["gate"]["file"] == "(default)" and code == (1 if default["regressed"] else 0)
    assert "default gate (no --gate): fails on a significant regression" in \
        capsys.readouterr().out
    assert main([*argv, "--gate", str(gate)]) == 0  # human rule pending: not a regression
    assert "alpha@1 vs __base__: PENDING people's ratings" in capsys.readouterr().out
    promote = ["promote", "--target", server.target, "--alias", "people", "--candidate",
               "alpha@1", "--report", str(run)]
    assert main(promote) == 1
    assert "waiting for people's ratings" in capsys.readouterr().err

    rating_set = tmp_path / "set"
    assert main(["ab", "create", "--report", str(run), "--out", str(rating_set),
                 "--max-pairs", "4", "--seed", "5"]) == 0
    assert "4 blind pairs (alpha@1: 4), seed 5" in capsys.readouterr().out
    assert main(["ab", "judge", "--set", str(rating_set), "--target", server.target,
                 "--adapter", "beta", "--max-new-tokens", "8", "--no-progress"]) == 0
    assert "judge beta: 4 pairs judged" in capsys.readouterr().out
    assert rate_through_the_page(rating_set, "ann") == 4

    assert main(["ab", "results", "--set", str(rating_set), "--bootstrap", "100"]) == 0
    report = report_of(run)
    assert report["human"]["people"]["candidates"]["alpha@1"]["win_rate"]["value"] == 1.0
    judge = report["human"]["judge"]["beta"]
    assert judge["pairs"] == 4 and sum(judge["candidates"]["alpha@1"].values()) == 4
    assert "## Model judge (not people" in (run / "report.md").read_text()
    assert main(promote) == 0
    with SwitchboardClient(server.target) as client:
        assert {a.alias: a.target for a in client.list_aliases()}["people"] == "alpha@1"


def test_each_report_gets_its_own_pairs_and_unrated_ones_stay_pending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gate = gate_from_mapping(HUMAN_GATE)
    one = write_run(tmp_path / "one", conversations=3, gate=gate)
    two = write_run(tmp_path / "two", conversations=3, candidates=("beta@2",), gate=gate)
    create_set([one, two], tmp_path / "set")
    store = RatingStore(tmp_path / "set" / RATINGS_FILE)
    for pair, key in load_key(tmp_path / "set").pairs.items():
        if key.candidate == "alpha@1":
            store.add(Rating("ann", pair, key.candidate_side, {f: 4 for f in SCORE_FIELDS}))
    assert main(["ab", "results", "--set", str(tmp_path / "set"), "--bootstrap", "50"]) == 0
    assert "gate beta@2: PENDING" in capsys.readouterr().out
    assert report_of(one)["human"]["people"]["ratings"] == 6 and report_of(one)["passed"]
    untouched = report_of(two)
    assert untouched["human"]["people"]["ratings"] == 0 and not untouched["passed"]
    assert "0 ratings by 0 raters" in (two / "report.md").read_text()


@pytest.mark.parametrize(("argv", "message"), [
    (["ab", "serve", "--set", "{tmp}/none"], "none/pairs.json: cannot read the rating set"),
    (["ab", "create", "--report", "{tmp}/none", "--out", "{tmp}/s"], "cannot read the report"),
    (["ab", "results", "--set", "{tmp}/none"], "none/key.json: cannot read the rating key"),
    (["ab", "results", "--set", "{tmp}", "--bootstrap", "3"], "n_resamples must be >= 10"),
    (["ab", "serve", "--set", "{tmp}", "--port", "70000"], "--port must be 0-65535, got 70000"),
])
def test_ab_usage_errors_exit_2_and_say_what_to_fix(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"evalsuite ab {argv[1]}: error: ") and message in err
