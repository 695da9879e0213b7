"""Statistics over people's ratings: win / tie / loss, dimension scores, agreement, position bias.

Every interval is a percentile bootstrap over conversations (`evalsuite.stats`): a rating's
numbers are summed into its conversation's row, and a resample draws whole conversations, so the
several turns (and raters) of one conversation never count as independent evidence. The win rate
counts ties and "both bad" as half a win; the baseline's side of that comparison is the same
count from the baseline's view, so `human_win_rate` gates like any other metric. The position-bias
check is the share of decisive choices (left or right) that went left, against 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from evalsuite.ab.agreement import rater_agreement
from evalsuite.ab.blindset import PairKey
from evalsuite.ab.dimensions import DIMENSIONS, HUMAN_WIN_RATE, OUTCOMES
from evalsuite.ab.store import Rating
from evalsuite.stats import BootstrapConfig, Comparison, bootstrap_interval, paired_bootstrap

Row = Callable[[Rating, PairKey], np.ndarray]


def ratio(stats: Sequence[np.ndarray]) -> float:
    """Summed numerator over summed denominator: a share or a mean from per-conversation sums."""
    total = np.sum(stats, axis=0)
    return float(total[0] / total[1]) if total[1] else math.nan


def _f(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def per_conversation(ratings: Sequence[Rating], keys: Mapping[str, PairKey],
                     row: Row) -> list[np.ndarray]:
    """`row(rating, key)` summed per conversation, in order of first appearance."""
    sums: dict[str, np.ndarray] = {}
    for r in ratings:
        key = keys[r.pair]
        sums[key.conversation] = sums.get(key.conversation, 0) + row(r, key)
    return list(sums.values())


def _interval(stats: list[np.ndarray], config: BootstrapConfig) -> dict[str, float | None]:
    iv = bootstrap_interval(ratio, stats, config)
    return {"value": _f(iv.value), "ci_low": _f(iv.low), "ci_high": _f(iv.high)}


def _outcome_row(r: Rating, key: PairKey) -> np.ndarray:
    outcome = key.outcome(r.choice)
    return np.array([outcome == o for o in OUTCOMES] + [1], dtype=float)


def _outcomes(ratings: Sequence[Rating], keys: Mapping[str, PairKey],
              config: BootstrapConfig) -> dict[str, Any]:
    rows = per_conversation(ratings, keys, _outcome_row)
    out = {}
    for k, name in enumerate(OUTCOMES):
        stats = [np.array([row[k], row[-1]]) for row in rows]
        out[name] = {"count": int(sum(s[0] for s in stats)), **_interval(stats, config)}
    return out


def win_rate(ratings: Sequence[Rating], keys: Mapping[str, PairKey],
             config: BootstrapConfig) -> tuple[Comparison, dict[str, float | None]]:
    """The candidate's win rate (paired with the baseline's) and its own interval."""
    def side(won: str) -> Row:
        def row(r: Rating, key: PairKey) -> np.ndarray:
            o = key.outcome(r.choice)
            return np.array([(o == won) + 0.5 * (o in ("tie", "both_bad")), 1.0])
        return row

    # The baseline "wins" what the candidate loses; both count ties and both-bad as half.
    cand = per_conversation(ratings, keys, side("win"))
    base = per_conversation(ratings, keys, side("loss"))
    return paired_bootstrap(ratio, base, cand, config), _interval(cand, config)


def _dimension(ratings: Sequence[Rating], keys: Mapping[str, PairKey], dim: str,
               config: BootstrapConfig) -> tuple[Comparison, dict[str, Any]]:
    def score(of_candidate: bool) -> Row:
        def row(r: Rating, key: PairKey) -> np.ndarray:
            side = key.candidate_side if of_candidate else (
                "right" if key.candidate_side == "left" else "left")
            return np.array([r.score(side, dim), 1.0])
        return row

    cand = per_conversation(ratings, keys, score(True))
    base = per_conversation(ratings, keys, score(False))
    comp = paired_bootstrap(ratio, base, cand, config)
    return comp, {"label": DIMENSIONS[dim], "candidate": _interval(cand, config),
                  "baseline": _interval(base, config), **{
                      k: v for k, v in comp.to_dict().items()
                      if k in ("delta", "ci_low", "ci_high", "p_value")}}


def position_bias(ratings: Sequence[Rating], keys: Mapping[str, PairKey],
                  config: BootstrapConfig) -> dict[str, Any]:
    """Share of decisive choices that went left, its interval, and the p-value against 0.5."""
    def left(r: Rating, key: PairKey) -> np.ndarray:
        decisive = float(r.choice in ("left", "right"))
        return np.array([float(r.choice == "left"), decisive])

    def even(r: Rating, key: PairKey) -> np.ndarray:
        return 0.5 * left(r, key)[1] * np.array([1.0, 2.0])

    shares = per_conversation(ratings, keys, left)
    comp = paired_bootstrap(ratio, per_conversation(ratings, keys, even), shares, config)
    # The paired comparison's delta is share - 0.5, so its interval shifts back by 0.5.
    p = _f(comp.p_value)
    return {"left_share": _f(comp.candidate), "ci_low": _f(comp.ci_low + 0.5),
            "ci_high": _f(comp.ci_high + 0.5), "p_value": p,
            "decisive": int(sum(s[1] for s in shares)),
            "biased": p is not None and p < 1 - config.confidence}


def _agreement(ratings: Sequence[Rating], keys: Mapping[str, PairKey]) -> dict[str, Any] | None:
    labels: dict[str, dict[str, str]] = {}
    for r in ratings:
        labels.setdefault(r.pair, {})[r.rater] = keys[r.pair].outcome(r.choice)
    found = rater_agreement(labels)
    return None if found is None else found.to_dict()


def candidate_summary(ratings: Sequence[Rating], keys: Mapping[str, PairKey],
                      config: BootstrapConfig) -> tuple[dict[str, Any], dict[str, Comparison]]:
    """One candidate's ratings summarised, and the comparisons its gate metrics read."""
    comp, rate = win_rate(ratings, keys, config)
    comparisons = {HUMAN_WIN_RATE: comp}
    dims = {}
    for dim in DIMENSIONS:
        comparisons[f"human_{dim}"], dims[dim] = _dimension(ratings, keys, dim, config)
    summary = {
        "ratings": len(ratings), "pairs": len({r.pair for r in ratings}),
        "raters": sorted({r.rater for r in ratings}),
        "conversations": len({keys[r.pair].conversation for r in ratings}),
        "outcomes": _outcomes(ratings, keys, config), "win_rate": rate, "dimensions": dims,
        "agreement": _agreement(ratings, keys),
        "comparisons": {name: c.to_dict() for name, c in comparisons.items()},
    }
    return summary, comparisons


def human_summary(ratings: Sequence[Rating], keys: Mapping[str, PairKey], config: BootstrapConfig
                  ) -> tuple[dict[str, Any], dict[str, dict[str, Comparison]]]:
    """Per candidate (each against its own baseline) and overall, for the pairs in `keys`."""
    mine = [r for r in ratings if r.pair in keys]
    by_candidate: dict[str, list[Rating]] = {}
    for r in mine:
        by_candidate.setdefault(keys[r.pair].candidate, []).append(r)
    candidates, comparisons = {}, {}
    for cand, rows in by_candidate.items():
        summary, comps = candidate_summary(rows, keys, config)
        candidates[cand] = {"baseline": keys[rows[0].pair].baseline, **summary}
        comparisons[cand] = comps
    return {
        "ratings": len(mine), "raters": sorted({r.rater for r in mine}),
        "pairs_rated": len({r.pair for r in mine}), "pairs": len(keys),
        "candidates": candidates, "agreement": _agreement(mine, keys),
        "position_bias": position_bias(mine, keys, config),
    }, comparisons
