"""Trainer callbacks of `trainer fit` and `trainer sweep`: progress bar, evaluation lines, early
stopping, CPU guard, Optuna pruning."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from transformers import TrainerCallback


class ProgressBar(TrainerCallback):
    """A tqdm bar over optimizer steps whose postfix shows the last loss and tokens per second.

    TRL logs a running `num_tokens` (non-padding tokens seen); the rate is taken between logs.
    """

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.bar: Any = None
        self.step = 0
        self.last_tokens = 0.0
        self.last_time = 0.0
        self.tokens_per_second: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, file=self.stream,
                            desc="fit", dynamic_ncols=True)
        self.step = state.global_step
        self.last_time = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.step)
        self.step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs or self.bar is None:
            return
        now = time.perf_counter()
        tokens = float(logs.get("num_tokens", 0.0))
        # After a resume the running count restarts from the checkpoint's; skip one interval.
        rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        if self.last_tokens and tokens > self.last_tokens:
            self.tokens_per_second.append(rate)
        self.last_tokens, self.last_time = tokens, now
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{rate:,.0f}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EvalSummary(TrainerCallback):
    """One line per evaluation: step, validation loss, perplexity and the best so far."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.best = math.inf

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or not state.is_world_process_zero:
            return
        self.best = min(self.best, loss)
        line = (f"eval step {state.global_step}/{state.max_steps}: loss {loss:.4f} "
                f"ppl {math.exp(min(loss, 50)):.2f} best {self.best:.4f}")
        from tqdm.auto import tqdm

        tqdm.write(line, file=self.stream)


class BestAdapterEarlyStopping(TrainerCallback):
    """Stop after `patience` evaluations without a validation-loss gain larger than `threshold`,
    and keep an in-memory copy of the trainable weights at the best evaluation.

    Adapter weights are small, so a copy is cheaper and simpler than tying early stopping to
    checkpoint saves (transformers' `load_best_model_at_end` needs save and eval steps aligned).
    """

    def __init__(self, patience: int, threshold: float = 0.0) -> None:
        self.patience = patience
        self.threshold = threshold
        self.best_loss = math.inf
        self.best_step = -1
        self.best_state: dict[str, Any] | None = None
        self.bad_evals = 0
        self.stopped_early = False

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        if loss < self.best_loss - self.threshold:
            self.best_loss, self.best_step, self.bad_evals = loss, state.global_step, 0
            if model is not None and self.patience:
                self.best_state = {
                    n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
                }
            return
        self.bad_evals += 1
        if self.patience and self.bad_evals >= self.patience:
            self.stopped_early = True
            control.should_training_stop = True

    def restore_best(self, model: Any, step: int) -> bool:
        """Load the best weights back into `model`, now at `step`; True when they were restored
        (False when the best evaluation measured the weights of `step` themselves)."""
        if self.best_state is None or self.best_step == step:
            return False
        import torch

        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in self.best_state:
                    param.copy_(self.best_state[name])
        return True


class CpuRepackingGuard(TrainerCallback):
    """Re-applies `support_avx512bf16_for_cpu = False` on every Linear4bit when training starts
    and after each evaluation, in case a wrapper rebuilt a layer (see common.modeling)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply(model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self._apply(model)

    @staticmethod
    def _apply(model: Any) -> None:
        if model is not None:
            from common.modeling import disable_cpu_repacking

            disable_cpu_repacking(model)


class OptunaPruning(TrainerCallback):
    """Reports each validation loss to an Optuna trial and stops the fit when the trial's
    pruner says so (`pruned_at` is then the step). The step-0 evaluation is skipped: every
    trial starts from the same base, so it tells trials apart by nothing."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.pruned_at: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None or state.global_step == 0:
            return
        self.trial.report(loss, state.global_step)
        if self.trial.should_prune():
            self.pruned_at = state.global_step
            control.should_training_stop = True
