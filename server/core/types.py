"""The core's requests and answers in domain terms (no gRPC, no HTTP): what the edges convert."""

from __future__ import annotations

from dataclasses import dataclass

from common.conversation import Message
from server.adapters import AdapterVersion
from server.errors import InvalidArgumentError
from server.keys import ANONYMOUS, Caller
from server.sampling import SamplingParams


@dataclass(frozen=True)
class Limits:
    """What the loaded base allows: its context window and its vocabulary."""

    context_length: int
    vocab_size: int

    def __post_init__(self) -> None:
        if self.context_length <= 0:
            raise ValueError(f"context_length must be positive, got {self.context_length}")
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")


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


@dataclass(frozen=True)
class Delta:
    """New text of a running answer."""

    text: str
    completion_tokens: int


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
