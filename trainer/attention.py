"""Padding-free attention without FlashAttention: one SDPA call per packed sequence.

TRL's padding-free batches are one long row of several conversations plus `cu_seq_lens_q` (where
each starts). FlashAttention's varlen kernel uses those boundaries directly; PyTorch's SDPA has no
such kernel, so transformers gives it a block-diagonal mask over the whole row, whose cost grows
with the square of the row's length and eats what dropping padding saved (measured: 1.00x of a
padded batch on the CPU). `sdpa_varlen` runs causal SDPA on each conversation's own slice instead,
so attention costs what it would in a padded batch without the padding. Registered through
transformers' AttentionInterface, the library's extension point for attention kernels.
"""

from __future__ import annotations

from typing import Any

SDPA_VARLEN = "sdpa_varlen"


def sdpa_varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                          dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    """Causal SDPA per packed sequence when `cu_seq_lens_q` says where they are, else plain SDPA."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        # Padded batches, generation with a cache: the stock path with its mask.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout = dropout if module.training else 0.0
    edges = bounds.tolist()
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            dropout_p=dropout, scale=scaling, is_causal=True)
        for start, end in zip(edges[:-1], edges[1:], strict=True) if end > start
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `sdpa_varlen` a known attention implementation (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention)
    # Padded batches (evaluation without padding-free, generation) still need SDPA's mask.
    AttentionMaskInterface.register(SDPA_VARLEN, sdpa_mask)
    return SDPA_VARLEN


def use_varlen_attention(model: Any) -> bool:
    """Switch a loaded model to `sdpa_varlen` if it runs on SDPA; False when it cannot."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(register())
    return model.config._attn_implementation == SDPA_VARLEN
