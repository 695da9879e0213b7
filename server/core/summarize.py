"""Summaries for the `summarize` strategy: ordinary engine requests written by the model itself.

A summary goes the way a chat goes: the summarize adapter (setting summarize_adapter; the bare
base by default) is resolved and re-checked like any request's, takes its place in admission
under the chat that needs it, runs through the generate step, and its engine usage joins the
call's record. server/context.py calls `Summaries.summarizer(...)` from a worker thread while it
fits; the summary itself runs on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from common.conversation import Message
from server.context import PromptRenderer
from server.core.admission import Ticket
from server.core.executors import Executors
from server.core.generate import Generation, usage_of
from server.core.record import current_record
from server.core.resolve import AdapterResolver
from server.errors import ContextOverflowError
from server.request import GenerationRequest
from server.sampling import SamplingParams

SUMMARY_INSTRUCTION = (
    "Summarize the conversation below in a few sentences. Keep names, numbers and facts the "
    "user gave; write only the summary."
)
SUMMARY_MAX_NEW_TOKENS = 128


def transcript(messages: list[Message]) -> str:
    return "\n".join(f"{m.role}: {m.content}" for m in messages)


def summary_prompt(renderer: PromptRenderer, messages: list[Message],
                   window: int) -> tuple[list[int], int]:
    """The summary request's prompt ids and answer length. A small window still gets a
    summary: its answer may use at most a quarter of it, and the oldest part of the transcript
    goes first when the rest does not fit."""
    max_new = min(SUMMARY_MAX_NEW_TOKENS, max(1, window // 4))
    room = window - max_new
    text = transcript(messages)

    def render(body: str) -> list[int]:
        return renderer.render([Message("system", SUMMARY_INSTRUCTION), Message("user", body)])

    ids = render(text)
    while len(ids) > room and len(text) > 1:
        text = text[max(1, len(text) // 4):]  # keep the most recent part of the transcript
        ids = render(text)
    if len(ids) > room:
        raise ContextOverflowError(
            f"the summarize strategy needs {len(ids)} prompt tokens for its summary but the "
            f"{window}-token window leaves {room}; raise context_length or choose "
            "drop_oldest, sliding_window or middle_out")
    return ids, max_new


class Summaries:
    """Writes summaries with the server's summarize adapter."""

    def __init__(self, resolver: AdapterResolver, renderer: PromptRenderer, engine: object,
                 executors: Executors, window: int, adapter_ref: str) -> None:
        self.resolver = resolver
        self.renderer = renderer
        self.engine = engine
        self.executors = executors
        self.window = window
        self.adapter_ref = adapter_ref

    async def summarize(self, messages: list[Message], ticket: Ticket, request_id: str) -> str:
        # The server's own choice of adapter, not the caller's: resolved without its scope.
        adapter = await self.resolver.resolve(self.adapter_ref)
        with ticket.nested(adapter):
            ids, max_new = await self.executors.quick(summary_prompt, self.renderer, messages,
                                                      self.window)
            key, path = self.resolver.for_engine(adapter)
            finish = await Generation(self.engine, GenerationRequest(
                request_id=f"{request_id}-summary", prompt_ids=ids, adapter=key,
                adapter_path=path, sampling=SamplingParams(max_new_tokens=max_new))).finish()
        current_record().summaries.append(usage_of(finish, key))
        return finish.text.strip()

    def summarizer(self, ticket: Ticket, request_id: str) -> Callable[[list[Message]], str]:
        """The blocking summarizer server/context.py calls from a worker thread."""
        loop = asyncio.get_running_loop()

        def blocking(messages: list[Message]) -> str:
            return asyncio.run_coroutine_threadsafe(
                self.summarize(messages, ticket, request_id), loop).result()

        return blocking
