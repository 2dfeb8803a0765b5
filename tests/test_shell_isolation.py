"""A bug met while handling one connection closes that connection only, with a logged error.

The shell is driven directly with an in-memory transport: no sockets, no event loop needed for
the request path up to the policy hooks.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tproxy import config
from tproxy.accesslog import AccessLog
from tproxy.httpconn import ClientConnection, Exchange
from tproxy.server import Server


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.aborted = False
        self.closed = False
        self.eof_written = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("10.0.0.5", 40000), "sockname": ("192.0.2.80", 80)}.get(name, default)

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def make_server() -> Server:
    cfg = config.load(None)
    return Server(cfg, AccessLog(""))


def connect(server: Server) -> tuple[ClientConnection, FakeTransport]:
    conn = ClientConnection(server)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def test_an_exception_in_a_hook_closes_only_that_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = make_server()
    calls: list[str] = []

    def broken(conn: ClientConnection, ex: Exchange) -> bool:
        calls.append(ex.head.target.decode())
        if ex.head.target == b"/boom":
            raise RuntimeError("a bug")
        conn.respond_local(ex, b"HTTP/1.1 204 No Content\r\n\r\n", 204, "TCP_HIT")
        return True

    server.request_hooks.append(broken)
    bad, bad_transport = connect(server)
    good, good_transport = connect(server)
    with caplog.at_level(logging.ERROR, logger="tproxy.http"):
        bad.data_received(b"GET /boom HTTP/1.1\r\nHost: a\r\n\r\n")  # must not raise
    assert bad_transport.aborted
    assert "error handling client data" in caplog.text and "a bug" in caplog.text
    good.data_received(b"GET /fine HTTP/1.1\r\nHost: a\r\n\r\n")
    assert good_transport.written.startswith(b"HTTP/1.1 204")
    assert not good_transport.aborted
    assert calls == ["/boom", "/fine"]


def test_malformed_bytes_get_400_and_the_connection_closes_in_stages() -> None:
    server = make_server()
    conn, transport = connect(server)
    conn.data_received(
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    )
    assert transport.written.startswith(b"HTTP/1.1 400 ")
    assert server.stats.bad_requests == 1
    # Half-closed behind the 400 (RFC 9112 §9.6); what the client still sends is dropped...
    assert transport.eof_written and not transport.closed
    written = transport.written
    conn.data_received(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    assert transport.written == written
    # ...and the client's own FIN ends it.
    conn.eof_received()
    assert transport.closed
