"""The HTTP edge: what runs the app under uvicorn with ServeConfig's limits, and what every answer carries.

uvicorn's own settings where it has them: `timeout_keep_alive`, `timeout_graceful_shutdown`, no `server` header.
What it lacks is added here:
- a header read timeout (uvicorn never times out a connection that stalls mid-headers; `HeaderTimeoutH11Protocol`);
- `max_connections` counts requests in the app (`AdmissionLimit`, 503 beyond), not open connections: uvicorn's
  `limit_concurrency` counts every connection, so a slowloris (a request line, a Host header, then a byte every
  2 s, re-opened when closed) took every slot;
- connections that have not yet sent a whole request head, or a whole body, bounded apart (`ConnectionGuard`): at
  most `max_pending_connections` and `max_pending_bodies`, and `max_pending_per_client` of each per client address,
  the oldest (once in that phase for longer than `min_rate_grace_s`) closed beyond; a head or body arriving slower
  than `min_data_rate_bytes_s` on average (after `min_rate_grace_s`) is closed;
- a shutdown that gives running requests `shutdown_grace_s` and then ends their streams with a clear final event
  (`GracefulServer`);
- every answer carries `x-request-id`, and an unhandled exception is logged once under it and answered with a
  generic 500 (no exception text); a client gone mid-body is one info line (`RequestIdMiddleware`).
The body read timeout is the app's (app._read_body: 408).
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid

import h11
import uvicorn
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from fastgen.serve.config import ServeConfig

log = logging.getLogger(__name__)
REQUEST_ID = b"x-request-id"
_SAFE_ID = re.compile(rb"[\x21-\x7e]{1,128}")
_SCOPE_KEY = "fastgen.request_id"


def request_id(scope) -> str:
    """The request's id (as its x-request-id header says), for log lines and 5xx bodies."""
    return scope.get(_SCOPE_KEY, b"-").decode()


class RequestIdMiddleware:
    """Every response carries `x-request-id`: the client's (if it is a short printable token) or a new one. An
    exception the app did not answer is logged here once, with the request id, and answered with a generic 500; a
    client that went away is one info line."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID, b"")
        rid = given if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex.encode()
        scope[_SCOPE_KEY] = rid
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (REQUEST_ID, rid)]
            await send(message)
        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            log.info("request %s: the client went away", rid.decode())
        except Exception as e:
            log.error("request %s: internal error", rid.decode(), exc_info=e)
            if not started:
                body = json.dumps({"error": {
                    "message": f"internal server error; the server log has the details under request id "
                               f"{rid.decode()}", "type": "server_error", "param": None, "code": None}}).encode()
                await send_with_id({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send_with_id({"type": "http.response.body", "body": body})


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


class AdmissionLimit:
    """At most `limit` requests in the app at once (503 beyond): requests whose head is complete, not connections.
    (uvicorn's limit_concurrency counts every open connection, so slowloris connections that never finish a head
    took every slot; those are ConnectionGuard's.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            log.warning("503: %d requests in the app, the limit max_connections", self.active)
            body = json.dumps({"error": {"message": f"the server is at its limit max_connections={self.limit}; "
                                                    "retry later", "type": "server_error", "param": None,
                                         "code": "too_many_connections"}}).encode()
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        # a request is counted once its body is in (before, ConnectionGuard bounds it as a pending body)
        headers = dict(scope.get("headers", ()))
        counted = headers.get(b"content-length", b"0") in (b"0", b"") and b"transfer-encoding" not in headers
        if counted:
            self.active += 1

        async def receive_counted():
            nonlocal counted
            message = await receive()
            if not counted and message["type"] == "http.request" and not message.get("more_body", False):
                self.active += 1
                counted = True
            return message
        try:
            await self.app(scope, receive_counted, send)
        finally:
            if counted:
                self.active -= 1


class ConnectionGuard:
    """The connections of one server that are still sending a request head ("head": new, idle keep-alive, or
    mid-head) or a body ("body"), in the order they entered that phase, overall and per client address. Beyond a
    bound the oldest in that phase is closed (a well-behaved client's head or body takes milliseconds, so it is
    never the oldest for long); a sweep every SWEEP_S closes those below the minimum data rate."""

    SWEEP_S = 0.25
    REPORT_S = 10.0

    def __init__(self, cfg: ServeConfig):
        self.caps = {"head": cfg.max_pending_connections, "body": cfg.max_pending_bodies}
        self.per_client = cfg.max_pending_per_client
        self.min_rate = cfg.min_data_rate_bytes_s
        # A connection is never closed for a bound before the grace a slow one gets: a burst of clients that connect
        # at once (64 streams from one benchmark client) must not close one another while a busy server has not yet
        # read their heads. The bounds still hold the excess for at most that long; no new connection is refused.
        self.grace_s = cfg.min_rate_grace_s
        self.phases: dict[str, dict] = {"head": {}, "body": {}}
        self.clients: dict[str, dict[str, dict]] = {"head": {}, "body": {}}
        self.closed = {"cap": 0, "client cap": 0, "slow": 0}
        self._sweeper = None
        self._reported = time.monotonic()

    def enter(self, conn: "GuardedH11Protocol", phase: str) -> None:
        self.leave(conn)
        conn._phase, conn._phase_start, conn._phase_bytes = phase, time.monotonic(), 0
        conn._rate_clock = phase == "body"     # a head's clock starts with its first byte (idle keep-alive is not slow)
        self.phases[phase][conn] = None
        mine = self.clients[phase].setdefault(conn.client_host, {})
        mine[conn] = None
        if len(mine) > self.per_client:
            self._close_oldest(mine, "client cap")
        if len(self.phases[phase]) > self.caps[phase]:
            self._close_oldest(self.phases[phase], "cap")
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(self.SWEEP_S, self._sweep, conn.loop)

    def leave(self, conn: "GuardedH11Protocol") -> None:
        phase = getattr(conn, "_phase", None)
        if phase is None:
            return
        conn._phase = None
        self.phases[phase].pop(conn, None)
        mine = self.clients[phase].get(conn.client_host)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self.clients[phase][conn.client_host]

    def first_byte(self, conn: "GuardedH11Protocol") -> None:
        """A head's first byte: its rate clock starts, and it is the newest of its phase."""
        phase = conn._phase
        for group in (self.phases[phase], self.clients[phase].get(conn.client_host, {})):
            group.pop(conn, None)
            group[conn] = None
        conn._phase_start, conn._rate_clock = time.monotonic(), True

    def _close_oldest(self, group: dict, why: str) -> None:
        oldest = next(iter(group))
        if time.monotonic() - oldest._phase_start >= self.grace_s:
            self._close(oldest, why)

    def _close(self, conn: "GuardedH11Protocol", why: str) -> None:
        log.debug("closing a connection from %s still sending its %s (%s)", conn.client_host, conn._phase, why)
        self.leave(conn)
        self.closed[why] += 1
        conn.transport.close()

    def _sweep(self, loop) -> None:
        self._sweeper = None
        now = time.monotonic()
        for phase in ("head", "body"):
            for conn in list(self.phases[phase]):
                elapsed = now - conn._phase_start
                if conn._rate_clock and elapsed > self.grace_s and conn._phase_bytes < self.min_rate * elapsed \
                        and not conn.flow.read_paused:       # paused: the app is not reading, not the client
                    self._close(conn, "slow")
        if now - self._reported > self.REPORT_S and any(self.closed.values()):
            log.warning("closed connections still sending a request head or body in the last %.0f s: %s",
                        now - self._reported, ", ".join(f"{n} ({why})" for why, n in self.closed.items() if n))
            self.closed = dict.fromkeys(self.closed, 0)
            self._reported = now
        if self.phases["head"] or self.phases["body"]:
            self._sweeper = loop.call_later(self.SWEEP_S, self._sweep, loop)


class GuardedH11Protocol(HeaderTimeoutH11Protocol):
    """HeaderTimeoutH11Protocol whose head and body phases are bounded by the server's ConnectionGuard."""

    guard: ConnectionGuard
    client_host = "unknown"
    _phase: str | None = None           # "head", "body", or None (admitted, or closed)
    _phase_start = 0.0
    _phase_bytes = 0
    _rate_clock = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.client_host = self.client[0] if self.client else "unknown"
        self.guard.enter(self, "head")

    def data_received(self, data: bytes) -> None:
        if self._phase == "head" and not self._rate_clock:
            self.guard.first_byte(self)
        if self._phase is not None:
            self._phase_bytes += len(data)
        super().data_received(data)
        self._follow_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._follow_state()

    def connection_lost(self, exc) -> None:
        self.guard.leave(self)
        super().connection_lost(exc)

    def _follow_state(self) -> None:
        state = self.conn.their_state
        if self.transport.is_closing():
            self.guard.leave(self)
        elif state is h11.IDLE:
            if self._phase != "head":
                self.guard.enter(self, "head")
        elif state is h11.SEND_BODY:
            if self._phase != "body":
                self.guard.enter(self, "body")
        else:                                   # the request is all in: admitted (or the connection failed)
            self.guard.leave(self)


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
    protocol = type("FastgenH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": cfg.header_timeout_s,
                                                                  "guard": ConnectionGuard(cfg)})
    # requests still sending their body are in the app: they get room of their own on top of max_connections
    limited = AdmissionLimit(app, cfg.max_connections + cfg.max_pending_bodies)
    config = uvicorn.Config(limited, host=cfg.host, port=cfg.port, http=protocol, limit_concurrency=None,
                            timeout_graceful_shutdown=int(cfg.shutdown_grace_s) + 5, server_header=False,
                            **overrides)
    return GracefulServer(config, cfg.shutdown_grace_s)

