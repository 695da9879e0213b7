"""The model judge's logic: MT-bench's pairwise prompts, verdict parsing, the two-order rule,
resuming, and its summary kept apart from people's ratings (a scripted chat client stands in for
the server here; test_ab_results.py runs the judge against the real one)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from evalsuite.ab.blindset import BlindPair, PairKey
from evalsuite.ab.judge import (
    PAIR_MULTI_SYSTEM,
    PAIR_SYSTEM,
    combine,
    judge_messages,
    judge_summary,
    load_verdicts,
    parse_verdict,
    run_judge,
)
from evalsuite.ab.store import SCORE_FIELDS, Rating

ONE_TURN = BlindPair("p1", ({"role": "user", "content": "Capital of France?"},), "Paris.", "Rome.")
TWO_TURNS = BlindPair("p2", ({"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "Capital of France?"}), "Paris.", "Lyon.")


def test_prompts_follow_mt_bench_pairwise_templates() -> None:
    system, user = judge_messages(ONE_TURN, "Paris.", "Rome.")
    assert system == {"role": "system", "content": PAIR_SYSTEM}
    assert user["content"] == (
        "[User Question]\nCapital of France?\n\n[The Start of Assistant A's Answer]\nParis.\n"
        "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\nRome.\n"
        "[The End of Assistant B's Answer]")
    assert PAIR_SYSTEM.endswith('"[[A]]" if assistant A is better, "[[B]]" if assistant B is '
                                'better, and "[[C]]" for a tie.')
    system, user = judge_messages(TWO_TURNS, "Paris.", "Lyon.")
    assert system["content"] == PAIR_MULTI_SYSTEM and "the last user question" in PAIR_MULTI_SYSTEM
    text = user["content"]
    assert text.startswith("<|The Start of Assistant A's Conversation with User|>\n\n### User:\nHi")
    assert "### Assistant A:\nHello!\n\n### User:\nCapital of France?\n\n### Assistant A:\nParis." \
        in text
    assert "### Assistant B:\nLyon.\n\n<|The End of Assistant B's Conversation with User|>" in text


@pytest.mark.parametrize(("text", "tag"), [
    ("A is better. [[A]]", "A"), ("Verdict: [[B]]", "B"), ("[[C]]", "C"), ("A wins", None),
])
def test_verdicts_are_read_as_mt_bench_reads_them(text: str, tag: str | None) -> None:
    assert parse_verdict(text) == tag


def test_a_side_wins_only_when_both_orders_agree() -> None:
    assert combine("A", "B") == "left"    # left first as A, then left second as B
    assert combine("B", "A") == "right"
    assert combine("A", "A") == "tie"     # the judge followed the position, not the answer
    assert combine("C", "C") == "tie"
    assert combine("A", None) == "error"


class ScriptedJudge:
    """Answers [[A]] when Paris is assistant A's answer, else [[B]] (a judge that knows)."""

    def __init__(self) -> None:
        self.calls = 0

    def chat(self, messages, **options):
        self.calls += 1
        text = messages[-1]["content"]
        a_is_paris = text.index("Paris.") < text.index("Assistant B")
        return SimpleNamespace(text="[[A]]" if a_is_paris else "[[B]]")


def test_run_judge_saves_after_each_pair_and_resumes(tmp_path: Path) -> None:
    judge = ScriptedJudge()
    verdicts = run_judge(judge, [ONE_TURN, TWO_TURNS], tmp_path, "judge@1", max_new_tokens=8)
    assert [(v.pair, v.choice) for v in verdicts] == [("p1", "left"), ("p2", "left")]
    assert judge.calls == 4 and load_verdicts(tmp_path) == verdicts
    run_judge(judge, [ONE_TURN, TWO_TURNS], tmp_path, "judge@1")
    assert judge.calls == 4  # nothing judged twice


def test_judge_summary_stays_apart_and_measures_agreement_with_people(tmp_path: Path) -> None:
    keys = {"p1": PairKey("p1", "/r", "c@1", "__base__", "c@1", "x", 0),
            "p2": PairKey("p2", "/r", "c@1", "__base__", "__base__", "y", 0)}
    verdicts = run_judge(ScriptedJudge(), [ONE_TURN, TWO_TURNS], tmp_path, "j")
    scores = {f: 3 for f in SCORE_FIELDS}
    people = [Rating("ann", "p1", "left", scores), Rating("ann", "p2", "right", scores)]
    (summary,) = judge_summary(verdicts, keys, people).values()
    # p1: left = candidate -> win; p2: left = baseline -> loss. People agreed on p1, not p2.
    assert summary["candidates"] == {"c@1": {"win": 1, "tie": 0, "loss": 1, "error": 0}}
    agreement = summary["agreement_with_people"]
    assert agreement["items"] == 2 and agreement["observed"] == 0.5
