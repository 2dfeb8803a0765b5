"""scripts/bench.py's receive steering: each mode writes the masks it documents, in every
namespace of the lab, and they read back from the kernel (rps_cpus of each rx queue)."""

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
