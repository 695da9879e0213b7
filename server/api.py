"""gRPC servicers on grpc.aio: validate, convert proto <-> domain, call one component, convert back.

This is the edge: request validation, proto <-> domain conversion and the ONLY place where domain
exceptions (server/errors.py) become status codes (see STATUS_BY_ERROR). The work itself (chat,
score, adapter and session administration) is in server/service.py, which knows no gRPC.

Requests are decoded here too (`add_servicers` registers the handlers with our deserializer): a
body protobuf refuses, such as a string field holding invalid UTF-8, reaches the handler as an
`UndecodableRequest` and is answered INVALID_ARGUMENT instead of grpc's own UNKNOWN.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from common.conversation import ROLES, Message
from server.adapters import AdapterVersion, Alias, AliasMove, shown
from server.audit import OK, entry
from server.config import TRUNCATION_STRATEGIES, ServerConfig
from server.errors import (
    AdapterInUseError,
    AdapterLoadError,
    ContextOverflowError,
    FailedPreconditionError,
    IncompatibleAdapterError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SessionBusyError,
    SwitchboardError,
    UnauthenticatedError,
    UnavailableError,
)
from server.keys import Caller, presented_key
from server.logging_setup import (
    REQUEST_ID_METADATA_KEY,
    current_request_id,
    new_request_id,
    request_context,
)
from server.ratelimit import RETRY_AFTER_METADATA, retry_after_text
from server.sampling import SamplingParams
from server.service import (
    UNRESOLVED_LABEL,
    AdapterAdmin,
    AdapterStatus,
    ChatCall,
    ChatInput,
    ChatResult,
    Delta,
    Runtime,
    ScoreOutcome,
    SessionAdmin,
    Truncation,
    check_conversation,
    score,
)
from server.sessions import Session, SessionInfo, validate_session_id

# What server/app.py imports from here; InferenceCore, Limits and Runtime live in server.service.
__all__ = ["SERVICE_NAMES", "add_servicers", "status_for"]
log = logging.getLogger(__name__)
T = TypeVar("T")

# ---------------------------------------------------------------- the one error table

STATUS_BY_ERROR: dict[type[Exception], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    IncompatibleAdapterError: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterInUseError: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ContextOverflowError: grpc.StatusCode.OUT_OF_RANGE,
    SessionBusyError: grpc.StatusCode.ABORTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
}


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status code of the most specific known class of `error`; INTERNAL for the unexpected."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL


ADAPTERS_ROOT_PLACEHOLDER = "<adapters-root>"


def redact_paths(message: str, adapters_root: Path) -> str:
    """The message with the server's adapters directory replaced by a placeholder: callers
    learn which adapter file is wrong, not where the server keeps its files."""
    for form in {str(adapters_root.resolve()), str(adapters_root)}:
        if form not in ("", ".", "/"):
            message = message.replace(form, ADAPTERS_ROOT_PLACEHOLDER)
    return message


async def _abort(context: grpc.aio.ServicerContext, error: BaseException, rpc: str,
                 adapters_root: Path) -> None:
    """Known failures get their own code and message; anything else is logged with its
    traceback and answered INTERNAL with the request id to find it in the log."""
    code = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.error("unexpected error in %s", rpc, exc_info=error)
        await context.abort(code, f"internal error in {rpc} ({type(error).__name__}); see the "
                                  f"server log for request {current_request_id()}")
    if code is grpc.StatusCode.FAILED_PRECONDITION or code is grpc.StatusCode.NOT_FOUND:
        log.info("%s refused: %s", rpc, error)  # the full paths stay in the server's log
    retry_after = getattr(error, "retry_after_s", None)
    trailers = () if retry_after is None else ((RETRY_AFTER_METADATA,
                                                retry_after_text(retry_after)),)
    await context.abort(code, redact_paths(str(error), adapters_root), trailers)



def _metadata_request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's x-request-id (so its logs and ours line up), else a fresh id."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA_KEY and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return new_request_id()


async def _announce_request_id(context: grpc.aio.ServicerContext) -> str:
    """Pick the request id and send it first, in the initial metadata, so that even a call that
    fails carries the id that the server's log lines use."""
    request_id = _metadata_request_id(context)
    await context.send_initial_metadata(((REQUEST_ID_METADATA_KEY, request_id),))
    return request_id


@dataclass(frozen=True)
class UndecodableRequest:
    """What the handler gets instead of a request protobuf could not parse."""

    type_name: str
    error: str

    def check(self) -> None:
        raise InvalidArgumentError(
            f"request is not a valid {self.type_name}: {self.error}; strings must be UTF-8")


def _deserializer(message_type: Any) -> Callable[[bytes], Any]:
    """`message_type.FromString`, but a body it refuses becomes an UndecodableRequest: grpc
    would otherwise answer UNKNOWN before any handler (or its error mapping) runs."""

    def deserialize(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return UndecodableRequest(message_type.DESCRIPTOR.full_name, str(e))

    return deserialize


def _decoded(request: Any) -> None:
    if isinstance(request, UndecodableRequest):
        request.check()


def unary_rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Map exceptions of a unary handler to status codes (known ones precisely, others INTERNAL)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with request_context(await _announce_request_id(context)):
            try:
                _decoded(request)
                return await method(self, request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:  # noqa: BLE001 - the one last-resort handler, see _abort
                await _abort(context, e, method.__name__, self.runtime.config.adapters_root)

    return wrapper


def stream_rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """The same mapping for server-streaming handlers (async generators)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with request_context(await _announce_request_id(context)):
            try:
                _decoded(request)
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:  # noqa: BLE001 - the one last-resort handler, see _abort
                await _abort(context, e, method.__name__, self.runtime.config.adapters_root)

    return wrapper


# ---------------------------------------------------------------- request validation

STRATEGY_BY_PB = {
    pb.TRUNCATION_STRATEGY_ERROR: "error",
    pb.TRUNCATION_STRATEGY_DROP_OLDEST: "drop_oldest",
    pb.TRUNCATION_STRATEGY_SLIDING_WINDOW: "sliding_window",
    pb.TRUNCATION_STRATEGY_MIDDLE_OUT: "middle_out",
    pb.TRUNCATION_STRATEGY_SUMMARIZE: "summarize",
}
PB_BY_STRATEGY = {v: k for k, v in STRATEGY_BY_PB.items()}
FINISH_BY_REASON = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256


def check_text_length(field_name: str, text: str, config: ServerConfig) -> str:
    if len(text) > config.max_message_chars:
        raise InvalidArgumentError(
            f"{field_name} has {len(text)} characters; at most {config.max_message_chars} are "
            "allowed (setting max_message_chars, --max-message-chars)")
    return text


def messages_from_pb(items: Sequence[pb.Message], config: ServerConfig) -> list[Message]:
    """Each message checked on its own; whole-conversation rules are in check_conversation."""
    if len(items) > config.max_messages:
        raise InvalidArgumentError(
            f"messages has {len(items)} entries; at most {config.max_messages} are allowed "
            "(setting max_messages, --max-messages)")
    messages: list[Message] = []
    for i, item in enumerate(items):
        if item.role not in ROLES:
            raise InvalidArgumentError(
                f"messages[{i}].role is {shown(item.role)}; allowed roles: {', '.join(ROLES)}")
        check_text_length(f"messages[{i}].content", item.content, config)
        if item.role == "system" and i > 0:
            raise InvalidArgumentError(
                f"messages[{i}] is a system message; only the first message may be one")
        if item.role == "user" and not item.content.strip():
            raise InvalidArgumentError(f"messages[{i}] is a user message with empty content")
        messages.append(Message(item.role, item.content))
    if not messages:
        raise InvalidArgumentError("messages is empty: send at least one user message")
    return messages


def _check_float(name: str, value: float, low: float, high: float, note: str) -> None:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgumentError(f"sampling.{name} is {value}; allowed: {note}")


def sampling_from_pb(sampling: pb.SamplingParams, config: ServerConfig,
                     vocab_size: int) -> SamplingParams:
    max_new = sampling.max_new_tokens or config.default_max_new_tokens
    if max_new > config.max_new_tokens_limit:
        raise InvalidArgumentError(
            f"sampling.max_new_tokens is {max_new}; allowed: 1..{config.max_new_tokens_limit} "
            "(0 = the server default)")
    _check_float("temperature", sampling.temperature, 0.0, MAX_TEMPERATURE,
                 f"0 (greedy) to {MAX_TEMPERATURE}")
    _check_float("top_p", sampling.top_p, 0.0, 1.0, "0 to 1 (0 or 1 disables nucleus sampling)")
    _check_float("repetition_penalty", sampling.repetition_penalty, 0.0, MAX_REPETITION_PENALTY,
                 f"0 (off) or above 0 up to {MAX_REPETITION_PENALTY}")
    if sampling.top_k > vocab_size:
        raise InvalidArgumentError(
            f"sampling.top_k is {sampling.top_k}; allowed: 0 (off) to the vocabulary size "
            f"{vocab_size}")
    stops = tuple(sampling.stop)
    if len(stops) > MAX_STOP_SEQUENCES or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise InvalidArgumentError(
            f"sampling.stop has {len(stops)} sequences; allowed: up to {MAX_STOP_SEQUENCES} "
            f"non-empty strings of at most {MAX_STOP_CHARS} characters")
    try:
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=sampling.temperature,
            top_p=sampling.top_p if 0.0 < sampling.top_p < 1.0 else 1.0,
            top_k=sampling.top_k,
            repetition_penalty=sampling.repetition_penalty or 1.0,
            seed=sampling.seed if sampling.HasField("seed") else None,
            stop=stops,
            ignore_eos=sampling.ignore_eos,
        )
    except ValueError as e:
        raise InvalidArgumentError(f"sampling: {e}") from e


def truncation_from_pb(value: int, default: str) -> str:
    if value == pb.TRUNCATION_STRATEGY_UNSPECIFIED:
        return default
    if value not in STRATEGY_BY_PB:
        raise InvalidArgumentError(
            f"truncation is {value}; allowed: {', '.join(TRUNCATION_STRATEGIES)} "
            "(or unspecified for the server default)")
    return STRATEGY_BY_PB[value]


def check_session_id(session_id: str) -> str:
    """The request's session_id ("" = none), or InvalidArgumentError naming the field."""
    if not session_id:
        return session_id
    try:
        return validate_session_id(session_id)
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"session_id: {e}") from e


def chat_input_from_pb(request: pb.ChatRequest, config: ServerConfig,
                       vocab_size: int) -> ChatInput:
    session_id = check_session_id(request.session_id)
    messages = messages_from_pb(request.messages, config)
    if not session_id:
        check_conversation(messages)
    return ChatInput(
        messages=tuple(messages),
        adapter=request.adapter.strip(),
        sampling=sampling_from_pb(request.sampling, config, vocab_size),
        truncation=truncation_from_pb(request.truncation, config.default_truncation),
        session_id=session_id,
    )


# ---------------------------------------------------------------- domain -> proto

def truncation_pb(truncation: Truncation) -> pb.TruncationReport:
    t = truncation
    return pb.TruncationReport(
        strategy=PB_BY_STRATEGY.get(t.strategy, pb.TRUNCATION_STRATEGY_UNSPECIFIED),
        messages_dropped=t.messages_dropped, tokens_dropped=t.tokens_dropped,
        budget_tokens=max(t.budget_tokens, 0), applied=t.applied, summary=t.summary,
    )


def adapter_ref_pb(adapter: AdapterVersion | None, requested: str) -> pb.AdapterRef:
    if adapter is None:
        return pb.AdapterRef(requested=requested)
    return pb.AdapterRef(name=adapter.name, version=adapter.version, requested=requested)


def chat_response_pb(result: ChatResult) -> pb.ChatResponse:
    return pb.ChatResponse(
        text=result.text,
        finish_reason=FINISH_BY_REASON.get(result.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=result.prompt_tokens,
                       completion_tokens=result.completion_tokens),
        adapter=adapter_ref_pb(result.adapter, result.requested),
        timings=pb.Timings(queue_wait_seconds=result.queue_wait_s or 0.0,
                           time_to_first_token_seconds=result.ttft_s or 0.0,
                           total_seconds=result.total_s or 0.0),
        truncation=truncation_pb(result.truncation),
        session_id=result.session_id,
        request_id=result.request_id,
    )


def score_response_pb(outcome: ScoreOutcome) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        log_likelihood=outcome.log_likelihood, token_count=outcome.token_count,
        prompt_tokens=outcome.prompt_tokens,
        adapter=adapter_ref_pb(outcome.adapter, outcome.requested))


def adapter_info_pb(status: AdapterStatus) -> pb.AdapterInfo:
    return pb.AdapterInfo(
        name=status.name, version=status.version, loaded=status.loaded,
        aliases=list(status.aliases), compatible=status.compatible,
        base_fingerprint=status.base_fingerprint, created=status.created, rank=status.rank,
        memory_bytes=status.memory_bytes, in_flight=status.in_flight,
    )


def alias_pb(alias: Alias) -> pb.AliasInfo:
    return pb.AliasInfo(alias=alias.alias, name=alias.name, version=alias.version)


def alias_move_pb(move: AliasMove) -> pb.AliasMove:
    return pb.AliasMove(alias=move.alias, target=move.target, previous=move.previous,
                        reason=move.reason, moved_at=move.moved_at)


def session_pb(stored: Session) -> pb.Session:
    return pb.Session(
        session_id=stored.id,
        messages=[pb.Message(role=m.role, content=m.content) for m in stored.messages],
        summary=str(stored.summary_cache.get("summary", "")),
        created_unix=stored.created, updated_unix=stored.updated, owner=stored.owner,
    )


def session_info_pb(info: SessionInfo) -> pb.SessionInfo:
    return pb.SessionInfo(session_id=info.id, message_count=info.message_count,
                          created_unix=info.created, updated_unix=info.updated,
                          owner=info.owner)


# ---------------------------------------------------------------- servicers

def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _code_name(error: BaseException) -> str:
    return status_for(error).name


def caller_of(runtime: Runtime, context: grpc.aio.ServicerContext) -> Caller:
    """Who makes this call (the interceptor has already refused unknown keys)."""
    return runtime.caller(presented_key(context.invocation_metadata()))


async def audited(runtime: Runtime, caller: Caller, action: str, target: str,
                  work: Awaitable[T]) -> T:
    """Await an admin action and append who/what/outcome to the audit trail (when on)."""
    if runtime.audit is None:
        return await work
    try:
        result = await work
    except Exception as e:
        await asyncio.to_thread(runtime.audit.record,
                                entry(caller, action, target, _code_name(e), str(e)))
        raise
    await asyncio.to_thread(runtime.audit.record, entry(caller, action, target, OK))
    return result


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _call(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> ChatCall:
        core = self.runtime.require()
        try:
            chat = replace(chat_input_from_pb(request, core.config, core.limits.vocab_size),
                           caller=caller_of(self.runtime, context))
        except SwitchboardError as e:
            core.metric("observe_request", UNRESOLVED_LABEL if request.adapter else None,
                        _code_name(e), None, None, 0.0, 0, 0)
            raise
        call = ChatCall(core, chat, _deadline(context), code_of=_code_name)
        context.add_done_callback(lambda _: call.cancel())
        return call

    @unary_rpc
    async def Chat(self, request: pb.ChatRequest,
                   context: grpc.aio.ServicerContext) -> pb.ChatResponse:
        result = None
        async for item in self._call(request, context).events():
            if isinstance(item, ChatResult):
                result = item
        assert result is not None, "the engine ended a stream without a finish event"
        return chat_response_pb(result)

    @stream_rpc
    async def ChatStream(self, request: pb.ChatRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ChatChunk]:
        streamed = 0
        async for item in self._call(request, context).events():
            if isinstance(item, Delta):
                streamed += len(item.text)
                yield pb.ChatChunk(delta=item.text, completion_tokens=item.completion_tokens)
            else:
                # Text the detokenizer held back (a stop-sequence prefix that did not complete)
                # arrives with the last chunk, so the deltas always add up to the final text.
                yield pb.ChatChunk(delta=item.text[streamed:],
                                   completion_tokens=item.completion_tokens,
                                   final=chat_response_pb(item))

    @unary_rpc
    async def Score(self, request: pb.ScoreRequest,
                    context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        core = self.runtime.require()
        messages = messages_from_pb(request.messages, core.config)
        continuation = check_text_length("continuation", request.continuation, core.config)
        outcome = await score(core, messages, continuation, request.adapter.strip(),
                              caller_of(self.runtime, context))
        return score_response_pb(outcome)


class AdapterServicer(pb_grpc.AdapterServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _admin(self) -> AdapterAdmin:
        return AdapterAdmin(self.runtime.require())

    @unary_rpc
    async def LoadAdapter(self, request: pb.LoadAdapterRequest,
                          context: grpc.aio.ServicerContext) -> pb.LoadAdapterResponse:
        loaded = await audited(self.runtime, caller_of(self.runtime, context), "adapter.load",
                               request.adapter, self._admin().load(request.adapter))
        return pb.LoadAdapterResponse(adapter=adapter_info_pb(loaded.adapter),
                                      load_seconds=loaded.load_seconds)

    @unary_rpc
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> pb.UnloadAdapterResponse:
        status = await audited(self.runtime, caller_of(self.runtime, context),
                               "adapter.unload", request.adapter,
                               self._admin().unload(request.adapter))
        return pb.UnloadAdapterResponse(adapter=adapter_info_pb(status))

    @unary_rpc
    async def ListAdapters(self, request: pb.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListAdaptersResponse:
        listing = await self._admin().list()
        return pb.ListAdaptersResponse(adapters=[adapter_info_pb(a) for a in listing.adapters],
                                       aliases=[alias_pb(a) for a in listing.aliases])

    @unary_rpc
    async def SetAlias(self, request: pb.SetAliasRequest,
                       context: grpc.aio.ServicerContext) -> pb.SetAliasResponse:
        alias, previous = await audited(
            self.runtime, caller_of(self.runtime, context), "alias.set",
            f"{request.alias.strip()} -> {request.target.strip()}",
            self._admin().set_alias(request.alias.strip(), request.target, request.reason))
        return pb.SetAliasResponse(alias=alias_pb(alias), previous=previous)

    @unary_rpc
    async def AliasHistory(self, request: pb.AliasHistoryRequest,
                           context: grpc.aio.ServicerContext) -> pb.AliasHistoryResponse:
        moves = await self._admin().history(request.alias)
        return pb.AliasHistoryResponse(moves=[alias_move_pb(m) for m in moves])


DEFAULT_SESSION_LIST = 100
MAX_SESSION_LIST = 10_000


def _required_session(session_id: str) -> str:
    if not session_id:
        raise InvalidArgumentError("session_id is empty")
    return check_session_id(session_id)


class SessionServicer(pb_grpc.SessionServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _admin(self, context: grpc.aio.ServicerContext) -> SessionAdmin:
        return SessionAdmin(self.runtime.require(), caller_of(self.runtime, context))

    @unary_rpc
    async def GetSession(self, request: pb.GetSessionRequest,
                         context: grpc.aio.ServicerContext) -> pb.Session:
        session_id = _required_session(request.session_id)
        return session_pb(await self._admin(context).get(session_id))

    @unary_rpc
    async def ListSessions(self, request: pb.ListSessionsRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListSessionsResponse:
        limit = min(request.limit or DEFAULT_SESSION_LIST, MAX_SESSION_LIST)
        infos = await self._admin(context).list(limit)
        return pb.ListSessionsResponse(sessions=[session_info_pb(i) for i in infos])

    @unary_rpc
    async def DeleteSession(self, request: pb.DeleteSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.DeleteSessionResponse:
        session_id = _required_session(request.session_id)
        admin = self._admin(context)
        deleted = await audited(self.runtime, admin.caller, "session.delete", session_id,
                                admin.delete(session_id))
        return pb.DeleteSessionResponse(deleted=deleted)


SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    pb.DESCRIPTOR.services_by_name["AdapterService"].full_name,
    pb.DESCRIPTOR.services_by_name["SessionService"].full_name,
)


def method_handlers(service_name: str, servicer: Any) -> dict[str, grpc.RpcMethodHandler]:
    """The service's handlers as the generated add_*_to_server builds them, but decoding each
    request with `_deserializer`. Every method of our services has a unary request."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=_deserializer(request_type),
                                     response_serializer=response_type.SerializeToString)
    return handlers


def add_servicers(server: grpc.aio.Server, runtime: Runtime) -> None:
    servicers = {"InferenceService": InferenceServicer(runtime),
                 "AdapterService": AdapterServicer(runtime),
                 "SessionService": SessionServicer(runtime)}
    for short_name, servicer in servicers.items():
        full_name = pb.DESCRIPTOR.services_by_name[short_name].full_name
        handlers = method_handlers(short_name, servicer)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(full_name,
                                                                              handlers),))
        server.add_registered_method_handlers(full_name, handlers)
