"""The engine's settings: the scheduler, the adapter cache and the engine itself, each a dataclass
that checks itself. Kept apart from the engine package so that reading settings (the CLI, before
torch is imported) loads no model code; server/config.py nests `EngineConfig` in its tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common import settings
from common.settings import (
    is_number,
    require,
    require_non_negative,
    require_positive,
    section,
    setting,
)

# A longer window would delay each request that finds the engine idle by more than a prefill.
MAX_BURST_WINDOW_MS = 1000


@dataclass(frozen=True)
class SchedulerConfig:
    """How many rows run and wait, and how much prompt one step may prefill."""

    max_batch: int = setting(16, "rows decoded together in one step")
    max_queue: int = setting(256, "waiting requests before RESOURCE_EXHAUSTED")
    # Always at least one request per step, however long its prompt, so none starves.
    max_prefill_tokens: int = setting(
        4096, "prompt tokens one engine step may prefill (at least one request)")
    # A prefill is one eager forward. On CUDA it costs 40-80 ms whatever its rows (the host
    # launching kernels), so a burst split in two pays it twice; on the CPU its cost grows with
    # its tokens, and a longer wait mostly delays.
    burst_window_ms: float | None = setting(
        None, "when requests arrive while no row runs, how long the engine waits after each for "
              "another, so that a burst prefills together (at most 10 windows; 0 = none; "
              "default: 2 on the CPU, 20 on CUDA)")

    def __post_init__(self) -> None:
        require_positive(self, "max_batch", "max_queue", "max_prefill_tokens")
        window = self.burst_window_ms
        require(window is None or (is_number(window) and 0 <= window <= MAX_BURST_WINDOW_MS),
                "burst_window_ms", window,
                f"a number of milliseconds from 0 to {MAX_BURST_WINDOW_MS}, or None (the "
                "device's default)")


# The context used when neither the setting nor the model (max_position_embeddings) names one.
FALLBACK_CONTEXT_LENGTH = 2048


@dataclass(frozen=True)
class AdapterCacheConfig:
    """Which adapters may be loaded and how many stay resident (server.adapter_cache)."""

    max_loaded_adapters: int = setting(
        8, "adapters kept in memory; least recently used unpinned ones go first")
    max_lora_rank: int = setting(64, "largest LoRA rank an adapter may have")
    # Checked before reading, so an oversized file costs nothing.
    max_adapter_bytes: int = setting(1024 * 1024 * 1024,
                                     "largest adapter weights file the server reads")
    # Counts each adapter's LoRA slot slices; 0 leaves max_loaded_adapters the only bound.
    adapter_memory_budget_bytes: int = setting(
        0, "memory all loaded adapters may take; 0 = no budget")

    def __post_init__(self) -> None:
        require_positive(self, "max_loaded_adapters", "max_lora_rank", "max_adapter_bytes")
        require_non_negative(self, "adapter_memory_budget_bytes", zero_means="no budget")


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings: the KV shape, prefill chunking, CUDA graphs, decoding ahead, CPU
    threads, the default answer length, and the scheduler and adapter cache sections."""

    # Each row's KV capacity, allocated at start for max_batch rows.
    context_length: int = setting(
        0, "prompt + answer token limit; 0 = the model's own. The KV cache holds max-batch x "
           "this many tokens, allocated at start")
    prefill_chunk_tokens: int = setting(
        512, "longest prefill forward; longer prompts run in chunks")
    cuda_graphs: bool | None = setting(
        None, "replay decode steps as CUDA graphs (default: on for CUDA only)")
    # On the CPU a step runs as it is launched, so there is nothing to overlap there.
    decode_ahead: bool | None = setting(
        None, "launch the next decode step before the host handles this one's tokens, so the "
              "device works meanwhile (default: on for CUDA only)")
    # Timing took 7-9 s at start on the 135M float32 base and about 2 s on the tiny one, here.
    tune_cpu_threads: bool | None = setting(
        None, "on the CPU, time forwards of each size at start with 1, 2, 4 ... --threads "
              "intra-op threads and run each with the fastest (default: on for the CPU)")
    default_max_new_tokens: int = setting(128, "answer length when a request names none")
    scheduler: SchedulerConfig = section(SchedulerConfig, "scheduler")
    cache: AdapterCacheConfig = section(AdapterCacheConfig, "adapter cache")

    def __post_init__(self) -> None:
        require(isinstance(self.scheduler, SchedulerConfig), "scheduler", self.scheduler,
                "a SchedulerConfig")
        require(isinstance(self.cache, AdapterCacheConfig), "cache", self.cache,
                "an AdapterCacheConfig")
        require_non_negative(self, "context_length", zero_means="the model's own")
        require_positive(self, "prefill_chunk_tokens", "default_max_new_tokens")
        for name in ("cuda_graphs", "decode_ahead", "tune_cpu_threads"):
            value = getattr(self, name)
            # Not `in (None, True, False)`: 1 == True, and 1 is no answer to a yes/no setting.
            require(value is None or isinstance(value, bool), name, value,
                    "true, false or None (the device's default)")
        if self.context_length:
            require(self.default_max_new_tokens < self.context_length, "default_max_new_tokens",
                    self.default_max_new_tokens, f"< context_length ({self.context_length})")

    @classmethod
    def build(cls, **flat: Any) -> EngineConfig:
        """The engine tree from flat setting names (`max_batch=4, max_lora_rank=8`)."""
        return settings.build(cls, **flat)

    def context_for(self, native: int) -> int:
        """Each row's capacity: the setting capped by the model's own context `native` (0 when
        the model names none), or the model's own, or FALLBACK_CONTEXT_LENGTH."""
        if self.context_length and native:
            return min(self.context_length, native)
        return self.context_length or native or FALLBACK_CONTEXT_LENGTH
