"""Fakes for the core's unit tests: an engine that answers from a script, a word tokenizer, a
registry of named versions and a session store in memory (as vLLM's scheduler tests and
lm-eval's dummy model do: the logic under test is real, the model is not)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common.conversation import Message
from server.adapters import AdapterVersion
from server.config import ServerConfig
from server.context import PromptRenderer
from server.core import Executors, InferenceCore, Limits
from server.errors import NotFoundError
from server.request import FinishEvent, GenerationRequest, TokenEvent
from server.sessions import Session


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
    """A request in the fake engine: its events, and whether it was cancelled."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self) -> Handle:
        return self

    async def __anext__(self) -> Any:
        await asyncio.sleep(0)  # a step boundary, as the real engine's queue gives one
        if not self.events:
            raise StopAsyncIteration
        event = self.events.pop(0)
        if isinstance(event, BaseException):
            raise event
        return event


@dataclass
class FakeEngine:
    """Answers every request with `answer` (one token per word), or raises `error` on submit."""

    answer: str = "fine thanks"
    resident: set[str] = field(default_factory=set)
    error: BaseException | None = None
    submitted: list[GenerationRequest] = field(default_factory=list)
    handles: list[Handle] = field(default_factory=list)

    def submit(self, request: GenerationRequest) -> Handle:
        if self.error is not None:
            raise self.error
        self.submitted.append(request)
        words = self.answer.split()
        events: list[Any] = [TokenEvent(w + " ", [1], i + 1) for i, w in enumerate(words)]
        events.append(FinishEvent("stop", self.answer, len(request.prompt_ids), len(words),
                                  0.01, 0.02, 0.03))
        handle = Handle(events)
        self.handles.append(handle)
        return handle

    def is_loaded(self, key: str) -> bool:
        return key in self.resident


class FakeRegistry:
    """Named versions under no real directory; `inside=False` fails the symlink re-check."""

    def __init__(self, *keys: str) -> None:
        self.versions = {k: _version(k) for k in keys}
        self.rechecked: list[str] = []

    def lookup(self, ref: str) -> AdapterVersion | None:
        return self.versions.get(ref)

    def resolve(self, ref: str, require_compatible: bool = True) -> AdapterVersion:
        if ref not in self.versions:
            raise NotFoundError(f"adapter {ref!r} not found")
        return self.versions[ref]

    def check_still_inside(self, adapter: AdapterVersion) -> None:
        self.rechecked.append(adapter.key)


def _version(key: str) -> AdapterVersion:
    name, _, number = key.partition("@")
    return AdapterVersion(name, int(number), Path("/nowhere") / key, "", True, rank=4)


class MemorySessions:
    """A session store in a dict, with the store's methods the core calls."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def append_turn(self, session_id: str, new: list[Message], summary: dict | None = None,
                    owner: str = "") -> None:
        stored = self.sessions.setdefault(session_id, Session(session_id, [], owner=owner))
        stored.messages.extend(new)
        if summary is not None:
            self.sessions[session_id] = replace(stored, summary_cache=summary)

    def count(self) -> int:
        return len(self.sessions)


def make_core(engine: FakeEngine | None = None, registry: FakeRegistry | None = None,
              sessions: MemorySessions | None = None, **settings: Any) -> InferenceCore:
    config = ServerConfig(base="unused", adapters_root=Path("/nowhere"), **settings)
    return InferenceCore(engine=engine or FakeEngine(), renderer=PromptRenderer(WordTokenizer()),
                         registry=registry or FakeRegistry("alpha@1"), config=config,
                         limits=Limits(context_length=64, vocab_size=100), sessions=sessions,
                         executors=Executors(chat_workers=1, slow_workers=1))
