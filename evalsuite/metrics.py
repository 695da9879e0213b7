"""Metrics, registered by name, computed from replayed conversations.

Each metric turns one conversation into a small statistics vector (`stats`) and many of those into
one number (`aggregate`). Keeping the two apart lets the bootstrap resample conversations cheaply:
for additive metrics the vectors are sums (ROUGE totals, BLEU and chrF n-gram counts exactly as
sacrebleu sums them for a corpus score), so a resample is a sum of rows; latency percentiles pool
per-turn samples instead. Failed turns are left out of quality metrics and counted in
`failure_rate`; gate on it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF

from evalsuite.replay import ConversationResult, TurnResult

Stats = np.ndarray


@dataclass(frozen=True)
class Metric:
    """A named metric; `higher_is_better` is None for neutral ones such as answer length."""

    name: str
    description: str
    higher_is_better: bool | None
    stats: Callable[[ConversationResult], Stats]
    aggregate: Callable[[Sequence[Stats]], float]
    additive: bool = True


_REGISTRY: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    if metric.name in _REGISTRY:
        raise ValueError(f"metric {metric.name!r} is registered twice")
    _REGISTRY[metric.name] = metric
    return metric


def get_metric(name: str) -> Metric:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known: {', '.join(_REGISTRY)}") from None


def metric_names() -> list[str]:
    return list(_REGISTRY)


# ---------------------------------------------------------------- per-turn helpers

@cache
def _rouge() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


@cache
def _bleu() -> BLEU:
    return BLEU()


@cache
def _chrf() -> CHRF:
    return CHRF()


def _scored_turns(conv: ConversationResult) -> list[TurnResult]:
    """Turns with both a prediction and a reference: the ones text metrics can judge."""
    return [t for t in conv.turns if t.ok and t.reference is not None]


def _ratio(stats: Sequence[Stats]) -> float:
    total = np.sum(stats, axis=0)
    return float(total[0] / total[1]) if total[1] else math.nan


def _sum_stats(stats: Sequence[Stats]) -> Stats:
    return np.sum(np.asarray(stats), axis=0)


def percentile(values: np.ndarray, q: float) -> float:
    """numpy's default (linear) percentile without its per-call overhead: the bootstrap calls
    this thousands of times on a few dozen values."""
    if not len(values):
        return math.nan
    ordered = np.sort(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def fact_found(fact: str, text: str) -> bool:
    """Case- and whitespace-insensitive containment."""
    return " ".join(fact.lower().split()) in " ".join(text.lower().split())


# ---------------------------------------------------------------- quality

def _rouge_metric(kind: str) -> Metric:
    def stats(conv: ConversationResult) -> Stats:
        turns = _scored_turns(conv)
        total = sum(_rouge().score(t.reference, t.prediction)[kind].fmeasure for t in turns)
        return np.array([total, len(turns)], dtype=float)

    return Metric(kind, f"{kind.upper()} F1 with stemming (rouge-score), mean over turns",
                  True, stats, _ratio)


def _corpus_metric(name: str, scorer: Callable[[], BLEU | CHRF], width: int) -> Metric:
    def stats(conv: ConversationResult) -> Stats:
        turns = _scored_turns(conv)
        if not turns:
            return np.zeros(width)
        rows = scorer()._extract_corpus_statistics(
            [t.prediction for t in turns], [[t.reference for t in turns]]
        )
        return np.sum(np.asarray(rows, dtype=float), axis=0)

    def aggregate(all_stats: Sequence[Stats]) -> float:
        total = _sum_stats(all_stats)
        if not total.any():
            return math.nan
        # sacrebleu's own corpus score from summed sufficient statistics.
        return float(scorer()._compute_score_from_stats([int(x) for x in total]).score)

    return Metric(name, f"{name} (sacrebleu, corpus level, 0-100)", True, stats, aggregate)


def _fact_recall_stats(conv: ConversationResult) -> Stats:
    # The data sets ask the LAST answer to repeat the facts given early in the conversation.
    if not conv.facts or not conv.turns:
        return np.zeros(2)
    last = conv.turns[-1]
    text = last.prediction if last.ok else ""
    found = sum(fact_found(f, text) for f in conv.facts)
    return np.array([found, len(conv.facts)], dtype=float)


def _perplexity_stats(conv: ConversationResult) -> Stats:
    turns = [t for t in conv.turns if t.log_likelihood is not None and t.score_tokens]
    return np.array([-sum(t.log_likelihood for t in turns), sum(t.score_tokens for t in turns)])


def _perplexity(stats: Sequence[Stats]) -> float:
    nll = _ratio(stats)
    return math.exp(nll) if not math.isnan(nll) else math.nan


# ---------------------------------------------------------------- latency and volume

def _latency_metric(name: str, attr: str, q: float, label: str) -> Metric:
    def stats(conv: ConversationResult) -> Stats:
        return np.array([getattr(t, attr) * 1000.0 for t in conv.turns if t.ok], dtype=float)

    def aggregate(all_stats: Sequence[Stats]) -> float:
        if not all_stats:
            return math.nan
        pooled = np.concatenate([np.asarray(s, dtype=float) for s in all_stats])
        return percentile(pooled, q)

    return Metric(name, f"{label} p{q:g} in ms over turns (server timings)", False, stats,
                  aggregate, additive=False)


def _tokens_per_s_stats(conv: ConversationResult) -> Stats:
    turns = [t for t in conv.turns if t.ok]
    return np.array([sum(t.completion_tokens for t in turns), sum(t.total_s for t in turns)])


def _answer_length_stats(conv: ConversationResult) -> Stats:
    turns = [t for t in conv.turns if t.ok]
    return np.array([sum(t.completion_tokens for t in turns), len(turns)], dtype=float)


def _failure_stats(conv: ConversationResult) -> Stats:
    return np.array([sum(not t.ok for t in conv.turns), len(conv.turns)], dtype=float)


for _kind in ("rouge1", "rouge2", "rougeL"):
    register(_rouge_metric(_kind))
register(_corpus_metric("bleu", _bleu, 10))
register(_corpus_metric("chrf", _chrf, 18))
register(Metric("fact_recall", "share of the conversation's facts repeated in its last answer",
                True, _fact_recall_stats, _ratio))
register(Metric("perplexity", "perplexity of the reference answers (Score RPC)", False,
                _perplexity_stats, _perplexity))
register(_latency_metric("ttft_p50_ms", "ttft_s", 50, "time to first token"))
register(_latency_metric("ttft_p95_ms", "ttft_s", 95, "time to first token"))
register(_latency_metric("p50_latency_ms", "total_s", 50, "total latency"))
register(_latency_metric("p95_latency_ms", "total_s", 95, "total latency"))
register(Metric("tokens_per_s", "completion tokens per second of request time", True,
                _tokens_per_s_stats, _ratio))
register(Metric("answer_length", "mean completion tokens per answer", None,
                _answer_length_stats, _ratio))
register(Metric("failure_rate", "share of turns that failed or were skipped", False,
                _failure_stats, _ratio))


# ---------------------------------------------------------------- whole-adapter summaries

def conversation_stats(metric: Metric, results: Sequence[ConversationResult]) -> list[Stats]:
    return [metric.stats(r) for r in results]


def metric_value(metric: Metric, results: Sequence[ConversationResult]) -> float:
    return metric.aggregate(conversation_stats(metric, results)) if results else math.nan


def failures_by_code(results: Sequence[ConversationResult]) -> dict[str, int]:
    codes = Counter(
        t.error_code if t.status == "failed" else "SKIPPED"
        for r in results for t in r.turns if not t.ok
    )
    return dict(sorted(codes.items()))


def corpus_signatures(results: Sequence[ConversationResult]) -> dict[str, dict[str, str]]:
    """The sacrebleu corpus scores and signatures, as sacrebleu prints them, for the report."""
    turns = [t for r in results for t in _scored_turns(r)]
    if not turns:
        return {}
    hyps, refs = [t.prediction for t in turns], [[t.reference for t in turns]]
    out = {}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        score = metric.corpus_score(hyps, refs)
        out[name] = {"score": str(score), "signature": str(metric.get_signature())}
    return out
