"""The parts every call shares once the base is loaded, wired once: `InferenceCore`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.adapters import AdapterRegistry
from server.config import ServerConfig
from server.context import PromptRenderer
from server.core.admission import Admission
from server.core.executors import Executors
from server.core.history import History
from server.core.prompt import PromptFitter
from server.core.resolve import AdapterResolver
from server.core.summarize import Summaries
from server.core.types import Limits
from server.ratelimit import KeyLimiter
from server.sessions import SessionLocks


@dataclass
class InferenceCore:
    """The engine, the adapters, the sessions and the steps built over them; no transport."""

    engine: Any
    renderer: PromptRenderer
    registry: AdapterRegistry
    config: ServerConfig
    limits: Limits
    sessions: Any = None  # the session store; None when sessions are off
    session_locks: SessionLocks = field(default_factory=SessionLocks)
    executors: Executors = field(default_factory=Executors)
    admission: Admission = field(init=False)
    limiter: KeyLimiter = field(init=False)
    resolver: AdapterResolver = field(init=False)
    prompt: PromptFitter = field(init=False)
    history: History = field(init=False)
    summaries: Summaries = field(init=False)

    def __post_init__(self) -> None:
        config = self.config
        self.admission = Admission(config.max_concurrent_requests,
                                   config.max_concurrent_per_adapter)
        self.limiter = KeyLimiter()
        self.resolver = AdapterResolver(self.registry, self.engine, self.executors)
        self.prompt = PromptFitter(self.renderer, self.limits.context_length,
                                   config.max_prompt_tokens, self.executors)
        self.history = History(self.sessions, self.session_locks, self.executors)
        self.summaries = Summaries(self.resolver, self.renderer, self.engine, self.executors,
                                   self.limits.context_length, config.summarize_adapter)
