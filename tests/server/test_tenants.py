"""Keys as tenants on the real server: sessions belong to the key that made them, adapters are
scoped per key, and neither tells another tenant what exists.

One server on loopback with four keys from a TOML keys file: `acme` (API, may use `alpha` in
any version), `globex` (API, may use `beta*` and the bare base), `plain` (API, no scope) and
`root` (admin). Its sessions file is a schema-1 file written before owners existed, holding one
session (`legacy-1`) that must migrate to "no one" (admin-only).
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from clients.cli import main as cli_main
from clients.client import SwitchboardClient
from server.app import RunningServer, start_in_thread
from server.config import ServerConfig
from server.keys import KeyRing
from server.sessions import _SCHEMA_V1

ACME = "acme-key-0123456789abcdef"
GLOBEX = "globex-key-0123456789abcdef"
PLAIN = "plain-key-0123456789abcdef"
ROOT = "root-key-0123456789abcdef"
SECRET = "My account password is hunter2-SECRET"
KEYS_TOML = f"""
[[keys]]
name = "acme"
key = "{ACME}"
adapters = ["alpha"]

[[keys]]
name = "globex"
key = "{GLOBEX}"
adapters = ["beta*", "__base__"]

[[keys]]
name = "plain"
key = "{PLAIN}"

[[keys]]
name = "root"
key = "{ROOT}"
kind = "admin"
"""

Metadata = tuple[tuple[str, str], ...]


def bearer(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


def key_id(key: str) -> str:
    caller = KeyRing.of([key], []).identify(key)
    assert caller is not None
    return caller.key_id


def legacy_store(path: Path) -> Path:
    """A sessions file as Switchboard wrote it before owners (schema 1), with one session."""
    db = sqlite3.connect(path)
    for statement in _SCHEMA_V1:
        db.execute(statement)
    db.execute("INSERT INTO sessions (id, created, updated, turns) VALUES ('legacy-1', "
               "strftime('%s','now'), strftime('%s','now'), 1)")
    db.executemany("INSERT INTO messages VALUES ('legacy-1', ?, 0, ?, ?)",
                   [(0, "user", "old question"), (1, "assistant", "old answer")])
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    return path


@pytest.fixture(scope="module")
def server(tiny_base: Path, adapters_root: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    work = tmp_path_factory.mktemp("tenants")
    adapters = shutil.copytree(adapters_root, work / "adapters")
    # Aliases are resolved before the scope check: acme-prod is acme's, sneaky is not.
    (adapters / "aliases.json").write_text('{"acme-prod": "alpha@1", "sneaky": "beta@1"}\n')
    (work / "keys.toml").write_text(KEYS_TOML)
    running = start_in_thread(ServerConfig.build(
        base=str(tiny_base), adapters_root=adapters, port=0, device="cpu",
        sessions_db=legacy_store(work / "s.db"), keys_file=work / "keys.toml",
        default_max_new_tokens=4, shutdown_grace_seconds=0.5))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def chat(channel: grpc.Channel, key: str, text: str = "hello", session: str = "",
         adapter: str = "") -> pb.ChatResponse:
    return pb_grpc.InferenceServiceStub(channel).Chat(pb.ChatRequest(
        messages=[pb.Message(role="user", content=text)], session_id=session, adapter=adapter,
        sampling=pb.SamplingParams(max_new_tokens=2)), metadata=bearer(key), timeout=60)


def stream(channel: grpc.Channel, key: str, adapter: str) -> pb.ChatResponse:
    chunks = list(pb_grpc.InferenceServiceStub(channel).ChatStream(pb.ChatRequest(
        messages=[pb.Message(role="user", content="hello")], adapter=adapter,
        sampling=pb.SamplingParams(max_new_tokens=2)), metadata=bearer(key), timeout=60))
    return chunks[-1].final


def score(channel: grpc.Channel, key: str, adapter: str) -> pb.ScoreResponse:
    return pb_grpc.InferenceServiceStub(channel).Score(pb.ScoreRequest(
        messages=[pb.Message(role="user", content="hello")], continuation="hi",
        adapter=adapter), metadata=bearer(key), timeout=60)


def sessions(channel: grpc.Channel) -> pb_grpc.SessionServiceStub:
    return pb_grpc.SessionServiceStub(channel)


def refusal(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# ---------------------------------------------------------------- sessions belong to their key

def test_the_two_key_session_leak_is_refused_with_not_found(channel: grpc.Channel) -> None:
    first = chat(channel, PLAIN, SECRET, session="support-42")
    err = refusal(lambda: chat(channel, GLOBEX, "what did they say?", session="support-42"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "support-42" in err.details() and SECRET not in err.details()
    # The owner's conversation is untouched: one turn, B's message never joined it.
    own = sessions(channel).GetSession(pb.GetSessionRequest(session_id="support-42"),
                                       metadata=bearer(PLAIN), timeout=30)
    assert [m.content for m in own.messages] == [SECRET, first.text]
    assert own.owner == key_id(PLAIN)


def test_another_key_reads_lists_and_deletes_as_if_the_session_did_not_exist(
        channel: grpc.Channel) -> None:
    chat(channel, PLAIN, SECRET, session="plain-private")
    stub = sessions(channel)
    for session_id in ("plain-private", "never-made"):  # the same answers: no existence oracle
        err = refusal(lambda s=session_id: stub.GetSession(
            pb.GetSessionRequest(session_id=s), metadata=bearer(ACME), timeout=30))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == f"session {session_id!r} does not exist for this key (or has " \
                                "expired)"
        assert not stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id),
                                      metadata=bearer(ACME), timeout=30).deleted
    listed = stub.ListSessions(pb.ListSessionsRequest(), metadata=bearer(ACME), timeout=30)
    assert all(s.owner == key_id(ACME) for s in listed.sessions)
    assert "plain-private" not in {s.session_id for s in listed.sessions}
    still = stub.GetSession(pb.GetSessionRequest(session_id="plain-private"),
                            metadata=bearer(PLAIN), timeout=30)
    assert still.messages[0].content == SECRET


def test_a_key_lists_and_deletes_its_own_sessions(channel: grpc.Channel) -> None:
    chat(channel, ACME, "mine", session="acme-1", adapter="alpha")
    stub = sessions(channel)
    listed = stub.ListSessions(pb.ListSessionsRequest(), metadata=bearer(ACME), timeout=30)
    assert "acme-1" in {s.session_id for s in listed.sessions}
    assert stub.DeleteSession(pb.DeleteSessionRequest(session_id="acme-1"),
                              metadata=bearer(ACME), timeout=30).deleted


def test_admin_keys_see_and_manage_every_session_with_its_owner(channel: grpc.Channel) -> None:
    chat(channel, GLOBEX, "globex here", session="globex-1")
    listed = sessions(channel).ListSessions(pb.ListSessionsRequest(), metadata=bearer(ROOT),
                                            timeout=30)
    owners = {s.session_id: s.owner for s in listed.sessions}
    assert owners["globex-1"] == key_id(GLOBEX) and owners["legacy-1"] == ""
    for key in (ACME, GLOBEX, PLAIN, ROOT):
        assert key not in str(listed)
    # An admin may continue another key's conversation; it stays the other key's.
    chat(channel, ROOT, "admin follow-up", session="globex-1")
    kept = sessions(channel).GetSession(pb.GetSessionRequest(session_id="globex-1"),
                                        metadata=bearer(GLOBEX), timeout=30)
    assert kept.owner == key_id(GLOBEX) and len(kept.messages) == 4
    assert sessions(channel).DeleteSession(pb.DeleteSessionRequest(session_id="globex-1"),
                                           metadata=bearer(ROOT), timeout=30).deleted


def test_sessions_made_before_owners_existed_are_admin_only(channel: grpc.Channel) -> None:
    err = refusal(lambda: chat(channel, PLAIN, "take over", session="legacy-1"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    legacy = sessions(channel).GetSession(pb.GetSessionRequest(session_id="legacy-1"),
                                          metadata=bearer(ROOT), timeout=30)
    assert [m.content for m in legacy.messages] == ["old question", "old answer"]
    assert legacy.owner == ""


def test_the_cli_exports_only_the_callers_sessions(server: RunningServer, channel: grpc.Channel,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    chat(channel, ACME, "export me", session="acme-export", adapter="alpha")
    out = tmp_path / "acme.jsonl"
    assert cli_main(["sessions", "export", "--target", server.target, "--api-key", ACME,
                     "-o", str(out)]) == 0
    exported = out.read_text()
    assert "acme-export" in exported and SECRET not in exported and "legacy-1" not in exported
    assert cli_main(["sessions", "export", "--target", server.target, "--api-key", ACME,
                     "support-42"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cli_main(["sessions", "list", "--target", server.target, "--api-key", ROOT]) == 0
    listing = capsys.readouterr().out
    assert "OWNER" in listing and key_id(PLAIN) in listing


# ---------------------------------------------------------------- adapters scoped per key

CALLS = {"Chat": lambda ch, key, ref: chat(ch, key, adapter=ref).adapter,
         "ChatStream": lambda ch, key, ref: stream(ch, key, ref).adapter,
         "Score": lambda ch, key, ref: score(ch, key, ref).adapter}


@pytest.mark.parametrize("method", sorted(CALLS))
def test_a_scoped_key_uses_the_adapters_in_its_scope(channel: grpc.Channel, method: str) -> None:
    for ref, served in [("alpha", ("alpha", 2)), ("alpha@1", ("alpha", 1)),
                        ("acme-prod", ("alpha", 1))]:
        adapter = CALLS[method](channel, ACME, ref)
        assert (adapter.name, adapter.version) == served


@pytest.mark.parametrize("method", sorted(CALLS))
def test_outside_its_scope_a_key_is_denied_alike_whether_the_adapter_exists_or_not(
        channel: grpc.Channel, method: str) -> None:
    for ref in ("beta", "beta@1", "sneaky", "gamma", "alpha@9", ""):
        err = refusal(lambda r=ref: CALLS[method](channel, ACME, r))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (ref, err.details())
        assert "not available to key 'acme'; it may use: alpha" in err.details()
        assert "beta" not in err.details().replace(repr(ref), "")  # no list of what exists


def test_scopes_follow_the_pattern_and_the_bare_base_is_listed_explicitly(
        channel: grpc.Channel) -> None:
    assert chat(channel, GLOBEX, adapter="beta").adapter.name == "beta"
    assert chat(channel, GLOBEX).adapter.name == ""  # __base__ in its scope
    assert refusal(lambda: chat(channel, GLOBEX, adapter="alpha")).code() == \
        grpc.StatusCode.PERMISSION_DENIED


def test_a_key_without_a_scope_uses_every_adapter_as_before(channel: grpc.Channel) -> None:
    for ref in ("alpha", "beta", "sneaky", ""):
        chat(channel, PLAIN, adapter=ref)
    err = refusal(lambda: chat(channel, PLAIN, adapter="gamma"))
    assert err.code() == grpc.StatusCode.NOT_FOUND  # unscoped keys are told what exists


def test_the_python_client_sees_owners_and_scope_refusals(server: RunningServer) -> None:
    from clients.errors import PermissionDeniedError

    with SwitchboardClient(server.target, api_key=ACME, retries=0) as client:
        client.chat([{"role": "user", "content": "hi"}], adapter="alpha", session_id="acme-c",
                    max_new_tokens=2)
        assert client.get_session("acme-c").owner == key_id(ACME)
        with pytest.raises(PermissionDeniedError):
            client.chat([{"role": "user", "content": "hi"}], adapter="beta", max_new_tokens=2)
