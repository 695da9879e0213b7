"""The model runner: persistent per-row buffers, one forward per call, and sampling.

Row r of every buffer (and of the KV cache) belongs to `rows[r]`; rows are packed, so a step's
batch is always rows [0, n). The device tensors here (each row's next token, its length, which
is also the position of its next token, and its LoRA slot) are allocated once, so the decode
step reads the same memory every time and can be replayed as a CUDA graph (`server.engine.
graphs`); on the CPU the same code runs eagerly. Prefill stays eager, in chunks of at most
`prefill_chunk_tokens` columns. LoRA routing is set here, once per forward.

A decode step is launched, then read (`launch_decode`, `collect`). Launched deferred, its rows'
tokens are chosen on the device, written where the next step reads them and copied to the host
in the background, so the next step can be launched before this one is read: on a GPU the
host's work of a step then overlaps the device's work of the next.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.cpu_threads import ThreadPlan
from server.engine.kv import PrefillWrite, SlotKVCache
from server.errors import RowFailedError
from server.lora import LoraStack
from server.request import Request
from server.sampling import pick_tokens, read_picks, sample_batch

# Decodes launched and not yet read, at most: the one being read and the one launched ahead.
IN_FLIGHT = 2
# Columns a timing decode attends over (`forward_for_timing`): a chat turn's context, roughly.
TIMING_WIDTH = 256


@dataclass(frozen=True)
class RunnerConfig:
    max_rows: int
    max_seq_len: int
    prefill_chunk_tokens: int

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_seq_len", "prefill_chunk_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass
class LaunchedDecode:
    """A decode step launched and not yet read: its rows as they were at launch, and either
    their tokens (read at launch) or their picks on the way to the host (`pick_tokens`)."""

    rows: list[Request]
    tokens: dict[Request, int | BaseException] | None = None
    picks: torch.Tensor | None = None  # (2, rows) on the host once `copied` has happened
    copied: Any = field(default=None, repr=False)  # a CUDA event; None where already there
    errors: dict[int, RowFailedError] = field(default_factory=dict)  # by row: sampling raised


def attention_kind(model: Any) -> str:
    """SDPA or eager attention: both take an explicit 4D mask (others are switched to SDPA)."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        model.set_attn_implementation("sdpa")
        impl = "sdpa"
    return impl


class ModelRunner:
    """Runs the model for the engine core; owns the KV cache and the per-row buffers."""

    def __init__(self, model: Any, stack: LoraStack, config: RunnerConfig, pad_id: int) -> None:
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.stack = stack
        self.config = config
        self.pad_id = pad_id
        self.kv = SlotKVCache.for_model(model, config.max_rows, config.max_seq_len)
        device = self.kv.device
        self.device = device
        self._attention = attention_kind(model)
        self._mask_dtype = model.get_input_embeddings().weight.dtype
        rows = config.max_rows
        self.next_ids = torch.full((rows,), pad_id, dtype=torch.long, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.slots = torch.zeros(rows, dtype=torch.long, device=device)
        self.columns = torch.arange(config.max_seq_len, device=device)
        self.rows: list[Request] = []
        self._host_lengths: list[int] = []  # mirror of `lengths[:n]`, for widths and copies
        self._routed = False  # whether the LoRA context holds rows [0, n)'s slots
        self.graphs: Any = None  # server.engine.graphs.DecodeGraphs once captured
        self.threads: ThreadPlan | None = None  # CPU threads by forward size, once timed
        self._threads_now = 0  # what this thread's forwards were last given (0: not set)
        self.forward_seconds = 0.0  # time inside model forwards, for the engine's stats
        # Page-locked host memory for deferred picks (a copy into pageable memory would wait
        # for the device), one buffer per decode in flight, taken in turn; flat, so that the
        # first 2n elements are one contiguous (2, n) destination.
        self._picks_host = [
            torch.empty(2 * rows, dtype=torch.long, pin_memory=True) for _ in range(IN_FLIGHT)
        ] if device.type == "cuda" else []
        self._launches = 0

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    # -- decode ------------------------------------------------------------------------------

    def launch_decode(self, *, deferred: bool) -> LaunchedDecode:
        """One new token for every row, from the tokens of the last step; `deferred`: chosen on
        the device and left there for `collect`, so that the next step may be launched first."""
        n = len(self.rows)
        started = time.perf_counter()
        if self.graphs is not None and self.graphs.covers(n):
            logits = self.graphs.replay(n, max(self._host_lengths) + 1)
        else:
            logits = self._decode_eager(n)
        self.forward_seconds += time.perf_counter() - started
        self.lengths[:n] += 1
        self._host_lengths = [length + 1 for length in self._host_lengths]
        rows = list(self.rows)
        if not deferred:
            return LaunchedDecode(rows, tokens=self._sample(logits, rows, first_row=0))
        picks, errors = pick_tokens(logits, [r.sampler for r in rows], out=self.next_ids[:n])
        if not self._picks_host:
            return LaunchedDecode(rows, picks=picks, errors=errors)
        host = self._picks_host[self._launches % IN_FLIGHT][: 2 * n].view(2, n)
        self._launches += 1
        host.copy_(picks, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return LaunchedDecode(rows, picks=host, copied=copied, errors=errors)

    def collect(self, launched: LaunchedDecode) -> dict[Request, int | BaseException]:
        """The tokens of a launched decode, by request (waits for deferred picks)."""
        if launched.tokens is not None:
            return launched.tokens
        if launched.copied is not None:
            launched.copied.synchronize()
        tokens = read_picks(launched.picks, launched.errors)
        return dict(zip(launched.rows, tokens, strict=True))

    def _decode_eager(self, n: int) -> torch.Tensor:
        self._use_threads(n)
        if not self._routed:
            self.stack.route([r.slot for r in self.rows], self.slots[:n])
            self._routed = True
        width = max(self._host_lengths) + 1
        return self.decode_logits(n, width)

    def decode_logits(self, n: int, width: int) -> torch.Tensor:
        """(n, V) logits of rows [0, n) fed `next_ids` at `lengths`, attending [0, width)."""
        positions = self.lengths[:n]
        allowed = self.columns[None, :width] <= positions[:, None]  # (n, width)
        self.kv.plan = self.kv.decode_write(n, positions, width)
        hidden = self.decoder(
            input_ids=self.next_ids[:n, None], position_ids=positions[:, None],
            attention_mask=self._mask(allowed[:, None, None, :]), cache=self.kv, use_cache=True,
        ).last_hidden_state  # (n, 1, hidden)
        return self.lm_head(hidden)[:, -1].float()  # (n, V)

    def forget_routing(self) -> None:
        """The LoRA context was changed behind the runner's back (a graph capture): route
        again before the next eager forward."""
        self._routed = False

    # -- prefill -----------------------------------------------------------------------------

    def prefill(self, joining: Sequence[Request]) -> dict[Request, int | BaseException]:
        """Put `joining` in rows [n, n + N) and run their prompts; their first tokens."""
        first, count = len(self.rows), len(joining)
        lengths = [len(r.spec.prompt_ids) for r in joining]
        width = max(lengths)
        # One tensor from padded lists: a copy per row would cost a torch call each.
        padded = [[*r.spec.prompt_ids, *[self.pad_id] * (width - n)]
                  for r, n in zip(joining, lengths, strict=True)]
        ids = torch.tensor(padded, dtype=torch.long, device=self.device)
        prompt_lengths = torch.tensor(lengths, dtype=torch.long, device=self.device)
        self.stack.route([r.slot for r in joining])
        self._routed = False
        self._use_threads(count * min(width, self.config.prefill_chunk_tokens))
        started = time.perf_counter()
        last_hidden = self._prefill_chunks(ids, prompt_lengths, lengths, first)
        logits = self.lm_head(last_hidden)[:, -1].float()  # (N, V)
        self.forward_seconds += time.perf_counter() - started
        rows = slice(first, first + count)
        self.lengths[rows] = prompt_lengths
        self.slots[rows] = torch.tensor([r.slot for r in joining], device=self.device)
        self.rows.extend(joining)
        self._host_lengths.extend(lengths)
        return self._sample(logits, list(joining), first_row=first)

    def _prefill_chunks(self, ids: torch.Tensor, prompt_lengths: torch.Tensor,
                        lengths: list[int], first: int) -> torch.Tensor:
        """Run the prompts' columns chunk by chunk; (N, 1, hidden) at each prompt's last token."""
        count, width = ids.shape
        chunk = self.config.prefill_chunk_tokens
        last = torch.tensor([n - 1 for n in lengths], device=self.device)
        picked = None
        for start in range(0, width, chunk):
            end = min(width, start + chunk)
            queries = self.columns[start:end]  # (T,) positions of this chunk
            keys = self.columns[:end]
            # (N, T, end): causal, and only keys inside the row's own prompt; a padding query
            # still sees key 0, so no softmax row is empty.
            allowed = (keys[None, None, :] <= queries[None, :, None]) & (
                keys[None, None, :] < prompt_lengths[:, None, None])
            self.kv.plan = PrefillWrite(first, count, start, end)
            hidden = self.decoder(
                input_ids=ids[:, start:end], position_ids=queries[None, :].expand(count, -1),
                attention_mask=self._mask(allowed[:, None]), cache=self.kv, use_cache=True,
            ).last_hidden_state  # (N, T, hidden)
            inside = (last >= start) & (last < end)
            if picked is None:
                picked = hidden.new_zeros((count, 1, hidden.shape[-1]))
            index = (last - start).clamp(0, end - start - 1)
            rows = hidden[torch.arange(count, device=self.device), index][:, None]
            picked = torch.where(inside[:, None, None], rows, picked)
        return picked

    # -- rows leaving ------------------------------------------------------------------------

    def release_finished(self) -> None:
        """Drop finished rows; the last live row moves into each hole, so rows stay packed."""
        before = len(self.rows)
        i = 0
        while i < len(self.rows):
            if not self.rows[i].status.is_finished:
                i += 1
                continue
            self._drop_finished_tail()  # finished rows at the end need no move
            last = len(self.rows) - 1
            if i < last:
                self._move_row(last, i)
                self.rows.pop()
                self._host_lengths.pop()
        if len(self.rows) < before:
            self._clear_rows(len(self.rows), before)
            self._routed = False

    def _drop_finished_tail(self) -> None:
        while self.rows and self.rows[-1].status.is_finished:
            self.rows.pop()
            self._host_lengths.pop()

    def _move_row(self, source: int, target: int) -> None:
        self.kv.move_row(source, target, self._host_lengths[source])
        for buffer in (self.next_ids, self.lengths, self.slots):
            buffer[target] = buffer[source]
        self.rows[target] = self.rows[source]
        self._host_lengths[target] = self._host_lengths[source]

    def _clear_rows(self, start: int, end: int) -> None:
        # A free row still runs in a padded CUDA graph bucket: keep its write in bounds
        # (column 0) and its LoRA on the bare base.
        self.lengths[start:end] = 0
        self.slots[start:end] = 0
        self.next_ids[start:end] = self.pad_id

    def drop_all(self) -> list[Request]:
        """Forget every row (a failed step or shutdown); return their requests."""
        rows = self.rows
        self._clear_rows(0, len(rows))
        self.rows, self._host_lengths, self._routed = [], [], False
        return rows

    # -- scoring -----------------------------------------------------------------------------

    def log_likelihood(self, prompt_ids: list[int], target_ids: list[int], slot: int) -> float:
        """Sum of log p(target | prompt) under the adapter in `slot` (no cache, one row)."""
        ids = torch.tensor([prompt_ids + target_ids], dtype=torch.long, device=self.device)
        self.stack.route([slot])
        self._routed = False
        self._use_threads(ids.shape[1])
        logits = self.model(input_ids=ids, use_cache=False).logits[0].float()  # (T, V)
        # Position t predicts token t+1: the target tokens are predicted from P-1 .. T-2.
        log_probs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
        targets = torch.tensor(target_ids, dtype=torch.long, device=self.device)
        return float(log_probs.gather(1, targets[:, None]).sum())

    # -- CPU threads -------------------------------------------------------------------------

    def forward_for_timing(self, tokens: int) -> None:
        """One forward of `tokens` tokens into free rows, its output dropped (for timing, while
        no row runs): a decode of that many rows, or past the rows there are, one row's prefill
        of that many tokens."""
        if self.rows:
            raise RuntimeError("timing forwards write into free rows; rows are running")
        if tokens <= self.config.max_rows:
            self.decode_logits(tokens, min(TIMING_WIDTH, self.config.max_seq_len))
            return
        ids = torch.full((1, tokens), self.pad_id, dtype=torch.long, device=self.device)
        self._prefill_chunks(ids, torch.tensor([tokens], device=self.device), [tokens], 0)

    def _use_threads(self, tokens: int) -> None:
        """Give this thread's next forward of `tokens` tokens the planned intra-op threads."""
        if self.threads is None:
            return
        wanted = self.threads.for_tokens(tokens)
        if wanted != self._threads_now:
            torch.set_num_threads(wanted)
            self._threads_now = wanted

    # -- helpers -----------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, rows: Sequence[Request],
                first_row: int) -> dict[Request, int | BaseException]:
        """Pick each row's token, written where the next decode reads it."""
        ids = self.next_ids[first_row : first_row + len(rows)]
        tokens = sample_batch(logits, [r.sampler for r in rows], out=ids)
        return dict(zip(rows, tokens, strict=True))

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """The 4D mask in the form the attention kernel takes (bool for SDPA, additive else)."""
        if self._attention == "sdpa":
            return allowed
        minimum = torch.finfo(self._mask_dtype).min
        zeros = torch.zeros(allowed.shape, dtype=self._mask_dtype, device=allowed.device)
        return zeros.masked_fill(~allowed, minimum)
