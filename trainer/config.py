"""Settings of one `trainer fit` run: a dataclass that checks itself, fed by YAML then flags.

Layering, lowest first: field defaults < the interrupted run's saved config (on `--resume`) <
the YAML file given with `--config` < flags given on the command line.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay",
)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Fields that only steer this invocation; they never shape the weights, so the manifest leaves
# them out of "hyperparameters" and `--resume` may change them freely.
RUNTIME_FIELDS = ("resume", "device", "run_id", "config", "auto_batch", "recommended")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


@dataclass
class FitConfig:
    """Everything that decides what `trainer fit` trains; `trainer fit --help` explains each."""

    base: str = ""
    data: str = ""
    name: str = ""
    adapters_root: str = ""
    validation: str | None = None
    parent: str | None = None  # --from NAME@VERSION: continue training that adapter
    # LoRA
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    # Optimisation
    learning_rate: float = 2e-4
    scheduler: str = "cosine"
    warmup: float = 0.03  # < 1: a fraction of the steps; >= 1: a number of steps
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    # Sequences
    max_length: int = 1024
    packing: bool = False
    padding_free: bool = False
    gradient_checkpointing: bool = False
    # Evaluation and checkpoints
    val_split: float = 0.1  # used only when no validation file is given
    eval_steps: int = 50
    eval_on_start: bool = True
    early_stopping_patience: int = 0  # 0: off
    early_stopping_threshold: float = 0.0
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 5
    # Instabilities: a non-finite loss, or `spike_steps` steps in a row above spike_factor x the
    # median of the recent steps, rolls back to the last good checkpoint at spike_lr_factor x the
    # learning rate, at most spike_max_rollbacks times (spike_factor 0: only non-finite losses).
    spike_factor: float = 3.0
    spike_steps: int = 3
    spike_lr_factor: float = 0.5
    spike_max_rollbacks: int = 2
    # Runtime only
    auto_batch: bool = False  # on out-of-memory: halve the batch, double accumulation, retry
    recommended: bool = True  # layer the base's recommended settings under --config and flags
    device: str = "auto"
    resume: str | None = None  # "latest" or a run directory
    run_id: str | None = None
    config: str | None = None
    quantize: str = "nf4"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._check_required()
        self._check_lora()
        self._check_optimisation()
        self._check_sequences()
        self._check_evaluation()
        self._check_stability()
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.quantize not in ("nf4", "none"):
            raise ValueError(f"quantize must be nf4 or none, got {self.quantize!r}")
        if self.extra:
            raise ValueError(f"unknown config keys: {sorted(self.extra)}")

    def _check_required(self) -> None:
        for name in ("base", "data", "name", "adapters_root"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required (flag --{name.replace('_', '-')} or config)")
        if not NAME_PATTERN.match(self.name):
            raise ValueError(f"name must match {NAME_PATTERN.pattern}, got {self.name!r}")
        if self.parent is not None and "@" not in self.parent:
            raise ValueError(f"parent (--from) must be NAME@VERSION, got {self.parent!r}")

    def _check_lora(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        _positive("alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError("target_modules must not be empty")
        elif not self.target_modules or not all(isinstance(m, str) for m in self.target_modules):
            raise ValueError(f"target_modules must be a list of names, got {self.target_modules!r}")

    def _check_optimisation(self) -> None:
        _positive("learning_rate", self.learning_rate)
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        _non_negative("warmup", self.warmup)
        if self.max_steps <= 0:
            _positive("epochs", self.epochs)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be > 0 or -1 (use epochs), got {self.max_steps!r}")
        _positive("batch_size", self.batch_size)
        _positive("grad_accum", self.grad_accum)
        _non_negative("max_grad_norm", self.max_grad_norm)
        _non_negative("weight_decay", self.weight_decay)

    def _check_sequences(self) -> None:
        if self.max_length < 16:
            raise ValueError(f"max_length must be >= 16, got {self.max_length!r}")
        if self.packing and self.padding_free:
            raise ValueError("packing and padding_free are exclusive (packing is padding-free)")

    def _check_evaluation(self) -> None:
        if not 0.0 <= self.val_split < 0.5:
            raise ValueError(f"val_split must be in [0, 0.5), got {self.val_split!r}")
        _positive("eval_steps", self.eval_steps)
        _positive("save_steps", self.save_steps)
        _positive("logging_steps", self.logging_steps)
        _positive("save_total_limit", self.save_total_limit)
        _non_negative("early_stopping_patience", self.early_stopping_patience)
        _non_negative("early_stopping_threshold", self.early_stopping_threshold)
        if self.early_stopping_patience and not self.validation and self.val_split == 0:
            raise ValueError("early_stopping_patience needs validation or val_split > 0")

    def _check_stability(self) -> None:
        if self.spike_factor != 0 and self.spike_factor <= 1:
            raise ValueError(f"spike_factor must be > 1 (or 0: off), got {self.spike_factor!r}")
        _positive("spike_steps", self.spike_steps)
        if not 0.0 < self.spike_lr_factor < 1.0:
            raise ValueError(f"spike_lr_factor must be in (0, 1), got {self.spike_lr_factor!r}")
        _non_negative("spike_max_rollbacks", self.spike_max_rollbacks)

    @property
    def has_validation(self) -> bool:
        return bool(self.validation) or self.val_split > 0

    def hyperparameters(self) -> dict[str, Any]:
        """What reproduces the weights: every field except paths and runtime-only switches."""
        skip = {"base", "data", "validation", "name", "adapters_root", "extra", *RUNTIME_FIELDS}
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(FitConfig) if f.name != "extra")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config; keys may use dashes like the flags (`max-steps`) or underscores."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"config {path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"config {path}: expected a mapping at the top level")
    out = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    if "from" in out:
        out["parent"] = out.pop("from")
    return out


def build_config(*layers: dict[str, Any]) -> FitConfig:
    """Merge layers (later wins, None values skipped) into a checked FitConfig."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    known = {k: v for k, v in merged.items() if k in FIELD_NAMES}
    unknown = {k: v for k, v in merged.items() if k not in FIELD_NAMES}
    for key in ("learning_rate", "alpha", "dropout", "warmup", "epochs", "max_grad_norm",
                "weight_decay", "val_split", "early_stopping_threshold", "spike_factor",
                "spike_lr_factor"):
        if isinstance(known.get(key), int | str) and not isinstance(known.get(key), bool):
            try:
                known[key] = float(known[key])
            except ValueError as exc:
                raise ValueError(f"{key} must be a number, got {known[key]!r}") from exc
    return FitConfig(**known, extra=unknown)
