"""CPU threads by forward size: the plan, the timing that makes it (on a fake clock, where each
forward's cost is given), and the engine that times it at start and runs each forward with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.modeling import load_base
from server.engine import Engine, EngineConfig, GenerationRequest
from server.engine.cpu_threads import (
    TOTAL_BUDGET_S,
    ThreadPlan,
    candidate_counts,
    fastest,
    forward_sizes,
    measure,
)
from server.engine.runner import ModelRunner
from server.request import TokenEvent
from server.sampling import SamplingParams


class FakeCpu:
    """A clock that a forward advances by `cost(tokens, threads)`; records every call."""

    def __init__(self, cost) -> None:
        self.cost = cost
        self.now = 0.0
        self.threads = 0
        self.calls: list[tuple[str, int]] = []

    def set_threads(self, count: int) -> None:
        self.threads = count
        self.calls.append(("threads", count))

    def forward(self, tokens: int) -> None:
        self.calls.append(("forward", tokens))
        self.now += self.cost(tokens, self.threads)

    def clock(self) -> float:
        return self.now


def test_counts_double_from_one_to_every_thread():
    assert candidate_counts(1) == (1,)
    assert candidate_counts(2) == (1, 2)
    assert candidate_counts(6) == (1, 2, 4, 6)
    assert candidate_counts(8) == (1, 2, 4, 8)


def test_sizes_cover_every_decode_batch_bucket_then_prefills_up_to_the_longest():
    assert forward_sizes(16, 128) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert forward_sizes(12, 100) == (1, 2, 4, 8, 12, 16, 32, 64, 100)
    assert forward_sizes(64, 16) == (1, 2, 4, 8, 16, 32, 64)
    assert forward_sizes(1, 0) == (1,)


def test_a_plan_maps_each_forward_to_the_count_of_its_size_bucket():
    plan = ThreadPlan(sizes=(1, 2, 4, 8, 16), threads=(1, 1, 1, 2, 2), beyond=4, seconds=0.5)
    assert [plan.for_tokens(t) for t in (1, 2, 3, 4, 5, 8, 9, 16, 17, 4096)] == [
        1, 1, 1, 1, 2, 2, 2, 2, 4, 4]
    assert plan.describe() == "CPU threads by forward tokens 1-4: 1, 5-16: 2, more: 4"


@pytest.mark.parametrize("fields, message", [
    ({"sizes": (), "threads": ()}, "one count per size"),
    ({"sizes": (1, 2), "threads": (1,)}, "one count per size"),
    ({"sizes": (2, 2), "threads": (1, 1)}, "rise"),
    ({"sizes": (0, 2), "threads": (1, 1)}, "rise"),
    ({"sizes": (1, 2), "threads": (1, 0)}, ">= 1"),
    ({"sizes": (1,), "threads": (1,), "beyond": 0}, ">= 1"),
])
def test_a_plan_refuses_what_no_timing_could_produce(fields, message):
    with pytest.raises(ValueError, match=message):
        ThreadPlan(**{"beyond": 2, "seconds": 0.0, **fields})


def test_more_threads_must_win_by_the_margin_to_be_chosen():
    assert fastest({1: 1.0, 2: 0.97}) == 1  # within 5%: the cores are left to others
    assert fastest({1: 1.0, 2: 0.90}) == 2
    assert fastest({1: 1.0, 2: 0.90, 4: 0.88}) == 2
    assert fastest({1: 0.5, 2: 0.9}) == 1


def test_timing_picks_per_size_where_more_threads_stop_costing_more_than_they_save():
    # A kernel's sync costs 1 ms per extra thread; arithmetic is 1 ms per token, split.
    cpu = FakeCpu(lambda tokens, threads: 1e-3 * (threads - 1) * 8 + 1e-3 * tokens / threads)
    plan = measure(cpu.forward, (1, 2, 4, 8, 16, 32, 64), (1, 2, 4), cpu.set_threads, cpu.clock)
    # tokens 1-8: one thread; 16: 1 -> 16 ms, 2 -> 16 ms (a tie keeps 1); 32: 2 -> 24 ms;
    # 64: 4 -> 40 ms against 2 -> 40 ms.
    assert plan.threads == (1, 1, 1, 1, 1, 2, 2)
    assert plan.beyond == 4 and plan.sizes == (1, 2, 4, 8, 16, 32, 64)
    assert plan.seconds == pytest.approx(cpu.now)
    assert cpu.threads == 4  # the most threads again once done


def test_timing_stops_once_the_most_threads_win_two_sizes_in_a_row():
    cpu = FakeCpu(lambda tokens, threads: tokens / threads)
    plan = measure(cpu.forward, (1, 2, 4, 8, 16), (1, 2), cpu.set_threads, cpu.clock)
    assert plan.sizes == (1, 2) and plan.threads == (2, 2) and plan.beyond == 2
    assert {size for kind, size in cpu.calls if kind == "forward"} == {1, 2}


def test_no_size_is_started_once_the_total_budget_is_spent():
    cpu = FakeCpu(lambda tokens, threads: 3.0 if threads == 2 else 1.0)  # one thread wins
    plan = measure(cpu.forward, (1, 2, 4, 8, 16), (1, 2), cpu.set_threads, cpu.clock)
    # 8 s a size (one untimed and one timed forward per count: a round spends the repeats'
    # budget), so the fourth size ends past 30 s and the fifth is not started.
    assert plan.sizes == (1, 2, 4, 8) and plan.threads == (1, 1, 1, 1) and plan.beyond == 2
    assert plan.for_tokens(16) == 2


def test_counts_take_turns_after_one_untimed_forward_each():
    cpu = FakeCpu(lambda tokens, threads: 1.0)  # slow: one timed round spends the budget
    measure(cpu.forward, (8,), (1, 2), cpu.set_threads, cpu.clock)
    assert cpu.calls == [("threads", 1), ("forward", 8), ("threads", 2), ("forward", 8),
                         ("threads", 1), ("forward", 8), ("threads", 2), ("forward", 8),
                         ("threads", 2)]


def test_a_failing_forward_still_leaves_every_thread_in_use():
    cpu = FakeCpu(lambda tokens, threads: 1e-3)

    def forward(tokens: int) -> None:
        if cpu.threads == 1:
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        measure(forward, (1,), (1, 2), cpu.set_threads, cpu.clock)
    assert cpu.threads == 2


# -- the engine --------------------------------------------------------------------------------


def _engine(base: Path, **config) -> Engine:
    model, tokenizer = load_base(str(base))
    engine = Engine(model, tokenizer, EngineConfig.build(max_batch=4, context_length=256,
                                                         **config))
    engine.start()
    return engine


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _answer(engine: Engine, prompt: list[int]) -> list[int]:
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    handle = engine.submit(GenerationRequest("r", prompt, None, params))
    return [i for event in handle if isinstance(event, TokenEvent) for i in event.token_ids]


def test_the_engine_times_its_threads_at_start_and_answers_the_same(tiny_base, two_threads):
    timed = _engine(tiny_base)
    untimed = _engine(tiny_base, tune_cpu_threads=False)
    try:
        plan = timed.thread_plan
        assert plan is not None and untimed.thread_plan is None
        # Decode batches of 1-4 rows, then prefills up to 128 tokens, in order, each given
        # one of the counts there were; sizes left untimed were left by the rules (the most
        # threads won twice, or the time ran out) and take every thread.
        sizes = forward_sizes(4, 128)
        assert plan.sizes == sizes[: len(plan.sizes)] and set(plan.threads) <= {1, 2}
        assert (plan.sizes == sizes or plan.threads[-2:] == (2, 2)
                or plan.seconds > TOTAL_BUDGET_S)
        assert plan.beyond == 2 and plan.seconds > 0
        prompt = timed.tokenizer.encode("Tell me a story about a dog")
        assert _answer(timed, prompt) == _answer(untimed, prompt)
    finally:
        timed.shutdown()
        untimed.shutdown()


def test_each_forward_runs_with_the_threads_planned_for_its_size(tiny_base, two_threads):
    engine = _engine(tiny_base, tune_cpu_threads=False)
    try:
        prompt = engine.tokenizer.encode("hi")
        for one_row in (1, 2):  # the last forward of an answer is a decode of its one row
            engine.runner.threads = ThreadPlan((1, 4), (one_row, 2), 2, 0.0)
            _answer(engine, prompt)
            assert engine._call(torch.get_num_threads) == one_row
    finally:
        engine.shutdown()


def test_with_one_thread_there_is_nothing_to_time(tiny_base):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = _engine(tiny_base, tune_cpu_threads=True)
        assert engine.thread_plan is None
        engine.shutdown()
    finally:
        torch.set_num_threads(before)


def _failing_timing(monkeypatch) -> None:
    def fail(self, tokens: int) -> None:
        raise RuntimeError("no memory for the timing forward")

    monkeypatch.setattr(ModelRunner, "forward_for_timing", fail)


def test_timing_that_fails_by_default_leaves_every_thread_and_serves(
        tiny_base, two_threads, monkeypatch, caplog):
    _failing_timing(monkeypatch)
    engine = _engine(tiny_base)
    try:
        assert engine.thread_plan is None and "timing CPU threads failed" in caplog.text
        assert engine._call(torch.get_num_threads) == 2
        assert len(_answer(engine, engine.tokenizer.encode("hi"))) == 6
    finally:
        engine.shutdown()


def test_timing_asked_for_that_fails_stops_the_start(tiny_base, two_threads, monkeypatch):
    _failing_timing(monkeypatch)
    with pytest.raises(RuntimeError, match="no memory for the timing forward"):
        _engine(tiny_base, tune_cpu_threads=True)
