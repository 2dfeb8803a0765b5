"""Pieces for running the daemon's ``Server`` in-process on loopback (no root, no rules)."""

from __future__ import annotations

import asyncio
import socket

from tproxy.accesslog import AccessRecord
from tproxy.httpconn import ClientConnection
from tproxy.server import Server


class Records:
    """An access log that keeps its records (the Server only needs ``enabled`` and ``write``)."""

    enabled = True

    def __init__(self) -> None:
        self.records: list[AccessRecord] = []

    def write(self, record: AccessRecord) -> None:
        self.records.append(record)


async def hand_over(server: Server) -> tuple[socket.socket, int]:
    """A client connection handed to ``server`` the way TPROXY hands it over: the proxy's end
    has the original destination as its local address (getsockname), and that is where the
    proxy connects upstream. Without root: accept on a listener at the destination port, then
    close the listener, so the caller can start its origin on that very port (SO_REUSEADDR)
    before it sends a request. Returns the client's connected socket and the port."""
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as lst:
        port = lst.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = lst.accept()  # the handshake is complete: no wait
    accepted.setblocking(False)
    await loop.connect_accepted_socket(lambda: ClientConnection(server), accepted)
    return client, port
