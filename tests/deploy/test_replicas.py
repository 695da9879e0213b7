"""Two real replicas behind a real nginx gRPC proxy, sharing a real Redis session store.

Proven here: every call for one adapter lands on one replica (consistent hash on the
`x-switchboard-adapter` header), so only that replica loads it; and when a replica is SIGKILLed
mid-traffic, its sessions continue on the other one with every acknowledged turn still stored.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from conftest import forked_server, write_random_adapter  # noqa: E402
from replica_stack import (  # noqa: E402
    Caller,
    Proxy,
    Replica,
    find_tool,
    nginx_proxy,
    redis_server,
    replicas,
)

from clients.client import SwitchboardClient  # noqa: E402

ADAPTERS = ("red", "green", "blue", "gold")
# Statuses a client sees while a replica dies and its session leases lapse; it retries them.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
TURNS = 7
TURN_DEADLINE_S = 90.0


@pytest.fixture(scope="module")
def stack(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    missing = [tool for tool in ("redis-server", "nginx") if find_tool(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian packages; `make tools`): the "
                    "multi-replica test is NOT run")
    work = tmp_path_factory.mktemp("replicas")
    adapters = work / "adapters"
    for seed, name in enumerate(ADAPTERS, start=10):
        write_random_adapter(tiny_base, adapters, name, 1, seed=seed, rank=4)
    with redis_server(work / "redis") as url, \
            replicas(2, work, tiny_base, adapters, url,
                     ["--session-lease-seconds", "2", "--max-loaded-adapters", "4"],
                     start=forked_server) as fleet, \
            nginx_proxy(work / "nginx", [r.target for r in fleet]) as proxy:
        yield proxy, fleet


def routes_by_adapter(proxy: Proxy) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = defaultdict(set)
    for adapter, upstream, _ in proxy.routes():
        seen[adapter].add(upstream)
    return seen


def calls_by_adapter(proxy: Proxy) -> dict[str, list[tuple[str, str]]]:
    """(replica that answered, grpc status) of each logged call, per adapter, in order."""
    calls: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for adapter, upstream, status in proxy.routes():
        calls[adapter].append((upstream, status))
    return calls


class Conversation(threading.Thread):
    """TURNS turns on one session through the proxy, each retried on the statuses a dying replica
    causes until TURN_DEADLINE_S; `acked` holds the user messages whose answers arrived."""

    def __init__(self, target: str, adapter: str) -> None:
        super().__init__(daemon=True)
        self.caller = Caller(target)
        self.adapter = adapter
        self.session = f"conv-{adapter}"
        self.acked: list[str] = []
        self.retries = 0
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            for i in range(TURNS):
                self.turn(f"{self.session} turn {i}")
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            self.caller.close()

    def turn(self, text: str) -> None:
        deadline = time.monotonic() + TURN_DEADLINE_S
        while True:
            try:
                self.caller.chat(self.adapter, text, session_id=self.session)
                self.acked = [*self.acked, text]
                return
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or time.monotonic() > deadline:
                    raise
                self.retries += 1
                time.sleep(0.2)

    @property
    def calls(self) -> int:
        """Calls that came back to this client, answered or failed (nginx logs one line each)."""
        return len(self.acked) + self.retries


def test_each_adapter_lands_on_one_replica_and_is_loaded_only_there(stack) -> None:
    proxy, fleet = stack
    # The project's own client sends the affinity header by itself.
    with SwitchboardClient(proxy.target, timeout=60) as client:
        for _ in range(3):
            for adapter in ADAPTERS:
                answer = client.chat(f"hello {adapter}", adapter=adapter, max_new_tokens=4)
                assert answer.adapter_name == adapter

    routed = routes_by_adapter(proxy)
    assert set(routed) == set(ADAPTERS)
    assert all(len(upstreams) == 1 for upstreams in routed.values()), routed
    for replica in fleet:
        direct = Caller(replica.target)
        expected = {a for a, (upstream,) in routed.items() if upstream == replica.target}
        assert direct.loaded() == expected  # nothing loaded where it is never routed
        direct.close()


def test_a_replica_killed_mid_traffic_loses_no_acknowledged_turn(stack) -> None:
    proxy, fleet = stack
    routed = routes_by_adapter(proxy) or {a: {fleet[0].target} for a in ADAPTERS}
    busiest = max(fleet, key=lambda r: sum(r.target in u for u in routed.values()))
    survivor: Replica = next(r for r in fleet if r is not busiest)
    logged_before = {a: len(calls) for a, calls in calls_by_adapter(proxy).items()}
    conversations = [Conversation(proxy.target, adapter) for adapter in ADAPTERS]
    for conversation in conversations:
        conversation.start()
    wait_until(lambda: all(len(c.acked) >= 2 for c in conversations), "two turns each")

    busiest.kill()  # SIGKILL with turns in flight
    # Each conversation's calls run one at a time: past those that came back by now and the one
    # still in flight, every call it makes started after the kill.
    started_after_kill = {c.adapter: logged_before.get(c.adapter, 0) + c.calls + 1
                          for c in conversations}
    for conversation in conversations:
        conversation.join(timeout=TURNS * TURN_DEADLINE_S)
    # nginx writes a call's line as it finishes it: wait until every call is in the log.
    wait_until(lambda: all(len(calls_by_adapter(proxy)[c.adapter])
                           >= logged_before.get(c.adapter, 0) + c.calls for c in conversations),
               "nginx to log every call")

    caller = Caller(proxy.target)
    for conversation in conversations:
        assert conversation.error is None, (conversation.adapter, conversation.error)
        assert len(conversation.acked) == TURNS  # the session went on, on the survivor
        stored = [text for role, text in caller.history(conversation.session) if role == "user"]
        assert is_subsequence(conversation.acked, stored), (conversation.acked, stored)
        # At most the turn stored as the kill landed, which its client never saw and resent.
        assert len(stored) - len(conversation.acked) <= 1
    caller.close()
    # Calls in flight at the kill fail; every call answered after it came from the survivor.
    answered = [up for adapter, calls in calls_by_adapter(proxy).items()
                for up, status in calls[started_after_kill.get(adapter, len(calls)):]
                if status == "0"]
    assert answered and set(answered) == {survivor.target}
    assert Caller(survivor.target).loaded() == set(ADAPTERS)


def wait_until(condition, what: str, timeout: float = 180.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def is_subsequence(needle: list[str], haystack: list[str]) -> bool:
    rest = iter(haystack)
    return all(item in rest for item in needle)
