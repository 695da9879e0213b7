"""`trainer check-data FILE --base B`: find what in a conversation file breaks or weakens training.

It renders conversations with the base's own chat template and shows the trained tokens (the
assistant mask), counts conversations, turns, tokens and cuts at max_length, and lists every
problem with its line. Errors make a conversation unusable (fit refuses the file): unreadable
records, empty turns, no assistant turn, no final answer, a system prompt mid-conversation,
nothing trained. Warnings weaken training: consecutive same-role turns, exact and near
duplicates, turns far longer than the rest, text the tokenizer does not know, control tokens
typed in content, nothing left to train after the cut, blocklisted content. `--fix OUT` writes
the file without the conversations that have problems (long turns and cuts excepted) and a
report of what it dropped and why.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

ERROR_KINDS = ("unreadable", "empty turn", "no assistant turn", "no final answer",
               "system mid-conversation", "nothing trained")
# Problems that --fix keeps: they cost a little, dropping the conversation would cost more.
KEPT_BY_FIX = ("long turn", "cut at max_length")
MAX_SHOWN_ERRORS = 10
ANSI_TRAINED, ANSI_RESET = "\x1b[42;30m", "\x1b[0m"
PLAIN_TRAINED = ("[[", "]]")


@dataclass(frozen=True)
class Problem:
    """One finding: the file line it is on, its kind and what exactly is wrong."""

    line: int
    kind: str
    detail: str

    @property
    def is_error(self) -> bool:
        return self.kind in ERROR_KINDS

    def format(self, path: Path) -> str:
        severity = "error" if self.is_error else "warning"
        return f"{path}:{self.line}: {severity}: {self.kind}: {self.detail}"


@dataclass
class Record:
    """A record as read: its line, the raw JSON and its turns as {"role", "content"} (None when
    it cannot be read as a conversation)."""

    line: int
    raw: Any
    messages: list[dict[str, str]] | None


@dataclass
class DataCheck:
    path: Path
    records: list[Record]
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.is_error]


# ------------------------------------------------------------------------------------ reading


def _lenient_turns(raw: Any) -> list[dict[str, str]]:
    """Turns without the loader's checks (this module reports those problems itself, all of
    them); formats without turn lists go through the loader."""
    from common.data import SHAREGPT_ROLES, parse_record

    if isinstance(raw, dict) and isinstance(raw.get("messages"), list):
        items, role_key, text_key, roles = raw["messages"], "role", "content", None
    elif isinstance(raw, dict) and isinstance(raw.get("conversations"), list):
        items, role_key, text_key, roles = raw["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        return [{"role": m.role, "content": m.content} for m in parse_record(raw).messages]
    turns = []
    for index, item in enumerate(items, start=1):
        if not isinstance(item, dict) or not isinstance(item.get(text_key), str):
            raise ValueError(f"turn {index}: expected an object with a string {text_key!r}")
        role = item.get(role_key)
        role = roles.get(role) if roles is not None else role
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"turn {index}: unknown role {item.get(role_key)!r}")
        turns.append({"role": role, "content": item[text_key]})
    if not turns:
        raise ValueError("no turns")
    return turns


def read_records(path: Path) -> tuple[list[Record], list[Problem]]:
    records, problems = [], []
    with path.open("rb") as handle:
        for number, raw_line in enumerate(handle, start=1):
            if not raw_line.strip():
                continue
            try:
                raw = json.loads(raw_line.decode("utf-8"))
                messages = _lenient_turns(raw)
            except UnicodeDecodeError as exc:
                problems.append(Problem(number, "unreadable", f"not valid UTF-8 ({exc.reason})"))
                records.append(Record(number, None, None))
                continue
            except json.JSONDecodeError as exc:
                problems.append(Problem(number, "unreadable",
                                        f"bad JSON: {exc.msg} (column {exc.colno})"))
                records.append(Record(number, None, None))
                continue
            except ValueError as exc:
                problems.append(Problem(number, "unreadable", str(exc)))
                records.append(Record(number, None, None))
                continue
            records.append(Record(number, raw, messages))
    return records, problems


# --------------------------------------------------------------------------------- structure


def structure_problems(record: Record) -> list[Problem]:
    messages, line = record.messages or [], record.line
    found = []
    for index, message in enumerate(messages, start=1):
        if not message["content"].strip():
            found.append(Problem(line, "empty turn",
                                 f"turn {index} ({message['role']}) is empty or whitespace"))
        if index > 1 and message["role"] == "system":
            found.append(Problem(line, "system mid-conversation",
                                 f"turn {index} is a system prompt; it may only come first"))
        if index > 1 and message["role"] == messages[index - 2]["role"]:
            found.append(Problem(line, "consecutive roles",
                                 f"turns {index - 1} and {index} are both {message['role']}"))
    if not any(m["role"] == "assistant" for m in messages):
        found.append(Problem(line, "no assistant turn", "nothing to learn from"))
    elif messages[-1]["role"] != "assistant":
        found.append(Problem(line, "no final answer",
                             f"ends on a {messages[-1]['role']} turn, not an assistant one"))
    return found


def _near_key(messages: list[dict[str, str]]) -> str:
    """Case, punctuation and spacing removed: conversations equal under it are near duplicates."""
    text = " ".join(f"{m['role']}:{m['content']}" for m in messages).lower()
    return re.sub(r"[\W_]+", " ", text).strip()


def duplicate_problems(records: list[Record]) -> list[Problem]:
    exact: dict[str, int] = {}
    near: dict[str, int] = {}
    found = []
    for record in records:
        if record.messages is None:
            continue
        exact_key = json.dumps(record.messages, sort_keys=True)
        near_key = _near_key(record.messages)
        if exact_key in exact:
            found.append(Problem(record.line, "duplicate", f"same as line {exact[exact_key]}"))
        elif near_key in near:
            found.append(Problem(record.line, "near duplicate",
                                 f"same as line {near[near_key]} but for case, punctuation or "
                                 f"spacing"))
        exact.setdefault(exact_key, record.line)
        near.setdefault(near_key, record.line)
    return found


def blocklist_problems(records: list[Record], terms: list[str]) -> list[Problem]:
    found = []
    for record in records:
        text = " ".join(m["content"] for m in record.messages or []).lower()
        hits = [term for term in terms if term in text]
        if hits:
            found.append(Problem(record.line, "blocklisted", f"contains {', '.join(hits)}"))
    return found


def read_blocklist(path: Path) -> list[str]:
    """One term a line (matched case-insensitively inside the text); # starts a comment."""
    lines = (line.split("#", 1)[0].strip().lower() for line in path.read_text().splitlines())
    return [line for line in lines if line]


# ------------------------------------------------------------------------------------ tokens


def assistant_masks(tokenizer: Any, conversations: list[list[dict[str, str]]]
                    ) -> list[tuple[list[int], list[int]]]:
    """Each conversation's ids through the chat template and its assistant mask (1 on the
    tokens the template marks with {% generation %}), the whole list in one tokenizer call."""
    if not conversations:
        return []
    out = tokenizer.apply_chat_template(
        conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return [(list(ids), list(mask))
            for ids, mask in zip(out["input_ids"], out["assistant_masks"], strict=True)]


class TokenView:
    """The base tokenizer's view of text: the assistant mask, unknown text, control tokens."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
        self.controls = sorted(s for s in specials if s)
        self._char_known: dict[str, bool] = {}

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encoded(self, texts: list[str]) -> list[tuple[list[int], str]]:
        """Each text's ids and their decoding, in one batch each way: a file's turns one call
        at a time spend most of their time in the calls (seconds for a few thousand)."""
        if not texts:
            return []
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return list(zip(ids, self.tokenizer.batch_decode(ids), strict=True))

    def unknown_text(self, text: str, ids: list[int], decoded: str) -> list[str]:
        """Characters the vocabulary does not know: mapped to the unknown token, changed by a
        round trip (`decoded` is `ids` decoded), or (byte-level and byte-fallback vocabularies)
        split into byte pieces."""
        unk = self.tokenizer.unk_token_id
        if (unk is not None and unk in ids) or decoded != text:
            return [text[:20]]
        return sorted({ch for ch in text if not ch.isascii() and not self._known(ch)})

    def _known(self, ch: str) -> bool:
        if ch not in self._char_known:
            self._char_known[ch] = len(self.ids(ch)) == 1
        return self._char_known[ch]

    def control_tokens(self, text: str) -> list[str]:
        return [token for token in self.controls if token in text]


def _long_turn_limit(lengths: list[int]) -> float:
    """Far longer than the rest: beyond Q3 + 3 IQR and 4x the median (needs a few turns)."""
    if len(lengths) < 8:
        return float("inf")
    q1, _, q3 = statistics.quantiles(lengths, n=4)
    return max(q3 + 3 * (q3 - q1), 4 * statistics.median(lengths), 32)


def token_problems(records: list[Record], view: TokenView,
                   max_length: int) -> tuple[list[Problem], dict[str, int]]:
    found: list[Problem] = []
    stats = Counter(conversations=len(records))
    turn_lengths: list[tuple[int, int, int]] = []  # (line, turn index, tokens)
    usable = [r for r in records if r.messages is not None]
    encoded = iter(view.encoded([m["content"] for r in usable for m in r.messages]))
    for record in usable:
        stats["turns"] += len(record.messages)
        stats["assistant_turns"] += sum(m["role"] == "assistant" for m in record.messages)
        for index, message in enumerate(record.messages, start=1):
            found.extend(_text_problems(record.line, index, message["content"], next(encoded),
                                        view, turn_lengths))
    # A record with structure errors may not render; its errors are already reported.
    renderable = [r for r in usable if not any(
        p.line == r.line and p.is_error for p in structure_problems(r))]
    masked = assistant_masks(view.tokenizer, [r.messages for r in renderable])
    for record, (ids, mask) in zip(renderable, masked, strict=True):
        found.extend(_mask_problems(record, ids, mask, max_length, stats))
    limit = _long_turn_limit([n for _, _, n in turn_lengths])
    found.extend(Problem(line, "long turn", f"turn {index} has {n} tokens (limit {limit:.0f})")
                 for line, index, n in turn_lengths if n > limit)
    return found, dict(stats)


def _text_problems(line: int, index: int, text: str, encoded: tuple[list[int], str],
                   view: TokenView, turn_lengths: list[tuple[int, int, int]]) -> list[Problem]:
    ids, decoded = encoded
    turn_lengths.append((line, index, len(ids)))
    found = []
    unknown = view.unknown_text(text, ids, decoded)
    if unknown:
        shown = "".join(unknown[:10])
        found.append(Problem(line, "unknown tokens",
                             f"turn {index}: the tokenizer does not know {shown!r}"))
    controls = view.control_tokens(text)
    if controls:
        found.append(Problem(line, "control tokens",
                             f"turn {index} types {', '.join(controls)} in its content"))
    return found


def _mask_problems(record: Record, ids: list[int], mask: list[int], max_length: int,
                   stats: Counter) -> list[Problem]:
    stats["tokens"] += len(ids)
    stats["trained_tokens"] += sum(mask[:max_length])
    stats["cut_at_max_length"] += len(ids) > max_length
    if not any(mask):
        return [Problem(record.line, "nothing trained", "the chat template marks no assistant "
                        "tokens (does it wrap answers in {% generation %}?)")]
    if not any(mask[:max_length]):
        return [Problem(record.line, "cut at max_length",
                        f"all {sum(mask)} trained tokens lie beyond max_length {max_length}")]
    return []


def check_file(path: Path, tokenizer: Any, max_length: int,
               blocklist: list[str] | None = None) -> DataCheck:
    """Every problem of `path`, sorted by line, and its statistics."""
    records, problems = read_records(path)
    for record in records:
        if record.messages is not None:
            problems.extend(structure_problems(record))
    problems.extend(duplicate_problems(records))
    problems.extend(blocklist_problems(records, blocklist or []))
    found, stats = token_problems(records, TokenView(tokenizer), max_length)
    problems.extend(found)
    problems.sort(key=lambda p: (p.line, p.kind))
    return DataCheck(path, records, problems, stats)


def refuse_untrainable(check: DataCheck) -> None:
    """What `trainer fit` runs first: a ValueError listing the errors with file:line."""
    errors = check.errors
    if not errors:
        return
    shown = "\n".join(f"  {p.format(check.path)}" for p in errors[:MAX_SHOWN_ERRORS])
    more = f"\n  ... and {len(errors) - MAX_SHOWN_ERRORS} more" if len(
        errors) > MAX_SHOWN_ERRORS else ""
    raise ValueError(f"{check.path}: {len(errors)} problems would train nothing or break "
                     f"training:\n{shown}{more}\nsee `trainer check-data {check.path} --base "
                     f"BASE`; --fix OUT writes a cleaned copy")


# ---------------------------------------------------------------------------------- outputs


def render_mask(view: TokenView, messages: list[dict[str, str]], color: bool) -> str:
    """The conversation as the model sees it, trained tokens highlighted."""
    (ids, mask), = assistant_masks(view.tokenizer, [messages])
    start, end = (ANSI_TRAINED, ANSI_RESET) if color else PLAIN_TRAINED
    pieces = []
    for trained, group in groupby(zip(ids, mask, strict=True), key=lambda pair: bool(pair[1])):
        text = view.tokenizer.decode([token for token, _ in group])
        pieces.append(f"{start}{text}{end}" if trained else text)
    return "".join(pieces)


def write_fixed(check: DataCheck, out: Path) -> Path:
    """The kept records (original lines) at `out`, the dropped ones with reasons beside it."""
    reasons: dict[int, list[str]] = {}
    for problem in check.problems:
        if problem.kind not in KEPT_BY_FIX:
            reasons.setdefault(problem.line, []).append(f"{problem.kind}: {problem.detail}")
    kept = [r for r in check.records if r.line not in reasons]
    out.write_text("".join(json.dumps(r.raw, ensure_ascii=False) + "\n" for r in kept))
    report = out.with_name(out.stem + ".report.json")
    report.write_text(json.dumps({
        "source": str(check.path), "kept": len(kept), "dropped": len(reasons),
        "dropped_lines": [{"line": line, "reasons": why} for line, why in sorted(reasons.items())],
    }, indent=2) + "\n")
    return report


def summary_line(check: DataCheck, max_length: int) -> str:
    s = check.stats
    return (f"{check.path}: {s.get('conversations', 0)} conversations, {s.get('turns', 0)} turns "
            f"({s.get('assistant_turns', 0)} assistant), {s.get('tokens', 0)} tokens "
            f"({s.get('trained_tokens', 0)} trained), {s.get('cut_at_max_length', 0)} cut at "
            f"max_length {max_length}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("file", type=Path, help="conversations (.jsonl: OpenAI, ShareGPT, Alpaca)")
    add("--base", required=True, help="base model directory or hub id (its tokenizer and template)")
    add("--max-length", type=int, default=None,
        help="tokens per conversation (default: the base's recommended max_length, else 1024)")
    add("--fix", type=Path, metavar="OUT", help="write the file without the problem records")
    add("--blocklist", type=Path, help="terms (one a line) whose conversations --fix drops")
    add("--show", type=int, default=1, help="conversations to render with their mask (1)")
    add("--color", choices=("auto", "always", "never"), default="auto",
        help="highlight trained tokens with colour (auto: on a terminal); else [[ ]]")


def _max_length(args: argparse.Namespace) -> int:
    from trainer.recommended import read_recommended

    if args.max_length is not None:
        return args.max_length
    return int(read_recommended(args.base).get("max_length", 1024))


def run(args: argparse.Namespace) -> int:
    """Exit 0: no errors (warnings may remain); 1: errors found; 2: the check could not run."""
    from common.modeling import load_tokenizer

    try:
        max_length = _max_length(args)
        blocklist = read_blocklist(args.blocklist) if args.blocklist else []
        tokenizer = load_tokenizer(args.base)
        check = check_file(args.file, tokenizer, max_length, blocklist)
    except (OSError, ValueError) as exc:
        print(f"trainer check-data: error: {exc}", file=sys.stderr)
        return 2
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(summary_line(check, max_length))
    for problem in check.problems:
        print(problem.format(check.path))
    print(f"{len(check.errors)} errors, {len(check.warnings)} warnings")
    view = TokenView(tokenizer)
    for record in [r for r in check.records if r.messages and not any(
            p.line == r.line and p.is_error for p in check.problems)][:args.show]:
        print(f"--- line {record.line}, trained tokens {'highlighted' if color else 'in [[ ]]'}")
        print(render_mask(view, record.messages, color))
    if args.fix:
        report = write_fixed(check, args.fix)
        print(f"wrote {args.fix} and {report}")
    return 1 if check.errors else 0
