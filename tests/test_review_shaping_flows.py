"""Review of per-flow classification with the daemon's real Server on loopback.

The daemon's ``Server`` runs in-process with the shaping component's hooks; a client keeps one
connection alive across several requests whose responses belong to different classes. What
is checked is what the kernel would act on: the SO_MARK and SO_MAX_PACING_RATE of the
client-facing socket (socket(7)) when each response reaches the client. SO_MARK needs
CAP_NET_ADMIN, hence root; no namespace, no qdisc (the plan is not pushed to the kernel).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from typing import Any

import pytest

from tests.inproc import Records, hand_over
from tproxy import config
from tproxy.netutil import SO_MAX_PACING_RATE
from tproxy.server import Server
from tproxy.shaping.apply import PACING_UNLIMITED
from tproxy.shaping.component import ShapingComponent
from tproxy.shaping.model import UNSHAPED_MARK, mark_for

pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(30),
    pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK needs CAP_NET_ADMIN"),
]

WAIT = 5.0
SHAPING: dict[str, Any] = {
    "enabled": True,
    "lan_interface_rate": "100mbit",
    "default_class": "web",
    "class": [
        {"name": "video", "rate": "20mbit", "per_connection_cap": "8mbit"},
        {"name": "web", "rate": "10mbit"},
        {"name": "big", "rate": "5mbit"},
    ],
    "select": [
        {"class": "video", "content_type": "video/*"},
        {"class": "big", "min_response_size": "1MiB"},
    ],
}
# Each path's response: (Content-Type, declared length, body sent).
RESPONSES = {
    b"/page": (b"text/html", 2),
    b"/clip": (b"video/mp4", 2),
    b"/iso": (b"application/octet-stream", 2 << 20),
}


def sock_state(sock: socket.socket) -> tuple[int, int]:
    mark = sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, 4)
    return mark, struct.unpack("=I", raw)[0]


async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            ctype, length = RESPONSES[path]
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\nContent-Length: %d\r\n\r\n"
                % (ctype, length)
            )
            writer.write(b"x" * length)
            await writer.drain()
    writer.close()


def shaped_server() -> tuple[Server, ShapingComponent]:
    """An in-process Server with the SHAPING config and its component. The plan's CLASSIFY rules
    and qdisc are not installed: what is checked is each socket's SO_MARK and pacing cap."""
    config.load(None)
    cfg = config.with_overrides(
        config.parse({"shaping": SHAPING, "proxy": {"lan_interfaces": ["lo"]}}),
        transparent_upstream=False,
    )
    server = Server(cfg, Records())  # type: ignore[arg-type]
    comp = ShapingComponent(cfg)
    comp.server = server
    comp.applied = True
    return server, comp


def test_keep_alive_responses_each_get_their_own_class_and_cap() -> None:
    async def main() -> None:
        server, comp = shaped_server()
        comp._sync_hooks()
        plan = comp.plan
        client, port = await hand_over(server)
        up = await asyncio.start_server(origin, "127.0.0.1", port, reuse_address=True)
        reader, writer = await asyncio.open_connection(sock=client)
        seen: list[tuple[bytes, tuple[int, int]]] = []
        try:
            for path in (b"/page", b"/clip", b"/page", b"/iso", b"/clip"):
                writer.write(b"GET %b HTTP/1.1\r\nHost: origin.test\r\n\r\n" % path)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
                assert b" 200 " in head.split(b"\r\n", 1)[0]
                # The head is out: the response hooks ran and marked the socket for the body.
                (conn,) = server.connections
                sock = conn.transport.get_extra_info("socket")
                seen.append((path, sock_state(sock)))
                await asyncio.wait_for(reader.readexactly(RESPONSES[path][1]), WAIT)
        finally:
            writer.close()
            await server.drain(0.5)
            await server.stop()
            up.close()
            await up.wait_closed()
        video = (mark_for(plan, "video"), 8_000_000 // 8)
        web = (mark_for(plan, "web"), PACING_UNLIMITED)
        big = (mark_for(plan, "big"), PACING_UNLIMITED)
        assert seen == [
            (b"/page", web),
            (b"/clip", video),
            (b"/page", web),  # the cap of the video before is lifted
            (b"/iso", big),
            (b"/clip", video),
        ]
        assert comp.reclassified >= 2  # the video responses moved out of the request's class
        assert UNSHAPED_MARK not in {s[1][0] for s in seen}

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_hit_waits_for_the_shaped_bytes_before_going_unshaped() -> None:
    """SO_MARK is read when a packet is sent: switching the socket to the unshaped mark (a
    cache hit) while bytes of a shaped response still wait would send those unshaped too."""

    async def main() -> None:
        server, comp = shaped_server()
        client, _port = await hand_over(server)
        try:
            await asyncio.sleep(0.05)
            (conn,) = server.connections
            sock = conn.transport.get_extra_info("socket")
            name = "web"  # no per-connection cap: the transfer below is not paced
            shaped = mark_for(comp.plan, name, conn.client_ip)
            comp._mark_client(conn, shaped, name)
            # The client does not read: the response fills both buffers and waits.
            conn.transport.write(b"x" * (16 << 20))
            comp._mark_client(conn, UNSHAPED_MARK, None)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == shaped
            # Once everything is out, the hit goes unshaped.
            client.setblocking(False)
            got = 0
            while got < 16 << 20:
                try:
                    got += len(client.recv(1 << 20))
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            await asyncio.sleep(0.05)
            comp._mark_client(conn, UNSHAPED_MARK, None)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == UNSHAPED_MARK
        finally:
            client.close()
            await server.drain(0.3)
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 30))
