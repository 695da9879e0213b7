"""The engine, split as vLLM v1 splits it: `core` (the loop and the thread-safe API), `runner`
(persistent buffers, one forward, sampling), `kv` (preallocated KV slots), `graphs` (CUDA
graph capture of decode steps), `cpu_threads` (on the CPU, intra-op threads per forward size,
timed at start) and `loader` (adapter reads off the engine thread)."""

from server.adapter_cache import AdapterNotLoadedError, LoadedAdapter, LoadedAdapterInfo
from server.engine.core import Engine, EngineConfig, EngineStats, ScoreResult
from server.request import FinishEvent, GenerationRequest, RequestHandle, TokenEvent
from server.sampling import SamplingParams

__all__ = [
    "AdapterNotLoadedError", "Engine", "EngineConfig", "EngineStats", "FinishEvent",
    "GenerationRequest", "LoadedAdapter", "LoadedAdapterInfo", "RequestHandle", "SamplingParams",
    "ScoreResult", "TokenEvent",
]
