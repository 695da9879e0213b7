"""Adapter resolution: references to versions, a key's scope, loads shared by their callers, the
engine's key and path, and the symlink re-check before anything is read."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.core import Executors
from server.core.resolve import AdapterResolver
from server.errors import (
    AdapterLoadError,
    IncompatibleAdapterError,
    NotFoundError,
    PermissionDeniedError,
)
from server.keys import ANONYMOUS
from tests.server.core.fakes import FakeEngine, FakeRegistry, api_key


def resolver_of(registry: FakeRegistry, executors: Executors,
                engine: FakeEngine | None = None) -> AdapterResolver:
    return AdapterResolver(registry, engine or FakeEngine(), executors)


def test_an_empty_reference_is_the_bare_base(executors: Executors) -> None:
    assert asyncio.run(resolver_of(FakeRegistry(), executors).resolve("")) is None


def test_a_known_reference_resolves_without_a_rescan(executors: Executors) -> None:
    registry = FakeRegistry("alpha@1", "alpha@2")
    resolver = resolver_of(registry, executors)
    assert asyncio.run(resolver.resolve("alpha@1")).key == "alpha@1"
    assert asyncio.run(resolver.resolve("alpha")).key == "alpha@2"
    assert registry.scans == 0


def test_an_unknown_reference_rescans_and_finds_a_new_version(executors: Executors) -> None:
    registry = FakeRegistry("alpha@1", "beta@1")
    del registry.seen["beta@1"]  # written since the last scan
    assert asyncio.run(resolver_of(registry, executors).resolve("beta@1")).key == "beta@1"
    assert registry.scans == 1


def test_an_alias_resolves_to_its_target(executors: Executors) -> None:
    registry = FakeRegistry("alpha@1", "alpha@2")
    registry.alias_table["prod"] = "alpha@1"
    assert asyncio.run(resolver_of(registry, executors).resolve("prod")).key == "alpha@1"


def test_an_unknown_reference_is_not_found_for_an_unscoped_key(executors: Executors) -> None:
    resolver = resolver_of(FakeRegistry("alpha@1"), executors)
    with pytest.raises(NotFoundError, match="nope@1"):
        asyncio.run(resolver.resolve_for(api_key("open"), "nope@1"))


def test_an_unservable_adapter_keeps_its_own_error_for_an_unscoped_key(
        executors: Executors) -> None:
    resolver = resolver_of(FakeRegistry(incompatible=("old@1",), broken=("bad@1",)), executors)
    with pytest.raises(IncompatibleAdapterError):
        asyncio.run(resolver.resolve_for(ANONYMOUS, "old@1"))
    with pytest.raises(AdapterLoadError, match="cannot be served"):
        asyncio.run(resolver.resolve_for(ANONYMOUS, "bad@1"))


def test_a_scoped_key_resolves_the_adapters_in_its_scope(executors: Executors) -> None:
    resolver = resolver_of(FakeRegistry("alpha@1", "beta@1"), executors)
    adapter = asyncio.run(resolver.resolve_for(api_key("acme", "alpha"), "alpha@1"))
    assert adapter is not None and adapter.key == "alpha@1"


def test_a_scope_is_checked_on_the_version_an_alias_points_to(executors: Executors) -> None:
    registry = FakeRegistry("alpha@1", "beta@1")
    registry.alias_table["prod"] = "beta@1"
    registry.alias_table["alpha-prod"] = "beta@1"  # named like the scope, pointing outside it
    acme = api_key("acme", "alpha*")
    resolver = resolver_of(registry, executors)
    for ref in ("prod", "alpha-prod"):
        with pytest.raises(PermissionDeniedError, match="not available to key 'acme'"):
            asyncio.run(resolver.resolve_for(acme, ref))
    registry.alias_table["prod"] = "alpha@1"
    assert asyncio.run(resolver.resolve_for(acme, "prod")).key == "alpha@1"


def test_a_scope_may_name_one_version(executors: Executors) -> None:
    resolver = resolver_of(FakeRegistry("alpha@1", "alpha@2"), executors)
    pinned = api_key("acme", "alpha@1")
    assert asyncio.run(resolver.resolve_for(pinned, "alpha@1")).key == "alpha@1"
    with pytest.raises(PermissionDeniedError):
        asyncio.run(resolver.resolve_for(pinned, "alpha"))  # the newest, alpha@2


@pytest.mark.parametrize("ref", ["beta@1", "nope@1", "old@1", "bad@1"])
def test_a_scoped_key_hears_one_answer_for_anything_outside_its_scope(
        executors: Executors, ref: str) -> None:
    """Outside the scope, missing, incompatible, unreadable: the same PERMISSION_DENIED, so a
    key learns nothing about other tenants' adapters."""
    registry = FakeRegistry("alpha@1", "beta@1", incompatible=("old@1",), broken=("bad@1",))
    acme = api_key("acme", "alpha")
    resolver = resolver_of(registry, executors)
    with pytest.raises(PermissionDeniedError) as refused:
        asyncio.run(resolver.resolve_for(acme, ref))
    assert str(refused.value) == (f"adapter {ref!r} is not available to key 'acme'; it may use: "
                                  "alpha")
    error = refused.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_the_bare_base_is_in_a_scope_only_when_named(executors: Executors) -> None:
    resolver = resolver_of(FakeRegistry("alpha@1"), executors)
    assert asyncio.run(resolver.resolve_for(api_key("base", "__base__"), "")) is None
    with pytest.raises(PermissionDeniedError, match="the bare base model is not available"):
        asyncio.run(resolver.resolve_for(api_key("acme", "alpha"), ""))


def test_the_engine_gets_no_key_and_no_path_for_the_bare_base(executors: Executors) -> None:
    registry = FakeRegistry("alpha@1")
    assert resolver_of(registry, executors).for_engine(None) == (None, None)
    assert registry.rechecked == []


def test_a_resident_adapter_is_named_without_a_recheck(executors: Executors) -> None:
    registry = FakeRegistry("alpha@1", outside=("alpha@1",))
    engine = FakeEngine()
    engine.load_adapter("alpha@1", Path("/nowhere"))
    adapter = registry.disk["alpha@1"]
    assert resolver_of(registry, executors, engine).for_engine(adapter) == (
        "alpha@1", adapter.path)
    assert registry.rechecked == []


def test_a_non_resident_adapter_is_rechecked_before_the_engine_reads_it(
        executors: Executors) -> None:
    registry = FakeRegistry("alpha@1", "beta@1", outside=("beta@1",))
    resolver = resolver_of(registry, executors)
    assert resolver.for_engine(registry.disk["alpha@1"])[0] == "alpha@1"
    with pytest.raises(AdapterLoadError, match="now points outside the adapters root"):
        resolver.for_engine(registry.disk["beta@1"])
    assert registry.rechecked == ["alpha@1", "beta@1"]


def test_concurrent_loads_of_one_version_share_one_read(executors: Executors) -> None:
    registry, engine = FakeRegistry("alpha@1"), FakeEngine()
    resolver = resolver_of(registry, executors, engine)
    adapter = registry.disk["alpha@1"]

    async def three() -> list[object]:
        return list(await asyncio.gather(*(resolver.ensure_loaded(adapter) for _ in range(3))))

    loaded = asyncio.run(three())
    assert engine.loads == ["alpha@1"] and registry.rechecked == ["alpha@1"]
    assert len({id(x) for x in loaded}) == 1 and loaded[0].load_seconds == 0.25


def test_a_finished_load_is_not_shared_with_a_later_one(executors: Executors) -> None:
    registry, engine = FakeRegistry("alpha@1"), FakeEngine()
    resolver = resolver_of(registry, executors, engine)
    adapter = registry.disk["alpha@1"]
    asyncio.run(resolver.ensure_loaded(adapter))
    asyncio.run(resolver.ensure_loaded(adapter))
    assert engine.loads == ["alpha@1", "alpha@1"]  # the engine answers a resident one itself


def test_a_waiter_cancelled_leaves_the_shared_load_to_the_others(executors: Executors) -> None:
    registry, engine = FakeRegistry("alpha@1"), FakeEngine()
    resolver = resolver_of(registry, executors, engine)
    adapter = registry.disk["alpha@1"]

    async def one_gives_up() -> object:
        first = asyncio.ensure_future(resolver.ensure_loaded(adapter))
        second = asyncio.ensure_future(resolver.ensure_loaded(adapter))
        await asyncio.sleep(0)  # both wait on the one load now
        first.cancel()
        return await second

    assert asyncio.run(one_gives_up()).key == "alpha@1"
    assert engine.loads == ["alpha@1"]


def test_a_version_now_outside_the_root_is_never_loaded(executors: Executors) -> None:
    registry, engine = FakeRegistry("alpha@1", outside=("alpha@1",)), FakeEngine()
    resolver = resolver_of(registry, executors, engine)
    adapter = registry.disk["alpha@1"]
    with pytest.raises(AdapterLoadError, match="outside the adapters root"):
        asyncio.run(resolver.ensure_loaded(adapter))
    assert engine.loads == []
    registry.outside.clear()  # put back below the root: nothing of the refusal remains
    assert asyncio.run(resolver.ensure_loaded(adapter)).key == "alpha@1"


def test_a_failed_load_of_a_deleted_version_answers_not_found(executors: Executors) -> None:
    registry = FakeRegistry("alpha@1", "alpha@2")
    adapter = registry.disk.pop("alpha@1")  # deleted since the scan: its directory is gone
    resolver = resolver_of(registry, executors, FakeEngine(error=AdapterLoadError("no file")))
    with pytest.raises(NotFoundError, match="alpha@1"):
        asyncio.run(resolver.ensure_loaded(adapter))
    assert registry.scans > 0  # the disk was read again before answering


def test_a_failed_load_of_a_version_still_on_disk_keeps_its_error(
        executors: Executors, tmp_path: Path) -> None:
    registry = FakeRegistry("alpha@1", root=tmp_path)
    adapter = registry.disk["alpha@1"]
    adapter.path.mkdir(parents=True)
    resolver = resolver_of(registry, executors, FakeEngine(error=AdapterLoadError("bad header")))
    with pytest.raises(AdapterLoadError, match="bad header"):
        asyncio.run(resolver.ensure_loaded(adapter))
    assert registry.scans == 0
