"""Prometheus metrics: the engine observer hooks, the edges' per-call hooks and the HTTP exporter.

Everything lives in one `CollectorRegistry` owned by a `Metrics` object (never the global one), so
several servers in one test process do not share counters. Names follow Prometheus conventions:
base units (`_seconds`, `_bytes`), counters end in `_total`. The `adapter` label is bounded: the
first `max_adapter_labels` adapter keys get their own value, later ones share `other`, and the bare
base model is `__base__`. The `key` label (per API key, by the key's name, never the key) is
bounded the same way by `max_key_labels`. Hooks are cheap and thread-safe: the engine calls them
from its thread, the edges (server/observe.py) from the event loop.
"""

from __future__ import annotations

import platform
import sys
import threading
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from common.names import BASE_NAME, TRUNCATION_STRATEGIES

OTHER_LABEL = "other"
NAMESPACE = "switchboard"

# gRPC status code names: the `code` label never takes another value (unknown ones become UNKNOWN).
STATUS_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)
# Which per-key limit refused a request (server/ratelimit.py).
KEY_LIMITS = ("in_flight", "requests_per_minute", "tokens_per_minute")
PROTOCOLS = ("grpc", "http")
# The `protocol` label of the request being served: the HTTP edge (server/openai/edge.py) sets it
# for its requests, as the request id is set, so the core stays transport-neutral.
protocol_var: ContextVar[str] = ContextVar("switchboard_protocol", default="grpc")

# Buckets sized for LLM serving: a TTFT is tens of milliseconds on a GPU and seconds under load on a
# CPU; one decode step is milliseconds to a few hundred; a whole answer may take minutes.
QUEUE_WAIT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
TTFT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0,
    30.0, 60.0,
)
INTER_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
    1.0, 2.5,
)
REQUEST_DURATION_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
TOKEN_COUNT_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ADAPTERS_PER_STEP_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
ADAPTER_LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Each request's distributions, labelled by adapter: (metric name, help, buckets).
REQUEST_HISTOGRAMS = (
    ("request_queue_wait_seconds", "Time from submission to the first scheduled step.",
     QUEUE_WAIT_BUCKETS),
    ("time_to_first_token_seconds", "Time from arrival to the first generated token.",
     TTFT_BUCKETS),
    ("inter_token_latency_seconds", "Time between consecutive tokens of one request.",
     INTER_TOKEN_BUCKETS),
    ("request_duration_seconds", "Whole-request time of requests that finished OK.",
     REQUEST_DURATION_BUCKETS),
    ("request_prompt_tokens", "Prompt length of each finished request, in tokens.",
     TOKEN_COUNT_BUCKETS),
    ("request_generation_tokens", "Generated length of each finished request, in tokens.",
     TOKEN_COUNT_BUCKETS),
)


class AdapterLabels:
    """Maps adapter keys to a bounded set of label values; thread-safe, first come first served."""

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"max_adapter_labels must be >= 1, got {cap}")
        self._cap = cap
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def label(self, adapter: str | None) -> str:
        if not adapter or adapter == BASE_NAME:
            return BASE_NAME
        if adapter in self._known:
            return adapter
        with self._lock:
            # A slot is never given back: reusing it would let the series count grow with churn.
            if adapter in self._known or len(self._known) < self._cap:
                self._known.add(adapter)
                return adapter
        return OTHER_LABEL


def _status_label(code: str) -> str:
    name = code.upper().removeprefix("STATUSCODE.")
    return name if name in STATUS_CODES else "UNKNOWN"


def _strategy_label(strategy: str) -> str:
    return strategy if strategy in TRUNCATION_STRATEGIES else OTHER_LABEL


class AcceleratorMemoryCollector(Collector):
    """Reads accelerator memory at scrape time; yields nothing where there is no accelerator.

    torch is only consulted if the process already imported it, so a scrape never pays for the
    import and the metrics module stays importable without torch.
    """

    def collect(self) -> Iterator[Metric]:
        torch = sys.modules.get("torch")
        if torch is None:
            return
        yield from _cuda_memory_families(torch)

    def describe(self) -> Iterable[Metric]:
        return []


def _cuda_memory_families(torch: Any) -> list[Metric]:
    if not torch.cuda.is_available():
        return []
    allocated = GaugeMetricFamily(
        f"{NAMESPACE}_accelerator_memory_allocated_bytes",
        "Accelerator memory held by live tensors.", labels=["device"])
    reserved = GaugeMetricFamily(
        f"{NAMESPACE}_accelerator_memory_reserved_bytes",
        "Accelerator memory reserved by the caching allocator.", labels=["device"])
    total = GaugeMetricFamily(
        f"{NAMESPACE}_accelerator_memory_total_bytes",
        "Total memory of the accelerator.", labels=["device"])
    for index in range(torch.cuda.device_count()):
        device = f"cuda:{index}"
        allocated.add_metric([device], float(torch.cuda.memory_allocated(index)))
        reserved.add_metric([device], float(torch.cuda.memory_reserved(index)))
        total.add_metric([device], float(torch.cuda.get_device_properties(index).total_memory))
    return [allocated, reserved, total]


@dataclass
class _LoadedAdapter:
    label: str
    memory_bytes: int


class Metrics:
    """Every Switchboard metric, the hooks that feed them and the HTTP endpoint exporting them."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 max_adapter_labels: int = 50, max_key_labels: int = 50) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._labels = AdapterLabels(max_adapter_labels)
        self._key_labels = AdapterLabels(max_key_labels)
        self._loaded: dict[str, _LoadedAdapter] = {}
        self._loaded_lock = threading.Lock()
        self._httpd: WSGIServer | None = None
        self._define_traffic()
        self._define_request_histograms()
        self._define_engine()
        self._define_adapters()
        self._define_context()
        self._define_resources()

    # -- definitions ------------------------------------------------------------------------

    def _counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
        return Counter(name, doc, list(labels), namespace=NAMESPACE, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
        return Gauge(name, doc, list(labels), namespace=NAMESPACE, registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...],
                   labels: Iterable[str] = ()) -> Histogram:
        return Histogram(name, doc, list(labels), namespace=NAMESPACE, buckets=buckets,
                         registry=self.registry)

    def _define_traffic(self) -> None:
        self.requests = self._counter(
            "requests", "Finished requests by adapter, gRPC status code (also for HTTP) and "
            "protocol (grpc or http).", ["adapter", "code", "protocol"])
        self.prompt_tokens = self._counter(
            "prompt_tokens", "Prompt tokens of finished requests (after truncation).", ["adapter"])
        self.generation_tokens = self._counter(
            "generation_tokens", "Tokens generated, counted as each one is emitted.", ["adapter"])
        self.rpcs = self._counter(
            "rpcs", "Finished calls of every method (gRPC methods, HTTP routes) by status code "
            "and protocol.", ["method", "code", "protocol"])
        self.key_requests = self._counter(
            "key_requests", "Finished chat RPCs by API key name and gRPC status code.",
            ["key", "code"])
        self.key_generation_tokens = self._counter(
            "key_generation_tokens", "Tokens generated for each API key name.", ["key"])
        self.key_rate_limited = self._counter(
            "key_rate_limited", "Requests refused by a key's own limit, by key name and limit.",
            ["key", "limit"])

    def _define_request_histograms(self) -> None:
        self._request_histograms = {
            name: self._histogram(name, doc, buckets, ["adapter"])
            for name, doc, buckets in REQUEST_HISTOGRAMS}

    def _define_engine(self) -> None:
        self.batch_size = self._histogram(
            "batch_size", "Rows in each engine step.", BATCH_SIZE_BUCKETS)
        self.adapters_per_step = self._histogram(
            "batch_adapters", "Distinct adapters (the base counts as one) in each engine step.",
            ADAPTERS_PER_STEP_BUCKETS)
        self.running = self._gauge("requests_running", "Requests in the running batch.")
        self.waiting = self._gauge("requests_waiting", "Requests queued, not yet admitted.")
        self.queue_capacity = self._gauge(
            "queue_capacity", "Configured limit of waiting requests (max_queue).")
        self.batch_capacity = self._gauge(
            "batch_capacity", "Configured limit of rows per step (max_batch).")

    def _define_adapters(self) -> None:
        self.adapters_loaded = self._gauge("adapters_loaded", "Adapters resident in the engine.")
        self.adapter_slots = self._gauge(
            "adapter_slots", "Configured limit of resident adapters (max_loaded_adapters).")
        self.adapter_memory = self._gauge(
            "adapter_memory_bytes", "Memory of resident adapter weights.", ["adapter"])
        self.adapter_loads = self._counter(
            "adapter_loads", "Adapters loaded into the engine.", ["adapter"])
        self.adapter_load_failures = self._counter(
            "adapter_load_failures", "Adapter loads that failed.", ["adapter"])
        self.adapter_evictions = self._counter(
            "adapter_evictions", "Adapters evicted to make room (LRU, never a pinned one).",
            ["adapter"])
        self.adapter_load_duration = self._histogram(
            "adapter_load_duration_seconds", "Time to read and install an adapter.",
            ADAPTER_LOAD_BUCKETS, ["adapter"])

    def _define_context(self) -> None:
        self.truncations = self._counter(
            "context_truncations", "Requests whose conversation was cut to fit the context.",
            ["strategy"])
        self.tokens_dropped = self._counter(
            "context_tokens_dropped", "Prompt tokens removed by truncation.", ["strategy"])
        self.messages_dropped = self._counter(
            "context_messages_dropped", "Messages removed or summarized by truncation.",
            ["strategy"])
        # Known label values start at zero so rate() has a series before the first truncation.
        for strategy in TRUNCATION_STRATEGIES:
            for counter in (self.truncations, self.tokens_dropped, self.messages_dropped):
                counter.labels(strategy)
        self.sessions = self._gauge("sessions_stored", "Conversations held by the session store.")

    def _define_resources(self) -> None:
        self.base_memory = self._gauge(
            "base_model_memory_bytes", "Memory of the base model's weights (4-bit and the rest).")
        self.build_info = Info(
            "build", "Switchboard build.", namespace=NAMESPACE, registry=self.registry)
        self.model_info = Info(
            "model", "The served base model and its device.", namespace=NAMESPACE,
            registry=self.registry)
        self.registry.register(AcceleratorMemoryCollector())
        # Process RSS and CPU (process_*) come from prometheus_client's collectors, in our registry.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    # -- engine observer hooks (engine thread) ----------------------------------------------

    def on_step(self, batch_size: int, running: int, waiting: int, adapters_in_batch: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        # An idle notification (empty step) updates the gauges without skewing the histograms.
        if batch_size > 0:
            self.batch_size.observe(batch_size)
            self.adapters_per_step.observe(adapters_in_batch)

    def on_adapter_loaded(self, key: str, seconds: float, memory_bytes: int) -> None:
        label = self._labels.label(key)
        self.adapter_loads.labels(label).inc()
        self.adapter_load_duration.labels(label).observe(seconds)
        with self._loaded_lock:
            self._loaded[key] = _LoadedAdapter(label, memory_bytes)
            self._refresh_adapter_memory(label)

    def on_adapter_load_failed(self, key: str) -> None:
        self.adapter_load_failures.labels(self._labels.label(key)).inc()

    def on_adapter_evicted(self, key: str) -> None:
        self.adapter_evictions.labels(self._labels.label(key)).inc()
        self._forget_adapter(key)

    def on_adapter_unloaded(self, key: str) -> None:
        """An explicit unload (not an eviction): only the resident set changes."""
        self._forget_adapter(key)

    def on_tokens(self, adapter_key: str | None, count: int) -> None:
        """`count` tokens generated for one adapter in one engine step."""
        self.generation_tokens.labels(self._labels.label(adapter_key)).inc(count)

    def _forget_adapter(self, key: str) -> None:
        with self._loaded_lock:
            entry = self._loaded.pop(key, None)
            if entry is not None:
                self._refresh_adapter_memory(entry.label)

    def _refresh_adapter_memory(self, label: str) -> None:
        """Recompute one label's memory (several keys share `other`); caller holds the lock."""
        self.adapters_loaded.set(len(self._loaded))
        total = sum(a.memory_bytes for a in self._loaded.values() if a.label == label)
        if any(a.label == label for a in self._loaded.values()):
            self.adapter_memory.labels(label).set(total)
        else:
            # No resident adapter has this label: drop the series instead of exporting a stale 0.
            try:
                self.adapter_memory.remove(label)
            except KeyError:
                pass

    # -- API hooks (event loop) -------------------------------------------------------------

    def observe_request(self, adapter: str | None, code: str, queue_wait_s: float | None,
                        ttft_s: float | None, total_s: float, prompt_tokens: int,
                        completion_tokens: int) -> None:
        """Record one finished RPC; latencies of requests that did not finish OK are not timed."""
        label = self._labels.label(adapter)
        status = _status_label(code)
        protocol = protocol_var.get()
        self.requests.labels(label, status, protocol if protocol in PROTOCOLS else "grpc").inc()
        if queue_wait_s is not None:
            self._observe("request_queue_wait_seconds", label, queue_wait_s)
        if ttft_s is not None:
            self._observe("time_to_first_token_seconds", label, ttft_s)
        if prompt_tokens > 0:
            self.prompt_tokens.labels(label).inc(prompt_tokens)
            self._observe("request_prompt_tokens", label, prompt_tokens)
        if status == "OK":
            self._observe("request_duration_seconds", label, total_s)
            self._observe("request_generation_tokens", label, completion_tokens)

    def _observe(self, histogram: str, label: str, value: float) -> None:
        self._request_histograms[histogram].labels(label).observe(value)

    def observe_rpc(self, method: str, code: str) -> None:
        """One finished call; `method` is a registered gRPC method or an HTTP route template
        (never a client-typed path, so the label stays bounded)."""
        protocol = protocol_var.get()
        self.rpcs.labels(method, _status_label(code),
                         protocol if protocol in PROTOCOLS else "grpc").inc()

    def observe_key_request(self, key_name: str, code: str, completion_tokens: int) -> None:
        """One finished chat of the key named `key_name` (its tokens, even when it failed)."""
        label = self._key_labels.label(key_name)
        self.key_requests.labels(label, _status_label(code)).inc()
        if completion_tokens > 0:
            self.key_generation_tokens.labels(label).inc(completion_tokens)

    def observe_rate_limited(self, key_name: str, limit: str) -> None:
        self.key_rate_limited.labels(self._key_labels.label(key_name),
                                     limit if limit in KEY_LIMITS else OTHER_LABEL).inc()

    def observe_inter_token(self, adapter: str | None, seconds: float) -> None:
        self._observe("inter_token_latency_seconds", self._labels.label(adapter), seconds)

    def observe_truncation(self, strategy: str, messages_dropped: int, tokens_dropped: int) -> None:
        label = _strategy_label(strategy)
        self.truncations.labels(label).inc()
        self.messages_dropped.labels(label).inc(messages_dropped)
        self.tokens_dropped.labels(label).inc(tokens_dropped)

    def set_sessions(self, count: int) -> None:
        self.sessions.set(count)

    def set_base_memory(self, num_bytes: int) -> None:
        self.base_memory.set(num_bytes)

    def set_capacity(self, max_queue: int, max_batch: int, max_loaded_adapters: int) -> None:
        """Configured limits, so alerts and panels can show saturation as a ratio."""
        self.queue_capacity.set(max_queue)
        self.batch_capacity.set(max_batch)
        self.adapter_slots.set(max_loaded_adapters)

    def set_info(self, version: str, base: str, device: str) -> None:
        self.build_info.info({"version": version, "python": platform.python_version()})
        self.model_info.info({"base": base, "device": device})

    # -- exporter ---------------------------------------------------------------------------

    def start_http(self, port: int = 0, host: str = "0.0.0.0") -> int:
        """Serve /metrics from a daemon thread; returns the bound port (useful with port 0)."""
        if self._httpd is not None:
            raise RuntimeError("metrics HTTP server already started")
        httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._httpd = httpd
        return int(httpd.server_port)

    def stop_http(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
