"""Agreement between raters against hand-computed textbook values."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from evalsuite.ab.agreement import cohen_kappa, fleiss_kappa, rater_agreement


def test_cohen_kappa_matches_the_textbook_example() -> None:
    # 50 items: both "yes" 20, A yes / B no 5, A no / B yes 10, both "no" 15.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    found = cohen_kappa(a, b)
    # p_o = 35/50 = 0.7; p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5 = 0.4
    assert found.observed == pytest.approx(0.7) and found.expected == pytest.approx(0.5)
    assert found.kappa == pytest.approx(0.4)
    assert (found.items, found.raters, found.method) == (50, 2, "cohen")


FLEISS_TABLE = [  # Fleiss (1971) as tabulated on Wikipedia: 10 items, 14 raters, 5 categories
    [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
]


def test_fleiss_kappa_matches_the_textbook_example() -> None:
    items = [{str(c): n for c, n in enumerate(row) if n} for row in FLEISS_TABLE]
    found = fleiss_kappa(items)
    # P-bar = 3.780/10 = 0.378; P_e = 0.143^2+0.2^2+0.279^2+0.15^2+0.229^2 = 0.2128
    assert found.observed == pytest.approx(0.378, abs=5e-4)
    assert found.expected == pytest.approx(0.2128, abs=5e-4)
    assert found.kappa == pytest.approx(0.210, abs=5e-4)
    assert (found.items, found.raters) == (10, 14)


def test_rater_agreement_picks_cohen_for_two_and_fleiss_for_more() -> None:
    two = {"p1": {"ann": "win", "bob": "win"}, "p2": {"ann": "loss", "bob": "win"},
           "p3": {"ann": "tie"}}
    assert rater_agreement(two) == cohen_kappa(["win", "loss"], ["win", "win"])
    three = {"p1": {"ann": "win", "bob": "win", "cy": "loss"}, "p2": {"ann": "tie", "cy": "tie"}}
    assert rater_agreement(three) == fleiss_kappa([Counter(win=2, loss=1), Counter(tie=2)])
    assert rater_agreement({"p1": {"ann": "win"}}) is None


def test_kappa_is_undefined_when_everyone_uses_one_category() -> None:
    found = cohen_kappa(["win"] * 4, ["win"] * 4)
    assert math.isnan(found.kappa) and found.to_dict()["kappa"] is None
    with pytest.raises(ValueError, match="item 0 has 1 rating"):
        fleiss_kappa([{"win": 1}])
    with pytest.raises(ValueError, match="equal lengths, got 2 and 1"):
        cohen_kappa(["a", "b"], ["a"])
