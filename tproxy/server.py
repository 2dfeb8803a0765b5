"""The I/O shell's top: listeners, the upstream pool, timeouts, statistics.

Per-connection byte handling is in :mod:`tproxy.httpconn`; this module accepts connections from
the transparent listeners, opens upstream connections with the client's source address, and runs
one sweep a second that enforces every connection's deadline (cheaper than a timer per
connection when 10,000 idle keep-alive clients are connected).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tproxy import http1, netutil
from tproxy.accesslog import AccessLog, AccessRecord
from tproxy.config import Config
from tproxy.httpconn import (
    TUNNEL,
    ClientConnection,
    Exchange,
    Pool,
    Upstream,
    open_connection,
    out_of_resources,
)
from tproxy.limits import DAEMON_KEY, Limiter, LimitsConfig, LogThrottle, Refusal

log = logging.getLogger("tproxy.server")

SWEEP_INTERVAL = 1.0


# A hook returns True when it answered the request (or response) itself.
RequestHook = Callable[[ClientConnection, Exchange], bool]
ResponseHook = Callable[[ClientConnection, Exchange, http1.ResponseHead], bool]
UpstreamHook = Callable[[ClientConnection, Exchange, Upstream], None]


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    connections_total: int = 0
    connections_active: int = 0
    requests_total: int = 0
    bad_requests: int = 0
    upstream_errors: int = 0
    upstream_connects: int = 0
    # Client-side bytes of closed connections (live ones keep their own counts).
    bytes_in: int = 0
    bytes_out: int = 0
    # Response bodies relayed in the kernel (tproxy.splice), and their bytes.
    spliced_bodies: int = 0
    spliced_bytes: int = 0


class Server:
    """Owns the listeners and every live connection."""

    def __init__(self, cfg: Config, access_log: AccessLog) -> None:
        self.cfg = cfg
        self.access_log = access_log
        self.stats = Stats()
        self.limits = http1.Limits()
        self.pool = Pool()
        self.limiter = Limiter(cfg.section("limits", LimitsConfig))
        # Per-connection diagnostics, at most one line per client and kind per log_interval.
        self.log_throttle = LogThrottle(self.limiter.cfg.log_interval)
        self.connections: set[ClientConnection] = set()
        self.listeners: list[asyncio.AbstractServer] = []
        self.sweeper: asyncio.Task[None] | None = None
        self.draining = False
        # Policy hooks, called in order (filter before cache); the first that answers wins.
        self.request_hooks: list[RequestHook] = []
        self.response_hooks: list[ResponseHook] = []
        # Called when an upstream connection is bound to an exchange (shaping marks uploads).
        self.upstream_hooks: list[UpstreamHook] = []

    # -- bookkeeping ----------------------------------------------------------------------

    def access(self, record: AccessRecord) -> None:
        self.stats.requests_total += 1
        self.access_log.write(record)

    def access_skipped(self) -> bool:
        """With the access log off, count the exchange and tell the caller to build no record
        (an AccessRecord per exchange is ~3% of the 1 KiB keep-alive path)."""
        if self.access_log.enabled:
            return False
        self.stats.requests_total += 1
        return True

    # -- limits (DDoS defence): one client must not take browsing away from the others -----

    def admit(self, conn: ClientConnection) -> bool:
        """May this new connection be served? Refusals are logged once per client and interval."""
        key = self.limiter.client_key(conn.client_ip)
        now = time.monotonic()
        refusal = self.limiter.on_accept(key, now)
        if refusal is None:
            conn.limit_key = key
            return True
        self.note_refusal(key, refusal, now)
        return False

    def apply_limits(self, cfg: LimitsConfig, now: float) -> None:
        """Adopt a reloaded ``[limits]``: the limiter keeps its counts and buckets
        (:meth:`Limiter.reconfigure`), and the diagnostics throttle takes the new
        log_interval here, once, instead of on every throttled line."""
        self.limiter.reconfigure(cfg, now)
        self.log_throttle.interval = cfg.log_interval

    def limit_request(self, conn: ClientConnection) -> Refusal | None:
        limiter = self.limiter
        # Fast path, taken on every request with limits off or without a request rate: then
        # on_request() could only refuse above the ceiling (after a reload lowered it). Two
        # attribute tests, no clock read or client lookup: this runs once per proxied request.
        if not limiter.limits_requests and limiter.active <= limiter.ceiling:
            return None
        key = conn.limit_key
        if key is None:
            return None
        now = time.monotonic()
        refusal = self.limiter.on_request(key, now)
        if refusal is not None:
            self.note_refusal(key, refusal, now)
        return refusal

    def note_refusal(self, key: str, refusal: Refusal, now: float) -> None:
        if self.limiter.should_log(key, refusal.kind, now):
            log.warning("limit: %s refused: %s (further refusals of it logged once per interval)",
                        key, refusal.reason)  # fmt: skip

    def log_throttled(
        self, logger: logging.Logger, key: str, kind: str, level: int, msg: str, *args: object
    ) -> None:
        """``logger.log(level, msg, *args)`` unless ``key`` logged a ``kind`` line less than
        log_interval ago; the next line says how many were held back meanwhile."""
        if not logger.isEnabledFor(level):
            return
        held = self.log_throttle.allow((key, kind), time.monotonic())
        if held is None:
            return
        if held:
            msg += " (%d more like it since the last such line)"
            args = (*args, held)
        logger.log(level, msg, *args)

    def client_log(
        self, logger: logging.Logger, conn: ClientConnection, kind: str, msg: str, *args: object
    ) -> None:
        """An info line about what one client's connection did, throttled per client."""
        key = conn.limit_key or self.limiter.client_key(conn.client_ip)
        self.log_throttled(logger, key, kind, logging.INFO, msg, *args)

    def release(self, conn: ClientConnection) -> None:
        if conn.limit_key is not None:
            self.limiter.on_close(conn.limit_key, time.monotonic())
            conn.limit_key = None

    @property
    def overloaded(self) -> bool:
        return self.limiter.overloaded

    def accepted(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        self.stats.connections_total += 1
        self.stats.connections_active += 1

    def connection_done(self, conn: ClientConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.stats.connections_active -= 1
            self.stats.bytes_in += conn.bytes_in
            self.stats.bytes_out += conn.bytes_out

    # -- upstream -------------------------------------------------------------------------

    def source_for(self, conn: ClientConnection) -> str | None:
        """Full transparency keeps the client's address as the upstream source."""
        return conn.client_ip if self.cfg.proxy.transparent_upstream else None

    def upstream_key(self, conn: ClientConnection, dst: tuple[Any, ...]) -> tuple[Any, ...]:
        # The client is part of the key even when the source address is the gateway's: a
        # connection an origin answered one client on may still carry a late byte of that
        # answer, and an origin may tie state to a connection; neither may reach another client.
        return (dst[0], dst[1], self.source_for(conn), conn.client_ip)

    async def connect_upstream(self, conn: ClientConnection, dst: tuple[Any, ...]) -> Upstream:
        self.stats.upstream_connects += 1
        loop = asyncio.get_running_loop()
        try:
            return await open_connection(
                loop,
                self.pool,
                self.upstream_key(conn, dst),
                dst,
                self.source_for(conn),
                0,
                self.cfg.proxy.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            self.stats.upstream_errors += 1
            if out_of_resources(exc):
                soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
                self.log_throttled(
                    log, DAEMON_KEY, "resources", logging.WARNING,
                    "out of file descriptors or socket memory (%s; RLIMIT_NOFILE %d, %d client"
                    " connections): requests get 503; raise LimitNOFILE or lower"
                    " limits.max_connections",
                    exc.strerror, soft,
                    len(self.connections),
                )  # fmt: skip
            else:
                self.client_log(
                    log, conn, "connect", "connect to %s for %s failed: %r", dst[0],
                    conn.client_ip, exc,
                )  # fmt: skip
            raise

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        families = [socket.AF_INET]
        if self.cfg.proxy.ipv6 and socket.has_ipv6:
            families.append(socket.AF_INET6)
        for family in families:
            sock = netutil.transparent_listener(family, self.cfg.proxy.listen_port)
            srv = await loop.create_server(
                lambda: ClientConnection(self), sock=sock, backlog=netutil.LISTEN_BACKLOG
            )
            self.listeners.append(srv)
        self.sweeper = loop.create_task(self._sweep(), name="deadline sweeper")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        idle = self.cfg.proxy.idle_timeout
        for conn in list(self.connections):
            try:
                if conn.deadline and now > conn.deadline:
                    conn.on_deadline()
                elif idle and now - conn.last_activity > idle:
                    log.debug("idle timeout for %s", conn.client_ip)
                    conn.abort()
            except Exception:  # one connection's failure must not stop the sweep
                log.exception("timeout handling for %s failed", conn.client_ip)
                conn.abort()
        if idle:
            self.pool.sweep(now, idle)

    def close_listeners(self) -> None:
        for srv in self.listeners:
            srv.close()
        self.listeners.clear()

    async def drain(self, timeout: float) -> None:
        """Graceful stop: finish exchanges in flight, close idle keep-alive connections."""
        self.draining = True
        self.pool.close_all()
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            for conn in list(self.connections):
                if conn.exchange is None and conn.state != TUNNEL and conn.connecting is None:
                    conn.close()
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        await asyncio.sleep(0)

    async def stop(self) -> None:
        self.close_listeners()
        self.pool.close_all()
        if self.sweeper is not None:
            self.sweeper.cancel()
            try:
                await self.sweeper
            except asyncio.CancelledError:
                pass
            self.sweeper = None
