"""Session fixtures: the tiny base and the bundled data are built once per test session."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded tiny chat base model, built the way `trainer init-base` builds it."""
    from trainer.base import build_base

    return build_base(tmp_path_factory.mktemp("base") / "tiny-base", seed=0)


@pytest.fixture(scope="session")
def bundled_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled conversation data, as `trainer make-data` writes it."""
    from trainer.datagen import make_data

    out = tmp_path_factory.mktemp("data")
    make_data(out, seed=0)
    return out


def write_random_adapter(
    base: Path, root: Path, name: str, version: int, *, seed: int, rank: int = 8,
    target_modules: str | list[str] = "all-linear", fingerprint: str | None = None,
) -> Path:
    """Write a real PEFT adapter with random non-zero A and B and a manifest (serving tests)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from common.modeling import base_fingerprint

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=target_modules, init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    out = root / name / str(version)
    peft_model.save_pretrained(out)
    manifest = {
        "name": name,
        "version": version,
        "base": {
            "path_or_id": str(base),
            "fingerprint": fingerprint or base_fingerprint(str(base)),
        },
        "created": datetime.now(UTC).isoformat(),
        "hyperparameters": {"rank": rank, "alpha": 2 * rank, "seed": seed},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="session")
def adapters_root(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapters root with `alpha` (versions 1 and 2) and `beta` (version 1), random weights."""
    root = tmp_path_factory.mktemp("adapters")
    write_random_adapter(tiny_base, root, "alpha", 1, seed=1)
    write_random_adapter(tiny_base, root, "alpha", 2, seed=2)
    write_random_adapter(tiny_base, root, "beta", 1, seed=3, rank=4)
    return root
