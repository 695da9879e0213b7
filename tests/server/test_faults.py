"""Faults on the real server on loopback: what breaks is reported precisely, nothing else stops.

A client that vanishes mid-stream frees its batch row (the `switchboard_requests_running` gauge
read over HTTP drops to zero); an adapter directory deleted while loaded lets its running
answers finish, then is NOT_FOUND while the other adapters keep serving; a session store that
cannot be written answers UNAVAILABLE saying the answer was not stored while stateless chats go
on; `kill -9` in the middle of a burst of concurrent session writes loses no completed turn and
leaves a sound database. One in-process server serves the first three; the last runs the server
as a subprocess so that it can be killed.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sqlite3
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import ServerProcess, SessionChatter, free_port
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from server.app import RunningServer, start_in_thread
from server.config import ServerConfig

SHORT = 8
# Long enough (ignoring end-of-sequence) that only a cancellation ends it within seconds.
LONG = 512
RUNNING = "switchboard_requests_running"
GENERATED = "switchboard_generation_tokens_total"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition()` held; fails the test after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def served_root(adapters_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy with one more adapter, `doomed@1` (alpha@1's weights), to delete."""
    root = tmp_path_factory.mktemp("faults") / "adapters"
    shutil.copytree(adapters_root, root)
    shutil.copytree(root / "alpha" / "1", root / "doomed" / "1")
    return root


@pytest.fixture(scope="module")
def sessions_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults-db") / "sessions.db"


@pytest.fixture(scope="module")
def server(tiny_base: Path, served_root: Path, sessions_db: Path) -> Iterator[RunningServer]:
    config = ServerConfig.build(
        base=str(tiny_base), adapters_root=served_root, port=0, device="cpu", max_batch=8,
        max_loaded_adapters=4, default_max_new_tokens=SHORT, max_new_tokens_limit=512,
        metrics_port=free_port(), sessions_db=sessions_db, shutdown_grace_seconds=1.0,
    )
    running = start_in_thread(config)
    yield running
    running.stop()


def chat_request(text: str = "hello there", adapter: str = "", max_new_tokens: int = SHORT,
                 ignore_eos: bool = False, session_id: str = "",
                 system: bool = True) -> pb.ChatRequest:
    messages = [pb.Message(role="system", content="Be brief.")] if system else []
    messages.append(pb.Message(role="user", content=text))
    return pb.ChatRequest(messages=messages, adapter=adapter, session_id=session_id,
                          sampling=pb.SamplingParams(max_new_tokens=max_new_tokens,
                                                     ignore_eos=ignore_eos))


def metric(server: RunningServer, name: str, absent: float | None = None) -> float:
    """The sum of every series of `name` on the server's /metrics page; `absent` when it has
    none yet (a labelled counter gets its first series on its first increment)."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith((f"{name} ", f"{name}{{"))]
    if not values and absent is not None:
        return absent
    assert values, f"{name} is not exported"
    return sum(values)


def assert_still_serving(infer: pb_grpc.InferenceServiceStub, adapter: str = "") -> None:
    reply = infer.Chat(chat_request(adapter=adapter, max_new_tokens=2), timeout=60)
    assert reply.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


# ---------------------------------------------------------------- a client that vanishes


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, infer) -> None:
    wait_until(lambda: metric(server, RUNNING) == 0, 30, "the batch is idle before the test")
    before = metric(server, GENERATED, absent=0.0)
    gone = grpc.insecure_channel(server.target)
    stream = pb_grpc.InferenceServiceStub(gone).ChatStream(
        chat_request(adapter="alpha@1", max_new_tokens=LONG, ignore_eos=True), timeout=120)
    for _ in range(3):
        assert not next(stream).HasField("final")
    wait_until(lambda: metric(server, RUNNING) == 1, 10, "the stream holds a row")

    gone.close()  # the client process "dies": its connection closes mid-answer
    wait_until(lambda: metric(server, RUNNING) == 0, 5, "the row is freed")
    generated = metric(server, GENERATED)
    assert generated - before < LONG  # the answer was cut short, not run to its end
    # The engine steps a later request; had the gone client's row survived, those steps would
    # have produced its tokens too. The counter is bumped just after a step's tokens are sent.
    reply = infer.Chat(chat_request(max_new_tokens=4, ignore_eos=True), timeout=60)
    assert reply.usage.completion_tokens == 4
    wait_until(lambda: metric(server, GENERATED) >= generated + 4, 10, "the later tokens counted")
    assert metric(server, GENERATED) == generated + 4, "tokens still generated for a gone client"


# ---------------------------------------------------------------- an adapter deleted in use


def test_an_adapter_deleted_while_loaded_finishes_its_answers_then_is_not_found(
        server, infer, admin, served_root) -> None:
    infer.Chat(chat_request(adapter="doomed@1", max_new_tokens=2), timeout=60)  # loaded
    running = [infer.ChatStream(chat_request(adapter="doomed@1", max_new_tokens=120,
                                             ignore_eos=True), timeout=120) for _ in range(2)]
    for stream in running:
        assert not next(stream).HasField("final")  # streaming on doomed@1

    shutil.rmtree(served_root / "doomed" / "1")

    for stream in running:
        final = [c for c in stream if c.HasField("final")][-1].final
        assert final.finish_reason == pb.FINISH_REASON_LENGTH
        assert final.usage.completion_tokens == 120
        assert (final.adapter.name, final.adapter.version) == ("doomed", 1)
    admin.ListAdapters(pb.ListAdaptersRequest(), timeout=30)  # rescans the disk
    for ref in ("doomed@1", "doomed"):
        with pytest.raises(grpc.RpcError) as info:
            infer.Chat(chat_request(adapter=ref), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
        details = info.value.details()
        assert f"adapter {ref!r} not found" in details and "alpha@1" in details, details
    for other in ("alpha@1", "alpha@2", "beta"):
        assert_still_serving(infer, other)


def test_an_adapter_deleted_before_its_first_load_is_not_found_without_a_server_path(
        server, infer, admin, served_root) -> None:
    shutil.copytree(served_root / "alpha" / "1", served_root / "vanishing" / "1")
    listed = admin.ListAdapters(pb.ListAdaptersRequest(), timeout=30)  # the registry knows it
    assert "vanishing" in {a.name for a in listed.adapters}
    shutil.rmtree(served_root / "vanishing")

    with pytest.raises(grpc.RpcError) as info:
        infer.Chat(chat_request(adapter="vanishing@1"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
    assert str(served_root) not in info.value.details()
    assert_still_serving(infer, "alpha@1")


# ---------------------------------------------------------------- the session store fails


def test_a_session_store_write_failure_is_reported_and_stateless_chats_go_on(
        server, infer, sessions, sessions_db) -> None:
    first = infer.Chat(chat_request("my name is Ada", session_id="locked-1"), timeout=60)
    question = chat_request("what is my name?", session_id="locked-1", system=False)
    # Another process holds the file's write lock (a backup, the sqlite3 shell): the store's
    # writes fail after its busy timeout. As root a read-only file would still be writable.
    holder = sqlite3.connect(sessions_db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(grpc.RpcError) as info:
            infer.Chat(question, timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        details = info.value.details()
        assert "session store could not be written (database is locked)" in details, details
        assert "the answer was not stored" in details, details
        assert_still_serving(infer)  # stateless chats do not touch the store
        held = sessions.GetSession(pb.GetSessionRequest(session_id="locked-1"), timeout=30)
        assert len(held.messages) == 3  # reads go on; the failed turn left nothing
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    second = infer.Chat(question, timeout=60)
    held = sessions.GetSession(pb.GetSessionRequest(session_id="locked-1"), timeout=30)
    assert [(m.role, m.content) for m in held.messages] == [
        ("system", "Be brief."), ("user", "my name is Ada"), ("assistant", first.text),
        ("user", "what is my name?"), ("assistant", second.text)]


def test_an_unusable_sessions_path_fails_startup_naming_it(tiny_base, served_root,
                                                           tmp_path) -> None:
    config = ServerConfig(base=str(tiny_base), adapters_root=served_root, port=0, device="cpu",
                          sessions_db=tmp_path)  # a directory
    with pytest.raises(RuntimeError) as info:
        start_in_thread(config)
    assert f"cannot open session database {tmp_path}: " in str(info.value)
    assert "is a directory" in str(info.value)


# ---------------------------------------------------------------- kill -9 during a burst

CHATTERS = 8


def test_kill_9_during_a_burst_of_session_writes_loses_no_completed_turn(
        tiny_base, adapters_root, tmp_path) -> None:
    adapters = shutil.copytree(adapters_root, tmp_path / "adapters")
    db, log = tmp_path / "burst.db", tmp_path / "server.log"
    first = ServerProcess(tiny_base, adapters, db, log)
    second = None
    try:
        first.wait_serving()
        chatters = [SessionChatter(first.target, f"burst-{i}") for i in range(CHATTERS)]
        for chatter in chatters:
            chatter.start()
        wait_until(lambda: min(c.turns for c in chatters) >= 2 or any(c.error for c in chatters),
                   120, "every chatter completes two turns")
        assert not any(c.error for c in chatters), [c.error for c in chatters]
        first.process.send_signal(signal.SIGKILL)  # the store is written all the time now
        assert first.process.wait(timeout=60) == -signal.SIGKILL
        for chatter in chatters:
            chatter.join(timeout=60)
            assert not chatter.is_alive() and chatter.error is not None
        with contextlib.closing(sqlite3.connect(db)) as check:
            assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

        second = ServerProcess(tiny_base, adapters, db, log).wait_serving()
        for chatter in chatters:
            after = second.client.get_session(chatter.session, timeout=30).messages
            # Every acknowledged turn, exactly; at most one more, whole, whose reply the kill
            # swallowed after it was stored.
            assert after[:len(chatter.acked)] == chatter.acked, chatter.session
            assert len(after) - len(chatter.acked) in (0, 2), chatter.session
            assert [m["role"] for m in after] == ["user", "assistant"] * (len(after) // 2)
    finally:
        first.ensure_dead()
        if second is not None:
            second.ensure_dead()
