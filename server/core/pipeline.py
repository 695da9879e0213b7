"""One chat, top to bottom: admit -> resolve adapter -> session -> fit the prompt -> generate
-> remember.

Each step is one object of the core (admission.py, resolve.py, history.py, prompt.py,
generate.py); this file only orders them and keeps the accounting. Before the server-wide
admission a key's own limits apply (server/ratelimit.py). A chat's places are given back, its
tokens charged to its key and its turn stored BEFORE the client sees the answer, so a client
that sends its next request on reading it finds its place free and its history complete. What
the call did is written to its `CallRecord`; the edge turns that into metrics.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import nullcontext

from server.adapters import AdapterVersion
from server.core.components import InferenceCore
from server.core.generate import Generation, usage_of
from server.core.prompt import Fitted
from server.core.record import CallRecord, TruncationUsage, current_record
from server.core.types import ChatInput, ChatResult, Delta, check_conversation
from server.errors import AdapterLoadError, DeadlineExceededError
from server.logging_setup import NO_REQUEST, current_request_id, new_request_id
from server.request import FinishEvent, GenerationRequest, TokenEvent


class ChatCall:
    """One chat request from submission to its last event; `cancel()` is safe from any thread."""

    def __init__(self, core: InferenceCore, chat: ChatInput, deadline: float | None) -> None:
        self.core = core
        self.chat = chat
        self.deadline = deadline
        self.request_id = current_request_id()
        if self.request_id == NO_REQUEST:
            self.request_id = new_request_id()
        self._generation: Generation | None = None
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        if self._generation is not None:
            self._generation.cancel()

    async def events(self) -> AsyncIterator[Delta | ChatResult]:
        """Deltas as tokens arrive, then exactly one ChatResult."""
        core, chat, caller = self.core, self.chat, self.chat.caller
        record = current_record()
        record.begin_chat(chat.adapter)
        record.key_name = caller.name
        charged = False
        try:
            with core.limiter.admit(caller) or nullcontext() as permit, \
                    core.admission.admit() as ticket:
                adapter = await core.resolver.resolve_for(caller, chat.adapter)
                record.resolve(adapter)
                ticket.bind(adapter)
                async with core.history.turn(chat.session_id, chat.messages, caller) as turn:
                    check_conversation(turn.conversation)
                    fitted = await core.prompt.fit(
                        turn.conversation, chat.sampling.max_new_tokens, chat.truncation,
                        turn.cached_summary, core.summaries.summarizer(ticket, self.request_id))
                    _note_truncation(record, fitted)
                    finish = None
                    async for item in self._generate(adapter, fitted, record):
                        if isinstance(item, FinishEvent):
                            finish = item
                        else:
                            yield item
                    assert finish is not None, "the engine ended a stream without a finish"
                    if finish.reason == "cancelled" and self._past_deadline():
                        # The engine stops a row at the caller's deadline; that is a failed
                        # call, never an OK answer that happens to beat the caller's own timer.
                        raise DeadlineExceededError(
                            f"the deadline passed after {finish.completion_tokens} generated "
                            "tokens; allow more time or ask for fewer tokens")
                    result = self._result(finish, adapter, fitted)
                    if turn.session_id and result.finish_reason != "cancelled":
                        record.sessions_stored = await core.history.remember(
                            turn, result.text, fitted.fit.summary_cache, caller.key_id)
                ticket.release()
                if permit is not None:
                    permit.charge(result.completion_tokens)
                    permit.release()
                charged = True
                yield result
        except BaseException as e:
            record.error = e
            if record.generated and not charged:
                # Tokens of an answer that failed or was cancelled midway were still generated.
                core.limiter.charge(caller.key_id, record.generated)
            raise

    async def _generate(self, adapter: AdapterVersion | None, fitted: Fitted,
                        record: CallRecord) -> AsyncIterator[Delta | FinishEvent]:
        key, path = self.core.resolver.for_engine(adapter)
        self._generation = Generation(self.core.engine, GenerationRequest(
            request_id=self.request_id, prompt_ids=fitted.fit.prompt_ids, adapter=key,
            adapter_path=path, sampling=self.chat.sampling, deadline=self.deadline))
        if self._cancelled:
            self._generation.cancel()
        last: float | None = None  # when the last tokens came (the first token's wait is TTFT)
        try:
            async for event in self._generation.stream():
                if isinstance(event, TokenEvent):
                    now = time.monotonic()
                    if last is not None and event.token_ids:
                        # Tokens read together (the reader was behind) share the gap evenly.
                        count = len(event.token_ids)
                        record.inter_token_s.extend([(now - last) / count] * count)
                    record.generated, last = event.completion_tokens, now
                    yield Delta(event.text_delta, event.completion_tokens)
                else:
                    record.answer = usage_of(event, key)
                    record.generated = event.completion_tokens
                    yield event
        except AdapterLoadError:  # the engine's read of it failed while the request waited
            if adapter is not None:
                await self.core.resolver.explain_load_failure(adapter)
            raise

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _result(self, finish: FinishEvent, adapter: AdapterVersion | None,
                fitted: Fitted) -> ChatResult:
        return ChatResult(
            request_id=self.request_id, text=finish.text, finish_reason=finish.reason,
            prompt_tokens=finish.prompt_tokens, completion_tokens=finish.completion_tokens,
            adapter=adapter, requested=self.chat.adapter, truncation=fitted.truncation,
            session_id=self.chat.session_id, queue_wait_s=finish.queue_wait_s or 0.0,
            ttft_s=finish.ttft_s or 0.0, total_s=finish.total_s)


def _note_truncation(record: CallRecord, fitted: Fitted) -> None:
    fit = fitted.fit
    if fit.applied:
        record.truncation = TruncationUsage(fit.strategy, fit.messages_dropped,
                                            fit.tokens_dropped)
