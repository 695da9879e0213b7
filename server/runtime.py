"""What the edges reach: the core once the base is loaded, the keys, the audit trail, metrics."""

from __future__ import annotations

from typing import Any

from server.config import ServerConfig
from server.core import InferenceCore
from server.errors import UnauthenticatedError, UnavailableError
from server.keys import ANONYMOUS, Caller, LiveKeys


class Runtime:
    """`core` is None until the base model has loaded. `keys` is None when auth is off (every
    caller is ANONYMOUS); `audit` is None without --audit-log; `metrics` None without a
    metrics port."""

    def __init__(self, config: ServerConfig, keys: LiveKeys | None = None,
                 audit: Any = None, metrics: Any = None) -> None:
        self.config = config
        self.core: InferenceCore | None = None
        self.keys = keys
        self.audit = audit
        self.metrics = metrics

    def caller(self, key: str | None) -> Caller:
        """Who sent `key`: ANONYMOUS when auth is off; UnauthenticatedError for a key that is
        not (or no longer, after a reload) configured."""
        if self.keys is None:
            return ANONYMOUS
        caller = self.keys.identify(key)
        if caller is None:
            raise UnauthenticatedError("the key sent with this call is not (or no longer) valid")
        return caller

    def require(self) -> InferenceCore:
        if self.core is None:
            raise UnavailableError("the base model is still loading; retry shortly")
        return self.core
