"""sdpa_varlen: padding-free rows attend within each conversation, exactly like SDPA's mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.attention import SDPA_VARLEN, register, use_varlen_attention

LENGTHS = [37, 120, 5, 64]


@pytest.fixture(scope="module")
def model(tiny_base: Path):
    from transformers import AutoModelForCausalLM

    register()
    return AutoModelForCausalLM.from_pretrained(str(tiny_base), attn_implementation="sdpa")


def packed_row(seed: int = 0) -> dict[str, torch.Tensor]:
    """Four conversations in one row, as TRL's padding-free collator hands them over."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 4000, (1, sum(LENGTHS)), generator=generator)
    bounds = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": ids,
            "position_ids": torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0),
            "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
            "max_length_q": max(LENGTHS), "max_length_k": max(LENGTHS), "use_cache": False}


def logits_with(model, attention: str, **batch) -> torch.Tensor:
    model.set_attn_implementation(attention)
    with torch.no_grad():
        return model(**batch).logits


def test_each_conversation_sees_only_itself(model) -> None:
    batch = packed_row()
    varlen = logits_with(model, SDPA_VARLEN, **batch)
    bounds = batch["cu_seq_lens_q"].tolist()
    alone = torch.cat([logits_with(model, "sdpa", input_ids=batch["input_ids"][:, s:e])
                       for s, e in zip(bounds[:-1], bounds[1:], strict=True)], dim=1)
    masked = logits_with(model, "sdpa", **batch)  # SDPA with transformers' block-diagonal mask
    assert torch.allclose(varlen, alone, atol=1e-4)
    assert torch.allclose(varlen, masked, atol=1e-4)


def test_gradients_match_the_masked_sdpa_path(model) -> None:
    batch = packed_row(seed=1)
    grads = {}
    for attention in ("sdpa", SDPA_VARLEN):
        model.set_attn_implementation(attention)
        model.zero_grad()
        model(labels=batch["input_ids"], **batch).loss.backward()
        grads[attention] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    assert len(grads["sdpa"]) == len(grads[SDPA_VARLEN]) > 0
    for a, b in zip(grads["sdpa"], grads[SDPA_VARLEN], strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)


def test_padded_batches_keep_their_mask(model) -> None:
    ids = torch.randint(10, 4000, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    stock = logits_with(model, "sdpa", input_ids=ids, attention_mask=mask)
    varlen = logits_with(model, SDPA_VARLEN, input_ids=ids, attention_mask=mask)
    assert torch.allclose(stock[:, 5:], varlen[:, 5:], atol=1e-5)


def test_only_sdpa_models_are_switched(tiny_base: Path) -> None:
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(str(tiny_base), attn_implementation="eager")
    assert not use_varlen_attention(eager)
    assert eager.config._attn_implementation == "eager"
    sdpa = AutoModelForCausalLM.from_pretrained(str(tiny_base), attn_implementation="sdpa")
    assert use_varlen_attention(sdpa) and sdpa.config._attn_implementation == SDPA_VARLEN
