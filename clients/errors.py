"""The exceptions the client raises for a failed call, carrying the gRPC status by name.

Every failed call raises `SwitchboardRpcError`; the two refusals of an authenticating server come
as its subclasses, so callers can catch "needs a key" and "needs an admin key" by type.
"""

from __future__ import annotations

import math
from typing import Any

RETRY_AFTER_METADATA = "retry-after"


class SwitchboardRpcError(Exception):
    """A call failed with a gRPC status; `code` is the StatusCode name, such as "NOT_FOUND".

    `retry_after_s` is the server's `retry-after` trailing metadata (seconds), sent with
    RESOURCE_EXHAUSTED when a key's rate limit says when to come back; None otherwise.
    The original `grpc.RpcError` is kept as `__cause__` when the error came off the wire.
    """

    def __init__(self, code: str, details: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s

    @classmethod
    def from_rpc(cls, err: Any) -> SwitchboardRpcError:
        """Build from a `grpc.RpcError` (sync) or `grpc.aio.AioRpcError`; both expose code()."""
        code = err.code() if callable(getattr(err, "code", None)) else None
        details = err.details() if callable(getattr(err, "details", None)) else None
        name = getattr(code, "name", None) or "UNKNOWN"
        return ERROR_BY_CODE.get(name, SwitchboardRpcError)(name, details or str(err),
                                                            retry_after(err))


def retry_after(err: Any) -> float | None:
    """The `retry-after` trailing metadata of a failed call, in seconds (None when absent or
    not a finite number >= 0)."""
    trailing = getattr(err, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == RETRY_AFTER_METADATA and isinstance(value, str):
            try:
                seconds = float(value)
            except ValueError:
                return None
            return seconds if math.isfinite(seconds) and seconds >= 0 else None
    return None


class UnauthenticatedError(SwitchboardRpcError):
    """UNAUTHENTICATED: the call carried no key, or one the server does not know."""


class PermissionDeniedError(SwitchboardRpcError):
    """PERMISSION_DENIED: the key is valid but not for this call (an API key on an admin call)."""


ERROR_BY_CODE: dict[str, type[SwitchboardRpcError]] = {
    "UNAUTHENTICATED": UnauthenticatedError,
    "PERMISSION_DENIED": PermissionDeniedError,
}
