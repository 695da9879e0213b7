"""The one table from domain errors to gRPC status codes (server/status.py)."""

from __future__ import annotations


def test_every_domain_error_has_its_own_code() -> None:
    from server import errors
    from server.adapter_cache import AdapterNotLoadedError
    from server.status import status_for

    expected = {
        errors.InvalidArgumentError: "INVALID_ARGUMENT", errors.NotFoundError: "NOT_FOUND",
        AdapterNotLoadedError: "NOT_FOUND",
        errors.FailedPreconditionError: "FAILED_PRECONDITION",
        errors.IncompatibleAdapterError: "FAILED_PRECONDITION",
        errors.AdapterInUseError: "FAILED_PRECONDITION",
        errors.AdapterLoadError: "FAILED_PRECONDITION",
        errors.ResourceExhaustedError: "RESOURCE_EXHAUSTED",
        errors.QueueFullError: "RESOURCE_EXHAUSTED",
        errors.AdapterCapacityError: "RESOURCE_EXHAUSTED",
        errors.ContextOverflowError: "OUT_OF_RANGE", errors.SessionBusyError: "ABORTED",
        errors.DeadlineExceededError: "DEADLINE_EXCEEDED",
        errors.UnavailableError: "UNAVAILABLE", KeyError: "INTERNAL", ValueError: "INTERNAL",
    }
    for cls, code in expected.items():
        assert status_for(cls("x")).name == code, cls
