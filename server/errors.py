"""Domain errors raised by the core; server/api.py maps each class to one gRPC status code."""

from __future__ import annotations


class SwitchboardError(Exception):
    """Base of every error a user can act on.

    Its message says what was wrong and what is allowed.
    """


class InvalidArgumentError(SwitchboardError):
    """The request itself is malformed (INVALID_ARGUMENT)."""


class NotFoundError(SwitchboardError):
    """An adapter, version, alias or session does not exist (NOT_FOUND)."""


class FailedPreconditionError(SwitchboardError):
    """The system is not in a state where the request can run (FAILED_PRECONDITION)."""


class IncompatibleAdapterError(FailedPreconditionError):
    """The adapter's manifest names another base model."""


class AdapterInUseError(FailedPreconditionError):
    """An adapter cannot be unloaded while requests still use it."""


class ResourceExhaustedError(SwitchboardError):
    """A queue or capacity limit is reached (RESOURCE_EXHAUSTED)."""


class QueueFullError(ResourceExhaustedError):
    """The engine's waiting queue is full."""


class AdapterCapacityError(ResourceExhaustedError):
    """Every loaded adapter slot is pinned by live requests; nothing can be evicted."""


class ContextOverflowError(SwitchboardError):
    """The prompt does not fit the context budget under the `error` strategy (OUT_OF_RANGE)."""


class SessionBusyError(SwitchboardError):
    """Another request is already running on this session (ABORTED)."""


class AdapterLoadError(SwitchboardError):
    """An adapter's files are unreadable or malformed (FAILED_PRECONDITION at the edge)."""


class UnavailableError(SwitchboardError):
    """The server is not ready or is shutting down (UNAVAILABLE)."""


class SessionStoreError(UnavailableError):
    """The session store cannot be written (disk full, read-only file); stateless calls go on."""


class UnauthenticatedError(SwitchboardError):
    """No valid API key came with the call (UNAUTHENTICATED)."""


class PermissionDeniedError(SwitchboardError):
    """The key is valid but of the wrong kind for this call (PERMISSION_DENIED)."""
