"""Training throughput: `trainer fit` against a plain SFTTrainer script, same model and data.

Each variant runs in its own child process so that its peak memory is its own (peak RSS on the
CPU, peak allocated CUDA memory on a GPU). Tokens/s counts real (non-padding) tokens, as TRL's
`num_tokens`, over the training loop's runtime (model loading and data preparation excluded).

    python bench/train_throughput.py --base BASE_DIR --data TRAIN.jsonl [--steps 20] [--json OUT]

Variants: the plain script (padded batches, what most SFTTrainer scripts do), the same script with
TRL's `padding_free=True` (on SDPA: one block-diagonal mask over the whole row), `trainer fit`
with the same padded batches (overhead check, target ratio >= 1.0), `trainer fit --padding-free`
and `--packing` (one SDPA call per conversation, trainer/attention.py; target ratio >= 1.3).

`--vary-turns` keeps a seeded random prefix (1..all assistant turns) of every conversation, so
lengths spread as in public chat sets instead of the bundled sets' narrow 2-6 turns; the table
says how much of a padded batch is padding either way.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# `trainer fit` variants -> the batching flags they set; plain_sft is the hand-written baseline.
FIT_VARIANTS = {
    "fit_padded": {},
    "fit_padding_free": {"padding_free": True},
    "fit_packing": {"packing": True},
}
VARIANTS = ("plain_sft", "plain_padding_free", *FIT_VARIANTS)


def peak_memory_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                learning_rate=2e-4, rank=16, alpha=32.0, dropout=0.05, seed=0, warmup=0.0,
                scheduler="linear", logging_steps=args.steps)


def run_fit(args: argparse.Namespace, batching: dict[str, bool], work: Path) -> dict[str, Any]:
    from trainer.config import build_config
    from trainer.fit import fit

    config = build_config(hyperparameters(args), dict(
        base=args.base, data=args.data, name="bench", adapters_root=str(work), val_split=0,
        device=args.device, save_steps=10**6, **batching))
    version_dir = fit(config)
    manifest = json.loads((version_dir / "manifest.json").read_text())
    tokens = manifest["curves"]["train"][-1]["num_tokens"]
    return {"tokens": tokens, "train_seconds": manifest["metrics"]["train_runtime_s"]}


def run_plain(args: argparse.Namespace, work: Path, padding_free: bool) -> dict[str, Any]:
    """What a user would write by hand with TRL, PEFT and bitsandbytes."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    from common.modeling import LoadOptions, disable_cpu_repacking, load_base

    hp = hyperparameters(args)
    model, tokenizer = load_base(args.base, LoadOptions(args.device, "nf4"))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    dataset = load_dataset("json", data_files=args.data, split="train").select_columns(["messages"])
    on_gpu = next(model.parameters()).device.type == "cuda"
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset,
        peft_config=LoraConfig(r=hp["rank"], lora_alpha=hp["alpha"], lora_dropout=hp["dropout"],
                               target_modules="all-linear", task_type="CAUSAL_LM"),
        args=SFTConfig(output_dir=str(work), max_steps=hp["max_steps"],
                       per_device_train_batch_size=hp["batch_size"],
                       # TRL cannot cut rows when padding-free without packing.
                       max_length=None if padding_free else hp["max_length"],
                       padding_free=padding_free,
                       learning_rate=hp["learning_rate"], lr_scheduler_type="linear", seed=0,
                       data_seed=0,  # as `trainer fit`: the same batches, so the same padding
                       assistant_only_loss=True, gradient_checkpointing=False, bf16=on_gpu,
                       use_cpu=not on_gpu, report_to="none", save_strategy="no",
                       logging_steps=hp["max_steps"], disable_tqdm=True),
    )
    disable_cpu_repacking(trainer.model)
    if not on_gpu:  # the same float32 adapter weights `trainer fit` trains on the CPU
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.float32)
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    tokens = max(e.get("num_tokens", 0) for e in trainer.state.log_history)
    return {"tokens": tokens, "train_seconds": seconds}


def child(args: argparse.Namespace) -> None:
    from common.modeling import resolve_device

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.child.startswith("plain"):
            result = run_plain(args, Path(tmp), padding_free=args.child == "plain_padding_free")
        else:
            result = run_fit(args, FIT_VARIANTS[args.child], Path(tmp))
    result["tokens_per_s"] = result["tokens"] / max(result["train_seconds"], 1e-9)
    result["peak_memory_bytes"] = peak_memory_bytes(device)
    result["device"] = device
    print("RESULT " + json.dumps(result), flush=True)


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", variant, "--base", args.base, "--data",
               args.data, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--device", args.device]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def vary_turns(source: str, out: Path, seed: int = 0) -> Path:
    """Each conversation cut after a seeded random number (1..all) of its assistant turns."""
    import random

    rng = random.Random(seed)
    with open(source) as f, out.open("w") as w:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            messages = record["messages"]
            ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
            record["messages"] = messages[:rng.choice(ends)]
            w.write(json.dumps(record) + "\n")
    return out


def padding_share(base: str, data: str, batch_size: int, max_length: int) -> dict[str, float]:
    """Token lengths of the data and the share of padding in padded batches (file order)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    lengths = []
    with open(data) as f:
        for line in f:
            if line.strip():
                ids = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True)
                ids = ids["input_ids"] if hasattr(ids, "keys") else ids
                lengths.append(min(len(ids), max_length))
    batches = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    padded = sum(max(b) * len(b) for b in batches)
    return {"conversations": len(lengths), "min_tokens": min(lengths),
            "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths),
            "padding_share": 1 - sum(lengths) / padded}


def print_table(results: dict[str, dict[str, Any]]) -> None:
    base = results["plain_sft"]["tokens_per_s"]
    print(f"{'variant':<18}{'tokens':>9}{'train s':>9}{'tokens/s':>10}{'peak MiB':>10}{'ratio':>7}")
    for name, r in results.items():
        print(f"{name:<18}{r['tokens']:>9}{r['train_seconds']:>9.1f}{r['tokens_per_s']:>10.0f}"
              f"{r['peak_memory_bytes'] / 2**20:>10.0f}{r['tokens_per_s'] / base:>7.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--data", required=True, help="training .jsonl (OpenAI messages)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", default="train_throughput.json", help="where to write results")
    parser.add_argument("--vary-turns", action="store_true",
                        help="cut each conversation after a random number of turns (seed 0)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every variant this many times, interleaved; keep the fastest")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which to run (plain_sft, the baseline, always runs)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if args.vary_turns:
            args.data = str(vary_turns(args.data, Path(tmp) / "varied.jsonl"))
        data = padding_share(args.base, args.data, args.batch_size, args.max_length)
        print(f"data: {data['conversations']} conversations, {data['min_tokens']}-"
              f"{data['max_tokens']} tokens (mean {data['mean_tokens']:.0f}); padded batches of "
              f"{args.batch_size} are {data['padding_share']:.0%} padding", flush=True)
        results: dict[str, dict[str, Any]] = {}
        for _ in range(args.rounds):
            for variant in dict.fromkeys(["plain_sft", *args.variants]):
                run = run_variant(args, variant)
                if variant not in results or run["tokens_per_s"] > results[variant]["tokens_per_s"]:
                    results[variant] = run
    print_table(results)
    plain = results["plain_sft"]["tokens_per_s"]
    report = {"settings": {k: v for k, v in vars(args).items() if k != "child"},
              "data": data, "results": results,
              "ratios": {k: r["tokens_per_s"] / plain for k, r in results.items()}}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
