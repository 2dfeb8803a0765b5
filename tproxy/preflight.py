"""Checks before the daemon touches the kernel: each problem is one line an admin can act on."""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from pathlib import Path

SYS_NET = Path("/sys/class/net")
PROC_SYS = Path("/proc/sys")
PROC_STATUS = Path("/proc/self/status")

# linux/capability.h: TPROXY sockets (IP_TRANSPARENT), SO_MARK, iptables and rtnetlink changes.
CAP_NET_ADMIN = 12

# An abstract unix socket name (unix(7)): abstract names belong to the network namespace, which
# is exactly the scope of the rules, routes and listening port a second daemon would fight over.
# The kernel releases it when the process dies, however it dies: no stale pid file.
INSTANCE_NAME = "tproxy-daemon"


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


def missing_capability(status: str) -> str | None:
    """Why this process cannot set up interception, from /proc/self/status text (pure)."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
            if not effective >> CAP_NET_ADMIN & 1:
                return (
                    "tproxy needs CAP_NET_ADMIN (TPROXY sockets, iptables, policy routing): "
                    "run it as root or through tproxy.service"
                )
            return None
    return None


def check_privileges(status_path: Path = PROC_STATUS) -> None:
    status = _read(status_path)
    reason = missing_capability(status) if status is not None else None
    if reason:
        raise PreflightError(reason)


def claim_instance(name: str = INSTANCE_NAME) -> socket.socket:
    """Hold the one-daemon-per-network-namespace lock; keep the returned socket open.

    A second daemon must fail *before* it touches anything: its rules would replace the first
    one's, and its teardown would remove them, leaving the running daemon intercepting nothing.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + name)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PreflightError(
                "another tproxy daemon is already running in this network namespace; "
                "its rules are left as they are (stop it first: systemctl stop tproxy)"
            ) from None
        raise
    return sock


def instance_running(name: str = INSTANCE_NAME) -> bool:
    """Whether a daemon holds :func:`claim_instance`'s lock in this network namespace."""
    try:
        claim_instance(name).close()
    except PreflightError:
        return True
    return False
