"""OpenAI requests to the core's domain types, and the core's results back to OpenAI responses.

Validation reuses the gRPC edge's per-message checks (server.api.messages_from_pb works on
anything with `role` and `content`) and the same limits from ServerConfig; refusals name the
OpenAI field (`max_tokens`, not `sampling.max_new_tokens`). Defaults follow OpenAI's API where it
has one (temperature 1), the server's settings otherwise (answer length, truncation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from common.names import BASE_NAME, TRUNCATION_STRATEGIES, version_key
from server.adapters import AdapterVersion
from server.api import MAX_STOP_CHARS, MAX_STOP_SEQUENCES, check_session_id, messages_from_pb
from server.config import ServerConfig
from server.core import (
    AdapterListing,
    ChatInput,
    ChatResult,
    ScoreOutcome,
    check_conversation,
)
from server.errors import InvalidArgumentError
from server.keys import Caller
from server.openai.errors import UnsupportedFieldError
from server.openai.schemas import (
    AdapterUsed,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ModelCard,
    ModelList,
    ScoreResponse,
    SwitchboardInfo,
    Usage,
)
from server.sampling import SamplingParams

OWNER = "switchboard"
OPENAI_DEFAULT_TEMPERATURE = 1.0

# ---------------------------------------------------------------- model names


@dataclass(frozen=True)
class ModelNames:
    """How the HTTP face names the base model: its directory's name (or hub id), never a path."""

    base: str
    fingerprint: str
    created: int

    @classmethod
    def of(cls, config: ServerConfig, fingerprint: str) -> ModelNames:
        path = Path(config.base)
        if path.is_dir():
            return cls(path.resolve().name, fingerprint, int(path.stat().st_mtime))
        return cls(config.base, fingerprint, 0)

    def adapter_ref(self, model: str) -> str:
        """The core's adapter reference for `model` ("" = the bare base)."""
        model = model.strip()
        if not model:
            raise UnsupportedFieldError(
                "model", f"model is empty: name an adapter or the base model {self.base!r} "
                         "(GET /v1/models lists them)")
        return "" if model in (self.base, BASE_NAME) else model

    def served(self, adapter: AdapterVersion | None) -> str:
        return adapter.key if adapter is not None else self.base


# ---------------------------------------------------------------- requests


class _Wire(NamedTuple):
    role: str
    content: str


def messages_of(items: list[ChatMessage], config: ServerConfig) -> list[Any]:
    wire = [_Wire("system" if m.role == "developer" else m.role, m.text()) for m in items]
    return messages_from_pb(wire, config)  # type: ignore[arg-type]  # duck-typed: role, content


def _refuse_unsupported(body: ChatCompletionRequest) -> None:
    if body.n not in (None, 1):
        raise UnsupportedFieldError("n", f"n is {body.n}; this server generates one choice per "
                                         "request: send n=1 or leave it out")
    if body.logprobs or body.top_logprobs:
        raise UnsupportedFieldError("logprobs", "logprobs are not available from this server: "
                                                "leave logprobs and top_logprobs out")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise UnsupportedFieldError(name, f"{name} is not supported (only 0); use the extra "
                                              "body field repetition_penalty (1 = off) instead")
    if body.logit_bias:
        raise UnsupportedFieldError("logit_bias", "logit_bias is not supported; leave it out")
    if body.tools or body.functions or body.tool_choice not in (None, "none") \
            or body.function_call not in (None, "none"):
        raise UnsupportedFieldError("tools", "tool and function calling are not supported; "
                                             "leave tools, tool_choice and functions out")
    if body.response_format not in (None, {"type": "text"}):
        raise UnsupportedFieldError("response_format", "only response_format {'type': 'text'} "
                                                       "is supported")


def _max_new_tokens(body: ChatCompletionRequest, config: ServerConfig) -> int:
    given = {name: value for name in ("max_completion_tokens", "max_tokens")
             if (value := getattr(body, name)) is not None}
    if len(set(given.values())) > 1:
        raise UnsupportedFieldError("max_tokens", f"max_tokens ({body.max_tokens}) and "
                                    f"max_completion_tokens ({body.max_completion_tokens}) "
                                    "differ; send one of them")
    for name, value in given.items():
        if value > config.max_new_tokens_limit:
            raise UnsupportedFieldError(
                name, f"{name} is {value}; allowed: 1..{config.max_new_tokens_limit} (this "
                      "server's max_new_tokens_limit)")
        return value
    return config.engine.default_max_new_tokens


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP_SEQUENCES or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise UnsupportedFieldError(
            "stop", f"stop has {len(stops)} sequences; allowed: up to {MAX_STOP_SEQUENCES} "
                    f"non-empty strings of at most {MAX_STOP_CHARS} characters")
    return stops


def sampling_of(body: ChatCompletionRequest, config: ServerConfig,
                vocab_size: int) -> SamplingParams:
    if body.top_k is not None and body.top_k > vocab_size:
        raise UnsupportedFieldError("top_k", f"top_k is {body.top_k}; allowed: 0 (off) to the "
                                             f"vocabulary size {vocab_size}")
    temperature = OPENAI_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    top_p = body.top_p if body.top_p is not None and 0.0 < body.top_p < 1.0 else 1.0
    try:
        return SamplingParams(
            max_new_tokens=_max_new_tokens(body, config), temperature=temperature, top_p=top_p,
            top_k=body.top_k or 0, repetition_penalty=body.repetition_penalty or 1.0,
            seed=body.seed, stop=_stops(body.stop), ignore_eos=body.ignore_eos)
    except ValueError as e:
        raise InvalidArgumentError(f"sampling: {e}") from e


def truncation_of(value: str | None, config: ServerConfig) -> str:
    if not value:
        return config.default_truncation
    if value not in TRUNCATION_STRATEGIES:
        raise UnsupportedFieldError("truncation", f"truncation is {value!r}; allowed: "
                                                  f"{', '.join(TRUNCATION_STRATEGIES)}")
    return value


def chat_input_of(body: ChatCompletionRequest, config: ServerConfig, vocab_size: int,
                  names: ModelNames, caller: Caller) -> ChatInput:
    _refuse_unsupported(body)
    session_id = check_session_id(body.session_id or "")
    messages = messages_of(body.messages, config)
    if not session_id:
        check_conversation(messages)
    return ChatInput(messages=tuple(messages), adapter=names.adapter_ref(body.model),
                     sampling=sampling_of(body, config, vocab_size),
                     truncation=truncation_of(body.truncation, config), session_id=session_id,
                     caller=caller)


# ---------------------------------------------------------------- responses


@dataclass(frozen=True)
class Reply:
    """What every chunk or completion of one request repeats."""

    id: str
    created: int
    model: str
    fingerprint: str


def adapter_used(adapter: AdapterVersion | None, requested: str) -> AdapterUsed:
    if adapter is None:
        return AdapterUsed(name="", version=0, requested=requested)
    return AdapterUsed(name=adapter.name, version=adapter.version, requested=requested)


def switchboard_info(result: ChatResult) -> SwitchboardInfo:
    t = result.truncation
    return SwitchboardInfo(
        request_id=result.request_id, adapter=adapter_used(result.adapter, result.requested),
        truncation={"strategy": t.strategy, "applied": t.applied,
                    "messages_dropped": t.messages_dropped, "tokens_dropped": t.tokens_dropped,
                    "budget_tokens": max(t.budget_tokens, 0), "summary": t.summary},
        timings={"queue_wait_s": result.queue_wait_s or 0.0, "ttft_s": result.ttft_s or 0.0,
                 "total_s": result.total_s or 0.0},
        session_id=result.session_id)


def usage_of(result: ChatResult) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 total_tokens=result.prompt_tokens + result.completion_tokens)


def completion(result: ChatResult, reply: Reply) -> dict[str, Any]:
    return ChatCompletion(
        id=reply.id, created=reply.created, model=reply.model,
        system_fingerprint=reply.fingerprint,
        choices=[Choice(message=AssistantMessage(content=result.text),
                        finish_reason=result.finish_reason)],
        usage=usage_of(result), switchboard=switchboard_info(result)).model_dump()


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def chunk(reply: Reply, delta: dict[str, str], finish_reason: str | None = None,
          **extra: Any) -> dict[str, Any]:
    return {"id": reply.id, "object": "chat.completion.chunk", "created": reply.created,
            "model": reply.model, "system_fingerprint": reply.fingerprint,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                         "logprobs": None}], **extra}


def usage_chunk(reply: Reply, result: ChatResult) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage: no choices, the whole usage."""
    return {"id": reply.id, "object": "chat.completion.chunk", "created": reply.created,
            "model": reply.model, "system_fingerprint": reply.fingerprint, "choices": [],
            "usage": usage_of(result).model_dump()}


def _unix(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp()) if iso else 0
    except ValueError:
        return 0


def model_list(listing: AdapterListing, names: ModelNames, caller: Caller) -> ModelList:
    """What `caller` may use: the base, every servable adapter version, each adapter's bare
    name (its newest version) and every alias whose target is servable."""
    cards = []
    if caller.may_use(None):
        cards.append(ModelCard(id=names.base, created=names.created, owned_by=OWNER,
                               root=names.base))
    servable = {version_key(a.name, a.version): _unix(a.created) for a in listing.adapters
                if a.compatible and caller.may_use(a.name, a.version)}
    aliases = {a.alias for a in listing.aliases}  # an alias shadows an adapter's bare name
    newest: dict[str, int] = {}
    for a in listing.adapters:
        if a.name not in aliases:
            newest[a.name] = max(newest.get(a.name, 0), a.version)
    cards += [ModelCard(id=key, created=created, owned_by=OWNER, root=key)
              for key, created in servable.items()]
    for name, version in newest.items():
        key = version_key(name, version)
        if key in servable:
            cards.append(ModelCard(id=name, created=servable[key], owned_by=OWNER, root=key))
    cards += [ModelCard(id=a.alias, created=servable[a.target], owned_by=OWNER, root=a.target)
              for a in listing.aliases if a.target in servable]
    return ModelList(data=cards)


def score_response(outcome: ScoreOutcome, names: ModelNames) -> dict[str, Any]:
    return ScoreResponse(
        model=names.served(outcome.adapter), log_likelihood=outcome.log_likelihood,
        token_count=outcome.token_count, prompt_tokens=outcome.prompt_tokens,
        adapter=adapter_used(outcome.adapter, outcome.requested)).model_dump()
