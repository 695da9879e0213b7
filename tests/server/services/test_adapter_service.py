"""AdapterService end to end on the shared real server: LoadAdapter, UnloadAdapter,
ListAdapters, SetAlias and AliasHistory.

Aliases and their history, on-demand loads with LRU eviction, an alias moved under load,
adapters for another base, and the error code of each bad admin request.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import write_random_adapter
from switchboard.v1 import switchboard_pb2 as pb

from tests.server.services.calls import (
    LONG_ADAPTER,
    assert_still_serving,
    chat_request,
    loaded,
    long_request,
    msgs,
)

# ---------------------------------------------------------------- aliases


def test_alias_and_version_resolution(infer, admin) -> None:
    moved = admin.SetAlias(pb.SetAliasRequest(alias="prod", target="alpha@1"), timeout=30)
    assert (moved.alias.name, moved.alias.version, moved.previous) == ("alpha", 1, "")
    assert infer.Chat(chat_request(adapter="prod"), timeout=60).adapter.version == 1
    moved = admin.SetAlias(pb.SetAliasRequest(alias="prod", target="beta@1"), timeout=30)
    assert moved.previous == "alpha@1"
    reply = infer.Chat(chat_request(adapter="prod"), timeout=60)
    assert (reply.adapter.name, reply.adapter.requested) == ("beta", "prod")
    listing = admin.ListAdapters(pb.ListAdaptersRequest(), timeout=30)
    assert {(a.alias, a.name, a.version) for a in listing.aliases} >= {("prod", "beta", 1)}
    assert "prod" in next(a for a in listing.adapters if a.name == "beta").aliases


def test_alias_moves_are_kept_in_the_history_beside_the_adapters(admin, served_root) -> None:
    admin.SetAlias(pb.SetAliasRequest(alias="hist", target="alpha@1", reason="first"), timeout=30)
    admin.SetAlias(pb.SetAliasRequest(alias="hist-other", target="beta@1"), timeout=30)
    moved = admin.SetAlias(pb.SetAliasRequest(alias="hist", target="alpha@2", reason="why: eval"),
                           timeout=30)
    assert moved.previous == "alpha@1"
    moves = admin.AliasHistory(pb.AliasHistoryRequest(alias="hist"), timeout=30).moves
    assert [(m.target, m.previous, m.reason) for m in moves] == [
        ("alpha@1", "", "first"), ("alpha@2", "alpha@1", "why: eval")]
    assert all(m.alias == "hist" and m.moved_at.endswith("+00:00") for m in moves)
    every = admin.AliasHistory(pb.AliasHistoryRequest(), timeout=30).moves
    assert {"hist", "hist-other"} <= {m.alias for m in every}
    lines = (served_root / "alias_history.jsonl").read_text().splitlines()
    assert len(lines) == len(every)
    with pytest.raises(grpc.RpcError) as info:
        admin.AliasHistory(pb.AliasHistoryRequest(alias="../etc"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- loading

def test_on_demand_load_and_lru_eviction(infer, admin) -> None:
    for key in list(loaded(admin)):
        admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter=key), timeout=30)
    assert loaded(admin) == {}
    infer.Chat(chat_request(adapter="alpha@1"), timeout=60)  # loads on demand
    assert set(loaded(admin)) == {"alpha@1"}
    infer.Chat(chat_request(adapter="alpha@2"), timeout=60)
    infer.Chat(chat_request(adapter="beta@1"), timeout=60)  # limit 2: alpha@1 is the LRU
    now = loaded(admin)
    assert set(now) == {"alpha@2", "beta@1"}
    assert now["beta@1"].rank == 4 and now["beta@1"].memory_bytes > 0
    load = admin.LoadAdapter(pb.LoadAdapterRequest(adapter="alpha@1"), timeout=60)
    assert load.adapter.loaded and load.adapter.version == 1
    assert set(loaded(admin)) == {"alpha@1", "beta@1"}


def test_hot_replacement_under_load(infer, admin) -> None:
    admin.SetAlias(pb.SetAliasRequest(alias="live", target="alpha@1"), timeout=30)
    first_chunk = threading.Barrier(5, timeout=60)

    def stream(wait: bool) -> pb.ChatResponse:
        chunks = infer.ChatStream(chat_request(adapter="live", max_new_tokens=40), timeout=120)
        final = None
        for i, chunk in enumerate(chunks):
            if wait and i == 0:
                first_chunk.wait()
            if chunk.HasField("final"):
                final = chunk.final
        return final

    with ThreadPoolExecutor(8) as pool:
        old = [pool.submit(stream, True) for _ in range(4)]
        first_chunk.wait()  # every old stream is running on alpha@1
        admin.LoadAdapter(pb.LoadAdapterRequest(adapter="alpha@2"), timeout=60)
        admin.SetAlias(pb.SetAliasRequest(alias="live", target="alpha@2"), timeout=30)
        new = [pool.submit(stream, False) for _ in range(4)]
        old_results = [f.result() for f in old]
        new_results = [f.result() for f in new]
    assert [r.adapter.version for r in old_results] == [1, 1, 1, 1]
    assert [r.adapter.version for r in new_results] == [2, 2, 2, 2]
    assert all(r.finish_reason != pb.FINISH_REASON_CANCELLED for r in old_results + new_results)


# ---------------------------------------------------------------- errors

def test_foreign_base_adapter_is_failed_precondition(infer, admin, tiny_base, served_root) -> None:
    write_random_adapter(tiny_base, served_root, "foreign", 1, seed=9, fingerprint="sha256:other")
    for call in (lambda: infer.Chat(chat_request(adapter="foreign"), timeout=30),
                 lambda: admin.LoadAdapter(pb.LoadAdapterRequest(adapter="foreign@1"), timeout=30)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "sha256:other" in info.value.details() and "sha256:" in info.value.details()
    listing = admin.ListAdapters(pb.ListAdaptersRequest(), timeout=30)
    assert not next(a for a in listing.adapters if a.name == "foreign").compatible
    assert_still_serving(infer)


def test_bad_score_and_admin_requests(infer, admin) -> None:
    cases = [
        (lambda: infer.Score(pb.ScoreRequest(messages=msgs(("user", "hi"))), timeout=30),
         "continuation"),
        (lambda: infer.Score(pb.ScoreRequest(continuation="x"), timeout=30), "messages"),
        (lambda: admin.LoadAdapter(pb.LoadAdapterRequest(), timeout=30), "adapter is empty"),
        (lambda: admin.SetAlias(pb.SetAliasRequest(alias="a/b", target="alpha@1"), timeout=30),
         "alias"),
        (lambda: admin.SetAlias(pb.SetAliasRequest(alias="x", target=""), timeout=30), "target"),
    ]
    for call, phrase in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert phrase in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter="alpha@99"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert_still_serving(infer)


def test_unload_in_use_is_failed_precondition(infer, admin) -> None:
    call = infer.ChatStream(long_request(400), timeout=120)
    next(call)
    try:
        with pytest.raises(grpc.RpcError) as info:
            admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter=LONG_ADAPTER), timeout=30)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        call.cancel()
    assert_still_serving(infer)
