"""The chat pipeline on a fake engine and an in-memory session store: each step in order, the
places given back, the turn remembered, and the call's record filled for the edge."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from common.conversation import Message
from server.core import ChatCall, ChatResult, Delta, InferenceCore, recording
from server.core.record import CallRecord
from server.errors import (
    AdapterLoadError,
    ConcurrencyLimitError,
    DeadlineExceededError,
    NotFoundError,
    QueueFullError,
    RowFailedError,
)
from server.keys import Caller, KeyKind, KeyLimits
from server.logging_setup import request_context
from server.ratelimit import KeyLimiter, RateLimitedError
from server.request import FinishEvent, TokenEvent
from tests.server.core.fakes import (
    FakeEngine,
    FakeRegistry,
    MemorySessions,
    chat_input,
    make_core,
    run_chat,
)


def test_a_chat_streams_deltas_then_one_result_and_fills_its_record() -> None:
    engine = FakeEngine(answer="fine thanks")
    core = make_core(engine)
    items, record = run_chat(ChatCall(core, chat_input(adapter="alpha@1"), None))
    assert [type(i) for i in items] == [Delta, Delta, ChatResult]
    result = items[-1]
    assert result.text == "fine thanks" and result.adapter.key == "alpha@1"
    assert engine.submitted[0].adapter == "alpha@1"
    assert engine.submitted[0].adapter_path is not None  # the engine admits it itself
    assert record.chat and record.adapter_key == "alpha@1" and record.answer is not None
    # Two tokens, one gap between them: the first token's wait is the time to first token.
    assert record.generated == 2 and len(record.inter_token_s) == 1
    assert core.admission.in_flight() == (0, {})


def test_tokens_that_arrive_together_share_the_gap_before_them() -> None:
    """A reader behind the engine gets several tokens in one event: each counts one gap, an
    equal share of the wait, so the latency histogram still has one sample per token."""
    engine = FakeEngine(script=[TokenEvent("one ", [1], 1), TokenEvent("two three four ",
                                [2, 3, 4], 4), FinishEvent("stop", "one two three four", 3, 4,
                                                           0.01, 0.02, 0.03)])
    items, record = run_chat(ChatCall(make_core(engine), chat_input(), None))
    assert [i.text for i in items if isinstance(i, Delta)] == ["one ", "two three four "]
    assert record.generated == 4 and len(record.inter_token_s) == 3
    assert len(set(record.inter_token_s)) == 1 and record.inter_token_s[0] >= 0


def test_places_are_free_before_the_result_is_seen() -> None:
    core = make_core()

    async def first_result() -> tuple[int, dict[str, int]]:
        async for item in ChatCall(core, chat_input(), None).events():
            if isinstance(item, ChatResult):
                return core.admission.in_flight()
        raise AssertionError("no result")

    with recording(CallRecord()):
        assert asyncio.run(first_result()) == (0, {})


def test_an_unknown_adapter_fails_before_the_engine_and_gives_its_place_back() -> None:
    engine = FakeEngine()
    core = make_core(engine)
    with pytest.raises(NotFoundError):
        run_chat(ChatCall(core, chat_input(adapter="nope@1"), None))
    assert engine.submitted == [] and core.admission.in_flight() == (0, {})


def test_an_engine_refusal_is_recorded_and_places_are_given_back() -> None:
    core = make_core(FakeEngine(error=QueueFullError("full")))
    record = CallRecord()
    with recording(record), pytest.raises(QueueFullError):
        asyncio.run(_drain(ChatCall(core, chat_input(), None)))
    assert isinstance(record.error, QueueFullError) and record.answer is None
    assert core.admission.in_flight() == (0, {})


async def _drain(call: ChatCall) -> None:
    async for _ in call.events():
        pass


def test_a_full_server_refuses_at_once() -> None:
    core = make_core(max_concurrent_requests=1, max_concurrent_per_adapter=1)
    held = core.admission.admit()
    with pytest.raises(ConcurrencyLimitError):
        run_chat(ChatCall(core, chat_input(), None))
    held.release()
    assert core.admission.in_flight() == (0, {})


def test_a_session_turn_is_remembered_and_counted() -> None:
    sessions = MemorySessions()
    core = make_core(sessions=sessions)
    _, record = run_chat(ChatCall(core, chat_input("hi", session_id="s1"), None))
    _, _ = run_chat(ChatCall(core, chat_input("again", session_id="s1"), None))
    stored = sessions.get("s1")
    assert [m.content for m in stored.messages] == ["hi", "fine thanks", "again", "fine thanks"]
    assert record.sessions_stored == 1


def test_the_prompt_is_fitted_and_the_truncation_recorded() -> None:
    sessions = MemorySessions()
    sessions.append_turn("long", [Message("user", "word " * 70), Message("assistant", "ok")])
    engine = FakeEngine()
    core = make_core(engine, sessions=sessions)
    items, record = run_chat(ChatCall(core, chat_input("and now", session_id="long"), None))
    truncation = items[-1].truncation
    assert truncation.applied and truncation.messages_dropped == 2
    assert record.truncation is not None and record.truncation.strategy == "drop_oldest"
    assert len(engine.submitted[0].prompt_ids) <= truncation.budget_tokens


def test_a_summary_is_an_engine_request_through_resolution_and_the_record() -> None:
    sessions = MemorySessions()
    sessions.append_turn("sum", [Message("user", "word " * 70), Message("assistant", "ok")])
    engine = FakeEngine(answer="short summary")
    registry = FakeRegistry("alpha@1", "writer@1")
    core = make_core(engine, registry, sessions, summarize_adapter="writer@1")
    items, record = run_chat(ChatCall(core, chat_input("and now", session_id="sum",
                                                  truncation="summarize"), None))
    assert items[-1].truncation.summary == "short summary"
    assert engine.submitted[0].adapter == "writer@1"  # the summary went first
    assert engine.submitted[0].request_id.endswith("-summary")
    assert "writer@1" in registry.rechecked  # its files re-checked like any request's
    assert [s.adapter for s in record.summaries] == ["writer@1"]
    assert core.admission.in_flight() == (0, {})


def test_cancel_before_submission_cancels_the_engine_request() -> None:
    engine = FakeEngine()
    call = ChatCall(make_core(engine), chat_input(), None)
    call.cancel()
    run_chat(call)
    assert engine.handles[0].cancelled


def test_the_calls_request_id_names_the_engine_request() -> None:
    engine = FakeEngine()
    with request_context("req-7"):
        call = ChatCall(make_core(engine), chat_input(), None)
    run_chat(call)
    assert call.request_id == "req-7" and engine.submitted[0].request_id == "req-7"


def test_an_answer_cancelled_midway_stores_no_turn() -> None:
    sessions = MemorySessions()
    engine = FakeEngine(answer="one two three four")
    call = ChatCall(make_core(engine, sessions=sessions), chat_input(session_id="s1"), None)

    async def cancel_after_first_delta() -> list[object]:
        items: list[object] = []
        async for item in call.events():
            items.append(item)
            if len(items) == 1:
                call.cancel()
        return items

    record = CallRecord()
    with recording(record):
        items = asyncio.run(cancel_after_first_delta())
    result = items[-1]
    assert isinstance(result, ChatResult) and result.finish_reason == "cancelled"
    assert result.completion_tokens == 1 and engine.handles[0].cancelled
    assert sessions.get("s1") is None and record.sessions_stored is None


def test_an_answer_the_engine_stopped_at_the_deadline_is_deadline_exceeded() -> None:
    sessions = MemorySessions()
    engine = FakeEngine(script=[TokenEvent("one ", [1], 1),
                                FinishEvent("cancelled", "one ", 3, 1, None, None, 0.5)])
    past = time.monotonic() - 1.0  # the engine ended the row because this passed
    call = ChatCall(make_core(engine, sessions=sessions), chat_input(session_id="s1"), past)
    with pytest.raises(DeadlineExceededError, match="after 1 generated tokens"):
        run_chat(call)
    assert sessions.get("s1") is None


def test_an_adapter_deleted_while_its_request_waited_answers_not_found() -> None:
    registry = FakeRegistry("alpha@1")
    core = make_core(FakeEngine(script=[AdapterLoadError("no such file")]), registry)
    del registry.disk["alpha@1"]  # the engine found its directory gone when it read it
    with pytest.raises(NotFoundError, match="alpha@1"):
        run_chat(ChatCall(core, chat_input(adapter="alpha@1"), None))
    assert core.admission.in_flight() == (0, {})


TOKEN_LIMITED = Caller("k-lim", "lim", KeyKind.API,
                       limits=KeyLimits(tokens_per_minute=1, token_burst=2))


def token_limited_core(engine: FakeEngine) -> InferenceCore:
    core = make_core(engine)
    core.limiter = KeyLimiter(clock=lambda: 0.0)  # no refill while the test runs
    return core


def test_a_finished_answers_tokens_are_charged_to_its_key() -> None:
    core = token_limited_core(FakeEngine(answer="fine thanks"))
    run_chat(ChatCall(core, chat_input(caller=TOKEN_LIMITED), None))
    with pytest.raises(RateLimitedError, match="tokens_per_minute"):
        run_chat(ChatCall(core, chat_input(caller=TOKEN_LIMITED), None))


def test_the_tokens_of_an_answer_that_failed_midway_are_charged_to_its_key() -> None:
    core = token_limited_core(FakeEngine(script=[
        TokenEvent("a ", [1], 1), TokenEvent("b ", [1], 2), RowFailedError("non-finite logits")]))
    with pytest.raises(RowFailedError):
        run_chat(ChatCall(core, chat_input(caller=TOKEN_LIMITED), None))
    with pytest.raises(RateLimitedError, match="tokens_per_minute"):
        run_chat(ChatCall(core, chat_input(caller=TOKEN_LIMITED), None))


def test_a_failed_read_of_an_adapter_still_on_disk_keeps_its_error(tmp_path: Path) -> None:
    registry = FakeRegistry("alpha@1", root=tmp_path)
    registry.disk["alpha@1"].path.mkdir(parents=True)
    core = make_core(FakeEngine(script=[AdapterLoadError("bad header")]), registry)
    with pytest.raises(AdapterLoadError, match="bad header"):
        run_chat(ChatCall(core, chat_input(adapter="alpha@1"), None))
    assert core.admission.in_flight() == (0, {})
