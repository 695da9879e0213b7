"""The engine: one thread owns the model and runs continuous mixed-adapter batching.

Every loop iteration is one fixed sequence (vLLM's `EngineCore.step`): schedule, execute
(prefill the admitted rows together; decode one token for every running row), apply the aborts
that arrived meanwhile, update request state, emit events. When there is no work the thread
blocks on its input queue. Other threads talk to it only through thread-safe methods:
`submit`, `load_adapter`, `unload_adapter`, `loaded_adapters`, `score`, `shutdown`.

The running batch keeps its KV cache left-padded to a common length (TGI CausalLM style) with
room to grow in place: a decode step writes one column instead of copying the cache, new rows
are concatenated by left-padding, finished rows are dropped with an index_select that also
trims all-padding leading columns. Rows route to their adapters through `server.lora`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from server.adapter_cache import (
    AdapterCache,
    AdapterNotLoadedError,
    AdapterWeights,
    LoadedAdapter,
    LoadedAdapterInfo,
    read_adapter,
)
from server.detokenize import IncrementalDetokenizer
from server.errors import InvalidArgumentError, UnavailableError
from server.lora import BASE_SLOT, LoraStack
from server.request import (
    FinishEvent,
    GenerationRequest,
    Request,
    RequestHandle,
    RequestStatus,
    TokenEvent,
)
from server.sampling import RowSampler, SamplingParams, sample_batch
from server.scheduler import RequestOutput, Scheduler, SchedulerConfig, StepPlan

__all__ = [
    "AdapterNotLoadedError", "Engine", "EngineConfig", "FinishEvent", "GenerationRequest",
    "LoadedAdapter", "LoadedAdapterInfo", "RequestHandle", "SamplingParams", "ScoreResult",
    "TokenEvent",
]

log = logging.getLogger(__name__)

_KV_GROWTH = 64  # columns added to a batch's KV capacity at a time (amortizes reallocation)


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16
    max_queue: int = 256
    max_loaded_adapters: int = 8
    max_lora_rank: int = 64
    default_max_new_tokens: int = 128
    max_prefill_tokens: int = 4096
    # Largest adapter_model.safetensors read; larger ones are refused before reading.
    max_adapter_bytes: int = 1024 * 1024 * 1024
    # Bytes all loaded adapters may take together (their LoRA slot slices); 0 = no budget.
    adapter_memory_budget_bytes: int = 0

    def __post_init__(self) -> None:
        for name in (
            "max_batch", "max_queue", "max_loaded_adapters", "max_lora_rank",
            "default_max_new_tokens", "max_prefill_tokens", "max_adapter_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        budget = self.adapter_memory_budget_bytes
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise ValueError(
                f"adapter_memory_budget_bytes must be an integer >= 0 (0 = none), got {budget!r}")


@dataclass(frozen=True)
class ScoreResult:
    log_likelihood: float
    token_count: int


# -- KV cache -------------------------------------------------------------------------------


class _KVLayer(CacheLayerMixin):
    """One layer's keys and values (B, H, capacity, D), valid up to `length`, written in place."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.keys, self.values, self.length = keys, values, length
        self.is_initialized = True

    @classmethod
    def empty(cls, like: torch.Tensor, batch: int, capacity: int) -> _KVLayer:
        """Zeros shaped like `like` (B', H, T, D) but with `batch` rows and `capacity` columns."""
        shape = (batch, like.shape[1], capacity, like.shape[3])
        return cls(like.new_zeros(shape), like.new_zeros(shape), 0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("a _KVLayer is created initialized")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self.keys.shape[2]:
            self.resize(end + _KV_GROWTH)
        self.keys[:, :, self.length : end] = key_states  # (B, H, T, D) into the free columns
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def resize(self, capacity: int) -> None:
        keys = self.keys.new_zeros((*self.keys.shape[:2], capacity, self.keys.shape[3]))
        values = torch.zeros_like(keys)
        keys[:, :, : self.length] = self.keys[:, :, : self.length]
        values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1


def _left_pad_into(dst: torch.Tensor, src: torch.Tensor, rows: slice, length: int) -> None:
    """Copy `src` (b, ..., L) right-aligned into columns [length - L, length) of `dst` rows.

    Works for KV (b, H, L, D: the column dim is 2) and masks (b, L: dim 1) alike."""
    dim = 2 if src.dim() == 4 else 1
    width = src.shape[dim]
    target = dst[rows].narrow(dim, length - width, width)
    target.copy_(src)


# -- the running batch -----------------------------------------------------------------------


class _Batch:
    """Rows decoding together: their KV cache, padding mask, next positions and next tokens.

    Column j of the cache is the same step for every row; a row's prompt is right-aligned,
    so its padding is on the left and masked out.
    """

    def __init__(
        self, rows: list[Request], layers: list[_KVLayer], mask: torch.Tensor,
        positions: torch.Tensor, next_ids: torch.Tensor,
    ) -> None:
        self.rows = rows
        self.layers = layers
        self.mask = mask  # (B, capacity) bool: True where a column holds a real token
        self.positions = positions  # (B,) long: the position of the next token of each row
        self.next_ids = next_ids  # (B, 1) long: the token each row feeds next
        self.routed = False  # whether the LoRA context holds this batch's slots

    @property
    def length(self) -> int:
        return self.layers[0].length

    def set_next_tokens(self, tokens: Sequence[int]) -> None:
        self.next_ids = torch.tensor(tokens, dtype=torch.long, device=self.next_ids.device)[
            :, None
        ]

    def keep(self, keep: list[int]) -> _Batch | None:
        """The batch with only rows `keep` (indices), leading all-padding columns trimmed."""
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask[:, : self.length].any(dim=0)
        start = int(used.nonzero()[0]) if bool(used.any()) else self.length
        length = self.length - start
        capacity = length + _KV_GROWTH
        layers = []
        for layer in self.layers:
            # (B', H, length, D): the kept rows' valid columns, re-based at column 0.
            new = _KVLayer.empty(layer.keys, len(keep), capacity)
            new.keys[:, :, :length] = layer.keys.index_select(0, index)[:, :, start : self.length]
            new.values[:, :, :length] = layer.values.index_select(0, index)[
                :, :, start : self.length
            ]
            new.length = length
            layers.append(new)
        new_mask = torch.zeros((len(keep), capacity), dtype=torch.bool, device=mask.device)
        new_mask[:, :length] = mask[:, start : self.length]
        return _Batch(
            [self.rows[i] for i in keep], layers, new_mask,
            self.positions.index_select(0, index), self.next_ids.index_select(0, index),
        )

    def concat(self, other: _Batch) -> _Batch:
        """Both batches' rows in one; the shorter cache is left-padded to the longer."""
        length = max(self.length, other.length)
        capacity = length + _KV_GROWTH
        total = len(self.rows) + len(other.rows)
        ours, theirs = slice(0, len(self.rows)), slice(len(self.rows), total)
        layers = []
        for mine, its in zip(self.layers, other.layers, strict=True):
            new = _KVLayer.empty(mine.keys, total, capacity)
            for src, rows in ((mine, ours), (its, theirs)):
                _left_pad_into(new.keys, src.keys[:, :, : src.length], rows, length)
                _left_pad_into(new.values, src.values[:, :, : src.length], rows, length)
            new.length = length
            layers.append(new)
        mask = torch.zeros((total, capacity), dtype=torch.bool, device=self.mask.device)
        _left_pad_into(mask, self.mask[:, : self.length], ours, length)
        _left_pad_into(mask, other.mask[:, : other.length], theirs, length)
        return _Batch(
            self.rows + other.rows, layers, mask,
            torch.cat([self.positions, other.positions]),
            torch.cat([self.next_ids, other.next_ids]),
        )

    def decode_inputs(self) -> dict[str, Any]:
        """Model inputs for one decode step; marks the new column as attended."""
        length = self.length
        if length >= self.mask.shape[1]:
            self._grow(length + _KV_GROWTH)
        self.mask[:, length] = True
        return {
            "input_ids": self.next_ids,  # (B, 1)
            "position_ids": self.positions[:, None],  # (B, 1)
            "attention_mask": self.mask[:, None, None, : length + 1],  # (B, 1, 1, L+1)
            "cache": Cache(layers=self.layers),
        }

    def advance(self) -> None:
        self.positions += 1

    def _grow(self, capacity: int) -> None:
        for layer in self.layers:
            layer.resize(capacity)
        mask = torch.zeros((self.mask.shape[0], capacity), dtype=torch.bool,
                           device=self.mask.device)
        mask[:, : self.mask.shape[1]] = self.mask
        self.mask = mask


def _prefill_inputs(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids (N, T), their padding mask (N, T) and positions (N, T)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = True
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _prefill_attention(mask: torch.Tensor) -> torch.Tensor:
    """(N, 1, T, T) bool: causal, real keys only; a padding query sees itself so that no
    row of the softmax is empty (which would produce NaN in some kernels)."""
    width = mask.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None] & mask[:, None, :]  # (N, T, T)
    allowed |= torch.eye(width, dtype=torch.bool, device=mask.device)[None]
    return allowed[:, None]


# -- the engine ------------------------------------------------------------------------------


@dataclass
class _Call:
    """A function to run on the engine thread between steps, and where its result goes."""

    fn: Callable[[], Any]
    future: Future


_WAKE = object()
_STOP = object()


class Engine:
    """Owns the model on one thread; see the module docstring for the step sequence."""

    def __init__(
        self, model: Any, tokenizer: Any, config: EngineConfig | None = None,
        observer: Any = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.observer = observer
        self.device = model.get_input_embeddings().weight.device
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self.pad_id = _pad_id(tokenizer)
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        slots = self.config.max_loaded_adapters + 1  # slot 0 is the bare base
        self.stack = LoraStack(model, slots, self.config.max_lora_rank)
        self.cache = AdapterCache(self.config.max_loaded_adapters,
                                  self.config.adapter_memory_budget_bytes)
        self.scheduler = Scheduler(
            SchedulerConfig(
                self.config.max_batch, self.config.max_queue, self.config.max_prefill_tokens
            ),
            _eos_ids(model, tokenizer),
            self.max_context,
        )
        self._attn_impl = _attention_implementation(model)
        self._batch: _Batch | None = None
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._thread = threading.Thread(target=self._run, name="switchboard-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the loop; requests still waiting or running end with UnavailableError."""
        self._closed = True
        if self._thread is None:
            self._fail_all(UnavailableError("the engine is shutting down"))
            return
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    def _on_engine_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between steps and return its result (or raise)."""
        if self._thread is None or self._on_engine_thread():
            return fn()  # no loop thread competes for the model
        if self._closed or not self._thread.is_alive():
            raise UnavailableError("the engine is not running")
        future: Future = Future()
        self._inbox.put(_Call(fn, future))
        while True:
            try:
                return future.result(timeout=1.0)
            except TimeoutError:
                # A call queued just as the loop stopped would otherwise wait forever.
                if not self._thread.is_alive():
                    raise UnavailableError("the engine stopped before running the call") from None

    def _wake(self) -> None:
        self._inbox.put(_WAKE)

    # -- public, thread-safe -----------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; it joins the running batch at the next step."""
        if self._closed:
            raise UnavailableError("the engine is shutting down")
        if len(request.prompt_ids) >= self.max_context:
            raise InvalidArgumentError(
                f"prompt has {len(request.prompt_ids)} tokens; the model's context is "
                f"{self.max_context} and at least one must be left for the answer"
            )
        self._check_token_ids("prompt_ids", request.prompt_ids)
        slot = self.cache.pin(request.adapter) if request.adapter is not None else BASE_SLOT
        try:
            sampling = request.sampling.with_default_length(self.config.default_max_new_tokens)
            handle = RequestHandle(request.request_id, on_cancel=self._wake)
            entry = Request(
                spec=request, handle=handle, sampling=sampling,
                detokenizer=IncrementalDetokenizer(self.tokenizer, request.prompt_ids),
                sampler=RowSampler.create(sampling, request.prompt_ids), slot=slot,
                holds_pin=request.adapter is not None,
            )
            self.scheduler.add(entry)
        except BaseException:
            if request.adapter is not None:
                self.cache.unpin(request.adapter)
            raise
        self._wake()
        return handle

    def load_adapter(self, key: str, path: Path) -> LoadedAdapter:
        """Read the adapter here, install it on the engine thread at a step boundary."""
        started = time.perf_counter()
        existing = self.cache.get(key)
        if existing is not None:
            return existing
        try:
            weights = read_adapter(
                Path(path), self.stack.module_shapes, self.config.max_lora_rank,
                max_bytes=self.config.max_adapter_bytes,
            )
            return self._call(lambda: self._install(key, weights, started))
        except Exception:
            self._notify("on_adapter_load_failed", key)
            raise

    def unload_adapter(self, key: str) -> None:
        """Forget `key` (AdapterInUseError while requests use it); its slot is reused later."""
        self.cache.remove(key)
        self._notify("on_adapter_unloaded", key)

    def loaded_adapters(self) -> dict[str, LoadedAdapterInfo]:
        return self.cache.info()

    def score(
        self, prompt_ids: Sequence[int], target_ids: Sequence[int], adapter: str | None
    ) -> ScoreResult:
        """Log-likelihood of `target_ids` after `prompt_ids`, on the engine thread."""
        if not prompt_ids or not target_ids:
            raise InvalidArgumentError("score needs a non-empty prompt and a non-empty target")
        if len(prompt_ids) + len(target_ids) > self.max_context:
            raise InvalidArgumentError(
                f"prompt + target is {len(prompt_ids) + len(target_ids)} tokens; the model's "
                f"context is {self.max_context}"
            )
        self._check_token_ids("prompt_ids", prompt_ids)
        self._check_token_ids("target_ids", target_ids)
        slot = self.cache.pin(adapter) if adapter is not None else BASE_SLOT
        try:
            return self._call(lambda: self._score(list(prompt_ids), list(target_ids), slot))
        finally:
            if adapter is not None:
                self.cache.unpin(adapter)

    def _check_token_ids(self, name: str, ids: Sequence[int]) -> None:
        """Out-of-vocabulary ids would fail the whole step they run in: refuse them here."""
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidArgumentError(
                f"{name} holds ids outside the vocabulary 0..{self.vocab_size - 1}: {bad[:5]}"
            )

    # -- engine thread: commands -------------------------------------------------------------

    @torch.inference_mode()
    def _install(self, key: str, weights: AdapterWeights, started: float) -> LoadedAdapter:
        existing = self.cache.get(key)
        if existing is not None:  # another caller loaded it while this one read the files
            return existing
        # The slot's size is known before installing, so the budget can make room first.
        memory = self.stack.slice_bytes(list(weights.modules))
        slot, evicted = self.cache.reserve_slot(memory, key)
        for old in evicted:
            log.info("evicted adapter %s to make room for %s", old, key)
            self._notify("on_adapter_evicted", old)
        try:
            memory = self.stack.install(slot, weights.modules)
        except BaseException:
            self.cache.release_slot(slot)
            raise
        seconds = time.perf_counter() - started
        self.cache.add(key, slot, weights.rank, memory, seconds)
        self._notify("on_adapter_loaded", key, seconds, memory)
        return LoadedAdapter(key, weights.rank, memory, seconds)

    @torch.inference_mode()
    def _score(self, prompt_ids: list[int], target_ids: list[int], slot: int) -> ScoreResult:
        ids = torch.tensor([prompt_ids + target_ids], dtype=torch.long, device=self.device)
        self.stack.route([slot])
        if self._batch is not None:
            self._batch.routed = False
        logits = self.model(input_ids=ids, use_cache=False).logits[0].float()  # (T, V)
        # Position t predicts token t+1: the target tokens are predicted from P-1 .. T-2.
        predicting = logits[len(prompt_ids) - 1 : -1]  # (len(target), V)
        log_probs = torch.log_softmax(predicting, dim=-1)
        targets = torch.tensor(target_ids, dtype=torch.long, device=self.device)
        picked = log_probs.gather(1, targets[:, None])[:, 0]
        return ScoreResult(float(picked.sum()), len(target_ids))

    # -- engine thread: the loop -------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                idle = not self.scheduler.has_work
                if not self._drain_inbox(block=idle):
                    break
                if self.scheduler.has_work:
                    self._step_safely()
                    if not self.scheduler.has_work:
                        self._notify("on_step", 0, 0, self.scheduler.num_waiting, 0)
        self._fail_all(UnavailableError("the engine is shutting down"))

    def _drain_inbox(self, block: bool) -> bool:
        """Run queued commands; block for the first one when idle. False once stopping."""
        try:
            item = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                self._fail_pending_calls()
                return False
            if isinstance(item, _Call):
                _run_call(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _fail_pending_calls(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Call):
                item.future.set_exception(UnavailableError("the engine is shutting down"))

    def _step_safely(self) -> None:
        plan = None
        try:
            self._emit_cancelled(self.scheduler.drop_aborted_waiting())
            plan = self.scheduler.schedule()
            if not plan.is_empty:
                self._step(plan)
        except Exception as exc:  # the step's rows fail; the engine keeps serving others
            log.exception("engine step failed")
            failed = list(plan.rows) if plan is not None else []
            failed += [r for r in self.scheduler.take_running() if r not in failed]
            self._batch = None
            for request in failed:
                if not request.status.is_finished:
                    request.status = RequestStatus.FINISHED_ERROR
                self._release(request)
                request.handle.push(exc)  # ignored by a stream that already got its finish

    def _step(self, plan: StepPlan) -> None:
        tokens, joining = self._execute(plan)
        aborted = self.scheduler.abort_running(plan)
        outputs = self.scheduler.update_from_output(plan, tokens, time.monotonic())
        self._update_batch(joining)
        self._emit(outputs, aborted)
        adapters = {r.adapter_label for r in plan.rows}  # the bare base counts as one
        self._notify(
            "on_step", len(plan.rows), self.scheduler.num_running, self.scheduler.num_waiting,
            len(adapters),
        )

    def _execute(self, plan: StepPlan) -> tuple[dict[Request, int], _Batch | None]:
        """Decode the running rows and prefill the admitted ones; one token for each."""
        tokens: dict[Request, int] = {}
        if self._batch is not None:
            tokens.update(self._decode(self._batch))
        joining = None
        if plan.admitted:
            joining, first = self._prefill(list(plan.admitted))
            tokens.update(first)
        return tokens, joining

    def _forward_logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()  # (B, V)

    def _decode(self, batch: _Batch) -> dict[Request, int]:
        if not batch.routed:
            self.stack.route([r.slot for r in batch.rows])
            batch.routed = True
        inputs = batch.decode_inputs()
        inputs["attention_mask"] = self._attention_mask(inputs["attention_mask"])
        logits = self._forward_logits(inputs)
        batch.advance()
        chosen = sample_batch(logits, [r.sampler for r in batch.rows])
        batch.set_next_tokens(chosen)
        return dict(zip(batch.rows, chosen, strict=True))

    def _prefill(self, rows: list[Request]) -> tuple[_Batch, dict[Request, int]]:
        """Run the new rows' prompts together; their cache becomes a batch to join."""
        ids, mask, positions = _prefill_inputs(
            [list(r.spec.prompt_ids) for r in rows], self.pad_id, self.device
        )
        self.stack.route([r.slot for r in rows])
        if self._batch is not None:
            self._batch.routed = False
        cache = Cache(layers=[
            _KVLayer(*_empty_kv(self.model, len(rows), ids.shape[1] + _KV_GROWTH, self.device), 0)
            for _ in range(self.model.config.num_hidden_layers)
        ])
        logits = self._forward_logits({
            "input_ids": ids, "position_ids": positions, "cache": cache,
            "attention_mask": self._attention_mask(_prefill_attention(mask)),
        })
        chosen = sample_batch(logits, [r.sampler for r in rows])
        batch_mask = torch.zeros((len(rows), ids.shape[1] + _KV_GROWTH), dtype=torch.bool,
                                 device=self.device)
        batch_mask[:, : ids.shape[1]] = mask
        next_positions = positions[:, -1] + 1  # (N,): each row continues after its last token
        batch = _Batch(rows, list(cache.layers), batch_mask, next_positions, ids[:, :1])
        batch.set_next_tokens(chosen)
        return batch, dict(zip(rows, chosen, strict=True))

    def _attention_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """The 4D mask in the form the attention kernel takes (bool for SDPA, additive else)."""
        if self._attn_impl == "sdpa":
            return allowed
        minimum = torch.finfo(self.model.dtype).min
        zeros = torch.zeros(allowed.shape, dtype=self.model.dtype, device=allowed.device)
        return zeros.masked_fill(~allowed, minimum)

    def _update_batch(self, joining: _Batch | None) -> None:
        """Drop finished rows from the running batch and the joining one; join them."""
        batch = _without_finished(self._batch)
        joining = _without_finished(joining)
        if batch is None:
            batch = joining
        elif joining is not None:
            batch = batch.concat(joining)
        if batch is not None and batch is not self._batch:
            batch.routed = False
        self._batch = batch

    # -- engine thread: events ---------------------------------------------------------------

    def _emit(self, outputs: list[RequestOutput], aborted: list[Request]) -> None:
        now = time.monotonic()
        for out in outputs:
            request = out.request
            request.handle.push(
                TokenEvent(out.text_delta, [out.token_id], request.num_output_tokens)
            )
            self._notify("on_token", request.request_id, request.spec.adapter)
            if out.finished:
                self._release(request)
                request.handle.push(request.finish_event(now))
        self._emit_cancelled(aborted)

    def _emit_cancelled(self, requests: list[Request]) -> None:
        now = time.monotonic()
        for request in requests:
            self._release(request)
            request.handle.push(request.finish_event(now))

    def _release(self, request: Request) -> None:
        """Drop the request's adapter pin, once, however it ended."""
        if request.holds_pin:
            request.holds_pin = False
            self.cache.unpin(request.spec.adapter)

    def _fail_all(self, exc: Exception) -> None:
        for request in self.scheduler.take_running() + self.scheduler.take_waiting():
            self._release(request)
            request.handle.push(exc)
        self._batch = None

    def _notify(self, hook: str, *args: Any) -> None:
        method = getattr(self.observer, hook, None)
        if method is None:
            return
        try:
            method(*args)
        except Exception:  # metrics must never break serving
            log.exception("observer hook %s failed", hook)


def _without_finished(batch: _Batch | None) -> _Batch | None:
    if batch is None:
        return None
    return batch.keep([i for i, r in enumerate(batch.rows) if not r.status.is_finished])


def _run_call(call: _Call) -> None:
    try:
        call.future.set_result(call.fn())
    except BaseException as exc:
        call.future.set_exception(exc)


def _empty_kv(model: Any, batch: int, capacity: int, device: torch.device) -> tuple:
    """Zeroed (keys, values) buffers (batch, kv_heads, capacity, head_dim) for one layer."""
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (batch, heads, capacity, head_dim)
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(
        shape, dtype=dtype, device=device
    )


def _attention_implementation(model: Any) -> str:
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        # Explicit 4D masks with left padding need SDPA or eager attention.
        model.set_attn_implementation("sdpa")
        impl = "sdpa"
    return impl


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    generation = getattr(model, "generation_config", None)
    for source in (getattr(generation, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return ids

