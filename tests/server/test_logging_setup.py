"""Structured logs: JSON lines carry the request id set for the RPC, across asyncio tasks."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from server.logging_setup import NO_REQUEST, configure_logging, request_context


@pytest.fixture
def captured() -> io.StringIO:
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    configure_logging("DEBUG", json_lines=True, stream=stream)
    yield stream
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def _lines(stream: io.StringIO) -> list[dict]:
    """Our test logger's lines only (asyncio logs its selector at DEBUG)."""
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if line["logger"] == "switchboard.test"]


def test_every_line_of_a_request_carries_its_id(captured: io.StringIO) -> None:
    log = logging.getLogger("switchboard.test")

    async def rpc() -> str:
        with request_context() as rid:
            log.info("start", extra={"adapter": "alpha@1"})
            await asyncio.create_task(_log_in_task(log))
        log.info("after")
        return rid

    rid = asyncio.run(rpc())
    start, in_task, after = _lines(captured)
    assert start["request_id"] == rid and in_task["request_id"] == rid
    assert start["adapter"] == "alpha@1" and start["level"] == "INFO"
    assert after["request_id"] == NO_REQUEST


async def _log_in_task(log: logging.Logger) -> None:
    log.debug("inside a child task")


def test_explicit_id_and_exceptions(captured: io.StringIO) -> None:
    log = logging.getLogger("switchboard.test")
    with request_context("outer"):
        log.info("from the engine thread", extra={"request_id": "engine-given"})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    explicit, failed = _lines(captured)
    assert explicit["request_id"] == "engine-given"
    assert failed["request_id"] == "outer" and "RuntimeError: boom" in failed["exc_info"]


def test_text_format_shows_the_id() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = list(root.handlers)
    try:
        configure_logging("INFO", json_lines=False, stream=stream)
        with request_context("rid-1"):
            logging.getLogger("t").info("hello")
    finally:
        root.handlers[:] = saved
    assert "[rid-1] hello" in stream.getvalue()
