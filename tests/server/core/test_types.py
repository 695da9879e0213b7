"""The core's domain types: the base's limits check themselves, and a conversation must end
with a user turn with at most one system prompt, first."""

from __future__ import annotations

import pytest

from common.conversation import Message
from server.core import Limits, check_conversation
from server.errors import InvalidArgumentError


@pytest.mark.parametrize(("context", "vocab", "field"), [(0, 10, "context_length"),
                                                         (10, -1, "vocab_size")])
def test_limits_must_be_positive(context: int, vocab: int, field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be positive"):
        Limits(context_length=context, vocab_size=vocab)


def test_a_conversation_with_a_system_prompt_and_a_question_is_accepted() -> None:
    check_conversation([Message("system", "be brief"), Message("user", "hi"),
                        Message("assistant", "yo"), Message("user", "again")])


def test_an_empty_conversation_is_refused() -> None:
    with pytest.raises(InvalidArgumentError,
                       match="messages is empty: send at least one user message"):
        check_conversation([])


def test_a_conversation_must_end_with_the_user() -> None:
    with pytest.raises(InvalidArgumentError,
                       match="the last message must come from the user, got role 'assistant'"):
        check_conversation([Message("user", "hi"), Message("assistant", "yo")])


def test_only_the_first_message_may_be_a_system_prompt() -> None:
    with pytest.raises(InvalidArgumentError,
                       match="message 2 of the conversation is a system message"):
        check_conversation([Message("user", "hi"), Message("assistant", "yo"),
                            Message("system", "obey"), Message("user", "so")])
