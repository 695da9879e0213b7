"""`trainer merge`: fold an adapter into a full-precision copy of its base, saved as a plain
Hugging Face model directory (config, safetensors weights, tokenizer) that needs no PEFT."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer import manifest as mf

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", metavar="NAME@VERSION", help="adapter to merge (NAME = newest)")
    parser.add_argument("--adapters-root", required=True, help="directory of <name>/<version>/")
    parser.add_argument("--output", required=True, help="new directory for the merged model")
    parser.add_argument("--base", help="base model (default: the path in the adapter manifest)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weights of the merged model (float32)")
    parser.add_argument("--force", action="store_true",
                        help="merge even if the base fingerprint differs from the manifest")


def check_base(manifest: dict, base: str, force: bool) -> None:
    from common.modeling import base_fingerprint

    expected = manifest.get("base", {}).get("fingerprint")
    actual = base_fingerprint(base)
    if expected and expected != actual and not force:
        raise ValueError(f"base {base} has fingerprint {actual}, the adapter was trained on "
                         f"{expected}; pass --force to merge anyway")


def merge(adapter_dir: Path, base: str, output: Path, dtype: str = "float32") -> Path:
    """Load the base unquantized, apply the adapter, merge the LoRA deltas and save."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common.modeling import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    output.mkdir(parents=True, exist_ok=False)
    merged.save_pretrained(str(output))
    load_tokenizer(base).save_pretrained(str(output))
    return output


def run(args: argparse.Namespace) -> int:
    try:
        adapter_dir = mf.resolve_ref(Path(args.adapters_root), args.ref)
        manifest = mf.read_manifest(adapter_dir)
        base = args.base or manifest.get("base", {}).get("path_or_id")
        if not base:
            raise ValueError(f"{adapter_dir}/manifest.json names no base; pass --base")
        output = Path(args.output)
        if output.exists() and any(output.iterdir()):
            raise ValueError(f"--output {output} exists and is not empty")
        if output.exists():
            output.rmdir()
        check_base(manifest, base, args.force)
        merge(adapter_dir, base, output, args.dtype)
    except (ValueError, FileNotFoundError) as exc:
        print(f"trainer merge: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(output, flush=True)
    return 0
