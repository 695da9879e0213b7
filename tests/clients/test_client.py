"""The sync client: retries and deadlines on a protocol-level fake; the rest on the real server.

The fake servicer below only answers with gRPC status codes and canned chunks; it exists to make
UNAVAILABLE and slow answers happen on demand. Every behaviour of the product itself is checked
against the real server on loopback with the tiny base and the `adapters_root` adapters.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from clients.client import RetryPolicy, SwitchboardClient
from clients.errors import SwitchboardRpcError

FAST_RETRY = RetryPolicy(retries=3, initial_backoff_s=0.01, max_backoff_s=0.05)


# ---------------------------------------------------------------------- protocol fake


class FakeInference(pb_grpc.InferenceServiceServicer):
    """Fails the first `fail_first` calls with `code`, then answers; counts attempts."""

    def __init__(self, *, fail_first: int = 0, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 delay_s: float = 0.0, chunks: int = 3, fail_after_first_chunk: bool = False,
                 chunk_delay_s: float = 0.0) -> None:
        self.fail_first, self.code, self.delay_s = fail_first, code, delay_s
        self.chunks, self.fail_after_first_chunk = chunks, fail_after_first_chunk
        self.chunk_delay_s = chunk_delay_s
        self.calls = 0
        self.stream_ended = threading.Event()

    def _maybe_fail(self, context: grpc.ServicerContext) -> None:
        self.calls += 1
        if self.calls <= self.fail_first:
            context.abort(self.code, f"attempt {self.calls} refused")

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
        final = pb.ChatResponse(text="".join(f"t{i} " for i in range(self.chunks)))
        yield pb.ChatChunk(final=final, completion_tokens=self.chunks)


@dataclass
class Fake:
    servicer: FakeInference
    target: str


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> Iterator[Fake]:
    servicer = FakeInference(**getattr(request, "param", {}))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield Fake(servicer, f"127.0.0.1:{port}")
    server.stop(0)


def test_retry_policy_checks_itself_and_jitters_within_the_cap() -> None:
    with pytest.raises(ValueError, match="retries"):
        RetryPolicy(retries=-1)
    with pytest.raises(ValueError, match="max_backoff_s"):
        RetryPolicy(initial_backoff_s=1.0, max_backoff_s=0.5)
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2.0)
    rng = random.Random(0)
    delays = [[policy.delay(n, rng) for _ in range(200)] for n in range(5)]
    for n, caps in enumerate([0.1, 0.2, 0.4, 0.5, 0.5]):
        assert all(0.0 <= d <= caps for d in delays[n])
        assert max(delays[n]) > 0.8 * caps  # the full range is used, so clients spread out
    assert len(set(delays[0])) > 100


@pytest.mark.parametrize("fake", [{"fail_first": 2}], indirect=True)
def test_unary_call_retries_unavailable_then_succeeds(fake: Fake) -> None:
    with SwitchboardClient(fake.target, retry_policy=FAST_RETRY) as client:
        assert client.chat("hi").text == "ok"
    assert fake.servicer.calls == 3


@pytest.mark.parametrize("fake", [{"fail_first": 100}], indirect=True)
def test_unary_call_gives_up_after_its_retries(fake: Fake) -> None:
    policy = RetryPolicy(retries=2, initial_backoff_s=0.01, max_backoff_s=0.01)
    with SwitchboardClient(fake.target, retry_policy=policy) as client:
        with pytest.raises(SwitchboardRpcError) as info:
            client.chat("hi")
    assert info.value.code == "UNAVAILABLE"
    assert "refused" in info.value.details
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert fake.servicer.calls == 3


@pytest.mark.parametrize("fake", [{"fail_first": 1, "code": grpc.StatusCode.NOT_FOUND}],
                         indirect=True)
def test_other_codes_are_answers_not_retried(fake: Fake) -> None:
    with SwitchboardClient(fake.target, retry_policy=FAST_RETRY) as client:
        with pytest.raises(SwitchboardRpcError) as info:
            client.chat("hi")
    assert info.value.code == "NOT_FOUND"
    assert fake.servicer.calls == 1


@pytest.mark.parametrize("fake", [{"delay_s": 2.0}], indirect=True)
def test_timeout_is_a_deadline(fake: Fake) -> None:
    with SwitchboardClient(fake.target, timeout=5.0) as client:
        start = time.monotonic()
        with pytest.raises(SwitchboardRpcError) as info:
            client.chat("hi", timeout=0.2)
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("fake", [{"fail_first": 10_000}], indirect=True)
def test_retries_never_stretch_the_deadline(fake: Fake) -> None:
    policy = RetryPolicy(retries=10_000, initial_backoff_s=0.05, max_backoff_s=0.05)
    with SwitchboardClient(fake.target, retry_policy=policy) as client:
        start = time.monotonic()
        with pytest.raises(SwitchboardRpcError) as info:
            client.chat("hi", timeout=0.5)
    assert info.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("fake", [{"fail_first": 1}], indirect=True)
def test_stream_is_retried_while_it_has_yielded_nothing(fake: Fake) -> None:
    with SwitchboardClient(fake.target, retry_policy=FAST_RETRY) as client:
        chunks = list(client.chat_stream("hi"))
    assert [c.delta for c in chunks[:-1]] == ["t0 ", "t1 ", "t2 "]
    assert chunks[-1].final is not None and chunks[-1].final.text == "t0 t1 t2 "
    assert fake.servicer.calls == 2


@pytest.mark.parametrize("fake", [{"fail_after_first_chunk": True}], indirect=True)
def test_stream_is_not_retried_once_it_has_yielded(fake: Fake) -> None:
    received = []
    with SwitchboardClient(fake.target, retry_policy=FAST_RETRY) as client:
        with pytest.raises(SwitchboardRpcError) as info:
            for chunk in client.chat_stream("hi"):
                received.append(chunk.delta)
    assert info.value.code == "UNAVAILABLE"
    assert received == ["t0 "]
    assert fake.servicer.calls == 1


@pytest.mark.parametrize("fake", [{"chunks": 1000, "chunk_delay_s": 0.01}], indirect=True)
def test_leaving_a_stream_early_cancels_the_call(fake: Fake) -> None:
    with SwitchboardClient(fake.target) as client:
        with client.chat_stream("hi") as stream:
            for i, _chunk in enumerate(stream):
                if i == 2:
                    break
        assert fake.servicer.stream_ended.wait(3.0), "the server never saw the cancellation"


def test_unreachable_server_is_unavailable() -> None:
    with SwitchboardClient("127.0.0.1:1", retry_policy=FAST_RETRY) as client:
        with pytest.raises(SwitchboardRpcError) as info:
            client.list_adapters()
    assert info.value.code == "UNAVAILABLE"


def test_bad_arguments_fail_before_the_wire() -> None:
    with SwitchboardClient("127.0.0.1:1") as client:
        with pytest.raises(ValueError, match="truncation"):
            client.chat("hi", truncation="newest_first")
        with pytest.raises(TypeError, match="role"):
            client.chat([{"content": "no role"}])
        with pytest.raises(TypeError, match="stop"):
            client.chat("hi", stop="###")
    with pytest.raises(ValueError, match="timeout"):
        SwitchboardClient("127.0.0.1:1", timeout=0)


# ---------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def target(tiny_base: Path, adapters_root: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[str]:
    from server.app import start_in_thread
    from server.config import ServerConfig

    work = tmp_path_factory.mktemp("client-server")
    root = shutil.copytree(adapters_root, work / "adapters")  # aliases written here stay here
    config = ServerConfig.build(base=str(tiny_base), adapters_root=root, port=0,
                                sessions_db=work / "sessions.db", default_max_new_tokens=16)
    running = start_in_thread(config)  # returns once health is SERVING
    yield f"127.0.0.1:{running.port}"
    running.stop()


@pytest.fixture
def client(target: str) -> Iterator[SwitchboardClient]:
    with SwitchboardClient(target, timeout=60) as c:
        yield c


def test_health_is_serving(client: SwitchboardClient) -> None:
    assert client.health() == "SERVING"


def test_chat_on_the_base_reports_its_accounting(client: SwitchboardClient) -> None:
    result = client.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=8)
    assert result.finish_reason in ("stop", "length")
    assert 0 < result.completion_tokens <= 8
    assert result.prompt_tokens > 0
    assert result.adapter_name == "" and result.adapter == ""
    assert result.total_s > 0 and result.total_s >= result.ttft_s >= 0
    assert result.request_id


def test_chat_names_the_adapter_version_used(client: SwitchboardClient) -> None:
    pinned = client.chat("Hello", adapter="alpha@1", max_new_tokens=4)
    assert (pinned.adapter_name, pinned.adapter_version) == ("alpha", 1)
    assert pinned.adapter == "alpha@1"
    latest = client.chat("Hello", adapter="alpha", max_new_tokens=4)
    assert latest.adapter_name == "alpha" and latest.adapter_version in (1, 2)


def test_messages_may_be_objects_with_role_and_content(client: SwitchboardClient) -> None:
    from common.conversation import Message

    as_objects = client.chat([Message("user", "Hi")], max_new_tokens=6)
    as_dicts = client.chat([{"role": "user", "content": "Hi"}], max_new_tokens=6)
    assert as_objects.text == as_dicts.text  # greedy: the same prompt gives the same answer


def test_stream_matches_the_unary_answer(client: SwitchboardClient) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]
    unary = client.chat(messages, adapter="beta", max_new_tokens=12)
    chunks = list(client.chat_stream(messages, adapter="beta", max_new_tokens=12))
    assert all(c.final is None for c in chunks[:-1])
    final = chunks[-1].final
    assert final is not None
    assert "".join(c.delta for c in chunks) == final.text == unary.text
    assert final.completion_tokens == unary.completion_tokens
    assert final.adapter == unary.adapter == "beta@1"


def test_stopping_a_stream_frees_the_request_on_the_server(client: SwitchboardClient) -> None:
    with client.chat_stream("Tell me a long story", adapter="alpha@2", max_new_tokens=100,
                            temperature=1.0, seed=3) as stream:
        next(stream)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        in_flight = {a.ref: a.in_flight for a in client.list_adapters()}
        if in_flight.get("alpha@2") == 0:
            break
        time.sleep(0.05)
    assert in_flight.get("alpha@2") == 0


def test_unknown_adapter_is_not_found_naming_what_exists(client: SwitchboardClient) -> None:
    with pytest.raises(SwitchboardRpcError) as info:
        client.chat("Hi", adapter="gamma")
    assert info.value.code == "NOT_FOUND"
    assert "alpha" in info.value.details


def test_adapter_admin_round_trip(client: SwitchboardClient) -> None:
    listed = {a.ref: a for a in client.list_adapters()}
    assert {"alpha@1", "alpha@2", "beta@1"} <= set(listed)
    assert all(a.compatible for a in listed.values())
    loaded = client.load_adapter("beta@1")
    assert loaded.adapter.ref == "beta@1" and loaded.adapter.loaded
    assert loaded.adapter.rank == 4 and loaded.adapter.memory_bytes > 0
    assert {a.ref: a.loaded for a in client.list_adapters()}["beta@1"]
    unloaded = client.unload_adapter("beta@1")
    assert unloaded.ref == "beta@1" and not unloaded.loaded
    assert not {a.ref: a.loaded for a in client.list_adapters()}["beta@1"]


def test_alias_moves_and_serves(client: SwitchboardClient) -> None:
    first = client.set_alias("prod", "alpha@1")
    assert (first.alias, first.target, first.previous) == ("prod", "alpha@1", "")
    assert client.chat("Hi", adapter="prod", max_new_tokens=2).adapter == "alpha@1"
    moved = client.set_alias("prod", "alpha@2")
    assert (moved.target, moved.previous) == ("alpha@2", "alpha@1")
    assert client.chat("Hi", adapter="prod", max_new_tokens=2).adapter == "alpha@2"
    assert {a.alias: a.target for a in client.list_aliases()}["prod"] == "alpha@2"
    assert "prod" in {a.ref: a for a in client.list_adapters()}["alpha@2"].aliases


def test_alias_history_keeps_reasons(client: SwitchboardClient) -> None:
    client.set_alias("hist", "alpha@1", reason="first try")
    moved = client.set_alias("hist", "beta@1", reason="alpha regressed")
    assert moved.previous == "alpha@1"
    moves = client.alias_history("hist")
    assert [(m.alias, m.target, m.previous, m.reason) for m in moves] == [
        ("hist", "alpha@1", "", "first try"), ("hist", "beta@1", "alpha@1", "alpha regressed")]
    assert moves[1].to_dict()["moved_at"] >= moves[0].moved_at
    assert {"hist"} <= {m.alias for m in client.alias_history()}
    with pytest.raises(SwitchboardRpcError) as info:
        client.alias_history("../x")
    assert info.value.code == "INVALID_ARGUMENT"


def test_score_gives_a_log_likelihood(client: SwitchboardClient) -> None:
    result = client.score([{"role": "user", "content": "Hi"}], "Hello, how can I help?",
                          adapter="alpha@1")
    assert result.token_count > 0 and result.prompt_tokens > 0
    assert result.log_likelihood < 0
    assert result.perplexity > 1
    assert (result.adapter_name, result.adapter_version) == ("alpha", 1)


def test_truncation_strategy_is_passed_and_reported(client: SwitchboardClient) -> None:
    result = client.chat("Hi", truncation="sliding_window", max_new_tokens=2)
    assert result.truncation["strategy"] == "sliding_window"
    assert result.truncation["applied"] is False
    assert result.truncation["budget_tokens"] > result.prompt_tokens


def test_sessions_keep_the_conversation(client: SwitchboardClient) -> None:
    first = client.chat("My name is Ada.", session_id="client-s1", max_new_tokens=4)
    assert first.session_id == "client-s1"
    second = client.chat("What is my name?", session_id="client-s1", max_new_tokens=4)
    assert second.prompt_tokens > first.prompt_tokens  # the server sent the history too
    session = client.get_session("client-s1")
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert session.messages[0]["content"] == "My name is Ada."
    assert session.messages[3]["content"] == second.text
    infos = {s.session_id: s for s in client.list_sessions()}
    assert infos["client-s1"].message_count == 4
    assert infos["client-s1"].updated_unix >= infos["client-s1"].created_unix > 0
    assert client.delete_session("client-s1") is True
    with pytest.raises(SwitchboardRpcError) as info:
        client.get_session("client-s1")
    assert info.value.code == "NOT_FOUND"


def test_an_unknown_chat_option_is_refused_naming_the_allowed_ones() -> None:
    from clients.types import chat_request_pb

    with pytest.raises(TypeError, match="temprature.*allowed.*temperature"):
        chat_request_pb("hi", temprature=0.5)
    request = chat_request_pb("hi", adapter="alpha@1", seed=3, stop=["END"])
    assert (request.adapter, request.sampling.seed, list(request.sampling.stop)) == (
        "alpha@1", 3, ["END"])
    assert request.sampling.top_p == 1.0 and request.sampling.repetition_penalty == 1.0


def test_calls_naming_an_adapter_carry_the_affinity_header():
    from switchboard.v1 import switchboard_pb2 as pb

    from clients.client import ADAPTER_AFFINITY_HEADER, with_affinity

    base = (("authorization", "Bearer k"),)
    assert with_affinity(base, pb.ChatRequest(adapter="support@3")) == (
        *base, (ADAPTER_AFFINITY_HEADER, "support"))  # every version of a name hashes alike
    assert with_affinity(base, pb.ChatRequest()) == base  # the bare base: no header
    assert with_affinity(base, pb.ListAdaptersRequest()) == base
