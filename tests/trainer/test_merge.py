"""`trainer merge`: the merged full-precision model computes what base + adapter computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_random_adapter

from trainer.cli import main


@pytest.fixture(scope="module")
def adapter(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("merge-adapters")
    write_random_adapter(tiny_base, root, "m", 1, seed=5, rank=4)
    return root


def test_merged_model_matches_base_plus_adapter(adapter: Path, tiny_base: Path, tmp_path: Path,
                                                capsys) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", "m@1", "--adapters-root", str(adapter), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    ids = torch.randint(10, 1000, (2, 24))
    with torch.no_grad():
        bare = base(ids).logits
        reference = PeftModel.from_pretrained(base, str(adapter / "m" / "1")).eval()
        expected, actual = reference(ids).logits, merged(ids).logits
    assert torch.allclose(expected, actual, atol=1e-4)
    assert not torch.allclose(bare, actual, atol=1e-3)


def test_merge_refuses_another_base_and_an_existing_output(adapter: Path, tiny_base: Path,
                                                           tmp_path: Path, capsys) -> None:
    other = tmp_path / "other-base"
    other.mkdir()
    for f in tiny_base.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = (other / "config.json").read_text().replace('"rms_norm_eps"', '"rms_norm_eps_x"', 1)
    (other / "config.json").write_text(config)
    code = main(["merge", "m@1", "--adapters-root", str(adapter), "--output",
                 str(tmp_path / "o"), "--base", str(other)])
    assert code == 2 and "fingerprint" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main(["merge", "m@1", "--adapters-root", str(adapter), "--output", str(busy)]) == 2
    assert main(["merge", "nope@1", "--adapters-root", str(adapter), "--output",
                 str(tmp_path / "o2")]) == 2
