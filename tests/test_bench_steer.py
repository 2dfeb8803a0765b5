"""scripts/bench.py's lab tuning: each receive-steering mode writes the masks it documents, in
every namespace of the lab, and they read back from the kernel (rps_cpus of each rx queue); the
load generator's sockets start with the receive buffer tune_lab sets."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from tests.lab import Lab

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))

bench = importlib.import_module("bench")  # scripts/bench.py, not a package

pytestmark = pytest.mark.lab


def read_mask(lab: Lab, host: str, iface: str) -> int:
    out = lab.run(host, ["sh", "-c", f"cat /sys/class/net/{iface}/queues/rx-*/rps_cpus"]).stdout
    masks = {int(line.replace(",", ""), 16) for line in out.split()}
    assert len(masks) == 1, out  # every rx queue of the interface alike
    return masks.pop()


def test_steer_modes_set_the_documented_masks(lab: Lab) -> None:
    load, proxy = 1 << bench.LOAD_CPU, 1 << bench.PROXY_CPU
    want = {
        "load": (load, load),
        "split": (proxy, load),
        "hash": (load | proxy, load | proxy),
        "none": (0, 0),
    }
    for mode in ("hash", "split", "load", "none"):
        if mode == "none":
            bench.steer_lab(lab, "hash")
            # "none" leaves the lab as it is: reset by hand to check that it wrote nothing.
            for host, iface in (("gateway", lab.gw_wan_if), ("client", lab.client_if)):
                lab.run(host, ["sh", "-c", f"echo 0 > /sys/class/net/{iface}/queues/rx-0/rps_cpus"])
            assert bench.steer_lab(lab, "none") == {}
            gw_mask, end_mask = want["none"]
            assert read_mask(lab, "gateway", lab.gw_wan_if) == gw_mask
            assert read_mask(lab, "client", lab.client_if) == end_mask
            continue
        done = bench.steer_lab(lab, mode)
        gw_mask, end_mask = want[mode]
        for iface in (*lab.gw_lan_ports, lab.gw_wan_if):
            assert read_mask(lab, "gateway", iface) == gw_mask, (mode, iface)
        assert read_mask(lab, "client", lab.client_if) == end_mask, mode
        assert read_mask(lab, "origin", lab.origin_if) == end_mask, mode
        assert len(done) == len(lab.gw_lan_ports) + 1 + len(lab.ns_clients) + 1


def test_tune_lab_starts_client_sockets_with_a_large_receive_buffer(lab: Lab) -> None:
    bench.tune_lab(lab)
    lo, mid, hi = (
        int(v) for v in lab.run("client", ["sysctl", "-n", "net.ipv4.tcp_rmem"]).stdout.split()
    )
    assert mid == min(bench.CLIENT_RCVBUF, hi) and lo <= mid <= hi
    # A new TCP socket in the client namespace starts with that buffer (SO_RCVBUF reads it back).
    probe = "import socket; print(socket.socket().getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))"
    assert int(lab.run("client", [sys.executable, "-c", probe]).stdout) == mid
    # The gateway (the proxies' own sockets) keeps the kernel's default.
    gw = lab.run("gateway", ["sysctl", "-n", "net.ipv4.tcp_rmem"]).stdout.split()
    assert int(gw[1]) < bench.CLIENT_RCVBUF


def test_client_rmem_raises_only_the_default() -> None:
    assert bench.client_rmem("4096 131072 6291456", 4 << 20) == f"4096 {4 << 20} 6291456"
    assert bench.client_rmem("4096 131072 1048576", 4 << 20) == "4096 1048576 1048576"
    assert bench.client_rmem("4096 8388608 33554432", 4 << 20) == "4096 8388608 33554432"
