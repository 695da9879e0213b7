"""Benchmark the OpenAI-compatible HTTP face against gRPC on the same rows, in one run.

One server (tiny 4-bit base, both ports, same core) in this process. Each round sends the same
rows, N concurrent requests over K adapters with fixed prompts and fixed answer lengths
(`ignore_eos`, so both transports generate exactly the same tokens), through the gRPC client
(clients.aio) and through the HTTP client (clients.http, POST /v1/chat/completions), streamed
and unary, alternating which transport goes first. The best round of each counts. Prints a
table (target: HTTP at least 0.9 x the gRPC tokens/s; beside it the same ratio per CPU second of
the server process, which a busy machine distorts less) and writes JSON with --out. The clients
run in a process of their own.

    .venv/bin/python bench/bench_http.py --work build/bench --out bench_http.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from bench_engine import PROMPTS, Measurement, answer_lengths, ensure_base, write_adapters
from bench_serving import write_manifest

from clients.aio import AsyncSwitchboardClient
from clients.http import AsyncHttpClient

TARGET_RATIO = 0.9
TRANSPORTS = ("grpc", "http")
MODES = ("stream", "unary")


@dataclass(frozen=True)
class Row:
    """One request: its prompt, adapter and exact answer length."""

    prompt: str
    adapter: str
    tokens: int


def rows_of(count: int, adapters: int, shortest: int, longest: int) -> list[Row]:
    lengths = answer_lengths(count, shortest, longest)
    return [Row(PROMPTS[i % len(PROMPTS)], f"bench{i % adapters}@1", lengths[i])
            for i in range(count)]


Targets = tuple[str, str]  # (gRPC HOST:PORT, HTTP URL): what the client process needs


def client_for(transport: str, targets: Targets) -> AsyncSwitchboardClient | AsyncHttpClient:
    if transport == "http":
        return AsyncHttpClient(targets[1], timeout=600)
    return AsyncSwitchboardClient(targets[0], timeout=600)


async def one(client: Any, row: Row, mode: str) -> int:
    """Send one row; returns the completion tokens the server reported."""
    options = {"adapter": row.adapter, "max_new_tokens": row.tokens, "ignore_eos": True}
    messages = [{"role": "user", "content": row.prompt}]
    if mode == "unary":
        return (await client.chat(messages, **options)).completion_tokens
    final = None
    async for chunk in client.chat_stream(messages, **options):
        final = chunk.final or final
    assert final is not None, "a stream ended without its final chunk"
    return final.completion_tokens


async def _send_all(transport: str, targets: Targets, rows: Sequence[Row],
                    mode: str) -> tuple[int, float, float]:
    async with client_for(transport, targets) as client:
        await one(client, Row("hi", rows[0].adapter, 1), mode)  # connection up, outside the clock
        started, cpu = time.perf_counter(), time.process_time()
        tokens = await asyncio.gather(*(one(client, row, mode) for row in rows))
        return sum(tokens), time.perf_counter() - started, time.process_time() - cpu


def client_process(transport: str, targets: Targets, rows: Sequence[Row],
                   mode: str) -> tuple[int, float, float]:
    """Runs in the client process: tokens, wall seconds and the client's CPU seconds of all
    rows sent at once."""
    return asyncio.run(_send_all(transport, targets, rows, mode))


def timed(pool: ProcessPoolExecutor, transport: str, targets: Targets, rows: Sequence[Row],
          mode: str) -> tuple[Measurement, float, float]:
    """The run's wall-clock measurement and the CPU seconds the server and the client
    processes spent on it.
    The clients run in their own process, as they would in production: the HTTP client is
    pure Python and the gRPC one is mostly C, so sharing the server's GIL would charge the
    server for the client's parsing."""
    cpu = time.process_time()
    tokens, seconds, client_cpu = pool.submit(client_process, transport, targets, rows,
                                              mode).result()
    cpu = time.process_time() - cpu
    expected = sum(r.tokens for r in rows)
    if tokens != expected:
        raise RuntimeError(f"{transport} {mode}: {tokens} tokens, the rows ask {expected}")
    return Measurement(f"{transport} {mode}", tokens, seconds), cpu, client_cpu


def measure(targets: Targets, rows: Sequence[Row], rounds: int) -> list[dict[str, Any]]:
    """Every (mode, transport) once per round; the order of the transports alternates. A first
    untimed pass loads every adapter, so no round pays for a load."""
    results = []
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        timed(pool, "grpc", targets, rows, "unary")
        for index in range(rounds):
            order = TRANSPORTS if index % 2 == 0 else TRANSPORTS[::-1]
            for mode in MODES:
                for transport in order:
                    m, cpu, client_cpu = timed(pool, transport, targets, rows, mode)
                    print(f"round {index + 1}: {m.name:12s} {m.tokens_per_s:8.1f} tokens/s, "
                          f"CPU ms/token: server {1000 * cpu / m.tokens:5.2f}, "
                          f"client {1000 * client_cpu / m.tokens:5.2f}")
                    results.append({"round": index + 1, "mode": mode, "transport": transport,
                                    **asdict(m), "tokens_per_s": m.tokens_per_s,
                                    "server_cpu_seconds": cpu, "client_cpu_seconds": client_cpu,
                                    "tokens_per_server_cpu_s": m.tokens / cpu})
    return results


def _best(runs: Sequence[dict[str, Any]], mode: str, key: str) -> dict[str, float]:
    return {t: max(r[key] for r in runs if r["mode"] == mode and r["transport"] == t)
            for t in TRANSPORTS}


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mode: the best wall-clock throughput of each transport and their ratio (the target),
    and the same ratio in tokens per server CPU second (what the transport costs the server,
    other load on the machine aside)."""
    table = []
    for mode in MODES:
        best = _best(runs, mode, "tokens_per_s")
        cpu = _best(runs, mode, "tokens_per_server_cpu_s")
        ratio = best["http"] / best["grpc"]
        table.append({"comparison": f"HTTP vs gRPC, {mode}", "grpc_tokens_per_s": best["grpc"],
                      "http_tokens_per_s": best["http"], "ratio": ratio,
                      "cpu_ratio": cpu["http"] / cpu["grpc"],
                      "target": f">= {TARGET_RATIO}", "met": ratio >= TARGET_RATIO})
    return table


def print_table(table: Sequence[dict[str, Any]]) -> None:
    print(f"{'comparison':26s} {'gRPC tok/s':>11s} {'HTTP tok/s':>11s} {'ratio':>6s} "
          f"{'target':>7s} met  {'per server CPU s':>16s}")
    for row in table:
        print(f"{row['comparison']:26s} {row['grpc_tokens_per_s']:11.1f} "
              f"{row['http_tokens_per_s']:11.1f} {row['ratio']:6.2f} {row['target']:>7s} "
              f"{'yes' if row['met'] else 'NO ':4s} {row['cpu_ratio']:16.2f}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from common.modeling import base_fingerprint
    from server.app import start_in_thread
    from server.config import ServerConfig

    torch.set_num_threads(args.threads)
    base = ensure_base(args.base, args.work)
    rows = rows_of(args.requests, args.adapters, args.min_tokens, args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fingerprint = base_fingerprint(str(base))
        for index, path in enumerate(write_adapters(base, root, args.adapters, args.rank)):
            write_manifest(base, path, f"bench{index}", 1, fingerprint)
        server = start_in_thread(ServerConfig.build(
            base=str(base), adapters_root=root, port=0, http_port=free_port(), device="cpu",
            max_batch=args.max_batch, max_loaded_adapters=args.adapters + 1, sessions_db=None))
        try:
            runs = measure((server.target, f"http://127.0.0.1:{server.http_port}"), rows,
                           args.rounds)
        finally:
            server.stop()
    table = summarize(runs)
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads, "load_average": os.getloadavg()},
        "rows": [asdict(r) for r in rows],
        "rounds": args.rounds,
        "runs": runs,
        "table": table,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=None,
                        help="base model directory (default: build the tiny base in --work)")
    parser.add_argument("--work", type=Path, default=Path("build/bench"))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests")
    parser.add_argument("--adapters", type=int, default=4, help="adapters the rows spread over")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--min-tokens", type=int, default=32, help="answer lengths from this")
    parser.add_argument("--max-tokens", type=int, default=128, help="... to this")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    for name in ("requests", "adapters", "min_tokens", "max_tokens", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.min_tokens > args.max_tokens:
        parser.error(f"--min-tokens ({args.min_tokens}) must be <= --max-tokens "
                     f"({args.max_tokens})")
    results = run(args)
    print_table(results["table"])
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
