"""Worker threads for blocking work, sized per kind so slow work never starves a chat.

asyncio's default pool (min(32, cores + 4) threads) is shared by everything; a burst of slow
adapter reads or scores would fill it and hold every chat's tokenize step behind them. Chats get
their own pool for their short blocking steps (tokenize, fit, session store, registry lookups);
adapter loads, summaries and scores wait on the other. Each task runs in a copy of the caller's
context, so request ids and the call record follow the work into the thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

async def _run(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    context = contextvars.copy_context()
    call = functools.partial(context.run, fn, *args)
    return await asyncio.get_running_loop().run_in_executor(pool, call)


@dataclass
class Executors:
    """The two pools, sized by the server's settings; `close()` when the server stops."""

    chat_workers: int
    slow_workers: int
    chat: ThreadPoolExecutor = field(init=False)
    slow: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        for name in ("chat_workers", "slow_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.chat = ThreadPoolExecutor(self.chat_workers, thread_name_prefix="switchboard-chat")
        self.slow = ThreadPoolExecutor(self.slow_workers, thread_name_prefix="switchboard-slow")

    async def quick(self, fn: Callable[..., T], *args: Any) -> T:
        """Short blocking work of a chat or an admin call (milliseconds)."""
        return await _run(self.chat, fn, *args)

    async def slow_work(self, fn: Callable[..., T], *args: Any) -> T:
        """Long waits: adapter loads, summaries, scores (up to seconds)."""
        return await _run(self.slow, fn, *args)

    def close(self) -> None:
        self.chat.shutdown(wait=False, cancel_futures=True)
        self.slow.shutdown(wait=False, cancel_futures=True)
