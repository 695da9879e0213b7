"""`trainer sweep` on the real tiny base with Optuna: trials are short fits in their own run
folders, the study lives in SQLite beside the runs and a rerun continues it, and the best
trial's settings are refit at the full length (or its own adapter kept) and published as a
normal version holding the sweep table, with a plot in its report."""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna
import pytest
from conftest import head_lines, run_trainer

from trainer import manifest as mf
from trainer.callbacks import OptunaPruning
from trainer.cli import build_parser
from trainer.sweep import (
    DEFAULT_SPACE,
    PLOT_FILE,
    Length,
    parse_space,
    plain_fit_length,
    refit_length,
)

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
    code, out = run_trainer([*argv, "--trials", "2", "--refit-steps", "3"])
    assert code == 0, out
    return Path(out.strip().splitlines()[-1]), out


def best_row(manifest: dict) -> dict:
    finished = [row for row in manifest["sweep"]["trials"] if row["state"] == "complete"]
    return min(finished, key=lambda row: row["value"])


def printed_table(out: str, study: str) -> list[list[str]]:
    """The trials table printed under its title: the header, then one row per trial."""
    lines = out.splitlines()
    at = lines.index(f"trials of study {study}:") + 1
    table = []
    while at < len(lines) and lines[at].startswith("  "):
        table.append(lines[at].split())
        at += 1
    return table


def test_the_best_settings_are_refit_and_published_with_the_sweep_table(first_sweep,
                                                                         sweep_args) -> None:
    version_dir, out = first_sweep
    _, root = sweep_args
    assert version_dir == root / "tuned" / "1"
    manifest = mf.read_manifest(version_dir)
    sweep = manifest["sweep"]
    assert [row["trial"] for row in sweep["trials"]] == [0, 1]
    best = best_row(manifest)
    assert sweep["best_trial"] == best["trial"]
    # The published adapter is a refit of the best trial's settings for --refit-steps steps.
    assert sweep["refit"]["trial"] == best["trial"] and sweep["refit"]["max_steps"] == 3
    assert f"refitting trial {best['trial']}'s settings for 3 steps" in out
    assert manifest["hyperparameters"]["learning_rate"] == pytest.approx(best["learning_rate"])
    assert manifest["lora"]["r"] == best["rank"] and manifest["hyperparameters"]["max_length"] == 64
    assert manifest["hyperparameters"]["max_steps"] == 3 and manifest["metrics"]["global_step"] == 3
    assert Path(manifest["run_dir"]) == Path(sweep["refit"]["run_dir"])
    assert (version_dir / "adapter_model.safetensors").is_file()
    assert (version_dir / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    report = (version_dir / "report.html").read_text()
    assert "<h2>Sweep</h2>" in report and report.count("data:image/png;base64,") == 2
    assert f"best trial {best['trial']}: validation loss" in out
    assert Path(sweep["storage"]) == root / "tuned" / mf.RUNS_DIR / "sweep-tuned.db"


def test_the_trials_table_is_printed_as_the_manifest_holds_it(first_sweep) -> None:
    version_dir, out = first_sweep
    header, *rows = printed_table(out, "tuned")
    # Each searched setting; a fixed one (max_length) is no trial parameter.
    assert header == ["trial", "state", "val_loss", "last_step", "learning_rate", "rank"]
    trials = mf.read_manifest(version_dir)["sweep"]["trials"]
    assert [row[:2] for row in rows] == [[str(t["trial"]), t["state"]] for t in trials]
    assert [float(row[2]) for row in rows] == pytest.approx([t["value"] for t in trials],
                                                            rel=1e-3)
    assert [int(row[3]) for row in rows] == [t["last_step"] for t in trials]
    assert [int(row[5]) for row in rows] == [t["rank"] for t in trials]


def test_a_rerun_continues_the_study(first_sweep, sweep_args) -> None:
    argv, root = sweep_args
    code, out = run_trainer([*argv, "--trials", "3", "--refit-steps", "0"])
    assert code == 0, out
    ran = {line.split(":")[0] for line in out.splitlines() if line.startswith("trial ")}
    assert ran == {"trial 2"}  # trials 0 and 1 are not run again
    manifest = mf.read_manifest(Path(out.strip().splitlines()[-1]))
    assert [row["trial"] for row in manifest["sweep"]["trials"]] == [0, 1, 2]
    storage = f"sqlite:///{manifest['sweep']['storage']}"
    assert len(optuna.load_study(study_name="tuned", storage=storage).trials) == 3
    # --refit-steps 0 publishes the best trial's own adapter: its settings and validation loss.
    best = best_row(manifest)
    assert manifest["sweep"]["refit"] is None and manifest["sweep"]["best_trial"] == best["trial"]
    assert f"publishing trial {best['trial']}'s adapter (trained for 2 steps)" in out
    assert manifest["hyperparameters"]["learning_rate"] == pytest.approx(best["learning_rate"])
    assert manifest["hyperparameters"]["max_steps"] == 2
    assert manifest["metrics"]["final_val_loss"] == pytest.approx(best["value"])


def test_a_rerun_after_the_trials_goes_straight_to_the_refit(first_sweep, sweep_args) -> None:
    argv, _ = sweep_args
    code, out = run_trainer([*argv, "--trials", "2", "--refit-steps", "1"])
    assert code == 0, out
    assert not any(line.startswith("trial ") for line in out.splitlines())
    assert "study tuned: 2 trials already finished" in out
    manifest = mf.read_manifest(Path(out.strip().splitlines()[-1]))
    best = manifest["sweep"]["best_trial"]
    assert f"refitting trial {best}'s settings for 1 step" in out
    assert manifest["sweep"]["refit"]["trial"] == best and manifest["metrics"]["global_step"] == 1


def test_the_refit_defaults_to_the_length_of_a_plain_fit(tiny_base: Path,
                                                         tmp_path: Path) -> None:
    parser = build_parser()
    # --max-steps and --epochs size the trials; the refit trains as `trainer fit` would.
    argv = ["sweep", "--base", str(tiny_base), "--max-steps", "2", "--epochs", "0.5"]
    assert plain_fit_length(parser.parse_args(argv)) == Length(200, 1.0)  # the base's
    assert plain_fit_length(parser.parse_args([*argv, "--no-recommended"])) == Length(-1, 1.0)
    config = tmp_path / "fit.yaml"
    config.write_text("max-steps: 50\n")
    assert plain_fit_length(parser.parse_args([*argv, "--config", str(config)])) == Length(50, 1.0)
    args = parser.parse_args(argv)
    space = parse_space({"max_steps": {"low": 10, "high": 30}})
    assert refit_length(args, space) is None  # the length searched is the trial's own


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
