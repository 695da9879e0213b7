"""InferenceService end to end on the shared real server: Chat, ChatStream and Score.

Answers on the base and on adapters, streaming, stop sequences, cancellation and deadlines,
truncation, request ids, metrics, and the error code of each bad request; a second tiny-queue
server for RESOURCE_EXHAUSTED. Every error test ends by checking that the server still answers.
"""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from conftest import write_random_adapter
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from server.app import start_in_thread
from server.config import ServerConfig
from tests.server.services.calls import (
    LONG_ADAPTER,
    SHORT,
    assert_still_serving,
    chat_request,
    loaded,
    long_request,
    msgs,
)

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


def test_stop_sequence_ends_the_stream_and_is_not_returned(infer) -> None:
    full = infer.Chat(long_request(48), timeout=60).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    request = long_request(48)
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


def test_cancelling_a_stream_frees_its_row(infer, admin) -> None:
    call = infer.ChatStream(long_request(400), timeout=120)
    next(call)
    assert loaded(admin)[LONG_ADAPTER].in_flight == 1
    call.cancel()
    deadline = time.monotonic() + 10
    while loaded(admin)[LONG_ADAPTER].in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loaded(admin)[LONG_ADAPTER].in_flight == 0
    assert_still_serving(infer)


def test_deadline_is_enforced(infer) -> None:
    infer.Chat(long_request(1), timeout=60)  # loaded
    with pytest.raises(grpc.RpcError) as info:
        infer.Chat(long_request(400), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_still_serving(infer)


def test_truncation_is_applied_and_reported(infer) -> None:
    long_history = []
    for i in range(60):
        long_history += [("user", f"question {i}: " + "tell me more " * 20),
                         ("assistant", f"answer {i}: " + "here is more " * 20)]
    request = pb.ChatRequest(messages=msgs(("system", "Be brief."), *long_history,
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


# ---------------------------------------------------------------- adapters by name

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
    # Not "gamma": the test above needs that name unknown, whichever runs first.
    write_random_adapter(tiny_base, served_root, "delta", 1, seed=11, rank=4)
    assert infer.Chat(chat_request(adapter="delta"), timeout=60).adapter.name == "delta"


# ---------------------------------------------------------------- errors

BAD_REQUESTS = {
    "empty messages": (pb.ChatRequest(), "messages is empty"),
    "unknown role": (pb.ChatRequest(messages=msgs(("robot", "hi"))), "role"),
    "last not user": (pb.ChatRequest(messages=msgs(("user", "hi"), ("assistant", "yo"))),
                      "last message"),
    "system in middle": (pb.ChatRequest(messages=msgs(("user", "a"), ("system", "b"),
                                                      ("user", "c"))), "system"),
    "empty user": (pb.ChatRequest(messages=msgs(("user", "  "))), "empty"),
    "negative temperature": (pb.ChatRequest(messages=msgs(("user", "hi")),
                                            sampling=pb.SamplingParams(temperature=-1)),
                             "temperature"),
    "nan top_p": (pb.ChatRequest(messages=msgs(("user", "hi")),
                                 sampling=pb.SamplingParams(top_p=float("nan"))), "top_p"),
    "top_p above 1": (pb.ChatRequest(messages=msgs(("user", "hi")),
                                     sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    "negative penalty": (pb.ChatRequest(messages=msgs(("user", "hi")),
                                        sampling=pb.SamplingParams(repetition_penalty=-2)),
                         "repetition_penalty"),
    "max_new_tokens over limit": (pb.ChatRequest(messages=msgs(("user", "hi")),
                                                 sampling=pb.SamplingParams(max_new_tokens=10**6)),
                                  "max_new_tokens"),
    "absurd top_k": (pb.ChatRequest(messages=msgs(("user", "hi")),
                                    sampling=pb.SamplingParams(top_k=10**9)), "top_k"),
    "too many stops": (pb.ChatRequest(messages=msgs(("user", "hi")),
                                      sampling=pb.SamplingParams(stop=["x"] * 100)), "stop"),
    "path adapter": (pb.ChatRequest(messages=msgs(("user", "hi")), adapter="../etc"),
                     "not valid"),
    "bad version": (pb.ChatRequest(messages=msgs(("user", "hi")), adapter="alpha@zero"),
                    "version"),
    "unknown truncation": (pb.ChatRequest(messages=msgs(("user", "hi")), truncation=42),
                           "truncation"),
    "bad session id": (pb.ChatRequest(messages=msgs(("user", "hi")), session_id="a b/c"),
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


def test_context_overflow_under_error_strategy_is_out_of_range(infer) -> None:
    request = pb.ChatRequest(messages=msgs(("user", "word " * 3000)),
                             truncation=pb.TRUNCATION_STRATEGY_ERROR)
    with pytest.raises(grpc.RpcError) as info:
        infer.Chat(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert any(ch.isdigit() for ch in info.value.details())
    assert_still_serving(infer)


# ---------------------------------------------------------------- a tiny queue

def test_full_queue_is_resource_exhausted(tiny_base, served_root) -> None:
    config = ServerConfig.build(base=str(tiny_base), adapters_root=served_root, port=0,
                                device="cpu", max_batch=1, max_queue=1,
                                shutdown_grace_seconds=0.5, sessions_db=None)
    running = start_in_thread(config)
    try:
        with grpc.insecure_channel(running.target) as ch:
            stub = pb_grpc.InferenceServiceStub(ch)
            stub.Chat(long_request(1), timeout=60)
            calls = [stub.Chat.future(long_request(200),
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
