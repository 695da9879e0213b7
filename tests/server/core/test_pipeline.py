"""The chat pipeline on a fake engine and an in-memory session store: each step in order, the
places given back, the turn remembered, and the call's record filled for the edge."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common.conversation import Message
from server.core import ChatCall, ChatInput, ChatResult, Delta, recording
from server.core.record import CallRecord
from server.errors import ConcurrencyLimitError, NotFoundError, QueueFullError
from server.keys import ANONYMOUS
from server.sampling import SamplingParams
from tests.server.core.fakes import FakeEngine, FakeRegistry, MemorySessions, make_core


def chat_input(text: str = "hello there", adapter: str = "", session_id: str = "",
               truncation: str = "drop_oldest", max_new: int = 4) -> ChatInput:
    return ChatInput(messages=(Message("user", text),), adapter=adapter,
                     sampling=SamplingParams(max_new_tokens=max_new), truncation=truncation,
                     session_id=session_id, caller=ANONYMOUS)


def run(call: ChatCall) -> tuple[list[Any], CallRecord]:
    async def collect() -> list[Any]:
        return [item async for item in call.events()]

    record = CallRecord()
    with recording(record):
        items = asyncio.run(collect())
    return items, record


def test_a_chat_streams_deltas_then_one_result_and_fills_its_record() -> None:
    engine = FakeEngine(answer="fine thanks")
    core = make_core(engine)
    items, record = run(ChatCall(core, chat_input(adapter="alpha@1"), None))
    assert [type(i) for i in items] == [Delta, Delta, ChatResult]
    result = items[-1]
    assert result.text == "fine thanks" and result.adapter.key == "alpha@1"
    assert engine.submitted[0].adapter == "alpha@1"
    assert engine.submitted[0].adapter_path is not None  # the engine admits it itself
    assert record.chat and record.adapter_key == "alpha@1" and record.answer is not None
    assert record.generated == 2 and len(record.inter_token_s) == 2
    assert core.admission.in_flight() == (0, {})


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
        run(ChatCall(core, chat_input(adapter="nope@1"), None))
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
        run(ChatCall(core, chat_input(), None))
    held.release()
    assert core.admission.in_flight() == (0, {})


def test_a_session_turn_is_remembered_and_counted() -> None:
    sessions = MemorySessions()
    core = make_core(sessions=sessions)
    _, record = run(ChatCall(core, chat_input("hi", session_id="s1"), None))
    _, _ = run(ChatCall(core, chat_input("again", session_id="s1"), None))
    stored = sessions.get("s1")
    assert [m.content for m in stored.messages] == ["hi", "fine thanks", "again", "fine thanks"]
    assert record.sessions_stored == 1


def test_the_prompt_is_fitted_and_the_truncation_recorded() -> None:
    sessions = MemorySessions()
    sessions.append_turn("long", [Message("user", "word " * 70), Message("assistant", "ok")])
    engine = FakeEngine()
    core = make_core(engine, sessions=sessions)
    items, record = run(ChatCall(core, chat_input("and now", session_id="long"), None))
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
    items, record = run(ChatCall(core, chat_input("and now", session_id="sum",
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
    run(call)
    assert engine.handles[0].cancelled
