"""The floor a served decode step is measured against: the bare base's decode step, captured.

One step = the plain transformers model (no LoRA, no engine) fed B new tokens against a static
KV cache already holding `context` tokens, captured once as a CUDA graph and replayed. No
engine step can be cheaper on that GPU, so `engine tok/s / floor tok/s` says how much of the
hardware the engine reaches. CUDA only: on the CPU there is no capture and no floor.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def _timed(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


@torch.inference_mode()
def decode_floor_ms(base: Path, batches: list[int], context: int = 256) -> dict[int, float]:
    """Milliseconds of one captured decode step of the bare NF4 base at each batch size."""
    from common.modeling import LoadOptions, load_base

    model, _ = load_base(str(base), LoadOptions(device="cuda"))
    floors = {batch: _floor_ms(model, batch, context) for batch in batches}
    del model
    torch.cuda.empty_cache()
    return floors


def _floor_ms(model, batch: int, context: int) -> float:
    from transformers import StaticCache

    # The cache's length is read on the device, so every replay writes one column further:
    # room for the warm-up, the capture and the timed replays.
    cache = StaticCache(config=model.config, max_cache_len=context + 64)
    prompt = torch.randint(10, 4000, (batch, context), device="cuda")
    model(input_ids=prompt, cache=cache, use_cache=True)
    ids = torch.randint(10, 4000, (batch, 1), device="cuda")

    def step() -> torch.Tensor:
        return model(input_ids=ids, cache=cache, use_cache=True).logits

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return _timed(graph.replay, 30) * 1e3
