"""How many CPU threads a torch process runs, and how its idle threads wait: chosen once, in main.

Why this matters: torch runs CPU kernels on an OpenMP pool (the libgomp bundled with the wheel)
as large as the machine, and an idle libgomp worker busy-waits (spins) for a while after every
parallel region before it sleeps. One process alone loses nothing. Two on the same cores (a
`trainer fit` beside a server) each bring a full pool: every kernel's barrier waits for a worker
the OS has parked behind the other process's threads, and those threads burn the core spinning.
Training beside a server dropped from 1.6 steps/s to one step per 8-10 s that way.

The cure is an OMP_WAIT_POLICY of PASSIVE (idle workers sleep at once, so an idle server costs
nothing and a busy one leaves its time slices to the trainer) and pools no larger than the cores
each process may fairly use. libgomp reads OMP_WAIT_POLICY once, when torch first loads it, so
`apply` runs in main before anything imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

WAIT_POLICIES = ("passive", "active")


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class ThreadConfig:
    """`threads`: intra-op threads (0 = OMP_NUM_THREADS if set, else every available core);
    `interop_threads`: torch's inter-op pool (our processes never run ops in parallel);
    `wait_policy`: what idle OpenMP workers do, sleep (passive) or spin (active)."""

    threads: int = 0
    interop_threads: int = 1
    wait_policy: str = "passive"

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = every available core), got "
                             f"{self.threads}")
        if self.interop_threads < 1:
            raise ValueError(f"interop_threads must be >= 1, got {self.interop_threads}")
        if self.wait_policy not in WAIT_POLICIES:
            raise ValueError(f"wait_policy must be one of {WAIT_POLICIES}, got "
                             f"{self.wait_policy!r}")

    def resolved_threads(self, environ: Mapping[str, str]) -> int:
        if self.threads:
            return self.threads
        try:
            from_env = int(environ.get("OMP_NUM_THREADS", "0"))
        except ValueError:
            from_env = 0
        return from_env if from_env > 0 else available_cores()


@dataclass(frozen=True)
class ThreadReport:
    threads: int
    interop_threads: int | None  # None: torch's pool had started already, left as it was
    wait_policy: str

    def describe(self) -> str:
        interop = "unchanged" if self.interop_threads is None else str(self.interop_threads)
        return (f"threads: {self.threads} intra-op, {interop} inter-op, OpenMP wait policy "
                f"{self.wait_policy}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "CPU threads", "how many threads torch runs; set them when a server and a trainer share "
        "the cores (see docs/performance.md)")
    group.add_argument("--threads", type=int, default=0,
                       help="intra-op threads; 0 = $OMP_NUM_THREADS if set, else every core")
    group.add_argument("--interop-threads", type=int, default=1,
                       help="torch inter-op threads (1)")
    group.add_argument("--omp-wait-policy", choices=WAIT_POLICIES, default="passive",
                       help="idle OpenMP threads sleep (passive, the default) or spin (active: "
                            "a little faster alone, much slower beside another torch process)")


def config_from_args(args: argparse.Namespace) -> ThreadConfig:
    return ThreadConfig(threads=args.threads, interop_threads=args.interop_threads,
                        wait_policy=args.omp_wait_policy)


def apply(config: ThreadConfig, environ: os._Environ[str] | None = None) -> ThreadReport:
    """Set the wait policy in the environment, then load torch and size its pools.

    Called again in a process where torch is already loaded (tests that run `main` in-process),
    only the intra-op count can still change; the report says what stayed as it was."""
    environ = os.environ if environ is None else environ
    threads = config.resolved_threads(environ)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
        policy = environ.get("OMP_WAIT_POLICY", "unset").lower() + " (torch loaded before)"
        return ThreadReport(threads, None, policy)
    environ["OMP_WAIT_POLICY"] = config.wait_policy.upper()
    environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(config.interop_threads)
    return ThreadReport(threads, config.interop_threads, config.wait_policy)


def config_from_argv(argv: list[str] | None) -> ThreadConfig:
    """The thread flags alone, read from a whole command line before the rest is parsed (the
    parsing may import modules that load torch)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_arguments(parser)
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return config_from_args(known)
