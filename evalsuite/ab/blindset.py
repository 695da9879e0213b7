"""Blind rating sets: pairs of answers to the same turn, made from finished `evalsuite run` reports.

A set is a directory with two files kept apart: `pairs.json`, all the rating page ever reads (the
shared history and two answers per pair, left and right), and `key.json`, which says for each
pair which adapter is on which side, the candidate, the baseline, the conversation and the turn.
Left/right order and the order of the pairs come from one seeded `random.Random`, recorded in
the key. The history beside both answers is the test set's own (reference) history, so it is the
same for both; in `free` mode each adapter saw its own earlier answers, so only first turns,
whose history is shared, become pairs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.data import DataError
from evalsuite.ab.errors import RatingSetError
from evalsuite.testsets import EvalConversation, load_testset

SCHEMA_VERSION = 1
PAIRS_FILE, KEY_FILE, RATINGS_FILE = "pairs.json", "key.json", "ratings.sqlite"


@dataclass(frozen=True)
class BlindPair:
    """What a rater sees: the history (ending with the user's turn) and two unnamed answers."""

    id: str
    history: tuple[Mapping[str, str], ...]
    left: str
    right: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "history": [dict(m) for m in self.history],
                "left": self.left, "right": self.right}


@dataclass(frozen=True)
class PairKey:
    """What a rater never sees: whose answers the pair holds and where they came from."""

    pair: str
    report: str
    candidate: str
    baseline: str
    left: str
    conversation: str
    turn: int

    def outcome(self, choice: str) -> str:
        """A rater's choice seen from the candidate's side: win, loss, tie or both_bad."""
        if choice in ("left", "right"):
            winner = self.left if choice == "left" else self.right
            return "win" if winner == self.candidate else "loss"
        return choice

    @property
    def right(self) -> str:
        return self.baseline if self.left == self.candidate else self.candidate

    @property
    def candidate_side(self) -> str:
        return "left" if self.left == self.candidate else "right"


@dataclass(frozen=True)
class SetKey:
    """The whole key: the seed, the source reports, and one PairKey per pair id."""

    seed: int
    reports: tuple[Mapping[str, Any], ...]
    pairs: Mapping[str, PairKey]


@dataclass(frozen=True)
class _Draft:
    report: str
    candidate: str
    baseline: str
    conversation: str
    turn: int
    history: tuple[Mapping[str, str], ...]
    candidate_answer: str
    baseline_answer: str


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise RatingSetError(f"{path}: cannot read the {what}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise RatingSetError(f"{path}: the {what} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise RatingSetError(f"{path}: the {what} must be a JSON object")
    return data


def _testset_by_hash(report: Mapping[str, Any], report_dir: Path) -> dict[str, EvalConversation]:
    paths = [Path(p) for p in report["run"]["testsets"]]
    try:
        return {c.hash: c for c in load_testset(paths)}
    except (DataError, ValueError) as err:
        raise RatingSetError(f"{report_dir}: its test set cannot be loaded: {err}") from None
    except OSError as err:
        raise RatingSetError(
            f"{report_dir}: its test set {err.filename} cannot be read ({err.strerror}); the "
            "rating set shows the test set's history, so run `ab create` where the run ran"
        ) from None


def _shared_history(conv: EvalConversation, turn: int) -> tuple[Mapping[str, str], ...] | None:
    """The reference history before `turn` plus that turn's new messages; None when an earlier
    turn has no reference (each adapter then saw its own answer, so no history is shared)."""
    history: list[Mapping[str, str]] = []
    for ex in conv.exchanges[:turn]:
        if ex.reference is None:
            return None
        history += [m.to_dict() for m in ex.messages]
        history.append({"role": "assistant", "content": ex.reference})
    return tuple(history + [m.to_dict() for m in conv.exchanges[turn].messages])


def _report_drafts(report_dir: Path) -> tuple[list[_Draft], dict[str, Any]]:
    report = _read_json(report_dir / "report.json", "report")
    try:
        baseline, candidates = report["baseline"], list(report["candidates"])
        convs, mode = report["conversations"], report["run"]["mode"]
    except (KeyError, TypeError) as err:
        raise RatingSetError(f"{report_dir}/report.json: not an `evalsuite run` report "
                             f"(missing {err})") from None
    testset = _testset_by_hash(report, report_dir)
    drafts = []
    for cand in candidates:
        for base_conv, cand_conv in zip(convs[baseline], convs[cand], strict=True):
            conv = testset.get(base_conv["conversation_hash"])
            if conv is None:
                raise RatingSetError(
                    f"{report_dir}: conversation {base_conv['conversation_id']!r} is not in "
                    f"{', '.join(report['run']['testsets'])} any more (the file changed)"
                )
            turns = range(1 if mode == "free" else len(conv.exchanges))
            for j in turns:
                b, c = base_conv["turns"][j], cand_conv["turns"][j]
                history = _shared_history(conv, j)
                if history is None or b["status"] != "ok" or c["status"] != "ok":
                    continue
                drafts.append(_Draft(str(report_dir), cand, baseline, conv.id, j, history,
                                     c["prediction"], b["prediction"]))
    meta = {"dir": str(report_dir), "baseline": baseline, "candidates": candidates, "mode": mode,
            "testset_fingerprint": report["run"]["testset_fingerprint"]}
    return drafts, meta


def _sample(drafts: list[_Draft], max_pairs: int, rng: random.Random) -> list[_Draft]:
    """At most `max_pairs` per (report, candidate), drawn at random, in their original order."""
    if not max_pairs:
        return drafts
    groups: dict[tuple[str, str], list[int]] = {}
    for i, d in enumerate(drafts):
        groups.setdefault((d.report, d.candidate), []).append(i)
    keep = sorted(i for idx in groups.values() for i in rng.sample(idx, min(max_pairs, len(idx))))
    return [drafts[i] for i in keep]


def _blind(drafts: Sequence[_Draft], rng: random.Random) -> tuple[list[BlindPair], list[PairKey]]:
    """Random sides for each pair, then a random order; ids follow the order raters see."""
    sides = [rng.random() < 0.5 for _ in drafts]
    order = list(range(len(drafts)))
    rng.shuffle(order)
    width = len(str(len(drafts)))
    pairs, keys = [], []
    for n, i in enumerate(order, start=1):
        d, cand_left = drafts[i], sides[i]
        pid = f"p{n:0{width}d}"
        left, right = ((d.candidate_answer, d.baseline_answer) if cand_left
                       else (d.baseline_answer, d.candidate_answer))
        pairs.append(BlindPair(pid, d.history, left, right))
        keys.append(PairKey(pid, d.report, d.candidate, d.baseline,
                            d.candidate if cand_left else d.baseline, d.conversation, d.turn))
    return pairs, keys


def create_set(report_dirs: Sequence[Path], out: Path, *, seed: int = 0,
               max_pairs: int = 0) -> tuple[list[BlindPair], SetKey]:
    """Write `out/pairs.json` and `out/key.json` from the reports; refuse to overwrite a set."""
    if max_pairs < 0:
        raise RatingSetError(f"--max-pairs must be >= 0, got {max_pairs}")
    if (out / PAIRS_FILE).exists():
        raise RatingSetError(f"{out}: a rating set is already there; choose a new --out")
    drafts, metas = [], []
    for report_dir in report_dirs:
        found, meta = _report_drafts(Path(report_dir).resolve())
        drafts += found
        metas.append(meta)
    if not drafts:
        raise RatingSetError("the reports hold no turn that both the candidate and the baseline "
                             "answered; nothing to rate")
    rng = random.Random(seed)
    pairs, keys = _blind(_sample(drafts, max_pairs, rng), rng)
    out.mkdir(parents=True, exist_ok=True)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    (out / KEY_FILE).write_text(json.dumps({
        "schema": SCHEMA_VERSION, "created": created, "seed": seed, "reports": metas,
        "pairs": [asdict(k) for k in keys]}, indent=1, ensure_ascii=False), encoding="utf-8")
    (out / PAIRS_FILE).write_text(json.dumps({
        "schema": SCHEMA_VERSION, "created": created, "pairs": [p.to_dict() for p in pairs]},
        indent=1, ensure_ascii=False), encoding="utf-8")
    return pairs, SetKey(seed, tuple(metas), {k.pair: k for k in keys})


def _check_schema(data: Mapping[str, Any], path: Path) -> None:
    if data.get("schema") != SCHEMA_VERSION:
        raise RatingSetError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA_VERSION}")


def load_pairs(set_dir: Path) -> list[BlindPair]:
    """The pairs in the order raters see them (the rating page reads only this)."""
    path = Path(set_dir) / PAIRS_FILE
    data = _read_json(path, "rating set")
    _check_schema(data, path)
    return [BlindPair(p["id"], tuple(p["history"]), p["left"], p["right"]) for p in data["pairs"]]


def load_key(set_dir: Path) -> SetKey:
    path = Path(set_dir) / KEY_FILE
    data = _read_json(path, "rating key")
    _check_schema(data, path)
    keys = {k["pair"]: PairKey(**k) for k in data["pairs"]}
    return SetKey(int(data["seed"]), tuple(data["reports"]), keys)
