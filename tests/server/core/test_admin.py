"""Administration: adapters loaded, unloaded, listed and aliased; sessions read, listed and
deleted as the calling key may see them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from common.conversation import Message
from server.adapter_cache import LoadedAdapterInfo
from server.adapters import AdapterVersion, Alias
from server.core import AdapterAdmin, AdapterStatus, CallRecord, SessionAdmin, recording
from server.core.admin import adapter_status
from server.core.history import SESSIONS_OFF
from server.errors import (
    AdapterInUseError,
    FailedPreconditionError,
    IncompatibleAdapterError,
    InvalidArgumentError,
    NotFoundError,
    SessionStoreError,
)
from server.keys import ANONYMOUS, Caller
from tests.server.core.fakes import (
    LOADED_RANK,
    FakeEngine,
    FakeRegistry,
    MemorySessions,
    admin_key,
    api_key,
    make_core,
)

ALICE, BOB = api_key("alice"), api_key("bob")
ON_DISK = AdapterVersion("alpha", 3, Path("/nowhere/alpha/3"), "fp", True, "2024-05-01", 4)
RESIDENT = LoadedAdapterInfo(rank=8, memory_bytes=2048, in_flight=2, last_used=0.0)


def admin_of(registry: FakeRegistry, engine: FakeEngine | None = None) -> AdapterAdmin:
    return AdapterAdmin(make_core(engine or FakeEngine(), registry))


# ---------------------------------------------------------------- adapter_status


def test_a_version_on_disk_is_listed_from_its_manifest() -> None:
    assert adapter_status(ON_DISK, "alpha@3", None, ["prod"]) == AdapterStatus(
        name="alpha", version=3, loaded=False, aliases=("prod",), compatible=True,
        base_fingerprint="fp", created="2024-05-01", rank=4)


def test_a_loaded_version_shows_the_engines_rank_memory_and_requests() -> None:
    status = adapter_status(ON_DISK, "alpha@3", RESIDENT, [])
    assert status.loaded and status.rank == 8
    assert (status.memory_bytes, status.in_flight) == (2048, 2)
    assert status.created == "2024-05-01"


def test_a_version_the_engine_holds_but_the_disk_lost_is_listed_by_its_key() -> None:
    status = adapter_status(None, "gone@2", RESIDENT, [])
    assert (status.name, status.version, status.loaded) == ("gone", 2, True)
    assert not status.compatible and status.base_fingerprint == ""


# ---------------------------------------------------------------- AdapterAdmin


def test_a_load_resolves_the_reference_and_reports_the_loaded_version() -> None:
    registry, engine = FakeRegistry("alpha@1", "alpha@2"), FakeEngine()
    registry.alias_table["prod"] = "alpha@1"
    outcome = asyncio.run(admin_of(registry, engine).load(" prod "))
    assert engine.loads == ["alpha@1"] and registry.rechecked == ["alpha@1"]
    assert outcome.load_seconds == 0.25
    assert outcome.adapter == AdapterStatus(
        name="alpha", version=1, loaded=True, aliases=("prod",), compatible=True,
        base_fingerprint="fp", rank=LOADED_RANK, memory_bytes=1024)


def test_a_blank_reference_is_an_invalid_argument() -> None:
    engine = FakeEngine()
    admin = admin_of(FakeRegistry("alpha@1"), engine)
    for call in (admin.load, admin.unload):
        with pytest.raises(InvalidArgumentError) as refused:
            asyncio.run(call("  "))
        assert str(refused.value) == "adapter is empty: give name, name@version or an alias"
    assert engine.loads == []


def test_an_incompatible_or_unknown_adapter_is_not_loaded() -> None:
    engine = FakeEngine()
    admin = admin_of(FakeRegistry(incompatible=("old@1",)), engine)
    with pytest.raises(IncompatibleAdapterError):
        asyncio.run(admin.load("old@1"))
    with pytest.raises(NotFoundError, match="nope@1"):
        asyncio.run(admin.load("nope@1"))
    assert engine.loads == []


def test_an_unload_frees_the_version_and_reports_it_unloaded() -> None:
    registry, engine = FakeRegistry("alpha@1"), FakeEngine()
    registry.alias_table["prod"] = "alpha@1"
    engine.loaded["alpha@1"] = LoadedAdapterInfo(LOADED_RANK, 1024, 0, 0.0)
    status = asyncio.run(admin_of(registry, engine).unload("prod"))
    assert engine.loaded == {}
    assert status == AdapterStatus(name="alpha", version=1, loaded=False, aliases=("prod",),
                                   compatible=True, base_fingerprint="fp", rank=LOADED_RANK)


def test_unloading_a_version_that_is_not_loaded_names_the_loaded_ones() -> None:
    registry, engine = FakeRegistry("alpha@1", "beta@1", "gamma@1"), FakeEngine()
    admin = admin_of(registry, engine)
    with pytest.raises(NotFoundError) as refused:
        asyncio.run(admin.unload("alpha@1"))
    assert str(refused.value) == "adapter alpha@1 is not loaded; loaded: none"
    engine.loaded = {"gamma@1": RESIDENT, "beta@1": RESIDENT}
    with pytest.raises(NotFoundError) as refused:
        asyncio.run(admin.unload("alpha@1"))
    assert str(refused.value) == "adapter alpha@1 is not loaded; loaded: beta@1, gamma@1"


def test_a_version_in_use_is_not_unloaded() -> None:
    registry, engine = FakeRegistry("alpha@1"), FakeEngine()
    engine.loaded["alpha@1"] = RESIDENT  # two requests hold it
    with pytest.raises(AdapterInUseError, match="in use by 2 request"):
        asyncio.run(admin_of(registry, engine).unload("alpha@1"))
    assert "alpha@1" in engine.loaded


def test_a_loaded_version_deleted_from_disk_can_still_be_unloaded() -> None:
    registry, engine = FakeRegistry("alpha@1"), FakeEngine()
    engine.loaded["alpha@1"] = LoadedAdapterInfo(LOADED_RANK, 1024, 0, 0.0)
    del registry.disk["alpha@1"]
    admin = admin_of(registry, engine)
    listed = asyncio.run(admin.list()).adapters
    assert [(s.name, s.version, s.loaded) for s in listed] == [("alpha", 1, True)]
    status = asyncio.run(admin.unload("alpha@1"))
    assert not status.loaded and engine.loaded == {}


def test_the_listing_merges_the_disk_and_the_engine_in_version_order() -> None:
    registry, engine = FakeRegistry("beta@1", "alpha@10", "alpha@2"), FakeEngine()
    registry.alias_table.update(prod="alpha@10", canary="alpha@10", old="beta@1")
    engine.loaded = {"alpha@2": RESIDENT, "gone@1": RESIDENT}  # gone@1: deleted from disk
    listing = asyncio.run(admin_of(registry, engine).list())
    rows = [(s.name, s.version, s.loaded, s.aliases, s.compatible) for s in listing.adapters]
    assert rows == [("alpha", 2, True, (), True), ("alpha", 10, False, ("canary", "prod"), True),
                    ("beta", 1, False, ("old",), True), ("gone", 1, True, (), False)]
    assert listing.aliases == [Alias("canary", "alpha", 10), Alias("old", "beta", 1),
                               Alias("prod", "alpha", 10)]


def test_an_alias_move_reports_the_previous_target_and_joins_the_history() -> None:
    registry = FakeRegistry("alpha@1", "alpha@2")
    admin = admin_of(registry)
    assert asyncio.run(admin.set_alias(" prod ", " alpha@1 ", "first")) == (
        Alias("prod", "alpha", 1), "")
    assert asyncio.run(admin.set_alias("prod", "alpha@2", "better")) == (
        Alias("prod", "alpha", 2), "alpha@1")
    moves = asyncio.run(admin.history(" prod "))
    assert [(m.target, m.previous, m.reason) for m in moves] == [
        ("alpha@1", "", "first"), ("alpha@2", "alpha@1", "better")]


def test_a_blank_alias_is_an_invalid_argument() -> None:
    registry = FakeRegistry("alpha@1")
    with pytest.raises(InvalidArgumentError, match="alias is empty"):
        asyncio.run(admin_of(registry).set_alias(" ", "alpha@1"))
    assert registry.alias_table == {}


# ---------------------------------------------------------------- SessionAdmin


def sessions_of(*owners: Caller) -> MemorySessions:
    """One session per owner, named after it ("s-alice", ...)."""
    store = MemorySessions()
    for owner in owners:
        store.append_turn(f"s-{owner.name}", [Message("user", "hi")], None, owner.key_id)
    return store


def session_admin(store: MemorySessions | None, caller: Caller) -> SessionAdmin:
    return SessionAdmin(make_core(sessions=store), caller)


def test_session_admin_on_a_server_without_sessions_is_a_failed_precondition() -> None:
    with pytest.raises(FailedPreconditionError) as refused:
        session_admin(None, ANONYMOUS)
    assert str(refused.value) == SESSIONS_OFF


def test_a_key_reads_its_own_session() -> None:
    stored = asyncio.run(session_admin(sessions_of(ALICE), ALICE).get("s-alice"))
    assert stored.owner == ALICE.key_id and stored.messages == [Message("user", "hi")]


def test_another_keys_session_reads_as_one_that_does_not_exist() -> None:
    admin = session_admin(sessions_of(ALICE), BOB)
    messages = []
    for session_id in ("s-alice", "s-nobody"):
        with pytest.raises(NotFoundError) as refused:
            asyncio.run(admin.get(session_id))
        messages.append(str(refused.value).replace(session_id, "ID"))
    assert messages[0] == messages[1] == "session 'ID' does not exist for this key (or has expired)"


def test_an_admin_key_reads_and_lists_every_session() -> None:
    admin = session_admin(sessions_of(ALICE, BOB), admin_key("root"))
    assert asyncio.run(admin.get("s-bob")).owner == BOB.key_id
    assert [i.id for i in asyncio.run(admin.list(10))] == ["s-bob", "s-alice"]


def test_a_key_lists_only_its_own_sessions_up_to_the_limit() -> None:
    store = sessions_of(ALICE, BOB, ALICE)
    store.append_turn("s-alice-2", [Message("user", "hi")], None, ALICE.key_id)
    admin = session_admin(store, ALICE)
    assert [i.id for i in asyncio.run(admin.list(10))] == ["s-alice-2", "s-alice"]
    assert [i.id for i in asyncio.run(admin.list(1))] == ["s-alice-2"]


def test_a_key_deletes_its_own_session_and_the_count_is_recorded() -> None:
    store = sessions_of(ALICE, BOB)
    with recording(CallRecord()) as record:
        assert asyncio.run(session_admin(store, ALICE).delete("s-alice")) is True
    assert store.get("s-alice") is None and record.sessions_stored == 1


def test_deleting_another_keys_session_answers_as_deleting_a_missing_one() -> None:
    store = sessions_of(ALICE)
    admin = session_admin(store, BOB)
    assert asyncio.run(admin.delete("s-alice")) is False
    assert asyncio.run(admin.delete("s-nobody")) is False
    assert store.get("s-alice") is not None


def test_an_admin_key_deletes_any_session() -> None:
    store = sessions_of(ALICE)
    assert asyncio.run(session_admin(store, admin_key("root")).delete("s-alice")) is True
    assert store.count() == 0


def test_a_delete_succeeds_when_only_the_session_count_cannot_be_read() -> None:
    store = sessions_of(ALICE)
    store.count_error = SessionStoreError("database is locked")
    with recording(CallRecord()):
        assert asyncio.run(session_admin(store, ALICE).delete("s-alice")) is True
