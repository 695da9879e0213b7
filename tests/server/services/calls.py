"""Request builders and checks the service modules share."""

from __future__ import annotations

from switchboard.v1 import switchboard_pb2 as pb
from switchboard.v1 import switchboard_pb2_grpc as pb_grpc

SHORT = 8  # the shared server's default max_new_tokens
# Tests that act while an answer still streams (cancel, busy session, deadline, unload in use)
# ask for ignore_eos: the answer then runs its whole max_new_tokens whatever the weights say.
LONG_ADAPTER = "alpha@1"


def chat_request(text: str = "hello there", adapter: str = "", max_new_tokens: int = SHORT,
                 **kwargs) -> pb.ChatRequest:
    return pb.ChatRequest(
        messages=[pb.Message(role="system", content="Be brief."),
                  pb.Message(role="user", content=text)],
        adapter=adapter, sampling=pb.SamplingParams(max_new_tokens=max_new_tokens), **kwargs)


def long_request(max_new_tokens: int, **kwargs) -> pb.ChatRequest:
    """A chat on LONG_ADAPTER that generates exactly `max_new_tokens` (ignore_eos)."""
    request = chat_request(adapter=LONG_ADAPTER, max_new_tokens=max_new_tokens, **kwargs)
    request.sampling.ignore_eos = True
    return request


def msgs(*pairs: tuple[str, str]) -> list[pb.Message]:
    return [pb.Message(role=r, content=c) for r, c in pairs]


def assert_still_serving(infer: pb_grpc.InferenceServiceStub) -> None:
    reply = infer.Chat(chat_request(max_new_tokens=2), timeout=60)
    assert reply.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


def loaded(admin: pb_grpc.AdapterServiceStub) -> dict[str, pb.AdapterInfo]:
    listing = admin.ListAdapters(pb.ListAdaptersRequest(), timeout=30)
    return {f"{a.name}@{a.version}": a for a in listing.adapters if a.loaded}
