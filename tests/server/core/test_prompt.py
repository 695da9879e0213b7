"""The fit step: the prompt budget (window minus answer, capped by max_prompt_tokens), each
truncation strategy through it, and overflow errors that say which limit set the budget."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from common.conversation import Message
from server.context import PromptRenderer, Summarizer
from server.core import Executors, Truncation
from server.core.prompt import Fitted, PromptFitter
from server.errors import ContextOverflowError, InvalidArgumentError
from tests.server.core.fakes import WordTokenizer

WINDOW = 64
SYSTEM = Message("system", "be brief")


class ThreadNotingTokenizer(WordTokenizer):
    """Notes the thread each prompt is rendered on."""

    def __init__(self) -> None:
        self.threads: set[str] = set()

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
        self.threads.add(threading.current_thread().name)
        return super().apply_chat_template(messages, **kwargs)


def exchanges(n: int, words: int = 8) -> list[Message]:
    """`n` user/assistant exchanges of `words` words each (10 tokens a message), numbered."""
    out = []
    for i in range(n):
        out += [Message("user", f"u{i} " + "w " * (words - 1)),
                Message("assistant", f"a{i} " + "w " * (words - 1))]
    return out


def long_chat() -> list[Message]:
    """109 tokens: the system prompt (4), five exchanges (20 each), the question (4), the end."""
    return [SYSTEM, *exchanges(5), Message("user", "and now")]


def fitter(executors: Executors, cap: int = 0,
           tokenizer: WordTokenizer | None = None) -> PromptFitter:
    return PromptFitter(PromptRenderer(tokenizer or WordTokenizer()), WINDOW, cap, executors)


def fit(fitter: PromptFitter, messages: list[Message], strategy: str, max_new: int = 4,
        summarizer: Summarizer | None = None) -> Fitted:
    return asyncio.run(fitter.fit(messages, max_new, strategy, None, summarizer))


def firsts(fitted: Fitted) -> list[str]:
    return [m.content.split()[0] for m in fitted.fit.messages]


def never(messages: list[Message]) -> str:
    raise AssertionError("the summarizer was called")


def test_the_budget_is_the_window_minus_the_answer(executors: Executors) -> None:
    assert fitter(executors).budget(4) == WINDOW - 4


@pytest.mark.parametrize(("cap", "budget"), [(20, 20), (60, 60), (100, 60)])
def test_max_prompt_tokens_caps_the_budget_only_below_the_window(
        executors: Executors, cap: int, budget: int) -> None:
    assert fitter(executors, cap).budget(4) == budget


def test_an_answer_as_long_as_the_window_is_refused(executors: Executors) -> None:
    with pytest.raises(InvalidArgumentError, match="leaves no room for the prompt"):
        fitter(executors).budget(WINDOW)


def test_a_conversation_that_fits_is_sent_as_it_is(executors: Executors) -> None:
    tokenizer = ThreadNotingTokenizer()
    messages = [SYSTEM, Message("user", "hello there")]
    fitted = fit(fitter(executors, tokenizer=tokenizer), messages, "drop_oldest",
                 summarizer=never)
    assert fitted.fit.messages == messages
    assert fitted.fit.prompt_ids == PromptRenderer(WordTokenizer()).render(messages)
    assert fitted.truncation.applied is False and fitted.truncation.budget_tokens == WINDOW - 4
    assert {t.split("_")[0] for t in tokenizer.threads} == {"switchboard-chat"}


def test_drop_oldest_keeps_the_system_prompt_and_the_newest_exchanges(
        executors: Executors) -> None:
    fitted = fit(fitter(executors), long_chat(), "drop_oldest")
    assert firsts(fitted) == ["be", "u3", "a3", "u4", "a4", "and"]
    assert len(fitted.fit.prompt_ids) <= WINDOW - 4
    assert fitted.truncation == Truncation(
        strategy="drop_oldest", budget_tokens=60, messages_dropped=6, tokens_dropped=60,
        applied=True)


def test_middle_out_keeps_the_first_exchange_and_drops_after_it(executors: Executors) -> None:
    fitted = fit(fitter(executors), long_chat(), "middle_out")
    assert firsts(fitted) == ["be", "u0", "a0", "u4", "a4", "and"]
    assert fitted.truncation.messages_dropped == 6


def test_sliding_window_cuts_the_last_message_from_its_start_when_it_alone_is_too_long(
        executors: Executors) -> None:
    words = [f"w{i}" for i in range(80)]
    question = Message("user", " ".join(words))
    fitted = fit(fitter(executors), [SYSTEM, *exchanges(1), question], "sliding_window")
    kept = fitted.fit.messages
    assert kept[0] == SYSTEM and len(kept) == 2
    assert question.content.endswith(kept[1].content) and kept[1].content.endswith("w79")
    assert len(fitted.fit.prompt_ids) <= WINDOW - 4
    assert fitted.truncation.messages_dropped == 2 and fitted.truncation.applied


def test_the_error_strategy_refuses_a_conversation_over_the_budget(executors: Executors) -> None:
    with pytest.raises(ContextOverflowError) as refused:
        fit(fitter(executors), long_chat(), "error")
    message = str(refused.value)
    assert "the prompt is 109 tokens but the budget is 60 tokens" in message
    assert "max_prompt_tokens" not in message  # the window set this budget


def test_an_overflow_under_the_cap_names_max_prompt_tokens(executors: Executors) -> None:
    with pytest.raises(ContextOverflowError) as refused:
        fit(fitter(executors, cap=30), long_chat(), "error")
    message = str(refused.value)
    assert "the prompt is 109 tokens but the budget is 30 tokens" in message
    assert message.endswith("Here the budget is this server's prompt limit max_prompt_tokens=30 "
                            "(setting --max-prompt-tokens), not the context window")
    assert isinstance(refused.value.__cause__, ContextOverflowError)


def test_a_cap_above_the_window_budget_is_not_blamed(executors: Executors) -> None:
    with pytest.raises(ContextOverflowError) as refused:
        fit(fitter(executors, cap=100), long_chat(), "error")
    assert "max_prompt_tokens" not in str(refused.value)


@pytest.mark.parametrize("strategy", ["drop_oldest", "middle_out", "summarize"])
def test_a_question_longer_than_the_budget_cannot_be_fitted(
        executors: Executors, strategy: str) -> None:
    question = Message("user", "w " * 80)
    with pytest.raises(ContextOverflowError, match=f"strategy '{strategy}' cannot fit it"):
        fit(fitter(executors), [SYSTEM, question], strategy, summarizer=never)


def test_an_unknown_strategy_is_an_invalid_argument(executors: Executors) -> None:
    with pytest.raises(InvalidArgumentError, match="truncation strategy must be one of"):
        fit(fitter(executors), [Message("user", "hi")], "newest_only")


def test_only_the_summarize_strategy_calls_the_summarizer(executors: Executors) -> None:
    for strategy in ("drop_oldest", "sliding_window", "middle_out"):
        assert fit(fitter(executors), long_chat(), strategy, summarizer=never).truncation.applied


def test_a_summary_is_written_on_the_slow_pool_and_reported(executors: Executors) -> None:
    threads: list[str] = []

    def summarizer(messages: list[Message]) -> str:
        threads.append(threading.current_thread().name)
        return "they talked"

    fitted = fit(fitter(executors), long_chat(), "summarize", summarizer=summarizer)
    assert threads and threads[0].startswith("switchboard-slow")
    assert fitted.truncation.summary == "they talked" and fitted.truncation.applied
    assert fitted.fit.summary_cache is not None and fitted.fit.summary_cache.summary == \
        "they talked"
    assert fitted.fit.messages[1].content.endswith("they talked")
    assert len(fitted.fit.prompt_ids) <= WINDOW - 4
