"""Load a base model (4-bit NF4 or full precision) the same way for the trainer and the server."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class LoadOptions:
    """How to load a base: `device` is auto|cpu|cuda; `quantize` is "nf4" or "none"."""

    device: str = "auto"
    quantize: str = "nf4"

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.quantize not in ("nf4", "none"):
            raise ValueError(f"quantize must be nf4 or none, got {self.quantize!r}")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is visible")
    return device


def compute_dtype(device: str) -> Any:
    """bf16 on a GPU; float32 on the CPU, where bf16 kernels are slow or missing."""
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def bnb_config(device: str) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(device),
    )


def disable_cpu_repacking(model: Any) -> int:
    """Turn off bitsandbytes' AVX512-BF16 weight repacking on every Linear4bit.

    On CPUs with AVX512-BF16 that path crashes on some shapes, makes greedy rows depend on the
    batch they run in, and corrupts LoRA gradients after a generate. Returns how many layers.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_tokenizer(path_or_id: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(path_or_id: str, options: LoadOptions | None = None) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode; 4-bit NF4 with double quantization by default."""
    import torch
    from transformers import AutoModelForCausalLM

    options = options or LoadOptions()
    device = resolve_device(options.device)
    kwargs: dict[str, Any] = {"dtype": compute_dtype(device)}
    if options.quantize == "nf4":
        kwargs["quantization_config"] = bnb_config(device)
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path_or_id, **kwargs)
    if options.quantize == "none":
        model.to(torch.device(device))
    disable_cpu_repacking(model)
    model.eval()
    return model, load_tokenizer(path_or_id)


def base_fingerprint(path_or_id: str) -> str:
    """Hash of the base's config and tokenizer files: what an adapter must have been trained on."""
    root = Path(path_or_id)
    digest = hashlib.sha256()
    if root.is_dir():
        config = json.loads((root / "config.json").read_text())
        # Only what shapes the weights' meaning; loading options do not change identity.
        config.pop("quantization_config", None)
        config.pop("transformers_version", None)
        config.pop("dtype", None)
        config.pop("torch_dtype", None)
        digest.update(json.dumps(config, sort_keys=True).encode())
        for name in TOKENIZER_FILES:
            path = root / name
            if path.exists():
                digest.update(name.encode())
                digest.update(path.read_bytes())
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path_or_id).to_dict()
        for key in ("quantization_config", "transformers_version", "dtype", "torch_dtype"):
            config.pop(key, None)
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        digest.update(path_or_id.encode())
    return "sha256:" + digest.hexdigest()[:32]
