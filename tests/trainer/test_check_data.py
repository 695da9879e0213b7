"""`trainer check-data` on the tiny base's tokenizer and template: every problem that breaks or
weakens training is named with its line, the trained tokens are shown, `--fix` writes a cleaned
file with the reasons for each drop, and `trainer fit` refuses untrainable data before any model
loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_trainer

from trainer.check_data import check_file


def _chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


def _ordinary(i: int) -> dict:
    return _chat(("user", f"Question number {i} about the weather today?"),
                 ("assistant", f"Answer {i}: sunny with a light breeze."))


# Line -> (record or raw line, the problem kind it must be reported with).
PROBLEMS = {
    2: (_chat(("user", "   "), ("assistant", "ok")), "empty turn"),
    3: (_chat(("user", "a"), ("user", "b"), ("assistant", "c")), "consecutive roles"),
    4: (_chat(("user", "only a question")), "no assistant turn"),
    5: (_chat(("user", "q"), ("system", "be nice"), ("assistant", "c")),
        "system mid-conversation"),
    6: (_ordinary(0), "duplicate"),
    7: ({"messages": [{"role": "user", "content": "question NUMBER 0 about the weather today"},
                      {"role": "assistant", "content": "answer 0 sunny with a light breeze"}]},
        "near duplicate"),
    8: (_chat(("user", "日本語 please"), ("assistant", "sure")), "unknown tokens"),
    9: (_chat(("user", "hi"), ("assistant", "done <|end|> and more")), "control tokens"),
    10: ("{not json", "unreadable"),
    11: (_chat(("user", "hi"), ("assistant", "fine"), ("user", "and?")), "no final answer"),
    12: (_chat(("user", " ".join(["word"] * 150)), ("assistant", "short")), "long turn"),
    13: (_chat(("user", "tell me about the forbidden recipe"), ("assistant", "no")),
         "blocklisted"),
}


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Line 1 is good, lines 2-13 each have one problem, lines 14-23 are good filler (so the
    long turn stands out against enough ordinary turns)."""
    lines = [json.dumps(_ordinary(0))]
    for line in sorted(PROBLEMS):
        record = PROBLEMS[line][0]
        lines.append(record if isinstance(record, str) else json.dumps(record, ensure_ascii=False))
    lines += [json.dumps(_ordinary(i)) for i in range(1, 11)]
    path = tmp_path_factory.mktemp("check") / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def blocklist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("blocklist") / "blocklist.txt"
    path.write_text("# terms whose conversations --fix drops\nForbidden Recipe\n")
    return path


def test_every_problem_is_named_with_its_line(tiny_base: Path, bad_file: Path,
                                              blocklist: Path) -> None:
    code, out = run_trainer(["check-data", str(bad_file), "--base", str(tiny_base),
                             "--blocklist", str(blocklist), "--color", "never"])
    assert code == 1  # errors: the file would break training
    for line, (_, kind) in PROBLEMS.items():
        assert any(row.startswith(f"{bad_file}:{line}: ") and f": {kind}: " in row
                   for row in out.splitlines()), (line, kind)
    reported = {int(row.split(":")[1]) for row in out.splitlines()
                if row.startswith(f"{bad_file}:") and row.split(":")[1].isdigit()}
    assert reported == set(PROBLEMS), "good lines must not be reported"
    assert f"{bad_file}:6: warning: duplicate: same as line 1" in out
    assert "23 conversations" in out


def test_the_summary_counts_and_the_mask_shows_only_answers(tiny_base: Path,
                                                            bad_file: Path) -> None:
    code, out = run_trainer(["check-data", str(bad_file), "--base", str(tiny_base),
                             "--color", "never", "--show", "1"])
    assert code == 1
    rendered = out.split("--- line 1, trained tokens in [[ ]]\n")[1]
    assert "[[Answer 0: sunny with a light breeze.<|end|>]]" in rendered
    assert "[[" not in rendered.split("<|assistant|>")[0]  # the question is not trained


def test_a_template_without_generation_marks_trains_nothing(tiny_base: Path,
                                                            tmp_path: Path) -> None:
    from common.modeling import load_tokenizer

    copy = tmp_path / "base"
    shutil.copytree(tiny_base, copy)
    template = copy / "chat_template.jinja"
    text = template.read_text().replace("{% generation %}", "").replace("{% endgeneration %}", "")
    template.write_text(text)
    data = tmp_path / "ok.jsonl"
    data.write_text(json.dumps(_ordinary(1)) + "\n")
    check = check_file(data, load_tokenizer(str(copy)), 320)
    assert [(p.line, p.kind) for p in check.problems] == [(1, "nothing trained")]


def test_answers_beyond_max_length_are_flagged(tiny_base: Path, tmp_path: Path) -> None:
    from common.modeling import load_tokenizer

    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(_chat(("user", " ".join(["word"] * 40)), ("assistant", "x"))) + "\n")
    check = check_file(data, load_tokenizer(str(tiny_base)), 16)
    assert [(p.line, p.kind) for p in check.problems] == [(1, "cut at max_length")]
    assert check.stats["cut_at_max_length"] == 1 and check.stats["trained_tokens"] == 0


def test_fix_writes_the_clean_records_and_why_the_others_went(
    tiny_base: Path, bad_file: Path, blocklist: Path, tmp_path: Path
) -> None:
    out_file = tmp_path / "clean.jsonl"
    code, out = run_trainer(["check-data", str(bad_file), "--base", str(tiny_base),
                             "--blocklist", str(blocklist), "--fix", str(out_file)])
    assert code == 1
    report = json.loads((tmp_path / "clean.report.json").read_text())
    dropped = {row["line"]: row["reasons"] for row in report["dropped_lines"]}
    # Long turns are kept (a cost, not a defect); every other problem line is dropped.
    assert set(dropped) == set(PROBLEMS) - {12}
    assert dropped[13] == ["blocklisted: contains forbidden recipe"]
    kept = out_file.read_text().splitlines()
    assert len(kept) == report["kept"] == 23 - len(dropped)
    code, out = run_trainer(["check-data", str(out_file), "--base", str(tiny_base)])
    assert code == 0, out
    assert "0 errors" in out


def test_a_missing_file_is_a_usage_error(tiny_base: Path, tmp_path: Path, capsys) -> None:
    code, _ = run_trainer(["check-data", str(tmp_path / "nope.jsonl"), "--base", str(tiny_base)])
    assert code == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_fit_refuses_untrainable_data_with_every_line(tiny_base: Path, tmp_path: Path,
                                                     monkeypatch, capsys) -> None:
    import common.modeling

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(common.modeling, "load_base", must_not_load)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        _ordinary(1), _chat(("user", "hi"), ("assistant", " ")), _chat(("user", "only"))]) + "\n")
    code, _ = run_trainer(["fit", "--base", str(tiny_base), "--data", str(data), "--name", "x",
                           "--adapters-root", str(tmp_path / "adapters")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{data}:2: error: empty turn" in err
    assert f"{data}:3: error: no assistant turn" in err
    assert not (tmp_path / "adapters").exists()
