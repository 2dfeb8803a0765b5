"""Checks before the daemon touches the kernel: each problem is one line an admin can act on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

SYS_NET = Path("/sys/class/net")
PROC_SYS = Path("/proc/sys")


class PreflightError(Exception):
    """The gateway cannot intercept as configured; the message says why and what to do."""


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def problems(
    lan_interfaces: Sequence[str], ipv6: bool, sys_net: Path = SYS_NET, proc_sys: Path = PROC_SYS
) -> list[str]:
    """Reasons interception cannot work here (empty when all is well)."""
    out: list[str] = []
    for name in lan_interfaces:
        if not (sys_net / name).exists():
            out.append(f"LAN interface {name!r} does not exist")
            continue
        if (sys_net / name / "bridge").is_dir():
            # br_netfilter runs iptables at the bridge layer; ip_rcv then orphans the socket
            # TPROXY assigned, and the diverted SYN is answered with a reset (measured).
            for fam, key in (
                ("iptables", "bridge-nf-call-iptables"),
                ("ip6tables", "bridge-nf-call-ip6tables"),
            ):
                if fam == "ip6tables" and not ipv6:
                    continue
                if _read(proc_sys / "net" / "bridge" / key) == "1":
                    out.append(
                        f"LAN bridge {name!r}: br_netfilter passes bridged traffic to {fam}, "
                        f"which breaks TPROXY; set net.bridge.{key}=0"
                    )
    return out


def check(lan_interfaces: Sequence[str], ipv6: bool) -> None:
    found = problems(lan_interfaces, ipv6)
    if found:
        raise PreflightError("; ".join(found))
