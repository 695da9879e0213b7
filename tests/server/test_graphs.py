"""CUDA graph capture of decode steps: the buckets everywhere, the capture where CUDA is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine import Engine, EngineConfig, GenerationRequest, SamplingParams
from server.engine.graphs import buckets_for
from server.errors import InvalidArgumentError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graphs need a CUDA device; none here")


def test_buckets_double_up_to_max_batch():
    assert buckets_for(1) == [1]
    assert buckets_for(16) == [1, 2, 4, 8, 16]
    assert buckets_for(48) == [1, 2, 4, 8, 16, 32, 48]


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
        engine = Engine(model, tokenizer, EngineConfig.build(max_batch=8, context_length=256,
                                                             cuda_graphs=graphs))
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
    assert answers[True] == answers[False]
