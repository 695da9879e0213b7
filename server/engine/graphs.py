"""Decode steps captured as CUDA graphs, one per batch-size bucket; the only CUDA-only code.

An eager decode step of a ~1B NF4 base costs 21-31 ms on an H100 whatever the batch (kernel
launches from Python); replayed as a graph it costs 2-7 ms. A graph replays the kernels it
recorded on the memory it recorded, so everything a step reads lives in the runner's static
buffers (next tokens, lengths, LoRA slots, the KV cache) and the attention reads the cache's full
width under a mask. A step of n rows replays the smallest bucket >= n; the rows past n are free
rows whose buffers point at column 0 and the bare base, so their work is harmless and ignored.
"""

from __future__ import annotations

import time
from typing import Any

import torch


def buckets_for(max_rows: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, 64, ... below `max_rows`, then `max_rows` itself."""
    sizes, size = [], 1
    while size < max_rows:
        sizes.append(size)
        size *= 2
    return [*sizes, max_rows]


class DecodeGraphs:
    """One captured decode step per bucket, sharing one memory pool."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.buckets = buckets_for(runner.config.max_rows)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    def covers(self, rows: int) -> bool:
        return 0 < rows <= self.buckets[-1]

    def capture(self) -> float:
        """Capture every bucket, largest first (so smaller ones reuse its pool); seconds taken."""
        started = time.perf_counter()
        runner = self.runner
        runner.stack.wrap_all()
        width = runner.config.max_seq_len
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for rows in reversed(self.buckets):
                runner.stack.route_static(runner.slots[:rows])
                for _ in range(2):  # warm up: lazy inits and autotuning happen outside capture
                    runner.decode_logits(rows, width)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._logits[rows] = runner.decode_logits(rows, width)
                pool = graph.pool()
                self._graphs[rows] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        runner.lengths.zero_()  # the warm-up wrote column 0 of free rows only; reset anyway
        self.capture_seconds = time.perf_counter() - started
        return self.capture_seconds

    def replay(self, rows: int) -> torch.Tensor:
        """(rows, V) logits of one decode step of rows [0, rows)."""
        bucket = next(b for b in self.buckets if b >= rows)
        self._graphs[bucket].replay()
        return self._logits[bucket][:rows]
