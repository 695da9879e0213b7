"""Fuzzing the gRPC API: hypothesis-generated requests against the real server on loopback.

The property, for every RPC of InferenceService, AdapterService and SessionService: a call ends
OK or with one of the documented client-facing statuses (DOCUMENTED), never INTERNAL or UNKNOWN,
and the server is still SERVING and answering chats afterwards. Requests come two ways:

- typed: proto messages with arbitrary text (control characters, very long strings), adapter,
  alias and session names mixing valid references with junk and paths, numeric fields at their
  bounds (uint32/uint64 extremes, NaN, infinities, subnormal floats), unknown enum values,
  oversized repeated fields, random roles, and with arbitrary x-request-id metadata;
- raw bytes (python protobuf cannot build these): messages written field by field on the wire
  from each request's descriptor, with invalid UTF-8 and lone surrogates in strings, negative
  and 64-bit varints in uint32 fields, wrong wire types and unknown fields; valid requests with
  junk spliced in; and plain random bytes. They go through a channel method without serializer.

Typed requests are also sent several at a time (shared engine steps, pins, session locks), and
a second server with keys gets wrong keys in every header form (all must be UNAUTHENTICATED),
and chat, stream and score requests from a key scoped to some adapters (served only on those;
any other reference is PERMISSION_DENIED, never NOT_FOUND, and the refusal lists nothing).

One module-scoped server with the tiny base, a private copy of the adapters root (SetAlias,
UnloadAdapter and DeleteSession only ever touch that copy, checked at the end), a sessions
database in tmp and a 16-token answer limit, so each call takes milliseconds. Regressions the
fuzzer found are kept as explicit tests below the fuzz tests.
"""

from __future__ import annotations

import hashlib
import math
import operator
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from switchboard.v1 import switchboard_pb2 as pb

from server.app import RunningServer, start_in_thread
from server.config import ServerConfig

TIMEOUT = 10.0
ANSWER_LIMIT = 16
CONTEXT = 512

# What the API documents for a bad or unlucky request (docs/serving.md, "How a request is served").
# UNAVAILABLE is documented only for a server that is loading, shutting down or whose session
# store cannot be written; none of that holds here, so here it would be a wrong answer.
DOCUMENTED = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
})

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


# ---------------------------------------------------------------- the RPCs, from the descriptor

@dataclass(frozen=True)
class Rpc:
    name: str
    path: str
    request: type[Message]
    streaming: bool


def _rpcs() -> dict[str, Rpc]:
    """Every method of the three services, read from the proto (a new RPC shows up here)."""
    rpcs = {}
    for service in ("InferenceService", "AdapterService", "SessionService"):
        descriptor = pb.DESCRIPTOR.services_by_name[service]
        for method in descriptor.methods:
            rpcs[method.name] = Rpc(name=method.name,
                                    path=f"/{descriptor.full_name}/{method.name}",
                                    request=getattr(pb, method.input_type.name),
                                    streaming=method.server_streaming)
    return rpcs


RPCS = _rpcs()


# ---------------------------------------------------------------- calling and judging

@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    seconds: float
    replies: tuple[bytes, ...]


def start(channel: grpc.Channel, rpc: Rpc, payload: bytes,
          metadata: tuple[tuple[str, str], ...] = ()) -> Callable[[], Outcome]:
    """Send `payload` as-is (no serializer); the returned function waits for the outcome,
    every reply as bytes. Calls started one after another run concurrently on the server."""
    started = time.monotonic()
    if rpc.streaming:
        stream = channel.unary_stream(rpc.path, request_serializer=None,
                                      response_deserializer=None)
        call = stream(payload, timeout=TIMEOUT, metadata=metadata)

        def replies() -> list[bytes]:
            return list(call)
    else:
        unary = channel.unary_unary(rpc.path, request_serializer=None,
                                    response_deserializer=None)
        future = unary.future(payload, timeout=TIMEOUT, metadata=metadata)

        def replies() -> list[bytes]:
            return [future.result()]

    def outcome() -> Outcome:
        try:
            got, code, details = replies(), grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            got, code, details = [], e.code(), e.details() or ""
        return Outcome(code, details, time.monotonic() - started, tuple(got))

    return outcome


def invoke(channel: grpc.Channel, rpc: Rpc, payload: bytes,
           metadata: tuple[tuple[str, str], ...] = ()) -> Outcome:
    return start(channel, rpc, payload, metadata)()


def describe(request: Message | bytes) -> str:
    """The request for a failure message, cut to a readable length."""
    if isinstance(request, bytes):
        text = repr(request)
    else:
        text = f"{type(request).__name__}({str(request)!r})"
    return text if len(text) <= 600 else f"{text[:600]}... ({len(text)} chars)"


def assert_documented(rpc: Rpc, outcome: Outcome, request: Message | bytes) -> None:
    assert outcome.code is grpc.StatusCode.OK or outcome.code in DOCUMENTED, (
        f"{rpc.name} answered {outcome.code.name}: {outcome.details}\nrequest: "
        f"{describe(request)}")
    if outcome.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        assert outcome.seconds >= TIMEOUT - 0.5, (
            f"{rpc.name} gave DEADLINE_EXCEEDED after {outcome.seconds:.2f}s of a {TIMEOUT}s "
            f"deadline\nrequest: {describe(request)}")


def assert_well_formed(rpc: Rpc, outcome: Outcome) -> None:
    """An OK answer parses, and a chat stays within the answer limit; a stream's deltas add up
    to its one final chunk."""
    if outcome.code is not grpc.StatusCode.OK:
        return
    if rpc.name == "ChatStream":
        chunks = [pb.ChatChunk.FromString(r) for r in outcome.replies]
        assert chunks and chunks[-1].HasField("final")
        assert not any(c.HasField("final") for c in chunks[:-1])
        assert "".join(c.delta for c in chunks) == chunks[-1].final.text
        assert chunks[-1].final.usage.completion_tokens <= ANSWER_LIMIT
    elif rpc.name == "Chat":
        assert pb.ChatResponse.FromString(outcome.replies[0]).usage.completion_tokens \
            <= ANSWER_LIMIT
    elif rpc.name == "Score":
        assert math.isfinite(pb.ScoreResponse.FromString(outcome.replies[0]).log_likelihood)


# ---------------------------------------------------------------- strategies: values

MAX_UINT32, MAX_UINT64 = 2**32 - 1, 2**64 - 1
uint32s = st.one_of(st.sampled_from([0, 1, 2, ANSWER_LIMIT, ANSWER_LIMIT + 1, CONTEXT,
                                     2**31 - 1, 2**31, MAX_UINT32]),
                    st.integers(0, MAX_UINT32))
uint64s = st.one_of(st.sampled_from([0, 1, 2**31, MAX_UINT32, 2**63 - 1, 2**63, MAX_UINT64]),
                    st.integers(0, MAX_UINT64))
F32_MAX, F32_NORMAL = 3.4028234663852886e38, 1.1754943508222875e-38
F32_TINY = 1.401298464324817e-45  # the smallest subnormal float32
odd_floats = st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, F32_TINY, -F32_TINY,
                              F32_MAX, -F32_MAX, F32_NORMAL, -1.0, 1.0, 100.0,
                              100.00000762939453, 10.0, 10.000000953674316])
float32s = st.one_of(odd_floats, st.floats(width=32))
enum_values = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 6, -1, 2**31 - 1, -(2**31)]),
                        st.integers(-(2**31), 2**31 - 1))

# st.text's default alphabet is every encodable code point: control characters, format
# characters, private use, unassigned, emoji. Lone surrogates cannot be encoded by protobuf and
# go through the raw-bytes tests instead.
short_texts = st.text(max_size=30)
ODD_TEXTS = ("", " ", "hello", "\x00", "\n\n\n", "\u202e\u200b", "💥" * 3,
             "<|im_start|>system\n<|im_end|>", "{{ raise }}{% if %}")


def repeated(counts: list[int]) -> st.SearchStrategy[str]:
    """A short random text repeated `count` times: long strings without generating each one."""
    return st.builds(operator.mul, st.text(min_size=1, max_size=4), st.sampled_from(counts))


# Long texts within the server's default max_message_chars (200k), and some well above it.
fitting_texts = st.one_of(st.sampled_from(ODD_TEXTS), short_texts, repeated([2_000, 20_000]))
texts = st.one_of(fitting_texts, repeated([250_000]))

VALID_REFS = ("", "alpha", "alpha@1", "alpha@2", "beta", "beta@1")
ODD_REFS = (
    " ", "alpha@0", "alpha@3", "alpha@01", "alpha@-1", "alpha@+1", "alpha@ 1", "alpha@1.0",
    "alpha@4294967297", "alpha@999999999", "alpha@1@1", "alpha@", "@1", "@", "gamma", "Alpha",
    "../alpha", "alpha/../beta", "../../etc/passwd", "/etc/passwd", "/tmp", "~", "..", ".",
    "...", "alpha/1", "alpha\\1", "..@1", "aliases.json", "alias_history.jsonl", "alpha\x00",
    "alpha\x00@1", "alpha\n", "alpha\n@1", "alpha@1\n", "\talpha@1 ", "ａｌｐｈａ", "alpha@١",
    "fuzz", "a" * 128, "a" * 129, "a" * 128 + "@1", "%2e%2e", "alpha@1;rm -rf", "alpha*", "*",
)
JOINS = ("", "@", "@@", "/", "\\", "..", "/..", "\x00", " ", "\n", "@1", "@0")
ALIASES = ("fuzz", "fuzz-2", "prod", "stable.v1", "alpha", "beta")
SESSIONS = ("fuzz-1", "fuzz-2", "s:1@x.y_z-0", "a" * 128)
ODD_SESSIONS = ("a" * 129, "-x", ".x", "../x", "x/y", "x y", "x\n", "é", "")
ROLES = ("user", "assistant", "system")
ODD_ROLES = ("", "tool", "USER", " user", "user\x00")


def mostly(plausible: st.SearchStrategy, arbitrary: st.SearchStrategy) -> st.SearchStrategy:
    """Two parts `plausible`, one part `arbitrary`."""
    return st.one_of(plausible, plausible, arbitrary)


refs = st.one_of(
    st.sampled_from(VALID_REFS + ODD_REFS),
    short_texts,
    st.builds(lambda a, b, c: a + b + c, st.sampled_from(VALID_REFS), st.sampled_from(JOINS),
              short_texts),
)
odd_session_ids = st.one_of(st.sampled_from(ODD_SESSIONS), short_texts)
odd_roles = st.one_of(st.sampled_from(ODD_ROLES), short_texts)
request_ids = st.one_of(st.none(), st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                                           min_size=1, max_size=200))


# ---------------------------------------------------------------- strategies: typed requests

def message(role: str, content: str) -> pb.Message:
    return pb.Message(role=role, content=content)


# A user message must say something; anything else may be any text.
said = fitting_texts.map(lambda t: t if t.strip() else f"hi{t}")


@st.composite
def conversations(draw: st.DrawFn) -> list[pb.Message]:
    """Well-shaped: an optional system prompt, whole exchanges, a last user message."""
    messages = [message("system", draw(fitting_texts))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 2))):
        messages += [message("user", draw(said)), message("assistant", draw(fitting_texts))]
    return [*messages, message("user", draw(said))]


odd_messages = st.one_of(
    st.lists(st.builds(message, mostly(st.sampled_from(ROLES), odd_roles), texts), max_size=6),
    st.builds(lambda m, n: [m] * n, st.builds(message, st.sampled_from(ROLES), short_texts),
              st.sampled_from([1_000, 1_001, 10_001])),
)
odd_stops = st.one_of(
    st.lists(st.one_of(short_texts, st.just("x" * 257)), max_size=3),
    st.builds(lambda s, n: [s] * n, short_texts, st.sampled_from([16, 17, 1_000])))


def in_range(high: float) -> st.SearchStrategy[float]:
    """A float32 in [0, high], its edges (the smallest subnormal, the smallest normal) often."""
    return st.one_of(st.just(0.0), st.sampled_from([F32_TINY, 1e-40, F32_NORMAL, 1e-30, high]),
                     st.floats(0.0, high, width=32))


@st.composite
def plausible_sampling(draw: st.DrawFn) -> pb.SamplingParams:
    """Every field in its documented range (edges included), so the request reaches the model."""
    params = pb.SamplingParams(
        max_new_tokens=draw(st.integers(0, ANSWER_LIMIT)),
        temperature=draw(in_range(100.0)),
        top_p=draw(in_range(1.0)),
        top_k=draw(st.one_of(st.just(0), st.integers(1, 50))),
        repetition_penalty=draw(in_range(10.0)),
        stop=draw(st.lists(st.text(min_size=1, max_size=5), max_size=3)),
        ignore_eos=draw(st.booleans()),
    )
    if draw(st.booleans()):
        params.seed = draw(uint64s)
    return params


@st.composite
def odd_sampling(draw: st.DrawFn) -> pb.SamplingParams:
    params = pb.SamplingParams(
        max_new_tokens=draw(uint32s), temperature=draw(float32s), top_p=draw(float32s),
        top_k=draw(uint32s), repetition_penalty=draw(float32s), stop=draw(odd_stops),
        ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):
        params.seed = draw(uint64s)
    return params


@dataclass(frozen=True)
class Field:
    """What a request field holds when the request is valid, and what else it may hold."""

    valid: st.SearchStrategy
    odd: st.SearchStrategy


def requests(build: Callable[..., Message], **fields: Field) -> st.SearchStrategy[Message]:
    """Two parts valid requests (so the model, the disk and the session store see them), one
    part requests whose every field is valid or odd at random."""
    valid = st.builds(build, **{k: f.valid for k, f in fields.items()})
    odd = st.builds(build, **{k: mostly(f.valid, f.odd) for k, f in fields.items()})
    return mostly(valid, odd)


def chat_request(messages: list[pb.Message], adapter: str, truncation: int, session_id: str,
                 sampling: pb.SamplingParams | None) -> pb.ChatRequest:
    request = pb.ChatRequest(messages=messages, adapter=adapter, truncation=truncation,
                             session_id=session_id)
    if sampling is not None:
        request.sampling.CopyFrom(sampling)
    return request


MESSAGES = Field(conversations(), odd_messages)
ADAPTER = Field(st.sampled_from(VALID_REFS), refs)
ALIAS = Field(st.sampled_from(ALIASES), refs)
SESSION = Field(st.sampled_from(SESSIONS), odd_session_ids)
chats = requests(
    chat_request, messages=MESSAGES, adapter=ADAPTER,
    truncation=Field(st.sampled_from(range(6)), enum_values),
    session_id=Field(st.one_of(st.just(""), st.sampled_from(SESSIONS)), odd_session_ids),
    sampling=Field(st.one_of(plausible_sampling(), st.none()), odd_sampling()))

REQUESTS: dict[str, st.SearchStrategy[Message]] = {
    "Chat": chats,
    "ChatStream": chats,
    "Score": requests(pb.ScoreRequest, messages=MESSAGES, continuation=Field(said, texts),
                      adapter=ADAPTER),
    "LoadAdapter": requests(pb.LoadAdapterRequest, adapter=ADAPTER),
    "UnloadAdapter": requests(pb.UnloadAdapterRequest, adapter=ADAPTER),
    "ListAdapters": st.just(pb.ListAdaptersRequest()),
    "SetAlias": requests(pb.SetAliasRequest, alias=ALIAS, target=ADAPTER,
                         reason=Field(fitting_texts, st.one_of(texts, st.just("r" * 4097)))),
    "AliasHistory": requests(pb.AliasHistoryRequest, alias=ALIAS),
    "GetSession": requests(pb.GetSessionRequest, session_id=SESSION),
    "ListSessions": requests(pb.ListSessionsRequest,
                             limit=Field(st.integers(0, 1000), uint32s)),
    "DeleteSession": requests(pb.DeleteSessionRequest, session_id=SESSION),
}
EXAMPLES = {"Chat": 50, "ChatStream": 35, "Score": 35, "LoadAdapter": 20, "UnloadAdapter": 20,
            "ListAdapters": 1, "SetAlias": 35, "AliasHistory": 15, "GetSession": 20,
            "ListSessions": 10, "DeleteSession": 15}
RAW_EXAMPLES = 150
CONCURRENT_EXAMPLES = 25
AUTH_EXAMPLES = 60


# ---------------------------------------------------------------- strategies: raw wire bytes

def varint(value: int) -> bytes:
    """Base-128 varint; a negative value is written as protobuf writes an int64: ten bytes."""
    value &= MAX_UINT64
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, 2) + varint(len(payload)) + payload


BAD_UTF8 = (
    b"\xff", b"\xfe\xff", b"\x80", b"\xc0\x80",  # stray bytes; overlong NUL
    b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xed\xa0\xbd\xed\xb2\xa5",  # lone and paired surrogates
    b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\xf0\x9f\x92",  # > U+10FFFF, cut
)
lone_surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3).map(
    lambda s: s.encode("utf-8", "surrogatepass"))
string_payloads = st.one_of(
    short_texts.map(str.encode),
    st.sampled_from(BAD_UTF8),
    lone_surrogates,
    st.builds(lambda a, bad, b: a.encode() + bad + b.encode(), short_texts,
              st.one_of(st.sampled_from(BAD_UTF8), lone_surrogates), short_texts),
    st.binary(max_size=40),
)
varints = st.one_of(st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), MAX_UINT32, 2**32,
                                     2**63 - 1, -(2**63), MAX_UINT64]),
                    st.integers(-(2**63), MAX_UINT64))
fixed32s = st.one_of(st.binary(min_size=4, max_size=4),
                     odd_floats.map(lambda f: struct.pack("<f", f)))
VARINT_TYPES = {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
                FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM}


def wrong_wire(number: int) -> st.SearchStrategy[bytes]:
    """A field written with any wire type, including the group markers and 6/7 (invalid)."""
    return st.one_of(
        varints.map(lambda v: tag(number, 0) + varint(v)),
        st.binary(min_size=8, max_size=8).map(lambda b: tag(number, 1) + b),
        st.binary(max_size=20).map(lambda b: length_delimited(number, b)),
        st.sampled_from([3, 4, 6, 7]).map(lambda w: tag(number, w)),
        st.binary(max_size=4).map(lambda b: tag(number, 5) + b),
    )


def field_bytes(field: FieldDescriptor, depth: int) -> st.SearchStrategy[bytes]:
    n = field.number
    if field.type == FieldDescriptor.TYPE_STRING:
        right = string_payloads.map(lambda p: length_delimited(n, p))
    elif field.type in VARINT_TYPES:
        right = varints.map(lambda v: tag(n, 0) + varint(v))
    elif field.type == FieldDescriptor.TYPE_FLOAT:
        right = fixed32s.map(lambda b: tag(n, 5) + b)
    elif field.type == FieldDescriptor.TYPE_MESSAGE and depth < 2:
        right = wire_message(field.message_type, depth + 1).map(lambda p: length_delimited(n, p))
    else:
        right = wrong_wire(n)
    return st.one_of(right, right, right, wrong_wire(n))


def wire_message(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[bytes]:
    """A message written field by field: known fields (any order, repeated or not), sometimes
    an unknown field number, sometimes cut short."""
    known = [field_bytes(f, depth) for f in descriptor.fields]
    unknown = st.integers(1, 2**29 - 1).flatmap(wrong_wire)
    parts = st.lists(st.one_of(*known, unknown) if known else unknown, max_size=6)
    whole = parts.map(b"".join)
    return st.one_of(whole, whole, whole.flatmap(
        lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda cut: b[:cut])))


@st.composite
def spliced(draw: st.DrawFn, rpc: Rpc) -> bytes:
    """A typed request's bytes with junk written over or into them at some offset."""
    data = draw(REQUESTS[rpc.name]).SerializeToString()
    at = draw(st.integers(0, len(data)))
    junk = draw(st.one_of(st.sampled_from(BAD_UTF8), st.binary(min_size=1, max_size=8)))
    cut = at + len(junk) if draw(st.booleans()) else at
    return data[:at] + junk + data[cut:]


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[Rpc, bytes]:
    rpc = draw(st.sampled_from(list(RPCS.values())))
    payload = draw(st.one_of(wire_message(rpc.request.DESCRIPTOR), spliced(rpc),
                             st.binary(max_size=64)))
    return rpc, payload


# ---------------------------------------------------------------- the server

def snapshot(root: Path) -> dict[str, str]:
    """Every file below `root` with a digest of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class Fixture:
    server: RunningServer
    root: Path
    original_root: Path
    original: dict[str, str]


@pytest.fixture(scope="module")
def fuzzed(tiny_base: Path, adapters_root: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    """The server under fuzz, on a private copy of the adapters root (aliases move in it)."""
    original = snapshot(adapters_root)
    root = tmp_path_factory.mktemp("fuzz") / "adapters"
    shutil.copytree(adapters_root, root)
    config = ServerConfig.build(
        base=str(tiny_base), adapters_root=root, port=0, device="cpu", max_batch=8,
        max_loaded_adapters=2, max_queue=64, default_max_new_tokens=4,
        max_new_tokens_limit=ANSWER_LIMIT, context_length=CONTEXT,
        sessions_db=tmp_path_factory.mktemp("fuzz-db") / "sessions.db",
        shutdown_grace_seconds=1.0,
    )
    running = start_in_thread(config)
    yield Fixture(running, root, adapters_root, original)
    running.stop()


@pytest.fixture(scope="module")
def channel(fuzzed: Fixture) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzzed.server.target) as ch:
        yield ch


def chat_bytes(content: str = "hello there", **sampling: object) -> bytes:
    return pb.ChatRequest(messages=[message("user", content)],
                          sampling=pb.SamplingParams(**sampling)).SerializeToString()


def assert_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    outcome = invoke(channel, RPCS["Chat"], chat_bytes(max_new_tokens=2))
    assert outcome.code is grpc.StatusCode.OK, outcome


# ---------------------------------------------------------------- the fuzz

def test_every_rpc_in_the_proto_has_a_strategy() -> None:
    assert set(REQUESTS) == set(EXAMPLES) == set(RPCS)


@pytest.mark.parametrize("name", list(RPCS))
def test_typed_requests_end_ok_or_in_a_documented_status(channel: grpc.Channel,
                                                        name: str) -> None:
    rpc = RPCS[name]

    @settings(FUZZ, max_examples=EXAMPLES[name])
    @given(request=REQUESTS[name], request_id=request_ids)
    def check(request: Message, request_id: str | None) -> None:
        metadata = (("x-request-id", request_id),) if request_id else ()
        outcome = invoke(channel, rpc, request.SerializeToString(), metadata)
        assert_documented(rpc, outcome, request)
        assert_well_formed(rpc, outcome)

    check()
    assert_serving(channel)


def test_raw_bytes_end_ok_or_in_a_documented_status(channel: grpc.Channel) -> None:
    @settings(FUZZ, max_examples=RAW_EXAMPLES)
    @given(raw_requests())
    def check(drawn: tuple[Rpc, bytes]) -> None:
        rpc, payload = drawn
        assert_documented(rpc, invoke(channel, rpc, payload), payload)

    check()
    assert_serving(channel)


CONCURRENT = ("Chat", "ChatStream", "Score", "LoadAdapter", "UnloadAdapter", "SetAlias",
              "GetSession", "DeleteSession")
concurrent_calls = st.lists(
    st.sampled_from(CONCURRENT).flatmap(lambda n: REQUESTS[n].map(lambda r: (RPCS[n], r))),
    min_size=2, max_size=6)


def test_concurrent_requests_end_ok_or_in_a_documented_status(channel: grpc.Channel) -> None:
    """Requests that run together share engine steps, adapter pins and session locks: an
    unload while a chat holds the adapter, a busy session, odd rows batched with good ones."""

    @settings(FUZZ, max_examples=CONCURRENT_EXAMPLES)
    @given(concurrent_calls)
    def check(calls: list[tuple[Rpc, Message]]) -> None:
        pending = [start(channel, rpc, request.SerializeToString()) for rpc, request in calls]
        for (rpc, request), outcome in zip(calls, [wait() for wait in pending], strict=True):
            assert_documented(rpc, outcome, request)
            assert_well_formed(rpc, outcome)

    check()
    assert_serving(channel)


API_KEY, ADMIN_KEY = "fuzz-api-key-0123456789", "fuzz-admin-key-0123456789"
SCOPED_KEY = "fuzz-scoped-key-0123456789"
SCOPE = ("alpha@1", "__base__")  # a tenant that may use alpha version 1 and the bare base
SCOPED_EXAMPLES = 40
ascii_texts = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
wrong_keys = st.one_of(
    # Near misses of the real keys; none merely adds spaces around one (those are stripped).
    st.sampled_from([k for key in (API_KEY, ADMIN_KEY, SCOPED_KEY) for k in (
        key[:-1], key + "x", "x" + key, key.upper(), key[:8], key.replace("-", "_"),
        key[::-1], f"{key} {key}", f"{key},{ADMIN_KEY}")]),
    ascii_texts,
)
key_headers = st.tuples(
    st.sampled_from(["authorization", "x-api-key", "authorisation", "x-api-keys", "api-key"]),
    st.one_of(wrong_keys,
              st.sampled_from(["Bearer ", "bearer ", "BEARER  ", "Basic ", "Bearer", "Token ",
                               ""]).flatmap(lambda p: wrong_keys.map(p.__add__)),
              st.sampled_from([API_KEY, ADMIN_KEY]).map(lambda k: f"Basic {k}"),
              st.sampled_from([API_KEY, ADMIN_KEY]).map(lambda k: f"Bearer{k}")))


@pytest.fixture(scope="module")
def guarded(tiny_base: Path, adapters_root: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    """A second server, with keys, for the metadata fuzz (on its own copy of the root)."""
    root = tmp_path_factory.mktemp("fuzz-auth") / "adapters"
    shutil.copytree(adapters_root, root)
    keys_file = root.parent / "keys.toml"
    keys_file.write_text(f'[[keys]]\nname = "fuzz-scoped"\nkey = "{SCOPED_KEY}"\n'
                         f'adapters = {list(SCOPE)!r}\n'.replace("'", '"'))
    running = start_in_thread(ServerConfig.build(
        base=str(tiny_base), adapters_root=root, port=0, device="cpu", max_loaded_adapters=2,
        default_max_new_tokens=4, max_new_tokens_limit=ANSWER_LIMIT, context_length=CONTEXT,
        api_keys=(API_KEY,), admin_keys=(ADMIN_KEY,), keys_file=keys_file,
        shutdown_grace_seconds=1.0, sessions_db=None))
    with grpc.insecure_channel(running.target) as ch:
        yield ch
    running.stop()


def test_wrong_keys_in_any_form_are_unauthenticated(guarded: grpc.Channel) -> None:
    """No header that is not exactly a configured key lets a call through, on any RPC."""

    @settings(FUZZ, max_examples=AUTH_EXAMPLES)
    @given(st.sampled_from(list(RPCS.values())), st.lists(key_headers, max_size=3))
    def check(rpc: Rpc, headers: list[tuple[str, str]]) -> None:
        outcome = invoke(guarded, rpc, b"", tuple(headers))
        assert outcome.code is grpc.StatusCode.UNAUTHENTICATED, (rpc.name, headers, outcome)

    check()
    admin = (("authorization", f"Bearer {ADMIN_KEY}"),)
    assert invoke(guarded, RPCS["ListSessions"], b"", admin).code is not \
        grpc.StatusCode.UNAUTHENTICATED


def served_adapter(rpc: Rpc, outcome: Outcome) -> pb.AdapterRef:
    if rpc.name == "Score":
        return pb.ScoreResponse.FromString(outcome.replies[0]).adapter
    if rpc.name == "ChatStream":
        return pb.ChatChunk.FromString(outcome.replies[-1]).final.adapter
    return pb.ChatResponse.FromString(outcome.replies[0]).adapter


def test_a_scoped_key_is_served_only_in_its_scope_and_learns_nothing_else(
        guarded: grpc.Channel) -> None:
    """Whatever the adapter reference, a scoped key is served on an adapter of its scope or
    refused PERMISSION_DENIED (or INVALID_ARGUMENT for a malformed request), never NOT_FOUND,
    and no refusal names an adapter the request did not."""
    scoped = (("authorization", f"Bearer {SCOPED_KEY}"),)
    inference = [RPCS[name] for name in ("Chat", "ChatStream", "Score")]

    @settings(FUZZ, max_examples=SCOPED_EXAMPLES)
    @given(st.sampled_from(inference).flatmap(
        lambda rpc: st.tuples(st.just(rpc), REQUESTS[rpc.name])))
    def check(call: tuple[Rpc, Message]) -> None:
        rpc, request = call
        outcome = invoke(guarded, rpc, request.SerializeToString(), scoped)
        assert outcome.code in DOCUMENTED | {grpc.StatusCode.OK,
                                             grpc.StatusCode.PERMISSION_DENIED}, \
            (rpc.name, describe(request), outcome)
        assert outcome.code is not grpc.StatusCode.NOT_FOUND, (describe(request), outcome)
        if outcome.code is grpc.StatusCode.OK:
            served = served_adapter(rpc, outcome)
            assert (served.name, served.version) in {("alpha", 1), ("", 0)}, served
        if outcome.code is grpc.StatusCode.PERMISSION_DENIED:
            assert "not available to key 'fuzz-scoped'" in outcome.details
            told = outcome.details.replace(repr(request.adapter.strip()), "")
            assert "beta" not in told and "alpha@2" not in told, outcome.details

    check()


# ---------------------------------------------------------------- regressions the fuzz found

@pytest.mark.parametrize("sampling", [
    {"temperature": F32_TINY},
    {"temperature": 1e-40},
    {"temperature": 1.0, "repetition_penalty": F32_TINY},
], ids=["subnormal-temperature", "tiny-temperature", "subnormal-penalty"])
def test_vanishing_temperature_or_penalty_is_refused_or_served(channel: grpc.Channel,
                                                               sampling: dict) -> None:
    """Logits divided by ~1e-45 overflow float32 to inf, softmax gives NaN and torch.multinomial
    raised RuntimeError in the engine step: INTERNAL (and the neighbours, see the next test)."""
    outcome = invoke(channel, RPCS["Chat"], chat_bytes(**sampling))
    assert outcome.code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), outcome


def test_one_bad_row_never_fails_the_requests_batched_with_it(channel: grpc.Channel) -> None:
    """A step's exception fails every row in it: a request that sampling cannot serve must not
    take a neighbour's stream down with it."""
    stop, answered = threading.Event(), threading.Event()
    bad: list[Outcome] = []

    def keep_sending_bad_rows() -> None:
        while not stop.is_set():
            bad.append(invoke(channel, RPCS["Chat"], chat_bytes(temperature=F32_TINY)))
            answered.set()

    sender = threading.Thread(target=keep_sending_bad_rows)
    sender.start()
    try:
        assert answered.wait(timeout=60), "the first bad row was never answered"
        neighbour = invoke(channel, RPCS["ChatStream"],
                           chat_bytes(max_new_tokens=ANSWER_LIMIT, ignore_eos=True))
    finally:
        stop.set()
        sender.join()
    assert neighbour.code is grpc.StatusCode.OK, neighbour
    final = pb.ChatChunk.FromString(neighbour.replies[-1]).final
    assert final.usage.completion_tokens == ANSWER_LIMIT
    assert bad and {o.code for o in bad} <= {grpc.StatusCode.OK,
                                              grpc.StatusCode.INVALID_ARGUMENT}


@pytest.mark.parametrize("name, payload", [
    ("Chat", length_delimited(1, length_delimited(1, b"user")
                              + length_delimited(2, b"he\xffllo"))),
    ("Chat", length_delimited(1, length_delimited(1, b"user")
                              + length_delimited(2, "\ud800".encode("utf-8", "surrogatepass")))),
    ("Score", length_delimited(2, b"\xc0\x80")),
    ("SetAlias", length_delimited(1, b"fuzz\xed\xa0\x80") + length_delimited(2, b"alpha@1")),
    ("GetSession", length_delimited(1, b"\xff")),
    ("ChatStream", b"\xff\xff\xff"),
    ("ListSessions", tag(1, 7)),
], ids=["chat-invalid-utf8", "chat-lone-surrogate", "score-overlong-nul",
        "alias-surrogate", "session-stray-byte", "stream-corrupt-wire", "bad-wire-type"])
def test_undecodable_requests_are_invalid_argument(channel: grpc.Channel, name: str,
                                                   payload: bytes) -> None:
    """Python protobuf refuses to parse these; before api.py decoded requests itself, grpc
    answered UNKNOWN ("Unexpected <class 'google.protobuf.message.DecodeError'>")."""
    outcome = invoke(channel, RPCS[name], payload)
    assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, outcome


# ---------------------------------------------------------------- afterwards

def test_the_server_still_serves_after_the_fuzz(channel: grpc.Channel) -> None:
    assert_serving(channel)
    for adapter in ("alpha@1", "beta@1"):
        request = pb.ChatRequest(messages=[message("user", "hi")], adapter=adapter)
        outcome = invoke(channel, RPCS["Chat"], request.SerializeToString())
        assert outcome.code is grpc.StatusCode.OK, outcome


def test_the_fuzz_wrote_only_into_its_copy_of_the_adapters_root(fuzzed: Fixture) -> None:
    assert snapshot(fuzzed.original_root) == fuzzed.original
    assert (fuzzed.root / "alias_history.jsonl").is_file(), "the fuzz never moved an alias"
    assert [p.name for p in fuzzed.root.parent.iterdir()] == ["adapters"]
    assert {p.name for p in fuzzed.root.iterdir()} <= {
        "alpha", "beta", "aliases.json", "alias_history.jsonl"}
    copied = {k: v for k, v in snapshot(fuzzed.root).items() if "/" in k}
    assert copied == {k: v for k, v in fuzzed.original.items() if "/" in k}

