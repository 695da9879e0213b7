"""An optional model judge for the same blind pairs: MT-bench's pairwise prompt, run through a
Switchboard target and an adapter the user names, kept apart from people's ratings.

The prompts are MT-bench's `pair-v2` (one turn) and `pair-v2-multi-turn` (the shared history
shown in both conversations; "the second user question" becomes "the last user question"). As in
MT-bench, each pair is judged twice with the answers swapped; a winner counts only when both
orders agree, otherwise the verdict is a tie, and an unparsable answer is an error. Verdicts go to
`<set>/judge.json` (resumable: judged pairs are not asked again) and are reported in their own
section; where people rated the same pairs, the judge's agreement with their majority is a kappa.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from common.names import adapter_name
from evalsuite.ab.agreement import cohen_kappa
from evalsuite.ab.blindset import BlindPair, PairKey
from evalsuite.ab.errors import RatingSetError
from evalsuite.ab.store import Rating

JUDGE_FILE = "judge.json"
_TAIL = (
    "Begin your evaluation by comparing the {what} and provide a short explanation. Avoid any "
    "position biases and ensure that the order in which the responses were presented does not "
    "influence your decision. Do not allow the length of the responses to influence your "
    "evaluation. Do not favor certain names of the assistants. Be as objective as possible. "
    "After providing your explanation, output your final verdict by strictly following this "
    "format: \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and "
    "\"[[C]]\" for a tie."
)
PAIR_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two "
    "AI assistants to the user question displayed below. You should choose the assistant that "
    "follows the user's instructions and answers the user's question better. Your evaluation "
    "should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, "
    "and level of detail of their responses. " + _TAIL.format(what="two responses")
)
PAIR_MULTI_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two "
    "AI assistants to the user questions. You should choose the assistant that follows the "
    "user's instructions and answers the user's questions better. Your evaluation should "
    "consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and level "
    "of detail of their responses. You should focus on who provides a better answer to the last "
    "user question. " + _TAIL.format(what="responses of the two assistants")
)


class ChatClient(Protocol):
    def chat(self, messages: Any, **options: Any) -> Any: ...


@dataclass(frozen=True)
class JudgeVerdict:
    """The judge's choice on one pair, in the rater's terms (left/right/tie) or "error"."""

    pair: str
    judge: str
    choice: str
    raw: tuple[str, str]


def _single_turn(question: str, a: str, b: str) -> str:
    return (f"[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{a}\n"
            f"[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{b}\n"
            f"[The End of Assistant B's Answer]")


def _conversation(name: str, history: Sequence[Mapping[str, str]], answer: str) -> str:
    lines = [f"<|The Start of Assistant {name}'s Conversation with User|>", ""]
    for m in history:
        speaker = "User" if m["role"] == "user" else f"Assistant {name}"
        if m["role"] in ("user", "assistant"):
            lines += [f"### {speaker}:", m["content"], ""]
    lines += [f"### Assistant {name}:", answer, "", f"<|The End of Assistant {name}'s "
              "Conversation with User|>"]
    return "\n".join(lines)


def judge_messages(pair: BlindPair, a: str, b: str) -> list[dict[str, str]]:
    """MT-bench's pairwise prompt for answers `a` and `b` after the pair's history."""
    users = [m for m in pair.history if m["role"] == "user"]
    if len(users) <= 1:
        question = users[-1]["content"] if users else ""
        return [{"role": "system", "content": PAIR_SYSTEM},
                {"role": "user", "content": _single_turn(question, a, b)}]
    body = (_conversation("A", pair.history, a) + "\n\n\n"
            + _conversation("B", pair.history, b))
    return [{"role": "system", "content": PAIR_MULTI_SYSTEM}, {"role": "user", "content": body}]


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "C" as MT-bench reads it (first tag found in that order), else None."""
    for tag in ("A", "B", "C"):
        if f"[[{tag}]]" in text:
            return tag
    return None


def combine(first: str | None, swapped: str | None) -> str:
    """Both orders agree on a side: that side; they disagree: tie; either unparsable: error."""
    if first is None or swapped is None:
        return "error"
    one = {"A": "left", "B": "right", "C": "tie"}[first]
    two = {"A": "right", "B": "left", "C": "tie"}[swapped]
    return one if one == two else "tie"


def judge_pair(client: ChatClient, pair: BlindPair, adapter: str, **options: Any) -> JudgeVerdict:
    texts = []
    for a, b in ((pair.left, pair.right), (pair.right, pair.left)):
        texts.append(client.chat(judge_messages(pair, a, b), adapter=adapter, **options).text)
    choice = combine(parse_verdict(texts[0]), parse_verdict(texts[1]))
    return JudgeVerdict(pair.id, adapter_name(adapter), choice, (texts[0], texts[1]))


def load_verdicts(set_dir: Path) -> list[JudgeVerdict]:
    path = Path(set_dir) / JUDGE_FILE
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["verdicts"]
        return [JudgeVerdict(r["pair"], r["judge"], r["choice"], tuple(r["raw"])) for r in rows]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise RatingSetError(f"{path}: not a judge file ({err}); move it away to judge "
                             "again") from None


def _save(set_dir: Path, verdicts: Sequence[JudgeVerdict]) -> None:
    path = Path(set_dir) / JUDGE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"verdicts": [asdict(v) for v in verdicts]}, indent=1,
                              ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)  # atomic: an interrupted run keeps the verdicts saved before it


def run_judge(client: ChatClient, pairs: Sequence[BlindPair], set_dir: Path, adapter: str,
              on_done: Callable[[JudgeVerdict], None] | None = None,
              **options: Any) -> list[JudgeVerdict]:
    """Judge every pair this judge has not judged yet, saving after each."""
    judge = adapter_name(adapter)
    verdicts = load_verdicts(set_dir)
    done = {v.pair for v in verdicts if v.judge == judge}
    for pair in pairs:
        if pair.id in done:
            continue
        verdicts.append(judge_pair(client, pair, adapter, **options))
        _save(set_dir, verdicts)
        if on_done is not None:
            on_done(verdicts[-1])
    return verdicts


def _people_majority(ratings: Sequence[Rating], keys: Mapping[str, PairKey]) -> dict[str, str]:
    """Per pair, the outcome most people chose (both bad counts as a tie); no clear majority:
    left out."""
    votes: dict[str, Counter] = {}
    for r in ratings:
        outcome = keys[r.pair].outcome(r.choice)
        votes.setdefault(r.pair, Counter())["tie" if outcome == "both_bad" else outcome] += 1
    majority = {}
    for pair, counter in votes.items():
        (top, n), *rest = counter.most_common()
        if not rest or rest[0][1] < n:
            majority[pair] = top
    return majority


def judge_summary(verdicts: Sequence[JudgeVerdict], keys: Mapping[str, PairKey],
                  ratings: Sequence[Rating]) -> dict[str, Any]:
    """Per judge and candidate: win / tie / loss counts and errors; the judge's kappa with the
    people's majority where both judged a pair. Never mixed into people's numbers."""
    people = _people_majority([r for r in ratings if r.pair in keys], keys)
    out: dict[str, Any] = {}
    for judge in sorted({v.judge for v in verdicts}):
        mine = [v for v in verdicts if v.judge == judge and v.pair in keys]
        per_cand: dict[str, Counter] = {}
        for v in mine:
            key = keys[v.pair]
            per_cand.setdefault(key.candidate, Counter())[
                "error" if v.choice == "error" else key.outcome(v.choice)] += 1
        both = [v for v in mine if v.choice != "error" and v.pair in people]
        agreement = (cohen_kappa([keys[v.pair].outcome(v.choice) for v in both],
                                 [people[v.pair] for v in both]).to_dict() if both else None)
        out[judge] = {"pairs": len(mine), "agreement_with_people": agreement,
                      "candidates": {c: {"win": n["win"], "tie": n["tie"], "loss": n["loss"],
                                         "error": n["error"]} for c, n in per_cand.items()}}
    return out
