"""The HTTP front's lifecycle: a uvicorn server on the gRPC server's own event loop.

uvicorn's `serve()` would install its own SIGINT/SIGTERM handlers and re-raise the signal when
it stops; server/app.py owns the signals and the drain, so this drives uvicorn's parts
(startup, the tick loop, shutdown) itself. TLS and mutual TLS use the gRPC port's PEM files.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

import uvicorn

from server.config import ServerConfig
from server.openai.edge import HttpEdge
from server.openai.routes import build_app
from server.runtime import Runtime

log = logging.getLogger(__name__)

# Calls still running once the drain's grace is over get this long before they are cancelled.
CANCEL_AFTER_S = 0.5


def uvicorn_config(config: ServerConfig, app: HttpEdge) -> uvicorn.Config:
    tls = {}
    if config.tls_enabled:
        tls = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
        if config.tls_client_ca is not None:
            tls |= {"ssl_ca_certs": str(config.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    # Logging stays ours (log_config=None); request lines come from the app's own logs.
    return uvicorn.Config(app, host=config.host, port=config.http_port, lifespan="off",
                          log_config=None, access_log=False,
                          timeout_graceful_shutdown=CANCEL_AFTER_S, **tls)


class HttpFront:
    """The OpenAI-compatible HTTP server over `runtime`; start, drain and stop from one loop."""

    def __init__(self, config: ServerConfig, runtime: Runtime) -> None:
        self.edge = HttpEdge(build_app(runtime), config.max_request_bytes, runtime)
        self.config = config
        self._server = uvicorn.Server(uvicorn_config(config, self.edge))
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind and serve; returns the bound port (useful with port 0)."""
        server, uv_config = self._server, self._server.config
        try:
            uv_config.load()
            server.lifespan = uv_config.lifespan_class(uv_config)
            await server.startup()
        except SystemExit:  # uvicorn exits the process when it cannot bind
            raise OSError(f"cannot bind the HTTP port {self.config.host}:"
                          f"{self.config.http_port}") from None
        except ssl.SSLError as e:
            raise ValueError(f"cannot serve HTTPS with {self.config.tls_cert} and "
                             f"{self.config.tls_key}: {e}") from e
        self._ticker = asyncio.create_task(server.main_loop())
        return int(server.servers[0].sockets[0].getsockname()[1])

    def begin(self) -> None:
        self.edge.begin()

    @property
    def in_flight(self) -> int:
        return self.edge.in_flight

    async def drained(self, timeout: float) -> bool:
        return await self.edge.drained(timeout)

    async def stop(self) -> None:
        """Close the port and the connections; requests still running are cancelled."""
        if self._ticker is None:
            return
        self._server.should_exit = True
        await self._ticker
        await self._server.shutdown()
        self._ticker = None


__all__ = ["HttpFront"]
