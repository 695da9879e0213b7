"""API keys as tenants: who a key is (`Caller`), what it may use, and the files keys come from.

A key is known by a `key_id` derived from its SHA-256 digest ("k-" and 16 hex digits), never by
the key itself: sessions store that id as their owner, logs and the audit trail show the key's
name. Keys come from the settings (the environment: fixed for the life of the process) and from
files, which are re-read on SIGHUP (server/app.py):

- `--api-keys-file` / `--admin-keys-file`: one key per line ('#' comments); such a key is named
  `api-<id>` / `admin-<id>`, has no scope and no limits (as before tenants existed);
- `--keys-file`: TOML, one `[[keys]]` table per key, with a name, the key (or its `sha256`), a
  kind, the adapters it may use and its limits:

      [[keys]]
      name = "acme"
      key = "..."                      # or sha256 = "<64 hex digits>" to keep it off the disk
      kind = "api"                     # or "admin"
      adapters = ["acme-*", "support"] # names, name@version or globs; "__base__" = the bare base
      max_in_flight = 4                # requests running at once (0 = no limit)
      requests_per_minute = 60         # token bucket on requests (0 = no limit)
      request_burst = 10               # bucket size (default: one minute's worth)
      tokens_per_minute = 20000        # token bucket on generated tokens (0 = no limit)
      token_burst = 2000

A key without `adapters` may use every adapter; scopes are matched against the adapter a
reference resolves to (aliases resolved first). Admin keys see and manage everything and take
no adapter scope. Transport-neutral: the gRPC edge (server/auth.py) and the HTTP edge both
identify callers with `KeyRing.authorize`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from common.names import BASE_NAME, version_key
from server.errors import PermissionDeniedError, UnauthenticatedError

AUTHORIZATION_METADATA = "authorization"
API_KEY_METADATA = "x-api-key"
BEARER = "bearer "
HOW_TO_SEND = (f"send '{AUTHORIZATION_METADATA}: Bearer <key>' (or '{API_KEY_METADATA}: <key>') "
               "in the call metadata")
MIN_KEY_CHARS = 16
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ID_SALT = b"switchboard key id\0"
_TOML_FIELDS = frozenset({"name", "key", "sha256", "kind", "adapters", "max_in_flight",
                          "requests_per_minute", "request_burst", "tokens_per_minute",
                          "token_burst"})


class KeyKind(Enum):
    API = "api"
    ADMIN = "admin"


def digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison time independent of key lengths too.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def key_id_of(key_digest: bytes) -> str:
    """The stable, shareable id of a key: a salted hash of its digest, so it is neither the key
    nor the digest the server compares against."""
    return "k-" + hashlib.sha256(_ID_SALT + key_digest).hexdigest()[:16]


def presented_key(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The key the caller sent: the bearer token of `authorization`, else `x-api-key`."""
    bearer = plain = None
    for name, value in metadata or ():
        if not isinstance(value, str):
            continue  # binary (-bin) metadata never carries a key
        if name == AUTHORIZATION_METADATA and value[:len(BEARER)].lower() == BEARER:
            bearer = value[len(BEARER):].strip()
        elif name == API_KEY_METADATA:
            plain = value.strip()
    return bearer or plain or None


# ---------------------------------------------------------------- what a key may do

@dataclass(frozen=True)
class KeyLimits:
    """Per-key limits; 0 means no limit. A burst of 0 is one minute's worth of its rate."""

    max_in_flight: int = 0
    requests_per_minute: float = 0.0
    request_burst: int = 0
    tokens_per_minute: float = 0.0
    token_burst: int = 0

    def __post_init__(self) -> None:
        for name in ("max_in_flight", "request_burst", "token_burst"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0 = no limit), got {value!r}")
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if (not isinstance(value, int | float) or isinstance(value, bool)
                    or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a number >= 0 (0 = no limit), got {value!r}")

    @property
    def any(self) -> bool:
        return bool(self.max_in_flight or self.requests_per_minute or self.tokens_per_minute)


@dataclass(frozen=True)
class Caller:
    """Who made a call: the key's id and name, its kind, adapter scope and limits.

    `adapters` holds name / name@version globs; empty means every adapter. The anonymous caller
    (auth off) is an admin with the empty id: sessions it makes belong to no one.
    """

    key_id: str
    name: str
    kind: KeyKind
    adapters: tuple[str, ...] = ()
    limits: KeyLimits = field(default_factory=KeyLimits)

    @property
    def is_admin(self) -> bool:
        return self.kind is KeyKind.ADMIN

    @property
    def scoped(self) -> bool:
        return bool(self.adapters)

    def owns(self, owner: str) -> bool:
        """May this caller see a session whose owner is `owner` ("" = no one: admins only)?"""
        return self.is_admin or (bool(owner) and hmac.compare_digest(owner, self.key_id))

    def may_use(self, name: str | None, version: int | None = None) -> bool:
        """Is the resolved adapter `name`@`version` (None = the bare base) in scope?"""
        if not self.adapters:
            return True
        candidates = [BASE_NAME] if name is None else [name, version_key(name, version)]
        return any(fnmatchcase(c, p) for c in candidates for p in self.adapters)

    def out_of_scope(self, ref: str) -> PermissionDeniedError:
        """The one answer for an adapter outside the scope, existing or not."""
        what = f"adapter {ref!r}" if ref else "the bare base model"
        return PermissionDeniedError(
            f"{what} is not available to key {self.name!r}; it may use: "
            f"{', '.join(self.adapters)}")


ANONYMOUS = Caller(key_id="", name="anonymous", kind=KeyKind.ADMIN)


# ---------------------------------------------------------------- the configured keys

@dataclass(frozen=True, repr=False)
class KeySpec:
    """One configured key: its digest (the key itself is not kept) and who it is."""

    digest: bytes
    caller: Caller
    source: str = ""  # where it was configured, for messages

    def __repr__(self) -> str:
        return f"KeySpec({self.caller.name!r}, {self.caller.kind.value})"


def check_key_text(key: object, where: str) -> str:
    """The key, or ValueError saying what is wrong with it (never the key itself)."""
    if not (isinstance(key, str) and len(key) >= MIN_KEY_CHARS and key.isprintable()
            and not any(c.isspace() for c in key)):
        size = len(key) if isinstance(key, str) else "?"
        raise ValueError(f"{where}: keys must be printable, at least {MIN_KEY_CHARS} characters "
                         f"and without spaces (got a key of {size} characters)")
    return key


def plain_spec(key: str, kind: KeyKind, where: str) -> KeySpec:
    """An unnamed, unscoped key from a plain list: named after its kind and id."""
    key_digest = digest(check_key_text(key, where))
    key_id = key_id_of(key_digest)
    return KeySpec(key_digest, Caller(key_id, f"{kind.value}-{key_id[2:10]}", kind), where)


def read_key_lines(path: Path) -> tuple[str, ...]:
    """Keys from a plain file: one per line, '#' starts a comment."""
    keys = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return tuple(dict.fromkeys(k for k in keys if k))


def _toml_digest(entry: dict[str, Any], where: str) -> bytes:
    if ("key" in entry) == ("sha256" in entry):
        raise ValueError(f"{where}: give exactly one of key or sha256")
    if "key" in entry:
        return digest(check_key_text(entry["key"], f"{where}: key"))
    hex_digest = entry["sha256"]
    if not (isinstance(hex_digest, str) and re.fullmatch(r"[0-9a-fA-F]{64}", hex_digest)):
        raise ValueError(f"{where}: sha256 must be 64 hex digits (sha256sum of the key)")
    return bytes.fromhex(hex_digest)


def _toml_adapters(entry: dict[str, Any], kind: KeyKind, where: str) -> tuple[str, ...]:
    adapters = entry.get("adapters", [])
    if not (isinstance(adapters, list) and all(isinstance(a, str) and a.strip()
                                                for a in adapters)):
        raise ValueError(f"{where}: adapters must be a list of adapter names or globs, "
                         f"got {adapters!r}")
    if adapters and kind is KeyKind.ADMIN:
        raise ValueError(f"{where}: an admin key manages every adapter; adapters (a scope) is "
                         "for api keys only")
    return tuple(a.strip() for a in adapters)


def _toml_spec(entry: Any, where: str) -> KeySpec:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be a table with name and key")
    unknown = sorted(set(entry) - _TOML_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(sorted(_TOML_FIELDS))}")
    name = entry.get("name")
    if not (isinstance(name, str) and NAME_PATTERN.fullmatch(name)):
        raise ValueError(f"{where}: name must be 1-64 letters, digits, '.', '_' or '-', "
                         f"got {name!r}")
    where = f"{where} ({name})"
    try:
        kind = KeyKind(entry.get("kind", "api"))
    except ValueError:
        raise ValueError(f"{where}: kind must be 'api' or 'admin', got {entry['kind']!r}") from None
    limit_fields = {k: v for k, v in entry.items() if k in KeyLimits.__dataclass_fields__}
    try:
        limits = KeyLimits(**limit_fields)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    key_digest = _toml_digest(entry, where)
    caller = Caller(key_id_of(key_digest), name, kind, _toml_adapters(entry, kind, where), limits)
    return KeySpec(key_digest, caller, where)


def read_keys_toml(path: Path) -> tuple[KeySpec, ...]:
    """The `[[keys]]` tables of a TOML keys file, or ValueError naming the file and the entry."""
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"keys file {path} is not valid TOML: {e}") from None
    entries = document.get("keys", [])
    extra = sorted(set(document) - {"keys"})
    if extra or not isinstance(entries, list):
        raise ValueError(f"keys file {path}: expected only [[keys]] tables, found "
                         f"{', '.join(extra) or type(entries).__name__}")
    return tuple(_toml_spec(entry, f"keys file {path}, keys[{i}]")
                 for i, entry in enumerate(entries))


def check_distinct(specs: Sequence[KeySpec]) -> tuple[KeySpec, ...]:
    """The specs, unless a key appears twice with different identities or two keys share a name
    (which would make the audit trail and the metrics ambiguous)."""
    by_digest: dict[bytes, KeySpec] = {}
    names: dict[str, KeySpec] = {}
    for spec in specs:
        seen = by_digest.get(spec.digest)
        if seen is not None and seen.caller != spec.caller:
            raise ValueError(f"the same key is configured twice, in {seen.source} and in "
                             f"{spec.source}; a key has one identity")
        named = names.get(spec.caller.name)
        if named is not None and named.caller.key_id != spec.caller.key_id:
            raise ValueError(f"two different keys are named {spec.caller.name!r}, in "
                             f"{named.source} and in {spec.source}; names must be unique")
        by_digest[spec.digest] = spec
        names[spec.caller.name] = spec
    return tuple(by_digest.values())


@dataclass(frozen=True)
class KeySources:
    """Where the keys come from: plain keys fixed for the process (settings, environment) and
    files re-read on every reload."""

    api_keys: tuple[str, ...] = field(default=(), repr=False)
    admin_keys: tuple[str, ...] = field(default=(), repr=False)
    api_keys_file: Path | None = None
    admin_keys_file: Path | None = None
    keys_file: Path | None = None

    @property
    def any(self) -> bool:
        return bool(self.api_keys or self.admin_keys or self.api_keys_file
                    or self.admin_keys_file or self.keys_file)

    def _plain(self, keys: Iterable[str], kind: KeyKind, where: str) -> list[KeySpec]:
        return [plain_spec(k, kind, where) for k in keys]

    def load(self) -> tuple[KeySpec, ...]:
        """Every configured key, or ValueError naming the file and what is wrong in it."""
        specs = self._plain(self.api_keys, KeyKind.API, "api key")
        specs += self._plain(self.admin_keys, KeyKind.ADMIN, "admin key")
        try:
            for path, kind in ((self.api_keys_file, KeyKind.API),
                               (self.admin_keys_file, KeyKind.ADMIN)):
                if path is not None:
                    specs += self._plain(read_key_lines(path), kind, f"{kind.value} keys file "
                                                                     f"{path}")
            if self.keys_file is not None:
                specs += read_keys_toml(self.keys_file)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read a keys file: {e}") from e
        return check_distinct(specs)


# ---------------------------------------------------------------- checking a presented key

class AuthRejected(Exception):
    """A call the key ring refused: `reason` for the log, `error` for the caller."""

    def __init__(self, reason: str, error: PermissionDeniedError | UnauthenticatedError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


@dataclass(frozen=True, repr=False)
class KeyRing:
    """The configured keys (as digests) and their identities; `repr` shows counts only."""

    _entries: tuple[KeySpec, ...]

    @classmethod
    def of(cls, api_keys: Sequence[str], admin_keys: Sequence[str]) -> KeyRing:
        return cls(KeySources(tuple(api_keys), tuple(admin_keys)).load())

    def __repr__(self) -> str:
        return f"KeyRing({len(self._entries)} keys)"

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def callers(self) -> tuple[Caller, ...]:
        return tuple(spec.caller for spec in self._entries)

    def identify(self, key: str) -> Caller | None:
        """The caller `key` belongs to, or None. Every configured key is compared, whatever
        matched before, so the time taken says nothing about which one."""
        presented = digest(key)
        found = None
        for spec in self._entries:
            if hmac.compare_digest(presented, spec.digest):
                found = spec.caller
        return found

    def kind_of(self, key: str) -> KeyKind | None:
        caller = self.identify(key)
        return None if caller is None else caller.kind

    def authorize(self, key: str | None, needed: KeyKind | None, what: str,
                  admin_only_for: str = "") -> Caller | None:
        """The caller of `key` when it may call `what` (which needs `needed`; None = open, and
        then the result is None); AuthRejected otherwise. Transport-neutral: the gRPC and HTTP
        edges both call it. `admin_only_for` names what non-admin keys may call instead."""
        if needed is None:
            return None
        if key is None:
            raise AuthRejected("no key", UnauthenticatedError(
                f"{what} needs an API key: {HOW_TO_SEND}"))
        caller = self.identify(key)
        if caller is None:
            raise AuthRejected("unknown key", UnauthenticatedError(
                f"the key sent with {what} is not a valid key: {HOW_TO_SEND}"))
        if needed is KeyKind.ADMIN and not caller.is_admin:
            allowed = f"; this key may only call {admin_only_for}" if admin_only_for else ""
            raise AuthRejected("wrong kind", PermissionDeniedError(
                f"{what} needs an admin key{allowed}"))
        return caller


class LiveKeys:
    """The key ring in force, swapped whole on reload: a call sees the old ring or the new one,
    never a mix, and a key removed by a reload is refused from the next call on."""

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring

    def swap(self, ring: KeyRing) -> KeyRing:
        """Put `ring` in force; returns the ring it replaced."""
        previous, self.ring = self.ring, ring
        return previous

    def authorize(self, key: str | None, needed: KeyKind | None, what: str,
                  admin_only_for: str = "") -> Caller | None:
        return self.ring.authorize(key, needed, what, admin_only_for)

    def identify(self, key: str | None) -> Caller | None:
        return None if key is None else self.ring.identify(key)


__all__ = ["ANONYMOUS", "HOW_TO_SEND", "AuthRejected", "Caller", "KeyKind",
           "KeyLimits", "KeyRing", "KeySources", "KeySpec", "LiveKeys", "key_id_of",
           "presented_key"]
