"""`evalsuite ab create | serve | judge | results`: the blind side-by-side rating workflow.

    evalsuite ab create  --report RUN_DIR [--report RUN_DIR2] --out SET [--seed N] [--max-pairs N]
    evalsuite ab serve   --set SET [--port 8050]       # raters open http://127.0.0.1:8050/
    evalsuite ab judge   --set SET --target HOST:PORT --adapter NAME   # optional model judge
    evalsuite ab results --set SET [--out DIR]         # merges into each run's report, re-gates

`results` exits 1 when a candidate's gate now fails on what was measured, like `run`.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from tqdm import tqdm

from clients.cli import add_security_options, describe_error
from clients.client import SwitchboardClient
from clients.errors import SwitchboardRpcError
from common.names import BASE_NAME, adapter_name
from evalsuite.ab.blindset import KEY_FILE, PAIRS_FILE, create_set, load_pairs
from evalsuite.ab.errors import RatingSetError
from evalsuite.ab.judge import run_judge
from evalsuite.ab.render import agreement_line, people_tables, position_line
from evalsuite.ab.results import ab_results
from evalsuite.exitcodes import EXIT_PASS, EXIT_REGRESSION
from evalsuite.stats import BootstrapConfig


def create_command(args: argparse.Namespace) -> int:
    pairs, key = create_set(args.report, args.out, seed=args.seed, max_pairs=args.max_pairs)
    per_cand: dict[str, int] = {}
    for k in key.pairs.values():
        per_cand[k.candidate] = per_cand.get(k.candidate, 0) + 1
    counts = ", ".join(f"{c}: {n}" for c, n in per_cand.items())
    print(f"{len(pairs)} blind pairs ({counts}), seed {args.seed}")
    print(f"raters see {args.out / PAIRS_FILE}; the key is {args.out / KEY_FILE} (keep it apart)")
    print(f"next: evalsuite ab serve --set {args.out}")
    return EXIT_PASS


def serve_command(args: argparse.Namespace) -> int:
    if not 0 <= args.port < 65536:
        raise RatingSetError(f"--port must be 0-65535, got {args.port}")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"WARNING: serving on {args.host}: anyone who reaches it can rate under any name",
              file=sys.stderr)
    # Imported here: the web stack (FastAPI, uvicorn) is needed by this command alone.
    from evalsuite.ab.webapp import serve

    try:
        serve(args.set, args.host, args.port)
    except OSError as err:
        raise RatingSetError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from None
    return EXIT_PASS


def judge_command(args: argparse.Namespace) -> int:
    pairs = load_pairs(args.set)
    adapter = "" if args.adapter == BASE_NAME else args.adapter
    bar = tqdm(total=len(pairs), desc="judge", unit="pair", disable=args.no_progress,
               file=sys.stderr)
    try:
        with SwitchboardClient(args.target, timeout=args.timeout, **args.security) as client:
            verdicts = run_judge(client, pairs, args.set, adapter, on_done=lambda v: bar.update(),
                                 max_new_tokens=args.max_new_tokens, temperature=0.0)
    except SwitchboardRpcError as err:
        raise RatingSetError(f"{args.target}: the judge's call failed: {describe_error(err)} "
                             "(verdicts so far are saved; run again to resume)") from None
    finally:
        bar.close()
    mine = [v for v in verdicts if v.judge == adapter_name(adapter)]
    counts = {c: sum(v.choice == c for v in mine) for c in ("left", "right", "tie", "error")}
    print(f"judge {adapter_name(adapter)}: {len(mine)} pairs judged {counts}; "
          f"see `evalsuite ab results --set {args.set}`")
    return EXIT_PASS


def results_command(args: argparse.Namespace) -> int:
    try:
        config = BootstrapConfig(n_resamples=args.bootstrap, seed=args.bootstrap_seed)
    except ValueError as err:
        raise RatingSetError(str(err)) from None
    out = args.out or args.set / "results"
    merged = ab_results(args.set, out, config)
    regressed = False
    for report_dir, m in merged.items():
        people = m["human"]["people"]
        print(f"report {report_dir}: {people['ratings']} ratings by "
              f"{', '.join(people['raters'])}")
        print("\n".join(people_tables(people)))
        print(f"agreement between raters: {agreement_line(people['agreement'])}")
        print(position_line(people).replace("**", ""))
        for cand, res in ((m["gate"] or {}).get("results") or {}).items():
            verdict = "PASS" if res["passed"] else "PENDING" if not res["regressed"] else "FAIL"
            failed = [f"{c['metric']}.{c['limit']} ({c['reason']})" for c in res["checks"]
                      if not c["passed"]]
            print(f"gate {cand}: {verdict}{': ' + '; '.join(failed) if failed else ''}")
            regressed = regressed or res["regressed"]
    print(f"merged into {', '.join(f'{d}/report.md' for d in merged)}; summary {out}/human.md")
    return EXIT_REGRESSION if regressed else EXIT_PASS


def add_ab_commands(ab: argparse.ArgumentParser) -> None:
    sub = ab.add_subparsers(dest="ab_command", required=True)
    p = sub.add_parser("create", help="a blind rating set from finished `evalsuite run` reports")
    p.add_argument("--report", required=True, action="append", type=Path,
                   help="an `evalsuite run --out` directory; repeat for several")
    p.add_argument("--out", required=True, type=Path, help="the rating set directory to create")
    p.add_argument("--seed", type=int, default=0, help="seed for left/right and pair order")
    p.add_argument("--max-pairs", type=int, default=0,
                   help="at most N pairs per candidate, drawn at random (0: every turn)")
    p.set_defaults(func=create_command)
    p = sub.add_parser("serve", help="the rating page for people (server-rendered, local)")
    p.add_argument("--set", required=True, type=Path, help="the rating set directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8050, help="port (0: any free one)")
    p.set_defaults(func=serve_command)
    p = sub.add_parser("judge", help="optional: a model judges the same pairs (MT-bench prompt)")
    p.add_argument("--set", required=True, type=Path)
    p.add_argument("--target", required=True, help="server address HOST:PORT")
    p.add_argument("--adapter", required=True, help="the judge: NAME[@VERSION], alias or __base__")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per RPC")
    p.add_argument("--no-progress", action="store_true")
    add_security_options(p, key_help="Judging needs an API key when the server checks keys.")
    p.set_defaults(func=judge_command)
    p = sub.add_parser("results", help="win rates, scores, agreement; merged into the reports")
    p.add_argument("--set", required=True, type=Path)
    p.add_argument("--out", type=Path, default=None, help="summary directory (default SET/results)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.set_defaults(func=results_command)
