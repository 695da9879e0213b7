"""Benchmark the served path (gRPC on loopback) on the tiny 4-bit base, every comparison in one run.

  (a) 16 concurrent ChatStream calls over 4 adapters vs the naive PEFT loop (one request at a
      time: `set_adapter`, then `generate`) on the same prompts, model and token counts;
  (b) the same 16 streams through gRPC vs the raw in-process engine fed the same rows;
  (c) 16 streams over 16 distinct adapters vs 16 streams over one adapter, through gRPC;
  (d) LoadAdapter latency (p50, p95 over distinct versions) and the p99 request latency while
      new versions are loaded and an alias is moved under 16 streams vs the same load steady;
  (e) 16 and 64 streams over 16 adapters through gRPC and, on CUDA, the bare base's captured
      decode step at that batch (the graph floor) with the ratio to it; each count's median
      round. `--streams-only` measures (e) alone, without loading PEFT.
The server, the raw engine and PEFT run on the machine's device (--device auto). The callers
run in a process of their own, as a served model's callers do: in the bench's process, their
Python would take the interpreter lock from the server's engine and event loop threads.

The API has no `ignore_eos`, so answer lengths are fixed by choosing, per adapter, prompts whose
greedy answers run past max_new_tokens (`calibrate`, on the raw engine, before any measurement);
the naive loop and the raw engine are then given exactly the per-row token counts the server
reported, so every pair compares equal work. Reuses bench_engine.py's prompts, adapters, PEFT loop
and engine helpers. Prints a table and writes JSON with --out.

    .venv/bin/python bench/bench_serving.py --work build/bench --out bench_serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from bench_engine import (
    PROMPTS,
    Measurement,
    answer_lengths,
    engine_run,
    ensure_base,
    make_engine,
    naive_loop,
    peft_model_with,
    write_adapters,
)

from clients.aio import AsyncSwitchboardClient
from clients.errors import SwitchboardRpcError

SWAP_NAME = "swap"
LIVE_ALIAS = "live"
# Requests submitted at once while calibrating: well under the engine's default queue bound.
CALIBRATION_CHUNK = 128


# -- adapters ---------------------------------------------------------------------------------


def write_manifest(base: Path, path: Path, name: str, version: int, fingerprint: str) -> None:
    manifest = {"name": name, "version": version,
                "base": {"path_or_id": str(base), "fingerprint": fingerprint},
                "created": datetime.now(UTC).isoformat()}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))


def build_adapters_root(base: Path, root: Path, count: int, rank: int,
                        swap_versions: int) -> list[Path]:
    """`bench{i}@1` for i < count (bench_engine's random adapters) and `swap@1..swap_versions`."""
    from common.modeling import base_fingerprint

    fingerprint = base_fingerprint(str(base))
    paths = write_adapters(base, root, count, rank)
    for index, path in enumerate(paths):
        write_manifest(base, path, f"bench{index}", 1, fingerprint)
    # Every swap version holds the same weights: the answers, and so the cost of a request, do
    # not change across a swap, so steady and hot-swap latencies compare equal work.
    for version in range(1, swap_versions + 1):
        target = root / SWAP_NAME / str(version)
        shutil.copytree(paths[0], target)
        write_manifest(base, target, SWAP_NAME, version, fingerprint)
    return paths


# -- gRPC load --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    prompt: str
    adapter: str
    max_new_tokens: int


@dataclass(frozen=True)
class Answer:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    adapter_version: int
    latency_s: float  # client side: call to last chunk


async def stream_one(client: AsyncSwitchboardClient, job: Job) -> Answer:
    started = time.perf_counter()
    final = None
    async for chunk in client.chat_stream([{"role": "user", "content": job.prompt}],
                                          adapter=job.adapter,
                                          max_new_tokens=job.max_new_tokens):
        final = chunk.final or final
    if final is None:
        raise RuntimeError(f"stream on {job.adapter!r} ended without a final chunk")
    return Answer(final.prompt_tokens, final.completion_tokens, final.finish_reason,
                  final.adapter_version, time.perf_counter() - started)


async def _concurrent(target: str, jobs: Sequence[Job]) -> tuple[list[Answer], float]:
    async with AsyncSwitchboardClient(target, timeout=600) as client:
        await client.health()  # connect before the clock starts
        started = time.perf_counter()
        answers = await asyncio.gather(*(stream_one(client, job) for job in jobs))
        return list(answers), time.perf_counter() - started


class Callers:
    """The bench's clients of one server, run in one process spawned for them (once: it
    imports this module, about 3 s), each call `asyncio.run` there on a coroutine function."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._pool = ProcessPoolExecutor(max_workers=1,
                                         mp_context=multiprocessing.get_context("spawn"))

    def run(self, call: Callable[..., Any], *args: Any) -> Any:
        """`call(target, *args)`'s result, awaited in the callers' process."""
        return self._pool.submit(_run_call, call, self.target, *args).result()

    def close(self) -> None:
        self._pool.shutdown()


def _run_call(call: Callable[..., Any], target: str, *args: Any) -> Any:
    return asyncio.run(call(target, *args))


def grpc_streams(callers: Callers, jobs: Sequence[Job], label: str,
                 ) -> tuple[Measurement, list[Answer]]:
    """All `jobs` as concurrent streams; tokens are the completion tokens the server reports."""
    answers, seconds = callers.run(_concurrent, list(jobs))
    return Measurement(label, sum(a.completion_tokens for a in answers), seconds), answers


async def _admin(target: str, calls: Sequence[tuple[str, str, str]]) -> None:
    async with AsyncSwitchboardClient(target, timeout=600) as client:
        for op, ref, alias in calls:
            if op == "load":
                await client.load_adapter(ref)
            else:
                await client.set_alias(alias, ref)


# -- (a)-(c): throughput ----------------------------------------------------------------------


@dataclass
class Setup:
    """What every measurement shares: the server's callers, the raw engine, the PEFT model and,
    per adapter key, the prompts whose answers run to full length (see `calibrate`)."""

    callers: Callers
    engine: Any
    peft: Any
    tokenizer: Any
    found: dict[str, dict[str, int]]
    lengths: list[int]
    four: list[int]
    args: argparse.Namespace

    def texts(self, keys: Sequence[str], lengths: Sequence[int]) -> list[str]:
        """Row i cycles through the prompts whose answers under its adapter run its length
        (the longest one when none does)."""
        seen: dict[tuple[str, int], int] = {}
        out = []
        for key, length in zip(keys, lengths, strict=True):
            runs = self.found[key]
            choices = sorted(t for t, n in runs.items() if n >= length) or [
                max(runs, key=lambda t: runs[t])]
            index = seen.get((key, length), 0)
            seen[(key, length)] = index + 1
            out.append(choices[index % len(choices)])
        return out

    def jobs(self, keys: Sequence[str], lengths: Sequence[int],
             refs: Sequence[str] | None = None) -> list[Job]:
        """Rows for `keys`; `refs` (default: the keys) is what the client asks the server for."""
        return [Job(text, ref, length) for text, ref, length
                in zip(self.texts(keys, lengths), refs or keys, lengths, strict=True)]

    def ids(self, keys: Sequence[str], lengths: Sequence[int]) -> list[list[int]]:
        return [encode(self.tokenizer, text) for text in self.texts(keys, lengths)]


def encode(tokenizer: Any, text: str) -> list[int]:
    """The prompt ids the server renders for one user message (bench_engine's template call)."""
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def calibrate(engine: Any, tokenizer: Any, needs: dict[str, tuple[int, int]],
              ) -> dict[str, dict[str, int]]:
    """Greedy answer length (up to the need) of every candidate prompt under each adapter key.

    `needs` maps key -> (tokens, prompts wanted). The API cannot ask the server to ignore
    end-of-turn, so rows use prompts whose greedy answers under their adapter run at least that
    many tokens: answer lengths are then fixed by max_new_tokens, as in bench_engine.py.
    """
    from server.engine import GenerationRequest
    from server.sampling import SamplingParams

    found: dict[str, dict[str, int]] = {key: {} for key in needs}
    for texts in (PROMPTS, [f"{p} Please answer in detail." for p in PROMPTS],
                  [f"Question {n}: {p}" for n, p in enumerate(PROMPTS)]):
        todo = [key for key, (tokens, want) in needs.items()
                if sum(n >= tokens for n in found[key].values()) < want]
        if not todo:
            break
        pairs = [(key, text) for key in todo for text in texts]
        for start in range(0, len(pairs), CALIBRATION_CHUNK):
            chunk = pairs[start:start + CALIBRATION_CHUNK]
            handles = [engine.submit(GenerationRequest(
                f"cal{start + i}", encode(tokenizer, text), key, SamplingParams(needs[key][0])))
                for i, (key, text) in enumerate(chunk)]
            for (key, text), handle in zip(chunk, handles, strict=True):
                found[key][text] = handle.result().completion_tokens
    return found


def throughput_round(s: Setup) -> tuple[list[Measurement], list[Answer]]:
    count, args = len(s.lengths), s.args
    four_keys = [f"bench{i}@1" for i in s.four]
    served, answers = grpc_streams(s.callers, s.jobs(four_keys, s.lengths),
                                   f"gRPC, {count} streams over {args.adapters} adapters")
    # The baselines generate exactly the tokens each served row did (min = max new tokens).
    counts = [a.completion_tokens for a in answers]
    ids = s.ids(four_keys, s.lengths)
    naive = naive_loop(s.peft, ids, [f"a{i}" for i in s.four], counts)
    raw = engine_run(s.engine, ids, four_keys, counts,
                     f"raw engine, same {count} rows, no gRPC")
    same = [args.mix_tokens] * count
    one, _ = grpc_streams(s.callers, s.jobs(["bench0@1"] * count, same),
                          f"gRPC, {count} streams x {args.mix_tokens} tokens, 1 adapter")
    distinct, _ = grpc_streams(
        s.callers, s.jobs([f"bench{i}@1" for i in range(count)], same),
        f"gRPC, {count} streams x {args.mix_tokens} tokens, {count} adapters")
    return [served, naive, raw, one, distinct], answers


# -- (d): adapter loads and hot swap ----------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def _loads(target: str, refs: Sequence[str]) -> list[tuple[float, float]]:
    """(client wall seconds, server load_seconds) per LoadAdapter call, one at a time, idle."""
    out = []
    async with AsyncSwitchboardClient(target, timeout=600) as client:
        await client.health()
        for ref in refs:
            started = time.perf_counter()
            result = await client.load_adapter(ref)
            out.append((time.perf_counter() - started, result.load_seconds))
    return out


def load_round(s: Setup, versions: Sequence[int]) -> dict[str, float]:
    timings = s.callers.run(_loads, [f"{SWAP_NAME}@{v}" for v in versions])
    wall = [t[0] for t in timings]
    server = [t[1] for t in timings]
    return {"loads": len(wall), "p50_s": percentile(wall, 0.5), "p95_s": percentile(wall, 0.95),
            "server_p50_s": percentile(server, 0.5), "server_p95_s": percentile(server, 0.95)}


async def _closed_loop(target: str, jobs: Sequence[Job], per_worker: int,
                       swaps: Sequence[int], interval: float,
                       ) -> tuple[list[Answer], list[str], int, float]:
    """Each job is one worker issuing `per_worker` requests back to back; meanwhile load and
    move the alias to each of `swaps` every `interval` seconds (until the workers are done)."""
    async with AsyncSwitchboardClient(target, timeout=600) as client:
        await client.health()
        done = asyncio.Event()
        moved = 0
        failures: list[str] = []

        async def worker(job: Job) -> list[Answer]:
            out = []
            for _ in range(per_worker):
                try:
                    out.append(await stream_one(client, job))
                except SwitchboardRpcError as e:  # counted: a hot swap must fail no request
                    failures.append(f"{e.code}: {e.details}")
            return out

        async def swapper() -> None:
            nonlocal moved
            for version in swaps:
                try:
                    await asyncio.wait_for(done.wait(), interval)
                    return
                except TimeoutError:
                    pass
                await client.load_adapter(f"{SWAP_NAME}@{version}")
                await client.set_alias(LIVE_ALIAS, f"{SWAP_NAME}@{version}")
                moved += 1

        started = time.perf_counter()
        mover = asyncio.create_task(swapper())
        results = await asyncio.gather(*(worker(job) for job in jobs))
        seconds = time.perf_counter() - started
        done.set()
        await mover
        return [a for row in results for a in row], failures, moved, seconds


def latency_run(s: Setup, swaps: Sequence[int], interval: float) -> dict[str, Any]:
    count, args = len(s.lengths), s.args
    # Every swap version holds bench0's weights: bench0's calibrated prompts apply.
    jobs = s.jobs(["bench0@1"] * count, [args.mix_tokens] * count, [LIVE_ALIAS] * count)
    answers, failures, moved, seconds = s.callers.run(
        _closed_loop, jobs, args.swap_requests, list(swaps), interval)
    latencies = [a.latency_s for a in answers]
    return {"requests": len(answers), "failed": len(failures), "failures": failures[:5],
            "swaps_done": moved, "seconds": seconds,
            "versions_served": sorted({a.adapter_version for a in answers}),
            "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
            "max_s": max(latencies)}


def swap_round(s: Setup, swaps: Sequence[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Steady state (alias fixed on swap@1), then the same load with `swaps` moved in."""
    s.callers.run(_admin, [("load", f"{SWAP_NAME}@1", ""),
                           ("alias", f"{SWAP_NAME}@1", LIVE_ALIAS)])
    steady = latency_run(s, [], 0.0)
    interval = steady["seconds"] / (len(swaps) + 1)
    return steady, latency_run(s, swaps, interval)


# -- report -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    metric: str
    value: float
    baseline: float | None
    target: str
    unit: str

    @property
    def ratio(self) -> float | None:
        return None if self.baseline is None else self.value / self.baseline

    @property
    def met(self) -> bool | None:
        if self.ratio is None:
            return None
        bound = float(self.target.split()[-1])
        return self.ratio >= bound if self.target.startswith(">=") else self.ratio <= bound


def print_table(rows: Sequence[Row]) -> None:
    print(f"{'metric':62} {'value':>10} {'baseline':>10} {'ratio':>7} {'target':>7} met?")
    for row in rows:
        baseline = "-" if row.baseline is None else f"{row.baseline:10.3f}"
        ratio = "-" if row.ratio is None else f"{row.ratio:7.2f}"
        met = "-" if row.met is None else ("yes" if row.met else "NO")
        print(f"{row.metric + ' (' + row.unit + ')':62} {row.value:10.3f} {baseline:>10} "
              f"{ratio:>7} {row.target:>7} {met}")


def summarize(columns: list[Measurement], loads: dict[str, float], steady: dict[str, Any],
              swapped: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    served, naive, raw, one, distinct = columns
    count = args.requests
    return [
        Row(f"(a) gRPC {count} streams / {args.adapters} adapters vs naive PEFT loop",
            served.tokens_per_s, naive.tokens_per_s, ">= 8", "tok/s"),
        Row("(b) gRPC served vs raw in-process engine, same rows",
            served.tokens_per_s, raw.tokens_per_s, ">= 0.85", "tok/s"),
        Row(f"(c) gRPC {count} streams: {count} adapters vs 1 adapter",
            distinct.tokens_per_s, one.tokens_per_s, ">= 0.7", "tok/s"),
        Row("(d) p99 request latency during hot swap vs steady",
            swapped["p99_s"], steady["p99_s"], "<= 1.5", "s"),
        Row("(d) LoadAdapter latency p50, client side", loads["p50_s"], None, "-", "s"),
        Row("(d) LoadAdapter latency p95, client side", loads["p95_s"], None, "-", "s"),
    ]


def best(rounds: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    return min(rounds, key=lambda r: r[key])


def measure(s: Setup) -> dict[str, Any]:
    args = s.args
    # Every section runs `rounds` times and keeps its fastest round: the machine is shared, and
    # a burst of load from elsewhere would otherwise decide the ratios.
    rounds = [throughput_round(s) for _ in range(args.rounds)]
    columns = [min(col, key=lambda m: m.seconds) for col in zip(*(r[0] for r in rounds),
                                                                 strict=True)]
    answers = rounds[0][1]
    first_swap = 2 + args.rounds * args.loads  # swap@1 is the steady version
    load_rounds = [load_round(s, range(2 + r * args.loads, 2 + (r + 1) * args.loads))
                   for r in range(args.rounds)]
    swap_rounds = [swap_round(s, range(first_swap + r * args.swaps,
                                       first_swap + (r + 1) * args.swaps))
                   for r in range(args.rounds)]
    loads = {k: min(r[k] for r in load_rounds) for k in load_rounds[0]}
    steady = best([r[0] for r in swap_rounds], "p99_s")
    swapped = best([r[1] for r in swap_rounds], "p99_s")
    rows = summarize(columns, loads, steady, swapped, args)
    for m in columns:
        print(f"  {m.name:60} {m.tokens:6d} tok {m.seconds:7.2f} s {m.tokens_per_s:8.1f} tok/s")
    print_table(rows)
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads, "load_average": os.getloadavg()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "requested_max_new_tokens": s.lengths,
        "served_completion_tokens": [a.completion_tokens for a in answers],
        "served_finish_reasons": [a.finish_reason for a in answers],
        "served_prompt_tokens": [a.prompt_tokens for a in answers],
        "served_rows_at_full_length": sum(a.completion_tokens == n
                                          for a, n in zip(answers, s.lengths, strict=True)),
        "engine_prompt_tokens": [len(p) for p in s.ids([f"bench{i}@1" for i in s.four],
                                                       s.lengths)],
        "runs": [{**asdict(m), "tokens_per_s": m.tokens_per_s} for m in columns],
        "all_rounds": [[asdict(m) for m in r[0]] for r in rounds],
        "adapter_load": {"best": loads, "rounds": load_rounds},
        "hot_swap": {"steady": steady, "swap": swapped,
                     "rounds": [{"steady": a, "swap": b} for a, b in swap_rounds]},
        "table": [{"metric": r.metric, "unit": r.unit, "value": r.value,
                   "baseline": r.baseline, "ratio": r.ratio, "target": r.target, "met": r.met}
                  for r in rows],
        "summary": {
            "served_vs_naive": rows[0].ratio, "served_vs_raw_engine": rows[1].ratio,
            "served_16_adapters_vs_1": rows[2].ratio, "hot_swap_p99_vs_steady": rows[3].ratio,
            "adapter_load_p50_s": loads["p50_s"], "adapter_load_p95_s": loads["p95_s"],
        },
    }


def stream_rows(s: Setup, floors: dict[int, float]) -> list[dict[str, Any]]:
    """(e): each stream count over `--stream-adapters` adapters, `--rounds` times with the counts
    taking turns; each shows its median round (the lower of two middles) and the floor ratio."""
    jobs = {streams: s.jobs([f"bench{i % s.args.stream_adapters}@1" for i in range(streams)],
                            [s.args.mix_tokens] * streams) for streams in s.args.streams}
    rounds: dict[int, list[float]] = {streams: [] for streams in s.args.streams}
    for batch in jobs.values():
        # Unmeasured: a new batch shape's first prefill grows the memory pools once.
        grpc_streams(s.callers, [replace(job, max_new_tokens=2) for job in batch], "warm-up")
    for _ in range(s.args.rounds):
        for streams, done in rounds.items():
            measured, _ = grpc_streams(s.callers, jobs[streams],
                                       f"gRPC, {streams} streams over {s.args.stream_adapters}")
            done.append(measured.tokens_per_s)
    rows = []
    for streams, done in rounds.items():
        median = statistics.median_low(done)
        floor = floors.get(streams)
        ratio = None if floor is None else median / (streams / (floor / 1e3))
        rows.append({"streams": streams, "adapters": s.args.stream_adapters,
                     "tokens_per_s": median, "rounds_tokens_per_s": done, "floor_ms": floor,
                     "vs_floor": ratio})
        shown = "-" if ratio is None else f"{ratio:.2f} of the graph floor ({floor:.2f} ms)"
        every = ", ".join(f"{t:.0f}" for t in done)
        print(f"(e) {streams} streams over {s.args.stream_adapters} adapters: "
              f"{median:.1f} tok/s (rounds: {every}); {shown}")
    return rows


def calibration_needs(args: argparse.Namespace, written: int) -> dict[str, tuple[int, int]]:
    """Per adapter key, (answer tokens, prompts wanted) for the sections this run measures."""
    # (e) needs a mix_tokens prompt under each of its adapters.
    needs = {f"bench{i}@1": (args.mix_tokens, 1) for i in range(args.stream_adapters)}
    if args.streams_only:
        return needs
    # (a)/(b) rows need answers of up to max_tokens under the first adapters; (c)/(d) mix_tokens.
    per_adapter = -(-args.requests // args.adapters)
    needs.update({f"bench{i}@1": (args.max_tokens, per_adapter) if i < args.adapters
                  else (args.mix_tokens, 1) for i in range(written)})
    needs["bench0@1"] = (max(args.max_tokens, args.mix_tokens), per_adapter)
    return needs


def measure_sections(s: Setup) -> dict[str, Any]:
    """(a)-(d), after a warm-up of the served path, the raw engine and PEFT."""
    grpc_streams(s.callers, s.jobs([f"bench{i}@1" for i in s.four], s.lengths), "warm-up")
    warm = s.ids(["bench0@1"] * 2, [4, 4])
    engine_run(s.engine, warm, ["bench0@1", None], [4, 4], "warm-up")
    naive_loop(s.peft, warm[:1], ["a0"], [4])
    return measure(s)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from common.modeling import LoadOptions, load_tokenizer, resolve_device
    from server.app import start_in_thread
    from server.config import ServerConfig

    torch.set_num_threads(args.threads)
    base = ensure_base(args.base, args.work)
    device = resolve_device(args.device)
    floors = {}
    if device == "cuda":
        from graph_floor import decode_floor_ms

        floors = decode_floor_ms(base, list(args.streams))
    tokenizer = load_tokenizer(str(base))
    count = args.requests
    written = max(count, args.stream_adapters)  # adapters on disk: (a)-(d) and (e) need these
    lengths = answer_lengths(count, args.min_tokens, args.max_tokens)
    four = [i % args.adapters for i in range(count)]
    swap_versions = 1 + args.rounds * (args.loads + args.swaps)
    needs = calibration_needs(args, written)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters = build_adapters_root(base, root, written, args.rank, swap_versions)
        peft = None if args.streams_only else peft_model_with(base, adapters[:args.adapters],
                                                              LoadOptions(device))
        engine = make_engine(base, adapters, args.max_batch, LoadOptions(device))
        server = start_in_thread(ServerConfig.build(
            base=str(base), adapters_root=root, port=0, device=device,
            max_batch=max(args.max_batch, *args.streams), context_length=1024,
            max_loaded_adapters=written + 4, max_lora_rank=64, sessions_db=None,
            **({} if args.burst_window_ms is None else {"burst_window_ms": args.burst_window_ms})))
        callers = Callers(server.target)
        try:
            started = time.perf_counter()
            found = calibrate(engine, tokenizer, needs)
            print(f"calibrated prompts in {time.perf_counter() - started:.1f} s")
            s = Setup(callers, engine, peft, tokenizer, found, lengths, four, args)
            callers.run(_admin, [("load", f"bench{i}@1", "") for i in range(written)])
            results = {} if args.streams_only else measure_sections(s)
            results["streams"] = stream_rows(s, floors)
        finally:
            callers.close()
            server.stop()
            engine.shutdown()
    results["device"] = device
    results["calibration"] = {key: {"tokens": needs[key][0], "answer_lengths": found[key]}
                              for key in needs}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=None,
                        help="tiny base directory (built under --work when omitted)")
    parser.add_argument("--work", type=Path, default=Path("build/bench"))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--requests", type=int, default=16, help="concurrent streams")
    parser.add_argument("--adapters", type=int, default=4, help="adapters in (a) and (b)")
    parser.add_argument("--rank", type=int, default=16,
                        help="LoRA rank of the benchmark adapters (the issue-13 targets: 16)")
    parser.add_argument("--min-tokens", type=int, default=16,
                        help="(a)/(b): max_new_tokens spread from this ...")
    parser.add_argument("--max-tokens", type=int, default=128, help="... to this")
    parser.add_argument("--mix-tokens", type=int, default=64,
                        help="max_new_tokens in (c) and (d)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the server, engine and PEFT run (auto: CUDA when present)")
    parser.add_argument("--streams", type=lambda v: [int(x) for x in v.split(",")],
                        default=[16, 64], help="(e): concurrent streams, e.g. 16,64")
    parser.add_argument("--stream-adapters", type=int, default=16,
                        help="(e): adapters the streams are spread over")
    parser.add_argument("--rounds", type=int, default=2,
                        help="repeat every section; each reports its best round")
    parser.add_argument("--loads", type=int, default=10, help="(d): LoadAdapter calls per round")
    parser.add_argument("--swaps", type=int, default=4,
                        help="(d): versions loaded and aliased per hot-swap round")
    parser.add_argument("--swap-requests", type=int, default=6,
                        help="(d): requests per stream, back to back, steady and hot-swap")
    parser.add_argument("--burst-window-ms", type=float, default=None,
                        help="the server's --burst-window-ms (default: the server's default)")
    parser.add_argument("--streams-only", action="store_true",
                        help="measure (e) alone, without PEFT: on a GPU its naive loop takes "
                             "about a minute")
    args = parser.parse_args(argv)
    for name in ("requests", "adapters", "rank", "min_tokens", "max_tokens", "mix_tokens",
                 "max_batch", "threads", "rounds", "loads", "swaps", "swap_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.adapters > args.requests:
        parser.error(f"--adapters ({args.adapters}) must be <= --requests ({args.requests})")
    if args.min_tokens > args.max_tokens:
        parser.error(f"--min-tokens ({args.min_tokens}) must be <= --max-tokens "
                     f"({args.max_tokens})")
    results = run(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
