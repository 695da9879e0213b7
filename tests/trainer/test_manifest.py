"""Version directories: numbering, atomic publication, references and resumable runs."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from trainer import manifest as mf


def _publish(root: Path, name: str, marker: str) -> Path:
    staged = mf.staging_dir(root, name)
    (staged / "adapter_config.json").write_text(json.dumps({"marker": marker}))
    return mf.publish_version(staged, root, name, {"name": name, "marker": marker})


def test_versions_count_up_and_never_overwrite(tmp_path: Path) -> None:
    first = _publish(tmp_path, "a", "one")
    second = _publish(tmp_path, "a", "two")
    assert (first.name, second.name) == ("1", "2")
    assert json.loads((first / "adapter_config.json").read_text())["marker"] == "one"
    assert json.loads((second / "manifest.json").read_text())["version"] == 2
    assert not list((tmp_path / "a").glob(f"{mf.STAGING_PREFIX}*"))


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda i=i: results.append(_publish(tmp_path, "c", str(i))))
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(int(p.name) for p in results) == list(range(1, 9))
    markers = {json.loads((p / "manifest.json").read_text())["marker"] for p in results}
    assert markers == {str(i) for i in range(8)}


def test_a_version_taken_meanwhile_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "b" / "1").mkdir(parents=True)
    (tmp_path / "b" / "1" / "keep").write_text("x")
    assert _publish(tmp_path, "b", "new").name == "2"
    assert (tmp_path / "b" / "1" / "keep").read_text() == "x"


def test_resolve_ref(tmp_path: Path) -> None:
    _publish(tmp_path, "a", "one")
    _publish(tmp_path, "a", "two")
    assert mf.resolve_ref(tmp_path, "a@1") == tmp_path / "a" / "1"
    assert mf.resolve_ref(tmp_path, "a") == tmp_path / "a" / "2"
    with pytest.raises(FileNotFoundError):
        mf.resolve_ref(tmp_path, "a@9")
    with pytest.raises(ValueError):
        mf.resolve_ref(tmp_path, "a@latest")


def _checkpoint(run: Path, step: int) -> None:
    (run / f"checkpoint-{step}").mkdir()
    (run / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")


def test_resume_finds_the_newest_unfinished_run_and_its_last_checkpoint(tmp_path: Path) -> None:
    old = mf.new_run_dir(tmp_path, "a", "20260101T000000Z-old")
    _checkpoint(old, 2)
    mid = mf.new_run_dir(tmp_path, "a", "20260102T000000Z-mid")
    _checkpoint(mid, 2)
    _checkpoint(mid, 10)
    done = mf.new_run_dir(tmp_path, "a", "20260103T000000Z-done")
    _checkpoint(done, 4)
    mf.mark_run_finished(done, tmp_path / "a" / "1")
    mf.new_run_dir(tmp_path, "a", "20260104T000000Z-empty")  # no checkpoint yet
    assert mf.find_resumable_run(tmp_path, "a", "latest") == mid
    assert mf.last_checkpoint(mid) == mid / "checkpoint-10"
    assert mf.find_resumable_run(tmp_path, "a", "20260101T000000Z-old") == old
    with pytest.raises(FileNotFoundError):
        mf.find_resumable_run(tmp_path, "b", "latest")


def test_manifest_has_the_required_keys(tmp_path: Path) -> None:
    manifest = mf.build_manifest(
        name="a", base="/b", fingerprint="sha256:x", data={}, hyperparameters={"rank": 8},
        lora={}, metrics={}, curves={"train": [], "validation": []}, parent=None,
        wall_time_s=1.0, run_dir=tmp_path)
    assert {"name", "version", "base", "created", "libraries", "hyperparameters"} <= set(manifest)
    assert manifest["base"] == {"path_or_id": "/b", "fingerprint": "sha256:x"}


def test_a_half_written_checkpoint_is_skipped_on_resume(tmp_path) -> None:
    from trainer.manifest import last_checkpoint

    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
