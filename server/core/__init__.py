"""The serving core: one chat pipeline and the calls beside it, in domain terms (no transport).

`pipeline` (a chat top to bottom), its steps `admission`, `resolve`, `history`, `prompt`,
`summarize`, `generate`; `score`, `admin`; `types` (what the edges convert), `record` (what a
call did, for the edge's metrics), `executors` (worker pools), `components` (the wiring).
"""

from server.core.admin import AdapterAdmin, SessionAdmin
from server.core.components import InferenceCore
from server.core.executors import Executors
from server.core.pipeline import ChatCall
from server.core.record import CallRecord, current_record, recording
from server.core.score import score
from server.core.types import (
    AdapterListing,
    AdapterStatus,
    ChatInput,
    ChatResult,
    Delta,
    Limits,
    LoadOutcome,
    ScoreOutcome,
    Truncation,
    check_conversation,
)

__all__ = [
    "AdapterAdmin", "AdapterListing", "AdapterStatus", "CallRecord", "ChatCall", "ChatInput",
    "ChatResult", "Delta", "Executors", "InferenceCore", "Limits", "LoadOutcome", "ScoreOutcome",
    "SessionAdmin", "Truncation", "check_conversation", "current_record", "recording", "score",
]
