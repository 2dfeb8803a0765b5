"""Adversarial review of the kernel relay of response bodies (tproxy.splice in httpconn).

Each case runs the daemon's ``Server`` in-process with real loopback sockets
(tests.test_review_http_shell's rig), under uvloop (the daemon's loop) and asyncio's own, and
attacks one edge of a spliced body: what may not splice (HEAD, 304), what comes before or after
it (1xx, a pipelined request, a half-close), timeouts while it runs, a client that stops
reading, an origin that trickles or resets, running out of descriptors, shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import resource
import socket
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.inproc import hand_over
from tests.test_review_http_shell import GET, OriginConn, reset, rig, until
from tests.test_splice import big_response, body, on_loops, open_fds
from tproxy import http1
from tproxy.http1 import Body, EndOfMessage
from tproxy.splice import SPLICE_MIN

BIG = 2 * SPLICE_MIN + 777


async def send_in_two(conn: OriginConn, response: bytes, wait: float | asyncio.Event) -> None:
    """The first 2 MiB of ``response``, then after ``wait`` (seconds, or an event) the rest:
    the relay is under way and waiting on the origin when the end comes."""
    await conn.send(response[: 2 * SPLICE_MIN])
    if isinstance(wait, asyncio.Event):
        await wait.wait()
    else:
        await asyncio.sleep(wait)
    await conn.send(response[2 * SPLICE_MIN :])


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# ------------------------------------------------------------------ chunk framing (pure)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_chunk_pieces_frame_what_the_parser_reads_back(pieces: list[bytes]) -> None:
    """The pieces of each chunk, sent as they are (a gather write) or joined
    (encode_chunk), are one chunked body the response parser reads back unchanged."""
    assert all(http1.encode_chunk(p) == b"".join(http1.chunk_pieces(p)) for p in pieces)
    wire = b"".join(b"".join(http1.chunk_pieces(p)) for p in pieces) + http1.LAST_CHUNK
    parser = http1.ResponseParser()
    parser.expect(b"GET")
    events = parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + wire)
    assert b"".join(e.data for e in events if isinstance(e, Body)) == b"".join(pieces)
    assert isinstance(events[-1], EndOfMessage)


def test_an_empty_piece_is_no_chunk_at_all() -> None:
    """A zero-size chunk is the last chunk (RFC 9112 §7.1): empty data must frame to nothing."""
    assert http1.chunk_pieces(b"") == (b"", b"", b"")
    assert http1.chunk_pieces(b"\x00" * 26) == (b"1a\r\n", b"\x00" * 26, b"\r\n")


# ------------------------------------------------------------------ what may not splice


async def _head_and_304_with_a_large_content_length_carry_no_body() -> None:
    """RFC 9112 §6.3 items 1-2: a response to HEAD and a 304 end at their head whatever
    Content-Length says; nothing may be spliced for them, and the connection goes on."""

    async def origin(conn: OriginConn) -> None:
        while True:
            head = await conn.head()
            if head.startswith(b"HEAD"):
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (8 * BIG))
            elif b"/etag" in head:
                await conn.send(
                    b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n'
                    b"Content-Length: %d\r\n\r\n" % (8 * BIG)
                )
            else:
                await conn.send(big_response(b"after"))

    async with rig(origin) as r:
        r.send(b"HEAD /h HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        head = await r.reader.readuntil(b"\r\n\r\n")  # a HEAD response: no body follows
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: %d" % (8 * BIG) in head
        r.send(b'GET /etag HTTP/1.1\r\nHost: origin.test\r\nIf-None-Match: "x"\r\n\r\n')
        assert (await r.response())[0] == 304
        r.send(GET % b"next")
        assert (await r.response())[2] == b"after"
        assert r.server.stats.spliced_bodies == 0 and r.server.stats.spliced_bytes == 0
        assert len(r.origin_conns) == 1


test_head_and_304_with_a_large_content_length_carry_no_body = on_loops(
    _head_and_304_with_a_large_content_length_carry_no_body
)


async def _interim_responses_before_a_large_body() -> None:
    """1xx responses (RFC 9110 §15.2) go to the client before the final head, and the large
    body behind them is still relayed whole (and spliced)."""
    data = body(BIG, 11)

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
        await asyncio.sleep(0.05)
        await conn.send(b"HTTP/1.1 102 Processing\r\n\r\n" + big_response(data))
        await conn.head()

    async with rig(origin) as r:
        r.send(GET % b"hints")
        first = await r.reader.readuntil(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 103 ")
        second = await r.reader.readuntil(b"\r\n\r\n")
        assert second.startswith(b"HTTP/1.1 102 ")
        status, _, got = await r.response()
        assert status == 200 and sha(got) == sha(data)
        assert r.server.stats.spliced_bodies == 1


test_interim_responses_before_a_large_body = on_loops(_interim_responses_before_a_large_body)


async def _a_declined_upgrade_with_a_large_body() -> None:
    """A request asking to Upgrade that the origin declines with an ordinary large response:
    the body is relayed whole and the connection stays HTTP."""
    data = body(BIG, 12)

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(big_response(data))
        await conn.head()
        await conn.send(big_response(b"plain"))

    async with rig(origin) as r:
        r.send(
            b"GET /ws HTTP/1.1\r\nHost: origin.test\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\n"
        )
        status, _, got = await r.response()
        assert status == 200 and sha(got) == sha(data)
        r.send(GET % b"next")
        assert (await r.response())[2] == b"plain"


test_a_declined_upgrade_with_a_large_body = on_loops(_a_declined_upgrade_with_a_large_body)


# ------------------------------------------------------------------ around the body


async def _a_pipelined_request_waits_behind_a_spliced_body() -> None:
    """Requests pipelined behind one whose body is spliced are answered after it, in order,
    byte for byte (RFC 9112 §9.3.2)."""
    bodies = [body(BIG, 13), b"small", body(BIG + 5, 14)]

    async def origin(conn: OriginConn) -> None:
        for data in bodies:
            await conn.head()
            await conn.send(big_response(data))
        await conn.head()

    async with rig(origin) as r:
        r.send(GET % b"a" + GET % b"b" + GET % b"c")
        for data in bodies:
            status, _, got = await r.response()
            assert status == 200 and sha(got) == sha(data)
        assert r.server.stats.spliced_bodies == 2
        assert [req.split(b" ")[1] for req in r.origin_requests()] == [b"/a", b"/b", b"/c"]


test_a_pipelined_request_waits_behind_a_spliced_body = on_loops(
    _a_pipelined_request_waits_behind_a_spliced_body
)


async def _a_client_half_close_during_a_spliced_body() -> None:
    """A client that sends its request and shuts down its sending side (SHUT_WR) still gets
    the whole body; the proxy closes afterwards (nothing more can come)."""
    data = body(4 * SPLICE_MIN, 15)
    release = asyncio.Event()

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        response = big_response(data)
        await send_in_two(conn, response, release)
        await conn.head()

    async with rig(origin) as r:
        r.send(GET % b"big")
        await until(lambda: r.server.stats.spliced_bytes > 0)
        r.writer.write_eof()
        await asyncio.sleep(0.05)
        release.set()
        status, _, got = await r.response()
        assert status == 200 and sha(got) == sha(data)
        assert await r.rest() == b""
        await until(lambda: not r.server.connections)
        assert [(rec.status, rec.result) for rec in r.log.records] == [(200, "TCP_MISS")]


test_a_client_half_close_during_a_spliced_body = on_loops(
    _a_client_half_close_during_a_spliced_body
)


# ------------------------------------------------------------------ timeouts


async def _idle_timeout_while_bytes_move_and_when_they_stop() -> None:
    """idle_timeout bounds a stall, not a slow transfer: a spliced body that trickles for
    longer than it completes; one whose origin then falls silent is cut at idle_timeout."""
    data = body(SPLICE_MIN + 400_000, 16)
    response = big_response(data)
    head_len = len(response) - len(data)

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(response[:head_len])
        for i in range(0, len(data), 100_000):
            await conn.send(data[i : i + 100_000])
            await asyncio.sleep(0.05)
        await conn.head()
        await conn.send(response[: head_len + 50_000])
        await asyncio.sleep(5)

    async with rig(origin, idle_timeout=0.3, response_timeout=0.2) as r:
        started = time.monotonic()
        r.send(GET % b"slow")
        status, _, got = await r.response()
        assert status == 200 and sha(got) == sha(data)
        assert time.monotonic() - started > 0.5  # longer than idle_timeout, and it finished
        assert r.server.stats.spliced_bodies == 1
        r.send(GET % b"stall")
        got = await r.rest()
        assert len(got) < len(response)
        assert r.log.records[-1].result == "TCP_MISS_ABORTED"


test_idle_timeout_while_bytes_move_and_when_they_stop = on_loops(
    _idle_timeout_while_bytes_move_and_when_they_stop
)


async def _a_stalled_spliced_body_is_cut_at_idle_timeout() -> None:
    """The origin falls silent in the middle of a spliced body: the client's response is cut
    (an abort) at idle_timeout, logged aborted, and everything is released."""
    data = body(4 * SPLICE_MIN, 17)

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(big_response(data)[: 2 * SPLICE_MIN])
        await asyncio.sleep(5)

    async with rig(origin, idle_timeout=0.3) as r:
        pipes = open_fds("pipe")
        r.send(GET % b"stall")
        await until(lambda: r.server.stats.spliced_bytes > 0)
        started = time.monotonic()
        got = await r.rest()
        assert 0.2 < time.monotonic() - started < 2
        assert len(got) < len(data)
        await until(lambda: not r.server.connections)
        assert r.log.records[-1].result == "TCP_MISS_ABORTED"
        assert open_fds("pipe") == pipes


test_a_stalled_spliced_body_is_cut_at_idle_timeout = on_loops(
    _a_stalled_spliced_body_is_cut_at_idle_timeout
)


# ------------------------------------------------------------------ back-pressure, pieces


async def _a_client_that_stops_reading_pauses_the_origin() -> None:
    """A client that stops reading: the origin must be held back (its bytes wait in the
    kernel's buffers and the one pipe, not in the proxy's memory), and the body continues
    whole when the client reads again."""
    data = body(48 * SPLICE_MIN, 18)
    drained = [0]

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        response = big_response(data)
        for i in range(0, len(response), 256 * 1024):
            await conn.send(response[i : i + 256 * 1024])
            drained[0] = i
        await conn.head()

    async with rig(origin) as r:
        r.send(GET % b"big")
        await r.reader.readuntil(b"\r\n\r\n")
        got = await r.reader.readexactly(SPLICE_MIN)
        r.writer.transport.pause_reading()
        await until(lambda: r.server.stats.spliced_bytes > 0)
        await asyncio.sleep(0.3)
        first = drained[0]
        await asyncio.sleep(0.3)
        assert drained[0] == first  # held back
        assert first < 32 * SPLICE_MIN
        (conn,) = r.server.connections
        assert conn.transport is not None and conn.transport.get_write_buffer_size() == 0
        r.writer.transport.resume_reading()
        got += await r.reader.readexactly(len(data) - SPLICE_MIN)
        assert sha(got) == sha(data)
        assert r.server.stats.spliced_bodies == 1


test_a_client_that_stops_reading_pauses_the_origin = on_loops(
    _a_client_that_stops_reading_pauses_the_origin
)


async def _an_origin_sending_tiny_pieces() -> None:
    """An origin that writes its body a few hundred bytes at a time (each its own segment):
    every byte arrives, in order, and the relay still ends exactly at Content-Length."""
    data = body(SPLICE_MIN + 100_000, 19)
    response = big_response(data)

    async def origin(conn: OriginConn) -> None:
        sock = conn.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await conn.head()
        cut = len(response) - SPLICE_MIN - 50_000
        await conn.send(response[:cut])
        for i in range(cut, len(response), 700):
            conn.writer.write(response[i : i + 700])
            if i % 70_000 < 700:
                await conn.writer.drain()
                await asyncio.sleep(0.001)
        await conn.writer.drain()
        await conn.head()
        await conn.send(big_response(b"next"))

    async with rig(origin) as r:
        r.send(GET % b"tiny")
        status, _, got = await r.response()
        assert status == 200 and sha(got) == sha(data)
        assert r.server.stats.spliced_bodies == 1
        r.send(GET % b"next")
        assert (await r.response())[2] == b"next"
        assert len(r.origin_conns) == 1


test_an_origin_sending_tiny_pieces = on_loops(_an_origin_sending_tiny_pieces)


# ------------------------------------------------------------------ failures


async def _an_origin_reset_mid_body() -> None:
    """An origin that resets in the middle of a spliced body: the client sees its response
    end early (never a shorter complete one), the log says aborted, nothing is left open."""
    data = body(6 * SPLICE_MIN, 20)

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(big_response(data)[: 3 * SPLICE_MIN])
        await asyncio.sleep(0.1)
        conn.reset()

    async with rig(origin) as r:
        pipes = open_fds("pipe")
        r.send(GET % b"rst")
        got = await r.rest()
        assert got.startswith(b"HTTP/1.1 200 ") and len(got) < len(big_response(data))
        await until(lambda: not r.server.connections)
        assert [rec.result for rec in r.log.records] == ["TCP_MISS_ABORTED"]
        assert r.server.pool.count == 0
        assert open_fds("pipe") == pipes


test_an_origin_reset_mid_body = on_loops(_an_origin_reset_mid_body)


async def _out_of_descriptors_falls_back_to_the_ordinary_relay() -> None:
    """With the process's descriptor table full the relay's pipe cannot be made (EMFILE):
    the body goes through the ordinary relay instead, whole."""
    data = body(BIG, 21)

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(big_response(b"warm"))
        await conn.head()
        await conn.send(big_response(data))
        await conn.head()

    async with rig(origin) as r:
        r.send(GET % b"warm")  # the origin connection exists before the table fills
        assert (await r.response())[2] == b"warm"
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_count() + 64, hard))
        try:
            with contextlib.suppress(OSError):
                while True:
                    fillers.append(os.open("/dev/null", os.O_RDONLY))
            assert fillers
            r.send(GET % b"big")
            status, _, got = await r.response()
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert status == 200 and sha(got) == sha(data)
        assert r.server.stats.spliced_bodies == 0


def open_count() -> int:
    return max(int(fd) for fd in os.listdir("/proc/self/fd"))


test_out_of_descriptors_falls_back_to_the_ordinary_relay = on_loops(
    _out_of_descriptors_falls_back_to_the_ordinary_relay
)


# ------------------------------------------------------------------ the log, shutdown


async def _the_access_log_of_a_spliced_exchange() -> None:
    """Squid's size is head + body bytes sent, elapsed covers the whole body."""
    data = body(3 * SPLICE_MIN, 22)
    response = big_response(data)

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await send_in_two(conn, response, 0.3)
        await conn.head()

    async with rig(origin) as r:
        r.send(GET % b"log")
        _, head, got = await r.response()
        assert sha(got) == sha(data)
        (rec,) = r.log.records
        assert (rec.status, rec.result, rec.size) == (200, "TCP_MISS", len(head) + len(data))
        assert rec.elapsed_ms >= 300
        assert r.server.stats.spliced_bodies == 1
        (conn,) = r.server.connections
        assert conn.bytes_out == len(head) + len(data)


test_the_access_log_of_a_spliced_exchange = on_loops(_the_access_log_of_a_spliced_exchange)


async def _draining_during_a_spliced_body() -> None:
    """A graceful stop (Server.drain) lets a spliced body in flight finish, then closes the
    client connection and does not pool the origin connection."""
    data = body(4 * SPLICE_MIN, 23)
    response = big_response(data)

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await send_in_two(conn, response, 0.3)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await conn.head()

    async with rig(origin) as r:
        r.send(GET % b"drain")
        await until(lambda: r.server.stats.spliced_bytes > 0)
        drain = asyncio.ensure_future(r.server.drain(5))
        status, _, got = await r.response()
        assert status == 200 and sha(got) == sha(data)
        assert await r.rest() == b""
        await drain
        assert not r.server.connections and r.server.pool.count == 0
        assert [rec.result for rec in r.log.records] == ["TCP_MISS"]


test_draining_during_a_spliced_body = on_loops(_draining_during_a_spliced_body)


async def _stop_with_a_short_drain_cuts_a_spliced_body() -> None:
    """A drain that runs out while a body is still spliced aborts it: the client sees it cut
    short, it is logged aborted, and no pipe or duplicate is left behind."""
    data = body(4 * SPLICE_MIN, 24)

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await conn.send(big_response(data)[: 2 * SPLICE_MIN])
        await asyncio.sleep(5)

    async with rig(origin) as r:
        pipes = open_fds("pipe")
        r.send(GET % b"cut")
        await until(lambda: r.server.stats.spliced_bytes > 0)
        await r.server.drain(0.2)
        got = await r.rest()
        assert len(got) < len(data)
        await until(lambda: not r.server.connections)
        assert [rec.result for rec in r.log.records] == ["TCP_MISS_ABORTED"]
        assert open_fds("pipe") == pipes


test_stop_with_a_short_drain_cuts_a_spliced_body = on_loops(
    _stop_with_a_short_drain_cuts_a_spliced_body
)


# ------------------------------------------------------------------ defects found


async def _a_malformed_upload_during_a_spliced_response() -> None:
    """The origin answers an upload early with a large body (spliced) and the rest of the
    upload turns out malformed. No 400 can follow a response already under way: the client
    must see that response end incomplete (RFC 9112 §8, as for any broken response), the
    exchange must still be logged (aborted) and its hooks told, and nothing is left."""
    data = body(6 * SPLICE_MIN, 25)
    finished: list[int] = []

    def hook(conn: Any, ex: Any) -> bool:
        ex.on_finish = lambda ex: finished.append(ex.status)
        return False

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        response = big_response(data)
        await conn.send(response[: 2 * SPLICE_MIN])
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while await conn.reader.read(65536):
                pass

    async with rig(origin) as r:
        r.server.request_hooks.append(hook)
        pipes = open_fds("pipe")
        r.send(
            b"POST /up HTTP/1.1\r\nHost: origin.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"4\r\nabcd\r\n"
        )
        await until(lambda: r.server.stats.spliced_bytes > 0)
        r.send(b"zz\r\n")  # not a chunk size
        got = await r.rest()
        assert len(got) < len(data)
        await until(lambda: not r.server.connections)
        assert [(rec.status, rec.result) for rec in r.log.records] == [(200, "TCP_MISS_ABORTED")]
        assert finished == [200]
        assert open_fds("pipe") == pipes
        assert r.server.stats.bad_requests == 1


test_a_malformed_upload_during_a_spliced_response = on_loops(
    _a_malformed_upload_during_a_spliced_response
)


async def _a_failure_at_the_end_of_a_spliced_body_ends_that_connection() -> None:
    """A bug met while handling the end of a spliced body (here: a policy hook raising in
    on_finish) must end that connection at once, logged, as the same bug met in the ordinary
    relay does (ClientConnection.data_received) - not escape to the event loop and leave the
    client waiting until idle_timeout."""
    data = body(BIG, 26)

    def hook(conn: Any, ex: Any) -> bool:
        def boom(ex: Any) -> None:
            raise RuntimeError("hook bug")

        ex.on_finish = boom
        return False

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        response = big_response(data)
        await send_in_two(conn, response, 0.05)  # the end comes while the relay waits for it
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await conn.head()

    loop = asyncio.get_running_loop()
    escaped: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda loop, context: escaped.append(context))
    async with rig(origin, idle_timeout=60) as r:
        r.server.request_hooks.append(hook)
        r.send(GET % b"big")
        got = await r.rest(timeout=3)
        assert got.startswith(b"HTTP/1.1 200 ")
        assert r.server.stats.spliced_bytes > 0
        await until(lambda: not r.server.connections, timeout=1)
        assert r.server.pool.count == 0
    assert escaped == []


test_a_failure_at_the_end_of_a_spliced_body_ends_that_connection = on_loops(
    _a_failure_at_the_end_of_a_spliced_body_ends_that_connection
)


async def _the_log_counts_every_byte_of_a_cut_spliced_body() -> None:
    """An origin that closes (or resets) mid-body: the bytes the relay had already handed to
    the client before it met the end are counted - in the access log's size, the connection's
    bytes and the spliced-bytes counter - not dropped with the failure."""
    data = body(8 * SPLICE_MIN, 27)
    response = big_response(data)

    for how in ("close", "reset"):

        async def origin(conn: OriginConn) -> None:
            await conn.head()
            await conn.send(response[:SPLICE_MIN])
            await asyncio.sleep(0.05)  # the relay is set up and waiting for more
            conn.writer.write(response[SPLICE_MIN : 5 * SPLICE_MIN])
            if how == "reset":  # noqa: B023
                await asyncio.sleep(0.05)
                conn.reset()
            else:
                conn.writer.close()

        async with rig(origin) as r:
            r.send(GET % b"cut")
            got = await r.rest()
            assert len(got) < len(response)
            await until(lambda: bool(r.log.records))
            (rec,) = r.log.records
            assert rec.result == "TCP_MISS_ABORTED"
            assert rec.size == len(got), how
            assert r.server.stats.bytes_out == len(got)
            assert r.server.stats.spliced_bytes > 0


test_the_log_counts_every_byte_of_a_cut_spliced_body = on_loops(
    _the_log_counts_every_byte_of_a_cut_spliced_body
)


async def _a_pipelined_request_then_a_half_close_during_a_spliced_body() -> None:
    """The client pipelines a second (complete) request while the first one's body is still
    being relayed, then shuts down its sending side: both requests are answered, in order
    (RFC 9112 §9.3.2; the half-close only says no third request follows), then the proxy
    closes."""
    data = body(BIG, 29)
    response = big_response(data)

    async def origin(conn: OriginConn) -> None:
        await conn.head()
        await send_in_two(conn, response, 0.1)
        await conn.head()
        await conn.send(big_response(b"second"))
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await conn.head()

    async with rig(origin) as r:
        r.send(GET % b"a")
        await until(lambda: r.server.stats.spliced_bytes > 0)
        r.send(GET % b"b")
        r.writer.write_eof()
        status, _, got = await r.response()
        assert status == 200 and sha(got) == sha(data)
        assert (await r.response())[:3:2] == (200, b"second")
        assert await r.rest() == b""
        assert [(rec.status, rec.url) for rec in r.log.records] == [
            (200, "http://origin.test/a"),
            (200, "http://origin.test/b"),
        ]
        assert r.server.stats.bad_requests == 0


test_a_pipelined_request_then_a_half_close_during_a_spliced_body = on_loops(
    _a_pipelined_request_then_a_half_close_during_a_spliced_body
)


def test_eof_behind_a_complete_pipelined_request_is_no_error() -> None:
    """The pure side of the case above: EOF after a complete request that waits behind
    another is the end of the connection's requests, not a request cut short."""
    parser = http1.RequestParser(http1.Limits())
    events = parser.feed(GET % b"a" + GET % b"b" + GET % b"c")
    assert [type(e).__name__ for e in events] == ["RequestHead", "EndOfMessage"]
    assert parser.feed_eof() == []
    for _ in range(2):
        events = parser.resume()
        assert [type(e).__name__ for e in events] == ["RequestHead", "EndOfMessage"]
    assert parser.resume() == []
    # A request cut short by the EOF is still one.
    parser = http1.RequestParser(http1.Limits())
    parser.feed(GET % b"a" + b"GET /b HTTP/1.1\r\nHo")
    parser.feed_eof()
    (error,) = parser.resume()
    assert isinstance(error, http1.ProtocolError) and error.status == 400


async def _descriptor_numbers_reused_across_many_relays() -> None:
    """Relays start and end on several connections at once while others are reset mid-body
    and new connections take the freed descriptor numbers: every duplicate is unregistered
    before it is closed, so a reused number never meets a stale epoll registration (which
    would show as an error escaping to the loop, a body going astray, or a leaked pipe)."""
    loop = asyncio.get_running_loop()
    escaped: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda loop, context: escaped.append(context))
    data = body(3 * SPLICE_MIN, 30)
    response = big_response(data)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(response[: 2 * SPLICE_MIN])
                await writer.drain()
                await asyncio.sleep(0.01)
                writer.write(response[2 * SPLICE_MIN :])
                await writer.drain()
        writer.close()

    async with rig(serve_small) as r:
        pipes = open_fds("pipe")
        origins: list[asyncio.Server] = []

        async def client(i: int) -> None:
            sock, port = await hand_over(r.server)
            origin = await asyncio.start_server(serve, "127.0.0.1", port, reuse_address=True)
            origins.append(origin)
            reader, writer = await asyncio.open_connection(sock=sock)
            try:
                for _ in range(2):
                    writer.write(GET % b"%d" % i)
                    await reader.readuntil(b"\r\n\r\n")
                    if i % 3 == 0:  # this one leaves mid-body, with a reset
                        await reader.readexactly(SPLICE_MIN)
                        reset(writer)
                        return
                    assert sha(await reader.readexactly(len(data))) == sha(data)
            finally:
                writer.close()

        for _ in range(3):  # waves: later connections reuse the numbers earlier ones freed
            await asyncio.gather(*(client(i) for i in range(6)))
        await until(lambda: len(r.server.connections) <= 1)
        for origin in origins:
            origin.close()
        await until(lambda: open_fds("pipe") == pipes)
        assert r.server.stats.spliced_bodies >= 3 * 4 * 2
    assert escaped == []


test_descriptor_numbers_reused_across_many_relays = on_loops(
    _descriptor_numbers_reused_across_many_relays
)


async def serve_small(conn: OriginConn) -> None:
    await conn.head()
