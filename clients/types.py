"""Plain result types of the Python client and their conversions from and to the wire messages.

Callers of `clients` never see protobuf: every answer is one of these dataclasses, and every
request field given as plain Python (message dicts, strategy names) is converted here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict, Unpack

from switchboard.v1 import switchboard_pb2 as pb

FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: "",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "cancelled",
}

# "" asks for the server's default strategy.
TRUNCATION_STRATEGIES = {
    "": pb.TRUNCATION_STRATEGY_UNSPECIFIED,
    "error": pb.TRUNCATION_STRATEGY_ERROR,
    "drop_oldest": pb.TRUNCATION_STRATEGY_DROP_OLDEST,
    "sliding_window": pb.TRUNCATION_STRATEGY_SLIDING_WINDOW,
    "middle_out": pb.TRUNCATION_STRATEGY_MIDDLE_OUT,
    "summarize": pb.TRUNCATION_STRATEGY_SUMMARIZE,
}
_STRATEGY_NAMES = {value: name for name, value in TRUNCATION_STRATEGIES.items()}

MessagesLike = str | Iterable[Mapping[str, str] | Any]


@dataclass(frozen=True)
class ChatResult:
    """One complete answer with its accounting."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapter_name: str
    adapter_version: int
    queue_wait_s: float
    ttft_s: float
    total_s: float
    truncation: dict[str, Any] = field(default_factory=dict)
    session_id: str = ""
    request_id: str = ""

    @property
    def adapter(self) -> str:
        """The adapter actually used as "name@version", or "" for the bare base."""
        return _ref(self.adapter_name, self.adapter_version)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_pb(cls, msg: pb.ChatResponse) -> ChatResult:
        return cls(
            text=msg.text,
            finish_reason=FINISH_REASONS.get(msg.finish_reason, ""),
            prompt_tokens=msg.usage.prompt_tokens,
            completion_tokens=msg.usage.completion_tokens,
            adapter_name=msg.adapter.name,
            adapter_version=msg.adapter.version,
            queue_wait_s=msg.timings.queue_wait_seconds,
            ttft_s=msg.timings.time_to_first_token_seconds,
            total_s=msg.timings.total_seconds,
            truncation=truncation_from_pb(msg.truncation),
            session_id=msg.session_id,
            request_id=msg.request_id,
        )


@dataclass(frozen=True)
class ChatChunk:
    """A piece of a streamed answer; the last one carries the whole answer in `final`."""

    delta: str
    completion_tokens: int
    final: ChatResult | None = None

    @classmethod
    def from_pb(cls, msg: pb.ChatChunk) -> ChatChunk:
        final = ChatResult.from_pb(msg.final) if msg.HasField("final") else None
        return cls(delta=msg.delta, completion_tokens=msg.completion_tokens, final=final)


@dataclass(frozen=True)
class ScoreResult:
    """Log-likelihood (natural log, summed) of a continuation after a conversation."""

    log_likelihood: float
    token_count: int
    prompt_tokens: int
    adapter_name: str
    adapter_version: int

    @property
    def perplexity(self) -> float:
        return math.exp(-self.log_likelihood / self.token_count) if self.token_count else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity": self.perplexity}

    @classmethod
    def from_pb(cls, msg: pb.ScoreResponse) -> ScoreResult:
        return cls(
            log_likelihood=msg.log_likelihood,
            token_count=msg.token_count,
            prompt_tokens=msg.prompt_tokens,
            adapter_name=msg.adapter.name,
            adapter_version=msg.adapter.version,
        )


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter version on disk, and whether and how it is loaded."""

    name: str
    version: int
    loaded: bool
    memory_bytes: int
    in_flight: int
    rank: int
    aliases: tuple[str, ...]
    compatible: bool
    base_fingerprint: str
    created: str

    @property
    def ref(self) -> str:
        return _ref(self.name, self.version)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "aliases": list(self.aliases)}

    @classmethod
    def from_pb(cls, msg: pb.AdapterInfo) -> AdapterInfo:
        return cls(
            name=msg.name,
            version=msg.version,
            loaded=msg.loaded,
            memory_bytes=msg.memory_bytes,
            in_flight=msg.in_flight,
            rank=msg.rank,
            aliases=tuple(msg.aliases),
            compatible=msg.compatible,
            base_fingerprint=msg.base_fingerprint,
            created=msg.created,
        )


@dataclass(frozen=True)
class LoadResult:
    """The adapter a load resolved to and how long the load took (0 when already loaded)."""

    adapter: AdapterInfo
    load_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter.to_dict(), "load_seconds": self.load_seconds}


@dataclass(frozen=True)
class AliasInfo:
    """An alias and the version it points to; `previous` is set only by `set_alias`."""

    alias: str
    name: str
    version: int
    previous: str = ""

    @property
    def target(self) -> str:
        return _ref(self.name, self.version)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "target": self.target}

    @classmethod
    def from_pb(cls, msg: pb.AliasInfo, previous: str = "") -> AliasInfo:
        return cls(alias=msg.alias, name=msg.name, version=msg.version, previous=previous)


@dataclass(frozen=True)
class AliasMove:
    """One recorded alias move; `previous` is "" when the alias was new, `moved_at` ISO UTC."""

    alias: str
    target: str
    previous: str
    reason: str
    moved_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_pb(cls, msg: pb.AliasMove) -> AliasMove:
        return cls(alias=msg.alias, target=msg.target, previous=msg.previous, reason=msg.reason,
                   moved_at=msg.moved_at)


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    message_count: int
    created_unix: float
    updated_unix: float
    owner: str = ""  # key id of the creating key ("" = no one: admin-only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_pb(cls, msg: pb.SessionInfo) -> SessionInfo:
        return cls(msg.session_id, msg.message_count, msg.created_unix, msg.updated_unix,
                   msg.owner)


@dataclass(frozen=True)
class Session:
    """A stored conversation; `messages` are OpenAI-style {"role", "content"} dicts."""

    session_id: str
    messages: list[dict[str, str]]
    summary: str
    created_unix: float
    updated_unix: float
    owner: str = ""  # key id of the creating key ("" = no one: admin-only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_pb(cls, msg: pb.Session) -> Session:
        messages = [{"role": m.role, "content": m.content} for m in msg.messages]
        return cls(msg.session_id, messages, msg.summary, msg.created_unix, msg.updated_unix,
                   msg.owner)


def _ref(name: str, version: int) -> str:
    if not name:
        return ""
    return f"{name}@{version}" if version else name


def truncation_from_pb(msg: pb.TruncationReport) -> dict[str, Any]:
    return {
        "strategy": _STRATEGY_NAMES.get(msg.strategy, ""),
        "applied": msg.applied,
        "messages_dropped": msg.messages_dropped,
        "tokens_dropped": msg.tokens_dropped,
        "budget_tokens": msg.budget_tokens,
        "summary": msg.summary,
    }


def truncation_to_pb(strategy: str) -> int:
    try:
        return TRUNCATION_STRATEGIES[strategy]
    except KeyError:
        allowed = ", ".join(repr(s) for s in TRUNCATION_STRATEGIES)
        raise ValueError(f"truncation must be one of {allowed}, got {strategy!r}") from None


def message_dicts(messages: MessagesLike) -> list[dict[str, str]]:
    """Accept a bare string (one user message), dicts, or objects with `role` and `content`;
    give OpenAI-style {"role", "content"} dicts (the HTTP transport sends them as they are)."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out = []
    for m in messages:
        if isinstance(m, Mapping):
            role, content = m.get("role"), m.get("content")
        else:
            role, content = getattr(m, "role", None), getattr(m, "content", None)
        if not isinstance(role, str) or not isinstance(content, str):
            raise TypeError(f"messages must have string 'role' and 'content', got {m!r}")
        out.append({"role": role, "content": content})
    return out


def messages_to_pb(messages: MessagesLike) -> list[pb.Message]:
    return [pb.Message(**m) for m in message_dicts(messages)]


class ChatOptions(TypedDict, total=False):
    """Keyword options of `chat` and `chat_stream` (sync and asyncio clients alike).

    Left out, each takes the server's default: greedy decoding, the server's max_new_tokens and
    truncation strategy, the bare base, no session.
    """

    adapter: str
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int | None
    stop: Sequence[str]
    ignore_eos: bool
    truncation: str
    session_id: str


def checked_stops(options: Mapping[str, Any]) -> tuple[str, ...]:
    """Refuse unknown chat options (TypeError naming them); the stop sequences, as a tuple.
    Shared by both transports (clients.http builds its JSON body from the same options)."""
    unknown = set(options) - set(ChatOptions.__annotations__)
    if unknown:
        raise TypeError(f"unknown chat option(s) {sorted(unknown)}; "
                        f"allowed: {sorted(ChatOptions.__annotations__)}")
    stop = options.get("stop", ())
    if isinstance(stop, str):
        raise TypeError(f"stop must be a sequence of strings, got the string {stop!r}")
    return tuple(stop)


def chat_request_pb(messages: MessagesLike, **options: Unpack[ChatOptions]) -> pb.ChatRequest:
    stop = checked_stops(options)
    sampling = pb.SamplingParams(
        max_new_tokens=options.get("max_new_tokens", 0),
        temperature=options.get("temperature", 0.0),
        top_p=options.get("top_p", 1.0),
        top_k=options.get("top_k", 0),
        repetition_penalty=options.get("repetition_penalty", 1.0),
        stop=list(stop),
        ignore_eos=options.get("ignore_eos", False),
    )
    seed = options.get("seed")
    if seed is not None:
        sampling.seed = seed
    return pb.ChatRequest(
        messages=messages_to_pb(messages),
        adapter=options.get("adapter", ""),
        sampling=sampling,
        truncation=truncation_to_pb(options.get("truncation", "")),
        session_id=options.get("session_id", ""),
    )


def score_request_pb(messages: MessagesLike, continuation: str, adapter: str) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        messages=messages_to_pb(messages), continuation=continuation, adapter=adapter
    )
