"""`trainer fit` killed with SIGKILL mid-run, then rerun with `--resume`: the second process
continues from the run's last checkpoint instead of starting over, and publishes version 1.

Both are real processes, forked from the test zygote (tests/server_zygote.py), which has torch
and transformers loaded already."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from conftest import forked_trainer, head_lines

from trainer import manifest as mf

DOMAIN = "it_helpdesk"
NAME = "killed"
RUN_ID = "kill-resume"
MAX_STEPS = 12
# Long enough for a model load on 2 busy cores plus the first checkpoint.
CHECKPOINT_TIMEOUT_S = 120.0
# One intra-op thread: on 2 cores shared with other jobs, OpenMP's spinning worker threads made
# a step of this tiny model ~25x slower (3 s instead of 0.1 s).
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _complete_checkpoint_step(run_dir: Path) -> int | None:
    """Step of the newest checkpoint whose trainer_state.json (written last) parses."""
    checkpoint = mf.last_checkpoint(run_dir) if run_dir.is_dir() else None
    if checkpoint is None:
        return None
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None  # still being written
    return int(checkpoint.name.split("-")[1])


def _event_steps(events_file: Path) -> list[int]:
    """Global steps at which this TensorBoard events file logged a training loss."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sorted(
        event.step for event in EventFileLoader(str(events_file)).Load()
        for value in event.summary.value if value.tag in ("train/loss", "loss")
    )


def test_sigkill_then_resume_continues_from_the_checkpoint(
    tiny_base: Path, bundled_data: Path, tmp_path: Path
) -> None:
    data = head_lines(bundled_data / DOMAIN / "train.jsonl", tmp_path / "train.jsonl", 40)
    root = tmp_path / "adapters"
    command = [
        "fit", "--base", str(tiny_base), "--data", str(data),
        "--name", NAME, "--adapters-root", str(root), "--run-id", RUN_ID,
        "--max-steps", str(MAX_STEPS), "--save-steps", "2", "--batch-size", "2",
        "--max-length", "64", "--rank", "4", "--alpha", "8", "--learning-rate", "1e-3",
        "--logging-steps", "1", "--val-split", "0", "--device", "cpu", "--seed", "7",
        "--no-recommended",
    ]
    run_dir = root / NAME / mf.RUNS_DIR / RUN_ID

    first = forked_trainer(command, tmp_path / "first.out", tmp_path / "first.err", CHILD_ENV)
    try:
        deadline = time.monotonic() + CHECKPOINT_TIMEOUT_S
        step = None
        while first.poll() is None and time.monotonic() < deadline:
            step = _complete_checkpoint_step(run_dir)
            if step is not None and step >= 2:
                break
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        code = first.wait(timeout=30)
    first_log = (tmp_path / "first.out").read_text() + (tmp_path / "first.err").read_text()
    assert code == -signal.SIGKILL, f"first run was not killed (rc {code}):\n{first_log}"
    assert step is not None and step >= 2, f"no checkpoint within the timeout:\n{first_log}"

    assert mf.existing_versions(root / NAME) == [], "a killed run published a version"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    resume_step = _complete_checkpoint_step(run_dir)
    assert resume_step is not None and 2 <= resume_step < MAX_STEPS
    events_before = set((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    out, err = tmp_path / "second.out", tmp_path / "second.err"
    second_code = forked_trainer([*command, "--resume"], out, err, CHILD_ENV).wait(timeout=300)
    second_out = out.read_text()
    assert second_code == 0, second_out + err.read_text()
    lines = second_out.strip().splitlines()
    version_dir = root / NAME / "1"
    assert lines[-1] == str(version_dir)
    assert f"resuming from {run_dir / f'checkpoint-{resume_step}'}" in second_out

    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["metrics"]["global_step"] == MAX_STEPS
    assert Path(manifest["run_dir"]) == run_dir
    # The checkpoint carries the log history of steps 1..N; the second process adds the rest.
    assert [p["step"] for p in manifest["curves"]["train"]] == list(range(1, MAX_STEPS + 1))
    assert json.loads((run_dir / "run.json").read_text()) == {"status": "finished",
                                                                "version": "1"}
    # What the second process itself trained: its own events file logs only steps N+1..max.
    new_events = set((run_dir / "tensorboard").glob("events.out.tfevents.*")) - events_before
    assert len(new_events) == 1
    assert _event_steps(new_events.pop()) == list(range(resume_step + 1, MAX_STEPS + 1))
    assert (version_dir / "adapter_model.safetensors").is_file()
