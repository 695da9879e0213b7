"""How many intra-op threads each forward runs with on the CPU, timed once at start.

A decode step on the CPU is a few hundred kernels, most of them small. On few or shared cores a
multi-threaded kernel's fork and barrier can cost more than its second thread saves: on a 2-vCPU
VM the tiny NF4 base decoded 16 rows in 20 ms per step with one thread and in 40 ms with two,
while the 135M float32 base was faster with one thread up to 16 rows and with two at 64 rows and
in long prefills. Where that crossover lies depends on the machine and the model, so the engine
times it at start, as it captures CUDA graphs on a GPU, but on its own loop thread (OpenMP pools
are per thread), and runs every forward with the count that was fastest for its size.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# The largest forward timed: past it (prefills of many prompt tokens) every thread is used. On
# the 135M float32 base a 256-token forward took a second per try; on any base such prefills
# are rare beside decode steps.
LONGEST_TIMED = 128
# A count with more threads must beat one with fewer by this much to be chosen: fewer threads
# leave cores to the server's other threads and to its neighbours.
MARGIN = 0.05
# Timed forwards per count and size, after one untimed; fewer once they take BUDGET_S each.
REPEATS = 5
BUDGET_S = 0.2
# No size is started once timing has taken this long: a large model on many cores (each count a
# few forwards of seconds) must not hold the start for minutes; larger sizes get every thread.
TOTAL_BUDGET_S = 30.0


@dataclass(frozen=True)
class ThreadPlan:
    """`threads[i]` intra-op threads for forwards of up to `sizes[i]` tokens (decode rows, or
    prompt tokens in a prefill); `beyond` past the last size; `seconds` the timing took."""

    sizes: tuple[int, ...]
    threads: tuple[int, ...]
    beyond: int
    seconds: float

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.threads):
            raise ValueError(f"a thread plan needs one count per size, got sizes {self.sizes} "
                             f"and threads {self.threads}")
        if any(b <= a for a, b in zip(self.sizes, self.sizes[1:], strict=False)) or (
                self.sizes[0] < 1):
            raise ValueError(f"sizes must rise from >= 1, got {self.sizes}")
        if min(*self.threads, self.beyond) < 1:
            raise ValueError(f"thread counts must be >= 1, got {self.threads}, {self.beyond}")

    def for_tokens(self, tokens: int) -> int:
        """The threads for a forward of `tokens` tokens."""
        index = bisect.bisect_left(self.sizes, tokens)
        return self.threads[index] if index < len(self.sizes) else self.beyond

    def describe(self) -> str:
        """`CPU threads by forward tokens 1-8: 1, 9-64: 2, more: 2`: equal counts merged."""
        parts, low = [], 1
        for i, (size, count) in enumerate(zip(self.sizes, self.threads, strict=True)):
            if i + 1 < len(self.sizes) and self.threads[i + 1] == count:
                continue
            parts.append(f"{low}-{size}: {count}" if low < size else f"{size}: {count}")
            low = size + 1
        return f"CPU threads by forward tokens {', '.join(parts)}, more: {self.beyond}"


def candidate_counts(most: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to `most`, and `most` itself."""
    counts, count = [], 1
    while count < most:
        counts.append(count)
        count *= 2
    return (*counts, most)


def forward_sizes(max_rows: int, longest: int) -> tuple[int, ...]:
    """Powers of two and `max_rows` up to `max_rows` (decode steps), then powers of two on to
    `longest` (prefills), and `longest`."""
    top = max(max_rows, longest)
    sizes, size = {max_rows, top}, 1
    while size < top:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def fastest(seconds: dict[int, float]) -> int:
    """The count to use: the fewest threads unless more are faster by over MARGIN."""
    best = min(seconds)
    for count in sorted(seconds):
        if seconds[count] < seconds[best] * (1 - MARGIN):
            best = count
    return best


def measure(forward: Callable[[int], object], sizes: Sequence[int], counts: Sequence[int],
            set_threads: Callable[[int], object],
            clock: Callable[[], float] = time.perf_counter) -> ThreadPlan:
    """Time `forward(tokens)` at each size with each thread count and plan the fastest.

    Sizes are timed in rising order; once the most threads win two sizes in a row, larger
    forwards (only more arithmetic per kernel) are taken to want them too and are not timed,
    nor are any once TOTAL_BUDGET_S has gone."""
    started = clock()
    most = max(counts)
    chosen: list[int] = []
    try:
        for size in sizes:
            chosen.append(fastest(_time(forward, size, counts, set_threads, clock)))
            if chosen[-2:] == [most, most] or clock() - started > TOTAL_BUDGET_S:
                break
    finally:
        set_threads(most)
    return ThreadPlan(tuple(sizes[: len(chosen)]), tuple(chosen), most, clock() - started)


def _time(forward: Callable[[int], object], size: int, counts: Sequence[int],
          set_threads: Callable[[int], object], clock: Callable[[], float]) -> dict[int, float]:
    """The fastest forward of each count, after one untimed each (the pool, the shapes); the
    counts take turns, so a burst of load from elsewhere does not fall on one of them alone."""
    for count in counts:
        set_threads(count)
        forward(size)
    best = dict.fromkeys(counts, float("inf"))
    spent = 0.0
    for _ in range(REPEATS):
        for count in counts:
            set_threads(count)
            began = clock()
            forward(size)
            took = clock() - began
            best[count] = min(best[count], took)
            spent += took
        if spent > BUDGET_S * len(counts):
            break
    return best
