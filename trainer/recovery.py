"""What `trainer fit` does when a run goes wrong, without the user stepping in.

- Out of memory (`--auto-batch`): before the first optimizer step fits, halve the per-device
  batch and double gradient accumulation (the effective batch stays), then switch gradient
  checkpointing on; `smaller_batch` says what to try next.
- Instabilities: `SpikeGuard` watches every optimizer step's loss (the Trainer's own logs are
  averages over `logging_steps`, too coarse to see a spike) and stops the run on a non-finite
  loss or a spike; `rollback_checkpoint` finds the last checkpoint from before it.
- `LossTapTrainer` is SFTTrainer handing each micro-batch loss to the guard.
- `after_out_of_memory` / `after_instability` decide the next attempt of `trainer fit`'s
  training loop (fit.train_with_recovery) and record each event for the manifest and the log.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import sys
from collections import deque
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from trainer import manifest as mf
from trainer.config import FitConfig


class UnstableTraining(RuntimeError):
    """The loss kept spiking or turned non-finite after every allowed rollback."""


# Steps of loss history a spike is measured against; checking starts once half of it is there.
SPIKE_WINDOW = 16


def smaller_batch(config: FitConfig) -> FitConfig | None:
    """The next setting to try after an out-of-memory error, or None when none is left."""
    if config.batch_size > 1:
        batch = config.batch_size // 2
        effective = config.batch_size * config.grad_accum
        return dataclasses.replace(config, batch_size=batch, grad_accum=-(-effective // batch))
    if not config.gradient_checkpointing:
        return dataclasses.replace(config, gradient_checkpointing=True)
    return None


def describe_batch(config: FitConfig) -> str:
    checkpointing = ", gradient checkpointing" if config.gradient_checkpointing else ""
    return (f"batch_size {config.batch_size} x grad_accum {config.grad_accum} (effective "
            f"{config.batch_size * config.grad_accum}){checkpointing}")


def rollback_checkpoint(run_dir: Path, bad_step: int) -> Path | None:
    """The newest complete checkpoint from before `bad_step`; later ones hold the bad weights
    (or came after them) and are deleted so that `--resume` never picks them."""
    good = None
    for step, path in mf.checkpoints(run_dir):
        if step < bad_step:
            good = path
        else:
            mf.discard(path)
    return good


def match_learning_rate(target: float, optimizer: Any, lr_scheduler: Any) -> None:
    """Scale the optimizer's and scheduler's learning rates to `target`.

    A resumed checkpoint brings back the scheduler's base rates of the run it came from; after
    a rollback the run continues at a lowered rate, so the loaded state is rescaled."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    base_lrs = getattr(scheduler, "base_lrs", None)
    if optimizer is None or not base_lrs or base_lrs[0] <= 0:
        return
    ratio = target / base_lrs[0]
    if math.isclose(ratio, 1.0, rel_tol=1e-9):
        return
    scheduler.base_lrs = [lr * ratio for lr in base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio


class LossTapTrainer(SFTTrainer):
    """SFTTrainer whose micro-batch losses (detached tensors) are appended to `loss_sink`."""

    loss_sink: list[Any] | None = None

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        loss = super().training_step(*args, **kwargs)
        if self.loss_sink is not None:
            self.loss_sink.append(loss)
        return loss


class SpikeGuard(TrainerCallback):
    """Stops training on a non-finite step loss, or after `steps` steps in a row whose loss is
    above `factor` x the median of the last SPIKE_WINDOW good steps (factor 0: spikes ignored).

    `tripped` then describes the event; `steps_taken` counts optimizer steps of this attempt
    (an out-of-memory error before the first one is what --auto-batch may recover from)."""

    def __init__(self, factor: float, steps: int) -> None:
        self.factor = factor
        self.steps = steps
        self.micro_losses: list[Any] = []
        self.history: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.high: list[float] = []
        self.tripped: dict[str, Any] | None = None
        self.steps_taken = 0

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.micro_losses.clear()
        self.history.clear()
        self.high = []
        self.tripped = None
        self.steps_taken = 0
        match_learning_rate(args.learning_rate, optimizer, lr_scheduler)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_taken += 1
        loss = self._step_loss()
        if not math.isfinite(loss):
            self._trip(control, "non-finite loss", state.global_step, loss)
        elif self._is_high(loss):
            self.high.append(loss)
            if len(self.high) >= self.steps:
                self._trip(control, "loss spike", state.global_step - len(self.high) + 1, loss)
        else:
            self.high = []
            self.history.append(loss)
        if self.high:
            control.should_save = False  # never checkpoint weights that may be going bad

    def _step_loss(self) -> float:
        if not self.micro_losses:
            return 0.0
        total = torch.stack([loss.float().reshape(()) for loss in self.micro_losses]).sum()
        self.micro_losses.clear()
        return float(total.item())

    def _is_high(self, loss: float) -> bool:
        if not self.factor or len(self.history) < SPIKE_WINDOW // 2:
            return False
        return loss > self.factor * statistics.median(self.history)

    def _trip(self, control: Any, kind: str, bad_step: int, loss: float) -> None:
        median = statistics.median(self.history) if self.history else None
        self.tripped = {"kind": kind, "step": bad_step, "loss": loss, "recent_median": median}
        # Stop before this step's weights are checkpointed or evaluated.
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False


def _event(kind: str, step: int, **details: Any) -> dict[str, Any]:
    """A recovery event for the manifest, also written to the log (stderr)."""
    listed = ", ".join(f"{k}={v}" for k, v in details.items())
    print(f"recovery: {kind} at step {step} ({listed})", file=sys.stderr, flush=True)
    return {"kind": kind, "step": step, **details}


def after_out_of_memory(config: FitConfig, guard: SpikeGuard, exc: BaseException,
                        events: list[dict[str, Any]]) -> FitConfig:
    """The setting to retry with, or the error again when --auto-batch cannot help."""
    smaller = smaller_batch(config) if config.auto_batch and guard.steps_taken == 0 else None
    if smaller is None:
        raise exc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    events.append(_event("out of memory", 0, tried=describe_batch(config),
                         next=describe_batch(smaller)))
    print(f"auto-batch: out of memory at {describe_batch(config)}; trying "
          f"{describe_batch(smaller)}", flush=True)
    return smaller


def after_instability(config: FitConfig, guard: SpikeGuard, run_dir: Path, model: Any,
                      initial: dict[str, Any],
                      events: list[dict[str, Any]]) -> tuple[FitConfig, Path | None]:
    """Roll back to the last good checkpoint (or the initial adapter) at a lower learning rate;
    returns (new config, checkpoint to resume or None). Raises UnstableTraining past the limit."""
    tripped = guard.tripped
    rollbacks = sum(1 for e in events if e["kind"] in ("non-finite loss", "loss spike"))
    if rollbacks >= config.spike_max_rollbacks:
        raise UnstableTraining(
            f"{tripped['kind']} at step {tripped['step']} after {rollbacks} rollbacks (learning "
            f"rate now {config.learning_rate:g}); lower --learning-rate or raise "
            f"--spike-max-rollbacks")
    checkpoint = rollback_checkpoint(run_dir, tripped["step"])
    if checkpoint is None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in initial:
                    param.copy_(initial[name])
    lowered = dataclasses.replace(config, learning_rate=config.learning_rate
                                  * config.spike_lr_factor)
    loss = tripped["loss"] if math.isfinite(tripped["loss"]) else str(tripped["loss"])
    events.append(_event(tripped["kind"], tripped["step"], loss=loss,
                         recent_median=tripped["recent_median"],
                         rolled_back_to=checkpoint.name if checkpoint else "initial adapter",
                         learning_rate=lowered.learning_rate))
    return lowered, checkpoint
