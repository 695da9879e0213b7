"""The OpenAI wire shapes this server reads and writes, as pydantic models (they make the served
OpenAPI schema too).

Requests refuse unknown fields (HTTP 400 naming the field) rather than ignore them: a setting
that is silently dropped changes the answer without telling anyone. Fields OpenAI defines that
this server does not implement are declared, so the refusal can say why (server/openai/convert.py).
Switchboard's own settings are extra body fields, documented here; the `openai` client sends
them with `extra_body={...}`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from common.names import TRUNCATION_STRATEGIES
from server.api import MAX_REPETITION_PENALTY, MAX_TEMPERATURE

MAX_SEED = 2**64 - 1  # the gRPC field is a uint64

# ---------------------------------------------------------------- requests


class TextPart(BaseModel):
    """One part of a message's content list; only text parts are served."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message: `developer` is taken as `system`; content is a string or text parts."""

    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, description="accepted and ignored")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="adapter reference: name, name@version, an alias, or the "
                                   "base model's name (GET /v1/models lists them)")
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1, description="answer length limit in tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="same as max_tokens")
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                                      description="0 = greedy; default 1 as in OpenAI's API")
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int | None = Field(None, description="only 1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Declared so that a request using them gets a precise refusal (convert.py), not a
    # generic "unknown field".
    logprobs: bool | None = Field(None, description="not supported: false or absent")
    top_logprobs: int | None = Field(None, description="not supported")
    presence_penalty: float | None = Field(None, description="only 0; see repetition_penalty")
    frequency_penalty: float | None = Field(None, description="only 0; see repetition_penalty")
    logit_bias: dict[str, float] | None = Field(None, description="not supported")
    tools: list[Any] | None = Field(None, description="not supported")
    tool_choice: Any = Field(None, description="not supported")
    functions: list[Any] | None = Field(None, description="not supported")
    function_call: Any = Field(None, description="not supported")
    parallel_tool_calls: bool | None = Field(None, description="accepted and ignored")
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'}")
    user: str | None = Field(None, description="accepted and ignored")

    # Switchboard's own fields (extra_body with the openai client).
    truncation: str | None = Field(
        None, description="how a conversation longer than the context is cut: "
                          f"{', '.join(TRUNCATION_STRATEGIES)} (default: the server's)")
    session_id: str | None = Field(
        None, description="keep the conversation on the server under this id; then send only "
                          "the new messages")
    top_k: int | None = Field(None, ge=0, description="0 = off")
    repetition_penalty: float | None = Field(None, ge=0, le=MAX_REPETITION_PENALTY,
                                             allow_inf_nan=False, description="1 or 0 = off")
    ignore_eos: bool = Field(False, description="generate past end-of-sequence (benchmarks)")


class ScoreRequest(BaseModel):
    """POST /v1/score (Switchboard's own): log-likelihood of `continuation` as the assistant's
    answer after `messages`."""

    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[ChatMessage]
    continuation: str


# ---------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AdapterUsed(BaseModel):
    name: str = Field(description="'' for the bare base model")
    version: int
    requested: str


class SwitchboardInfo(BaseModel):
    """Switchboard's accounting of one answer, beside OpenAI's fields."""

    request_id: str
    adapter: AdapterUsed
    truncation: dict[str, Any]
    timings: dict[str, float]
    session_id: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage
    switchboard: SwitchboardInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str = Field(description="what the id serves: the base's name or name@version")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ScoreResponse(BaseModel):
    object: Literal["score"] = "score"
    model: str
    log_likelihood: float
    token_count: int
    prompt_tokens: int
    adapter: AdapterUsed


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
