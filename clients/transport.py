"""One client abstraction, two transports: the target's form picks gRPC or the HTTP face.

`HOST:PORT` is the gRPC API (clients.aio); `http://HOST:PORT` or `https://...` is the
OpenAI-compatible HTTP face (clients.http), for deployments that expose only HTTP.
"""

from __future__ import annotations

from typing import Any

from clients.aio import AsyncSwitchboardClient
from clients.http import AsyncHttpClient, is_http_target


def async_client_for(target: str, **options: Any) -> AsyncSwitchboardClient | AsyncHttpClient:
    """The asyncio client for `target`; `options` are those both clients take (timeout,
    retries, api_key, tls, ca_cert, client_cert, client_key)."""
    if is_http_target(target):
        return AsyncHttpClient(target, **options)
    return AsyncSwitchboardClient(target, **options)


__all__ = ["async_client_for", "is_http_target"]
