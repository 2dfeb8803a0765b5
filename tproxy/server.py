"""The I/O shell: listeners, client and upstream connections, flow control.

This is the only module that touches sockets. Protocol decisions come from the pure core
(``tproxy.http1`` and the policy modules); here bytes move between transports with back-pressure:
when one side's write buffer passes its high-water mark the other side stops reading, so a fast
origin and a slow client never buffer a whole response in the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tproxy import netutil
from tproxy.accesslog import AccessLog, AccessRecord
from tproxy.config import Config

log = logging.getLogger("tproxy.server")

# Per-direction buffering: above HIGH the reading side is paused until the writer drains to LOW.
WRITE_BUFFER_HIGH = 256 * 1024
WRITE_BUFFER_LOW = 64 * 1024
# Bytes a client may send before its upstream connection is up (then reading pauses).
PENDING_LIMIT = 256 * 1024
# How often idle deadlines are checked: one sweep for all connections is cheaper than a timer
# per connection at 10,000 idle keep-alive clients.
SWEEP_INTERVAL = 1.0


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    connections_total: int = 0
    connections_active: int = 0
    requests_total: int = 0
    bytes_from_clients: int = 0
    bytes_to_clients: int = 0
    upstream_errors: int = 0


def addr_host(addr: tuple[Any, ...]) -> str:
    return str(addr[0])


def format_hostport(addr: tuple[Any, ...]) -> str:
    host = str(addr[0])
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


class Endpoint(asyncio.Protocol):
    """One side of a relay: forwards what it reads to ``peer`` and obeys its back-pressure."""

    def __init__(self, relay: Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.peer: Endpoint | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.eof = False
        self.closed = False
        self.paused_reading = False
        self.bytes_in = 0

    # asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)
        if self.name == "client":
            self.relay.client_connected(transport)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.relay.touch()
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.write(data)
            return
        # The peer is not connected yet (or uvloop delivered data after pause_reading(),
        # DESIGN.md §3): keep it, bounded.
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > PENDING_LIMIT:
            self.pause()

    def eof_received(self) -> bool:
        self.eof = True
        self.relay.on_eof(self)
        # Keep the transport open for the other direction (TCP half-close).
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.on_lost(self, exc)

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume()

    # control ------------------------------------------------------------------------------

    def pause(self) -> None:
        if not self.paused_reading and self.transport is not None and not self.closed:
            self.paused_reading = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused_reading and self.transport is not None and not self.closed:
            self.paused_reading = False
            self.transport.resume_reading()

    def flush_pending_to(self, peer: Endpoint) -> None:
        if self.pending and peer.transport is not None:
            peer.transport.write(b"".join(self.pending))
        self.pending.clear()
        self.pending_size = 0
        self.resume()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


class Relay:
    """An opaque byte tunnel between a client and the origin it was going to.

    Used for everything on an intercepted port until the HTTP engine claims it, and for what is
    not HTTP (RFC 9110 §7.8 Upgrade, other protocols on port 80).
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.client = Endpoint(self, "client")
        self.upstream = Endpoint(self, "upstream")
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        self.peername: tuple[Any, ...] = ("", 0)
        self.sockname: tuple[Any, ...] = ("", 0)
        self.last_activity = time.monotonic()
        self.started = time.time()
        self.done = False
        self.connect_task: asyncio.Task[None] | None = None
        self.status = 200
        self.result = "TCP_TUNNEL"

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def idle_for(self, now: float) -> float:
        return now - self.last_activity

    def client_connected(self, transport: asyncio.Transport) -> None:
        # TPROXY keeps the original destination as the accepted socket's local address.
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.accepted(self)
        self.start()

    def start(self) -> None:
        self.connect_task = asyncio.get_running_loop().create_task(
            self._connect(), name=f"connect {format_hostport(self.sockname)}"
        )

    async def _connect(self) -> None:
        server = self.server
        cfg = server.cfg.proxy
        dst = self.sockname
        family = socket.AF_INET6 if ":" in str(dst[0]) else socket.AF_INET
        source = addr_host(self.peername) if cfg.transparent_upstream else None
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        try:
            sock = netutil.upstream_socket(family, source)
            await asyncio.wait_for(loop.sock_connect(sock, dst[:2]), cfg.connect_timeout)
            await loop.create_connection(lambda: self.upstream, sock=sock)
            sock = None
        except (OSError, TimeoutError) as exc:
            if sock is not None:
                sock.close()
            server.stats.upstream_errors += 1
            self.status = 504 if isinstance(exc, TimeoutError) else 502
            self.result = "TCP_TUNNEL_ABORTED"
            log.info(
                "upstream %s for %s: %s",
                format_hostport(dst),
                addr_host(self.peername),
                exc.__class__.__name__ if isinstance(exc, TimeoutError) else exc,
            )
            # A transparent proxy must look like the network: a refused or unreachable origin
            # shows up to the client as a reset, as it would without us.
            self.client.abort()
            return
        self.client.flush_pending_to(self.upstream)
        if self.client.eof and self.upstream.transport is not None:
            self.upstream.transport.write_eof()

    def on_eof(self, side: Endpoint) -> None:
        peer = side.peer
        if peer is None or peer.transport is None or peer.closed:
            if side is self.client and self.upstream.transport is None:
                return  # still connecting: _connect forwards the EOF
            self.close()
            return
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer.eof:
            self.close()

    def on_lost(self, side: Endpoint, exc: Exception | None) -> None:
        peer = side.peer
        if peer is not None and not peer.closed:
            if exc is not None:
                peer.abort()
            else:
                # Let queued bytes drain to the other side, then close it.
                peer.close()
        if side is self.client and self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        if self.client.closed and (self.upstream.closed or self.upstream.transport is None):
            self.finish()

    def close(self) -> None:
        self.client.close()
        self.upstream.close()

    def abort(self) -> None:
        self.client.abort()
        self.upstream.abort()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        server = self.server
        server.stats.bytes_from_clients += self.client.bytes_in
        server.stats.bytes_to_clients += self.upstream.bytes_in
        server.connection_done(self)
        dst = self.sockname
        server.access(
            AccessRecord(
                start=self.started,
                elapsed_ms=int((time.time() - self.started) * 1000),
                client=addr_host(self.peername),
                result=self.result,
                status=self.status,
                size=self.upstream.bytes_in,
                method="CONNECT",
                url=format_hostport(dst),
                hierarchy="HIER_DIRECT",
                peer=addr_host(dst),
                content_type="-",
            )
        )


Connection = Relay


class Server:
    """Owns the listeners and every live connection."""

    def __init__(self, cfg: Config, access_log: AccessLog) -> None:
        self.cfg = cfg
        self.access_log = access_log
        self.stats = Stats()
        self.connections: set[Connection] = set()
        self.listeners: list[asyncio.AbstractServer] = []
        self.sweeper: asyncio.Task[None] | None = None
        self.on_change: Callable[[], None] | None = None

    def access(self, record: AccessRecord) -> None:
        self.stats.requests_total += 1
        self.access_log.write(record)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        families = [socket.AF_INET]
        if self.cfg.proxy.ipv6 and socket.has_ipv6:
            families.append(socket.AF_INET6)
        for family in families:
            sock = netutil.transparent_listener(family, self.cfg.proxy.listen_port)
            srv = await loop.create_server(
                self._accept_factory, sock=sock, backlog=netutil.LISTEN_BACKLOG
            )
            self.listeners.append(srv)
        self.sweeper = loop.create_task(self._sweep(), name="idle sweeper")

    def _accept_factory(self) -> asyncio.Protocol:
        return Relay(self).client

    def accepted(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.stats.connections_total += 1
        self.stats.connections_active += 1

    def connection_done(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.stats.connections_active -= 1

    async def _sweep(self) -> None:
        idle = self.cfg.proxy.idle_timeout
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for conn in list(self.connections):
                if idle and conn.idle_for(now) > idle:
                    log.debug("idle timeout for %s", format_hostport(conn.peername))
                    conn.close()

    def close_listeners(self) -> None:
        for srv in self.listeners:
            srv.close()
        self.listeners.clear()

    async def drain(self, timeout: float) -> None:
        """Wait for live connections to finish (graceful stop), then cut the rest."""
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        await asyncio.sleep(0)

    async def stop(self) -> None:
        self.close_listeners()
        if self.sweeper is not None:
            self.sweeper.cancel()
            try:
                await self.sweeper
            except asyncio.CancelledError:
                pass
            self.sweeper = None
