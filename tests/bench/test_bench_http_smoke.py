"""Smoke run of bench/bench_http.py at minimal sizes: both transports did the same work."""

from __future__ import annotations

import json
from pathlib import Path


def test_bench_http_smoke(run_bench, tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "http.json"
    printed = run_bench("bench_http", [
        "--base", str(tiny_base), "--work", str(tmp_path), "--out", str(out), "--requests", "4",
        "--adapters", "2", "--min-tokens", "2", "--max-tokens", "4", "--rounds", "1"])
    result = json.loads(out.read_text())

    assert {"machine", "rows", "runs", "table"} <= set(result)
    rows = result["rows"]
    assert len(rows) == 4 and {r["adapter"] for r in rows} == {"bench0@1", "bench1@1"}
    assert all(2 <= r["tokens"] <= 4 for r in rows)
    expected = sum(r["tokens"] for r in rows)
    assert sorted((r["mode"], r["transport"]) for r in result["runs"]) == [
        ("stream", "grpc"), ("stream", "http"), ("unary", "grpc"), ("unary", "http")]
    for run in result["runs"]:
        assert run["tokens"] == expected and run["seconds"] > 0 and run["tokens_per_s"] > 0
        assert run["server_cpu_seconds"] > 0 and run["tokens_per_server_cpu_s"] > 0
    assert [r["comparison"] for r in result["table"]] == ["HTTP vs gRPC, stream",
                                                          "HTTP vs gRPC, unary"]
    for row in result["table"]:
        assert row["ratio"] > 0 and row["cpu_ratio"] > 0 and row["target"] == ">= 0.9"
    assert "HTTP vs gRPC, stream" in printed
