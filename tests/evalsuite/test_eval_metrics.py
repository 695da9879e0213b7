"""Metric values on fixed strings and timings, checked against the libraries computed directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF

from evalsuite.metrics import (
    conversation_stats,
    corpus_signatures,
    fact_found,
    failures_by_code,
    get_metric,
    metric_names,
    metric_value,
)
from evalsuite.replay import ConversationResult, TurnResult


def turn(pred: str, ref: str | None = None, **kw) -> TurnResult:
    return TurnResult(index=kw.pop("index", 0), reference=ref, prediction=pred, **kw)


def conv(*turns: TurnResult, facts: tuple[str, ...] = ()) -> ConversationResult:
    return ConversationResult("c", "sha256:x", "a@1", "reference", list(turns), facts=facts)


PAIRS = [
    ("the cats are sitting on the mat", "the cat sat on the mat"),
    ("your order 1234 ships on Monday", "Order 1234 will ship on Monday, Maria."),
    ("hello there", "good morning to you"),
]


def test_registry_lists_every_metric_and_rejects_unknown_names() -> None:
    assert metric_names() == [
        "rouge1", "rouge2", "rougeL", "bleu", "chrf", "fact_recall", "perplexity",
        "ttft_p50_ms", "ttft_p95_ms", "p50_latency_ms", "p95_latency_ms", "tokens_per_s",
        "answer_length", "failure_rate",
    ]
    with pytest.raises(KeyError, match="unknown metric 'rogue'; known: rouge1"):
        get_metric("rogue")


def test_rouge_is_the_stemmed_mean_over_turns() -> None:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    results = [conv(*(turn(p, r) for p, r in PAIRS[:2])), conv(turn(*PAIRS[2]))]
    for kind in ("rouge1", "rougeL"):
        expected = np.mean([scorer.score(r, p)[kind].fmeasure for p, r in PAIRS])
        assert metric_value(get_metric(kind), results) == pytest.approx(expected)
    # Stemming: "cats" matches "cat", so rouge1 beats a no-stemming count.
    assert metric_value(get_metric("rouge1"), [conv(turn("cats", "cat"))]) == 1.0


def test_bleu_and_chrf_equal_sacrebleu_corpus_scores() -> None:
    results = [conv(turn(p, r)) for p, r in PAIRS]
    hyps, refs = [p for p, _ in PAIRS], [[r for _, r in PAIRS]]
    assert metric_value(get_metric("bleu"), results) == pytest.approx(
        BLEU().corpus_score(hyps, refs).score)
    assert metric_value(get_metric("chrf"), results) == pytest.approx(
        CHRF().corpus_score(hyps, refs).score)
    sigs = corpus_signatures(results)
    assert sigs["bleu"]["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert sigs["chrf"]["score"].startswith("chrF2 = ")


def test_failed_turns_and_turns_without_reference_are_not_scored() -> None:
    results = [conv(turn("x y", "x y"), turn("", "a b", status="failed", error_code="INTERNAL"),
                    turn("free text", None))]
    assert metric_value(get_metric("rougeL"), results) == 1.0
    assert math.isnan(metric_value(get_metric("rougeL"), [conv(turn("a", None))]))
    assert math.isnan(metric_value(get_metric("bleu"), [conv(turn("a", None))]))


def test_fact_recall_reads_the_last_answer() -> None:
    results = [
        conv(turn("Hi Maria"), turn("order #A-12 is ready, MARIA", index=1),
             facts=("Maria", "A-12", "Garcia")),
        conv(turn("no facts here")),  # no facts listed: does not count
        conv(turn("Maria order A-12"), turn("nothing", index=1), facts=("Maria", "A-12")),
    ]
    assert metric_value(get_metric("fact_recall"), results) == pytest.approx(2 / 5)
    assert fact_found("order  number\n42", "Your ORDER number 42.")


def test_perplexity_pools_log_likelihood_over_tokens() -> None:
    results = [conv(turn("a", "b", log_likelihood=-4.0, score_tokens=2),
                    turn("a", "b", log_likelihood=-2.0, score_tokens=4, index=1)),
               conv(turn("a", "b", score_error_code="UNIMPLEMENTED"))]
    assert metric_value(get_metric("perplexity"), results) == pytest.approx(math.exp(6 / 6))


def test_latency_percentiles_throughput_length_and_failures() -> None:
    turns = [turn("x", ttft_s=0.01 * (i + 1), total_s=0.1 * (i + 1), completion_tokens=10,
                  index=i) for i in range(10)]
    turns.append(turn("", status="failed", error_code="DEADLINE_EXCEEDED", index=10))
    turns.append(turn("", status="skipped", index=11))
    results = [conv(*turns[:6]), conv(*turns[6:])]
    value = {name: metric_value(get_metric(name), results) for name in metric_names()}
    totals = [100.0 * (i + 1) for i in range(10)]
    assert value["p50_latency_ms"] == pytest.approx(np.percentile(totals, 50))
    assert value["p95_latency_ms"] == pytest.approx(np.percentile(totals, 95))
    assert value["ttft_p95_ms"] == pytest.approx(np.percentile([t / 10 for t in totals], 95))
    assert value["tokens_per_s"] == pytest.approx(100 / 5.5)
    assert value["answer_length"] == 10
    assert value["failure_rate"] == pytest.approx(2 / 12)
    assert failures_by_code(results) == {"DEADLINE_EXCEEDED": 1, "SKIPPED": 1}
    assert get_metric("p95_latency_ms").higher_is_better is False
    assert not get_metric("p95_latency_ms").additive


def test_per_conversation_stats_sum_to_the_corpus() -> None:
    results = [conv(turn(p, r)) for p, r in PAIRS]
    metric = get_metric("bleu")
    stats = conversation_stats(metric, results)
    assert metric.aggregate([np.sum(stats, axis=0)]) == metric.aggregate(stats)
