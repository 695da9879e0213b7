"""The embedded tiny base: deterministic build, chat template with generation marks, 4-bit load."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from trainer import base

CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi, I am Maria."},
        {"role": "assistant", "content": "Hello Maria, nice to meet you."},
        {"role": "user", "content": "What is 2 plus 3?"}]


def test_same_seed_gives_identical_weight_files(tmp_path: Path, tiny_base: Path) -> None:
    # Two builds with a short pretraining (the same code path; the full one takes a minute),
    # then the tokenizer and template against the session's full build of the same seed.
    spec = base.BaseSpec(pretrain_steps=3)
    first, again = (base.build_base(tmp_path / name, seed=0, spec=spec) for name in "ab")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (first / name).read_bytes() == (tiny_base / name).read_bytes(), name


def test_model_shape_fits_bitsandbytes_and_context(tiny_base: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_base)
    assert config.model_type == "llama" and config.max_position_embeddings >= 1024
    for name in ("hidden_size", "intermediate_size", "vocab_size"):
        assert getattr(config, name) % 64 == 0, name
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 20_000_000


def test_tokenizer_special_tokens_and_eos(tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (base.BOS, base.EOS,
                                                                               base.PAD)
    for token in base.SPECIAL_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    text = "Order GF-12345 for Zoë, 2 × pizza!"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template_marks_assistant_content_and_end(tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    out = tokenizer.apply_chat_template(CHAT[:3], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(marked) == "Hello Maria, nice to meet you.<|end|>"
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|begin|><|system|>\n") and prompt.endswith("<|user|>\nWhat is 2 "
                                                                         "plus 3?<|end|>\n"
                                                                         "<|assistant|>\n")


def test_base_loads_in_4bit_and_generates(tiny_base: Path) -> None:
    import bitsandbytes as bnb
    import torch

    from common.modeling import load_base

    model, tokenizer = load_base(str(tiny_base))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    inputs = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert new and tokenizer.decode(new, skip_special_tokens=True).strip()
    assert new[-1] == tokenizer.eos_token_id or len(new) == 24


def test_spec_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="hidden_size must be a positive multiple of 64, got 100"):
        base.BaseSpec(hidden_size=100)
    with pytest.raises(ValueError, match="max_positions must be at least 1024, got 512"):
        base.BaseSpec(max_positions=512)


def test_cli_arguments() -> None:
    parser = argparse.ArgumentParser()
    base.add_arguments(parser)
    args = parser.parse_args(["--output", "out", "--seed", "7"])
    assert (args.output, args.seed, args.source) == (Path("out"), 7, "tiny")
    args = parser.parse_args(["--output", "out", "--from", "smollm2-135m-instruct"])
    assert args.source == "smollm2-135m-instruct"


def test_cli_refuses_an_unknown_source(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    base.add_arguments(parser)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--output", "out", "--from", "llama-70b"])
    assert exited.value.code == 2
    assert "invalid choice: 'llama-70b'" in capsys.readouterr().err
