"""`evalsuite`: replay test sets against adapters (`run`), promote a gated candidate (`promote`),
and have people rate candidate and baseline blind, side by side (`ab`, see `evalsuite.ab.cli`).

Exit codes, for CI: 0 every candidate passed (or the promotion happened), 1 a regression (or the
promotion was refused; without `--gate`, a significant regression of ROUGE-L, chrF, perplexity or
the failure rate), 2 an error (bad arguments, unreadable files, server unreachable, a key the
server refused, an adapter the server cannot resolve, or an adapter that answered no turn at all).

Both commands take the `switchboard` CLI's security options (`--api-key`, default
$SWITCHBOARD_API_KEY, read in `main`; `--tls`, `--ca-cert`, `--client-cert`, `--client-key`):
`run` needs an API key, `promote` an admin key, when the server checks keys.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from clients.aio import AsyncSwitchboardClient
from clients.cli import API_KEY_ENV, add_security_options, describe_error, security_kwargs
from clients.client import ClientSecurity, SwitchboardClient
from clients.errors import SwitchboardRpcError
from clients.http import AsyncHttpClient
from clients.transport import async_client_for
from common.data import DataError
from common.names import BASE_NAME
from evalsuite.ab.cli import add_ab_commands
from evalsuite.ab.errors import RatingSetError
from evalsuite.cache import ResultCache
from evalsuite.exitcodes import EXIT_ERROR, EXIT_PASS, EXIT_REGRESSION
from evalsuite.gate import DEFAULT_GATE_FILE, Gate, GateError, default_gate, load_gate
from evalsuite.promote import PromotionRefused, promote
from evalsuite.replay import (
    MODES,
    TRUNCATIONS,
    ConversationResult,
    ReplayPlan,
    ResolvedAdapter,
    SamplingConfig,
    replay_all,
    resolve_adapter,
)
from evalsuite.report import RunInfo, build_report, comparison_table, write_reports
from evalsuite.stats import BootstrapConfig
from evalsuite.testsets import EvalConversation, dataset_fingerprint, load_testset

NO_GATE = "none"


class UsageError(Exception):
    """A run cannot start; the message says which argument or file is wrong."""


# ---------------------------------------------------------------- run

def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True,
                   help="server address HOST:PORT (gRPC), or http(s)://HOST:PORT for the "
                        "OpenAI-compatible HTTP face")
    p.add_argument("--testset", required=True, action="append", type=Path,
                   help="test file (JSONL: OpenAI messages, ShareGPT, Alpaca or MT-bench); "
                        "repeat for several")
    p.add_argument("--adapters", required=True,
                   help="comma-separated: NAME, NAME@VERSION, an alias, or __base__ (bare base)")
    p.add_argument("--baseline", default="",
                   help="what candidates are compared with (default: __base__ if listed, "
                        "else the first adapter); added to --adapters if missing")
    p.add_argument("--gate", default=None,
                   help="gate YAML with per-metric limits; `none`: report only. Without it, "
                        "the run fails when rougeL, chrf, perplexity or failure_rate gets "
                        "significantly worse (p < 0.05)")
    p.add_argument("--mode", choices=MODES, default="reference",
                   help="reference: the test set's history; free: the adapter's own answers")
    p.add_argument("--concurrency", type=int, default=4, help="conversations in flight")
    p.add_argument("--out", required=True, type=Path, help="report and cache directory")
    p.add_argument("--limit", type=int, default=0, help="first N conversations per file (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (with temperature > 0)")
    p.add_argument("--truncation", choices=TRUNCATIONS, default="",
                   help="context strategy (default: the server's)")
    p.add_argument("--no-score", action="store_true",
                   help="skip the Score RPC (no perplexity)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per RPC")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="replay everything, cache nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_security_options(p, key_help="Replaying needs an API key (or an admin key).")


@dataclass(frozen=True)
class RunSettings:
    adapters: tuple[str, ...]
    baseline: str
    sampling: SamplingConfig
    bootstrap: BootstrapConfig

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunSettings:
        adapters = [a.strip() for a in args.adapters.split(",") if a.strip()]
        if len(set(adapters)) != len(adapters):
            raise UsageError(f"--adapters lists an adapter twice: {args.adapters!r}")
        default = BASE_NAME if BASE_NAME in adapters else adapters[0] if adapters else ""
        baseline = args.baseline or default
        if baseline and baseline not in adapters:
            adapters.insert(0, baseline)
        if len(adapters) < 2:
            raise UsageError(f"--adapters needs a candidate besides the baseline, got {adapters}")
        if args.concurrency < 1:
            raise UsageError(f"--concurrency must be >= 1, got {args.concurrency}")
        if args.timeout <= 0:
            raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout}")
        try:
            sampling = SamplingConfig(
                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, seed=args.seed, truncation=args.truncation,
            )
            boot = BootstrapConfig(n_resamples=args.bootstrap, seed=args.bootstrap_seed)
        except ValueError as err:
            raise UsageError(str(err)) from None
        return cls(tuple(adapters), baseline, sampling, boot)


async def _resolve_all(client: AsyncSwitchboardClient | AsyncHttpClient, requested: Sequence[str],
                       timeout: float) -> list[ResolvedAdapter]:
    resolved = []
    for ref in requested:
        try:
            resolved.append(await asyncio.wait_for(resolve_adapter(client, ref), timeout))
        except SwitchboardRpcError as err:
            raise UsageError(
                f"adapter {ref!r}: the server answered {describe_error(err)}"
            ) from None
    return resolved


async def _replay(args: argparse.Namespace, settings: RunSettings,
                  conversations: Sequence[EvalConversation]
                  ) -> tuple[list[ResolvedAdapter], dict[str, list[ConversationResult]]]:
    async with async_client_for(args.target, timeout=args.timeout, **args.security) as client:
        adapters = await _resolve_all(client, settings.adapters, args.timeout)
        plan = ReplayPlan(adapters=adapters, conversations=conversations, mode=args.mode,
                          sampling=settings.sampling, concurrency=args.concurrency,
                          score=not args.no_score, timeout_s=args.timeout)
        cache = None if args.no_cache else ResultCache(args.out / "cache.sqlite")
        bar = tqdm(total=len(adapters) * len(conversations), desc="replay", unit="conv",
                   disable=args.no_progress, file=sys.stderr)

        def done(result: ConversationResult) -> None:
            bar.update(1)
            if cache is not None:
                bar.set_postfix(cached=cache.hits, refresh=False)

        try:
            results = await replay_all(client, plan, cache=cache, on_done=done)
        finally:
            bar.close()
            if cache is not None:
                cache.close()
    return adapters, results


def _check_answered(results: dict[str, list[ConversationResult]]) -> None:
    for key, convs in results.items():
        if not any(t.ok for c in convs for t in c.turns):
            codes = sorted({t.error_code for c in convs for t in c.turns if t.error_code})
            raise UsageError(f"{key} answered no turn at all (status codes: {codes})")


def _gate(choice: str | None) -> tuple[Gate | None, str]:
    """The gate and how the report names it: the default, none, or the file."""
    if choice is None:
        return default_gate(), DEFAULT_GATE_FILE
    if choice.lower() == NO_GATE:
        return None, ""
    return load_gate(Path(choice)), choice


def _load_inputs(args: argparse.Namespace) -> tuple[Gate | None, list[EvalConversation]]:
    try:
        gate, args.gate_file = _gate(args.gate)
        conversations = load_testset(args.testset, limit=args.limit)
    except (GateError, DataError, ValueError) as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        raise UsageError(f"{err.filename}: {err.strerror}") from None
    return gate, conversations


def run_command(args: argparse.Namespace) -> int:
    settings = RunSettings.from_args(args)
    gate, conversations = _load_inputs(args)
    try:
        adapters, results = asyncio.run(_replay(args, settings, conversations))
    except SwitchboardRpcError as err:
        raise UsageError(f"{args.target}: {describe_error(err)}") from None
    _check_answered(results)
    baseline = next(a.key for a in adapters if a.requested == settings.baseline)
    info = RunInfo(
        target=args.target, testsets=tuple(str(p) for p in args.testset),
        testset_fingerprint=dataset_fingerprint(conversations), mode=args.mode,
        sampling={**settings.sampling.to_dict(), "score": not args.no_score},
        concurrency=args.concurrency, requested={a.key: a.requested for a in adapters},
        baseline=baseline, gate_file=args.gate_file,
    )
    report = build_report(results, info, gate, settings.bootstrap)
    paths = write_reports(report, args.out)
    print(comparison_table(report))
    _print_verdicts(report)
    print(f"report: {paths['md']} {paths['html']} {paths['json']}")
    return EXIT_REGRESSION if report["regressed"] else EXIT_PASS


def _print_verdicts(report: dict[str, Any]) -> None:
    gate = report["gate"]
    if gate is None:
        print("no gate (--gate none): report only")
    elif gate["file"] == DEFAULT_GATE_FILE:
        print("default gate (no --gate): fails on a significant regression (p < "
              f"{gate['rules']['alpha']}) of rougeL, chrf, perplexity or failure_rate")
    for cand in report["candidates"]:
        result = (gate or {}).get("results", {}).get(cand)
        if result is None:
            print(f"{cand} vs {report['baseline']}: no gate")
            continue
        verdict = ("PASS" if result["passed"] else "FAIL" if result["regressed"]
                   else "PENDING people's ratings")
        failed = [f"{c['metric']} {c['limit']}: {c['reason']}" for c in result["checks"]
                  if not c["passed"]]
        print(f"{cand} vs {report['baseline']}: {verdict}"
              + (f" ({'; '.join(failed)})" if failed else ""))


# ---------------------------------------------------------------- promote

def _add_promote_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="server address HOST:PORT")
    p.add_argument("--alias", required=True, help="alias to move, such as `support`")
    p.add_argument("--candidate", required=True, help="NAME@VERSION the report gated")
    p.add_argument("--report", required=True, type=Path, help="the `evalsuite run --out` dir")
    p.add_argument("--record", type=Path, default=None,
                   help="also append the record to this JSONL file "
                        "(always appended to <report>/promotions.jsonl)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for SetAlias")
    add_security_options(p, key_help="Promoting moves an alias, so it needs an ADMIN key "
                         "(an API key is refused with PERMISSION_DENIED).")


def promote_command(args: argparse.Namespace) -> int:
    client = SwitchboardClient(args.target, timeout=args.timeout, **args.security)
    try:
        rec = promote(client, alias=args.alias, candidate=args.candidate,
                      report_dir=args.report, server=args.target, record=args.record)
    except PromotionRefused as err:
        print(f"evalsuite promote: refused: {err}", file=sys.stderr)
        return EXIT_REGRESSION
    except SwitchboardRpcError as err:
        raise UsageError(f"{args.target}: SetAlias failed: {describe_error(err)}") from None
    finally:
        client.close()
    print(f"{rec.alias} -> {rec.target} (was {rec.previous or 'unset'}), "
          f"recorded by {rec.who} at {rec.when}")
    return EXIT_PASS


# ---------------------------------------------------------------- entry point

def _security(args: argparse.Namespace, env_api_key: str | None) -> dict[str, Any]:
    """The clients' security keywords, checked (PEM files readable) before any call is made."""
    security = security_kwargs(args, env_api_key)
    try:
        ClientSecurity(**security)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return security


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evalsuite", description=__doc__.splitlines()[0],
        epilog="exit codes: 0 pass, 1 regression or refused promotion, 2 error",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="replay test sets against adapters, compare, gate, report")
    _add_run_arguments(run)
    run.set_defaults(func=run_command)
    prom = sub.add_parser("promote", help="move an alias to a candidate whose gate passed "
                          "(needs an admin key when the server checks keys)")
    _add_promote_arguments(prom)
    prom.set_defaults(func=promote_command)
    ab = sub.add_parser("ab", help="blind side-by-side rating by people: create, serve, judge, "
                        "results")
    add_ab_commands(ab)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, which is our error code too
        return int(exc.code or 0)
    try:
        if hasattr(args, "api_key"):  # the commands that talk to a server
            args.security = _security(args, os.environ.get(API_KEY_ENV))
        return args.func(args)
    except (UsageError, RatingSetError) as err:
        command = " ".join(filter(None, (args.command, getattr(args, "ab_command", None))))
        print(f"evalsuite {command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
