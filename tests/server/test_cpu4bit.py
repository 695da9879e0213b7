"""The CPU 4-bit path: bitsandbytes' kernels called directly give its layers' numbers exactly."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch

from common.modeling import load_base
from server.cpu4bit import Cpu4bitLinear, DenseScratch, use_direct_cpu_kernels


@pytest.fixture(scope="module")
def base_4bit(tiny_base: Path) -> torch.nn.Module:
    model, _ = load_base(str(tiny_base))
    return model


def test_every_projection_gives_the_layers_own_output_bit_for_bit(base_4bit):
    import bitsandbytes as bnb

    layers = [m for m in base_4bit.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) >= 7
    torch.manual_seed(0)
    with torch.inference_mode():
        for layer in layers[:7]:  # one decoder layer: every projection shape
            direct = Cpu4bitLinear.of(layer)
            for dtype in (torch.float32, torch.bfloat16):  # the compute dtype, and a cast
                x = torch.randn(5, 3, layer.in_features, dtype=dtype)
                assert torch.equal(direct(x), layer(x)), (layer, dtype)


def test_the_swap_takes_every_cpu_4bit_layer_and_keeps_the_models_output(tiny_base: Path,
                                                                          base_4bit):
    import bitsandbytes as bnb

    model, tokenizer = load_base(str(tiny_base))
    footprint = model.get_memory_footprint()
    count = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert use_direct_cpu_kernels(model) == count
    direct = [m for m in model.modules() if isinstance(m, Cpu4bitLinear)]
    # On this build every layer dequantizes through bitsandbytes' C function into one scratch
    # shared by the model (a renamed function would fall back to the op, slower but right).
    assert all(m.calls_kernel_directly for m in direct)
    assert len({id(m.scratch) for m in direct}) == 1
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    # The packed weights are still counted, plus the scales unpacked once (4 bytes per 64).
    assert footprint <= model.get_memory_footprint() <= footprint * 1.1
    ids = torch.tensor([tokenizer.encode("How do adapters share one base model?")])
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, base_4bit(input_ids=ids).logits)
    assert use_direct_cpu_kernels(model) == 0  # nothing left to swap


def test_other_layers_keep_their_own_forward():
    assert Cpu4bitLinear.of(torch.nn.Linear(64, 64, bias=False)) is None  # not 4-bit
    assert Cpu4bitLinear.of(torch.nn.LayerNorm(64)) is None


def test_a_forward_autograd_records_keeps_its_own_dense_weight(base_4bit):
    import bitsandbytes as bnb

    first, second = [m for m in base_4bit.modules() if isinstance(m, bnb.nn.Linear4bit)][:2]
    scratch = DenseScratch()
    direct, other = Cpu4bitLinear.of(first, scratch), Cpu4bitLinear.of(second, scratch)
    torch.manual_seed(0)
    x = torch.randn(3, first.in_features, requires_grad=True)
    reference = x.detach().clone().requires_grad_()
    y = direct(x)
    with torch.inference_mode():
        other(torch.randn(3, second.in_features))  # reuses the scratch meanwhile
    y.square().sum().backward()
    first(reference).square().sum().backward()
    assert torch.equal(x.grad, reference.grad)


def test_the_scratch_is_reused_within_a_thread_and_separate_across_threads():
    scratch = DenseScratch()
    here = scratch.take(64, torch.float32)
    assert scratch.take(32, torch.float32).data_ptr() == here.data_ptr()  # no new memory
    assert scratch.take(128, torch.float32).numel() == 128  # grown when too small
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(scratch.take(64, torch.float32)))
    thread.start()
    thread.join()
    assert elsewhere[0].data_ptr() != scratch.take(64, torch.float32).data_ptr()


def test_a_copied_layer_gets_scratch_of_its_own_and_the_same_output(base_4bit):
    import bitsandbytes as bnb

    layer = next(m for m in base_4bit.modules() if isinstance(m, bnb.nn.Linear4bit))
    direct = Cpu4bitLinear.of(layer)
    twin = copy.deepcopy(direct)
    assert twin.scratch is not direct.scratch
    x = torch.randn(2, layer.in_features)
    with torch.inference_mode():
        assert torch.equal(twin(x), direct(x))
