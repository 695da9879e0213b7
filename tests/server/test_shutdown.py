"""Graceful shutdown of the real CLI server process on SIGTERM.

Health turns NOT_SERVING at once, new calls get UNAVAILABLE while the health port still answers,
a running stream finishes within the grace period and its turn is stored, the process exits 0.
A stream longer than the grace is cut, stores nothing, and the process still exits 0 promptly.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from server.sessions import SQLiteSessionStore

# Long enough (seconds on a CPU) that the stream is still running while the test probes the
# draining server; it follows its TOKENS_BEFORE_SIGTERM-th token with the signal.
FINISHING_TOKENS = 500
TOKENS_BEFORE_SIGTERM = 4
NOT_SERVING_WITHIN_S = 2.0


def health(server: ServerProcess) -> int:
    return health_pb2_grpc.HealthStub(server.channel).Check(
        health_pb2.HealthCheckRequest(service="switchboard.v1.InferenceService"),
        timeout=5).status


def long_stream(server: ServerProcess, session: str, text: str,
           max_new_tokens: int) -> Iterator[pb.ChatChunk]:
    request = pb.ChatRequest(
        messages=[pb.Message(role="user", content=text)], session_id=session,
        sampling=pb.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True,
                                   temperature=1.0, seed=7))
    return pb_grpc.InferenceServiceStub(server.channel).ChatStream(request, timeout=120)


@pytest.fixture
def start(tiny_base: Path, adapters_root: Path, tmp_path: Path) -> Iterator:
    """Starts servers on one sessions file (tmp_path/s.db); kills any left running at the end."""
    adapters = shutil.copytree(adapters_root, tmp_path / "adapters")
    started: list[ServerProcess] = []

    def start_server(grace: float) -> ServerProcess:
        started.append(ServerProcess(tiny_base, adapters, tmp_path / "s.db",
                                     tmp_path / "server.log", grace))
        return started[-1].wait_serving()

    yield start_server
    for server in started:
        server.ensure_dead()


def running(stream: Iterator[pb.ChatChunk]) -> list[pb.ChatChunk]:
    """The first chunks of a long stream, up to TOKENS_BEFORE_SIGTERM tokens, none final."""
    chunks = []
    for chunk in stream:
        assert not chunk.HasField("final"), "the long answer finished before the signal"
        chunks.append(chunk)
        if chunk.completion_tokens >= TOKENS_BEFORE_SIGTERM:
            return chunks
    pytest.fail("the stream ended without a final chunk")


def wait_not_serving(server: ServerProcess) -> float:
    """Seconds until health answers NOT_SERVING (fails after NOT_SERVING_WITHIN_S)."""
    started = time.monotonic()
    while time.monotonic() - started < NOT_SERVING_WITHIN_S:
        if health(server) == health_pb2.HealthCheckResponse.NOT_SERVING:
            return time.monotonic() - started
        time.sleep(0.02)
    pytest.fail(f"health still SERVING {NOT_SERVING_WITHIN_S}s after SIGTERM")


def test_sigterm_drains_finishes_the_running_stream_and_keeps_its_turn(start) -> None:
    server = start(grace=60.0)
    stream = long_stream(server, "drain-a", "tell me a long story", FINISHING_TOKENS)
    chunks = running(stream)
    server.process.send_signal(signal.SIGTERM)

    wait_not_serving(server)
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.InferenceServiceStub(server.channel).Chat(pb.ChatRequest(
            messages=[pb.Message(role="user", content="hi")]), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    assert "shutting down; retry on another replica" in info.value.details(), info.value
    assert health(server) == health_pb2.HealthCheckResponse.NOT_SERVING  # still answering

    chunks += list(stream)
    final = chunks[-1].final
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == FINISHING_TOKENS
    assert "".join(c.delta for c in chunks) == final.text
    assert server.process.wait(timeout=60) == 0, server.text()[-3000:]
    assert "every call in flight finished" in server.text()

    again = start(grace=1.0)
    stored = pb_grpc.SessionServiceStub(again.channel).GetSession(
        pb.GetSessionRequest(session_id="drain-a"), timeout=30)
    assert [(m.role, m.content) for m in stored.messages] == [
        ("user", "tell me a long story"), ("assistant", final.text)]


def test_a_stream_longer_than_the_grace_is_cut_and_leaves_no_partial_turn(
        start, tmp_path: Path) -> None:
    server = start(grace=0.5)
    done = list(long_stream(server, "drain-b", "first question", 4))
    assert done[-1].final.finish_reason == pb.FINISH_REASON_LENGTH
    stream = long_stream(server, "drain-b", "second question, answered at length", 1900)
    running(stream)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)

    with pytest.raises(grpc.RpcError) as info:
        for chunk in stream:
            assert not chunk.HasField("final"), "the stream outlived the grace period"
    assert info.value.code() != grpc.StatusCode.OK
    assert server.process.wait(timeout=30) == 0, server.text()[-3000:]
    assert time.monotonic() - signalled < 15.0
    assert "still running after the 0.5s grace; cancelling them" in server.text()

    store = SQLiteSessionStore(tmp_path / "s.db")
    try:
        session = store.get("drain-b")
    finally:
        store.close()
    assert session is not None
    assert [(m.role, m.content) for m in session.messages] == [
        ("user", "first question"), ("assistant", done[-1].final.text)]
