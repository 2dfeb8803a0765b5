"""Push a :class:`~tproxy.shaping.model.ShapingPlan` into the kernel with pyroute2 (HTB).

Applying is a diff against what the kernel holds, never a blind rebuild:

* the root qdisc ``1:`` is created only when the interface has no qdisc of ours; an existing
  one is kept, so queued packets and running flows survive a reload;
* classes whose parameters differ are changed in place (``RTM_NEWTCLASS`` without
  ``NLM_F_CREATE``, the "change-class" of pyroute2), missing ones are added parents first,
  vanished ones deleted children first (HTB refuses to delete a class with children: EBUSY);
* a class that moved to another parent is deleted and re-added: HTB's change ignores a new
  parent (measured on kernel 6.18);
* a new ``default`` class id needs a new qdisc: HTB has no qdisc "change" (EINVAL, measured),
  so only then is the root replaced.

Applying the same plan twice therefore changes nothing (the second call returns no actions).

Which root qdisc is ours
------------------------
The qdisc must be ``htb``, have handle ``1:`` and carry ``r2q`` = :data:`SIGNATURE_R2Q`. HTB
only uses r2q to derive a class quantum when none is given; every class we create has an
explicit quantum, so r2q is free to serve as a signature, and it is reported back in the
qdisc dump (``TCA_HTB_INIT``). A root qdisc with handle ``0:`` is the kernel's default (noqueue,
pfifo_fast, mq, fq_codel) and is replaced; any other root qdisc belongs to the operator and is
left alone with a :class:`ShapingError`.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tproxy.netutil import SO_MAX_PACING_RATE
from tproxy.shaping.model import (
    QDISC_HANDLE,
    SIGNATURE_R2Q,
    UNSHAPED_CLASSID,
    ClassCounters,
    ClassRecord,
    InterfacePlan,
    ShapingPlan,
    classid_str,
    mark_for,
)

TC_H_ROOT = 0xFFFFFFFF
# ~0U: "no cap" (net/core/sock.c maps it to ~0UL), for a socket moved to an uncapped class.
PACING_UNLIMITED = 0xFFFFFFFF
NETNS_DIR = "/run/netns"
# Kernel config symbols for the qdisc kinds we may ask for, for the "kernel lacks" message.
KERNEL_OPTIONS = {
    "htb": "CONFIG_NET_SCH_HTB",
    "tbf": "CONFIG_NET_SCH_TBF",
    "sfq": "CONFIG_NET_SCH_SFQ",
    "fq_codel": "CONFIG_NET_SCH_FQ_CODEL",
    "cake": "CONFIG_NET_SCH_CAKE",
}

log = logging.getLogger("tproxy.shaping")


class ShapingError(Exception):
    """A shaping plan could not be applied, read or removed; ``str`` is one line for the log."""


@dataclass(frozen=True)
class _KernelClass:
    parent: int
    rate: int  # bytes/s
    ceil: int  # bytes/s
    quantum: int
    prio: int


def translate_error(
    exc: NetlinkError, op: str, iface: str, kind: str | None = None
) -> ShapingError:
    """One clear line for a netlink error where it leaves pyroute2.

    ``ENOENT`` while creating a qdisc means the kernel does not know the kind ("Specified qdisc
    kind is unknown", net/sched/sch_api.c), i.e. the scheduler is not built.
    """
    code = exc.code
    if code == errno.ENOENT and kind is not None and op in ("add", "replace"):
        option = KERNEL_OPTIONS.get(kind, f"the {kind} qdisc")
        return ShapingError(f"kernel lacks sch_{kind} ({option})")
    if code == errno.EPERM:
        return ShapingError(f"{iface}: {op}: permission denied (needs CAP_NET_ADMIN)")
    if code == errno.ENODEV:
        return ShapingError(f"{iface}: interface vanished during {op}")
    return ShapingError(f"{iface}: tc {op} failed: {os.strerror(code) if code else exc}")


@contextmanager
def _ipr(netns: str | None) -> Iterator[Any]:
    if netns is not None and not os.path.exists(os.path.join(NETNS_DIR, netns)):
        # pyroute2 would create a missing namespace (O_CREAT); a typo must not do that.
        raise ShapingError(f"network namespace {netns!r} does not exist")
    ipr = IPRoute(netns=netns, flags=0) if netns is not None else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: Any, iface: str) -> int | None:
    found = ipr.link_lookup(ifname=iface)
    return int(found[0]) if found else None


def _attr_path(msg: Any, *names: str) -> Any:
    node = msg
    for name in names:
        if node is None:
            return None
        node = node.get_attr(name)
    return node


def _root_qdisc(ipr: Any, index: int) -> Any:
    for q in ipr.get_qdiscs(index=index):
        if q["parent"] == TC_H_ROOT:
            return q
    return None


def _is_ours(q: Any) -> bool:
    if q is None or q.get_attr("TCA_KIND") != "htb" or q["handle"] != QDISC_HANDLE:
        return False
    glob = _attr_path(q, "TCA_OPTIONS", "TCA_HTB_INIT")
    return glob is not None and glob["rate2quantum"] == SIGNATURE_R2Q


def _defcls(q: Any) -> int:
    glob = _attr_path(q, "TCA_OPTIONS", "TCA_HTB_INIT")
    return int(glob["defcls"]) if glob is not None else -1


def _kernel_classes(ipr: Any, index: int) -> dict[int, _KernelClass]:
    out: dict[int, _KernelClass] = {}
    for c in ipr.get_classes(index=index):
        if c.get_attr("TCA_KIND") != "htb" or c["handle"] >> 16 != QDISC_HANDLE >> 16:
            continue
        opts = c.get_attr("TCA_OPTIONS")
        parms = opts.get_attr("TCA_HTB_PARMS") if opts is not None else None
        if parms is None:
            continue
        # Rates of 2^32 bytes/s and more travel in separate 64-bit attributes.
        rate = opts.get_attr("TCA_HTB_RATE64") or parms["rate"]
        ceil = opts.get_attr("TCA_HTB_CEIL64") or parms["ceil"]
        # A class directly under the qdisc reports parent TC_H_ROOT, not "1:".
        parent = QDISC_HANDLE if c["parent"] == TC_H_ROOT else int(c["parent"])
        out[c["handle"]] = _KernelClass(
            parent, int(rate), int(ceil), int(parms["quantum"]), int(parms["prio"])
        )
    return out


def _wanted(rec: ClassRecord) -> _KernelClass:
    return _KernelClass(rec.parent, rec.rate // 8, rec.ceil // 8, rec.quantum, rec.prio)


def _class_args(rec: ClassRecord) -> dict[str, Any]:
    # pyroute2 takes integer rates in bytes/s and burst sizes in bytes (sched_htb.py).
    return {
        "handle": rec.classid,
        "parent": rec.parent,
        "rate": rec.rate // 8,
        "ceil": rec.ceil // 8,
        "burst": rec.burst,
        "cburst": rec.cburst,
        "quantum": rec.quantum,
        "prio": rec.prio,
    }


def _tc(ipr: Any, op: str, iface: str, kind: str | None = None, **kw: Any) -> None:
    try:
        if kind is None:
            ipr.tc(op, **kw)
        else:
            ipr.tc(op, kind, **kw)
    except NetlinkError as exc:
        raise translate_error(exc, op, iface, kind) from None


def _depth(cid: int, parents: Mapping[int, int]) -> int:
    d = 0
    while cid in parents and d < 16:
        cid = parents[cid]
        d += 1
    return d


def _sync_interface(ipr: Any, ip: InterfacePlan) -> list[str]:
    index = _index(ipr, ip.iface)
    if index is None:
        raise ShapingError(f"interface {ip.iface} not found")
    actions: list[str] = []
    root = _root_qdisc(ipr, index)
    if _is_ours(root) and _defcls(root) == ip.default_minor:
        existing = _kernel_classes(ipr, index)
    else:
        if root is not None and not _is_ours(root) and root["handle"] != 0:
            raise ShapingError(
                f"{ip.iface} has a root qdisc {root.get_attr('TCA_KIND')}"
                f" {classid_str(root['handle'])} not created by tproxy; remove it or disable"
                " shaping on this interface"
            )
        if _is_ours(root):
            # Only the default class changed, and HTB cannot change it in place: start over.
            _tc(ipr, "del", ip.iface, index=index, handle=QDISC_HANDLE, parent=TC_H_ROOT)
            actions.append(f"{ip.iface}: del qdisc 1:")
        _tc(
            ipr,
            "replace",
            ip.iface,
            "htb",
            index=index,
            handle=QDISC_HANDLE,
            parent=TC_H_ROOT,
            default=ip.default_minor,
            r2q=SIGNATURE_R2Q,
        )
        actions.append(f"{ip.iface}: qdisc htb 1: default {ip.default_minor:x}")
        existing = {}

    planned = {rec.classid: rec for rec in ip.classes}
    parents = {cid: k.parent for cid, k in existing.items()}
    doomed = {
        cid for cid, k in existing.items() if cid not in planned or k.parent != planned[cid].parent
    }
    grew = True
    while grew:  # a doomed class takes its subtree with it
        more = {cid for cid, p in parents.items() if p in doomed and cid not in doomed}
        doomed |= more
        grew = bool(more)
    for cid in sorted(doomed, key=lambda c: -_depth(c, parents)):
        _tc(ipr, "del-class", ip.iface, index=index, handle=cid)
        actions.append(f"{ip.iface}: del class {classid_str(cid)}")
    for rec in ip.classes:
        have = None if rec.classid in doomed else existing.get(rec.classid)
        if have is None:
            _tc(ipr, "add-class", ip.iface, "htb", index=index, **_class_args(rec))
            actions.append(f"{ip.iface}: add class {classid_str(rec.classid)} {rec.name}")
        elif have != _wanted(rec):
            _tc(ipr, "change-class", ip.iface, "htb", index=index, **_class_args(rec))
            actions.append(f"{ip.iface}: change class {classid_str(rec.classid)} {rec.name}")
    return actions


def apply_plan(plan: ShapingPlan, netns: str | None = None) -> list[str]:
    """Make the kernel hold ``plan``; returns what was done (empty when already in place)."""
    actions: list[str] = []
    with _ipr(netns) as ipr:
        for ip in plan.interfaces:
            actions += _sync_interface(ipr, ip)
    return actions


def repair_plan(plan: ShapingPlan, netns: str | None = None) -> tuple[list[str], list[str]]:
    """Put our tree back on every interface of ``plan`` that lost it while the daemon ran.

    A LAN interface that is deleted and created again (a bridge rebuilt by ifupdown, a VLAN
    or a USB NIC re-plugged, a VPN tun restarted) comes back with the kernel's default qdisc:
    without this, its traffic would run unshaped until the next restart, silently. Interfaces
    that still carry our qdisc are not touched (not even diffed: this runs periodically).
    Returns (actions, problems): one line per interface that could not be repaired (absent,
    or an operator's own qdisc now sits there, which we never replace).
    """
    actions: list[str] = []
    problems: list[str] = []
    with _ipr(netns) as ipr:
        for ip in plan.interfaces:
            index = _index(ipr, ip.iface)
            if index is None:
                problems.append(f"interface {ip.iface} not found")
                continue
            if _is_ours(_root_qdisc(ipr, index)):
                continue
            try:
                actions += _sync_interface(ipr, ip)
            except ShapingError as exc:
                problems.append(str(exc))
    return actions, problems


def _remove(ipr: Any, iface: str) -> bool:
    index = _index(ipr, iface)
    if index is None:
        return False
    root = _root_qdisc(ipr, index)
    if not _is_ours(root):
        return False
    _tc(ipr, "del", iface, index=index, handle=QDISC_HANDLE, parent=TC_H_ROOT)
    return True


def update_plan(old: ShapingPlan, new: ShapingPlan, netns: str | None = None) -> list[str]:
    """Reload: move the kernel from ``old`` to ``new`` without interrupting flows.

    Rates change in place; classes that appeared or vanished are added or deleted; interfaces
    that left the plan lose our qdisc. The kernel state, not ``old``, decides what to change,
    so a reload also repairs classes someone deleted by hand.
    """
    actions: list[str] = []
    keep = {ip.iface for ip in new.interfaces}
    with _ipr(netns) as ipr:
        for ip in old.interfaces:
            if ip.iface not in keep and _remove(ipr, ip.iface):
                actions.append(f"{ip.iface}: del qdisc 1:")
        for ip in new.interfaces:
            actions += _sync_interface(ipr, ip)
    return actions


def remove_plan(plan_or_ifaces: ShapingPlan | Iterable[str], netns: str | None = None) -> list[str]:
    """Delete our root qdisc (and with it every class) from each interface; returns those done.

    Interfaces that are gone or carry a qdisc that is not ours are skipped silently: removal
    runs on shutdown and must not fail because the operator already cleaned up.
    """
    if isinstance(plan_or_ifaces, ShapingPlan):
        ifaces = [ip.iface for ip in plan_or_ifaces.interfaces]
    else:
        ifaces = list(plan_or_ifaces)
    with _ipr(netns) as ipr:
        return [iface for iface in ifaces if _remove(ipr, iface)]


def remove_everywhere(keep: Iterable[str] = (), netns: str | None = None) -> list[str]:
    """Delete our root qdisc from every interface but ``keep``; returns those done.

    What a crash (or a start that failed halfway) left behind is found by its signature
    (:data:`SIGNATURE_R2Q`), not by a plan: `tproxy rules flush` (the unit's ExecStopPost) and
    the daemon's start run it, so no HTB tree of ours outlives the daemon and caps traffic
    that no rule classifies any more."""
    skip = set(keep)
    done: list[str] = []
    with _ipr(netns) as ipr:
        # One dump of each (a qdisc dump is not filtered by interface in the kernel): per-link
        # lookups grew with the square of the links, inside ExecStopPost's time limit.
        names = {int(link["index"]): link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for q in ipr.get_qdiscs():
            index = int(q["index"])
            name = names.get(index)
            if not name or name in skip or q["parent"] != TC_H_ROOT or not _is_ours(q):
                continue
            try:
                _tc(ipr, "del", name, index=index, handle=QDISC_HANDLE, parent=TC_H_ROOT)
            except ShapingError as exc:  # a link that vanished meanwhile: go on with the rest
                log.warning("shaping: removing the qdisc of %s failed: %s", name, exc)
                continue
            done.append(name)
    return done


def _sample(ipr: Any, ifaces: Iterable[str]) -> dict[tuple[str, int], ClassCounters]:
    out: dict[tuple[str, int], ClassCounters] = {}
    for iface in ifaces:
        index = _index(ipr, iface)
        if index is None:
            continue
        root = _root_qdisc(ipr, index)
        if not _is_ours(root):
            continue
        glob = _attr_path(root, "TCA_OPTIONS", "TCA_HTB_INIT")
        # HTB counts only packets for its direct queue (direct_pkts in tc_htb_glob).
        out[(iface, UNSHAPED_CLASSID)] = ClassCounters(0, int(glob["direct_pkts"]), 0, 0)
        for c in ipr.get_classes(index=index):
            if c.get_attr("TCA_KIND") != "htb":
                continue
            stats = c.get_attr("TCA_STATS2")
            basic = stats.get_attr("TCA_STATS_BASIC") if stats is not None else None
            queue = stats.get_attr("TCA_STATS_QUEUE") if stats is not None else None
            out[(iface, int(c["handle"]))] = ClassCounters(
                bytes=int(basic["bytes"]) if basic else 0,
                packets=int(basic["packets"]) if basic else 0,
                drops=int(queue["drops"]) if queue else 0,
                overlimits=int(queue["overlimits"]) if queue else 0,
            )
    return out


def read_counters(
    ifaces: Iterable[str], netns: str | None = None, interval: float = 0.0
) -> dict[tuple[str, int], ClassCounters]:
    """Per (interface, classid): bytes, packets, drops, overlimits of our HTB classes.

    With ``interval`` > 0 the counters are read twice and ``rate_bps`` is the bit rate between
    the two reads (HTB keeps no rate estimator unless one was attached at creation).
    """
    names = list(ifaces)
    with _ipr(netns) as ipr:
        first = _sample(ipr, names)
        if interval <= 0:
            return first
        t0 = time.monotonic()
        time.sleep(interval)
        second = _sample(ipr, names)
        elapsed = time.monotonic() - t0
    out: dict[tuple[str, int], ClassCounters] = {}
    for key, c in second.items():
        before = first.get(key)
        rate = (c.bytes - before.bytes) * 8 / elapsed if before is not None else None
        out[key] = ClassCounters(c.bytes, c.packets, c.drops, c.overlimits, rate)
    return out


def mark_socket(
    sock: socket.socket, plan: ShapingPlan, class_name: str | None, client: str | None = None
) -> int:
    """Put a socket the daemon owns into a class: SO_MARK for the class (and the client's slot
    in a fair class), SO_MAX_PACING_RATE for the class's per-connection cap (socket(7)).

    Called again when the class changes (the response head selected another one); a socket
    that leaves a capped class gets its cap lifted. TCP paces by itself once the option is set,
    no fq qdisc needed (measured: 250000 B/s gives 2.0 Mbit/s). Returns the mark. Needs
    CAP_NET_ADMIN for SO_MARK.
    """
    mark = mark_for(plan, class_name, client)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    cap = plan.pacing.get(class_name) if class_name is not None else None
    # As a u32 buffer: Python's int form is a signed C int and cannot carry ~0U.
    rate = min(cap, PACING_UNLIMITED) if cap else PACING_UNLIMITED
    sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, struct.pack("=I", rate))
    return mark
