"""The `switchboard` CLI against the real server on loopback, plus its import and startup budget."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients import cli
from clients.client import SwitchboardClient

ROOT = Path(__file__).resolve().parents[2]
# A 256-token window makes truncation easy to reach with a few turns.
CONTEXT_LENGTH = 256


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def stat_values(stderr: str, key: str) -> list[int]:
    return [int(v) for v in re.findall(rf"\b{key}=(\d+)", stderr)]


# ---------------------------------------------------------------------- without a server


def test_cli_never_loads_model_or_server_code() -> None:
    code = (
        "import sys, clients.cli, clients.client, clients.aio, clients.types, clients.errors\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'server', 'trainer',"
        " 'common.modeling') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "import clients.cli, sys; assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_serve_replaces_the_process_with_the_server_cli(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: calls.append((path, argv)))
    assert cli.main(["serve", "--base", "b", "--adapters-root", "a", "--port", "0"]) == 0
    assert calls == [(sys.executable, [sys.executable, "-m", "server.cli", "serve", "--base", "b",
                                       "--adapters-root", "a", "--port", "0"])]


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("chat", "adapters", "sessions", "health", "score", "serve"):
        assert command in out


def test_unreachable_server_prints_the_code_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "health", "--target", "127.0.0.1:1")
    assert code == 1 and out == ""
    assert err.startswith("error: UNAVAILABLE: ")


def test_bad_strategy_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["chat", "--truncation", "newest", "hi"])
    assert info.value.code == 2
    assert "--truncation" in capsys.readouterr().err


# ---------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def target(tiny_base: Path, adapters_root: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[str]:
    from server.app import start_in_thread
    from server.config import ServerConfig

    work = tmp_path_factory.mktemp("cli-server")
    root = shutil.copytree(adapters_root, work / "adapters")  # aliases written here stay here
    config = ServerConfig.build(base=str(tiny_base), adapters_root=root, port=0,
                                sessions_db=work / "sessions.db", default_max_new_tokens=8,
                                context_length=CONTEXT_LENGTH)
    running = start_in_thread(config)
    yield f"127.0.0.1:{running.port}"
    running.stop()


def test_health_serving(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "health", "--target", target) == (0, "SERVING\n", "")
    code, out, _ = run_cli(capsys, "health", "--target", target, "--json")
    assert code == 0 and json.loads(out)["status"] == "SERVING"


def test_one_shot_chat_prints_the_answer(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    with SwitchboardClient(target) as client:
        expected = client.chat("What is LoRA?", adapter="alpha@1", max_new_tokens=6)
    code, out, err = run_cli(capsys, "chat", "--target", target, "--adapter", "alpha@1",
                             "--max-new-tokens", "6", "--stats", "What is LoRA?")
    assert code == 0
    assert out == expected.text + "\n"
    assert "adapter=alpha@1" in err and stat_values(err, "completion_tokens") == [
        expected.completion_tokens]


def test_one_shot_chat_json(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "chat", "--target", target, "--json", "--adapter", "beta",
                           "--max-new-tokens", "3", "--temperature", "0.8", "--seed", "1", "Hi")
    result = json.loads(out)
    assert code == 0
    assert (result["adapter_name"], result["adapter_version"]) == ("beta", 1)
    assert result["finish_reason"] in ("stop", "length") and result["request_id"]
    assert set(result["truncation"]) >= {"strategy", "messages_dropped", "tokens_dropped"}


def test_repetition_penalty_reaches_the_server(target: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "chat", "--target", target, "--max-new-tokens", "2",
                           "--repetition-penalty", "1.2", "hi")
    assert code == 0, err
    code, out, err = run_cli(capsys, "chat", "--target", target, "--repetition-penalty", "-0.5",
                             "hi")
    assert code == 1 and out == ""
    assert err.startswith("error: INVALID_ARGUMENT") and "repetition_penalty" in err


def test_one_shot_chat_process_loads_no_model_code(target: str) -> None:
    """A one-shot `switchboard chat` starts fast because it never imports torch, transformers
    or the server (checked on the real process's import log, not by timing it)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "clients.cli", "chat", "--target", target,
         "--max-new-tokens", "1", "--json", "Hi"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert json.loads(proc.stdout)["request_id"]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "clients.client" in imported  # the log is real: the client was imported
    heavy = sorted(m for m in imported
                   if m.split(".")[0] in ("torch", "transformers", "server", "trainer"))
    assert heavy == []


def test_repl_keeps_history_locally_and_resets(
    target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nHello\n/reset\nHello\n/quit\nnever\n"))
    code, out, err = run_cli(capsys, "chat", "--target", target, "--max-new-tokens", "3",
                             "--stats")
    prompt_tokens = stat_values(err, "prompt_tokens")
    assert code == 0 and len(prompt_tokens) == 3
    first, second, after_reset = prompt_tokens
    assert second > first == after_reset  # turn 2 carried turn 1; /reset forgot it
    assert out.endswith("\n")
    assert "[conversation cleared]" in err


def test_repl_with_a_session_survives_many_turns(
    target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    turns = [f"Turn {i}: tell me more about adapters and batching." for i in range(12)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n"))
    code, _, err = run_cli(capsys, "chat", "--target", target, "--session", "cli-long",
                           "--truncation", "drop_oldest", "--max-new-tokens", "8", "--stats",
                           "--system", "You are terse.")
    assert code == 0 and "error:" not in err
    assert all(p <= CONTEXT_LENGTH for p in stat_values(err, "prompt_tokens"))
    assert "truncation=drop_oldest" in err  # 12 turns do not fit 256 tokens
    with SwitchboardClient(target) as client:
        session = client.get_session("cli-long")
    assert [m["content"] for m in session.messages if m["role"] == "user"] == turns
    # The system prompt went once, with the first turn, and the server kept it.
    assert [m for m in session.messages if m["role"] == "system"] == [
        {"role": "system", "content": "You are terse."}]

    monkeypatch.setattr(sys, "stdin", io.StringIO("/reset\n"))
    assert run_cli(capsys, "chat", "--target", target, "--session", "cli-long")[0] == 0
    code, _, err = run_cli(capsys, "sessions", "show", "--target", target, "cli-long")
    assert code == 1 and err.startswith("error: NOT_FOUND: ")


def test_error_strategy_states_both_numbers(target: str, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    long = " ".join(["lorem ipsum dolor"] * 200)
    code, out, err = run_cli(capsys, "chat", "--target", target, "--truncation", "error", long)
    assert code == 1 and out == ""
    assert err.startswith("error: OUT_OF_RANGE: ")
    assert len(re.findall(r"\d+", err)) >= 2
    code, out, err = run_cli(capsys, "chat", "--target", target, "--truncation",
                             "sliding_window", "--stats", long)
    assert code == 0 and "truncation=sliding_window" in err


def test_adapters_commands(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "adapters", "list", "--target", target)
    assert code == 0 and out.startswith("ADAPTER")
    assert {"alpha@1", "alpha@2", "beta@1"} <= {line.split()[0] for line in out.splitlines()[1:]}

    code, out, _ = run_cli(capsys, "adapters", "load", "--target", target, "beta@1")
    assert code == 0 and out.startswith("loaded beta@1 (rank 4")
    code, out, _ = run_cli(capsys, "adapters", "alias", "--target", target, "canary", "beta@1")
    assert (code, out) == (0, "canary -> beta@1 (new)\n")
    code, out, _ = run_cli(capsys, "adapters", "alias", "--target", target, "canary", "alpha@2")
    assert (code, out) == (0, "canary -> alpha@2 (was beta@1)\n")

    code, out, _ = run_cli(capsys, "adapters", "list", "--target", target, "--json")
    listing = json.loads(out)
    by_ref = {f"{a['name']}@{a['version']}": a for a in listing["adapters"]}
    assert by_ref["beta@1"]["loaded"] and by_ref["beta@1"]["rank"] == 4
    assert {"alias": "canary", "name": "alpha", "version": 2, "previous": "",
            "target": "alpha@2"} in listing["aliases"]

    code, out, _ = run_cli(capsys, "adapters", "unload", "--target", target, "beta@1")
    assert (code, out) == (0, "unloaded beta@1\n")


def test_adapter_errors_print_the_status(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "adapters", "load", "--target", target, "gamma@1")
    assert code == 1 and out == ""
    assert err.startswith("error: NOT_FOUND: ") and "alpha" in err


def test_score(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "score", "--target", target, "--adapter", "alpha@2",
                           "Hi", "Hello, how can I help?")
    assert code == 0 and out.startswith("log_likelihood=-") and "adapter=alpha@2" in out
    code, out, _ = run_cli(capsys, "score", "--target", target, "--json", "Hi", "Hello")
    result = json.loads(out)
    assert result["token_count"] > 0 and result["perplexity"] > 1


def test_sessions_commands(target: str, capsys: pytest.CaptureFixture[str],
                           tmp_path: Path) -> None:
    for session in ("cli-a", "cli-b"):
        code, _, _ = run_cli(capsys, "chat", "--target", target, "--session", session,
                             "--max-new-tokens", "2", f"Hello from {session}")
        assert code == 0

    code, out, _ = run_cli(capsys, "sessions", "list", "--target", target)
    assert code == 0 and out.startswith("SESSION")
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows["cli-a"] == rows["cli-b"] == "2"

    code, out, _ = run_cli(capsys, "sessions", "show", "--target", target, "cli-a")
    assert code == 0 and "user: Hello from cli-a" in out and "\nassistant: " in out
    code, out, _ = run_cli(capsys, "sessions", "show", "--target", target, "--json", "cli-a")
    assert json.loads(out)["messages"][0] == {"role": "user", "content": "Hello from cli-a"}

    export = tmp_path / "sessions.jsonl"
    code, _, _ = run_cli(capsys, "sessions", "export", "--target", target, "-o", str(export),
                         "cli-a", "cli-b")
    records = [json.loads(line) for line in export.read_text().splitlines()]
    assert code == 0 and [r["session_id"] for r in records] == ["cli-a", "cli-b"]
    assert all(len(r["messages"]) == 2 for r in records)
    code, out, _ = run_cli(capsys, "sessions", "export", "--target", target)
    assert {"cli-a", "cli-b"} <= {json.loads(line)["session_id"] for line in out.splitlines()}

    assert run_cli(capsys, "sessions", "delete", "--target", target, "cli-b")[:2] == (
        0, "deleted cli-b\n")
    code, _, err = run_cli(capsys, "sessions", "delete", "--target", target, "cli-b")
    assert code == 1
