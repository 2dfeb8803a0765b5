"""Bandwidth shaping: the ``[shaping]`` config section and the HTB plan, as pure data.

Nothing here touches the kernel. :func:`build_plan` turns the config into per-interface HTB
qdisc/class records (``apply.py`` pushes them with pyroute2), :func:`classify_rules` lists the
netfilter ``CLASSIFY`` rules that steer marked packets into the classes, and
:func:`render_plan` prints both as ``tc``/``iptables`` commands for golden tests and operators.

How traffic reaches a class
---------------------------
The daemon owns both sockets of a proxied flow. It sets ``SO_MARK`` on them (socket(7)); every
packet the socket sends carries that mark, and one mangle ``POSTROUTING`` rule per class turns
``mark/MARK_MASK`` into ``CLASSIFY --set-class 1:<minor>`` (iptables-extensions(8)), which HTB
honours (``htb_classify`` reads ``skb->priority``, net/sched/sch_htb.c). tc filters are not used:
on the target kernel ``u32 match mark`` silently matches everything and ``cls_fw`` is not built
(DESIGN.md §3).

Mark layout (bits 0-7 stay free for the TPROXY divert mark, :class:`tproxy.config.RulesConfig`)::

    bits  8-15  class number n (1..254; 255 = "unshaped": CLASSIFY 1:0, HTB's direct queue)
    bits 16-23  per-client slot inside a per_client_fair class (0 otherwise)

Class ids: the root class is ``1:1``; class n is ``1:<n<<8>`` (hex, so class 1 is ``1:100``,
class 2 ``1:200``); slot s of a fair class n is the leaf ``1:<n<<8 | s+1>``.

Class numbers follow the order of ``[[shaping.class]]`` entries, so moving an entry renumbers the
classes after it; a reload then re-creates those classes and re-marks sockets by name.
A forwarded (NFQUEUE) flow that keeps its class in the connmark must save the slot bits too
(``MARK_MASK``, not only ``CLASS_MARK_MASK``) to keep per-client fairness.

Per-client fair share
---------------------
SFQ and fq_codel are not built on the target kernel, so fairness is built from HTB alone: a
``per_client_fair`` class becomes an inner HTB class with ``fair_slots`` equal leaves (same
rate = class rate / slots, same ceil = class ceil, same quantum). HTB serves active leaves
round-robin by quantum and lends the parent's spare rate to them equally (Documentation in
tc-htb(8), "sharing hierarchy"), so K active clients in distinct slots each get 1/K of the
class. A client's slot is a stable hash of its address (:func:`client_slot`),
computed the same way by the daemon and the NFQUEUE handler, so no per-client state or
on-demand tc changes are needed; two clients that collide share one slot, as flows share an
SFQ bucket. All rules and classes are static, so a reload never has to track which clients
are active.

Cache hits
----------
With ``hits_unshaped`` (the default, like Squid's delay pools which only meter misses) a cache
hit is sent with :data:`UNSHAPED_MARK`, which CLASSIFY maps to ``1:0``: HTB's direct queue.
"""

from __future__ import annotations

import ipaddress
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tproxy.config import Reader, register_section

# -- numbering ------------------------------------------------------------------------------

QDISC_MAJOR = 1
QDISC_HANDLE = QDISC_MAJOR << 16  # "1:"
ROOT_MINOR = 1  # "1:1", the class that carries the link rate
MARK_SHIFT = 8
CLASS_MARK_MASK = 0xFF << MARK_SHIFT
SLOT_SHIFT = 16
SLOT_MARK_MASK = 0xFF << SLOT_SHIFT
MARK_MASK = CLASS_MARK_MASK | SLOT_MARK_MASK
MAX_CLASSES = 254
UNSHAPED_NUMBER = 0xFF
UNSHAPED_MARK = UNSHAPED_NUMBER << MARK_SHIFT
# CLASSIFY to "<major>:0" selects HTB's direct queue: sent without shaping (sch_htb.c).
UNSHAPED_CLASSID = QDISC_HANDLE
DEFAULT_FAIR_SLOTS = 16
MAX_FAIR_SLOTS = 255  # slot s uses leaf minor low byte s+1, which must fit in 8 bits

# HTB's tree depth limit is TC_HTB_MAXDEPTH = 8 levels (include/uapi/linux/pkt_sched.h).
# The root class and a fair class's slot leaves take two of them.
MAX_NESTING = 6

# -- HTB parameters -------------------------------------------------------------------------

DEFAULT_LINK_RATE = 1_000_000_000  # bit/s: "1gbit"
DEFAULT_PRIO = 3  # mid-range: leaves room for both more and less urgent classes
MAX_PRIO = 7  # TC_HTB_NUMPRIO - 1
MIN_RATE = 8_000  # bit/s; below this HTB's rate tables lose precision
MTU = 1514  # Ethernet frame incl. header, what HTB accounts per packet
# Tokens for this long at the class rate; at least two frames. At high rates a burst smaller
# than what can be sent between two timer events caps throughput below the rate (tc-htb(8),
# "burst"), so it grows with the rate.
BURST_SECONDS = 0.005
MIN_BURST = 2 * MTU
# Quantum (bytes served per round when leaves borrow) as the kernel would derive it from r2q=10,
# clamped to the kernel's sane range; we set it explicitly so r2q is free to carry our signature.
QUANTUM_DIVISOR = 10
MIN_QUANTUM = MTU
MAX_QUANTUM = 200_000
# HTB's r2q is unused when every class has an explicit quantum; a qdisc "1:" with this value is
# recognised as created by tproxy (see apply.py) and never confused with an operator's own HTB.
SIGNATURE_R2Q = 0x7470  # "tp"

CLASS_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")
# A real interface name (IFNAMSIZ 16 with the NUL): HTB needs one device, so no "+" wildcard.
IFACE_NAME_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
CONTENT_TYPE_RE = re.compile(r"^[a-z0-9!#$&^_.+-]+/(\*|[a-z0-9!#$&^_.+-]+)$")
CacheState = Literal["hit", "miss"]
Role = Literal["lan", "wan"]


# -- config ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapingClass:
    name: str
    rate: int  # bit/s, guaranteed
    ceil: int | None = None  # bit/s; None: the parent's ceil (the link rate at the top)
    prio: int = DEFAULT_PRIO  # 0 is served first when classes borrow spare bandwidth
    parent: str | None = None
    per_client_fair: bool = False
    fair_slots: int = DEFAULT_FAIR_SLOTS
    per_connection_cap: int | None = None  # bit/s, via SO_MAX_PACING_RATE


@dataclass(frozen=True)
class ShapingSelector:
    class_name: str
    group: str | None = None  # client group from the filter section
    domains: tuple[str, ...] = ()  # host suffixes, lower case, no leading dot
    url_prefix: str | None = None
    content_type: str | None = None  # "video/mp4" or "video/*"
    min_response_size: int | None = None  # bytes
    cache: CacheState | None = None
    window: str | None = None  # time-window name from the filter section


@dataclass(frozen=True)
class ShapingConfig:
    enabled: bool = False
    lan_interface_rate: int = DEFAULT_LINK_RATE
    wan_interface_rate: int = DEFAULT_LINK_RATE
    # Where uploads leave the gateway. Named, not guessed from the routing table: a gateway
    # may have several uplinks (or a VPN) and routes change at runtime; empty = uploads are
    # not shaped.
    wan_interfaces: tuple[str, ...] = ()
    classes: tuple[ShapingClass, ...] = ()
    default_class: str | None = None  # None: unmatched traffic is not shaped
    selectors: tuple[ShapingSelector, ...] = ()
    hits_unshaped: bool = True

    def find(self, name: str) -> ShapingClass | None:
        for c in self.classes:
            if c.name == name:
                return c
        return None


def _parse_class(r: Reader) -> ShapingClass | None:
    name = r.string("name", "")
    if not CLASS_NAME_RE.match(name):
        r.error("name", f"class name must match {CLASS_NAME_RE.pattern}; got {name!r}")
    rate = r.rate("rate", MIN_RATE) if r.has("rate") else 0
    if not r.has("rate"):
        r.error("rate", "a class needs a guaranteed rate")
    ceil = r.rate("ceil", rate) if r.has("ceil") else None
    if ceil is not None and rate and ceil < rate:
        r.error("ceil", f"ceil {format_rate(ceil)} is below the class rate {format_rate(rate)}")
    if rate and rate < MIN_RATE:
        r.error("rate", f"must be at least {format_rate(MIN_RATE)}")
    parent = r.string("parent", "") or None
    fair = r.boolean("per_client_fair", False)
    slots = r.integer("fair_slots", DEFAULT_FAIR_SLOTS, 2, MAX_FAIR_SLOTS)
    cap = r.rate("per_connection_cap", 1) if r.has("per_connection_cap") else None
    if r.has("fair_slots") and not fair:
        r.error("fair_slots", "only meaningful with per_client_fair = true")
    if cap is not None and cap < MIN_RATE:
        # SO_MAX_PACING_RATE takes bytes/s: a few bits a second stalls the connection.
        r.error("per_connection_cap", f"must be at least {format_rate(MIN_RATE)}")
    if fair and rate >= MIN_RATE and rate // slots < MIN_RATE:
        # Each slot leaf gets at least MIN_RATE (fair_leaf_rate): more slots than the class
        # rate can give that would guarantee more than the class has, which HTB accepts and
        # silently under-delivers.
        r.error(
            "fair_slots",
            f"{slots} slots of {format_rate(rate)} are below {format_rate(MIN_RATE)} each;"
            f" use at most {rate // MIN_RATE} slots or a higher rate",
        )
    cls = ShapingClass(
        name=name,
        rate=rate,
        ceil=ceil,
        prio=r.integer("prio", DEFAULT_PRIO, 0, MAX_PRIO),
        parent=parent,
        per_client_fair=fair,
        fair_slots=slots,
        per_connection_cap=cap,
    )
    r.finish()
    return cls if name and rate else None


def _parse_selector(r: Reader) -> ShapingSelector:
    domains: list[str] = []
    for index, d in enumerate(r.str_list("domains")):
        norm = d.strip().lower().lstrip(".")
        if not norm or " " in norm:
            r.error(f"domains[{index}]", f"not a domain suffix: {d!r}")
        else:
            domains.append(norm)
    content_type = r.string("content_type", "").strip().lower() or None
    if content_type is not None and not CONTENT_TYPE_RE.match(content_type):
        r.error("content_type", f'expected "type/subtype" or "type/*"; got {content_type!r}')
    min_size = r.size("min_response_size", 0) if r.has("min_response_size") else None
    cache_text = r.string("cache", "", ("", "hit", "miss"))
    cache: CacheState | None = None
    if cache_text == "hit":
        cache = "hit"
    elif cache_text == "miss":
        cache = "miss"
    sel = ShapingSelector(
        class_name=r.string("class", ""),
        group=r.string("group", "") or None,
        domains=tuple(domains),
        url_prefix=r.string("url_prefix", "") or None,
        content_type=content_type,
        min_response_size=min_size,
        cache=cache,
        window=r.string("window", "") or None,
    )
    if not sel.class_name:
        r.error("class", "a selector needs the name of the class it selects")
    r.finish()
    return sel


def _effective_ceils(classes: Sequence[ShapingClass], link: int) -> dict[str, int]:
    """Each class's ceil with inheritance resolved (no cycles: checked before)."""
    by_name = {c.name: c for c in classes}
    out: dict[str, int] = {}

    def ceil_of(c: ShapingClass) -> int:
        if c.name not in out:
            parent = by_name.get(c.parent) if c.parent else None
            limit = ceil_of(parent) if parent is not None else link
            out[c.name] = min(c.ceil, limit) if c.ceil is not None else limit
        return out[c.name]

    for c in classes:
        ceil_of(c)
    return out


def _validate(r: Reader, cfg: ShapingConfig) -> None:
    """Cross-class checks; keys name the array element (``class[2].parent``)."""
    names: dict[str, int] = {}
    for i, c in enumerate(cfg.classes):
        if c.name in names:
            r.error(
                f"class[{i}].name", f"duplicate class name {c.name!r} (see class[{names[c.name]}])"
            )
        else:
            names[c.name] = i
    if len(cfg.classes) > MAX_CLASSES:
        r.error("class", f"at most {MAX_CLASSES} classes (8 mark bits, one value reserved)")
    structural_ok = True
    for i, c in enumerate(cfg.classes):
        if c.parent is None:
            continue
        if c.parent not in names:
            r.error(f"class[{i}].parent", f"no class named {c.parent!r}")
            structural_ok = False
    if not structural_ok:
        return
    by_name = {c.name: c for c in cfg.classes}
    reported: set[str] = set()
    for i, c in enumerate(cfg.classes):
        chain = [c.name]
        cur = c
        while cur.parent is not None:
            if cur.parent in chain:
                cycle = [*chain[chain.index(cur.parent) :], cur.parent]
                if not reported & set(cycle):
                    r.error(
                        f"class[{i}].parent", "parent chain forms a cycle: " + " → ".join(cycle)
                    )
                reported.update(cycle)
                structural_ok = False
                break
            chain.append(cur.parent)
            cur = by_name[cur.parent]
        else:
            depth = len(chain)
            if depth > MAX_NESTING:
                r.error(f"class[{i}].parent", f"classes nest at most {MAX_NESTING} deep")
    if not structural_ok:
        return

    children: dict[str | None, list[int]] = {}
    for i, c in enumerate(cfg.classes):
        children.setdefault(c.parent, []).append(i)
    ceils = _effective_ceils(cfg.classes, cfg.lan_interface_rate)
    for i, c in enumerate(cfg.classes):
        parent_ceil = ceils[c.parent] if c.parent else cfg.lan_interface_rate
        if c.ceil is not None and c.ceil > parent_ceil:
            whose = f"class {c.parent!r}" if c.parent else "lan_interface_rate"
            r.error(
                f"class[{i}].ceil",
                f"ceil {format_rate(c.ceil)} exceeds the ceil of {whose}"
                f" ({format_rate(parent_ceil)})",
            )
        if c.rate > ceils[c.name] and c.ceil is None:  # an explicit ceil was checked in parsing
            r.error(
                f"class[{i}].rate",
                f"rate {format_rate(c.rate)} exceeds the class ceil {format_rate(ceils[c.name])}",
            )
        if c.per_client_fair and c.name in children:
            r.error(
                f"class[{i}].per_client_fair",
                "a class with child classes cannot also split per client",
            )
    # Guaranteed rates that add up to more than the parent can pass are no guarantee: an error,
    # not a warning. (HTB itself would accept it and silently under-deliver.)
    for parent, kids in children.items():
        if any(cfg.classes[k].rate > ceils[cfg.classes[k].name] for k in kids):
            continue  # already reported for the child
        total = sum(cfg.classes[k].rate for k in kids)
        if parent is None:
            limit, key = cfg.lan_interface_rate, "lan_interface_rate"
        else:
            # The parent's guaranteed rate, not its ceil: children guaranteed more than the
            # parent is guaranteed are promised what it may never get.
            limit, key = cfg.classes[names[parent]].rate, f"class[{names[parent]}].rate"
        if total > limit:
            listed = ", ".join(cfg.classes[k].name for k in kids)
            whose = f"class {parent!r}" if parent else "the LAN link"
            r.error(
                key,
                f"guaranteed rates of {listed} sum to {format_rate(total)}, "
                f"more than {format_rate(limit)} of {whose}",
            )

    if cfg.default_class is not None:
        d = by_name.get(cfg.default_class)
        if d is None:
            r.error("default_class", f"no class named {cfg.default_class!r}")
        elif d.name in children:
            r.error("default_class", f"class {d.name!r} has child classes; name a leaf class")
        elif d.per_client_fair:
            r.error(
                "default_class",
                "cannot be per_client_fair: unmarked traffic carries no client slot",
            )
    for i, s in enumerate(cfg.selectors):
        target = by_name.get(s.class_name)
        if s.class_name and target is None:
            r.error(f"select[{i}].class", f"no class named {s.class_name!r}")
        elif target is not None and target.name in children:
            r.error(
                f"select[{i}].class", f"class {target.name!r} has child classes; name a leaf class"
            )
        if s.cache == "hit" and cfg.hits_unshaped:
            r.error(f"select[{i}].cache", "cache hits are never shaped while hits_unshaped = true")


def parse_shaping(r: Reader) -> ShapingConfig:
    d = ShapingConfig()
    enabled = r.boolean("enabled", d.enabled)
    lan_rate = r.rate("lan_interface_rate", d.lan_interface_rate)
    wan_rate = r.rate("wan_interface_rate", d.wan_interface_rate)
    # The root class carries the link rate; HTB's rate tables lose precision below MIN_RATE.
    for key, value in (("lan_interface_rate", lan_rate), ("wan_interface_rate", wan_rate)):
        if 0 < value < MIN_RATE:
            r.error(key, f"must be at least {format_rate(MIN_RATE)}")
    wan_ifaces = tuple(r.str_list("wan_interfaces"))
    for index, name in enumerate(wan_ifaces):
        if not IFACE_NAME_RE.match(name):
            r.error(f"wan_interfaces[{index}]", f"not an interface name: {name!r}")
    classes = [c for c in (_parse_class(t) for t in r.tables("class")) if c is not None]
    selectors = [_parse_selector(t) for t in r.tables("select")]
    cfg = ShapingConfig(
        enabled=enabled,
        lan_interface_rate=lan_rate,
        wan_interface_rate=wan_rate,
        wan_interfaces=wan_ifaces,
        classes=tuple(classes),
        default_class=r.string("default_class", "") or None,
        selectors=tuple(selectors),
        hits_unshaped=r.boolean("hits_unshaped", d.hits_unshaped),
    )
    # Dropped (invalid) classes would shift indexes; only cross-check a complete list.
    if len(classes) == len(r.data.get("class", []) or []):
        _validate(r, cfg)
    r.finish()
    return cfg


register_section("shaping", parse_shaping)


# -- selection (pure; the daemon calls it when the request, then the response head, is known) --


@dataclass(frozen=True)
class FlowFacts:
    """What is known about a flow when choosing its class. ``None`` = not known yet."""

    host: str = ""
    url: str = ""
    groups: frozenset[str] = frozenset()
    windows: frozenset[str] = frozenset()  # time windows active now
    # The media type as tproxy.uri.media_type gives it: "type/subtype", lower-case, no parameters.
    content_type: str | None = None
    response_size: int | None = None
    cache: CacheState | None = None


def _selector_matches(s: ShapingSelector, f: FlowFacts) -> bool:
    if s.group is not None and s.group not in f.groups:
        return False
    if s.window is not None and s.window not in f.windows:
        return False
    if s.domains:
        host = f.host.lower().rstrip(".")
        if not any(host == d or host.endswith("." + d) for d in s.domains):
            return False
    if s.url_prefix is not None and not f.url.startswith(s.url_prefix):
        return False
    if s.content_type is not None:
        if f.content_type is None:
            return False
        want_type, want_sub = s.content_type.split("/", 1)
        have_type, _, have_sub = f.content_type.partition("/")
        if have_type != want_type or (want_sub != "*" and have_sub != want_sub):
            return False
    if s.min_response_size is not None and (
        f.response_size is None or f.response_size < s.min_response_size
    ):
        return False
    return s.cache is None or s.cache == f.cache


def select_class(cfg: ShapingConfig, facts: FlowFacts) -> str | None:
    """The class for a flow, or None for "not shaped". First matching selector wins.

    A selector whose criterion is not known yet (content type before the response head) does
    not match; the daemon asks again once the response head is in and re-marks the socket.
    """
    if cfg.hits_unshaped and facts.cache == "hit":
        return None
    for s in cfg.selectors:
        if _selector_matches(s, facts):
            return s.class_name
    return cfg.default_class


# -- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassRecord:
    """One HTB class on one interface, with everything ``tc class add`` needs."""

    classid: int  # full handle, major << 16 | minor
    parent: int  # full handle; QDISC_HANDLE for the root class
    name: str  # "" for the root class, "<class>" or "<class>#<slot>" for fair leaves
    rate: int  # bit/s
    ceil: int  # bit/s
    burst: int  # bytes
    cburst: int  # bytes
    quantum: int  # bytes
    prio: int
    mark: int | None  # the mark steered here (leaves only)


@dataclass(frozen=True)
class InterfacePlan:
    iface: str
    role: Role
    link_rate: int  # bit/s
    default_minor: int  # HTB "default": unclassified packets; 0 = direct (unshaped)
    classes: tuple[ClassRecord, ...]  # parents before children


@dataclass(frozen=True)
class ShapingPlan:
    interfaces: tuple[InterfacePlan, ...] = ()
    numbers: Mapping[str, int] = field(default_factory=dict)  # class name -> n
    fair_slots: Mapping[str, int] = field(default_factory=dict)  # fair class -> slots
    pacing: Mapping[str, int] = field(default_factory=dict)  # class -> bytes/s cap


def classid_str(handle: int) -> str:
    """tc notation: hex major and minor (``0x10100`` → ``"1:100"``)."""
    return f"{handle >> 16:x}:{handle & 0xFFFF:x}"


def class_minor(number: int, slot: int | None = None) -> int:
    return (number << 8) | (0 if slot is None else slot + 1)


def client_slot(client: str, slots: int) -> int:
    """Stable slot of a client in a fair class: CRC-32 of the packed address.

    Stable across processes and restarts (unlike ``hash()``), so the daemon and the NFQUEUE
    handler agree without sharing state. An IPv4-mapped address (a dual-stack socket's view,
    RFC 4291 §2.5.5.2) is the IPv4 client, so both see the same slot. An IPv6 client is its
    whole address: the hosts of a LAN segment share its /64 (SLAAC), so hashing the /64 put
    every one of them in one slot. (A host with several temporary addresses, RFC 8981, may
    land in several slots.)
    """
    try:
        addr = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return zlib.crc32(client.encode()) % slots
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped
        packed = mapped.packed if mapped is not None else addr.packed
    else:
        packed = addr.packed
    return zlib.crc32(packed) % slots


def mark_for(plan: ShapingPlan, class_name: str | None, client: str | None = None) -> int:
    """SO_MARK value for a flow in ``class_name`` (None: unshaped) from ``client``."""
    if class_name is None:
        return UNSHAPED_MARK
    n = plan.numbers[class_name]
    slots = plan.fair_slots.get(class_name)
    slot = client_slot(client, slots) if slots and client is not None else 0
    return (n << MARK_SHIFT) | (slot << SLOT_SHIFT)


def pacing_rate_bytes(cls: ShapingClass) -> int | None:
    """SO_MAX_PACING_RATE (bytes/s, socket(7)) for one connection of this class, if capped."""
    if cls.per_connection_cap is None:
        return None
    return max(1, cls.per_connection_cap // 8)


def _burst(rate_bits: int) -> int:
    return max(MIN_BURST, int(rate_bits / 8 * BURST_SECONDS))


def _quantum(rate_bits: int) -> int:
    return min(MAX_QUANTUM, max(MIN_QUANTUM, rate_bits // 8 // QUANTUM_DIVISOR))


def _record(
    classid: int, parent: int, name: str, rate: int, ceil: int, prio: int, mark: int | None
) -> ClassRecord:
    # Only a WAN link slower than a class's ceil can push a rate above its (clamped) ceil.
    rate = min(rate, ceil)
    return ClassRecord(
        classid=classid,
        parent=parent,
        name=name,
        rate=rate,
        ceil=ceil,
        burst=_burst(rate),
        cburst=_burst(ceil),
        quantum=_quantum(rate),
        prio=prio,
        mark=mark,
    )


def fair_leaf_rate(class_rate: int, slots: int) -> int:
    """Each slot's guaranteed share of a fair class (equal, so HTB shares equally)."""
    return max(MIN_RATE, class_rate // slots)


def _interface_plan(cfg: ShapingConfig, iface: str, role: Role, link: int) -> InterfacePlan:
    numbers = {c.name: i + 1 for i, c in enumerate(cfg.classes)}
    parents = {c.parent for c in cfg.classes if c.parent is not None}
    # Config validation holds guaranteed rates within the LAN link. A slower WAN link gets all
    # rates scaled down by one factor, keeping their ratios, instead of a second set of rates.
    top_sum = sum(c.rate for c in cfg.classes if c.parent is None)
    factor = min(1.0, link / top_sum) if top_sum else 1.0
    ceils = _effective_ceils(cfg.classes, link)
    root = QDISC_HANDLE | ROOT_MINOR
    records = [_record(root, QDISC_HANDLE, "", link, link, 0, None)]
    # Depth-first in config order: parents always precede their children.
    order: list[ShapingClass] = []

    def visit(parent: str | None) -> None:
        for c in cfg.classes:
            if c.parent == parent:
                order.append(c)
                visit(c.name)

    visit(None)
    for c in order:
        n = numbers[c.name]
        handle = QDISC_HANDLE | class_minor(n)
        parent_handle = QDISC_HANDLE | class_minor(numbers[c.parent]) if c.parent else root
        rate = max(MIN_RATE, int(c.rate * factor))
        leaf = c.name not in parents and not c.per_client_fair
        mark = (n << MARK_SHIFT) if leaf else None
        records.append(_record(handle, parent_handle, c.name, rate, ceils[c.name], c.prio, mark))
        if c.per_client_fair:
            share = fair_leaf_rate(rate, c.fair_slots)
            for s in range(c.fair_slots):
                records.append(
                    _record(
                        QDISC_HANDLE | class_minor(n, s),
                        handle,
                        f"{c.name}#{s}",
                        share,
                        ceils[c.name],
                        c.prio,
                        (n << MARK_SHIFT) | (s << SLOT_SHIFT),
                    )
                )
    default_minor = class_minor(numbers[cfg.default_class]) if cfg.default_class else 0
    return InterfacePlan(iface, role, link, default_minor, tuple(records))


def build_plan(
    cfg: ShapingConfig, lan_ifaces: Iterable[str], wan_ifaces: Iterable[str] = ()
) -> ShapingPlan:
    """The HTB tree for every LAN (downloads to clients) and WAN (uploads) interface.

    An empty plan when shaping is disabled; ``apply_plan`` of it changes nothing.
    """
    if not cfg.enabled:
        return ShapingPlan()
    interfaces = [_interface_plan(cfg, i, "lan", cfg.lan_interface_rate) for i in lan_ifaces]
    interfaces += [_interface_plan(cfg, i, "wan", cfg.wan_interface_rate) for i in wan_ifaces]
    return ShapingPlan(
        interfaces=tuple(interfaces),
        numbers={c.name: i + 1 for i, c in enumerate(cfg.classes)},
        fair_slots={c.name: c.fair_slots for c in cfg.classes if c.per_client_fair},
        pacing={c.name: rate for c in cfg.classes if (rate := pacing_rate_bytes(c)) is not None},
    )


def classify_rules(plan: ShapingPlan) -> list[tuple[int, int, str, str]]:
    """(mark, mask, out_iface, classid) for mangle POSTROUTING, one per leaf and interface.

    All rules use the full :data:`MARK_MASK` and distinct values, so they are mutually
    exclusive and their order does not matter. CLASSIFY does not stop traversal.
    """
    out: list[tuple[int, int, str, str]] = []
    for ip in plan.interfaces:
        for rec in ip.classes:
            if rec.mark is not None:
                out.append((rec.mark, MARK_MASK, ip.iface, classid_str(rec.classid)))
        out.append((UNSHAPED_MARK, MARK_MASK, ip.iface, classid_str(UNSHAPED_CLASSID)))
    return out


# -- text -----------------------------------------------------------------------------------


def format_rate(bits: float) -> str:
    """Compact tc-style rate: ``2mbit``, ``1.5gbit``, ``640kbit``, ``900bit``."""
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.4g}{unit}"
    return f"{bits:.4g}bit"


def render_plan(plan: ShapingPlan) -> str:
    """The plan as the ``tc`` and ``iptables`` commands it amounts to (golden tests, --dry-run).

    Rates are exact integers in bit/s so the text is stable (the kernel keeps whole bytes/s).
    The CLASSIFY rules are shown in the chain the daemon puts them in, ``TPROXY-POST``, which
    also restores marks from the connmark and exists for ip6tables alike (`tproxy rules show`
    prints it whole): rules copied by hand elsewhere would outlive `tproxy rules flush`.
    """
    from tproxy.netfilter.render import CHAIN_POST

    lines: list[str] = [
        f"# CLASSIFY rules live in tproxy's mangle chain {CHAIN_POST} (from POSTROUTING), for"
        " iptables and ip6tables; `tproxy rules show` prints the whole chain"
    ]
    rules = classify_rules(plan)
    for ip in plan.interfaces:
        lines.append(f"# {ip.iface} ({ip.role}, link {format_rate(ip.link_rate)})")
        lines.append(
            f"tc qdisc replace dev {ip.iface} root handle {QDISC_MAJOR}: htb"
            f" default {ip.default_minor:x} r2q {SIGNATURE_R2Q}"
        )
        for rec in ip.classes:
            parent = f"{QDISC_MAJOR}:" if rec.parent == QDISC_HANDLE else classid_str(rec.parent)
            label = rec.name or "root"
            steer = f" mark {rec.mark:#x}" if rec.mark is not None else ""
            lines.append(
                f"tc class replace dev {ip.iface} parent {parent}"
                f" classid {classid_str(rec.classid)} htb rate {rec.rate}bit ceil {rec.ceil}bit"
                f" burst {rec.burst}b cburst {rec.cburst}b quantum {rec.quantum} prio {rec.prio}"
                f"  # {label}{steer}"
            )
        for mark, mask, iface, classid in rules:
            if iface == ip.iface:
                lines.append(
                    f"iptables -t mangle -A {CHAIN_POST} -o {iface} -m mark --mark"
                    f" {mark:#x}/{mask:#x} -j CLASSIFY --set-class {classid}"
                )
    if plan.pacing:
        lines.append("# per-connection caps (SO_MAX_PACING_RATE, bytes/s)")
        lines.extend(f"pacing {name} {rate}" for name, rate in sorted(plan.pacing.items()))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ClassCounters:
    """Kernel counters of one HTB class (``tc -s class show``)."""

    bytes: int
    packets: int
    drops: int
    overlimits: int
    rate_bps: float | None = None  # bit/s over the sampling interval; None if not sampled


def class_rows(
    plan: ShapingPlan, counters: Mapping[tuple[str, int], ClassCounters]
) -> list[dict[str, Any]]:
    """The plan's classes with their counters as plain data (``--json``, ``tproxy status``)."""
    rows: list[dict[str, Any]] = []
    for ip in plan.interfaces:
        for rec in ip.classes:
            c = counters.get((ip.iface, rec.classid))
            rows.append(
                {
                    "interface": ip.iface,
                    "role": ip.role,
                    "class": rec.name or "(root)",
                    "classid": classid_str(rec.classid),
                    "rate": rec.rate,
                    "ceil": rec.ceil,
                    "bytes": c.bytes if c else None,
                    "packets": c.packets if c else None,
                    "drops": c.drops if c else None,
                    "rate_bps": c.rate_bps if c else None,
                }
            )
    return rows


def format_show(plan: ShapingPlan, counters: Mapping[tuple[str, int], ClassCounters]) -> str:
    """``tproxy shaping show``: the plan's classes with their counters, one line each.

    Fair-share slot leaves that carried no traffic are left out to keep the table short.
    ``counters`` is keyed by (interface, classid) as :func:`tproxy.shaping.apply.read_counters`
    returns it.
    """
    if not plan.interfaces:
        return "shaping disabled\n"
    head = (
        f"{'class':<20} {'classid':<8} {'rate':>9} {'ceil':>9} {'sent':>12} {'pkts':>9}"
        f" {'drops':>7} {'now':>10}"
    )
    out: list[str] = []
    for ip in plan.interfaces:
        out.append(f"{ip.iface} ({ip.role}, link {format_rate(ip.link_rate)})")
        out.append(head)
        depth: dict[int, int] = {QDISC_HANDLE: -1}
        for rec in ip.classes:
            depth[rec.classid] = depth.get(rec.parent, 0) + 1
            c = counters.get((ip.iface, rec.classid))
            if "#" in rec.name and (c is None or c.packets == 0):
                continue
            label = ("  " * depth[rec.classid] + (rec.name or "(root)"))[:20]
            if c is None:
                sent = pkts = drops = now = "-"
            else:
                sent, pkts, drops = f"{c.bytes}B", str(c.packets), str(c.drops)
                now = format_rate(c.rate_bps) if c.rate_bps is not None else "-"
            out.append(
                f"{label:<20} {classid_str(rec.classid):<8} {format_rate(rec.rate):>9}"
                f" {format_rate(rec.ceil):>9} {sent:>12} {pkts:>9} {drops:>7} {now:>10}"
            )
        direct = counters.get((ip.iface, UNSHAPED_CLASSID))
        if direct is not None:
            out.append(
                f"{'(unshaped)':<20} {'1:0':<8} {'-':>9} {'-':>9} {'-':>12} {direct.packets:>9}"
            )
    return "\n".join(out) + "\n"
