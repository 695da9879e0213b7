"""Smoke runs of bench/bench_serving.py and bench/bench_engine.py at minimal sizes: JSON keys
present, numbers sane."""

from __future__ import annotations

import json
from pathlib import Path


def test_bench_serving_smoke(run_bench, tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    run_bench("bench_serving", [
        "--base", str(tiny_base), "--work", str(tmp_path), "--out", str(out), "--requests", "4",
        "--adapters", "2", "--min-tokens", "2", "--max-tokens", "4", "--mix-tokens", "4",
        "--rounds", "1", "--loads", "2", "--swaps", "1", "--swap-requests", "2", "--streams",
        "2,3", "--stream-adapters", "2", "--device", "cpu"])
    result = json.loads(out.read_text())

    assert {"machine", "runs", "adapter_load", "hot_swap", "table", "summary", "streams",
            "device"} <= set(result)
    assert [(r["streams"], r["adapters"]) for r in result["streams"]] == [(2, 2), (3, 2)]
    assert all(r["tokens_per_s"] > 0 and r["floor_ms"] is None for r in result["streams"])
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


def test_bench_serving_streams_only_measures_the_streams_alone(run_bench, tiny_base: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "streams.json"
    run_bench("bench_serving", [
        "--base", str(tiny_base), "--work", str(tmp_path), "--out", str(out), "--mix-tokens",
        "4", "--rounds", "3", "--streams", "2,3", "--stream-adapters", "2", "--device", "cpu",
        "--streams-only"])
    result = json.loads(out.read_text())

    assert "runs" not in result and "table" not in result
    assert [(r["streams"], r["adapters"]) for r in result["streams"]] == [(2, 2), (3, 2)]
    for row in result["streams"]:
        rounds = row["rounds_tokens_per_s"]
        assert len(rounds) == 3 and all(t > 0 for t in rounds)
        assert row["tokens_per_s"] == sorted(rounds)[1]
    assert set(result["calibration"]) == {"bench0@1", "bench1@1"}


def test_bench_engine_smoke(run_bench, tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    run_bench("bench_engine", [
        "--base", str(tiny_base), "--out", str(out), "--requests", "4", "--adapters", "2",
        "--min-tokens", "2", "--max-tokens", "4", "--mix-tokens", "4", "--rounds", "1",
        "--streams", "2,4", "--stream-adapters", "2", "--stream-rounds", "2", "--device", "cpu"])
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["graph_capture_s"] is None
    # Decoding ahead is off by default on the CPU; each batch size is also run with it on.
    assert [(r["streams"], r["adapters"], r["decode_ahead"]) for r in result["streams"]] == [
        (2, 2, False), (2, 1, False), (2, 2, True), (4, 2, False), (4, 1, False), (4, 2, True)]
    for run in result["streams"]:
        # The engine times its own work apart from the model forward; no floor on the CPU.
        assert run["engine_ms_per_step"] > 0 and run["forward_ms_per_step"] > 0
        assert run["floor_ms"] is None and run["vs_floor"] is None
        assert run["prefills"] >= 1
        # Each row is its median round: of two, the slower.
        assert len(run["rounds_tokens_per_s"]) == 2
        assert run["tokens_per_s"] == min(run["rounds_tokens_per_s"])
    assert result["summary"]["engine_vs_naive"] > 0


def test_bench_host_work_smoke(run_bench, tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    printed = run_bench("bench_host_work", [
        "--layers", "2", "--adapters", "2", "--rows-lora", "2", "--prefill-tokens", "4",
        "--rows", "4", "--steps", "5", "--step-ms", "1", "--rounds", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    kernels = {(r["shape"], r["form"]): r["lora_kernel_ops"] for r in result["lora_launches"]}
    assert len(kernels) == 5 and "(a) LoRA ops per forward" in printed
    # Counts, not timings: per Llama layer q/k/v and gate/up share one matmul and one mask.
    for shape in ("prefill", "decode step"):
        per_layer = kernels[shape, "every slot, per layer"]
        shared = kernels[shape, "every slot, shared shrinks (CUDA)"]
        assert per_layer - shared == 2 * 6, (shape, per_layer, shared)
    assert kernels["prefill", "gathered rows (CPU)"] > kernels["prefill", "every slot, per layer"]
    assert [r["form"] for r in result["wakeups"]] == ["a call per reader", "one call per loop"]
    assert all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] for r in result["wakeups"])


def test_bench_engine_streams_only_measures_the_streams_alone(run_bench, tiny_base: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    run_bench("bench_engine", [
        "--base", str(tiny_base), "--out", str(out), "--mix-tokens", "4", "--streams", "2",
        "--stream-adapters", "2", "--stream-rounds", "1", "--device", "cpu", "--streams-only"])
    result = json.loads(out.read_text())

    assert "runs" not in result and "summary" not in result
    assert [(r["streams"], r["adapters"]) for r in result["streams"]] == [(2, 2), (2, 1), (2, 2)]
    assert all(r["tokens_per_s"] > 0 and r["prefills"] >= 1 for r in result["streams"])
