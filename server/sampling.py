"""Per-request sampling settings and the per-row next-token choice for one batched step.

Owns `SamplingParams` (validated), the batched sampler (greedy rows in one argmax; the rest,
with temperature / top-k / top-p / repetition penalty and each row's seeded generator, together
on the logits' device, so that a GPU does not copy a batch's logits to the host to sample) and
the stop-sequence matcher that decides how much generated text is safe to stream.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from common.settings import is_number
from server.errors import RowFailedError


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. `max_new_tokens=0` means the engine's default.

    `ignore_eos` keeps generating past end-of-sequence tokens (benchmarks fix answer lengths
    with it); stop strings still apply.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, minimum=0)
        _check_int("top_k", self.top_k, minimum=0)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        if not is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}"
            )
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a sequence of non-empty strings, got {self.stop!r}")
        # A list given by a caller becomes a tuple so the params stay hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_default_length(self, default_max_new_tokens: int) -> SamplingParams:
        """These params with `max_new_tokens` filled in when the caller left it at 0."""
        if self.max_new_tokens:
            return self
        return replace(self, max_new_tokens=default_max_new_tokens)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class RowSampler:
    """One request's sampling state: its params, its RNG's seed and the token ids it has seen."""

    params: SamplingParams
    seed: int  # the generators' seed: the request's, or drawn at random
    seen_ids: torch.Tensor  # (n,) prompt + generated ids, for the repetition penalty
    # Fixed by the params; plain fields because the batch reads them for every row each step.
    plain_greedy: bool = field(init=False)  # greedy without a penalty: the batch's one argmax
    tracks_seen: bool = field(init=False)  # a repetition penalty needs the ids it has seen
    # One generator per device the row's logits have been on, made on first use from `seed`.
    _generators: dict[torch.device, torch.Generator] = field(
        init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.tracks_seen = self.params.repetition_penalty != 1.0
        self.plain_greedy = self.params.greedy and not self.tracks_seen

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: Sequence[int]) -> RowSampler:
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        return cls(params, seed, torch.tensor(list(prompt_ids), dtype=torch.long))

    def generator(self, device: torch.device) -> torch.Generator:
        """This row's generator on `device` (sampling runs where the logits are)."""
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
            generator.manual_seed(self.seed)
        return generator

    def observe(self, token: torch.Tensor) -> None:
        """Add the row's new token (1,), wherever it lies, to the ids the penalty sees."""
        if self.tracks_seen:
            self.seen_ids = torch.cat([self.seen_ids, token.to(self.seen_ids.device)])

    def penalize(self, scores: torch.Tensor) -> None:
        """Apply the repetition penalty to one row's scores (V,), in place."""
        penalty = self.params.repetition_penalty
        if penalty == 1.0 or self.seen_ids.numel() == 0:
            return
        if self.seen_ids.device != scores.device:
            self.seen_ids = self.seen_ids.to(scores.device)  # moved once; grows there
        # CTRL-style penalty as in transformers: shrink positive logits, grow negative ones.
        seen = scores[self.seen_ids]
        scores[self.seen_ids] = torch.where(seen > 0, seen / penalty, seen * penalty)


def choose_batch(logits: torch.Tensor, rows: Sequence[RowSampler]) -> torch.Tensor:
    """Tokens (k,) for rows that are not plain greedy, from their logits (k, V), batched on the
    logits' device: penalty, temperature, top-k, top-p, then one draw per row from its own
    generator. Nothing here waits for the device."""
    # float64: dividing by a temperature or penalty as small as a float32 allows (1e-45) must
    # stay finite, or softmax yields NaN.
    scores = logits.to(torch.float64, copy=True)  # penalized in place below
    for row, row_scores in zip(rows, scores, strict=True):
        if row.tracks_seen:
            row.penalize(row_scores)
    modes = scores.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if not sampled:
        return modes
    device = scores.device
    index = torch.tensor(sampled, device=device)
    params = [rows[i].params for i in sampled]
    temperature = scores.new_tensor([p.temperature for p in params])
    probs = _filtered_probs(scores[index] / temperature[:, None], params)
    # Inverse CDF, one uniform draw per row from its own generator: the first token whose
    # cumulative mass reaches u * total. u in (0, 1], so a token of zero mass is never hit.
    uniform = torch.cat([torch.rand(1, generator=rows[i].generator(device), device=device,
                                    dtype=probs.dtype) for i in sampled])
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    picked = torch.searchsorted(cdf, (1.0 - uniform[:, None]) * total).squeeze(1)
    picked = picked.clamp_(max=probs.shape[-1] - 1)
    usable = torch.isfinite(total[:, 0]) & (total[:, 0] > 0)
    # A degenerate distribution (or non-finite logits: that row fails) gives its mode.
    modes[index] = torch.where(usable, picked, modes[index])
    return modes


# Tokens the nucleus (top-p) is first looked for among; see `_filtered_probs`.
NUCLEUS_CANDIDATES = 1024


def _filtered_probs(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Softmax of (k, V) scores after each row's top-k and top-p filtering."""
    vocab = scores.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        kept = torch.topk(scores, max(top_k), dim=-1).values  # (k, max top_k), descending
        where = torch.tensor([max(k, 1) - 1 for k in top_k], device=scores.device)
        kth = kept.gather(1, where[:, None])
        limited = torch.tensor([k > 0 for k in top_k], device=scores.device)[:, None]
        scores = scores.masked_fill(limited & (scores < kth), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if not nucleus:
        return probs
    rows = torch.tensor(nucleus, device=scores.device)
    top_p = scores.new_tensor([params[i].top_p for i in nucleus])[:, None]
    # The nucleus nearly always lies among the most likely few hundred tokens: sorting those
    # alone is exact when their mass reaches top_p (every token past them is then outside),
    # and a full sort of a 128k vocabulary costs tens of milliseconds a row on a CPU.
    candidates = probs[rows]
    sorted_probs, order = torch.topk(candidates, min(vocab, NUCLEUS_CANDIDATES), dim=-1)
    if bool((sorted_probs.sum(dim=-1, keepdim=True) < top_p).any()):
        sorted_probs, order = torch.sort(candidates, dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    filtered = torch.zeros_like(candidates).scatter_(1, order, sorted_probs)
    probs[rows] = filtered / filtered.sum(dim=-1, keepdim=True)
    return probs


def row_argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) index and value of each row's maximum, the first one on ties (as torch.argmax,
    NaN counting as the largest). On the CPU through numpy, whose argmax is vectorized and
    answers in one pass over (B, V), where torch's CPU argmax costs several times more."""
    if (logits.device.type != "cpu" or logits.requires_grad
            or logits.dtype not in (torch.float32, torch.float64)):
        choice = torch.argmax(logits, dim=-1)
        return choice, logits.gather(1, choice[:, None])[:, 0]
    array = logits.numpy()
    choice = array.argmax(axis=1)
    return torch.from_numpy(choice), torch.from_numpy(array[np.arange(len(choice)), choice])


def sample_batch(logits: torch.Tensor, rows: Sequence[RowSampler],
                 out: torch.Tensor | None = None) -> list[int | RowFailedError]:
    """Next token for each row of `logits` (B, V), read at once; greedy rows share one argmax.
    With `out` (B,), the chosen ids are also written there (a failed row's: its argmax).

    A row whose logits are not finite (a damaged adapter) or whose sampling raises gets a
    RowFailedError in its place; the other rows are unaffected.
    """
    if logits.device.type != "cpu" or not all(row.plain_greedy for row in rows):
        return read_picks(*pick_tokens(logits, rows, out))
    # Greedy rows on the CPU, the engine's every step there: plain lists cost a few tensor
    # calls (about 50 us a step) less than the picks.
    choice, best = row_argmax(logits)
    if out is not None:
        out.copy_(choice)
    # argmax picks a NaN or +inf when a row has one, so the picked logit alone tells whether
    # the row is finite: no second pass over (B, V).
    picked, finite = choice.tolist(), [math.isfinite(value) for value in best.tolist()]
    if all(finite):
        return picked  # the common case: every row took the argmax and keeps no history
    return [token if ok else _non_finite() for token, ok in zip(picked, finite, strict=True)]


def pick_tokens(logits: torch.Tensor, rows: Sequence[RowSampler], out: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[int, RowFailedError]]:
    """Each row's next token, chosen on the logits' device and left there to be read later by
    `read_picks`: (2, B), the tokens (also written to `out`) and 1 where a row's logits were
    finite; and, by row, the errors of rows whose sampling raised. Nothing waits for the device,
    so the next step can be launched, reading `out`, before these are read."""
    choice, best = row_argmax(logits)
    errors: dict[int, RowFailedError] = {}
    special = [i for i, row in enumerate(rows) if not row.plain_greedy]
    if special:
        choice = choice.to(logits.device, copy=True)  # (numpy's memory on the CPU)
        index = torch.tensor(special, device=logits.device)
        chosen, errors = _choose_isolated(logits[index], [rows[i] for i in special], special)
        choice[index] = chosen
        for i in special:
            if i not in errors:
                rows[i].observe(choice[i : i + 1])
    if out is not None:
        out.copy_(choice)
    return torch.stack((choice, torch.isfinite(best).long())), errors


def read_picks(picks: torch.Tensor, errors: Mapping[int, RowFailedError],
               ) -> list[int | RowFailedError]:
    """Each row's token from `pick_tokens`, or its error: non-finite logits, or its sampling's."""
    picked, finite = picks.tolist()
    return [_non_finite() if not ok else errors.get(i, token)
            for i, (token, ok) in enumerate(zip(picked, finite, strict=True))]


def _choose_isolated(logits: torch.Tensor, rows: Sequence[RowSampler], where: list[int],
                     ) -> tuple[torch.Tensor, dict[int, RowFailedError]]:
    """`choose_batch` over the rows; if that raises, each row alone, so that only the row at
    fault fails (its token: its mode). Errors are keyed by `where`, the rows' batch indices."""
    try:
        return choose_batch(logits, rows), {}
    except Exception:
        chosen, errors = [], {}
        for i, (row, row_logits) in enumerate(zip(rows, logits, strict=True)):
            try:
                chosen.append(choose_batch(row_logits[None], [row]))
            except Exception as exc:  # this row alone fails; the batch goes on
                error = errors[where[i]] = RowFailedError(f"sampling this request failed: {exc}")
                error.__cause__ = exc
                chosen.append(row_logits.argmax()[None])
        return torch.cat(chosen), errors


def _non_finite() -> RowFailedError:
    return RowFailedError(
        "the model produced non-finite logits for this request (a damaged adapter?); the "
        "other requests of the batch were not affected")


@dataclass(frozen=True)
class StopCheck:
    """Where a text stops (`stop_at`, or None) and how much of it is safe to stream so far."""

    stop_at: int | None
    safe_len: int


def check_stop(text: str, stop: Sequence[str], start: int = 0) -> StopCheck:
    """Find the first stop string in `text` at or after `start` (a stop string may begin in
    text already checked but not yet streamed), and hold back any tail that could still grow
    into one."""
    if not stop:
        return StopCheck(None, len(text))
    hits = [pos for s in stop if (pos := text.find(s, max(0, start - len(s) + 1))) >= 0]
    if hits:
        return StopCheck(min(hits), min(hits))
    return StopCheck(None, len(text) - _partial_stop_len(text, stop))


def _partial_stop_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:size]):
                longest = size
                break
    return longest
