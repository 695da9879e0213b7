"""Training beside a server on the same cores: steps/s alone, beside an idle and a busy server.

    python bench/thread_contention.py --base BASE_DIR --data TRAIN.jsonl [--steps 30] [--json OUT]

Each row is one `trainer fit` of --steps steps; steps/s counts the training loop only (the
manifest's train_runtime_s: model loading and data preparation excluded). "before" starts both
processes without common.threads, as they ran before it existed (libgomp's default: idle workers
spin, every process sizes its pool to every core); "after" runs the CLIs with their defaults
(idle workers sleep: OMP_WAIT_POLICY=PASSIVE); "split" is "after" with half the cores for each
process (`--threads`). The busy server answers chats back to back from one client thread
during the whole fit.
The baseline is the "alone" row of the same setting, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common.threads import available_cores

ROOT = Path(__file__).resolve().parents[1]
# The entry points as they were before common.threads: parse and run, no thread choice.
BEFORE_FIT = ("import argparse, sys; from trainer import fit; p = argparse.ArgumentParser(); "
              "fit.add_arguments(p); sys.exit(fit.run(p.parse_args(sys.argv[1:])))")
BEFORE_SERVE = ("import sys; from server.cli import build_parser, config_from_args; "
                "from server.app import serve_forever; "
                "serve_forever(config_from_args(build_parser().parse_args(sys.argv[1:])))")
SETTINGS = ("before", "after", "split")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment() -> dict[str, str]:
    """The caller's environment without OpenMP settings, so each setting starts equal."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}


def thread_flags(setting: str) -> list[str]:
    half = max(1, available_cores() // 2)
    return ["--threads", str(half)] if setting == "split" else []


def start_server(setting: str, base: str, work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = ["serve", "--base", base, "--adapters-root", str(work / "adapters"), "--port",
            str(port), "--device", "cpu", "--no-sessions", "--context-length", "1024",
            "--max-batch", "4", *thread_flags(setting)]
    cmd = ([sys.executable, "-c", BEFORE_SERVE, *args] if setting == "before"
           else [sys.executable, "-m", "server.cli", *args])
    log = (work / "server.log").open("a")
    process = subprocess.Popen(cmd, cwd=ROOT, env=environment(), stdout=log, stderr=log)
    target = f"127.0.0.1:{port}"
    wait_serving(target, process)
    return process, target


def wait_serving(target: str, process: subprocess.Popen) -> None:
    from clients.client import SwitchboardClient

    deadline = time.monotonic() + 300
    with SwitchboardClient(target, retries=0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"server exited with {process.returncode}")
            try:
                if client.health() == "SERVING":
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
    raise SystemExit("server not serving after 300 s")


def keep_busy(target: str, stop: threading.Event) -> None:
    """Chats back to back until `stop`: the server decodes during the whole fit."""
    from clients.client import SwitchboardClient

    with SwitchboardClient(target, retries=0) as client:
        while not stop.is_set():
            client.chat([{"role": "user", "content": "Tell me about pizza ovens."}],
                        max_new_tokens=32)


def run_fit(setting: str, base: str, data: str, steps: int, work: Path, name: str) -> float:
    args = ["--base", base, "--data", data, "--name", name, "--adapters-root",
            str(work / "adapters"), "--max-steps", str(steps), "--val-split", "0",
            "--save-steps", str(steps), "--logging-steps", str(steps), *thread_flags(setting)]
    cmd = ([sys.executable, "-c", BEFORE_FIT, *args] if setting == "before"
           else [sys.executable, "-m", "trainer.cli", "fit", *args])
    out = subprocess.run(cmd, cwd=ROOT, env=environment(), capture_output=True, text=True,
                         check=True)
    version = Path(out.stdout.strip().splitlines()[-1])
    metrics = json.loads((version / "manifest.json").read_text())["metrics"]
    return metrics["global_step"] / metrics["train_runtime_s"]


def measure(setting: str, base: str, data: str, steps: int, work: Path) -> dict[str, float]:
    row = {"alone": run_fit(setting, base, data, steps, work, "alone")}
    server, target = start_server(setting, base, work)
    try:
        row["idle server"] = run_fit(setting, base, data, steps, work, "idle")
        stop = threading.Event()
        load = threading.Thread(target=keep_busy, args=(target, stop), daemon=True)
        load.start()
        try:
            row["busy server"] = run_fit(setting, base, data, steps, work, "busy")
        finally:
            stop.set()
            load.join(timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated subset of {SETTINGS}")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings.split(","):
            work = Path(tmp) / setting
            (work / "adapters").mkdir(parents=True)
            results[setting] = measure(setting, args.base, args.data, args.steps, work)
            print(f"{setting}: {results[setting]}", flush=True)
    print(f"\ntrainer fit steps/s on {available_cores()} cores ({args.steps} steps each)")
    print(f"{'setting':<14}{'alone':>8}{'idle server':>13}{'busy server':>13}{'busy/alone':>12}")
    for setting, row in results.items():
        print(f"{setting:<14}{row['alone']:>8.2f}{row['idle server']:>13.2f}"
              f"{row['busy server']:>13.2f}{row['busy server'] / row['alone']:>12.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
