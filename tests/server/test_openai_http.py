"""The OpenAI-compatible HTTP face, driven by the real `openai` client against the real server.

One open server per module (tiny base, gRPC and HTTP on loopback, over the same core) and one
with API keys; a third server is started and drained by the SIGTERM test. The error table's
unit tests need no server.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import free_port
from starlette.responses import PlainTextResponse
from switchboard.v1 import switchboard_pb2 as pb

from server.app import RunningServer, start_in_thread
from server.config import ServerConfig
from server.errors import (
    AdapterLoadError,
    ConcurrencyLimitError,
    ContextOverflowError,
    DeadlineExceededError,
    IncompatibleAdapterError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    SessionBusyError,
    UnauthenticatedError,
    UnavailableError,
)
from server.metrics import Metrics
from server.openai.edge import HttpEdge
from server.openai.errors import PayloadTooLargeError, http_error_of
from server.runtime import Runtime

SHORT = 8
KEY = "test-api-key-0123456789"
SYSTEM = {"role": "system", "content": "Be brief."}
HELLO = [SYSTEM, {"role": "user", "content": "hello there"}]


def _config(base: Path, root: Path, **overrides) -> ServerConfig:
    settings = dict(base=str(base), adapters_root=root, port=0, device="cpu", max_batch=8,
                    max_loaded_adapters=2, default_max_new_tokens=SHORT,
                    max_new_tokens_limit=512, http_port=free_port(),
                    shutdown_grace_seconds=1.0, sessions_db=None)
    return ServerConfig.build(**(settings | overrides))


@pytest.fixture(scope="module")
def served_root(adapters_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy with an alias `stable -> alpha@1`."""
    root = tmp_path_factory.mktemp("http") / "adapters"
    shutil.copytree(adapters_root, root)
    (root / "aliases.json").write_text('{"stable": "alpha@1"}')
    return root


@pytest.fixture(scope="module")
def server(tiny_base: Path, served_root: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_in_thread(_config(
        tiny_base, served_root, metrics_port=free_port(),
        sessions_db=tmp_path_factory.mktemp("db") / "sessions.db"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def url(server: RunningServer) -> str:
    return f"http://127.0.0.1:{server.http_port}/v1"


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    # No retries: a refusal must surface as the status the server sent.
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def chat(client: openai.OpenAI, model: str = "beta", **kwargs):
    kwargs.setdefault("max_tokens", SHORT)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=HELLO, **kwargs)


def in_flight(admin, adapter: str) -> int:
    listing = admin.ListAdapters(pb.ListAdaptersRequest(), timeout=30)
    return sum(a.in_flight for a in listing.adapters if f"{a.name}@{a.version}" == adapter)


# ---------------------------------------------------------------- the error table (no server)

@pytest.mark.parametrize("error, status, code", [
    (InvalidArgumentError("x"), 400, "invalid_argument"),
    (ContextOverflowError("x"), 400, "context_length_exceeded"),
    (UnauthenticatedError("x"), 401, "unauthenticated"),
    (PermissionDeniedError("x"), 403, "permission_denied"),
    (NotFoundError("x"), 404, "not_found"),
    (IncompatibleAdapterError("x"), 409, "failed_precondition"),
    (AdapterLoadError("x"), 409, "failed_precondition"),
    (SessionBusyError("x"), 409, "aborted"),
    (PayloadTooLargeError("x"), 413, "request_too_large"),
    (ConcurrencyLimitError("x"), 429, "resource_exhausted"),
    (UnavailableError("x"), 503, "unavailable"),
    (DeadlineExceededError("x"), 504, "deadline_exceeded"),
    (RuntimeError("x"), 500, "internal"),
])
def test_each_domain_error_has_its_http_status(error, status, code) -> None:
    row = http_error_of(error)
    assert (row.status, row.code) == (status, code)


@pytest.mark.parametrize("overrides, words", [
    ({"http_port": 70000}, "http_port must be in 0..65535"),
    ({"port": 8000, "http_port": 8000}, "different from port (8000)"),
    ({"metrics_port": 9400, "http_port": 9400}, "metrics_port (9400)"),
])
def test_the_http_port_is_checked_with_the_other_ports(tmp_path, overrides, words) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        ServerConfig.build(base="b", adapters_root=tmp_path, **overrides)


def test_the_http_port_is_off_by_default_and_a_serve_flag() -> None:
    from server.cli import build_parser, config_from_args

    assert ServerConfig(base="b", adapters_root=Path(".")).http_port == 0
    args = build_parser().parse_args(["serve", "--base", "b", "--adapters-root", ".",
                                      "--http-port", "8000"])
    assert config_from_args(args, environ={}).http_port == 8000


# ---------------------------------------------------------------- chat

@pytest.mark.parametrize("model, name, version", [
    ("tiny-base", "", 0), ("__base__", "", 0), ("alpha", "alpha", 2), ("alpha@1", "alpha", 1),
    ("stable", "alpha", 1), ("beta", "beta", 1),
])
def test_chat_answers_with_each_adapter_and_the_base(client, model, name, version) -> None:
    reply = chat(client, model)
    assert reply.object == "chat.completion" and reply.model == model
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.choices[0].message.role == "assistant"
    assert 0 < reply.usage.completion_tokens <= SHORT < reply.usage.prompt_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    used = reply.model_extra["switchboard"]["adapter"]
    assert (used["name"], used["version"], used["requested"]) == (
        name, version, "" if name == "" else model)


def test_stream_deltas_add_up_to_the_unary_answer_and_usage_comes_last(client) -> None:
    chunks = list(chat(client, "beta", max_tokens=12, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] in ("stop", "length") and not any(finish[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert text == chat(client, "beta", max_tokens=12).choices[0].message.content


def test_same_greedy_answer_over_http_as_over_grpc(client, infer) -> None:
    request = pb.ChatRequest(messages=[pb.Message(**m) for m in HELLO], adapter="alpha@1",
                             sampling=pb.SamplingParams(max_new_tokens=16))
    over_grpc = infer.Chat(request, timeout=60)
    over_http = chat(client, "alpha@1", max_tokens=16)
    assert over_http.choices[0].message.content == over_grpc.text
    assert over_http.usage.completion_tokens == over_grpc.usage.completion_tokens
    assert over_http.usage.prompt_tokens == over_grpc.usage.prompt_tokens


def test_a_cancelled_stream_frees_its_row(client, admin, infer) -> None:
    stream = chat(client, "beta", max_tokens=400, stream=True,
                  extra_body={"ignore_eos": True})
    next(iter(stream))
    next(iter(stream))
    assert in_flight(admin, "beta@1") == 1
    stream.close()
    deadline = time.monotonic() + 30
    while in_flight(admin, "beta@1") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_flight(admin, "beta@1") == 0
    assert chat(client, "beta", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_switchboard_fields_keep_a_session_on_the_server(client, sessions) -> None:
    first = chat(client, "beta", extra_body={"session_id": "http-s1"})
    second = client.chat.completions.create(
        model="beta", max_tokens=SHORT, temperature=0,
        messages=[{"role": "user", "content": "and then?"}],
        extra_body={"session_id": "http-s1", "truncation": "sliding_window"})
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.model_extra["switchboard"]["truncation"]["strategy"] == "sliding_window"
    stored = sessions.GetSession(pb.GetSessionRequest(session_id="http-s1"), timeout=30)
    assert [m.role for m in stored.messages] == ["system", "user", "assistant", "user",
                                                 "assistant"]


def test_the_request_id_comes_back_and_names_the_completion(client) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="beta", messages=HELLO, max_tokens=2, extra_headers={"x-request-id": "req-http-7"})
    reply = raw.parse()
    assert raw.headers["x-request-id"] == "req-http-7"
    assert reply.id == "chatcmpl-req-http-7"
    assert reply.model_extra["switchboard"]["request_id"] == "req-http-7"


# ---------------------------------------------------------------- models

def test_models_list_the_base_every_version_and_alias(client) -> None:
    cards = {m.id: m for m in client.models.list()}
    assert set(cards) == {"tiny-base", "alpha@1", "alpha@2", "beta@1", "alpha", "beta",
                          "stable"}
    assert all(c.object == "model" and c.owned_by == "switchboard" for c in cards.values())
    assert all(c.created > 0 for c in cards.values())
    assert cards["stable"].model_extra["root"] == "alpha@1"
    assert cards["alpha"].model_extra["root"] == "alpha@2"
    assert client.models.retrieve("alpha@1").id == "alpha@1"


def test_an_unknown_model_is_404_naming_what_exists(client) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        chat(client, "nope")
    message = info.value.body["message"]
    assert "'nope' not found" in message
    assert all(name in message for name in ("alpha@1", "beta@1", "tiny-base"))
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope")
    assert "stable" in info.value.body["message"]


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("kwargs, param, words", [
    ({"n": 2}, "n", "one choice per request"),
    ({"logprobs": True}, "logprobs", "not available"),
    ({"presence_penalty": 0.5}, "presence_penalty", "repetition_penalty"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
    ({"max_tokens": 100_000}, "max_tokens", "1..512"),
    ({"extra_body": {"truncation": "shred"}}, "truncation", "drop_oldest"),
    ({"extra_body": {"colour": "red"}}, "colour", "not a field"),
    ({"temperature": -1}, "temperature", "greater than or equal to 0"),
])
def test_unsupported_or_bad_fields_are_400_naming_the_field(client, kwargs, param,
                                                            words) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "beta", **kwargs)
    assert info.value.body["param"] == param
    assert words in info.value.body["message"]
    assert info.value.body["type"] == "invalid_request_error"


def test_a_body_over_the_limit_is_413(url) -> None:
    body = b'{"model": "beta", "messages": [], "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    response = httpx.post(f"{url}/chat/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert "max_request_bytes" in response.json()["error"]["message"]


# ---------------------------------------------------------------- same metrics, schema, health

def test_http_requests_are_counted_with_their_protocol(client, server) -> None:
    chat(client, "beta", max_tokens=2)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                  timeout=10).read().decode()
    lines = [line for line in text.splitlines() if line.startswith("switchboard_requests_total")]
    assert any('protocol="http"' in line and 'code="OK"' in line for line in lines), lines
    assert any('protocol="http"' in line and 'code="NOT_FOUND"' in line for line in lines)


def test_an_http_call_is_counted_before_its_last_byte_is_sent() -> None:
    """A caller that has its whole answer and then reads the metrics finds its call counted
    (the edge around a plain ASGI answer, with the real metrics)."""
    metrics = Metrics()
    config = ServerConfig(base="unused", adapters_root=Path("unused"))
    edge = HttpEdge(PlainTextResponse("ok"), 1024, Runtime(config, metrics=metrics))
    labels = {"method": "GET unmatched", "code": "OK", "protocol": "http"}
    counted_at_last_byte = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            counted_at_last_byte.append(
                metrics.registry.get_sample_value("switchboard_rpcs_total", labels))

    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    asyncio.run(edge(scope, receive, send))
    assert counted_at_last_byte == [1.0]
    assert metrics.registry.get_sample_value("switchboard_rpcs_total", labels) == 1.0  # once


def test_openapi_schema_and_health_are_served_without_a_key(url) -> None:
    root = url.removesuffix("/v1")
    schema = httpx.get(f"{root}/openapi.json", timeout=30).json()
    assert {"/v1/chat/completions", "/v1/models", "/v1/score"} <= set(schema["paths"])
    assert httpx.get(f"{root}/health", timeout=30).json() == {"status": "serving"}


# ---------------------------------------------------------------- keys

@pytest.fixture(scope="module")
def keyed(tiny_base: Path, served_root: Path) -> Iterator[RunningServer]:
    running = start_in_thread(_config(tiny_base, served_root, api_keys=(KEY,)))
    yield running
    running.stop()


@pytest.mark.parametrize("key", [None, "not-the-right-key-at-all"])
def test_a_missing_or_wrong_key_is_401(keyed, key) -> None:
    base_url = f"http://127.0.0.1:{keyed.http_port}/v1"
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    response = httpx.post(f"{base_url}/chat/completions", headers=headers, timeout=30,
                          json={"model": "beta", "messages": HELLO})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    assert "Bearer" in response.json()["error"]["message"]
    bad = openai.OpenAI(base_url=base_url, api_key=key or "x" * 20, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_the_right_key_chats_and_lists(keyed) -> None:
    good = openai.OpenAI(base_url=f"http://127.0.0.1:{keyed.http_port}/v1", api_key=KEY,
                         max_retries=0)
    assert chat(good, "beta", max_tokens=2).usage.completion_tokens > 0
    assert "beta@1" in {m.id for m in good.models.list()}


# ---------------------------------------------------------------- graceful drain

def test_sigterm_drain_finishes_running_streams_and_refuses_new_requests(
        tiny_base: Path, served_root: Path) -> None:
    running = start_in_thread(_config(tiny_base, served_root, shutdown_grace_seconds=60.0))
    root = f"http://127.0.0.1:{running.http_port}"
    client = openai.OpenAI(base_url=f"{root}/v1", api_key="unused", max_retries=0)
    stream = chat(client, "beta", max_tokens=300, stream=True,
                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    stopper = threading.Thread(target=running.stop)
    stopper.start()
    refused = None
    while stopper.is_alive():
        refused = httpx.get(f"{root}/health", timeout=10)
        if refused.status_code == 503:
            break
        time.sleep(0.02)
    assert refused is not None and refused.status_code == 503
    assert "shutting down" in refused.json()["error"]["message"]
    rest = list(chunks)
    stopper.join(timeout=120)
    assert first.choices[0].delta.role == "assistant"
    assert rest[-1].usage.completion_tokens == 300
    assert rest[-2].choices[0].finish_reason == "length"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{root}/health", timeout=10)
