"""Per-connection HTTP shell: moves bytes between a client, the pure HTTP core and the origin.

Decisions live in the pure core: framing and strictness in :mod:`tproxy.http1`; what to do with a
request (filter, cache) in the policy hooks the server passes in. This module only feeds bytes in
and writes bytes out, with back-pressure in both directions:

* the client's reading pauses while the upstream write buffer is above its high-water mark (or
  while the upstream connection is still being opened and the pending bytes pass a limit);
* the origin's reading pauses while the client's write buffer is above its high-water mark, so a
  fast origin and a slow client never buffer a whole response in the daemon.

Connections that are not HTTP (the first bytes do not look like a request line) and connections
that switch protocols (101, RFC 9110 §7.8) become opaque tunnels between the same two sockets.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import html
import logging
import re
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, cast

from tproxy import http1, netutil
from tproxy.accesslog import AccessRecord
from tproxy.http1 import (
    Body,
    EndOfMessage,
    Framing,
    Informational,
    ProtocolError,
    RequestHead,
    ResponseHead,
    Sniff,
    Tunnel,
)
from tproxy.splice import SPLICE_MIN, BodySplice
from tproxy.uri import bracket, effective_url, media_type

if TYPE_CHECKING:
    from tproxy.server import Server

log = logging.getLogger("tproxy.http")

# Per-direction buffering: above HIGH the other side stops reading until this one drains to LOW.
WRITE_BUFFER_HIGH = 256 * 1024
WRITE_BUFFER_LOW = 64 * 1024
# Bytes held for a peer that is not connected yet (or while a pipelined request waits); above
# this the producing side stops reading.
PENDING_LIMIT = 256 * 1024
# Body pieces up to this size are joined to the bytes before them (held head, chunk header)
# and sent with one write; larger ones go out as a gather write without the copy.
COALESCE_LIMIT = 8 * 1024
# SO_LINGER on, timeout 0: close() sends a reset instead of a FIN.
LINGER_RESET = struct.pack("ii", 1, 0)
# A request answered by the proxy itself before its body arrived: a body up to this size is read
# and dropped so the connection stays usable; a larger (or chunked) one closes it.
DISCARD_LIMIT = 64 * 1024
# Bytes kept while deciding whether a connection speaks HTTP.
SNIFF_LIMIT = 64
# A client that sends nothing this long may be speaking a server-first protocol (the origin
# talks first): it gets an opaque tunnel instead of waiting for a request that never comes.
SNIFF_TIMEOUT = 2.0
# socket()/connect() failing for lack of the daemon's own resources (getrlimit(2) RLIMIT_NOFILE,
# the system file table, kernel memory): the proxy is overloaded, the origin is not at fault.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def out_of_resources(exc: BaseException) -> TypeGuard[OSError]:
    """Whether ``exc`` is the daemon running out of its own resources (RESOURCE_ERRNOS)."""
    return isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS


# Retry-After (RFC 9110 §10.2.3) of the 503 a request gets while the daemon is out of file
# descriptors: by then connections have closed (each such 503 closes its own).
RETRY_AFTER_RESOURCES = 1
# Idle upstream connections kept per (destination, source) and in all.
POOL_PER_KEY = 32
POOL_TOTAL = 2048
# Orphaned upstreams (a response read on after its client left or was answered elsewhere; see
# Upstream.orphan): without a sink, a rest larger than ORPHAN_DRAIN_MAX is not worth reading to
# reuse the connection; with one (the cache storing it), reading stops when the sink no longer
# wants the bytes. None lives longer than ORPHAN_MAX_AGE however it trickles, and at most
# ORPHANS_MAX exist at once: beyond that a response nobody relays is cut off at once.
ORPHAN_DRAIN_MAX = 256 * 1024
ORPHAN_MAX_AGE = 600.0
ORPHANS_MAX = 256
_INT_ZERO = struct.pack("i", 0)  # an ioctl's int argument / answer of 0 (Upstream.clean)

# Client connection states.
SNIFF = 0  # waiting for enough bytes to tell HTTP from anything else
HEAD = 1  # waiting for (the rest of) a request head
EXCHANGE = 2  # a request is being forwarded / answered
TUNNEL = 3  # opaque relay
CLOSING = 4
LINGER = 5  # answered and half-closed; reading and dropping the rest of an upload

# RFC 9112 §9.6 "close in stages": after answering a request whose body was not read to its
# end, we half-close and keep reading (and dropping) what the client still sends, so that a
# client busy uploading gets no reset (which breaks its send, and on some stacks discards the
# answer it has not read yet) before it reads the answer.  Bounded like nginx's lingering
# close: this long without a byte, and this long in all.
LINGER_IDLE = 2.0
LINGER_TIME = 30.0

ERROR_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


# RFC 9110 §6.6.1: a recipient with a clock MUST add a Date to a response it forwards without
# one. Found in the head's raw field lines (strict parsing already refused whitespace before a
# colon), which is cheaper than lower-casing every field name of every response.
_DATE_FIELD = re.compile(rb"\r\ndate:", re.IGNORECASE)
_http_date: tuple[int, bytes] = (0, b"")


def has_date(head: ResponseHead) -> bool:
    wire = head.wire
    if wire is not None and wire[0] is head.headers:
        return _DATE_FIELD.search(wire[2]) is not None
    return any(name.lower() == b"date" for name, _ in head.headers)


def http_date() -> bytes:
    """Now as an IMF-fixdate (RFC 9110 §5.6.7), formatted once per second."""
    global _http_date
    now = int(time.time())
    if _http_date[0] != now:
        _http_date = (now, http1.format_http_date(now))
    return _http_date[1]


# Exchange.notes key: a hook that must see every response head, whether it comes from the
# origin or is answered here from the cache (the filter's response rules), stores a callable
# (conn, ex, status, headers, content_length) -> bool under it; True: it has answered the
# request itself (a block page), and the stored response must not be sent.
RESPONSE_CHECK = "response-check"


def error_response(
    status: int,
    detail: str,
    keep_alive: bool = False,
    headers: Sequence[tuple[str, str]] = (),
    head_only: bool = False,
) -> bytes:
    """A small HTML error page. Proxies generate these for 4xx/5xx (RFC 9110 §15.5, §15.6).

    ``head_only``: the answer to a HEAD request, which has no content whatever its status
    (RFC 9110 §9.3.2, RFC 9112 §6.3 rule 1): the same head, with the Content-Length the page
    would have, and no page. Sent, the page would be read as the start of the next response."""
    reason = ERROR_REASONS.get(status, "Error")
    body = (
        f"<!DOCTYPE html>\n<html><head><title>{status} {reason}</title></head>\n"
        f"<body><h1>{status} {reason}</h1>\n<p>{html.escape(detail)}</p>\n"
        f"<hr><address>tproxy</address></body></html>\n"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Date: {http_date().decode()}\r\n"  # RFC 9110 §6.6.1: we are the origin of this one
        f"Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Cache-Control: no-store\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in headers)
        + f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    ).encode()
    return head if head_only else head + body


class BodySink(Protocol):
    """Receives a copy of a response body as it streams to the client (the cache's writer)."""

    def data(self, chunk: bytes) -> None: ...
    def end(self, trailers: tuple[tuple[bytes, bytes], ...]) -> None: ...
    def abort(self) -> None: ...
    def wanted(self) -> bool:
        """Whether more of the body is still of use (a store that gave up is not)."""
        ...


class Exchange:
    """One request and its response, as seen by the client connection."""

    __slots__ = (
        "_url",
        "client_keep_alive",
        "ctype",
        "dst_host",
        "extra_headers",
        "head",
        "held",
        "hierarchy",
        "notes",
        "on_finish",
        "request_done",
        "response_framing",
        "response_head",
        "response_started",
        "result",
        "retryable",
        "sent",
        "sink",
        "start",
        "status",
        "upstream",
        "upstream_framing",
    )

    def __init__(self, head: RequestHead, url: str | None = None, dst_host: str = "") -> None:
        self.head = head
        # The URL is built on first use (policy hooks, the access log): with neither, building
        # it per request was wasted. ``dst_host`` (the original destination) stands in for a
        # missing Host field.
        self._url = url
        self.dst_host = dst_host
        self.start = time.time()
        self.upstream: Upstream | None = None
        self.upstream_framing = http1.forward_framing(head)
        self.request_done = False
        self.response_head: ResponseHead | None = None
        self.response_started = False
        # The response head is held until the end of the batch of events it came in, so a
        # framing error right behind it (a bad first chunk) still becomes a clean 502.
        self.held = b""
        self.response_framing = Framing.NONE
        self.client_keep_alive = head.keep_alive
        self.status = 0
        self.sent = 0
        self.result = "TCP_MISS"
        self.hierarchy = "HIER_DIRECT"
        # The access log's content type; None: the response head's media type, read when
        # first asked for (only the access log asks, and it is often off).
        self.ctype: str | None = None
        self.sink: BodySink | None = None
        # Called once when the exchange ends, however it ends (the cache releases waiters).
        self.on_finish: Callable[[Exchange], None] | None = None
        # Fields a hook adds to the forwarded response head (e.g. X-Cache).
        self.extra_headers: list[tuple[bytes, bytes]] = []
        # Per-exchange data of the policy hooks (filter verdict, cache key, shaping class...).
        self.notes: dict[str, Any] = {}
        # RFC 9112 §9.3.1: a request without a body and with an idempotent method may be
        # retried on a new connection when a reused one turns out to be closed.
        self.retryable = head.method in (b"GET", b"HEAD", b"OPTIONS") and (
            head.body_kind is http1.BodyKind.NONE
        )

    @property
    def url(self) -> str:
        url = self._url
        if url is None:
            url = self._url = effective_url(self.head.target, self.head.host, self.dst_host)
        return url

    @url.setter
    def url(self, value: str) -> None:
        self._url = value

    @property
    def content_type(self) -> str:
        """The media type for the access log ("-" when there is none)."""
        ctype = self.ctype
        if ctype is None:
            head = self.response_head
            value = None if head is None else http1.header_value(head.headers, b"content-type")
            ctype = self.ctype = media_type(value) or "-"
        return ctype

    @content_type.setter
    def content_type(self, value: str) -> None:
        self.ctype = value


class _Side(asyncio.Protocol):
    """Reading control shared by both ends of a proxied connection (back-pressure)."""

    transport: asyncio.Transport | None
    paused: bool
    closed: bool

    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()


class Upstream(_Side):
    """A connection to an origin; pooled between requests when both sides allow it."""

    def __init__(self, pool: Pool, key: tuple[Any, ...]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = http1.ResponseParser()
        self.client: ClientConnection | None = None
        self.tunnel = False
        self.closed = False
        self.idle_since = 0.0
        self.used = 0  # requests sent on this connection
        self.got_bytes = False
        self.paused = False
        # Orphaned: the client side no longer wants the rest of this response (it was answered
        # from the cache, or the client left while the response is being stored). The rest is
        # read to its end (into ``orphan_sink`` if any) so the connection can be pooled again.
        self.orphan = False
        self.orphan_keep = False
        self.orphan_sink: BodySink | None = None
        self.orphan_since = 0.0
        self.orphan_bytes = 0
        # Between pause_writing and resume_writing: the origin is not taking what we send, so
        # the client's upload must stay paused (ClientConnection.resume_reading).
        self.write_paused = False
        self.fd = -1
        # The body relay in the kernel while it runs (see ClientConnection.try_splice): the
        # transport must not read meanwhile. ``spliced``: one ran since the connection was
        # last pooled, so what the origin sent behind the body may still be in the kernel.
        self.splice: BodySplice | None = None
        self.spliced = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1

    def orphan_events(self, events: Sequence[http1.Event]) -> None:
        for event in events:
            if isinstance(event, Body):
                sink = self.orphan_sink
                if sink is not None:
                    sink.data(event.data)
                    if not sink.wanted():  # too large to store, or the store failed
                        self.orphan_failed()
                        return
                else:
                    self.orphan_bytes += len(event.data)
                    if self.orphan_bytes > ORPHAN_DRAIN_MAX:
                        self.orphan_failed()
                        return
            elif isinstance(event, EndOfMessage):
                self.orphan = False
                if self.orphan_sink is not None:
                    self.orphan_sink.end(event.trailers)
                    self.orphan_sink = None
                if self.orphan_keep and self.parser.reusable:
                    self.pool.put(self)
                else:
                    self.close()
                return
            else:  # a protocol error, or anything unexpected: the connection is done
                self.orphan_failed()
                return

    def orphan_failed(self) -> None:
        self.orphan = False
        if self.orphan_sink is not None:
            self.orphan_sink.abort()
            self.orphan_sink = None
        self.abort()

    def data_received(self, data: bytes) -> None:
        try:
            self._data_received(data)
        except Exception:
            client = self.client
            if client is not None:
                client.fail_hard("origin data")
            else:
                log.exception("error handling data of an idle upstream connection")
            self.abort()

    def _data_received(self, data: bytes) -> None:
        if self.orphan:
            self.idle_since = time.monotonic()  # still moving: not stalled
            self.orphan_events(self.parser.feed(data))
            return
        client = self.client
        if client is None:
            # An idle pooled connection must not talk (RFC 9112 §9.3.2 unsolicited data):
            # it is unusable now.
            self.close()
            return
        client.touch()
        if self.tunnel:
            client.write(data)
            return
        self.got_bytes = True
        client.on_response_events(self, self.parser.feed(data))
        if self.parser.length_remaining >= SPLICE_MIN:
            client.try_splice(self)

    def eof_received(self) -> bool:
        if self.orphan:
            self.orphan_events(self.parser.feed_eof())
            if self.orphan:
                self.orphan_failed()
            return False
        client = self.client
        if client is None:
            self.close()
            return False
        if self.tunnel:
            client.peer_eof()
            return True
        client.on_response_events(self, self.parser.feed_eof(), eof=True)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.stop_splice()
        self.pool.forget(self)
        if self.orphan:
            self.orphan_failed()
        client = self.client
        if client is not None:
            client.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.client is not None:
            self.client.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.client is not None:
            self.client.resume_reading()

    def clean(self) -> bool:
        """Whether this connection may wait in the pool: everything we sent has left, and the
        origin has sent nothing more. A spliced body leaves what followed it in the kernel,
        unseen by the parser: counted here (FIONREAD, tcp(7) SIOCINQ), such bytes would
        otherwise be read as the next request's response. Only after a splice or while paused
        for back-pressure: otherwise the transport has read all the kernel had and the parser
        saw it, and the ioctl, 2.6 µs in the bench lab, took 8 µs off every keep-alive request
        (cache and lock effects).
        (An origin's close is found by the retry of a stale connection.)"""
        transport = self.transport
        if transport is None or self.closed or transport.get_write_buffer_size():
            return False
        if not (self.spliced or self.paused) or self.fd < 0:
            # (Paused for back-pressure, the transport did not read what came in meanwhile.)
            return True
        self.spliced = False
        try:
            unread = fcntl.ioctl(self.fd, termios.FIONREAD, _INT_ZERO)
        except OSError:
            return False
        return unread == _INT_ZERO

    def resume_reading(self) -> None:
        if self.splice is None:  # the splice resumes it when the body is through
            super().resume_reading()

    def stop_splice(self) -> None:
        """This connection ends during a spliced body: stop the relay, and the client's
        response is cut short with it."""
        sp = self.splice
        if sp is not None:
            self.splice = None
            sp.cancel()
            if self.client is not None and self.client.splice is sp:
                self.client.splice_done_by(self)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        self.stop_splice()
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
        self.pool.forget(self)

    def abort(self) -> None:
        self.stop_splice()
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True
        self.pool.forget(self)


class Pool:
    """Idle upstream connections keyed by (destination, source address, mark).

    The source is part of the key because with full transparency each client's requests must
    leave from its own address: a connection opened for one client is never lent to another.
    """

    def __init__(self) -> None:
        self.idle: dict[tuple[Any, ...], deque[Upstream]] = {}
        self.count = 0
        # Orphaned upstreams reading a response nobody relays (see Upstream.orphan): not in
        # any client connection, so the pool's sweep bounds how long they may stall.
        self.orphans: set[Upstream] = set()

    def take(self, key: tuple[Any, ...]) -> Upstream | None:
        conns = self.idle.get(key)
        while conns:
            up = conns.pop()
            self.count -= 1
            if not conns:
                del self.idle[key]
            if not up.closed:
                return up
        return None

    def put(self, up: Upstream) -> None:
        self.orphans.discard(up)
        if up.closed or self.count >= POOL_TOTAL or not up.clean():
            up.close()
            return
        conns = self.idle.setdefault(up.key, deque())
        if len(conns) >= POOL_PER_KEY:
            up.close()
            return
        up.client = None
        up.idle_since = time.monotonic()
        up.resume_reading()  # notice an origin's close while idle
        conns.append(up)
        self.count += 1

    def forget(self, up: Upstream) -> None:
        self.orphans.discard(up)
        conns = self.idle.get(up.key)
        if conns and up in conns:
            conns.remove(up)
            self.count -= 1
            if not conns:
                del self.idle[up.key]

    def sweep(self, now: float, idle_timeout: float) -> None:
        for key in list(self.idle):
            for up in list(self.idle.get(key, ())):
                if now - up.idle_since > idle_timeout:
                    up.close()
        for up in list(self.orphans):
            if now - up.idle_since > idle_timeout or now - up.orphan_since > ORPHAN_MAX_AGE:
                try:
                    up.orphan_failed()
                except Exception:  # a sink's abort failing must not stop the daemon's sweep
                    log.exception("ending an orphaned upstream failed")
                    self.orphans.discard(up)
                    up.abort()

    def close_all(self) -> None:
        for key in list(self.idle):
            for up in list(self.idle.get(key, ())):
                up.close()
        for up in list(self.orphans):
            up.orphan_failed()


class ClientConnection(_Side):
    """The client side of one intercepted connection."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peername: tuple[Any, ...] = ("", 0)
        self.sockname: tuple[Any, ...] = ("", 0)
        self.client_ip = ""
        self.state = SNIFF
        self.parser = http1.RequestParser(server.limits)
        self.sniff_buf = b""
        self.exchange: Exchange | None = None
        self.upstream: Upstream | None = None  # bound to the current exchange or tunnel
        self.pending: list[bytes] = []  # for an upstream still connecting
        self.pending_size = 0
        self.connecting: asyncio.Task[None] | None = None
        self.paused = False
        self.write_paused = False  # between the transport's pause_writing and resume_writing
        self.closed = False
        self.eof = False
        self.last_activity = time.monotonic()
        self.deadline = 0.0
        self.started = time.time()
        self.bytes_in = 0
        self.bytes_out = 0
        self.tunnel_status = 200
        # A local response body being streamed (cache hit): pulled while the transport drains.
        self.producer: Iterator[bytes] | None = None
        self.producer_ex: Exchange | None = None
        # An exchange answered locally whose request (body) has not ended yet: its remaining
        # body is dropped and the next request waits for its EndOfMessage.
        self.discarding: Exchange | None = None
        self.limit_key: str | None = None  # the limiter's client key while counted
        # The current head's request_timeout is armed (the first head's by sniff()).
        self.head_armed = True
        self.refused = False
        self.opaque = False  # relayed as an opaque tunnel from the first byte
        self.tunnel_logged = False
        self.linger_until = 0.0  # LINGER_TIME's end (in state LINGER)
        self.fd = -1
        self.splice: BodySplice | None = None  # a response body relayed in the kernel

    # -- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        # TPROXY keeps the original destination as the accepted socket's local address.
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        self.client_ip = str(self.peername[0])
        sock = transport.get_extra_info("socket")
        if not self.server.admit(self):
            # Over a limit: refuse at once with a reset (SO_LINGER 0) rather than read, parse
            # and answer — that would be the very work the limit is there to refuse.
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            self.state = CLOSING
            self.refused = True
            transport.abort()
            return
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.fd = sock.fileno()
        self.server.accepted(self)
        self.set_deadline(SNIFF_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        try:
            self._data_received(data)
        except Exception:
            # A bug met by one connection's bytes ends that connection, logged, and nothing
            # else: not the event loop, not the other connections.
            self.fail_hard("client data")

    def fail_hard(self, where: str) -> None:
        log.exception("%s: error handling %s; closing the connection", self.client_ip, where)
        self.drop_upstream(self.upstream)
        self.abort()

    def _data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.last_activity = time.monotonic()
        state = self.state
        if state == TUNNEL:
            self.to_upstream(data)
        elif state == SNIFF:
            self.sniff(data)
        elif state == LINGER:
            self.deadline = min(self.last_activity + LINGER_IDLE, self.linger_until)
        elif state != CLOSING:
            if state == HEAD and not self.head_armed:
                # The next head on a kept-alive connection began: request_timeout from its first
                # byte replaces the keep-alive wait (the slowloris bound sniff() sets up).
                self.head_armed = True
                self.set_deadline(self.server.cfg.proxy.request_timeout)
            self.on_request_events(self.parser.feed(data))

    def eof_received(self) -> bool:
        self.eof = True
        if self.state == LINGER:
            self.close()  # the client is done sending: nothing left to wait for
            return False
        if self.state == TUNNEL:
            up = self.upstream
            if up is not None and up.transport is not None and not up.closed:
                if up.transport.can_write_eof():
                    up.transport.write_eof()
            elif self.connecting is None:
                self.close()
            return True
        if self.state == SNIFF:
            if self.sniff_buf:
                # A few bytes then EOF: nothing HTTP can be made of it; relay them as-is.
                self.start_tunnel(self.sniff_buf)
                return True
            self.close()
            return False
        events = self.parser.feed_eof()
        if events:
            self.on_request_events(events)
        if self.exchange is None and self.state != CLOSING:
            self.close()
            return False
        # Half-close: the response to a complete request may still be on its way.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state = CLOSING
        if self.refused:
            return
        self.stop_splice()
        self.server.release(self)
        if self.opaque:
            self.log_tunnel("TCP_TUNNEL")
        if self.connecting is not None and not self.connecting.done():
            self.connecting.cancel()
        ex = self.exchange
        up = self.upstream
        self.producer = None
        if ex is not None and up is not None and ex.sink is not None and ex.response_head:
            # The client left but the response is being stored (and others may wait for it):
            # read it to the end into the store (RFC 9111 §3.3: only a complete one is kept).
            sink = ex.sink
            ex.sink = None
            self.detach_upstream(ex, sink)
            up = None
        if ex is not None:
            self.log_exchange(ex, aborted=True)
            self.exchange = None
        self.drop_upstream(up)
        self.server.connection_done(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.producer is not None:
            self.pump()
        elif self.upstream is not None:
            self.upstream.resume_reading()

    def resume_reading(self) -> None:
        up = self.upstream
        if up is not None and up.write_paused:
            # The origin is not taking the upload: asyncio reports that once (pause_writing),
            # so reading on would buffer the rest without bound. Its resume_writing resumes.
            return
        super().resume_reading()

    # -- helpers --------------------------------------------------------------------------

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def set_deadline(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds if seconds else 0.0

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            if self.splice is not None:
                # Nothing may overtake a body the kernel is still moving; no path writes
                # during one, so this is a bug, and the connection cannot be trusted.
                log.error("%s: write during a spliced body; closing", self.client_ip)
                self.abort()
                return
            self.bytes_out += len(data)
            self.transport.write(data)

    def write_body(self, head: bytes, data: bytes, chunked: bool) -> None:
        """Response body bytes, behind ``head`` (b"" or the held response head) in one send.

        Above COALESCE_LIMIT the pieces go out as one gather write (uvloop's writelines is a
        single writev) instead of being joined into a copy first; below it the copy is cheaper
        than the gather bookkeeping (measured with uvloop over a socketpair: 1 KiB +0.1 µs,
        64 KiB -1.7 µs per send)."""
        if self.transport is None or self.closed:
            return
        if len(data) <= COALESCE_LIMIT:
            out = http1.encode_chunk(data) if chunked else data
            self.write(head + out if head else out)
            return
        if chunked:
            parts: tuple[bytes, ...] = (head, *http1.chunk_pieces(data))
        elif head:
            parts = (head, data)
        else:
            self.write(data)
            return
        self.bytes_out += sum(map(len, parts))
        self.transport.writelines(parts)

    def close(self) -> None:
        self.state = CLOSING
        self.stop_splice()
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        self.state = CLOSING
        self.stop_splice()
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- kernel relay of a response body (tproxy.splice) ------------------------------

    def try_splice(self, up: Upstream) -> None:
        """Hand the rest of the current Content-Length body to splice(2) when nothing in
        user space needs its bytes: not stored (no sink), sent on as it came
        (Framing.LENGTH), nothing of ours still queued ahead of it, both sides open and
        flowing. Anything else keeps the ordinary relay; so does a failure to set up."""
        ex = self.exchange
        transport = self.transport
        if (
            ex is None
            or ex.upstream is not up
            or ex.sink is not None
            or ex.held
            or ex.response_framing is not Framing.LENGTH
            or self.splice is not None
            or self.closed
            or up.closed
            or up.paused
            or self.write_paused
            or self.producer is not None
            or transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size()
            or self.fd < 0
            or up.fd < 0
        ):
            return
        try:
            sp = BodySplice(
                asyncio.get_running_loop(),
                up.fd,
                self.fd,
                up.parser.length_remaining,
                self.spliced,
                lambda side, err: self.guarded(self.splice_done, ex, up, side, err),
            )
        except OSError:
            return  # out of descriptors for the pipe: the ordinary relay still works
        self.splice = sp
        up.splice = sp
        up.spliced = True
        up.pause_reading()
        sp.start()

    def guarded(self, handler: Callable[..., None], *args: Any) -> None:
        """Run an event handler called by the loop outside the transports' callbacks (the
        kernel relay's end): a bug it meets ends this connection, logged, and nothing else -
        as ``data_received`` does - instead of escaping to the loop and leaving the client
        waiting for a response that nobody finishes."""
        try:
            handler(*args)
        except Exception:
            self.fail_hard("the end of a spliced body")

    def spliced(self, n: int) -> None:
        ex = self.exchange
        if ex is not None:
            ex.sent += n
        self.bytes_out += n
        self.server.stats.spliced_bytes += n
        self.touch()

    def stop_splice(self) -> None:
        sp = self.splice
        if sp is not None:
            self.splice = None
            sp.cancel()
            up = self.upstream
            if up is not None and up.splice is sp:
                up.splice = None

    def splice_done_by(self, up: Upstream) -> None:
        """The origin connection was closed or lost while its body was spliced."""
        ex = self.exchange
        if ex is not None and ex.upstream is up:
            self.splice_done(ex, up, "origin", None)
        else:
            self.splice = None

    def splice_done(
        self, ex: Exchange, up: Upstream, side: str | None, err: OSError | None
    ) -> None:
        self.splice = None
        up.splice = None
        if side is None:
            self.server.stats.spliced_bodies += 1
            up.resume_reading()
            self.on_response_events(up, up.parser.body_passed(up.parser.length_remaining))
            return
        # RFC 9112 §8: a body cut short is an incomplete message; the client must see the
        # connection end without the rest, never a shorter body taken for the whole.
        if side == "origin":
            log.info("%s: origin closed during the body of %s: %s", self.client_ip, ex.url, err)
        if self.exchange is ex:
            self.log_exchange(ex, aborted=True)
            self.exchange = None
        self.drop_upstream(up)
        self.abort()

    def to_upstream(self, data: bytes) -> None:
        up = self.upstream
        if up is not None and up.transport is not None and not up.closed:
            up.transport.write(data)
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > PENDING_LIMIT:
            self.pause_reading()

    def flush_pending(self) -> None:
        if self.pending and self.upstream is not None:
            self.upstream.write(b"".join(self.pending))
        self.pending.clear()
        self.pending_size = 0
        self.resume_reading()

    # -- sniffing and tunnels -------------------------------------------------------------

    def sniff(self, data: bytes) -> None:
        first = not self.sniff_buf
        buf = self.sniff_buf + data if self.sniff_buf else data
        if first:
            # The head's deadline runs from its first byte and is not re-armed by later ones:
            # a client trickling a byte at a time must not stretch it (slowloris).
            self.set_deadline(self.server.cfg.proxy.request_timeout)
        verdict = http1.sniff(buf)
        if verdict is Sniff.HTTP:
            self.sniff_buf = b""
            self.state = HEAD
            self.on_request_events(self.parser.feed(buf))
        elif verdict is Sniff.OPAQUE or len(buf) > SNIFF_LIMIT:
            self.sniff_buf = b""
            self.start_tunnel(buf)
        else:
            self.sniff_buf = buf

    def start_tunnel(self, first: bytes) -> None:
        """Relay everything opaquely to the original destination."""
        self.state = TUNNEL
        self.opaque = True
        self.set_deadline(0)
        if first:
            self.pending.append(first)
            self.pending_size += len(first)
        self.connecting = asyncio.get_running_loop().create_task(
            self._open_tunnel(), name=f"tunnel {self.client_ip}"
        )

    async def _open_tunnel(self) -> None:
        try:
            up = await self.server.connect_upstream(self, self.sockname)
        except (OSError, TimeoutError) as exc:
            self.tunnel_status = 504 if isinstance(exc, TimeoutError) else 502
            # Look like the network: a refused or unreachable origin shows up as a reset.
            self.log_tunnel("TCP_TUNNEL_ABORTED")
            self.abort()
            return
        finally:
            self.connecting = None
        if self.closed:
            up.abort()
            return
        up.client = self
        up.tunnel = True
        self.upstream = up
        self.flush_pending()
        if self.eof and up.transport is not None and up.transport.can_write_eof():
            up.transport.write_eof()

    def peer_eof(self) -> None:
        """The origin half-closed a tunnel."""
        if self.transport is not None and not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()
        if self.eof:
            self.close()

    def log_tunnel(self, result: str) -> None:
        if self.tunnel_logged:
            return
        self.tunnel_logged = True
        dst = self.sockname
        self.server.access(
            AccessRecord(
                start=self.started,
                elapsed_ms=int((time.time() - self.started) * 1000),
                client=self.client_ip,
                result=result,
                status=self.tunnel_status,
                size=self.bytes_out,
                method="CONNECT",
                url=f"{bracket(str(dst[0]))}:{dst[1]}",
                hierarchy="HIER_DIRECT",
                peer=str(dst[0]),
                content_type="-",
            )
        )

    # -- requests -------------------------------------------------------------------------

    def on_request_events(self, events: list[http1.Event]) -> None:
        for event in events:
            if self.state in (CLOSING, LINGER):
                return
            if isinstance(event, Body):
                self.request_body(event.data)
            elif isinstance(event, RequestHead):
                self.request_head(event)
            elif isinstance(event, EndOfMessage):
                self.request_end(event)
            elif isinstance(event, ProtocolError):
                self.request_error(event)
        # Pipelined requests wait in the parser while one is in flight: bound that backlog.
        if self.parser.paused and self.parser.buffered > PENDING_LIMIT:
            self.pause_reading()

    def request_head(self, head: RequestHead) -> None:
        self.state = EXCHANGE
        ex = Exchange(head, None, self.sockname[0])
        self.exchange = ex
        self.set_deadline(0)
        refusal = self.server.limit_request(self)
        if refusal is not None:
            # RFC 6585 §4: 429 with Retry-After; closing caps a flood at the connect rate.
            ex.client_keep_alive = False
            retry = [("Retry-After", str(refusal.retry_after))]
            data = error_response(
                refusal.status, refusal.reason, headers=retry, head_only=head.method == b"HEAD"
            )
            self.respond_local(ex, data, refusal.status, "TCP_DENIED")
            return
        # Policy hooks (filter, cache) may answer the request themselves.
        for hook in self.server.request_hooks:
            if hook(self, ex):
                return
        if head.method in http1.MAX_FORWARDS_METHODS and http1.max_forwards(head) == 0:
            # RFC 9110 §7.6.2: no hop left, so this proxy is the final recipient.
            done = ex.request_done or self.can_discard(ex)
            keep = ex.client_keep_alive and done and not self.server.draining
            data = http1.final_recipient_answer(head, http_date(), keep)
            if head.method == b"TRACE":
                ex.content_type = "message/http"
            self.respond_local(ex, data, 200, "TCP_MISS")
            return
        self.forward_request(ex)

    def forward_request(self, ex: Exchange, fresh: bool = False) -> None:
        """Send ``ex``'s head upstream on a pooled connection or (``fresh``, or none idle) a
        new one; its body follows as it arrives."""
        head = ex.head
        add: list[tuple[bytes, bytes]] = []
        target: bytes | None = None
        drop: tuple[bytes, ...] = ()
        absolute = http1.origin_form(head.target) if head.target[0] != 0x2F else None
        if absolute is not None:
            # RFC 9112 §3.2.2: the target's authority replaces the received Host, and the
            # origin gets origin-form (§3.2.1) — what the filter and cache keyed on is what it
            # serves, whatever Host the client also sent.
            authority, target = absolute
            drop = (b"host",)
            add.append((b"Host", authority))
        elif head.host is None:
            # RFC 9112 §3.2: an HTTP/1.1 request must carry Host; an HTTP/1.0 one may lack it.
            add.append((b"Host", bracket(str(self.sockname[0])).encode()))
        if self.server.cfg.proxy.via:
            add.append((b"Via", http1.via_value(head.version)))
        if head.method in http1.MAX_FORWARDS_METHODS:
            hops = http1.max_forwards(head)
            if hops:  # RFC 9110 §7.6.2: one hop fewer for the next recipient
                drop = (*drop, b"max-forwards")
                add.append((b"Max-Forwards", b"%d" % (hops - 1)))
        data = http1.serialize_request_head(
            head,
            target=target,
            framing=ex.upstream_framing,
            relay_upgrade=head.upgrade,
            drop=drop,
            add=add,
        )
        key = self.server.upstream_key(self, self.sockname)
        up = None if fresh else self.server.pool.take(key)
        if up is not None:
            self.bind_upstream(up, ex)
            up.write(data)
            return
        self.pending.append(data)
        self.pending_size += len(data)
        self.connecting = asyncio.get_running_loop().create_task(
            self._open_for(ex), name=f"upstream {self.client_ip}"
        )

    def bind_upstream(self, up: Upstream, ex: Exchange) -> None:
        up.client = self
        up.got_bytes = False
        up.used += 1
        up.parser.expect(ex.head.method, upgrade=ex.head.upgrade)
        ex.upstream = up
        self.upstream = up
        self.arm_exchange_deadline(ex)
        for hook in self.server.upstream_hooks:
            hook(self, ex, up)
        if self.paused and up.transport is not None:
            self.resume_reading()

    def arm_exchange_deadline(self, ex: Exchange) -> None:
        """The deadline of a forwarded request still waiting for its response head.

        response_timeout counts from the request having been sent whole: an upload that takes
        longer than it (a large file on a slow link) is not the origin's delay.  Until then the
        body is bounded by request_timeout without progress (re-armed as its bytes arrive).
        """
        proxy = self.server.cfg.proxy
        self.set_deadline(proxy.response_timeout if ex.request_done else proxy.request_timeout)

    async def _open_for(self, ex: Exchange) -> None:
        try:
            up = await self.server.connect_upstream(self, self.sockname)
        except TimeoutError:
            self.connecting = None
            self.fail_exchange(ex, 504, "The origin server did not accept a connection in time.")
            return
        except OSError as exc:
            self.connecting = None
            if out_of_resources(exc):
                # Our own descriptors (or socket memory) ran out, not the origin: RFC 9110
                # §15.6.4 503 with Retry-After, and the connection closes to give one back.
                self.fail_exchange(
                    ex, 503, "The proxy is overloaded; please try again shortly.",
                    headers=[("Retry-After", str(RETRY_AFTER_RESOURCES))], keep_alive=False,
                )  # fmt: skip
                return
            reason = exc.strerror or exc.__class__.__name__
            self.fail_exchange(ex, 502, f"Could not connect to the origin server: {reason}.")
            return
        self.connecting = None
        if self.closed or self.exchange is not ex:
            up.abort()
            return
        self.bind_upstream(up, ex)
        self.flush_pending()

    def request_body(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None or ex.result == "TCP_DENIED":
            return
        if ex.upstream is not None and ex.response_head is None:
            # The upload progresses: its request_timeout starts again (a stall, not a slow
            # link, is what it bounds).
            self.deadline = self.last_activity + self.server.cfg.proxy.request_timeout
        if ex.upstream_framing is Framing.CHUNKED:
            data = http1.encode_chunk(data)
        self.to_upstream(data)

    def request_end(self, event: EndOfMessage) -> None:
        done = self.discarding
        if done is not None:
            # The request we already answered ended: now the next one may start.
            self.discarding = None
            done.request_done = True
            self.next_request(done)
            return
        ex = self.exchange
        if ex is None:
            return
        ex.request_done = True
        if ex.result == "TCP_DENIED":
            return
        if ex.upstream_framing is Framing.CHUNKED:
            self.to_upstream(http1.encode_last_chunk(event.trailers, ex.head.connection))
        if ex.upstream is not None and ex.response_head is None and not ex.response_started:
            self.arm_exchange_deadline(ex)

    def request_error(self, event: ProtocolError) -> None:
        ex = self.exchange
        self.server.stats.bad_requests += 1
        if self.discarding is not None:
            # The body of a request we already answered is malformed: hang up, in stages
            # (the answer may still be on its way while the client sends).
            self.discarding = None
            self.linger_close()
            return
        if ex is not None and (ex.upstream is not None or self.connecting is not None):
            # The head already went upstream: the origin must not see a complete request.
            self.drop_upstream(ex.upstream, ex)
            if self.connecting is not None:
                self.connecting.cancel()
                self.connecting = None
            self.pending.clear()
        self.server.client_log(
            log, self, "bad request", "%s: %d %s", self.client_ip, event.status, event.reason
        )
        self.exchange = None
        if ex is None:
            self.write(error_response(event.status, event.reason))
            self.access_simple(event.status, "TCP_DENIED")
            # A malformed head may have its body (or more requests) right behind it: close in
            # stages, or those bytes draw a reset that destroys the 400 (RFC 9112 §9.6).
            self.linger_close()
            return
        if ex.response_started:
            # The response is already under way (relayed, spliced or local): no 400 can follow
            # it, and the client must see it end incomplete - a reset, as for a broken
            # response (RFC 9112 §8) - with the exchange logged and its hooks told like any
            # other that ends early.
            self.producer = None
            self.producer_ex = None
            self.log_exchange(ex, aborted=True)
            self.abort()
            return
        self.end_hooks(ex)
        self.write(error_response(event.status, event.reason))
        self.access_simple(event.status, "TCP_MISS_ABORTED")
        # RFC 9112 §9.6: a malformed body came in while the client is still sending the rest
        # of it; closing now would answer those bytes with a reset, which destroys the error
        # response if the client has not read it yet. Close in stages instead.
        self.linger_close()

    def access_simple(self, status: int, result: str) -> None:
        self.server.access(
            AccessRecord(
                start=time.time(),
                elapsed_ms=0,
                client=self.client_ip,
                result=result,
                status=status,
                size=self.bytes_out,
                method="-",
                url="-",
                hierarchy="HIER_NONE",
                peer="-",
                content_type="-",
            )
        )

    # -- responses ------------------------------------------------------------------------

    def on_response_events(
        self, up: Upstream, events: list[http1.Event], eof: bool = False
    ) -> None:
        ex = self.exchange
        if ex is None or ex.upstream is not up:
            self.drop_upstream(up, reset=False)
            return
        for index, event in enumerate(events):
            if isinstance(event, Body):
                data = event.data
                held = ex.held
                if held:
                    # One send for the head and the first body bytes: one segment, not two.
                    ex.sent += len(held)  # Squid logs head + body bytes
                    ex.held = b""
                    ex.response_started = True
                chunked = ex.response_framing is Framing.CHUNKED
                self.write_body(held, data, chunked)
                # Bytes on the wire, as Squid logs them: a chunk's size line and CRLF count.
                ex.sent += len(data) + (len(b"%x" % len(data)) + 4 if chunked and data else 0)
                if ex.sink is not None:
                    ex.sink.data(event.data)
            elif isinstance(event, ResponseHead):
                self.response_head(ex, event)
                if ex.upstream is not up:
                    # A hook answered the client itself (block page, cache) and detached this
                    # connection: it reads the rest of the response on its own.
                    if not up.closed and up.orphan:
                        up.orphan_events(events[index + 1 :])
                    return
            elif isinstance(event, EndOfMessage):
                if ex.held:
                    self.release_head(ex)
                self.response_end(ex, up, event)
                ex = self.exchange
                if ex is None or ex.upstream is not up:
                    return
            elif isinstance(event, Informational):
                self.informational(ex, event)
            elif isinstance(event, Tunnel):
                self.switch_to_tunnel(ex, up, event.rest)
                return
            elif isinstance(event, ProtocolError):
                ex.held = b""
                if eof and self.retry_stale(ex, up):
                    return
                self.response_error(ex, up, event)
                return
        if ex.held:
            self.release_head(ex)
        if eof and self.exchange is ex and ex is not None and ex.upstream is up:
            # EOF without a complete response and no error event: treat as failure.
            self.upstream_lost(up, None)

    def response_head(self, ex: Exchange, head: ResponseHead) -> None:
        ex.response_head = head
        ex.status = head.status
        ex.ctype = None  # this head's, when the access log asks (Exchange.content_type)
        self.set_deadline(0)
        client_version = ex.head.version
        framing = http1.forward_framing(head, client_version)
        ex.response_framing = framing
        keep = ex.head.keep_alive and framing is not Framing.CLOSE and not self.server.draining
        # A request whose body was not fully read cannot be followed by another on this
        # connection (the rest of its body would be parsed as a request).
        if not ex.request_done and ex.head.body_kind is not http1.BodyKind.NONE:
            keep = False
        ex.client_keep_alive = keep
        for hook in self.server.response_hooks:
            if hook(self, ex, head):
                return
        if not has_date(head):
            ex.extra_headers.append((b"Date", http_date()))
        if self.server.cfg.proxy.via:
            ex.extra_headers.append((b"Via", http1.via_value(head.version)))
        ex.held = http1.serialize_response_head(
            head,
            peer_version=client_version,
            framing=framing,
            keep_alive=keep,
            add=ex.extra_headers,
        )

    def release_head(self, ex: Exchange) -> None:
        ex.response_started = True
        ex.sent += len(ex.held)
        self.write(ex.held)
        ex.held = b""

    def informational(self, ex: Exchange, info: Informational) -> None:
        if info.status == 101:
            self.write(http1.serialize_response_head(info, relay_upgrade=True))
            ex.status = 101
            return
        # RFC 9110 §15.2: a proxy forwards 1xx responses, except to HTTP/1.0 clients.
        if ex.head.version == b"1.1":
            self.write(http1.serialize_response_head(info))

    def response_end(self, ex: Exchange, up: Upstream, event: EndOfMessage) -> None:
        if ex.response_framing is Framing.CHUNKED:
            head = ex.response_head
            last = http1.encode_last_chunk(
                event.trailers, head.connection if head is not None else ()
            )
            self.write(last)
            ex.sent += len(last)
        if ex.sink is not None:
            ex.sink.end(event.trailers)
            ex.sink = None
        self.log_exchange(ex)
        self.exchange = None
        self.upstream = None
        head = ex.response_head
        reusable = (
            head is not None
            and head.keep_alive
            and ex.request_done
            and up.parser.reusable
            and not self.server.draining
        )
        if reusable:
            self.server.pool.put(up)
        else:
            self.drop_upstream(up, reset=False)
        self.next_request(ex)

    def next_request(self, ex: Exchange) -> None:
        if not ex.client_keep_alive or self.closed:
            if ex.request_done:
                self.close()
            else:
                self.linger_close()
            return
        self.state = HEAD
        self.set_deadline(self.server.cfg.proxy.keepalive_timeout)
        self.head_armed = False
        self.resume_reading()
        events = self.parser.resume()
        if events:
            self.on_request_events(events)
        elif self.eof and self.exchange is None:
            self.close()

    def linger_close(self) -> None:
        """Close after an answer while the client may still be sending its request body: FIN
        behind the answer, then read and drop until the client closes too or LINGER_IDLE /
        LINGER_TIME pass (RFC 9112 §9.6)."""
        transport = self.transport
        if transport is None or self.closed or self.eof or not transport.can_write_eof():
            self.close()
            return
        self.state = LINGER
        self.linger_until = time.monotonic() + LINGER_TIME
        self.set_deadline(LINGER_IDLE)
        transport.write_eof()
        self.resume_reading()

    def switch_to_tunnel(self, ex: Exchange, up: Upstream, rest: bytes) -> None:
        """101 Switching Protocols: both connections now carry an opaque protocol."""
        self.log_exchange(ex)
        self.exchange = None
        self.state = TUNNEL
        self.set_deadline(0)
        up.tunnel = True
        if rest:
            self.write(rest)
        buffered = self.parser.into_tunnel()
        if buffered:
            up.write(buffered)

    def response_error(self, ex: Exchange, up: Upstream, event: ProtocolError) -> None:
        self.drop_upstream(up, ex)
        self.server.stats.upstream_errors += 1
        self.server.client_log(
            log, self, "bad response", "bad response from %s for %s: %s", self.sockname[0],
            ex.url, event.reason,
        )  # fmt: skip
        if not ex.response_started:
            self.fail_exchange(
                ex, 502, f"The origin server sent an invalid response: {event.reason}."
            )
        else:
            # Part of the response already went out: the only honest signal left is an abort.
            self.log_exchange(ex, aborted=True)
            self.exchange = None
            self.abort()

    def upstream_lost(self, up: Upstream, exc: Exception | None) -> None:
        if self.state == TUNNEL:
            if self.upstream is up:
                self.upstream = None
                if exc is not None:
                    self.abort()
                else:
                    self.close()
            return
        ex = self.exchange
        if ex is None or ex.upstream is not up:
            return
        ex.upstream = None
        self.upstream = None
        if self.retry_stale(ex, up):
            return
        if not ex.response_started:
            self.fail_exchange(ex, 502, "The origin server closed the connection.")
        else:
            self.log_exchange(ex, aborted=True)
            self.exchange = None
            self.abort()

    def retry_stale(self, ex: Exchange, up: Upstream) -> bool:
        """RFC 9112 §9.3.1: a reused connection the origin closed (FIN or reset) before any
        byte of the response may have crossed our request in flight; an idempotent request
        without a body is sent once more, on a new connection (True if it was)."""
        if up.got_bytes or up.used < 2 or not ex.retryable or ex.response_started:
            return False
        ex.retryable = False  # once: the new connection is not reused, but be explicit
        self.drop_upstream(up, ex)
        self.forward_request(ex, fresh=True)
        return True

    def fail_exchange(
        self,
        ex: Exchange,
        status: int,
        detail: str,
        headers: Sequence[tuple[str, str]] = (),
        keep_alive: bool = True,
    ) -> None:
        """Answer the current request with an error page generated here (``keep_alive``
        False closes the connection after it even where it could stay open)."""
        self.drop_upstream(ex.upstream, ex)
        self.upstream = None
        self.pending.clear()
        self.pending_size = 0
        ex.status = status
        ex.result = "TCP_MISS" if status != 504 else "TCP_MISS_TIMEOUT"
        ex.hierarchy = "HIER_NONE"
        ex.content_type = "text/html"
        ex.response_started = True
        keep = keep_alive and ex.head.keep_alive and ex.request_done and not self.server.draining
        ex.client_keep_alive = keep
        data = error_response(
            status, detail, keep_alive=keep, headers=headers, head_only=ex.head.method == b"HEAD"
        )
        ex.sent = len(data)
        self.write(data)
        self.log_exchange(ex)
        self.exchange = None
        self.next_request(ex)

    def respond_local(self, ex: Exchange, data: bytes, status: int, result: str) -> None:
        """Answer from the proxy itself (block page, cache hit): nothing goes upstream."""
        self.begin_local(ex, status, result, len(data))
        self.write(data)
        self.finish_local(ex)

    def begin_local(self, ex: Exchange, status: int, result: str, head_size: int) -> None:
        """The common start of a local answer: the origin's response (if one is coming) is
        read on in the background, and the exchange is marked as answered here."""
        if ex.upstream is not None:
            self.detach_upstream(ex)
        ex.status = status
        ex.result = result
        ex.hierarchy = "HIER_NONE"
        ex.response_started = True
        ex.sent = head_size
        if not ex.request_done and not self.can_discard(ex):
            ex.client_keep_alive = False

    def can_discard(self, ex: Exchange) -> bool:
        """Whether the rest of an answered request's body is small enough to read and drop."""
        head = ex.head
        if head.body_kind is http1.BodyKind.NONE:
            return True
        length = head.content_length
        return (
            head.body_kind is http1.BodyKind.LENGTH
            and length is not None
            and (length <= DISCARD_LIMIT)
        )

    def finish_local(self, ex: Exchange) -> None:
        """A locally answered exchange is complete on our side."""
        self.log_exchange(ex)
        if self.exchange is ex:
            self.exchange = None
        if ex.request_done or not ex.client_keep_alive:
            self.next_request(ex)
        else:
            # Its EndOfMessage (right behind the head for a GET) starts the next request.
            self.discarding = ex

    def unbind_upstream(self, up: Upstream, ex: Exchange | None = None) -> None:
        """``up`` no longer serves this connection (nor ``ex``): its events stop reaching us."""
        up.client = None
        if ex is not None and ex.upstream is up:
            ex.upstream = None
        if self.upstream is up:
            self.upstream = None

    def drop_upstream(
        self, up: Upstream | None, ex: Exchange | None = None, *, reset: bool = True
    ) -> None:
        """Let go of an origin connection for good: unbound, closed and never pooled again.

        ``reset`` (the default) aborts it: what it carries can no longer be trusted — a request
        cut short must not reach the origin complete, a broken response must not be read into
        the next exchange. A clean close (``reset=False``) is for a connection that merely
        cannot be reused (RFC 9112 §9.6: the response said close, or bytes are left over).
        """
        if up is None:
            return
        self.unbind_upstream(up, ex)
        if reset:
            up.abort()
        else:
            up.close()

    def detach_upstream(self, ex: Exchange, sink: BodySink | None = None) -> None:
        """Stop relaying ``ex``'s response; read its rest in the background (into ``sink``)."""
        up = ex.upstream
        if up is None:
            return
        self.unbind_upstream(up, ex)
        if len(up.pool.orphans) >= ORPHANS_MAX:
            if sink is not None:
                sink.abort()
            up.abort()
            return
        head = ex.response_head
        up.orphan = True
        up.orphan_keep = head is not None and head.keep_alive and ex.request_done
        up.orphan_sink = sink
        up.idle_since = up.orphan_since = time.monotonic()
        up.orphan_bytes = 0
        up.pool.orphans.add(up)
        up.resume_reading()

    def stream_local(
        self,
        ex: Exchange,
        head: bytes,
        body: Iterator[bytes],
        status: int,
        result: str,
        framing: Framing = Framing.LENGTH,
    ) -> None:
        """Answer from the proxy with a body pulled from ``body`` as the client drains."""
        self.begin_local(ex, status, result, len(head))
        ex.response_framing = framing
        self.write(head)
        self.producer = body
        self.producer_ex = ex
        self.pump()

    def pump(self) -> None:
        """Write producer chunks until the transport's buffer is full or the body ends."""
        producer = self.producer
        ex = self.producer_ex
        transport = self.transport
        if producer is None or ex is None or transport is None:
            return
        # Called again only when the client drained its buffer: that is activity, and without
        # it idle_timeout would cut a long cache hit to a client that reads steadily.
        self.last_activity = time.monotonic()
        try:
            # Until the transport pauses us: it does so only *above* the high-water mark
            # (asyncio and uvloop test size > high), so stopping at == HIGH would wait for a
            # resume_writing() that never comes and stall the stream.
            while not self.write_paused and not self.closed:
                chunk = next(producer, None)
                if chunk is None:
                    break
                ex.sent += len(chunk)
                self.write(
                    http1.encode_chunk(chunk) if ex.response_framing is Framing.CHUNKED else chunk
                )
            else:
                return  # resume_writing() calls pump() again
        except Exception as exc:  # a corrupt stored body: the client must see an incomplete one
            log.warning("local response for %s failed: %s", ex.url, exc)
            self.producer = None
            self.producer_ex = None
            self.log_exchange(ex, aborted=True)
            self.exchange = None
            self.abort()
            return
        self.producer = None
        self.producer_ex = None
        if ex.response_framing is Framing.CHUNKED:
            self.write(http1.LAST_CHUNK)
        self.finish_local(ex)

    def end_hooks(self, ex: Exchange) -> None:
        """``ex`` is over: its sink and ``on_finish`` hear of it (once), however it ended."""
        if ex.sink is not None:
            # A transfer that did not complete is never stored (nor anything else a sink does).
            ex.sink.abort()
            ex.sink = None
        if ex.on_finish is not None:
            finish, ex.on_finish = ex.on_finish, None
            finish(ex)

    def log_exchange(self, ex: Exchange, aborted: bool = False) -> None:
        self.end_hooks(ex)
        if self.server.access_skipped():
            return
        dst = str(self.sockname[0])
        self.server.access(
            AccessRecord(
                start=ex.start,
                elapsed_ms=int((time.time() - ex.start) * 1000),
                client=self.client_ip,
                result=ex.result + ("_ABORTED" if aborted else ""),
                status=ex.status,
                size=ex.sent,
                method=ex.head.method.decode("latin-1"),
                url=ex.url,
                hierarchy=ex.hierarchy,
                peer=dst if ex.hierarchy == "HIER_DIRECT" else "-",
                content_type=ex.content_type,
            )
        )

    # -- timeouts -------------------------------------------------------------------------

    def on_deadline(self) -> None:
        """The current state's timer ran out (checked by the server's sweep)."""
        self.deadline = 0.0
        ex = self.exchange
        if self.state == LINGER:
            self.close()
        elif self.state == SNIFF and not self.bytes_in:
            self.start_tunnel(b"")
        elif self.state in (SNIFF, HEAD):
            # A slow client that started a request gets RFC 9110 §15.5.9 408; an idle
            # keep-alive connection (no byte of a next request) is just closed (§9.3 RFC 9112).
            if self.sniff_buf or (self.state == HEAD and self.head_armed):
                self.write(error_response(408, "The request was not completed in time."))
            self.close()
        elif ex is not None and not ex.response_started and not ex.request_done:
            if self.paused and ex.upstream is not None:
                # We stopped reading the body: the origin is slow to take it, not the client
                # (idle_timeout bounds a stall with no byte moving at all).
                self.set_deadline(self.server.cfg.proxy.request_timeout)
                return
            # RFC 9110 §15.5.9: the client did not finish its request in time.
            self.fail_exchange(ex, 408, "The request body was not completed in time.")
        elif ex is not None and not ex.response_started:
            self.fail_exchange(ex, 504, "The origin server did not answer in time.")
        else:
            self.abort()


async def open_connection(
    loop: asyncio.AbstractEventLoop,
    pool: Pool,
    key: tuple[Any, ...],
    dst: tuple[Any, ...],
    source_ip: str | None,
    mark: int,
    timeout: float,
) -> Upstream:
    family = socket.AF_INET6 if ":" in str(dst[0]) else socket.AF_INET
    sock = netutil.upstream_socket(family, source_ip, mark)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, dst[:2]), timeout)
        up = Upstream(pool, key)
        await loop.create_connection(lambda: up, sock=sock)
    except BaseException:
        sock.close()
        raise
    return up
