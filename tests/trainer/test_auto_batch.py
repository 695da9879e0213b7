"""`trainer fit --auto-batch` on the real tiny base: out of memory before the first step halves
the per-device batch and doubles accumulation (same effective batch) until a step fits, then
switches gradient checkpointing on; the model raises torch's own OutOfMemoryError from any
forward larger than it "fits", as CUDA would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import head_lines
from transformers import TrainerCallback

from trainer import fit as fit_module
from trainer.config import build_config
from trainer.recovery import smaller_batch


class MemoryLimit(TrainerCallback):
    """Makes every forward of more than `max_rows` sequences fail like a CUDA allocation."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.hooked: set[int] = set()
        self.refused: list[int] = []
        self.fitted: list[int] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if id(model) not in self.hooked:
            self.hooked.add(id(model))
            model.register_forward_pre_hook(self._check, with_kwargs=True)

    def _check(self, module, args, kwargs):
        rows = kwargs["input_ids"].shape[0]
        if rows > self.max_rows:
            self.refused.append(rows)
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows} rows")
        self.fitted.append(rows)


@pytest.fixture(scope="module")
def data(bundled_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return head_lines(bundled_data / "it_helpdesk" / "train.jsonl",
                      tmp_path_factory.mktemp("autobatch") / "train.jsonl", 24)


def _settings(tiny_base: Path, data: Path, root: Path, **overrides) -> dict:
    return {"base": str(tiny_base), "data": str(data), "name": "auto", "adapters_root": str(root),
            "max_steps": 2, "batch_size": 8, "grad_accum": 1, "max_length": 64, "rank": 4,
            "alpha": 8, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 100,
            "val_split": 0, "device": "cpu", "seed": 0, **overrides}


def test_halving_keeps_the_effective_batch_then_turns_on_checkpointing() -> None:
    config = build_config({"base": "b", "data": "d", "name": "n", "adapters_root": "r",
                           "batch_size": 8, "grad_accum": 1})
    seen = []
    while config is not None:
        seen.append((config.batch_size, config.grad_accum, config.gradient_checkpointing))
        config = smaller_batch(config)
    assert seen == [(8, 1, False), (4, 2, False), (2, 4, False), (1, 8, False), (1, 8, True)]
    odd = build_config({"base": "b", "data": "d", "name": "n", "adapters_root": "r",
                        "batch_size": 3, "grad_accum": 2})
    assert (smaller_batch(odd).batch_size, smaller_batch(odd).grad_accum) == (1, 6)


def test_auto_batch_finds_the_batch_that_fits(tiny_base: Path, data: Path, tmp_path: Path,
                                              capsys) -> None:
    limit = MemoryLimit(max_rows=2)
    config = build_config(_settings(tiny_base, data, tmp_path / "adapters", auto_batch=True))
    version_dir = fit_module.fit(config, callbacks=[limit])
    out = capsys.readouterr().out
    assert limit.refused == [8, 4]
    assert limit.fitted and set(limit.fitted) == {2}
    assert "auto-batch: out of memory at batch_size 8 x grad_accum 1 (effective 8)" in out
    assert "auto-batch: chose batch_size 2 x grad_accum 4 (effective 8)" in out
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["metrics"]["global_step"] == 2
    assert manifest["hyperparameters"]["batch_size"] == 2
    assert manifest["hyperparameters"]["grad_accum"] == 4
    assert [e["kind"] for e in manifest["recovery"]] == ["out of memory", "out of memory"]
    # A --resume of this run continues with what was chosen.
    saved = json.loads((Path(manifest["run_dir"]) / "config.json").read_text())
    assert (saved["batch_size"], saved["grad_accum"]) == (2, 4)


def test_without_auto_batch_out_of_memory_is_an_error(tiny_base: Path, data: Path,
                                                      tmp_path: Path) -> None:
    config = build_config(_settings(tiny_base, data, tmp_path / "adapters"))
    with pytest.raises(torch.OutOfMemoryError):
        fit_module.fit(config, callbacks=[MemoryLimit(max_rows=2)])


def test_when_nothing_fits_the_error_comes_back(tiny_base: Path, data: Path,
                                                tmp_path: Path) -> None:
    config = build_config(_settings(tiny_base, data, tmp_path / "adapters", batch_size=2,
                                    auto_batch=True))
    limit = MemoryLimit(max_rows=0)
    with pytest.raises(torch.OutOfMemoryError):
        fit_module.fit(config, callbacks=[limit])
    # batch 2, batch 1, batch 1 with gradient checkpointing: then nothing is left to try.
    assert limit.refused == [2, 1, 1]
