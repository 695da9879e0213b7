"""Incremental detokenization: turn a growing list of token ids into stable text deltas.

Follows TGI's `Model.decode_token`: decode a small window `ids[prefix_offset:]` and subtract the
text of `ids[prefix_offset:read_offset]`, so tokenizers whose output depends on the previous
token (leading spaces, byte-level merges) stream exactly what a full decode would give. Output
that ends in an incomplete UTF-8 sequence (decoded as U+FFFD) is held back until the bytes that
complete it arrive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

# Prompt tokens kept as left context for the first generated tokens.
_PROMPT_CONTEXT = 5


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Stable text of generated tokens; `push` returns what became safe to show."""

    def __init__(self, tokenizer: Decoder | Any, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        context = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly stable text (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation: whatever is still held back, decoded as it is."""
        pending = self._decode(self._ids[self._prefix_offset :])
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        delta = pending[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self.text += delta
        return delta

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)
