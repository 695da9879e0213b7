"""The asyncio Python client: the same surface as `clients.client`, on grpc.aio.

Create it inside a running event loop (grpc.aio channels bind to the loop that uses them).
Streams are async iterators; leaving an `async with` block or calling `cancel()` cancels the call.
Security options (API key, TLS, mutual TLS) are those of `clients.client.ClientSecurity`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar, Unpack

import grpc
import grpc.aio
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from clients.client import (
    ClientSecurity,
    Deadline,
    PemPath,
    RetryPolicy,
    open_channel,
    retry_wait,
    should_retry,
    with_affinity,
)
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


class AsyncChatStream(AsyncIterator[ChatChunk]):
    """Async iterator over the chunks of one streamed answer; stopping early cancels the call."""

    def __init__(self, chunks: AsyncIterator[ChatChunk]) -> None:
        self._chunks = chunks

    def __aiter__(self) -> AsyncChatStream:
        return self

    async def __anext__(self) -> ChatChunk:
        return await self._chunks.__anext__()

    async def cancel(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cancel()


class AsyncSwitchboardClient:
    """Asyncio client for one Switchboard server; use `async with` or `await close()`."""

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
                                     insecure=grpc.aio.insecure_channel,
                                     secure=grpc.aio.secure_channel)
        self._inference = pb_grpc.InferenceServiceStub(self._channel)
        self._adapters = pb_grpc.AdapterServiceStub(self._channel)
        self._sessions = pb_grpc.SessionServiceStub(self._channel)

    # ------------------------------------------------------------------ plumbing

    async def _call(
        self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None
    ) -> T:
        """Run one unary RPC under one deadline, retrying UNAVAILABLE with backoff."""
        deadline = Deadline(self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            try:
                return await method(request, timeout=deadline.remaining(),
                                    metadata=with_affinity(self._metadata, request))
            except grpc.RpcError as rpc_err:
                err = SwitchboardRpcError.from_rpc(rpc_err)
                err.__cause__ = rpc_err
            wait = retry_wait(err, attempt, self.retry_policy)
            if not (should_retry(err, attempt, self.retry_policy) and deadline.allows_wait(wait)):
                raise err
            await asyncio.sleep(wait)
            attempt += 1

    async def _stream(
        self, request: pb.ChatRequest, timeout: float | None
    ) -> AsyncIterator[ChatChunk]:
        deadline = Deadline(self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            call = self._inference.ChatStream(request, timeout=deadline.remaining(),
                                              metadata=with_affinity(self._metadata, request))
            yielded = False
            try:
                async for chunk in call:
                    yielded = True
                    yield ChatChunk.from_pb(chunk)
                return
            except grpc.RpcError as rpc_err:
                err = SwitchboardRpcError.from_rpc(rpc_err)
                err.__cause__ = rpc_err
            finally:
                # Runs on aclose() too: the consumer stopped, so the server may stop.
                call.cancel()
            wait = retry_wait(err, attempt, self.retry_policy)
            retry = should_retry(err, attempt, self.retry_policy) and deadline.allows_wait(wait)
            if yielded or not retry:
                raise err
            await asyncio.sleep(wait)
            attempt += 1

    # ------------------------------------------------------------------ inference

    async def chat(
        self,
        messages: MessagesLike,
        *,
        timeout: float | None = None,
        **options: Unpack[ChatOptions],
    ) -> ChatResult:
        """One complete answer. With `session_id`, send only the new messages."""
        request = chat_request_pb(messages, **options)
        return ChatResult.from_pb(await self._call(self._inference.Chat, request, timeout))

    def chat_stream(
        self,
        messages: MessagesLike,
        *,
        timeout: float | None = None,
        **options: Unpack[ChatOptions],
    ) -> AsyncChatStream:
        """Stream an answer (`async for`); the last chunk has `.final` set to the ChatResult."""
        request = chat_request_pb(messages, **options)
        return AsyncChatStream(self._stream(request, timeout))

    async def score(
        self,
        messages: MessagesLike,
        continuation: str,
        *,
        adapter: str = "",
        timeout: float | None = None,
    ) -> ScoreResult:
        request = score_request_pb(messages, continuation, adapter)
        return ScoreResult.from_pb(await self._call(self._inference.Score, request, timeout))

    # ------------------------------------------------------------------ adapters

    async def list_adapters(self, *, timeout: float | None = None) -> list[AdapterInfo]:
        request = pb.ListAdaptersRequest()
        response = await self._call(self._adapters.ListAdapters, request, timeout)
        return [AdapterInfo.from_pb(a) for a in response.adapters]

    async def list_aliases(self, *, timeout: float | None = None) -> list[AliasInfo]:
        request = pb.ListAdaptersRequest()
        response = await self._call(self._adapters.ListAdapters, request, timeout)
        return [AliasInfo.from_pb(a) for a in response.aliases]

    async def load_adapter(self, ref: str, *, timeout: float | None = None) -> LoadResult:
        request = pb.LoadAdapterRequest(adapter=ref)
        response = await self._call(self._adapters.LoadAdapter, request, timeout)
        return LoadResult(AdapterInfo.from_pb(response.adapter), response.load_seconds)

    async def unload_adapter(self, ref: str, *, timeout: float | None = None) -> AdapterInfo:
        request = pb.UnloadAdapterRequest(adapter=ref)
        response = await self._call(self._adapters.UnloadAdapter, request, timeout)
        return AdapterInfo.from_pb(response.adapter)

    async def set_alias(
        self, alias: str, target: str, *, reason: str = "", timeout: float | None = None
    ) -> AliasInfo:
        """Point `alias` at `target`; `reason` is kept with the move in the server's history."""
        request = pb.SetAliasRequest(alias=alias, target=target, reason=reason)
        response = await self._call(self._adapters.SetAlias, request, timeout)
        return AliasInfo.from_pb(response.alias, previous=response.previous)

    async def alias_history(
        self, alias: str = "", *, timeout: float | None = None
    ) -> list[AliasMove]:
        """Recorded moves of `alias` ("" = every alias), oldest first."""
        request = pb.AliasHistoryRequest(alias=alias)
        response = await self._call(self._adapters.AliasHistory, request, timeout)
        return [AliasMove.from_pb(m) for m in response.moves]

    # ------------------------------------------------------------------ sessions

    async def get_session(self, session_id: str, *, timeout: float | None = None) -> Session:
        request = pb.GetSessionRequest(session_id=session_id)
        return Session.from_pb(await self._call(self._sessions.GetSession, request, timeout))

    async def list_sessions(
        self, *, limit: int = 0, timeout: float | None = None
    ) -> list[SessionInfo]:
        request = pb.ListSessionsRequest(limit=limit)
        response = await self._call(self._sessions.ListSessions, request, timeout)
        return [SessionInfo.from_pb(s) for s in response.sessions]

    async def delete_session(self, session_id: str, *, timeout: float | None = None) -> bool:
        request = pb.DeleteSessionRequest(session_id=session_id)
        return (await self._call(self._sessions.DeleteSession, request, timeout)).deleted

    # ------------------------------------------------------------------ health and lifecycle

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", ..."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._call(stub.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self._channel.close()

    def __repr__(self) -> str:
        return f"AsyncSwitchboardClient({self.target!r}, {self._security.describe()})"

    async def __aenter__(self) -> AsyncSwitchboardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
