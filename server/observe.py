"""A finished call's record (server/core/record.py) into the metrics, once, at the edge.

Both edges call `observe_call` when a call has its answer: every call counts in
`switchboard_rpcs_total` by method; chats also count in the per-adapter request series (with
their engine timings, tokens, truncation and per-key counts), and each summary a chat needed
counts as a request of its own on the summarize adapter.
"""

from __future__ import annotations

from typing import Any

from server.core.record import CallRecord, EngineUsage
from server.ratelimit import RateLimitedError
from server.status import code_name


def _observe_engine(metrics: Any, usage: EngineUsage, code: str) -> None:
    metrics.observe_request(usage.adapter, code, usage.queue_wait_s, usage.ttft_s,
                            usage.total_s, usage.prompt_tokens, usage.completion_tokens)


def _observe_chat(metrics: Any, record: CallRecord, code: str, elapsed_s: float) -> None:
    if record.answer is not None and code == "OK":
        _observe_engine(metrics, record.answer, code)
    else:  # refused or failed: counted, not timed (it would drag the percentiles down)
        metrics.observe_request(record.adapter_key, code, None, None, elapsed_s, 0, 0)
    label = record.adapter_key
    for gap in record.inter_token_s:
        metrics.observe_inter_token(label, gap)
    if record.key_name:  # a chat refused before the core knew its caller has none
        metrics.observe_key_request(record.key_name, code, record.generated)


def observe_call(metrics: Any, method: str, record: CallRecord, elapsed_s: float) -> None:
    """Record one finished call of `method`; `record.error` None means it answered OK."""
    if metrics is None:
        return
    code = code_name(record.error)
    metrics.observe_rpc(method, code)
    if isinstance(record.error, RateLimitedError):
        metrics.observe_rate_limited(record.key_name, record.error.limit)
    if record.chat:
        _observe_chat(metrics, record, code, elapsed_s)
    for summary in record.summaries:
        _observe_engine(metrics, summary, "OK")
    if record.truncation is not None:
        t = record.truncation
        metrics.observe_truncation(t.strategy, t.messages_dropped, t.tokens_dropped)
    if record.sessions_stored is not None:
        metrics.set_sessions(record.sessions_stored)
