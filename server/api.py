"""gRPC servicers on grpc.aio: validate, convert proto <-> domain, call one component, convert back.

The work itself (chat, score, adapter and session administration) is in server/core, which
knows no gRPC. Request ids, status codes and metrics are the interceptor's
(server/interceptor.py): a servicer raises domain errors (server/errors.py) and never aborts.
`add_servicers` registers the handlers with the interceptor's deserializer.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import grpc
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from common.conversation import ROLES, Message
from common.names import TRUNCATION_STRATEGIES, TruncationStrategy
from server.adapters import AdapterVersion, Alias, AliasMove, shown
from server.audit import OK, entry
from server.config import ServerConfig
from server.core import (
    AdapterAdmin,
    AdapterStatus,
    ChatCall,
    ChatInput,
    ChatResult,
    Delta,
    ScoreOutcome,
    SessionAdmin,
    Truncation,
    check_conversation,
    current_record,
    score,
)
from server.errors import InvalidArgumentError
from server.interceptor import deserializer
from server.keys import Caller, presented_key
from server.runtime import Runtime
from server.sampling import SamplingParams
from server.sessions import Session, SessionInfo, validate_session_id
from server.status import code_name

__all__ = ["SERVICE_NAMES", "add_servicers"]
T = TypeVar("T")


# ---------------------------------------------------------------- request validation

STRATEGY_BY_PB = {
    pb.TRUNCATION_STRATEGY_ERROR: TruncationStrategy.ERROR,
    pb.TRUNCATION_STRATEGY_DROP_OLDEST: TruncationStrategy.DROP_OLDEST,
    pb.TRUNCATION_STRATEGY_SLIDING_WINDOW: TruncationStrategy.SLIDING_WINDOW,
    pb.TRUNCATION_STRATEGY_MIDDLE_OUT: TruncationStrategy.MIDDLE_OUT,
    pb.TRUNCATION_STRATEGY_SUMMARIZE: TruncationStrategy.SUMMARIZE,
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
    max_new = sampling.max_new_tokens or config.engine.default_max_new_tokens
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
                                entry(caller, action, target, code_name(e), str(e)))
        raise
    await asyncio.to_thread(runtime.audit.record, entry(caller, action, target, OK))
    return result


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _call(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> ChatCall:
        current_record().begin_chat(request.adapter.strip())  # counted even when refused here
        core = self.runtime.require()
        chat = replace(chat_input_from_pb(request, core.config, core.limits.vocab_size),
                       caller=caller_of(self.runtime, context))
        call = ChatCall(core, chat, _deadline(context))
        context.add_done_callback(lambda _: call.cancel())
        return call

    async def Chat(self, request: pb.ChatRequest,
                   context: grpc.aio.ServicerContext) -> pb.ChatResponse:
        result = None
        async for item in self._call(request, context).events():
            if isinstance(item, ChatResult):
                result = item
        assert result is not None, "the engine ended a stream without a finish event"
        return chat_response_pb(result)

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

    async def LoadAdapter(self, request: pb.LoadAdapterRequest,
                          context: grpc.aio.ServicerContext) -> pb.LoadAdapterResponse:
        loaded = await audited(self.runtime, caller_of(self.runtime, context), "adapter.load",
                               request.adapter, self._admin().load(request.adapter))
        return pb.LoadAdapterResponse(adapter=adapter_info_pb(loaded.adapter),
                                      load_seconds=loaded.load_seconds)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> pb.UnloadAdapterResponse:
        status = await audited(self.runtime, caller_of(self.runtime, context),
                               "adapter.unload", request.adapter,
                               self._admin().unload(request.adapter))
        return pb.UnloadAdapterResponse(adapter=adapter_info_pb(status))

    async def ListAdapters(self, request: pb.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListAdaptersResponse:
        listing = await self._admin().list()
        return pb.ListAdaptersResponse(adapters=[adapter_info_pb(a) for a in listing.adapters],
                                       aliases=[alias_pb(a) for a in listing.aliases])

    async def SetAlias(self, request: pb.SetAliasRequest,
                       context: grpc.aio.ServicerContext) -> pb.SetAliasResponse:
        alias, previous = await audited(
            self.runtime, caller_of(self.runtime, context), "alias.set",
            f"{request.alias.strip()} -> {request.target.strip()}",
            self._admin().set_alias(request.alias.strip(), request.target, request.reason))
        return pb.SetAliasResponse(alias=alias_pb(alias), previous=previous)

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

    async def GetSession(self, request: pb.GetSessionRequest,
                         context: grpc.aio.ServicerContext) -> pb.Session:
        session_id = _required_session(request.session_id)
        return session_pb(await self._admin(context).get(session_id))

    async def ListSessions(self, request: pb.ListSessionsRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListSessionsResponse:
        limit = min(request.limit or DEFAULT_SESSION_LIST, MAX_SESSION_LIST)
        infos = await self._admin(context).list(limit)
        return pb.ListSessionsResponse(sessions=[session_info_pb(i) for i in infos])

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
    request with the interceptor's `deserializer`. Every method here has a unary request."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=deserializer(request_type),
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
