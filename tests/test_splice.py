"""Response bodies relayed in the kernel (tproxy.splice): exact bytes, framing kept, failures.

The pure part (``ResponseParser.body_passed``) is fed directly; the relay runs in the daemon's
``Server`` in-process with real loopback sockets (tests.test_review_http_shell's rig), under
uvloop as in the daemon and under asyncio's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from tests.test_review_http_shell import GET, OriginConn, reset, rig, until
from tproxy import http1
from tproxy.http1 import Body, EndOfMessage, ResponseHead
from tproxy.splice import LOWAT_MAX, LOWAT_MIN, SPLICE_MIN, batch_lowat

BIG = 3 * SPLICE_MIN + 12345  # several pipe-fulls, not a multiple of anything


def open_fds(kind: str) -> int:
    """This process's descriptors of one kind ("pipe", "socket")."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}").startswith(kind + ":")
    return n


def body(n: int, seed: int = 0) -> bytes:
    return (hashlib.sha256(b"%d" % seed).digest() * (n // 32 + 1))[:n]


def big_response(data: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(data), data)


def on_loops(test: Callable[[], Awaitable[None]]) -> Callable[[str], None]:
    """Run ``test`` under uvloop (the daemon's loop) and asyncio's selector loop."""

    @pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
    def run(loop: str) -> None:
        coro = asyncio.wait_for(test(), 30)
        if loop == "uvloop":
            uvloop.run(coro)
        else:
            asyncio.run(coro)

    run.__name__ = test.__name__
    run.__doc__ = test.__doc__
    return run


# ------------------------------------------------------------------ pure core


def head_and(parser: http1.ResponseParser, length: int, first: bytes) -> list[object]:
    parser.expect(b"GET")
    return list(parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (length, first)))


def test_body_passed_ends_the_message_at_the_last_byte() -> None:
    p = http1.ResponseParser()
    events = head_and(p, 10, b"abc")
    assert isinstance(events[0], ResponseHead)
    assert events[1] == Body(b"abc")
    assert p.length_remaining == 7
    assert p.body_passed(4) == []
    assert p.length_remaining == 3
    assert p.body_passed(3) == [EndOfMessage(())]
    assert p.length_remaining == 0
    assert p.reusable
    # The connection carries on: the next response parses as usual.
    p.expect(b"GET")
    events = list(p.feed(b"HTTP/1.1 204 No Content\r\n\r\n"))
    assert isinstance(events[0], ResponseHead) and events[0].status == 204


@pytest.mark.parametrize("n", [0, -1, 8])
def test_body_passed_refuses_more_than_is_due(n: int) -> None:
    p = http1.ResponseParser()
    head_and(p, 10, b"abc")
    with pytest.raises(ValueError):
        p.body_passed(n)
    assert p.length_remaining == 7  # unchanged


def test_body_passed_refuses_outside_a_length_body() -> None:
    p = http1.ResponseParser()
    p.expect(b"GET")
    p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab")
    assert p.length_remaining == 0
    with pytest.raises(ValueError):
        p.body_passed(1)


@pytest.mark.parametrize(
    ("remaining", "rate", "rcvbuf", "want"),
    [
        (10 << 20, 1e9, 32 << 20, LOWAT_MAX),  # fast: the cap
        (10 << 20, 20e6, 32 << 20, 40_000),  # 2 ms at 20 MB/s
        (100_000, 1e9, 32 << 20, 100_000),  # never more than is still due
        (10 << 20, 1e9, 131_072, 32_768),  # a quarter of the buffer: no window clamp
        (10 << 20, 1e6, 32 << 20, 1),  # slow: every byte (2 ms is 2 KB)
        (LOWAT_MIN - 1, 1e9, 32 << 20, 1),  # a tail below the floor
        (10 << 20, 0.0, 32 << 20, 1),  # nothing measured yet
    ],
)
def test_batch_lowat(remaining: int, rate: float, rcvbuf: int, want: int) -> None:
    assert batch_lowat(remaining, rate, rcvbuf) == want


# ------------------------------------------------------------------ the relay


async def _exact_bodies_on_a_reused_connection() -> None:
    """Two large bodies on one keep-alive connection: each arrives byte for byte, the origin
    connection is pooled and reused after a spliced body, and the access log counts every
    byte sent."""
    bodies = [body(BIG, 1), body(BIG + 1, 2)]

    async def origin(conn: OriginConn) -> None:
        for data in bodies:
            await conn.head()
            await conn.send(big_response(data))
        await conn.head()

    async with rig(origin) as r:
        for i, data in enumerate(bodies):
            r.send(GET % b"big%d" % i)
            status, head, got = await r.response()
            assert status == 200
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            assert r.log.records[-1].size == len(head) + len(data)
        stats = r.server.stats
        assert stats.spliced_bodies == 2
        # The first bytes of each body came with the head, through user space.
        assert 2 * BIG - 2 * SPLICE_MIN < stats.spliced_bytes <= 2 * BIG + 1
        assert len(r.origin_conns) == 1


test_exact_bodies_on_a_reused_connection = on_loops(_exact_bodies_on_a_reused_connection)


async def _bytes_after_the_body_stay_in_the_socket() -> None:
    """The relay takes exactly Content-Length bytes: what the origin sends after the body
    (here an unsolicited response, RFC 9112 §6.3) is never relayed, and that connection is not
    used again."""
    data = body(BIG, 3)

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(big_response(data) + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await conn.head()
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfake")

    async def fresh(conn: OriginConn) -> None:
        if conn.index == 0:
            await origin(conn)
            return
        await conn.head()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood")

    async with rig(fresh) as r:
        r.send(GET % b"big")
        status, _, got = await r.response()
        assert status == 200 and got == data
        assert r.server.stats.spliced_bodies == 1
        await asyncio.sleep(0.1)  # the stray bytes reach the proxy and condemn the connection
        r.send(GET % b"next")
        assert (await r.response())[2] == b"good"
        assert len(r.origin_conns) == 2


test_bytes_after_the_body_stay_in_the_socket = on_loops(_bytes_after_the_body_stay_in_the_socket)


async def _origin_closing_mid_body_ends_the_client_connection() -> None:
    """RFC 9112 §8: a body cut short must reach the client as an incomplete message (the
    connection ends early), never as a shorter complete one; the log marks it aborted."""
    data = body(BIG, 4)

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(big_response(data)[: 2 * SPLICE_MIN])
        conn.writer.close()

    async with rig(origin) as r:
        r.send(GET % b"cut")
        got = await r.rest()
        assert got.startswith(b"HTTP/1.1 200 OK")
        assert len(got) < len(big_response(data))
        await until(lambda: bool(r.log.records))
        assert r.log.records[-1].result.endswith("_ABORTED")
        await until(lambda: r.server.stats.connections_active == 0)


test_origin_closing_mid_body_ends_the_client_connection = on_loops(
    _origin_closing_mid_body_ends_the_client_connection
)


async def _client_reset_mid_body_releases_everything() -> None:
    """A client that resets during a spliced body: the origin connection is closed (not
    pooled with half a body in it) and no descriptor (pipe, duplicates) is left behind."""
    data = body(8 * SPLICE_MIN, 5)
    origin_done = asyncio.Event()

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        try:
            conn.writer.write(big_response(data))
            await conn.writer.drain()
            await conn.reader.read()  # until the proxy closes its end
        finally:
            origin_done.set()

    async with rig(origin) as r:
        pipes, sockets = open_fds("pipe"), open_fds("socket")
        r.send(GET % b"big")
        await r.reader.readexactly(SPLICE_MIN)
        await until(lambda: r.server.stats.spliced_bytes > 0)
        assert open_fds("pipe") == pipes + 2  # the relay's pipe
        reset(r.writer)
        r.sock.close()  # the rig's blocking duplicate: now the socket really goes (RST)
        await asyncio.wait_for(origin_done.wait(), 5)
        await until(lambda: r.server.stats.connections_active == 0)
        assert r.server.pool.count == 0
        assert r.server.stats.spliced_bodies == 0
        # The pipe and both duplicates are gone, and so are the three client-side sockets.
        await until(lambda: open_fds("pipe") == pipes and open_fds("socket") <= sockets - 3)


test_client_reset_mid_body_releases_everything = on_loops(
    _client_reset_mid_body_releases_everything
)


async def _chunked_and_small_bodies_stay_in_user_space() -> None:
    """Only a Content-Length body with at least SPLICE_MIN to go is spliced: a chunked one is
    re-framed by the proxy, a small one is not worth a pipe."""
    data = body(BIG, 6)
    chunked = b"".join(
        b"%x\r\n%b\r\n" % (len(data[i : i + 65536]), data[i : i + 65536])
        for i in range(0, len(data), 65536)
    )

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n"
        )
        await conn.head()
        await conn.send(big_response(data[: SPLICE_MIN // 2]))
        await conn.head()

    async with rig(origin) as r:
        r.send(GET % b"chunked")
        head = await r.reader.readuntil(b"\r\n\r\n")
        assert b"chunked" in head.lower()
        got = b""
        while size := int(await r.reader.readuntil(b"\r\n"), 16):
            got += (await r.reader.readexactly(size + 2))[:-2]
        assert await r.reader.readexactly(2) == b"\r\n"
        assert got == data
        r.send(GET % b"small")
        assert (await r.response())[2] == data[: SPLICE_MIN // 2]
        assert r.server.stats.spliced_bodies == 0
        assert r.server.stats.spliced_bytes == 0


test_chunked_and_small_bodies_stay_in_user_space = on_loops(
    _chunked_and_small_bodies_stay_in_user_space
)


def test_the_relay_is_not_left_with_open_descriptors_after_many_bodies() -> None:
    """Each body's pipe and duplicated descriptors are closed when it ends."""

    async def main() -> None:
        data = body(2 * SPLICE_MIN, 7)

        async def origin(conn: OriginConn) -> None:
            while True:
                await conn.head()
                await conn.send(big_response(data))

        async with rig(origin) as r:
            r.send(GET % b"warm")
            await r.response()
            before = open_fds("pipe"), open_fds("socket")
            for i in range(20):
                r.send(GET % b"%d" % i)
                assert (await r.response())[2] == data
            assert (open_fds("pipe"), open_fds("socket")) == before
            assert r.server.stats.spliced_bodies == 21

    uvloop.run(asyncio.wait_for(main(), 30))


async def _a_slowed_origin_is_not_held_back_by_batching() -> None:
    """Batching waits for a batch the size of 2 ms at the rate seen so far; when the origin
    slows down after a fast start, its bytes must still reach the client at once, not sit
    in the socket until a batch that size has gathered (LOWAT_WAIT)."""
    data = body(4 * SPLICE_MIN, 8)
    response = big_response(data)
    head_len = len(response) - len(data)
    fast = head_len + 3 * SPLICE_MIN
    sent_slow = asyncio.Event()
    more = asyncio.Event()

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(response[:fast])
        await asyncio.sleep(0.3)
        await conn.send(response[fast : fast + 1000])
        sent_slow.set()
        await more.wait()
        await conn.send(response[fast + 1000 :])
        await conn.head()

    async with rig(origin) as r:
        r.send(GET % b"slow")
        await r.reader.readuntil(b"\r\n\r\n")  # the head (the proxy adds a Date)
        assert (await r.reader.readexactly(3 * SPLICE_MIN)) == data[: 3 * SPLICE_MIN]
        assert r.server.stats.spliced_bytes > 0
        await sent_slow.wait()
        got = await asyncio.wait_for(r.reader.readexactly(1000), 0.5)
        assert got == response[fast : fast + 1000]
        more.set()
        rest = await r.reader.readexactly(len(response) - fast - 1000)
        assert rest == response[fast + 1000 :]
        assert r.server.stats.spliced_bodies == 1


test_a_slowed_origin_is_not_held_back_by_batching = on_loops(
    _a_slowed_origin_is_not_held_back_by_batching
)


async def _the_origin_connection_dropped_mid_body_ends_the_client_response() -> None:
    """When the proxy itself drops the origin connection during a spliced body (here by
    hand, as shutdown or an error path would), the relay stops and the client's response
    is cut short and logged aborted - it is not left waiting for bytes that cannot come."""
    data = body(8 * SPLICE_MIN, 9)
    hold = asyncio.Event()

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(big_response(data)[: 2 * SPLICE_MIN])
        await hold.wait()

    async with rig(origin) as r:
        r.send(GET % b"big")
        await until(lambda: r.server.stats.spliced_bytes > 0)
        (conn,) = r.server.connections
        assert conn.splice is not None and conn.upstream is not None
        conn.upstream.abort()
        got = await r.rest()
        assert len(got) < len(data)
        assert conn.splice is None and conn.closed
        await until(lambda: bool(r.log.records))
        assert r.log.records[-1].result.endswith("_ABORTED")
        hold.set()


test_the_origin_connection_dropped_mid_body_ends_the_client_response = on_loops(
    _the_origin_connection_dropped_mid_body_ends_the_client_response
)
