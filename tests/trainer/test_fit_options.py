"""`trainer fit` options on the real tiny base, a few steps on a few dozen conversations each:
--packing (whole conversations share rows, each still trained on its answers only and attending
only to itself), early stopping on validation loss with patience, and the validation split held
out of --data when no --validation file is given."""

from __future__ import annotations

import json
import time
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from conftest import head_lines, run_trainer
from safetensors.torch import load_file
from transformers import TrainerCallback

from trainer import fit as fit_module
from trainer.check_data import assistant_masks
from trainer.cli import main
from trainer.config import build_config

DOMAIN = "it_helpdesk"
# Longer than every one of the first 32 it_helpdesk conversations (101-275 tokens), so packing
# places whole conversations, two to four to a row.
PACKED_LENGTH = 512


def _manifest(version_dir: Path) -> dict:
    return json.loads((version_dir / "manifest.json").read_text())


def _records(path: Path) -> list[dict]:
    from common.data import load_conversations

    return [{"messages": c.to_openai()} for c in load_conversations(path)]


def _token_ids(tokenizer, records: list[dict]) -> list[tuple[int, ...]]:
    """Each record's conversation as the base's chat template tokenizes it, in one batch."""
    return [tuple(ids) for ids, _ in assistant_masks(tokenizer, [r["messages"] for r in records])]


def _key(record: dict) -> str:
    return json.dumps(record["messages"], sort_keys=True)


class FedData(TrainerCallback):
    """Keeps the dataloaders the trainer trained and evaluated with: what it was really fed."""

    def __init__(self) -> None:
        self.train = None
        self.eval = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.train = train_dataloader

    def on_evaluate(self, args, state, control, eval_dataloader=None, **kwargs):
        self.eval = eval_dataloader


@pytest.fixture(scope="module")
def data(bundled_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 32 conversations of one bundled domain."""
    return head_lines(bundled_data / DOMAIN / "train.jsonl",
                 tmp_path_factory.mktemp("options") / "train.jsonl", 32)


def _small(tiny_base: Path, data: Path, root: Path, **overrides) -> dict:
    settings = dict(base=str(tiny_base), data=str(data), name="opts", adapters_root=str(root),
                    max_steps=4, batch_size=2, max_length=128, rank=4, alpha=8, dropout=0.0,
                    learning_rate=1e-2, logging_steps=1, save_steps=100, device="cpu", seed=0)
    return {**settings, **overrides}


# -------------------------------------------------------------------------------- packing


def _segments(positions: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each sequence in a padding-free row: position ids restart at 0."""
    starts = [i for i, p in enumerate(positions) if p == 0]
    return list(pairwise([*starts, len(positions)]))


def _answer_spans(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The trained runs of one conversation, decoded; a trained label must be its own token."""
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def test_packing_fills_rows_with_whole_conversations_trained_on_answers_only(
    tiny_base: Path, data: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    from common.modeling import LoadOptions, load_base

    fed = FedData()
    config = build_config(_small(tiny_base, data, tmp_path / "adapters", packing=True,
                                 max_length=PACKED_LENGTH, val_split=0))
    version_dir = fit_module.fit(config, callbacks=[fed])

    manifest = _manifest(version_dir)
    assert manifest["hyperparameters"]["packing"] is True
    assert manifest["metrics"]["global_step"] == 4
    assert manifest["data"]["train"]["truncated"] == 0  # so every conversation fits whole

    # The prepared rows: 32 conversations in far fewer rows of at most max_length tokens.
    rows = fed.train.dataset
    lengths = [row["seq_lengths"] for row in rows]
    assert sum(len(parts) for parts in lengths) == 32
    assert len(rows) <= 16 and max(len(parts) for parts in lengths) >= 3
    assert all(sum(parts) == len(row["input_ids"]) <= PACKED_LENGTH
               for parts, row in zip(lengths, rows, strict=True))

    # The collated batches: every segment between position-id restarts is one whole
    # conversation of the data, trained on exactly its assistant answers; each appears once.
    model, tokenizer = load_base(str(tiny_base), LoadOptions("cpu", "none"))
    records = _records(data)
    expected = {}
    for record, ids in zip(records, _token_ids(tokenizer, records), strict=True):
        answers = [m["content"] + tokenizer.eos_token
                   for m in record["messages"] if m["role"] == "assistant"]
        expected[ids] = answers
    seen, batches = [], list(fed.train)
    for batch in batches:
        assert "attention_mask" not in batch  # boundaries come from position_ids alone
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        positions = batch["position_ids"][0].tolist()
        for start, end in _segments(positions):
            segment = tuple(ids[start:end])
            assert segment in expected, "a packed segment is not one whole conversation"
            assert positions[start:end] == list(range(end - start))
            assert _answer_spans(tokenizer, ids[start:end], labels[start:end]) == (
                expected[segment])
            seen.append(segment)
    assert sorted(seen) == sorted(expected)
    # A batch of 2 packed rows is flattened into one sequence holding more than 2 conversations.
    assert max(int((b["position_ids"][0] == 0).sum()) for b in batches) > 2

    # The published adapter loads with PEFT and, fed a packed batch the way SFTTrainer feeds it,
    # each conversation sees only itself: its logits match those of the conversation alone.
    # (SFTTrainer passes use_cache=False; with a KV cache transformers would not read the
    # sequence boundaries from position_ids and attention would cross conversations.)
    model = PeftModel.from_pretrained(model, str(version_dir))
    weights = load_file(str(version_dir / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    batch = max(batches, key=lambda b: int((b["position_ids"][0] == 0).sum()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0]
        for start, end in _segments(batch["position_ids"][0].tolist()):
            alone = model(input_ids=batch["input_ids"][:, start:end], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------- early stopping

# A learning rate this high, held constant, makes the first update overshoot: validation loss
# rises from the step-0 evaluation to the step-2 one (asserted, so the premise is checked).
DIVERGING = ["--learning-rate", "1.0", "--scheduler", "constant", "--warmup", "0"]


def _early_stopping_argv(tiny_base: Path, data: Path, root: Path, patience: int) -> list[str]:
    return [
        "fit", "--base", str(tiny_base), "--data", str(data), "--name", f"patience{patience}",
        "--adapters-root", str(root), "--val-split", "0.25", "--max-steps", "8",
        "--eval-steps", "2", "--batch-size", "2", "--max-length", "128", "--rank", "4",
        "--alpha", "8", "--dropout", "0", "--save-steps", "100", "--logging-steps", "1",
        "--device", "cpu", "--seed", "0", "--early-stopping-patience", str(patience), *DIVERGING,
        "--no-recommended",
    ]


def test_early_stopping_stops_when_validation_loss_stops_improving(
    tiny_base: Path, data: Path, tmp_path: Path
) -> None:
    code, out = run_trainer(_early_stopping_argv(tiny_base, data, tmp_path / "adapters", 1))
    assert code == 0, out
    version_dir = Path(out.strip().splitlines()[-1])
    manifest = _manifest(version_dir)
    metrics, curve = manifest["metrics"], manifest["curves"]["validation"]

    assert [point["step"] for point in curve] == [0, 2]
    assert curve[1]["loss"] > curve[0]["loss"]
    assert metrics["stopped_early"] is True and metrics["global_step"] == 2
    assert [point["step"] for point in manifest["curves"]["train"]] == [1, 2]
    assert manifest["hyperparameters"]["early_stopping_patience"] == 1
    # The published weights are the best ones (step 0: the untouched LoRA init, B == 0), and
    # the final validation loss measures them.
    assert metrics["best_val_step"] == 0
    assert "restored the best weights (step 0)" in out
    assert metrics["final_val_loss"] == pytest.approx(curve[0]["loss"], rel=1e-5)
    weights = load_file(str(version_dir / "adapter_model.safetensors"))
    assert all(torch.count_nonzero(v) == 0 for k, v in weights.items() if "lora_B" in k)


def test_early_stopping_with_large_patience_runs_to_max_steps(
    tiny_base: Path, data: Path, tmp_path: Path
) -> None:
    code, out = run_trainer(_early_stopping_argv(tiny_base, data, tmp_path / "adapters", 100))
    assert code == 0, out
    manifest = _manifest(Path(out.strip().splitlines()[-1]))
    metrics, curve = manifest["metrics"], manifest["curves"]["validation"]

    assert [point["step"] for point in curve] == [0, 2, 4, 6, 8]
    assert curve[1]["loss"] > curve[0]["loss"]  # patience 1 would have stopped at step 2
    assert metrics["stopped_early"] is False and metrics["global_step"] == 8
    best = min(curve, key=lambda point: point["loss"])
    assert metrics["best_val_step"] == best["step"]
    assert metrics["final_val_loss"] == pytest.approx(best["loss"], rel=1e-5)
    # Weights are restored only when the best evaluation was not of the final weights.
    assert ("restored the best weights" in out) == (best["step"] != 8)


# ------------------------------------------------------------------------ validation split


def _token_rows(dataloader) -> list[tuple[int, ...]]:
    return [tuple(row["input_ids"]) for row in dataloader.dataset]


def test_validation_split_holds_out_a_deterministic_disjoint_fraction(
    tiny_base: Path, data: Path, tmp_path: Path
) -> None:
    from common.modeling import load_tokenizer

    fed = FedData()
    settings = _small(tiny_base, data, tmp_path / "adapters", val_split=0.25, seed=3,
                      max_steps=1, max_length=PACKED_LENGTH)
    config = build_config(settings)
    version_dir = fit_module.fit(config, callbacks=[fed])

    manifest = _manifest(version_dir)
    counts = manifest["data"]
    assert counts["validation_source"] == "split 0.25"
    assert counts["files"]["train"]["conversations"] == 32
    assert (counts["train"]["conversations"], counts["validation"]["conversations"]) == (24, 8)
    assert manifest["curves"]["validation"]  # it evaluated on the held-out part

    # What the trainer was fed, mapped back to the data file's conversations by their tokens.
    tokenizer = load_tokenizer(str(tiny_base))
    records = _records(data)
    by_tokens = {ids: _key(record)
                 for record, ids in zip(records, _token_ids(tokenizer, records), strict=True)}
    assert len(by_tokens) == 32  # all distinct, and none cut at this max_length
    trained = [by_tokens[row] for row in _token_rows(fed.train)]
    evaluated = [by_tokens[row] for row in _token_rows(fed.eval)]
    assert len(trained) == len(set(trained)) == 24
    assert len(evaluated) == len(set(evaluated)) == 8
    assert not set(trained) & set(evaluated)
    assert set(trained) | set(evaluated) == set(by_tokens.values())

    # The held-out part is the seed's: the same seed picks it again, another seed another part.
    def held_out(seed: int) -> set[str]:
        return {_key(r) for r in fit_module.load_split(build_config(settings, {"seed": seed}))
                .validation}

    assert held_out(3) == set(evaluated)
    assert held_out(4) != set(evaluated) and len(held_out(4)) == 8


def test_a_fraction_too_small_still_holds_out_one_conversation(
    tiny_base: Path, data: Path, tmp_path: Path
) -> None:
    split = fit_module.load_split(build_config(_small(tiny_base, data, tmp_path, val_split=0.01)))
    assert (len(split.train), len(split.validation)) == (31, 1)


@pytest.mark.parametrize("case, message", [
    ("one conversation to split", "no training conversations left after holding out val_split"),
    ("empty validation file", "no validation conversations"),
    ("empty data file", "no training conversations left"),
])
def test_a_split_without_training_or_validation_data_fails_before_the_model_loads(
    case: str, message: str, tiny_base: Path, data: Path, tmp_path: Path, capsys
) -> None:
    one = head_lines(data, tmp_path / "one.jsonl", 1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    files = {"one conversation to split": ["--data", str(one), "--val-split", "0.1"],
             "empty validation file": ["--data", str(data), "--validation", str(empty)],
             "empty data file": ["--data", str(empty), "--val-split", "0"]}[case]
    root = tmp_path / "adapters"
    started = time.monotonic()
    code = main(["fit", "--base", str(tiny_base), *files, "--name", "x",
                 "--adapters-root", str(root), "--device", "cpu"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert time.monotonic() - started < 10
    # The run folder is made right after the data checks, before the model loads: none exists.
    assert not root.exists()
