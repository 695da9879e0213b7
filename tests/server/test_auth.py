"""Who may call what, on the wire: API and admin keys, TLS and mutual TLS, the request size limit.

One real server on loopback with one API key and one admin key answers the key tests through raw
gRPC stubs; TLS and mutual TLS each get their own server on the throwaway PKI (`tls_files`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from server.app import RunningServer, start_in_thread
from server.auth import KeyKind, presented_key, required_kind
from server.config import ServerConfig

API_KEY = "api-key-0123456789-abcdef"
ADMIN_KEY = "admin-key-9876543210-fedcba"
UNKNOWN_KEY = "not-a-key-5555555555-zzzz"
MAX_REQUEST_BYTES = 64 * 1024
SESSION = "auth-session"

Metadata = tuple[tuple[str, str], ...]


def bearer(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


def x_api_key(key: str) -> Metadata:
    return (("x-api-key", key),)


def chat_request(session_id: str = "") -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.Message(role="user", content="hello")],
                          sampling=pb.SamplingParams(max_new_tokens=2), session_id=session_id)


class Records(logging.Handler):
    """Every log record of the process, formatted, for the never-log-a-key check."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.lines.append(f"{record.name} {text}")


@dataclass
class AuthServer:
    server: RunningServer
    log: Records


@pytest.fixture(scope="module")
def auth(tiny_base: Path, adapters_root: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    work = tmp_path_factory.mktemp("auth")
    adapters = shutil.copytree(adapters_root, work / "adapters")  # SetAlias writes aliases.json
    records = Records()
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)  # a key must not show up even in debug output
    try:
        server = start_in_thread(ServerConfig(
            base=str(tiny_base), adapters_root=adapters, port=0, device="cpu",
            sessions_db=work / "s.db", shutdown_grace_seconds=0.5, api_keys=(API_KEY,),
            admin_keys=(ADMIN_KEY,), max_request_bytes=MAX_REQUEST_BYTES))
        yield AuthServer(server, records)
        server.stop()
    finally:
        root.removeHandler(records)
        root.setLevel(previous_level)


@pytest.fixture(scope="module")
def channel(auth: AuthServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(auth.server.target) as ch:
        yield ch


def call_chat(channel: grpc.Channel, metadata: Metadata) -> None:
    reply = pb_grpc.InferenceServiceStub(channel).Chat(chat_request(), metadata=metadata,
                                                       timeout=60)
    assert reply.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


def call_chat_stream(channel: grpc.Channel, metadata: Metadata) -> None:
    chunks = list(pb_grpc.InferenceServiceStub(channel).ChatStream(
        chat_request(), metadata=metadata, timeout=60))
    assert chunks and chunks[-1].HasField("final")


def call_score(channel: grpc.Channel, metadata: Metadata) -> None:
    reply = pb_grpc.InferenceServiceStub(channel).Score(pb.ScoreRequest(
        messages=[pb.Message(role="user", content="hello")], continuation="hi"),
        metadata=metadata, timeout=60)
    assert reply.token_count > 0


def call_list_adapters(channel: grpc.Channel, metadata: Metadata) -> None:
    reply = pb_grpc.AdapterServiceStub(channel).ListAdapters(pb.ListAdaptersRequest(),
                                                             metadata=metadata, timeout=60)
    assert {a.name for a in reply.adapters} == {"alpha", "beta"}


def call_set_alias(channel: grpc.Channel, metadata: Metadata) -> None:
    reply = pb_grpc.AdapterServiceStub(channel).SetAlias(pb.SetAliasRequest(
        alias="prod", target="alpha@1", reason="auth test"), metadata=metadata, timeout=60)
    assert (reply.alias.name, reply.alias.version) == ("alpha", 1)


def call_list_sessions(channel: grpc.Channel, metadata: Metadata) -> None:
    pb_grpc.SessionServiceStub(channel).ListSessions(pb.ListSessionsRequest(),
                                                     metadata=metadata, timeout=60)


def call_get_session(channel: grpc.Channel, metadata: Metadata) -> None:
    # Answered NOT_FOUND or with the session: either way the call got past auth.
    try:
        pb_grpc.SessionServiceStub(channel).GetSession(pb.GetSessionRequest(session_id=SESSION),
                                                       metadata=metadata, timeout=60)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise


Call = Callable[[grpc.Channel, Metadata], None]
INFERENCE_CALLS: dict[str, Call] = {"Chat": call_chat, "ChatStream": call_chat_stream,
                                    "Score": call_score}
ADMIN_CALLS: dict[str, Call] = {"ListAdapters": call_list_adapters, "SetAlias": call_set_alias,
                                "ListSessions": call_list_sessions,
                                "GetSession": call_get_session}
ALL_CALLS = {**INFERENCE_CALLS, **ADMIN_CALLS}


def refused(call: Call, channel: grpc.Channel, metadata: Metadata) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(channel, metadata)
    return info.value


@pytest.mark.parametrize("method", ["Chat", "ChatStream", "Score", "ListAdapters",
                                    "ListSessions"])
def test_a_call_without_a_key_is_unauthenticated_and_says_how_to_send_one(
        channel: grpc.Channel, method: str) -> None:
    err = refused(ALL_CALLS[method], channel, ())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <key>" in err.details() and "x-api-key" in err.details()


@pytest.mark.parametrize("metadata", [bearer(UNKNOWN_KEY), x_api_key(UNKNOWN_KEY),
                                      (("authorization", f"Basic {API_KEY}"),),
                                      bearer(API_KEY[:-1])],
                         ids=["bearer", "x-api-key", "not-bearer", "api-key-prefix"])
def test_an_unknown_key_is_unauthenticated(channel: grpc.Channel, metadata: Metadata) -> None:
    for call in (call_chat, call_list_adapters):
        assert refused(call, channel, metadata).code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("method", ["ListAdapters", "SetAlias"])
def test_an_api_key_on_an_admin_method_is_permission_denied(channel: grpc.Channel,
                                                           method: str) -> None:
    err = refused(ADMIN_CALLS[method], channel, bearer(API_KEY))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "needs an admin key" in err.details() and method in err.details()


@pytest.mark.parametrize("form", [bearer, x_api_key], ids=["bearer", "x-api-key"])
@pytest.mark.parametrize("method", sorted(INFERENCE_CALLS))
def test_an_api_key_may_chat_and_score(channel: grpc.Channel, method: str,
                                       form: Callable[[str], Metadata]) -> None:
    INFERENCE_CALLS[method](channel, form(API_KEY))


@pytest.mark.parametrize("form", [bearer, x_api_key], ids=["bearer", "x-api-key"])
@pytest.mark.parametrize("method", sorted(ALL_CALLS))
def test_an_admin_key_may_call_everything(channel: grpc.Channel, method: str,
                                          form: Callable[[str], Metadata]) -> None:
    ALL_CALLS[method](channel, form(ADMIN_KEY))


def test_an_api_key_session_is_read_back_with_the_admin_key(channel: grpc.Channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    reply = stub.Chat(chat_request(SESSION), metadata=bearer(API_KEY), timeout=60)
    session = pb_grpc.SessionServiceStub(channel).GetSession(
        pb.GetSessionRequest(session_id=SESSION), metadata=bearer(ADMIN_KEY), timeout=60)
    assert [m.content for m in session.messages][-2:] == ["hello", reply.text]


def test_health_and_reflection_need_no_key(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="switchboard.v1.AdapterService"),
                         timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert "switchboard.v1.InferenceService" in names


def test_a_request_over_the_size_limit_is_resource_exhausted(channel: grpc.Channel) -> None:
    request = pb.ChatRequest(messages=[pb.Message(role="user", content="x" * MAX_REQUEST_BYTES)])
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.InferenceServiceStub(channel).Chat(request, metadata=bearer(API_KEY), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    call_chat(channel, bearer(API_KEY))  # the server goes on serving


def test_keys_never_reach_the_log_but_rejections_do(auth: AuthServer,
                                                    channel: grpc.Channel) -> None:
    refused(call_list_adapters, channel, bearer(API_KEY))
    refused(call_chat, channel, x_api_key(UNKNOWN_KEY))
    refused(call_chat, channel, ())
    call_chat(channel, bearer(ADMIN_KEY))
    log = "\n".join(auth.log.lines)
    assert "rejected call to /switchboard.v1.AdapterService/ListAdapters: wrong kind" in log
    assert "rejected call to /switchboard.v1.InferenceService/Chat: unknown key" in log
    assert "rejected call to /switchboard.v1.InferenceService/Chat: no key" in log
    assert "ipv4:127.0.0.1" in log  # the peer
    for key in (API_KEY, ADMIN_KEY, UNKNOWN_KEY):
        assert key not in log and key[:12] not in log


def test_the_key_table_and_the_metadata_forms() -> None:
    assert required_kind("/switchboard.v1.InferenceService/Chat") is KeyKind.API
    # Any key reaches SessionService; each key sees its own sessions (tests/server/test_tenants.py)
    assert required_kind("/switchboard.v1.SessionService/GetSession") is KeyKind.API
    assert required_kind("/switchboard.v1.AdapterService/ListAdapters") is KeyKind.ADMIN
    assert required_kind("/switchboard.v1.SomeFutureService/Do") is KeyKind.ADMIN
    assert required_kind("/grpc.health.v1.Health/Check") is None
    assert required_kind("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    assert presented_key((("authorization", "bearer abc"),)) == "abc"
    assert presented_key((("x-api-key", "abc"),)) == "abc"
    assert presented_key((("authorization", "Basic abc"),)) is None
    assert presented_key((("x-other", "abc"), ("key-bin", b"abc"))) is None


# ---------------------------------------------------------------- TLS and mutual TLS

def health_status(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                     timeout=5).status


def credentials(tls, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=None if key is None else key.read_bytes(),
        certificate_chain=None if cert is None else cert.read_bytes())


@pytest.fixture(scope="module")
def tls_server(tiny_base: Path, adapters_root: Path, tls_files) -> Iterator[RunningServer]:
    server = start_in_thread(ServerConfig(
        base=str(tiny_base), adapters_root=adapters_root, port=0, device="cpu",
        shutdown_grace_seconds=0.2, tls_cert=tls_files.server_cert,
        tls_key=tls_files.server_key, sessions_db=None))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(tiny_base: Path, adapters_root: Path, tls_files) -> Iterator[RunningServer]:
    server = start_in_thread(ServerConfig(
        base=str(tiny_base), adapters_root=adapters_root, port=0, device="cpu",
        shutdown_grace_seconds=0.2, tls_cert=tls_files.server_cert,
        tls_key=tls_files.server_key, tls_client_ca=tls_files.ca, sessions_db=None))
    yield server
    server.stop()


def test_tls_serves_a_client_that_trusts_the_ca_and_no_plaintext(tls_server: RunningServer,
                                                                 tls_files) -> None:
    with grpc.secure_channel(tls_server.target, credentials(tls_files)) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        call_chat(channel, ())
    with grpc.insecure_channel(tls_server.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_status(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_is_refused_by_a_client_that_does_not_trust_the_ca(tls_server: RunningServer,
                                                               tls_files) -> None:
    untrusted = grpc.ssl_channel_credentials(root_certificates=tls_files.stranger_cert
                                             .read_bytes())
    with grpc.secure_channel(tls_server.target, untrusted) as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_status(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("who", ["no certificate", "stranger certificate"])
def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(
        mtls_server: RunningServer, tls_files, who: str) -> None:
    creds = credentials(tls_files) if who == "no certificate" else credentials(
        tls_files, tls_files.stranger_cert, tls_files.stranger_key)
    with grpc.secure_channel(mtls_server.target, creds) as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_status(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_serves_a_client_with_a_certificate_from_the_ca(mtls_server: RunningServer,
                                                                   tls_files) -> None:
    creds = credentials(tls_files, tls_files.client_cert, tls_files.client_key)
    with grpc.secure_channel(mtls_server.target, creds) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        call_chat(channel, ())


@pytest.mark.parametrize("broken, phrase", [
    ("tls_cert", "TLS certificate (--tls-cert)"), ("tls_key", "TLS key (--tls-key)"),
    ("tls_client_ca", "client CA (--tls-client-ca)")])
def test_an_unreadable_pem_file_fails_start_naming_the_file(
        tiny_base: Path, adapters_root: Path, tls_files, tmp_path: Path, broken: str,
        phrase: str) -> None:
    files = {"tls_cert": tls_files.server_cert, "tls_key": tls_files.server_key,
             "tls_client_ca": tls_files.ca}
    files[broken] = tmp_path / "missing.pem"
    with pytest.raises(RuntimeError, match="did not start") as info:
        start_in_thread(ServerConfig(base=str(tiny_base), adapters_root=adapters_root, port=0,
                                     device="cpu", **files, sessions_db=None))
    message = str(info.value.__cause__)
    assert phrase in message and str(files[broken]) in message


def test_a_file_that_is_not_pem_fails_start_naming_the_file(
        tiny_base: Path, adapters_root: Path, tls_files, tmp_path: Path) -> None:
    not_pem = tmp_path / "cert.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a")
    with pytest.raises(RuntimeError, match="did not start") as info:
        start_in_thread(ServerConfig(base=str(tiny_base), adapters_root=adapters_root, port=0,
                                     device="cpu", tls_cert=not_pem,
                                     tls_key=tls_files.server_key, sessions_db=None))
    assert f"{not_pem} is not a PEM file" in str(info.value.__cause__)


def test_a_key_that_does_not_match_the_certificate_fails_start_naming_both(
        tiny_base: Path, adapters_root: Path, tls_files) -> None:
    with pytest.raises(RuntimeError, match="did not start") as info:
        start_in_thread(ServerConfig(base=str(tiny_base), adapters_root=adapters_root, port=0,
                                     device="cpu", tls_cert=tls_files.server_cert,
                                     tls_key=tls_files.stranger_key, sessions_db=None))
    message = str(info.value.__cause__)
    assert str(tls_files.server_cert) in message and str(tls_files.stranger_key) in message
