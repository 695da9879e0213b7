"""The one exception the client raises for a failed call, carrying the gRPC status by name."""

from __future__ import annotations

from typing import Any


class SwitchboardRpcError(Exception):
    """A call failed with a gRPC status; `code` is the StatusCode name, such as "NOT_FOUND".

    The original `grpc.RpcError` is kept as `__cause__` when the error came off the wire.
    """

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, err: Any) -> SwitchboardRpcError:
        """Build from a `grpc.RpcError` (sync) or `grpc.aio.AioRpcError`; both expose code()."""
        code = err.code() if callable(getattr(err, "code", None)) else None
        details = err.details() if callable(getattr(err, "details", None)) else None
        name = getattr(code, "name", None) or "UNKNOWN"
        return cls(name, details or str(err))
