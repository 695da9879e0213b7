"""`make demo`: the whole Switchboard loop on the embedded tiny base, end to end.

Builds the base and the data if missing, trains two adapters, serves them, chats with each and
with the bare base, evaluates a candidate against the base and prints where everything is.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
DOMAINS = {"food": "food_ordering", "helpdesk": "it_helpdesk"}
GATE = Path(__file__).with_name("demo_gate.yaml")
FIT_CONFIG = Path(__file__).with_name("demo_fit.yaml")


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(*args: str | Path) -> str:
    """Run a project command, echo it, stream its output and return its last line."""
    cmd = [str(a) for a in args]
    print("$", " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd)), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    print(proc.stdout, end="", flush=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def latest_version(root: Path, name: str) -> Path | None:
    versions = [p for p in (root / name).glob("*") if p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name)) if versions else None


def build_inputs(work: Path) -> tuple[Path, Path]:
    base, data = work / "base", work / "data"
    step("1. the embedded tiny base model")
    if (base / "config.json").exists():
        print(f"reusing {base}")
    else:
        run(BIN / "trainer", "init-base", "--output", base)
    step("2. the bundled conversation data")
    run(BIN / "trainer", "make-data", "--out", data)
    return base, data


def train_adapters(base: Path, data: Path, root: Path, max_steps: int | None) -> None:
    step("3. train one adapter per domain (QLoRA, assistant-only loss)")
    for name, domain in DOMAINS.items():
        existing = latest_version(root, name)
        if existing is not None:
            print(f"reusing {existing} (delete it to retrain)")
            continue
        run(
            BIN / "trainer", "fit", "--base", base, "--data", data / domain / "train.jsonl",
            "--validation", data / domain / "validation.jsonl", "--name", name,
            "--adapters-root", root, "--config", FIT_CONFIG,
            *(["--max-steps", str(max_steps)] if max_steps else []),
        )


def start_server(
    base: Path, root: Path, port: int, metrics_port: int, work: Path
) -> subprocess.Popen:
    step("4. serve the base and the adapters")
    log = (work / "server.log").open("w")
    cmd = [
        str(BIN / "switchboard-server"), "serve", "--base", str(base), "--adapters-root", str(root),
        "--port", str(port), "--metrics-port", str(metrics_port),
        "--sessions-db", str(work / "sessions.db"),
    ]
    print("$", " ".join(cmd[1:]), f"(log: {work / 'server.log'})")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited early; see {work / 'server.log'}")
        probe = subprocess.run(
            [str(BIN / "switchboard"), "health", "--target", f"127.0.0.1:{port}"],
            capture_output=True, text=True,
        )
        if probe.returncode == 0 and "SERVING" in probe.stdout and "NOT" not in probe.stdout:
            print(f"health: SERVING on 127.0.0.1:{port}")
            return server
        time.sleep(1)
    server.kill()
    raise SystemExit("server did not become healthy within 180 s")


def chat(target: str) -> None:
    step("5. chat with each adapter and with the bare base")
    run(BIN / "switchboard", "adapters", "list", "--target", target)
    question = "Hi, I'd like to order two large pizzas for delivery please."
    for adapter in [*DOMAINS, ""]:
        print(f"--- {adapter or '(bare base)'}")
        run(BIN / "switchboard", "chat", "--target", target, "--adapter", adapter,
            "--max-new-tokens", "64", question)


def evaluate(target: str, data: Path, work: Path, limit: int) -> None:
    """Food adapter vs the bare base (gate passes), then the wrong-domain adapter (gate fails)."""
    testset = data / DOMAINS["food"] / "test.jsonl"
    runs = [
        ("6. evaluate on the food test set: food adapter vs the bare base", "food,__base__",
         "__base__", 0),
        ("7. the wrong-domain candidate (helpdesk) against the food adapter: the gate must fail",
         "helpdesk,food", "food", 1),
    ]
    for title, adapters, baseline, expected in runs:
        step(title)
        out = work / f"eval-{baseline.strip('_')}"
        proc = subprocess.run([
            str(BIN / "evalsuite"), "run", "--target", target, "--testset", str(testset),
            "--adapters", adapters, "--baseline", baseline, "--gate", str(GATE),
            "--limit", str(limit), "--no-progress", "--out", str(out),
        ], text=True)
        verdict = "as expected" if proc.returncode == expected else "UNEXPECTED"
        print(f"evalsuite exit code {proc.returncode} ({verdict}; 0 = gate passes, 1 = regression)")
        print(f"reports: {out / 'report.md'}  {out / 'report.html'}  {out / 'report.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("build"))
    parser.add_argument("--max-steps", type=int, default=None,
                        help="override demo_fit.yaml's training steps")
    parser.add_argument("--eval-limit", type=int, default=40, help="test conversations to replay")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    base, data = build_inputs(work)
    root = work / "adapters"
    train_adapters(base, data, root, args.max_steps)
    port, metrics_port = free_port(), free_port()
    server = start_server(base, root, port, metrics_port, work)
    try:
        print(f"Prometheus metrics: http://127.0.0.1:{metrics_port}/metrics")
        chat(f"127.0.0.1:{port}")
        evaluate(f"127.0.0.1:{port}", data, work, args.eval_limit)
    finally:
        server.terminate()
        server.wait(timeout=30)
    step(f"done in {time.monotonic() - started:.0f} s")
    print(f"base: {base}\nadapters: {root}\nserver log: {work / 'server.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
