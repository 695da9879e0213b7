"""The fit step: the prompt budget and the conversation fitted into it (server/context.py).

The budget is the context window minus the tokens reserved for the answer, capped by the
server's max_prompt_tokens; an overflow says which of the two set it.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.conversation import Message
from server.context import (
    FitResult,
    PromptRenderer,
    Summarizer,
    SummaryCache,
    fit_conversation,
    prompt_budget,
)
from server.core.executors import Executors
from server.core.types import Truncation
from server.errors import ContextOverflowError


@dataclass(frozen=True)
class Fitted:
    """The fitted prompt and what fitting it did."""

    fit: FitResult
    budget: int

    @property
    def truncation(self) -> Truncation:
        fit = self.fit
        return Truncation(strategy=fit.strategy, budget_tokens=self.budget,
                          messages_dropped=fit.messages_dropped,
                          tokens_dropped=fit.tokens_dropped, applied=fit.applied,
                          summary=fit.summary)


class PromptFitter:
    """Fits conversations for one served base; tokenizing runs on the executors."""

    def __init__(self, renderer: PromptRenderer, context_length: int, max_prompt_tokens: int,
                 executors: Executors) -> None:
        self.renderer = renderer
        self.context_length = context_length
        self.max_prompt_tokens = max_prompt_tokens
        self.executors = executors

    def budget(self, max_new_tokens: int) -> int:
        """Prompt tokens allowed: the window minus the answer, capped by max_prompt_tokens."""
        budget = prompt_budget(self.context_length, max_new_tokens)
        cap = self.max_prompt_tokens
        return min(budget, cap) if cap else budget

    def _capped(self, error: ContextOverflowError, budget: int) -> ContextOverflowError:
        """The overflow error, naming max_prompt_tokens when that (not the window) set it."""
        cap = self.max_prompt_tokens
        if not cap or budget != cap:
            return error
        return ContextOverflowError(
            f"{error}. Here the budget is this server's prompt limit max_prompt_tokens={cap} "
            "(setting --max-prompt-tokens), not the context window")

    async def fit(self, messages: list[Message], max_new_tokens: int, strategy: str,
                  cached_summary: SummaryCache | None,
                  summarizer: Summarizer | None) -> Fitted:
        """Fit on a worker: on the slow pool when a summary may be written (it waits on the
        engine), on the chat pool otherwise."""
        budget = self.budget(max_new_tokens)
        summarizing = strategy == "summarize"
        run = self.executors.slow_work if summarizing else self.executors.quick
        try:
            fit = await run(fit_conversation, messages, self.renderer, budget, strategy,
                            summarizer if summarizing else None, cached_summary)
        except ContextOverflowError as e:
            raise self._capped(e, budget) from e
        return Fitted(fit, budget)
