"""The audit trail: admin actions on the real server land in an append-only JSON-lines file,
with who (the key's name), what, when and the outcome, and `switchboard audit` prints them.

One server on loopback with an admin key `ops`, an API key `acme` and `--audit-log`; the tests
load, unload, alias and delete, successfully and not, and then read the file back.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from clients.cli import main as cli_main
from clients.client import SwitchboardClient
from clients.errors import SwitchboardRpcError
from server.app import RunningServer, start_in_thread
from server.audit import AuditLog, entry, read_entries
from server.config import ServerConfig
from server.keys import ANONYMOUS

OPS = "ops-admin-key-0123456789abcdef"
ACME = "acme-api-key-0123456789abcdef"
KEYS_TOML = f"""
[[keys]]
name = "ops"
key = "{OPS}"
kind = "admin"

[[keys]]
name = "acme"
key = "{ACME}"
"""


@dataclass
class Audited:
    server: RunningServer
    log: Path


@pytest.fixture(scope="module")
def audited(tiny_base: Path, adapters_root: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audited]:
    work = tmp_path_factory.mktemp("audit")
    adapters = shutil.copytree(adapters_root, work / "adapters")  # SetAlias writes there
    (work / "keys.toml").write_text(KEYS_TOML)
    log = work / "trail" / "audit.jsonl"
    server = start_in_thread(ServerConfig.build(
        base=str(tiny_base), adapters_root=adapters, port=0, device="cpu",
        sessions_db=work / "s.db", keys_file=work / "keys.toml", audit_log=log,
        default_max_new_tokens=2, shutdown_grace_seconds=0.5))
    yield Audited(server, log)
    server.stop()


@pytest.fixture(scope="module")
def trail(audited: Audited) -> list[dict[str, str]]:
    """Admin actions done once, the file read back as dicts (oldest first)."""
    target = audited.server.target
    with SwitchboardClient(target, api_key=OPS, retries=0) as ops, \
            SwitchboardClient(target, api_key=ACME, retries=0) as acme:
        ops.load_adapter("alpha@1")
        ops.set_alias("prod", "alpha@1", reason="first release")
        with pytest.raises(SwitchboardRpcError):
            ops.load_adapter("gamma")
        ops.unload_adapter("alpha@1")
        acme.chat("hi", session_id="acme-1", max_new_tokens=1)
        assert acme.delete_session("acme-1")
        ops.chat("hi", session_id="ops-1", max_new_tokens=1)
        assert ops.delete_session("ops-1")
    return [json.loads(line) for line in audited.log.read_text().splitlines()]


def test_each_admin_action_is_one_line_with_who_what_and_outcome(
        trail: list[dict[str, str]]) -> None:
    assert [(e["who"], e["action"], e["target"], e["outcome"]) for e in trail] == [
        ("ops", "adapter.load", "alpha@1", "OK"),
        ("ops", "alias.set", "prod -> alpha@1", "OK"),
        ("ops", "adapter.load", "gamma", "NOT_FOUND"),
        ("ops", "adapter.unload", "alpha@1", "OK"),
        ("acme", "session.delete", "acme-1", "OK"),
        ("ops", "session.delete", "ops-1", "OK"),
    ]
    refused = trail[2]
    assert "gamma" in refused["detail"] and refused["key_id"].startswith("k-")
    times = [datetime.fromisoformat(e["time"]) for e in trail]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)


def test_chats_are_not_admin_actions_and_keys_never_reach_the_file(
        audited: Audited, trail: list[dict[str, str]]) -> None:
    text = audited.log.read_text()
    assert "chat" not in {e["action"].split(".")[0] for e in trail}
    assert OPS not in text and ACME not in text and OPS[:12] not in text


def test_the_file_is_only_appended_to(audited: Audited, trail: list[dict[str, str]]) -> None:
    before = audited.log.read_bytes()
    with SwitchboardClient(audited.server.target, api_key=OPS, retries=0) as ops:
        ops.load_adapter("beta")
    after = audited.log.read_bytes()
    assert after.startswith(before) and after.count(b"\n") == before.count(b"\n") + 1
    assert read_entries(audited.log)[-1].target == "beta"


def test_switchboard_audit_prints_and_filters_the_trail(
        audited: Audited, trail: list[dict[str, str]],
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["audit", str(audited.log)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TIME", "WHO", "ACTION", "TARGET", "OUTCOME", "DETAIL"]
    assert any("alias.set" in line and "prod -> alpha@1" in line for line in lines)
    assert cli_main(["audit", str(audited.log), "--who", "acme", "--json"]) == 0
    assert [e["action"] for e in json.loads(capsys.readouterr().out)] == ["session.delete"]
    assert cli_main(["audit", str(audited.log), "--failed", "--json"]) == 0
    assert [e["outcome"] for e in json.loads(capsys.readouterr().out)] == ["NOT_FOUND"]
    assert cli_main(["audit", str(audited.log), "--action", "adapter.", "--json"]) == 0
    assert {e["action"] for e in json.loads(capsys.readouterr().out)} == {"adapter.load",
                                                                          "adapter.unload"}


def test_switchboard_audit_refuses_a_file_that_is_not_a_trail(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.jsonl").write_text('{"who": "ops"}\nnot json\n')
    assert cli_main(["audit", str(tmp_path / "x.jsonl")]) == 1
    assert "x.jsonl:2 is not a JSON line" in capsys.readouterr().err
    assert cli_main(["audit", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl" in capsys.readouterr().err


def test_an_unopenable_audit_log_is_refused_naming_the_setting(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match="--audit-log"):
        AuditLog(tmp_path / "dir")


def test_a_reload_is_recorded_as_the_server_itself(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    log.record(entry(None, "keys.reload", "key files", "OK", "2 keys"))
    log.record(entry(ANONYMOUS, "adapter.load", "alpha", "OK"))
    log.close()
    assert [(e.who, e.key_id) for e in read_entries(tmp_path / "a.jsonl")] == [
        ("SIGHUP", ""), ("anonymous", "")]
