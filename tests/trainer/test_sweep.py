"""`trainer sweep` on the real tiny base with Optuna: trials are short fits in their own run
folders, the study lives in SQLite beside the runs and a rerun continues it, and the best trial
is published as a normal version holding the sweep table, with a plot in its report."""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna
import pytest
from conftest import head_lines, run_trainer

from trainer import manifest as mf
from trainer.callbacks import OptunaPruning
from trainer.sweep import DEFAULT_SPACE, PLOT_FILE, parse_space

SPACE = "learning_rate: {low: 1.0e-3, high: 3.0e-2, log: true}\nrank: [2, 4]\nmax_length: 64\n"


@pytest.fixture(scope="module")
def sweep_args(tiny_base: Path, bundled_data: Path,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    work = tmp_path_factory.mktemp("sweep")
    train = head_lines(bundled_data / "it_helpdesk" / "train.jsonl", work / "train.jsonl", 16)
    validation = head_lines(bundled_data / "it_helpdesk" / "validation.jsonl", work / "val.jsonl",
                            4)
    space = work / "space.yaml"
    space.write_text(SPACE)
    root = work / "adapters"
    return [
        "sweep", "--base", str(tiny_base), "--data", str(train), "--validation", str(validation),
        "--name", "tuned", "--adapters-root", str(root), "--space", str(space), "--no-recommended",
        "--max-steps", "2", "--eval-steps", "1", "--batch-size", "2", "--logging-steps", "1",
        "--save-steps", "100", "--device", "cpu",
    ], root


@pytest.fixture(scope="module")
def first_sweep(sweep_args) -> tuple[Path, str]:
    argv, _ = sweep_args
    code, out = run_trainer([*argv, "--trials", "2"])
    assert code == 0, out
    return Path(out.strip().splitlines()[-1]), out


def test_the_best_trial_is_published_with_the_sweep_table(first_sweep, sweep_args) -> None:
    version_dir, out = first_sweep
    _, root = sweep_args
    assert version_dir == root / "tuned" / "1"
    manifest = mf.read_manifest(version_dir)
    sweep = manifest["sweep"]
    assert [row["trial"] for row in sweep["trials"]] == [0, 1]
    finished = [row for row in sweep["trials"] if row["state"] == "complete"]
    best = min(finished, key=lambda row: row["value"])
    assert sweep["best_trial"] == best["trial"]
    # The published adapter is the best trial's: its settings and its validation loss.
    assert manifest["hyperparameters"]["learning_rate"] == pytest.approx(best["learning_rate"])
    assert manifest["lora"]["r"] == best["rank"] and manifest["hyperparameters"]["max_length"] == 64
    assert manifest["metrics"]["final_val_loss"] == pytest.approx(best["value"])
    assert (version_dir / "adapter_model.safetensors").is_file()
    assert (version_dir / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    report = (version_dir / "report.html").read_text()
    assert "<h2>Sweep</h2>" in report and report.count("data:image/png;base64,") == 2
    assert f"best trial {best['trial']}: validation loss" in out
    assert Path(sweep["storage"]) == root / "tuned" / mf.RUNS_DIR / "sweep-tuned.db"


def test_a_rerun_continues_the_study(first_sweep, sweep_args) -> None:
    argv, root = sweep_args
    code, out = run_trainer([*argv, "--trials", "3"])
    assert code == 0, out
    ran = {line.split(":")[0] for line in out.splitlines() if line.startswith("trial ")}
    assert ran == {"trial 2"}  # trials 0 and 1 are not run again
    manifest = mf.read_manifest(Path(out.strip().splitlines()[-1]))
    assert [row["trial"] for row in manifest["sweep"]["trials"]] == [0, 1, 2]
    storage = f"sqlite:///{manifest['sweep']['storage']}"
    assert len(optuna.load_study(study_name="tuned", storage=storage).trials) == 3


def test_the_pruning_callback_feeds_the_pruner_and_stops_a_bad_trial() -> None:
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1,
                                                                   n_warmup_steps=0))
    good = study.ask()
    good.report(1.0, 5)
    study.tell(good, 1.0)
    trial = study.ask()
    pruning = OptunaPruning(trial)
    state, control = argparse.Namespace(global_step=0), argparse.Namespace(
        should_training_stop=False)
    pruning.on_evaluate(None, state, control, metrics={"eval_loss": 9.0})
    assert study.trials[-1].intermediate_values == {}  # step 0 is skipped
    state.global_step = 5
    pruning.on_evaluate(None, state, control, metrics={"eval_loss": 9.0})
    assert control.should_training_stop and pruning.pruned_at == 5


def test_the_default_space_searches_the_usual_settings() -> None:
    names = [dim.name for dim in parse_space(DEFAULT_SPACE)]
    assert names == ["learning_rate", "rank", "alpha", "dropout"]


@pytest.mark.parametrize(("space", "message"), [
    ("name: [a, b]\n", "space: 'name' cannot be searched"),
    ("learning_rate: {low: 0.1, high: 0.01}\n", "learning_rate needs low < high"),
    ("dropout: {low: 0, high: 0.1, log: true}\n", "log: true needs low > 0"),
    ("rank: {min: 1}\n", "rank takes low, high, log, step"),
])
def test_a_bad_space_is_refused_before_any_trial(sweep_args, tmp_path: Path, space: str,
                                                 message: str, capsys) -> None:
    argv, _ = sweep_args
    bad = tmp_path / "space.yaml"
    bad.write_text(space)
    at = argv.index("--space") + 1
    code, _ = run_trainer([*argv[:at], str(bad), *argv[at + 1:], "--trials", "1"])
    assert code == 2
    assert message in capsys.readouterr().err
