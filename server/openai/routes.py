"""The OpenAI-compatible FastAPI app: chat completions (unary and SSE), models, score, health.

Each route checks the key, converts the request (server/openai/convert.py), makes the same core
call the gRPC servicers make (ChatCall, AdapterAdmin, score) and converts the answer back.
Failures are domain errors, answered through the one table in server/openai/errors.py.
A caller that disconnects cancels its request in the engine: a stream when Starlette sees the
disconnect, a unary call through `until_disconnected`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.api import check_text_length
from server.core import (
    AdapterAdmin,
    ChatCall,
    ChatResult,
    Delta,
    InferenceCore,
    current_record,
    score,
)
from server.errors import InvalidArgumentError, NotFoundError, SwitchboardError
from server.keys import ANONYMOUS, AuthRejected, Caller, KeyKind, presented_key
from server.logging_setup import current_request_id
from server.openai.convert import (
    ModelNames,
    Reply,
    chat_input_of,
    chunk,
    completion,
    messages_of,
    model_list,
    score_response,
    sse,
    usage_chunk,
)
from server.openai.errors import (
    INTERNAL,
    HttpError,
    error_body,
    http_error_of,
    param_of,
)
from server.openai.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    ScoreRequest,
    ScoreResponse,
)
from server.ratelimit import RETRY_AFTER_METADATA, retry_after_text
from server.runtime import Runtime
from server.status import redact_paths

log = logging.getLogger(__name__)
T = TypeVar("T")

CLIENT_CLOSED = 499  # nginx's "client closed request": nobody is left to read it
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 429, 503)}


# ---------------------------------------------------------------- errors


def _error_response(message: str, row: HttpError, param: str | None = None,
                    retry_after_s: float | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if row.status == 401 else {}
    if retry_after_s is not None:  # a key's rate limit knows when to come back
        headers[RETRY_AFTER_METADATA] = retry_after_text(retry_after_s)
    return JSONResponse(error_body(message, row, param), status_code=row.status,
                        headers=headers)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    problems, first = [], None
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        first = first or where
        what = ("is not a field of this request (see GET /openapi.json)"
                if item.get("type") == "extra_forbidden" else item.get("msg", "is invalid"))
        problems.append(f"{where}: {what}")
    return "; ".join(problems), first


def add_error_handlers(app: FastAPI, adapters_root: Any) -> None:
    async def domain(request: Request, error: Exception) -> Response:
        assert isinstance(error, SwitchboardError)
        current_record().error = error  # answered here, before the edge sees the error
        row = http_error_of(error)
        if row.status in (404, 409):
            log.info("%s %s refused: %s", request.method, request.url.path, error)
        return _error_response(redact_paths(str(error), adapters_root), row, param_of(error),
                               getattr(error, "retry_after_s", None))

    async def invalid(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        current_record().error = InvalidArgumentError(str(error))
        message, param = _validation_message(error)
        return _error_response(message, http_error_of(InvalidArgumentError()), param)

    async def http(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        if isinstance(error.__cause__, SwitchboardError):  # raised while the body was read
            return await domain(request, error.__cause__)
        code = "not_found" if error.status_code == 404 else "invalid_request"
        current_record().error = (NotFoundError if error.status_code == 404
                                  else InvalidArgumentError)(str(error.detail))
        row = HttpError(error.status_code, "invalid_request_error", code)
        return _error_response(f"{request.method} {request.url.path}: {error.detail}", row)

    async def unexpected(request: Request, error: Exception) -> Response:
        current_record().error = error
        return _error_response(f"internal error ({type(error).__name__}); see the server log "
                               f"for request {current_request_id()}", INTERNAL)

    app.add_exception_handler(SwitchboardError, domain)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(Exception, unexpected)


# ---------------------------------------------------------------- disconnects


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None (and `work` cancelled) when the caller went away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    finally:
        for pending in (task, watcher):
            pending.cancel()


class EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs however the response ends (sent, cancelled,
    disconnected before the first byte), so the engine never keeps a row nobody reads."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes],
                 on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, headers={"cache-control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


# ---------------------------------------------------------------- chat


async def _final(events: AsyncIterator[Delta | ChatResult]) -> ChatResult:
    result = None
    async for item in events:
        if isinstance(item, ChatResult):
            result = item
    assert result is not None, "the engine ended a stream without a finish event"
    return result


async def _sse_events(first: Delta | ChatResult, events: AsyncIterator[Delta | ChatResult],
                      reply: Reply, include_usage: bool) -> AsyncIterator[bytes]:
    """OpenAI's chunk sequence: the role, the text deltas, the finish reason, the usage when
    asked for, then [DONE]. A failure after the first byte becomes an error event."""
    extra = {"usage": None} if include_usage else {}
    yield sse(chunk(reply, {"role": "assistant", "content": ""}, **extra))
    streamed = 0
    try:
        item = first
        while isinstance(item, Delta):
            streamed += len(item.text)
            yield sse(chunk(reply, {"content": item.text}, **extra))
            item = await anext(events)
        # Text the detokenizer held back (an unfinished stop-sequence prefix) comes with the end.
        if item.text[streamed:]:
            yield sse(chunk(reply, {"content": item.text[streamed:]}, **extra))
        info = completion(item, reply)["switchboard"]
        yield sse(chunk(reply, {}, item.finish_reason, switchboard=info, **extra))
        if include_usage:
            yield sse(usage_chunk(reply, item))
    except SwitchboardError as e:
        current_record().error = e  # after the first byte: answered as an event, not a status
        yield sse(error_body(str(e), http_error_of(e), param_of(e)))
        return
    yield sse("[DONE]")


def _chat_call(core: InferenceCore, body: ChatCompletionRequest, names: ModelNames,
               caller: Caller) -> ChatCall:
    current_record().begin_chat(body.model)  # counted as a chat even when refused here
    chat = chat_input_of(body, core.config, core.limits.vocab_size, names, caller)
    return ChatCall(core, chat, None)


async def chat_completions(request: Request, body: ChatCompletionRequest, runtime: Runtime,
                           caller: Caller) -> Response:
    core = runtime.require()
    names = _names(request, core)
    call = _chat_call(core, body, names, caller)
    reply = Reply(id=f"chatcmpl-{call.request_id}", created=int(time.time()), model=body.model,
                  fingerprint=names.fingerprint)
    events = call.events()
    try:
        if not body.stream:
            result = await until_disconnected(request, _final(events))
            return JSONResponse(completion(result, reply)) if result else Response(
                status_code=CLIENT_CLOSED)
        # The first event (a token, or the whole answer) is awaited before any byte is sent,
        # so an unknown model or a full server is answered with its own status, not a broken
        # stream.
        first = await until_disconnected(request, anext(events))
    except NotFoundError as e:
        raise NotFoundError(f"{e}; or the base model {names.base!r} (GET /v1/models lists "
                            "every model)") from e
    if first is None:
        return Response(status_code=CLIENT_CLOSED)

    async def close() -> None:
        call.cancel()
        await events.aclose()

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return EventStream(_sse_events(first, events, reply, include_usage), on_close=close)


# ---------------------------------------------------------------- the app


def _names(request: Request, core: InferenceCore) -> ModelNames:
    state = request.app.state
    if state.names is None:
        state.names = ModelNames.of(core.config, core.registry.base_fingerprint)
    return state.names


def _authenticator(runtime: Runtime) -> Callable[[Request], Caller]:
    """The dependency naming the caller: any valid key (API or admin) may use these routes;
    ANONYMOUS when the server has no keys. The ring is read per call, so SIGHUP reloads apply."""

    def caller_of(request: Request) -> Caller:
        if runtime.keys is None:
            return ANONYMOUS
        what = f"{request.method} {request.url.path}"
        try:
            caller = runtime.keys.authorize(presented_key(request.headers.items()), KeyKind.API,
                                            what)
        except AuthRejected as rejected:
            client = request.client.host if request.client else "?"
            log.warning("rejected call to %s: %s (peer %s)", what, rejected.reason, client)
            raise rejected.error from None
        assert caller is not None, "KeyKind.API is never open"
        return caller

    return caller_of


def build_app(runtime: Runtime) -> FastAPI:
    """The app over `runtime` (its core once loaded, its keys when auth is on)."""
    app = FastAPI(title="Switchboard (OpenAI-compatible)", version="1",
                  description="Chat with any adapter over one base model: `model` names the "
                              "adapter (name, name@version, alias) or the base.")
    app.state.names = None
    add_error_handlers(app, runtime.config.adapters_root)
    authenticated = Depends(_authenticator(runtime))

    async def models(request: Request, caller: Caller) -> ModelList:
        core = runtime.require()
        return model_list(await AdapterAdmin(core).list(), _names(request, core), caller)

    @app.post("/v1/chat/completions", responses={
        200: {"model": ChatCompletion, "content": {"text/event-stream": {}}}, **ERRORS})
    async def post_chat(request: Request, body: ChatCompletionRequest,
                        caller: Caller = authenticated) -> Response:
        return await chat_completions(request, body, runtime, caller)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def get_models(request: Request, caller: Caller = authenticated) -> dict[str, Any]:
        """The models this key may use."""
        return (await models(request, caller)).model_dump()

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERRORS)
    async def get_model(request: Request, model: str,
                        caller: Caller = authenticated) -> dict[str, Any]:
        cards = (await models(request, caller)).data
        for card in cards:
            if card.id == model:
                return card.model_dump()
        raise NotFoundError(f"model {model!r} not found; models available: "
                            f"{', '.join(c.id for c in cards)}")

    @app.post("/v1/score", response_model=ScoreResponse, responses=ERRORS)
    async def post_score(request: Request, body: ScoreRequest,
                         caller: Caller = authenticated) -> dict[str, Any]:
        """Switchboard's own: log-likelihood of `continuation` as the next assistant turn."""
        core = runtime.require()
        names = _names(request, core)
        messages = messages_of(body.messages, core.config)
        continuation = check_text_length("continuation", body.continuation, core.config)
        outcome = await score(core, messages, continuation, names.adapter_ref(body.model),
                              caller)
        return score_response(outcome, names)

    @app.get("/health", responses=ERRORS)
    async def health() -> dict[str, str]:
        """200 once the base model is loaded; 503 while it loads or the server drains."""
        runtime.require()
        return {"status": "serving"}

    return app


__all__ = ["build_app", "until_disconnected"]
