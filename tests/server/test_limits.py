"""Request limits on the real server: each limit answered with its own status and a message that
names the setting; concurrency places given back on every exit path; bodies that protobuf cannot
decode answered INVALID_ARGUMENT.

One server with small limits: 4 messages of at most 300 characters, a 64-token prompt budget,
2 requests in total and 1 per adapter (the bare base counts as one adapter).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from server.app import RunningServer, start_in_thread
from server.config import ServerConfig

MAX_MESSAGES = 4
MAX_CHARS = 300
MAX_PROMPT = 64
INFERENCE = "/switchboard.v1.InferenceService"


@pytest.fixture(scope="module")
def server(tiny_base: Path, adapters_root: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("limits") / "adapters"
    shutil.copytree(adapters_root, root)
    config = ServerConfig.build(
        base=str(tiny_base), adapters_root=root, port=0, device="cpu", max_batch=4,
        default_max_new_tokens=4, max_messages=MAX_MESSAGES, max_message_chars=MAX_CHARS,
        max_prompt_tokens=MAX_PROMPT, max_concurrent_requests=2, max_concurrent_per_adapter=1,
        sessions_db=tmp_path_factory.mktemp("db") / "sessions.db", shutdown_grace_seconds=0.5)
    running = start_in_thread(config)
    yield running
    running.stop()


def msgs(*texts: str) -> list[pb.Message]:
    """Alternating user / assistant messages ending with a user one."""
    last = len(texts) - 1
    return [pb.Message(role="user" if (last - i) % 2 == 0 else "assistant", content=t)
            for i, t in enumerate(texts)]


def chat(*texts: str, adapter: str = "", **kwargs) -> pb.ChatRequest:
    return pb.ChatRequest(messages=msgs(*texts), adapter=adapter,
                          sampling=pb.SamplingParams(max_new_tokens=2), **kwargs)


def endless(adapter: str = "") -> pb.ChatRequest:
    """A request that keeps its row until cancelled (ignore_eos: it never stops by itself)."""
    return pb.ChatRequest(messages=msgs("tell me a story"), adapter=adapter,
                          sampling=pb.SamplingParams(max_new_tokens=1500, ignore_eos=True))


def error_of(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def served(infer: pb_grpc.InferenceServiceStub, adapter: str = "") -> bool:
    try:
        infer.Chat(chat("hi", adapter=adapter), timeout=60)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
        return False
    return True


def served_soon(infer: pb_grpc.InferenceServiceStub, adapter: str = "",
                within_s: float = 10.0) -> bool:
    """Whether a request on `adapter` is accepted within `within_s` (a cancelled request's place
    comes back when the server has processed the cancellation)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if served(infer, adapter):
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------- sizes

def test_too_many_messages_is_invalid_argument_naming_the_setting(infer) -> None:
    five = msgs("a", "b", "c", "d", "e")
    for call in (lambda: infer.Chat(pb.ChatRequest(messages=five), timeout=30),
                 lambda: list(infer.ChatStream(pb.ChatRequest(messages=five), timeout=30)),
                 lambda: infer.Score(pb.ScoreRequest(messages=five, continuation="x"),
                                     timeout=30)):
        error = error_of(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "messages has 5 entries; at most 4" in error.details()
        assert "max_messages" in error.details()
    assert infer.Chat(chat("a", "b", "c", "d"), timeout=60).usage.completion_tokens > 0


def test_a_too_long_message_is_invalid_argument_naming_it(infer) -> None:
    at_limit, over = "x" * MAX_CHARS, "x" * (MAX_CHARS + 1)
    for call in (lambda: infer.Chat(chat("hi", "ok", over), timeout=30),
                 lambda: list(infer.ChatStream(chat("hi", "ok", over), timeout=30)),
                 lambda: infer.Score(pb.ScoreRequest(messages=msgs("hi", "ok", over),
                                                     continuation="x"), timeout=30)):
        error = error_of(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"messages[2].content has {MAX_CHARS + 1} characters; at most {MAX_CHARS}" \
            in error.details()
        assert "max_message_chars" in error.details()
    error = error_of(lambda: infer.Score(pb.ScoreRequest(messages=msgs("hi"), continuation=over),
                                         timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "continuation has 301 characters" in error.details()
    # At the limit the length is fine: what remains is the prompt budget (a sliding window).
    reply = infer.Chat(chat(at_limit, truncation=pb.TRUNCATION_STRATEGY_SLIDING_WINDOW),
                       timeout=60)
    assert reply.usage.prompt_tokens <= MAX_PROMPT


def test_prompt_over_max_prompt_tokens_is_out_of_range_naming_the_limit(infer) -> None:
    long = "word " * 60  # about 127 tokens: fits the 2048-token window, not the 64-token cap
    error = error_of(lambda: infer.Chat(chat(long, truncation=pb.TRUNCATION_STRATEGY_ERROR),
                                        timeout=30))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert f"max_prompt_tokens={MAX_PROMPT}" in error.details()
    error = error_of(lambda: infer.Score(pb.ScoreRequest(messages=msgs(long), continuation="ok"),
                                         timeout=30))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "max_prompt_tokens" in error.details() and str(MAX_PROMPT) in error.details()
    assert infer.Score(pb.ScoreRequest(messages=msgs("hi"), continuation="ok"),
                       timeout=60).token_count > 0


def test_truncation_fits_the_capped_budget(infer) -> None:
    history = ("hello there " * 8, "fine " * 20, "hello there " * 8)
    reply = infer.Chat(chat(*history, truncation=pb.TRUNCATION_STRATEGY_DROP_OLDEST), timeout=60)
    assert reply.truncation.budget_tokens == MAX_PROMPT
    assert reply.truncation.applied and reply.truncation.messages_dropped == 2
    assert reply.usage.prompt_tokens <= MAX_PROMPT


def test_an_overlong_adapter_name_is_refused_with_a_short_message(infer) -> None:
    error = error_of(lambda: infer.Chat(chat("hi", adapter="a" * 100_000), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "100000 characters" in error.details() and len(error.details()) < 400


# ---------------------------------------------------------------- concurrency

def test_per_adapter_and_total_limits_are_resource_exhausted(infer) -> None:
    on_base = infer.ChatStream(endless(), timeout=120)
    on_alpha = None
    try:
        next(on_base)  # the base's one place is taken
        error = error_of(lambda: infer.Chat(chat("hi"), timeout=30))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the bare base model is at its limit of 1 concurrent requests" in error.details()
        assert "max_concurrent_per_adapter" in error.details()
        error = error_of(lambda: infer.Score(pb.ScoreRequest(messages=msgs("hi"),
                                                             continuation="ok"), timeout=30))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # scores count too
        assert infer.Score(pb.ScoreRequest(messages=msgs("hi"), continuation="ok",
                                           adapter="alpha@1"), timeout=60).token_count > 0
        on_alpha = infer.ChatStream(endless("alpha@1"), timeout=120)
        next(on_alpha)  # two running: the server's total
        error = error_of(lambda: infer.Chat(chat("hi", adapter="beta@1"), timeout=30))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 2 concurrent requests" in error.details()
        assert "max_concurrent_requests" in error.details()
    finally:
        on_base.cancel()
        if on_alpha is not None:
            on_alpha.cancel()
    assert served_soon(infer) and served_soon(infer, "alpha@1") and served(infer, "beta@1")


def test_places_come_back_on_finish_error_and_deadline(infer) -> None:
    # Finish: a stream's place is free once its final chunk is out, before the stream closes.
    stream = infer.ChatStream(chat("hi"), timeout=60)
    assert any(chunk.HasField("final") for chunk in stream)
    assert served(infer)
    stream = infer.ChatStream(chat("hi"), timeout=60)
    final = next(c for c in stream if c.HasField("final"))
    assert final.final.usage.completion_tokens > 0
    assert served(infer)
    stream.cancel()
    # Error: refused after admission (the prompt cap), the place is free when the status is.
    for _ in range(3):
        error = error_of(lambda: infer.Chat(chat("word " * 60,
                                                 truncation=pb.TRUNCATION_STRATEGY_ERROR),
                                            timeout=30))
        assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert served(infer)
    # Deadline: DEADLINE_EXCEEDED, and the server gives the place back when it sees it.
    error = error_of(lambda: infer.Chat(endless(), timeout=0.5))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert served_soon(infer)


def test_unknown_adapters_do_not_keep_places(infer) -> None:
    for _ in range(3):
        error = error_of(lambda: infer.Chat(chat("hi", adapter="nosuch"), timeout=30))
        assert error.code() == grpc.StatusCode.NOT_FOUND
    assert served(infer) and served(infer, "alpha@1")


# ---------------------------------------------------------------- undecodable bodies

BAD_UTF8 = b"\xff\xfe"


def _with_bad_text(message: object, good: str) -> bytes:
    """`message` serialized with the bytes of `good` (in a string field) replaced by bad UTF-8,
    which protobuf clients never send but a raw client can."""
    raw = message.SerializeToString()
    assert raw.count(good.encode()) == 1
    return raw.replace(good.encode(), BAD_UTF8 + b"x" * (len(good) - 2))


UNDECODABLE = {
    "Chat": (f"{INFERENCE}/Chat", False, _with_bad_text(chat("hello"), "hello"),
             "switchboard.v1.ChatRequest"),
    "ChatStream": (f"{INFERENCE}/ChatStream", True, _with_bad_text(chat("hello"), "hello"),
                   "switchboard.v1.ChatRequest"),
    "Score": (f"{INFERENCE}/Score", False,
              _with_bad_text(pb.ScoreRequest(messages=msgs("hi"), continuation="sure"), "sure"),
              "switchboard.v1.ScoreRequest"),
    "LoadAdapter": ("/switchboard.v1.AdapterService/LoadAdapter", False,
                    _with_bad_text(pb.LoadAdapterRequest(adapter="alpha@1"), "alpha@1"),
                    "switchboard.v1.LoadAdapterRequest"),
    "GetSession": ("/switchboard.v1.SessionService/GetSession", False,
                   _with_bad_text(pb.GetSessionRequest(session_id="s-1"), "s-1"),
                   "switchboard.v1.GetSessionRequest"),
    "truncated body": (f"{INFERENCE}/Chat", False, chat("hello").SerializeToString()[:-3],
                       "switchboard.v1.ChatRequest"),
}


@pytest.mark.parametrize("case", sorted(UNDECODABLE))
def test_an_undecodable_body_is_invalid_argument(channel, infer, case: str) -> None:
    path, streaming, body, type_name = UNDECODABLE[case]
    call = (channel.unary_stream if streaming else channel.unary_unary)(path)
    error = error_of(lambda: list(call(body, timeout=30)) if streaming else call(body, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert f"request is not a valid {type_name}" in error.details()
    assert "strings must be UTF-8" in error.details()
    assert served(infer)


def test_a_raw_client_sending_valid_bytes_is_served(channel) -> None:
    call = channel.unary_unary(f"{INFERENCE}/Chat")
    reply = pb.ChatResponse.FromString(call(chat("hello").SerializeToString(), timeout=60))
    assert reply.usage.completion_tokens > 0
