"""The HTTP edge: what runs the app under uvicorn with ServeConfig's limits, and what every answer carries.

uvicorn's own settings where it has them: `limit_concurrency` (max_connections: 503 beyond), `timeout_keep_alive`,
`timeout_graceful_shutdown`. What it lacks is added here: a header read timeout (uvicorn never times out a
connection that stalls mid-headers; `HeaderTimeoutH11Protocol`), and a shutdown that gives running requests
`shutdown_grace_s` and then ends their streams with a clear final event (`GracefulServer`). The body read timeout
is the app's (app._read_body: 408).
"""
from __future__ import annotations

import re
import uuid

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from fastgen.serve.config import ServeConfig

REQUEST_ID = b"x-request-id"
_SAFE_ID = re.compile(rb"[\x21-\x7e]{1,128}")


class RequestIdMiddleware:
    """Every response carries `x-request-id`: the client's (if it is a short printable token) or a new one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID, b"")
        request_id = given if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex.encode()

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REQUEST_ID, request_id)]
            await send(message)
        await self.app(scope, receive, send_with_id)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that has not sent a complete request head within
    `header_timeout_s` of connecting or of its previous response (a stalled or slowloris client)."""

    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:      # the request head is complete
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection that sent no complete request head in %ss", self.header_timeout_s)
            self.transport.close()


class GracefulServer(uvicorn.Server):
    """On shutdown, new requests are refused and running ones get shutdown_grace_s to finish; then their streams
    end with an error event (code server_shutdown) and [DONE], and uvicorn closes what is left."""

    def __init__(self, config: uvicorn.Config, grace_s: float):
        super().__init__(config)
        self.grace_s = grace_s

    async def shutdown(self, sockets=None) -> None:
        server = _fastgen_server(self.config.loaded_app)
        if server is not None:
            server.loop.begin_shutdown(self.grace_s)
        await super().shutdown(sockets)


def _fastgen_server(app):
    """The app's fastgen Server, under uvicorn's middleware wrappers."""
    while app is not None:
        state = getattr(app, "state", None)
        if state is not None and hasattr(state, "server"):
            return state.server
        app = getattr(app, "app", None)
    return None


def uvicorn_server(app, cfg: ServeConfig, **overrides) -> GracefulServer:
    """A uvicorn server for `app` with cfg's edge limits (`overrides`: further uvicorn.Config arguments)."""
    protocol = type("FastgenH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": cfg.header_timeout_s})
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, http=protocol, limit_concurrency=cfg.max_connections,
                            timeout_graceful_shutdown=int(cfg.shutdown_grace_s) + 5, **overrides)
    return GracefulServer(config, cfg.shutdown_grace_s)

