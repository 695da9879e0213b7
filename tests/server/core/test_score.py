"""Score: the log-likelihood of a continuation, checked, admitted and resolved like a chat, with
the engine call on the slow pool."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.conversation import Message
from server.core import CallRecord, InferenceCore, ScoreOutcome, recording, score
from server.errors import (
    AdapterLoadError,
    ConcurrencyLimitError,
    ContextOverflowError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from server.keys import ANONYMOUS, Caller, KeyKind, KeyLimits
from server.ratelimit import RateLimitedError
from tests.server.core.fakes import FakeEngine, FakeRegistry, Scored, api_key, make_core

QUESTION = [Message("user", "is it raining")]  # 6 prompt tokens


@dataclass
class NotingEngine(FakeEngine):
    """Notes the thread and the admission's places of each score."""

    core: InferenceCore | None = None
    seen: list[tuple[str, tuple[int, dict[str, int]]]] = field(default_factory=list)

    def score(self, prompt_ids: list[int], target_ids: list[int], adapter: str | None,
              adapter_path: Path | None = None) -> Scored:
        assert self.core is not None
        self.seen.append((threading.current_thread().name, self.core.admission.in_flight()))
        return super().score(prompt_ids, target_ids, adapter, adapter_path)


def run_score(core: InferenceCore, continuation: str = "yes it is", ref: str = "",
              caller: Caller = ANONYMOUS,
              messages: list[Message] = QUESTION) -> tuple[ScoreOutcome, CallRecord]:
    with recording(CallRecord()) as record:
        outcome = asyncio.run(score(core, messages, continuation, ref, caller))
    return outcome, record


def test_a_score_is_the_engines_log_likelihood_of_the_continuation() -> None:
    engine = NotingEngine()
    registry = FakeRegistry("alpha@1")
    core = engine.core = make_core(engine, registry)
    outcome, record = run_score(core, "yes it is", "alpha@1", api_key("acme"))
    assert outcome == ScoreOutcome(log_likelihood=-1.5, token_count=3, prompt_tokens=6,
                                   adapter=registry.disk["alpha@1"], requested="alpha@1")
    prompt_ids, target_ids, key, path = engine.scored[0]
    assert prompt_ids == core.renderer.render(QUESTION) and target_ids == [13, 12, 12]
    assert (key, path) == ("alpha@1", registry.disk["alpha@1"].path)
    thread, places = engine.seen[0]
    assert thread.startswith("switchboard-slow") and places == (1, {"alpha@1": 1})
    assert record.key_name == "acme" and core.admission.in_flight() == (0, {})


@pytest.mark.parametrize(("messages", "continuation", "error"), [
    ([], "yes", "messages is empty"),
    ([Message("user", "hi"), Message("assistant", "yo")], "yes",
     "the last message must come from the user, got role 'assistant'"),
    ([Message("user", "hi"), Message("system", "obey"), Message("user", "so")], "yes",
     "message 1 of the conversation is a system message"),
    (QUESTION, "", "continuation is empty: give the assistant text to score"),
])
def test_a_malformed_score_is_an_invalid_argument(
        messages: list[Message], continuation: str, error: str) -> None:
    engine = FakeEngine()
    with pytest.raises(InvalidArgumentError, match=error):
        run_score(make_core(engine), continuation, messages=messages)
    assert engine.scored == []


def test_a_prompt_over_max_prompt_tokens_is_an_overflow() -> None:
    with pytest.raises(ContextOverflowError) as refused:
        run_score(make_core(max_prompt_tokens=5))
    assert str(refused.value) == (
        "the prompt to score is 6 tokens; this server allows at most 5 prompt tokens "
        "(setting max_prompt_tokens, --max-prompt-tokens)")


def test_a_prompt_and_continuation_over_the_window_are_an_overflow() -> None:
    engine = FakeEngine()
    core = make_core(engine)
    with pytest.raises(ContextOverflowError) as refused:
        run_score(core, "w " * 59)
    assert str(refused.value) == ("prompt (6 tokens) plus continuation (59) is 65 tokens; the "
                                  "context length is 64")
    assert engine.scored == [] and core.admission.in_flight() == (0, {})
    assert run_score(core, "w " * 58)[0].token_count == 58  # exactly the window fits


def test_an_adapter_outside_the_keys_scope_is_refused_before_the_engine() -> None:
    engine = FakeEngine()
    core = make_core(engine, FakeRegistry("alpha@1", "beta@1"))
    with pytest.raises(PermissionDeniedError, match="'beta@1' is not available to key 'acme'"):
        run_score(core, ref="beta@1", caller=api_key("acme", "alpha"))
    assert engine.scored == [] and core.admission.in_flight() == (0, {})


def test_a_full_server_refuses_a_score_at_once() -> None:
    core = make_core(max_concurrent_requests=1, max_concurrent_per_adapter=1)
    with core.admission.admit(), pytest.raises(ConcurrencyLimitError):
        run_score(core)


def test_a_key_at_its_in_flight_limit_is_refused_and_its_place_comes_back() -> None:
    core = make_core()
    limited = Caller("k-lim", "lim", KeyKind.API, limits=KeyLimits(max_in_flight=1))
    held = core.limiter.admit(limited)
    with pytest.raises(RateLimitedError, match="key 'lim' has 1 requests running"):
        run_score(core, caller=limited)
    held.release()
    run_score(core, caller=limited)
    assert run_score(core, caller=limited)[0].token_count == 3  # each score gave its place back


def test_a_non_resident_adapter_now_outside_the_root_is_never_read() -> None:
    engine = FakeEngine()
    core = make_core(engine, FakeRegistry("alpha@1", outside=("alpha@1",)))
    with pytest.raises(AdapterLoadError, match="outside the adapters root"):
        run_score(core, ref="alpha@1")
    assert engine.scored == []


def test_a_failed_read_of_a_deleted_adapter_answers_not_found() -> None:
    registry = FakeRegistry("alpha@1")
    core = make_core(FakeEngine(error=AdapterLoadError("no such file")), registry)
    del registry.disk["alpha@1"]  # deleted after the scan that found it
    with pytest.raises(NotFoundError, match="alpha@1"):
        run_score(core, ref="alpha@1")
    assert core.admission.in_flight() == (0, {})


def test_a_failed_read_on_the_bare_base_keeps_its_error() -> None:
    core = make_core(FakeEngine(error=AdapterLoadError("weights unreadable")))
    with pytest.raises(AdapterLoadError, match="weights unreadable"):
        run_score(core)
