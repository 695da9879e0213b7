"""Names every part shares: the bare base model's one name, an adapter version's key and the
truncation strategies.

In code the bare base is `None` (an adapter reference that names no adapter). Wherever a string
has to stand for it (metrics labels, key scopes, OpenAI model ids, reports, messages) it is
`BASE_NAME`; on the gRPC wire an empty adapter field means it (the proto's format, mapped at the
edge). Clients and the eval suite may import this module: it depends on nothing.
"""

from __future__ import annotations

import enum

BASE_NAME = "__base__"


def adapter_name(ref: str | None) -> str:
    """What to call `ref` in a label or message: the reference itself, or BASE_NAME."""
    return ref or BASE_NAME


def version_key(name: str, version: int) -> str:
    """`name@version`: how the engine, metrics, key scopes and aliases know one adapter version."""
    return f"{name}@{version}"


class TruncationStrategy(enum.StrEnum):
    """How a conversation longer than its token budget is fitted (server/context.py).

    A StrEnum, so each member equals its string name: settings, JSON and metrics labels keep the
    plain names, and the proto enum maps onto these members once, at the gRPC edge.
    """

    ERROR = "error"
    DROP_OLDEST = "drop_oldest"
    SLIDING_WINDOW = "sliding_window"
    MIDDLE_OUT = "middle_out"
    SUMMARIZE = "summarize"


# The strategies' plain names, for membership checks and messages (one definition).
TRUNCATION_STRATEGIES: tuple[str, ...] = tuple(s.value for s in TruncationStrategy)
