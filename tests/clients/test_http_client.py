"""The HTTP transport of the client: its wire mapping (no server), then the real server's HTTP
face on loopback, compared answer for answer with the gRPC transport, and the eval suite
replaying through it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

from clients.aio import AsyncSwitchboardClient
from clients.errors import SwitchboardRpcError, UnauthenticatedError
from clients.http import AsyncHttpClient, chat_body, error_of
from clients.transport import async_client_for
from evalsuite.cli import main as evalsuite_main
from evalsuite.replay import ReplayPlan, SamplingConfig, replay_all, resolve_adapter
from evalsuite.testsets import load_testset

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]


def _error(code: str, message: str = "m") -> bytes:
    return json.dumps({"error": {"message": message, "type": "t", "param": None,
                                 "code": code}}).encode()


# ---------------------------------------------------------------- the wire mapping

@pytest.mark.parametrize("status, body, code", [
    (404, _error("not_found"), "NOT_FOUND"),
    (400, _error("context_length_exceeded"), "OUT_OF_RANGE"),
    (409, _error("aborted"), "ABORTED"),
    (413, _error("request_too_large"), "RESOURCE_EXHAUSTED"),
    (429, _error("resource_exhausted"), "RESOURCE_EXHAUSTED"),
    (503, b"<html>bad gateway page</html>", "UNAVAILABLE"),
    (502, b"", "UNKNOWN"),
    (400, _error("some_openai_code"), "INVALID_ARGUMENT"),
])
def test_http_errors_become_status_names(status, body, code) -> None:
    assert error_of(status, body).code == code


def test_a_refused_key_is_the_same_exception_type_as_over_grpc() -> None:
    err = error_of(401, _error("unauthenticated", "needs an API key"))
    assert isinstance(err, UnauthenticatedError)
    assert err.details == "needs an API key"


def test_chat_body_keeps_the_grpc_clients_defaults() -> None:
    body = chat_body("hi", False, seed=0)
    assert body["model"] == "__base__" and body["temperature"] == 0.0 and body["seed"] == 0
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert "max_tokens" not in body and "truncation" not in body
    streamed = chat_body(HELLO, True, adapter="beta", max_new_tokens=4, truncation="error")
    assert (streamed["model"], streamed["max_tokens"], streamed["truncation"]) == (
        "beta", 4, "error")
    assert streamed["stream_options"] == {"include_usage": True}
    with pytest.raises(TypeError, match="unknown chat option"):
        chat_body("hi", False, colour="red")


def test_the_target_picks_the_transport() -> None:
    async def pick() -> tuple[type, type]:
        http = async_client_for("http://127.0.0.1:1")
        grpc = async_client_for("127.0.0.1:1")
        await http.close()
        await grpc.close()
        return type(http), type(grpc)

    assert asyncio.run(pick()) == (AsyncHttpClient, AsyncSwitchboardClient)


# ---------------------------------------------------------------- against the real server

@pytest.fixture(scope="module")
def server(tiny_base: Path, adapters_root: Path) -> Iterator:
    from server.app import start_in_thread
    from server.config import ServerConfig

    running = start_in_thread(ServerConfig.build(
        base=str(tiny_base), adapters_root=adapters_root, port=0, device="cpu", max_batch=8,
        default_max_new_tokens=8, http_port=free_port(), sessions_db=None))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http_target(server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


def test_chat_stream_and_score_match_the_grpc_transport(server, http_target) -> None:
    async def both() -> tuple[list, list]:
        answers = []
        for client in (AsyncHttpClient(http_target, timeout=60),
                       AsyncSwitchboardClient(server.target, timeout=60)):
            async with client:
                unary = await client.chat(HELLO, adapter="alpha@1", max_new_tokens=10)
                chunks = [c async for c in client.chat_stream(HELLO, adapter="beta",
                                                               max_new_tokens=10)]
                scored = await client.score(HELLO, "hello", adapter="alpha")
                answers.append((unary, chunks, scored))
        return answers[0], answers[1]

    (unary, chunks, scored), (g_unary, g_chunks, g_scored) = asyncio.run(both())
    assert (unary.text, unary.completion_tokens, unary.prompt_tokens) == (
        g_unary.text, g_unary.completion_tokens, g_unary.prompt_tokens)
    assert (unary.adapter_name, unary.adapter_version) == ("alpha", 1)
    assert unary.request_id and unary.truncation["strategy"] == g_unary.truncation["strategy"]
    final = chunks[-1].final
    assert final is not None and final.text == "".join(c.delta for c in chunks)
    assert final.text == g_chunks[-1].final.text and final.adapter == "beta@1"
    assert final.completion_tokens == g_chunks[-1].final.completion_tokens
    assert (scored.adapter_name, scored.adapter_version) == ("alpha", 2)
    assert scored.token_count == g_scored.token_count
    assert scored.log_likelihood == pytest.approx(g_scored.log_likelihood, rel=1e-6)


def test_failures_carry_the_grpc_status_names(server, http_target) -> None:
    async def failures() -> list[SwitchboardRpcError]:
        caught = []
        async with AsyncHttpClient(http_target, timeout=30) as client:
            for call in (client.chat(HELLO, adapter="nosuch"),
                         client.chat(HELLO, max_new_tokens=100_000)):
                try:
                    await call
                except SwitchboardRpcError as err:
                    caught.append(err)
        async with AsyncHttpClient(f"http://127.0.0.1:{free_port()}", timeout=5,
                                   retries=0) as gone:
            try:
                await gone.chat(HELLO)
            except SwitchboardRpcError as err:
                caught.append(err)
        return caught

    missing, too_long, unreachable = asyncio.run(failures())
    assert missing.code == "NOT_FOUND" and "alpha@1" in missing.details
    assert too_long.code == "INVALID_ARGUMENT" and "max_tokens" in too_long.details
    assert unreachable.code == "UNAVAILABLE"


def test_the_replay_gives_the_same_turns_over_both_transports(server, http_target,
                                                              bundled_data: Path) -> None:
    domain = sorted(p for p in bundled_data.iterdir() if (p / "test.jsonl").exists())[0]
    conversations = load_testset([domain / "test.jsonl"], limit=2)

    async def replay(make_client) -> dict:
        async with make_client() as client:  # a grpc.aio channel binds to the running loop
            adapters = [await resolve_adapter(client, ref) for ref in ("__base__", "beta")]
            plan = ReplayPlan(adapters=adapters, conversations=conversations,
                              sampling=SamplingConfig(max_new_tokens=6), concurrency=2)
            return await replay_all(client, plan)

    over_http = asyncio.run(replay(lambda: AsyncHttpClient(http_target, timeout=60)))
    over_grpc = asyncio.run(replay(lambda: AsyncSwitchboardClient(server.target, timeout=60)))
    assert set(over_http) == set(over_grpc) == {"__base__", "beta@1"}
    for key, results in over_http.items():
        turns = [(t.prediction, t.score_tokens) for r in results for t in r.turns]
        assert turns == [(t.prediction, t.score_tokens) for r in over_grpc[key]
                         for t in r.turns]
        assert all(t.ok for r in results for t in r.turns)


def test_evalsuite_run_accepts_an_http_target(http_target, bundled_data: Path,
                                              tmp_path: Path) -> None:
    domain = sorted(p for p in bundled_data.iterdir() if (p / "test.jsonl").exists())[0]
    gate = tmp_path / "gate.yaml"
    gate.write_text("failure_rate: {max_value: 0}\n")
    code = evalsuite_main(["run", "--target", http_target, "--testset",
                           str(domain / "test.jsonl"), "--limit", "2", "--adapters",
                           "__base__,alpha@1", "--max-new-tokens", "4", "--bootstrap", "50",
                           "--gate", str(gate), "--out", str(tmp_path / "out"),
                           "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["candidates"] == ["alpha@1"]
    assert report["results"]["alpha@1"]["failures"] == {}
