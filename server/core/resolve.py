"""Adapter resolution for a request: reference -> version, the key's scope, loads, engine keys.

A scoped key hears the same PERMISSION_DENIED for an adapter outside its scope as for one that
does not resolve (or cannot be served), so it learns nothing about other tenants' adapters;
aliases are resolved before the check. Explicit loads of one version share one read, and a
version about to be read (by a load or by the engine for a waiting request) is re-checked below
the adapters root first, so a directory swapped for a symlink since the scan is never followed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from server.adapters import AdapterRegistry, AdapterVersion
from server.core.executors import Executors
from server.errors import AdapterLoadError, FailedPreconditionError, NotFoundError
from server.keys import Caller


class AdapterResolver:
    """Resolves references, loads versions once, and names them for the engine."""

    def __init__(self, registry: AdapterRegistry, engine: Any, executors: Executors) -> None:
        self.registry = registry
        self.engine = engine
        self.executors = executors
        self._loading: dict[str, asyncio.Future[Any]] = {}

    async def resolve(self, ref: str) -> AdapterVersion | None:
        """Known references resolve in memory; unknown ones rescan the disk in a worker."""
        if not ref:
            return None
        found = self.registry.lookup(ref)
        return found if found is not None else await self.executors.quick(
            self.registry.resolve, ref)

    async def resolve_for(self, caller: Caller, ref: str) -> AdapterVersion | None:
        """`ref` resolved for `caller`, within its scope (see the module docstring)."""
        if not caller.scoped:
            return await self.resolve(ref)
        try:
            adapter = await self.resolve(ref)
        except (NotFoundError, FailedPreconditionError, AdapterLoadError):
            raise caller.out_of_scope(ref) from None
        allowed = (caller.may_use(None) if adapter is None
                   else caller.may_use(adapter.name, adapter.version))
        if not allowed:
            raise caller.out_of_scope(ref)
        return adapter

    def for_engine(self, adapter: AdapterVersion | None) -> tuple[str | None, Path | None]:
        """The engine's key and path for `adapter`. The engine reads a non-resident adapter
        itself while the request waits, so its files are re-checked below the root first."""
        if adapter is None:
            return None, None
        if not self.engine.is_loaded(adapter.key):
            self.registry.check_still_inside(adapter)
        return adapter.key, adapter.path

    async def ensure_loaded(self, adapter: AdapterVersion) -> Any:
        """Load `adapter` on the slow pool; concurrent callers share one load."""
        pending = self._loading.get(adapter.key)
        if pending is None:
            self.registry.check_still_inside(adapter)
            pending = asyncio.ensure_future(self.executors.slow_work(
                self.engine.load_adapter, adapter.key, adapter.path))
            self._loading[adapter.key] = pending
            pending.add_done_callback(lambda _: self._loading.pop(adapter.key, None))
        try:
            return await asyncio.shield(pending)
        except AdapterLoadError:
            await self.explain_load_failure(adapter)
            raise

    async def explain_load_failure(self, adapter: AdapterVersion) -> None:
        """After a failed load: when the version was deleted since the last scan, rescan and
        raise NOT_FOUND listing what exists, instead of a server path that is gone."""
        if adapter.path.is_dir():
            return
        await self.executors.quick(self.registry.scan)
        await self.executors.quick(self.registry.resolve, adapter.key)
