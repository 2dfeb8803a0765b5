"""Resource exhaustion in the HTTP shell, in-process on loopback (no root, no rules).

What one misbehaving client (or a daemon out of file descriptors) can make the daemon do:
answers when upstream sockets cannot be created, log lines per bad request or failed connect,
the idle pool's bounds and expiry, and the idle timeout of a long local (cache-hit) stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.inproc import Records, hand_over
from tproxy import config
from tproxy.httpconn import POOL_PER_KEY, ClientConnection, Exchange
from tproxy.server import Server

WAIT = 5.0
REQUEST = b"GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n"


def make_server(
    proxy: dict[str, Any] | None = None, limits: dict[str, Any] | None = None
) -> Server:
    config.load(None)
    cfg = config.with_overrides(
        config.parse({"proxy": proxy or {}, "limits": limits or {}}), transparent_upstream=False
    )
    return Server(cfg, Records())  # type: ignore[arg-type]


async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await asyncio.wait_for(reader.readexactly(length), WAIT)
    return int(head.split(b" ", 2)[1]), head


def lowest_free_fd() -> int:
    """The descriptor the next open() gets (POSIX: always the lowest free one)."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


@contextlib.contextmanager
def no_new_fds() -> Iterator[None]:
    """RLIMIT_NOFILE at the lowest free descriptor: every new socket() fails with EMFILE, the
    ones already open keep working (getrlimit(2): the limit applies to new descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd(), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def tproxy_lines(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("tproxy") and needle in r.getMessage().lower()
    ]


# -- upstream socket() fails with EMFILE ---------------------------------------------------------

OUT_OF_FDS_CONNECTIONS = 4


def test_out_of_fds_upstream_gets_503_retry_after_and_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        server = make_server()
        clients = [await hand_over(server) for _ in range(OUT_OF_FDS_CONNECTIONS)]
        origins = [
            await asyncio.start_server(origin, "127.0.0.1", port, reuse_address=True)
            for _, port in clients
        ]
        streams = [await asyncio.open_connection(sock=sock) for sock, _ in clients]
        heads = []
        try:
            for reader, writer in streams:
                # (Again per request: each 503 closed a connection and gave a descriptor back.)
                with no_new_fds():
                    writer.write(REQUEST)
                    heads.append(await read_response(reader))
                    # The proxy closes after it: that frees descriptors (RFC 9112 §9.6).
                    assert await asyncio.wait_for(reader.read(), WAIT) == b""
            # Once descriptors are free again, the next request is served.
            sock, port = await hand_over(server)
            origins.append(
                await asyncio.start_server(origin, "127.0.0.1", port, reuse_address=True)
            )
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(REQUEST)
            assert (await read_response(reader))[0] == 200
            writer.close()
        finally:
            for _, writer in streams:
                writer.close()
            for srv in origins:
                srv.close()
            await server.drain(0.5)
            await server.stop()
        for status, head in heads:
            # RFC 9110 §15.6.4: the proxy itself is overloaded, not the origin (502 would blame
            # it); Retry-After (§10.2.3) tells the client when to come back.
            assert status == 503, head
            assert b"\r\nRetry-After: " in head, head

    asyncio.run(asyncio.wait_for(main(), 20))
    # One warning naming the cause for the admin, not one line per refused request.
    warnings = [
        r for r in caplog.records if r.name.startswith("tproxy") and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "file descriptors" in warnings[0].getMessage()
    assert len(tproxy_lines(caplog, "too many open files")) <= 1


# -- log flood -----------------------------------------------------------------------------------

FLOOD = 30


def test_bad_requests_from_one_client_log_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        server = make_server()
        try:
            for _ in range(FLOOD):
                sock, _ = await hand_over(server)
                reader, writer = await asyncio.open_connection(sock=sock)
                writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n")
                status, _ = await read_response(reader)
                assert status == 400
                writer.close()
        finally:
            await server.drain(0.5)
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 20))
    lines = tproxy_lines(caplog, "400")
    assert 1 <= len(lines) <= 1, lines


def test_failed_connects_of_one_client_log_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        server = make_server()
        try:
            for _ in range(FLOOD):
                sock, _ = await hand_over(server)  # nothing listens there: refused
                reader, writer = await asyncio.open_connection(sock=sock)
                writer.write(REQUEST)
                status, _ = await read_response(reader)
                assert status == 502
                writer.close()
        finally:
            await server.drain(0.5)
            await server.stop()
        assert server.stats.upstream_errors == FLOOD  # still counted, every one

    asyncio.run(asyncio.wait_for(main(), 20))
    lines = tproxy_lines(caplog, "refused")
    assert 1 <= len(lines) <= 1, lines


# -- the idle upstream pool ----------------------------------------------------------------------

POOL_CLIENTS = POOL_PER_KEY + 8


def test_pool_is_bounded_per_destination_and_expires_on_idle_timeout() -> None:
    origin_conns: list[asyncio.StreamWriter] = []

    async def counting_origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        origin_conns.append(writer)
        await origin(reader, writer)

    async def main() -> None:
        server = make_server()
        loop = asyncio.get_running_loop()
        # Many clients whose original destination is one origin (one pool key).
        with socket.create_server(("127.0.0.1", 0), backlog=POOL_CLIENTS) as lst:
            port = lst.getsockname()[1]
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(POOL_CLIENTS)]
            for _ in range(POOL_CLIENTS):
                accepted, _ = lst.accept()
                accepted.setblocking(False)
                await loop.connect_accepted_socket(lambda: ClientConnection(server), accepted)
        up = await asyncio.start_server(counting_origin, "127.0.0.1", port, reuse_address=True)
        streams = [await asyncio.open_connection(sock=s) for s in socks]
        try:
            for _, writer in streams:
                writer.write(REQUEST)
            statuses = [(await read_response(r))[0] for r, _ in streams]
            assert statuses == [200] * POOL_CLIENTS
            await asyncio.sleep(0.1)
            assert len(origin_conns) == POOL_CLIENTS  # all were in flight at once
            assert server.pool.count == POOL_PER_KEY
            await asyncio.sleep(0.2)
            open_at_origin = sum(not w.is_closing() for w in origin_conns)
            assert open_at_origin == POOL_PER_KEY, open_at_origin
            # Past idle_timeout the sweep closes every idle pooled connection.
            server.sweep(time.monotonic() + server.cfg.proxy.idle_timeout + 1)
            assert server.pool.count == 0
            await asyncio.sleep(0.2)
            assert all(w.is_closing() for w in origin_conns)
        finally:
            for _, writer in streams:
                writer.close()
            up.close()
            await server.drain(0.5)
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 20))


# -- the idle timeout of a long local stream -----------------------------------------------------

STREAM_CHUNK = 64 * 1024
STREAM_READ_SECONDS = 3.0
IDLE_TIMEOUT = 1.0


def test_local_stream_to_a_steady_reader_outlives_idle_timeout() -> None:
    """A cache hit larger than idle_timeout's worth of transfer must not be cut while the
    client keeps reading: idle means no byte moving, not no byte *from* the client."""

    def body() -> Iterator[bytes]:
        while True:
            yield b"x" * STREAM_CHUNK

    def hit(conn: ClientConnection, ex: Exchange) -> bool:
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_CHUNK)  # feel the reader
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n"
        conn.stream_local(ex, head, body(), 200, "TCP_HIT")
        return True

    async def sweeper(server: Server) -> None:
        while True:
            await asyncio.sleep(0.1)
            server.sweep(time.monotonic())

    async def main() -> None:
        server = make_server({"idle_timeout": f"{IDLE_TIMEOUT:g}s"})
        server.request_hooks.append(hit)
        task = asyncio.get_running_loop().create_task(sweeper(server), name="test sweeper")
        sock, _ = await hand_over(server)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STREAM_CHUNK)
        reader, writer = await asyncio.open_connection(sock=sock)
        got = 0
        try:
            writer.write(REQUEST)
            t0 = time.monotonic()
            while time.monotonic() - t0 < STREAM_READ_SECONDS:
                data = await asyncio.wait_for(reader.read(STREAM_CHUNK), WAIT)
                assert data, f"cut after {time.monotonic() - t0:.1f}s, {got} bytes"
                got += len(data)
                await asyncio.sleep(0.01)  # ~5 MB/s: each resume_writing well within 1 s
        finally:
            task.cancel()
            writer.close()
            await server.drain(0.5)
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 20))


STALL_READ = 4 * 1024 * 1024


def test_local_stream_does_not_stall_when_the_buffer_lands_on_high_water() -> None:
    """64 KiB store chunks fill the transport's buffer to exactly WRITE_BUFFER_HIGH; the
    transport pauses only above it, so a pump that stops *at* it never hears resume_writing."""

    def hit(conn: ClientConnection, ex: Exchange) -> bool:
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_CHUNK)
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n"
        conn.stream_local(ex, head, iter(lambda: b"x" * STREAM_CHUNK, b""), 200, "TCP_HIT")
        return True

    async def main() -> None:
        server = make_server()
        server.request_hooks.append(hit)
        sock, _ = await hand_over(server)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STREAM_CHUNK)
        reader, writer = await asyncio.open_connection(sock=sock)
        got = 0
        try:
            writer.write(REQUEST)
            await asyncio.sleep(0.3)  # the client does not read: every buffer fills up
            while got < STALL_READ:
                data = await asyncio.wait_for(reader.read(STREAM_CHUNK), 2)
                assert data
                got += len(data)
        finally:
            writer.close()
            await server.drain(0.5)
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_fd_budget_raises_the_soft_limit_for_max_connections(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tproxy.daemon import FD_RESERVE, FDS_PER_CONNECTION, check_fd_budget, fd_budget

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 1024
    if hard != resource.RLIM_INFINITY and hard < 4 * low:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} is too small to test raising")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        limit, need = fd_budget(1000)
        assert need == 1000 * FDS_PER_CONNECTION + FD_RESERVE
        assert limit == need == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        # Beyond the hard limit: raised as far as allowed, and the admin is told once.
        if hard != resource.RLIM_INFINITY:
            caplog.set_level(logging.WARNING)
            check_fd_budget(hard)
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
            assert any("RLIMIT_NOFILE" in r.getMessage() for r in caplog.records)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
