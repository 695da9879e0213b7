"""Smoke run of bench/bench_serving.py at minimal sizes: JSON keys present, numbers sane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_serving.py"


def test_bench_serving_smoke(tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--base", str(tiny_base), "--work", str(tmp_path),
         "--out", str(out), "--requests", "4", "--adapters", "2", "--min-tokens", "2",
         "--max-tokens", "4", "--mix-tokens", "4", "--rounds", "1", "--loads", "2",
         "--swaps", "1", "--swap-requests", "2"],
        check=True, timeout=120, capture_output=True, text=True,
    )
    result = json.loads(out.read_text())

    assert {"machine", "runs", "adapter_load", "hot_swap", "table", "summary"} <= set(result)
    assert [r["target"] for r in result["table"]][:4] == [">= 8", ">= 0.85", ">= 0.7", "<= 1.5"]
    for run in result["runs"]:
        assert run["tokens"] > 0 and run["seconds"] > 0 and run["tokens_per_s"] > 0
    # The naive loop and the raw engine generate exactly the tokens the server did.
    served, naive, raw = (r["tokens"] for r in result["runs"][:3])
    assert served == naive == raw == sum(result["served_completion_tokens"])
    assert result["served_prompt_tokens"] == result["engine_prompt_tokens"]
    for key in ("served_vs_naive", "served_vs_raw_engine", "served_16_adapters_vs_1",
                "hot_swap_p99_vs_steady", "adapter_load_p50_s", "adapter_load_p95_s"):
        assert result["summary"][key] > 0, key
    swap = result["hot_swap"]["swap"]
    assert swap["failed"] == 0 and swap["requests"] == 4 * 2
    assert result["hot_swap"]["steady"]["p99_s"] > 0
