"""Adversarial review of the HTTP shell (httpconn/server) with real sockets on loopback.

Each test runs the daemon's ``Server`` in-process: a client connection is handed to it the way
TPROXY hands one over (the accepted socket's local address is the original destination), and a
scripted origin listens on that very address.  No root, no rules, no namespaces: the origin can
misbehave in ways nginx never would (a 204 with a body, a close right after a request ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

from tests.inproc import Records, hand_over
from tproxy import config
from tproxy.http1 import MAX_RESPONSE_HEADER_COUNT
from tproxy.httpconn import LINGER_IDLE, WRITE_BUFFER_HIGH
from tproxy.server import Server

WAIT = 5.0
LINGER_RESET = struct.pack("ii", 1, 0)
# Sweeps a real daemon runs once a second; here often, so sub-second timeouts are exact enough.
SWEEP = 0.05

Handler = Callable[["OriginConn"], Awaitable[None]]


@dataclass
class OriginConn:
    """One connection at the scripted origin."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[bytes] = field(default_factory=list)

    async def head(self) -> bytes:
        head = await self.reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        return head

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        reset(self.writer)


@dataclass
class Rig:
    server: Server
    log: Records
    origin_conns: list[OriginConn]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    port: int
    sock: socket.socket  # the same client connection, blocking (use one or the other)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.sock.close()
        self.writer.close()

    async def response(self, timeout: float = WAIT) -> tuple[int, bytes, bytes]:
        """(status, head, body) of one response with Content-Length (or none: no body)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if status < 200 or status in (204, 304):
            length = 0
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return status, head, body

    async def rest(self, timeout: float = WAIT) -> bytes:
        """Everything until the proxy closes the connection."""
        out = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(self.reader.read(65536), timeout):
                out += chunk
        return out

    def origin_requests(self) -> list[bytes]:
        return [r for c in self.origin_conns for r in c.requests]


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0), as a client killed mid-transfer does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    writer.transport.abort()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def until(predicate: Callable[[], Any], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def rig(handler: Handler, **proxy: Any) -> AsyncIterator[Rig]:
    """A Server, one intercepted client connection, and ``handler`` serving each origin
    connection.  On exit: no client connection, pooled upstream or origin connection is left."""
    config.load(None)
    overrides: dict[str, Any] = {"transparent_upstream": False} | proxy
    cfg = config.with_overrides(config.load(None), **overrides)
    log = Records()
    server = Server(cfg, log)  # type: ignore[arg-type]
    client, port = await hand_over(server)
    # A blocking copy for tests that play a simple synchronous client (Rig.sock).
    sock = client.dup()
    sock.settimeout(WAIT)
    reader, writer = await asyncio.open_connection(sock=client)
    conns: list[OriginConn] = []
    tasks: set[asyncio.Task[None]] = set()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = OriginConn(len(conns), r, w)
        conns.append(conn)
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(conn)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    origin = await asyncio.start_server(serve, "127.0.0.1", port, reuse_address=True)

    async def sweep() -> None:
        while True:
            await asyncio.sleep(SWEEP)
            server.sweep(time.monotonic())

    sweeper = asyncio.get_running_loop().create_task(sweep(), name="test sweeper")
    try:
        yield Rig(server, log, conns, reader, writer, port, sock)
    finally:
        writer.close()
        sock.close()
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await server.drain(0.5)
        await server.stop()
        origin.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await origin.wait_closed()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


async def serve_ok(conn: OriginConn) -> None:
    """Answer every request on the connection with 200 "ok" (no request bodies)."""
    while True:
        await conn.head()
        await conn.send(ok())


GET = b"GET /%s HTTP/1.1\r\nHost: origin.test\r\n\r\n"


# ------------------------------------------------------------------ upstream reuse


def test_204_with_a_body_does_not_poison_the_pooled_connection() -> None:
    """RFC 9112 §6.3 item 1: a 204 ends at its head; bytes after it are not a response to
    anything, so that connection is unusable: the next request must go on a fresh one."""

    async def origin(conn: OriginConn) -> None:
        if conn.index == 0:
            await conn.head()
            await conn.send(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello")
        await serve_ok(conn)

    async def main() -> None:
        async with rig(origin, response_timeout=2.0) as r:
            r.send(GET % b"a")
            assert (await r.response())[0] == 204
            r.send(GET % b"b")
            status, _, body = await r.response(timeout=1.5)
            assert (status, body) == (200, b"ok")
            assert len(r.origin_conns) == 2

    run(main())


def test_a_pooled_connection_the_origin_closed_is_retried_for_an_idempotent_request() -> None:
    """RFC 9112 §9.3.1: the origin may close an idle connection just as the next request goes
    out on it.  No byte of a response came back, the request is a GET: retry once, fresh."""

    async def origin(conn: OriginConn) -> None:
        if conn.index == 0:
            await conn.head()
            await conn.send(ok(b"first"))
            await conn.head()  # read the second request, then close without a word (FIN)
            return
        await serve_ok(conn)

    async def main() -> None:
        async with rig(origin) as r:
            r.send(GET % b"a")
            assert (await r.response())[2] == b"first"
            r.send(GET % b"b")
            status, _, body = await r.response()
            assert (status, body) == (200, b"ok")
            assert len(r.origin_conns) == 2
            assert [rec.status for rec in r.log.records] == [200, 200]

    run(main())


def test_a_non_idempotent_request_on_a_closed_pooled_connection_is_not_retried() -> None:
    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(ok(b"first"))
        await conn.head()
        await conn.reader.readexactly(3)

    async def main() -> None:
        async with rig(origin) as r:
            r.send(GET % b"a")
            assert (await r.response())[2] == b"first"
            r.send(b"POST /p HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 3\r\n\r\nabc")
            assert (await r.response())[0] == 502
            assert len(r.origin_conns) == 1  # the POST may have been acted on: never twice

    run(main())


def test_an_upload_slower_than_response_timeout_is_not_a_504() -> None:
    """response_timeout runs from the request being sent, not from its head: a client that
    takes longer than it to upload (a big file on a slow link) still gets the origin's answer."""

    async def origin(conn: OriginConn) -> None:
        head = await conn.head()
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await conn.reader.readexactly(length)
        await conn.send(ok(b"got %d" % len(body)))

    async def main() -> None:
        async with rig(origin, response_timeout=0.5) as r:
            r.send(b"POST /up HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 10\r\n\r\n")
            for _ in range(10):
                await asyncio.sleep(0.15)
                r.send(b"x")
            status, _, body = await r.response()
            assert (status, body) == (200, b"got 10")

    run(main())


def test_a_silent_origin_after_the_request_body_gets_504() -> None:
    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.reader.readexactly(4)
        await asyncio.sleep(10)

    async def main() -> None:
        async with rig(origin, response_timeout=0.5) as r:
            r.send(b"POST /up HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 4\r\n\r\nabcd")
            started = time.monotonic()
            assert (await r.response())[0] == 504
            assert time.monotonic() - started < 2

    run(main())


def test_absolute_form_goes_upstream_in_origin_form_with_the_target_host() -> None:
    """RFC 9112 §3.2.2: a proxy ignores the received Host for an absolute-form target and
    sends a Host made from the target; §3.2.1: to an origin, only origin-form.  Otherwise an
    origin that routes by Host serves other content than the filter and cache looked at."""

    async def main() -> None:
        async with rig(serve_ok) as r:
            r.send(
                b"GET http://allowed.test:8080/p?q=1 HTTP/1.1\r\nHost: other.test\r\n"
                b"Accept: */*\r\n\r\n"
            )
            assert (await r.response())[0] == 200
            (sent,) = r.origin_requests()
            lines = sent.split(b"\r\n")
            assert lines[0] == b"GET /p?q=1 HTTP/1.1"
            hosts = [line for line in lines if line.lower().startswith(b"host:")]
            assert hosts == [b"Host: allowed.test:8080"]
            assert b"Accept: */*" in lines
            assert r.log.records[0].url == "http://allowed.test:8080/p?q=1"

    run(main())


def test_options_asterisk_reaches_the_origin_unchanged() -> None:
    async def main() -> None:
        async with rig(serve_ok) as r:
            r.send(b"OPTIONS * HTTP/1.1\r\nHost: origin.test\r\n\r\n")
            assert (await r.response())[0] == 200
            assert r.origin_requests()[0].startswith(b"OPTIONS * HTTP/1.1\r\n")

    run(main())


def test_connect_on_an_intercepted_port_is_501_and_never_reaches_the_origin() -> None:
    """An interception proxy stands in for the origin, which on port 80 is no proxy: CONNECT
    would open an unfiltered tunnel to anywhere.  501 (RFC 9110 §15.6.2: a method the server
    does not support for any resource), not 405 (that needs an Allow list of the resource)."""

    async def main() -> None:
        async with rig(serve_ok) as r:
            r.send(b"CONNECT elsewhere.test:443 HTTP/1.1\r\nHost: elsewhere.test:443\r\n\r\n")
            status, head, _ = await r.response()
            assert status == 501
            assert b"Connection: close" in head
            assert await r.rest() == b""
            assert r.origin_conns == []

    run(main())


def test_early_hints_reach_the_client_before_the_final_response() -> None:
    async def origin(conn: OriginConn) -> None:
        while True:
            await conn.head()
            await conn.send(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
            await asyncio.sleep(0.05)
            await conn.send(ok())

    async def main() -> None:
        async with rig(origin) as r:
            for path in (b"a", b"b"):
                r.send(GET % path)
                status, head, _ = await r.response()
                assert status == 103 and b"Link: </s.css>; rel=preload" in head
                assert (await r.response())[:3:2] == (200, b"ok")
            assert len(r.origin_conns) == 1

    run(main())


def test_response_head_over_the_limit_is_502_and_the_client_connection_survives() -> None:
    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n")
        await asyncio.sleep(5)

    async def main() -> None:
        async with rig(origin) as r:
            r.send(GET % b"a")
            assert (await r.response())[0] == 502
            r.send(GET % b"b")
            assert (await r.response())[0] == 502
            assert len(r.origin_conns) == 2

    run(main())


def test_a_stalled_upload_gets_408_and_the_origin_never_sees_a_complete_request() -> None:
    seen: list[bytes] = []

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        seen.append(await conn.reader.read(100))
        seen.append(await conn.reader.read(100))  # b"": the proxy closed (or reset) it

    async def main() -> None:
        async with rig(origin, request_timeout=0.4) as r:
            r.send(b"POST /up HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 10\r\n\r\nabc")
            status, head, _ = await r.response()
            assert status == 408 and b"Connection: close" in head
            await until(lambda: len(seen) == 2)
            assert seen == [b"abc", b""]

    run(main())


def test_an_origin_slow_to_read_an_upload_is_not_the_clients_408() -> None:
    """Back-pressure pauses reading the client while the origin does not take the body: the
    stall is not the client's, so request_timeout must not fire."""
    size = 16 * 1024 * 1024

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await asyncio.sleep(1.0)
        got = 0
        while got < size:
            got += len(await conn.reader.read(1 << 20))
        await conn.send(ok(b"got %d" % got))

    async def main() -> None:
        async with rig(origin, request_timeout=0.3) as r:
            r.send(b"POST /up HTTP/1.1\r\nHost: origin.test\r\nContent-Length: %d\r\n\r\n" % size)
            r.send(b"x" * size)
            status, _, body = await r.response(timeout=10)
            assert (status, body) == (200, b"got %d" % size)

    run(main())


# ------------------------------------------------------------------ early answers, disconnects


def test_expect_100_continue_answered_417_without_the_body_does_not_hang() -> None:
    """RFC 9110 §10.1.1: the origin may answer a final status instead of 100.  The client got
    no 100 and sent no body; the proxy cannot know whether it will, so the answer says close
    (RFC 9112 §9.6) and the connection ends cleanly, the upstream one too (not pooled)."""
    closed: list[bytes] = []

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n")
        closed.append(await conn.reader.read(10))

    async def main() -> None:
        async with rig(origin) as r:
            r.send(
                b"PUT /f HTTP/1.1\r\nHost: origin.test\r\nExpect: 100-continue\r\n"
                b"Content-Length: 100000\r\n\r\n"
            )
            status, head, _ = await r.response()
            assert status == 417 and b"Connection: close" in head
            assert await r.rest() == b""  # the FIN right behind the answer
            await until(lambda: closed == [b""])
            r.close()
            await until(lambda: not r.server.connections, timeout=LINGER_IDLE / 2)
            assert [(rec.status, rec.result) for rec in r.log.records] == [(417, "TCP_MISS")]
            assert r.server.pool.count == 0

    run(main())


def test_expect_100_continue_upload_passes_the_100_through() -> None:
    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await conn.reader.readexactly(5)
        await conn.send(ok(body))
        await serve_ok(conn)

    async def main() -> None:
        async with rig(origin) as r:
            r.send(
                b"PUT /f HTTP/1.1\r\nHost: origin.test\r\nExpect: 100-continue\r\n"
                b"Content-Length: 5\r\n\r\n"
            )
            assert (await r.response())[0] == 100
            r.send(b"hello")
            assert (await r.response())[2] == b"hello"
            r.send(GET % b"next")  # the connections stay usable, the upstream one reused
            assert (await r.response())[2] == b"ok"
            assert len(r.origin_conns) == 1

    run(main())


def test_an_early_final_answer_during_an_upload_reaches_the_client() -> None:
    """The origin refuses an upload (413) before reading it and closes.  The client is still
    sending: closing its connection with unread bytes would send a reset that can destroy the
    413 in its receive queue (the "TCP reset problem" of RFC 9112 §9.6): the proxy must
    close in stages so that the client reads the answer."""
    size = 8 * 1024 * 1024

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\nConnection: close\r\n"
            b"\r\ntoo big!"
        )

    async def main() -> None:
        async with rig(origin) as r:
            r.send(b"POST /up HTTP/1.1\r\nHost: origin.test\r\nContent-Length: %d\r\n\r\n" % size)
            sender = asyncio.get_running_loop().create_task(
                send_slowly(r.writer, size), name="uploader"
            )
            status, _, body = await r.response()
            assert (status, body) == (413, b"too big!")
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            r.close()
            await until(lambda: not r.server.connections, timeout=LINGER_IDLE / 2)
            assert [rec.status for rec in r.log.records] == [413]

    run(main())


async def send_slowly(writer: asyncio.StreamWriter, size: int) -> None:
    piece = b"x" * 65536
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < size:
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
            await asyncio.sleep(0.005)


def test_client_leaving_mid_download_closes_the_upstream_and_logs_once() -> None:
    origin_saw_close = asyncio.Event()

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        try:
            while True:
                await conn.send(b"y" * 65536)
                await asyncio.sleep(0.001)
        finally:
            origin_saw_close.set()

    async def main() -> None:
        before = fd_count()
        async with rig(origin) as r:
            r.send(GET % b"big")
            await r.reader.readexactly(200000)
            r.sock.close()  # its last descriptor is the transport's: the reset goes out
            reset(r.writer)
            await asyncio.wait_for(origin_saw_close.wait(), WAIT)
            await until(lambda: not r.server.connections)
            assert [(rec.status, rec.result) for rec in r.log.records] == [
                (200, "TCP_MISS_ABORTED")
            ]
            assert r.server.pool.count == 0 and not r.server.pool.orphans
            await asyncio.sleep(0.1)
            assert len(r.log.records) == 1
        assert fd_count() == before

    run(main())


def test_client_leaving_mid_upload_resets_the_upstream_and_logs_once() -> None:
    got: list[int] = []

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        n = 0
        try:
            while chunk := await conn.reader.read(65536):
                n += len(chunk)
        finally:
            got.append(n)

    async def main() -> None:
        before = fd_count()
        async with rig(origin) as r:
            r.send(b"POST /up HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 1000000\r\n\r\n")
            r.send(b"z" * 300000)
            await until(lambda: r.origin_conns)
            await asyncio.sleep(0.1)
            r.sock.close()  # its last descriptor is the transport's: the reset goes out
            reset(r.writer)
            await until(lambda: got)
            assert got[0] < 1000000
            await until(lambda: not r.server.connections)
            await asyncio.sleep(0.1)
            assert [(rec.status, rec.result) for rec in r.log.records] == [(0, "TCP_MISS_ABORTED")]
        assert fd_count() == before

    run(main())


def test_a_silent_origin_after_the_head_is_aborted_at_idle_timeout() -> None:
    """The head went out, so no 504 is possible any more: the client sees the body cut short
    (a reset), the log says aborted."""

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await asyncio.sleep(10)

    async def main() -> None:
        async with rig(origin, idle_timeout=0.5, response_timeout=0.2) as r:
            r.send(GET % b"a")
            head = await r.reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert await r.rest() == b"0123456789"
            assert [(rec.status, rec.result) for rec in r.log.records] == [
                (200, "TCP_MISS_ABORTED")
            ]

    run(main())


# ------------------------------------------------------------------ pipelining


def test_pipelined_requests_after_a_504_are_answered_in_order() -> None:
    async def origin(conn: OriginConn) -> None:
        head = await conn.head()
        if b"/slow" in head:
            await asyncio.sleep(10)
        await conn.send(ok(head.split(b" ")[1]))
        await serve_ok(conn)

    async def main() -> None:
        async with rig(origin, response_timeout=0.3) as r:
            r.send(GET % b"slow" + GET % b"second" + GET % b"third")
            assert (await r.response())[0] == 504
            assert (await r.response())[2] == b"/second"
            assert (await r.response())[2] == b"ok"
            assert [rec.status for rec in r.log.records] == [504, 200, 200]

    run(main())


def test_nothing_after_a_bad_pipelined_request_reaches_the_origin() -> None:
    async def main() -> None:
        async with rig(serve_ok) as r:
            r.send(
                GET % b"one"
                + b"GET /two HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
                + GET % b"three"
            )
            assert (await r.response())[0] == 200
            status, head, _ = await r.response()
            assert status == 400 and b"Connection: close" in head
            assert await r.rest() == b""
            assert [req.split(b" ")[1] for req in r.origin_requests()] == [b"/one"]

    run(main())


def blocking_upload(s: socket.socket, head: bytes, size: int) -> bytes:
    """What a simple client (Python's http.client) does: send the whole request, then read."""
    with s:
        s.sendall(head)
        piece = b"x" * 65536
        for _ in range(size // len(piece)):
            s.sendall(piece)
            time.sleep(0.002)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_an_early_answer_survives_the_rest_of_the_upload() -> None:
    """The origin answers 401 before reading an upload (and drains the rest, as nginx's
    lingering close does).  A client that sends its whole body before reading must then read
    the 401: closing at once would reset its sending (EPIPE) and it would never see the answer
    — RFC 9112 §9.6: close in stages (half-close, read and drop for a while, then close)."""
    size = 4 * 1024 * 1024

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nauth")
        while await conn.reader.read(65536):
            pass

    async def main() -> None:
        async with rig(origin) as r:
            r.writer.transport.pause_reading()  # this test's client is the blocking socket
            head = b"POST /up HTTP/1.1\r\nHost: origin.test\r\nContent-Length: %d\r\n\r\n" % size
            out = await asyncio.to_thread(blocking_upload, r.sock, head, size)
            assert out.startswith(b"HTTP/1.1 401 ") and out.endswith(b"\r\n\r\nauth")

    run(main())


def test_an_early_answer_survives_unread_upload_bytes() -> None:
    """The client wrote its whole upload and reads the answer only later: a plain close with
    the upload unread in the proxy's receive queue would reset the connection, and on Linux a
    reset discards what the client had not read yet."""

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nauth")
        while await conn.reader.read(65536):  # a lingering close, as nginx does
            pass

    async def main() -> None:
        async with rig(origin) as r:
            r.send(b"POST /up HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 2000000\r\n\r\n")
            r.writer.transport.pause_reading()  # the answer waits in the kernel, unread
            r.send(b"x" * 100000)
            await asyncio.sleep(0.3)  # the answer is on its way back meanwhile
            r.send(b"x" * 100000)  # still uploading: in flight when the proxy is done
            await asyncio.sleep(0.3)
            r.writer.transport.resume_reading()
            status, _, body = await r.response()
            assert (status, body) == (401, b"auth")

    run(main())


def test_head_answered_with_transfer_encoding_chunked_has_no_body_and_reuses_upstream() -> None:
    """RFC 9112 §6.3 item 1: a HEAD response ends at its head whatever its framing fields."""

    async def origin(conn: OriginConn) -> None:
        while True:
            head = await conn.head()
            if head.startswith(b"HEAD"):
                await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            else:
                await conn.send(ok())

    async def main() -> None:
        async with rig(origin) as r:
            r.send(b"HEAD /h HTTP/1.1\r\nHost: origin.test\r\n\r\n" + GET % b"g")
            status, head, _ = await r.response()
            assert status == 200 and b"chunked" not in head.lower()
            status, _, body = await r.response()
            assert (status, body) == (200, b"ok")
            assert len(r.origin_conns) == 1

    run(main())


def test_many_small_response_fields_up_to_the_limit_pass_one_more_is_502() -> None:
    async def origin(conn: OriginConn) -> None:
        while True:
            head = await conn.head()
            count = int(head.split(b" ")[1][1:])
            fields = b"".join(b"X-F%d: v\r\n" % i for i in range(count - 1))
            await conn.send(ok(extra=fields))

    async def main() -> None:
        async with rig(origin) as r:
            r.send(GET % str(MAX_RESPONSE_HEADER_COUNT).encode())  # with Content-Length: the limit
            status, head, _ = await r.response()
            assert status == 200 and head.count(b"X-F") == MAX_RESPONSE_HEADER_COUNT - 1
            r.send(GET % str(MAX_RESPONSE_HEADER_COUNT + 1).encode())
            assert (await r.response())[0] == 502

    run(main())


def test_a_response_without_date_gets_one_and_a_dated_one_keeps_its_own() -> None:
    """RFC 9110 §6.6.1: a recipient with a clock MUST append a Date to a response it forwards
    without one; a response that has one passes it on unchanged (one Date, the origin's)."""
    origin_date = b"Sun, 06 Nov 1994 08:49:37 GMT"

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(ok())
        await conn.head()
        await conn.send(ok(extra=b"DATE: " + origin_date + b"\r\n"))

    async def main() -> None:
        async with rig(origin) as r:
            before = time.time()
            r.send(GET % b"undated")
            status, head, _ = await r.response()
            dates = [line for line in head.split(b"\r\n") if line.lower().startswith(b"date:")]
            assert status == 200 and len(dates) == 1, head
            stamp = parsedate_to_datetime(dates[0].split(b":", 1)[1].strip().decode())
            assert before - 2 <= stamp.timestamp() <= time.time() + 1
            r.send(GET % b"dated")
            status, head, _ = await r.response()
            dates = [line for line in head.split(b"\r\n") if line.lower().startswith(b"date:")]
            assert dates == [b"DATE: " + origin_date], head
            r.send(b"GET /bad HTTP/1.1\r\nHost: origin.test\r\nContent-Length: x\r\n\r\n")
            status, head, _ = await r.response()  # our own answer (400) is dated too
            assert status == 400 and head.count(b"\r\nDate: ") == 1, head

    run(main())


def test_connection_naming_content_length_cannot_smuggle_a_request() -> None:
    """RFC 9110 §7.6.1: `Connection: content-length` once removed the length from the
    forwarded request, so the origin read the body as a second request the filter and the log
    never saw. The length stays, and the origin sees one request with its body."""
    body = b"GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n"

    async def origin(conn: OriginConn) -> None:
        # Framed as the forwarded head says: with its Content-Length the body is read as one;
        # without it, as the old code sent it, the body's bytes are the next "request" here.
        head = await conn.head()
        lengths = [int(v) for k, v in http_fields(head) if k == b"content-length"]
        conn.requests[-1] += await conn.reader.readexactly(lengths[0] if lengths else 0)
        await conn.send(ok(extra=b"Connection: content-length\r\n"))
        await conn.head()
        await conn.send(ok(b"second"))

    async def main() -> None:
        async with rig(origin) as r:
            r.send(
                b"POST /x HTTP/1.1\r\nHost: origin.test\r\nConnection: content-length\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
            )
            status, head, got = await r.response()
            assert status == 200 and b"Content-Length: 2" in head and got == b"ok", head
            r.send(GET % b"next")
            assert (await r.response())[2] == b"second"
            seen = r.origin_requests()
            assert len(seen) == 2 and seen[0].startswith(b"POST /x "), seen
            assert b"Content-Length: %d\r\n" % len(body) in seen[0] and seen[0].endswith(body)
            assert seen[1].startswith(b"GET /next ")
            assert [rec.url for rec in r.log.records][-2:] == [
                "http://origin.test/x",
                "http://origin.test/next",
            ]

    run(main())


def http_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, _, v in (x.partition(b":") for x in lines if x)]


def test_an_error_page_for_head_has_no_body_and_the_next_response_follows_intact() -> None:
    """RFC 9110 §9.3.2: the 502 for a HEAD request keeps its Content-Length but sends no page,
    which the client would otherwise read as the start of the next pipelined response."""

    async def origin(conn: OriginConn) -> None:
        while True:
            head = await conn.head()
            if head.startswith(b"HEAD"):
                await conn.send(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
                )
            else:
                await conn.send(ok(b"next"))

    async def main() -> None:
        async with rig(origin) as r:
            r.send(b"HEAD /a HTTP/1.1\r\nHost: origin.test\r\n\r\n" + GET % b"b")
            head = await asyncio.wait_for(r.reader.readuntil(b"\r\n\r\n"), WAIT)
            assert head.startswith(b"HTTP/1.1 502 ") and b"Content-Length: " in head, head
            status, _, body = await r.response()
            assert (status, body) == (200, b"next")

    run(main())


def test_max_forwards_zero_is_answered_here_and_a_positive_one_is_decremented() -> None:
    """RFC 9110 §7.6.2: a TRACE or OPTIONS with no hop left is answered by the proxy as the
    final recipient (TRACE reflects it, without credentials, §9.3.8); otherwise the origin
    gets one hop fewer. Other methods carry Max-Forwards untouched."""

    async def main() -> None:
        async with rig(serve_ok) as r:
            r.send(
                b"TRACE /t HTTP/1.1\r\nHost: origin.test\r\nMax-Forwards: 0\r\n"
                b"Cookie: sid=secret\r\nX-A: 1\r\n\r\n"
            )
            status, head, body = await r.response()
            assert status == 200 and b"Content-Type: message/http" in head, head
            assert body.startswith(b"TRACE /t HTTP/1.1\r\n") and b"X-A: 1\r\n" in body
            assert b"secret" not in body
            r.send(b"OPTIONS * HTTP/1.1\r\nHost: origin.test\r\nMax-Forwards: 0\r\n\r\n")
            assert (await r.response())[:3:2] == (200, b"")
            assert r.origin_requests() == []
            r.send(b"OPTIONS * HTTP/1.1\r\nHost: origin.test\r\nMax-Forwards: 3\r\n\r\n")
            assert (await r.response())[2] == b"ok"
            r.send(b"GET /g HTTP/1.1\r\nHost: origin.test\r\nMax-Forwards: 0\r\n\r\n")
            assert (await r.response())[2] == b"ok"
            options, get = r.origin_requests()
            assert b"\r\nMax-Forwards: 2\r\n" in options and b"Max-Forwards: 3" not in options
            assert b"\r\nMax-Forwards: 0\r\n" in get

    run(main())


def test_via_is_added_both_ways_only_when_asked_for() -> None:
    """RFC 9110 §7.6.3 with `proxy.via = true`: one more Via entry on the request (after the
    client's own) and on the response, each naming the version it was received in. Off by
    default: origins change what they send for requests with Via (nginx's gzip_proxied)."""

    async def origin(conn: OriginConn) -> None:
        while True:
            await conn.head()
            await conn.send(b"HTTP/1.0 200 OK\r\nVia: 1.1 cdn\r\nContent-Length: 2\r\n\r\nok")

    async def main(via: bool) -> None:
        async with rig(origin, via=via) as r:
            r.send(b"GET /v HTTP/1.1\r\nHost: origin.test\r\nVia: 1.0 corp\r\n\r\n")
            status, head, _ = await r.response()
            assert status == 200
            (request,) = r.origin_requests()
            vias = [v for k, v in http_fields(request) if k == b"via"]
            assert vias == ([b"1.0 corp", b"1.1 tproxy"] if via else [b"1.0 corp"]), request
            vias = [v for k, v in http_fields(head) if k == b"via"]
            assert vias == ([b"1.1 cdn", b"1.0 tproxy"] if via else [b"1.1 cdn"]), head

    run(main(True))
    run(main(False))


def test_bytes_left_behind_a_spliced_body_are_not_the_next_response() -> None:
    """A spliced body leaves whatever the origin sent after it in the kernel, where the parser
    never saw it: such a connection is not pooled (Upstream.clean), so the pipelined second
    request goes on a fresh connection and gets its own answer."""
    size = 4 << 20  # spliced: over SPLICE_MIN

    async def origin(conn: OriginConn) -> None:
        if conn.index == 0:
            await conn.head()
            await conn.send(ok(b"x" * size) + ok(b"EXTRA-RESPONSE"))
            await asyncio.sleep(5)
        else:
            await serve_ok(conn)

    async def main() -> None:
        async with rig(origin) as r:
            r.send(GET % b"1" + GET % b"2")
            status, _, body = await r.response()
            assert status == 200 and len(body) == size
            assert (await r.response())[2] == b"ok"
            assert r.server.stats.spliced_bodies == 1 and len(r.origin_conns) == 2

    run(main())


def test_an_upload_to_an_origin_that_stops_reading_stays_paused() -> None:
    """asyncio reports a full write buffer once (pause_writing); the client's upload once
    resumed right after the bytes held during the connect, and then buffered without bound."""

    async def main() -> None:
        cfg = config.with_overrides(config.load(None), transparent_upstream=False)
        server = Server(cfg, Records())  # type: ignore[arg-type]
        client, port = await hand_over(server)
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # Ethernet-sized segments: loopback's 64 KiB ones would let the kernel take the bytes
        # held during the connect, and the one pause_writing would come later, when it holds.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        listener.setblocking(False)
        accepted: list[socket.socket] = []
        loop = asyncio.get_running_loop()
        acceptor = loop.create_task(loop.sock_accept(listener))
        acceptor.add_done_callback(lambda t: accepted.append(t.result()[0]))
        total = 64 << 20
        stop = threading.Event()

        def upload() -> None:
            client.setblocking(True)
            with contextlib.suppress(OSError):
                client.sendall(b"POST /u HTTP/1.1\r\nHost: o\r\nContent-Length: %d\r\n\r\n" % total)
                chunk = b"x" * 65536
                while not stop.is_set():
                    client.sendall(chunk)

        sender = threading.Thread(target=upload, daemon=True)
        sender.start()
        try:
            biggest = 0
            for _ in range(20):
                await asyncio.sleep(0.1)
                for conn in server.connections:
                    up = conn.upstream
                    if up is not None and up.transport is not None:
                        biggest = max(biggest, up.transport.get_write_buffer_size())
            assert 0 < biggest < 4 * WRITE_BUFFER_HIGH, biggest
        finally:
            stop.set()
            client.close()
            for conn in list(server.connections):
                conn.abort()
            await server.stop()
            listener.close()
            for s in accepted:
                s.close()
            await asyncio.to_thread(sender.join, 5)

    run(main())


def test_two_clients_never_share_an_upstream_connection_even_from_the_gateways_address() -> None:
    """With transparent_upstream off every upstream connection leaves from the gateway's
    address, but an origin's late byte of one client's answer (or state it ties to the
    connection) must still not reach another client: the pool keeps them apart."""

    class Conn:
        def __init__(self, ip: str) -> None:
            self.client_ip = ip

    for transparent in (False, True):
        cfg = config.with_overrides(config.load(None), transparent_upstream=transparent)
        server = Server(cfg, Records())  # type: ignore[arg-type]
        dst = ("192.0.2.1", 80)
        a, b = Conn("10.0.0.5"), Conn("10.0.0.6")
        assert server.upstream_key(a, dst) != server.upstream_key(b, dst)  # type: ignore[arg-type]
        assert server.upstream_key(a, dst) == server.upstream_key(Conn("10.0.0.5"), dst)  # type: ignore[arg-type]


def test_the_logged_size_is_the_bytes_the_client_got_for_a_chunked_response() -> None:
    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"400\r\n" + b"x" * 0x400 + b"\r\n" + b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
        )  # fmt: skip

    async def main() -> None:
        async with rig(origin) as r:
            r.send(GET % b"c")
            got = await asyncio.wait_for(r.reader.readuntil(b"\r\n0\r\nX-T: 1\r\n\r\n"), WAIT)
            await until(lambda: bool(r.log.records))
            assert r.log.records[0].size == len(got), (r.log.records[0], len(got))

    run(main())
