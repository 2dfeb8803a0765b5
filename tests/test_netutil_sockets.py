"""The daemon's socket helpers set the options TPROXY needs, on real kernel sockets.

IP_TRANSPARENT / IPV6_TRANSPARENT need CAP_NET_ADMIN, so these are lab tests (root); they bind
loopback only and send nothing.
"""

from __future__ import annotations

import os
import socket

import pytest

from tproxy import netutil

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="IP_TRANSPARENT needs CAP_NET_ADMIN (root)"),
]


def _transparent(sock: socket.socket) -> int:
    if sock.family == socket.AF_INET6:
        return sock.getsockopt(socket.IPPROTO_IPV6, netutil.IPV6_TRANSPARENT)
    return sock.getsockopt(socket.SOL_IP, netutil.IP_TRANSPARENT)


@pytest.mark.parametrize(
    ("family", "loopback"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_listener_is_transparent_on_loopback(family: socket.AddressFamily, loopback: str) -> None:
    sock = netutil.transparent_listener(family, 0)
    try:
        assert _transparent(sock) == 1
        assert sock.getsockname()[0] == loopback
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert not sock.getblocking()
        if family == socket.AF_INET6:
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("family", "source"), [(socket.AF_INET, "192.0.2.7"), (socket.AF_INET6, "2001:db8::7")]
)
def test_upstream_socket_binds_a_foreign_source(family: socket.AddressFamily, source: str) -> None:
    # A documentation address is on no interface here: only a transparent socket may bind it.
    sock = netutil.upstream_socket(family, source, mark=0x4200)
    try:
        assert _transparent(sock) == 1
        assert sock.getsockname()[0] == source
        assert sock.getsockopt(socket.SOL_SOCKET, netutil.SO_MARK) == 0x4200
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        sock.close()
    plain = netutil.upstream_socket(family, None)
    try:
        assert _transparent(plain) == 0
        assert plain.getsockopt(socket.SOL_SOCKET, netutil.SO_MARK) == 0
    finally:
        plain.close()
