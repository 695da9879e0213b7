"""Adapter directories on disk: version allocation, run folders, references and manifest.json.

Layout under an adapters root:
    <root>/<name>/<version>/        immutable: adapter_config.json, adapter_model.safetensors,
                                    manifest.json (versions 1, 2, 3 ...; never overwritten)
    <root>/<name>/.runs/<run-id>/   one training run: config.json, checkpoint-<step>/,
                                    tensorboard/, run.json ({"status", "version"})
A version appears atomically: it is written in a hidden staging folder, its number is claimed
with an exclusive mkdir, and the staging folder is renamed onto the claimed (empty) name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RUNS_DIR = ".runs"
STAGING_PREFIX = ".staging-"


def existing_versions(name_dir: Path) -> list[int]:
    """Version numbers present under <root>/<name>, ascending."""
    if not name_dir.is_dir():
        return []
    return sorted(int(p.name) for p in name_dir.iterdir() if p.is_dir() and p.name.isdigit())


def resolve_ref(root: Path, ref: str) -> Path:
    """`name@version` (or `name` for its newest version) -> the version directory."""
    name, _, version = ref.partition("@")
    name_dir = root / name
    if not version:
        versions = existing_versions(name_dir)
        if not versions:
            raise FileNotFoundError(f"adapter {name!r} has no versions under {root}")
        version = str(versions[-1])
    if not version.isdigit():
        raise ValueError(f"adapter reference must be NAME@VERSION, got {ref!r}")
    path = name_dir / version
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter {name}@{version} not found under {root}")
    return path


def read_manifest(version_dir: Path) -> dict[str, Any]:
    path = version_dir / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def new_run_dir(root: Path, name: str, run_id: str | None = None) -> Path:
    """Create <root>/<name>/.runs/<run-id>/; the id sorts by start time."""
    run_id = run_id or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    path = root / name / RUNS_DIR / run_id
    path.mkdir(parents=True, exist_ok=False)
    write_json_atomic(path / "run.json", {"status": "running", "version": None})
    return path


def _checkpoint_complete(path: Path) -> bool:
    """transformers writes trainer_state.json last, but not atomically: a kill can cut it."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoint-N folders of a run as (N, path), oldest first (a half-written
    one is skipped)."""
    return sorted(
        (int(p.name.split("-")[1]), p) for p in run_dir.glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and _checkpoint_complete(p)
    )


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint-N of a run."""
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def find_resumable_run(root: Path, name: str, resume: str) -> Path:
    """`resume` is "latest" (newest unfinished run of `name` with a checkpoint) or a run path."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            path = root / name / RUNS_DIR / resume
        if last_checkpoint(path) is None:
            raise FileNotFoundError(f"--resume {resume}: no checkpoint in {path}")
        return path
    runs_dir = root / name / RUNS_DIR
    candidates = sorted(runs_dir.iterdir(), reverse=True) if runs_dir.is_dir() else []
    for run in candidates:
        status = json.loads((run / "run.json").read_text()).get("status") if (
            run / "run.json").is_file() else "running"
        if status != "finished" and last_checkpoint(run) is not None:
            return run
    raise FileNotFoundError(f"--resume: no interrupted run with a checkpoint under {runs_dir}")


def mark_run_finished(run_dir: Path, version_dir: Path) -> None:
    write_json_atomic(run_dir / "run.json", {"status": "finished", "version": version_dir.name})


def staging_dir(root: Path, name: str) -> Path:
    path = root / name / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def publish_version(staged: Path, root: Path, name: str, manifest: dict[str, Any]) -> Path:
    """Claim the next free version number and move `staged` there; never overwrites.

    The exclusive mkdir is the claim (two writers cannot both create N); the rename then swaps
    the finished content onto the claimed empty directory in one step.
    """
    name_dir = root / name
    while True:
        versions = existing_versions(name_dir)
        version = (versions[-1] + 1) if versions else 1
        target = name_dir / str(version)
        try:
            target.mkdir()
        except FileExistsError:
            continue
        write_json_atomic(staged / "manifest.json", {**manifest, "version": version})
        os.rename(staged, target)
        return target


def discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate",
                    "datasets", "switchboard"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out


def build_manifest(
    *, name: str, base: str, fingerprint: str, data: dict[str, Any],
    hyperparameters: dict[str, Any],
    lora: dict[str, Any], metrics: dict[str, Any], curves: dict[str, list[dict[str, float]]],
    parent: dict[str, Any] | None, wall_time_s: float, run_dir: Path,
) -> dict[str, Any]:
    """The manifest.json content (the version number is added when the version is claimed)."""
    return {
        "name": name,
        "version": None,
        "base": {"path_or_id": base, "fingerprint": fingerprint},
        "created": datetime.now(UTC).isoformat(),
        "parent": parent,
        "data": data,
        "hyperparameters": hyperparameters,
        "lora": lora,
        "metrics": metrics,
        "curves": curves,
        "libraries": library_versions(),
        "wall_time_s": round(wall_time_s, 2),
        "run_dir": str(run_dir),
    }
