"""Per-key limits: token buckets on requests and generated tokens, requests in flight, and the
`retry-after` a refused caller gets (and the clients honour).

The bookkeeping is checked first with a hand-driven clock (`KeyLimiter` is pure logic); then a
real server on loopback with three limited keys shows the wire: RESOURCE_EXHAUSTED carrying
`retry-after`, the bucket refilled once that wait is over, the sync, asyncio and CLI clients
waiting it out by themselves, and the refusals counted per key name in /metrics.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import free_port
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from clients.aio import AsyncSwitchboardClient
from clients.cli import main as cli_main
from clients.client import SwitchboardClient
from clients.errors import SwitchboardRpcError
from server.app import RunningServer, start_in_thread
from server.config import ServerConfig
from server.keys import Caller, KeyKind, KeyLimits
from server.ratelimit import KeyLimiter, RateLimitedError, retry_after_text

# ---------------------------------------------------------------- the buckets, by hand


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def caller(**limits: float) -> Caller:
    return Caller("k-test", "test", KeyKind.API, limits=KeyLimits(**limits))


def refused(limiter: KeyLimiter, who: Caller) -> RateLimitedError:
    with pytest.raises(RateLimitedError) as info:
        limiter.admit(who)
    return info.value


def test_the_request_bucket_empties_then_refills_at_its_rate() -> None:
    clock, who = Clock(), caller(requests_per_minute=60, request_burst=2)
    limiter = KeyLimiter(clock=clock)
    for _ in range(2):
        limiter.admit(who).release()
    err = refused(limiter, who)
    assert err.retry_after_s == pytest.approx(1.0) and err.limit == "requests_per_minute"
    assert "key 'test'" in str(err) and "60 requests per minute" in str(err)
    clock.now += 0.5
    assert refused(limiter, who).retry_after_s == pytest.approx(0.5)
    clock.now += 0.5
    limiter.admit(who).release()


def test_generated_tokens_are_charged_after_the_fact_and_a_debt_is_waited_out() -> None:
    clock, who = Clock(), caller(tokens_per_minute=600, token_burst=10)
    limiter = KeyLimiter(clock=clock)
    with limiter.admit(who) as permit:
        permit.charge(25)  # one long answer overdraws the bucket: 10 - 25 = -15
    err = refused(limiter, who)
    assert err.limit == "tokens_per_minute"
    assert err.retry_after_s == pytest.approx(1.6)  # back to 1 token at 10 tokens a second
    clock.now += 1.6
    limiter.admit(who).release()


def test_in_flight_is_a_count_with_no_wait_to_announce() -> None:
    who = caller(max_in_flight=1)
    limiter = KeyLimiter(clock=Clock())
    permit = limiter.admit(who)
    err = refused(limiter, who)
    assert err.limit == "in_flight" and err.retry_after_s is None
    permit.release()
    permit.release()  # idempotent: the count does not go below zero
    limiter.admit(who)
    assert refused(limiter, who).limit == "in_flight"


def test_keys_without_limits_take_no_bookkeeping_and_keys_do_not_share_buckets() -> None:
    limiter = KeyLimiter(clock=Clock())
    assert limiter.admit(Caller("k-free", "free", KeyKind.API)) is None and len(limiter) == 0
    one = Caller("k-1", "one", KeyKind.API, limits=KeyLimits(requests_per_minute=1))
    two = Caller("k-2", "two", KeyKind.API, limits=KeyLimits(requests_per_minute=1))
    limiter.admit(one).release()
    refused(limiter, one)
    limiter.admit(two).release()


def test_changed_limits_apply_at_once_and_removed_keys_are_forgotten() -> None:
    clock = Clock()
    limiter = KeyLimiter(clock=clock)
    slow, fast = (caller(requests_per_minute=60, request_burst=1),
                  caller(requests_per_minute=600, request_burst=1))
    limiter.admit(slow).release()
    assert refused(limiter, slow).retry_after_s == pytest.approx(1.0)
    # A reload raised the rate tenfold: the empty bucket now refills ten times faster.
    assert refused(limiter, fast).retry_after_s == pytest.approx(0.1)
    clock.now += 0.1
    limiter.admit(fast).release()
    limiter.retain([])
    assert len(limiter) == 0


def test_retry_after_is_seconds_rounded_up_to_the_millisecond() -> None:
    assert retry_after_text(0.0004) == "0.001" and retry_after_text(1.5) == "1.500"


@pytest.mark.parametrize("field, value", [("max_in_flight", -1), ("request_burst", 1.5),
                                          ("tokens_per_minute", float("inf")),
                                          ("requests_per_minute", True)])
def test_limits_validate_themselves(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        KeyLimits(**{field: value})


# ---------------------------------------------------------------- on the wire

BURST = "burst-key-0123456789abcdef"
SLOW = "slow-key-0123456789abcdef"
TOKENS = "tokens-key-0123456789abcdef"
KEYS_TOML = f"""
[[keys]]
name = "burst"
key = "{BURST}"
requests_per_minute = 60
request_burst = 2

[[keys]]
name = "slow"
key = "{SLOW}"
requests_per_minute = 6
request_burst = 1

[[keys]]
name = "tokens"
key = "{TOKENS}"
tokens_per_minute = 120
token_burst = 4
"""


@pytest.fixture(scope="module")
def server(tiny_base: Path, adapters_root: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    work = tmp_path_factory.mktemp("ratelimit")
    (work / "keys.toml").write_text(KEYS_TOML)
    running = start_in_thread(ServerConfig(
        base=str(tiny_base), adapters_root=adapters_root, port=0, device="cpu",
        keys_file=work / "keys.toml", metrics_port=free_port(), shutdown_grace_seconds=0.5,
        sessions_db=None))
    yield running
    running.stop()


def chat_request(max_new_tokens: int = 2) -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.Message(role="user", content="hi")],
                          sampling=pb.SamplingParams(max_new_tokens=max_new_tokens,
                                                     ignore_eos=True))


def raw_chat(target: str, key: str, max_new_tokens: int = 2) -> pb.ChatResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.InferenceServiceStub(channel).Chat(
            chat_request(max_new_tokens), metadata=(("authorization", f"Bearer {key}"),),
            timeout=60)


def exhausted(target: str, key: str) -> tuple[float, str]:
    """Call until refused; the refusal's retry-after (seconds) and message."""
    for _ in range(10):
        try:
            raw_chat(target, key)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            trailers = dict(err.trailing_metadata() or ())
            return float(trailers["retry-after"]), err.details()
    raise AssertionError("the key was never refused")


def test_over_its_request_rate_a_key_is_refused_with_retry_after_then_refilled(
        server: RunningServer) -> None:
    wait, message = exhausted(server.target, BURST)
    assert 0 < wait <= 1.0 and "requests_per_minute" in message
    time.sleep(wait)  # what the server asked for: the bucket holds a request again
    assert raw_chat(server.target, BURST).usage.completion_tokens == 2


def test_generated_tokens_drain_the_token_bucket(server: RunningServer) -> None:
    wait, _ = exhausted(server.target, TOKENS)
    time.sleep(wait)
    assert raw_chat(server.target, TOKENS, max_new_tokens=8).usage.completion_tokens == 8
    wait, message = exhausted(server.target, TOKENS)
    assert "tokens_per_minute" in message and wait > 1.0  # 8 tokens overdrew a bucket of 4
    time.sleep(wait)
    raw_chat(server.target, TOKENS)


def test_the_sync_client_waits_out_retry_after_or_reports_it(server: RunningServer) -> None:
    exhausted(server.target, SLOW)
    with SwitchboardClient(server.target, api_key=SLOW, retries=0) as impatient:
        with pytest.raises(SwitchboardRpcError) as info:
            impatient.chat("hi", max_new_tokens=1)
    assert info.value.code == "RESOURCE_EXHAUSTED" and 0 < info.value.retry_after_s <= 10.0
    exhausted(server.target, BURST)
    with SwitchboardClient(server.target, api_key=BURST, retries=3) as patient:
        for _ in range(3):  # past the burst of 2: each refusal is waited out
            assert patient.chat("hi", max_new_tokens=1).completion_tokens == 1


def test_the_asyncio_client_waits_out_retry_after(server: RunningServer) -> None:
    async def run() -> list[int]:
        async with AsyncSwitchboardClient(server.target, api_key=BURST, retries=3) as client:
            return [(await client.chat("hi", max_new_tokens=1)).completion_tokens
                    for _ in range(3)]

    exhausted(server.target, BURST)
    assert asyncio.run(run()) == [1, 1, 1]


def test_a_deadline_shorter_than_retry_after_is_not_stretched(server: RunningServer) -> None:
    exhausted(server.target, SLOW)  # ten seconds to wait
    with SwitchboardClient(server.target, api_key=SLOW, retries=3) as client:
        with pytest.raises(SwitchboardRpcError) as info:
            client.chat("hi", max_new_tokens=1, timeout=2.0)
    assert info.value.code == "RESOURCE_EXHAUSTED" and info.value.retry_after_s > 0


def test_the_cli_honours_retry_after_and_says_it_when_it_gives_up(
        server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    exhausted(server.target, BURST)
    assert cli_main(["chat", "--target", server.target, "--api-key", BURST,
                     "--max-new-tokens", "1", "hi"]) == 0
    exhausted(server.target, SLOW)
    assert cli_main(["chat", "--target", server.target, "--api-key", SLOW, "--timeout", "2",
                     "--max-new-tokens", "1", "hi"]) == 1
    err = capsys.readouterr().err
    assert "RESOURCE_EXHAUSTED" in err and "retry after" in err


def scrape(server: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    assert BURST not in text and SLOW not in text and TOKENS not in text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_refusals_requests_and_tokens_are_counted_per_key_name(server: RunningServer) -> None:
    limited = ("switchboard_key_rate_limited_total",
               (("key", "slow"), ("limit", "requests_per_minute")))
    refused_chats = ("switchboard_key_requests_total",
                     (("code", "RESOURCE_EXHAUSTED"), ("key", "slow")))
    tokens = ("switchboard_key_generation_tokens_total", (("key", "burst"),))
    before = scrape(server)
    exhausted(server.target, SLOW)
    wait, _ = exhausted(server.target, BURST)
    time.sleep(wait)
    raw_chat(server.target, BURST, max_new_tokens=3)
    after = scrape(server)
    assert after[limited] - before.get(limited, 0.0) >= 1
    assert after[refused_chats] - before.get(refused_chats, 0.0) >= 1
    assert after[tokens] - before.get(tokens, 0.0) >= 3
