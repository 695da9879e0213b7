"""Blind rating sets: every answered turn becomes a pair with the shared history, sides and order
come from the seed, raters' file names no adapter, and the key maps every pair back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from finished_runs import answer, write_run

from evalsuite.ab.blindset import create_set, load_key, load_pairs
from evalsuite.ab.errors import RatingSetError


def test_every_turn_becomes_a_blind_pair_and_the_key_maps_it_back(
    tmp_path: Path
) -> None:
    run = write_run(tmp_path / "run", conversations=6, turns=2)
    pairs, key = create_set([run], tmp_path / "set", seed=7)
    assert len(pairs) == 12 and [p.id for p in pairs] == [f"p{n:02d}" for n in range(1, 13)]
    seen = (tmp_path / "set" / "pairs.json").read_text()
    assert "alpha" not in seen and "__base__" not in seen and '"c0"' not in seen
    assert load_pairs(tmp_path / "set") == pairs
    assert load_key(tmp_path / "set") == key
    for pair in pairs:
        k = key.pairs[pair.id]
        i, j = int(k.conversation[1:]), k.turn
        assert (pair.left, pair.right) == (answer(k.left, i, j), answer(k.right, i, j))
        assert {k.left, k.right} == {"alpha@1", "__base__"}
        # The same reference history beside both answers, ending with this turn's question.
        expected = []
        for t in range(j):
            expected += [{"role": "user", "content": f"question {i}.{t}"},
                         {"role": "assistant", "content": f"reference {i}.{t}"}]
        assert list(pair.history) == [*expected, {"role": "user", "content": f"question {i}.{j}"}]
    lefts = [k.left for k in key.pairs.values()]
    assert 0 < lefts.count("alpha@1") < len(lefts)
    assert sorted((k.conversation, k.turn) for k in key.pairs.values()) == sorted(
        (f"c{i}", j) for i in range(6) for j in range(2))


def test_the_seed_decides_sides_and_order(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", conversations=8)
    _, a = create_set([run], tmp_path / "a", seed=1)
    _, b = create_set([run], tmp_path / "b", seed=1)
    _, c = create_set([run], tmp_path / "c", seed=2)
    assert (tmp_path / "a" / "pairs.json").read_text().split('"pairs"')[1] == \
        (tmp_path / "b" / "pairs.json").read_text().split('"pairs"')[1]
    assert a.pairs == b.pairs and a.pairs != c.pairs
    assert json.loads((tmp_path / "c" / "key.json").read_text())["seed"] == 2


def test_failed_turns_are_left_out_and_free_mode_keeps_first_turns(
    tmp_path: Path
) -> None:
    run = write_run(tmp_path / "r1", conversations=3, failed=[("alpha@1", 0, 1),
                                                                 ("__base__", 2, 0)])
    _, key = create_set([run], tmp_path / "s1")
    assert sorted((k.conversation, k.turn) for k in key.pairs.values()) == [
        ("c0", 0), ("c1", 0), ("c1", 1), ("c2", 1)]
    free = write_run(tmp_path / "r2", conversations=3, mode="free")
    _, key = create_set([free], tmp_path / "s2")
    assert sorted((k.conversation, k.turn) for k in key.pairs.values()) == [
        ("c0", 0), ("c1", 0), ("c2", 0)]


def test_several_reports_and_candidates_with_a_cap_per_candidate(
    tmp_path: Path
) -> None:
    one = write_run(tmp_path / "one", candidates=("alpha@1", "beta@2"))
    two = write_run(tmp_path / "two", candidates=("gamma@1",))
    _, key = create_set([one, two], tmp_path / "set", max_pairs=5)
    per = {}
    for k in key.pairs.values():
        per[(Path(k.report).name, k.candidate)] = per.get((Path(k.report).name, k.candidate), 0) + 1
    assert per == {("one", "alpha@1"): 5, ("one", "beta@2"): 5, ("two", "gamma@1"): 5}
    assert [r["candidates"] for r in key.reports] == [["alpha@1", "beta@2"], ["gamma@1"]]


def test_unusable_inputs_say_what_to_fix(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run")
    create_set([run], tmp_path / "set")
    with pytest.raises(RatingSetError, match="a rating set is already there"):
        create_set([run], tmp_path / "set")
    with pytest.raises(RatingSetError, match=r"missing/report.json: cannot read the report"):
        create_set([tmp_path / "missing"], tmp_path / "s2")
    (run / "test.jsonl").unlink()
    with pytest.raises(RatingSetError, match="its test set .*test.jsonl cannot be read"):
        create_set([run], tmp_path / "s3")
    with pytest.raises(RatingSetError, match="--max-pairs must be >= 0, got -1"):
        create_set([run], tmp_path / "s4", max_pairs=-1)
    every = write_run(tmp_path / "bad", conversations=1, turns=1,
                         failed=[("alpha@1", 0, 0)])
    with pytest.raises(RatingSetError, match="nothing to rate"):
        create_set([every], tmp_path / "s5")
