"""Chat, score, adapter and session operations in domain terms: the servers' core, no gRPC.

The servicers in server/api.py validate a request, convert it to the types here, make one call
and convert the answer back. Failures are raised as server/errors.py exceptions; only the edge
turns them into status codes. The model is never touched on the event loop: generation goes
through the engine's queue, and blocking calls (disk, load, unload, score, sessions) run in
worker threads.

Admission: every chat, stream and score holds a place in `Admission` from its arrival until its
answer is complete, in total and per resolved adapter (the bare base counts as one adapter);
past max_concurrent_requests or max_concurrent_per_adapter a request is refused at once with
ConcurrencyLimitError instead of queueing, and its place is given back on every exit path.

Tenants: every call carries its `Caller` (server/keys.py; ANONYMOUS when auth is off). Before the
server-wide admission a key's own limits apply (server/ratelimit.py); a scoped key may resolve
only adapters in its scope (PERMISSION_DENIED alike for one outside it and one that does not
exist); and a session is seen only by the key that created it and by admin keys: for any other
key it answers NOT_FOUND, in chat as in the session admin, as a session that does not exist.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common.conversation import Message
from server.adapters import AdapterRegistry, AdapterVersion, Alias, AliasMove
from server.config import ServerConfig
from server.context import (
    FitResult,
    PromptRenderer,
    SummaryCache,
    fit_conversation,
    prompt_budget,
)
from server.errors import (
    AdapterLoadError,
    ConcurrencyLimitError,
    ContextOverflowError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SessionStoreError,
    UnauthenticatedError,
    UnavailableError,
)
from server.keys import ANONYMOUS, Caller, LiveKeys
from server.logging_setup import NO_REQUEST, current_request_id, new_request_id
from server.metrics import OTHER_LABEL
from server.ratelimit import KeyLimiter
from server.request import FinishEvent, GenerationRequest, TokenEvent
from server.sampling import SamplingParams
from server.sessions import Session, SessionInfo, SessionLocks

# ---------------------------------------------------------------- requests and results


@dataclass(frozen=True)
class ChatInput:
    """A validated chat request in domain terms."""

    messages: tuple[Message, ...]
    adapter: str
    sampling: SamplingParams
    truncation: str
    session_id: str
    # Who asks; the default (auth off) sees every session and adapter, as before keys existed.
    caller: Caller = ANONYMOUS


@dataclass(frozen=True)
class Truncation:
    """What the context step did to fit the conversation into the budget."""

    strategy: str
    budget_tokens: int
    messages_dropped: int = 0
    tokens_dropped: int = 0
    applied: bool = False
    summary: str = ""


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


@dataclass(frozen=True)
class Delta:
    """New text of a running answer."""

    text: str
    completion_tokens: int


@dataclass(frozen=True)
class ScoreOutcome:
    log_likelihood: float
    token_count: int
    prompt_tokens: int
    adapter: AdapterVersion | None
    requested: str


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


# ---------------------------------------------------------------- prompt fitting and summaries

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


def session_not_found(session_id: str) -> NotFoundError:
    """The one answer for a session the caller may not see, existing or not."""
    return NotFoundError(f"session {session_id!r} does not exist for this key (or has expired)")


def check_owner(session_id: str, stored: Session | None, caller: Caller) -> Session | None:
    """`stored` if `caller` may see it; NotFoundError if it belongs to another key."""
    if stored is not None and not caller.owns(stored.owner):
        raise session_not_found(session_id)
    return stored


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


# ---------------------------------------------------------------- admission

BASE_ADAPTER = "the bare base model"


class Ticket:
    """One request's places in `Admission`; `release()` is idempotent and also runs on exit."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._adapter: str | None = None
        self._held = True

    def bind(self, adapter: AdapterVersion | None) -> None:
        """Also take a place on the request's resolved adapter (None = the bare base)."""
        key = adapter.key if adapter is not None else BASE_ADAPTER
        self._admission.take_adapter(key)
        self._adapter = key

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission.give_back(self._adapter)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission:
    """Counts the requests running or waiting, in total and per adapter; thread-safe."""

    def __init__(self, max_total: int, max_per_adapter: int) -> None:
        self.max_total = max_total
        self.max_per_adapter = max_per_adapter
        self._lock = threading.Lock()
        self._total = 0
        self._per_adapter: Counter[str] = Counter()

    def admit(self) -> Ticket:
        """A ticket holding one place in the total, or ConcurrencyLimitError when full."""
        with self._lock:
            if self._total >= self.max_total:
                raise ConcurrencyLimitError(
                    f"the server is at its limit of {self.max_total} concurrent requests "
                    "(running or waiting; setting max_concurrent_requests, "
                    "--max-concurrent-requests); retry shortly")
            self._total += 1
        return Ticket(self)

    def take_adapter(self, key: str) -> None:
        with self._lock:
            if self._per_adapter[key] >= self.max_per_adapter:
                who = key if key == BASE_ADAPTER else f"adapter {key}"
                raise ConcurrencyLimitError(
                    f"{who} is at its limit of {self.max_per_adapter} concurrent requests "
                    "(running or waiting; setting max_concurrent_per_adapter, "
                    "--max-concurrent-per-adapter); retry shortly or use another adapter")
            self._per_adapter[key] += 1

    def give_back(self, adapter: str | None) -> None:
        with self._lock:
            self._total -= 1
            if adapter is not None:
                self._per_adapter[adapter] -= 1
                if not self._per_adapter[adapter]:
                    del self._per_adapter[adapter]

    def in_flight(self) -> tuple[int, dict[str, int]]:
        """(total, {adapter: count}) right now."""
        with self._lock:
            return self._total, dict(self._per_adapter)


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
    admission: Admission = field(init=False)
    limiter: KeyLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.config.max_concurrent_requests,
                                   self.config.max_concurrent_per_adapter)
        self.limiter = KeyLimiter(observer=self.metrics)

    def resolve(self, ref: str) -> AdapterVersion | None:
        """Blocking resolve (may rescan the disk); for worker threads."""
        return self.registry.resolve(ref) if ref else None

    async def resolve_async(self, ref: str) -> AdapterVersion | None:
        """Known references resolve in memory; unknown ones rescan the disk in a worker thread."""
        if not ref:
            return None
        found = self.registry.lookup(ref)
        return found if found is not None else await asyncio.to_thread(self.registry.resolve, ref)

    async def resolve_for(self, caller: Caller, ref: str) -> AdapterVersion | None:
        """Resolve `ref` for `caller`. A scoped key hears the same PERMISSION_DENIED for an
        adapter outside its scope as for one that does not resolve (or cannot be served), so it
        learns nothing about other tenants' adapters; aliases are resolved before the check."""
        if not caller.scoped:
            return await self.resolve_async(ref)
        try:
            adapter = await self.resolve_async(ref)
        except (NotFoundError, FailedPreconditionError, AdapterLoadError):
            raise caller.out_of_scope(ref) from None
        if adapter is None and not caller.may_use(None):
            raise caller.out_of_scope(ref)
        if adapter is not None and not caller.may_use(adapter.name, adapter.version):
            raise caller.out_of_scope(ref)
        return adapter

    async def ensure_loaded(self, adapter: AdapterVersion) -> Any:
        """Load `adapter` in a worker thread; concurrent callers share one load."""
        pending = self._loading.get(adapter.key)
        if pending is not None:
            return await asyncio.shield(pending)
        self.registry.check_still_inside(adapter)
        task = asyncio.ensure_future(
            asyncio.to_thread(self.engine.load_adapter, adapter.key, adapter.path))
        self._loading[adapter.key] = task
        try:
            return await asyncio.shield(task)
        except AdapterLoadError:
            await self.explain_load_failure(adapter)
            raise
        finally:
            if task.done():
                self._loading.pop(adapter.key, None)
            else:
                task.add_done_callback(lambda _: self._loading.pop(adapter.key, None))

    async def explain_load_failure(self, adapter: AdapterVersion) -> None:
        """After a failed load: when the version was deleted since the last scan, rescan and
        raise NOT_FOUND listing what exists, instead of a server path that is gone."""
        if adapter.path.is_dir():
            return
        await asyncio.to_thread(self.registry.scan)
        await asyncio.to_thread(self.registry.resolve, adapter.key)

    def engine_adapter(self, adapter: AdapterVersion | None) -> tuple[str | None, Path | None]:
        """The engine's key and path for `adapter`. The engine loads a non-resident adapter
        itself while the request waits, so its files are re-checked below the root first."""
        if adapter is None:
            return None, None
        if not self.engine.is_loaded(adapter.key):
            self.registry.check_still_inside(adapter)
        return adapter.key, adapter.path

    def budget(self, max_new_tokens: int) -> int:
        """Prompt tokens allowed: the window minus the answer, capped by max_prompt_tokens."""
        budget = prompt_budget(self.limits.context_length, max_new_tokens)
        cap = self.config.max_prompt_tokens
        return min(budget, cap) if cap else budget

    def _capped(self, error: ContextOverflowError, budget: int) -> ContextOverflowError:
        """The overflow error, naming max_prompt_tokens when that (not the window) set it."""
        cap = self.config.max_prompt_tokens
        if not cap or budget != cap:
            return error
        return ContextOverflowError(
            f"{error}. Here the budget is this server's prompt limit max_prompt_tokens={cap} "
            "(setting --max-prompt-tokens), not the context window")

    async def fit(self, messages: list[Message], max_new_tokens: int, strategy: str,
                  cached_summary: SummaryCache | None = None) -> tuple[FitResult, int]:
        """Fit the conversation into the prompt budget (in a worker thread: it tokenizes, and
        the summarize strategy waits on the engine)."""
        budget = self.budget(max_new_tokens)
        try:
            fit = await asyncio.to_thread(
                fit_conversation, messages, self.renderer, budget, strategy,
                self.summarize if strategy == "summarize" else None, cached_summary)
        except ContextOverflowError as e:
            raise self._capped(e, budget) from e
        if fit.applied:
            self.metric("observe_truncation", fit.strategy, fit.messages_dropped,
                        fit.tokens_dropped)
        return fit, budget

    def summarize(self, messages: list[Message]) -> str:
        """Blocking (worker thread): a short summary written by the model itself, greedy."""
        key, path = self.engine_adapter(self.resolve(self.config.summarize_adapter))
        text = _transcript(messages)
        window = self.limits.context_length
        # A small window still gets a summary: its answer may use at most a quarter of it.
        max_new = min(SUMMARY_MAX_NEW_TOKENS, max(1, window // 4))
        room = window - max_new
        ids = self.renderer.render([Message("system", SUMMARY_INSTRUCTION), Message("user", text)])
        while len(ids) > room and len(text) > 1:
            text = text[max(1, len(text) // 4):]  # keep the most recent part of the transcript
            ids = self.renderer.render([Message("system", SUMMARY_INSTRUCTION),
                                        Message("user", text)])
        if len(ids) > room:
            raise ContextOverflowError(
                f"the summarize strategy needs {len(ids)} prompt tokens for its summary but the "
                f"{window}-token window leaves {room}; raise context_length or choose "
                "drop_oldest, sliding_window or middle_out")
        request = GenerationRequest(
            request_id=f"{current_request_id()}-summary", prompt_ids=ids, adapter=key,
            adapter_path=path, sampling=SamplingParams(max_new_tokens=max_new))
        for event in self.engine.submit(request):
            if isinstance(event, FinishEvent):
                return event.text.strip()
        raise UnavailableError("the engine ended the summary without a finish event")

    @asynccontextmanager
    async def session(self, session_id: str, messages: tuple[Message, ...],
                      caller: Caller = ANONYMOUS) -> AsyncIterator[Turn]:
        """Hold `session_id` for one request (a second concurrent one gets ABORTED) and give
        the stored history with the new messages; NOT_FOUND when another key owns it."""
        if not session_id:
            yield Turn("", [], list(messages))
            return
        if self.sessions is None:
            raise FailedPreconditionError(
                "sessions are disabled on this server: start it with --sessions-db PATH")
        if not caller.is_admin:
            # Checked before the lock too: another key's busy session must answer NOT_FOUND,
            # not ABORTED, or "busy" would tell that it exists.
            check_owner(session_id, await asyncio.to_thread(self.sessions.get, session_id),
                        caller)
        async with self.session_locks.acquire(session_id):
            stored = await asyncio.to_thread(self.sessions.get, session_id)
            yield turn_of(session_id, check_owner(session_id, stored, caller), list(messages))

    async def remember(self, turn: Turn, answer: str, cache: SummaryCache | None,
                       owner: str = "") -> None:
        """Blocking store calls in a worker thread: append the turn (a new session is owned by
        `owner`), then count the sessions."""

        def write() -> int | None:
            # The summary cache goes into the turn's own transaction: a failure after the turn
            # was stored would answer UNAVAILABLE, and a retrying client would store it twice.
            summary = (cache.to_dict() if cache is not None and cache != turn.cached_summary
                       else None)
            self.sessions.append_turn(turn.session_id, [*turn.new, Message("assistant", answer)],
                                      summary, owner)
            try:
                return self.sessions.count()
            except SessionStoreError:
                return None  # the turn is stored; only the gauge misses this update

        count = await asyncio.to_thread(write)
        if count is not None:
            self.metric("set_sessions", count)

    def metric(self, name: str, *args: Any) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name)(*args)


# Metrics label of requests whose adapter reference did not resolve: user-typed names must not
# take the bounded per-adapter label slots.
UNRESOLVED_LABEL = OTHER_LABEL


def adapter_label(adapter: AdapterVersion | None) -> str | None:
    """Metrics label: the adapter key, None for the bare base (metrics names it __base__)."""
    return adapter.key if adapter is not None else None


# ---------------------------------------------------------------- score and chat

def _check_score_length(core: InferenceCore, prompt: int, target: int) -> None:
    cap = core.config.max_prompt_tokens
    if cap and prompt > cap:
        raise ContextOverflowError(
            f"the prompt to score is {prompt} tokens; this server allows at most {cap} prompt "
            "tokens (setting max_prompt_tokens, --max-prompt-tokens)")
    if prompt + target > core.limits.context_length:
        raise ContextOverflowError(
            f"prompt ({prompt} tokens) plus continuation ({target}) is {prompt + target} "
            f"tokens; the context length is {core.limits.context_length}")


async def score(core: InferenceCore, messages: list[Message], continuation: str,
                ref: str, caller: Caller = ANONYMOUS) -> ScoreOutcome:
    """Log-likelihood of `continuation` as the assistant's answer after `messages`."""
    check_conversation(messages)
    if not continuation:
        raise InvalidArgumentError("continuation is empty: give the assistant text to score")
    with core.limiter.admit(caller) or nullcontext(), core.admission.admit() as ticket:
        adapter = await core.resolve_for(caller, ref)
        ticket.bind(adapter)

        def tokenize() -> tuple[list[int], list[int]]:
            return (core.renderer.render(messages),
                    list(core.renderer.encode([continuation])["input_ids"][0]))

        prompt_ids, target_ids = await asyncio.to_thread(tokenize)
        _check_score_length(core, len(prompt_ids), len(target_ids))
        key, path = core.engine_adapter(adapter)
        try:
            scored = await asyncio.to_thread(core.engine.score, prompt_ids, target_ids, key, path)
        except AdapterLoadError:
            if adapter is not None:
                await core.explain_load_failure(adapter)
            raise
    return ScoreOutcome(scored.log_likelihood, scored.token_count, len(prompt_ids), adapter, ref)


class ChatCall:
    """One chat request from submission to its last event; `cancel()` is safe from any thread."""

    def __init__(self, core: InferenceCore, chat: ChatInput, deadline: float | None, *,
                 code_of: Callable[[BaseException], str]) -> None:
        self.core = core
        self.chat = chat
        self.deadline = deadline
        # The edge owns the error table; a failed call's metrics label uses its code names.
        self.code_of = code_of
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
        caller = self.chat.caller
        generated = 0
        try:
            with self.core.limiter.admit(caller) or nullcontext() as permit, \
                    self.core.admission.admit() as ticket:
                adapter = await self.core.resolve_for(caller, self.chat.adapter)
                label = adapter_label(adapter)
                ticket.bind(adapter)
                async with self.core.session(self.chat.session_id, self.chat.messages,
                                             caller) as turn:
                    async for item in self._generate(adapter, turn):
                        generated = item.completion_tokens
                        if isinstance(item, ChatResult):
                            if turn.session_id and item.finish_reason != "cancelled":
                                # Stored before the client sees the answer, so its next turn
                                # finds it.
                                await self.core.remember(turn, item.text, self._summary_cache,
                                                         caller.key_id)
                            # Complete: a client that sends its next request on reading this
                            # answer must find the place free.
                            ticket.release()
                            if permit is not None:
                                permit.charge(generated)
                                permit.release()
                            generated = 0
                            self.core.metric("observe_key_request", caller.name, "OK",
                                             item.completion_tokens)
                        yield item
        except BaseException as e:
            gone = isinstance(e, asyncio.CancelledError | GeneratorExit)
            code = "CANCELLED" if gone else self.code_of(e)
            self.core.metric("observe_request", label, code, None, None,
                             time.monotonic() - started, 0, 0)
            self.core.metric("observe_key_request", caller.name, code, generated)
            if generated:
                # Tokens of an answer that failed or was cancelled midway were still generated.
                self.core.limiter.charge(caller.key_id, generated)
            raise

    async def _generate(self, adapter: AdapterVersion | None,
                        turn: Turn) -> AsyncIterator[Delta | ChatResult]:
        messages = turn.conversation
        check_conversation(messages)
        fit, budget = await self.core.fit(messages, self.chat.sampling.max_new_tokens,
                                          self.chat.truncation, turn.cached_summary)
        self._summary_cache = fit.summary_cache
        truncation = truncation_of(fit, budget)
        key, path = self.core.engine_adapter(adapter)
        self._handle = self.core.engine.submit(GenerationRequest(
            request_id=self.request_id, prompt_ids=fit.prompt_ids, adapter=key,
            adapter_path=path, sampling=self.chat.sampling, deadline=self.deadline,
        ))
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
        try:
            async for event in self._handle:
                if isinstance(event, TokenEvent):
                    now = time.monotonic()
                    self.core.metric("observe_inter_token", label, now - last)
                    last = now
                    yield Delta(event.text_delta, event.completion_tokens)
                else:
                    self._finished = True
                    yield event
        except AdapterLoadError:  # the engine's load of it failed while the request waited
            if adapter is not None:
                await self.core.explain_load_failure(adapter)
            raise

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


# ---------------------------------------------------------------- adapter administration

@dataclass(frozen=True)
class AdapterStatus:
    """One adapter version as listed: what is on disk merged with what the engine holds."""

    name: str
    version: int
    loaded: bool
    aliases: tuple[str, ...] = ()
    compatible: bool = False
    base_fingerprint: str = ""
    created: str = ""
    rank: int = 0
    memory_bytes: int = 0
    in_flight: int = 0


def adapter_status(version: AdapterVersion | None, key: str, loaded: Any,
                   aliases: list[str]) -> AdapterStatus:
    """`version` is None for an adapter the engine holds but the disk no longer has; `loaded`
    (the engine's LoadedAdapterInfo) is None when not loaded. A loaded rank wins."""
    name, _, number = key.partition("@")
    status = AdapterStatus(name=name, version=int(number or 0), loaded=loaded is not None,
                           aliases=tuple(aliases))
    if version is not None:
        status = replace(status, compatible=version.compatible,
                         base_fingerprint=version.fingerprint, created=version.created,
                         rank=version.rank)
    if loaded is not None:
        status = replace(status, memory_bytes=loaded.memory_bytes, in_flight=loaded.in_flight,
                         rank=loaded.rank)
    return status


@dataclass(frozen=True)
class LoadOutcome:
    adapter: AdapterStatus
    load_seconds: float


@dataclass(frozen=True)
class AdapterListing:
    adapters: list[AdapterStatus]
    aliases: list[Alias]


def _key_order(key: str) -> tuple[str, int]:
    name, _, number = key.partition("@")
    return name, int(number or 0)


def _required(value: str, field_name: str) -> str:
    value = value.strip()
    if not value:
        raise InvalidArgumentError(f"{field_name} is empty: give name, name@version or an alias")
    return value


class AdapterAdmin:
    """Load, unload, list and alias adapters; disk and engine calls run in worker threads."""

    def __init__(self, core: InferenceCore) -> None:
        self.core = core

    def _status(self, key: str) -> AdapterStatus:
        registry, loaded = self.core.registry, self.core.engine.loaded_adapters()
        try:
            version = registry.resolve(key, require_compatible=False)
        except NotFoundError:
            version = None
        return adapter_status(version, key, loaded.get(key), registry.aliases_of(key))

    async def load(self, ref: str) -> LoadOutcome:
        adapter = await asyncio.to_thread(self.core.registry.resolve, _required(ref, "adapter"))
        loaded = await self.core.ensure_loaded(adapter)
        status = await asyncio.to_thread(self._status, adapter.key)
        return LoadOutcome(status, loaded.load_seconds)

    def _unload(self, ref: str) -> AdapterStatus:
        """Refuses (AdapterInUseError) while requests hold the adapter; never waits for them."""
        adapter = self.core.registry.resolve(_required(ref, "adapter"), require_compatible=False)
        loaded = self.core.engine.loaded_adapters()
        if adapter.key not in loaded:
            held = ", ".join(sorted(loaded)) or "none"
            raise NotFoundError(f"adapter {adapter.key} is not loaded; loaded: {held}")
        status = self._status(adapter.key)
        self.core.engine.unload_adapter(adapter.key)
        return replace(status, loaded=False, memory_bytes=0, in_flight=0)

    async def unload(self, ref: str) -> AdapterStatus:
        return await asyncio.to_thread(self._unload, ref)

    def _list(self) -> AdapterListing:
        registry = self.core.registry
        versions = {v.key: v for v in registry.versions()}
        loaded = self.core.engine.loaded_adapters()
        rows = [adapter_status(versions.get(key), key, loaded.get(key), registry.aliases_of(key))
                for key in sorted(set(versions) | set(loaded), key=_key_order)]
        return AdapterListing(rows, registry.aliases())

    async def list(self) -> AdapterListing:
        return await asyncio.to_thread(self._list)

    async def set_alias(self, alias: str, target: str, reason: str = "") -> tuple[Alias, str]:
        """The moved alias and its previous target ("" when new); the move joins the history."""
        return await asyncio.to_thread(
            self.core.registry.set_alias, _required(alias, "alias"), target.strip(), reason)

    async def history(self, alias: str) -> list[AliasMove]:
        return await asyncio.to_thread(self.core.registry.history, alias.strip())


# ---------------------------------------------------------------- session administration

class SessionAdmin:
    """Read and delete stored conversations: an admin key every one, another key only its own
    (others answer as absent); the store's blocking calls run in worker threads."""

    def __init__(self, core: InferenceCore, caller: Caller = ANONYMOUS) -> None:
        self.core = core
        self.caller = caller
        if core.sessions is None:
            raise FailedPreconditionError(
                "sessions are disabled on this server: start it with --sessions-db PATH")
        self.store = core.sessions

    @property
    def _owner(self) -> str | None:
        """The owner filter of the store's list and delete: None (every owner) for admins."""
        return None if self.caller.is_admin else self.caller.key_id

    async def get(self, session_id: str) -> Session:
        stored = await asyncio.to_thread(self.store.get, session_id)
        if check_owner(session_id, stored, self.caller) is None:
            raise session_not_found(session_id)
        return stored

    async def list(self, limit: int) -> list[SessionInfo]:
        return await asyncio.to_thread(self.store.list, limit, self._owner)

    async def delete(self, session_id: str) -> bool:
        """True when deleted; False for a session that does not exist and for another key's
        (the same answer, so it tells nothing)."""
        def delete() -> tuple[bool, int]:
            return self.store.delete(session_id, self._owner), self.store.count()

        deleted, count = await asyncio.to_thread(delete)
        self.core.metric("set_sessions", count)
        return deleted


# ---------------------------------------------------------------- what the servicers reach

class Runtime:
    """What the servicers reach; `core` is None until the base model has loaded. `keys` is None
    when auth is off (every caller is ANONYMOUS); `audit` is None without --audit-log."""

    def __init__(self, config: ServerConfig, keys: LiveKeys | None = None,
                 audit: Any = None) -> None:
        self.config = config
        self.core: InferenceCore | None = None
        self.keys = keys
        self.audit = audit

    def caller(self, key: str | None) -> Caller:
        """Who sent `key`: ANONYMOUS when auth is off; UnauthenticatedError for a key that is
        not (or no longer, after a reload) configured."""
        if self.keys is None:
            return ANONYMOUS
        caller = self.keys.identify(key)
        if caller is None:
            raise UnauthenticatedError("the key sent with this call is not (or no longer) valid")
        return caller

    def require(self) -> InferenceCore:
        if self.core is None:
            raise UnavailableError("the base model is still loading; retry shortly")
        return self.core
