"""Adapter registry: reference resolution, aliases, compatibility, path safety and rescans."""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from server.adapters import AdapterRegistry, parse_ref
from server.errors import (
    AdapterLoadError,
    IncompatibleAdapterError,
    InvalidArgumentError,
    NotFoundError,
)

BASE = "sha256:base"


def make_adapter(root: Path, name: str, version: int, fingerprint: str = BASE,
                 files: tuple[str, ...] = ("adapter_config.json", "adapter_model.safetensors")
                 ) -> Path:
    """A directory with the right file names; the registry reads only the manifest and config."""
    out = root / name / str(version)
    out.mkdir(parents=True)
    for f in files:
        (out / f).write_text(json.dumps({"r": 8}) if f.endswith(".json") else "x")
    manifest = {"name": name, "version": version, "created": "2026-01-01T00:00:00+00:00",
                "base": {"path_or_id": "tiny", "fingerprint": fingerprint}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    make_adapter(tmp_path, "alpha", 1)
    make_adapter(tmp_path, "alpha", 2)
    make_adapter(tmp_path, "alpha", 10)
    make_adapter(tmp_path, "beta", 1)
    make_adapter(tmp_path, "foreign", 1, fingerprint="sha256:other")
    return tmp_path


def test_name_resolves_to_highest_version_numerically(root: Path) -> None:
    registry = AdapterRegistry(root, BASE)
    assert registry.resolve("alpha").key == "alpha@10"
    assert registry.resolve("alpha@2").key == "alpha@2"
    assert registry.resolve("alpha@2").path == (root / "alpha" / "2").resolve()
    assert registry.resolve("beta").rank == 8


def test_alias_wins_over_the_same_bare_name_and_persists_atomically(root: Path) -> None:
    registry = AdapterRegistry(root, BASE)
    alias, previous = registry.set_alias("alpha", "alpha@1")
    assert (alias.target, previous) == ("alpha@1", "")
    assert registry.resolve("alpha").key == "alpha@1"
    assert registry.resolve("alpha@2").key == "alpha@2"  # explicit versions bypass the alias
    _, previous = registry.set_alias("prod", "alpha")  # a name target pins the concrete version
    assert registry.resolve("prod").key == "alpha@1"
    _, previous = registry.set_alias("prod", "beta@1")
    assert previous == "alpha@1"
    assert json.loads((root / "aliases.json").read_text()) == {"alpha": "alpha@1",
                                                                "prod": "beta@1"}
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    # A fresh registry (a restarted server) reads the same aliases.
    assert AdapterRegistry(root, BASE).resolve("prod").key == "beta@1"


def test_concurrent_alias_moves_leave_a_valid_file(root: Path) -> None:
    registry = AdapterRegistry(root, BASE)
    targets = ["alpha@1", "alpha@2", "alpha@10", "beta@1"]

    def flip(i: int) -> None:
        for j in range(20):
            registry.set_alias("live", targets[(i + j) % len(targets)])

    threads = [threading.Thread(target=flip, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = json.loads((root / "aliases.json").read_text())
    assert stored["live"] in targets
    assert registry.resolve("live").key == stored["live"]
    # The history was written under the same lock: every move, chained, ending at the table.
    moves = registry.history("live")
    assert len(moves) == 80 and moves[0].previous == ""
    assert all(m.previous == before.target for before, m in zip(moves, moves[1:], strict=False))
    assert moves[-1].target == stored["live"]


def test_alias_moves_are_recorded_with_reason_and_previous(root: Path) -> None:
    registry = AdapterRegistry(root, BASE)
    registry.set_alias("prod", "alpha@1", reason="first release")
    registry.set_alias("canary", "beta")
    registry.set_alias("prod", "alpha@2", reason='{"who": "ci"}')
    lines = (root / "alias_history.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[2]) == {"alias": "prod", "target": "alpha@2", "previous": "alpha@1",
                                    "reason": '{"who": "ci"}',
                                    "moved_at": json.loads(lines[2])["moved_at"]}
    first, canary, second = registry.history()
    assert (first.target, first.previous, first.reason) == ("alpha@1", "", "first release")
    assert (canary.alias, canary.target, canary.reason) == ("canary", "beta@1", "")
    assert datetime.fromisoformat(second.moved_at).utcoffset() == timedelta(0)
    assert first.moved_at <= canary.moved_at <= second.moved_at
    # Filtered by alias, and read back the same by a restarted server.
    assert [m.target for m in AdapterRegistry(root, BASE).history("prod")] == ["alpha@1",
                                                                              "alpha@2"]
    assert registry.history("nosuch") == []
    with pytest.raises(InvalidArgumentError, match="alias"):
        registry.history("../prod")
    with pytest.raises(InvalidArgumentError, match="reason"):
        registry.set_alias("prod", "beta@1", reason="x" * 5000)


def test_history_and_table_agree_when_the_table_write_fails(root: Path, monkeypatch) -> None:
    registry = AdapterRegistry(root, BASE)
    registry.set_alias("prod", "alpha@1", reason="ok")
    before = (root / "alias_history.jsonl").read_bytes()

    def broken(aliases: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(registry, "_write_aliases", broken)
    with pytest.raises(OSError, match="disk full"):
        registry.set_alias("prod", "beta@1", reason="lost")
    assert (root / "alias_history.jsonl").read_bytes() == before
    assert registry.resolve("prod").key == "alpha@1"


def test_a_damaged_history_line_hides_only_itself(root: Path) -> None:
    registry = AdapterRegistry(root, BASE)
    registry.set_alias("prod", "alpha@1")
    with (root / "alias_history.jsonl").open("a") as fh:
        fh.write('{"alias": "prod", "target"\n["not", "a move"]\n')
    registry.set_alias("prod", "beta@1")
    assert [m.target for m in registry.history("prod")] == ["alpha@1", "beta@1"]


def test_unknown_names_what_exists(root: Path) -> None:
    registry = AdapterRegistry(root, BASE)
    with pytest.raises(NotFoundError) as info:
        registry.resolve("gamma")
    assert "gamma" in str(info.value) and "alpha@1" in str(info.value)
    assert "beta@1" in str(info.value)
    with pytest.raises(NotFoundError, match="alpha@3"):
        registry.resolve("alpha@3")


def test_foreign_base_is_refused_naming_both_fingerprints(root: Path) -> None:
    registry = AdapterRegistry(root, BASE)
    with pytest.raises(IncompatibleAdapterError) as info:
        registry.resolve("foreign")
    assert "sha256:other" in str(info.value) and BASE in str(info.value)
    listed = {v.key: v.compatible for v in registry.versions()}
    assert listed["foreign@1"] is False and listed["alpha@1"] is True
    with pytest.raises(IncompatibleAdapterError):
        registry.set_alias("bad", "foreign@1")


@pytest.mark.parametrize("ref", ["../alpha", "/etc/passwd", "alpha/1", "alpha@0", "alpha@x",
                                 "alpha@-1", "..", "", "a..b", "alpha@1@2"])
def test_path_like_references_are_invalid(root: Path, ref: str) -> None:
    with pytest.raises(InvalidArgumentError):
        AdapterRegistry(root, BASE).resolve(ref)
    with pytest.raises(InvalidArgumentError):
        parse_ref(ref)


def test_symlink_escaping_the_root_is_not_served(root: Path, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    real = make_adapter(outside, "evil", 1)
    (root / "evil").mkdir()
    os.symlink(real, root / "evil" / "1")
    (root / "alpha" / "3").mkdir()
    make_adapter(outside, "leak", 1)
    for f in ("adapter_config.json", "manifest.json"):
        (root / "alpha" / "3" / f).write_text((root / "alpha" / "1" / f).read_text())
    os.symlink(outside / "leak" / "1" / "adapter_model.safetensors",
               root / "alpha" / "3" / "adapter_model.safetensors")
    registry = AdapterRegistry(root, BASE)
    with pytest.raises(AdapterLoadError, match="outside"):
        registry.resolve("evil@1")
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors"):
        registry.resolve("alpha@3")
    assert registry.resolve("alpha").key == "alpha@10"


def test_incomplete_directory_says_what_is_missing(root: Path) -> None:
    make_adapter(root, "half", 1, files=("adapter_config.json",))
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors"):
        AdapterRegistry(root, BASE).resolve("half@1")


def test_new_trainer_output_appears_without_restart(root: Path) -> None:
    registry = AdapterRegistry(root, BASE)
    with pytest.raises(NotFoundError):
        registry.resolve("gamma")
    make_adapter(root, "gamma", 1)
    assert registry.resolve("gamma").key == "gamma@1"
    make_adapter(root, "alpha", 11)
    assert registry.resolve("alpha@11").key == "alpha@11"


def test_alias_to_missing_version_is_not_found(root: Path) -> None:
    (root / "aliases.json").write_text(json.dumps({"gone": "alpha@99", "bad": "../x"}))
    registry = AdapterRegistry(root, BASE)
    with pytest.raises(NotFoundError, match="alpha@99"):
        registry.resolve("gone")
    assert [a.alias for a in registry.aliases()] == ["gone"]


def test_missing_root_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="not a directory"):
        AdapterRegistry(tmp_path / "nope", BASE)


def test_real_fixture_adapters_are_compatible_with_the_tiny_base(
        adapters_root: Path, tiny_base: Path) -> None:
    from common.modeling import base_fingerprint

    registry = AdapterRegistry(adapters_root, base_fingerprint(str(tiny_base)))
    assert [v.key for v in registry.versions()] == ["alpha@1", "alpha@2", "beta@1"]
    assert registry.resolve("beta").rank == 4


def _plain_peft_adapter(root: Path, name: str, base_name: str) -> Path:
    """A PEFT adapter as another tool saves it: no manifest.json, the base named in its config."""
    out = root / name / "1"
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(
        json.dumps({"r": 8, "base_model_name_or_path": base_name}))
    (out / "adapter_model.safetensors").write_text("x")
    return out


def test_plain_peft_adapter_naming_the_served_base_is_served(root: Path) -> None:
    _plain_peft_adapter(root, "external", "/elsewhere/models/tiny-base")
    registry = AdapterRegistry(root, BASE, base_id="/srv/models/tiny-base")
    found = registry.resolve("external")
    assert found.key == "external@1" and found.compatible


def test_plain_peft_adapter_for_another_base_is_refused_with_a_fix(root: Path) -> None:
    _plain_peft_adapter(root, "external", "meta-llama/Llama-3.1-8B")
    registry = AdapterRegistry(root, BASE, base_id="/srv/models/tiny-base")
    with pytest.raises(IncompatibleAdapterError) as refused:
        registry.resolve("external@1")
    message = str(refused.value)
    assert "meta-llama/Llama-3.1-8B" in message and "/srv/models/tiny-base" in message
    assert "manifest.json" in message and BASE in message
