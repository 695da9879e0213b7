"""The synchronous Python client: deadlines, retries on UNAVAILABLE, streaming as an iterator.

Every call returns a plain dataclass from `clients.types` and raises only
`clients.errors.SwitchboardRpcError`. A call's `timeout` is one deadline over all its attempts:
retries never stretch it. A stream is retried only while it has yielded nothing. Besides
UNAVAILABLE, a RESOURCE_EXHAUSTED that carries `retry-after` (a key over its rate limit) is
retried after exactly that wait, when the deadline and the retry count allow it.

`ClientSecurity` (shared with the asyncio client) turns the security options into channel
credentials (TLS, mutual TLS) and the metadata every call carries (`authorization: Bearer KEY`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Unpack

import grpc
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from clients.errors import SwitchboardRpcError
from clients.types import (
    AdapterInfo,
    AliasInfo,
    AliasMove,
    ChatChunk,
    ChatOptions,
    ChatResult,
    LoadResult,
    MessagesLike,
    ScoreResult,
    Session,
    SessionInfo,
    chat_request_pb,
    score_request_pb,
)

T = TypeVar("T")

# Only a server that is not there (yet) is worth asking again; every other code is an answer.
RETRYABLE_CODES = frozenset({"UNAVAILABLE"})

Metadata = tuple[tuple[str, str], ...]
PemPath = str | Path
# Replicas behind a proxy hash this header to keep an adapter's traffic where it is loaded
# (deploy/nginx); a single server ignores it.
ADAPTER_AFFINITY_HEADER = "x-switchboard-adapter"


def with_affinity(metadata: Metadata, request: Any) -> Metadata:
    """`metadata` plus the adapter affinity header when `request` names an adapter."""
    adapter = getattr(request, "adapter", "")
    if not isinstance(adapter, str) or not adapter:
        return metadata
    return (*metadata, (ADAPTER_AFFINITY_HEADER, adapter.split("@", 1)[0]))


def _read_pem(option: str, path: Path) -> bytes:
    """The bytes of a PEM file, or a ValueError naming the option and the file (never its text)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{option}: no such file: {path}") from None
    except OSError as err:
        raise ValueError(f"{option}: cannot read {path}: {err.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{option}: {path} is not a PEM file (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True)
class ClientSecurity:
    """How a client proves who it is: an API key in every call's metadata, TLS, mutual TLS.

    `ca_cert` (the CA that signed the server's certificate; default: the system's roots) and
    `client_cert`/`client_key` (mutual TLS, given together) are PEM files and imply `tls`.
    The key is kept out of repr() and out of every message this class raises.
    """

    api_key: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_cert: PemPath | None = None
    client_cert: PemPath | None = None
    client_key: PemPath | None = None
    _pems: dict[str, bytes] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = self.api_key
        if key is not None and not (isinstance(key, str) and key and key.isascii()
                                    and key.isprintable() and not any(c.isspace() for c in key)):
            # gRPC metadata values are printable ASCII; say what is wrong, never the key.
            raise ValueError("api_key must be a non-empty string of printable ASCII without "
                             "spaces (or None for no key)")
        for name in ("ca_cert", "client_cert", "client_key"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key are given together (mutual TLS needs "
                             f"both PEM files), got client_cert={self.client_cert} "
                             f"client_key={self.client_key}")
        # Read now, so a wrong path fails here and not as UNAVAILABLE on the first call.
        for name in ("ca_cert", "client_cert", "client_key"):
            path = getattr(self, name)
            if path is not None:
                self._pems[name] = _read_pem(name, path)

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_cert is not None or self.client_cert is not None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials for the channel, or None for a plaintext channel."""
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self._pems.get("ca_cert"),
            private_key=self._pems.get("client_key"),
            certificate_chain=self._pems.get("client_cert"),
        )

    def call_metadata(self) -> Metadata:
        """What every call sends: the API key as a bearer token, when there is one."""
        return () if self.api_key is None else (("authorization", f"Bearer {self.api_key}"),)

    def describe(self) -> str:
        """For repr(): which protections are on, never the key itself."""
        transport = "mtls" if self.client_cert else "tls" if self.uses_tls else "plaintext"
        return f"{transport}, {'api key' if self.api_key else 'no key'}"


def open_channel(
    target: str, security: ClientSecurity, credentials: grpc.ChannelCredentials | None,
    options: Sequence[tuple[str, Any]], *, insecure: Callable[..., T], secure: Callable[..., T],
) -> T:
    """One channel (sync or aio, by the factories given).

    `credentials` is the escape hatch for anything else grpc offers; it excludes the TLS options.
    """
    if credentials is not None and security.uses_tls:
        raise ValueError("give either credentials or tls/ca_cert/client_cert/client_key, not both")
    if credentials is None:
        credentials = security.channel_credentials()
    if credentials is None:
        return insecure(target, options=list(options))
    return secure(target, credentials, options=list(options))


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: wait n is uniform(0, min(max, initial * mult**n))."""

    retries: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {self.retries!r}")
        if not self.initial_backoff_s > 0:
            raise ValueError(f"initial_backoff_s must be > 0, got {self.initial_backoff_s!r}")
        if not self.max_backoff_s >= self.initial_backoff_s:
            raise ValueError(
                f"max_backoff_s must be >= initial_backoff_s ({self.initial_backoff_s}), "
                f"got {self.max_backoff_s!r}"
            )
        if not self.multiplier >= 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier!r}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (0-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt)
        # Full jitter keeps many clients that lost one server from reconnecting in lockstep.
        return (rng or random).uniform(0.0, cap)


class Deadline:
    """One absolute deadline shared by every attempt of a call; None means no deadline."""

    def __init__(self, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.monotonic())

    def allows_wait(self, seconds: float) -> bool:
        """True when waiting `seconds` still leaves time for another attempt."""
        left = self.remaining()
        return left is None or seconds < left


def should_retry(err: SwitchboardRpcError, attempt: int, policy: RetryPolicy) -> bool:
    told_when = err.code == "RESOURCE_EXHAUSTED" and err.retry_after_s is not None
    return (err.code in RETRYABLE_CODES or told_when) and attempt < policy.retries


def retry_wait(err: SwitchboardRpcError, attempt: int, policy: RetryPolicy) -> float:
    """The server's `retry-after` when it sent one, else the policy's jittered backoff."""
    return err.retry_after_s if err.retry_after_s is not None else policy.delay(attempt)


class ChatStream(Iterator[ChatChunk]):
    """Iterator over the chunks of one streamed answer; stopping early cancels the call.

    Use it in a `with` block, or call `cancel()`, to cancel as soon as the consumer stops;
    breaking out of a bare `for` loop also cancels once the stream is garbage collected.
    """

    def __init__(self, chunks: Iterator[ChatChunk]) -> None:
        self._chunks = chunks

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> ChatChunk:
        return next(self._chunks)

    def cancel(self) -> None:
        self._chunks.close()  # type: ignore[attr-defined]

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class SwitchboardClient:
    """Blocking client for one Switchboard server; use as a context manager or call `close()`."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        retries: int = 3,
        retry_policy: RetryPolicy | None = None,
        api_key: str | None = None,
        tls: bool = False,
        ca_cert: PemPath | None = None,
        client_cert: PemPath | None = None,
        client_key: PemPath | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        self.target = target
        self.timeout = timeout
        self.retry_policy = retry_policy or RetryPolicy(retries=retries)
        self._security = ClientSecurity(api_key=api_key, tls=tls, ca_cert=ca_cert,
                                        client_cert=client_cert, client_key=client_key)
        self._metadata = self._security.call_metadata()
        self._channel = open_channel(target, self._security, credentials, options,
                                     insecure=grpc.insecure_channel, secure=grpc.secure_channel)
        self._inference = pb_grpc.InferenceServiceStub(self._channel)
        self._adapters = pb_grpc.AdapterServiceStub(self._channel)
        self._sessions = pb_grpc.SessionServiceStub(self._channel)

    # ------------------------------------------------------------------ plumbing

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        """Run one unary RPC under one deadline, retrying UNAVAILABLE with backoff."""
        deadline = Deadline(self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            try:
                return method(request, timeout=deadline.remaining(),
                              metadata=with_affinity(self._metadata, request))
            except grpc.RpcError as rpc_err:
                err = SwitchboardRpcError.from_rpc(rpc_err)
                err.__cause__ = rpc_err
            wait = retry_wait(err, attempt, self.retry_policy)
            if not (should_retry(err, attempt, self.retry_policy) and deadline.allows_wait(wait)):
                raise err
            time.sleep(wait)
            attempt += 1

    def _stream(self, request: pb.ChatRequest, timeout: float | None) -> Iterator[ChatChunk]:
        deadline = Deadline(self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            call = self._inference.ChatStream(request, timeout=deadline.remaining(),
                                              metadata=with_affinity(self._metadata, request))
            yielded = False
            try:
                for chunk in call:
                    yielded = True
                    yield ChatChunk.from_pb(chunk)
                return
            except grpc.RpcError as rpc_err:
                err = SwitchboardRpcError.from_rpc(rpc_err)
                err.__cause__ = rpc_err
            finally:
                # Runs on GeneratorExit too: the consumer stopped, so the server may stop.
                call.cancel()
            wait = retry_wait(err, attempt, self.retry_policy)
            retry = should_retry(err, attempt, self.retry_policy) and deadline.allows_wait(wait)
            if yielded or not retry:
                raise err
            time.sleep(wait)
            attempt += 1

    # ------------------------------------------------------------------ inference

    def chat(
        self,
        messages: MessagesLike,
        *,
        timeout: float | None = None,
        **options: Unpack[ChatOptions],
    ) -> ChatResult:
        """One complete answer. With `session_id`, send only the new messages."""
        request = chat_request_pb(messages, **options)
        return ChatResult.from_pb(self._call(self._inference.Chat, request, timeout))

    def chat_stream(
        self,
        messages: MessagesLike,
        *,
        timeout: float | None = None,
        **options: Unpack[ChatOptions],
    ) -> ChatStream:
        """Stream an answer; the last chunk has `.final` set to the whole ChatResult."""
        request = chat_request_pb(messages, **options)
        return ChatStream(self._stream(request, timeout))

    def score(
        self,
        messages: MessagesLike,
        continuation: str,
        *,
        adapter: str = "",
        timeout: float | None = None,
    ) -> ScoreResult:
        request = score_request_pb(messages, continuation, adapter)
        return ScoreResult.from_pb(self._call(self._inference.Score, request, timeout))

    # ------------------------------------------------------------------ adapters

    def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        response = self._call(self._adapters.ListAdapters, pb.ListAdaptersRequest(), timeout)
        return [AdapterInfo.from_pb(a) for a in response.adapters]

    def list_aliases(self, *, timeout: float | None = None) -> list[AliasInfo]:
        response = self._call(self._adapters.ListAdapters, pb.ListAdaptersRequest(), timeout)
        return [AliasInfo.from_pb(a) for a in response.aliases]

    def load_adapter(self, ref: str, *, timeout: float | None = None) -> LoadResult:
        request = pb.LoadAdapterRequest(adapter=ref)
        response = self._call(self._adapters.LoadAdapter, request, timeout)
        return LoadResult(AdapterInfo.from_pb(response.adapter), response.load_seconds)

    def unload_adapter(self, ref: str, *, timeout: float | None = None) -> AdapterInfo:
        request = pb.UnloadAdapterRequest(adapter=ref)
        response = self._call(self._adapters.UnloadAdapter, request, timeout)
        return AdapterInfo.from_pb(response.adapter)

    def set_alias(self, alias: str, target: str, *, reason: str = "",
                  timeout: float | None = None) -> AliasInfo:
        """Point `alias` at `target`; `reason` is kept with the move in the server's history."""
        request = pb.SetAliasRequest(alias=alias, target=target, reason=reason)
        response = self._call(self._adapters.SetAlias, request, timeout)
        return AliasInfo.from_pb(response.alias, previous=response.previous)

    def alias_history(self, alias: str = "", *, timeout: float | None = None) -> list[AliasMove]:
        """Recorded moves of `alias` ("" = every alias), oldest first."""
        request = pb.AliasHistoryRequest(alias=alias)
        response = self._call(self._adapters.AliasHistory, request, timeout)
        return [AliasMove.from_pb(m) for m in response.moves]

    # ------------------------------------------------------------------ sessions

    def get_session(self, session_id: str, *, timeout: float | None = None) -> Session:
        request = pb.GetSessionRequest(session_id=session_id)
        return Session.from_pb(self._call(self._sessions.GetSession, request, timeout))

    def list_sessions(self, *, limit: int = 0, timeout: float | None = None) -> list[SessionInfo]:
        request = pb.ListSessionsRequest(limit=limit)
        response = self._call(self._sessions.ListSessions, request, timeout)
        return [SessionInfo.from_pb(s) for s in response.sessions]

    def delete_session(self, session_id: str, *, timeout: float | None = None) -> bool:
        request = pb.DeleteSessionRequest(session_id=session_id)
        return self._call(self._sessions.DeleteSession, request, timeout).deleted

    # ------------------------------------------------------------------ health and lifecycle

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", ..."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._call(stub.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self._channel.close()

    def __repr__(self) -> str:
        return f"SwitchboardClient({self.target!r}, {self._security.describe()})"

    def __enter__(self) -> SwitchboardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
