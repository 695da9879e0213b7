"""The call record: what one call did, bound per call with `recording()` and reached from
anywhere in that call with `current_record()`; its adapter label."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.adapters import AdapterVersion
from server.core import CallRecord, current_record, recording
from server.core.record import UNRESOLVED

ALPHA = AdapterVersion("alpha", 1, Path("/nowhere"), "", True)


def test_a_fresh_record_is_no_chat_and_names_no_adapter() -> None:
    record = CallRecord()
    assert not record.chat and record.adapter_key is None and record.summaries == []


def test_a_chat_on_the_bare_base_is_labelled_none() -> None:
    record = CallRecord()
    record.begin_chat("")
    assert record.chat and record.adapter_key is None
    record.resolve(None)
    assert record.resolved and record.adapter_key is None


def test_a_resolved_adapter_is_labelled_by_its_key() -> None:
    record = CallRecord()
    record.begin_chat("prod")
    record.resolve(ALPHA)
    assert record.requested == "prod" and record.adapter_key == "alpha@1"


def test_a_name_that_did_not_resolve_takes_the_one_shared_label() -> None:
    """User-typed names must not become metric labels."""
    record = CallRecord()
    record.begin_chat("no-such-adapter-" + "x" * 50)
    assert record.adapter_key == UNRESOLVED == "other"


def test_outside_any_call_the_record_is_detached_and_writes_go_nowhere() -> None:
    current_record().generated = 7
    assert current_record().generated == 0
    assert current_record() is not current_record()


def test_recording_binds_the_record_for_its_block_only() -> None:
    record = CallRecord()
    with recording(record) as bound:
        assert bound is record and current_record() is record
        current_record().generated = 3
    assert record.generated == 3 and current_record() is not record


def test_a_nested_recording_is_undone_even_when_its_block_fails() -> None:
    outer, inner = CallRecord(), CallRecord()
    with recording(outer):
        with pytest.raises(RuntimeError), recording(inner):
            raise RuntimeError("call failed")
        assert current_record() is outer


def test_concurrent_calls_each_write_their_own_record() -> None:
    async def call(tokens: int) -> CallRecord:
        with recording(CallRecord()) as record:
            await asyncio.sleep(0)  # let the other call run in between
            current_record().generated = tokens
            await asyncio.sleep(0)
            return record

    async def both() -> list[CallRecord]:
        return list(await asyncio.gather(call(1), call(2)))

    assert [r.generated for r in asyncio.run(both())] == [1, 2]
