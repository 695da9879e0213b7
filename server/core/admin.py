"""Adapter and session administration: load, unload, list, alias; read and delete sessions.

Loads and unloads wait on the slow pool; listings, aliases and session store calls on the chat
pool. A session is read or deleted by an admin key (every one) or by the key that owns it
(others answer as absent, so a key learns nothing of another's sessions).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from server.adapters import AdapterVersion, Alias, AliasMove
from server.core.components import InferenceCore
from server.core.history import SESSIONS_OFF, check_owner, session_not_found, stored_count
from server.core.record import current_record
from server.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from server.keys import ANONYMOUS, Caller
from server.sessions import Session, SessionInfo


@dataclass(frozen=True)
class AdapterStatus:
    """One adapter version as listed: what is on disk merged with what the engine holds."""

    name: str
    version: int
    loaded: bool
    aliases: tuple[str, ...] = ()
    compatible: bool = False
    base_fingerprint: str = ""
    created: str = ""
    rank: int = 0
    memory_bytes: int = 0
    in_flight: int = 0


@dataclass(frozen=True)
class LoadOutcome:
    """A loaded adapter's listing row and how long the load took."""

    adapter: AdapterStatus
    load_seconds: float


def adapter_status(version: AdapterVersion | None, key: str, loaded: Any,
                   aliases: list[str]) -> AdapterStatus:
    """`version` is None for an adapter the engine holds but the disk no longer has; `loaded`
    (the engine's LoadedAdapterInfo) is None when not loaded. A loaded rank wins."""
    name, _, number = key.partition("@")
    status = AdapterStatus(name=name, version=int(number or 0), loaded=loaded is not None,
                           aliases=tuple(aliases))
    if version is not None:
        status = replace(status, compatible=version.compatible,
                         base_fingerprint=version.fingerprint, created=version.created,
                         rank=version.rank)
    if loaded is not None:
        status = replace(status, memory_bytes=loaded.memory_bytes, in_flight=loaded.in_flight,
                         rank=loaded.rank)
    return status


@dataclass(frozen=True)
class AdapterListing:
    """Every adapter version on disk, and the aliases that point at them."""

    adapters: list[AdapterStatus]
    aliases: list[Alias]


def _key_order(key: str) -> tuple[str, int]:
    name, _, number = key.partition("@")
    return name, int(number or 0)


def _required(value: str, field_name: str) -> str:
    value = value.strip()
    if not value:
        raise InvalidArgumentError(f"{field_name} is empty: give name, name@version or an alias")
    return value


class AdapterAdmin:
    """Load, unload, list and alias adapters."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core
        self.registry = core.registry
        self.engine = core.engine

    def _status(self, key: str) -> AdapterStatus:
        try:
            version = self.registry.resolve(key, require_compatible=False)
        except NotFoundError:
            version = None
        return adapter_status(version, key, self.engine.loaded_adapters().get(key),
                              self.registry.aliases_of(key))

    async def load(self, ref: str) -> LoadOutcome:
        quick = self.core.executors.quick
        adapter = await quick(self.registry.resolve, _required(ref, "adapter"))
        loaded = await self.core.resolver.ensure_loaded(adapter)
        return LoadOutcome(await quick(self._status, adapter.key), loaded.load_seconds)

    def _unload(self, ref: str) -> AdapterStatus:
        """Refuses (AdapterInUseError) while requests hold the adapter; never waits for them."""
        ref = _required(ref, "adapter")
        loaded = self.engine.loaded_adapters()
        try:
            key = self.registry.resolve(ref, require_compatible=False).key
        except NotFoundError:
            if ref not in loaded:
                raise
            key = ref  # deleted from disk while resident: its memory is still freed by its key
        if key not in loaded:
            held = ", ".join(sorted(loaded)) or "none"
            raise NotFoundError(f"adapter {key} is not loaded; loaded: {held}")
        status = self._status(key)
        self.engine.unload_adapter(key)
        return replace(status, loaded=False, memory_bytes=0, in_flight=0)

    async def unload(self, ref: str) -> AdapterStatus:
        return await self.core.executors.slow_work(self._unload, ref)

    def _list(self) -> AdapterListing:
        versions = {v.key: v for v in self.registry.versions()}
        loaded = self.engine.loaded_adapters()
        rows = [adapter_status(versions.get(key), key, loaded.get(key),
                               self.registry.aliases_of(key))
                for key in sorted(set(versions) | set(loaded), key=_key_order)]
        return AdapterListing(rows, self.registry.aliases())

    async def list(self) -> AdapterListing:
        return await self.core.executors.quick(self._list)

    async def set_alias(self, alias: str, target: str, reason: str = "") -> tuple[Alias, str]:
        """The moved alias and its previous target ("" when new); the move joins the history."""
        return await self.core.executors.quick(
            self.registry.set_alias, _required(alias, "alias"), target.strip(), reason)

    async def history(self, alias: str) -> list[AliasMove]:
        return await self.core.executors.quick(self.registry.history, alias.strip())


class SessionAdmin:
    """Read and delete stored conversations, as the caller may see them."""

    def __init__(self, core: InferenceCore, caller: Caller = ANONYMOUS) -> None:
        if core.sessions is None:
            raise FailedPreconditionError(SESSIONS_OFF)
        self.store = core.sessions
        self.quick = core.executors.quick
        self.caller = caller

    @property
    def _owner(self) -> str | None:
        """The owner filter of the store's list and delete: None (every owner) for admins."""
        return None if self.caller.is_admin else self.caller.key_id

    async def get(self, session_id: str) -> Session:
        stored = await self.quick(self.store.get, session_id)
        if check_owner(session_id, stored, self.caller) is None:
            raise session_not_found(session_id)
        return stored

    async def list(self, limit: int) -> list[SessionInfo]:
        return await self.quick(self.store.list, limit, self._owner)

    async def delete(self, session_id: str) -> bool:
        """True when deleted; False for a session that does not exist and for another key's
        (the same answer, so it tells nothing)."""
        def delete() -> tuple[bool, int | None]:
            return self.store.delete(session_id, self._owner), stored_count(self.store)

        deleted, count = await self.quick(delete)
        current_record().sessions_stored = count
        return deleted
