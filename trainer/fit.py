"""`trainer fit`: train a QLoRA adapter with TRL's SFTTrainer and publish it as a new version.

Flow: settings (defaults < resumed run < YAML < flags) -> data checked and summarised with the
tokenizer only (fails fast, before any model loads) -> 4-bit NF4 base prepared for k-bit
training -> SFTTrainer with a LoRA config and loss on assistant tokens only -> final evaluation
-> adapter and manifest.json staged, then published as <root>/<name>/<N>/. The run folder
<root>/<name>/.runs/<run-id>/ keeps checkpoints (for `--resume`) and TensorBoard logs.
The version directory is the last line printed on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import manifest as mf
from trainer.config import FIELD_NAMES, FitConfig, build_config, read_yaml

# ---------------------------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags default to None so that only the ones given override the YAML config."""
    add = parser.add_argument
    flag = argparse.BooleanOptionalAction
    add("--base", help="base model directory or hub id")
    add("--data", help="training conversations (.jsonl: OpenAI, ShareGPT, Alpaca)")
    add("--validation", help="validation conversations; default: split off --val-split of --data")
    add("--name", help="adapter name")
    add("--adapters-root", help="directory holding <name>/<version>/ adapters")
    add("--config", help="YAML file with any of these settings (flags override it)")
    add("--from", dest="parent", metavar="NAME@VERSION", help="continue training this adapter")
    add("--rank", type=int, help="LoRA rank (16)")
    add("--alpha", type=float, help="LoRA alpha (32)")
    add("--dropout", type=float, help="LoRA dropout (0.05)")
    add("--target-modules", type=_modules, help="comma-separated module names or all-linear")
    add("--learning-rate", "--lr", dest="learning_rate", type=float,
        help="peak learning rate (2e-4)")
    add("--scheduler", help="learning-rate schedule (cosine)")
    add("--warmup", type=float, help="warmup: fraction of steps if < 1, else steps (0.03)")
    add("--epochs", type=float, help="epochs (1), ignored when --max-steps is given")
    add("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    add("--batch-size", type=int, help="sequences per device per step (8)")
    add("--grad-accum", type=int, help="gradient accumulation steps (1)")
    add("--max-grad-norm", type=float, help="gradient clipping norm, 0 = off (1.0)")
    add("--weight-decay", type=float, help="AdamW weight decay (0)")
    add("--seed", type=int, help="seed for LoRA init, data order, split and dropout (0)")
    add("--max-length", type=int, help="tokens per conversation; longer ones are cut (1024)")
    add("--packing", action=flag, help="pack conversations into max-length rows (BFD)")
    add("--padding-free", action=flag, help="concatenate each batch without padding")
    add("--gradient-checkpointing", action=flag, help="recompute activations to save memory")
    add("--val-split", type=float, help="fraction of --data held out without --validation (0.1)")
    add("--eval-steps", type=int, help="evaluate every N optimizer steps (50)")
    add("--eval-on-start", action=flag, help="evaluate once before training (on)")
    add("--early-stopping-patience", type=int, help="stop after N evals without gain; 0 = off")
    add("--early-stopping-threshold", type=float, help="minimum validation-loss gain (0)")
    add("--save-steps", type=int, help="checkpoint every N steps, for --resume (50)")
    add("--save-total-limit", type=int, help="checkpoints kept in the run folder (2)")
    add("--logging-steps", type=int, help="log loss and tokens/s every N steps (5)")
    add("--spike-factor", type=float,
        help="a loss above this x its recent median is a spike; 0: non-finite losses only (3)")
    add("--spike-steps", type=int, help="steps in a row above it that stop the run (3)")
    add("--spike-lr-factor", type=float, help="learning rate scale after a rollback (0.5)")
    add("--spike-max-rollbacks", type=int, help="rollbacks before the run fails (2)")
    add("--auto-batch", action=flag,
        help="on out-of-memory halve the batch and double accumulation, then checkpoint")
    add("--recommended", action=flag,
        help="use the base's recommended settings under --config and flags (on)")
    add("--device", choices=("auto", "cpu", "cuda"), help="where to train (auto)")
    add("--quantize", choices=("nf4", "none"), help="base weights: 4-bit NF4 (QLoRA) or full")
    add("--run-id", help="name of the run folder (default: UTC time + random suffix)")
    add("--resume", nargs="?", const="latest", metavar="RUN",
        help="continue an interrupted run: the newest unfinished one of --name, or RUN (id/path)")


def _settings_line(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(settings.items())) or "(all overridden)"


def _modules(text: str) -> str | list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    return names[0] if names == ["all-linear"] else names


def resolve_config(args: argparse.Namespace) -> tuple[FitConfig, Path | None]:
    """Merge the layers (defaults < the base's recommended settings < YAML < flags); on
    --resume the interrupted run's saved config replaces the first two."""
    from trainer.recommended import read_recommended

    flags = {k: v for k, v in vars(args).items() if k in FIELD_NAMES and v is not None}
    from_yaml = read_yaml(flags["config"]) if flags.get("config") else {}
    layered = {**from_yaml, **flags}
    resume = layered.get("resume")
    if not resume:
        base = layered.get("base")
        use = layered.get("recommended", True) and base
        recommended = read_recommended(base) if use else {}
        if recommended:
            chosen = {k: v for k, v in recommended.items() if k not in layered}
            print(f"recommended settings of the base: {_settings_line(chosen)}", flush=True)
        return build_config(recommended, layered), None
    root, name = layered.get("adapters_root"), layered.get("name")
    if not root or not name:
        raise ValueError("--resume needs --adapters-root and --name")
    run_dir = mf.find_resumable_run(Path(root), name, resume)
    saved = json.loads((run_dir / "config.json").read_text())
    return build_config(saved, layered), run_dir


# --------------------------------------------------------------------------------------- data


@dataclass
class DataSplit:
    """Conversations (as TRL `messages` records, or once tokenized a datasets.Dataset of them)
    with where they came from."""

    train: list[dict[str, Any]] | Any
    validation: list[dict[str, Any]] | Any
    files: dict[str, dict[str, Any]]


def load_split(config: FitConfig) -> DataSplit:
    """Load and check the data files (raises common.data.DataError naming file:line)."""
    from common.data import load_conversations

    train = [{"messages": c.to_openai()} for c in load_conversations(config.data)]
    files = {"train": _file_record(config.data, len(train))}
    held_out = ""
    if config.validation:
        validation = [{"messages": c.to_openai()} for c in load_conversations(config.validation)]
        files["validation"] = _file_record(config.validation, len(validation))
        if not validation:
            # Training on silently without evaluation would also switch early stopping off.
            raise ValueError(f"{config.validation}: no validation conversations")
    elif config.val_split > 0:
        held_out = f" after holding out val_split {config.val_split} for validation"
        order = list(range(len(train)))
        random.Random(config.seed).shuffle(order)
        cut = max(1, round(len(train) * config.val_split))
        held = set(order[:cut])
        validation = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    else:
        validation = []
    if not train:
        raise ValueError(f"{config.data}: no training conversations left{held_out}")
    return DataSplit(train, validation, files)


def _file_record(path: str, count: int) -> dict[str, Any]:
    return {"path": str(path), "sha256": mf.file_sha256(Path(path)), "conversations": count}


SUMMARY_COLUMNS = ("tokens", "trained", "turns")


def _labels(ids: list[int], mask: list[int]) -> list[int]:
    """The ids with -100 outside the assistant spans, as SFTTrainer builds its labels."""
    return [t if m else -100 for t, m in zip(ids, mask, strict=True)]


def tokenize_batch(tokenizer: Any, conversations: list[list[dict[str, str]]],
                   max_length: int) -> dict[str, list]:
    """input_ids and labels of conversations through the base's chat template, in one call,
    with each one's counts for the data summary."""
    from trainer.check_data import assistant_masks

    columns: dict[str, list] = {name: [] for name in ("input_ids", "labels", *SUMMARY_COLUMNS)}
    masked = assistant_masks(tokenizer, conversations)
    for messages, (ids, mask) in zip(conversations, masked, strict=True):
        columns["input_ids"].append(ids)
        columns["labels"].append(_labels(ids, mask))
        columns["tokens"].append(len(ids))
        columns["trained"].append(sum(mask[:max_length]))
        columns["turns"].append(sum(1 for m in messages if m["role"] == "assistant"))
    return columns


def tokenized_dataset(tokenizer: Any, records: list[dict[str, Any]], max_length: int,
                      batch: int = 1024) -> Any:
    """The records as a datasets.Dataset with their tokens and summary counts, a batch of
    conversations per tokenizer call: one call each (SFTTrainer's way) spends most of its time
    in the calls, minutes for a hundred thousand. SFTTrainer takes these input_ids and labels
    as they are."""
    from datasets import Dataset

    return Dataset.from_list(records).map(
        lambda rows: tokenize_batch(tokenizer, rows["messages"], max_length), batched=True,
        batch_size=batch, desc="Tokenizing conversations")


def summarize_split(dataset: Any, max_length: int) -> dict:
    """Counts for the data summary: conversations, turns, tokens, trained tokens, truncated."""
    tokens = list(dataset["tokens"])
    return {"conversations": len(dataset), "assistant_turns": sum(dataset["turns"]),
            "tokens": sum(tokens), "trained_tokens": sum(dataset["trained"]),
            "truncated": sum(1 for n in tokens if n > max_length)}


def print_summary(stats: dict[str, dict[str, int]], max_length: int) -> None:
    for split, s in stats.items():
        print(f"data {split}: {s['conversations']} conversations, {s['assistant_turns']} "
              f"assistant turns, {s['tokens']} tokens ({s['trained_tokens']} trained), "
              f"{s['truncated']} cut at max_length {max_length}", flush=True)


# -------------------------------------------------------------------------------------- model


def load_model(config: FitConfig, root: Path) -> tuple[Any, Any, dict[str, Any] | None]:
    """The 4-bit base prepared for k-bit training, plus the parent PeftModel on --from."""
    from peft import PeftModel, prepare_model_for_kbit_training

    from common.modeling import LoadOptions, base_fingerprint, disable_cpu_repacking, load_base
    from trainer.attention import use_varlen_attention

    model, tokenizer = load_base(config.base, LoadOptions(config.device, config.quantize))
    if (config.padding_free or config.packing) and use_varlen_attention(model):
        print("attention: sdpa_varlen (one SDPA call per conversation of a padding-free row)",
              flush=True)
    if config.quantize == "nf4":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    parent = None
    if config.parent:
        parent_dir = mf.resolve_ref(root, config.parent)
        parent_manifest = mf.read_manifest(parent_dir)
        expected = parent_manifest.get("base", {}).get("fingerprint")
        if expected and expected != base_fingerprint(config.base):
            raise ValueError(f"--from {config.parent} was trained on another base ({expected})")
        model = PeftModel.from_pretrained(model, str(parent_dir), is_trainable=True)
        parent = {"ref": f"{parent_dir.parent.name}@{parent_dir.name}", "path": str(parent_dir),
                  "name": parent_dir.parent.name, "version": int(parent_dir.name)}
    disable_cpu_repacking(model)
    return model, tokenizer, parent


def lora_config(config: FitConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=config.target_modules, bias="none", task_type="CAUSAL_LM",
    )


def sft_config(config: FitConfig, run_dir: Path, on_gpu: bool, has_eval: bool) -> Any:
    from trl import SFTConfig

    # TRL cannot cut sequences in padding-free mode without packing; fit cuts them itself
    # after preparation (see cut_prepared), so TRL is given no limit there.
    trl_max_length = None if config.padding_free and not config.packing else config.max_length
    return SFTConfig(
        output_dir=str(run_dir), seed=config.seed, data_seed=config.seed,
        per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.learning_rate,
        lr_scheduler_type=config.scheduler, warmup_steps=config.warmup,
        num_train_epochs=config.epochs, max_steps=config.max_steps,
        max_grad_norm=config.max_grad_norm, weight_decay=config.weight_decay,
        max_length=trl_max_length, packing=config.packing, padding_free=config.padding_free,
        assistant_only_loss=True, gradient_checkpointing=config.gradient_checkpointing,
        eval_strategy="steps" if has_eval else "no", eval_steps=config.eval_steps,
        eval_on_start=has_eval and config.eval_on_start,
        save_strategy="steps", save_steps=config.save_steps,
        save_total_limit=config.save_total_limit, logging_steps=config.logging_steps,
        bf16=on_gpu, use_cpu=not on_gpu, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
        # A non-finite loss must reach the logs and the spike guard, not be averaged away.
        logging_nan_inf_filter=False,
    )


def cut_prepared(dataset: Any, max_length: int) -> Any:
    """Keep the first max_length tokens of each prepared example; drop ones left untrained."""
    dataset = dataset.map(
        lambda ex: {"input_ids": ex["input_ids"][:max_length], "labels": ex["labels"][:max_length]}
    )
    return dataset.filter(lambda ex: any(label != -100 for label in ex["labels"]))


def _as_dataset(rows: list[dict[str, Any]] | Any) -> Any:
    """A datasets.Dataset for SFTTrainer: records become one (it tokenizes them); a tokenized
    one loses its summary counts."""
    from datasets import Dataset

    if isinstance(rows, Dataset):
        return rows.remove_columns([c for c in SUMMARY_COLUMNS if c in rows.column_names])
    return Dataset.from_list(rows)


def build_trainer(config: FitConfig, model: Any, tokenizer: Any, split: DataSplit,
                  run_dir: Path, with_peft_config: bool,
                  callbacks: list[Any] | None = None, guard: Any = None) -> tuple[Any, Any]:
    """SFTTrainer with our callbacks; returns (trainer, early-stopping/best-weights callback).
    A recovery.SpikeGuard given as `guard` watches every step's loss."""
    import torch
    from torch.utils.tensorboard import SummaryWriter
    from transformers import PrinterCallback, ProgressCallback
    from transformers.integrations import TensorBoardCallback

    from trainer.callbacks import (
        BestAdapterEarlyStopping,
        CpuRepackingGuard,
        EvalSummary,
        ProgressBar,
    )
    from trainer.recovery import LossTapTrainer

    on_gpu = next(model.parameters()).device.type == "cuda"
    has_eval = bool(split.validation)
    best = BestAdapterEarlyStopping(config.early_stopping_patience, config.early_stopping_threshold)
    trainer = LossTapTrainer(
        model=model, args=sft_config(config, run_dir, on_gpu, has_eval),
        train_dataset=_as_dataset(split.train),
        eval_dataset=_as_dataset(split.validation) if has_eval else None,
        processing_class=tokenizer, peft_config=lora_config(config) if with_peft_config else None,
        callbacks=[ProgressBar(), EvalSummary(), best, CpuRepackingGuard(),
                   TensorBoardCallback(SummaryWriter(str(run_dir / "tensorboard"))),
                   *([guard] if guard is not None else []), *(callbacks or [])],
    )
    if guard is not None:
        trainer.loss_sink = guard.micro_losses
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    if config.padding_free and not config.packing:
        trainer.train_dataset = cut_prepared(trainer.train_dataset, config.max_length)
        if has_eval:
            trainer.eval_dataset = cut_prepared(trainer.eval_dataset, config.max_length)
    if not on_gpu:
        # TRL stores QLoRA adapter weights in bf16 (the paper's GPU recipe). On the CPU the
        # compute dtype is float32: bf16 weights would round away small updates and run slower.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.float32)
    return trainer, best


# ------------------------------------------------------------------------------------ results


def loss_curves(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    train = [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate"),
              "grad_norm": e.get("grad_norm"), "num_tokens": e.get("num_tokens")}
             for e in log_history if "loss" in e]
    evals = [{"step": e["step"], "loss": e["eval_loss"]} for e in log_history if "eval_loss" in e]
    return {"train": train, "validation": evals}


def final_metrics(trainer: Any, best: Any, curves: dict, train_seconds: float,
                  restored: bool) -> dict[str, Any]:
    """Validation loss/perplexity of the published weights (assistant tokens only)."""
    metrics: dict[str, Any] = {"global_step": trainer.state.global_step,
                               "stopped_early": best.stopped_early,
                               "train_runtime_s": round(train_seconds, 2)}
    if curves["train"]:
        metrics["final_train_loss"] = curves["train"][-1]["loss"]
        tokens = curves["train"][-1].get("num_tokens") or 0
        metrics["train_tokens_per_s"] = round(tokens / max(train_seconds, 1e-9), 1)
    if trainer.eval_dataset is not None:
        evals = curves["validation"]
        # The last periodic evaluation already measured these weights unless best ones came back.
        fresh = evals and evals[-1]["step"] == trainer.state.global_step and not restored
        loss = evals[-1]["loss"] if fresh else trainer.evaluate()["eval_loss"]
        metrics.update(final_val_loss=loss, final_val_perplexity=math.exp(min(loss, 50)),
                       first_val_loss=curves["validation"][0]["loss"] if curves["validation"]
                       else loss, best_val_step=best.best_step)
    return metrics


def lora_record(model: Any) -> dict[str, Any]:
    peft_config = model.peft_config["default"].to_dict()
    lora = {k: peft_config.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
    if isinstance(lora["target_modules"], set | list | tuple):
        lora["target_modules"] = sorted(lora["target_modules"])
    return lora


@dataclass
class TrainResult:
    """A finished training run, ready to publish (`trainer sweep` keeps one per trial)."""

    config: FitConfig  # as trained: --auto-batch and rollbacks may have changed it
    files: dict[str, dict[str, Any]]
    stats: dict[str, dict[str, int]]
    metrics: dict[str, Any]
    curves: dict[str, list[dict[str, Any]]]
    lora: dict[str, Any]
    parent: dict[str, Any] | None
    run_dir: Path
    events: list[dict[str, Any]]
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {**out, "config": self.config.to_dict(), "run_dir": str(self.run_dir)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainResult:
        return cls(**{**data, "config": build_config(data["config"]),
                      "run_dir": Path(data["run_dir"])})


def publish(result: TrainResult, save_adapter: Any, extra: dict[str, Any] | None = None) -> Path:
    """Stage the PEFT files (written by `save_adapter(folder)`), the manifest and the training
    report, then claim the next version number. `extra` adds manifest sections (the sweep)."""
    from common.modeling import base_fingerprint
    from trainer.report import REPORT_FILE, write_report

    config = result.config
    root = Path(config.adapters_root)
    staged = mf.staging_dir(root, config.name)
    try:
        save_adapter(staged)
        data = {"files": result.files, "train": result.stats["train"],
                "validation": result.stats.get("validation"),
                "validation_source": "file" if config.validation else f"split {config.val_split}"}
        if "ranks" in result.stats:
            data["ranks"] = result.stats["ranks"]
        manifest = mf.build_manifest(
            name=config.name, base=config.base, fingerprint=base_fingerprint(config.base),
            data=data, hyperparameters=config.hyperparameters(), lora=result.lora,
            metrics=result.metrics, curves=result.curves, parent=result.parent,
            wall_time_s=result.wall_time_s, run_dir=result.run_dir,
        )
        manifest.update(recovery=result.events, report=REPORT_FILE, **(extra or {}))
        write_report(staged, manifest)
        version_dir = mf.publish_version(staged, root, config.name, manifest)
    except BaseException:
        mf.discard(staged)
        raise
    mf.mark_run_finished(result.run_dir, version_dir)
    return version_dir


# --------------------------------------------------------------------------------- recovery


def check_data_files(config: FitConfig, tokenizer: Any) -> None:
    """`trainer check-data`'s check, before anything loads: errors refuse the data."""
    from collections import Counter

    from trainer.check_data import check_file, refuse_untrainable

    for path in filter(None, (config.data, config.validation)):
        check = check_file(Path(path), tokenizer, config.max_length)
        refuse_untrainable(check)
        if check.warnings:
            kinds = Counter(p.kind for p in check.warnings)
            listed = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items()))
            print(f"data check {path}: {len(check.warnings)} warnings ({listed}); see "
                  f"`trainer check-data {path} --base {config.base}`", flush=True)


def train_with_recovery(config: FitConfig, model: Any, tokenizer: Any, split: DataSplit,
                        run_dir: Path, with_peft: bool, callbacks: list[Any] | None,
                        checkpoint: Path | None) -> tuple[Any, Any, FitConfig, list[dict]]:
    """Train until done, retrying after out-of-memory errors (--auto-batch) and rolling back
    after instabilities; returns (trainer, best callback, config as trained, events)."""
    import torch

    from trainer.recovery import (
        SpikeGuard,
        after_instability,
        after_out_of_memory,
        describe_batch,
    )

    events: list[dict[str, Any]] = []
    guard = SpikeGuard(config.spike_factor, config.spike_steps)
    initial: dict[str, Any] = {}
    while True:
        trainer, best = build_trainer(config, model, tokenizer, split, run_dir, with_peft,
                                      callbacks, guard)
        model, with_peft = trainer.model, False
        initial = initial or {n: p.detach().clone() for n, p in model.named_parameters()
                              if p.requires_grad}
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except torch.OutOfMemoryError as exc:
            del trainer
            config = after_out_of_memory(config, guard, exc, events)
            if config.gradient_checkpointing:
                # Checkpointed blocks need an input that requires grad to backpropagate into
                # the adapters of a frozen base.
                model.enable_input_require_grads()
            mf.write_json_atomic(run_dir / "config.json", config.to_dict())
            continue
        if guard.tripped is None:
            break
        config, checkpoint = after_instability(config, guard, run_dir, model, initial, events)
        mf.write_json_atomic(run_dir / "config.json", config.to_dict())
    if any(e["kind"] == "out of memory" for e in events):
        print(f"auto-batch: chose {describe_batch(config)}", flush=True)
    return trainer, best, config, events


# ---------------------------------------------------------------------------------------- run


def shared_run_dir(config: FitConfig, root: Path, resume_dir: Path | None) -> tuple[Path, bool]:
    """The run folder, created by the main process and shared with the others under
    `accelerate launch` (every rank must write checkpoints to the same output_dir)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from common.modeling import resolve_device

    # The first PartialState fixes the process group for the run (the Trainer's Accelerator
    # reuses it): on the CPU it must be told, or launched ranks each train alone (no gloo group).
    state = PartialState(cpu=resolve_device(config.device) == "cpu")
    if resume_dir is not None:
        return resume_dir, state.is_main_process
    names = [mf.new_run_dir(root, config.name, config.run_id).name
             if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(names)
    return root / config.name / mf.RUNS_DIR / names[0], state.is_main_process


def rank_shards(trainer: Any) -> list[dict[str, int]] | None:
    """Under `accelerate launch`: the training rows in each rank's shard of an epoch, counted on
    each rank from its own data loader and gathered; None in a single process."""
    from accelerate.utils import gather_object

    accelerator = trainer.accelerator
    if accelerator.num_processes < 2:
        return None
    rows = sum(len(batch) for batch in trainer.get_train_dataloader().batch_sampler)
    return gather_object([{"rank": accelerator.process_index, "rows_per_epoch": rows}])


def train(config: FitConfig, resume_dir: Path | None = None,
          callbacks: list[Any] | None = None) -> tuple[TrainResult, Any, bool]:
    """Check the data, train with recovery, measure; returns (result, trainer, is main process).
    Raises DataError/ValueError on bad input, recovery.UnstableTraining past the rollbacks."""
    from common.modeling import load_tokenizer

    started = time.monotonic()
    tokenizer = load_tokenizer(config.base)
    check_data_files(config, tokenizer)
    split = load_split(config)
    tokenized = {name: tokenized_dataset(tokenizer, records, config.max_length)
                 for name, records in (("train", split.train), ("validation", split.validation))
                 if records}
    stats = {name: summarize_split(dataset, config.max_length)
             for name, dataset in tokenized.items()}
    print_summary(stats, config.max_length)
    split = dataclasses.replace(split, **tokenized)

    root = Path(config.adapters_root)
    run_dir, is_main = shared_run_dir(config, root, resume_dir)
    if is_main:
        mf.write_json_atomic(run_dir / "config.json", config.to_dict())
    model, tokenizer, parent = load_model(config, root)
    checkpoint = mf.last_checkpoint(run_dir) if resume_dir else None
    if checkpoint is not None:
        print(f"resuming from {checkpoint}", flush=True)
    train_started = time.monotonic()
    trainer, best, config, events = train_with_recovery(
        config, model, tokenizer, split, run_dir, parent is None, callbacks, checkpoint)
    train_seconds = time.monotonic() - train_started
    curves = loss_curves(trainer.state.log_history)
    restored = bool(config.early_stopping_patience) and best.restore_best(
        trainer.model, trainer.state.global_step)
    if restored:
        print(f"restored the best weights (step {best.best_step})", flush=True)
    metrics = final_metrics(trainer, best, curves, train_seconds, restored)
    shards = rank_shards(trainer)  # a collective: every rank takes part
    if shards is not None:
        stats["ranks"] = shards
    result = TrainResult(config, split.files, stats, metrics, curves, lora_record(trainer.model),
                         parent, run_dir, events, round(time.monotonic() - started, 2))
    return result, trainer, is_main


def fit(config: FitConfig, resume_dir: Path | None = None,
        callbacks: list[Any] | None = None) -> Path | None:
    """Train and publish; returns the new version directory. Raises DataError/ValueError.

    `callbacks` are extra transformers TrainerCallbacks (for embedding and tests). Under
    `accelerate launch` only the main process publishes; the others return None."""
    result, trainer, is_main = train(config, resume_dir, callbacks)
    if not is_main:
        return None
    version_dir = publish(result, lambda folder: trainer.model.save_pretrained(str(folder)))
    print(f"report: {version_dir / mf.read_manifest(version_dir)['report']}", flush=True)
    return version_dir


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 published, 2 bad settings or data, 3 training failed (out of memory,
    unstable), 130 interrupted."""
    import torch

    from common.data import DataError
    from trainer.recovery import UnstableTraining

    try:
        config, resume_dir = resolve_config(args)
        version_dir = fit(config, resume_dir)
    except (DataError, ValueError, OSError) as exc:
        print(f"trainer fit: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except UnstableTraining as exc:
        print(f"trainer fit: unstable training: {exc}", file=sys.stderr, flush=True)
        return 3
    except torch.OutOfMemoryError as exc:
        print(f"trainer fit: out of memory ({exc}); try --auto-batch, a smaller --batch-size "
              f"or --gradient-checkpointing", file=sys.stderr, flush=True)
        return 3
    except KeyboardInterrupt:
        print("trainer fit: interrupted; continue with --resume", file=sys.stderr, flush=True)
        return 130
    sys.stderr.flush()
    if version_dir is not None:
        print(version_dir, flush=True)
    return 0
