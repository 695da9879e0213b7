"""The scheduler as pure bookkeeping: fabricated model outputs, no model, no torch forward.

A step here is what the engine does with a plan (style rule 9): schedule, fabricate one token
per row, abort the rows whose caller left meanwhile, update. Adapter residency is a fake that
records every `try_pin` and `want`, so each test can say exactly what was pinned and when.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from server.errors import QueueFullError, RowFailedError
from server.output import OutputProcessor
from server.request import GenerationRequest, Request, RequestHandle, RequestStatus
from server.sampling import SamplingParams
from server.scheduler import RowOutput, Scheduler, SchedulerConfig, StepPlan

EOS = 0
MAX_CONTEXT = 64


class CharDecoder:
    """A real (if trivial) tokenizer: token id n is the character chr(n); 0 is special."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != EOS or not skip_special_tokens)


class FakeResidency:
    """The adapter cache as the scheduler sees it: `resident` adapters have slots; every
    successful pin, every miss and every `want` is recorded in call order."""

    def __init__(self, *resident: str) -> None:
        self.slots: dict[str, int] = {}
        self.pins: list[str] = []
        self.misses: list[str] = []
        self.wants: list[tuple[str, Path | None]] = []
        for key in resident:
            self.make_resident(key)

    def make_resident(self, key: str) -> int:
        self.slots[key] = len(self.slots) + 1  # slot 0 is the bare base
        return self.slots[key]

    def try_pin(self, key: str) -> int | None:
        slot = self.slots.get(key)
        (self.pins if slot is not None else self.misses).append(key)
        return slot

    def want(self, key: str, path: Path | None) -> None:
        self.wants.append((key, path))


def make_request(rid: str, prompt_len: int = 3, adapter: str | None = None,
                 deadline: float | None = None, on_cancel=None, **sampling) -> Request:
    sampling.setdefault("max_new_tokens", 8)
    params = SamplingParams(**sampling)
    prompt = [ord("a")] * prompt_len
    path = Path("/adapters") / adapter if adapter is not None else None
    spec = GenerationRequest(rid, prompt, adapter, params, deadline, adapter_path=path)
    handle = RequestHandle(rid, OutputProcessor(CharDecoder(), prompt, params.stop), prompt_len,
                           on_cancel=on_cancel)
    return Request(spec=spec, handle=handle, sampling=params, sampler=None)


def make_scheduler(adapters: FakeResidency | None = None, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), eos_token_ids={EOS}, max_context=MAX_CONTEXT,
                     adapters=adapters if adapters is not None else FakeResidency())


def step(scheduler: Scheduler, token_for: Callable[[Request], int | BaseException] = (
        lambda r: ord("x"))) -> tuple[StepPlan, list[RowOutput]]:
    """One engine step with a fabricated model: `token_for(request)` is each row's token."""
    plan = scheduler.schedule()
    tokens = {r: token_for(r) for r in plan.rows}
    scheduler.abort_running(plan)
    return plan, scheduler.update_from_output(plan, tokens)


def ids(requests) -> list[str]:
    return [r.request_id for r in requests]


# -- status ----------------------------------------------------------------------------------


def test_status_order_makes_finished_one_comparison():
    unfinished = [RequestStatus.WAITING, RequestStatus.WAITING_FOR_ADAPTER, RequestStatus.RUNNING]
    assert sorted(RequestStatus)[: len(unfinished)] == unfinished
    for status in RequestStatus:
        assert status.is_finished == (status >= RequestStatus.FINISHED_STOPPED)
    assert not any(s.is_finished for s in unfinished)


def test_finished_statuses_map_to_wire_reasons():
    request = make_request("r")
    expected = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_CANCELLED: "cancelled", RequestStatus.RUNNING: None,
                RequestStatus.FINISHED_ERROR: None}
    for status, reason in expected.items():
        request.status = status
        assert request.finish_reason == reason


def test_config_rejects_a_bad_field_by_name():
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1, got 0"):
        SchedulerConfig(max_batch=0)
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        SchedulerConfig(max_prefill_tokens=True)


# -- queue and batch -------------------------------------------------------------------------


def test_queue_full_raises_at_once():
    scheduler = make_scheduler(max_queue=2)
    scheduler.add(make_request("a"))
    scheduler.add(make_request("b"))
    with pytest.raises(QueueFullError, match="2 requests waiting"):
        scheduler.add(make_request("c"))
    assert scheduler.num_waiting == 2


def test_requests_that_arrive_after_the_engine_looked_wait_for_the_next_step():
    scheduler = make_scheduler(max_batch=8)
    for rid in "ab":
        scheduler.add(make_request(rid))
    seen = scheduler.arrivals
    scheduler.add(make_request("c"))
    assert [seen, scheduler.arrivals] == [2, 3]
    assert ids(scheduler.schedule(seen).admitted) == ["a", "b"]
    assert ids(scheduler.schedule(scheduler.arrivals).admitted) == ["c"]


def test_running_rows_first_then_waiting_up_to_max_batch():
    scheduler = make_scheduler(max_batch=3)
    for rid in "ab":
        scheduler.add(make_request(rid))
    step(scheduler)
    for rid in "cde":
        scheduler.add(make_request(rid))
    plan = scheduler.schedule()
    assert ids(plan.running) == ["a", "b"] and ids(plan.admitted) == ["c"]
    assert ids(plan.rows) == ["a", "b", "c"]
    assert scheduler.num_waiting == 2


def test_a_full_batch_admits_nobody():
    scheduler = make_scheduler(max_batch=2)
    for rid in "abc":
        scheduler.add(make_request(rid))
    step(scheduler)
    plan = scheduler.schedule()
    assert ids(plan.running) == ["a", "b"] and plan.admitted == ()


def test_finished_rows_free_their_places_for_waiting_ones():
    scheduler = make_scheduler(max_batch=2)
    scheduler.add(make_request("short", max_new_tokens=1))
    scheduler.add(make_request("long"))
    scheduler.add(make_request("next"))
    _, outputs = step(scheduler)
    assert [(o.request.request_id, o.request.status) for o in outputs] == [
        ("short", RequestStatus.FINISHED_LENGTH), ("long", RequestStatus.RUNNING)]
    assert ids(scheduler.running) == ["long"]
    plan = scheduler.schedule()
    assert ids(plan.running) == ["long"] and ids(plan.admitted) == ["next"]


def test_prefill_budget_limits_admissions_but_never_starves():
    scheduler = make_scheduler(max_prefill_tokens=10)
    scheduler.add(make_request("big", prompt_len=30))  # alone over budget: admitted alone
    scheduler.add(make_request("small1", prompt_len=6))
    scheduler.add(make_request("small2", prompt_len=6))
    scheduler.add(make_request("tiny", prompt_len=4))
    assert ids(scheduler.schedule().admitted) == ["big"]
    # 6 fits, the next 6 would pass the budget and is skipped; the 4 behind it still fits.
    assert ids(scheduler.schedule().admitted) == ["small1", "tiny"]
    assert ids(scheduler.schedule().admitted) == ["small2"]


# -- how rows finish -------------------------------------------------------------------------


def test_eos_stops_unless_ignored():
    scheduler = make_scheduler()
    stops, ignores = make_request("stops"), make_request("ignores", ignore_eos=True)
    scheduler.add(stops)
    scheduler.add(ignores)
    step(scheduler, lambda r: ord("h"))
    _, outputs = step(scheduler, lambda r: EOS)
    assert [(o.request, o.token_id, o.is_eos) for o in outputs] == [
        (stops, EOS, True), (ignores, EOS, False)]
    assert stops.status == RequestStatus.FINISHED_STOPPED and stops.finish_reason == "stop"
    assert ignores.status == RequestStatus.RUNNING and ignores.num_output_tokens == 2
    assert scheduler.running == [ignores]


def test_max_new_tokens_finishes_with_length():
    scheduler = make_scheduler()
    request = make_request("r", max_new_tokens=2)
    scheduler.add(request)
    step(scheduler)
    assert request.status == RequestStatus.RUNNING
    step(scheduler)
    assert request.status == RequestStatus.FINISHED_LENGTH and request.num_output_tokens == 2
    assert not scheduler.has_work


def test_context_limit_finishes_with_length():
    scheduler = make_scheduler()
    request = make_request("r", prompt_len=MAX_CONTEXT - 2, max_new_tokens=50)
    scheduler.add(request)
    step(scheduler)
    assert request.status == RequestStatus.RUNNING  # 63 of 64 positions used
    step(scheduler)
    assert request.status == RequestStatus.FINISHED_LENGTH and request.finish_reason == "length"
    assert request.num_output_tokens == 2


def test_cancelled_and_expired_waiting_requests_leave_before_the_next_step():
    scheduler = make_scheduler()
    expired = make_request("expired", deadline=time.monotonic() - 1)
    cancelled = make_request("cancelled")
    kept = make_request("kept", deadline=time.monotonic() + 60)
    for request in (expired, cancelled, kept):
        scheduler.add(request)
    cancelled.handle.cancel()
    assert scheduler.drop_aborted_waiting() == [expired, cancelled]
    assert expired.status == cancelled.status == RequestStatus.FINISHED_CANCELLED
    assert ids(scheduler.schedule().admitted) == ["kept"]


def test_cancelled_and_expired_running_requests_leave_at_the_next_step():
    scheduler = make_scheduler()
    cancelled = make_request("cancelled", on_cancel=scheduler.note_cancel)
    deadline = time.monotonic() + 0.05
    expiring = make_request("expiring", deadline=deadline)
    other = make_request("other", deadline=deadline + 60)
    for request in (cancelled, expiring, other):
        scheduler.add(request)
    step(scheduler)
    cancelled.handle.cancel()
    while time.monotonic() < deadline:  # until the deadline has passed
        time.sleep(0.005)
    plan = scheduler.schedule()
    assert scheduler.abort_running(plan) == [cancelled, expiring]
    outputs = scheduler.update_from_output(plan, {r: ord("y") for r in plan.rows})
    assert [o.request for o in outputs] == [other]  # the aborted rows' tokens are discarded
    assert cancelled.status == expiring.status == RequestStatus.FINISHED_CANCELLED
    assert cancelled.finish_reason == "cancelled" and cancelled.num_output_tokens == 1
    assert scheduler.running == [other]


def test_a_deadline_alone_ends_its_row_with_no_cancel_noted():
    scheduler = make_scheduler()
    deadline = time.monotonic() + 0.05
    expiring, other = make_request("expiring", deadline=deadline), make_request("other")
    for request in (expiring, other):
        scheduler.add(request)
    step(scheduler)
    assert scheduler.abort_running(scheduler.schedule()) == []  # not yet
    while time.monotonic() < deadline:
        time.sleep(0.005)
    assert scheduler.abort_running(scheduler.schedule()) == [expiring]


def test_a_cancel_is_seen_only_once_noted_as_the_engine_does():
    scheduler = make_scheduler()
    request = make_request("r")  # no on_cancel: its cancel never reaches the scheduler
    scheduler.add(request)
    step(scheduler)
    request.handle.cancel()
    assert scheduler.abort_running(scheduler.schedule()) == []
    scheduler.note_cancel()
    assert scheduler.abort_running(scheduler.schedule()) == [request]


def test_a_request_cancelled_while_its_prefill_ran_never_runs():
    scheduler = make_scheduler()
    request = make_request("r", on_cancel=scheduler.note_cancel)
    scheduler.add(request)
    plan = scheduler.schedule()
    request.handle.cancel()
    assert scheduler.abort_running(plan) == [request]
    assert scheduler.update_from_output(plan, {request: ord("x")}) == []
    assert request.status == RequestStatus.FINISHED_CANCELLED and not scheduler.has_work


def test_a_row_whose_token_is_an_exception_finishes_alone():
    scheduler = make_scheduler()
    rows = [make_request(rid) for rid in ("ok1", "bad", "ok2")]
    for request in rows:
        scheduler.add(request)
    step(scheduler)
    error = RowFailedError("sampling this request failed: boom")
    _, outputs = step(scheduler, lambda r: error if r.request_id == "bad" else ord("y"))
    assert [(o.request.request_id, o.error) for o in outputs] == [
        ("ok1", None), ("bad", error), ("ok2", None)]
    assert rows[1].status == RequestStatus.FINISHED_ERROR and rows[1].finish_reason is None
    assert rows[1].num_output_tokens == 1  # the failed step produced nothing
    assert ids(scheduler.running) == ["ok1", "ok2"]
    assert all(r.status == RequestStatus.RUNNING and r.num_output_tokens == 2
               for r in (rows[0], rows[2]))


def test_an_admitted_row_that_fails_at_prefill_never_joins_the_running():
    scheduler = make_scheduler()
    scheduler.add(make_request("bad"))
    scheduler.add(make_request("ok"))
    _, outputs = step(scheduler, lambda r: ValueError("nan") if r.request_id == "bad" else 7)
    assert [o.error is not None for o in outputs] == [True, False]
    assert ids(scheduler.running) == ["ok"]


# -- adapters --------------------------------------------------------------------------------


def test_a_request_for_a_resident_adapter_is_admitted_with_its_slot_pinned():
    adapters = FakeResidency("a@1", "b@1")
    scheduler = make_scheduler(adapters)
    request = make_request("r", adapter="b@1")
    base = make_request("base")
    scheduler.add(request)
    scheduler.add(base)
    assert scheduler.schedule().admitted == (request, base)
    assert (request.slot, request.holds_pin) == (2, True)
    assert (base.slot, base.holds_pin) == (0, False)  # the bare base needs no pin
    assert adapters.pins == ["b@1"] and adapters.wants == []


def test_a_request_whose_adapter_is_not_resident_waits_and_the_ones_behind_go_ahead():
    adapters = FakeResidency("a@1")
    scheduler = make_scheduler(adapters)
    cold = make_request("cold", adapter="b@1")
    behind = [make_request("warm", adapter="a@1"), make_request("base")]
    for request in (cold, *behind):
        scheduler.add(request)

    plan, _ = step(scheduler)
    assert plan.admitted == tuple(behind)
    assert cold.status == RequestStatus.WAITING_FOR_ADAPTER and not cold.status.is_finished
    assert adapters.wants == [("b@1", Path("/adapters/b@1"))]
    assert not cold.holds_pin and adapters.pins == ["a@1"]

    adapters.make_resident("b@1")
    plan = scheduler.schedule()
    assert plan.admitted == (cold,)
    assert (cold.slot, cold.holds_pin) == (2, True) and adapters.pins == ["a@1", "b@1"]
    scheduler.update_from_output(plan, {r: ord("x") for r in plan.rows})
    assert cold.status == RequestStatus.RUNNING


def test_a_waiting_request_asks_again_each_step_until_its_adapter_arrives():
    adapters = FakeResidency()
    scheduler = make_scheduler(adapters)
    scheduler.add(make_request("r", adapter="b@1"))
    for _ in range(3):
        assert scheduler.schedule().is_empty
    assert adapters.wants == [("b@1", Path("/adapters/b@1"))] * 3  # `want` is idempotent
    assert scheduler.num_waiting == 1


def test_pins_happen_only_at_admission_one_per_admitted_request():
    adapters = FakeResidency("a@1", "b@1")
    scheduler = make_scheduler(adapters, max_batch=3, max_prefill_tokens=10)
    scheduler.add(make_request("a1", adapter="a@1", prompt_len=4))
    scheduler.add(make_request("too-long", adapter="b@1", prompt_len=9))  # over the budget
    scheduler.add(make_request("a2", adapter="a@1", prompt_len=4))
    scheduler.add(make_request("base", prompt_len=1))
    scheduler.add(make_request("no-room", adapter="b@1", prompt_len=1))  # batch is full
    plan = scheduler.schedule()
    assert ids(plan.admitted) == ["a1", "a2", "base"]
    assert adapters.pins == ["a@1", "a@1"]  # skipped requests were never even asked about
    assert adapters.misses == [] and adapters.wants == []
    scheduler.update_from_output(plan, {r: ord("x") for r in plan.rows})
    plan, _ = step(scheduler)  # a full batch decodes: its rows keep their pins, none is added
    assert ids(plan.running) == ["a1", "a2", "base"] and plan.admitted == ()
    assert adapters.pins == ["a@1", "a@1"]


def test_a_step_never_admits_more_distinct_adapters_than_are_resident():
    adapters = FakeResidency("a@1", "b@1")
    scheduler = make_scheduler(adapters, max_batch=16)
    keys = ["a@1", "b@1", "c@1", "d@1"]
    for i in range(12):
        scheduler.add(make_request(f"r{i}", adapter=keys[i % 4]))
    plan = scheduler.schedule()
    assert {r.spec.adapter for r in plan.admitted} == {"a@1", "b@1"}
    assert len(plan.admitted) == 6 and sorted(adapters.pins) == ["a@1"] * 3 + ["b@1"] * 3
    assert {key for key, _ in adapters.wants} == {"c@1", "d@1"}
    assert scheduler.num_waiting == 6


class SlottedResidency(FakeResidency):
    """A cache of `capacity` slots: a wanted adapter loads (at the end of a step) into a free
    slot or evicts an unpinned one; pinned adapters are never evicted."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.pinned: dict[str, int] = {}
        self.queue: list[str] = []

    def try_pin(self, key: str) -> int | None:
        slot = super().try_pin(key)
        if slot is not None:
            self.pinned[key] = self.pinned.get(key, 0) + 1
        return slot

    def want(self, key: str, path: Path | None) -> None:
        super().want(key, path)
        if key not in self.queue:
            self.queue.append(key)

    def unpin(self, key: str) -> None:
        self.pinned[key] -= 1

    def load_one(self) -> None:
        if not self.queue:
            return
        free = set(range(1, self.capacity + 1)) - set(self.slots.values())
        victims = [k for k in self.slots if not self.pinned.get(k)]
        if not free and not victims:
            return  # everything pinned: the load waits
        slot = min(free) if free else self.slots.pop(victims[0])
        self.slots[self.queue.pop(0)] = slot


def test_more_adapters_than_slots_all_finish_and_a_step_never_exceeds_the_slots():
    adapters = SlottedResidency(capacity=2)
    scheduler = make_scheduler(adapters, max_batch=4)
    requests = [make_request(f"r{i}", adapter=f"k{i % 5}@1", max_new_tokens=1 + i % 3)
                for i in range(15)]
    for request in requests:
        scheduler.add(request)
    for _ in range(200):
        if not scheduler.has_work:
            break
        plan, outputs = step(scheduler)
        assert len({r.spec.adapter for r in plan.rows}) <= adapters.capacity
        assert all(r.slot == adapters.slots[r.spec.adapter] for r in plan.rows)
        for out in outputs:
            if out.request.status.is_finished:
                adapters.unpin(out.request.spec.adapter)
        adapters.load_one()
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in requests)
    assert len(adapters.pins) == len(requests) and not any(adapters.pinned.values())


def test_wanted_adapters_lists_those_of_waiting_requests_until_admitted_or_cancelled():
    adapters = FakeResidency()
    scheduler = make_scheduler(adapters)
    first, second = make_request("1", adapter="a@1"), make_request("2", adapter="a@1")
    other = make_request("3", adapter="b@1")
    for request in (first, second, other, make_request("base")):
        scheduler.add(request)
    assert scheduler.wanted_adapters() == {"a@1", "b@1"}  # the bare base is not an adapter
    step(scheduler)
    assert scheduler.wanted_adapters() == {"a@1", "b@1"}  # still waiting for their loads
    first.handle.cancel()
    scheduler.drop_aborted_waiting()
    assert scheduler.wanted_adapters() == {"a@1", "b@1"}  # `second` still wants a@1
    adapters.make_resident("a@1")
    assert scheduler.schedule().admitted == (second,)
    assert scheduler.wanted_adapters() == {"b@1"}
    other.handle.cancel()
    scheduler.drop_aborted_waiting()
    assert scheduler.wanted_adapters() == frozenset()


def test_fail_waiting_for_removes_exactly_the_requests_waiting_for_that_adapter():
    adapters = FakeResidency("a@1")
    scheduler = make_scheduler(adapters, max_batch=1)
    running = make_request("running", adapter="b@1")
    adapters.make_resident("b@1")
    scheduler.add(running)
    step(scheduler)
    doomed = [make_request("d1", adapter="c@1"), make_request("d2", adapter="c@1")]
    spared = [make_request("s1", adapter="a@1"), make_request("s2", adapter="b@1"),
              make_request("s3")]
    for request in (doomed[0], *spared, doomed[1]):
        scheduler.add(request)
    assert scheduler.fail_waiting_for("c@1") == doomed
    assert all(r.status == RequestStatus.FINISHED_ERROR for r in doomed)
    assert scheduler.wanted_adapters() == {"a@1", "b@1"}
    assert scheduler.num_waiting == 3 and scheduler.running == [running]
    assert running.status == RequestStatus.RUNNING  # a running row is not the loader's business
    assert scheduler.fail_waiting_for("c@1") == []


def test_shutdown_takes_every_request():
    scheduler = make_scheduler()
    scheduler.add(make_request("running"))
    step(scheduler)
    scheduler.add(make_request("waiting", adapter="a@1"))
    assert ids(scheduler.take_running()) == ["running"]
    assert ids(scheduler.take_waiting()) == ["waiting"]
    assert not scheduler.has_work and scheduler.wanted_adapters() == frozenset()
