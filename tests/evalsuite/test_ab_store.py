"""The ratings store: a rating is on disk when `add` returns, one per (rater, pair) whatever the
timing, several writers at once lose nothing, and bad ratings are refused with the field named."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from evalsuite.ab.store import SCORE_FIELDS, AlreadyRated, Rating, RatingStore


def rating(rater: str, pair: str, choice: str = "left", score: int = 3) -> Rating:
    return Rating(rater, pair, choice, {f: score for f in SCORE_FIELDS})


def test_ratings_survive_a_new_store_and_are_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "ratings.sqlite"
    store = RatingStore(path)
    store.add(rating("ann", "p1", "left", 4))
    store.skip("ann", "p2")
    with pytest.raises(AlreadyRated, match="ann has already rated pair p1"):
        store.add(rating("ann", "p1", "right", 1))
    reopened = RatingStore(path)  # as after a restart
    assert [(r.rater, r.pair, r.choice, r.score("left", "accuracy")) for r in reopened.ratings()] \
        == [("ann", "p1", "left", 4)]
    assert reopened.rated("ann") == {"p1"} and reopened.skipped("ann") == {"p2"}
    assert reopened.rated("bob") == set()


def test_several_raters_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    store = RatingStore(tmp_path / "ratings.sqlite")
    outcomes: list[str] = []

    def rater(name: str) -> None:
        for n in range(15):
            store.add(rating(name, f"p{n}"))
        # Everyone also races for one pair under one shared name: exactly one may win.
        try:
            store.add(rating("shared", "p0"))
            outcomes.append("stored")
        except AlreadyRated:
            outcomes.append("refused")

    threads = [threading.Thread(target=rater, args=(f"r{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = store.ratings()
    assert len(rows) == 6 * 15 + 1
    assert {(r.rater, r.pair) for r in rows} == {(f"r{i}", f"p{n}") for i in range(6)
                                                 for n in range(15)} | {("shared", "p0")}
    assert sorted(outcomes) == ["refused"] * 5 + ["stored"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rater": "  "}, "rater name must not be empty"),
    ({"rater": "x" * 65}, "rater name must be at most 64 characters, got 65"),
    ({"choice": "middle"}, "choice must be one of left, right, tie, both_bad, got 'middle'"),
    ({"scores": {f: 3 for f in SCORE_FIELDS[1:]}}, "scores missing for left_relevance"),
    ({"scores": {**{f: 3 for f in SCORE_FIELDS}, "left_tone": 6}},
     "left_tone must be an integer 1-5, got 6"),
    ({"scores": {**{f: 3 for f in SCORE_FIELDS}, "left_wit": 2}}, "unknown score fields"),
])
def test_bad_ratings_name_the_field(kwargs: dict, message: str) -> None:
    fields = {"rater": "ann", "pair": "p1", "choice": "tie",
              "scores": {f: 3 for f in SCORE_FIELDS}, **kwargs}
    with pytest.raises(ValueError, match=message):
        Rating(**fields)


def test_rater_names_are_trimmed() -> None:
    assert rating("  Ann   Lee ", "p1").rater == "Ann Lee"
