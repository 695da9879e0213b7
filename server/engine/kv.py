"""The KV cache: keys and values for `max_rows` rows of up to `capacity` tokens, allocated once.

Rows [0, n) hold the running requests, packed: a request joins at row n, and when one leaves
the last row moves into its place (one row's copy, never the whole cache). Each row keeps its
own tokens from column 0, so a token's column is its position and no row is padded.

The model writes through `update` (transformers' cache-layer interface). What a forward writes
is set beforehand by the runner as a plan: a decode step writes one column per row at that
row's length, a prefill chunk writes columns [start, end) of the joining rows. Every tensor the
decode write touches is allocated once, so a decode step can be captured as a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass(frozen=True)
class DecodeWrite:
    """Rows [0, rows) each write one token at their own column; attention reads columns
    [0, width). `flat_index` (rows * kv_heads,) addresses (row, head, column) in a layer's
    keys viewed as (max_rows * kv_heads * capacity, head_dim)."""

    rows: int
    flat_index: torch.Tensor
    width: int


@dataclass(frozen=True)
class PrefillWrite:
    """Rows [first, first + count) write columns [start, end); attention reads [0, end)."""

    first: int
    count: int
    start: int
    end: int


class _Layer(CacheLayerMixin):
    """One layer's keys and values (max_rows, kv_heads, capacity, head_dim)."""

    is_sliding = False

    def __init__(self, cache: SlotKVCache, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.cache, self.keys, self.values = cache, keys, values
        # Flat views for decode writes: one index_copy_ per tensor instead of an advanced-
        # index assignment (several times slower on the CPU).
        self._flat_keys = keys.view(-1, keys.shape[-1])
        self._flat_values = values.view(-1, values.shape[-1])
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("a slot cache layer is allocated up front")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self.cache.plan
        if isinstance(plan, DecodeWrite):
            # keys[r, h, positions[r]] = key_states[r, h, 0] for every row r and head h
            head_dim = key_states.shape[-1]
            self._flat_keys.index_copy_(0, plan.flat_index, key_states.reshape(-1, head_dim))
            self._flat_values.index_copy_(0, plan.flat_index,
                                          value_states.reshape(-1, head_dim))
            width = plan.width
            return self.keys[: plan.rows, :, :width], self.values[: plan.rows, :, :width]
        assert isinstance(plan, PrefillWrite), "the runner sets a write plan before a forward"
        rows = slice(plan.first, plan.first + plan.count)
        self.keys[rows, :, plan.start : plan.end] = key_states  # (N, H, T, D)
        self.values[rows, :, plan.start : plan.end] = value_states
        return self.keys[rows, :, : plan.end], self.values[rows, :, : plan.end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        plan = self.cache.plan
        return plan.width - 1 if isinstance(plan, DecodeWrite) else plan.start

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotKVCache(Cache):
    """Preallocated keys/values for every layer, in rows that requests take and give back."""

    def __init__(self, num_layers: int, max_rows: int, kv_heads: int, head_dim: int,
                 capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (max_rows, kv_heads, capacity, head_dim)
        # Zeros, not empty: a column past a row's length is masked out of attention, and a
        # masked column of NaN garbage would still poison the softmax-weighted sum (0 * NaN).
        layers = [
            _Layer(self, torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        super().__init__(layers=layers)
        self.max_rows = max_rows
        self.capacity = capacity
        # (max_rows, kv_heads): where each (row, head) starts in a layer's flat keys.
        self._row_heads = torch.arange(max_rows * kv_heads, device=device).view(
            max_rows, kv_heads) * capacity
        self.device = torch.device(device)
        self.plan: DecodeWrite | PrefillWrite | None = None

    def decode_write(self, rows: int, positions: torch.Tensor, width: int) -> DecodeWrite:
        """The plan for rows [0, rows) each writing at its `positions[r]` (rows,)."""
        flat = (self._row_heads[:rows] + positions[:, None]).reshape(-1)
        return DecodeWrite(rows, flat, width)

    @classmethod
    def for_model(cls, model: Any, max_rows: int, capacity: int) -> SlotKVCache:
        """A cache shaped for `model`'s attention (grouped-query heads included)."""
        config = model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = (getattr(config, "head_dim", None)
                    or config.hidden_size // config.num_attention_heads)
        weight = model.get_input_embeddings().weight
        return cls(config.num_hidden_layers, max_rows, heads, head_dim, capacity, weight.dtype,
                   weight.device)

    @property
    def bytes(self) -> int:
        return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in self.layers)

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` columns of row `source` into row `target` (a row left)."""
        for layer in self.layers:
            layer.keys[target, :, :length] = layer.keys[source, :, :length]
            layer.values[target, :, :length] = layer.values[source, :, :length]
