"""Sampling settings, the per-row sampler, stop strings, and incremental detokenization."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.modeling import load_tokenizer
from server.detokenize import IncrementalDetokenizer
from server.errors import RowFailedError
from server.sampling import (
    RowSampler,
    SamplingParams,
    StopCheck,
    check_stop,
    row_argmax,
    sample_batch,
)


@pytest.mark.parametrize(("field", "value"), [
    ("max_new_tokens", -1), ("max_new_tokens", 1.5), ("temperature", -0.1), ("top_p", 0.0),
    ("top_p", 1.5), ("top_k", -1), ("repetition_penalty", 0.0), ("seed", -3),
    ("stop", "END"), ("stop", ("",)),
])
def test_invalid_params_name_the_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{"max_new_tokens": 4, field: value})
    assert field in str(info.value) and repr(value) in str(info.value)


def test_defaults_and_normalisation():
    params = SamplingParams(max_new_tokens=0, stop=["a", "b"])
    assert params.stop == ("a", "b") and params.greedy
    assert params.with_default_length(128).max_new_tokens == 128
    assert SamplingParams(max_new_tokens=5).with_default_length(128).max_new_tokens == 5


def _rows(n: int, **params) -> list[RowSampler]:
    return [RowSampler.create(SamplingParams(max_new_tokens=4, **params), [1, 2]) for _ in range(n)]


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(3, 50)
    assert sample_batch(logits, _rows(3)) == logits.argmax(-1).tolist()


def test_the_chosen_ids_are_also_written_where_the_next_step_reads_them():
    logits = torch.randn(5, 50)
    logits[2, 7] = float("nan")  # this row fails; the others keep their tokens
    logits[4] = 0.0  # uniform: the draw, not the argmax (0), decides
    rows = [*_rows(2), *_rows(1), *_rows(1, temperature=1.0, top_k=1),
            RowSampler.create(SamplingParams(4, temperature=1.0, seed=4), [0])]
    out = torch.full((5,), -1, dtype=torch.long)
    tokens = sample_batch(logits, rows, out=out)
    argmax = logits.argmax(-1).tolist()
    assert tokens[:2] == argmax[:2] and tokens[3] == argmax[3]
    assert isinstance(tokens[2], RowFailedError) and tokens[4] != argmax[4]
    # A failed row never runs again: any valid id will do there.
    assert out.tolist() == [*argmax[:4], tokens[4]]


@pytest.mark.parametrize("vocab", [4096, 1000])
def test_row_argmax_is_torch_argmax_with_ties_nan_and_inf(vocab):
    torch.manual_seed(0)
    logits = torch.randint(-3, 4, (9, vocab)).float()  # many tied maxima per row
    logits[1] = torch.randn(vocab)
    logits[2, 700] = float("nan")
    logits[3, 5] = float("inf")
    logits[4] = float("-inf")
    logits[5, vocab - 1] = 10.0  # the maximum in the last block
    index, value = row_argmax(logits)
    expected = torch.argmax(logits, dim=-1)
    assert torch.equal(index, expected)
    picked = logits.gather(1, expected[:, None])[:, 0]
    assert torch.allclose(value, picked, rtol=0, atol=0, equal_nan=True)
    assert value[2].isnan() and value[3] == float("inf")


def test_top_k_one_and_tiny_top_p_are_greedy_even_when_sampling():
    logits = torch.randn(2, 50)
    expected = logits.argmax(-1).tolist()
    assert sample_batch(logits, _rows(2, temperature=1.5, top_k=1)) == expected
    assert sample_batch(logits, _rows(2, temperature=1.5, top_p=1e-6)) == expected


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    logits = torch.zeros(1, 1000)  # uniform: the seed alone decides

    def draw(seed: int, batch: int) -> list[int]:
        rows = [RowSampler.create(SamplingParams(4, temperature=1.0, seed=seed), [0])]
        rows += _rows(batch - 1, temperature=1.0)
        return [sample_batch(logits.repeat(batch, 1), rows)[0] for _ in range(5)]

    assert draw(11, 1) == draw(11, 4)
    assert draw(11, 1) != draw(12, 1)


def test_each_row_of_a_batch_draws_from_its_own_filtered_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    settings = [{}, {"top_k": 2}, {"top_p": 0.7}]
    # 100 rows of each setting, interleaved, each with a seed of its own.
    rows = [RowSampler.create(SamplingParams(4, temperature=1.0, seed=seed, **settings[seed % 3]),
                              [0]) for seed in range(300)]
    draws = torch.tensor([sample_batch(probs.log().repeat(300, 1), rows)
                          for _ in range(30)]).view(-1, 100, 3)  # (step x row, setting)
    counts = torch.stack([torch.bincount(draws[..., s].flatten(), minlength=4)
                          for s in range(3)]) / 3000
    expected = torch.tensor([[0.5, 0.3, 0.2, 0.0],
                             [0.625, 0.375, 0.0, 0.0],  # top-k 2: the first two, rescaled
                             [0.625, 0.375, 0.0, 0.0]])  # top-p 0.7: 0.5 + 0.3 reaches it
    assert torch.allclose(counts, expected, atol=0.035), counts


def test_a_nucleus_wider_than_the_candidates_is_still_whole():
    vocab = 3000  # uniform: top-p 0.5 keeps 1,500 tokens, more than the 1,024 candidates
    rows = [RowSampler.create(SamplingParams(4, temperature=1.0, top_p=0.5, seed=s), [0])
            for s in range(20)]
    draws = {t for _ in range(150) for t in sample_batch(torch.zeros(20, vocab), rows)}
    assert 1024 < len(draws) <= 1501  # about 1,300 of the 1,500 expected in 3,000 draws


def test_picks_stay_on_the_device_until_read_and_a_raising_row_fails_alone(monkeypatch):
    from server import sampling

    real_choose = sampling.choose_batch

    def choose_batch(logits, rows):
        if any(row.seed == 13 for row in rows):
            raise RuntimeError("injected sampling fault")
        return real_choose(logits, rows)

    monkeypatch.setattr(sampling, "choose_batch", choose_batch)
    logits = torch.randn(3, 50)
    rows = [*_rows(1),
            RowSampler.create(SamplingParams(4, temperature=1.0, seed=13,
                                             repetition_penalty=1.5), [1]),
            RowSampler.create(SamplingParams(4, temperature=1.0, top_k=1, seed=14,
                                             repetition_penalty=1.5), [1])]
    out = torch.full((3,), -1, dtype=torch.long)
    picks, errors = sampling.pick_tokens(logits, rows, out)
    assert set(errors) == {1} and "injected sampling fault" in str(errors[1])
    tokens = sampling.read_picks(picks, errors)
    assert tokens[0] == int(logits[0].argmax()) and isinstance(tokens[1], RowFailedError)
    penalized = logits[2].clone()
    penalized[1] /= 1.5 if penalized[1] > 0 else 1 / 1.5
    assert tokens[2] == int(penalized.argmax())  # top-k 1 after the penalty: its mode
    assert out.tolist() == [tokens[0], int(logits[1].argmax()), tokens[2]]
    # Only the rows that got a token saw it.
    assert rows[1].seen_ids.tolist() == [1] and rows[2].seen_ids.tolist() == [1, tokens[2]]


def test_a_temperature_near_zero_takes_the_mode():
    logits = torch.randn(2, 50)
    rows = _rows(2, temperature=1e-30)
    assert sample_batch(logits, rows) == logits.argmax(-1).tolist()


def test_repetition_penalty_avoids_seen_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.9, 0.0]])
    row = RowSampler.create(SamplingParams(4, repetition_penalty=2.0), prompt_ids=[1])
    assert sample_batch(logits, [row]) == [2]
    assert sample_batch(logits, [row]) == [1]  # 1 (1.5) now beats the seen 2 (1.45)


@pytest.mark.parametrize(("text", "start", "stop_at", "safe"), [
    ("hello there", 0, None, 11),
    ("hello wor", 0, None, 6),  # "wor" may grow into "world": held back
    ("say world now", 0, 4, 4),
    ("say world now", 6, 4, 4),  # a match that began before `start` is still found
])
def test_check_stop(text, start, stop_at, safe):
    assert check_stop(text, ("world",), start) == StopCheck(stop_at, safe)


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path):
    return load_tokenizer(str(tiny_base))


def test_incremental_detokenization_matches_a_full_decode(tokenizer):
    prompt = tokenizer.encode("User: say something")
    text = "Café naïve — 你好, world 🙂! ok"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)  # incomplete UTF-8 is held back, not shown


def test_byte_fallback_pieces_are_held_until_complete(tokenizer):
    ids = tokenizer.encode("🙂")
    detok = IncrementalDetokenizer(tokenizer, [])
    shown = [detok.push(t) for t in ids]
    if len(ids) > 1:  # the emoji spans several byte tokens: nothing until the last one
        assert shown[:-1] == [""] * (len(ids) - 1)
    assert "".join(shown) + detok.flush() == "🙂"
