"""`trainer fit` on the real tiny base and bundled data: one session-scoped trained adapter is
shared by the quality tests; the reproducibility and resume tests use a few steps on 24 rows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import head_lines, run_trainer
from safetensors.torch import load_file
from transformers import TrainerCallback

from trainer import fit as fit_module
from trainer.cli import main
from trainer.config import FIELD_NAMES, FitConfig, build_config, read_yaml

DOMAIN = "it_helpdesk"
# Tuned on the suite's 2-layer tiny base for the fewest trained tokens that still teach the
# domain: 120 steps of 4 rows cut at 96 tokens at 8e-3 (measured: validation loss 7.89 -> 3.47,
# ROUGE-L 0.37 vs the base's 0.16). 5e-3 left the ROUGE-L margin at 0.16 (the test asks 0.15),
# 90 steps at 8e-3 left it at 0.16 and the loss ratio at 0.49. (On init-base's 4 layers 5e-3
# gave 7.90 -> 3.73, 0.34 vs 0.03.)
QUALITY_STEPS, QUALITY_RANK, QUALITY_MAX_LENGTH = 120, 16, 96
QUALITY_FLAGS = [
    "--max-steps", str(QUALITY_STEPS), "--batch-size", "4", "--learning-rate", "8e-3",
    "--rank", str(QUALITY_RANK), "--alpha", str(2 * QUALITY_RANK), "--dropout", "0",
    "--warmup", "0.05", "--max-length", str(QUALITY_MAX_LENGTH), "--padding-free",
    "--eval-steps", "40", "--save-steps", "1000", "--logging-steps", "20",
]


@pytest.fixture(scope="session")
def trained(tiny_base: Path, bundled_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real `trainer fit` run on a bundled domain: (version dir, stdout, wall seconds)."""
    work = tmp_path_factory.mktemp("fit")
    validation = head_lines(bundled_data / DOMAIN / "validation.jsonl", work / "val.jsonl", 40)
    started = time.monotonic()
    code, out = run_trainer([
        "fit", "--base", str(tiny_base), "--data", str(bundled_data / DOMAIN / "train.jsonl"),
        "--validation", str(validation), "--name", "helpdesk", "--adapters-root",
        str(work / "adapters"), *QUALITY_FLAGS,
    ])
    assert code == 0, out
    return Path(out.strip().splitlines()[-1]), out, time.monotonic() - started


def test_fit_publishes_a_version_with_a_full_manifest(trained, tiny_base: Path) -> None:
    from common.modeling import base_fingerprint

    version_dir, out, seconds = trained
    print(f"trainer fit wall time: {seconds:.1f}s")
    assert version_dir.name == "1" and version_dir.parent.name == "helpdesk"
    assert out.strip().splitlines()[-1] == str(version_dir)
    assert f"cut at max_length {QUALITY_MAX_LENGTH}" in out
    for name in ("adapter_config.json", "adapter_model.safetensors", "manifest.json"):
        assert (version_dir / name).is_file()
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["name"] == "helpdesk" and manifest["version"] == 1
    assert manifest["base"] == {"path_or_id": str(tiny_base),
                                "fingerprint": base_fingerprint(str(tiny_base))}
    assert manifest["created"] and manifest["parent"] is None
    assert manifest["data"]["files"]["train"]["sha256"].startswith("sha256:")
    assert manifest["data"]["train"]["truncated"] > 0
    assert manifest["hyperparameters"]["rank"] == QUALITY_RANK
    assert manifest["lora"]["target_modules"] == sorted(manifest["lora"]["target_modules"])
    assert {"torch", "transformers", "peft", "trl"} <= set(manifest["libraries"])
    metrics = manifest["metrics"]
    assert metrics["global_step"] == QUALITY_STEPS and metrics["final_val_perplexity"] > 1
    assert manifest["curves"]["train"] and manifest["curves"]["validation"]
    run_dir = Path(manifest["run_dir"])
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def test_validation_loss_falls_by_half(trained) -> None:
    manifest = json.loads((trained[0] / "manifest.json").read_text())
    curve = [point["loss"] for point in manifest["curves"]["validation"]]
    print(f"validation loss: first {curve[0]:.3f} last {curve[-1]:.3f}")
    assert manifest["curves"]["validation"][0]["step"] == 0
    assert curve[-1] <= 0.5 * curve[0]
    assert manifest["metrics"]["final_val_loss"] == pytest.approx(curve[-1])


def _greedy(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
             for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_adapter_beats_base_on_rouge_l(trained, tiny_base: Path, bundled_data: Path) -> None:
    from peft import PeftModel
    from rouge_score import rouge_scorer

    from common.data import load_conversations
    from common.modeling import disable_cpu_repacking, load_base

    tests = load_conversations(bundled_data / DOMAIN / "test.jsonl")[:16]
    prompts, references = [], []
    for conv in tests:
        first = conv.assistant_turns()[0]
        prompts.append([m.to_dict() for m in conv.messages[:first]])
        references.append(conv.messages[first].content)
    model, tokenizer = load_base(str(tiny_base))
    model = PeftModel.from_pretrained(model, str(trained[0]))
    disable_cpu_repacking(model)
    adapted = _greedy(model, tokenizer, prompts, 40)
    with model.disable_adapter():
        bare = _greedy(model, tokenizer, prompts, 40)
    scorer = rouge_scorer.RougeScorer(["rougeL"])

    def mean_rouge(outputs: list[str]) -> float:
        pairs = zip(references, outputs, strict=True)
        scores = [scorer.score(ref, out)["rougeL"].fmeasure for ref, out in pairs]
        return sum(scores) / len(scores)

    adapter_score, base_score = mean_rouge(adapted), mean_rouge(bare)
    print(f"ROUGE-L adapter {adapter_score:.3f} base {base_score:.3f}")
    assert adapter_score >= base_score + 0.15


def test_malformed_data_fails_fast_before_the_model_loads(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import common.modeling

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(common.modeling, "load_base", must_not_load)
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n{not json\n")
    started = time.monotonic()
    code = main(["fit", "--base", str(tiny_base), "--data", str(bad), "--name", "x",
                 "--adapters-root", str(tmp_path / "adapters")])
    assert code == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert time.monotonic() - started < 10
    assert not (tmp_path / "adapters").exists()


def test_only_assistant_spans_are_trained(tiny_base: Path, bundled_data: Path,
                                         tmp_path: Path) -> None:
    """Labels of a 3-turn conversation as SFTTrainer prepared them: exactly the answers; and
    what `trainer fit` feeds it, tokenized in one batch, is what it prepares itself."""
    answers = ["First answer.", "Second answer, longer.", "Third and last."]
    messages = [{"role": "system", "content": "Be brief."}]
    for i, answer in enumerate(answers):
        messages += [{"role": "user", "content": f"Question {i}?"},
                     {"role": "assistant", "content": answer}]
    config = FitConfig(base=str(tiny_base), data="unused.jsonl", name="labels",
                       adapters_root=str(tmp_path), val_split=0, max_steps=1, device="cpu")
    model, tokenizer, _ = fit_module.load_model(config, tmp_path)
    bundled = [json.loads(line) for line in
               (bundled_data / DOMAIN / "train.jsonl").read_text().splitlines()[:7]]
    records = [{"messages": messages}, *({"messages": r["messages"]} for r in bundled)]
    split = fit_module.DataSplit(train=records, validation=[], files={})
    trainer, _ = fit_module.build_trainer(config, model, tokenizer, split, tmp_path / "run", True)
    prepared = [(row["input_ids"], row["labels"]) for row in trainer.train_dataset]
    fed = fit_module.tokenized_dataset(tokenizer, records, config.max_length, batch=3)
    assert prepared == list(zip(fed["input_ids"], fed["labels"], strict=True))
    example = trainer.train_dataset[0]
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    decoded = [tokenizer.decode(span) for span in spans]
    assert decoded == [answer + tokenizer.eos_token for answer in answers]


# ------------------------------------------------- reproducibility and resume (a few steps)


class Interrupt(TrainerCallback):
    """Stops the run like Ctrl-C right after `step`, once a checkpoint exists."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def small_config(tiny_base: Path, bundled_data: Path, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("small")
    data = head_lines(bundled_data / DOMAIN / "train.jsonl", work / "train.jsonl", 24)
    return dict(base=str(tiny_base), data=str(data), name="small", val_split=0, max_steps=4,
                batch_size=2, max_length=64, rank=4, alpha=8, dropout=0.1, save_steps=2,
                learning_rate=1e-3, logging_steps=1, device="cpu", seed=7)


def _weights(version_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(version_dir / "adapter_model.safetensors"))


def test_same_seed_gives_same_weights_and_resume_continues(small_config, tmp_path: Path,
                                                            capsys) -> None:
    root = tmp_path / "adapters"
    first = fit_module.fit(build_config(small_config, {"adapters_root": str(root)}))
    second = fit_module.fit(build_config(small_config, {"adapters_root": str(root)}))
    assert (first.name, second.name) == ("1", "2")
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)

    with pytest.raises(KeyboardInterrupt):
        fit_module.fit(build_config(small_config, {"adapters_root": str(root)}),
                       callbacks=[Interrupt(3)])
    config = build_config(small_config, {"adapters_root": str(root), "resume": "latest"})
    _, run_dir = fit_module.resolve_config(_namespace(config))
    assert (run_dir / "checkpoint-2").is_dir() and not (run_dir / "checkpoint-4").exists()
    capsys.readouterr()
    resumed = fit_module.fit(config, run_dir)
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-2" in out
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert resumed.name == "3" and manifest["metrics"]["global_step"] == 4
    assert Path(manifest["run_dir"]) == run_dir
    assert [p["step"] for p in manifest["curves"]["train"]] == [1, 2, 3, 4]
    c = _weights(resumed)
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)


def _namespace(config: FitConfig):
    import argparse

    return argparse.Namespace(**config.to_dict())


def test_from_parent_continues_an_adapter(small_config, tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    parent = fit_module.fit(build_config(small_config, {"adapters_root": str(root),
                                                        "max_steps": 2}))
    child = fit_module.fit(build_config(small_config, {
        "adapters_root": str(root), "max_steps": 2, "name": "child", "parent": "small@1",
        "rank": 16}))
    manifest = json.loads((child / "manifest.json").read_text())
    assert manifest["parent"]["ref"] == "small@1" and manifest["parent"]["path"] == str(parent)
    assert manifest["lora"]["r"] == 4  # the parent's shape wins over --rank
    before, after = _weights(parent), _weights(child)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------- configuration


def test_yaml_config_then_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "fit.yaml"
    path.write_text("base: b\ndata: d.jsonl\nname: n\nadapters-root: r\nrank: 8\n"
                    "learning-rate: 1e-3\nfrom: other@2\n")
    config = build_config(read_yaml(path), {"rank": 4, "batch_size": None})
    assert (config.rank, config.learning_rate, config.parent) == (4, 1e-3, "other@2")
    assert config.batch_size == 8


@pytest.mark.parametrize("override, field", [
    ({"rank": 0}, "rank"), ({"dropout": 1.5}, "dropout"), ({"scheduler": "nope"}, "scheduler"),
    ({"packing": True, "padding_free": True}, "padding_free"), ({"name": "a/b"}, "name"),
    ({"max_steps": 0}, "max_steps"), ({"bogus": 1}, "bogus"), ({"parent": "x"}, "parent"),
])
def test_config_rejects_bad_values_naming_the_field(override: dict, field: str) -> None:
    base = {"base": "b", "data": "d", "name": "n", "adapters_root": "r"}
    with pytest.raises(ValueError, match=field):
        build_config(base, override)


def test_cli_flags_parse_into_the_config() -> None:
    from trainer.cli import build_parser

    args = build_parser().parse_args([
        "fit", "--base", "b", "--data", "d", "--name", "n", "--adapters-root", "r",
        "--target-modules", "q_proj,v_proj", "--packing", "--from", "n@1", "--resume"])
    config = build_config({k: v for k, v in vars(args).items() if k in FIELD_NAMES})
    assert config.target_modules == ["q_proj", "v_proj"] and config.packing
    assert config.parent == "n@1" and config.resume == "latest"
