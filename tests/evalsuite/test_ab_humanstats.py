"""Statistics over people's ratings against hand-computed values: outcome shares, win rate,
dimension means, bootstrap intervals over conversations, agreement and the position check."""

from __future__ import annotations

import pytest

from evalsuite.ab.blindset import PairKey
from evalsuite.ab.dimensions import DIMENSIONS
from evalsuite.ab.humanstats import human_summary
from evalsuite.ab.store import SCORE_FIELDS, Rating
from evalsuite.gate import apply_gate, gate_from_mapping
from evalsuite.stats import BootstrapConfig

CONFIG = BootstrapConfig(n_resamples=1000, seed=0)


def key(pair: str, conversation: str, candidate_left: bool, candidate: str = "cand@1") -> PairKey:
    return PairKey(pair, "/r", candidate, "__base__",
                   candidate if candidate_left else "__base__", conversation, 0)


def rated(rater: str, pair: str, choice: str, accuracy: tuple[int, int] = (3, 3)) -> Rating:
    """Every score 3 except accuracy: (left, right)."""
    scores = {f: 3 for f in SCORE_FIELDS}
    scores["left_accuracy"], scores["right_accuracy"] = accuracy
    return Rating(rater, pair, choice, scores)


KEYS = {"p1": key("p1", "c1", True), "p2": key("p2", "c1", False),
        "p3": key("p3", "c2", True), "p4": key("p4", "c3", False)}
RATINGS = [
    rated("ann", "p1", "left", (5, 3)),      # candidate left, chosen: win; accuracy 5 vs 3
    rated("ann", "p2", "left", (4, 3)),      # baseline left, chosen: loss; accuracy 3 vs 4
    rated("ann", "p3", "tie", (4, 4)),       # tie; 4 vs 4
    rated("ann", "p4", "both_bad", (1, 2)),  # candidate right: 2 vs 1
]


def test_outcomes_win_rate_and_scores_match_hand_computed_values() -> None:
    summary, comps = human_summary(RATINGS, KEYS, CONFIG)
    cand = summary["candidates"]["cand@1"]
    assert {o: v["count"] for o, v in cand["outcomes"].items()} == {
        "win": 1, "tie": 1, "loss": 1, "both_bad": 1}
    assert all(v["value"] == 0.25 for v in cand["outcomes"].values())
    # (1 win + half of 1 tie and 1 both-bad) / 4 ratings
    assert cand["win_rate"]["value"] == 0.5
    accuracy = cand["dimensions"]["accuracy"]
    assert accuracy["candidate"]["value"] == pytest.approx((5 + 3 + 4 + 2) / 4)
    assert accuracy["baseline"]["value"] == pytest.approx((3 + 4 + 4 + 1) / 4)
    assert accuracy["delta"] == pytest.approx(0.5)
    assert cand["dimensions"]["tone"]["candidate"]["value"] == 3.0
    assert (cand["ratings"], cand["pairs"], cand["conversations"]) == (4, 4, 3)
    assert comps["cand@1"]["human_win_rate"].candidate == 0.5
    assert comps["cand@1"]["human_accuracy"].baseline == pytest.approx(3.0)
    assert set(comps["cand@1"]) == {"human_win_rate", *(f"human_{d}" for d in DIMENSIONS)}
    # Two decisive choices, both "left".
    bias = summary["position_bias"]
    assert (bias["left_share"], bias["decisive"]) == (1.0, 2)
    assert summary["agreement"] is None and (summary["pairs"], summary["pairs_rated"]) == (4, 4)


def test_intervals_resample_whole_conversations() -> None:
    # c1: two wins, c2: two losses. A resample is {c1,c1} -> 1, {c2,c2} -> 0 (1/4 each) or
    # mixed -> 0.5; the 95% percentile interval is therefore [0, 1].
    keys = {f"p{i}": key(f"p{i}", "c1" if i < 2 else "c2", True) for i in range(4)}
    ratings = [rated("ann", f"p{i}", "left" if i < 2 else "right") for i in range(4)]
    rate = human_summary(ratings, keys, CONFIG)[0]["candidates"]["cand@1"]["win_rate"]
    assert (rate["value"], rate["ci_low"], rate["ci_high"]) == (0.5, 0.0, 1.0)
    # Every conversation alike (one win, one loss each): every resample gives 0.5.
    keys = {f"p{i}": key(f"p{i}", f"c{i // 2}", True) for i in range(6)}
    ratings = [rated("ann", f"p{i}", "left" if i % 2 else "right") for i in range(6)]
    rate = human_summary(ratings, keys, CONFIG)[0]["candidates"]["cand@1"]["win_rate"]
    assert (rate["value"], rate["ci_low"], rate["ci_high"]) == (0.5, 0.5, 0.5)


def test_agreement_between_two_raters_is_cohens_kappa() -> None:
    extra = [rated("bob", "p1", "left"), rated("bob", "p3", "right")]  # win, loss
    summary, _ = human_summary(RATINGS + extra, KEYS, CONFIG)
    # Shared pairs p1, p3: ann (win, tie), bob (win, loss): p_o = 1/2, p_e = 1/4 -> kappa 1/3.
    agreement = summary["agreement"]
    assert agreement["method"] == "cohen" and agreement["items"] == 2
    assert agreement["kappa"] == pytest.approx(1 / 3)
    assert summary["raters"] == ["ann", "bob"] and summary["ratings"] == 6


def test_a_rater_who_always_picks_left_is_flagged() -> None:
    keys = {f"p{i}": key(f"p{i}", f"c{i}", i % 2 == 0) for i in range(20)}
    ratings = [rated("ann", f"p{i}", "left") for i in range(20)]
    summary, comps = human_summary(ratings, keys, CONFIG)
    bias = summary["position_bias"]
    assert bias["left_share"] == 1.0 and bias["biased"] and bias["p_value"] < 0.05
    # Half of those lefts were the candidate: its win rate is 0.5 even so.
    assert comps["cand@1"]["human_win_rate"].candidate == 0.5


def test_people_gate_a_candidate_like_any_metric() -> None:
    _, comps = human_summary(RATINGS, KEYS, CONFIG)
    gate = gate_from_mapping({"human_win_rate": {"min_value": 0.5},
                              "human_accuracy": {"max_drop": 0.2}})
    assert apply_gate(gate, "cand@1", comps["cand@1"]).passed
    strict = gate_from_mapping({"human_win_rate": {"min_value": 0.6}})
    (check,) = apply_gate(strict, "cand@1", comps["cand@1"]).checks
    assert not check.passed and check.reason == "0.5 is below 0.6"
