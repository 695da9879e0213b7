"""The serving core: one chat pipeline and the calls beside it, in domain terms (no transport).

`pipeline` (a chat top to bottom), its steps `admission`, `resolve`, `history`, `prompt`,
`summarize`, `generate`; `score` and `admin`, each with the results it answers; `types` (a
chat's inputs and results), `record` (what a call did, for the edge's metrics), `executors`
(worker pools), `components` (the wiring).
"""

from server.core.admin import AdapterAdmin, AdapterListing, AdapterStatus, LoadOutcome, SessionAdmin
from server.core.components import InferenceCore
from server.core.executors import Executors
from server.core.pipeline import ChatCall
from server.core.record import CallRecord, current_record, recording
from server.core.score import ScoreOutcome, score
from server.core.types import (
    ChatInput,
    ChatResult,
    Delta,
    Limits,
    Truncation,
    check_conversation,
)

__all__ = [
    "AdapterAdmin", "AdapterListing", "AdapterStatus", "CallRecord", "ChatCall", "ChatInput",
    "ChatResult", "Delta", "Executors", "InferenceCore", "Limits", "LoadOutcome", "ScoreOutcome",
    "SessionAdmin", "Truncation", "check_conversation", "current_record", "recording", "score",
]
