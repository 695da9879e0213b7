"""Reading PEFT adapters (validation with precise errors) and the LRU of slots with pins."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from common.modeling import load_base
from server.adapter_cache import AdapterCache, AdapterNotLoadedError, read_adapter
from server.errors import AdapterCapacityError, AdapterInUseError, AdapterLoadError
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
