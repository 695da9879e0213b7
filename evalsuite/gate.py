"""The regression gate: per-metric thresholds read from YAML, applied to each candidate.

    alpha: 0.05                 # optional: significance level for `significant_only` rules
    metrics:                    # optional wrapper; metric rules may also sit at the top level
      rougeL: {max_drop: 0.01}
      p95_latency_ms: {max_increase_pct: 10}
      fact_recall: {min_value: 0.5, max_drop: 0.05, significant_only: true}
      failure_rate: {max_value: 0}

Limits on change compare the candidate with the baseline (`max_drop` / `max_increase` in the
metric's unit, `max_drop_pct` / `max_increase_pct` relative to the baseline); `min_value` /
`max_value` bound the candidate itself. A change rule with `significant_only: true` fails only when
the bootstrap p-value is below `alpha` as well. A metric that could not be measured fails its rule,
unless the rule says `if_measured: true`.

People's ratings gate like metrics (`human_win_rate: {min_value: 0.5}`,
`human_accuracy: {max_drop: 0.2}`); until `evalsuite ab results` has merged them into the report
their checks are *pending*: not passed, so `promote` refuses, but not a regression either.

Without `--gate`, `evalsuite run` applies `default_gate()`: it fails when ROUGE-L, chrF, perplexity
or the failure rate gets significantly worse (p < alpha), and skips the ones not measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from evalsuite.ab.dimensions import HUMAN_METRICS
from evalsuite.metrics import metric_names
from evalsuite.stats import Comparison

LIMITS = ("max_drop", "max_increase", "max_drop_pct", "max_increase_pct", "min_value", "max_value")
CHANGE_LIMITS = LIMITS[:4]
DEFAULT_GATE_FILE = "(default)"
PENDING = "pending: needs people's ratings (`evalsuite ab create / serve / results`)"


def known_metrics() -> list[str]:
    """Every name a rule may gate: the automatic metrics, then people's rating metrics."""
    return [*metric_names(), *HUMAN_METRICS]


class GateError(ValueError):
    """The gate file is malformed; the message names the file, the key path and the value."""


@dataclass(frozen=True)
class MetricRule:
    metric: str
    max_drop: float | None = None
    max_increase: float | None = None
    max_drop_pct: float | None = None
    max_increase_pct: float | None = None
    min_value: float | None = None
    max_value: float | None = None
    significant_only: bool = False
    if_measured: bool = False

    def __post_init__(self) -> None:
        if self.metric not in known_metrics():
            known = ", ".join(known_metrics())
            raise ValueError(f"metric {self.metric!r} is unknown; known: {known}")
        for name in LIMITS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                raise ValueError(f"{self.metric}.{name} must be a number, got {value!r}")
            if name in CHANGE_LIMITS and value < 0:
                raise ValueError(f"{self.metric}.{name} must be >= 0, got {value!r}")
        if all(getattr(self, name) is None for name in LIMITS):
            raise ValueError(f"{self.metric} sets no limit; use one of {', '.join(LIMITS)}")
        if (self.min_value is not None and self.max_value is not None
                and self.min_value > self.max_value):
            raise ValueError(
                f"{self.metric}.min_value ({self.min_value}) exceeds max_value ({self.max_value})"
            )
        for flag in ("significant_only", "if_measured"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(
                    f"{self.metric}.{flag} must be true or false, got {getattr(self, flag)!r}"
                )


@dataclass(frozen=True)
class Gate:
    rules: tuple[MetricRule, ...]
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) \
                or not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be a number in (0, 1), got {self.alpha!r}")
        names = [r.metric for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"a metric has two rules: {names}")

    def to_dict(self) -> dict[str, Any]:
        # if_measured is left out when false, so gates written before it existed read the same.
        rules = {r.metric: {k: v for k, v in asdict(r).items()
                            if k != "metric" and v is not None
                            and not (k == "if_measured" and v is False)}
                 for r in self.rules}
        return {"alpha": self.alpha, "metrics": rules}


def gate_from_mapping(data: Any, source: str = "gate") -> Gate:
    """Build a Gate from parsed YAML; every error names `source` and the key path."""
    if not isinstance(data, Mapping):
        raise GateError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    data = dict(data)
    alpha = data.pop("alpha", 0.05)
    metrics = data.pop("metrics", None)
    if metrics is None:
        metrics = data
    elif data:
        raise GateError(f"{source}: unknown top-level keys {sorted(data)} beside 'metrics'")
    if not isinstance(metrics, Mapping) or not metrics:
        raise GateError(f"{source}: 'metrics' must be a non-empty mapping of metric -> limits")
    allowed = {f.name for f in fields(MetricRule)} - {"metric"}
    rules = []
    for name, limits in metrics.items():
        if not isinstance(limits, Mapping):
            raise GateError(f"{source}: {name}: limits must be a mapping, got {limits!r}")
        unknown = sorted(set(limits) - allowed)
        if unknown:
            raise GateError(
                f"{source}: {name}: unknown keys {unknown}; allowed: {', '.join(sorted(allowed))}"
            )
        try:
            rules.append(MetricRule(metric=str(name), **dict(limits)))
        except ValueError as err:
            raise GateError(f"{source}: {err}") from None
    try:
        return Gate(rules=tuple(rules), alpha=alpha)
    except ValueError as err:
        raise GateError(f"{source}: {err}") from None


def load_gate(path: Path) -> Gate:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise GateError(f"{path}: cannot read the gate file: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise GateError(f"{path}: not valid YAML: {err}") from None
    return gate_from_mapping(data, str(path))


@dataclass(frozen=True)
class Check:
    """One limit applied to one candidate."""

    metric: str
    limit: str
    threshold: float
    observed: float | None
    passed: bool
    reason: str
    pending: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _change(limit: str, comp: Comparison) -> float:
    """The observed change the limit is about (positive = in the limit's direction)."""
    drop = comp.baseline - comp.candidate
    if limit == "max_drop":
        return drop
    if limit == "max_increase":
        return -drop
    pct = 100.0 * drop / abs(comp.baseline) if comp.baseline else math.copysign(math.inf, drop)
    if drop == 0:
        pct = 0.0
    return pct if limit == "max_drop_pct" else -pct


def _unmeasured(rule: MetricRule, limit: str, threshold: float) -> Check:
    if rule.if_measured:
        return Check(rule.metric, limit, threshold, None, True, "not measured (if_measured)")
    return Check(rule.metric, limit, threshold, None, False, "not measured")


def _check(rule: MetricRule, limit: str, threshold: float, comp: Comparison, alpha: float) -> Check:
    if limit in ("min_value", "max_value"):
        observed = comp.candidate
        if math.isnan(observed):
            return _unmeasured(rule, limit, threshold)
        ok = observed >= threshold if limit == "min_value" else observed <= threshold
        word = "below" if limit == "min_value" else "above"
        return Check(rule.metric, limit, threshold, observed, ok,
                     "ok" if ok else f"{observed:.4g} is {word} {threshold:g}")
    observed = _change(limit, comp)
    if math.isnan(observed):
        return _unmeasured(rule, limit, threshold)
    breached = observed > threshold
    if breached and rule.significant_only and not comp.p_value < alpha:
        return Check(rule.metric, limit, threshold, observed, True,
                     f"change {observed:.4g} > {threshold:g} but p={comp.p_value:.3g} >= {alpha}")
    return Check(rule.metric, limit, threshold, observed, not breached,
                 f"change {observed:.4g} > {threshold:g}" if breached else "ok")


@dataclass(frozen=True)
class GateResult:
    candidate: str
    passed: bool
    checks: tuple[Check, ...]

    @property
    def regressed(self) -> bool:
        """A check failed on what was measured (pending human checks are not regressions)."""
        return any(not c.passed and not c.pending for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "passed": self.passed, "regressed": self.regressed,
                "pending": any(c.pending for c in self.checks),
                "checks": [c.to_dict() for c in self.checks]}


def apply_gate(gate: Gate, candidate: str, comparisons: Mapping[str, Comparison]) -> GateResult:
    """Every limit of every rule against the candidate's comparison with the baseline."""
    checks = []
    for rule in gate.rules:
        comp = comparisons.get(rule.metric)
        for limit in LIMITS:
            threshold = getattr(rule, limit)
            if threshold is None:
                continue
            if comp is None:
                pending = rule.metric in HUMAN_METRICS
                checks.append(Check(rule.metric, limit, threshold, None, False,
                                    PENDING if pending else "not computed", pending))
                continue
            checks.append(_check(rule, limit, threshold, comp, gate.alpha))
    return GateResult(candidate, all(c.passed for c in checks), tuple(checks))


def default_gate(alpha: float = 0.05) -> Gate:
    """The gate `evalsuite run` applies without `--gate`: no quality metric significantly worse."""
    worse = {"rougeL": "max_drop", "chrf": "max_drop", "perplexity": "max_increase",
             "failure_rate": "max_increase"}
    rules = tuple(MetricRule(metric, **{limit: 0.0}, significant_only=True, if_measured=True)
                  for metric, limit in worse.items())
    return Gate(rules=rules, alpha=alpha)
