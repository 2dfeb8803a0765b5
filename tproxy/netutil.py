"""Socket options and queries the transparent proxy needs that the socket module does not name.

Values from linux/in.h, linux/in6.h, linux/sockios.h and asm-generic/socket.h; see also the kernel's
Documentation/networking/tproxy.rst.
"""

from __future__ import annotations

import fcntl
import socket
import struct

IP_TRANSPARENT = 19  # linux/in.h: bind to / accept for non-local addresses
IPV6_TRANSPARENT = 75  # linux/in6.h
IP_BIND_ADDRESS_NO_PORT = 24  # defer the source-port choice to connect(): 4-tuple aware
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_MAX_PACING_RATE = 47  # asm-generic/socket.h: per-socket pacing, bytes per second

SIOCOUTQNSD = 0x894B  # linux/sockios.h: bytes in a TCP send queue not yet sent (tcp(7))

LISTEN_BACKLOG = 4096


def _set_transparent(sock: socket.socket, family: socket.AddressFamily) -> None:
    # The option is per address family: IPv6 sockets take IPV6_TRANSPARENT (linux/in6.h).
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def transparent_listener(family: socket.AddressFamily, port: int) -> socket.socket:
    """A listening socket that TPROXY can deliver diverted connections to.

    IP_TRANSPARENT must be set before bind (DESIGN.md §3); ``getsockname()`` on an accepted socket
    then returns the client's original destination. It is bound to loopback (the rules use
    ``TPROXY --on-ip 127.0.0.1`` / ``::1``) so nobody can connect to the port directly and make
    the proxy connect to itself.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _set_transparent(sock, family)
        sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def upstream_socket(
    family: socket.AddressFamily, source_ip: str | None, mark: int = 0
) -> socket.socket:
    """A non-blocking socket for connecting to the origin.

    With ``source_ip`` (full transparency) it binds the client's address, which needs
    IP_TRANSPARENT; the origin's replies come back to the gateway addressed to the client and the
    ``-m socket --transparent`` rule diverts them to this socket.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if source_ip is not None:
            _set_transparent(sock, family)
            # Without this, bind() picks a port unique for the address alone; with it the kernel
            # picks at connect() time and may reuse ports toward different destinations.
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes queued on a TCP socket that the kernel has not sent yet (0 if it cannot say)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0\0\0\0")
    except OSError:
        return 0
    unsent: int = struct.unpack("=i", raw)[0]
    return unsent
