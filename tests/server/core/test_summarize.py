"""Summaries for the summarize strategy: a prompt that fits any window, and an engine request
that goes the way a chat goes (resolved, re-checked, admitted, recorded)."""

from __future__ import annotations

import asyncio

import pytest

from common.conversation import Message
from server.context import PromptRenderer
from server.core import CallRecord, ChatCall, Executors, recording
from server.core.admission import Admission, Ticket
from server.core.resolve import AdapterResolver
from server.core.summarize import (
    SUMMARY_INSTRUCTION,
    Summaries,
    summary_prompt,
    transcript,
)
from server.errors import (
    AdapterLoadError,
    ConcurrencyLimitError,
    ContextOverflowError,
    NotFoundError,
)
from server.request import GenerationRequest
from tests.server.core.fakes import (
    FakeEngine,
    FakeRegistry,
    MemorySessions,
    WordTokenizer,
    api_key,
    chat_input,
    make_core,
    run_chat,
)

RENDERER = PromptRenderer(WordTokenizer())
CHAT = [Message("user", "my name is Ada"), Message("assistant", "hello Ada")]
INSTRUCTION_TOKENS = len(SUMMARY_INSTRUCTION.split()) + 2


def test_a_transcript_is_one_line_per_message() -> None:
    assert transcript(CHAT) == "user: my name is Ada\nassistant: hello Ada"


@pytest.mark.parametrize(("window", "max_new"), [(1024, 128), (64, 16)])
def test_a_summary_may_use_a_quarter_of_the_window_and_at_most_128_tokens(
        window: int, max_new: int) -> None:
    ids, answer = summary_prompt(RENDERER, CHAT, window)
    assert answer == max_new and len(ids) <= window - max_new


def test_a_long_transcript_keeps_its_most_recent_part() -> None:
    oldest, newest = "y" * 19, "z" * 20  # one token each: ids 29 and 30
    messages = [Message("user", oldest), *[Message("user", "w " * 10)] * 10,
                Message("user", newest)]
    ids, answer = summary_prompt(RENDERER, messages, 64)
    assert len(ids) <= 64 - answer
    assert 30 in ids and 29 not in ids


def test_a_window_too_small_for_the_instruction_is_an_overflow() -> None:
    with pytest.raises(ContextOverflowError) as refused:
        summary_prompt(RENDERER, CHAT, 8)
    needed = INSTRUCTION_TOKENS + 3 + 1  # the instruction, one word of transcript, the end
    assert str(refused.value).startswith(
        f"the summarize strategy needs {needed} prompt tokens for its summary but the 8-token "
        "window leaves 6; raise context_length or choose")


class NotingEngine(FakeEngine):
    """Notes the admission's places when each request arrives."""

    def __init__(self, admission: Admission, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.admission = admission
        self.places: list[tuple[int, dict[str, int]]] = []

    def submit(self, request: GenerationRequest) -> object:
        self.places.append(self.admission.in_flight())
        return super().submit(request)


def summaries_of(registry: FakeRegistry, engine: FakeEngine, executors: Executors,
                 adapter_ref: str, window: int = 64) -> Summaries:
    resolver = AdapterResolver(registry, engine, executors)
    return Summaries(resolver, RENDERER, engine, executors, window, adapter_ref)


def summarize(summaries: Summaries, ticket: Ticket) -> tuple[str, CallRecord]:
    with recording(CallRecord()) as record:
        text = asyncio.run(summaries.summarize(CHAT, ticket, "r1"))
    return text, record


def test_a_summary_is_an_engine_request_on_the_summarize_adapter(executors: Executors) -> None:
    registry = FakeRegistry("alpha@1", "writer@1")
    admission = Admission(max_total=1, max_per_adapter=1)
    engine = NotingEngine(admission, answer="  Ada said hello  ")
    with admission.admit() as ticket:
        ticket.bind(registry.disk["alpha@1"])
        text, record = summarize(summaries_of(registry, engine, executors, "writer@1"), ticket)
        assert admission.in_flight() == (1, {"alpha@1": 1})  # the writer's place given back
    assert text == "Ada said hello"
    request = engine.submitted[0]
    assert request.request_id == "r1-summary" and request.adapter == "writer@1"
    assert request.adapter_path == registry.disk["writer@1"].path
    assert request.sampling.max_new_tokens == 16
    assert engine.places == [(1, {"alpha@1": 1, "writer@1": 1})]
    assert registry.rechecked == ["writer@1"]
    assert [(s.adapter, s.completion_tokens) for s in record.summaries] == [("writer@1", 3)]


def test_the_bare_base_writes_summaries_by_default(executors: Executors) -> None:
    admission = Admission(max_total=1, max_per_adapter=1)
    engine = FakeEngine(answer="a summary")
    with admission.admit() as ticket:
        ticket.bind(None)
        text, record = summarize(summaries_of(FakeRegistry(), engine, executors, ""), ticket)
    assert text == "a summary" and engine.submitted[0].adapter is None
    assert engine.submitted[0].adapter_path is None
    assert [s.adapter for s in record.summaries] == [None]


def test_a_busy_summarize_adapter_refuses_the_summary(executors: Executors) -> None:
    registry = FakeRegistry("alpha@1", "writer@1")
    admission = Admission(max_total=2, max_per_adapter=1)
    engine = FakeEngine()
    with admission.admit() as other, admission.admit() as ticket:
        other.bind(registry.disk["writer@1"])
        ticket.bind(registry.disk["alpha@1"])
        with pytest.raises(ConcurrencyLimitError, match="adapter writer@1 is at its limit"):
            summarize(summaries_of(registry, engine, executors, "writer@1"), ticket)
    assert engine.submitted == []


def test_an_unknown_summarize_adapter_is_not_found(executors: Executors) -> None:
    engine = FakeEngine()
    admission = Admission(max_total=1, max_per_adapter=1)
    with admission.admit() as ticket, pytest.raises(NotFoundError, match="writer@9"):
        summarize(summaries_of(FakeRegistry(), engine, executors, "writer@9"), ticket)
    assert engine.submitted == []


def test_a_summarize_adapter_now_outside_the_root_is_never_read(executors: Executors) -> None:
    registry = FakeRegistry("writer@1", outside=("writer@1",))
    engine = FakeEngine()
    admission = Admission(max_total=1, max_per_adapter=1)
    with admission.admit() as ticket:
        with pytest.raises(AdapterLoadError, match="outside"):
            summarize(summaries_of(registry, engine, executors, "writer@1"), ticket)
        assert admission.in_flight() == (1, {})  # the writer's place given back
    assert engine.submitted == []


def test_the_blocking_summarizer_runs_the_summary_on_the_loop_from_a_worker(
        executors: Executors) -> None:
    engine = FakeEngine(answer="from the loop")
    summaries = summaries_of(FakeRegistry(), engine, executors, "")
    admission = Admission(max_total=1, max_per_adapter=1)

    async def from_a_worker() -> str:
        with admission.admit() as ticket:
            return await executors.slow_work(summaries.summarizer(ticket, "r7"), CHAT)

    record = CallRecord()
    with recording(record):
        assert asyncio.run(from_a_worker()) == "from the loop"
    assert engine.submitted[0].request_id == "r7-summary"
    assert len(record.summaries) == 1  # the call's record followed the work there and back


def test_the_servers_summarize_adapter_serves_a_key_scoped_away_from_it() -> None:
    """The summarize adapter is the server's choice, not the caller's: no scope applies."""
    acme = api_key("acme", "alpha")
    sessions = MemorySessions()
    sessions.append_turn("s1", [Message("user", "word " * 70), Message("assistant", "ok")],
                         None, acme.key_id)
    engine = FakeEngine(answer="short summary")
    core = make_core(engine, FakeRegistry("alpha@1", "writer@1"), sessions,
                     summarize_adapter="writer@1")
    items, record = run_chat(ChatCall(core, chat_input(
        "and now", adapter="alpha@1", session_id="s1", truncation="summarize", caller=acme),
        None))
    assert items[-1].truncation.summary == "short summary"
    assert [r.adapter for r in engine.submitted] == ["writer@1", "alpha@1"]
    assert [s.adapter for s in record.summaries] == ["writer@1"]
