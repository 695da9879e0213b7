"""The one conversation type every part of Switchboard speaks: trainer, eval suite and server."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Conversation:
    """A normalised conversation; `facts` are strings a later answer must repeat (eval only)."""

    messages: tuple[Message, ...]
    id: str = ""
    facts: tuple[str, ...] = ()
    meta: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    @property
    def system(self) -> str | None:
        first = self.messages[0] if self.messages else None
        return first.content if first is not None and first.role == "system" else None

    def to_openai(self) -> list[dict[str, str]]:
        return [m.to_dict() for m in self.messages]

    def assistant_turns(self) -> list[int]:
        """Indices of the assistant messages, in order."""
        return [i for i, m in enumerate(self.messages) if m.role == "assistant"]
