"""The CPU path of a bitsandbytes 4-bit base: its kernels called directly, same numbers.

bitsandbytes' `Linear4bit` runs five Python layers per call around a dequantize and a matmul;
at the sizes a CPU serves, those layers cost as much as the kernels, and the nested scales are
unpacked again on every call. `Cpu4bitLinear` keeps the packed weight and its unpacked scales
and calls the same two kernels, so its output equals the layer's bit for bit. The engine swaps
every eligible CPU layer at start (`use_direct_cpu_kernels`); CUDA layers are left alone (their
kernels are captured in graphs there).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Cpu4bitLinear(nn.Module):
    """A bias-free CPU 4-bit Linear that calls bitsandbytes' kernels directly, with the casts
    of Linear4bit's own forward (so its numbers): the packed NF4/FP4 codes, and the per-block
    scales already unpacked from their double quantization."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, state: Any,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = state.shape
        self.blocksize, self.quant_type = state.blocksize, state.quant_type
        self.compute_dtype = compute_dtype
        # Buffers, so the model's memory footprint still counts the packed weight and scales.
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("absmax", absmax, persistent=False)

    @classmethod
    def of(cls, layer: nn.Module) -> Cpu4bitLinear | None:
        """For a CPU Linear4bit with a compute dtype, no bias and no repacked weights; None for
        any other layer (which keeps its own forward)."""
        weight = getattr(layer, "weight", None)
        state = getattr(weight, "quant_state", None)
        dtype = getattr(layer, "compute_dtype", None)
        if (state is None or dtype is None or weight.device.type != "cpu"
                or layer.bias is not None
                or getattr(state, "packing_format_for_cpu", False)
                or getattr(layer, "support_avx512bf16_for_cpu", True)
                or (state.nested and state.state2.blocksize != 256)):
            return None
        absmax = state.absmax
        if state.nested:
            # What bitsandbytes recomputes on every call, done once: 4 bytes per block of
            # 64 weights (half a bit per weight) buys about a tenth of a decode step.
            absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
                absmax, state.state2.absmax, state.state2.code, 256, torch.float32,
            ) + state.offset
        return cls(weight.data, absmax.float(), state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = torch.ops.bitsandbytes.dequantize_4bit.default(
            self.packed, self.absmax, self.blocksize, self.quant_type,
            (self.out_features, self.in_features), self.compute_dtype)
        return nn.functional.linear(x.to(self.compute_dtype), dense).to(x.dtype)


def use_direct_cpu_kernels(model: nn.Module) -> int:
    """Swap every eligible CPU Linear4bit of `model` for a `Cpu4bitLinear`; return how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        direct = Cpu4bitLinear.of(module)
        if direct is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, direct)
        swapped += 1
    return swapped
