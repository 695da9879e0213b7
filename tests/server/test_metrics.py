"""Metrics: real registry, real HTTP scrape of `start_http`, label bounds and naming conventions."""

from __future__ import annotations

import threading
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from common.names import BASE_NAME
from server.metrics import OTHER_LABEL, Metrics


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels or None)


def _drive(metrics: Metrics) -> None:
    """One of each hook, as the engine and the API would call them."""
    metrics.set_info("0.1.0", "tiny-base", "cpu")
    metrics.set_capacity(max_queue=256, max_batch=16, max_loaded_adapters=8)
    metrics.on_adapter_loaded("alpha@1", 0.25, 4096)
    metrics.on_step(batch_size=2, running=2, waiting=1, adapters_in_batch=2)
    metrics.on_tokens("alpha@1", 3)
    metrics.on_tokens(None, 1)
    metrics.observe_inter_token("alpha@1", 0.02)
    metrics.observe_request("alpha@1", "OK", 0.01, 0.12, 0.9, 40, 3)
    metrics.observe_request("", "NOT_FOUND", None, None, 0.001, 0, 0)
    metrics.observe_truncation("drop_oldest", 2, 57)
    metrics.set_sessions(4)
    metrics.set_base_memory(123_456)


def test_hooks_feed_the_expected_series() -> None:
    metrics = Metrics()
    _drive(metrics)
    assert _value(metrics, "switchboard_requests_total", adapter="alpha@1",
                   code="OK", protocol="grpc") == 1
    assert _value(metrics, "switchboard_requests_total", adapter=BASE_NAME,
                   code="NOT_FOUND", protocol="grpc") == 1
    assert _value(metrics, "switchboard_generation_tokens_total", adapter="alpha@1") == 3
    assert _value(metrics, "switchboard_generation_tokens_total", adapter=BASE_NAME) == 1
    assert _value(metrics, "switchboard_prompt_tokens_total", adapter="alpha@1") == 40
    assert _value(metrics, "switchboard_time_to_first_token_seconds_count", adapter="alpha@1") == 1
    # A failed request is counted but not timed: it would drag the latency percentiles down.
    assert _value(metrics, "switchboard_request_duration_seconds_count", adapter=BASE_NAME) is None
    assert _value(metrics, "switchboard_inter_token_latency_seconds_sum", adapter="alpha@1") == 0.02
    assert _value(metrics, "switchboard_batch_size_sum") == 2
    assert _value(metrics, "switchboard_requests_waiting") == 1
    assert _value(metrics, "switchboard_context_truncations_total", strategy="drop_oldest") == 1
    assert _value(metrics, "switchboard_context_tokens_dropped_total", strategy="drop_oldest") == 57
    assert _value(metrics, "switchboard_context_truncations_total", strategy="middle_out") == 0
    assert _value(metrics, "switchboard_sessions_stored") == 4
    assert _value(metrics, "switchboard_base_model_memory_bytes") == 123_456
    assert _value(metrics, "switchboard_model_info", base="tiny-base", device="cpu") == 1


def test_adapter_memory_follows_loads_evictions_and_unloads() -> None:
    metrics = Metrics()
    metrics.on_adapter_loaded("alpha@1", 0.1, 1000)
    metrics.on_adapter_loaded("beta@1", 0.1, 500)
    assert _value(metrics, "switchboard_adapters_loaded") == 2
    metrics.on_adapter_evicted("alpha@1")
    metrics.on_adapter_unloaded("beta@1")
    metrics.on_adapter_load_failed("broken@1")
    assert _value(metrics, "switchboard_adapters_loaded") == 0
    assert _value(metrics, "switchboard_adapter_memory_bytes", adapter="alpha@1") is None
    assert _value(metrics, "switchboard_adapter_evictions_total", adapter="alpha@1") == 1
    assert _value(metrics, "switchboard_adapter_load_failures_total", adapter="broken@1") == 1
    assert _value(metrics, "switchboard_adapter_loads_total", adapter="beta@1") == 1


def test_adapter_labels_are_capped_with_an_other_bucket() -> None:
    metrics = Metrics(max_adapter_labels=2)
    for key in ("a@1", "b@1", "c@1", "d@1"):
        metrics.on_adapter_loaded(key, 0.1, 100)
        metrics.observe_request(key, "OK", 0.0, 0.1, 0.2, 5, 5)
    metrics.observe_request(None, "OK", 0.0, 0.1, 0.2, 5, 5)
    labels = {s.labels["adapter"] for s in _samples(metrics, "switchboard_requests_total")}
    assert labels == {"a@1", "b@1", OTHER_LABEL, BASE_NAME}
    assert _value(metrics, "switchboard_requests_total", adapter=OTHER_LABEL,
                   code="OK", protocol="grpc") == 2
    # Two resident adapters share `other`: their memory adds up under that one series.
    assert _value(metrics, "switchboard_adapter_memory_bytes", adapter=OTHER_LABEL) == 200
    metrics.on_adapter_evicted("c@1")
    assert _value(metrics, "switchboard_adapter_memory_bytes", adapter=OTHER_LABEL) == 100


def test_status_and_strategy_labels_are_bounded() -> None:
    metrics = Metrics()
    metrics.observe_request("a@1", "not-a-code", None, None, 0.0, 0, 0)
    metrics.observe_request("a@1", "StatusCode.UNAVAILABLE", None, None, 0.0, 0, 0)
    metrics.observe_truncation("made_up", 1, 1)
    assert _value(metrics, "switchboard_requests_total", adapter="a@1",
                   code="UNKNOWN", protocol="grpc") == 1
    assert _value(metrics, "switchboard_requests_total", adapter="a@1",
                   code="UNAVAILABLE", protocol="grpc") == 1
    assert _value(metrics, "switchboard_context_truncations_total", strategy=OTHER_LABEL) == 1


def test_registries_are_independent() -> None:
    first, second = Metrics(), Metrics(registry=CollectorRegistry())
    first.observe_request("a@1", "OK", None, None, 0.1, 1, 1)
    assert _value(second, "switchboard_requests_total", adapter="a@1",
                   code="OK", protocol="grpc") is None


def test_rejects_a_non_positive_label_cap() -> None:
    with pytest.raises(ValueError, match="max_adapter_labels"):
        Metrics(max_adapter_labels=0)


def test_hooks_are_thread_safe() -> None:
    metrics = Metrics(max_adapter_labels=5)

    def hammer(worker: int) -> None:
        for i in range(500):
            metrics.on_tokens(f"adapter{i % 20}@1", 1)

    threads = [threading.Thread(target=hammer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    samples = _samples(metrics, "switchboard_generation_tokens_total")
    assert len(samples) == 6  # five named adapters plus `other`
    assert sum(s.value for s in samples) == 2000


def test_http_endpoint_serves_conventional_names() -> None:
    metrics = Metrics()
    _drive(metrics)
    port = metrics.start_http(0, "127.0.0.1")
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        metrics.stop_http()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    for family in families.values():
        if family.name.startswith("switchboard_"):
            _check_convention(family.name, family.type)
    expected = {
        "switchboard_requests", "switchboard_time_to_first_token_seconds",
        "switchboard_inter_token_latency_seconds", "switchboard_request_duration_seconds",
        "switchboard_request_queue_wait_seconds", "switchboard_batch_size",
        "switchboard_adapter_memory_bytes", "switchboard_adapter_load_duration_seconds",
        "switchboard_context_tokens_dropped", "switchboard_sessions_stored",
        "switchboard_base_model_memory_bytes", "switchboard_build_info", "switchboard_model_info",
        "process_resident_memory_bytes",
    }
    assert expected <= set(families)


def _check_convention(name: str, kind: str) -> None:
    """Counters are exposed with `_total`; time and size use base units, never ms or MB."""
    assert not any(bad in name for bad in ("_ms", "milli", "_mb", "_kb", "_percent")), name
    if kind == "histogram" and ("latency" in name or "duration" in name or "wait" in name):
        assert name.endswith("_seconds"), name
    if "memory" in name:
        assert name.endswith("_bytes"), name


def _samples(metrics: Metrics, name: str) -> list:
    return [s for f in metrics.registry.collect() for s in f.samples if s.name == name]


def test_accelerator_memory_is_absent_without_cuda() -> None:
    """On this CPU build torch reports no CUDA device, so no accelerator series is invented."""
    import torch

    from server.metrics import AcceleratorMemoryCollector

    families = list(AcceleratorMemoryCollector().collect())
    if torch.cuda.is_available():
        names = {f.name for f in families}
        assert "switchboard_accelerator_memory_allocated_bytes" in names
    else:
        assert families == []
