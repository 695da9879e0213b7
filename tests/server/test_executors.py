"""Slow work never starves chats: with every slow worker (and more) stuck reading an adapter,
a chat on a resident adapter and one on the bare base still complete (real server, tiny model).

The engine's adapter read is held on purpose by wrapping `Engine._read` (the one function that
reads adapter files, for explicit loads and for scores of a non-resident adapter) with a gate
the test opens at the end; everything else is the real server.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from server.app import start_in_thread
from server.config import ServerConfig
from server.engine import Engine

SLOW_WORKERS = 2
# More blocked calls than asyncio's default pool has threads, so a server that ran slow work
# there would leave no thread for the chats' tokenize step.
BLOCKED_CALLS = max(min(32, (os.cpu_count() or 1) + 4), SLOW_WORKERS) + 1


class ReadGate:
    """Holds every read of `name`'s files until `open()`; counts the readers held."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.held = 0
        self._changed = threading.Condition()
        self._open = threading.Event()

    def wrap(self, read):  # noqa: ANN001, ANN201 - wraps Engine._read as it is
        def gated(engine: Engine, path: Path):  # noqa: ANN202
            if self.name in Path(path).parts:
                with self._changed:
                    self.held += 1
                    self._changed.notify_all()
                self._open.wait(120)
            return read(engine, path)

        return gated

    def wait_held(self, count: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.held >= count, timeout)

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[ReadGate]:
    gate = ReadGate("alpha")
    monkeypatch.setattr(Engine, "_read", gate.wrap(Engine._read))
    yield gate
    gate.open()


def test_a_chat_completes_while_slow_adapter_reads_hold_every_slow_worker(
        gate: ReadGate, tiny_base: Path, adapters_root: Path) -> None:
    config = ServerConfig.build(base=str(tiny_base), adapters_root=adapters_root, port=0,
                                device="cpu", default_max_new_tokens=4, sessions_db=None,
                                slow_workers=SLOW_WORKERS, shutdown_grace_seconds=0.5)
    server = start_in_thread(config)
    try:
        with grpc.insecure_channel(server.target) as channel:
            infer = pb_grpc.InferenceServiceStub(channel)
            admin = pb_grpc.AdapterServiceStub(channel)
            admin.LoadAdapter(pb.LoadAdapterRequest(adapter="beta"), timeout=60)
            messages = [pb.Message(role="user", content="hello")]
            slow = [admin.LoadAdapter.future(pb.LoadAdapterRequest(adapter="alpha@1"),
                                             timeout=120)]
            slow += [infer.Score.future(pb.ScoreRequest(messages=messages, continuation="hi",
                                                        adapter="alpha@2"), timeout=120)
                     for _ in range(BLOCKED_CALLS)]
            assert gate.wait_held(SLOW_WORKERS, 60), f"only {gate.held} reads started"
            for adapter in ("beta", ""):
                reply = infer.Chat(pb.ChatRequest(
                    messages=messages, adapter=adapter,
                    sampling=pb.SamplingParams(max_new_tokens=2)), timeout=30)
                assert reply.usage.completion_tokens > 0
            assert all(not call.done() for call in slow), "the slow calls were not held"
            gate.open()
            assert slow[0].result().adapter.loaded
            assert all(call.result().token_count > 0 for call in slow[1:])
    finally:
        server.stop()
