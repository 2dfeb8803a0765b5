"""A malformed request answered with 400 while the client is still sending (RFC 9112 §9.6).

Closing at once with the client's later bytes arriving (or already unread in the receive
queue) makes the kernel answer with a reset, and a reset discards what the client had not read
yet: the 400 itself. The proxy must close in stages instead (half-close behind the answer,
read and drop for a while), as it already does after an early answer to an upload.
Real sockets on loopback, the daemon's Server in-process (tests.test_review_http_shell's rig).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from tests.test_review_http_shell import GET, OriginConn, rig, run, serve_ok, until
from tproxy.httpconn import LINGER_IDLE

UPLOAD = 1024 * 1024
PIECE = b"x" * 65536
# The response before the bad request, left unread: the client's small receive buffer is full,
# so the 400 behind it is still in the proxy's send queue when the proxy would close, and the
# reset that the client's further bytes provoke then discards it (tcp_close() with unread
# data, or data arriving at a closed socket: tcp_reset() drops the write queue).
FIRST = 40_000
CHUNKED_POST = b"POST /up HTTP/1.1\r\nHost: origin.test\r\nTransfer-Encoding: chunked\r\n\r\n"


def client(s: socket.socket, bad: bytes) -> bytes:
    """A simple pipelining client that writes a whole request before it reads anything
    (Python's http.client, curl without Expect), carrying on after the part the proxy
    refuses, then reads all it was sent."""
    with s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(GET % b"first")
        time.sleep(0.2)  # the first response arrives and waits, unread
        s.sendall(bad)
        sent = 0
        try:
            while sent < UPLOAD:
                s.sendall(PIECE)
                sent += len(PIECE)
                time.sleep(0.001)
        except OSError:
            pass  # the proxy may stop listening; what matters is that the 400 can be read
        # Reading now: a window that can open wide again (else the proxy's zero-window
        # probes, backing off from 200 ms, pace the rest).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def first_then_wait(conn_bodies: list[bytes]) -> Callable[[OriginConn], Awaitable[None]]:
    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % FIRST + b"y" * FIRST)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await conn.head()
            while data := await conn.reader.read(65536):
                conn_bodies.append(data)

    return origin


@pytest.mark.parametrize(
    "bad",
    [
        CHUNKED_POST + b"4\r\nabcd\r\nzz\r\n",  # not a chunk size
        CHUNKED_POST + b"5\r\nabcdeXX",  # chunk data not followed by CRLF
        # A malformed head (RFC 9112 §6.3: both framings), its body still coming behind it.
        b"POST /up HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz",
    ],
    ids=["chunk-size", "chunk-crlf", "head"],
)
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_client_still_sending_after_a_bad_request_reads_the_whole_400(
    bad: bytes, loop: str
) -> None:
    seen: list[bytes] = []

    async def main() -> None:
        async with rig(first_then_wait(seen)) as r:
            r.writer.transport.pause_reading()  # this test's client is the blocking socket
            out = await asyncio.to_thread(client, r.sock, bad)
            r.writer.close()  # the client's last descriptor: its FIN ends the lingering
            await until(lambda: not r.server.connections, timeout=LINGER_IDLE * 2)
            assert [rec.status for rec in r.log.records] == [200, 400]

        first = b"y" * FIRST
        assert out.startswith(b"HTTP/1.1 200 ") and first in out
        second = out[out.index(first) + FIRST :]
        assert second.startswith(b"HTTP/1.1 400 ")
        head_end = second.index(b"\r\n\r\n") + 4
        length = int(second.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
        assert len(second) == head_end + length  # the whole page, then the proxy's FIN
        assert b"Connection: close" in second[:head_end]
        # The origin never saw a complete request with the bad body.
        assert b"zz" not in b"".join(seen) and b"XX" not in b"".join(seen)

    coro = asyncio.wait_for(main(), 30)
    if loop == "uvloop":
        uvloop.run(coro)
    else:
        asyncio.run(coro)


def test_a_client_that_stops_sending_after_the_400_is_closed_without_waiting() -> None:
    """A client that half-closes after reading its 400 ends the lingering at once; one that
    neither sends nor closes is closed after LINGER_IDLE, not kept."""

    async def main() -> None:
        async with rig(serve_ok) as r:
            r.send(
                b"POST /up HTTP/1.1\r\nHost: origin.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"zz\r\n"
            )
            status, _, _ = await r.response()
            assert status == 400
            assert await r.rest() == b""  # the proxy's FIN right behind the page
            started = time.monotonic()
            r.writer.write_eof()
            await until(lambda: not r.server.connections, timeout=LINGER_IDLE)
            assert time.monotonic() - started < LINGER_IDLE / 2

        async with rig(serve_ok) as r:
            r.send(
                b"POST /up HTTP/1.1\r\nHost: origin.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"zz\r\n"
            )
            assert (await r.response())[0] == 400
            await until(lambda: not r.server.connections, timeout=LINGER_IDLE * 2)

    run(main())


def test_the_hooks_of_an_exchange_with_a_bad_body_are_told_it_ended() -> None:
    """An exchange that ends in a 400 for its malformed body still ends for the policy
    hooks: its on_finish runs (the cache's leading fetch releases the requests collapsed on
    it, which would otherwise wait for good)."""
    finished: list[str] = []

    def hook(conn: Any, ex: Any) -> bool:
        ex.on_finish = lambda ex: finished.append(ex.url)
        return False

    async def main() -> None:
        async with rig(serve_ok) as r:
            r.server.request_hooks.append(hook)
            r.send(CHUNKED_POST + b"zz\r\n")
            assert (await r.response())[0] == 400
            assert finished == ["http://origin.test/up"]

    run(main())
