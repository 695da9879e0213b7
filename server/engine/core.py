"""The engine core: one thread owns the model and runs continuous mixed-adapter batching.

Every loop iteration is one fixed sequence (vLLM's `EngineCore.step`): collect finished adapter
reads and install them, schedule, execute (decode every running row, prefill the admitted ones),
apply the aborts that arrived meanwhile, update request state, emit token ids, free the rows
that finished. When there is nothing to do the thread blocks on its inbox. When requests arrive
while no row runs, it waits for the rest of their burst (until none comes for the burst window),
so that they prefill together. Other
threads talk to it only through thread-safe methods: `submit`, `load_adapter`,
`unload_adapter`, `loaded_adapters`, `score`, `stats`, `shutdown`.

Decoding ahead (on by default on CUDA, as vLLM's async scheduling): unless a request joins, each
step launches the next decode before it reads its own tokens, which are chosen (greedy or
sampled) on the device, so the device computes step N+1 while the host updates, emits and
schedules step N. A row that finishes at step N was also run in step N+1; that token is
dropped.

Parts, each in its own file: `server.scheduler` (who runs; adapters admitted only when
resident), `runner` (the forward and sampling over persistent buffers), `kv` (slots of the KV
cache), `graphs` (CUDA graph capture), `loader` (adapter reads off this thread), `cpu_threads`
(on the CPU, the intra-op threads each forward size runs with, timed at start); on the CPU a
4-bit base calls its kernels directly (`server.cpu4bit`).
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.adapter_cache import (
    AdapterCache,
    AdapterNotLoadedError,
    AdapterWeights,
    LoadedAdapter,
    LoadedAdapterInfo,
    read_adapter,
)
from server.cpu4bit import use_direct_cpu_kernels
from server.engine.cpu_threads import (
    LONGEST_TIMED,
    ThreadPlan,
    candidate_counts,
    forward_sizes,
    measure,
)
from server.engine.loader import AdapterLoader, LoadDone
from server.engine.runner import LaunchedDecode, ModelRunner, RunnerConfig
from server.engine_config import EngineConfig
from server.errors import (
    AdapterInUseError,
    AdapterSlotsBusyError,
    InvalidArgumentError,
    UnavailableError,
)
from server.lora import BASE_SLOT, LoraStack
from server.output import OutputProcessor
from server.request import GenerationRequest, Request, RequestHandle, RequestStatus, Wakeups
from server.sampling import RowSampler
from server.scheduler import RowOutput, Scheduler, StepPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreResult:
    log_likelihood: float
    token_count: int


@dataclass(frozen=True)
class EngineStats:
    """Totals since start: steps, rows decoded, wall time of steps and of model forwards, and
    the steps that prefilled (a burst split across steps prefills more than once)."""

    steps: int
    rows: int
    step_seconds: float
    forward_seconds: float
    prefills: int


@dataclass
class _Call:
    """A function to run on the engine thread between steps, and where its result goes."""

    fn: Callable[[], Any]
    future: Future


@dataclass(frozen=True)
class _Hooks:
    """Which per-step observer hooks exist: without them the step skips the counting."""

    on_step: bool
    on_tokens: bool

    @classmethod
    def of(cls, observer: Any) -> _Hooks:
        return cls(callable(getattr(observer, "on_step", None)),
                   callable(getattr(observer, "on_tokens", None)))


_WAKE = object()
_STOP = object()
# While requests wait (for an adapter, a batch place), the loop wakes this often to notice
# deadlines that pass with nothing else happening.
_WAITING_POLL_S = 0.05
# The longest a burst is waited for, in burst windows (20 ms on the CPU, 200 ms on CUDA by
# default): a prefill costs 40-80 ms on an H200 and 100-300 ms on a 2-core CPU.
BURST_WINDOWS_AT_MOST = 10
# The burst window by device when the setting names none. Served through gRPC on an H200 (16
# streams, then 64), 20 ms gave 2,453 and 7,514 tok/s where 2 ms gave 2,165 and 5,279: the
# requests of a served burst reach the engine up to 18 ms apart. On a 2-core CPU 20 ms lost
# 16-23%.
DEFAULT_BURST_WINDOW_MS = {"cuda": 20.0, "cpu": 2.0}


class _Residency:
    """The scheduler's view of adapters: pin resident ones, start loads for the others."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def try_pin(self, key: str) -> int | None:
        return self._engine.cache.try_pin(key)

    def want(self, key: str, path: Path | None) -> None:
        self._engine._want(key, path)


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
        self._hooks = _Hooks.of(observer)
        native = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.max_context = self.config.context_for(native)
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        use_direct_cpu_kernels(model)  # before the LoRA wrappers see the layers
        cache = self.config.cache
        slots = cache.max_loaded_adapters + 1  # slot 0 is the bare base
        self.stack = LoraStack(model, slots, cache.max_lora_rank)
        self.cache = AdapterCache(cache.max_loaded_adapters, cache.adapter_memory_budget_bytes)
        self.runner = ModelRunner(
            model, self.stack,
            RunnerConfig(self.config.scheduler.max_batch, self.max_context,
                         self.config.prefill_chunk_tokens),
            _pad_id(tokenizer),
        )
        self.scheduler = Scheduler(self.config.scheduler, _eos_ids(model, tokenizer),
                                   self.max_context, _Residency(self))
        self.loader = AdapterLoader(self._read, self._wake)
        self._ready: dict[str, LoadDone] = {}  # read, waiting for a slot (engine thread)
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._idle = True
        self._arrivals_seen = 0  # the arrivals the next step may admit (see _see_arrivals)
        self._stats = [0, 0, 0.0, 0.0, 0]  # steps, rows, step s, forward s, prefills
        self.graph_capture_seconds: float | None = None
        ahead = self.config.decode_ahead
        self.decodes_ahead = self.runner.device.type == "cuda" if ahead is None else ahead
        window = self.config.scheduler.burst_window_ms
        self.burst_window_ms = (DEFAULT_BURST_WINDOW_MS.get(self.runner.device.type,
                                                            DEFAULT_BURST_WINDOW_MS["cpu"])
                                if window is None else window)
        self._ahead: LaunchedDecode | None = None  # the decode launched for the next step
        self._wakeups = Wakeups()  # the async readers a step's tokens wake, woken at its end

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Capture the decode graphs when they are on, freeze the startup heap, start the loop
        thread, and on the CPU time its forwards' threads there."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        most = torch.get_num_threads()
        time_threads = self._threads_wanted(most)
        if self.stack.launch_bound:
            # Every forward there multiplies by all slots at once, and layers that read one
            # input share that product: which do is found once every layer is wrapped.
            self.stack.wrap_all()
        if self._graphs_wanted():
            from server.engine.graphs import DecodeGraphs

            self._capture(DecodeGraphs(self.runner))
        # A full collection walks every object Python tracks, the model's among them: a pause
        # of 100-300 ms in the middle of some step. Most of what exists now (the model, the
        # libraries) lives as long as the engine, so it is moved out of the collector's reach,
        # as vLLM does; shutdown hands it back.
        gc.collect()
        gc.freeze()
        self._thread = threading.Thread(target=self._run, name="switchboard-engine", daemon=True)
        self._thread.start()
        if time_threads:
            try:
                self._call(lambda: self._time_threads(most))
            except Exception:
                if self.config.tune_cpu_threads:  # asked for explicitly: a failure is an error
                    self.shutdown()
                    raise
                log.exception("timing CPU threads failed; every forward keeps %d threads", most)
            else:
                log.info("%s (timed in %.1fs)", self.thread_plan.describe(),
                         self.thread_plan.seconds)

    def _capture(self, graphs: Any) -> None:
        """Capture (or capture again) the decode graphs; eager decode if that fails."""
        self.runner.graphs = None
        try:
            with torch.inference_mode():
                self.graph_capture_seconds = graphs.capture()
        except Exception:
            if self.config.cuda_graphs:  # asked for explicitly: a failure is an error
                raise
            # On by default only: serve eagerly (slower, same tokens) rather than not at all.
            log.exception("CUDA graph capture failed; decoding eagerly instead")
            self.graph_capture_seconds = None
            self.runner.forget_routing()
        else:
            self.runner.graphs = graphs
            log.info("captured %d CUDA graphs (batch %s x width %s, LoRA rank %d) in %.1fs",
                     len(graphs), graphs.buckets, graphs.widths, graphs.rank,
                     self.graph_capture_seconds)

    def _threads_wanted(self, most: int) -> bool:
        wanted = self._on_by_default_on("tune_cpu_threads", "cpu",
                                        "it times CPU forwards (turn it off on a GPU)")
        return wanted and most > 1

    def _time_threads(self, most: int) -> None:
        """On the engine thread, whose OpenMP pool the forwards use: time them, then plan."""
        config = self.runner.config
        longest = min(LONGEST_TIMED, config.prefill_chunk_tokens, config.max_seq_len - 1)
        self.runner.threads = measure(
            self.runner.forward_for_timing, forward_sizes(config.max_rows, longest),
            candidate_counts(most), torch.set_num_threads)

    @property
    def thread_plan(self) -> ThreadPlan | None:
        """The CPU threads each forward size runs with (None: not timed)."""
        return self.runner.threads

    def _graphs_wanted(self) -> bool:
        return self._on_by_default_on(
            "cuda_graphs", "cuda",
            "CUDA graphs need a CUDA device (turn them off, or use --cuda-graphs only on a GPU)")

    def _on_by_default_on(self, name: str, device: str, why: str) -> bool:
        """Setting `name`: None means on for a model on `device` only; True elsewhere fails."""
        here = self.runner.device.type == device
        wanted = getattr(self.config, name)
        if wanted and not here:
            raise InvalidArgumentError(
                f"{name} is on but the model is on {self.runner.device}; {why}")
        return here if wanted is None else wanted

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the loop; requests still waiting or running end with UnavailableError."""
        self._closed = True
        self.loader.stop()
        if self._thread is None:
            self._fail_all(UnavailableError("the engine is shutting down"))
            return
        self._inbox.put(_STOP)
        self._thread.join(timeout)
        gc.unfreeze()

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between steps and return its result (or raise)."""
        if self._thread is None or threading.current_thread() is self._thread:
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

    def _on_cancel(self) -> None:
        self.scheduler.note_cancel()
        self._wake()

    # -- public, thread-safe -----------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; it joins the running batch once its adapter is resident."""
        if self._closed:
            raise UnavailableError("the engine is shutting down")
        if len(request.prompt_ids) >= self.max_context:
            raise InvalidArgumentError(
                f"prompt has {len(request.prompt_ids)} tokens; the model's context is "
                f"{self.max_context} and at least one must be left for the answer"
            )
        self._check_token_ids("prompt_ids", request.prompt_ids)
        key = request.adapter
        if key is not None and request.adapter_path is None and self.cache.get(key) is None:
            raise self._not_loaded(key)
        sampling = request.sampling.with_default_length(self.config.default_max_new_tokens)
        output = OutputProcessor(self.tokenizer, request.prompt_ids, sampling.stop)
        handle = RequestHandle(request.request_id, output, len(request.prompt_ids),
                               on_cancel=self._on_cancel)
        entry = Request(spec=request, handle=handle, sampling=sampling,
                        sampler=RowSampler.create(sampling, request.prompt_ids))
        self.scheduler.add(entry)
        if key is not None and self.cache.get(key) is None:
            self._want(key, request.adapter_path)  # start reading before the next step
        self._wake()
        return handle

    def load_adapter(self, key: str, path: Path) -> LoadedAdapter:
        """Read the adapter here, install it on the engine thread at a step boundary."""
        started = time.perf_counter()
        existing = self.cache.get(key)
        if existing is not None:
            return existing
        try:
            weights = self._read(Path(path))
            return self._call(lambda: self._install(key, weights, started))
        except Exception:
            self._notify("on_adapter_load_failed", key)
            raise

    def unload_adapter(self, key: str) -> None:
        """Forget `key` (AdapterInUseError while requests run on it or wait for it); its slot
        is reused later."""
        if key in self.scheduler.wanted_adapters():
            raise AdapterInUseError(
                f"adapter {key!r} is wanted by requests waiting to run; retry when they end")
        self.cache.remove(key)
        self._notify("on_adapter_unloaded", key)

    def loaded_adapters(self) -> dict[str, LoadedAdapterInfo]:
        return self.cache.info()

    def is_loaded(self, key: str) -> bool:
        return self.cache.get(key) is not None

    def score(
        self, prompt_ids: Sequence[int], target_ids: Sequence[int], adapter: str | None,
        adapter_path: Path | None = None,
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
        weights = None
        if adapter is not None and self.cache.get(adapter) is None:
            if adapter_path is None:
                raise self._not_loaded(adapter)
            weights = self._read(Path(adapter_path))  # here, not on the engine thread
        started = time.perf_counter()
        return self._call(
            lambda: self._score(list(prompt_ids), list(target_ids), adapter, weights, started))

    def stats(self) -> EngineStats:
        steps, rows, step_s, forward_s, prefills = self._stats
        return EngineStats(steps, rows, step_s, forward_s, prefills)

    def _check_token_ids(self, name: str, ids: Sequence[int]) -> None:
        """Out-of-vocabulary ids would fail the whole step they run in: refuse them here."""
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidArgumentError(
                f"{name} holds ids outside the vocabulary 0..{self.vocab_size - 1}: {bad[:5]}"
            )

    def _not_loaded(self, key: str) -> AdapterNotLoadedError:
        loaded = ", ".join(self.cache.info()) or "none"
        return AdapterNotLoadedError(
            f"adapter {key!r} is not loaded and no path was given to load it (loaded: {loaded})")

    def _read(self, path: Path) -> AdapterWeights:
        return read_adapter(path, self.stack.module_shapes, self.config.cache.max_lora_rank,
                            max_bytes=self.config.cache.max_adapter_bytes)

    # -- adapters (engine thread, except `_want`) ----------------------------------------------

    def _want(self, key: str, path: Path | None) -> None:
        """Make sure `key` is being read (any thread); without a path it cannot be."""
        if path is None:
            self._inbox.put(_Call(lambda: self._fail_waiting(key, self._not_loaded(key)),
                                  Future()))
            return
        if key not in self._ready:
            self.loader.want(key, path)

    def _collect_loads(self) -> None:
        """Take finished reads; install what fits now, keep the rest for a freed slot."""
        for done in self.loader.take_done():
            if done.error is not None:
                self._notify("on_adapter_load_failed", done.key)
                self._fail_waiting(done.key, done.error)
            else:
                self._ready[done.key] = done
        if not self._ready:
            return
        wanted = self.scheduler.wanted_adapters()
        for key, done in list(self._ready.items()):
            if key not in wanted or self.cache.get(key) is not None:
                del self._ready[key]  # nobody waits for it any more, or it is resident
                continue
            try:
                self._install(key, done.weights, done.started, wanted)
            except AdapterSlotsBusyError:
                return  # every slot is held; retried after rows finish, in arrival order
            except Exception as exc:
                del self._ready[key]
                self._notify("on_adapter_load_failed", key)
                self._fail_waiting(key, exc)
            else:
                del self._ready[key]

    def _install(self, key: str, weights: AdapterWeights, started: float,
                 protected: frozenset[str] | None = None) -> LoadedAdapter:
        existing = self.cache.get(key)
        if existing is not None:  # another caller loaded it while this one read the files
            return existing
        if protected is None:
            protected = self.scheduler.wanted_adapters()
        # The slot's size is known before installing, so the budget can make room first.
        memory = self.stack.slice_bytes(list(weights.modules))
        slot, evicted = self.cache.reserve_slot(memory, key, protected)
        for old in evicted:
            log.info("evicted adapter %s to make room for %s", old, key)
            self._notify("on_adapter_evicted", old)
        try:
            with torch.inference_mode():
                memory = self.stack.install(slot, weights.modules)
        except BaseException:
            self.cache.release_slot(slot)
            raise
        graphs = self.runner.graphs
        if graphs is not None and graphs.wanted_rank() > graphs.rank:
            log.info("adapter %s has rank %d, above the CUDA graphs' %d: capturing again",
                     key, weights.rank, graphs.rank)
            self._capture(graphs)
        seconds = time.perf_counter() - started
        self.cache.add(key, slot, weights.rank, memory, seconds)
        self._notify("on_adapter_loaded", key, seconds, memory)
        return LoadedAdapter(key, weights.rank, memory, seconds)

    def _fail_waiting(self, key: str, error: BaseException) -> None:
        for request in self.scheduler.fail_waiting_for(key):
            request.handle.push_error(error)

    @torch.inference_mode()
    def _score(self, prompt_ids: list[int], target_ids: list[int], adapter: str | None,
               weights: AdapterWeights | None, started: float) -> ScoreResult:
        slot = BASE_SLOT
        if adapter is not None:
            pinned = self.cache.try_pin(adapter)
            if pinned is None:
                if weights is None:
                    raise self._not_loaded(adapter)  # evicted since the caller looked
                self._install(adapter, weights, started)
                pinned = self.cache.pin(adapter)
            slot = pinned
        try:
            value = self.runner.log_likelihood(prompt_ids, target_ids, slot)
        finally:
            if adapter is not None:
                self.cache.unpin(adapter)
        return ScoreResult(value, len(target_ids))

    # -- engine thread: the loop -------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while self._drain_inbox():
                self._collect_loads()
                self._step_safely()
        self._fail_all(UnavailableError("the engine is shutting down"))

    def _drain_inbox(self) -> bool:
        """Run queued commands; when idle, wait for the first one. False once stopping."""
        try:
            if not self._idle:
                item = self._inbox.get_nowait()
            elif self.scheduler.has_work:
                item = self._inbox.get(timeout=_WAITING_POLL_S)
            else:
                item = self._inbox.get()
        except queue.Empty:
            return True
        while True:
            if not self._handle(item):
                return False
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        return self._see_arrivals()

    def _see_arrivals(self) -> bool:
        """Take the requests queued so far into the next step's plan; when they arrived while no
        row runs, wait for the rest of their burst first. False once stopping."""
        # Read once: one queued after this read waits for the next loop, which looks at it
        # again. Not only after idling: a burst sent as the last rows finish finds this busy.
        arrivals = self.scheduler.arrivals
        if not self.scheduler.num_running and arrivals > self._arrivals_seen:
            if not self._await_burst():
                return False
            arrivals = self.scheduler.arrivals
        self._arrivals_seen = arrivals
        return True

    def _await_burst(self) -> bool:
        """Requests arrived while no row runs: let the rest of their burst arrive, so that they
        prefill in one forward. False once stopping.

        The wait ends once no request has arrived for the burst window, the batch is full, or
        BURST_WINDOWS_AT_MOST windows have passed: a burst of 64 took 3-7 ms to submit even in
        process, longer than one window, though its requests came under 1 ms apart.
        """
        config = self.config.scheduler
        window = self.burst_window_ms / 1e3
        now = time.monotonic()
        quiet_at, give_up_at = now + window, now + BURST_WINDOWS_AT_MOST * window
        arrivals = self.scheduler.arrivals
        while self.scheduler.num_waiting < config.max_batch:
            left = min(quiet_at, give_up_at) - time.monotonic()
            if left <= 0:
                return True
            try:
                item = self._inbox.get(timeout=left)
            except queue.Empty:
                return True
            if not self._handle(item):
                return False
            if self.scheduler.arrivals > arrivals:
                arrivals = self.scheduler.arrivals
                quiet_at = time.monotonic() + window
        return True

    def _handle(self, item: Any) -> bool:
        """Act on one inbox item (a call runs; a wake needs nothing). False once stopping."""
        if item is _STOP:
            self._fail_pending_calls()
            return False
        if isinstance(item, _Call):
            _run_call(item)
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
        self._emit_cancelled(self.scheduler.drop_aborted_waiting())
        plan = self.scheduler.schedule(self._arrivals_seen)
        self._idle = plan.is_empty
        if plan.is_empty:
            return
        try:
            self._step(plan)
        except Exception as exc:  # not one row's fault: the step's rows fail, others go on
            log.exception("engine step failed")
            self._ahead = None
            failed = self.runner.drop_all()
            for request in [*self.scheduler.take_running(), *plan.admitted]:
                if request not in failed:
                    failed.append(request)
            for request in failed:
                request.status = RequestStatus.FINISHED_ERROR
                self._release(request)
                request.handle.push_error(exc)

    def _step(self, plan: StepPlan) -> None:
        started = time.perf_counter()
        forward_before = self.runner.forward_seconds
        tokens: dict[Request, int | BaseException] = {}
        if self.runner.num_rows:
            tokens.update(self._decode(plan))
        if plan.admitted:
            now = time.monotonic()
            for request in plan.admitted:
                request.handle.admitted_at = now
            tokens.update(self.runner.prefill(plan.admitted))
        aborted = self.scheduler.abort_running(plan)
        outputs = self.scheduler.update_from_output(plan, tokens)
        try:
            if aborted or self.scheduler.num_running < len(plan.rows):
                # Some row left: pack the rows again, before the readers wake. Their threads
                # would take the GIL from this one at each tensor op of the packing.
                self.runner.release_finished()
        finally:
            # Even when packing failed: the finished requests are in no row or queue any more,
            # so only this tells their callers.
            self._emit(outputs, aborted)
        if not self.runner.num_rows:
            self._ahead = None  # every row it ran has finished: nothing in it is wanted
        stats = self._stats
        stats[0] += 1
        stats[1] += len(plan.rows)
        stats[2] += time.perf_counter() - started
        stats[3] += self.runner.forward_seconds - forward_before
        stats[4] += bool(plan.admitted)
        if self._hooks.on_step:
            adapters = len({r.adapter_label for r in plan.rows})  # the bare base counts as one
            self._notify("on_step", len(plan.rows), self.scheduler.num_running,
                         self.scheduler.num_waiting, adapters)

    def _decode(self, plan: StepPlan) -> dict[Request, int | BaseException]:
        """This step's decode (launched by the last step when it ran ahead), after launching
        the next step's unless a request joins (its prefill must come first)."""
        runner = self.runner
        current = self._ahead
        if current is None:
            current = runner.launch_decode(deferred=False)
        self._ahead = None
        if self.decodes_ahead and not plan.admitted:
            self._ahead = runner.launch_decode(deferred=True)
        return runner.collect(current)

    # -- engine thread: events ---------------------------------------------------------------

    def _emit(self, outputs: list[RowOutput], aborted: list[Request]) -> None:
        running, wakeups = RequestStatus.RUNNING, self._wakeups
        try:
            for request, token_id, is_eos, error in outputs:
                if request.status is running:  # the common case: one token, nothing else
                    request.handle.push_token(token_id, is_eos, None, wakeups)
                    continue
                self._release(request)
                if error is not None:
                    request.handle.push_error(error)
                else:
                    request.handle.push_token(token_id, is_eos, request.finish_reason, wakeups)
        finally:
            wakeups.flush()  # also after a failure here: no reader is left asleep on a token
        self._emit_cancelled(aborted)
        if self._hooks.on_tokens:
            produced = Counter(r.spec.adapter for r, _, _, error in outputs if error is None)
            for adapter, count in produced.items():
                self._notify("on_tokens", adapter, count)

    def _emit_cancelled(self, requests: list[Request]) -> None:
        for request in requests:
            self._release(request)
            request.handle.push_finish("cancelled")

    def _release(self, request: Request) -> None:
        """Drop the request's adapter pin, once, however it ended."""
        if request.holds_pin:
            request.holds_pin = False
            self.cache.unpin(request.spec.adapter)

    def _fail_all(self, exc: Exception) -> None:
        self.runner.drop_all()
        for request in self.scheduler.take_running() + self.scheduler.take_waiting():
            self._release(request)
            request.handle.push_error(exc)

    def _notify(self, hook: str, *args: Any) -> None:
        method = getattr(self.observer, hook, None)
        if method is None:
            return
        try:
            method(*args)
        except Exception:  # metrics must never break serving
            log.exception("observer hook %s failed", hook)


def _run_call(call: _Call) -> None:
    try:
        call.future.set_result(call.fn())
    except BaseException as exc:
        call.future.set_exception(exc)


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
