"""Gate files: validation with precise messages, and pass/fail decisions on fixed comparisons."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from evalsuite.gate import (
    PENDING,
    Gate,
    GateError,
    MetricRule,
    apply_gate,
    default_gate,
    gate_from_mapping,
    load_gate,
)
from evalsuite.stats import Comparison


def comp(baseline: float, candidate: float, p: float = 0.001) -> Comparison:
    d = candidate - baseline
    return Comparison(baseline, candidate, d, d - 0.01, d + 0.01, p, 5, 0, 5, 10)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gate.yaml"
    path.write_text(text)
    return path


def test_issue_example_loads_flat_and_wrapped(tmp_path: Path) -> None:
    flat = load_gate(write(tmp_path, "rougeL: {max_drop: 0.01}\n"
                                     "p95_latency_ms: {max_increase_pct: 10}\n"))
    wrapped = load_gate(write(tmp_path, "alpha: 0.1\nmetrics:\n  rougeL: {max_drop: 0.01}\n"
                                        "  p95_latency_ms: {max_increase_pct: 10}\n"))
    assert flat.rules == wrapped.rules
    assert flat.alpha == 0.05 and wrapped.alpha == 0.1
    assert flat.rules[0] == MetricRule("rougeL", max_drop=0.01)
    assert wrapped.to_dict()["metrics"]["p95_latency_ms"] == {
        "max_increase_pct": 10, "significant_only": False}


@pytest.mark.parametrize(("text", "message"), [
    ("rogueL: {max_drop: 0.01}", "gate.yaml: metric 'rogueL' is unknown; known: rouge1"),
    ("rougeL: {max_dorp: 0.01}", "gate.yaml: rougeL: unknown keys ['max_dorp']; allowed:"),
    ("rougeL: {max_drop: -0.1}", "gate.yaml: rougeL.max_drop must be >= 0, got -0.1"),
    ("rougeL: {max_drop: lots}", "gate.yaml: rougeL.max_drop must be a number, got 'lots'"),
    ("rougeL: {max_drop: true}", "rougeL.max_drop must be a number, got True"),
    ("rougeL: {}", "gate.yaml: rougeL sets no limit"),
    ("rougeL: 0.01", "gate.yaml: rougeL: limits must be a mapping, got 0.01"),
    ("rougeL: {min_value: 0.5, max_value: 0.2}", "rougeL.min_value (0.5) exceeds max_value"),
    ("rougeL: {max_drop: 0.1, significant_only: yes please}",
     "rougeL.significant_only must be true or false"),
    ("alpha: 2\nrougeL: {max_drop: 0.1}", "gate.yaml: alpha must be a number in (0, 1), got 2"),
    ("- rougeL", "gate.yaml: the top level must be a mapping, got list"),
    ("metrics: {}", "'metrics' must be a non-empty mapping"),
    ("metrics: {rougeL: {max_drop: 1}}\nextra: 1", "unknown top-level keys ['extra']"),
    ("rougeL: {max_drop: [1", "gate.yaml: not valid YAML"),
])
def test_malformed_gates_name_file_key_and_value(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(GateError) as err:
        load_gate(write(tmp_path, text))
    assert message in str(err.value)
    assert str(err.value).startswith(str(tmp_path / "gate.yaml"))


def test_missing_file_is_a_gate_error(tmp_path: Path) -> None:
    with pytest.raises(GateError, match="cannot read the gate file"):
        load_gate(tmp_path / "nope.yaml")


def test_absolute_drop_and_relative_increase() -> None:
    gate = gate_from_mapping({"rougeL": {"max_drop": 0.01},
                              "p95_latency_ms": {"max_increase_pct": 10}})
    ok = apply_gate(gate, "a@2", {"rougeL": comp(0.50, 0.495),
                                  "p95_latency_ms": comp(100.0, 109.0)})
    assert ok.passed and [c.passed for c in ok.checks] == [True, True]
    bad = apply_gate(gate, "a@2", {"rougeL": comp(0.50, 0.48),
                                   "p95_latency_ms": comp(100.0, 111.0)})
    assert not bad.passed
    assert [c.observed for c in bad.checks] == [pytest.approx(0.02), pytest.approx(11.0)]
    assert bad.checks[0].reason == "change 0.02 > 0.01"


def test_improvements_never_breach_change_limits() -> None:
    gate = gate_from_mapping({"rougeL": {"max_drop": 0.0, "max_drop_pct": 0},
                              "perplexity": {"max_increase": 0.0}})
    res = apply_gate(gate, "c", {"rougeL": comp(0.5, 0.7), "perplexity": comp(10.0, 8.0)})
    assert res.passed


def test_absolute_bounds_on_the_candidate() -> None:
    gate = gate_from_mapping({"fact_recall": {"min_value": 0.5},
                              "failure_rate": {"max_value": 0}})
    res = apply_gate(gate, "c", {"fact_recall": comp(0.9, 0.4), "failure_rate": comp(0, 0)})
    assert [c.passed for c in res.checks] == [False, True]
    assert res.checks[0].reason == "0.4 is below 0.5"


def test_significant_only_forgives_noise_but_not_a_real_drop() -> None:
    gate = gate_from_mapping({"alpha": 0.05, "rougeL": {"max_drop": 0.01,
                                                        "significant_only": True}})
    noisy = apply_gate(gate, "c", {"rougeL": comp(0.5, 0.45, p=0.3)})
    real = apply_gate(gate, "c", {"rougeL": comp(0.5, 0.45, p=0.01)})
    assert noisy.passed and "p=0.3" in noisy.checks[0].reason
    assert not real.passed


def test_unmeasured_metric_fails_its_rule() -> None:
    gate = Gate((MetricRule("perplexity", max_increase_pct=5), MetricRule("bleu", min_value=1)))
    res = apply_gate(gate, "c", {"perplexity": comp(math.nan, math.nan)})
    assert not res.passed
    assert [c.reason for c in res.checks] == ["not measured", "not computed"]


def test_relative_change_from_a_zero_baseline() -> None:
    gate = gate_from_mapping({"failure_rate": {"max_increase_pct": 50}})
    assert apply_gate(gate, "c", {"failure_rate": comp(0.0, 0.0)}).passed
    assert not apply_gate(gate, "c", {"failure_rate": comp(0.0, 0.1)}).passed


def test_the_default_gate_fails_only_a_significant_quality_regression() -> None:
    gate = default_gate()
    assert [r.metric for r in gate.rules] == ["rougeL", "chrf", "perplexity", "failure_rate"]
    clean = {"rougeL": comp(0.5, 0.52), "chrf": comp(40, 41), "perplexity": comp(9.0, 8.5),
             "failure_rate": comp(0.0, 0.0, p=1.0)}
    assert apply_gate(gate, "c", clean).passed
    # The issue's case: ROUGE-L -0.245, p = 0.002.
    worse = apply_gate(gate, "c", {**clean, "rougeL": comp(0.5, 0.255, p=0.002)})
    assert not worse.passed and worse.regressed
    assert [(c.metric, c.reason) for c in worse.checks if not c.passed] == [
        ("rougeL", "change 0.245 > 0")]
    noise = apply_gate(gate, "c", {**clean, "perplexity": comp(9.0, 9.4, p=0.2)})
    assert noise.passed
    failing = apply_gate(gate, "c", {**clean, "failure_rate": comp(0.0, 0.2, p=0.01)})
    assert not failing.passed
    # Perplexity without --score, ROUGE without references: skipped, not failed.
    unmeasured = apply_gate(gate, "c", {**clean, "perplexity": comp(math.nan, math.nan)})
    assert unmeasured.passed
    assert "not measured (if_measured)" in [c.reason for c in unmeasured.checks]


def test_human_rules_are_pending_until_people_rated() -> None:
    gate = gate_from_mapping({"rougeL": {"max_drop": 0.1}, "human_win_rate": {"min_value": 0.5},
                              "human_accuracy": {"max_drop": 0.2}})
    waiting = apply_gate(gate, "c", {"rougeL": comp(0.5, 0.5)})
    assert not waiting.passed and not waiting.regressed
    assert [c.reason for c in waiting.checks if c.pending] == [PENDING, PENDING]
    assert waiting.to_dict()["pending"] is True
    rated = apply_gate(gate, "c", {"rougeL": comp(0.5, 0.5), "human_win_rate": comp(0.4, 0.6),
                                   "human_accuracy": comp(4.0, 3.9)})
    assert rated.passed and not rated.to_dict()["pending"]
    lost = apply_gate(gate, "c", {"rougeL": comp(0.5, 0.5), "human_win_rate": comp(0.6, 0.4),
                                  "human_accuracy": comp(4.0, 3.9)})
    assert lost.regressed and lost.checks[1].reason == "0.4 is below 0.5"
    with pytest.raises(GateError, match="metric 'human_wit' is unknown; known: .*human_win_rate"):
        gate_from_mapping({"human_wit": {"min_value": 1}})
