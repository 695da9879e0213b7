"""Stacked per-row LoRA on the real tiny 4-bit base: parity with PEFT, mixed batches equal
single-adapter runs (PEFT's TestMixedAdapterBatches.run_checks layout), routing checks, and a
cost that barely depends on how many adapters share a batch."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from common.modeling import load_base
from server import lora as lora_module
from server.adapter_cache import read_adapter
from server.cpu4bit import use_direct_cpu_kernels
from server.lora import LoraContext, LoraStack, LoraWeights, SharedShrink, StackedLoraLinear

MAX_RANK = 16


def _adapter_dir(root: Path, key: str) -> Path:
    name, version = key.split("@")
    return root / name / version


@pytest.fixture(scope="module")
def stacked(tiny_base: Path, adapters_root: Path):
    """The 4-bit base, as the engine runs it on the CPU, with alpha@1 in slot 1 and beta@1
    (rank 4) in slot 2."""
    torch.set_num_threads(2)
    model, tokenizer = load_base(str(tiny_base))
    assert use_direct_cpu_kernels(model) > 0 or model.device.type != "cpu"
    # Gathered rows on any device (CUDA would default to the all-slots form): the reference
    # the all-slots forms are checked against.
    stack = LoraStack(model, num_slots=20, max_rank=MAX_RANK, launch_bound=False)
    for slot, key in ((1, "alpha@1"), (2, "beta@1")):
        weights = read_adapter(_adapter_dir(adapters_root, key), stack.module_shapes, MAX_RANK)
        stack.install(slot, weights.modules)
    return stack, tokenizer


@pytest.fixture(scope="module")
def peft_model(tiny_base: Path, adapters_root: Path):
    from peft import PeftModel

    model, _ = load_base(str(tiny_base))
    peft = PeftModel.from_pretrained(model, str(_adapter_dir(adapters_root, "alpha@1")),
                                     adapter_name="alpha")
    peft.load_adapter(str(_adapter_dir(adapters_root, "beta@1")), adapter_name="beta")
    return peft.eval()


@pytest.fixture(scope="module")
def ids(stacked) -> torch.Tensor:
    stack, tokenizer = stacked
    text = "Tell me about the weather in the mountains today"
    return torch.tensor([tokenizer.encode(text)], device=stack.model.device)  # (1, T)


def _logits(stack: LoraStack, ids: torch.Tensor, slots: list[int]) -> torch.Tensor:
    stack.route(slots)
    with torch.inference_mode():
        return stack.model(input_ids=ids).logits.float()  # (B, T, V)


def test_each_adapter_matches_peft(stacked, peft_model, ids):
    stack, _ = stacked
    for slot, name in ((1, "alpha"), (2, "beta")):
        ours = _logits(stack, ids, [slot])
        with torch.inference_mode():
            theirs = peft_model(input_ids=ids, adapter_names=[name]).logits.float()
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_mixed_batch_rows_equal_single_adapter_runs(stacked, peft_model, ids):
    stack, _ = stacked
    batch = ids.repeat(9, 1)  # rows 0,3,6: base; 1,4,7: alpha; 2,5,8: beta
    mixed = _logits(stack, batch, [0, 1, 2] * 3)
    singles = [_logits(stack, ids, [slot])[0] for slot in (0, 1, 2)]
    for row in range(9):
        torch.testing.assert_close(mixed[row], singles[row % 3], atol=1e-5, rtol=1e-5)
    with torch.inference_mode(), peft_model.disable_adapter():
        base = peft_model(input_ids=ids).logits.float()[0]
    torch.testing.assert_close(singles[0], base, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(singles[1], singles[0]) and not torch.allclose(singles[2], singles[1])


def test_every_slot_at_once_under_a_mask_equals_gathering_each_row(stacked, ids):
    """The CUDA graphs' form (a static slots tensor, a one-hot mask recomputed in the step,
    the graphs' rank) gives the gathered form's logits, for 12 rows over 3 slots."""
    stack, _ = stacked
    slots = [0, 1, 2, 2, 1, 0, 1, 1, 2, 0, 0, 2]
    batch = ids.repeat(len(slots), 1)
    gathered = _logits(stack, batch, slots)
    static = torch.zeros(len(slots), dtype=torch.long, device=ids.device)
    stack.route_static(static, MAX_RANK)
    assert stack.context.others is not None  # 12 rows, 20 slots: the all-slots form
    static.copy_(torch.tensor(slots))  # what a replay sees: slots written after the capture
    stack.refresh_static()
    with torch.inference_mode():
        masked = stack.model(input_ids=batch).logits.float()
    torch.testing.assert_close(masked, gathered, atol=1e-5, rtol=1e-5)
    stack.route_static(static[:2], MAX_RANK)
    assert stack.context.others is None  # 2 rows: gathering copies less


def test_a_damaged_slot_spoils_only_its_own_rows_under_the_mask(tiny_base, adapters_root, ids):
    """Every row multiplies by every slot in the masked form, so a slot whose product is not
    finite (NaN in A) must not reach the other slots' rows, as 0 x NaN would; nor through a
    shrink its layer shares with others (here q_proj's, with k and v)."""
    model, _ = load_base(str(tiny_base))
    stack = LoraStack(model, num_slots=4, max_rank=MAX_RANK, launch_bound=True)
    alpha = read_adapter(_adapter_dir(adapters_root, "alpha@1"), stack.module_shapes, MAX_RANK)
    stack.install(1, alpha.modules)
    damaged = {name: LoraWeights(torch.full_like(w.a, float("nan")), w.b, w.scaling)
               for name, w in alpha.modules.items() if name.endswith("0.self_attn.q_proj")}
    assert len(damaged) == 1
    stack.install(3, damaged)
    stack.wrap_all()
    slots = [0, 1, 3, 1, 0, 3]
    batch = ids.repeat(len(slots), 1)
    stack.route_static(torch.tensor(slots, device=ids.device), MAX_RANK)
    assert stack.context.others is not None
    stack.refresh_static()
    with torch.inference_mode():
        masked = stack.model(input_ids=batch).logits.float()
    healthy = [row for row, slot in enumerate(slots) if slot != 3]
    stack.launch_bound = False  # the healthy rows alone, gathered: no slot 3 in the sums
    expected = _logits(stack, batch[healthy], [slots[row] for row in healthy])
    assert stack.context.others is None
    torch.testing.assert_close(masked[healthy], expected, atol=1e-5, rtol=1e-5)
    assert not masked[[2, 5]].isfinite().any()


@pytest.fixture(scope="module")
def launch_bound(tiny_base: Path, adapters_root: Path) -> LoraStack:
    """The same base and adapters as `stacked`, in a stack that multiplies by every slot in
    every forward (as on CUDA), with every layer wrapped and its shrinks shared."""
    model, _ = load_base(str(tiny_base))
    stack = LoraStack(model, num_slots=20, max_rank=MAX_RANK, launch_bound=True)
    for slot, key in ((1, "alpha@1"), (2, "beta@1")):
        weights = read_adapter(_adapter_dir(adapters_root, key), stack.module_shapes, MAX_RANK)
        stack.install(slot, weights.modules)
    stack.wrap_all()
    return stack


def test_layers_that_read_one_input_share_one_shrink(launch_bound):
    """Found by running the model, not by names: in each Llama layer q, k and v read the
    normed hidden state, gate and up the normed attention output; o and down read their own."""
    layers = launch_bound.model.model.layers
    assert len(layers) > 0
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        assert q.shrink is k.shrink is v.shrink
        assert [q.member, k.member, v.member] == [0, 1, 2]
        assert mlp.gate_proj.shrink is mlp.up_proj.shrink
        assert [mlp.gate_proj.member, mlp.up_proj.member] == [0, 1]
        assert attention.o_proj.shrink.members == mlp.down_proj.shrink.members == 1
        # The adapters installed before the sharing were moved into the shared stacks.
        assert q.lora_a[:, 1].any() and v.lora_a[:, 2].any()
        assert q.lora_a.data_ptr() != k.lora_a.data_ptr()


def test_shared_shrinks_give_the_gathered_logits(stacked, launch_bound, ids):
    """Mixed rows of several tokens (a prefill's shape) through the shared, masked form equal
    the gathered form's rows, for the bare base, a rank-16 and a rank-4 adapter."""
    slots = [0, 1, 2, 2, 1, 0, 1]
    batch = ids.repeat(len(slots), 1)
    gathered = _logits(stacked[0], batch, slots)
    launch_bound.route(slots)
    assert launch_bound.context.others is not None  # launch-bound: the all-slots form
    with torch.inference_mode():
        shared = launch_bound.model(input_ids=batch).logits.float()
    torch.testing.assert_close(shared, gathered, atol=1e-5, rtol=1e-5)


def test_a_forward_of_many_tokens_gathers_even_when_launch_bound(stacked, launch_bound, ids,
                                                                monkeypatch):
    """Past ALL_SLOTS_MAX_TOKEN_SLOTS (a long prefill) multiplying every token by every slot
    costs more arithmetic than the launches it saves: such a forward gathers, and agrees."""
    slots = [0, 1, 2, 1]
    batch = ids.repeat(len(slots), 1)
    gathered = _logits(stacked[0], batch, slots)
    tokens_times_slots = batch.numel() * launch_bound.num_slots
    monkeypatch.setattr(lora_module, "ALL_SLOTS_MAX_TOKEN_SLOTS", tokens_times_slots - 1)

    def never(*args: object) -> None:
        raise AssertionError("the all-slots form ran past its token limit")

    monkeypatch.setattr(SharedShrink, "part", never)
    launch_bound.route(slots)
    with torch.inference_mode():
        logits = launch_bound.model(input_ids=batch).logits.float()
    torch.testing.assert_close(logits, gathered, atol=1e-5, rtol=1e-5)


def test_a_shared_shrink_never_hands_out_a_product_of_another_input():
    """A member that runs with an input other than the one the product was made from (out of
    turn, or after a failed forward) gets its own input's product."""
    torch.manual_seed(0)
    context = LoraContext()
    shrink = SharedShrink(torch.randn(4, 2, 3, 8))  # rank 4, two members, three slots, in 8
    context.set(torch.tensor([1, 1]), 4, others=torch.tensor([[True, False, True]] * 2))
    first, second = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    shrink.part(first, 0, context)  # the product of `first`, kept for member 1
    alone = SharedShrink(shrink.a.clone())
    expected = alone.part(second, 0, context), alone.part(second, 1, context)
    assert torch.equal(shrink.part(second, 1, context), expected[1])
    assert torch.equal(shrink.part(second, 0, context), expected[0])
    masked = shrink.part(second, 1, context).view(2, 4, 3)
    assert not masked[:, :, [0, 2]].any()  # every row's other slots zeroed


def test_routing_is_checked_before_the_forward(stacked, ids):
    stack, _ = stacked
    with pytest.raises(ValueError, match=r"no adapter installed: \[7\]"):
        stack.route([0, 7])
    stack.route([1, 2])
    with pytest.raises(ValueError, match="2 rows but the batch has 1"):
        with torch.inference_mode():
            stack.model(input_ids=ids)


def test_reinstalling_a_slot_clears_modules_the_new_adapter_does_not_target(stacked, ids):
    stack, _ = stacked
    q_only = {
        name: LoraWeights(torch.randn(4, shape[0]), torch.randn(shape[1], 4), 0.5)
        for name, shape in stack.module_shapes.items() if name.endswith("self_attn.q_proj")
    }
    full = {
        name: LoraWeights(torch.randn(8, shape[0]), torch.randn(shape[1], 8), 1.0)
        for name, shape in stack.module_shapes.items() if name.startswith("model.layers.")
    }
    stack.install(3, full)
    memory = stack.install(3, q_only)
    assert memory == stack.slice_bytes(list(q_only))
    for name, module in stack.model.named_modules():
        if not isinstance(module, StackedLoraLinear):
            continue
        if name in q_only:  # rank 4 in slot 3, zeros past it (padding to max_rank)
            assert module.lora_a[:4, 3].any() and not module.lora_a[4:, 3].any()
        else:
            assert not module.lora_a[:, 3].any() and not module.lora_bt[:, 3].any()


def test_step_cost_barely_depends_on_the_adapter_mix(stacked, ids):
    """16 rows over 16 distinct adapters cost about what 16 rows over one adapter cost."""
    stack, _ = stacked
    torch.manual_seed(0)
    for slot in range(3, 19):
        stack.install(slot, {
            name: LoraWeights(torch.randn(8, s[0]) * 0.01, torch.randn(s[1], 8) * 0.01, 2.0)
            for name, s in stack.module_shapes.items() if name.startswith("model.layers.")
        })
    batch = ids[:, :1].repeat(16, 1)  # (16, 1): decode-shaped steps

    def seconds(slots: list[int]) -> float:
        stack.route(slots)
        with torch.inference_mode():
            stack.model(input_ids=batch)  # gathers this layout's slices once
            started = time.perf_counter()
            for _ in range(4):
                stack.model(input_ids=batch)
        return time.perf_counter() - started

    # Interleaved, best of several: the machine is shared, so single timings are noisy.
    one = distinct = float("inf")
    for _ in range(4):
        one = min(one, seconds([3] * 16))
        distinct = min(distinct, seconds(list(range(3, 19))))
    assert distinct < 2.0 * one, f"16 adapters {distinct:.4f}s vs one {one:.4f}s"
