"""The CPU path of a bitsandbytes 4-bit base: its kernels called directly, same numbers.

bitsandbytes' `Linear4bit` runs five Python layers per call around a dequantize and a matmul;
at the sizes a CPU serves, those layers cost as much as the kernels, and the nested scales are
unpacked again on every call. `Cpu4bitLinear` keeps the packed weight and its unpacked scales
and calls the same two kernels, so its output equals the layer's bit for bit. The dequantize
kernel is bitsandbytes' own C function, called with a buffer the layers of a model share
(`DenseScratch`) rather than through its op, which allocates a fresh dense weight on every call.
The engine swaps every eligible CPU layer at start (`use_direct_cpu_kernels`); CUDA layers are
left alone (their kernels are captured in graphs there).
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# bitsandbytes' CPU dequantize functions are named by quant type and output dtype.
_DTYPE_SUFFIX = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@functools.cache
def dequantize_kernel(quant_type: str, dtype: torch.dtype) -> Callable[..., Any] | None:
    """bitsandbytes' C function that dequantizes 4-bit blocks into a caller's buffer; None where
    this build lacks it (the layer then calls bitsandbytes' op instead)."""
    suffix = _DTYPE_SUFFIX.get(dtype)
    if suffix is None or quant_type not in ("nf4", "fp4"):
        return None
    from bitsandbytes.cextension import lib

    # The library object answers any name with a function that raises; ask the CDLL itself.
    native = getattr(lib, "_lib", None)
    return getattr(native, f"cdequantize_blockwise_cpu_{quant_type}_{suffix}", None)


class DenseScratch:
    """Memory each thread dequantizes into, reused by every layer of a model: a dense weight
    is read once, by the matmul right after, so one buffer per thread (the largest layer's
    size) serves them all, and a step does not pay for fresh memory on each layer."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __reduce__(self) -> tuple[type[DenseScratch], tuple[()]]:
        # A copied or pickled model gets empty scratch of its own (thread-locals do not copy).
        return (DenseScratch, ())

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """`numel` elements of this thread's buffer for `dtype` (grown when too small)."""
        buffers: dict[torch.dtype, torch.Tensor] = self._local.__dict__.setdefault("by_dtype", {})
        buffer = buffers.get(dtype)
        if buffer is None or buffer.numel() < numel:
            buffer = buffers[dtype] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]


class Cpu4bitLinear(nn.Module):
    """A bias-free CPU 4-bit Linear that calls bitsandbytes' kernels directly, with the casts
    of Linear4bit's own forward (so its numbers): the packed NF4/FP4 codes, and the per-block
    scales already unpacked from their double quantization."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, state: Any,
                 compute_dtype: torch.dtype, scratch: DenseScratch | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = state.shape
        self.blocksize, self.quant_type = state.blocksize, state.quant_type
        self.compute_dtype = compute_dtype
        # Buffers, so the model's memory footprint still counts the packed weight and scales.
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("absmax", absmax, persistent=False)
        self.scratch = scratch or DenseScratch()
        # Whether forwards without autograd dequantize through the C function into scratch
        # (bitsandbytes' op sends odd rows and, with AVX-512, blocks of 2048 or more elsewhere).
        self.calls_kernel_directly = (
            packed.dtype == torch.uint8 and packed.is_contiguous() and absmax.is_contiguous()
            and self.in_features % 2 == 0 and self.blocksize < 2048
            and dequantize_kernel(self.quant_type, compute_dtype) is not None)

    @classmethod
    def of(cls, layer: nn.Module, scratch: DenseScratch | None = None) -> Cpu4bitLinear | None:
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
        return cls(weight.data, absmax.float().contiguous(), state, dtype, scratch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self._dense(keep=torch.is_grad_enabled() and x.requires_grad)
        if x.dtype == self.compute_dtype:
            return nn.functional.linear(x, dense)
        return nn.functional.linear(x.to(self.compute_dtype), dense).to(x.dtype)

    def _dense(self, keep: bool) -> torch.Tensor:
        """The dense weight (out, in); `keep`: autograd holds it, so it gets its own memory."""
        shape = (self.out_features, self.in_features)
        if keep or not self.calls_kernel_directly:
            return torch.ops.bitsandbytes.dequantize_4bit.default(
                self.packed, self.absmax, self.blocksize, self.quant_type, shape,
                self.compute_dtype)
        dense = self.scratch.take(shape[0] * shape[1], self.compute_dtype).view(shape)
        kernel = dequantize_kernel(self.quant_type, self.compute_dtype)
        kernel(ctypes.c_void_p(self.packed.data_ptr()), ctypes.c_void_p(self.absmax.data_ptr()),
               ctypes.c_void_p(dense.data_ptr()), ctypes.c_longlong(self.blocksize),
               ctypes.c_longlong(shape[0]), ctypes.c_longlong(shape[1]))
        return dense


def use_direct_cpu_kernels(model: nn.Module) -> int:
    """Swap every eligible CPU Linear4bit of `model` for a `Cpu4bitLinear`; return how many."""
    scratch = DenseScratch()
    swapped = 0
    for name, module in list(model.named_modules()):
        direct = Cpu4bitLinear.of(module, scratch)
        if direct is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, direct)
        swapped += 1
    return swapped
