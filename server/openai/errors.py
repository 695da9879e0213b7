"""The HTTP edge's one error table: each domain error (server/errors.py) to an HTTP status and
OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`.

`code` is the gRPC status name of the same failure in lower case ("not_found",
"resource_exhausted"), so a client sees one vocabulary over both transports, except where OpenAI
clients already key on a name of their own (`context_length_exceeded`). The metrics `code` label
keeps the gRPC names for both protocols (server.status.code_name), so dashboards need no second
table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.errors import (
    AdapterLoadError,
    ContextOverflowError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SessionBusyError,
    SwitchboardError,
    UnauthenticatedError,
    UnavailableError,
)


class PayloadTooLargeError(SwitchboardError):
    """The request body is larger than max_request_bytes (HTTP only: gRPC refuses it itself)."""


class UnsupportedFieldError(InvalidArgumentError):
    """An OpenAI request field this server does not implement; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class HttpError:
    """How one kind of failure looks on the wire."""

    status: int
    type: str
    code: str


INTERNAL = HttpError(500, "server_error", "internal")

HTTP_BY_ERROR: dict[type[Exception], HttpError] = {
    InvalidArgumentError: HttpError(400, "invalid_request_error", "invalid_argument"),
    ContextOverflowError: HttpError(400, "invalid_request_error", "context_length_exceeded"),
    UnauthenticatedError: HttpError(401, "authentication_error", "unauthenticated"),
    PermissionDeniedError: HttpError(403, "permission_error", "permission_denied"),
    NotFoundError: HttpError(404, "not_found_error", "not_found"),
    # Incompatible or unreadable adapters, sessions switched off, an adapter still in use: the
    # server's state conflicts with the request (gRPC FAILED_PRECONDITION).
    FailedPreconditionError: HttpError(409, "conflict_error", "failed_precondition"),
    AdapterLoadError: HttpError(409, "conflict_error", "failed_precondition"),
    SessionBusyError: HttpError(409, "conflict_error", "aborted"),
    PayloadTooLargeError: HttpError(413, "invalid_request_error", "request_too_large"),
    ResourceExhaustedError: HttpError(429, "rate_limit_error", "resource_exhausted"),
    UnavailableError: HttpError(503, "service_unavailable", "unavailable"),
    DeadlineExceededError: HttpError(504, "timeout_error", "deadline_exceeded"),
}


def http_error_of(error: BaseException) -> HttpError:
    """The row of the most specific known class of `error`; INTERNAL for the unexpected."""
    for cls in type(error).__mro__:
        if cls in HTTP_BY_ERROR:
            return HTTP_BY_ERROR[cls]
    return INTERNAL


def error_body(message: str, error: HttpError, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": error.type, "param": param,
                      "code": error.code}}


def param_of(error: BaseException) -> str | None:
    return getattr(error, "param", None)


__all__ = ["HTTP_BY_ERROR", "INTERNAL", "HttpError", "PayloadTooLargeError",
           "UnsupportedFieldError", "error_body", "http_error_of", "param_of"]
