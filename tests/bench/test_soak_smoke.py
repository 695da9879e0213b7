"""Smoke run of bench/soak.py at minimal sizes: it passes, and its JSON reports every figure.
The script runs in this process and its server is forked from the test zygote (both have their
imports done); the server is still a process of its own, whose RSS the soak reads."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import forked_server


def test_soak_smoke(tiny_base: Path, tmp_path: Path, run_bench) -> None:
    out = tmp_path / "soak.json"
    # A 6-second run cannot show steady-state memory, so the growth limit is loose here.
    printed = run_bench("soak", [
        "--base", str(tiny_base), "--work", str(tmp_path), "--out", str(out), "--streams", "4",
        "--adapters", "2", "--minutes", "0.1", "--max-requests", "400", "--warmup-seconds", "2",
        "--swap-every", "2", "--cancel-fraction", "0.3", "--max-new-tokens", "12",
        "--max-growth-pct", "50"], start=forked_server)
    result = json.loads(out.read_text())

    assert result["passed"] and result["failures"] == []
    assert 0 < result["requests"] <= 400
    assert result["completed"] > 0 and result["completed"] + result["cancelled"] == \
        result["requests"]
    assert result["errors"] == {} and result["swap_errors"] == []
    assert result["swaps"] >= 1 and result["scrapes"] >= 1
    assert result["latency"]["p99_s"] >= result["latency"]["p50_s"] > 0
    assert result["latency"]["count"] > 0
    rss = result["rss"]
    assert rss["after_warmup_bytes"] > 0 and rss["end_bytes"] > 0 and "growth_pct" in rss
    assert result["left_after_load"] == {"running": 0.0, "waiting": 0.0}
    assert result["server_exit_code"] == 0
    assert "requests served" in printed and "RSS growth" in printed
