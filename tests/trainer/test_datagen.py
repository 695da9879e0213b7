"""The bundled data: deterministic, three domains, multi-turn, with facts carried across turns."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from common.data import load_conversations
from trainer import datagen


def test_make_data_twice_gives_identical_bytes(tmp_path: Path, bundled_data: Path) -> None:
    datagen.make_data(tmp_path, seed=0)
    files = sorted(p.relative_to(bundled_data) for p in bundled_data.rglob("*.jsonl"))
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.jsonl"))
    assert len(files) == 3 * len(datagen.DOMAINS)
    for name in files:
        assert (bundled_data / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_other_seed_gives_other_data(tmp_path: Path, bundled_data: Path) -> None:
    datagen.make_data(tmp_path, seed=1)
    name = Path(datagen.DOMAINS[0]) / "test.jsonl"
    assert (tmp_path / name).read_bytes() != (bundled_data / name).read_bytes()


@pytest.mark.parametrize("domain", datagen.DOMAINS)
def test_domain_splits_load_with_the_loader(bundled_data: Path, domain: str) -> None:
    for split, count in datagen.SPLITS.items():
        convs = load_conversations(bundled_data / domain / f"{split}.jsonl")
        assert len(convs) == count
        assert len({c.id for c in convs}) == count
        for conv in convs:
            users = sum(m.role == "user" for m in conv.messages)
            assert 2 <= users <= 6
            assert conv.system and conv.meta["domain"] == domain


@pytest.mark.parametrize("domain", datagen.DOMAINS)
def test_test_facts_are_given_first_and_repeated_later(bundled_data: Path, domain: str) -> None:
    for conv in load_conversations(bundled_data / domain / "test.jsonl"):
        assert conv.facts, conv.id
        first_user = next(m.content for m in conv.messages if m.role == "user")
        later_answers = [conv.messages[i].content for i in conv.assistant_turns()[1:]]
        for fact in conv.facts:
            assert fact in first_user, (conv.id, fact)
            assert any(fact in answer for answer in later_answers), (conv.id, fact)


def test_answers_vary_and_domains_differ(bundled_data: Path) -> None:
    answers = {}
    for domain in datagen.DOMAINS:
        convs = load_conversations(bundled_data / domain / "train.jsonl")
        answers[domain] = {m.content for c in convs for m in c.messages if m.role == "assistant"}
        assert len(answers[domain]) > 2000, domain
    pairs = [(a, b) for a in answers for b in answers if a < b]
    assert all(not answers[a] & answers[b] for a, b in pairs)


def test_pretraining_corpus_is_general_and_deterministic() -> None:
    corpus = datagen.pretraining_corpus(seed=0, count=50)
    assert corpus == datagen.pretraining_corpus(seed=0, count=50)
    assert {c["meta"]["domain"] for c in corpus} == {"general"}
    assert all(c["messages"][-1]["role"] == "assistant" for c in corpus)


def test_cli_run_writes_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    datagen.add_arguments(parser)
    assert datagen.run(parser.parse_args(["--out", str(tmp_path), "--seed", "3"])) == 0
    assert "wrote 3 domains" in capsys.readouterr().out
    line = (tmp_path / "it_helpdesk" / "train.jsonl").read_text().splitlines()[0]
    assert json.loads(line)["messages"][0]["role"] == "system"
