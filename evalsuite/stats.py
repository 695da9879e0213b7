"""Paired comparison of a candidate with the baseline over the same conversations.

The bootstrap resamples conversations (with replacement) and recomputes both adapters' metric on
the SAME resample, so per-conversation difficulty cancels out (Koehn 2004; sacrebleu's paired
bootstrap). The interval is the percentile 95% interval of the delta; the two-sided p-value is
twice the share of resampled deltas on the far side of zero, with +1 smoothing so it is never 0.
All randomness comes from one seeded numpy Generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Aggregate = Callable[[Sequence[np.ndarray]], float]


@dataclass(frozen=True)
class BootstrapConfig:
    n_resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    # Per-conversation differences at most this large count as ties.
    tie_tolerance: float = 1e-9

    def __post_init__(self) -> None:
        if self.n_resamples < 10:
            raise ValueError(f"n_resamples must be >= 10, got {self.n_resamples}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.tie_tolerance < 0:
            raise ValueError(f"tie_tolerance must be >= 0, got {self.tie_tolerance}")


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """Candidate minus baseline on one metric; wins are judged by the metric's direction."""

    baseline: float
    candidate: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    wins: int
    ties: int
    losses: int
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {k: _json_float(v) for k, v in asdict(self).items()}


def _json_float(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def resample_indices(n: int, config: BootstrapConfig) -> np.ndarray:
    """(n_resamples, n) conversation indices; shared by every metric so deltas stay paired."""
    rng = np.random.default_rng(config.seed)
    return rng.integers(0, n, size=(config.n_resamples, n))


def _replicates(aggregate: Aggregate, stats: Sequence[np.ndarray], idx: np.ndarray,
                additive: bool) -> np.ndarray:
    if additive:
        # Sum of rows = aggregate input for additive stats: (B, n, k) -> (B, k).
        matrix = np.asarray(stats, dtype=float)
        sums = matrix[idx].sum(axis=1)
        return np.array([aggregate([row]) for row in sums])
    return np.array([aggregate([stats[i] for i in row]) for row in idx])


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return math.nan, math.nan
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_interval(aggregate: Aggregate, stats: Sequence[np.ndarray], config: BootstrapConfig,
                       *, additive: bool = True, idx: np.ndarray | None = None) -> Interval:
    """The metric's value with a percentile bootstrap interval over conversations."""
    value = aggregate(stats) if len(stats) else math.nan
    if not len(stats):
        return Interval(math.nan, math.nan, math.nan)
    idx = resample_indices(len(stats), config) if idx is None else idx
    low, high = _percentiles(_replicates(aggregate, stats, idx, additive), config.confidence)
    return Interval(value, low, high)


def two_sided_p(deltas: np.ndarray) -> float:
    """Twice the smoothed share of deltas on the far side of zero, capped at 1."""
    finite = deltas[np.isfinite(deltas)]
    if not len(finite):
        return math.nan
    below = (np.sum(finite <= 0) + 1) / (len(finite) + 1)
    above = (np.sum(finite >= 0) + 1) / (len(finite) + 1)
    return float(min(1.0, 2 * min(below, above)))


def win_tie_loss(base: Sequence[float], cand: Sequence[float], higher_is_better: bool | None,
                 tolerance: float) -> tuple[int, int, int]:
    """Per-conversation counts; for neutral metrics a "win" is simply a higher value."""
    sign = -1.0 if higher_is_better is False else 1.0
    wins = ties = losses = 0
    for b, c in zip(base, cand, strict=True):
        if math.isnan(b) or math.isnan(c):
            continue
        d = sign * (c - b)
        if abs(d) <= tolerance:
            ties += 1
        elif d > 0:
            wins += 1
        else:
            losses += 1
    return wins, ties, losses


def paired_bootstrap(
    aggregate: Aggregate, base_stats: Sequence[np.ndarray], cand_stats: Sequence[np.ndarray],
    config: BootstrapConfig, *, higher_is_better: bool | None = True, additive: bool = True,
) -> Comparison:
    """Compare candidate with baseline; stats[i] of both must describe the same conversation i."""
    if len(base_stats) != len(cand_stats):
        raise ValueError(
            f"paired stats need equal lengths, got {len(base_stats)} and {len(cand_stats)}"
        )
    n = len(base_stats)
    base_value = aggregate(base_stats) if n else math.nan
    cand_value = aggregate(cand_stats) if n else math.nan
    per_base = [aggregate([s]) for s in base_stats]
    per_cand = [aggregate([s]) for s in cand_stats]
    wins, ties, losses = win_tie_loss(per_base, per_cand, higher_is_better, config.tie_tolerance)
    if n == 0:
        return Comparison(math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0, 0, 0)
    idx = resample_indices(n, config)
    deltas = (_replicates(aggregate, cand_stats, idx, additive)
              - _replicates(aggregate, base_stats, idx, additive))
    low, high = _percentiles(deltas, config.confidence)
    return Comparison(
        baseline=base_value, candidate=cand_value, delta=cand_value - base_value,
        ci_low=low, ci_high=high, p_value=two_sided_p(deltas),
        wins=wins, ties=ties, losses=losses, n=n,
    )
