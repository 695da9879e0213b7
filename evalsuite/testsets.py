"""Test sets for the eval suite: load conversation files and split them into replayable exchanges.

A test conversation becomes a list of `Exchange`s: the non-assistant messages a turn adds (user,
and a leading system prompt) plus the reference assistant answer, or None where the test set has
none (MT-bench questions without a `reference`). Loading goes through `common.data`, so every
format the trainer reads (OpenAI `messages` with `facts`, ShareGPT, Alpaca, MT-bench) works here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.conversation import Conversation, Message
from common.data import load_conversations


@dataclass(frozen=True)
class Exchange:
    """One turn to predict: the messages it adds to the history and the reference answer."""

    messages: tuple[Message, ...]
    reference: str | None


@dataclass(frozen=True)
class EvalConversation:
    """A conversation ready for replay; `hash` covers everything that shapes the prompts."""

    id: str
    hash: str
    exchanges: tuple[Exchange, ...]
    facts: tuple[str, ...] = ()
    category: str = ""


def _meta_references(conv: Conversation) -> list[str | None]:
    """MT-bench keeps reference answers beside the turns; the loader leaves them in `meta`."""
    ref = conv.meta.get("reference")
    if isinstance(ref, str):
        return [ref]
    if isinstance(ref, list | tuple):
        return [r if isinstance(r, str) and r else None for r in ref]
    return []


def split_exchanges(conv: Conversation) -> tuple[Exchange, ...]:
    """Cut after every user message; the assistant message that follows is the reference."""
    extra_refs = _meta_references(conv)
    exchanges: list[Exchange] = []
    pending: list[Message] = []
    for i, message in enumerate(conv.messages):
        if message.role == "assistant":
            exchanges.append(Exchange(tuple(pending), message.content))
            pending = []
            continue
        pending.append(message)
        nxt = conv.messages[i + 1] if i + 1 < len(conv.messages) else None
        if message.role == "user" and (nxt is None or nxt.role == "user"):
            # An unanswered user turn (MT-bench): the reference, if any, comes from `meta`.
            ordinal = len(exchanges)
            ref = extra_refs[ordinal] if ordinal < len(extra_refs) else None
            exchanges.append(Exchange(tuple(pending), ref))
            pending = []
    return tuple(exchanges)


def conversation_hash(exchanges: Sequence[Exchange]) -> str:
    """A stable content hash: the same prompts and references hash alike on every machine."""
    payload = [
        {"messages": [m.to_dict() for m in ex.messages], "reference": ex.reference}
        for ex in exchanges
    ]
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _unique_id(wanted: str, seen: set[str]) -> str:
    candidate, n = wanted, 1
    while candidate in seen:
        n += 1
        candidate = f"{wanted}#{n}"
    seen.add(candidate)
    return candidate


def to_test_conversation(conv: Conversation, fallback_id: str) -> EvalConversation:
    exchanges = split_exchanges(conv)
    category = conv.meta.get("category", "")
    return EvalConversation(
        id=conv.id or fallback_id,
        hash=conversation_hash(exchanges),
        exchanges=exchanges,
        facts=tuple(conv.facts),
        category=category if isinstance(category, str) else str(category),
    )


def load_testset(paths: Sequence[Path], *, limit: int = 0) -> list[EvalConversation]:
    """Load one or more test files; `limit` > 0 keeps the first `limit` conversations of each file.

    Raises `common.data.DataError` ("{path}:{line}: ...") for malformed records and ValueError
    when a file yields nothing to replay.
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    out: list[EvalConversation] = []
    seen: set[str] = set()
    for path in paths:
        conversations = load_conversations(Path(path), require_final_assistant=False)
        if limit:
            conversations = conversations[:limit]
        for i, conv in enumerate(conversations):
            test = to_test_conversation(conv, fallback_id=f"{Path(path).stem}-{i + 1}")
            if not test.exchanges:
                raise ValueError(f"{path}: conversation {test.id!r} has no user turn to replay")
            out.append(EvalConversation(
                id=_unique_id(test.id, seen), hash=test.hash, exchanges=test.exchanges,
                facts=test.facts, category=test.category,
            ))
    if not out:
        raise ValueError(f"no conversations in {', '.join(str(p) for p in paths)}")
    return out


def dataset_fingerprint(conversations: Sequence[EvalConversation]) -> str:
    """One hash for the whole set, recorded in the report so runs on different data never mix."""
    h = hashlib.sha256()
    for conv in conversations:
        h.update(conv.hash.encode("ascii"))
    return "sha256:" + h.hexdigest()
