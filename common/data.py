"""The one conversation loader for the trainer and the eval suite.

`load_conversations(path)` reads a JSONL file (one record a line) or a .json file holding a list of
records, in any of these formats, and normalises every record to `common.conversation.Conversation`:
- OpenAI:   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
- ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system"|"user"|"assistant", "value": "..."}]}
- Alpaca:   {"instruction": "...", "input": "..." (optional), "output": "...", "system": optional}
- MT-bench: {"question_id": 81, "category": "...", "turns": ["...", ...], "reference": [...]}
  (user turns only, so it needs require_final_assistant=False; references go to meta["reference"])
Any record may carry "id", "facts" (strings a later answer must repeat) and "meta" (an object).

A malformed record raises `DataError` whose message is "{path}:{line}: {what is wrong}"; in a .json
list the "line" is the record's 1-based index, and the message says so. Pure Python: no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.conversation import ROLES, Conversation, Message

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
FORMAT_KEYS = ("messages (OpenAI)", "conversations (ShareGPT)", "instruction + output (Alpaca)",
               "question_id + turns (MT-bench)")


class DataError(ValueError):
    """A malformed data file; `path` and `line` say where, str(error) says what."""

    def __init__(self, path: Path | str, line: int, what: str) -> None:
        self.path = Path(path)
        self.line = line
        self.what = what
        super().__init__(f"{path}:{line}: {what}")


class _RecordError(ValueError):
    """Raised inside record parsing; turned into a DataError where the location is known."""


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(path, number, f"line is not valid UTF-8 ({exc.reason})") from exc
            if not text.strip():
                continue
            try:
                yield number, json.loads(text), ""
            except json.JSONDecodeError as exc:
                raise DataError(path, number, f"bad JSON: {exc.msg} (column {exc.colno})") from exc


def _iter_json_list(path: Path) -> Iterator[tuple[int, Any, str]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, f"bad JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(records, list):
        raise DataError(path, 1, f"a .json file must hold a list of records, got "
                                 f"{type(records).__name__}")
    for index, record in enumerate(records):
        yield index + 1, record, f"record {index + 1} of the JSON list: "


def _text(value: Any, what: str) -> str:
    """A non-empty string, or a _RecordError naming `what`."""
    if not isinstance(value, str):
        raise _RecordError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _RecordError(f"{what} is empty")
    return value


def _message_list(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _RecordError(f"'{key}' must be a non-empty list of messages")
    for index, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise _RecordError(f"{key}[{index}] must be an object, got {type(item).__name__}")
    return value


def _openai(record: dict) -> list[Message]:
    messages = []
    for index, item in enumerate(_message_list(record["messages"], "messages"), start=1):
        role = item.get("role")
        if role not in ROLES:
            raise _RecordError(f"message {index}: unknown role {role!r} "
                               f"(allowed: {', '.join(ROLES)})")
        messages.append(Message(role, _text(item.get("content"), f"message {index} content")))
    return messages


def _sharegpt(record: dict) -> list[Message]:
    messages = []
    for index, item in enumerate(_message_list(record["conversations"], "conversations"), 1):
        speaker = item.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise _RecordError(f"turn {index}: unknown role {speaker!r} "
                               f"(allowed: {', '.join(SHAREGPT_ROLES)})")
        text = _text(item.get("value"), f"turn {index} value")
        messages.append(Message(SHAREGPT_ROLES[speaker], text))
    return messages


def _alpaca(record: dict) -> list[Message]:
    prompt = _text(record["instruction"], "instruction")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise _RecordError(f"input must be a string, got {type(extra).__name__}")
    if extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    messages = [Message("user", prompt), Message("assistant", _text(record["output"], "output"))]
    if record.get("system"):
        messages.insert(0, Message("system", _text(record["system"], "system")))
    return messages


def _mt_bench(record: dict, require_final_assistant: bool) -> list[Message]:
    if require_final_assistant:
        raise _RecordError("MT-bench records hold user turns only; load them with "
                           "require_final_assistant=False")
    turns = record["turns"]
    if not isinstance(turns, list) or not turns:
        raise _RecordError("'turns' must be a non-empty list of strings")
    return [Message("user", _text(turn, f"turn {i}")) for i, turn in enumerate(turns, start=1)]


def _detect(record: dict) -> str:
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "question_id" in record and "turns" in record:
        return "mt_bench"
    keys = ", ".join(sorted(record)) or "none"
    raise _RecordError(f"unknown record format (keys: {keys}); expected one of "
                       f"{'; '.join(FORMAT_KEYS)}")


def _check_order(messages: list[Message], require_final_assistant: bool) -> None:
    for index, message in enumerate(messages[1:], start=2):
        if message.role == "system":
            raise _RecordError(f"message {index}: a system message may only come first")
    if not require_final_assistant:
        return
    if not any(m.role == "assistant" for m in messages):
        raise _RecordError("no assistant turn; training needs at least one")
    if messages[-1].role != "assistant":
        raise _RecordError(f"conversation ends on a {messages[-1].role} turn; training needs "
                           f"it to end on an assistant turn")


def _facts(record: dict) -> tuple[str, ...]:
    facts = record.get("facts", [])
    if not isinstance(facts, list) or not all(isinstance(f, str) and f for f in facts):
        raise _RecordError("'facts' must be a list of non-empty strings")
    return tuple(facts)


def _meta(record: dict, fmt: str) -> dict[str, object]:
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise _RecordError(f"'meta' must be an object, got {type(meta).__name__}")
    meta = {"format": fmt, **meta}
    if fmt == "mt_bench":
        meta["category"] = record.get("category", "")
        if "reference" in record:
            meta["reference"] = record["reference"]
    return meta


def parse_record(record: Any, *, require_final_assistant: bool = True,
                 default_id: str = "") -> Conversation:
    """One record (any accepted format) as a Conversation; raises ValueError on a bad record."""
    if not isinstance(record, dict):
        raise _RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    fmt = _detect(record)
    if fmt == "mt_bench":
        messages = _mt_bench(record, require_final_assistant)
    else:
        messages = {"openai": _openai, "sharegpt": _sharegpt, "alpaca": _alpaca}[fmt](record)
    _check_order(messages, require_final_assistant)
    raw_id = record.get("id", record.get("question_id", default_id))
    return Conversation(messages=tuple(messages), id=str(raw_id), facts=_facts(record),
                        meta=_meta(record, fmt))


def load_conversations(path: Path | str, *,
                       require_final_assistant: bool = True) -> list[Conversation]:
    """Every record of `path` (JSONL, or .json holding a list) as Conversations, in file order."""
    path = Path(path)
    records = _iter_json_list(path) if path.suffix == ".json" else _iter_jsonl(path)
    conversations = []
    for line, record, where in records:
        try:
            conversations.append(parse_record(
                record, require_final_assistant=require_final_assistant,
                default_id=f"{path.stem}-{line}"))
        except _RecordError as exc:
            raise DataError(path, line, f"{where}{exc}") from None
    return conversations


@dataclass(frozen=True)
class DataSummary:
    """Counts the trainer prints; token counts are None without a tokenizer."""

    conversations: int
    messages: int
    user_turns: int
    assistant_turns: int
    tokens: int | None = None
    max_tokens: int | None = None

    def __str__(self) -> str:
        text = (f"{self.conversations} conversations, {self.messages} messages "
                f"({self.user_turns} user, {self.assistant_turns} assistant turns)")
        if self.tokens is not None:
            mean = self.tokens / max(1, self.conversations)
            text += f", {self.tokens} tokens (mean {mean:.0f}, max {self.max_tokens})"
        return text


def _token_counts(convs: list[Conversation], tokenizer: Any) -> list[int]:
    """Tokens per conversation as the model sees it: rendered with the chat template if any."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([c.to_openai() for c in convs], tokenize=True,
                                                 return_dict=False)
        return [len(ids) for ids in rendered]
    return [sum(len(tokenizer.encode(m.content)) for m in c.messages) for c in convs]


def summarize(convs: list[Conversation], tokenizer: Any = None) -> DataSummary:
    roles = [m.role for c in convs for m in c.messages]
    tokens = max_tokens = None
    if tokenizer is not None and convs:
        counts = _token_counts(convs, tokenizer)
        tokens, max_tokens = sum(counts), max(counts)
    elif tokenizer is not None:
        tokens = max_tokens = 0
    return DataSummary(conversations=len(convs), messages=len(roles),
                       user_turns=roles.count("user"), assistant_turns=roles.count("assistant"),
                       tokens=tokens, max_tokens=max_tokens)
