"""`trainer sweep`: search fit settings with Optuna in short trials, then train the best
settings for the full length and publish that as a version.

The space file (YAML) names fit settings, one key each:
    learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}   # a float range
    max_steps: {low: 100, high: 300, step: 100}             # an int range (int bounds)
    rank: [8, 16, 32]                                       # choices
    target_modules: [all-linear, "q_proj,v_proj"]
    max_length: 320                                         # fixed
Settings not in the space come from the flags, --config and the base's recommended settings, as
for `trainer fit`. Each trial is a fit in its own run folder; Optuna's TPE sampler picks the
settings and its median pruner, fed the validation loss at every evaluation by a trainer
callback, stops trials worse than the median of earlier ones at the same step. The study lives
in SQLite beside the runs (<root>/<name>/.runs/sweep-<study>.db): the same command continues it
until --trials trials have finished, and a rerun once they have goes straight to the refit.
The best trial's settings (lowest final validation loss) are then refit for the full length:
--refit-steps, else the length a plain `trainer fit` would train for (the sweep's settings
without its --max-steps and --epochs flags: --config, the base's recommended settings, the fit
defaults; the best trial's own length when the space searches it). The refit is published as a
normal version whose manifest holds the sweep table and which trial it refit, with sweep.png
(every trial and the best validation curve) embedded in its report. --refit-steps 0, or a refit
that would only repeat the best trial, publishes the best trial's own adapter.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import fit as fit_module
from trainer import manifest as mf
from trainer.config import FitConfig, build_config, read_yaml
from trainer.recommended import RECOMMENDABLE

# A space for any base: the ranges practice recommends for LoRA, widened upwards in learning
# rate because small bases (like the embedded one) need far higher rates than 7B models.
DEFAULT_SPACE: dict[str, Any] = {
    "learning_rate": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
    "rank": [8, 16, 32, 64],
    "alpha": [16, 32, 64],
    "dropout": [0.0, 0.05, 0.1],
}
SEARCHABLE = tuple(k for k in RECOMMENDABLE if k not in ("seed", "eval_steps", "save_steps",
                                                        "logging_steps", "save_total_limit"))
FIT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FitConfig)}
RESULT_FILE = "trial_result.json"
ADAPTER_DIR = "adapter"
PLOT_FILE = "sweep.png"


# -------------------------------------------------------------------------------------- space


@dataclass(frozen=True)
class Dimension:
    """One searched setting: choices, a numeric range, or a fixed value."""

    name: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    fixed: Any = None

    def __post_init__(self) -> None:
        if self.name not in SEARCHABLE:
            raise ValueError(f"space: {self.name!r} cannot be searched (searchable: "
                             f"{', '.join(SEARCHABLE)})")
        if self.choices is not None and not self.choices:
            raise ValueError(f"space: {self.name} needs at least one choice")
        if self.low is not None and (self.high is None or not self.low < self.high):
            raise ValueError(f"space: {self.name} needs low < high, got {self.low!r}, "
                             f"{self.high!r}")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError(f"space: {self.name} with log: true needs low > 0, got {self.low!r}")

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(
            self.step, float)

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.low is None:
            return self.fixed
        if self.integer:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1,
                                     log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log,
                                   step=self.step)


def parse_space(raw: dict[str, Any]) -> list[Dimension]:
    dims = []
    for key, spec in raw.items():
        name = str(key).replace("-", "_")
        if isinstance(spec, list):
            dims.append(Dimension(name, choices=tuple(spec)))
        elif isinstance(spec, dict):
            unknown = set(spec) - {"low", "high", "log", "step"}
            if unknown or "low" not in spec:
                raise ValueError(f"space: {name} takes low, high, log, step; got {sorted(spec)}")
            dims.append(Dimension(name, low=spec["low"], high=spec.get("high"),
                                  log=bool(spec.get("log", False)), step=spec.get("step")))
        else:
            dims.append(Dimension(name, fixed=spec))
    if not dims:
        raise ValueError("space: no settings to search")
    return dims


def trial_config(config: FitConfig, params: dict[str, Any]) -> FitConfig:
    """The sweep's settings with the trial's on top, checked like any fit config."""
    values = dict(params)
    if isinstance(values.get("target_modules"), str):
        values["target_modules"] = fit_module._modules(values["target_modules"])
    # Every trial gets a run folder of its own, whatever --run-id said.
    return dataclasses.replace(build_config(config.to_dict(), values), run_id=None)


# ------------------------------------------------------------------------------------ trials


def run_trial(trial: Any, config: FitConfig, dims: list[Dimension]) -> float:
    """One short fit; its adapter and result stay in its run folder for publishing."""
    import optuna

    params = {dim.name: dim.suggest(trial) for dim in dims}
    settings = trial_config(config, params)
    print(f"trial {trial.number}: {fit_module._settings_line(params)}", flush=True)
    from trainer.callbacks import OptunaPruning

    pruning = OptunaPruning(trial)
    result, trainer, _ = fit_module.train(settings, callbacks=[pruning])
    trial.set_user_attr("run_dir", str(result.run_dir))
    # A trial's run is done either way: `trainer fit --resume` must not pick it up.
    mf.write_json_atomic(result.run_dir / "run.json", {
        "status": "finished", "version": None, "sweep_trial": trial.number,
        "pruned_at": pruning.pruned_at})
    if pruning.pruned_at is not None:
        print(f"trial {trial.number}: pruned at step {pruning.pruned_at}", flush=True)
        raise optuna.TrialPruned()
    trainer.model.save_pretrained(str(result.run_dir / ADAPTER_DIR))
    mf.write_json_atomic(result.run_dir / RESULT_FILE, result.to_dict())
    loss = result.metrics["final_val_loss"]
    print(f"trial {trial.number}: validation loss {loss:.4f}", flush=True)
    return loss


def open_study(config: FitConfig, study_name: str, trials: int) -> Any:
    """The study in SQLite beside the runs; a heartbeat lets a rerun fail a killed trial."""
    import optuna

    runs = Path(config.adapters_root) / config.name / mf.RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{runs / f'sweep-{study_name}.db'}", heartbeat_interval=30, grace_period=90)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    study = optuna.create_study(study_name=study_name, storage=storage, pruner=pruner,
                                direction="minimize", load_if_exists=True)
    # Seeded past the trials already run, so a continued study does not draw them again.
    study.sampler = optuna.samplers.TPESampler(
        seed=config.seed + len(study.trials), n_startup_trials=max(2, min(10, trials // 3)))
    return study


def finished_trials(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


# ----------------------------------------------------------------------------------- results


def trial_table(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        steps = sorted(t.intermediate_values)
        rows.append({"trial": t.number, "state": t.state.name.lower(), "value": t.value,
                     "last_step": steps[-1] if steps else None, **t.params})
    return rows


def plot_study(study: Any, path: Path) -> Path:
    """Left: each trial's final (or last reported) validation loss and the running best.
    Right: every trial's validation curve, the best one bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = finished_trials(study)
    best = study.best_trial
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    running = float("inf")
    for t in trials:
        last = t.value if t.value is not None else t.intermediate_values[max(t.intermediate_values)]
        pruned = t.value is None
        left.scatter(t.number, last, marker="x" if pruned else "o",
                     color="tab:gray" if pruned else "tab:blue")
        running = min(running, t.value) if t.value is not None else running
        left.scatter(t.number, running, marker="_", color="tab:red", s=200)
        curve = sorted(t.intermediate_values.items())
        if curve:
            right.plot(*zip(*curve, strict=True), color="tab:gray", alpha=0.5,
                       linewidth=3 if t.number == best.number else 1)
    best_curve = sorted(best.intermediate_values.items())
    if best_curve:
        right.plot(*zip(*best_curve, strict=True), color="tab:red", linewidth=2,
                   label=f"best (trial {best.number})")
        right.legend()
    left.set(title="trials (o finished, x pruned, - best so far)", xlabel="trial",
             ylabel="validation loss")
    right.set(title="validation loss per evaluation", xlabel="step")
    figure.savefig(path, dpi=96, bbox_inches="tight")
    plt.close(figure)
    return path


def sweep_record(study: Any, study_name: str, config: FitConfig,
                 refit: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's `sweep` section: the study, its table, and the refit (None: the best
    trial's own adapter was published)."""
    best = study.best_trial
    storage = Path(config.adapters_root) / config.name / mf.RUNS_DIR / f"sweep-{study_name}.db"
    return {"study": study_name, "storage": str(storage), "best_trial": best.number,
            "best_params": best.params, "refit": refit, "plot": PLOT_FILE,
            "trials": trial_table(study)}


def publish_best(study: Any, study_name: str) -> Path:
    """Publish the best trial's adapter as a version whose manifest holds the sweep."""
    run_dir = Path(study.best_trial.user_attrs["run_dir"])
    result = fit_module.TrainResult.from_dict(json.loads((run_dir / RESULT_FILE).read_text()))

    def save(folder: Path) -> None:
        for item in (run_dir / ADAPTER_DIR).iterdir():
            shutil.copy2(item, folder / item.name)
        plot_study(study, folder / PLOT_FILE)

    sweep = sweep_record(study, study_name, result.config, refit=None)
    return fit_module.publish(result, save, extra={"sweep": sweep})


def publish_refit(study: Any, study_name: str, settings: FitConfig) -> Path:
    """Train the best trial's settings at the refit length in a run folder of its own and
    publish that adapter as a version whose manifest holds the sweep."""
    result, trainer, _ = fit_module.train(settings)

    def save(folder: Path) -> None:
        trainer.model.save_pretrained(str(folder))
        plot_study(study, folder / PLOT_FILE)

    refit = {"trial": study.best_trial.number, "max_steps": settings.max_steps,
             "epochs": settings.epochs, "run_dir": str(result.run_dir)}
    sweep = sweep_record(study, study_name, result.config, refit)
    return fit_module.publish(result, save, extra={"sweep": sweep})


def format_table(rows: list[dict[str, Any]]) -> str:
    """The manifest's trial table as aligned text: one column per field, '-' where empty."""
    columns = list(dict.fromkeys(["trial", "state", "value", "last_step",
                                  *(key for row in rows for key in row)]))

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    headers = ["val_loss" if c == "value" else c for c in columns]
    cells = [headers, *([cell(row.get(c)) for c in columns] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True))
                     .rstrip() for line in cells)


# --------------------------------------------------------------------------------------- cli


@dataclass(frozen=True)
class Length:
    """How long a fit trains, as FitConfig reads it: max_steps > 0 wins, -1 trains epochs."""

    max_steps: int
    epochs: float

    def __post_init__(self) -> None:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be > 0 or -1 (use epochs), got {self.max_steps!r}")
        if self.max_steps == -1 and self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}")

    @classmethod
    def of(cls, config: FitConfig) -> Length:
        return cls(config.max_steps, config.epochs)

    def apply(self, config: FitConfig) -> FitConfig:
        # Epochs count only without max_steps; otherwise the config's own stay on record.
        epochs = self.epochs if self.max_steps == -1 else config.epochs
        return dataclasses.replace(config, max_steps=self.max_steps, epochs=epochs)

    def __str__(self) -> str:
        if self.max_steps > 0:
            return f"{self.max_steps} step{'s' if self.max_steps > 1 else ''}"
        return f"{self.epochs:g} epochs"


def plain_fit_length(args: argparse.Namespace) -> Length:
    """What `trainer fit` with the sweep's settings but not its --max-steps and --epochs flags
    (which size the trials) trains for: --config, else the base's recommended settings, else
    the fit defaults."""
    from trainer.recommended import read_recommended

    from_yaml = read_yaml(args.config) if args.config else {}
    use = from_yaml.get("recommended", True) if args.recommended is None else args.recommended
    base = args.base or from_yaml.get("base")
    merged = {k: v for layer in (FIT_DEFAULTS, read_recommended(base) if use and base else {},
                                 from_yaml) for k, v in layer.items() if v is not None}
    return Length(int(merged["max_steps"]), float(merged["epochs"]))


def refit_length(args: argparse.Namespace, dims: list[Dimension]) -> Length | None:
    """The refit's length; None publishes the best trial's own adapter."""
    if args.refit_steps is not None:
        if args.refit_steps < 0:
            raise ValueError(f"--refit-steps must be >= 0, got {args.refit_steps}")
        return Length(args.refit_steps, FIT_DEFAULTS["epochs"]) if args.refit_steps else None
    if any(dim.name in ("max_steps", "epochs") for dim in dims):
        return None  # the space searches the length: the best trial's is the one chosen
    return plain_fit_length(args)


def best_settings(config: FitConfig, dims: list[Dimension], best: Any) -> FitConfig:
    """The best trial's fit settings; fixed settings of the space are not in trial.params."""
    fixed = {dim.name: dim.fixed for dim in dims if dim.choices is None and dim.low is None}
    return trial_config(config, {**fixed, **best.params})


def publish_result(study: Any, study_name: str, config: FitConfig, dims: list[Dimension],
            refit: Length | None) -> Path:
    """Refit the best settings at `refit` and publish that, or publish the best trial's own
    adapter when there is no refit or it would only repeat the trial."""
    best = study.best_trial
    print(f"best trial {best.number}: validation loss {best.value:.4f} "
          f"({fit_module._settings_line(best.params)})", flush=True)
    trained = best_settings(config, dims, best)
    settings = refit.apply(trained) if refit is not None else trained
    if settings == trained:
        print(f"publishing trial {best.number}'s adapter (trained for {Length.of(trained)})",
              flush=True)
        return publish_best(study, study_name)
    print(f"refitting trial {best.number}'s settings for {refit}", flush=True)
    version_dir = publish_refit(study, study_name, settings)
    loss = mf.read_manifest(version_dir)["metrics"].get("final_val_loss")
    if loss is not None:
        print(f"refit of trial {best.number}: validation loss {loss:.4f}", flush=True)
    return version_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    fit_module.add_arguments(parser)
    parser.add_argument("--space", type=Path, help="YAML search space (default: learning "
                        "rate 1e-4..1e-2 log, rank 8-64, alpha 16-64, dropout 0-0.1)")
    parser.add_argument("--trials", type=int, default=8, help="trials to finish in all (8)")
    parser.add_argument("--study", help="study name (default: --name); a rerun continues it")
    parser.add_argument("--refit-steps", type=int, metavar="N",
                        help="train the best settings for N steps and publish that (default: "
                        "as long as `trainer fit` without --max-steps/--epochs would); 0 "
                        "publishes the best trial's own adapter")


def sweep(config: FitConfig, dims: list[Dimension], trials: int, study_name: str,
          refit: Length | None) -> Path:
    import optuna

    if not config.has_validation:
        raise ValueError("a sweep compares validation losses: give --validation or --val-split")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(config, study_name, trials)
    remaining = trials - len(finished_trials(study))
    if remaining > 0:
        study.optimize(lambda trial: run_trial(trial, config, dims), n_trials=remaining,
                       catch=())
    else:
        print(f"study {study_name}: {trials} trials already finished", flush=True)
    if not any(t.value is not None for t in finished_trials(study)):
        raise ValueError(f"study {study_name}: every trial was pruned; widen the space")
    version_dir = publish_result(study, study_name, config, dims, refit)
    # Indented under a title, so that no table line reads like a trial's progress line.
    table = format_table(trial_table(study)).splitlines()
    print("\n".join([f"trials of study {study_name}:", *(f"  {line}" for line in table)]),
          flush=True)
    print(f"report: {version_dir / 'report.html'}", flush=True)
    return version_dir


def run(args: argparse.Namespace) -> int:
    """Exit codes as `trainer fit`: 0 published, 2 bad settings, space or data, 3 a trial's
    or the refit's training failed."""
    from common.data import DataError
    from trainer.recovery import UnstableTraining

    try:
        if args.resume:
            raise ValueError("trainer sweep continues its study by itself; drop --resume")
        if args.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {args.trials}")
        dims = parse_space(read_yaml(args.space) if args.space else DEFAULT_SPACE)
        config, _ = fit_module.resolve_config(args)
        refit = refit_length(args, dims)
        version_dir = sweep(config, dims, args.trials, args.study or config.name, refit)
    except (DataError, ValueError, OSError) as exc:
        print(f"trainer sweep: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except UnstableTraining as exc:
        print(f"trainer sweep: unstable training: {exc}", file=sys.stderr, flush=True)
        return 3
    except KeyboardInterrupt:
        print("trainer sweep: interrupted; run the same command to continue the study",
              file=sys.stderr, flush=True)
        return 130
    print(version_dir, flush=True)
    return 0
