"""What a caller reads of a request: token ids become streamed text, stop strings end it.

Runs on the reading side of a `RequestHandle` (an event loop or a caller's thread), never on the
engine thread: detokenizing and scanning for stop strings cost tens of microseconds a token,
which at 64 rows would be most of an engine step. vLLM v1 moves the same work out of its engine
core into an output processor for that reason. A stop string found here ends the stream and
the handle aborts the engine's row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.detokenize import IncrementalDetokenizer
from server.sampling import check_stop


class OutputProcessor:
    """One request's text: `on_token` per generated token, `final_text` at the end."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop = tuple(stop)
        self._scanned = 0  # text length already searched for stop strings
        self._emitted = 0  # characters already streamed
        self._final: str | None = None
        self.completion_tokens = 0

    @property
    def stopped(self) -> bool:
        """Whether a stop string ended the text (later tokens are ignored)."""
        return self._final is not None

    def on_token(self, token_id: int, *, is_eos: bool) -> str:
        """Count one generated token; return the text that became safe to stream."""
        if self._final is not None:
            return ""  # the text already ended at a stop string
        self.completion_tokens += 1
        if not is_eos:
            self._detokenizer.push(token_id)
            self._scan()
        return self._delta()

    def final_text(self) -> str:
        """All of the answer (up to a stop string), held-back bytes included."""
        if self._final is None:
            self._detokenizer.flush()
            self._scan()
        return self._final if self._final is not None else self._detokenizer.text

    def final_delta(self) -> str:
        """What `final_text` adds to what was already streamed."""
        text = self.final_text()
        delta = text[self._emitted:]
        self._emitted = len(text)
        return delta

    def _scan(self) -> None:
        text = self._detokenizer.text
        found = check_stop(text, self._stop, self._scanned)
        self._scanned = len(text)
        if found.stop_at is not None:
            self._final = text[: found.stop_at]

    def _delta(self) -> str:
        if self._final is not None:
            visible = self._final
        else:
            text = self._detokenizer.text
            visible = text[: check_stop(text, self._stop, len(text)).safe_len]
        delta = visible[self._emitted:]
        self._emitted = max(self._emitted, len(visible))
        return delta
