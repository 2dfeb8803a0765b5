"""The NFQUEUE shell against the real kernel, in a scratch namespace.

Packets are UDP datagrams to a local socket, queued in OUTPUT: one namespace, no links. The
shell treats non-TCP packets as "no verdict needed" and accepts them, which is all these tests
need: they check the queue plumbing — fail-open, bounded batches — not the TLS logic.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator

import pytest

from tests.test_netfilter_kernel import in_netns, scratch_ns, sh
from tproxy.nfqueue import FlowDecision, SniQueue

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("iptables") is None, reason="needs root and iptables"
    ),
]

QUEUE = 5
PORT = 9999
SMALL_QUEUE = 4


def allow(*args: object) -> FlowDecision:
    return FlowDecision(True)


@pytest.fixture
def ns() -> Iterator[str]:
    with scratch_ns("q") as name:
        sh("iptables", "-A", "OUTPUT", "-p", "udp", "--dport", str(PORT), "-j", "NFQUEUE",
           "--queue-num", str(QUEUE), ns=name)  # fmt: skip
        yield name


def udp_pair(ns: str) -> tuple[socket.socket, socket.socket]:
    def make() -> tuple[socket.socket, socket.socket]:
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", PORT))
        rx.settimeout(0.3)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        return rx, tx

    return in_netns(ns, make)


def received(rx: socket.socket) -> int:
    n = 0
    while True:
        try:
            rx.recv(64)
            n += 1
        except TimeoutError:
            return n


def open_queue(ns: str, fail_open: bool, max_len: int = SMALL_QUEUE) -> SniQueue:
    queue = SniQueue(QUEUE, allow, max_len=max_len)

    def bind() -> None:
        queue.open()

    in_netns(ns, bind)
    if not fail_open:
        # Clear the flag again, to show what the kernel does without it.
        from tproxy.nfqueue import NFQA_CFG_F_FAIL_OPEN, config_message

        assert queue._sock is not None
        queue._sock.send(config_message(QUEUE, 0, NFQA_CFG_F_FAIL_OPEN, 9))
        time.sleep(0.05)
        queue._sock.recv(4096)  # the acknowledgement
    return queue


@pytest.mark.parametrize("fail_open", [True, False])
def test_a_hung_reader_fails_open(ns: str, fail_open: bool) -> None:
    """Nobody reads the queue (a hung daemon): with the flag set, packets beyond the queue
    length pass; without it they are dropped."""
    queue = open_queue(ns, fail_open)
    rx, tx = udp_pair(ns)
    try:
        if fail_open:
            assert queue.stats.fail_open is True  # the kernel acknowledged the flag
        for i in range(20):
            tx.sendto(b"%d" % i, ("127.0.0.1", PORT))
        got = received(rx)
        # SMALL_QUEUE packets wait for a verdict that never comes; with fail-open the other 16
        # are accepted by the kernel itself.
        assert got == (20 - SMALL_QUEUE if fail_open else 0)
    finally:
        queue.close()
        rx.close()
        tx.close()


def test_reads_in_bounded_batches(ns: str) -> None:
    queue = open_queue(ns, True, max_len=1024)
    queue.batch = 16
    rx, tx = udp_pair(ns)
    try:
        for i in range(50):
            tx.sendto(b"%d" % i, ("127.0.0.1", PORT))
        time.sleep(0.1)
        counts = []
        for _ in range(5):
            queue.read_batch()
            counts.append(queue.inspector.stats.packets)
        # At most one batch per call, and every packet read got its verdict.
        assert counts == [16, 32, 48, 50, 50]
        assert received(rx) == 50
    finally:
        queue.close()
        rx.close()
        tx.close()


def test_unbind_lets_traffic_bypass(ns: str) -> None:
    """After close() the queue has no listener: --queue-bypass would accept; without it (as in
    this rule) the kernel drops — so the daemon's rules must always carry --queue-bypass."""
    queue = open_queue(ns, True)
    queue.close()
    sh("iptables", "-R", "OUTPUT", "1", "-p", "udp", "--dport", str(PORT), "-j", "NFQUEUE",
       "--queue-num", str(QUEUE), "--queue-bypass", ns=ns)  # fmt: skip
    rx, tx = udp_pair(ns)
    try:
        for i in range(5):
            tx.sendto(b"%d" % i, ("127.0.0.1", PORT))
        assert received(rx) == 5
    finally:
        rx.close()
        tx.close()
