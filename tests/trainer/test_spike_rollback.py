"""Instabilities on the real tiny base: a non-finite loss or a loss spike stops the run, rolls
back to the last good checkpoint, lowers the learning rate and continues, each event in the
manifest and the log; past the allowed rollbacks the run fails. The instabilities are made the
way they happen: the adapter's weights go bad mid-run (NaN, or blown up)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import head_lines, run_trainer
from safetensors.torch import load_file
from transformers import TrainerCallback

from trainer import fit as fit_module
from trainer.config import build_config
from trainer.recovery import SpikeGuard, UnstableTraining


class CorruptWeights(TrainerCallback):
    """Before optimizer step `step` + 1 (once per step, on the first pass only), multiplies
    every LoRA B weight by `factor` (nan: a non-finite loss; a large number: a spike)."""

    def __init__(self, plan: dict[int, float]) -> None:
        self.plan = dict(plan)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        factor = self.plan.pop(state.global_step, None)
        if factor is None:
            return
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(factor)


@pytest.fixture(scope="module")
def data(bundled_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return head_lines(bundled_data / "it_helpdesk" / "train.jsonl",
                      tmp_path_factory.mktemp("spike") / "train.jsonl", 24)


def _settings(tiny_base: Path, data: Path, root: Path, **overrides) -> dict:
    return {"base": str(tiny_base), "data": str(data), "name": "spiky", "adapters_root": str(root),
            "max_steps": 16, "batch_size": 2, "max_length": 64, "rank": 4, "alpha": 8,
            "learning_rate": 1e-2, "scheduler": "constant", "warmup": 0, "logging_steps": 1,
            "save_steps": 2, "val_split": 0, "device": "cpu", "seed": 0, **overrides}


def test_a_non_finite_loss_rolls_back_to_the_last_checkpoint_at_half_the_rate(
    tiny_base: Path, data: Path, tmp_path: Path, capsys
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = build_config(_settings(tiny_base, data, tmp_path / "adapters", max_steps=6))
    version_dir = fit_module.fit(config, callbacks=[CorruptWeights({2: math.nan})])
    assert "recovery: non-finite loss at step 3 (" in capsys.readouterr().err
    manifest = json.loads((version_dir / "manifest.json").read_text())
    [event] = manifest["recovery"]
    assert (event["kind"], event["step"], event["loss"]) == ("non-finite loss", 3, "nan")
    assert event["rolled_back_to"] == "checkpoint-2"
    assert event["learning_rate"] == pytest.approx(5e-3)
    # It went on from step 2 at the lowered rate and finished on sound weights.
    assert manifest["metrics"]["global_step"] == 6
    assert manifest["hyperparameters"]["learning_rate"] == pytest.approx(5e-3)
    train = manifest["curves"]["train"]
    assert [p["step"] for p in train] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(p["loss"]) for p in train)
    assert train[-1]["learning_rate"] == pytest.approx(5e-3)
    weights = load_file(str(version_dir / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # The gradient norm is logged to TensorBoard beside the loss.
    assert all(p["grad_norm"] > 0 for p in train)
    events = EventAccumulator(str(Path(manifest["run_dir"]) / "tensorboard")).Reload()
    assert {"train/loss", "train/grad_norm"} <= set(events.Tags()["scalars"])


def test_a_loss_spike_rolls_back_before_it(tiny_base: Path, data: Path, tmp_path: Path) -> None:
    # Blowing the adapter up before step 12 takes the loss from about 5.4 to near the
    # uniform-guess loss ln(4096) = 8.3: the tiny base's final norm caps how far it can spike,
    # so the factor is set below that cap (the step count is covered by the guard's own tests).
    config = build_config(_settings(tiny_base, data, tmp_path / "adapters", spike_factor=1.2,
                                    spike_steps=1))
    version_dir = fit_module.fit(config, callbacks=[CorruptWeights({11: 1e4})])
    manifest = json.loads((version_dir / "manifest.json").read_text())
    [event] = manifest["recovery"]
    assert event["kind"] == "loss spike" and event["step"] == 12
    assert event["loss"] > 1.2 * event["recent_median"]
    assert event["rolled_back_to"] == "checkpoint-10"
    assert event["learning_rate"] == pytest.approx(5e-3)
    assert manifest["metrics"]["global_step"] == 16
    assert manifest["curves"]["train"][-1]["loss"] < event["loss"]


class _Control:
    should_training_stop = should_save = should_evaluate = False


class _State:
    global_step = 0


def _feed(guard: SpikeGuard, losses: list[float]) -> list[int]:
    """Step losses through the guard; returns the steps after which it stopped the run."""
    state, stops = _State(), []
    for loss in losses:
        state.global_step += 1
        control = _Control()
        guard.micro_losses.append(torch.tensor(loss))
        guard.on_step_end(None, state, control)
        if control.should_training_stop:
            stops.append(state.global_step)
    return stops


def test_the_guard_trips_after_m_high_steps_against_the_recent_median() -> None:
    steady = [2.0] * 8
    guard = SpikeGuard(factor=3.0, steps=3)
    assert _feed(guard, [*steady, 7.0, 7.0, 2.0, 7.0, 7.0]) == []  # never 3 in a row
    guard = SpikeGuard(factor=3.0, steps=3)
    assert _feed(guard, [*steady, 7.0, 7.0, 7.0]) == [11]
    assert guard.tripped["kind"] == "loss spike" and guard.tripped["step"] == 9
    assert guard.tripped["recent_median"] == 2.0


def test_the_guard_waits_for_history_but_never_for_a_nan() -> None:
    assert _feed(SpikeGuard(factor=3.0, steps=1), [2.0, 2.0, 50.0]) == []
    guard = SpikeGuard(factor=0, steps=1)  # spikes off
    assert _feed(guard, [2.0, 50.0, float("inf")]) == [3]
    assert guard.tripped["kind"] == "non-finite loss"


def test_past_the_allowed_rollbacks_the_run_fails(tiny_base: Path, data: Path,
                                                  tmp_path: Path) -> None:
    config = build_config(_settings(tiny_base, data, tmp_path / "adapters", max_steps=4,
                                    spike_max_rollbacks=0))
    with pytest.raises(UnstableTraining, match="non-finite loss at step 2 after 0 rollbacks"):
        fit_module.fit(config, callbacks=[CorruptWeights({1: math.nan})])
    assert not (tmp_path / "adapters" / "spiky" / "1").exists()


def test_spike_settings_are_checked(tiny_base: Path, data: Path, tmp_path: Path,
                                    capsys) -> None:
    code, _ = run_trainer(["fit", "--base", str(tiny_base), "--data", str(data), "--name", "x",
                           "--adapters-root", str(tmp_path), "--spike-factor", "0.5"])
    assert code == 2
    assert "spike_factor must be > 1 (or 0: off), got 0.5" in capsys.readouterr().err
