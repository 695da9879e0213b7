"""Replay order, modes, concurrency, failures and the resumable cache, against a dummy model.

The dummy backend (the idea of lm-eval's `models/dummy.py`) answers instantly and deterministically
and records every call, so the replay's bookkeeping is checked without a server; the real server
is exercised end to end in test_evalsuite_cli.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from clients.errors import SwitchboardRpcError
from clients.types import ChatResult, ScoreResult
from common.conversation import Conversation, Message
from evalsuite.cache import ResultCache, cache_key
from evalsuite.replay import (
    ReplayPlan,
    ResolvedAdapter,
    SamplingConfig,
    replay_all,
    replay_conversation,
    resolve_adapter,
)
from evalsuite.testsets import (
    conversation_hash,
    dataset_fingerprint,
    load_testset,
    split_exchanges,
    to_test_conversation,
)


class DummyBackend:
    """Answers "<adapter>:<last user text>"; "FAIL" in a prompt -> INVALID_ARGUMENT, "FLAKY" ->
    UNAVAILABLE, "CRASH" -> RuntimeError (an interrupted run)."""

    def __init__(self) -> None:
        self.chats: list[tuple[str, list[dict[str, str]]]] = []
        self.scores: list[tuple[str, list[dict[str, str]], str]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def chat(self, messages, *, adapter="", **kwargs) -> ChatResult:
        self.chats.append((adapter, list(messages)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.002)
            last = messages[-1]["content"]
            for word, code in (("FAIL", "INVALID_ARGUMENT"), ("FLAKY", "UNAVAILABLE")):
                if word in last:
                    raise SwitchboardRpcError(code, f"dummy {code}")
            if "CRASH" in last:
                raise RuntimeError("the run was interrupted")
            name, _, version = adapter.partition("@")
            return ChatResult(text=f"{adapter or 'base'}:{last}", finish_reason="stop",
                              prompt_tokens=len(messages), completion_tokens=3,
                              adapter_name=name, adapter_version=int(version or 0),
                              queue_wait_s=0.0, ttft_s=0.001, total_s=0.003)
        finally:
            self.in_flight -= 1

    async def score(self, messages, continuation, *, adapter="") -> ScoreResult:
        self.scores.append((adapter, list(messages), continuation))
        if adapter == "missing":
            raise SwitchboardRpcError("NOT_FOUND", "adapter 'missing' does not exist")
        name = {"alias": "alpha"}.get(adapter, adapter.partition("@")[0])
        version = 2 if adapter == "alias" else int(adapter.partition("@")[2] or 0)
        return ScoreResult(-1.0 * len(continuation), len(continuation), 5, name, version)


def make_conv(cid: str, *turns: tuple[str, str | None], facts=()) -> Conversation:
    msgs = [Message("system", "be brief")]
    for user, answer in turns:
        msgs.append(Message("user", user))
        if answer is not None:
            msgs.append(Message("assistant", answer))
    return Conversation(tuple(msgs), id=cid, facts=tuple(facts))


def three_turns(cid: str = "c1"):
    return to_test_conversation(
        make_conv(cid, (f"{cid}-u1", "r1"), ("u2", "r2"), ("u3", "r3"), facts=("r3",)), cid)


A1 = ResolvedAdapter("alpha@1", "alpha@1", "alpha@1")
BASE = ResolvedAdapter("__base__", "__base__", "")


def test_exchanges_split_after_each_user_turn_with_meta_references() -> None:
    conv = Conversation(
        (Message("user", "q1"), Message("user", "q2")), id="81",
        meta={"category": "writing", "reference": ["a1"]},
    )
    exchanges = split_exchanges(conv)
    assert [(tuple(m.content for m in e.messages), e.reference) for e in exchanges] == [
        (("q1",), "a1"), (("q2",), None)]
    test = to_test_conversation(conv, "fallback")
    assert test.category == "writing" and test.id == "81"
    assert test.hash == conversation_hash(exchanges)
    first = split_exchanges(make_conv("x", ("u1", "r1"), ("u2", None)))
    assert [e.reference for e in first] == ["r1", None]
    assert [m.role for m in first[0].messages] == ["system", "user"]


def test_mt_bench_and_openai_files_load_as_test_sets(tmp_path: Path) -> None:
    mt = tmp_path / "question.jsonl"
    mt.write_text(json.dumps({"question_id": 81, "category": "writing",
                              "turns": ["Write a haiku.", "Now in French."],
                              "reference": ["Autumn moon...", "Lune d'automne..."]}) + "\n"
                  + json.dumps({"question_id": 82, "category": "math",
                                "turns": ["2+2?"]}) + "\n")
    chat = tmp_path / "test.jsonl"
    rec = {"messages": [{"role": "user", "content": "I am Maria"},
                        {"role": "assistant", "content": "Hi Maria"}], "facts": ["Maria"]}
    chat.write_text((json.dumps(rec) + "\n") * 3)
    convs = load_testset([mt, chat], limit=2)
    assert [c.id for c in convs][:2] == ["81", "82"] and len(convs) == 4
    assert [e.reference for e in convs[0].exchanges] == ["Autumn moon...", "Lune d'automne..."]
    assert convs[0].category == "writing" and convs[1].exchanges[0].reference is None
    assert convs[2].facts == ("Maria",) and convs[2].hash == convs[3].hash
    assert len({c.id for c in convs}) == 4  # duplicate records still get distinct ids
    assert dataset_fingerprint(convs) == dataset_fingerprint(load_testset([mt, chat], limit=2))


def test_reference_mode_uses_the_test_set_history() -> None:
    backend = DummyBackend()
    res = asyncio.run(replay_conversation(backend, A1, three_turns(), mode="reference",
                                          sampling=SamplingConfig()))
    assert [t.prediction for t in res.turns] == ["alpha@1:c1-u1", "alpha@1:u2", "alpha@1:u3"]
    last_prompt = backend.chats[-1][1]
    assert [m["content"] for m in last_prompt] == ["be brief", "c1-u1", "r1", "u2", "r2", "u3"]
    assert res.adapter == "alpha@1" and res.turns[0].adapter_version == 1
    # Score sees the reference history and the reference answer, in both modes.
    assert backend.scores[-1][2] == "r3"
    assert res.turns[2].log_likelihood == -2.0 and res.turns[2].score_tokens == 2


def test_free_mode_feeds_back_the_adapters_own_answers() -> None:
    backend = DummyBackend()
    asyncio.run(replay_conversation(backend, BASE, three_turns(), mode="free",
                                    sampling=SamplingConfig(), score=False))
    last_prompt = backend.chats[-1][1]
    assert [m["content"] for m in last_prompt] == [
        "be brief", "c1-u1", "base:c1-u1", "u2", "base:u2", "u3"]
    assert backend.chats[-1][0] == "" and not backend.scores


def test_failures_keep_their_status_code_and_free_mode_skips_the_rest() -> None:
    conv = to_test_conversation(make_conv("f", ("u1", "r1"), ("FAIL", "r2"), ("u3", "r3")), "f")
    ref = asyncio.run(replay_conversation(DummyBackend(), A1, conv, mode="reference",
                                          sampling=SamplingConfig(), score=False))
    assert [(t.status, t.error_code) for t in ref.turns] == [
        ("ok", ""), ("failed", "INVALID_ARGUMENT"), ("ok", "")]
    free = asyncio.run(replay_conversation(DummyBackend(), A1, conv, mode="free",
                                           sampling=SamplingConfig(), score=False))
    assert [t.status for t in free.turns] == ["ok", "failed", "skipped"]


def test_conversations_run_in_parallel_and_turns_in_order() -> None:
    backend = DummyBackend()
    convs = [three_turns(f"c{i}") for i in range(8)]
    plan = ReplayPlan(adapters=[A1, BASE], conversations=convs, concurrency=3, score=False)
    done = []
    results = asyncio.run(replay_all(backend, plan, on_done=done.append))
    assert backend.max_in_flight == 3
    assert len(done) == 16 and list(results) == ["alpha@1", "__base__"]
    assert [r.conversation_id for r in results["__base__"]] == [f"c{i}" for i in range(8)]
    for adapter in ("alpha@1", ""):
        # Per conversation the prompts grow turn by turn: later turns never overtake earlier ones.
        order: dict[str, list[int]] = {}
        for a, prompt in backend.chats:
            if a == adapter:
                order.setdefault(prompt[1]["content"], []).append(len(prompt))
        assert order == {f"c{i}-u1": [2, 4, 6] for i in range(8)}


def test_second_run_is_served_from_the_cache(tmp_path: Path) -> None:
    convs = [three_turns(f"c{i}") for i in range(4)]
    plan = ReplayPlan(adapters=[A1, BASE], conversations=convs, concurrency=2)
    first_backend, second_backend = DummyBackend(), DummyBackend()
    with ResultCache(tmp_path / "cache.sqlite") as cache:
        first = asyncio.run(replay_all(first_backend, plan, cache=cache))
    with ResultCache(tmp_path / "cache.sqlite") as cache:
        second = asyncio.run(replay_all(second_backend, plan, cache=cache))
        assert (cache.hits, cache.misses, len(cache)) == (8, 0, 8)
    assert not second_backend.chats and not second_backend.scores
    assert all(r.cached for rs in second.values() for r in rs)
    assert [r.to_dict() for r in second["alpha@1"]] == [r.to_dict() for r in first["alpha@1"]]


def test_cache_key_covers_version_mode_and_sampling() -> None:
    base = cache_key("alpha@1", "sha256:c", "reference", {"temperature": 0.0})
    assert base != cache_key("alpha@2", "sha256:c", "reference", {"temperature": 0.0})
    assert base != cache_key("alpha@1", "sha256:c", "free", {"temperature": 0.0})
    assert base != cache_key("alpha@1", "sha256:c", "reference", {"temperature": 0.7})
    assert base != cache_key("alpha@1", "sha256:d", "reference", {"temperature": 0.0})


def test_interrupted_run_resumes_and_transient_failures_are_retried(tmp_path: Path) -> None:
    good = [three_turns(f"c{i}") for i in range(3)]
    crash = to_test_conversation(make_conv("crash", ("CRASH", "r")), "crash")
    flaky = to_test_conversation(make_conv("flaky", ("FLAKY", "r")), "flaky")
    with ResultCache(tmp_path / "c.sqlite") as cache:
        plan = ReplayPlan(adapters=[A1], conversations=[*good, flaky, crash], concurrency=1)
        with pytest.raises(RuntimeError, match="interrupted"):
            asyncio.run(replay_all(DummyBackend(), plan, cache=cache))
        assert len(cache) == 3  # finished conversations survived; the flaky one is not kept
    backend = DummyBackend()
    with ResultCache(tmp_path / "c.sqlite") as cache:
        plan = ReplayPlan(adapters=[A1], conversations=[*good, flaky], concurrency=1)
        results = asyncio.run(replay_all(backend, plan, cache=cache))
    assert [p[-1]["content"] for _, p in backend.chats] == ["FLAKY"]
    assert results["alpha@1"][3].turns[0].error_code == "UNAVAILABLE"


def test_adapters_resolve_to_exact_versions() -> None:
    backend = DummyBackend()
    assert asyncio.run(resolve_adapter(backend, "alias")) == ResolvedAdapter(
        "alias", "alpha@2", "alpha@2")
    assert asyncio.run(resolve_adapter(backend, "__base__")) == BASE
    with pytest.raises(SwitchboardRpcError, match="NOT_FOUND"):
        asyncio.run(resolve_adapter(backend, "missing"))


def test_settings_validate_themselves() -> None:
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="truncation must be one of"):
        SamplingConfig(truncation="chop")
    with pytest.raises(ValueError, match="concurrency must be >= 1, got 0"):
        ReplayPlan(adapters=[A1], conversations=[], concurrency=0)
    with pytest.raises(ValueError, match="same version more than once"):
        ReplayPlan(adapters=[A1, ResolvedAdapter("alpha", "alpha@1", "alpha@1")],
                   conversations=[])
