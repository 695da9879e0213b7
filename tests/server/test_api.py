"""The gRPC API through the real server on loopback, with raw generated stubs.

One server per module (tiny base, at most 2 loaded adapters); a second tiny-queue server for
RESOURCE_EXHAUSTED. Every error test ends by checking that the server still answers.
"""

from __future__ import annotations

import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import free_port, write_random_adapter
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from server.app import RunningServer, start_in_thread
from server.config import ServerConfig

SHORT = 8


@pytest.fixture(scope="module")
def served_root(adapters_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy: these tests add aliases and adapters."""
    root = tmp_path_factory.mktemp("api") / "adapters"
    shutil.copytree(adapters_root, root)
    return root


@pytest.fixture(scope="module")
def server(tiny_base: Path, served_root: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    config = ServerConfig.build(
        base=str(tiny_base), adapters_root=served_root, port=0, device="cpu", max_batch=8,
        max_loaded_adapters=2, max_queue=64, default_max_new_tokens=SHORT,
        max_new_tokens_limit=512, metrics_port=free_port(),
        sessions_db=tmp_path_factory.mktemp("db") / "sessions.db",
        shutdown_grace_seconds=1.0,
    )
    running = start_in_thread(config)
    yield running
    running.stop()


def chat_request(text: str = "hello there", adapter: str = "", max_new_tokens: int = SHORT,
                 **kwargs) -> pb.ChatRequest:
    return pb.ChatRequest(
        messages=[pb.Message(role="system", content="Be brief."),
                  pb.Message(role="user", content=text)],
        adapter=adapter, sampling=pb.SamplingParams(max_new_tokens=max_new_tokens), **kwargs)


@pytest.fixture(scope="module")
def long_adapter(infer: pb_grpc.InferenceServiceStub) -> str:
    """A fixture adapter whose greedy answer to `chat_request()` runs past 64 tokens.

    The tiny base itself stops after a few tokens; tests that must act while an answer is
    still streaming (cancel, busy session, deadline, unload in use) use this adapter instead
    of hoping for the base to ramble.
    """
    for candidate in ("beta@1", "alpha@1", "alpha@2"):
        reply = infer.Chat(chat_request(adapter=candidate, max_new_tokens=64), timeout=60)
        if reply.finish_reason == pb.FINISH_REASON_LENGTH:
            return candidate
    pytest.fail("no fixture adapter answers 64 tokens without stopping; long-running tests "
                "need one")


def assert_still_serving(infer: pb_grpc.InferenceServiceStub) -> None:
    reply = infer.Chat(chat_request(max_new_tokens=2), timeout=60)
    assert reply.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


def loaded(admin: pb_grpc.AdapterServiceStub) -> dict[str, pb.AdapterInfo]:
    listing = admin.ListAdapters(pb.ListAdaptersRequest(), timeout=30)
    return {f"{a.name}@{a.version}": a for a in listing.adapters if a.loaded}


# ---------------------------------------------------------------- happy paths

@pytest.mark.parametrize("adapter, name, version", [
    ("", "", 0), ("alpha", "alpha", 2), ("alpha@1", "alpha", 1), ("beta", "beta", 1),
])
def test_chat_answers_for_base_and_each_adapter(infer, adapter, name, version) -> None:
    reply = infer.Chat(chat_request(adapter=adapter), timeout=60)
    assert reply.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert (reply.adapter.name, reply.adapter.version) == (name, version)
    assert reply.adapter.requested == adapter
    assert 0 < reply.usage.completion_tokens <= SHORT
    assert reply.usage.prompt_tokens > 5
    assert reply.timings.total_seconds >= reply.timings.time_to_first_token_seconds > 0
    assert reply.request_id


def test_stream_deltas_add_up_to_the_final_text(infer) -> None:
    chunks = list(infer.ChatStream(chat_request(adapter="beta", max_new_tokens=12), timeout=60))
    final = chunks[-1].final
    assert all(not c.HasField("final") for c in chunks[:-1])
    assert "".join(c.delta for c in chunks) == final.text
    assert final.usage.completion_tokens == chunks[-1].completion_tokens
    assert (final.adapter.name, final.adapter.version) == ("beta", 1)
    unary = infer.Chat(chat_request(adapter="beta", max_new_tokens=12), timeout=60)
    assert unary.text == final.text  # greedy: same answer either way


def test_stop_sequence_ends_the_stream_and_is_not_returned(infer, long_adapter) -> None:
    full = infer.Chat(chat_request(adapter=long_adapter, max_new_tokens=48), timeout=60).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    request = chat_request(adapter=long_adapter, max_new_tokens=48)
    request.sampling.stop.append(stop)
    chunks = list(infer.ChatStream(request, timeout=60))
    final = chunks[-1].final
    assert final.finish_reason == pb.FINISH_REASON_STOP
    assert stop not in final.text and full.startswith(final.text)
    assert "".join(c.delta for c in chunks) == final.text


def test_score_differs_by_adapter(infer) -> None:
    base = pb.ScoreRequest(messages=[pb.Message(role="user", content="hi")],
                           continuation="hello, how can I help?")
    on_base = infer.Score(base, timeout=60)
    on_alpha = infer.Score(pb.ScoreRequest(messages=base.messages, continuation=base.continuation,
                                           adapter="alpha@1"), timeout=60)
    assert on_base.token_count == on_alpha.token_count > 0
    assert on_base.log_likelihood < 0 and on_alpha.log_likelihood < 0
    assert on_base.log_likelihood != pytest.approx(on_alpha.log_likelihood)
    assert (on_alpha.adapter.name, on_alpha.adapter.version) == ("alpha", 1)
    assert on_base.prompt_tokens > 0


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


def test_cancelling_a_stream_frees_its_row(infer, admin, long_adapter) -> None:
    call = infer.ChatStream(chat_request(adapter=long_adapter, max_new_tokens=400), timeout=120)
    next(call)
    assert loaded(admin)[long_adapter].in_flight == 1
    call.cancel()
    deadline = time.monotonic() + 10
    while loaded(admin)[long_adapter].in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loaded(admin)[long_adapter].in_flight == 0
    assert_still_serving(infer)


def test_deadline_is_enforced(infer, long_adapter) -> None:
    infer.Chat(chat_request(adapter=long_adapter, max_new_tokens=1), timeout=60)  # loaded
    with pytest.raises(grpc.RpcError) as info:
        infer.Chat(chat_request(adapter=long_adapter, max_new_tokens=400), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_still_serving(infer)


def test_truncation_is_applied_and_reported(infer) -> None:
    long_history = []
    for i in range(60):
        long_history += [("user", f"question {i}: " + "tell me more " * 20),
                         ("assistant", f"answer {i}: " + "here is more " * 20)]
    request = pb.ChatRequest(messages=_msgs(("system", "Be brief."), *long_history,
                                            ("user", "and finally?")),
                             sampling=pb.SamplingParams(max_new_tokens=4),
                             truncation=pb.TRUNCATION_STRATEGY_DROP_OLDEST)
    reply = infer.Chat(request, timeout=60)
    report = reply.truncation
    assert report.strategy == pb.TRUNCATION_STRATEGY_DROP_OLDEST and report.applied
    assert report.messages_dropped > 0 and report.tokens_dropped > 0
    assert 0 < reply.usage.prompt_tokens <= report.budget_tokens
    default = infer.Chat(chat_request(), timeout=60).truncation
    assert default.strategy == pb.TRUNCATION_STRATEGY_DROP_OLDEST and not default.applied


def test_request_id_from_metadata_is_echoed(infer) -> None:
    reply = infer.Chat(chat_request(), timeout=60, metadata=(("x-request-id", "req-42"),))
    assert reply.request_id == "req-42"


def test_metrics_count_requests(infer, server) -> None:
    infer.Chat(chat_request(adapter="beta@1"), timeout=60)
    with pytest.raises(grpc.RpcError):
        infer.Chat(chat_request(adapter="nope"), timeout=30)
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    ok = [line for line in text.splitlines() if "requests_total" in line and 'code="OK"' in line]
    assert ok, text[:2000]
    assert any('code="NOT_FOUND"' in line for line in text.splitlines())


# ---------------------------------------------------------------- sessions

def test_session_keeps_completed_turns_only(infer, sessions) -> None:
    first = infer.Chat(chat_request("my name is Ada", session_id="s-1"), timeout=60)
    assert first.session_id == "s-1"
    second = pb.ChatRequest(messages=_msgs(("user", "what is my name?")), session_id="s-1",
                            sampling=pb.SamplingParams(max_new_tokens=SHORT))
    reply = infer.Chat(second, timeout=60)
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens  # history was prepended
    stored = sessions.GetSession(pb.GetSessionRequest(session_id="s-1"), timeout=30)
    assert [m.role for m in stored.messages] == ["system", "user", "assistant", "user",
                                                 "assistant"]
    assert stored.messages[2].content == first.text
    again = sessions.GetSession(pb.GetSessionRequest(session_id="s-1"), timeout=30)
    assert len(again.messages) == 5
    listed = sessions.ListSessions(pb.ListSessionsRequest(), timeout=30).sessions
    assert ("s-1", 5) in {(s.session_id, s.message_count) for s in listed}


def test_a_cancelled_answer_stores_nothing(infer, admin, sessions, long_adapter) -> None:
    call = infer.ChatStream(chat_request(adapter=long_adapter, max_new_tokens=400,
                                         session_id="s-cancel"), timeout=120)
    assert not next(call).HasField("final")
    call.cancel()
    # Wait for the event (the engine freed the row), not for a fixed time.
    deadline = time.monotonic() + 30
    while loaded(admin)[long_adapter].in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as info:
        sessions.GetSession(pb.GetSessionRequest(session_id="s-cancel"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_resending_the_same_system_prompt_is_tolerated(infer, sessions) -> None:
    infer.Chat(chat_request("one", session_id="s-sys"), timeout=60)
    infer.Chat(chat_request("two", session_id="s-sys"), timeout=60)
    stored = sessions.GetSession(pb.GetSessionRequest(session_id="s-sys"), timeout=30)
    assert [m.role for m in stored.messages] == ["system", "user", "assistant", "user",
                                                 "assistant"]
    other = pb.ChatRequest(messages=_msgs(("system", "Different."), ("user", "x")),
                           session_id="s-sys")
    with pytest.raises(grpc.RpcError) as info:
        infer.Chat(other, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_requests_on_one_session_are_aborted(infer, sessions, long_adapter) -> None:
    long = chat_request(adapter=long_adapter, max_new_tokens=400, session_id="s-busy")
    call = infer.ChatStream(long, timeout=120)
    next(call)
    try:
        with pytest.raises(grpc.RpcError) as info:
            infer.Chat(pb.ChatRequest(messages=_msgs(("user", "hi")), session_id="s-busy"),
                       timeout=30)
        assert info.value.code() == grpc.StatusCode.ABORTED
        assert "s-busy" in info.value.details()
    finally:
        call.cancel()
    assert_still_serving(infer)


def test_session_rpcs_errors_and_delete(infer, sessions) -> None:
    infer.Chat(chat_request("bye", session_id="s-del"), timeout=60)
    assert sessions.DeleteSession(pb.DeleteSessionRequest(session_id="s-del"), timeout=30).deleted
    assert not sessions.DeleteSession(pb.DeleteSessionRequest(session_id="s-del"),
                                      timeout=30).deleted
    with pytest.raises(grpc.RpcError) as info:
        sessions.GetSession(pb.GetSessionRequest(session_id="s-del"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        sessions.GetSession(pb.GetSessionRequest(session_id=""), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_summarize_strategy_stores_its_summary(infer, sessions) -> None:
    for i in range(3):
        request = pb.ChatRequest(
            messages=_msgs(("user", f"fact {i}: " + "the sky is very blue today " * 120)),
            session_id="s-sum", truncation=pb.TRUNCATION_STRATEGY_SUMMARIZE,
            sampling=pb.SamplingParams(max_new_tokens=SHORT))
        reply = infer.Chat(request, timeout=120)
        assert reply.usage.prompt_tokens <= reply.truncation.budget_tokens
    assert reply.truncation.strategy == pb.TRUNCATION_STRATEGY_SUMMARIZE
    assert reply.truncation.applied and reply.truncation.messages_dropped > 0
    stored = sessions.GetSession(pb.GetSessionRequest(session_id="s-sum"), timeout=30)
    assert len(stored.messages) == 6  # the session keeps everything; only the prompt is cut
    assert stored.summary == reply.truncation.summary


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


def test_unknown_adapter_is_not_found_listing_what_exists(infer, admin) -> None:
    with pytest.raises(grpc.RpcError) as info:
        infer.Chat(chat_request(adapter="gamma"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "gamma" in info.value.details() and "alpha@1" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        admin.LoadAdapter(pb.LoadAdapterRequest(adapter="alpha@7"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert_still_serving(infer)


def test_new_adapter_on_disk_is_served_without_restart(infer, tiny_base, served_root) -> None:
    write_random_adapter(tiny_base, served_root, "gamma", 1, seed=11, rank=4)
    assert infer.Chat(chat_request(adapter="gamma"), timeout=60).adapter.name == "gamma"


def _msgs(*pairs: tuple[str, str]) -> list[pb.Message]:
    return [pb.Message(role=r, content=c) for r, c in pairs]


BAD_REQUESTS = {
    "empty messages": (pb.ChatRequest(), "messages is empty"),
    "unknown role": (pb.ChatRequest(messages=_msgs(("robot", "hi"))), "role"),
    "last not user": (pb.ChatRequest(messages=_msgs(("user", "hi"), ("assistant", "yo"))),
                      "last message"),
    "system in middle": (pb.ChatRequest(messages=_msgs(("user", "a"), ("system", "b"),
                                                       ("user", "c"))), "system"),
    "empty user": (pb.ChatRequest(messages=_msgs(("user", "  "))), "empty"),
    "negative temperature": (pb.ChatRequest(messages=_msgs(("user", "hi")),
                                            sampling=pb.SamplingParams(temperature=-1)),
                             "temperature"),
    "nan top_p": (pb.ChatRequest(messages=_msgs(("user", "hi")),
                                 sampling=pb.SamplingParams(top_p=float("nan"))), "top_p"),
    "top_p above 1": (pb.ChatRequest(messages=_msgs(("user", "hi")),
                                     sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    "negative penalty": (pb.ChatRequest(messages=_msgs(("user", "hi")),
                                        sampling=pb.SamplingParams(repetition_penalty=-2)),
                         "repetition_penalty"),
    "max_new_tokens over limit": (pb.ChatRequest(messages=_msgs(("user", "hi")),
                                                 sampling=pb.SamplingParams(max_new_tokens=10**6)),
                                  "max_new_tokens"),
    "absurd top_k": (pb.ChatRequest(messages=_msgs(("user", "hi")),
                                    sampling=pb.SamplingParams(top_k=10**9)), "top_k"),
    "too many stops": (pb.ChatRequest(messages=_msgs(("user", "hi")),
                                      sampling=pb.SamplingParams(stop=["x"] * 100)), "stop"),
    "path adapter": (pb.ChatRequest(messages=_msgs(("user", "hi")), adapter="../etc"),
                     "not valid"),
    "bad version": (pb.ChatRequest(messages=_msgs(("user", "hi")), adapter="alpha@zero"),
                    "version"),
    "unknown truncation": (pb.ChatRequest(messages=_msgs(("user", "hi")), truncation=42),
                           "truncation"),
    "bad session id": (pb.ChatRequest(messages=_msgs(("user", "hi")), session_id="a b/c"),
                       "session_id"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_fields_are_invalid_argument(infer, case: str) -> None:
    request, phrase = BAD_REQUESTS[case]
    for call in (infer.Chat, lambda r, timeout: list(infer.ChatStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert phrase in info.value.details()


def test_bad_score_and_admin_requests(infer, admin) -> None:
    cases = [
        (lambda: infer.Score(pb.ScoreRequest(messages=_msgs(("user", "hi"))), timeout=30),
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


def test_unload_in_use_is_failed_precondition(infer, admin, long_adapter) -> None:
    call = infer.ChatStream(chat_request(adapter=long_adapter, max_new_tokens=400), timeout=120)
    next(call)
    try:
        with pytest.raises(grpc.RpcError) as info:
            admin.UnloadAdapter(pb.UnloadAdapterRequest(adapter=long_adapter), timeout=30)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        call.cancel()
    assert_still_serving(infer)


def test_context_overflow_under_error_strategy_is_out_of_range(infer) -> None:
    request = pb.ChatRequest(messages=_msgs(("user", "word " * 3000)),
                             truncation=pb.TRUNCATION_STRATEGY_ERROR)
    with pytest.raises(grpc.RpcError) as info:
        infer.Chat(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert any(ch.isdigit() for ch in info.value.details())
    assert_still_serving(infer)


def test_every_domain_error_has_its_own_code() -> None:
    from server import errors
    from server.adapter_cache import AdapterNotLoadedError
    from server.status import status_for

    expected = {
        errors.InvalidArgumentError: "INVALID_ARGUMENT", errors.NotFoundError: "NOT_FOUND",
        AdapterNotLoadedError: "NOT_FOUND",
        errors.FailedPreconditionError: "FAILED_PRECONDITION",
        errors.IncompatibleAdapterError: "FAILED_PRECONDITION",
        errors.AdapterInUseError: "FAILED_PRECONDITION",
        errors.AdapterLoadError: "FAILED_PRECONDITION",
        errors.ResourceExhaustedError: "RESOURCE_EXHAUSTED",
        errors.QueueFullError: "RESOURCE_EXHAUSTED",
        errors.AdapterCapacityError: "RESOURCE_EXHAUSTED",
        errors.ContextOverflowError: "OUT_OF_RANGE", errors.SessionBusyError: "ABORTED",
        errors.UnavailableError: "UNAVAILABLE", KeyError: "INTERNAL", ValueError: "INTERNAL",
    }
    for cls, code in expected.items():
        assert status_for(cls("x")).name == code, cls


# ---------------------------------------------------------------- a tiny queue

def test_full_queue_is_resource_exhausted(tiny_base, served_root, long_adapter) -> None:
    config = ServerConfig.build(base=str(tiny_base), adapters_root=served_root, port=0,
                                device="cpu", max_batch=1, max_queue=1,
                                shutdown_grace_seconds=0.5, sessions_db=None)
    running = start_in_thread(config)
    try:
        with grpc.insecure_channel(running.target) as ch:
            stub = pb_grpc.InferenceServiceStub(ch)
            stub.Chat(chat_request(adapter=long_adapter, max_new_tokens=1), timeout=60)
            calls = [stub.Chat.future(chat_request(adapter=long_adapter, max_new_tokens=200),
                                      timeout=60) for _ in range(6)]
            codes = []
            for call in calls:
                try:
                    call.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        assert "queue" in e.details()
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
            assert grpc.StatusCode.OK in codes
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert_still_serving(stub)
    finally:
        running.stop()
