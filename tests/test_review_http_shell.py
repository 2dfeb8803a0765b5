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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tproxy import config
from tproxy.accesslog import AccessRecord
from tproxy.httpconn import ClientConnection
from tproxy.server import Server

WAIT = 5.0
# Sweeps a real daemon runs once a second; here often, so sub-second timeouts are exact enough.
SWEEP = 0.05

Handler = Callable[["OriginConn"], Awaitable[None]]


class Records:
    """An access log that keeps its records (the Server only needs ``enabled`` and ``write``)."""

    enabled = True

    def __init__(self) -> None:
        self.records: list[AccessRecord] = []

    def write(self, record: AccessRecord) -> None:
        self.records.append(record)


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
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.writer.transport.abort()


@dataclass
class Rig:
    server: Server
    log: Records
    origin_conns: list[OriginConn]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    port: int

    def send(self, data: bytes) -> None:
        self.writer.write(data)

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
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        accepted, _ = lst.accept()
    accepted.setblocking(False)
    await loop.connect_accepted_socket(lambda: ClientConnection(server), accepted)
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

    sweeper = loop.create_task(sweep(), name="test sweeper")
    try:
        yield Rig(server, log, conns, reader, writer, port)
    finally:
        writer.close()
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
