"""`ab results`: people's ratings (and any judge's verdicts) summarised and merged into each source
run's report, whose gate is then applied again so human rules stop being pending.

For each report the rating set came from, the summary covers only that report's pairs; it goes
into `report.json` as `human`, report.md and report.html are rendered again, and the gate recorded
in the report is re-applied to the automatic comparisons plus the human ones. A summary of every
report (human.json, human.md) also goes to `--out`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evalsuite.ab.blindset import RATINGS_FILE, PairKey, load_key
from evalsuite.ab.errors import RatingSetError
from evalsuite.ab.humanstats import human_summary
from evalsuite.ab.judge import judge_summary, load_verdicts
from evalsuite.ab.render import human_markdown
from evalsuite.ab.store import Rating, RatingStore
from evalsuite.gate import GateError, apply_gate, gate_from_mapping
from evalsuite.report import write_reports
from evalsuite.stats import BootstrapConfig, Comparison


def _comparison(data: Mapping[str, Any]) -> Comparison:
    return Comparison(**{k: math.nan if v is None else v for k, v in data.items()})


def regate(report: dict[str, Any], human: Mapping[str, Mapping[str, Comparison]]) -> None:
    """Apply the report's own gate again, with people's comparisons beside the automatic ones."""
    if not report.get("gate"):
        return
    try:
        gate = gate_from_mapping(report["gate"]["rules"], "report.json gate")
    except GateError as err:
        raise RatingSetError(str(err)) from None
    results = {}
    for cand in report["candidates"]:
        comps = {n: _comparison(c) for n, c in report["comparisons"][cand].items()}
        results[cand] = apply_gate(gate, cand, {**comps, **human.get(cand, {})})
    report["gate"]["results"] = {c: r.to_dict() for c, r in results.items()}
    report["passed"] = all(r.passed for r in results.values())
    report["regressed"] = sorted(c for c, r in results.items() if r.regressed)


def merge_into_report(report_dir: Path, human: dict[str, Any],
                      comparisons: Mapping[str, Mapping[str, Comparison]]) -> dict[str, Any]:
    path = report_dir / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RatingSetError(f"{path}: cannot read the run's report: {err}") from None
    report["human"] = human
    regate(report, comparisons)
    write_reports(report, report_dir)
    return report


def _ratings(set_dir: Path) -> list[Rating]:
    path = set_dir / RATINGS_FILE
    if not path.exists():
        raise RatingSetError(f"{path}: no ratings yet; start the page with `evalsuite ab serve "
                             f"--set {set_dir}` and rate some pairs")
    ratings = RatingStore(path).ratings()
    if not ratings:
        raise RatingSetError(f"{path}: no ratings yet; rate some pairs first")
    return ratings


def ab_results(set_dir: Path, out: Path, config: BootstrapConfig) -> dict[str, dict[str, Any]]:
    """Summaries per source report (also merged into each report); writes out/human.{json,md}."""
    key = load_key(set_dir)
    ratings = _ratings(set_dir)
    verdicts = load_verdicts(set_dir)
    updated = datetime.now(UTC).isoformat(timespec="seconds")
    merged: dict[str, dict[str, Any]] = {}
    for meta in key.reports:
        keys: dict[str, PairKey] = {p: k for p, k in key.pairs.items() if k.report == meta["dir"]}
        people, comparisons = human_summary(ratings, keys, config)
        human = {"set": str(Path(set_dir).resolve()), "updated": updated, "people": people,
                 "judge": judge_summary(verdicts, keys, ratings) if verdicts else None}
        report = merge_into_report(Path(meta["dir"]), human, comparisons)
        merged[meta["dir"]] = {"human": human, "gate": report.get("gate"),
                               "passed": report["passed"],
                               "regressed": report.get("regressed", [])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "human.json").write_text(json.dumps(merged, indent=1, ensure_ascii=False),
                                    encoding="utf-8")
    md = ["# People's blind ratings", ""]
    for report_dir, m in merged.items():
        md += [f"Report `{report_dir}`", ""] + human_markdown(m["human"])
    (out / "human.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return merged
