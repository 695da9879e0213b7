"""Benchmark the engine against what a user writes with PEFT, on the tiny 4-bit base.

In one run, on the same prompts, model and token counts (answers of 16..128 new tokens, fixed by
min/max tokens for PEFT and `ignore_eos` for the engine):
  (1) the naive PEFT loop: one request at a time, `set_adapter` then `generate`;
  (2) PEFT's static mixed-adapter batch: one `generate(adapter_names=...)` for all 16;
  (3) the engine fed the same 16 requests at once (continuous batching, stacked LoRA);
  (4) 16 requests over 16 distinct adapters vs 16 over one adapter, engine and PEFT batch;
  (5) 16 and 64 streams over 16 adapters and over 1: tok/s, the engine's own time per step
      (everything but the model forward, timed apart by the engine) and, on CUDA, the bare
      base's captured decode step at that batch (the graph floor) with the ratio to it; then
      over 16 adapters again with decoding ahead switched the other way (on by default on
      CUDA only), as that setting's baseline. Each row runs --stream-rounds times, the rows
      taking turns, and shows its median round. `--streams-only` measures (5) alone.
Runs on the machine's device (--device auto). On the CPU the engine times its own intra-op
threads per forward size at start (`server.engine.cpu_threads`, at most --threads), while PEFT
runs with --threads, as a script that sets them would; `--threads 1` gives both one thread.
Prints tables and writes JSON with --out.

    .venv/bin/python bench/bench_engine.py --base build/tiny-base --out bench_engine.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

PROMPTS = [
    "Hello there", "What is the capital of France?", "Tell me a story about a dog",
    "hi", "Can you help me plan a trip to the mountains next week?", "Why is the sky blue",
    "ok", "Write a short poem about the sea", "What should I cook tonight?",
    "Explain how rain forms", "Give me three tips for sleeping better", "Who are you?",
    "Summarize the plot of a mystery novel", "How do I fix a flat tyre?", "Thanks!",
    "What is a good name for a cat?",
]


@dataclass(frozen=True)
class Measurement:
    name: str
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def answer_lengths(count: int, shortest: int, longest: int) -> list[int]:
    """Evenly spread answer lengths from `shortest` to `longest`."""
    step = (longest - shortest) / max(1, count - 1)
    return [round(shortest + i * step) for i in range(count)]


def write_adapters(base: Path, root: Path, count: int, rank: int) -> list[Path]:
    """`count` random (non-zero) PEFT LoRA adapters on every linear layer of the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    paths = []
    for index in range(count):
        torch.manual_seed(1000 + index)
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.data.normal_(0.0, 0.05)
        paths.append(root / f"bench{index}" / "1")
        peft_model.save_pretrained(paths[-1])
    return paths


def chat_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    out = []
    for index in range(count):
        messages = [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True)
        out.append(list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded))
    return out


# -- PEFT -------------------------------------------------------------------------------------


def peft_model_with(base: Path, adapters: list[Path], options: Any) -> Any:
    from peft import PeftModel

    from common.modeling import load_base

    model, _ = load_base(str(base), options)
    peft = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for index, path in enumerate(adapters[1:], start=1):
        peft.load_adapter(str(path), adapter_name=f"a{index}")
    return peft.eval()


@torch.inference_mode()
def naive_loop(peft: Any, prompts: list[list[int]], names: list[str], lengths: list[int],
               ) -> Measurement:
    started = time.perf_counter()
    for prompt, name, length in zip(prompts, names, lengths, strict=True):
        peft.set_adapter(name)
        peft.generate(torch.tensor([prompt]), max_new_tokens=length, min_new_tokens=length,
                      do_sample=False)
    return Measurement("peft naive loop (set_adapter + generate)", sum(lengths),
                       time.perf_counter() - started)


@torch.inference_mode()
def peft_mixed_batch(peft: Any, prompts: list[list[int]], names: list[str], lengths: list[int],
                     pad_id: int, label: str) -> Measurement:
    """One static batch: every row runs to the longest answer; only asked tokens count."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    started = time.perf_counter()
    peft.generate(input_ids=ids, attention_mask=mask, adapter_names=names,
                  max_new_tokens=max(lengths), min_new_tokens=max(lengths), do_sample=False,
                  pad_token_id=pad_id)
    return Measurement(label, sum(lengths), time.perf_counter() - started)


# -- engine -----------------------------------------------------------------------------------


def make_engine(base: Path, adapters: list[Path], max_batch: int, options: Any) -> Any:
    from common.modeling import load_base
    from server.engine import Engine, EngineConfig

    model, tokenizer = load_base(str(base), options)
    engine = Engine(model, tokenizer, EngineConfig.build(
        max_batch=max_batch, max_loaded_adapters=max(len(adapters), 1), max_lora_rank=64,
        context_length=1024))
    for index, path in enumerate(adapters):
        engine.load_adapter(f"bench{index}@1", path)
    engine.start()
    return engine


def engine_run(engine: Any, prompts: list[list[int]], keys: list[str | None],
               lengths: list[int], label: str) -> Measurement:
    from server.engine import GenerationRequest
    from server.sampling import SamplingParams

    requests = [
        GenerationRequest(f"b{i}", prompt, key, SamplingParams(max_new_tokens=length,
                                                               ignore_eos=True))
        for i, (prompt, key, length) in enumerate(zip(prompts, keys, lengths, strict=True))
    ]
    started = time.perf_counter()
    handles = [engine.submit(r) for r in requests]
    tokens = sum(h.result().completion_tokens for h in handles)
    return Measurement(label, tokens, time.perf_counter() - started)


@dataclass(frozen=True)
class StreamRun:
    """`streams` concurrent answers of equal length over `adapters` adapters."""

    streams: int
    adapters: int
    decode_ahead: bool
    tokens_per_s: float
    engine_ms_per_step: float  # step time minus model forward time, per step
    forward_ms_per_step: float
    floor_ms: float | None  # the bare base's captured decode step at this batch (CUDA)
    prefills: int  # steps that prefilled: 1 when the burst was prefilled in one forward
    rounds_tokens_per_s: tuple[float, ...] = ()  # every round of this row; it shows the median

    @property
    def vs_floor(self) -> float | None:
        if self.floor_ms is None:
            return None
        return self.tokens_per_s / (self.streams / (self.floor_ms / 1e3))


def stream_run(engine: Any, prompts: list[list[int]], streams: int, adapters: int,
               tokens: int, floor_ms: float | None) -> StreamRun:
    keys = [f"bench{i % adapters}@1" for i in range(streams)]
    cycled = [prompts[i % len(prompts)] for i in range(streams)]
    before = engine.stats()
    measured = engine_run(engine, cycled, keys, [tokens] * streams, "streams")
    after = engine.stats()
    steps = after.steps - before.steps
    forward = after.forward_seconds - before.forward_seconds
    own = (after.step_seconds - before.step_seconds) - forward
    return StreamRun(streams, adapters, engine.decodes_ahead, measured.tokens_per_s,
                     own / steps * 1e3, forward / steps * 1e3, floor_ms,
                     after.prefills - before.prefills)


def median_round(rounds: list[StreamRun]) -> StreamRun:
    """The round with the median tok/s (the lower of two middles), with every round's tok/s."""
    every = tuple(r.tokens_per_s for r in rounds)
    middle = next(r for r in rounds if r.tokens_per_s == statistics.median_low(every))
    return replace(middle, rounds_tokens_per_s=every)


def stream_table(engine: Any, prompts: list[list[int]], args: argparse.Namespace,
                 floors: dict[int, float]) -> list[StreamRun]:
    runs = []
    default = engine.decodes_ahead
    for streams in args.streams:
        # Unmeasured: the first prefill of a new batch shape grows the device's memory pool
        # (and on the CPU the allocator's), a one-time cost that is not the steady state.
        stream_run(engine, prompts, streams, args.stream_adapters, 2, None)
        settings = ((args.stream_adapters, default), (1, default),
                    (args.stream_adapters, not default))
        # The settings take turns, so that a slow spell of the machine hits them alike.
        rounds: list[list[StreamRun]] = [[] for _ in settings]
        for _ in range(args.stream_rounds):
            for done, (adapters, ahead) in zip(rounds, settings, strict=True):
                engine.decodes_ahead = ahead  # the engine is idle between runs; read each step
                done.append(stream_run(engine, prompts, streams, adapters, args.mix_tokens,
                                       floors.get(streams)))
        runs.extend(median_round(done) for done in rounds)
        engine.decodes_ahead = default
    print(f"\n{'streams':>7} {'adapters':>8} {'ahead':>5} {'tok/s':>9} {'engine ms/step':>15} "
          f"{'forward ms/step':>16} {'floor ms':>9} {'vs floor':>9} {'prefills':>8}  "
          "rounds' tok/s")
    for run in runs:
        floor = "-" if run.floor_ms is None else f"{run.floor_ms:.2f}"
        ratio = "-" if run.vs_floor is None else f"{run.vs_floor:.2f}"
        ahead = "on" if run.decode_ahead else "off"
        every = ", ".join(f"{t:.0f}" for t in run.rounds_tokens_per_s)
        print(f"{run.streams:7d} {run.adapters:8d} {ahead:>5} {run.tokens_per_s:9.1f} "
              f"{run.engine_ms_per_step:15.3f} {run.forward_ms_per_step:16.3f} {floor:>9} "
              f"{ratio:>9} {run.prefills:8d}  {every}")
    return runs


# -- report -----------------------------------------------------------------------------------


def print_table(rows: list[Measurement], reference: Measurement) -> None:
    print(f"{'run':58} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'vs naive':>9}")
    for row in rows:
        speedup = row.tokens_per_s / reference.tokens_per_s
        print(f"{row.name:58} {row.tokens:7d} {row.seconds:8.2f} {row.tokens_per_s:8.1f} "
              f"{speedup:8.2f}x")


def ensure_base(base: Path | None, work: Path) -> Path:
    if base is not None:
        return base
    from trainer.base import build_base

    target = work / "tiny-base"
    return target if (target / "config.json").exists() else build_base(target, seed=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    base = ensure_base(args.base, args.work)
    from common.modeling import LoadOptions, load_tokenizer, resolve_device

    device = resolve_device(args.device)
    tokenizer = load_tokenizer(str(base))
    count = args.requests
    prompts = chat_prompts(tokenizer, count)
    lengths = answer_lengths(count, args.min_tokens, args.max_tokens)
    floors = {}
    if device == "cuda":
        from graph_floor import decode_floor_ms

        floors = decode_floor_ms(base, list(args.streams))
    with tempfile.TemporaryDirectory() as tmp:
        adapters = write_adapters(base, Path(tmp), max(count, args.stream_adapters), args.rank)
        four = [i % args.adapters for i in range(count)]
        options = LoadOptions(device, args.quantize)
        peft = None if args.streams_only else peft_model_with(base, adapters[:count], options)
        engine = make_engine(base, adapters, max(args.max_batch, *args.streams), options)
        try:
            engine_run(engine, prompts[:2], ["bench0@1", None], [4, 4], "warm-up")
            results: dict[str, Any] = {}
            if peft is not None:
                naive_loop(peft, prompts[:1], ["a0"], [4])
                results = measure(engine, peft, prompts, lengths, four, tokenizer.pad_token_id,
                                  args)
            streams = stream_table(engine, prompts, args, floors)
        finally:
            engine.shutdown()
    results["device"] = device
    results["quantize"] = args.quantize
    results["graph_capture_s"] = engine.graph_capture_seconds
    plan = engine.thread_plan
    results["thread_plan"] = None if plan is None else asdict(plan)
    if plan is not None:
        print(f"\nengine: {plan.describe()} (timed in {plan.seconds:.1f}s); PEFT ran with "
              f"--threads {args.threads}")
    results["streams"] = [{**asdict(r), "vs_floor": r.vs_floor} for r in streams]
    return results


def one_round(engine: Any, peft: Any, prompts: list[list[int]], lengths: list[int],
              four: list[int], pad_id: int, args: argparse.Namespace) -> list[Measurement]:
    """Every measurement once, in a fixed order."""
    count = len(prompts)
    naive = naive_loop(peft, prompts, [f"a{i}" for i in four], lengths)
    mixed = peft_mixed_batch(peft, prompts, [f"a{i}" for i in four], lengths, pad_id,
                             f"peft mixed batch, {args.adapters} adapters (static)")
    ours = engine_run(engine, prompts, [f"bench{i}@1" for i in four], lengths,
                      f"engine, {count} requests over {args.adapters} adapters")
    same = [args.mix_tokens] * count
    one = engine_run(engine, prompts, ["bench0@1"] * count, same,
                     f"engine, {count} x {args.mix_tokens} tokens, 1 adapter")
    distinct = engine_run(engine, prompts, [f"bench{i}@1" for i in range(count)], same,
                          f"engine, {count} x {args.mix_tokens} tokens, {count} adapters")
    peft_one = peft_mixed_batch(peft, prompts, ["a0"] * count, same, pad_id,
                                f"peft batch, {count} x {args.mix_tokens} tokens, 1 adapter")
    peft_distinct = peft_mixed_batch(
        peft, prompts, [f"a{i}" for i in range(count)], same, pad_id,
        f"peft batch, {count} x {args.mix_tokens} tokens, {count} adapters")
    return [naive, mixed, ours, one, distinct, peft_one, peft_distinct]


def measure(engine: Any, peft: Any, prompts: list[list[int]], lengths: list[int],
            four: list[int], pad_id: int, args: argparse.Namespace) -> dict[str, Any]:
    # Rounds interleave all measurements and each keeps its fastest round: on a shared
    # machine a burst of load from elsewhere otherwise decides the ratios.
    rounds = [one_round(engine, peft, prompts, lengths, four, pad_id, args)
              for _ in range(args.rounds)]
    rows = [min(column, key=lambda m: m.seconds) for column in zip(*rounds, strict=True)]
    naive, mixed, ours, one, distinct, peft_one, peft_distinct = rows
    print_table(rows, naive)
    summary = {
        "engine_vs_naive": ours.tokens_per_s / naive.tokens_per_s,
        "engine_vs_peft_mixed_batch": ours.tokens_per_s / mixed.tokens_per_s,
        "engine_16_adapters_vs_1": distinct.tokens_per_s / one.tokens_per_s,
        "peft_16_adapters_vs_1": peft_distinct.tokens_per_s / peft_one.tokens_per_s,
    }
    print(f"engine / naive loop: {summary['engine_vs_naive']:.2f}x (target >= 8); "
          f"engine / PEFT static batch: {summary['engine_vs_peft_mixed_batch']:.2f}x "
          "(target >= 3)")
    print(f"engine 16 adapters / 1 adapter: {summary['engine_16_adapters_vs_1']:.2f} "
          f"(target >= 0.7); PEFT batch: {summary['peft_16_adapters_vs_1']:.2f}")
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads, "load_average": os.getloadavg()},
        "answer_lengths": lengths,
        "rounds": args.rounds,
        "runs": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in rows],
        "all_rounds": [[asdict(r) for r in one] for one in rounds],
        "summary": summary,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=None,
                        help="tiny base directory (built under --work when omitted)")
    parser.add_argument("--work", type=Path, default=Path("build/bench"))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16,
                        help="LoRA rank of the benchmark adapters (the issue-13 targets: 16)")
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--mix-tokens", type=int, default=64,
                        help="answer length in the 16-adapters vs 1-adapter comparison")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the base runs (auto: CUDA when there is one)")
    parser.add_argument("--quantize", choices=("nf4", "none"), default="nf4",
                        help="the base's weights, for the engine and PEFT alike: nf4 (the "
                             "server's default) or none (float32, as `make demo` serves on a CPU)")
    parser.add_argument("--streams", type=lambda v: [int(x) for x in v.split(",")],
                        default=[16, 64], help="concurrent streams to measure, e.g. 16,64")
    parser.add_argument("--stream-adapters", type=int, default=16,
                        help="adapters the streams are spread over (and 1, for the ratio)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="repeat every measurement but the streams; each reports its "
                             "fastest round")
    parser.add_argument("--stream-rounds", type=int, default=3,
                        help="repeat each stream row; it reports its median round")
    parser.add_argument("--streams-only", action="store_true",
                        help="measure (5) alone, without PEFT: on a GPU (1)-(4) take minutes")
    args = parser.parse_args(argv)
    if args.stream_rounds < 1:
        parser.error(f"--stream-rounds must be >= 1, got {args.stream_rounds}")
    results = run(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
