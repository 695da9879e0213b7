"""Sessions survive the real server process dying: `kill -9` mid-stream and a clean SIGTERM.

The server runs as `python -m server.cli serve` in a subprocess on a SQLite sessions file; each
test kills it, starts a new process on the same file and reads the sessions back over gRPC.
A turn counts as completed once its final chunk (or unary reply) reached the client: every such
turn must come back exactly, and a killed answer must leave no trace (not even a user message).
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ServerProcess, SessionChatter

from clients.client import SwitchboardClient
from clients.errors import SwitchboardRpcError

SYSTEM = {"role": "system", "content": "Be brief."}
SHORT = 8
# The killed answer must still be generating when the kill lands: it ignores the end-of-sequence
# token (up to LONG tokens) and the kill follows its KILL_AFTER-th token.
LONG = 512
KILL_AFTER = 4

Messages = list[dict[str, str]]


@pytest.fixture
def start_server(tiny_base: Path, adapters_root: Path, tmp_path: Path) -> Iterator:
    """Starts servers on one sessions file (tmp_path/s.db); kills any left running at the end."""
    adapters = shutil.copytree(adapters_root, tmp_path / "adapters")
    started: list[ServerProcess] = []

    def start() -> ServerProcess:
        server = ServerProcess(tiny_base, adapters, tmp_path / "s.db", tmp_path / "server.log")
        started.append(server)
        return server.wait_serving()

    yield start
    for server in started:
        server.ensure_dead()


def run_turns(client: SwitchboardClient, session: str, texts: list[str],
              stream: bool = False) -> Messages:
    """Completed turns, sent the way a client keeps a session: only the new message each time
    (the system prompt with the first); returns the conversation the server must now hold."""
    held: Messages = []
    for text in texts:
        new = [SYSTEM] if not held else []
        new.append({"role": "user", "content": text})
        if stream:
            chunks = list(client.chat_stream(new, max_new_tokens=SHORT, session_id=session,
                                             timeout=60))
            result = chunks[-1].final
            assert result is not None and "".join(c.delta for c in chunks) == result.text
        else:
            result = client.chat(new, max_new_tokens=SHORT, session_id=session, timeout=60)
        assert result.finish_reason in ("stop", "length") and result.session_id == session
        held += [*new, {"role": "assistant", "content": result.text}]
    return held


def stored(client: SwitchboardClient, session: str) -> Messages | None:
    try:
        return client.get_session(session, timeout=30).messages
    except SwitchboardRpcError as err:
        assert err.code == "NOT_FOUND", err
        return None


def stream_until(client: SwitchboardClient, conversation: Messages, adapter: str,
                 session: str) -> Iterator:
    """Start a long streamed answer on `session`; return its iterator once KILL_AFTER tokens
    have arrived and no final chunk has."""
    stream = client.chat_stream(conversation, adapter=adapter, max_new_tokens=LONG,
                                ignore_eos=True, session_id=session, timeout=120)
    for chunk in stream:
        assert chunk.final is None, "the long answer finished before the kill"
        if chunk.completion_tokens >= KILL_AFTER:
            return stream
    pytest.fail("the long answer ended without a final chunk")


def drained(stream: Iterator) -> list:
    """What was still buffered for a killed stream; it must end in an error, never a final."""
    finals = []
    with pytest.raises(SwitchboardRpcError) as info:
        for chunk in stream:
            if chunk.final is not None:
                finals.append(chunk.final)
    assert info.value.code in ("UNAVAILABLE", "INTERNAL", "UNKNOWN", "CANCELLED"), info.value
    return finals


def test_kill_9_mid_stream_keeps_every_completed_turn_and_no_partial_one(start_server) -> None:
    first = start_server()
    client = first.client
    held = run_turns(client, "dur-a", ["hello there", "what is LoRA?", "and batching?"])
    held_b = run_turns(client, "dur-b", ["one", "two"], stream=True)

    question = {"role": "user", "content": "tell me everything, at length"}
    fresh = [SYSTEM, {"role": "user", "content": "hello there"}]

    traffic = SessionChatter(first.target, "dur-traffic")
    traffic.start()
    deadline = time.monotonic() + 60
    while traffic.turns < 2 and traffic.error is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert traffic.turns >= 2, traffic.error

    killed_a = stream_until(client, [question], "alpha@1", "dur-a")
    killed_fresh = stream_until(client, fresh, "", "dur-fresh")
    assert first.kill(signal.SIGKILL) == -signal.SIGKILL
    traffic.join(timeout=60)
    assert not traffic.is_alive() and traffic.error is not None
    assert drained(killed_a) == [] and drained(killed_fresh) == []

    second = start_server()
    client = second.client
    assert stored(client, "dur-a") == held  # every completed turn, exactly; the killed one absent
    assert stored(client, "dur-b") == held_b
    assert stored(client, "dur-fresh") is None  # a killed first turn creates no session
    # Traffic: every acknowledged turn; at most one more, whole, whose reply the kill swallowed.
    after = stored(client, "dur-traffic")
    assert after is not None and after[:len(traffic.acked)] == traffic.acked
    assert len(after) - len(traffic.acked) in (0, 2)
    assert [m["role"] for m in after] == ["user", "assistant"] * (len(after) // 2)

    # The restarted server carries on with the stored conversation.
    more = run_turns(client, "dur-a", ["still there?"])
    assert stored(client, "dur-a") == held + more[1:]  # run_turns resent the system prompt
    ids = {s.session_id for s in client.list_sessions(timeout=30)}
    assert {"dur-a", "dur-b", "dur-traffic"} <= ids and "dur-fresh" not in ids


def test_sessions_survive_a_clean_sigterm_restart(start_server) -> None:
    first = start_server()
    held = run_turns(first.client, "clean-a", ["hello there", "what is LoRA?"])
    held_b = run_turns(first.client, "clean-b", ["hi"], stream=True)
    assert first.kill(signal.SIGTERM) == 0
    assert "stopped" in first.text()

    second = start_server()
    client = second.client
    assert stored(client, "clean-a") == held and stored(client, "clean-b") == held_b
    listed = {s.session_id: s.message_count for s in client.list_sessions(timeout=30)}
    assert listed == {"clean-a": len(held), "clean-b": len(held_b)}
    reply = client.chat([{"role": "user", "content": "and now?"}], max_new_tokens=SHORT,
                        session_id="clean-a", timeout=60)
    alone = client.chat([SYSTEM, {"role": "user", "content": "and now?"}],
                        max_new_tokens=SHORT, timeout=60)
    assert reply.prompt_tokens > alone.prompt_tokens  # the restored history went into the prompt
    assert stored(client, "clean-a") == [*held, {"role": "user", "content": "and now?"},
                                         {"role": "assistant", "content": reply.text}]
