"""The conversation loader: every accepted format parses; every malformed kind names file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.data import DataError, load_conversations, summarize

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def write_jsonl(path: Path, lines: list[object | str]) -> Path:
    """Records as JSON lines; a str is written verbatim (for broken lines)."""
    text = "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in lines)
    path.write_text(text, encoding="utf-8")
    return path


def test_openai_format_with_id_facts_meta(tmp_path: Path) -> None:
    record = {"id": "c1", "facts": ["GF-1"], "meta": {"domain": "x"}, "messages": [
        {"role": "system", "content": "Be nice."}, *GOOD["messages"]]}
    (conv,) = load_conversations(write_jsonl(tmp_path / "a.jsonl", [record]))
    assert [m.role for m in conv.messages] == ["system", "user", "assistant"]
    assert conv.id == "c1" and conv.facts == ("GF-1",) and conv.system == "Be nice."
    assert conv.meta["domain"] == "x" and conv.meta["format"] == "openai"


def test_sharegpt_format(tmp_path: Path) -> None:
    record = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                {"from": "gpt", "value": "A"}, {"from": "user", "value": "Q2"},
                                {"from": "assistant", "value": "A2"}]}
    (conv,) = load_conversations(write_jsonl(tmp_path / "s.jsonl", [record]))
    assert conv.to_openai()[1:3] == [{"role": "user", "content": "Q"},
                                     {"role": "assistant", "content": "A"}]
    assert [m.role for m in conv.messages][-2:] == ["user", "assistant"]


def test_alpaca_format_joins_input_and_keeps_system(tmp_path: Path) -> None:
    records = [{"instruction": "Translate", "input": "chat", "output": "cat", "system": "S"},
               {"instruction": "Say hi", "input": "", "output": "hi"}]
    first, second = load_conversations(write_jsonl(tmp_path / "al.jsonl", records))
    assert first.to_openai() == [{"role": "system", "content": "S"},
                                 {"role": "user", "content": "Translate\n\nchat"},
                                 {"role": "assistant", "content": "cat"}]
    assert [m.content for m in second.messages] == ["Say hi", "hi"]


def test_mt_bench_format_needs_no_final_assistant(tmp_path: Path) -> None:
    record = {"question_id": 81, "category": "writing", "turns": ["Write.", "Rewrite."],
              "reference": ["r1", "r2"]}
    path = write_jsonl(tmp_path / "q.jsonl", [record])
    (conv,) = load_conversations(path, require_final_assistant=False)
    assert conv.id == "81" and [m.role for m in conv.messages] == ["user", "user"]
    assert conv.meta["category"] == "writing" and conv.meta["reference"] == ["r1", "r2"]
    with pytest.raises(DataError, match=r"q\.jsonl:1: .*require_final_assistant=False"):
        load_conversations(path)


def test_json_list_file_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text(json.dumps([GOOD, GOOD]))
    assert len(load_conversations(path)) == 2
    jsonl = tmp_path / "blank.jsonl"
    jsonl.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n")
    assert [c.id for c in load_conversations(jsonl)] == ["blank-1", "blank-3"]


BAD_CASES = {
    "bad_json": ('{"messages": [', r"bad JSON"),
    "unknown_role": ({"messages": [{"role": "bot", "content": "x"}]},
                     r"unknown role 'bot' \(allowed: system, user, assistant\)"),
    "unknown_sharegpt_role": ({"conversations": [{"from": "robot", "value": "x"}]},
                              r"unknown role 'robot' \(allowed: human, user, gpt"),
    "empty_content": ({"messages": [{"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "  "}]}, r"content is empty"),
    "non_string_content": ({"messages": [{"role": "user", "content": ["Q"]},
                                         {"role": "assistant", "content": "A"}]},
                           r"content must be a string, got list"),
    "no_assistant": ({"messages": [{"role": "user", "content": "Q"}]}, r"no assistant turn"),
    "ends_on_user": ({"messages": [*GOOD["messages"], {"role": "user", "content": "Q2"}]},
                     r"ends on a user turn"),
    "unknown_format": ({"prompt": "Q", "completion": "A"},
                       r"unknown record format \(keys: completion, prompt\).*messages \(OpenAI\)"),
    "not_an_object": ("[1, 2]", r"must be a JSON object, got list"),
    "late_system": ({"messages": [*GOOD["messages"], {"role": "system", "content": "S"}]},
                    r"system message may only come first"),
    "bad_facts": ({**GOOD, "facts": "GF-1"}, r"'facts' must be a list"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_malformed_record_names_file_and_line(tmp_path: Path, kind: str) -> None:
    bad, pattern = BAD_CASES[kind]
    path = write_jsonl(tmp_path / f"{kind}.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(DataError, match=pattern) as info:
        load_conversations(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert info.value.path == path and info.value.line == 3
    assert isinstance(info.value, ValueError)


def test_malformed_record_in_json_list_names_record_index(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text(json.dumps([GOOD, {"messages": [{"role": "user", "content": "Q"}]}]))
    with pytest.raises(DataError) as info:
        load_conversations(path)
    assert str(info.value).startswith(f"{path}:2: record 2 of the JSON list: no assistant turn")


def test_bad_json_in_json_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n{oops}\n]")
    with pytest.raises(DataError, match=r"broken\.json:3: bad JSON"):
        load_conversations(path)


def test_no_final_assistant_allowed_for_prompts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "Q"}]}])
    (conv,) = load_conversations(path, require_final_assistant=False)
    assert conv.messages[-1].role == "user"


def test_summarize_counts_turns_and_tokens(tmp_path: Path, tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    convs = load_conversations(write_jsonl(tmp_path / "a.jsonl", [GOOD, GOOD]))
    plain = summarize(convs)
    assert (plain.conversations, plain.messages, plain.user_turns, plain.assistant_turns,
            plain.tokens) == (2, 4, 2, 2, None)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    counted = summarize(convs, tokenizer)
    expected = len(tokenizer.apply_chat_template(GOOD["messages"], tokenize=True,
                                                 return_dict=False))
    assert counted.tokens == 2 * expected and counted.max_tokens == expected
    assert "2 conversations" in str(counted) and "tokens" in str(counted)


def test_loader_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, common.data; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
