"""Adapter registry: which adapter versions exist on disk, their aliases, and reference resolution.

Resolves "name" | "name@version" | alias to one immutable `<root>/<name>/<version>/` directory.
A bare "name" means the alias of that name when one exists (so promoting `support -> support@7`
moves every plain "support" request), otherwise the highest version on disk. Only directories
below the root are ever returned: references are checked against strict patterns (no path
separators, no "..", no NUL, no leading zeros, at most 128 characters), and a version directory,
or any file in it, that resolves outside the root through a symlink is not served. A version
whose files are missing or damaged is kept out of the served set with the reason, which the
error for a request naming it carries; the other adapters are not affected. Loading weights is
the engine's job; this module only reads manifests and keeps `<root>/aliases.json` and, beside
it, `<root>/alias_history.jsonl`: one JSON line per alias move (alias, target, previous, reason,
moved_at), written under the same lock as aliases.json so the history and the table agree.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.names import version_key
from server.errors import (
    AdapterLoadError,
    IncompatibleAdapterError,
    InvalidArgumentError,
    NotFoundError,
)

log = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
REQUIRED_FILES = ("adapter_config.json", WEIGHTS_FILE)
# Adapters made by `trainer fit` carry a manifest; plain PEFT adapters from elsewhere may not, and
# are then matched on adapter_config.json's base_model_name_or_path instead.
MANIFEST = "manifest.json"
PEFT_BASE_PREFIX = "peft-base:"
ALIASES_FILE = "aliases.json"
HISTORY_FILE = "alias_history.jsonl"
MAX_REASON_CHARS = 4096
# Used with fullmatch: a bare `$` would also accept a trailing newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION = re.compile(r"[1-9][0-9]{0,8}")
# Error messages quote what the caller sent; a megabyte name must not become a megabyte status.
_SHOWN_CHARS = 80


@dataclass(frozen=True)
class VersionRef:
    """An adapter version by name and number; `key` is `name@version`, how requests, aliases
    and the engine name it."""

    name: str
    version: int

    @property
    def key(self) -> str:
        return version_key(self.name, self.version)


@dataclass(frozen=True)
class AdapterVersion(VersionRef):
    """One adapter directory on disk and what its manifest says."""

    path: Path
    fingerprint: str
    compatible: bool
    created: str = ""
    rank: int = 0


@dataclass(frozen=True)
class Alias(VersionRef):
    """A name that points at one version (`target`, its key)."""

    alias: str

    @property
    def target(self) -> str:
        return self.key


@dataclass(frozen=True)
class AliasMove:
    """One line of the alias history: `previous` is "" when the alias was new."""

    alias: str
    target: str
    previous: str
    reason: str
    moved_at: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> AliasMove:
        """Raises ValueError for anything but an object with the five string fields."""
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        values = {k: raw.get(k) for k in ("alias", "target", "previous", "reason", "moved_at")}
        bad = [k for k, v in values.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"fields {', '.join(bad)} are missing or not strings")
        return cls(**values)


def shown(value: str) -> str:
    """`value` quoted for an error message, cut to a readable length."""
    if len(value) <= _SHOWN_CHARS:
        return repr(value)
    return f"{value[:_SHOWN_CHARS]!r}... ({len(value)} characters)"


def check_name(value: str, what: str) -> str:
    """Adapter and alias names: letters, digits, '.', '_', '-'; never a path component trick."""
    if not _NAME.fullmatch(value) or ".." in value:
        raise InvalidArgumentError(
            f"{what} {shown(value)} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '..')"
        )
    return value


def parse_ref(ref: str) -> tuple[str, int | None]:
    """Split "name" or "name@version" into its parts, rejecting anything path-like."""
    name, sep, version = ref.partition("@")
    check_name(name, "adapter name")
    if not sep:
        return name, None
    if not _VERSION.fullmatch(version):
        raise InvalidArgumentError(
            f"adapter reference {shown(ref)} has a bad version {shown(version)}: use name@N "
            "with N a whole number >= 1"
        )
    return name, int(version)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise AdapterLoadError(f"{path / MANIFEST} is unreadable: {e}") from e
    if not isinstance(manifest, dict):
        raise AdapterLoadError(f"{path / MANIFEST} is not a JSON object")
    return manifest


def _manifest_fingerprint(manifest: dict[str, Any]) -> str:
    base = manifest.get("base")
    return str(base.get("fingerprint", "")) if isinstance(base, dict) else ""


def _peft_base_name(path: Path) -> str:
    """adapter_config.json's base_model_name_or_path ('' when absent or unreadable)."""
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterLoadError(f"{path / 'adapter_config.json'} is unreadable: {e}") from e
    name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return name if isinstance(name, str) else ""


def same_base_name(recorded: str, served: str) -> bool:
    """A PEFT config names its base by path or hub id; equal ids or equal final path parts match."""
    if not recorded or not served:
        return False
    return recorded == served or Path(recorded).name == Path(served.rstrip("/")).name


def _lora_rank(path: Path) -> int:
    """The LoRA rank from adapter_config.json, 0 when it cannot be read (listing only)."""
    try:
        rank = json.loads((path / "adapter_config.json").read_text()).get("r", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return rank if isinstance(rank, int) else 0


class AdapterRegistry:
    """Thread-safe view of `<root>`; rescans the disk when asked for something it does not know."""

    def __init__(self, root: Path, base_fingerprint: str, base_id: str = "") -> None:
        self.root = Path(root).resolve()
        self.base_fingerprint = base_fingerprint
        self.base_id = base_id
        self._lock = threading.RLock()
        self._versions: dict[str, dict[int, AdapterVersion]] = {}
        self._problems: dict[str, str] = {}
        self._aliases: dict[str, Alias] = {}
        if not self.root.is_dir():
            raise NotFoundError(f"adapters root {self.root} is not a directory")
        self.scan()

    # ------------------------------------------------------------------ disk scan

    def _inside_root(self, path: Path) -> bool:
        """True when `path` (symlinks followed) stays below the root."""
        try:
            path.resolve().relative_to(self.root)
        except (OSError, ValueError):
            return False
        return True

    def check_still_inside(self, version: AdapterVersion) -> None:
        """Re-check just before a load that the files read then are still below the root: a
        file swapped for a symlink since the last scan would otherwise be followed."""
        outside = [f for f in REQUIRED_FILES if not self._inside_root(version.path / f)]
        if outside:
            raise AdapterLoadError(f"{version.path}: {', '.join(outside)} now points outside "
                                   f"the adapters root {self.root}; it is not read")

    def _scan_version(self, name: str, entry: Path) -> AdapterVersion | None:
        key = version_key(name, int(entry.name))
        if not self._inside_root(entry):
            self._problems[key] = f"{entry} points outside the adapters root {self.root}"
            return None
        outside = [f for f in (*REQUIRED_FILES, MANIFEST)
                   if (entry / f).exists() and not self._inside_root(entry / f)]
        if outside:
            self._problems[key] = (f"{entry}: {', '.join(outside)} points outside the adapters "
                                   f"root {self.root}")
            return None
        missing = [f for f in REQUIRED_FILES if not (entry / f).is_file()]
        if missing:
            self._problems[key] = f"{entry} is incomplete: missing {', '.join(missing)}"
            others = sorted(p.name for p in entry.glob("adapter_model.*"))
            if WEIGHTS_FILE in missing and others:
                self._problems[key] += (f" (found {', '.join(others)}; only safetensors weights "
                                        "are read, never pickle files such as .bin)")
            return None
        try:
            if (entry / MANIFEST).is_file():
                manifest = _read_manifest(entry)
                fingerprint = _manifest_fingerprint(manifest)
                compatible = fingerprint == self.base_fingerprint
            else:
                manifest = {}
                recorded = _peft_base_name(entry)
                fingerprint = PEFT_BASE_PREFIX + recorded
                compatible = same_base_name(recorded, self.base_id)
        except AdapterLoadError as e:
            self._problems[key] = str(e)
            return None
        return AdapterVersion(
            name=name, version=int(entry.name), path=entry.resolve(), fingerprint=fingerprint,
            compatible=compatible, created=str(manifest.get("created", "")),
            rank=_lora_rank(entry),
        )

    def _scan_adapters(self) -> None:
        versions: dict[str, dict[int, AdapterVersion]] = {}
        self._problems = {}
        for adapter_dir in sorted(self.root.iterdir()):
            if not adapter_dir.is_dir() or not _NAME.fullmatch(adapter_dir.name):
                continue
            for entry in sorted(adapter_dir.iterdir()):
                if entry.is_dir() and _VERSION.fullmatch(entry.name):
                    found = self._scan_version(adapter_dir.name, entry)
                    if found is not None:
                        versions.setdefault(found.name, {})[found.version] = found
        new = {version_key(n, v) for n in versions for v in versions[n]} - {
            version_key(n, v) for n in self._versions for v in self._versions[n]}
        if new:
            log.info("adapters found under %s: %s", self.root, ", ".join(sorted(new)))
        self._versions = versions

    def _scan_aliases(self) -> None:
        path = self.root / ALIASES_FILE
        if not path.exists():
            self._aliases = {}
            return
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            # Keep the last good table rather than dropping every alias on a bad edit.
            log.error("cannot read %s (%s); keeping the previous aliases", path, e)
            return
        aliases: dict[str, Alias] = {}
        for alias, target in (raw.items() if isinstance(raw, dict) else []):
            try:
                name, version = parse_ref(str(target))
                check_name(str(alias), "alias")
            except InvalidArgumentError as e:
                log.warning("ignoring alias %r in %s: %s", alias, path, e)
                continue
            if version is None:
                log.warning("ignoring alias %r in %s: target needs a version", alias, path)
                continue
            aliases[alias] = Alias(name, version, alias)
        self._aliases = aliases

    def scan(self) -> None:
        """Re-read every adapter directory and the alias file."""
        with self._lock:
            self._scan_adapters()
            self._scan_aliases()

    # ------------------------------------------------------------------ lookups

    def _find(self, name: str, version: int | None) -> AdapterVersion | None:
        if version is None:
            alias = self._aliases.get(name)
            if alias is not None:
                return self._versions.get(alias.name, {}).get(alias.version)
            versions = self._versions.get(name)
            return versions[max(versions)] if versions else None
        return self._versions.get(name, {}).get(version)

    def _known(self) -> str:
        keys = [v.key for vs in self._versions.values() for v in vs.values()]
        aliases = [f"{a.alias} -> {a.target}" for a in self._aliases.values()]
        known = ", ".join(keys) if keys else "none"
        if aliases:
            known += "; aliases: " + ", ".join(aliases)
        return known

    def _not_found(self, ref: str, name: str, version: int | None) -> Exception:
        key = version_key(name, version) if version is not None else None
        if key in self._problems:
            return AdapterLoadError(f"adapter {ref!r} cannot be served: {self._problems[key]}")
        broken = sorted(k for k in self._problems if k.partition("@")[0] == name)
        if version is None and name not in self._aliases and broken:
            reasons = "; ".join(f"{k}: {self._problems[k]}" for k in broken)
            return AdapterLoadError(f"adapter {ref!r} has no servable version: {reasons}")
        alias = self._aliases.get(name) if version is None else None
        if alias is not None:
            return NotFoundError(
                f"alias {name!r} points to {alias.target}, which is not on disk; "
                f"adapters available: {self._known()}"
            )
        return NotFoundError(
            f"adapter {shown(ref)} not found; adapters available: {self._known()}")

    def _check(self, found: AdapterVersion, require_compatible: bool) -> AdapterVersion:
        if require_compatible and not found.compatible:
            if found.fingerprint.startswith(PEFT_BASE_PREFIX):
                raise IncompatibleAdapterError(
                    f"adapter {found.key} has no manifest.json and its adapter_config.json names "
                    f"base {found.fingerprint.removeprefix(PEFT_BASE_PREFIX)!r}, but this server "
                    f"serves {self.base_id!r}; add a manifest.json with base.fingerprint "
                    f"{self.base_fingerprint} if it really was trained on this base"
                )
            raise IncompatibleAdapterError(
                f"adapter {found.key} was trained on base {found.fingerprint or '(none recorded)'}"
                f" but this server serves base {self.base_fingerprint}"
            )
        return found

    def lookup(self, ref: str) -> AdapterVersion | None:
        """Resolve from memory only (no disk access); None when a rescan would be needed."""
        name, version = parse_ref(ref)
        with self._lock:
            found = self._find(name, version)
        return self._check(found, True) if found is not None else None

    def resolve(self, ref: str, *, require_compatible: bool = True) -> AdapterVersion:
        """Resolve a reference to a compatible adapter directory, rescanning once if unknown."""
        name, version = parse_ref(ref)
        with self._lock:
            found = self._find(name, version)
            if found is None:
                self.scan()
                found = self._find(name, version)
            if found is None:
                raise self._not_found(ref, name, version)
        return self._check(found, require_compatible)

    def versions(self) -> list[AdapterVersion]:
        """Every adapter version on disk (compatible or not), sorted by name then version."""
        with self._lock:
            self.scan()
            return [self._versions[n][v] for n in sorted(self._versions)
                    for v in sorted(self._versions[n])]

    def aliases(self) -> list[Alias]:
        with self._lock:
            return [self._aliases[a] for a in sorted(self._aliases)]

    # ------------------------------------------------------------------ aliases

    def _write_aliases(self, aliases: dict[str, Alias]) -> None:
        """Write aliases.json so a reader sees the old file or the new one, never half of one."""
        payload = json.dumps({a: v.target for a, v in sorted(aliases.items())}, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=".aliases.", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.root / ALIASES_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _append_history(self, move: AliasMove) -> int:
        """Append one line and fsync it; returns the file size before, to undo the append."""
        path = self.root / HISTORY_FILE
        with path.open("a", encoding="utf-8") as handle:
            size = handle.tell()
            handle.write(json.dumps(move.to_dict(), sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return size

    def _undo_history(self, size: int) -> None:
        with (self.root / HISTORY_FILE).open("r+b") as handle:
            handle.truncate(size)
            os.fsync(handle.fileno())

    def set_alias(self, alias: str, target: str, reason: str = "") -> tuple[Alias, str]:
        """Point `alias` at a concrete version and record the move with `reason`; returns the
        new alias and the previous target ("" when the alias is new)."""
        check_name(alias, "alias")
        if not target:
            raise InvalidArgumentError("target is empty: give name@version (or a name/alias)")
        if len(reason) > MAX_REASON_CHARS:
            raise InvalidArgumentError(
                f"reason has {len(reason)} characters; at most {MAX_REASON_CHARS} are allowed")
        resolved = self.resolve(target)
        with self._lock:
            self._scan_aliases()
            previous = self._aliases.get(alias)
            updated = dict(self._aliases)
            updated[alias] = Alias(resolved.name, resolved.version, alias)
            move = AliasMove(alias, resolved.key, previous.target if previous else "", reason,
                             datetime.now(UTC).isoformat(timespec="milliseconds"))
            # History first, like a write-ahead log: a move that took effect is never missing
            # from it. If the table cannot be written, the line is cut off again.
            size = self._append_history(move)
            try:
                self._write_aliases(updated)
            except BaseException:
                self._undo_history(size)
                raise
            self._aliases = updated
        log.info("alias %s -> %s (was %s)", alias, resolved.key,
                 previous.target if previous else "unset")
        return updated[alias], move.previous

    def _read_history(self) -> list[AliasMove]:
        path = self.root / HISTORY_FILE
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        moves = []
        for number, line in enumerate(lines, start=1):
            try:
                moves.append(AliasMove.from_dict(json.loads(line)))
            except ValueError as e:
                # One damaged line (a hand edit) must not hide every other move.
                log.warning("ignoring %s:%d: %s", path, number, e)
        return moves

    def history(self, alias: str = "") -> list[AliasMove]:
        """Every recorded move of `alias` ("" = of every alias), oldest first."""
        if alias:
            check_name(alias, "alias")
        with self._lock:
            moves = self._read_history()
        return [m for m in moves if not alias or m.alias == alias]

    def aliases_of(self, key: str) -> list[str]:
        with self._lock:
            return sorted(a.alias for a in self._aliases.values() if a.target == key)
