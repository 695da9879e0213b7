"""A base carries its recommended fit settings: a checked YAML beside the model, written by
`trainer init-base` and layered by `trainer fit` under --config and the flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from trainer import fit as fit_module
from trainer.recommended import (
    RECOMMENDED_FILE,
    TINY_BASE_SETTINGS,
    read_recommended,
    write_recommended,
)


def _resolve(*argv: str):
    parser = argparse.ArgumentParser()
    fit_module.add_arguments(parser)
    config, _ = fit_module.resolve_config(parser.parse_args(list(argv)))
    return config


def _required(base: Path) -> list[str]:
    return ["--base", str(base), "--data", "d.jsonl", "--name", "n", "--adapters-root", "r"]


def test_write_then_read_gives_the_settings_back(tmp_path: Path) -> None:
    path = write_recommended(tmp_path, {"learning-rate": 1e-3, "rank": 8, "padding_free": True})
    assert path == tmp_path / RECOMMENDED_FILE
    assert read_recommended(tmp_path) == {"learning_rate": 1e-3, "rank": 8, "padding_free": True}


def test_a_base_without_the_file_or_a_hub_id_recommends_nothing(tmp_path: Path) -> None:
    assert read_recommended(tmp_path) == {}
    assert read_recommended("HuggingFaceTB/SmolLM2-135M-Instruct") == {}


@pytest.mark.parametrize(("settings", "message"), [
    ({"name": "x"}, "not recommendable fit settings: ['name']"),
    ({"adapters_root": "/x", "device": "cuda"}, "['adapters_root', 'device']"),
    ({"rank": 0}, "rank must be a positive integer, got 0"),
    ({"dropout": 1.5}, "dropout must be in [0, 1), got 1.5"),
])
def test_settings_that_do_not_belong_to_a_base_or_are_invalid_are_refused(
    tmp_path: Path, settings: dict, message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        write_recommended(tmp_path, settings)
    assert message in str(caught.value)
    assert not (tmp_path / RECOMMENDED_FILE).exists()


def test_a_hand_edited_bad_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / RECOMMENDED_FILE).write_text("learning_rate: -1\n")
    with pytest.raises(ValueError, match=f"{RECOMMENDED_FILE}: learning_rate must be > 0"):
        read_recommended(tmp_path)


def test_the_embedded_base_carries_its_settings(tiny_base: Path) -> None:
    assert read_recommended(tiny_base) == TINY_BASE_SETTINGS


def test_fit_uses_the_base_settings_when_nothing_else_is_said(tiny_base: Path, capsys) -> None:
    config = _resolve(*_required(tiny_base))
    for key, value in TINY_BASE_SETTINGS.items():
        assert getattr(config, key) == value, key
    assert "recommended settings of the base: " in capsys.readouterr().out


def test_flags_and_config_file_win_over_the_base(tiny_base: Path, tmp_path: Path) -> None:
    yaml_file = tmp_path / "fit.yaml"
    yaml_file.write_text("rank: 4\nmax_steps: 10\n")
    config = _resolve(*_required(tiny_base), "--config", str(yaml_file), "--max-steps", "7")
    assert config.rank == 4  # --config over the base
    assert config.max_steps == 7  # the flag over --config
    assert config.learning_rate == TINY_BASE_SETTINGS["learning_rate"]  # the base fills the rest


def test_no_recommended_ignores_the_base(tiny_base: Path) -> None:
    config = _resolve(*_required(tiny_base), "--no-recommended")
    assert config.rank == 16 and config.max_steps == -1  # the FitConfig defaults
