"""Context windows: exact prompt budgets and the truncation strategies that fit a conversation.

The prompt is rendered with the base's own chat template and tokenizer, and the ids returned are
exactly what the model receives, so `prompt_tokens == len(prompt_ids)` always.

Speed: a conversation can hold hundreds of messages but the window holds only the latest few, so
no strategy tokenizes the whole conversation to choose what to keep. Each message gets an
*estimate* (its content tokens plus its role's template overhead, measured once per tokenizer and
cached per content); candidates are walked from the newest message backwards until the budget is
spent, and the chosen prompt is then rendered *exactly*, correcting by a unit or two when the
estimate was off. For templates that close each message with a special token (ours), the estimate
is exact and one exact render suffices.

Strategies (`common.names.TruncationStrategy`): none drops the system prompt (the first message,
when its role is `system`) or the last user message, except that `sliding_window` may cut that
message from its start. A result always fits its budget, and fitting the result again changes
nothing more, because a conversation that already fits is returned unchanged.

Summaries (`summarize`): the oldest exchanges are replaced by one system message holding a summary
written by the caller's `summarizer`. The summary is described by a `SummaryCache` (how many
messages after the system prompt it covers, and a digest of them) that the caller stores with the
session and passes back on the next turn: while the conversation still starts with the same
messages and the summary plus the rest fits, no summarizer call is made. When a new summary is
needed, the old summary and the newly dropped exchanges are summarized together (the summarizer's
input stays small), and enough exchanges are folded in to leave `SUMMARY_HEADROOM` of the budget
free, so the next turns reuse the summary instead of summarizing again.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common.conversation import Message
from common.names import TRUNCATION_STRATEGIES
from server.errors import ContextOverflowError, InvalidArgumentError

SUMMARY_PREFIX = "Summary of the earlier conversation: "
# A summary may take at most this share of the budget (and at most SUMMARY_MAX_TOKENS) ...
SUMMARY_SHARE = 0.125
SUMMARY_MAX_TOKENS = 256
# ... and a fresh summary folds in enough exchanges to leave this share of the budget free.
SUMMARY_HEADROOM = 0.25
# Cold messages are tokenized in batches of this many (one call into the Rust tokenizer).
_CHUNK = 32
# An estimate can be off by a token or two where the template's text joins a message's (a
# leading newline merging with the one after a role marker): within this margin of the budget a
# candidate is rendered exactly rather than rejected on its estimate.
_SLACK = 2

Summarizer = Callable[[list[Message]], str]


def prompt_budget(context_length: int, max_new_tokens: int) -> int:
    """Tokens left for the prompt: the context window minus the tokens reserved for the answer."""
    if context_length <= 0:
        raise InvalidArgumentError(f"context_length must be positive, got {context_length}")
    if max_new_tokens < 0:
        raise InvalidArgumentError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    budget = context_length - max_new_tokens
    if budget <= 0:
        raise InvalidArgumentError(
            f"max_new_tokens={max_new_tokens} leaves no room for the prompt in a context window "
            f"of {context_length} tokens; ask for fewer than {context_length} new tokens")
    return budget


@dataclass(frozen=True)
class SummaryCache:
    """A summary standing for the first `covered` messages after the system prompt; `digest`
    identifies those messages, so a changed history invalidates it."""

    covered: int
    digest: str
    summary: str

    def __post_init__(self) -> None:
        if self.covered < 0:
            raise ValueError(f"covered must be >= 0, got {self.covered}")

    def to_dict(self) -> dict[str, Any]:
        return {"covered": self.covered, "digest": self.digest, "summary": self.summary}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SummaryCache | None:
        """The cache stored by `to_dict`, or None for an empty or unreadable record."""
        try:
            return cls(int(data["covered"]), str(data["digest"]), str(data["summary"]))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class FitResult:
    prompt_ids: list[int]
    messages: list[Message]
    prompt_tokens: int
    messages_dropped: int
    tokens_dropped: int
    applied: bool
    strategy: str
    summary: str = ""
    summary_cache: SummaryCache | None = None


def _digest(messages: Sequence[Message]) -> str:
    """Identity of a run of messages (lengths make the framing unambiguous); one hash call."""
    text = "".join(f"{m.role}\x00{len(m.content)}\x00{m.content}" for m in messages)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class PromptRenderer:
    """Renders prompts exactly and estimates message costs for one tokenizer.

    Build one per served model and pass it as `fit_conversation`'s tokenizer: it caches content
    token counts, so a session's history is tokenized once, not on every turn. Thread-safe: cache
    writes hold a lock, and the tokenizer is only read (no padding or truncation state is set).
    `sanitize_control_tokens` (default on, where transformers supports it) encodes control tokens
    typed inside messages as plain text, so a user cannot forge a system turn.
    """

    def __init__(self, tokenizer: Any, *, sanitize_control_tokens: bool = True,
                 cache_size: int = 65536) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.tokenizer = tokenizer
        params = inspect.signature(tokenizer.apply_chat_template).parameters
        self._render_kwargs = {"add_generation_prompt": True, "tokenize": True,
                               "return_dict": False}
        if sanitize_control_tokens and "sanitize_control_tokens" in params:
            self._render_kwargs["sanitize_control_tokens"] = True
        self._cache: dict[tuple[int, int], int] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._overheads: dict[str, int] | None = None
        self._frame = 0

    def render(self, messages: Sequence[Message]) -> list[int]:
        """The exact prompt ids: the chat template with the generation prompt, tokenized."""
        if not messages:
            raise InvalidArgumentError("the conversation has no messages")
        out = self.tokenizer.apply_chat_template([m.to_dict() for m in messages],
                                                 **self._render_kwargs)
        ids = out["input_ids"] if isinstance(out, Mapping) else out  # v5 may give a BatchEncoding
        return list(ids)

    def encode(self, texts: list[str], offsets: bool = False) -> dict[str, list[Any]]:
        """Content as the template tokenizes it: no special tokens added, control text as text."""
        kwargs = {"return_offsets_mapping": True} if offsets else {}
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True,
                              **kwargs)

    def count(self, texts: Sequence[str]) -> list[int]:
        """Token counts of `texts`, from the cache where possible; misses are encoded in one batch.

        The cache is keyed by (length, hash) of the content: a collision would only skew an
        estimate, never the exact prompt. When full, the older half is forgotten (cheaper per
        hit than a strict LRU, and a forgotten count is one batch encode away)."""
        keys = [(len(t), hash(t)) for t in texts]
        cache = self._cache
        counts = [cache.get(k) for k in keys]
        missing = [i for i, c in enumerate(counts) if c is None]
        if missing:
            fresh = self.encode([texts[i] for i in missing])["input_ids"]
            with self._lock:
                for i, ids in zip(missing, fresh, strict=True):
                    counts[i] = cache[keys[i]] = len(ids)
                if len(cache) > self._cache_size:
                    for key in list(cache)[: len(cache) // 2]:
                        del cache[key]
        return counts  # type: ignore[return-value]

    def estimate(self, messages: Sequence[Message]) -> list[int]:
        """Estimated tokens each message adds to a prompt: content plus its role's markup."""
        overheads = self._role_overheads()
        counts = self.count([m.content for m in messages])
        return [c + overheads.get(m.role, 0) for c, m in zip(counts, messages, strict=True)]

    def fixed_cost(self, messages: Sequence[Message]) -> int:
        """Estimated prompt tokens of `messages` alone: the template's frame plus each message."""
        self._role_overheads()
        return self._frame + sum(self.estimate(messages))

    def _role_overheads(self) -> dict[str, int]:
        """Template tokens around one message of each role, measured once by rendering probes:
        the prompt with the probe message minus the prompt without it, minus the content; and
        the frame (start of text, generation prompt) that every prompt carries."""
        if self._overheads is None:
            x, answer = Message("user", "x"), Message("assistant", "x")
            probes = {"system": ([], Message("system", "x"), [x]),
                      "user": ([x, answer], x, []),
                      "assistant": ([x], answer, [])}
            size = self.count(["x"])[0]
            overheads = {
                role: max(0, len(self.render([*before, probe, *after]))
                          - len(self.render([*before, *after])) - size)
                for role, (before, probe, after) in probes.items()}
            self._frame = max(0, len(self.render([x])) - size - overheads["user"])
            self._overheads = overheads
        return self._overheads


# ---------------------------------------------------------------------------------------------
# A conversation split into what is protected and what may go.


@dataclass(frozen=True)
class _Parts:
    system: tuple[Message, ...]  # () or the leading system prompt
    groups: tuple[tuple[Message, ...], ...]  # the middle, as exchanges (a user message + answers)
    tail: tuple[Message, ...]  # the last user message and whatever follows it

    @property
    def body(self) -> list[Message]:
        return [m for g in self.groups for m in g]


def _split(messages: Sequence[Message]) -> _Parts:
    msgs = list(messages)
    system = tuple(msgs[:1]) if msgs and msgs[0].role == "system" else ()
    rest = msgs[len(system):]
    users = [i for i, m in enumerate(rest) if m.role == "user"]
    cut = users[-1] if users else max(0, len(rest) - 1)
    groups: list[list[Message]] = []
    for m in rest[:cut]:
        if m.role == "user" or not groups:
            groups.append([])
        groups[-1].append(m)
    return _Parts(system, tuple(tuple(g) for g in groups), tuple(rest[cut:]))


@dataclass(frozen=True)
class _Layout:
    """Candidate prompts: head + the units not among the first `d` of `order` + tail."""

    head: tuple[Message, ...]
    units: tuple[tuple[Message, ...], ...]  # in prompt order
    order: tuple[int, ...]  # drop order, a permutation of range(len(units))
    tail: tuple[Message, ...]

    @property
    def most(self) -> int:
        return len(self.units)

    def kept(self, d: int) -> list[Message]:
        gone = set(self.order[:d])
        middle = [m for i, unit in enumerate(self.units) if i not in gone for m in unit]
        return [*self.head, *middle, *self.tail]

    def dropped(self, d: int) -> list[Message]:
        gone = set(self.order[:d])
        return [m for i, unit in enumerate(self.units) if i in gone for m in unit]


def _oldest_first(head: Sequence[Message], units: Sequence[tuple[Message, ...]],
                  tail: Sequence[Message]) -> _Layout:
    return _Layout(tuple(head), tuple(units), tuple(range(len(units))), tuple(tail))


class _UnitCosts:
    """Estimated cost of each unit, computed lazily from the newest backwards in batches."""

    def __init__(self, layout: _Layout, renderer: PromptRenderer) -> None:
        self.layout, self.renderer = layout, renderer
        self._costs: dict[int, int] = {}

    def prefetch(self, ranks: Sequence[int]) -> None:
        """Estimate the units at these drop ranks that are not known yet, in one batch."""
        ranks = [r for r in ranks if r not in self._costs]
        if not ranks:
            return
        units = [self.layout.units[self.layout.order[r]] for r in ranks]
        flat = self.renderer.estimate([m for u in units for m in u])
        pos = 0
        for r, unit in zip(ranks, units, strict=True):
            self._costs[r] = sum(flat[pos:pos + len(unit)])
            pos += len(unit)

    def of_drop_rank(self, rank: int) -> int:
        """Cost of the unit dropped `rank`-th (0-based); the walk goes downwards, so the ranks just
        below are estimated in the same batch."""
        if rank not in self._costs:
            self.prefetch(range(max(0, rank - _CHUNK + 1), rank + 1))
        return self._costs[rank]

    def sum_dropped(self, d: int) -> int:
        self.prefetch(range(d))
        return sum(self._costs[r] for r in range(d))


@dataclass(frozen=True)
class _Fit:
    d: int  # units dropped
    ids: list[int]


def _estimate_drop(costs: _UnitCosts, fixed_tokens: int, budget: int) -> int:
    """Fewest units to drop so the estimate fits, walking from all-dropped back to none."""
    d, total = costs.layout.most, fixed_tokens
    while d > 0 and total + costs.of_drop_rank(d - 1) <= budget:
        total += costs.of_drop_rank(d - 1)
        d -= 1
    return d


def _fit_units(layout: _Layout, renderer: PromptRenderer, budget: int,
               costs: _UnitCosts) -> _Fit | int:
    """The fewest units to drop so the exact prompt fits, or the exact token count of the
    smallest candidate (everything droppable dropped) when even that does not fit."""
    fixed = renderer.fixed_cost([*layout.head, *layout.tail])
    d = _estimate_drop(costs, fixed, budget)
    ids = renderer.render(layout.kept(d))
    while len(ids) > budget:  # the estimate was optimistic: drop at least the excess
        if d == layout.most:
            return len(ids)
        excess = len(ids) - budget
        while d < layout.most and excess > 0:
            excess -= max(1, costs.of_drop_rank(d))
            d += 1
        ids = renderer.render(layout.kept(d))
    while d > 0 and len(ids) + costs.of_drop_rank(d - 1) - _SLACK <= budget:  # pessimistic
        candidate = renderer.render(layout.kept(d - 1))
        if len(candidate) > budget:
            break
        d, ids = d - 1, candidate
    return _Fit(d, ids)


def _overflow(strategy: str, needed: int, budget: int, what: str) -> ContextOverflowError:
    return ContextOverflowError(
        f"{what} needs {needed} prompt tokens but the budget is {budget} tokens (the context "
        f"window minus the tokens reserved for the answer); strategy {strategy!r} cannot fit it")


def _result(fit: _Fit, layout: _Layout, costs: _UnitCosts, strategy: str,
            cache: SummaryCache | None = None) -> FitResult:
    return FitResult(
        prompt_ids=fit.ids, messages=layout.kept(fit.d), prompt_tokens=len(fit.ids),
        messages_dropped=len(layout.dropped(fit.d)), tokens_dropped=costs.sum_dropped(fit.d),
        applied=fit.d > 0, strategy=strategy, summary_cache=cache)


# ---------------------------------------------------------------------------------------------
# Strategies.


def _fit_error(parts: _Parts, renderer: PromptRenderer, budget: int) -> FitResult:
    messages = [*parts.system, *parts.body, *parts.tail]
    ids = renderer.render(messages)
    if len(ids) > budget:
        raise ContextOverflowError(
            f"the prompt is {len(ids)} tokens but the budget is {budget} tokens (the context "
            f"window minus the tokens reserved for the answer); shorten the conversation or "
            f"choose a truncation strategy such as 'drop_oldest'")
    return FitResult(ids, messages, len(ids), 0, 0, False, "error")


def _fit_layout(layout: _Layout, renderer: PromptRenderer, budget: int,
                strategy: str) -> FitResult:
    costs = _UnitCosts(layout, renderer)
    fit = _fit_units(layout, renderer, budget, costs)
    if isinstance(fit, int):
        raise _overflow(strategy, fit, budget, "the system prompt with the last user message")
    return _result(fit, layout, costs, strategy)


def _middle_out_layout(parts: _Parts) -> _Layout:
    """Drop the exchanges after the first one, oldest first, and the first one only last."""
    n = len(parts.groups)
    order = (*range(1, n), 0) if n else ()
    return _Layout(parts.system, parts.groups, order, parts.tail)


def _cut_points(renderer: PromptRenderer, text: str) -> tuple[int, list[tuple[int, int]]]:
    """The token count of `text` and its (token index, character index) cut points: token starts
    that begin a whole character, so a kept suffix never splits one (byte-level BPE splits emoji
    over several tokens, which then share one character span)."""
    try:
        enc = renderer.encode([text], offsets=True)
        ids, offsets = enc["input_ids"][0], enc["offset_mapping"][0]
    except (NotImplementedError, KeyError, TypeError):  # a tokenizer without offsets
        return _cut_points_by_decoding(renderer, text)
    points, prev_end = [], 0
    for s, (start, end) in enumerate(offsets):
        if s == 0 or start >= prev_end:
            points.append((s, start))
        prev_end = max(prev_end, end)
    return len(ids), points


def _cut_points_by_decoding(renderer: PromptRenderer,
                            text: str) -> tuple[int, list[tuple[int, int]]]:
    """Cut points found by decoding each token suffix and keeping those that are text suffixes."""
    ids = renderer.encode([text])["input_ids"][0]
    points = []
    for s in range(len(ids)):
        suffix = renderer.tokenizer.decode(ids[s:])
        if suffix and text.endswith(suffix) and "\ufffd" not in suffix:
            points.append((s, len(text) - len(suffix)))
    return len(ids), points


def _longest_fitting_suffix(render: Callable[[str], list[int]], text: str, total: int,
                            points: list[tuple[int, int]], room: int,
                            budget: int) -> tuple[int, list[int]]:
    """Index into `points` of the longest suffix whose exact prompt fits, and that prompt."""
    i = next((k for k, (s, _) in enumerate(points) if total - s <= room), len(points) - 1)
    ids = render(text[points[i][1]:])
    while len(ids) > budget and i + 1 < len(points):
        i += 1
        ids = render(text[points[i][1]:])
    while i > 0 and len(ids) + points[i][0] - points[i - 1][0] - _SLACK <= budget:
        candidate = render(text[points[i - 1][1]:])
        if len(candidate) > budget:
            break
        i, ids = i - 1, candidate
    return i, ids


def _cut_last_user(parts: _Parts, renderer: PromptRenderer, budget: int) -> FitResult:
    """System prompt + the longest suffix of the last user message that fits, cut at a token
    boundary; raises when not even its last token fits."""
    user, after = parts.tail[0], parts.tail[1:]

    def render(text: str) -> list[int]:
        return renderer.render([*parts.system, Message(user.role, text), *after])

    frame = len(render(""))
    total, points = _cut_points(renderer, user.content)
    if not points or frame >= budget:
        raise _overflow("sliding_window", frame + 1, budget,
                        "the system prompt with any part of the last user message")
    i, ids = _longest_fitting_suffix(render, user.content, total, points, budget - frame, budget)
    if len(ids) > budget:
        raise _overflow("sliding_window", len(ids), budget,
                        "the system prompt with the last token of the last user message")
    kept = user.content[points[i][1]:]
    if not (kept and user.content.endswith(kept)):  # by construction; guard the promise
        raise AssertionError("sliding_window kept text that is not a suffix of the message")
    layout = _oldest_first(parts.system, [(m,) for m in parts.body], parts.tail)
    costs = _UnitCosts(layout, renderer)
    return FitResult(
        prompt_ids=ids, messages=[*parts.system, Message(user.role, kept), *after],
        prompt_tokens=len(ids), messages_dropped=len(parts.body),
        tokens_dropped=costs.sum_dropped(layout.most) + points[i][0], applied=True,
        strategy="sliding_window")


def _fit_sliding_window(parts: _Parts, renderer: PromptRenderer, budget: int) -> FitResult:
    layout = _oldest_first(parts.system, [(m,) for m in parts.body], parts.tail)
    costs = _UnitCosts(layout, renderer)
    fit = _fit_units(layout, renderer, budget, costs)
    if isinstance(fit, _Fit):
        return _result(fit, layout, costs, "sliding_window")
    if not parts.tail or parts.tail[0].role != "user":
        raise _overflow("sliding_window", fit, budget, "the system prompt with the last message")
    return _cut_last_user(parts, renderer, budget)


def _summary_message(summary: str) -> Message:
    return Message("system", SUMMARY_PREFIX + summary)


def _cached_groups(parts: _Parts, cache: SummaryCache | None) -> int | None:
    """How many leading exchanges the cached summary covers, if it still describes them."""
    if cache is None or cache.covered == 0:
        return None
    covered = 0
    for n, group in enumerate(parts.groups, start=1):
        covered += len(group)
        if covered == cache.covered:
            return n if _digest(parts.body[:covered]) == cache.digest else None
        if covered > cache.covered:
            break
    return None


def _head_truncate(renderer: PromptRenderer, text: str, max_tokens: int) -> str:
    """The start of `text` holding at most about `max_tokens` tokens, cut between characters."""
    enc = renderer.encode([text], offsets=True)
    ids, offsets = enc["input_ids"][0], enc["offset_mapping"][0]
    return text if len(ids) <= max_tokens else text[:offsets[max_tokens][0]]


def _new_summary(parts: _Parts, renderer: PromptRenderer, budget: int, summarizer: Summarizer,
                 start: int, previous: str, at_least: int) -> tuple[int, SummaryCache]:
    """Summarize the previous summary plus exchanges [start, end) into a new cache; `end` leaves
    headroom so the next turns reuse it."""
    plain = _oldest_first(parts.system, parts.groups, parts.tail)
    costs = _UnitCosts(plain, renderer)
    reserve = min(SUMMARY_MAX_TOKENS, int(budget * SUMMARY_SHARE))
    target = budget - reserve - int(budget * SUMMARY_HEADROOM)
    fixed = renderer.fixed_cost([*plain.head, *plain.tail])
    end = max(_estimate_drop(costs, fixed, target), at_least, min(start + 1, plain.most))
    text = previous
    if end > start:
        fold = [_summary_message(previous)] if previous else []
        fold += [m for group in parts.groups[start:end] for m in group]
        text = _head_truncate(renderer, summarizer(fold).strip(), reserve)
    covered = sum(len(g) for g in parts.groups[:end])
    return end, SummaryCache(covered, _digest(parts.body[:covered]), text)


def _with_summary(parts: _Parts, renderer: PromptRenderer, budget: int,
                  groups: int, cache: SummaryCache) -> FitResult | None:
    """The prompt with `cache`'s summary standing for the first `groups` exchanges, if it fits."""
    head = (*parts.system, _summary_message(cache.summary)) if cache.summary else parts.system
    layout = _oldest_first(head, parts.groups[groups:], parts.tail)
    costs = _UnitCosts(layout, renderer)
    fit = _fit_units(layout, renderer, budget, costs)
    if not isinstance(fit, _Fit) or fit.d:
        return None
    plain = _UnitCosts(_oldest_first(parts.system, parts.groups, parts.tail), renderer)
    return FitResult(
        prompt_ids=fit.ids, messages=layout.kept(0), prompt_tokens=len(fit.ids),
        messages_dropped=cache.covered, tokens_dropped=plain.sum_dropped(groups), applied=True,
        strategy="summarize", summary=cache.summary, summary_cache=cache)


def _fit_summarize(parts: _Parts, renderer: PromptRenderer, budget: int,
                   summarizer: Summarizer, cache: SummaryCache | None) -> FitResult:
    plain = _oldest_first(parts.system, parts.groups, parts.tail)
    costs = _UnitCosts(plain, renderer)
    fit = _fit_units(plain, renderer, budget, costs)
    if isinstance(fit, int):
        raise _overflow("summarize", fit, budget, "the system prompt with the last user message")
    if fit.d == 0:
        return _result(fit, plain, costs, "summarize", cache=cache)
    groups = _cached_groups(parts, cache)
    if groups is not None and cache is not None:
        reused = _with_summary(parts, renderer, budget, groups, cache)
        if reused is not None:
            return reused
    previous = cache.summary if groups is not None and cache is not None else ""
    end, fresh = _new_summary(parts, renderer, budget, summarizer, groups or 0, previous, fit.d)
    summarized = _with_summary(parts, renderer, budget, end, fresh)
    if summarized is not None:
        return summarized
    # Not even the trimmed summary fits beside what must stay: drop without it, keep the cache.
    return _result(fit, plain, costs, "summarize", cache=fresh)


def fit_conversation(messages: Sequence[Message], tokenizer: Any, budget_tokens: int,
                     strategy: str, summarizer: Summarizer | None = None,
                     cached_summary: SummaryCache | None = None) -> FitResult:
    """Fit `messages` into `budget_tokens` prompt tokens with `strategy`.

    `tokenizer` is a PromptRenderer (preferred: it caches) or a transformers tokenizer with a chat
    template. `summarizer` and `cached_summary` serve `summarize` only; store the returned
    `summary_cache` with the session and pass it back next turn.
    """
    if strategy not in TRUNCATION_STRATEGIES:
        raise InvalidArgumentError(f"truncation strategy must be one of {TRUNCATION_STRATEGIES}, "
                                   f"got {strategy!r}")
    if budget_tokens <= 0:
        raise InvalidArgumentError(f"budget_tokens must be positive, got {budget_tokens}")
    if not messages:
        raise InvalidArgumentError("the conversation has no messages")
    if strategy == "summarize" and summarizer is None:
        raise InvalidArgumentError("strategy 'summarize' needs a summarizer")
    renderer = tokenizer if isinstance(tokenizer, PromptRenderer) else PromptRenderer(tokenizer)
    parts = _split(messages)
    if strategy == "error":
        return _fit_error(parts, renderer, budget_tokens)
    if strategy == "sliding_window":
        return _fit_sliding_window(parts, renderer, budget_tokens)
    if strategy == "summarize":
        assert summarizer is not None
        return _fit_summarize(parts, renderer, budget_tokens, summarizer, cached_summary)
    layout = (_middle_out_layout(parts) if strategy == "middle_out"
              else _oldest_first(parts.system, parts.groups, parts.tail))
    return _fit_layout(layout, renderer, budget_tokens, strategy)
