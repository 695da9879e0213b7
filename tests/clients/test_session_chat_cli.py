"""Issue 5's "done when", as a new user would try it: a 50-turn `switchboard chat --session`
per truncation strategy on the tiny base with a small context window, then each strategy's edge
cases (no system prompt, one huge message, a budget smaller than the system prompt) through the
real server, with their status codes and messages.

One in-process server (real gRPC on loopback, real SQLite); the CLI runs as the installed
`switchboard` executable, one process per strategy fed 50 lines on stdin, all strategies at once
so the server batches them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clients.client import SwitchboardClient
from clients.errors import SwitchboardRpcError

ROOT = Path(__file__).resolve().parents[2]
CONTEXT_LENGTH = 256
MAX_NEW_TOKENS = 32
BUDGET = CONTEXT_LENGTH - MAX_NEW_TOKENS
TURNS = 50
FITTING = ("drop_oldest", "sliding_window", "middle_out", "summarize")
STRATEGIES = ("error", *FITTING)
SYSTEM = "You are a terse support agent."
LINES = [f"Turn {i}: tell me more about adapters, batching and context windows." for i in
         range(TURNS)]
OVERFLOW = re.compile(r"(\d+) (?:prompt )?tokens but the budget is (\d+) tokens")


@pytest.fixture(scope="module")
def target(tiny_base: Path, adapters_root: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[str]:
    from server.app import start_in_thread
    from server.config import ServerConfig

    work = tmp_path_factory.mktemp("chat-cli")
    config = ServerConfig.build(
        base=str(tiny_base), adapters_root=shutil.copytree(adapters_root, work / "adapters"),
        port=0, device="cpu", sessions_db=work / "sessions.db", context_length=CONTEXT_LENGTH,
        default_max_new_tokens=MAX_NEW_TOKENS, shutdown_grace_seconds=1.0)
    running = start_in_thread(config)
    yield f"127.0.0.1:{running.port}"
    running.stop()


@pytest.fixture(scope="module")
def client(target: str) -> Iterator[SwitchboardClient]:
    with SwitchboardClient(target) as c:
        yield c


def switchboard(*argv: str) -> list[str]:
    exe = Path(sys.executable).with_name("switchboard")
    return [str(exe), *argv] if exe.exists() else [sys.executable, "-m", "clients.cli", *argv]


@dataclass
class Turn:
    """One line's outcome in the REPL's stderr: its --stats line, or its error line."""

    stats: str = ""
    error: str = ""

    def value(self, key: str) -> int:
        return int(re.search(rf"\b{key}=(\d+)", self.stats).group(1))


def turns_of(stderr: str) -> list[Turn]:
    turns = []
    for line in stderr.splitlines():
        if line.startswith("[adapter="):
            turns.append(Turn(stats=line))
        elif line.startswith("error: "):
            turns.append(Turn(error=line))
    return turns


@dataclass
class Chat:
    strategy: str
    code: int
    stdout: str
    stderr: str

    @property
    def turns(self) -> list[Turn]:
        return turns_of(self.stderr)


@pytest.fixture(scope="module")
def chats(target: str) -> dict[str, Chat]:
    """`switchboard chat --session chat-STRATEGY` fed LINES on stdin, every strategy at once."""
    stdin = "".join(line + "\n" for line in LINES)
    processes = {
        strategy: subprocess.Popen(
            switchboard("chat", "--target", target, "--session", f"chat-{strategy}",
                        "--truncation", strategy, "--system", SYSTEM, "--max-new-tokens",
                        str(MAX_NEW_TOKENS), "--stats", "--timeout", "120"),
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        for strategy in STRATEGIES
    }
    results = {}
    try:
        # Every REPL gets its lines before any is read back, so the chats run at the same time
        # (the lines and the replies fit the pipes' buffers).
        for process in processes.values():
            process.stdin.write(stdin)
            process.stdin.flush()
        for strategy, process in processes.items():
            out, err = process.communicate(timeout=300)
            results[strategy] = Chat(strategy, process.returncode, out, err)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    return results


def stored_messages(client: SwitchboardClient, session: str) -> list[dict[str, str]]:
    return client.get_session(session, timeout=30).messages


# ---------------------------------------------------------------- the 50-turn chat


@pytest.mark.parametrize("strategy", FITTING)
def test_fifty_turns_never_fail_for_length(chats: dict[str, Chat], client: SwitchboardClient,
                                           strategy: str) -> None:
    chat = chats[strategy]
    assert chat.code == 0, chat.stderr[-2000:]
    assert "error:" not in chat.stderr, chat.stderr[-2000:]
    turns = chat.turns
    assert len(turns) == TURNS and all(t.stats for t in turns)
    assert all(t.value("prompt_tokens") <= BUDGET for t in turns)
    truncated = [t for t in turns if f"truncation={strategy} dropped" in t.stats]
    assert truncated, "a 50-turn chat must outgrow a 256-token window"
    assert all(t.value("prompt_tokens") > 0 for t in turns)
    # Truncation starts once the conversation outgrew the window, and never stops after.
    first = turns.index(truncated[0])
    assert 0 < first and turns[first:] == truncated

    messages = stored_messages(client, f"chat-{strategy}")
    assert messages[0] == {"role": "system", "content": SYSTEM}  # sent once, kept once
    body = messages[1:]
    assert [m["content"] for m in body if m["role"] == "user"] == LINES  # the session kept all
    assert [m["role"] for m in body] == ["user", "assistant"] * TURNS
    answers = [m["content"] for m in body if m["role"] == "assistant"]
    assert chat.stdout == "".join(a + "\n" for a in answers)  # what the user saw is stored


def test_summarize_keeps_its_summary_in_the_session(chats: dict[str, Chat],
                                                    client: SwitchboardClient) -> None:
    assert chats["summarize"].code == 0
    assert client.get_session("chat-summarize", timeout=30).summary.strip()


def test_error_strategy_fails_once_the_chat_outgrows_the_window(
        chats: dict[str, Chat], client: SwitchboardClient, target: str) -> None:
    chat = chats["error"]
    turns = chat.turns
    assert len(turns) == TURNS
    assert chat.code == 1  # fed from a pipe, a chat with failed turns exits non-zero
    ok = [t for t in turns if t.stats]
    # The first turns fit; from the first refusal on nothing is stored, so every later (same
    # sized) turn is refused too.
    assert 0 < len(ok) < TURNS and turns[:len(ok)] == ok
    assert all("truncation=" not in t.stats for t in ok)
    for refused in turns[len(ok):]:
        assert refused.error.startswith("error: OUT_OF_RANGE: the prompt is "), refused.error
        needed, budget = map(int, OVERFLOW.search(refused.error).groups())
        assert budget == BUDGET and needed > BUDGET
    messages = stored_messages(client, "chat-error")
    assert len(messages) == 1 + 2 * len(ok)
    assert [m["content"] for m in messages if m["role"] == "user"] == LINES[:len(ok)]

    # One more question in one-shot mode: exit status 1 and both numbers on stderr.
    done = subprocess.run(
        switchboard("chat", "--target", target, "--session", "chat-error", "--truncation",
                    "error", "--max-new-tokens", str(MAX_NEW_TOKENS), LINES[0]),
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: OUT_OF_RANGE: the prompt is ")
    needed, budget = map(int, OVERFLOW.search(done.stderr).groups())
    assert budget == BUDGET and needed > BUDGET
    assert stored_messages(client, "chat-error") == messages  # the refusal stored nothing


# ---------------------------------------------------------------- edge cases via the server


def exchanges(n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        out += [{"role": "user", "content": f"question {i}: how do adapters share a batch?"},
                {"role": "assistant", "content": f"answer {i}: each row picks its own LoRA."}]
    return out


def refused(client: SwitchboardClient, messages: list[dict[str, str]], strategy: str,
            **kwargs) -> SwitchboardRpcError:
    with pytest.raises(SwitchboardRpcError) as info:
        client.chat(messages, truncation=strategy, max_new_tokens=kwargs.pop("max_new_tokens",
                    MAX_NEW_TOKENS), timeout=60, **kwargs)
    return info.value


def overflow_numbers(err: SwitchboardRpcError) -> tuple[int, int]:
    assert err.code == "OUT_OF_RANGE", err
    match = OVERFLOW.search(err.details)
    assert match, err.details
    needed, budget = map(int, match.groups())
    assert budget == BUDGET and needed > BUDGET, err.details
    return needed, budget


@pytest.mark.parametrize("strategy", FITTING)
def test_no_system_prompt_fits(client: SwitchboardClient, strategy: str) -> None:
    question = {"role": "user", "content": "and the last question?"}
    result = client.chat([*exchanges(20), question], truncation=strategy,
                         max_new_tokens=MAX_NEW_TOKENS, timeout=60)
    report = result.truncation
    assert report["strategy"] == strategy and report["applied"]
    assert report["messages_dropped"] > 0 and report["tokens_dropped"] > 0
    assert 0 < result.prompt_tokens <= report["budget_tokens"] == BUDGET


def test_no_system_prompt_under_error_states_both_numbers(client: SwitchboardClient) -> None:
    question = {"role": "user", "content": "and the last question?"}
    overflow_numbers(refused(client, [*exchanges(20), question], "error"))


@pytest.mark.parametrize("strategy", ["error", "drop_oldest", "middle_out", "summarize"])
def test_one_huge_message_is_refused_with_both_numbers(client: SwitchboardClient,
                                                       strategy: str) -> None:
    huge = {"role": "user", "content": "lorem ipsum dolor sit amet " * 120}
    messages = [{"role": "system", "content": SYSTEM}, *exchanges(2), huge]
    overflow_numbers(refused(client, messages, strategy))


def test_one_huge_message_is_cut_from_its_start_by_sliding_window(
        client: SwitchboardClient) -> None:
    huge = {"role": "user", "content": "lorem ipsum dolor sit amet " * 120}
    result = client.chat([{"role": "system", "content": SYSTEM}, *exchanges(2), huge],
                         truncation="sliding_window", max_new_tokens=MAX_NEW_TOKENS, timeout=60)
    report = result.truncation
    assert report["applied"] and report["messages_dropped"] >= 4 and report["tokens_dropped"] > 0
    assert 0 < result.prompt_tokens <= BUDGET
    assert result.finish_reason in ("stop", "length")


def test_one_huge_message_on_a_session_leaves_it_as_it_was(client: SwitchboardClient) -> None:
    first = client.chat([{"role": "user", "content": "hi"}], session_id="edge-huge",
                        max_new_tokens=4, timeout=60)
    before = stored_messages(client, "edge-huge")
    assert before[-1] == {"role": "assistant", "content": first.text}
    huge = {"role": "user", "content": "lorem ipsum dolor sit amet " * 120}
    overflow_numbers(refused(client, [huge], "drop_oldest", session_id="edge-huge"))
    assert stored_messages(client, "edge-huge") == before


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_budget_smaller_than_the_system_prompt(client: SwitchboardClient, strategy: str) -> None:
    system = {"role": "system", "content": "You are a very detailed assistant. " * 40}
    needed, _ = overflow_numbers(refused(client, [system, {"role": "user", "content": "hi"}],
                                         strategy, session_id=f"edge-sys-{strategy}"))
    assert needed > BUDGET
    with pytest.raises(SwitchboardRpcError) as info:  # a refused first turn creates no session
        client.get_session(f"edge-sys-{strategy}", timeout=30)
    assert info.value.code == "NOT_FOUND"


def test_no_room_left_for_any_prompt_is_invalid_argument(client: SwitchboardClient) -> None:
    err = refused(client, [{"role": "user", "content": "hi"}], "drop_oldest",
                  max_new_tokens=CONTEXT_LENGTH)
    assert err.code == "INVALID_ARGUMENT"
    assert str(CONTEXT_LENGTH) in err.details and "max_new_tokens" in err.details


def test_summarize_with_a_window_too_small_for_the_summary_prompt(
        tiny_base: Path, adapters_root: Path, tmp_path: Path) -> None:
    from server.app import start_in_thread
    from server.config import ServerConfig

    running = start_in_thread(ServerConfig.build(
        base=str(tiny_base), adapters_root=adapters_root, port=0, device="cpu",
        context_length=128, default_max_new_tokens=16, shutdown_grace_seconds=0.5,
        sessions_db=None))
    try:
        with SwitchboardClient(f"127.0.0.1:{running.port}") as small:
            question = {"role": "user", "content": "and the last question?"}
            result = small.chat([*exchanges(10), question], truncation="summarize",
                                max_new_tokens=16, timeout=60)
        assert result.truncation["applied"] and result.prompt_tokens <= 128 - 16
    finally:
        running.stop()
