"""gRPC servicers on grpc.aio: validate, convert proto <-> domain, call one component, convert back.

This is the ONLY module where domain exceptions (server/errors.py) become status codes: see
STATUS_BY_ERROR. The model is never touched on the event loop: generation goes through the
engine's queue, and blocking engine calls (load, unload, score) run in worker threads.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

from common.conversation import ROLES, Message
from server.adapter_cache import AdapterNotLoadedError
from server.adapters import AdapterRegistry, AdapterVersion
from server.config import TRUNCATION_STRATEGIES, ServerConfig
from server.context import (
    FitResult,
    PromptRenderer,
    SummaryCache,
    fit_conversation,
    prompt_budget,
)
from server.errors import (
    AdapterInUseError,
    AdapterLoadError,
    ContextOverflowError,
    FailedPreconditionError,
    IncompatibleAdapterError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SessionBusyError,
    SwitchboardError,
    UnavailableError,
)
from server.logging_setup import (
    NO_REQUEST,
    REQUEST_ID_METADATA_KEY,
    current_request_id,
    new_request_id,
    request_context,
)
from server.metrics import OTHER_LABEL
from server.request import FinishEvent, GenerationRequest, TokenEvent
from server.sampling import SamplingParams
from server.sessions import Session, SessionInfo, SessionLocks, validate_session_id

log = logging.getLogger(__name__)

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
}


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status code of the most specific known class of `error`; INTERNAL for the unexpected."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, error: BaseException, rpc: str) -> None:
    """Known failures get their own code and message; anything else is logged with its
    traceback and answered INTERNAL with the request id to find it in the log."""
    code = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.error("unexpected error in %s", rpc, exc_info=error)
        await context.abort(code, f"internal error in {rpc} ({type(error).__name__}); see the "
                                  f"server log for request {current_request_id()}")
    await context.abort(code, str(error))


def _metadata_request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's x-request-id (so its logs and ours line up), else a fresh id."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA_KEY and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return new_request_id()


def unary_rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Map exceptions of a unary handler to status codes (known ones precisely, others INTERNAL)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with request_context(_metadata_request_id(context)):
            try:
                return await method(self, request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:  # noqa: BLE001 - the one last-resort handler, see _abort
                await _abort(context, e, method.__name__)

    return wrapper


def stream_rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """The same mapping for server-streaming handlers (async generators)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with request_context(_metadata_request_id(context)):
            try:
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:  # noqa: BLE001 - the one last-resort handler, see _abort
                await _abort(context, e, method.__name__)

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
MAX_MESSAGES = 10_000


@dataclass(frozen=True)
class ChatInput:
    """A validated chat request in domain terms."""

    messages: tuple[Message, ...]
    adapter: str
    sampling: SamplingParams
    truncation: str
    session_id: str


def messages_from_pb(items: Iterable[pb.Message]) -> list[Message]:
    """Each message checked on its own; whole-conversation rules are in check_conversation."""
    messages: list[Message] = []
    for i, item in enumerate(items):
        if item.role not in ROLES:
            raise InvalidArgumentError(
                f"messages[{i}].role is {item.role!r}; allowed roles: {', '.join(ROLES)}")
        if item.role == "system" and i > 0:
            raise InvalidArgumentError(
                f"messages[{i}] is a system message; only the first message may be one")
        if item.role == "user" and not item.content.strip():
            raise InvalidArgumentError(f"messages[{i}] is a user message with empty content")
        messages.append(Message(item.role, item.content))
    if not messages:
        raise InvalidArgumentError("messages is empty: send at least one user message")
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgumentError(
            f"messages has {len(messages)} entries; at most {MAX_MESSAGES} are allowed")
    return messages


def check_conversation(messages: list[Message]) -> None:
    """The whole conversation (session history + new messages) must end with a user turn."""
    if not messages:
        raise InvalidArgumentError("messages is empty: send at least one user message")
    if messages[-1].role != "user":
        raise InvalidArgumentError(
            f"the last message must come from the user, got role {messages[-1].role!r}")
    for i, message in enumerate(messages[1:], start=1):
        if message.role == "system":
            raise InvalidArgumentError(
                f"message {i} of the conversation is a system message; only the first may be one")


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
    messages = messages_from_pb(request.messages)
    if not session_id:
        check_conversation(messages)
    return ChatInput(
        messages=tuple(messages),
        adapter=request.adapter.strip(),
        sampling=sampling_from_pb(request.sampling, config, vocab_size),
        truncation=truncation_from_pb(request.truncation, config.default_truncation),
        session_id=session_id,
    )


# ---------------------------------------------------------------- domain results -> proto

@dataclass(frozen=True)
class Truncation:
    """What the context step did to fit the conversation into the budget."""

    strategy: str
    budget_tokens: int
    messages_dropped: int = 0
    tokens_dropped: int = 0
    applied: bool = False
    summary: str = ""

    def to_pb(self) -> pb.TruncationReport:
        return pb.TruncationReport(
            strategy=PB_BY_STRATEGY.get(self.strategy, pb.TRUNCATION_STRATEGY_UNSPECIFIED),
            messages_dropped=self.messages_dropped, tokens_dropped=self.tokens_dropped,
            budget_tokens=max(self.budget_tokens, 0), applied=self.applied, summary=self.summary,
        )


def adapter_ref_pb(adapter: AdapterVersion | None, requested: str) -> pb.AdapterRef:
    if adapter is None:
        return pb.AdapterRef(requested=requested)
    return pb.AdapterRef(name=adapter.name, version=adapter.version, requested=requested)


@dataclass
class ChatResult:
    """The accounting of one finished answer."""

    request_id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter: AdapterVersion | None
    requested: str
    truncation: Truncation
    session_id: str
    queue_wait_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0

    def to_pb(self) -> pb.ChatResponse:
        return pb.ChatResponse(
            text=self.text,
            finish_reason=FINISH_BY_REASON.get(self.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
            usage=pb.Usage(prompt_tokens=self.prompt_tokens,
                           completion_tokens=self.completion_tokens),
            adapter=adapter_ref_pb(self.adapter, self.requested),
            timings=pb.Timings(queue_wait_seconds=self.queue_wait_s or 0.0,
                               time_to_first_token_seconds=self.ttft_s or 0.0,
                               total_seconds=self.total_s or 0.0),
            truncation=self.truncation.to_pb(),
            session_id=self.session_id,
            request_id=self.request_id,
        )


@dataclass(frozen=True)
class Delta:
    """New text of a running answer."""

    text: str
    completion_tokens: int


# ---------------------------------------------------------------- prompt rendering

SUMMARY_INSTRUCTION = (
    "Summarize the conversation below in a few sentences. Keep names, numbers and facts the "
    "user gave; write only the summary."
)
SUMMARY_MAX_NEW_TOKENS = 128


def truncation_of(fit: FitResult, budget: int) -> Truncation:
    return Truncation(strategy=fit.strategy, budget_tokens=budget,
                      messages_dropped=fit.messages_dropped, tokens_dropped=fit.tokens_dropped,
                      applied=fit.applied, summary=fit.summary)


def _transcript(messages: list[Message]) -> str:
    return "\n".join(f"{m.role}: {m.content}" for m in messages)


# ---------------------------------------------------------------- sessions

@dataclass(frozen=True)
class Turn:
    """One request's view of its session: stored history, the new messages, the summary."""

    session_id: str
    history: list[Message]
    new: list[Message]
    cached_summary: SummaryCache | None = None

    @property
    def conversation(self) -> list[Message]:
        return self.history + self.new


def turn_of(session_id: str, stored: Session | None, new: list[Message]) -> Turn:
    """A client may resend the session's system prompt each turn; an identical one is dropped,
    a different one is refused (the stored conversation keeps its first system prompt)."""
    history = list(stored.messages) if stored is not None else []
    if history and new and new[0].role == "system":
        if history[0].role == "system" and history[0].content == new[0].content:
            new = new[1:]
        else:
            raise InvalidArgumentError(
                f"session {session_id!r} already has a conversation; send only new user "
                "messages (a system prompt is allowed only on the first turn)")
    cached = SummaryCache.from_dict(stored.summary_cache) if stored is not None else None
    return Turn(session_id, history, new, cached)


# ---------------------------------------------------------------- the inference core

@dataclass
class Limits:
    context_length: int
    vocab_size: int


@dataclass
class InferenceCore:
    """Everything a chat or score call needs once the base is loaded; no gRPC inside."""

    engine: Any
    tokenizer: Any
    renderer: PromptRenderer
    registry: AdapterRegistry
    config: ServerConfig
    limits: Limits
    metrics: Any = None
    sessions: Any = None
    session_locks: SessionLocks = field(default_factory=SessionLocks)
    _loading: dict[str, asyncio.Future[Any]] = field(default_factory=dict)

    def resolve(self, ref: str) -> AdapterVersion | None:
        """Blocking resolve (may rescan the disk); for worker threads."""
        return self.registry.resolve(ref) if ref else None

    async def resolve_async(self, ref: str) -> AdapterVersion | None:
        """Known references resolve in memory; unknown ones rescan the disk in a worker thread."""
        if not ref:
            return None
        found = self.registry.lookup(ref)
        return found if found is not None else await asyncio.to_thread(self.registry.resolve, ref)

    async def ensure_loaded(self, adapter: AdapterVersion) -> Any:
        """Load `adapter` in a worker thread; concurrent callers share one load."""
        pending = self._loading.get(adapter.key)
        if pending is not None:
            return await asyncio.shield(pending)
        task = asyncio.ensure_future(
            asyncio.to_thread(self.engine.load_adapter, adapter.key, adapter.path))
        self._loading[adapter.key] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._loading.pop(adapter.key, None)
            else:
                task.add_done_callback(lambda _: self._loading.pop(adapter.key, None))

    async def with_adapter(self, adapter: AdapterVersion | None,
                           call: Callable[[], Awaitable[Any]]) -> Any:
        """Run `call`; when the engine says the adapter is not loaded, load it and try again.

        Two retries cover an eviction racing between our load and the resubmit.
        """
        for attempt in range(3):
            try:
                return await call()
            except AdapterNotLoadedError:
                if adapter is None or attempt == 2:
                    raise
                await self.ensure_loaded(adapter)
        raise AssertionError("unreachable")

    def budget(self, max_new_tokens: int) -> int:
        return prompt_budget(self.limits.context_length, max_new_tokens)

    async def fit(self, messages: list[Message], max_new_tokens: int, strategy: str,
                  cached_summary: SummaryCache | None = None) -> tuple[FitResult, int]:
        """Fit the conversation into the prompt budget (in a worker thread: it tokenizes, and
        the summarize strategy waits on the engine)."""
        budget = self.budget(max_new_tokens)
        fit = await asyncio.to_thread(
            fit_conversation, messages, self.renderer, budget, strategy,
            self.summarize if strategy == "summarize" else None, cached_summary)
        if fit.applied:
            self.metric("observe_truncation", fit.strategy, fit.messages_dropped,
                        fit.tokens_dropped)
        return fit, budget

    def summarize(self, messages: list[Message]) -> str:
        """Blocking (worker thread): a short summary written by the model itself, greedy."""
        adapter = self.resolve(self.config.summarize_adapter)
        if adapter is not None:
            self.engine.load_adapter(adapter.key, adapter.path)
        text = _transcript(messages)
        room = self.limits.context_length - SUMMARY_MAX_NEW_TOKENS
        ids = self.renderer.render([Message("system", SUMMARY_INSTRUCTION), Message("user", text)])
        while len(ids) > room and len(text) > 1:
            text = text[len(text) // 4:]  # keep the most recent part of an oversized transcript
            ids = self.renderer.render([Message("system", SUMMARY_INSTRUCTION),
                                        Message("user", text)])
        request = GenerationRequest(
            request_id=f"{current_request_id()}-summary", prompt_ids=ids,
            adapter=adapter.key if adapter else None,
            sampling=SamplingParams(max_new_tokens=SUMMARY_MAX_NEW_TOKENS))
        for event in self.engine.submit(request):
            if isinstance(event, FinishEvent):
                return event.text.strip()
        raise UnavailableError("the engine ended the summary without a finish event")

    @asynccontextmanager
    async def session(self, session_id: str,
                      messages: tuple[Message, ...]) -> AsyncIterator[Turn]:
        """Hold `session_id` for one request (a second concurrent one gets ABORTED) and give
        the stored history with the new messages."""
        if not session_id:
            yield Turn("", [], list(messages))
            return
        if self.sessions is None:
            raise FailedPreconditionError(
                "sessions are disabled on this server: start it with --sessions-db PATH")
        async with self.session_locks.acquire(session_id):
            stored = await asyncio.to_thread(self.sessions.get, session_id)
            yield turn_of(session_id, stored, list(messages))

    async def remember(self, turn: Turn, answer: str, cache: SummaryCache | None) -> None:
        """Blocking store calls in a worker thread: append the turn, then the summary cache."""

        def write() -> int:
            self.sessions.append_turn(turn.session_id, [*turn.new, Message("assistant", answer)])
            if cache is not None and cache != turn.cached_summary:
                self.sessions.set_summary(turn.session_id, cache.to_dict())
            return self.sessions.count()

        self.metric("set_sessions", await asyncio.to_thread(write))

    def metric(self, name: str, *args: Any) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name)(*args)


# Metrics label of requests whose adapter reference did not resolve: user-typed names must not
# take the bounded per-adapter label slots.
UNRESOLVED_LABEL = OTHER_LABEL


def adapter_label(adapter: AdapterVersion | None) -> str | None:
    """Metrics label: the adapter key, None for the bare base (metrics names it __base__)."""
    return adapter.key if adapter is not None else None


@dataclass(frozen=True)
class ScoreOutcome:
    log_likelihood: float
    token_count: int
    prompt_tokens: int
    adapter: AdapterVersion | None
    requested: str

    def to_pb(self) -> pb.ScoreResponse:
        return pb.ScoreResponse(
            log_likelihood=self.log_likelihood, token_count=self.token_count,
            prompt_tokens=self.prompt_tokens, adapter=adapter_ref_pb(self.adapter, self.requested))


async def score(core: InferenceCore, messages: list[Message], continuation: str,
                ref: str) -> ScoreOutcome:
    """Log-likelihood of `continuation` as the assistant's answer after `messages`."""
    check_conversation(messages)
    if not continuation:
        raise InvalidArgumentError("continuation is empty: give the assistant text to score")
    adapter = await core.resolve_async(ref)
    prompt_ids = await asyncio.to_thread(core.renderer.render, messages)
    target_ids = list(core.renderer.encode([continuation])["input_ids"][0])
    total = len(prompt_ids) + len(target_ids)
    if total > core.limits.context_length:
        raise ContextOverflowError(
            f"prompt ({len(prompt_ids)} tokens) plus continuation ({len(target_ids)}) is "
            f"{total} tokens; the context length is {core.limits.context_length}")
    key = adapter.key if adapter else None

    async def run() -> Any:
        return await asyncio.to_thread(core.engine.score, prompt_ids, target_ids, key)

    scored = await core.with_adapter(adapter, run)
    return ScoreOutcome(scored.log_likelihood, scored.token_count, len(prompt_ids), adapter, ref)


class ChatCall:
    """One chat request from submission to its last event; `cancel()` is safe from any thread."""

    def __init__(self, core: InferenceCore, chat: ChatInput, deadline: float | None) -> None:
        self.core = core
        self.chat = chat
        self.deadline = deadline
        self.request_id = current_request_id()
        if self.request_id == NO_REQUEST:
            self.request_id = new_request_id()
        self._handle: Any = None
        self._cancelled = False
        self._finished = False
        self._summary_cache: SummaryCache | None = None

    def cancel(self) -> None:
        self._cancelled = True
        if self._handle is not None and not self._finished:
            self._handle.cancel()

    async def events(self) -> AsyncIterator[Delta | ChatResult]:
        """Deltas as tokens arrive, then exactly one ChatResult."""
        started = time.monotonic()
        label = UNRESOLVED_LABEL if self.chat.adapter else None
        try:
            adapter = await self.core.resolve_async(self.chat.adapter)
            label = adapter_label(adapter)
            async with self.core.session(self.chat.session_id, self.chat.messages) as turn:
                async for item in self._generate(adapter, turn):
                    if isinstance(item, ChatResult) and turn.session_id \
                            and item.finish_reason != "cancelled":
                        # Stored before the client sees the answer, so its next turn finds it.
                        await self.core.remember(turn, item.text, self._summary_cache)
                    yield item
        except BaseException as e:
            gone = isinstance(e, asyncio.CancelledError | GeneratorExit)
            code = "CANCELLED" if gone else status_for(e).name
            self.core.metric("observe_request", label, code, None, None,
                             time.monotonic() - started, 0, 0)
            raise

    async def _generate(self, adapter: AdapterVersion | None,
                        turn: Turn) -> AsyncIterator[Delta | ChatResult]:
        messages = turn.conversation
        check_conversation(messages)
        fit, budget = await self.core.fit(messages, self.chat.sampling.max_new_tokens,
                                          self.chat.truncation, turn.cached_summary)
        self._summary_cache = fit.summary_cache
        truncation = truncation_of(fit, budget)
        request = GenerationRequest(
            request_id=self.request_id, prompt_ids=fit.prompt_ids,
            adapter=adapter.key if adapter else None, sampling=self.chat.sampling,
            deadline=self.deadline,
        )
        async def submit() -> Any:
            return self.core.engine.submit(request)

        self._handle = await self.core.with_adapter(adapter, submit)
        if self._cancelled:
            self._handle.cancel()
        try:
            async for event in self._stream(adapter):
                yield event if isinstance(event, Delta) else self._result(event, adapter,
                                                                          truncation)
        finally:
            if not self._finished:
                self._handle.cancel()

    async def _stream(self, adapter: AdapterVersion | None) -> AsyncIterator[Any]:
        last = time.monotonic()
        label = adapter_label(adapter)
        async for event in self._handle:
            if isinstance(event, TokenEvent):
                now = time.monotonic()
                self.core.metric("observe_inter_token", label, now - last)
                last = now
                yield Delta(event.text_delta, event.completion_tokens)
            else:
                self._finished = True
                yield event

    def _result(self, finish: FinishEvent, adapter: AdapterVersion | None,
                truncation: Truncation) -> ChatResult:
        result = ChatResult(
            request_id=self.request_id, text=finish.text, finish_reason=finish.reason,
            prompt_tokens=finish.prompt_tokens, completion_tokens=finish.completion_tokens,
            adapter=adapter, requested=self.chat.adapter, truncation=truncation,
            session_id=self.chat.session_id, queue_wait_s=finish.queue_wait_s,
            ttft_s=finish.ttft_s, total_s=finish.total_s,
        )
        self.core.metric("observe_request", adapter_label(adapter), "OK", finish.queue_wait_s,
                         finish.ttft_s, finish.total_s, finish.prompt_tokens,
                         finish.completion_tokens)
        return result


# ---------------------------------------------------------------- servicers

class Runtime:
    """What the servicers reach; `core` is None until the base model has loaded."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.core: InferenceCore | None = None

    def require(self) -> InferenceCore:
        if self.core is None:
            raise UnavailableError("the base model is still loading; retry shortly")
        return self.core


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _call(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> ChatCall:
        core = self.runtime.require()
        try:
            chat = chat_input_from_pb(request, core.config, core.limits.vocab_size)
        except SwitchboardError as e:
            core.metric("observe_request", UNRESOLVED_LABEL if request.adapter else None,
                        status_for(e).name, None, None, 0.0, 0, 0)
            raise
        call = ChatCall(core, chat, _deadline(context))
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
        return result.to_pb()

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
                                   completion_tokens=item.completion_tokens, final=item.to_pb())

    @unary_rpc
    async def Score(self, request: pb.ScoreRequest,
                    context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        core = self.runtime.require()
        messages = messages_from_pb(request.messages)
        result = await score(core, messages, request.continuation, request.adapter.strip())
        return result.to_pb()


def adapter_info_pb(version: AdapterVersion | None, key: str, loaded: Any,
                    aliases: list[str]) -> pb.AdapterInfo:
    """One row of ListAdapters: what is on disk merged with what the engine holds."""
    name, _, number = key.partition("@")
    info = pb.AdapterInfo(name=name, version=int(number or 0), loaded=loaded is not None,
                          aliases=aliases)
    if version is not None:
        info.compatible = version.compatible
        info.base_fingerprint = version.fingerprint
        info.created = version.created
        info.rank = version.rank
    if loaded is not None:
        info.memory_bytes = loaded.memory_bytes
        info.in_flight = loaded.in_flight
        info.rank = loaded.rank
    return info


def alias_pb(alias: Any) -> pb.AliasInfo:
    return pb.AliasInfo(alias=alias.alias, name=alias.name, version=alias.version)


class AdapterAdmin:
    """Load, unload, list and alias adapters; disk and engine calls run in worker threads."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    def _info(self, key: str) -> pb.AdapterInfo:
        registry, loaded = self.core.registry, self.core.engine.loaded_adapters()
        try:
            version = registry.resolve(key, require_compatible=False)
        except NotFoundError:
            version = None
        return adapter_info_pb(version, key, loaded.get(key), registry.aliases_of(key))

    async def load(self, ref: str) -> pb.LoadAdapterResponse:
        adapter = await asyncio.to_thread(self.core.registry.resolve, _required(ref, "adapter"))
        loaded = await self.core.ensure_loaded(adapter)
        info = await asyncio.to_thread(self._info, adapter.key)
        return pb.LoadAdapterResponse(adapter=info, load_seconds=loaded.load_seconds)

    def _unload(self, ref: str) -> pb.UnloadAdapterResponse:
        """Refuses (AdapterInUseError) while requests hold the adapter; never waits for them."""
        adapter = self.core.registry.resolve(_required(ref, "adapter"), require_compatible=False)
        loaded = self.core.engine.loaded_adapters()
        if adapter.key not in loaded:
            held = ", ".join(sorted(loaded)) or "none"
            raise NotFoundError(f"adapter {adapter.key} is not loaded; loaded: {held}")
        info = self._info(adapter.key)
        self.core.engine.unload_adapter(adapter.key)
        info.loaded, info.memory_bytes, info.in_flight = False, 0, 0
        return pb.UnloadAdapterResponse(adapter=info)

    async def unload(self, ref: str) -> pb.UnloadAdapterResponse:
        return await asyncio.to_thread(self._unload, ref)

    def _list(self) -> pb.ListAdaptersResponse:
        registry = self.core.registry
        versions = {v.key: v for v in registry.versions()}
        loaded = self.core.engine.loaded_adapters()
        rows = [adapter_info_pb(versions.get(key), key, loaded.get(key), registry.aliases_of(key))
                for key in sorted(set(versions) | set(loaded), key=_key_order)]
        return pb.ListAdaptersResponse(adapters=rows,
                                       aliases=[alias_pb(a) for a in registry.aliases()])

    async def list(self) -> pb.ListAdaptersResponse:
        return await asyncio.to_thread(self._list)

    async def set_alias(self, alias: str, target: str) -> pb.SetAliasResponse:
        new, previous = await asyncio.to_thread(
            self.core.registry.set_alias, _required(alias, "alias"), target.strip())
        return pb.SetAliasResponse(alias=alias_pb(new), previous=previous)


def _key_order(key: str) -> tuple[str, int]:
    name, _, number = key.partition("@")
    return name, int(number or 0)


def _required(value: str, field_name: str) -> str:
    value = value.strip()
    if not value:
        raise InvalidArgumentError(f"{field_name} is empty: give name, name@version or an alias")
    return value


class AdapterServicer(pb_grpc.AdapterServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _admin(self) -> AdapterAdmin:
        return AdapterAdmin(self.runtime.require())

    @unary_rpc
    async def LoadAdapter(self, request: pb.LoadAdapterRequest,
                          context: grpc.aio.ServicerContext) -> pb.LoadAdapterResponse:
        return await self._admin().load(request.adapter)

    @unary_rpc
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest,
                            context: grpc.aio.ServicerContext) -> pb.UnloadAdapterResponse:
        return await self._admin().unload(request.adapter)

    @unary_rpc
    async def ListAdapters(self, request: pb.ListAdaptersRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListAdaptersResponse:
        return await self._admin().list()

    @unary_rpc
    async def SetAlias(self, request: pb.SetAliasRequest,
                       context: grpc.aio.ServicerContext) -> pb.SetAliasResponse:
        return await self._admin().set_alias(request.alias.strip(), request.target)


SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    pb.DESCRIPTOR.services_by_name["AdapterService"].full_name,
    pb.DESCRIPTOR.services_by_name["SessionService"].full_name,
)


def add_servicers(server: grpc.aio.Server, runtime: Runtime) -> None:
    pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(runtime), server)
    pb_grpc.add_AdapterServiceServicer_to_server(AdapterServicer(runtime), server)
    pb_grpc.add_SessionServiceServicer_to_server(SessionServicer(runtime), server)


class SessionServicer(pb_grpc.SessionServiceServicer):
    """Read and delete stored conversations; the store's blocking calls run in worker threads."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _store(self) -> Any:
        store = self.runtime.require().sessions
        if store is None:
            raise FailedPreconditionError(
                "sessions are disabled on this server: start it with --sessions-db PATH")
        return store

    @unary_rpc
    async def GetSession(self, request: pb.GetSessionRequest,
                         context: grpc.aio.ServicerContext) -> pb.Session:
        session_id = _required_session(request.session_id)
        stored = await asyncio.to_thread(self._store().get, session_id)
        if stored is None:
            raise NotFoundError(f"session {session_id!r} does not exist (or has expired)")
        return session_pb(stored)

    @unary_rpc
    async def ListSessions(self, request: pb.ListSessionsRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListSessionsResponse:
        limit = min(request.limit or DEFAULT_SESSION_LIST, MAX_SESSION_LIST)
        infos = await asyncio.to_thread(self._store().list, limit)
        return pb.ListSessionsResponse(sessions=[session_info_pb(i) for i in infos])

    @unary_rpc
    async def DeleteSession(self, request: pb.DeleteSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.DeleteSessionResponse:
        session_id = _required_session(request.session_id)
        store = self._store()

        def delete() -> tuple[bool, int]:
            return store.delete(session_id), store.count()

        deleted, count = await asyncio.to_thread(delete)
        self.runtime.require().metric("set_sessions", count)
        return pb.DeleteSessionResponse(deleted=deleted)


DEFAULT_SESSION_LIST = 100
MAX_SESSION_LIST = 10_000


def _required_session(session_id: str) -> str:
    if not session_id:
        raise InvalidArgumentError("session_id is empty")
    return check_session_id(session_id)


def session_pb(stored: Session) -> pb.Session:
    return pb.Session(
        session_id=stored.id,
        messages=[pb.Message(role=m.role, content=m.content) for m in stored.messages],
        summary=str(stored.summary_cache.get("summary", "")),
        created_unix=stored.created, updated_unix=stored.updated,
    )


def session_info_pb(info: SessionInfo) -> pb.SessionInfo:
    return pb.SessionInfo(session_id=info.id, message_count=info.message_count,
                          created_unix=info.created, updated_unix=info.updated)
