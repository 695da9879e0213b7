"""The scheduler as pure bookkeeping: fabricated model outputs, no model, no torch forward."""

from __future__ import annotations

import time

import pytest

from server.detokenize import IncrementalDetokenizer
from server.errors import QueueFullError
from server.request import GenerationRequest, Request, RequestHandle, RequestStatus
from server.sampling import SamplingParams
from server.scheduler import Scheduler, SchedulerConfig

EOS = 0


class CharDecoder:
    """A real (if trivial) tokenizer: token id n is the character chr(n); 0 is special."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != EOS or not skip_special_tokens)


def make_request(rid: str, prompt_len: int = 3, deadline: float | None = None,
                 **sampling) -> Request:
    sampling.setdefault("max_new_tokens", 8)
    prompt = [ord("a")] * prompt_len
    spec = GenerationRequest(rid, prompt, None, SamplingParams(**sampling), deadline)
    return Request(spec=spec, handle=RequestHandle(rid), sampling=spec.sampling,
                   detokenizer=IncrementalDetokenizer(CharDecoder(), prompt), sampler=None)


def make_scheduler(**config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), eos_token_ids={EOS}, max_context=64)


def step(scheduler: Scheduler, token_for) -> list:
    """One engine step with a fabricated model: `token_for(request)` is each row's token."""
    plan = scheduler.schedule()
    tokens = {r: token_for(r) for r in plan.rows}
    scheduler.abort_running(plan)
    return scheduler.update_from_output(plan, tokens, time.monotonic())


def test_status_order_makes_finished_one_comparison():
    assert not RequestStatus.RUNNING.is_finished
    assert all(s.is_finished for s in RequestStatus if s >= RequestStatus.FINISHED_STOPPED)


def test_queue_full_raises_at_once():
    scheduler = make_scheduler(max_queue=2)
    scheduler.add(make_request("a"))
    scheduler.add(make_request("b"))
    with pytest.raises(QueueFullError, match="2 requests waiting"):
        scheduler.add(make_request("c"))


def test_running_rows_first_then_waiting_up_to_max_batch():
    scheduler = make_scheduler(max_batch=3)
    for rid in "abcde":
        scheduler.add(make_request(rid))
    step(scheduler, lambda r: ord("x"))
    assert [r.request_id for r in scheduler.running] == ["a", "b", "c"]
    plan = scheduler.schedule()
    assert [r.request_id for r in plan.running] == ["a", "b", "c"] and plan.admitted == ()


def test_finished_rows_free_their_places_for_waiting_ones():
    scheduler = make_scheduler(max_batch=2)
    scheduler.add(make_request("short", max_new_tokens=1))
    scheduler.add(make_request("long"))
    scheduler.add(make_request("next"))
    outputs = step(scheduler, lambda r: ord("x"))
    assert [(o.request.request_id, o.finished) for o in outputs] == [
        ("short", True), ("long", False)]
    assert outputs[0].request.status == RequestStatus.FINISHED_LENGTH
    plan = scheduler.schedule()
    assert [r.request_id for r in plan.rows] == ["long", "next"]


def test_prefill_budget_limits_admissions_but_never_starves():
    scheduler = make_scheduler(max_prefill_tokens=10)
    scheduler.add(make_request("big", prompt_len=30))
    scheduler.add(make_request("small", prompt_len=3))
    assert [r.request_id for r in scheduler.schedule().admitted] == ["big"]
    assert [r.request_id for r in scheduler.schedule().admitted] == ["small"]


def test_eos_stops_unless_ignored_and_is_not_text():
    scheduler = make_scheduler()
    scheduler.add(make_request("stops"))
    scheduler.add(make_request("ignores", ignore_eos=True))
    step(scheduler, lambda r: ord("h"))
    outputs = step(scheduler, lambda r: EOS)
    assert [o.finished for o in outputs] == [True, False]
    stopped = outputs[0].request
    assert stopped.status == RequestStatus.FINISHED_STOPPED
    assert stopped.finish_event(time.monotonic()).text == "h"
    assert stopped.output_ids == (ord("h"), EOS)


def test_stop_string_truncates_text_and_holds_back_partial_matches():
    scheduler = make_scheduler()
    scheduler.add(make_request("r", stop=("END",), max_new_tokens=20))
    deltas = [step(scheduler, lambda r, c=c: ord(c))[0].text_delta for c in "okEN"]
    assert "".join(deltas) == "ok"  # "EN" could still become "END": held back
    last = step(scheduler, lambda r: ord("D"))[0]
    assert last.finished and last.request.finish_event(time.monotonic()).text == "ok"


def test_held_back_prefix_is_released_when_it_stops_matching():
    scheduler = make_scheduler()
    scheduler.add(make_request("r", stop=("END",), max_new_tokens=3))
    deltas = [step(scheduler, lambda r, c=c: ord(c))[0].text_delta for c in "ENx"]
    assert "".join(deltas) == "ENx"


def test_context_limit_finishes_with_length():
    scheduler = make_scheduler()
    scheduler.add(make_request("r", prompt_len=62, max_new_tokens=50))
    step(scheduler, lambda r: ord("a"))
    outputs = step(scheduler, lambda r: ord("b"))
    assert outputs[0].finished and outputs[0].request.status == RequestStatus.FINISHED_LENGTH


def test_cancelled_and_expired_requests_leave_at_the_next_step():
    scheduler = make_scheduler()
    waiting = make_request("waiting", deadline=time.monotonic() - 1)
    running = make_request("running")
    scheduler.add(running)
    step(scheduler, lambda r: ord("a"))
    scheduler.add(waiting)
    running.handle.cancel()
    assert scheduler.drop_aborted_waiting() == [waiting]
    plan = scheduler.schedule()
    assert scheduler.abort_running(plan) == [running]
    assert scheduler.update_from_output(plan, {running: ord("b")}, time.monotonic()) == []
    assert running.status == waiting.status == RequestStatus.FINISHED_CANCELLED
    assert not scheduler.has_work
    assert running.finish_event(time.monotonic()).reason == "cancelled"
