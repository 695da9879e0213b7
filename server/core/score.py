"""Score: the log-likelihood of a continuation as the assistant's answer, admitted like a chat.

Scoring a non-resident adapter reads its weights in the calling thread, so the engine call
waits on the slow pool, never on the chats' one.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

from common.conversation import Message
from server.adapters import AdapterVersion
from server.core.components import InferenceCore
from server.core.record import current_record
from server.core.types import check_conversation
from server.errors import AdapterLoadError, ContextOverflowError, InvalidArgumentError
from server.keys import ANONYMOUS, Caller


@dataclass(frozen=True)
class ScoreOutcome:
    """What Score found: the target's log-likelihood under the resolved adapter."""

    log_likelihood: float
    token_count: int
    prompt_tokens: int
    adapter: AdapterVersion | None
    requested: str


def check_score_length(core: InferenceCore, prompt: int, target: int) -> None:
    cap = core.config.max_prompt_tokens
    if cap and prompt > cap:
        raise ContextOverflowError(
            f"the prompt to score is {prompt} tokens; this server allows at most {cap} prompt "
            "tokens (setting max_prompt_tokens, --max-prompt-tokens)")
    if prompt + target > core.limits.context_length:
        raise ContextOverflowError(
            f"prompt ({prompt} tokens) plus continuation ({target}) is {prompt + target} "
            f"tokens; the context length is {core.limits.context_length}")


async def score(core: InferenceCore, messages: list[Message], continuation: str,
                ref: str, caller: Caller = ANONYMOUS) -> ScoreOutcome:
    """Log-likelihood of `continuation` as the assistant's answer after `messages`."""
    check_conversation(messages)
    if not continuation:
        raise InvalidArgumentError("continuation is empty: give the assistant text to score")
    current_record().key_name = caller.name
    with core.limiter.admit(caller) or nullcontext(), core.admission.admit() as ticket:
        adapter = await core.resolver.resolve_for(caller, ref)
        ticket.bind(adapter)

        def tokenize() -> tuple[list[int], list[int]]:
            return (core.renderer.render(messages),
                    list(core.renderer.encode([continuation])["input_ids"][0]))

        prompt_ids, target_ids = await core.executors.quick(tokenize)
        check_score_length(core, len(prompt_ids), len(target_ids))
        key, path = core.resolver.for_engine(adapter)
        try:
            scored = await core.executors.slow_work(core.engine.score, prompt_ids, target_ids,
                                                    key, path)
        except AdapterLoadError:
            if adapter is not None:
                await core.resolver.explain_load_failure(adapter)
            raise
    return ScoreOutcome(scored.log_likelihood, scored.token_count, len(prompt_ids), adapter, ref)
