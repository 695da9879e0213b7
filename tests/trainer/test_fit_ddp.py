"""`trainer fit` on two ranks under `accelerate launch` (DDP over gloo on the CPU): one version,
published by the main process only, its manifest counting both ranks' data shards, and the loss
curve of one process training the same global batch.

`accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (its multi-CPU
mode means MPI with a hostfile), so the ranks are started the way a GPU node starts them,
`--multi_gpu --num_processes 2`, with no GPU visible: each rank then joins a gloo group on the
CPU. Same data, seed and steps in both runs: rank r takes batches r, r+2, ... of the sampler the
single process takes whole, so each step sees the same 8 conversations.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed
from conftest import free_port, head_lines, run_trainer

ROOT = Path(__file__).resolve().parents[2]
ROWS, STEPS, PER_RANK_BATCH, RANKS = 32, 4, 4, 2
FLAGS = ["--max-steps", str(STEPS), "--max-length", "128", "--learning-rate", "3e-3",
         "--dropout", "0", "--seed", "0", "--logging-steps", "1", "--eval-steps", "2",
         "--save-steps", "1000", "--name", "ddp"]


@pytest.fixture(scope="module")
def data(bundled_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    work = tmp_path_factory.mktemp("ddp-data")
    train = head_lines(bundled_data / "it_helpdesk" / "train.jsonl", work / "train.jsonl", ROWS)
    val = head_lines(bundled_data / "it_helpdesk" / "validation.jsonl", work / "val.jsonl", 16)
    return ["--data", str(train), "--validation", str(val)]


@pytest.fixture(scope="module")
def two_ranks(tiny_base: Path, data: list[str], tmp_path_factory: pytest.TempPathFactory):
    """The DDP run: (adapters root, completed process)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend: the two-rank fit is NOT tested")
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert launcher, "accelerate's launcher is missing from the venv (pip install -e .)"
    root = tmp_path_factory.mktemp("ddp") / "adapters"
    argv = [launcher, "launch", "--multi_gpu", "--num_processes", str(RANKS), "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()),
            "-m", "trainer.cli", "fit", "--base", str(tiny_base), *data,
            "--adapters-root", str(root), "--batch-size", str(PER_RANK_BATCH), *FLAGS]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return root, done


@pytest.fixture(scope="module")
def one_process(tiny_base: Path, data: list[str], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("single") / "adapters"
    code, out = run_trainer(["fit", "--base", str(tiny_base), *data, "--adapters-root",
                             str(root), "--batch-size", str(PER_RANK_BATCH * RANKS), *FLAGS])
    assert code == 0, out
    return json.loads((root / "ddp" / "1" / "manifest.json").read_text())


def test_two_ranks_publish_one_version_from_the_main_process(two_ranks) -> None:
    root, done = two_ranks
    assert sorted(p.name for p in (root / "ddp").iterdir() if not p.name.startswith(".")) == ["1"]
    # Only rank 0 prints the version line; both ranks trained (each says how it threads).
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == str(root / "ddp" / "1") and lines.count(lines[-1]) == 1
    assert (done.stdout + done.stderr).count("threads:") == RANKS
    runs = list((root / "ddp" / ".runs").iterdir())
    assert len(runs) == 1  # one run folder shared by both ranks
    assert json.loads((runs[0] / "run.json").read_text())["status"] == "finished"


def test_the_manifest_counts_every_ranks_shard(two_ranks) -> None:
    manifest = json.loads((two_ranks[0] / "ddp" / "1" / "manifest.json").read_text())
    ranks = manifest["data"]["ranks"]
    assert [r["rank"] for r in ranks] == list(range(RANKS))
    assert [r["rows_per_epoch"] for r in ranks] == [ROWS // RANKS] * RANKS
    assert sum(r["rows_per_epoch"] for r in ranks) == manifest["data"]["train"]["conversations"]
    assert manifest["metrics"]["global_step"] == STEPS


def test_the_loss_curve_matches_one_process_on_the_same_global_batch(two_ranks,
                                                                     one_process) -> None:
    ddp = json.loads((two_ranks[0] / "ddp" / "1" / "manifest.json").read_text())
    assert "ranks" not in one_process["data"]
    curves = [{p["step"]: p["loss"] for p in m["curves"]["train"]} for m in (ddp, one_process)]
    assert sorted(curves[0]) == sorted(curves[1]) == list(range(1, STEPS + 1))
    for step in curves[1]:
        print(f"step {step}: two ranks {curves[0][step]:.4f} one process {curves[1][step]:.4f}")
        # The Trainer normalizes each rank's loss by the trained tokens of all ranks, so the
        # curves agree up to the order of float sums (measured here: to 4 decimals).
        assert curves[0][step] == pytest.approx(curves[1][step], rel=0.01)
    val = [m["metrics"]["final_val_loss"] for m in (ddp, one_process)]
    assert val[0] == pytest.approx(val[1], rel=0.01)
