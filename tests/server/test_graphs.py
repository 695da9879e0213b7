"""CUDA graph capture of decode steps: the buckets, and every part of the graph path but the
capture itself, on the CPU (a recorder that replays steps eagerly); the capture where CUDA is."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_random_adapter

from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from server.engine import graphs as graphs_module
from server.engine.graphs import DecodeGraphs, buckets_for, rank_for
from server.errors import InvalidArgumentError, RowFailedError
from server.request import TokenEvent

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graphs need a CUDA device; none here")


def test_buckets_double_up_to_max_batch():
    assert buckets_for(1) == [1]
    assert buckets_for(16) == [1, 2, 4, 8, 16]
    assert buckets_for(48) == [1, 2, 4, 8, 16, 32, 48]
    assert buckets_for(1024, 256) == [256, 512, 1024]
    assert buckets_for(200, 200) == [200]


def test_graph_rank_is_the_installed_rank_rounded_up_within_the_maximum():
    assert rank_for(0, 64) == 16  # before any adapter: room for the common ranks
    assert rank_for(8, 64) == 16
    assert rank_for(17, 64) == 32
    assert rank_for(48, 64) == 64
    assert rank_for(4, 8) == 8


class EagerRecorder:
    """Stands in for CudaRecorder on the CPU: a "replay" reruns the recorded step eagerly, in
    the LoRA routing it was recorded with, and notes its (rows, width) bucket."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.replayed: list[tuple[int, int]] = []

    def __enter__(self) -> EagerRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def record(self, step):
        context = self.runner.stack.context
        routing = (context.slots, context.rank, context.others)
        output = step()
        bucket = (output.shape[0], self.runner.kv.plan.width)

        def replay() -> None:
            slots, rank, others = routing
            context.set(slots, rank, cache_gathers=False, others=others)
            output.copy_(step())
            self.runner.forget_routing()  # what a real replay leaves: the eager routing
            self.replayed.append(bucket)

        return replay, output


def _answers(engine: Engine, requests: list[GenerationRequest]) -> list[list[int]]:
    handles = [engine.submit(r) for r in requests]
    return [[t for event in h if isinstance(event, TokenEvent) for t in event.token_ids]
            for h in handles]


def _engine(tiny_base: Path, adapters_root: Path, monkeypatch,
            recorders: list[EagerRecorder] | None, **config) -> Engine:
    """A started engine on the CPU with alpha@1 and beta@1 loaded; with `recorders`, on the
    graph path and launch-bound as on CUDA, each capture's EagerRecorder appended there. Its
    CPU threads are not timed (as on CUDA, where graphs run)."""
    from common.modeling import LoadOptions, load_base

    model, tokenizer = load_base(str(tiny_base), LoadOptions(device="cpu"))
    engine = Engine(model, tokenizer, EngineConfig.build(tune_cpu_threads=False, **config))
    if recorders is not None:
        def recorder() -> EagerRecorder:
            recorders.append(EagerRecorder(engine.runner))
            return recorders[-1]

        monkeypatch.setattr(graphs_module, "CudaRecorder", recorder)
        monkeypatch.setattr(engine, "_graphs_wanted", lambda: True)
        # As on CUDA: eager forwards (prefills) multiply by every slot too, shrinks shared.
        engine.stack.launch_bound = True
    for key in ("alpha@1", "beta@1"):
        name, version = key.split("@")
        engine.load_adapter(key, adapters_root / name / version)
    engine.start()
    return engine


def test_the_graph_path_gives_the_eager_tokens(tiny_base: Path, adapters_root: Path,
                                              tmp_path: Path, monkeypatch):
    """Batch and width buckets with padded free rows, the all-slots and the gathered LoRA, and
    a capture again when a larger adapter arrives, replayed while decoding ahead as on CUDA:
    the same greedy tokens as eager decode in turn."""
    torch.set_num_threads(2)
    wide = write_random_adapter(tiny_base, tmp_path, "wide", 1, seed=5, rank=32)
    recorders: list[EagerRecorder] = []

    def engine_for(graphs: bool) -> Engine:
        return _engine(tiny_base, adapters_root, monkeypatch, recorders if graphs else None,
                       decode_ahead=graphs, max_batch=8, context_length=512,
                       max_loaded_adapters=4, max_lora_rank=32)

    def requests(tokenizer) -> list[GenerationRequest]:
        # 245 tokens: crosses the 256-column width bucket mid-answer.
        long_prompt = tokenizer.encode(" ".join(["a longer question about the sea"] * 40))[:245]
        prompts = [long_prompt, *(tokenizer.encode(f"question number {i}") for i in range(6))]
        adapters = [None, "alpha@1", "beta@1", "alpha@1", None, "beta@1", "alpha@1"]
        # Answers of different lengths, so the batch walks down through the buckets.
        return [GenerationRequest(f"r{i}", prompt, adapter,
                                  SamplingParams(max_new_tokens=14 - 2 * i, ignore_eos=True))
                for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True))]

    answers = {}
    for graphs in (False, True):
        engine = engine_for(graphs)
        try:
            answers[graphs] = _answers(engine, requests(engine.tokenizer))
            engine.load_adapter("wide@1", wide)  # rank 32: above the graphs' rank 16
            answers[graphs, "wide"] = _answers(engine, [GenerationRequest(
                f"w{i}", engine.tokenizer.encode(f"wide question {i}"), "wide@1",
                SamplingParams(max_new_tokens=6, ignore_eos=True)) for i in range(3)])
            if graphs:
                assert isinstance(engine.runner.graphs, DecodeGraphs)
                assert engine.runner.graphs.rank == 32
        finally:
            engine.shutdown()
    assert answers[True] == answers[False]
    assert answers[True, "wide"] == answers[False, "wide"]
    first, again = recorders  # captured at start (rank 16), then again for the rank-32 adapter
    assert {1, 8} <= {rows for rows, _ in first.replayed}  # 8: seven rows and a free one
    assert {width for _, width in first.replayed} == {256, 512}
    assert again.replayed and {width for _, width in again.replayed} == {256}


def test_an_adapter_whose_product_overflows_fails_only_its_own_rows(
        tiny_base: Path, adapters_root: Path, tmp_path: Path, monkeypatch):
    """The graphs multiply every row by every loaded slot under a mask, so a damaged adapter
    (finite weights, infinite products) must fail its rows alone, not every row of a step."""
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(2)
    damaged = tmp_path / "damaged" / "1"
    shutil.copytree(adapters_root / "alpha" / "1", damaged)
    weights = load_file(damaged / "adapter_model.safetensors")
    save_file({key: torch.full_like(value, 3e38) if "lora_A" in key else value
               for key, value in weights.items()}, damaged / "adapter_model.safetensors")
    recorders: list[EagerRecorder] = []
    engine = _engine(tiny_base, adapters_root, monkeypatch, recorders, decode_ahead=True,
                     max_batch=8, context_length=256, max_loaded_adapters=4)
    try:
        healthy = [GenerationRequest(f"ok{i}", engine.tokenizer.encode(f"question number {i}"),
                                     adapter, SamplingParams(max_new_tokens=8, ignore_eos=True))
                   for i, adapter in enumerate([None, "alpha@1", "beta@1", "alpha@1", None])]
        expected = _answers(engine, healthy)
        engine.load_adapter("damaged@1", damaged)
        handles = [engine.submit(r) for r in healthy]
        bad = engine.submit(GenerationRequest("bad", engine.tokenizer.encode("a question"),
                                              "damaged@1", SamplingParams(max_new_tokens=8)))
        with pytest.raises(RowFailedError, match="non-finite"):
            list(bad)
        assert [[t for event in h if isinstance(event, TokenEvent) for t in event.token_ids]
                for h in handles] == expected
        assert _answers(engine, healthy) == expected  # the damaged slot is still loaded
    finally:
        engine.shutdown()
    (replays,) = recorders
    assert 8 in {rows for rows, _ in replays.replayed}  # 5 rows, 5 slots: the masked form


def test_graphs_are_off_on_the_cpu_and_refused_when_forced(tiny_base: Path):
    from common.modeling import LoadOptions, load_base

    model, tokenizer = load_base(str(tiny_base), LoadOptions(device="cpu"))
    engine = Engine(model, tokenizer, EngineConfig(context_length=64, default_max_new_tokens=16))
    engine.start()
    engine.shutdown()
    assert engine.graph_capture_seconds is None and engine.runner.graphs is None
    forced = Engine(model, tokenizer, EngineConfig(context_length=64, default_max_new_tokens=16,
                                                   cuda_graphs=True))
    with pytest.raises(InvalidArgumentError, match="need a CUDA device"):
        forced.start()


@needs_cuda
def test_replayed_decode_gives_the_eager_tokens(tiny_base: Path, adapters_root: Path):
    from common.modeling import LoadOptions, load_base

    answers = {}
    for graphs in (False, True):
        model, tokenizer = load_base(str(tiny_base), LoadOptions(device="cuda"))
        # Graphs and decoding ahead (both on by default on CUDA) against neither.
        engine = Engine(model, tokenizer, EngineConfig.build(
            max_batch=8, context_length=256, cuda_graphs=graphs, decode_ahead=graphs))
        engine.load_adapter("alpha@1", adapters_root / "alpha" / "1")
        engine.start()
        try:
            handles = [engine.submit(GenerationRequest(
                f"r{i}", tokenizer.encode(f"question number {i}"), "alpha@1" if i % 2 else None,
                SamplingParams(max_new_tokens=12, ignore_eos=True))) for i in range(5)]
            answers[graphs] = [h.result().text for h in handles]
        finally:
            engine.shutdown()
        assert (engine.graph_capture_seconds is not None) == graphs
        assert engine.decodes_ahead == graphs
    assert answers[True] == answers[False]
