"""SessionService end to end on the shared real server: GetSession, ListSessions and
DeleteSession, with the turns Chat and ChatStream store under a session_id.

Only completed turns are kept, one request at a time per session, the system prompt may be
resent but not changed, a summarized prompt stores its summary, and the lookup errors.
"""

from __future__ import annotations

import time

import grpc
import pytest
from switchboard.v1 import switchboard_pb2 as pb

from tests.server.services.calls import (
    LONG_ADAPTER,
    SHORT,
    assert_still_serving,
    chat_request,
    loaded,
    long_request,
    msgs,
)


def test_session_keeps_completed_turns_only(infer, sessions) -> None:
    first = infer.Chat(chat_request("my name is Ada", session_id="s-1"), timeout=60)
    assert first.session_id == "s-1"
    second = pb.ChatRequest(messages=msgs(("user", "what is my name?")), session_id="s-1",
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


def test_a_cancelled_answer_stores_nothing(infer, admin, sessions) -> None:
    call = infer.ChatStream(long_request(400, session_id="s-cancel"), timeout=120)
    assert not next(call).HasField("final")
    call.cancel()
    # Wait for the event (the engine freed the row), not for a fixed time.
    deadline = time.monotonic() + 30
    while loaded(admin)[LONG_ADAPTER].in_flight and time.monotonic() < deadline:
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
    other = pb.ChatRequest(messages=msgs(("system", "Different."), ("user", "x")),
                           session_id="s-sys")
    with pytest.raises(grpc.RpcError) as info:
        infer.Chat(other, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_requests_on_one_session_are_aborted(infer, sessions) -> None:
    long = long_request(400, session_id="s-busy")
    call = infer.ChatStream(long, timeout=120)
    next(call)
    try:
        with pytest.raises(grpc.RpcError) as info:
            infer.Chat(pb.ChatRequest(messages=msgs(("user", "hi")), session_id="s-busy"),
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
            messages=msgs(("user", f"fact {i}: " + "the sky is very blue today " * 120)),
            session_id="s-sum", truncation=pb.TRUNCATION_STRATEGY_SUMMARIZE,
            sampling=pb.SamplingParams(max_new_tokens=SHORT))
        reply = infer.Chat(request, timeout=120)
        assert reply.usage.prompt_tokens <= reply.truncation.budget_tokens
    assert reply.truncation.strategy == pb.TRUNCATION_STRATEGY_SUMMARIZE
    assert reply.truncation.applied and reply.truncation.messages_dropped > 0
    stored = sessions.GetSession(pb.GetSessionRequest(session_id="s-sum"), timeout=30)
    assert len(stored.messages) == 6  # the session keeps everything; only the prompt is cut
    assert stored.summary == reply.truncation.summary
