"""Review of the HTTP path against the real daemon in the lab: clients that vanish mid-transfer
leave nothing behind (descriptors, upstream connections) and are logged once.  The rest of the
review is in-process (tests/test_review_http_shell.py), where the origin can misbehave."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.lab import Lab
from tests.proxy import APP_PORT, Origin, Proxy, client_py, through_proxy

pytestmark = pytest.mark.lab

TRANSFERS = 4

VANISH = """
import socket, struct, sys, time
host, port, mode, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
for i in range(n):
    s = socket.create_connection((host, port), timeout=5)
    if mode == "download":
        s.sendall(b"GET /slowbig?size=50000000&ms=5&i=%d HTTP/1.1\\r\\nHost: app\\r\\n"
                  b"Cache-Control: no-store\\r\\n\\r\\n" % i)
        got = 0
        while got < 300000:
            got += len(s.recv(65536))
    else:
        s.sendall(b"POST /echo HTTP/1.1\\r\\nHost: app\\r\\nContent-Length: 10000000\\r\\n\\r\\n")
        s.sendall(b"u" * 1000000)
        time.sleep(0.2)
    # Killed mid-transfer: a reset, not a polite close.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
print("done")
"""


@pytest.fixture(scope="module")
def env(lab_module: Lab) -> Iterator[tuple[Lab, Proxy, Origin]]:
    config = f"[proxy]\nports = [80, {APP_PORT}]\n[cache]\nenabled = false\n"
    with through_proxy(lab_module, config) as (proxy, origin):
        yield lab_module, proxy, origin


def daemon_fds(proxy: Proxy) -> int:
    assert proxy.proc is not None
    return len(os.listdir(f"/proc/{proxy.proc.pid}/fd"))


def wait_fds(proxy: Proxy, target: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := daemon_fds(proxy)) > target and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


@pytest.mark.parametrize("mode", ["download", "upload"])
def test_clients_vanishing_mid_transfer_leave_no_descriptor_and_one_log_line_each(
    env: tuple[Lab, Proxy, Origin], mode: str
) -> None:
    lab, proxy, _origin = env
    before = wait_fds(proxy, 0, timeout=0.5)
    lines = len(proxy.log_lines())
    out = client_py(lab, VANISH, lab.origin_v4, str(APP_PORT), mode, str(TRANSFERS))
    assert out.strip() == "done"
    # The client connections and their upstream ones (not pooled: cut mid-message) are gone.
    assert wait_fds(proxy, before) == before
    time.sleep(0.3)  # a second line per transfer would show up now
    new = proxy.log_lines()[lines:]
    assert len(new) == TRANSFERS, new
    for line in new:
        assert "_ABORTED/" in line.split()[3], line
