"""The run's report: `report.json` (everything), `report.md` (for a pull request), `report.html`.

`build_report` turns replayed conversations into one JSON-ready dict: per-adapter metric values
with bootstrap intervals, paired comparisons of every candidate with the baseline, the gate's
verdicts and the raw turns. The renderers read only that dict, so a saved report.json can be
rendered again. Plots are matplotlib Figures (no pyplot state) embedded as base64 PNG.
`evalsuite ab results` adds `human` (people's blind ratings, and a model judge's apart) and
re-applies the gate; the renderers show it when present.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from rouge_score import rouge_scorer

from common.names import BASE_NAME
from evalsuite.ab.render import human_html, human_markdown
from evalsuite.gate import DEFAULT_GATE_FILE, Gate, apply_gate
from evalsuite.metrics import (
    conversation_stats,
    corpus_signatures,
    failures_by_code,
    get_metric,
    metric_names,
)
from evalsuite.replay import ConversationResult
from evalsuite.stats import BootstrapConfig, bootstrap_interval, paired_bootstrap, resample_indices

SCHEMA_VERSION = 1
N_EXAMPLES = 5


@dataclass(frozen=True)
class RunInfo:
    """What the run was, recorded verbatim in the report."""

    target: str
    testsets: tuple[str, ...]
    testset_fingerprint: str
    mode: str
    sampling: Mapping[str, Any]
    concurrency: int
    requested: Mapping[str, str]  # adapter key -> what the user asked for
    baseline: str
    gate_file: str = ""


def _f(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _adapter_summary(results: Sequence[ConversationResult], config: BootstrapConfig,
                     names: Sequence[str]) -> dict[str, Any]:
    idx = resample_indices(len(results), config) if results else None
    metrics = {}
    for name in names:
        metric = get_metric(name)
        iv = bootstrap_interval(metric.aggregate, conversation_stats(metric, results), config,
                                additive=metric.additive, idx=idx)
        metrics[name] = {"value": _f(iv.value), "ci_low": _f(iv.low), "ci_high": _f(iv.high)}
    turns = [t for r in results for t in r.turns]
    return {
        "metrics": metrics,
        "failures": failures_by_code(results),
        "turns": len(turns),
        "ok_turns": sum(t.ok for t in turns),
        "conversations": len(results),
        "cached_conversations": sum(r.cached for r in results),
        "adapter_versions": sorted({f"{t.adapter_name}@{t.adapter_version}" if t.adapter_name
                                    else BASE_NAME for t in turns if t.ok}),
        "corpus": corpus_signatures(results),
    }


def _compare(base: Sequence[ConversationResult], cand: Sequence[ConversationResult],
             config: BootstrapConfig, names: Sequence[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        metric = get_metric(name)
        out[name] = paired_bootstrap(
            metric.aggregate, conversation_stats(metric, base), conversation_stats(metric, cand),
            config, higher_is_better=metric.higher_is_better, additive=metric.additive,
        )
    return out


def _similarity(a: str, b: str) -> float:
    return rouge_scorer.RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure


def _examples(results: Mapping[str, Sequence[ConversationResult]], k: int) -> list[dict[str, Any]]:
    """The turns where the adapters' answers differ most (by ROUGE-L to the reference, else to
    each other), side by side."""
    keys = list(results)
    scored = []
    for i, convs in enumerate(zip(*(results[key] for key in keys), strict=True)):
        for j in range(len(convs[0].turns)):
            turns = [c.turns[j] for c in convs]
            preds = [t.prediction for t in turns]
            ref = turns[0].reference
            if ref is not None:
                q = [_similarity(ref, p) for p in preds]
                spread = max(q) - min(q)
            else:
                spread = 1 - min((_similarity(a, b) for a in preds for b in preds), default=1)
            scored.append((spread, i, j, convs, turns))
    # One example per conversation: its most divergent turn.
    best: dict[int, tuple] = {}
    for item in scored:
        if item[1] not in best or item[0] > best[item[1]][0]:
            best[item[1]] = item
    out = []
    for spread, _, j, convs, turns in sorted(best.values(), key=lambda s: -s[0])[:k]:
        out.append({
            "conversation_id": convs[0].conversation_id, "turn": j, "spread": spread,
            "reference": turns[0].reference,
            "answers": {key: (t.prediction if t.ok else f"[{t.status} {t.error_code}]")
                        for key, t in zip(keys, turns, strict=True)},
        })
    return out


def build_report(results: Mapping[str, Sequence[ConversationResult]], info: RunInfo,
                 gate: Gate | None, config: BootstrapConfig,
                 names: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything about the run, JSON-ready; `passed` is True when every candidate passed."""
    names = list(names or metric_names())
    candidates = [k for k in results if k != info.baseline]
    comparisons = {c: _compare(results[info.baseline], results[c], config, names)
                   for c in candidates}
    gate_results = {c: apply_gate(gate, c, comparisons[c]) for c in candidates} if gate else {}
    return {
        "schema": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": {
            "target": info.target, "testsets": list(info.testsets),
            "testset_fingerprint": info.testset_fingerprint, "mode": info.mode,
            "sampling": dict(info.sampling), "concurrency": info.concurrency,
            "bootstrap": {"n_resamples": config.n_resamples, "confidence": config.confidence,
                          "seed": config.seed},
        },
        "adapters": [{"key": k, "requested": info.requested.get(k, k)} for k in results],
        "baseline": info.baseline,
        "candidates": candidates,
        "metrics": {n: {"description": get_metric(n).description,
                        "higher_is_better": get_metric(n).higher_is_better} for n in names},
        "results": {k: _adapter_summary(v, config, names) for k, v in results.items()},
        "comparisons": {c: {n: comp.to_dict() for n, comp in comps.items()}
                        for c, comps in comparisons.items()},
        "gate": None if gate is None else {
            "file": info.gate_file, "rules": gate.to_dict(),
            "results": {c: r.to_dict() for c, r in gate_results.items()},
        },
        "passed": all(r.passed for r in gate_results.values()),
        "regressed": sorted(c for c, r in gate_results.items() if r.regressed),
        "examples": _examples(results, N_EXAMPLES),
        "conversations": {k: [r.to_dict() for r in v] for k, v in results.items()},
    }


# ---------------------------------------------------------------- markdown

def _num(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def _ci(low: float | None, high: float | None) -> str:
    return "" if low is None or high is None else f" [{_num(low, 3)}, {_num(high, 3)}]"


def _verdict(report: Mapping[str, Any], cand: str) -> str:
    gate = report["gate"]
    if gate is None:
        return "no gate"
    result = gate["results"][cand]
    if result["passed"]:
        return "PASS"
    return "PENDING (people's ratings)" if not result.get("regressed", True) else "FAIL"


def comparison_table(report: Mapping[str, Any]) -> str:
    """One row per candidate and metric: the table `evalsuite run` prints and report.md opens."""
    lines = ["| candidate | metric | baseline | candidate | delta [95% CI] | p | W/T/L |",
             "|---|---|---|---|---|---|---|"]
    for cand, comps in report["comparisons"].items():
        for name, c in comps.items():
            lines.append(
                f"| {cand} | {name} | {_num(c['baseline'])} | {_num(c['candidate'])} | "
                f"{_num(c['delta'], 3)}{_ci(c['ci_low'], c['ci_high'])} | {_num(c['p_value'], 2)} "
                f"| {c['wins']}/{c['ties']}/{c['losses']} |"
            )
    return "\n".join(lines)


def _gate_md(report: Mapping[str, Any]) -> list[str]:
    gate = report["gate"]
    if gate is None:
        return ["No gate (`--gate none`): report only, every candidate passes."]
    title = ("Default gate (no `--gate`): no significant regression (p < alpha) of rougeL, chrf, "
             "perplexity or failure_rate" if gate["file"] == DEFAULT_GATE_FILE
             else f"Gate `{gate['file']}`")
    lines = [f"{title} (alpha {gate['rules']['alpha']}):", "",
             "| candidate | metric | limit | threshold | observed | result |",
             "|---|---|---|---|---|---|"]
    for cand, res in gate["results"].items():
        for c in res["checks"]:
            status = "pass" if c["passed"] else f"**FAIL** ({c['reason']})"
            lines.append(f"| {cand} | {c['metric']} | {c['limit']} | {c['threshold']:g} | "
                         f"{_num(c['observed'])} | {status} |")
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    run = report["run"]
    verdicts = ", ".join(f"{c}: {_verdict(report, c)}" for c in report["candidates"]) or "none"
    lines = [
        "# Evaluation report", "",
        f"**{'PASSED' if report['passed'] else 'FAILED'}** — baseline `{report['baseline']}`; "
        f"candidates {verdicts}.", "",
        f"Test set: {', '.join(run['testsets'])} ({run['testset_fingerprint'][:19]}), "
        f"mode `{run['mode']}`, target `{run['target']}`, {report['created']}.", "",
        "## Metrics per adapter", "",
        "| adapter | " + " | ".join(report["metrics"]) + " |",
        "|---|" + "---|" * len(report["metrics"]),
    ]
    for key, res in report["results"].items():
        cells = [_num(res["metrics"][n]["value"]) for n in report["metrics"]]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "## Candidates vs baseline", "", comparison_table(report), "", "## Gate", ""]
    lines += _gate_md(report)
    if report.get("human"):
        lines += [""] + human_markdown(report["human"])
    lines += ["", "## Failures and corpus signatures", ""]
    for key, res in report["results"].items():
        fails = ", ".join(f"{c}: {n}" for c, n in res["failures"].items()) or "none"
        lines.append(f"- `{key}`: {res['ok_turns']}/{res['turns']} turns ok; failures: {fails}; "
                     f"{res['cached_conversations']} conversations from cache")
        for name, sig in res["corpus"].items():
            lines.append(f"  - {name}: `{sig['score']}` signature `{sig['signature']}`")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- html

def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def metric_bars_png(report: Mapping[str, Any]) -> str:
    names = list(report["metrics"])
    keys = list(report["results"])
    cols = 4
    rows = max(1, math.ceil(len(names) / cols))
    fig = Figure(figsize=(4 * cols, 2.8 * rows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        vals = [report["results"][k]["metrics"][name] for k in keys]
        heights = [v["value"] if v["value"] is not None else 0.0 for v in vals]
        err = np.array([[max(0.0, h - (v["ci_low"] if v["ci_low"] is not None else h)),
                         max(0.0, (v["ci_high"] if v["ci_high"] is not None else h) - h)]
                        for h, v in zip(heights, vals, strict=True)]).T
        ax.bar(range(len(keys)), heights, yerr=err, capsize=3,
               color=[f"C{j}" for j in range(len(keys))])
        ax.set_xticks(range(len(keys)), keys, rotation=20, fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.subplots_adjust(hspace=0.6, wspace=0.3, left=0.04, right=0.99, top=0.95, bottom=0.08)
    return _png(fig)


def latency_cdf_png(report: Mapping[str, Any]) -> str:
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for key, convs in report["conversations"].items():
        ms = np.sort([t["total_s"] * 1000 for c in convs for t in c["turns"]
                      if t["status"] == "ok"])
        if len(ms):
            ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post", label=key)
    ax.set_xlabel("total latency per turn (ms)")
    ax.set_ylabel("share of turns")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _md_table_to_html(table: str) -> str:
    rows = [r.strip("|").split("|") for r in table.splitlines() if not r.startswith("|---")]
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>"
                   for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _examples_html(report: Mapping[str, Any]) -> str:
    parts = []
    for ex in report["examples"]:
        cells = "".join(f"<td><b>{html.escape(k)}</b><pre>{html.escape(v)}</pre></td>"
                        for k, v in ex["answers"].items())
        ref = html.escape(ex["reference"]) if ex["reference"] is not None else "<i>none</i>"
        parts.append(f"<h3>{html.escape(ex['conversation_id'])}, turn {ex['turn'] + 1} "
                     f"(spread {ex['spread']:.3f})</h3><p>Reference:</p><pre>{ref}</pre>"
                     f"<table><tr>{cells}</tr></table>")
    return "".join(parts) or "<p>No examples.</p>"


def _gate_html(report: Mapping[str, Any]) -> str:
    lines = _gate_md(report)
    if report["gate"] is None:
        return f"<p>{html.escape(lines[0])}</p>"
    verdicts = "".join(f"<li>{html.escape(c)}: {_verdict(report, c)}</li>"
                       for c in report["candidates"])
    return (f"<p>{html.escape(lines[0])}</p><ul>{verdicts}</ul>"
            f"{_md_table_to_html(chr(10).join(lines[2:]))}")


def render_html(report: Mapping[str, Any]) -> str:
    status = "PASSED" if report["passed"] else "FAILED"
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:top}"
             "pre{white-space:pre-wrap;max-width:40em}")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation report</title>"
        f"<style>{style}</style></head><body><h1>Evaluation report: {status}</h1>"
        f"<p>Baseline <code>{html.escape(report['baseline'])}</code>, "
        f"mode <code>{html.escape(report['run']['mode'])}</code>, {report['created']}.</p>"
        f"<h2>Metrics (95% bootstrap intervals)</h2>"
        f"<img alt='metrics' src='data:image/png;base64,{metric_bars_png(report)}'>"
        f"<h2>Candidates vs baseline</h2>{_md_table_to_html(comparison_table(report))}"
        f"<h2>Gate</h2>{_gate_html(report)}"
        f"{human_html(report['human'], _md_table_to_html) if report.get('human') else ''}"
        f"<h2>Latency CDF</h2>"
        f"<img alt='latency CDF' src='data:image/png;base64,{latency_cdf_png(report)}'>"
        f"<h2>Where the answers differ most</h2>{_examples_html(report)}</body></html>"
    )


def write_reports(report: Mapping[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    paths["md"].write_text(render_markdown(report), encoding="utf-8")
    paths["html"].write_text(render_html(report), encoding="utf-8")
    return paths
