"""Keys as tenants: the keys files, who a key is, and keys reloaded on SIGHUP under traffic.

The first part reads keys files and checks identities, scopes and refusals in-process (pure
logic, no server). The last test runs the real server as a subprocess (signals need the main
thread), rotates its keys with SIGHUP while a still-valid key chats without pause, and checks
that no request of that key failed, that the revoked key is refused at once (streams too) and
that a broken file keeps the keys in force.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import ServerProcess
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from server.audit import read_entries
from server.errors import PermissionDeniedError, UnauthenticatedError
from server.keys import (
    ANONYMOUS,
    AuthRejected,
    Caller,
    KeyKind,
    KeyLimits,
    KeyRing,
    KeySources,
    LiveKeys,
    key_id_of,
)

ACME_KEY = "acme-key-0123456789abcdef"
GLOBEX_KEY = "globex-key-0123456789abcdef"
ROOT_KEY = "root-key-0123456789abcdef"
PLAIN_KEY = "plain-key-0123456789abcdef"


def toml_entry(name: str, key: str, **fields: object) -> str:
    lines = [f'name = "{name}"', f'key = "{key}"']
    for field, value in fields.items():
        text = f'"{value}"' if isinstance(value, str) else repr(value).replace("'", '"')
        lines.append(f"{field} = {text}")
    return "[[keys]]\n" + "\n".join(lines) + "\n"


def keys_file(tmp_path: Path, *entries: str, name: str = "keys.toml") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(entries))
    return path


def load(path: Path) -> KeyRing:
    return KeyRing(KeySources(keys_file=path).load())


# ---------------------------------------------------------------- the keys file

def test_a_tenants_file_gives_each_key_a_name_a_scope_and_limits(tmp_path: Path) -> None:
    path = keys_file(tmp_path,
                     toml_entry("acme", ACME_KEY, adapters=["acme-*", "support"],
                                max_in_flight=2, tokens_per_minute=600, token_burst=50),
                     toml_entry("root", ROOT_KEY, kind="admin"))
    ring = load(path)
    acme, root = ring.identify(ACME_KEY), ring.identify(ROOT_KEY)
    assert acme is not None and root is not None
    assert (acme.name, acme.kind, acme.adapters) == ("acme", KeyKind.API, ("acme-*", "support"))
    assert acme.limits == KeyLimits(max_in_flight=2, tokens_per_minute=600, token_burst=50)
    assert root.is_admin and not root.scoped and not root.limits.any
    assert ring.identify(GLOBEX_KEY) is None


def test_a_key_may_be_given_by_its_sha256_so_the_file_holds_no_secret(tmp_path: Path) -> None:
    hexdigest = hashlib.sha256(ACME_KEY.encode()).hexdigest()
    path = keys_file(tmp_path, f'[[keys]]\nname = "acme"\nsha256 = "{hexdigest}"\n')
    caller = load(path).identify(ACME_KEY)
    assert caller is not None and caller.name == "acme"


def test_the_key_id_is_stable_derived_and_reveals_nothing_of_the_key() -> None:
    ring = KeyRing.of([ACME_KEY], [])
    caller = ring.identify(ACME_KEY)
    assert caller is not None
    assert caller.key_id == key_id_of(hashlib.sha256(ACME_KEY.encode()).digest())
    assert caller.key_id == KeyRing.of([ACME_KEY], []).identify(ACME_KEY).key_id
    assert caller.key_id.startswith("k-") and len(caller.key_id) == 18
    assert ACME_KEY[:8] not in caller.key_id
    assert caller.key_id[2:] not in hashlib.sha256(ACME_KEY.encode()).hexdigest()


def test_plain_key_lists_give_unscoped_keys_named_after_their_kind(tmp_path: Path) -> None:
    (tmp_path / "api.keys").write_text(f"# comment\n{PLAIN_KEY}  # ci\n\n")
    sources = KeySources(admin_keys=(ROOT_KEY,), api_keys_file=tmp_path / "api.keys")
    ring = KeyRing(sources.load())
    plain, root = ring.identify(PLAIN_KEY), ring.identify(ROOT_KEY)
    assert plain is not None and plain.name == f"api-{plain.key_id[2:10]}" and not plain.scoped
    assert root is not None and root.name.startswith("admin-") and root.is_admin


@pytest.mark.parametrize("text, phrase", [
    ("[[keys]]\nname = 'acme'\n", "exactly one of key or sha256"),
    (toml_entry("acme", "short"), "at least 16 characters"),
    (toml_entry("bad name", ACME_KEY), "name must be"),
    (toml_entry("acme", ACME_KEY, kind="owner"), "kind must be 'api' or 'admin'"),
    (toml_entry("acme", ACME_KEY, adapters="alpha"), "adapters must be a list"),
    (toml_entry("acme", ACME_KEY, kind="admin", adapters=["a"]), "for api keys only"),
    (toml_entry("acme", ACME_KEY, tokens_per_minute=-1), "tokens_per_minute must be"),
    (toml_entry("acme", ACME_KEY, max_in_flight=1.5), "max_in_flight must be an integer"),
    (toml_entry("acme", ACME_KEY, adaptors=["a"]), "unknown field(s) adaptors"),
    (toml_entry("acme", ACME_KEY) + toml_entry("acme", GLOBEX_KEY), "named 'acme'"),
    (toml_entry("acme", ACME_KEY) + toml_entry("other", ACME_KEY, kind="admin"),
     "configured twice"),
    ("[[keys]\n", "is not valid TOML"),
    ("[server]\nport = 1\n", "expected only [[keys]] tables"),
])
def test_a_bad_keys_file_is_refused_naming_the_file_and_the_entry(
        tmp_path: Path, text: str, phrase: str) -> None:
    path = keys_file(tmp_path, text)
    with pytest.raises(ValueError) as info:
        load(path)
    assert phrase in str(info.value) and str(path) in str(info.value)
    for key in (ACME_KEY, GLOBEX_KEY):
        assert key not in str(info.value)


# ---------------------------------------------------------------- who may do what

def test_scopes_match_the_resolved_name_or_version_by_glob() -> None:
    caller = Caller("k-1", "acme", KeyKind.API, ("acme-*", "support@2", "__base__"))
    assert caller.may_use("acme-chat", 3) and caller.may_use("support", 2)
    assert caller.may_use(None)  # the bare base, listed as __base__
    assert not caller.may_use("support", 1) and not caller.may_use("globex-chat", 1)
    assert not Caller("k-1", "acme", KeyKind.API, ("alpha",)).may_use(None)
    assert Caller("k-1", "plain", KeyKind.API).may_use("anything", 1)


def test_only_the_creator_and_admins_own_a_session_and_no_one_owns_legacy_ones() -> None:
    acme = Caller("k-acme", "acme", KeyKind.API)
    assert acme.owns("k-acme") and not acme.owns("k-globex") and not acme.owns("")
    assert ANONYMOUS.owns("") and ANONYMOUS.owns("k-acme")


def test_authorize_returns_the_caller_or_refuses_with_the_right_error() -> None:
    ring = KeyRing.of([PLAIN_KEY], [ROOT_KEY])
    caller = ring.authorize(PLAIN_KEY, KeyKind.API, "chat")
    assert caller is not None and caller.kind is KeyKind.API
    assert ring.authorize(None, None, "health") is None
    for key, needed, error, reason in [(None, KeyKind.API, UnauthenticatedError, "no key"),
                                       (GLOBEX_KEY, KeyKind.API, UnauthenticatedError,
                                        "unknown key"),
                                       (PLAIN_KEY, KeyKind.ADMIN, PermissionDeniedError,
                                        "wrong kind")]:
        with pytest.raises(AuthRejected) as info:
            ring.authorize(key, needed, "the call")
        assert isinstance(info.value.error, error) and info.value.reason == reason


def test_a_swapped_ring_refuses_removed_keys_from_the_next_call_on() -> None:
    live = LiveKeys(KeyRing.of([PLAIN_KEY, GLOBEX_KEY], []))
    live.swap(KeyRing.of([PLAIN_KEY], []))
    assert live.identify(PLAIN_KEY) is not None and live.identify(GLOBEX_KEY) is None
    assert "KeyRing(1 keys)" == repr(live.ring) and PLAIN_KEY not in repr(live.ring)


# ---------------------------------------------------------------- SIGHUP on the real server

def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def chat(channel: grpc.Channel, key: str) -> pb.ChatResponse:
    return pb_grpc.InferenceServiceStub(channel).Chat(pb.ChatRequest(
        messages=[pb.Message(role="user", content="hi")],
        sampling=pb.SamplingParams(max_new_tokens=2)), metadata=bearer(key), timeout=60)


def stream(channel: grpc.Channel, key: str) -> list[pb.ChatChunk]:
    return list(pb_grpc.InferenceServiceStub(channel).ChatStream(pb.ChatRequest(
        messages=[pb.Message(role="user", content="hi")],
        sampling=pb.SamplingParams(max_new_tokens=2)), metadata=bearer(key), timeout=60))


class Traffic(threading.Thread):
    """Chats with one key, back to back, until stopped; keeps every failure."""

    def __init__(self, target: str, key: str) -> None:
        super().__init__(daemon=True)
        self.channel = grpc.insecure_channel(target)
        self.key = key
        self.done = 0
        self.failures: list[grpc.RpcError] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                chat(self.channel, self.key)
                self.done += 1
            except grpc.RpcError as err:
                self.failures.append(err)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=60)
        self.channel.close()


def wait_for_log(server: ServerProcess, phrase: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while server.text().count(phrase) < count:
        assert time.monotonic() < deadline, f"no {phrase!r} in the log:\n{server.text()}"
        time.sleep(0.05)


def refused_code(call, *args: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    return info.value.code()


def test_sighup_rotates_keys_under_traffic_without_failing_a_valid_key(
        tiny_base: Path, adapters_root: Path, tmp_path: Path) -> None:
    path = keys_file(tmp_path, toml_entry("acme", ACME_KEY), toml_entry("globex", GLOBEX_KEY))
    audit = tmp_path / "audit.jsonl"
    server = ServerProcess(tiny_base, adapters_root, tmp_path / "s.db", tmp_path / "server.log",
                           extra=("--keys-file", str(path), "--audit-log", str(audit)))
    traffic = None
    try:
        server.wait_serving()
        chat(server.channel, GLOBEX_KEY)
        traffic = Traffic(server.target, ACME_KEY)
        traffic.start()
        # Globex revoked, initech added, while acme keeps chatting.
        keys_file(tmp_path, toml_entry("acme", ACME_KEY), toml_entry("initech", PLAIN_KEY))
        server.process.send_signal(signal.SIGHUP)
        wait_for_log(server, "keys reloaded", 1)
        assert refused_code(chat, server.channel, GLOBEX_KEY) is grpc.StatusCode.UNAUTHENTICATED
        assert refused_code(stream, server.channel, GLOBEX_KEY) is \
            grpc.StatusCode.UNAUTHENTICATED
        assert chat(server.channel, PLAIN_KEY).finish_reason
        # A broken file keeps the keys in force.
        path.write_text("[[keys]\n")
        server.process.send_signal(signal.SIGHUP)
        wait_for_log(server, "key reload failed", 1)
        assert stream(server.channel, PLAIN_KEY)[-1].HasField("final")
        done_before, deadline = traffic.done, time.monotonic() + 60
        while traffic.done < done_before + 2:  # acme is still served after the failed reload
            assert not traffic.failures and traffic.is_alive()
            assert time.monotonic() < deadline, f"acme served {traffic.done - done_before} in 60s"
            time.sleep(0.05)
    finally:
        if traffic is not None:
            traffic.stop()
        server.ensure_dead()
    assert traffic.failures == [] and traffic.done > 2
    assert "is not valid TOML" in server.text()
    assert [(e.who, e.action, e.outcome) for e in read_entries(audit)] == [
        ("SIGHUP", "keys.reload", "OK"), ("SIGHUP", "keys.reload", "INVALID_ARGUMENT")]
    assert "1 added, 1 removed" in read_entries(audit)[0].detail
    for key in (ACME_KEY, GLOBEX_KEY, PLAIN_KEY):
        assert key not in server.text() and key not in audit.read_text()
