"""Soak the served path on loopback: steady streams, hot swaps and cancellations, bounded in time.

The server runs as a subprocess (`python -m server.cli serve`) so that its memory is its own:
RSS is read from /proc/<pid>/status once a second. `--streams` clients (one gRPC channel each)
stream answers back to back over `--adapters` adapters, each reached through an alias
`live<k>`; every `--swap-every` seconds one adapter gets a new version, written atomically
(temporary directory, then rename), loaded and aliased in (LoadAdapter + SetAlias), and the
version three swaps old is deleted; a `--cancel-fraction` of the streams is cancelled by its
client after a random number of chunks. /metrics is scraped every few seconds like Prometheus
would. The run stops after `--minutes` or `--max-requests`, whichever comes first.

It prints requests served, completed and cancelled, errors by status code (a client's own
cancellation is not an error), p50/p99 latency of completed answers and the server's RSS after
warm-up against the end. It exits 1 on any unexpected error, a failed swap, rows still running
after the load stopped, a shutdown that did not exit 0, or RSS growth >= --max-growth-pct.

    .venv/bin/python bench/soak.py --minutes 5 --out soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_engine import PROMPTS, ensure_base, write_adapters
from bench_serving import percentile, write_manifest
from replica_stack import server_process

from clients.aio import AsyncSwitchboardClient
from clients.client import SwitchboardClient
from clients.errors import SwitchboardRpcError

START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 300.0
# RSS is compared as medians over this many seconds, so one sample's noise decides nothing.
RSS_WINDOW_S = 10.0
KEEP_VERSIONS = 3  # an adapter's older versions are deleted (none is aliased or in flight)
SCRAPE_EVERY_S = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(pairs: list[str]) -> dict[str, str]:
    """--server-env KEY=VALUE pairs (allocator settings such as MALLOC_MMAP_THRESHOLD_)."""
    return dict(pair.split("=", 1) for pair in pairs)


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


# -- the server -------------------------------------------------------------------------------


# start(argv, log, env) -> a Popen-like process: how the server's process starts.
StartServer = Callable[[list[str], Path, dict[str, str]], Any]


class ServerProcess:
    """`server.cli serve` on free loopback ports; its log goes to `log`."""

    def __init__(self, args: argparse.Namespace, base: Path, root: Path, db: Path,
                 log: Path, start: StartServer = server_process) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.log = log
        argv = ["serve", "--base", str(base),
                "--adapters-root", str(root), "--host", "127.0.0.1", "--port", str(self.port),
                "--device", "cpu", "--sessions-db", str(db),
                "--metrics-port", str(self.metrics_port), "--max-batch", str(args.max_batch),
                "--max-loaded-adapters", str(args.adapters + 4),
                "--shutdown-grace-seconds", "10", "--log-level", "WARNING"]
        # Keys in the environment would turn authentication on; this loopback run has none.
        env = {k: v for k, v in os.environ.items()
               if k not in ("SWITCHBOARD_API_KEYS", "SWITCHBOARD_ADMIN_KEYS")}
        env.update(server_env(args.server_env))
        self.process = start(argv, log, env)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        with SwitchboardClient(self.target, retries=0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}:\n"
                                       f"{self.log_tail()}")
                try:
                    if client.health(timeout=2) == "SERVING":
                        return
                except SwitchboardRpcError:
                    pass  # not listening yet, or still loading the base
                time.sleep(0.2)
        raise RuntimeError(f"server not SERVING after {START_TIMEOUT_S}s:\n{self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of the /metrics page (labelled series are summed by name)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        out: dict[str, float] = {}
        for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.split("{")[0].split(" ")[0], line.rsplit(" ", 1)[1]
                out[name] = out.get(name, 0.0) + float(value)
        return out

    def stop(self) -> int:
        """SIGTERM, then the exit code (the server drains and exits 0 when healthy)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=60)


# -- adapters ---------------------------------------------------------------------------------


@dataclass
class Adapters:
    """The served root, a pool of weights to draw new versions from and each adapter's versions."""

    base: Path
    root: Path
    pool: list[Path]
    fingerprint: str
    versions: dict[int, list[int]] = field(default_factory=dict)

    def write_version(self, index: int, version: int) -> str:
        """Write `bench<index>@<version>` atomically (a half-written one is never seen)."""
        name = f"bench{index}"
        staging = self.root / name / f".staging-{version}"
        shutil.copytree(self.pool[(index + version) % len(self.pool)], staging)
        write_manifest(self.base, staging, name, version, self.fingerprint)
        staging.rename(self.root / name / str(version))
        self.versions.setdefault(index, []).append(version)
        return f"{name}@{version}"

    def prune(self, index: int) -> None:
        kept = self.versions[index]
        while len(kept) > KEEP_VERSIONS:
            shutil.rmtree(self.root / f"bench{index}" / str(kept.pop(0)))


def build_adapters(base: Path, work: Path, count: int, rank: int) -> Adapters:
    """`count` random adapters (bench_engine's) under `work/root`, each at version 1."""
    from common.modeling import base_fingerprint

    pool = write_adapters(base, work / "pool", count, rank)
    adapters = Adapters(base, work / "root", pool, base_fingerprint(str(base)))
    adapters.root.mkdir()
    for index in range(count):
        (adapters.root / f"bench{index}").mkdir()
        adapters.write_version(index, 1)
    return adapters


# -- load -------------------------------------------------------------------------------------


@dataclass
class Stats:
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: list[str] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (began at, seconds)
    swaps: int = 0
    swap_errors: list[str] = field(default_factory=list)
    scrapes: int = 0
    scrape_errors: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)

    def error(self, code: str, details: str) -> None:
        self.errors[code] += 1
        if len(self.error_examples) < 10:
            self.error_examples.append(f"{code}: {details}")


@dataclass
class Run:
    args: argparse.Namespace
    server: ServerProcess
    adapters: Adapters
    stats: Stats
    rng: random.Random
    started: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def sample_rss(self) -> bool:
        """Record the server's RSS; False (and the run stops) once the server has died."""
        try:
            self.stats.rss.append((self.elapsed(), rss_bytes(self.server.process.pid)))
            return True
        except OSError:
            self.stats.error("SERVER_EXITED", f"exit code {self.server.process.poll()}")
            self.stop.set()
            return False

    def may_start(self) -> bool:
        if self.stop.is_set():
            return False
        if self.elapsed() >= self.args.minutes * 60 or self.stats.started >= self.args.max_requests:
            self.stop.set()
            return False
        return True


async def one_request(run: Run, client: AsyncSwitchboardClient) -> None:
    args, stats, rng = run.args, run.stats, run.rng
    prompt = f"{rng.choice(PROMPTS)} (request {stats.started})"
    max_new = rng.randint(max(1, args.max_new_tokens // 4), args.max_new_tokens)
    cancel_after = (rng.randint(1, max(1, max_new - 1))
                    if rng.random() < args.cancel_fraction else None)
    sampled = rng.random() < 0.5
    adapter = f"live{rng.randrange(args.adapters)}"
    stats.started += 1
    began, chunks = time.monotonic(), 0
    try:
        async with client.chat_stream(
                [{"role": "user", "content": prompt}], adapter=adapter,
                max_new_tokens=max_new, temperature=0.8 if sampled else 0.0,
                top_p=0.95 if sampled else 1.0, seed=rng.randrange(2**31) if sampled else None,
                timeout=REQUEST_TIMEOUT_S) as stream:
            async for chunk in stream:
                if chunk.final is not None:
                    stats.completed += 1
                    stats.tokens += chunk.final.completion_tokens
                    stats.latencies.append((began - run.started, time.monotonic() - began))
                    return
                chunks += 1
                if cancel_after is not None and chunks >= cancel_after:
                    stats.cancelled += 1  # leaving the block cancels the call
                    return
        stats.error("NO_FINAL", "the stream ended without a final chunk")
    except SwitchboardRpcError as e:
        stats.error(e.code, e.details)


async def client_loop(run: Run) -> None:
    async with AsyncSwitchboardClient(run.server.target, retries=0) as client:
        while run.may_start():
            await one_request(run, client)


async def swapper(run: Run) -> None:
    """Every `swap_every` seconds the next adapter gets a new version, loaded then aliased."""
    async with AsyncSwitchboardClient(run.server.target, retries=0) as client:
        index = 0
        while not run.stop.is_set():
            try:
                await asyncio.wait_for(run.stop.wait(), run.args.swap_every)
                return
            except TimeoutError:
                pass
            adapters = run.adapters
            version = adapters.versions[index][-1] + 1
            ref = await asyncio.to_thread(adapters.write_version, index, version)
            try:
                await client.load_adapter(ref, timeout=REQUEST_TIMEOUT_S)
                await client.set_alias(f"live{index}", ref, reason="soak hot swap",
                                       timeout=REQUEST_TIMEOUT_S)
                run.stats.swaps += 1
            except SwitchboardRpcError as e:
                run.stats.swap_errors.append(f"{ref}: {e.code}: {e.details}")
            await asyncio.to_thread(adapters.prune, index)
            index = (index + 1) % run.args.adapters


async def watcher(run: Run) -> None:
    """RSS every second; /metrics every few seconds, as a Prometheus server would scrape."""
    last_scrape = -SCRAPE_EVERY_S  # the first scrape comes at once
    while not run.stop.is_set():
        if not run.sample_rss():
            return
        if run.elapsed() - last_scrape >= SCRAPE_EVERY_S:
            last_scrape = run.elapsed()
            try:
                await asyncio.to_thread(run.server.metrics)
                run.stats.scrapes += 1
            except OSError as e:
                run.stats.scrape_errors.append(str(e))
        try:
            await asyncio.wait_for(run.stop.wait(), 1.0)
        except TimeoutError:
            pass


async def prepare(server: ServerProcess, count: int) -> None:
    """Load every adapter and point `live<k>` at it before the clock starts."""
    async with AsyncSwitchboardClient(server.target, retries=0) as client:
        for index in range(count):
            await client.load_adapter(f"bench{index}@1", timeout=REQUEST_TIMEOUT_S)
            await client.set_alias(f"live{index}", f"bench{index}@1", timeout=REQUEST_TIMEOUT_S)


async def soak(run: Run) -> float:
    """Run the load; returns the seconds it ran."""
    await prepare(run.server, run.args.adapters)
    run.started = time.monotonic()
    tasks = [asyncio.create_task(swapper(run)), asyncio.create_task(watcher(run))]
    await asyncio.gather(*(client_loop(run) for _ in range(run.args.streams)))
    seconds = run.elapsed()
    run.stop.set()
    await asyncio.gather(*tasks)
    run.sample_rss()
    return seconds


# -- report -----------------------------------------------------------------------------------


def rss_summary(samples: list[tuple[float, int]], warmup: float) -> dict[str, Any]:
    """Median RSS over the window after warm-up against the median over the last window."""
    after = [(t, b) for t, b in samples if t >= warmup] or samples[-1:]
    start = after[0][0]
    warm = statistics.median(b for t, b in after if t <= start + RSS_WINDOW_S)
    end_at = after[-1][0]
    end = statistics.median(b for t, b in after if t >= end_at - RSS_WINDOW_S)
    return {"after_warmup_bytes": int(warm), "end_bytes": int(end),
            "peak_bytes": max(b for _, b in samples), "growth_pct": 100.0 * (end - warm) / warm,
            "measured_seconds": end_at - start, "samples": len(samples)}


def latency_summary(latencies: list[tuple[float, float]], warmup: float) -> dict[str, Any]:
    """p50/p99 of the answers begun after warm-up (of all of them when the run was shorter)."""
    after = [seconds for began, seconds in latencies if began >= warmup]
    window = "after warm-up" if after else "whole run"
    values = after or [seconds for _, seconds in latencies] or [0.0]
    return {"window": window, "count": len(after or latencies),
            "p50_s": percentile(values, 0.5), "p99_s": percentile(values, 0.99)}


def drained(server: ServerProcess) -> dict[str, float]:
    """Once the load stopped, every row must leave the batch and the queue."""
    deadline = time.monotonic() + 30
    while True:
        values = server.metrics()
        gauges = {k: values.get(f"switchboard_requests_{k}", -1.0) for k in ("running", "waiting")}
        if gauges == {"running": 0.0, "waiting": 0.0} or time.monotonic() > deadline:
            return gauges
        time.sleep(0.2)


def print_table(result: dict[str, Any]) -> None:
    s, r, lat = result["settings"], result["rss"], result["latency"]
    errors = ", ".join(f"{k} {v}" for k, v in sorted(result["errors"].items())) or "none"
    mib = 1024 * 1024
    rows = [
        ("requests served", f"{result['requests']}"),
        ("  completed", f"{result['completed']}"),
        ("  cancelled by their client", f"{result['cancelled']}"),
        ("errors by status", errors),
        ("hot swaps (failed)", f"{result['swaps']} ({len(result['swap_errors'])})"),
        (f"latency p50 / p99 ({lat['window']})", f"{lat['p50_s']:.2f} s / {lat['p99_s']:.2f} s"),
        ("tokens generated per second", f"{result['tokens_per_s']:.1f}"),
        ("server RSS after warm-up", f"{r['after_warmup_bytes'] / mib:.1f} MiB"),
        ("server RSS at the end", f"{r['end_bytes'] / mib:.1f} MiB"),
        ("RSS growth", f"{r['growth_pct']:+.2f}% (limit {s['max_growth_pct']}%)"),
        ("rows left after the load", f"{result['left_after_load']}"),
        ("server exit code after SIGTERM", f"{result['server_exit_code']}"),
        ("load average before / after", f"{result['machine']['load_average_before']} / "
                                        f"{result['machine']['load_average_after']}"),
        ("result", "PASS" if result["passed"] else "FAIL: " + "; ".join(result["failures"])),
    ]
    print(f"soak: {s['streams']} streams over {s['adapters']} adapters for "
          f"{result['seconds']:.0f} s ({s['warmup_seconds']:.0f} s warm-up), swap every "
          f"{s['swap_every']} s, {100 * s['cancel_fraction']:.0f}% cancelled"
          + (f", server env {' '.join(s['server_env'])}" if s["server_env"] else ""))
    for label, value in rows:
        print(f"  {label:34} {value}")


def failures_of(result: dict[str, Any], max_growth: float) -> list[str]:
    out = []
    if result["errors"]:
        out.append(f"unexpected errors {result['errors']}")
    if result["swap_errors"]:
        out.append(f"{len(result['swap_errors'])} failed swaps")
    if result["completed"] == 0:
        out.append("no request completed")
    if result["left_after_load"] != {"running": 0.0, "waiting": 0.0}:
        out.append(f"rows left after the load {result['left_after_load']}")
    if result["server_exit_code"] != 0:
        out.append(f"server exited {result['server_exit_code']} after SIGTERM")
    if result["rss"]["growth_pct"] >= max_growth:
        out.append(f"RSS grew {result['rss']['growth_pct']:.2f}% >= {max_growth}%")
    return out


def run(args: argparse.Namespace, start: StartServer = server_process) -> dict[str, Any]:
    base = ensure_base(args.base, args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        adapters = build_adapters(base, work, args.adapters, args.rank)
        server = ServerProcess(args, base, adapters.root, work / "sessions.db",
                               args.work / "soak-server.log", start)
        try:
            server.wait_serving()
            state = Run(args, server, adapters, Stats(), random.Random(args.seed))
            seconds = asyncio.run(soak(state))
            left = drained(server)
        finally:
            exit_code = server.stop()
    stats = state.stats
    result: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "seconds": seconds,
        "requests": stats.started, "completed": stats.completed, "cancelled": stats.cancelled,
        "errors": dict(stats.errors), "error_examples": stats.error_examples,
        "swaps": stats.swaps, "swap_errors": stats.swap_errors,
        "scrapes": stats.scrapes, "scrape_errors": stats.scrape_errors[:10],
        "tokens": stats.tokens, "tokens_per_s": stats.tokens / seconds,
        "latency": latency_summary(stats.latencies, args.warmup_seconds),
        "rss": rss_summary(stats.rss, args.warmup_seconds),
        "rss_samples": [(round(t, 1), b) for t, b in stats.rss],
        "left_after_load": left, "server_exit_code": exit_code,
        "server_log": str(server.log),
    }
    result["failures"] = failures_of(result, args.max_growth_pct)
    result["passed"] = not result["failures"]
    return result


def main(argv: list[str] | None = None, start: StartServer = server_process) -> int:
    """The soak; `start` says how the server's process starts (the tests fork theirs from a
    process that has the imports done)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=None,
                        help="tiny base directory (built under --work when omitted)")
    parser.add_argument("--work", type=Path, default=Path("build/soak"),
                        help="where the tiny base is built and the server log is written")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--streams", type=int, default=32, help="concurrent streaming clients")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--swap-every", type=float, default=5.0,
                        help="seconds between hot swaps (new version + LoadAdapter + SetAlias)")
    parser.add_argument("--cancel-fraction", type=float, default=0.1,
                        help="share of streams their client cancels after a random chunk")
    parser.add_argument("--minutes", type=float, default=5.0, help="stop after this long")
    parser.add_argument("--max-requests", type=int, default=1_000_000,
                        help="... or after starting this many requests")
    parser.add_argument("--warmup-seconds", type=float, default=30.0,
                        help="RSS growth is measured from the end of the warm-up")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="answers ask for a quarter of this up to this many tokens")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-growth-pct", type=float, default=5.0,
                        help="fail at this much RSS growth after warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment of the server process (repeatable), e.g. "
                             "MALLOC_MMAP_THRESHOLD_=131072 to compare allocator settings")
    args = parser.parse_args(argv)
    for name in ("streams", "adapters", "rank", "max_requests", "max_new_tokens", "max_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("swap_every", "minutes"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.cancel_fraction <= 1:
        parser.error(f"--cancel-fraction must be in 0..1, got {args.cancel_fraction}")
    if any("=" not in pair for pair in args.server_env):
        parser.error(f"--server-env takes KEY=VALUE, got {args.server_env}")
    if args.warmup_seconds < 0:
        parser.error(f"--warmup-seconds must be >= 0, got {args.warmup_seconds}")
    result = run(args, start)
    print_table(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
