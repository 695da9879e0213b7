"""The core's two worker pools: sized by the settings, kept apart so slow work never holds a
chat's step, and each task run in its caller's context (request id, call record)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.core import CallRecord, Executors, current_record, recording
from server.logging_setup import current_request_id, request_context

GUARD_S = 30.0  # only bounds a failure that would otherwise hang; never reached when it passes


@pytest.mark.parametrize(("chat", "slow", "field"), [(0, 1, "chat_workers"),
                                                      (1, 0, "slow_workers")])
def test_a_pool_without_workers_is_refused(chat: int, slow: int, field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be >= 1, got 0"):
        Executors(chat_workers=chat, slow_workers=slow)


def thread_name() -> str:
    return threading.current_thread().name


def test_quick_and_slow_work_run_on_their_own_pools(executors: Executors) -> None:
    async def both() -> tuple[str, str]:
        return await executors.quick(thread_name), await executors.slow_work(thread_name)

    quick, slow = asyncio.run(both())
    assert quick.startswith("switchboard-chat") and slow.startswith("switchboard-slow")


def test_a_full_slow_pool_does_not_hold_a_chats_step(executors: Executors) -> None:
    gate = threading.Event()

    async def chat_while_slow_is_busy() -> str:
        slow = asyncio.ensure_future(executors.slow_work(gate.wait, GUARD_S))
        try:
            return await executors.quick(lambda: "tokenized")
        finally:
            gate.set()
            assert await slow is True  # the gate, not the guard, ended the slow work

    assert asyncio.run(chat_while_slow_is_busy()) == "tokenized"


def test_work_runs_in_its_callers_request_and_record(executors: Executors) -> None:
    def note() -> tuple[str, CallRecord]:
        current_record().generated = 5
        return current_request_id(), current_record()

    record = CallRecord()
    with request_context("req-42"), recording(record):
        request_id, seen = asyncio.run(executors.quick(note))
    assert request_id == "req-42" and seen is record and record.generated == 5
