"""The set of loaded adapters: reading PEFT files, and an LRU of slots with pins.

`read_adapter` turns a standard PEFT LoRA directory (adapter_config.json +
adapter_model.safetensors; nothing else is read, never a pickle) into per-module `LoraWeights`,
validating it against the base before anything touches the model: a weights file over the size
limit is refused before it is read, and a corrupt one is an `AdapterLoadError`, not a crash.
`AdapterCache` maps "name@version" keys to LoRA slots and keeps two limits: the number of slots
and, optionally, a memory budget for the sum of the loaded adapters' bytes. Least recently used
unpinned entries are evicted to make room, a pinned (in-use) entry never is, and
`AdapterCapacityError` says so, with the sizes, when nothing evictable makes enough room.
Thread-safe.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import (
    AdapterCapacityError,
    AdapterInUseError,
    AdapterLoadError,
    AdapterSlotsBusyError,
    AdapterTooLargeError,
    NotFoundError,
)
from server.lora import LoraWeights

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# A real adapter_config.json is a few kilobytes; a huge one is damage or an attack.
MAX_CONFIG_BYTES = 1024 * 1024
# base_model.model.<module>.lora_A.weight (PEFT may keep the adapter name before ".weight").
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)
# Config features that change the math beyond x + B A x * scaling: refused, not ignored.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias terms",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "layer replication",
}


class AdapterNotLoadedError(NotFoundError):
    """A request names an adapter key that is not loaded in the engine."""


@dataclass(frozen=True)
class LoadedAdapter:
    key: str
    rank: int
    memory_bytes: int
    load_seconds: float


@dataclass(frozen=True)
class LoadedAdapterInfo:
    rank: int
    memory_bytes: int
    in_flight: int
    last_used: float  # time.time() of the last pin or release


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter read from disk, ready to install into a slot."""

    path: Path
    rank: int
    modules: Mapping[str, LoraWeights]


def _fail(path: Path, what: str) -> AdapterLoadError:
    return AdapterLoadError(f"adapter at {path}: {what}")


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise _fail(path, f"{CONFIG_FILE} is missing")
    try:
        size = config_path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise _fail(path, f"{CONFIG_FILE} is {size} bytes; at most {MAX_CONFIG_BYTES} are read")
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"{CONFIG_FILE} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise _fail(path, f"{CONFIG_FILE} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise _fail(path, f"peft_type must be LORA, got {config.get('peft_type')!r}")
    for field_name, feature in _UNSUPPORTED.items():
        if config.get(field_name):
            raise _fail(path, f"{feature} ({field_name}) is not supported")
    if config.get("bias", "none") != "none":
        raise _fail(path, f"bias must be 'none', got {config.get('bias')!r}")
    return config


def _check_size(path: Path, weights_path: Path, max_bytes: int | None) -> None:
    """Refuse an oversized weights file from its size alone, before reading a byte of it."""
    if max_bytes is None:
        return
    size = weights_path.stat().st_size
    if size > max_bytes:
        raise AdapterTooLargeError(
            f"adapter at {path}: {WEIGHTS_FILE} is {size} bytes, over this server's limit of "
            f"{max_bytes} bytes (setting max_adapter_bytes, --max-adapter-bytes); the file was "
            "not read. Retrying will not help: raise the limit or serve a smaller adapter")


def _read_tensors(path: Path, max_bytes: int | None) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        others = sorted(p.name for p in path.glob("adapter_model.*"))
        found = (f" (found {', '.join(others)}; only safetensors are read, never pickle files)"
                 if others else "")
        raise _fail(path, f"{WEIGHTS_FILE} is missing{found}")
    try:
        _check_size(path, weights_path, max_bytes)
        return load_file(str(weights_path), device="cpu")
    except (OSError, SafetensorError) as e:
        raise _fail(path, f"{WEIGHTS_FILE} is unreadable (corrupt or truncated?): {e}") from e


def _group_by_module(path: Path, tensors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{module name: {"A": tensor, "B": tensor}} from PEFT's flat key names."""
    grouped: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise _fail(path, f"unexpected tensor {key!r} (only lora_A / lora_B weights are used)")
        grouped.setdefault(match["module"], {})[match["ab"]] = tensor
    if not grouped:
        raise _fail(path, f"{WEIGHTS_FILE} holds no LoRA weights")
    for module, pair in grouped.items():
        if set(pair) != {"A", "B"}:
            raise _fail(path, f"module {module!r} has lora_{''.join(pair)} but not both A and B")
    return grouped


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (`get_pattern_key`)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scaling(config: Mapping[str, Any], module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def _check_module(
    path: Path, module: str, a: Any, b: Any, shapes: Mapping[str, tuple[int, int]], max_rank: int
) -> None:
    if module not in shapes:
        raise _fail(path, f"targets {module!r}, which is not a Linear layer of this base")
    in_features, out_features = shapes[module]
    for which, tensor in (("lora_A", a), ("lora_B", b)):
        if not tensor.is_floating_point():
            raise _fail(path, f"{module!r} {which} has dtype {tensor.dtype}; LoRA weights are "
                              "floating point")
        if not bool(tensor.isfinite().all()):
            raise _fail(path, f"{module!r} {which} holds NaN or infinite values")
    rank = a.shape[0]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_features or b.shape != (out_features, rank):
        raise _fail(
            path,
            f"{module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; this base needs "
            f"({rank}, {in_features}) and ({out_features}, {rank})",
        )
    if rank > max_rank:
        raise _fail(path, f"{module!r} has rank {rank} > max_lora_rank {max_rank}")


def read_adapter(
    path: Path, module_shapes: Mapping[str, tuple[int, int]], max_rank: int,
    *, max_bytes: int | None = None,
) -> AdapterWeights:
    """Read and validate a PEFT LoRA directory; raise AdapterLoadError saying what is wrong.

    `max_bytes` bounds the weights file (AdapterTooLargeError before reading; None = no limit).
    """
    path = Path(path)
    if not path.is_dir():
        raise _fail(path, "not a directory")
    config = _read_config(path)
    grouped = _group_by_module(path, _read_tensors(path, max_bytes))
    modules = {}
    for module, pair in sorted(grouped.items()):
        a, b = pair["A"], pair["B"]
        _check_module(path, module, a, b, module_shapes, max_rank)
        a, b = a.float(), b.float()
        modules[module] = LoraWeights(a, b, _scaling(config, module, a.shape[0]))
    return AdapterWeights(path, max(w.rank for w in modules.values()), modules)


@dataclass
class _Entry:
    slot: int
    rank: int
    memory_bytes: int
    load_seconds: float
    pins: int = 0
    last_used: float = 0.0

    def loaded(self, key: str) -> LoadedAdapter:
        return LoadedAdapter(key, self.rank, self.memory_bytes, self.load_seconds)


BUDGET_SETTING = "adapter_memory_budget_bytes, --adapter-memory-budget-bytes"


class AdapterCache:
    """Loaded adapters by key, each in a LoRA slot (1..capacity); LRU eviction, pins kept.

    With a `memory_budget` (bytes, 0 = none) the loaded adapters' `memory_bytes` plus those of
    slots reserved for loads in progress never add up to more than the budget.
    """

    def __init__(self, capacity: int, memory_budget: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if memory_budget < 0:
            raise ValueError(f"memory_budget must be >= 0 (0 = none), got {memory_budget}")
        self.capacity = capacity
        self.memory_budget = memory_budget
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._free_slots = list(range(capacity, 0, -1))
        self._reserved: dict[int, int] = {}  # slot -> bytes of a load not yet added

    def _used(self) -> int:
        """Bytes of the loaded adapters plus those reserved for loads in progress (lock held)."""
        return sum(e.memory_bytes for e in self._entries.values()) + sum(self._reserved.values())

    def get(self, key: str) -> LoadedAdapter | None:
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.loaded(key)

    def _missing(self, key: str) -> AdapterNotLoadedError:
        loaded = ", ".join(self._entries) or "none"
        return AdapterNotLoadedError(f"adapter {key!r} is not loaded (loaded: {loaded})")

    def pin(self, key: str) -> int:
        """Mark `key` in use (one pin per request) and return its slot."""
        slot = self.try_pin(key)
        if slot is None:
            with self._lock:
                raise self._missing(key)
        return slot

    def try_pin(self, key: str) -> int | None:
        """Pin `key` and return its slot; None when it is not loaded."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.pins += 1
            entry.last_used = time.time()
            self._entries.move_to_end(key)
            return entry.slot

    def unpin(self, key: str) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
                entry.last_used = time.time()

    def reserve_slot(self, memory_bytes: int = 0, key: str = "the new adapter",
                     protected: Collection[str] = ()) -> tuple[int, list[str]]:
        """A slot for a new adapter of `memory_bytes`, and the keys evicted to make room.

        Least recently used entries that are neither pinned nor `protected` (wanted by waiting
        requests) are evicted until a slot is free and the budget holds the new adapter.
        Nothing is evicted when that cannot succeed: AdapterSlotsBusyError when room may free
        up later, AdapterCapacityError when the adapter can never fit the budget.
        """
        with self._lock:
            victims = self._victims(memory_bytes, key, protected)
            for victim in victims:
                self._free_slots.append(self._entries.pop(victim).slot)
            slot = self._free_slots.pop()
            self._reserved[slot] = memory_bytes
            return slot, victims

    def _victims(self, memory_bytes: int, key: str, protected: Collection[str]) -> list[str]:
        """The LRU-first evictable keys whose eviction makes room; raises when none suffices."""
        budget = self.memory_budget
        if budget and memory_bytes > budget:
            raise AdapterCapacityError(
                f"{key} needs {memory_bytes} bytes of adapter memory, more than the whole "
                f"budget of {budget} bytes ({BUDGET_SETTING}); raise the budget or load a "
                "smaller adapter (lower rank or fewer target modules)")
        need_slot, used = not self._free_slots, self._used()
        victims = []
        for victim, entry in self._entries.items():
            if not need_slot and not (budget and used + memory_bytes > budget):
                break
            if entry.pins == 0 and victim not in protected:
                victims.append(victim)
                need_slot, used = False, used - entry.memory_bytes
        busy = ", ".join(k for k, e in self._entries.items() if e.pins or k in protected) or "-"
        if need_slot:
            raise AdapterSlotsBusyError(
                f"all {self.capacity} adapter slots are in use by running requests (or wanted "
                f"by waiting ones: {busy}); none can be evicted now, retry when they finish"
            )
        if budget and used + memory_bytes > budget:
            raise AdapterSlotsBusyError(
                f"{key} needs {memory_bytes} bytes of adapter memory but only "
                f"{budget - used} of the {budget}-byte budget ({BUDGET_SETTING}) can be made "
                f"free: {used} bytes are held by adapters in use by running requests (or wanted "
                f"by waiting ones) or being loaded ({busy}); retry when they finish, or raise "
                "the budget"
            )
        return victims

    def release_slot(self, slot: int) -> None:
        """Give back a reserved slot that was not filled (its install failed)."""
        with self._lock:
            self._reserved.pop(slot, None)
            self._free_slots.append(slot)

    def add(self, key: str, slot: int, rank: int, memory_bytes: int, load_seconds: float) -> None:
        """Fill a reserved slot; its reservation becomes the entry's own `memory_bytes`."""
        with self._lock:
            self._reserved.pop(slot, None)
            self._entries[key] = _Entry(slot, rank, memory_bytes, load_seconds, 0, time.time())

    def remove(self, key: str) -> int:
        """Unload `key`; return its freed slot. AdapterInUseError while requests hold it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise self._missing(key)
            if entry.pins:
                raise AdapterInUseError(
                    f"adapter {key!r} is in use by {entry.pins} request(s); retry when they end"
                )
            del self._entries[key]
            self._free_slots.append(entry.slot)
            return entry.slot

    def info(self) -> dict[str, LoadedAdapterInfo]:
        with self._lock:
            return {
                key: LoadedAdapterInfo(e.rank, e.memory_bytes, e.pins, e.last_used)
                for key, e in self._entries.items()
            }
