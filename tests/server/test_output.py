"""What a caller reads: token ids pushed by the engine become text deltas and one finish.

No model and no engine thread: the tests push token ids into a `RequestHandle` the way the
engine does (`push_token`, `push_finish`, `push_error`) and read its events, with trivial but
real tokenizers. Stop strings and detokenizing happen here, on the reading side.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.errors import RowFailedError
from server.output import OutputProcessor
from server.request import (
    FinishEvent,
    GenerationRequest,
    Request,
    RequestHandle,
    TokenEvent,
    Wakeups,
)
from server.sampling import SamplingParams
from server.scheduler import Scheduler, SchedulerConfig

EOS = 0
PROMPT = [ord(c) for c in "hi "]


class CharDecoder:
    """A real (if trivial) tokenizer: token id n is the character chr(n); 0 is special."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != EOS or not skip_special_tokens)


class WordDecoder:
    """A word-level tokenizer: token id n is WORDS[n], several characters; 0 is special."""

    WORDS = ["<eos>", "Sure", ".", "\n\nQ:", " more"]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.WORDS[i] for i in ids if i != EOS or not skip_special_tokens)


class ByteDecoder:
    """A byte-level tokenizer: token id n is the byte n, so one character may take several."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def make_handle(stop=(), *, tokenizer=None, prompt=PROMPT, on_cancel=None) -> RequestHandle:
    output = OutputProcessor(tokenizer or CharDecoder(), prompt, stop)
    return RequestHandle("r", output, len(prompt), on_cancel=on_cancel)


def push_text(handle: RequestHandle, text: str, finish=None) -> None:
    """Push one token per character; the last one carries `finish`."""
    for i, char in enumerate(text):
        handle.push_token(ord(char), False, finish if i == len(text) - 1 else None)


def read(handle: RequestHandle) -> tuple[list[str], FinishEvent]:
    """Every event of a finished stream: the text deltas, then the finish."""
    events = list(handle)
    *tokens, finish = events
    assert all(isinstance(e, TokenEvent) for e in tokens) and isinstance(finish, FinishEvent)
    return [e.text_delta for e in tokens], finish


def next_delta(handle: RequestHandle, char: str) -> str:
    handle.push_token(ord(char), False, None)
    event = next(handle)
    assert isinstance(event, TokenEvent)
    return event.text_delta


# -- text and stop strings -------------------------------------------------------------------


def test_tokens_stream_as_text_and_the_finish_carries_the_whole_answer():
    handle = make_handle()
    assert [next_delta(handle, c) for c in "ok"] == ["o", "k"]
    handle.push_token(ord("!"), False, "length")
    deltas, finish = read(handle)
    assert deltas == ["!"]
    assert (finish.reason, finish.text) == ("length", "ok!")


def test_tokens_the_reader_has_not_read_yet_come_as_one_event():
    """A reader behind the engine takes what piled up in one event (one message on the wire),
    with every token id and the count so far; the finish still comes on its own."""
    handle = make_handle()
    push_text(handle, "hey")
    event = next(handle)
    assert (event.text_delta, event.token_ids, event.completion_tokens) == (
        "hey", [ord(c) for c in "hey"], 3)
    push_text(handle, "!?", finish="length")
    tokens, finish = list(handle)
    assert (tokens.text_delta, tokens.token_ids, tokens.completion_tokens) == (
        "!?", [ord("!"), ord("?")], 5)
    assert (finish.reason, finish.text) == ("length", "hey!?")


def test_stop_string_truncates_text_and_holds_back_partial_matches():
    handle = make_handle(stop=("END",))
    assert [next_delta(handle, c) for c in "okEN"] == ["o", "k", "", ""]  # "EN" may be "END"
    handle.push_token(ord("D"), False, None)
    delta, finish = list(handle)
    assert delta.text_delta == ""
    assert (finish.reason, finish.text) == ("stop", "ok")


def test_a_held_back_prefix_is_released_when_it_stops_matching():
    handle = make_handle(stop=("END",))
    assert [next_delta(handle, c) for c in "aENx"] == ["a", "", "", "ENx"]
    assert [next_delta(handle, c) for c in "EEN"] == ["", "E", ""]  # the match restarts
    handle.push_token(ord("D"), False, None)
    assert read(handle)[1].text == "aENxE"


def test_the_earliest_of_several_stop_strings_wins():
    handle = make_handle(stop=("world", "lo"))
    push_text(handle, "hello world")
    deltas, finish = read(handle)
    assert (finish.reason, finish.text) == ("stop", "hel")
    assert "".join(deltas) == "hel"


def test_a_stop_string_inside_one_token_cuts_that_token():
    handle = make_handle(stop=("\n\n",), tokenizer=WordDecoder(), prompt=[1])
    for token in (1, 2, 3, 4):  # "Sure" "." "\n\nQ:" " more"
        handle.push_token(token, False, None)
    deltas, finish = read(handle)
    assert deltas == ["Sure."]  # the tokens after the stop string are not read
    assert (finish.reason, finish.text, finish.completion_tokens) == ("stop", "Sure.", 3)


def test_a_stop_string_is_looked_for_in_the_answer_only():
    handle = make_handle(stop=("END",), prompt=[ord(c) for c in "say EN"])
    push_text(handle, "D.", finish="length")
    assert read(handle)[1].text == "D."


@pytest.mark.parametrize("finish", ["length", "stop", "cancelled"])
def test_deltas_add_up_to_the_final_text_however_the_stream_ends(finish):
    handle = make_handle(stop=("END", "xyz"))
    push_text(handle, "one ENxy two EN")  # ends on a partial match, still held back
    if finish == "cancelled":
        handle.push_finish("cancelled")
    else:
        handle.push_token(EOS, finish == "stop", finish)
    deltas, event = read(handle)
    assert event.reason == finish
    assert "".join(deltas) == event.text == "one ENxy two EN"


def test_an_incomplete_utf8_character_is_held_back_until_its_last_byte():
    handle = make_handle(tokenizer=ByteDecoder(), prompt=[ord(">")])
    deltas = []
    for token in "é€!".encode():
        handle.push_token(token, False, None)
        deltas.append(next(handle).text_delta)
    assert deltas == ["", "é", "", "", "€", "!"]


def test_eos_token_is_counted_but_is_not_text():
    handle = make_handle(tokenizer=ByteDecoder(), prompt=[ord(">")])
    push_text(handle, "ok")
    handle.push_token(ord("$"), True, "stop")  # whatever its id would decode to
    deltas, finish = read(handle)
    assert "".join(deltas) == finish.text == "ok"
    assert finish.completion_tokens == 3


# -- the handle ------------------------------------------------------------------------------


def test_a_stop_string_cancels_the_handle_and_finishes_with_reason_stop():
    cancels = []
    handle = make_handle(stop=("END",), on_cancel=lambda: cancels.append(True))
    push_text(handle, "okEND")
    handle.push_token(ord("!"), False, None)  # the engine went on before it saw the cancel
    handle.push_finish("cancelled")  # ... then freed the row
    deltas, finish = read(handle)
    assert (finish.reason, finish.text, "".join(deltas)) == ("stop", "ok", "ok")
    assert handle.cancelled and cancels == [True]
    assert finish.completion_tokens == 5


def test_a_stop_string_frees_the_engine_row_at_the_next_step():
    scheduler = Scheduler(SchedulerConfig(), eos_token_ids={EOS}, max_context=64,
                          adapters=None)  # bare-base requests never ask for an adapter

    def make_request(rid: str, stop: tuple[str, ...]) -> Request:
        params = SamplingParams(max_new_tokens=20, stop=stop)
        return Request(spec=GenerationRequest(rid, PROMPT, None, params),
                       handle=make_handle(stop, on_cancel=scheduler.note_cancel),
                       sampling=params, sampler=None)

    request, other = make_request("r", ("END",)), make_request("o", ())
    scheduler.add(request)
    scheduler.add(other)
    for char in "END":
        plan = scheduler.schedule()
        assert scheduler.abort_running(plan) == []
        for out in scheduler.update_from_output(plan, {r: ord(char) for r in plan.rows}):
            out.request.handle.push_token(out.token_id, out.is_eos, None)
    assert not request.handle.cancelled  # nothing is read yet
    *tokens, finish = [*request.handle]  # reading "D" finds the stop string
    assert [t.text_delta for t in tokens] == [""]
    assert finish.reason == "stop" and request.handle.cancelled
    plan = scheduler.schedule()
    assert scheduler.abort_running(plan) == [request]
    scheduler.update_from_output(plan, {r: ord("x") for r in plan.rows})
    assert scheduler.running == [other]


def test_push_error_ends_iteration_by_raising():
    handle = make_handle()
    push_text(handle, "ab")
    handle.push_error(RowFailedError("sampling this request failed"))
    handle.push_token(ord("c"), False, "length")  # nothing after the failure is read
    events = iter(handle)
    assert next(events).text_delta == "ab"  # what came before the failure is read
    with pytest.raises(RowFailedError, match="sampling this request failed"):
        next(events)
    assert list(handle) == []


def test_result_returns_the_finish_or_raises_the_failure():
    handle = make_handle()
    push_text(handle, "ok", finish="length")
    assert handle.result().text == "ok"
    failed = make_handle()
    failed.push_error(ValueError("engine step failed"))
    with pytest.raises(ValueError, match="engine step failed"):
        failed.result()


def test_cancel_before_any_token_finishes_with_cancelled_and_no_text():
    handle = make_handle()
    handle.cancel()
    assert handle.cancelled
    handle.push_finish("cancelled")
    deltas, finish = read(handle)
    assert deltas == [] and (finish.reason, finish.text) == ("cancelled", "")
    assert (finish.completion_tokens, finish.ttft_s) == (0, None)
    assert 0 <= finish.queue_wait_s <= finish.total_s  # never admitted: it waited throughout


def test_a_reader_waits_for_tokens_pushed_from_another_thread():
    handle = make_handle()

    def engine() -> None:
        for char in "hey":
            time.sleep(0.005)
            handle.push_token(ord(char), False, "length" if char == "y" else None)

    thread = threading.Thread(target=engine)
    thread.start()
    deltas, finish = read(handle)
    thread.join()
    # One event per token when the reader keeps up, fewer when it falls behind.
    assert "".join(deltas) == finish.text == "hey" and 1 <= len(deltas) <= 3


def push_right_after_the_readers_first_look(handle: RequestHandle) -> None:
    """Make the engine push just after the reader found nothing and before it announced that
    it sleeps: the one moment a push that skips the lock could be missed."""
    look = handle._next_ready
    pushed = []

    def look_then_push():
        event = look()
        if event is None and not pushed:
            pushed.append(True)
            handle.push_token(ord("x"), False, "length")
        return event

    handle._next_ready = look_then_push


def test_a_push_racing_a_thread_going_to_sleep_still_reaches_it():
    handle = make_handle()
    push_right_after_the_readers_first_look(handle)
    results = []
    reader = threading.Thread(target=lambda: results.append(read(handle)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "the reader slept through a push"
    assert results[0][1].text == "x"


def test_a_push_racing_a_task_going_to_sleep_still_reaches_it():
    handle = make_handle()
    push_right_after_the_readers_first_look(handle)

    async def collect() -> list:
        return [event async for event in handle]

    *_, finish = asyncio.run(asyncio.wait_for(collect(), timeout=10))
    assert finish.text == "x"


def test_async_iteration_reads_the_same_events():
    handle = make_handle(stop=("END",))

    def engine() -> None:
        for char in "hi END":
            time.sleep(0.002)
            handle.push_token(ord(char), False, None)

    thread = threading.Thread(target=engine)

    async def reader() -> list:
        thread.start()
        return [event async for event in handle]

    *tokens, finish = asyncio.run(reader())
    thread.join()
    assert "".join(t.text_delta for t in tokens) == finish.text == "hi "
    assert finish.reason == "stop"


def test_the_readers_one_step_wakes_get_one_call_into_their_loop():
    """The engine gathers the async readers a step's tokens wake and wakes them together at
    the step's end: one `call_soon_threadsafe` per loop, not one per reader."""
    handles = [make_handle() for _ in range(3)]
    loop = asyncio.new_event_loop()
    calls, before_flush = [], []
    real = loop.call_soon_threadsafe

    def counted(*args):
        calls.append(args)
        return real(*args)

    loop.call_soon_threadsafe = counted
    wakeups = Wakeups()

    def engine_step() -> None:
        for handle, char in zip(handles, "abc", strict=True):
            handle.push_token(ord(char), False, None, wakeups)
        before_flush.append(len(calls))
        wakeups.flush()

    async def scenario() -> list[str]:
        readers = [asyncio.create_task(anext(handle)) for handle in handles]
        await asyncio.sleep(0.05)  # every reader has found nothing and sleeps on its flag
        thread = threading.Thread(target=engine_step)
        thread.start()
        events = await asyncio.wait_for(asyncio.gather(*readers), timeout=10)
        thread.join()
        return [event.text_delta for event in events]

    try:
        assert loop.run_until_complete(scenario()) == ["a", "b", "c"]
    finally:
        loop.close()
    assert before_flush == [0] and len(calls) == 1


def test_async_iteration_raises_the_engine_failure():
    handle = make_handle()
    handle.push_error(RowFailedError("non-finite logits"))

    async def reader() -> None:
        async for _ in handle:
            pass

    with pytest.raises(RowFailedError, match="non-finite logits"):
        asyncio.run(reader())


def test_a_reader_that_gave_up_on_a_closed_loop_does_not_break_the_engine():
    handle = make_handle()

    async def impatient() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(handle), 0.01)

    asyncio.run(impatient())  # leaves a waiter on a loop that is now closed
    push_text(handle, "ok", finish="length")  # must not raise on the engine thread
    assert read(handle)[1].text == "ok"


# -- the finish --------------------------------------------------------------------------------


def test_finish_event_carries_token_counts_and_timings():
    handle = make_handle()
    time.sleep(0.01)
    handle.admitted_at = time.monotonic()
    time.sleep(0.01)
    push_text(handle, "abc")
    handle.push_token(EOS, True, "stop")
    _, finish = read(handle)
    assert (finish.prompt_tokens, finish.completion_tokens) == (len(PROMPT), 4)
    assert 0.01 <= finish.queue_wait_s < finish.ttft_s <= finish.total_s
    assert finish.queue_wait_s == pytest.approx(handle.admitted_at - handle.arrival)
    assert finish.ttft_s == pytest.approx(handle.first_token_at - handle.arrival)
