"""Training throughput: `trainer fit` against a plain SFTTrainer script, same model and data.

Each variant runs in its own child process so that its peak memory is its own (peak RSS on the
CPU, peak allocated CUDA memory on a GPU). Tokens/s counts real (non-padding) tokens, as TRL's
`num_tokens`, over the training loop's runtime (model loading and data preparation excluded).

    python bench/train_throughput.py --base BASE_DIR --data TRAIN.jsonl [--steps 20] [--json OUT]

Variants: the plain script (padded batches, what most SFTTrainer scripts do), `trainer fit` with
the same padded batches (overhead check, target ratio >= 1.0) and `trainer fit --padding-free`
(target ratio >= 1.3).
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
VARIANTS = ("plain_sft", *FIT_VARIANTS)


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


def run_plain(args: argparse.Namespace, work: Path) -> dict[str, Any]:
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
                       per_device_train_batch_size=hp["batch_size"], max_length=hp["max_length"],
                       learning_rate=hp["learning_rate"], lr_scheduler_type="linear", seed=0,
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
        if args.child == "plain_sft":
            result = run_plain(args, Path(tmp))
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
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    results = {variant: run_variant(args, variant) for variant in VARIANTS}
    print_table(results)
    plain = results["plain_sft"]["tokens_per_s"]
    report = {"settings": {k: v for k, v in vars(args).items() if k != "child"},
              "results": results,
              "ratios": {k: r["tokens_per_s"] / plain for k, r in results.items()}}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
