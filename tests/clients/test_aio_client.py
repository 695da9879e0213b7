"""The asyncio client: retries and deadlines on a protocol-level fake; the rest on the real server.

The fake servicer only produces status codes and canned chunks on demand (UNAVAILABLE, slow
answers); everything the product does is checked against the real server on loopback.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from clients.aio import AsyncSwitchboardClient
from clients.client import RetryPolicy
from clients.errors import SwitchboardRpcError

FAST_RETRY = RetryPolicy(retries=3, initial_backoff_s=0.01, max_backoff_s=0.05)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


# ---------------------------------------------------------------------- protocol fake


class FakeInference(pb_grpc.InferenceServiceServicer):
    """Fails the first `fail_first` calls with UNAVAILABLE, then answers; counts attempts."""

    def __init__(self, *, fail_first: int = 0, delay_s: float = 0.0,
                 fail_after_first_chunk: bool = False, chunks: int = 3,
                 chunk_delay_s: float = 0.0) -> None:
        self.fail_first, self.delay_s = fail_first, delay_s
        self.fail_after_first_chunk, self.chunks = fail_after_first_chunk, chunks
        self.chunk_delay_s = chunk_delay_s
        self.calls = 0
        self.stream_ended = threading.Event()

    def _maybe_fail(self, context: grpc.ServicerContext) -> None:
        self.calls += 1
        if self.calls <= self.fail_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"attempt {self.calls} refused")

    def Chat(self, request: pb.ChatRequest, context: grpc.ServicerContext) -> pb.ChatResponse:
        self._maybe_fail(context)
        time.sleep(self.delay_s)
        return pb.ChatResponse(text="ok", finish_reason=pb.FINISH_REASON_STOP)

    def ChatStream(
        self, request: pb.ChatRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ChatChunk]:
        self._maybe_fail(context)
        context.add_callback(self.stream_ended.set)
        for i in range(self.chunks):
            yield pb.ChatChunk(delta=f"t{i} ", completion_tokens=i + 1)
            if self.fail_after_first_chunk:
                context.abort(grpc.StatusCode.UNAVAILABLE, "server went away")
            time.sleep(self.chunk_delay_s)
        yield pb.ChatChunk(final=pb.ChatResponse(text="done"), completion_tokens=self.chunks)


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> Iterator[tuple[FakeInference, str]]:
    servicer = FakeInference(**getattr(request, "param", {}))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.mark.parametrize("fake", [{"fail_first": 2}], indirect=True)
def test_unary_call_retries_unavailable_then_succeeds(fake: tuple[FakeInference, str]) -> None:
    servicer, target = fake

    async def go() -> str:
        async with AsyncSwitchboardClient(target, retry_policy=FAST_RETRY) as client:
            return (await client.chat("hi")).text

    assert run(go()) == "ok"
    assert servicer.calls == 3


@pytest.mark.parametrize("fake", [{"fail_first": 100}], indirect=True)
def test_unary_call_gives_up_after_its_retries(fake: tuple[FakeInference, str]) -> None:
    servicer, target = fake
    policy = RetryPolicy(retries=1, initial_backoff_s=0.01, max_backoff_s=0.01)

    async def go() -> None:
        async with AsyncSwitchboardClient(target, retry_policy=policy) as client:
            await client.chat("hi")

    with pytest.raises(SwitchboardRpcError) as info:
        run(go())
    assert info.value.code == "UNAVAILABLE"
    assert servicer.calls == 2


@pytest.mark.parametrize("fake", [{"delay_s": 2.0}], indirect=True)
def test_timeout_is_a_deadline(fake: tuple[FakeInference, str]) -> None:
    async def go() -> None:
        async with AsyncSwitchboardClient(fake[1], timeout=0.2) as client:
            await client.chat("hi")

    start = time.monotonic()
    with pytest.raises(SwitchboardRpcError) as info:
        run(go())
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("fake", [{"fail_first": 1}], indirect=True)
def test_stream_is_retried_while_it_has_yielded_nothing(fake: tuple[FakeInference, str]) -> None:
    servicer, target = fake

    async def go() -> list[str]:
        async with AsyncSwitchboardClient(target, retry_policy=FAST_RETRY) as client:
            return [c.delta async for c in client.chat_stream("hi")]

    assert run(go()) == ["t0 ", "t1 ", "t2 ", ""]
    assert servicer.calls == 2


@pytest.mark.parametrize("fake", [{"fail_after_first_chunk": True}], indirect=True)
def test_stream_is_not_retried_once_it_has_yielded(fake: tuple[FakeInference, str]) -> None:
    servicer, target = fake
    received: list[str] = []

    async def go() -> None:
        async with AsyncSwitchboardClient(target, retry_policy=FAST_RETRY) as client:
            async for chunk in client.chat_stream("hi"):
                received.append(chunk.delta)

    with pytest.raises(SwitchboardRpcError) as info:
        run(go())
    assert info.value.code == "UNAVAILABLE"
    assert received == ["t0 "]
    assert servicer.calls == 1


@pytest.mark.parametrize("fake", [{"chunks": 1000, "chunk_delay_s": 0.01}], indirect=True)
def test_leaving_a_stream_early_cancels_the_call(fake: tuple[FakeInference, str]) -> None:
    servicer, target = fake

    async def go() -> None:
        async with AsyncSwitchboardClient(target) as client:
            async with client.chat_stream("hi") as stream:
                async for chunk in stream:
                    if chunk.completion_tokens == 2:
                        break
            # The channel is still open here: the cancellation itself must reach the server.
            await asyncio.to_thread(servicer.stream_ended.wait, 3.0)

    run(go())
    assert servicer.stream_ended.is_set()


# ---------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def target(tiny_base: Path, adapters_root: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[str]:
    from server.app import start_in_thread
    from server.config import ServerConfig

    work = tmp_path_factory.mktemp("aio-client-server")
    root = shutil.copytree(adapters_root, work / "adapters")  # aliases written here stay here
    config = ServerConfig.build(base=str(tiny_base), adapters_root=root, port=0,
                                sessions_db=work / "sessions.db", default_max_new_tokens=16)
    running = start_in_thread(config)
    yield f"127.0.0.1:{running.port}"
    running.stop()


def test_health_and_chat(target: str) -> None:
    async def go() -> None:
        async with AsyncSwitchboardClient(target, timeout=60) as client:
            assert await client.health() == "SERVING"
            result = await client.chat([{"role": "user", "content": "Hi"}], adapter="alpha@1",
                                       max_new_tokens=6)
            assert result.adapter == "alpha@1"
            assert 0 < result.completion_tokens <= 6
            assert result.finish_reason in ("stop", "length")

    run(go())


def test_stream_matches_the_unary_answer(target: str) -> None:
    async def go() -> None:
        async with AsyncSwitchboardClient(target, timeout=60) as client:
            unary = await client.chat("Why?", adapter="beta", max_new_tokens=10)
            chunks = [c async for c in client.chat_stream("Why?", adapter="beta",
                                                          max_new_tokens=10)]
            final = chunks[-1].final
            assert final is not None and all(c.final is None for c in chunks[:-1])
            assert "".join(c.delta for c in chunks) == final.text == unary.text
            assert final.adapter == "beta@1"

    run(go())


def test_concurrent_calls_share_one_client(target: str) -> None:
    async def go() -> None:
        async with AsyncSwitchboardClient(target, timeout=60) as client:
            adapters = ["", "alpha@1", "alpha@2", "beta@1"]
            results = await asyncio.gather(
                *(client.chat("Hello", adapter=a, max_new_tokens=4) for a in adapters))
            assert [r.adapter for r in results] == adapters

    run(go())


def test_errors_and_admin(target: str) -> None:
    async def go() -> None:
        async with AsyncSwitchboardClient(target, timeout=60) as client:
            with pytest.raises(SwitchboardRpcError) as info:
                await client.chat("Hi", adapter="nope@9")
            assert info.value.code == "NOT_FOUND"
            refs = {a.ref for a in await client.list_adapters()}
            assert {"alpha@1", "alpha@2", "beta@1"} <= refs
            loaded = await client.load_adapter("alpha@1")
            assert loaded.adapter.loaded and loaded.adapter.rank == 8
            assert not (await client.unload_adapter("alpha@1")).loaded
            alias = await client.set_alias("stable", "beta@1")
            assert alias.target == "beta@1"
            assert {a.alias: a.target for a in await client.list_aliases()}["stable"] == "beta@1"
            score = await client.score("Hi", "Hello!", adapter="stable")
            assert score.token_count > 0 and score.log_likelihood < 0
            assert (score.adapter_name, score.adapter_version) == ("beta", 1)

    run(go())


def test_sessions(target: str) -> None:
    async def go() -> None:
        async with AsyncSwitchboardClient(target, timeout=60) as client:
            await client.chat("One", session_id="aio-s1", max_new_tokens=3)
            await client.chat("Two", session_id="aio-s1", max_new_tokens=3)
            session = await client.get_session("aio-s1")
            assert [m["content"] for m in session.messages][::2] == ["One", "Two"]
            assert "aio-s1" in {s.session_id for s in await client.list_sessions()}
            assert await client.delete_session("aio-s1")

    run(go())
