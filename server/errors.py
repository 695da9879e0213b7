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
    """An adapter cannot be loaded: every slot is pinned by live requests, or it does not fit
    the adapter memory budget (larger than the whole budget, or the rest is pinned)."""


class AdapterSlotsBusyError(AdapterCapacityError):
    """No slot or budget can be freed right now (held by running or waiting requests); a
    request waiting for the adapter keeps waiting, an explicit load may retry later."""


class ConcurrencyLimitError(ResourceExhaustedError):
    """Too many requests are running or waiting, in the whole server or on one adapter."""


class ContextOverflowError(SwitchboardError):
    """The prompt does not fit the context budget under the `error` strategy (OUT_OF_RANGE)."""


class SessionBusyError(SwitchboardError):
    """Another request is already running on this session (ABORTED)."""


class AdapterLoadError(SwitchboardError):
    """An adapter's files are unreadable or malformed (FAILED_PRECONDITION at the edge)."""


class AdapterTooLargeError(AdapterLoadError):
    """The weights file is larger than max_adapter_bytes; refused before it is read.

    FAILED_PRECONDITION, not RESOURCE_EXHAUSTED: the size is a property of the adapter on disk,
    not a momentary shortage, so retrying cannot help; the operator must raise the limit.
    """


class RowFailedError(SwitchboardError):
    """One row of a batched step failed alone (non-finite logits from its adapter, a sampling
    error); the other rows went on (INTERNAL at the edge: nothing the caller sent caused it)."""


class DeadlineExceededError(SwitchboardError):
    """The caller's deadline passed before the answer was complete (DEADLINE_EXCEEDED)."""


class UnavailableError(SwitchboardError):
    """The server is not ready or is shutting down (UNAVAILABLE)."""


class SessionStoreError(UnavailableError):
    """The session store cannot be written (disk full, read-only file); stateless calls go on."""


class UnauthenticatedError(SwitchboardError):
    """No valid API key came with the call (UNAUTHENTICATED)."""


class PermissionDeniedError(SwitchboardError):
    """The key is valid but of the wrong kind for this call (PERMISSION_DENIED)."""
