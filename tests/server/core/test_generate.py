"""The generate step: one engine request streamed to its finish, cancelled in the engine whenever
its reader leaves early or asks to, and never after it finished."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.core.generate import Generation, usage_of
from server.core.record import EngineUsage
from server.errors import QueueFullError, RowFailedError, UnavailableError
from server.request import FinishEvent, GenerationRequest, TokenEvent
from server.sampling import SamplingParams
from tests.server.core.fakes import FakeEngine

REQUEST = GenerationRequest(request_id="r1", prompt_ids=[1, 2, 3], adapter=None,
                            sampling=SamplingParams(max_new_tokens=4))


def collect(generation: Generation) -> list[Any]:
    async def read() -> list[Any]:
        return [event async for event in generation.stream()]

    return asyncio.run(read())


def test_usage_carries_the_finish_events_timings_and_counts() -> None:
    finish = FinishEvent("stop", "hi", 3, 1, None, 0.5, 0.75)
    assert usage_of(finish, "alpha@1") == EngineUsage("alpha@1", None, 0.5, 0.75, 3, 1)


def test_a_stream_gives_the_tokens_then_one_finish() -> None:
    engine = FakeEngine(answer="fine thanks")
    events = collect(Generation(engine, REQUEST))
    assert [type(e) for e in events] == [TokenEvent, TokenEvent, FinishEvent]
    assert events[-1].text == "fine thanks" and events[-1].prompt_tokens == 3
    assert engine.submitted == [REQUEST] and not engine.handles[0].cancelled


def test_a_generation_cancelled_before_it_starts_is_cancelled_at_submission() -> None:
    engine = FakeEngine(answer="a b c")
    generation = Generation(engine, REQUEST)
    generation.cancel()
    events = collect(generation)
    assert engine.handles[0].cancelled
    assert [e.reason for e in events] == ["cancelled"]


def test_cancelling_midway_cancels_the_engine_request() -> None:
    engine = FakeEngine(answer="a b c d")
    generation = Generation(engine, REQUEST)

    async def cancel_after_first() -> list[Any]:
        events = []
        async for event in generation.stream():
            events.append(event)
            if len(events) == 1:
                generation.cancel()
        return events

    events = asyncio.run(cancel_after_first())
    assert engine.handles[0].cancelled
    assert events[-1].reason == "cancelled" and events[-1].completion_tokens == 1


def test_a_reader_leaving_early_cancels_the_engine_request() -> None:
    engine = FakeEngine(answer="a b c d")

    async def first_only() -> None:
        stream = Generation(engine, REQUEST).stream()
        await anext(stream)
        await stream.aclose()

    asyncio.run(first_only())
    assert engine.handles[0].cancelled


def test_an_engine_failure_midway_is_raised_and_the_request_cancelled() -> None:
    engine = FakeEngine(script=[TokenEvent("a ", [1], 1), RowFailedError("non-finite logits")])
    with pytest.raises(RowFailedError, match="non-finite logits"):
        collect(Generation(engine, REQUEST))
    assert engine.handles[0].cancelled


def test_cancel_after_the_finish_does_not_reach_the_engine() -> None:
    engine = FakeEngine()
    generation = Generation(engine, REQUEST)
    collect(generation)
    generation.cancel()
    assert not engine.handles[0].cancelled


def test_an_engine_refusal_at_submission_is_raised() -> None:
    with pytest.raises(QueueFullError, match="full"):
        collect(Generation(FakeEngine(error=QueueFullError("queue full")), REQUEST))


def test_finish_runs_to_the_end_and_returns_the_finish() -> None:
    finish = asyncio.run(Generation(FakeEngine(answer="short summary"), REQUEST).finish())
    assert finish.reason == "stop" and finish.text == "short summary"


def test_a_stream_without_a_finish_is_unavailable() -> None:
    engine = FakeEngine(script=[TokenEvent("a ", [1], 1)])
    with pytest.raises(UnavailableError,
                       match="the engine ended a request without a finish event"):
        asyncio.run(Generation(engine, REQUEST).finish())
