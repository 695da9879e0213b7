"""Fakes for the core's unit tests: an engine that answers from a script, a word tokenizer, a
registry of named versions and a session store in memory (as vLLM's scheduler tests and
lm-eval's dummy model do: the logic under test is real, the model is not)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.conversation import Message
from server.adapter_cache import AdapterNotLoadedError, LoadedAdapter, LoadedAdapterInfo
from server.adapters import AdapterVersion, Alias, AliasMove
from server.config import ServerConfig
from server.context import PromptRenderer
from server.core import ChatCall, ChatInput, Executors, InferenceCore, Limits, recording
from server.core.record import CallRecord
from server.errors import (
    AdapterInUseError,
    AdapterLoadError,
    IncompatibleAdapterError,
    InvalidArgumentError,
    NotFoundError,
    SessionStoreError,
)
from server.keys import ANONYMOUS, Caller, KeyKind
from server.request import FinishEvent, GenerationRequest, TokenEvent
from server.sampling import SamplingParams
from server.sessions import Session, SessionInfo, validate_turn

LOADED_RANK = 8  # differs from the manifest's rank (4), so a listing shows which one won


class WordTokenizer:
    """One token per word; each message is framed by two marker tokens."""

    def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids += [1, *self._ids(m["content"]), 2]
        return [*ids, 3]

    def _ids(self, text: str) -> list[int]:
        return [10 + len(word) for word in text.split()]

    def __call__(self, texts: list[str], **kwargs: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"input_ids": [self._ids(t) for t in texts]}
        if kwargs.get("return_offsets_mapping"):
            out["offset_mapping"] = [_offsets(t) for t in texts]
        return out

    def decode(self, ids: list[int]) -> str:
        return " ".join("x" * (i - 10) for i in ids)


def _offsets(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for word in text.split():
        start = text.index(word, start)
        spans.append((start, start + len(word)))
        start += len(word)
    return spans


class Handle:
    """A request in the fake engine: its events, and whether it was cancelled. Cancelled before
    its finish, it finishes "cancelled" at its next step, as the engine's requests do."""

    def __init__(self, events: list[Any], prompt_tokens: int) -> None:
        self.events = events
        self.prompt_tokens = prompt_tokens
        self.cancelled = False
        self.finished = False
        self.given: list[TokenEvent] = []

    def cancel(self) -> None:
        self.cancelled = True
        if not self.finished:
            text = "".join(t.text_delta for t in self.given)
            self.events = [FinishEvent("cancelled", text, self.prompt_tokens, len(self.given),
                                       None, None, 0.0)]

    def __aiter__(self) -> Handle:
        return self

    async def __anext__(self) -> Any:
        await asyncio.sleep(0)  # a step boundary, as the real engine's queue gives one
        if not self.events:
            raise StopAsyncIteration
        event = self.events.pop(0)
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, TokenEvent):
            self.given.append(event)
        self.finished = isinstance(event, FinishEvent)
        return event


@dataclass(frozen=True)
class Scored:
    """What the engine's score returns (server.engine.core.ScoreResult, without importing the
    engine)."""

    log_likelihood: float
    token_count: int


@dataclass
class FakeEngine:
    """Answers every request with `answer` (one token per word), or with the events of `script`
    (an exception among them is raised there); every call raises `error` when it is set."""

    answer: str = "fine thanks"
    script: list[Any] | None = None
    error: BaseException | None = None
    loaded: dict[str, LoadedAdapterInfo] = field(default_factory=dict)
    submitted: list[GenerationRequest] = field(default_factory=list)
    handles: list[Handle] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)
    scored: list[tuple[list[int], list[int], str | None, Path | None]] = field(
        default_factory=list)

    def _fail(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, request: GenerationRequest) -> Handle:
        self._fail()
        self.submitted.append(request)
        handle = Handle(list(self.script) if self.script is not None else self._events(request),
                        len(request.prompt_ids))
        self.handles.append(handle)
        return handle

    def _events(self, request: GenerationRequest) -> list[Any]:
        words = self.answer.split()
        events: list[Any] = [TokenEvent(w + " ", [1], i + 1) for i, w in enumerate(words)]
        events.append(FinishEvent("stop", self.answer, len(request.prompt_ids), len(words),
                                  0.01, 0.02, 0.03))
        return events

    def is_loaded(self, key: str) -> bool:
        return key in self.loaded

    def load_adapter(self, key: str, path: Path) -> LoadedAdapter:
        self._fail()
        self.loads.append(key)
        self.loaded.setdefault(key, LoadedAdapterInfo(LOADED_RANK, 1024, 0, 0.0))
        return LoadedAdapter(key, LOADED_RANK, 1024, 0.25)

    def unload_adapter(self, key: str) -> None:
        info = self.loaded.get(key)
        if info is None:
            raise AdapterNotLoadedError(f"adapter {key!r} is not loaded")
        if info.in_flight:
            raise AdapterInUseError(f"adapter {key!r} is in use by {info.in_flight} request(s); "
                                    "retry when they end")
        del self.loaded[key]

    def loaded_adapters(self) -> dict[str, LoadedAdapterInfo]:
        return dict(self.loaded)

    def score(self, prompt_ids: list[int], target_ids: list[int], adapter: str | None,
              adapter_path: Path | None = None) -> Scored:
        self._fail()
        self.scored.append((list(prompt_ids), list(target_ids), adapter, adapter_path))
        return Scored(-0.5 * len(target_ids), len(target_ids))


class FakeRegistry:
    """Versions named by key under `root` (no files are read). `lookup` answers from the last
    scan, `resolve` rescans once for an unknown reference (picking up `disk`); a reference is
    name@version, a name (its newest version) or an alias. Keys in `outside` fail the symlink
    re-check; `incompatible` ones were trained on another base; `broken` ones are on disk but
    cannot be served (the scan found them unreadable)."""

    def __init__(self, *keys: str, root: Path = Path("/nowhere"),
                 incompatible: tuple[str, ...] = (), outside: tuple[str, ...] = (),
                 broken: tuple[str, ...] = ()) -> None:
        self.root = root
        self.disk = {k: _version(root, k, k not in incompatible) for k in (*keys, *incompatible)}
        self.seen = dict(self.disk)  # what the last scan found
        self.alias_table: dict[str, str] = {}
        self.moves: list[AliasMove] = []
        self.outside = set(outside)
        self.broken = set(broken)
        self.rechecked: list[str] = []
        self.scans = 0

    def _find(self, ref: str) -> AdapterVersion | None:
        if "@" in ref:
            return self.seen.get(ref)
        target = self.alias_table.get(ref)
        if target is not None:
            return self.seen.get(target)
        named = [v for v in self.seen.values() if v.name == ref]
        return max(named, key=lambda v: v.version) if named else None

    def _check(self, found: AdapterVersion, require_compatible: bool) -> AdapterVersion:
        if require_compatible and not found.compatible:
            raise IncompatibleAdapterError(f"adapter {found.key} was trained on another base")
        return found

    def scan(self) -> None:
        self.scans += 1
        self.seen = dict(self.disk)

    def lookup(self, ref: str) -> AdapterVersion | None:
        found = self._find(ref)
        return self._check(found, True) if found is not None else None

    def resolve(self, ref: str, require_compatible: bool = True) -> AdapterVersion:
        found = self._find(ref)
        if found is None:
            self.scan()
            found = self._find(ref)
        if found is None and ref in self.broken:
            raise AdapterLoadError(f"adapter {ref!r} cannot be served: its weights are unreadable")
        if found is None:
            raise NotFoundError(f"adapter {ref!r} not found")
        return self._check(found, require_compatible)

    def versions(self) -> list[AdapterVersion]:
        self.scan()
        return sorted(self.seen.values(), key=lambda v: (v.name, v.version))

    def check_still_inside(self, adapter: AdapterVersion) -> None:
        self.rechecked.append(adapter.key)
        if adapter.key in self.outside:
            raise AdapterLoadError(f"{adapter.path}: adapter_model.safetensors now points "
                                   f"outside the adapters root {self.root}; it is not read")

    def aliases(self) -> list[Alias]:
        return [_alias(a, t) for a, t in sorted(self.alias_table.items())]

    def aliases_of(self, key: str) -> list[str]:
        return sorted(a for a, t in self.alias_table.items() if t == key)

    def set_alias(self, alias: str, target: str, reason: str = "") -> tuple[Alias, str]:
        if not target:
            raise InvalidArgumentError("target is empty: give name@version (or a name/alias)")
        key = self.resolve(target).key
        previous = self.alias_table.get(alias, "")
        self.alias_table[alias] = key
        self.moves.append(AliasMove(alias, key, previous, reason, "2024-01-01T00:00:00.000+00:00"))
        return _alias(alias, key), previous

    def history(self, alias: str = "") -> list[AliasMove]:
        return [m for m in self.moves if not alias or m.alias == alias]


def _version(root: Path, key: str, compatible: bool = True) -> AdapterVersion:
    name, _, number = key.partition("@")
    return AdapterVersion(name, int(number), root / name / number, "fp", compatible, rank=4)


def _alias(alias: str, key: str) -> Alias:
    name, _, number = key.partition("@")
    return Alias(alias, name, int(number))


class MemorySessions:
    """A session store in a dict, with the store's methods the core calls; the most recently
    written session is last. `count_error`, when set, is what `count()` raises."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}
        self.count_error: SessionStoreError | None = None

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def append_turn(self, session_id: str, new: list[Message], summary: dict | None = None,
                    owner: str = "") -> None:
        validate_turn(session_id, new)
        old = self.sessions.pop(session_id, None) or Session(session_id, [], owner=owner)
        cache = summary if summary is not None else old.summary_cache
        self.sessions[session_id] = Session(session_id, [*old.messages, *new], cache,
                                            turns=old.turns + 1, owner=old.owner)

    def list(self, limit: int = 100, owner: str | None = None) -> list[SessionInfo]:
        mine = [s for s in reversed(self.sessions.values()) if owner is None or s.owner == owner]
        return [SessionInfo(s.id, 0.0, 0.0, s.turns, len(s.messages), s.owner)
                for s in mine[:limit]]

    def delete(self, session_id: str, owner: str | None = None) -> bool:
        stored = self.sessions.get(session_id)
        if stored is None or (owner is not None and stored.owner != owner):
            return False
        del self.sessions[session_id]
        return True

    def count(self) -> int:
        if self.count_error is not None:
            raise self.count_error
        return len(self.sessions)


def api_key(name: str, *adapters: str) -> Caller:
    """An API key named `name` (its id "k-<name>"), scoped to `adapters` when given."""
    return Caller(f"k-{name}", name, KeyKind.API, adapters)


def admin_key(name: str) -> Caller:
    return Caller(f"k-{name}", name, KeyKind.ADMIN)


def make_core(engine: FakeEngine | None = None, registry: FakeRegistry | None = None,
              sessions: MemorySessions | None = None, **settings: Any) -> InferenceCore:
    config = ServerConfig(base="unused", adapters_root=Path("/nowhere"), **settings)
    return InferenceCore(engine=engine or FakeEngine(), renderer=PromptRenderer(WordTokenizer()),
                         registry=registry or FakeRegistry("alpha@1"), config=config,
                         limits=Limits(context_length=64, vocab_size=100), sessions=sessions,
                         executors=Executors(chat_workers=1, slow_workers=1))


def chat_input(text: str = "hello there", adapter: str = "", session_id: str = "",
               truncation: str = "drop_oldest", max_new: int = 4,
               caller: Caller = ANONYMOUS) -> ChatInput:
    return ChatInput(messages=(Message("user", text),), adapter=adapter,
                     sampling=SamplingParams(max_new_tokens=max_new), truncation=truncation,
                     session_id=session_id, caller=caller)


def run_chat(call: ChatCall) -> tuple[list[Any], CallRecord]:
    """Every item the call yields, and its record."""
    async def collect() -> list[Any]:
        return [item async for item in call.events()]

    record = CallRecord()
    with recording(record):
        items = asyncio.run(collect())
    return items, record
