"""The HTTP transport of the asyncio client: the server's OpenAI-compatible face, through httpx.

`AsyncHttpClient` has the inference surface of `clients.aio.AsyncSwitchboardClient` (chat,
chat_stream, score; plus list_models) with the same result types (`clients.types`) and the same
error: `SwitchboardRpcError` carrying a gRPC status name, read from the server's OpenAI error
`code` (server/openai/errors.py uses the status names in lower case) or, from anything else,
from the HTTP status. So the eval suite replays through either transport unchanged.

Options left out take the gRPC client's defaults, greedy decoding included (the HTTP face itself
defaults to OpenAI's temperature 1, so the client always sends one). Streamed chunks carry no
running token count (0); the last one has the whole answer in `final`. Unary calls retry only
UNAVAILABLE, within one deadline over all attempts, as the gRPC client does; `tls` is accepted
for the same security options on both transports, but here the URL's scheme decides.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, Unpack

import httpx

from clients.client import Deadline, PemPath, RetryPolicy, should_retry
from clients.errors import ERROR_BY_CODE, SwitchboardRpcError
from clients.types import (
    ChatChunk,
    ChatOptions,
    ChatResult,
    MessagesLike,
    ScoreResult,
    checked_stops,
    message_dicts,
)
from common.names import adapter_name

T = TypeVar("T")
HTTP_SCHEMES = ("http://", "https://")

STATUS_BY_HTTP = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    409: "FAILED_PRECONDITION", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}
# The server's OpenAI-style codes that are not a status name in lower case.
STATUS_BY_CODE = {"context_length_exceeded": "OUT_OF_RANGE",
                  "request_too_large": "RESOURCE_EXHAUSTED"}
STATUS_NAMES = frozenset({*STATUS_BY_HTTP.values(), "OUT_OF_RANGE", "ABORTED"})


def is_http_target(target: str) -> bool:
    return target.startswith(HTTP_SCHEMES)


def error_of(status: int, body: bytes) -> SwitchboardRpcError:
    """The client error for an HTTP error answer (OpenAI's error shape, or anything else)."""
    try:
        error = json.loads(body)["error"]
        message, code = str(error["message"]), str(error.get("code") or "")
    except (ValueError, KeyError, TypeError):
        message, code = body.decode("utf-8", "replace")[:500] or f"HTTP {status}", ""
    name = STATUS_BY_CODE.get(code) or code.upper()
    if name not in STATUS_NAMES:
        name = STATUS_BY_HTTP.get(status, "UNKNOWN")
    return ERROR_BY_CODE.get(name, SwitchboardRpcError)(name, message)


def _transport_error(err: httpx.HTTPError) -> SwitchboardRpcError:
    if isinstance(err, httpx.TimeoutException):
        return SwitchboardRpcError("DEADLINE_EXCEEDED", f"no answer in time: {err}")
    return SwitchboardRpcError("UNAVAILABLE", f"cannot reach the server: {err}")


def chat_body(messages: MessagesLike, stream: bool, **options: Unpack[ChatOptions]) -> dict:
    """The /v1/chat/completions body for the gRPC client's chat options."""
    stop = checked_stops(options)
    body: dict[str, Any] = {
        "model": adapter_name(options.get("adapter")), "messages": message_dicts(messages),
        "temperature": options.get("temperature", 0.0), "stream": stream,
    }
    # Left out when unset (None, "", 0, False, no stops): the server's default applies.
    fields = {"max_tokens": options.get("max_new_tokens"), "top_p": options.get("top_p"),
              "top_k": options.get("top_k"),
              "repetition_penalty": options.get("repetition_penalty"),
              "truncation": options.get("truncation"), "session_id": options.get("session_id"),
              "ignore_eos": options.get("ignore_eos"), "stop": list(stop)}
    body |= {k: v for k, v in fields.items() if v}
    if options.get("seed") is not None:  # seed 0 is a seed
        body["seed"] = options["seed"]
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def result_of(text: str, finish_reason: str, usage: dict[str, int],
              info: dict[str, Any]) -> ChatResult:
    adapter, timings = info.get("adapter", {}), info.get("timings", {})
    return ChatResult(
        text=text, finish_reason=finish_reason, prompt_tokens=usage.get("prompt_tokens", 0),
        completion_tokens=usage.get("completion_tokens", 0),
        adapter_name=adapter.get("name", ""), adapter_version=adapter.get("version", 0),
        queue_wait_s=timings.get("queue_wait_s", 0.0), ttft_s=timings.get("ttft_s", 0.0),
        total_s=timings.get("total_s", 0.0), truncation=dict(info.get("truncation", {})),
        session_id=info.get("session_id", ""), request_id=info.get("request_id", ""))


def _completion(data: dict[str, Any]) -> ChatResult:
    choice = data["choices"][0]
    return result_of(choice["message"]["content"], choice["finish_reason"], data["usage"],
                     data.get("switchboard", {}))


async def _sse_data(response: httpx.Response) -> AsyncIterator[bytes]:
    """The data of each server-sent event but the final [DONE]. Split on bytes, not decoded
    lines: one event per token, so this loop is the client's per-token cost."""
    pending = b""
    async for received in response.aiter_bytes():
        *events, pending = (pending + received).split(b"\n\n")
        for event in events:
            if event.startswith(b"data: ") and event != b"data: [DONE]":
                yield event[6:]


class _StreamAssembler:
    """Turns OpenAI chunk events into ChatChunks; the last one carries the whole answer."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.finish = ""
        self.info: dict[str, Any] = {}

    def feed(self, event: dict[str, Any]) -> ChatChunk | None:
        if "error" in event:
            raise error_of(0, json.dumps(event).encode())
        if not event.get("choices"):  # the usage chunk: the end
            result = result_of("".join(self.text), self.finish, event.get("usage") or {},
                               self.info)
            return ChatChunk(delta="", completion_tokens=result.completion_tokens, final=result)
        choice = event["choices"][0]
        self.finish = choice.get("finish_reason") or self.finish
        self.info = event.get("switchboard") or self.info
        delta = choice.get("delta", {}).get("content") or ""
        self.text.append(delta)
        return ChatChunk(delta=delta, completion_tokens=0) if delta else None


class AsyncHttpClient:
    """Asyncio client for one server's HTTP face; use `async with` or `await close()`."""

    def __init__(self, target: str, *, timeout: float | None = None, retries: int = 3,
                 retry_policy: RetryPolicy | None = None, api_key: str | None = None,
                 tls: bool = False, ca_cert: PemPath | None = None,
                 client_cert: PemPath | None = None, client_key: PemPath | None = None) -> None:
        if not is_http_target(target):
            raise ValueError(f"target must be an http:// or https:// URL, got {target!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        if (client_cert is None) != (client_key is None):
            raise ValueError("client_cert and client_key are given together (mutual TLS needs "
                             "both PEM files)")
        self.target = target.rstrip("/")
        self.timeout = timeout
        self.retry_policy = retry_policy or RetryPolicy(retries=retries)
        headers = {} if api_key is None else {"authorization": f"Bearer {api_key}"}
        cert = None if client_cert is None else (str(client_cert), str(client_key))
        verify: Any = str(Path(ca_cert)) if ca_cert is not None else True
        base = self.target if self.target.endswith("/v1") else f"{self.target}/v1"
        self._http = httpx.AsyncClient(base_url=base, headers=headers, verify=verify, cert=cert,
                                       timeout=None)

    async def _retrying(self, attempt_once: Callable[[float | None], Awaitable[T]],
                        timeout: float | None) -> T:
        deadline = Deadline(self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            try:
                return await attempt_once(deadline.remaining())
            except SwitchboardRpcError as err:
                wait = self.retry_policy.delay(attempt)
                if not (should_retry(err, attempt, self.retry_policy)
                        and deadline.allows_wait(wait)):
                    raise
            await asyncio.sleep(wait)
            attempt += 1

    async def _post(self, path: str, body: dict[str, Any], timeout: float | None) -> Any:
        async def once(remaining: float | None) -> Any:
            try:
                response = await self._http.post(path, json=body, timeout=remaining)
            except httpx.HTTPError as err:
                raise _transport_error(err) from err
            if response.status_code != 200:
                raise error_of(response.status_code, response.content)
            return response.json()

        return await self._retrying(once, timeout)

    async def chat(self, messages: MessagesLike, *, timeout: float | None = None,
                   **options: Unpack[ChatOptions]) -> ChatResult:
        """One complete answer. With `session_id`, send only the new messages."""
        data = await self._post("/chat/completions", chat_body(messages, False, **options),
                                timeout)
        return _completion(data)

    async def _stream(self, body: dict[str, Any], timeout: float | None
                      ) -> AsyncIterator[ChatChunk]:
        remaining = Deadline(self.timeout if timeout is None else timeout).remaining()
        assembler = _StreamAssembler()
        try:
            async with self._http.stream("POST", "/chat/completions", json=body,
                                         timeout=remaining) as response:
                if response.status_code != 200:
                    raise error_of(response.status_code, await response.aread())
                async for event in _sse_data(response):
                    chunk = assembler.feed(json.loads(event))
                    if chunk is not None:
                        yield chunk
        except httpx.HTTPError as err:
            raise _transport_error(err) from err

    def chat_stream(self, messages: MessagesLike, *, timeout: float | None = None,
                    **options: Unpack[ChatOptions]) -> AsyncIterator[ChatChunk]:
        """Stream an answer (`async for`); the last chunk has `.final` set to the ChatResult.
        Closing the iterator early (`aclose()`) closes the connection, which cancels the
        answer on the server."""
        return self._stream(chat_body(messages, True, **options), timeout)

    async def score(self, messages: MessagesLike, continuation: str, *, adapter: str = "",
                    timeout: float | None = None) -> ScoreResult:
        body = {"model": adapter_name(adapter), "messages": message_dicts(messages),
                "continuation": continuation}
        data = await self._post("/score", body, timeout)
        return ScoreResult(log_likelihood=data["log_likelihood"], token_count=data["token_count"],
                           prompt_tokens=data["prompt_tokens"],
                           adapter_name=data["adapter"]["name"],
                           adapter_version=data["adapter"]["version"])

    async def list_models(self, *, timeout: float | None = None) -> list[str]:
        """The model ids this key may use (GET /v1/models)."""
        async def once(remaining: float | None) -> list[str]:
            try:
                response = await self._http.get("/models", timeout=remaining)
            except httpx.HTTPError as err:
                raise _transport_error(err) from err
            if response.status_code != 200:
                raise error_of(response.status_code, response.content)
            return [card["id"] for card in response.json()["data"]]

        return await self._retrying(once, timeout)

    async def close(self) -> None:
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"AsyncHttpClient({self.target!r})"

    async def __aenter__(self) -> AsyncHttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["AsyncHttpClient", "chat_body", "error_of", "is_http_target"]
