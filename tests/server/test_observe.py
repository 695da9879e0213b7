"""A call's record into the metrics, once: every call by method; chats per adapter and key;
summaries as requests of their own; failed calls counted, not timed."""

from __future__ import annotations

from common.names import BASE_NAME
from server.core.record import CallRecord, EngineUsage, TruncationUsage
from server.errors import NotFoundError
from server.metrics import OTHER_LABEL, Metrics
from server.observe import observe_call
from server.ratelimit import RateLimitedError

CHAT = "/switchboard.v1.InferenceService/Chat"


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_an_ok_chat_is_counted_timed_and_charged_to_its_key() -> None:
    metrics = Metrics()
    record = CallRecord(key_name="team-a", generated=3, inter_token_s=[0.01, 0.02])
    record.begin_chat("")
    record.resolve(None)
    record.answer = EngineUsage(None, 0.01, 0.02, 0.5, 10, 3)
    record.truncation = TruncationUsage("drop_oldest", 2, 40)
    record.summaries.append(EngineUsage("writer@1", 0.0, 0.01, 0.2, 30, 8))
    observe_call(metrics, CHAT, record, 0.6)
    assert value(metrics, "switchboard_rpcs_total", method=CHAT, code="OK",
                 protocol="grpc") == 1
    assert value(metrics, "switchboard_requests_total", adapter=BASE_NAME, code="OK",
                 protocol="grpc") == 1
    assert value(metrics, "switchboard_requests_total", adapter="writer@1", code="OK",
                 protocol="grpc") == 1
    assert value(metrics, "switchboard_request_duration_seconds_count", adapter=BASE_NAME) == 1
    assert value(metrics, "switchboard_inter_token_latency_seconds_count",
                 adapter=BASE_NAME) == 2
    assert value(metrics, "switchboard_key_generation_tokens_total", key="team-a") == 3
    assert value(metrics, "switchboard_context_truncations_total", strategy="drop_oldest") == 1


def test_a_failed_chat_with_an_unresolved_name_is_counted_not_timed() -> None:
    metrics = Metrics()
    record = CallRecord(error=NotFoundError("no such adapter"))
    record.begin_chat("typo")
    observe_call(metrics, CHAT, record, 0.1)
    assert value(metrics, "switchboard_requests_total", adapter=OTHER_LABEL, code="NOT_FOUND",
                 protocol="grpc") == 1
    assert value(metrics, "switchboard_request_duration_seconds_count",
                 adapter=OTHER_LABEL) is None


def test_an_admin_call_counts_only_by_method_and_a_rate_limit_by_key() -> None:
    metrics = Metrics()
    observe_call(metrics, "/switchboard.v1.AdapterService/ListAdapters", CallRecord(), 0.0)
    refused = CallRecord(key_name="slow",
                         error=RateLimitedError("slow down", 1.0, "requests_per_minute"))
    observe_call(metrics, "/switchboard.v1.InferenceService/Score", refused, 0.0)
    assert value(metrics, "switchboard_rpcs_total",
                 method="/switchboard.v1.AdapterService/ListAdapters", code="OK",
                 protocol="grpc") == 1
    assert value(metrics, "switchboard_key_rate_limited_total", key="slow",
                 limit="requests_per_minute") == 1
    assert value(metrics, "switchboard_requests_total", adapter=BASE_NAME, code="OK",
                 protocol="grpc") is None


def test_no_metrics_port_records_nothing() -> None:
    observe_call(None, CHAT, CallRecord(), 0.0)
