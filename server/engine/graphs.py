"""Decode steps captured as CUDA graphs, one per (batch, width) bucket; the only CUDA-only code.

An eager decode step of a ~1B NF4 base costs 21-31 ms on an H100 whatever the batch (kernel
launches from Python); replayed as a graph it costs 2-7 ms. A graph replays the kernels it
recorded on the memory it recorded, so everything a step reads lives in the runner's static
buffers (next tokens, lengths, LoRA slots, the KV cache). A step of n rows whose longest row
needs w columns replays the smallest batch bucket >= n and the narrowest width bucket >= w: the
attention reads only that many columns under a mask, so short rows do not pay for the whole
context. The rows past n are free rows whose buffers point at column 0 and the bare base, so
their work is harmless and ignored. LoRA runs at the graphs' rank, the largest installed rank
rounded up to a power of two; a larger adapter arriving later means capturing again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

SMALLEST_WIDTH = 256  # below this the attention is a sliver of the step; no finer buckets
FIRST_RANK = 16  # the graphs' rank before any adapter asks for more (common LoRA ranks fit)


def buckets_for(largest: int, smallest: int = 1) -> list[int]:
    """smallest, 2x, 4x, ... below `largest`, then `largest` itself."""
    sizes, size = [], smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    return [*sizes, largest]


def rank_for(installed: int, max_rank: int) -> int:
    """The graphs' LoRA rank: `installed` rounded up to a power of two, at least FIRST_RANK,
    at most `max_rank`."""
    rank = FIRST_RANK
    while rank < installed:
        rank *= 2
    return min(rank, max_rank)


class CudaRecorder:
    """Records steps as CUDA graphs on a side stream, every graph in one memory pool."""

    def __enter__(self) -> CudaRecorder:
        self._pool = None
        self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        self._on_stream = torch.cuda.stream(self._stream)
        self._on_stream.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._on_stream.__exit__(*exc)
        torch.cuda.current_stream().wait_stream(self._stream)
        torch.cuda.synchronize()

    def record(self, step: Callable[[], torch.Tensor]) -> tuple[Callable[[], Any], torch.Tensor]:
        """(replay, output): replay() reruns `step`'s kernels, writing into `output`."""
        step()  # warm up: lazy inits and autotuning happen outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            output = step()
        self._pool = graph.pool()
        return graph.replay, output


class DecodeGraphs:
    """One captured decode step per (batch, width) bucket, sharing one memory pool."""

    def __init__(self, runner: Any, recorder: Callable[[], Any] | None = None) -> None:
        self.runner = runner
        self._recorder = recorder or CudaRecorder  # (tests record on the CPU instead)
        config = runner.config
        self.buckets = buckets_for(config.max_rows)
        self.widths = buckets_for(config.max_seq_len, min(SMALLEST_WIDTH, config.max_seq_len))
        self.rank = 0
        self._replays: dict[tuple[int, int], Callable[[], Any]] = {}
        self._logits: dict[tuple[int, int], torch.Tensor] = {}
        self.capture_seconds = 0.0

    def __len__(self) -> int:
        return len(self._replays)

    def covers(self, rows: int) -> bool:
        """Whether a step of `rows` rows can replay a graph at the LoRA rank installed now."""
        return (0 < rows <= self.buckets[-1]
                and self.runner.stack.installed_rank <= self.rank)

    def wanted_rank(self) -> int:
        stack = self.runner.stack
        return rank_for(stack.installed_rank, stack.max_rank)

    def capture(self) -> float:
        """Capture every bucket at `wanted_rank`, largest first (so smaller ones reuse its
        pool); seconds taken. Safe between steps: a warm-up writes each live row's next column
        with the token the next step writes there anyway."""
        started = time.perf_counter()
        runner = self.runner
        runner.stack.wrap_all()
        self._replays.clear()
        self._logits.clear()
        rank = self.wanted_rank()
        with self._recorder() as recorder:
            for rows in reversed(self.buckets):
                runner.stack.route_static(runner.slots[:rows], rank)
                for width in reversed(self.widths):
                    replay, logits = recorder.record(_step(runner, rows, width))
                    self._replays[rows, width], self._logits[rows, width] = replay, logits
        runner.forget_routing()
        self.rank = rank
        self.capture_seconds = time.perf_counter() - started
        return self.capture_seconds

    def replay(self, rows: int, width: int) -> torch.Tensor:
        """(rows, V) logits of one decode step of rows [0, rows) needing `width` columns."""
        bucket = next(b for b in self.buckets if b >= rows)
        columns = next(w for w in self.widths if w >= width)
        self._replays[bucket, columns]()
        return self._logits[bucket, columns][:rows]


def _step(runner: Any, rows: int, width: int) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        runner.stack.refresh_static()  # inside the step: a replay reads the slots of its time
        return runner.decode_logits(rows, width)
    return step
