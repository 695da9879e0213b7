"""Reading PEFT adapters (validation with precise errors, size limit) and the LRU of slots with
pins and a memory budget."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.modeling import load_base
from server.adapter_cache import AdapterCache, AdapterNotLoadedError, read_adapter
from server.errors import (
    AdapterCapacityError,
    AdapterInUseError,
    AdapterLoadError,
    AdapterSlotsBusyError,
    AdapterTooLargeError,
)
from server.lora import LoraStack

Q0 = "model.layers.0.self_attn.q_proj"
Q0_A = f"base_model.model.{Q0}.lora_A.weight"


@pytest.fixture(scope="module")
def shapes(tiny_base: Path) -> dict[str, tuple[int, int]]:
    model, _ = load_base(str(tiny_base))
    return dict(LoraStack(model, num_slots=2, max_rank=64).module_shapes)


@pytest.fixture
def alpha(adapters_root: Path, tmp_path: Path) -> Path:
    """A private copy of alpha@1 (rank 8, alpha 16, all linear layers) to break at will."""
    return Path(shutil.copytree(adapters_root / "alpha" / "1", tmp_path / "alpha"))


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _edit_tensors(path: Path, edit) -> None:
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def test_reads_a_peft_adapter(alpha, shapes):
    weights = read_adapter(alpha, shapes, max_rank=64)
    assert weights.rank == 8
    layers = {n for n in shapes if n.startswith("model.layers.")}
    assert set(weights.modules) == layers  # "all-linear": every Linear but the lm_head
    q = weights.modules[Q0]
    assert q.a.shape == (8, shapes[Q0][0]) and q.b.shape == (shapes[Q0][1], 8)
    assert q.scaling == 2.0  # lora_alpha 16 / r 8


def test_rslora_and_alpha_pattern_scaling(alpha, shapes):
    _edit_config(alpha, use_rslora=True, alpha_pattern={"q_proj": 4})
    modules = read_adapter(alpha, shapes, max_rank=64).modules
    assert modules[Q0].scaling == pytest.approx(4 / math.sqrt(8))
    assert modules["model.layers.0.self_attn.k_proj"].scaling == pytest.approx(16 / math.sqrt(8))


@pytest.mark.parametrize(("breakage", "message"), [
    (lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    (lambda p: (p / "adapter_config.json").write_text("{nope"), "not valid JSON"),
    (lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"),
     r"found adapter_model.bin; only safetensors are read"),
    (lambda p: (p / "adapter_model.safetensors").write_bytes(b"garbage"), "unreadable"),
    (lambda p: _edit_config(p, use_dora=True), r"DoRA \(use_dora\) is not supported"),
    (lambda p: _edit_config(p, peft_type="IA3"), "peft_type must be LORA"),
    (lambda p: _edit_tensors(p, lambda t: t.update({
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": t[next(iter(t))].clone(),
        "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": t[next(iter(t))].clone(),
    })), "targets 'model.layers.9.self_attn.q_proj', which is not a Linear layer of this base"),
    (lambda p: _edit_tensors(p, lambda t: t.pop(
        f"base_model.model.{Q0}.lora_B.weight")), f"'{Q0}' has lora_A but not both A and B"),
    (lambda p: _edit_tensors(p, lambda t: t.update({
        Q0_A: t[Q0_A][:, :7].clone(),
    })), f"'{Q0}' has lora_A"),
])
def test_bad_adapters_fail_with_a_precise_message(alpha, shapes, breakage, message):
    breakage(alpha)
    with pytest.raises(AdapterLoadError, match=message):
        read_adapter(alpha, shapes, max_rank=64)


def test_rank_above_the_limit_is_refused(alpha, shapes):
    with pytest.raises(AdapterLoadError, match="rank 8 > max_lora_rank 4"):
        read_adapter(alpha, shapes, max_rank=4)


def test_lru_eviction_skips_pinned_entries():
    cache = AdapterCache(capacity=2)
    for key in ("a@1", "b@1"):
        slot, evicted = cache.reserve_slot()
        assert evicted == []
        cache.add(key, slot, rank=8, memory_bytes=100, load_seconds=0.1)
    cache.pin("a@1")  # a is in use ...
    cache.pin("b@1")
    cache.unpin("b@1")  # ... and b is now the most recently used, but free
    slot, evicted = cache.reserve_slot()
    assert evicted == ["b@1"]  # not a@1, although a@1 is the least recently used
    cache.add("c@1", slot, rank=4, memory_bytes=50, load_seconds=0.1)
    cache.pin("c@1")
    with pytest.raises(AdapterCapacityError, match="all 2 adapter slots are in use"):
        cache.reserve_slot()
    assert {k: i.in_flight for k, i in cache.info().items()} == {"a@1": 1, "c@1": 1}


def test_pins_block_removal_and_unknown_keys_list_what_is_loaded():
    cache = AdapterCache(capacity=3)
    slot, _ = cache.reserve_slot()
    cache.add("a@1", slot, rank=8, memory_bytes=100, load_seconds=0.1)
    cache.pin("a@1")
    with pytest.raises(AdapterInUseError, match="in use by 1 request"):
        cache.remove("a@1")
    cache.unpin("a@1")
    assert cache.remove("a@1") == slot
    with pytest.raises(AdapterNotLoadedError, match=r"'a@1' is not loaded \(loaded: none\)"):
        cache.pin("a@1")
    assert sorted(cache.reserve_slot()[0] for _ in range(3)) == [1, 2, 3]


# ---------------------------------------------------------------- damaged and oversized files

def _truncate(path: Path) -> None:
    file = path / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _garbage_header(path: Path) -> None:
    """A header length far beyond the file, then bytes that are not JSON."""
    file = path / "adapter_model.safetensors"
    file.write_bytes((10**12).to_bytes(8, "little") + b"\x00not a header" * 10)


@pytest.mark.parametrize(("breakage", "message"), [
    (_truncate, "adapter_model.safetensors is unreadable"),
    (_garbage_header, "adapter_model.safetensors is unreadable"),
    (lambda p: _edit_tensors(p, lambda t: t[Q0_A].__setitem__((0, 0), float("nan"))),
     f"'{Q0}' lora_A holds NaN or infinite values"),
    (lambda p: _edit_tensors(p, lambda t: t.update({Q0_A: t[Q0_A].to(dtype=torch.int32)})),
     f"'{Q0}' lora_A has dtype torch.int32"),
    (lambda p: (p / "adapter_config.json").write_text(" " * (2 * 1024 * 1024) + "{}"),
     "adapter_config.json is 2097154 bytes; at most 1048576 are read"),
])
def test_damaged_files_fail_with_a_precise_message(alpha, shapes, breakage, message):
    breakage(alpha)
    with pytest.raises(AdapterLoadError, match=message):
        read_adapter(alpha, shapes, max_rank=64)


def test_a_weights_file_over_the_size_limit_is_refused_before_reading(alpha, shapes):
    size = (alpha / "adapter_model.safetensors").stat().st_size
    assert read_adapter(alpha, shapes, max_rank=64, max_bytes=size).rank == 8
    # Garbage of the same size: had the file been read, this would say "unreadable".
    (alpha / "adapter_model.safetensors").write_bytes(b"\xff" * (size + 1))
    with pytest.raises(AdapterTooLargeError) as refused:
        read_adapter(alpha, shapes, max_rank=64, max_bytes=size)
    message = str(refused.value)
    assert f"is {size + 1} bytes, over this server's limit of {size} bytes" in message
    assert "max_adapter_bytes" in message and "not read" in message
    assert isinstance(refused.value, AdapterLoadError)  # FAILED_PRECONDITION at the edge


# ---------------------------------------------------------------- the memory budget

def _filled(cache: AdapterCache, sizes: dict[str, int]) -> AdapterCache:
    for key, size in sizes.items():
        slot, evicted = cache.reserve_slot(size, key)
        assert evicted == []
        cache.add(key, slot, rank=8, memory_bytes=size, load_seconds=0.1)
    return cache


def test_budget_evicts_least_recently_used_until_the_new_adapter_fits():
    cache = _filled(AdapterCache(capacity=8, memory_budget=300),
                    {"a@1": 100, "b@1": 100, "c@1": 100})
    cache.pin("a@1")
    cache.unpin("a@1")  # a is now the most recently used: b and c go first
    slot, evicted = cache.reserve_slot(150, "d@1")
    assert evicted == ["b@1", "c@1"]  # one would not have been enough: 100 + 100 + 150 > 300
    cache.add("d@1", slot, rank=8, memory_bytes=150, load_seconds=0.1)
    assert {key: i.memory_bytes for key, i in cache.info().items()} == {"a@1": 100, "d@1": 150}
    assert cache.reserve_slot(50, "e@1")[1] == []  # fits beside them: nothing evicted


def test_an_adapter_larger_than_the_whole_budget_is_refused_and_nothing_is_evicted():
    cache = _filled(AdapterCache(capacity=8, memory_budget=300), {"a@1": 100})
    with pytest.raises(AdapterCapacityError) as refused:
        cache.reserve_slot(301, "big@1")
    message = str(refused.value)
    assert "big@1 needs 301 bytes" in message and "whole budget of 300 bytes" in message
    assert "adapter_memory_budget_bytes" in message
    assert set(cache.info()) == {"a@1"}


def test_budget_held_by_pinned_adapters_is_refused_and_nothing_is_evicted():
    cache = _filled(AdapterCache(capacity=8, memory_budget=300),
                    {"a@1": 100, "b@1": 100, "c@1": 100})
    cache.pin("a@1")
    cache.pin("b@1")
    with pytest.raises(AdapterCapacityError) as refused:
        cache.reserve_slot(150, "d@1")
    message = str(refused.value)
    assert "d@1 needs 150 bytes" in message and "only 100 of the 300-byte budget" in message
    assert "a@1, b@1" in message and "adapter_memory_budget_bytes" in message
    assert set(cache.info()) == {"a@1", "b@1", "c@1"}  # c was not evicted for nothing
    cache.unpin("b@1")
    assert cache.reserve_slot(150, "d@1")[1] == ["c@1", "b@1"]  # b was pinned (used) after c


def test_a_load_in_progress_counts_against_the_budget_until_added_or_released():
    cache = AdapterCache(capacity=8, memory_budget=300)
    slot, _ = cache.reserve_slot(200, "a@1")
    with pytest.raises(AdapterCapacityError, match="only 100 of the 300-byte budget"):
        cache.reserve_slot(200, "b@1")
    cache.release_slot(slot)  # the load failed: the whole budget is free again
    cache.release_slot(cache.reserve_slot(300, "whole@1")[0])
    slot, _ = cache.reserve_slot(200, "b@1")
    cache.add("b@1", slot, rank=8, memory_bytes=200, load_seconds=0.1)
    cache.pin("b@1")  # pinned, so the budget check below cannot evict it to make room
    with pytest.raises(AdapterCapacityError, match="only 100 of the 300-byte budget"):
        cache.reserve_slot(101, "c@1")


def test_without_a_budget_only_the_slots_limit():
    cache = _filled(AdapterCache(capacity=2), {"a@1": 10**12, "b@1": 10**12})
    assert cache.reserve_slot(10**12, "c@1")[1] == ["a@1"]


def test_adapters_wanted_by_waiting_requests_are_not_evicted():
    cache = _filled(AdapterCache(capacity=2), {"a@1": 10, "b@1": 10})
    assert cache.reserve_slot(10, "c@1", protected={"a@1"})[1] == ["b@1"]  # a is LRU but wanted


def test_when_every_slot_is_held_the_refusal_says_room_may_free_up():
    cache = _filled(AdapterCache(capacity=2), {"a@1": 10, "b@1": 10})
    cache.pin("a@1")
    with pytest.raises(AdapterSlotsBusyError, match="retry when they finish"):
        cache.reserve_slot(10, "c@1", protected={"b@1"})
    assert set(cache.info()) == {"a@1", "b@1"}


def test_try_pin_pins_a_loaded_adapter_and_answers_none_for_others():
    cache = _filled(AdapterCache(capacity=2), {"a@1": 10})
    slot = cache.try_pin("a@1")
    assert slot is not None and cache.info()["a@1"].in_flight == 1
    assert cache.try_pin("b@1") is None
