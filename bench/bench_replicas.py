"""Throughput of 1, 2 and 3 replicas on loopback behind nginx with adapter affinity, and the share
of requests that found their adapter already loaded on the replica that served them.

Each replica keeps at most --max-loaded-adapters adapters (fewer than --adapters), the way a
real fleet holds more adapters than one replica's slots. For every replica count the same
request stream (adapters drawn uniformly, fixed answer lengths through ignore_eos) runs twice on
the same replicas, emptied of adapters in between:
  - affinity: through nginx, the adapter in the `x-switchboard-adapter` header (consistent hash);
  - round-robin: request i straight to replica i mod N, the baseline without affinity.
Hits are counted from the replicas' own `switchboard_adapter_loads_total`: hit share =
1 - loads / requests. Sessions live in one real redis-server. All processes share this
machine's cores, so on a small machine more replicas add no compute: the throughput column says
what the proxy and the routing cost, the hit share what affinity buys.

    .venv/bin/python bench/bench_replicas.py --work build/bench-replicas --out bench_replicas.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench_engine import ensure_base, write_adapters
from bench_serving import write_manifest
from replica_stack import Caller, Replica, find_tool, nginx_proxy, redis_server, replicas


def build_adapters(base: Path, root: Path, count: int) -> list[str]:
    from common.modeling import base_fingerprint

    if (root / f"bench{count - 1}" / "1" / "manifest.json").exists():
        return [f"bench{i}" for i in range(count)]
    fingerprint = base_fingerprint(str(base))
    for index, path in enumerate(write_adapters(base, root, count, rank=8)):
        write_manifest(base, path, f"bench{index}", 1, fingerprint)
    return [f"bench{i}" for i in range(count)]


def stream(adapters: list[str], requests: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(adapters) for _ in range(requests)]


def run_mode(targets: list[str], fleet: list[Replica], adapters: list[str],
             args: argparse.Namespace) -> dict[str, Any]:
    """Send the stream (target of request i: targets[i % len(targets)]); loads, time, tokens."""
    callers = [Caller(t) for t in targets]
    loads_before = sum(r.adapter_loads() for r in fleet)
    jobs = list(enumerate(stream(adapters, args.requests, args.seed)))

    def send(job: tuple[int, str]) -> int:
        i, adapter = job
        answer = callers[i % len(callers)].chat(adapter, f"request {i}: hello",
                                                max_new_tokens=args.max_tokens, ignore_eos=True,
                                                timeout=300)
        return answer.usage.completion_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        tokens = sum(pool.map(send, jobs))
    seconds = time.perf_counter() - started
    loads = sum(r.adapter_loads() for r in fleet) - loads_before
    for caller in callers:
        caller.close()
    return {"requests": len(jobs), "tokens": tokens, "seconds": round(seconds, 3),
            "requests_per_s": round(len(jobs) / seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2), "adapter_loads": loads,
            "hit_share": round(1 - loads / len(jobs), 3)}


def empty(fleet: list[Replica]) -> None:
    for replica in fleet:
        caller = Caller(replica.target)
        caller.unload_all()
        caller.close()


def measure(n: int, base: Path, adapters_root: Path, adapters: list[str], redis_url: str,
            args: argparse.Namespace) -> list[dict[str, Any]]:
    work = args.work / f"n{n}"
    work.mkdir(parents=True, exist_ok=True)
    extra = ["--max-loaded-adapters", str(args.max_loaded_adapters), "--max-batch", "8"]
    rows = []
    with replicas(n, work, base, adapters_root, redis_url, extra, metrics=True) as fleet, \
            nginx_proxy(work / "nginx", [r.target for r in fleet]) as proxy:
        for mode, targets in (("affinity", [proxy.target]),
                              ("round-robin", [r.target for r in fleet])):
            empty(fleet)
            result = run_mode(targets, fleet, adapters, args)
            rows.append({"replicas": n, "routing": mode, **result})
            print(f"{n} replicas, {mode:11s}: {result['requests_per_s']:6.2f} req/s "
                  f"{result['tokens_per_s']:8.1f} tok/s, hit share {result['hit_share']:.2f}",
                  flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| replicas | routing | req/s | tokens/s | adapter loads | hit share |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['replicas']} | {r['routing']} | {r['requests_per_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['adapter_loads']} | {r['hit_share']:.2f} |"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="base model (default: build the tiny one)")
    parser.add_argument("--work", type=Path, default=Path("build/bench-replicas"))
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--replicas", default="1,2,3", help="replica counts to measure")
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--max-loaded-adapters", type=int, default=2)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    missing = [t for t in ("redis-server", "nginx") if find_tool(t) is None]
    if missing:
        raise SystemExit(f"bench_replicas: {', '.join(missing)} not installed (make tools)")
    args.work.mkdir(parents=True, exist_ok=True)
    base = ensure_base(args.base, args.work)
    adapters = build_adapters(base, args.work / "adapters", args.adapters)
    rows: list[dict[str, Any]] = []
    with redis_server(args.work / "redis") as redis_url:
        for n in (int(x) for x in args.replicas.split(",")):
            rows += measure(n, base, args.work / "adapters", adapters, redis_url, args)
    print(table(rows))
    if args.out:
        result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                  "created": datetime.now(UTC).isoformat(),
                  "settings": {k: str(v) for k, v in vars(args).items()},
                  "runs": rows, "table": table(rows)}
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
