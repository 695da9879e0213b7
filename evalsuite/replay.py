"""Replay test conversations, turn by turn, against adapters through the asyncio client.

`reference` mode predicts each assistant turn from the test set's own history; `free` mode feeds
the adapter's own earlier answers back (multi-turn consistency). Conversations run in parallel up
to `concurrency`; the turns of one conversation always run in order. Jobs are interleaved
conversation-major so every adapter sees the same load and latencies stay comparable.

The backend is anything with the `ChatBackend` methods: `clients.aio.AsyncSwitchboardClient` in
production, a dummy model in tests. Every RPC failure is kept as a failed turn with its status code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from clients.errors import SwitchboardRpcError
from common.names import BASE_NAME
from evalsuite.cache import ResultCache, cache_key

if TYPE_CHECKING:  # the replay needs only the shape, not the file loader
    from evalsuite.testsets import EvalConversation

MODES = ("reference", "free")
TRUNCATIONS = ("", "error", "drop_oldest", "sliding_window", "middle_out", "summarize")
# Failures a later run may not repeat: a conversation with one of these is not cached.
TRANSIENT_CODES = frozenset({
    "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED",
    "INTERNAL", "UNKNOWN",
})


class ChatBackend(Protocol):
    """The few client methods the replay needs (the `LM` interface of lm-eval, for chat)."""

    async def chat(self, messages: Any, **kwargs: Any) -> Any: ...

    async def score(self, messages: Any, continuation: str, *, adapter: str = "") -> Any: ...


@dataclass(frozen=True)
class SamplingConfig:
    """How every turn is generated; all of it is part of the cache key."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    truncation: str = ""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def chat_kwargs(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ResolvedAdapter:
    """What the user asked for, the "name@version" the server resolved it to, and the wire form."""

    requested: str
    key: str
    wire: str


@dataclass
class TurnResult:
    """One predicted assistant turn; `status` is "ok", "failed" (with `error_code`) or "skipped"."""

    index: int
    reference: str | None
    prediction: str = ""
    status: str = "ok"
    error_code: str = ""
    error: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_wait_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    wall_s: float = 0.0
    truncation: dict[str, Any] = field(default_factory=dict)
    adapter_name: str = ""
    adapter_version: int = 0
    log_likelihood: float | None = None
    score_tokens: int = 0
    score_error_code: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class ConversationResult:
    """Every turn of one conversation replayed against one adapter version."""

    conversation_id: str
    conversation_hash: str
    adapter: str
    mode: str
    turns: list[TurnResult]
    facts: tuple[str, ...] = ()
    category: str = ""
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["facts"] = list(self.facts)
        del out["cached"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, cached: bool = False) -> ConversationResult:
        turns = [TurnResult(**t) for t in data["turns"]]
        return cls(
            conversation_id=data["conversation_id"], conversation_hash=data["conversation_hash"],
            adapter=data["adapter"], mode=data["mode"], turns=turns,
            facts=tuple(data.get("facts", ())), category=data.get("category", ""), cached=cached,
        )

    @property
    def cacheable(self) -> bool:
        return not any(t.error_code in TRANSIENT_CODES for t in self.turns)


async def resolve_adapter(backend: ChatBackend, requested: str) -> ResolvedAdapter:
    """Ask the server which version `requested` means, with a one-token Score call.

    The replay then names that exact version, so an alias that moves mid-run cannot mix versions.
    Raises SwitchboardRpcError when the server cannot resolve it.
    """
    if requested == BASE_NAME:
        return ResolvedAdapter(requested, BASE_NAME, "")
    probe = await backend.score([{"role": "user", "content": "ping"}], "ok", adapter=requested)
    if not probe.adapter_name:
        return ResolvedAdapter(requested, BASE_NAME, "")
    key = f"{probe.adapter_name}@{probe.adapter_version}"
    return ResolvedAdapter(requested, key, key)


def _turn_from_chat(index: int, reference: str | None, result: Any, wall_s: float) -> TurnResult:
    return TurnResult(
        index=index, reference=reference, prediction=result.text,
        finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens, queue_wait_s=result.queue_wait_s,
        ttft_s=result.ttft_s, total_s=result.total_s, wall_s=wall_s,
        truncation=dict(result.truncation or {}), adapter_name=result.adapter_name,
        adapter_version=result.adapter_version,
    )


async def _chat_turn(
    backend: ChatBackend, adapter: ResolvedAdapter, prompt: list[dict[str, str]],
    index: int, reference: str | None, sampling: SamplingConfig, timeout_s: float,
) -> TurnResult:
    start = time.perf_counter()
    try:
        result = await backend.chat(
            prompt, adapter=adapter.wire, timeout=timeout_s, **sampling.chat_kwargs()
        )
    except SwitchboardRpcError as err:
        return TurnResult(index=index, reference=reference, status="failed",
                          error_code=err.code, error=err.details,
                          wall_s=time.perf_counter() - start)
    return _turn_from_chat(index, reference, result, time.perf_counter() - start)


async def _score_turn(
    backend: ChatBackend, adapter: ResolvedAdapter, prefix: list[dict[str, str]], turn: TurnResult
) -> None:
    """Log-likelihood of the reference answer after the reference history (for perplexity)."""
    try:
        scored = await backend.score(prefix, turn.reference or "", adapter=adapter.wire)
    except SwitchboardRpcError as err:
        turn.score_error_code = err.code
        return
    turn.log_likelihood = scored.log_likelihood
    turn.score_tokens = scored.token_count


async def replay_conversation(
    backend: ChatBackend, adapter: ResolvedAdapter, conv: EvalConversation, *, mode: str,
    sampling: SamplingConfig, score: bool = True, timeout_s: float = 120.0,
) -> ConversationResult:
    """Replay every exchange in order; in free mode a failed turn skips the rest (no history)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    history: list[dict[str, str]] = []      # what the adapter is shown
    ref_history: list[dict[str, str]] = []  # the test set's own history, for Score
    turns: list[TurnResult] = []
    broken = False
    for k, ex in enumerate(conv.exchanges):
        added = [m.to_dict() for m in ex.messages]
        if broken:
            turns.append(TurnResult(index=k, reference=ex.reference, status="skipped"))
            continue
        turn = await _chat_turn(
            backend, adapter, history + added, k, ex.reference, sampling, timeout_s
        )
        if score and ex.reference is not None:
            await _score_turn(backend, adapter, ref_history + added, turn)
        turns.append(turn)
        use_reference = mode == "reference" and ex.reference is not None
        if not turn.ok and not use_reference:
            broken = True
            continue
        said = ex.reference if use_reference else turn.prediction
        history += [*added, {"role": "assistant", "content": said}]
        ref_answer = ex.reference if ex.reference is not None else turn.prediction
        ref_history += [*added, {"role": "assistant", "content": ref_answer}]
    return ConversationResult(
        conversation_id=conv.id, conversation_hash=conv.hash, adapter=adapter.key, mode=mode,
        turns=turns, facts=conv.facts, category=conv.category,
    )


@dataclass(frozen=True)
class ReplayPlan:
    """Everything one replay needs besides the backend."""

    adapters: Sequence[ResolvedAdapter]
    conversations: Sequence[EvalConversation]
    mode: str = "reference"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    concurrency: int = 4
    score: bool = True
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        keys = [a.key for a in self.adapters]
        if len(set(keys)) != len(keys):
            raise ValueError(f"adapters resolve to the same version more than once: {keys}")

    def key_settings(self) -> dict[str, Any]:
        return {**self.sampling.to_dict(), "score": self.score}


async def _run_job(
    backend: ChatBackend, plan: ReplayPlan, adapter: ResolvedAdapter, conv: EvalConversation,
    cache: ResultCache | None, gate: asyncio.Semaphore,
) -> ConversationResult:
    key = cache_key(adapter.key, conv.hash, plan.mode, plan.key_settings())
    if cache is not None and (hit := cache.get(key)) is not None:
        return ConversationResult.from_dict(hit, cached=True)
    async with gate:
        result = await replay_conversation(
            backend, adapter, conv, mode=plan.mode, sampling=plan.sampling, score=plan.score,
            timeout_s=plan.timeout_s,
        )
    if cache is not None and result.cacheable:
        cache.put(key, result.to_dict(), adapter=adapter.key, conversation=conv.hash,
                  mode=plan.mode)
    return result


async def replay_all(
    backend: ChatBackend, plan: ReplayPlan, *, cache: ResultCache | None = None,
    on_done: Callable[[ConversationResult], None] | None = None,
) -> dict[str, list[ConversationResult]]:
    """Replay every (adapter, conversation) pair; results per adapter key, in test-set order."""
    gate = asyncio.Semaphore(plan.concurrency)
    jobs = [(a, c) for c in plan.conversations for a in plan.adapters]

    async def job(adapter: ResolvedAdapter, conv: EvalConversation) -> ConversationResult:
        result = await _run_job(backend, plan, adapter, conv, cache, gate)
        if on_done is not None:
            on_done(result)
        return result

    results = await asyncio.gather(*(job(a, c) for a, c in jobs))
    out: dict[str, list[ConversationResult]] = {a.key: [] for a in plan.adapters}
    for (adapter, _), result in zip(jobs, results, strict=True):
        out[adapter.key].append(result)
    return out
