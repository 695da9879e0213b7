"""The training report: `trainer fit` writes report.html into the version folder (curves,
learning rate, gradient norm, data statistics, settings as embedded matplotlib images and
tables), links it from the manifest and prints where it is. The fit here is `trainer fit` with
no training flags but its length, so it also shows the base's recommended settings at work."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from conftest import head_lines, run_trainer

from trainer import manifest as mf
from trainer.recommended import TINY_BASE_SETTINGS
from trainer.report import render


@pytest.fixture(scope="module")
def fitted(tiny_base: Path, bundled_data: Path,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("report")
    train = head_lines(bundled_data / "food_ordering" / "train.jsonl", work / "train.jsonl", 16)
    validation = head_lines(bundled_data / "food_ordering" / "validation.jsonl",
                            work / "val.jsonl", 4)
    code, out = run_trainer([
        "fit", "--base", str(tiny_base), "--data", str(train), "--validation", str(validation),
        "--name", "food", "--adapters-root", str(work / "adapters"), "--max-steps", "2",
        "--logging-steps", "1", "--device", "cpu",
    ])
    assert code == 0, out
    return Path(out.strip().splitlines()[-1]), out


def test_fit_links_and_prints_the_report(fitted) -> None:
    version_dir, out = fitted
    manifest = mf.read_manifest(version_dir)
    assert manifest["report"] == "report.html"
    assert f"report: {version_dir / 'report.html'}" in out.splitlines()[-2]


def test_the_base_settings_trained_it(fitted) -> None:
    version_dir, out = fitted
    hyperparameters = mf.read_manifest(version_dir)["hyperparameters"]
    for key in ("learning_rate", "rank", "alpha", "dropout", "max_length", "padding_free"):
        assert hyperparameters[key] == TINY_BASE_SETTINGS[key], key
    assert hyperparameters["max_steps"] == 2  # the flag wins
    assert "recommended settings of the base: " in out


def test_the_report_holds_curves_data_and_settings(fitted) -> None:
    version_dir, _ = fitted
    page = (version_dir / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 1 and base64.b64decode(images[0])[:4] == b"\x89PNG"
    for section in ("Curves", "Metrics", "Data", "Settings", "Recovery events"):
        assert f"<h2>{section}</h2>" in page
    manifest = mf.read_manifest(version_dir)
    assert f"<td>{manifest['data']['train']['conversations']}</td>" in page
    assert "<th>learning_rate</th><td>0.003</td>" in page
    assert "<th>lora.r</th><td>32</td>" in page


def test_render_escapes_what_it_shows() -> None:
    manifest = {"name": "<b>x</b>", "base": {"path_or_id": "b"}, "curves": {"train": [],
                "validation": []}, "lora": {}, "hyperparameters": {"note": "<script>"}}
    page = render(manifest)
    assert "<b>x</b>" not in page and "&lt;script&gt;" in page and "<script>" not in page
