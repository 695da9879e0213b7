"""Promotion: move an alias to a candidate only when a report's gate passed for it, and record it.

The server keeps every alias move in its history beside the adapters; a promotion passes as the
move's reason a compact JSON of who, when, which report and the gate's verdict, so
`switchboard adapters history` shows why each move happened. The client's side keeps its own
record too: one JSON line per promotion appended to `<report dir>/promotions.jsonl` and, when
given, to a second log (`--record`). A report checked only by the default gate, or whose human
rules still wait for `evalsuite ab results`, promotes nothing.
"""

from __future__ import annotations

import getpass
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from evalsuite.gate import DEFAULT_GATE_FILE


class PromotionRefused(Exception):
    """The report does not allow this promotion; the message says why."""


class AliasSetter(Protocol):
    def set_alias(self, alias: str, target: str, *, reason: str = "") -> Any: ...


@dataclass(frozen=True)
class PromotionRecord:
    alias: str
    target: str
    previous: str
    who: str
    when: str
    report: str
    report_sha256: str
    server: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_report(report_dir: Path) -> tuple[dict[str, Any], str]:
    """The parsed report.json and its sha256 (so the record names exactly what was read)."""
    path = Path(report_dir) / "report.json"
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PromotionRefused(f"{path}: cannot read the report: {err.strerror}") from None
    try:
        return json.loads(raw), hashlib.sha256(raw).hexdigest()
    except json.JSONDecodeError as err:
        raise PromotionRefused(f"{path}: not valid JSON: {err}") from None


def gate_verdict(report: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The gate's answer for `key` in short: passed, and the checks it made."""
    result = (report.get("gate") or {}).get("results", {}).get(key) or {}
    checks = [f"{c.get('metric')}.{c.get('limit')}" for c in result.get("checks", [])]
    return {"candidate": key, "passed": bool(result.get("passed")), "checks": checks}


def promotion_reason(who: str, when: str, report_dir: Path, verdict: Mapping[str, Any]) -> str:
    """The SetAlias reason: compact, sorted JSON so history lines stay short and comparable."""
    payload = {"by": "evalsuite promote", "who": who, "when": when,
               "report": str(Path(report_dir).resolve()), "gate": verdict}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def check_report(report: Mapping[str, Any], candidate: str) -> str:
    """The candidate's resolved "name@version" if the report's gate passed for it; else refuse.

    `candidate` must name an exact version, and it must be one the report evaluated (by its
    resolved key or by what was requested).
    """
    if "@" not in candidate:
        raise PromotionRefused(f"candidate must be NAME@VERSION, got {candidate!r}")
    keys = {a["key"]: a["key"] for a in report.get("adapters", [])}
    keys.update({a["requested"]: a["key"] for a in report.get("adapters", [])})
    key = keys.get(candidate)
    if key is None or key not in report.get("candidates", []):
        evaluated = ", ".join(report.get("candidates", [])) or "none"
        raise PromotionRefused(f"{candidate} is not a candidate in this report (candidates: "
                               f"{evaluated})")
    if key != candidate:
        raise PromotionRefused(f"{candidate} was evaluated as {key}; promote exactly that version")
    gate = report.get("gate")
    if not gate:
        raise PromotionRefused("the report was made without a gate file; nothing was checked")
    if gate.get("file") == DEFAULT_GATE_FILE:
        raise PromotionRefused("the report was checked only by the default gate (no significant "
                               "regression); promotion needs a gate file with your limits")
    result = gate.get("results", {}).get(key)
    if not result or not result.get("passed"):
        checks = (result or {}).get("checks", [])
        failed = [f"{c['metric']}.{c['limit']} ({c['reason']})" for c in checks
                  if not c.get("passed")]
        what = ("is waiting for people's ratings" if result and not result.get("regressed", True)
                else "failed")
        raise PromotionRefused(f"the gate {what} for {key}: {'; '.join(failed) or 'no result'}")
    return key


def append_record(path: Path, record: PromotionRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record.to_dict(), sort_keys=True) + "\n")


def promote(client: AliasSetter, *, alias: str, candidate: str, report_dir: Path, server: str,
            record: Path | None = None) -> PromotionRecord:
    """Check the report, move the alias (the reason names who, when, the report and the gate's
    verdict), then append the record to the report dir (and `record`)."""
    if not alias:
        raise PromotionRefused("alias must not be empty")
    report, digest = load_report(report_dir)
    target = check_report(report, candidate)
    who, when = getpass.getuser(), datetime.now(UTC).isoformat(timespec="seconds")
    reason = promotion_reason(who, when, report_dir, gate_verdict(report, target))
    answer = client.set_alias(alias, target, reason=reason)
    rec = PromotionRecord(
        alias=alias, target=target, previous=str(getattr(answer, "previous", "") or ""),
        who=who, when=when, report=str(Path(report_dir).resolve()), report_sha256=digest,
        server=server,
    )
    local = Path(report_dir) / "promotions.jsonl"
    append_record(local, rec)
    if record is not None and Path(record).resolve() != local.resolve():
        append_record(Path(record), rec)
    return rec
