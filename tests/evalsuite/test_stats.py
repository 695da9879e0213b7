"""Paired bootstrap against known distributions: coverage, significance, seeding, win/tie/loss."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evalsuite.stats import (
    BootstrapConfig,
    bootstrap_interval,
    paired_bootstrap,
    two_sided_p,
    win_tie_loss,
)


def mean_of(stats):
    total = np.sum(stats, axis=0)
    return float(total[0] / total[1]) if total[1] else math.nan


def as_stats(values):
    """One conversation = one value: stats (value, 1) make `mean_of` the plain mean."""
    return [np.array([v, 1.0]) for v in values]


def p95(stats):
    return float(np.percentile(np.concatenate(stats), 95))


def test_clear_improvement_is_significant_and_interval_brackets_the_shift() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(0.4, 0.1, size=200)
    cand = base + 0.05 + rng.normal(0, 0.02, size=200)
    comp = paired_bootstrap(mean_of, as_stats(base), as_stats(cand), BootstrapConfig(seed=3))
    assert comp.delta == pytest.approx(cand.mean() - base.mean())
    assert comp.ci_low < comp.delta < comp.ci_high
    assert 0.04 < comp.ci_low and comp.ci_high < 0.06
    assert comp.p_value < 0.01
    assert comp.wins > 190 and comp.losses < 10 and comp.n == 200


def test_interval_width_matches_the_normal_theory() -> None:
    rng = np.random.default_rng(2)
    diffs = rng.normal(0.0, 1.0, size=400)
    comp = paired_bootstrap(mean_of, as_stats(np.zeros(400)), as_stats(diffs),
                            BootstrapConfig(n_resamples=2000, seed=0))
    expected = 2 * 1.96 * diffs.std(ddof=1) / math.sqrt(400)
    assert comp.ci_high - comp.ci_low == pytest.approx(expected, rel=0.1)


def test_no_difference_gives_a_large_p_value_and_covers_zero() -> None:
    rng = np.random.default_rng(4)
    base = rng.normal(0, 1, size=150)
    noise = rng.normal(0, 0.3, size=150)
    cand = base + noise - noise.mean()  # exactly zero true difference in this sample
    comp = paired_bootstrap(mean_of, as_stats(base), as_stats(cand), BootstrapConfig(seed=5))
    assert comp.ci_low < 0 < comp.ci_high
    assert comp.p_value > 0.05


def test_coverage_of_the_true_delta_is_near_95_percent() -> None:
    rng = np.random.default_rng(6)
    covered = 0
    sims = 150
    for s in range(sims):
        base = rng.normal(0, 1, size=60)
        cand = base + 0.3 + rng.normal(0, 1, size=60)
        comp = paired_bootstrap(mean_of, as_stats(base), as_stats(cand),
                                BootstrapConfig(n_resamples=300, seed=s))
        covered += comp.ci_low <= 0.3 <= comp.ci_high
    assert 0.87 <= covered / sims <= 0.995


def test_identical_adapters_tie_everywhere_with_p_one() -> None:
    values = as_stats([0.1, 0.5, 0.9, 0.3])
    comp = paired_bootstrap(mean_of, values, values, BootstrapConfig(n_resamples=50))
    assert (comp.delta, comp.ci_low, comp.ci_high) == (0.0, 0.0, 0.0)
    assert comp.p_value == 1.0
    assert (comp.wins, comp.ties, comp.losses) == (0, 4, 0)


def test_seed_makes_results_reproducible() -> None:
    rng = np.random.default_rng(7)
    base, cand = as_stats(rng.random(50)), as_stats(rng.random(50))
    a = paired_bootstrap(mean_of, base, cand, BootstrapConfig(seed=11))
    b = paired_bootstrap(mean_of, base, cand, BootstrapConfig(seed=11))
    c = paired_bootstrap(mean_of, base, cand, BootstrapConfig(seed=12))
    assert a == b
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)


def test_pooled_percentile_metrics_use_the_same_resamples() -> None:
    rng = np.random.default_rng(8)
    base = [rng.exponential(100, size=5) for _ in range(40)]
    slower = [b * 1.5 for b in base]
    comp = paired_bootstrap(p95, base, slower, BootstrapConfig(n_resamples=200),
                            higher_is_better=False, additive=False)
    assert comp.delta > 0 and comp.ci_low > 0
    assert comp.losses == 40 and comp.wins == 0  # slower everywhere: lower is better


def test_additive_and_generic_paths_agree() -> None:
    stats = as_stats(np.random.default_rng(9).random(30))
    cfg = BootstrapConfig(n_resamples=100, seed=1)
    fast = bootstrap_interval(mean_of, stats, cfg, additive=True)
    slow = bootstrap_interval(mean_of, stats, cfg, additive=False)
    assert fast.value == slow.value
    assert fast.low == pytest.approx(slow.low) and fast.high == pytest.approx(slow.high)


def test_conversations_without_a_value_are_left_out_of_win_tie_loss() -> None:
    assert win_tie_loss([1, 2, math.nan, 3], [2, 2, 5, 1], True, 0.0) == (1, 1, 1)
    assert win_tie_loss([1, 2, 3], [2, 2, 1], False, 0.0) == (1, 1, 1)
    assert win_tie_loss([1.0], [1.0 + 1e-12], True, 1e-9) == (0, 1, 0)


def test_p_value_is_smoothed_and_capped() -> None:
    assert two_sided_p(np.ones(99)) == pytest.approx(2 / 100)
    assert two_sided_p(np.zeros(10)) == 1.0
    assert math.isnan(two_sided_p(np.array([math.nan])))


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap(mean_of, as_stats([1, 2]), as_stats([1]), BootstrapConfig())
    with pytest.raises(ValueError, match="n_resamples must be >= 10, got 5"):
        BootstrapConfig(n_resamples=5)
    with pytest.raises(ValueError, match="confidence"):
        BootstrapConfig(confidence=1.5)
