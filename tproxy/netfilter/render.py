"""Kernel rules as data and text: what tproxy asks of netfilter and policy routing.

Pure: a :class:`RulesPlan` goes in, ``iptables-restore --noflush`` text (and a routing
description) comes out. Nothing here reads or changes the system; :mod:`.apply` and
:mod:`.routing` do that.

Ownership. Every chain tproxy creates is named ``TPROXY-…`` (:data:`CHAIN_PREFIX`); besides those
chains we only add *hook jumps* (``-I PREROUTING 1 -j TPROXY-PRE``) to built-in chains. Nothing
else is ever declared, flushed or deleted, so an operator's own rules are left alone.

Packet mark layout (one 32-bit ``skb->mark`` / ``ct->mark``, shared with the daemon's NFQUEUE
handler and the shaping code):

=============  ==========================================================================
bits           meaning
=============  ==========================================================================
``fwmark``     TPROXY divert (default 0x1, configurable as ``rules.fwmark``/``fwmark_mask``):
               selects the policy-routing table whose only route is ``local default dev
               lo``, which delivers diverted packets to our socket.
``0x2``        NFQUEUE verdict "accept": the handler sets it (``pkt.set_mark(m);
               pkt.repeat()``); saved in the connmark, later packets skip the queue.
``0x4``        NFQUEUE verdict "reset": saved in the connmark and restored into the mark of
               every later packet; a filter FORWARD rule answers every packet carrying it,
               in both directions, with a TCP reset.
``0x8``        set on a queued packet that connection tracking finds INVALID, so that the
               daemon knows it carries no connmark (see rule 7).
``0x10``       connmark only: the flow's SYN came from the LAN to an HTTPS port (its packets
               are queued until it has a verdict), so the server's replies are queued too.
``0x20``       set on a queued reply from the server of such a flow (rule 8).
``0xff00``     shaping class number (``class << 8``); CLASSIFY rules in mangle POSTROUTING
               map it to an HTB class per egress interface.
``0xff0000``   client slot inside a per-client fair shaping class (``slot << 16``); kept in
               the connmark with the class so forwarded (SNI-classified) flows stay fair.
=============  ==========================================================================

Rule order in ``TPROXY-PRE`` (see DESIGN.md §3 for the measurements behind it):

1. NFQUEUE verdict bookkeeping (only with ``nfqueue_num``), first because it is what nearly every
   packet of a forwarded HTTPS flow hits: a packet of an accepted flow (connmark verdict bits
   ``0x2``) on an HTTPS port RETURNs after one connmark match; a reset flow's packets get the
   verdict restored into their mark (the ``TPROXY-FWD`` REJECT tests the packet mark, a native
   nftables comparison, not the connmark); a packet re-injected with a fresh verdict saves it
   into the connmark; packets carrying a verdict RETURN (they skip the queue and TPROXY: HTTPS
   ports are never intercepted ones). Only HTTPS flows ever get a verdict, so every
   connmark match is behind a native ``--sport``/``--dport`` test and other traffic pays two
   port comparisons and one mark comparison.
2. ``! --syn -m socket --transparent`` → TPROXY-DIVERT (mark + ACCEPT): packets of flows we
   already own, the bulk of what reaches this chain, including origin→client return traffic
   of transparent upstream sockets arriving on the WAN, leave after one port comparison and
   one socket lookup. The lookup only runs for packets whose source or destination port is a
   diverted port (:meth:`RulesPlan.diverted_ports`; one rule per side, origin replies first:
   they carry a download), so other forwarded TCP flows (measured: 2–8 % CPU per GB) never pay
   for it. SYNs are not looked up: a new SYN whose 4-tuple matches one of our TIME_WAIT
   sockets would be diverted to that dead socket and the client retries only after 1 s.
3. destination of type LOCAL → RETURN: the gateway's own services are never intercepted. The
   gateway's own outgoing traffic is never touched because we only hook PREROUTING. The
   addrtype match is a FIB lookup per packet, which is why owned flows leave before it, and
   why it only runs for packets to an intercepted port or (with the queue) an HTTPS port: no
   other packet can reach a rule below that it protects.
4. bypass clients/destinations, for packets from LAN interfaces → RETURN.
5. ``--syn`` from the LAN to the intercepted ports → TPROXY.
6. non-SYN from the LAN to the intercepted ports → TPROXY (e.g. an ACK for a connection whose
   socket is gone reaches the listener, which answers with a reset).
7. packets of HTTPS flows from the LAN without a verdict yet → NFQUEUE (SNI peek),
   ``--queue-bypass`` so traffic flows when no daemon listens. INVALID ones (no connmark: out
   of connection tracking's window, say) are queued too, marked ``0x8`` first: a hello the
   server's stack takes although conntrack finds it out of window must not pass unjudged;
   the daemon judges such a packet with its flow, or lets it pass when it knows no flow.
8. the server's replies in such a flow without a verdict yet → marked ``0x20`` here and queued in
   ``TPROXY-MFWD`` (mangle FORWARD), where NAT has given them back the client's address: the
   daemon learns the server's ISN from its SYN-ACK and gives the flow's verdict mark once the
   server has acknowledged the hello it judged and answered it (not with a HelloRetryRequest),
   so that a fake hello the server dropped can never earn the mark for the real one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# -- names -------------------------------------------------------------------------------------

CHAIN_PREFIX = "TPROXY-"
CHAIN_PRE = "TPROXY-PRE"  # mangle, hooked from PREROUTING
CHAIN_DIVERT = "TPROXY-DIVERT"  # mangle, called from TPROXY-PRE
CHAIN_POST = "TPROXY-POST"  # mangle, hooked from POSTROUTING (shaping classes)
CHAIN_FWD = "TPROXY-FWD"  # filter, hooked from FORWARD (QUIC reject, verdict resets)
CHAIN_MFWD = "TPROXY-MFWD"  # mangle, hooked from FORWARD (servers' replies to the queue)

# -- mark layout (see module docstring) ------------------------------------------------------

MARK_DIVERT_DEFAULT = 0x1
MARK_VERDICT_ACCEPT = 0x2
MARK_VERDICT_RESET = 0x4
MARK_VERDICT_MASK = MARK_VERDICT_ACCEPT | MARK_VERDICT_RESET
MARK_INVALID = 0x8
MARK_QUEUED = 0x10  # in the connmark
MARK_REPLY = 0x20
MARK_CLASS_SHIFT = 8
MARK_CLASS_MASK = 0xFF00
MAX_CLASS_NUMBER = MARK_CLASS_MASK >> MARK_CLASS_SHIFT
MARK_SLOT_MASK = 0xFF0000
# The shaping bits a packet's class is matched on (tproxy.shaping.model.MARK_MASK).
MARK_SHAPING_MASK = MARK_CLASS_MASK | MARK_SLOT_MASK
# Bits the divert mark must stay clear of; the slot bits only while shaping classes exist.
# (MARK_QUEUED lives in the connmark only: no packet mark bit is copied to or from it.)
MARK_RESERVED = MARK_VERDICT_MASK | MARK_INVALID | MARK_REPLY | MARK_CLASS_MASK
# What the connmark carries for a flow: its verdict, its shaping class and client slot.
MARK_CONN_MASK = MARK_VERDICT_MASK | MARK_SHAPING_MASK
MARK_MAX = 0xFFFFFFFF

# -- limits ------------------------------------------------------------------------------------

# xt_multiport takes at most 15 ports per rule (XT_MULTI_PORTS in linux/netfilter/xt_multiport.h).
MULTIPORT_MAX = 15
NFQUEUE_NUM_MAX = 65535
# Policy routing (linux/fib_rules.h): 0 is the "local" lookup, 32766/32767 main/default.
RULE_PRIORITY_MAX = 32765
# RT_TABLE_DEFAULT/MAIN/LOCAL; RT_TABLE_MAX is 2**32 - 1 and reserved.
RESERVED_TABLES = (253, 254, 255)
ROUTE_TABLE_MAX = 0xFFFFFFFE
# HTB handles are 16-bit major:minor (tc(8)).
CLASS_ID_MAX = 0xFFFF
# IFNAMSIZ is 16 including the NUL; iptables accepts a trailing "+" wildcard.
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@\-]{1,15}\+?$|^\+$")

FAMILIES = (4, 6)
# The address TPROXY hands diverted connections to; the daemon's IP_TRANSPARENT listener must be
# bound to it or to the wildcard address. Loopback keeps the listener unreachable as an ordinary
# service from the LAN (a direct connection to gateway:listen_port would make the daemon proxy to
# itself).
DEFAULT_ON_IP4 = "127.0.0.1"
DEFAULT_ON_IP6 = "::1"


@dataclass(frozen=True)
class ClassifyRule:
    """Packets leaving ``out_interface`` whose mark matches ``mark/mask`` go to HTB class
    ``major:minor`` (``-j CLASSIFY --set-class``; u32 ``match mark`` does not work on this kernel,
    DESIGN.md §3). An empty ``out_interface`` matches every egress interface. CLASSIFY does not
    stop rule traversal: when several rules match, the last one wins, as in iptables."""

    mark: int
    out_interface: str
    major: int
    minor: int
    mask: int = MARK_CLASS_MASK

    def __post_init__(self) -> None:
        if not 0 <= self.mask <= MARK_MAX or self.mask == 0:
            raise ValueError(f"classify mask {self.mask:#x} is not a non-zero 32-bit mask")
        if self.mark & ~self.mask:
            raise ValueError(f"classify mark {self.mark:#x} has bits outside mask {self.mask:#x}")
        if self.out_interface and not _IFNAME.match(self.out_interface):
            raise ValueError(f"not an interface name: {self.out_interface!r}")
        for name, value in (("major", self.major), ("minor", self.minor)):
            if not 0 <= value <= CLASS_ID_MAX:
                raise ValueError(f"classify {name} {value} is outside 0..{CLASS_ID_MAX:#x}")

    @property
    def class_id(self) -> str:
        # tc handles are hexadecimal (tc(8) "HANDLES").
        return f"{self.major:x}:{self.minor:x}"


def class_mark(number: int) -> int:
    """The mark bits carrying shaping class ``number`` (1..255)."""
    if not 0 <= number <= MAX_CLASS_NUMBER:
        raise ValueError(f"class number {number} is outside 0..{MAX_CLASS_NUMBER}")
    return number << MARK_CLASS_SHIFT


@dataclass(frozen=True)
class RulesPlan:
    """Everything the kernel rules depend on; frozen so it can be compared across reloads."""

    lan_interfaces: tuple[str, ...]
    ports: tuple[int, ...]
    listen_port: int
    fwmark: int = MARK_DIVERT_DEFAULT
    fwmark_mask: int = MARK_DIVERT_DEFAULT
    route_table: int = 100
    rule_priority: int = 10000
    bypass_clients: tuple[IPNetwork, ...] = ()
    bypass_destinations: tuple[IPNetwork, ...] = ()
    ipv6: bool = True
    # TPROXY --on-ip: the listener's address (or the wildcard if it listens on 0.0.0.0 / ::).
    on_ip4: str = DEFAULT_ON_IP4
    on_ip6: str = DEFAULT_ON_IP6
    # Optional extras: SNI peek for HTTPS, QUIC blocking, shaping classes.
    https_ports: tuple[int, ...] = ()
    nfqueue_num: int | None = None
    quic_reject: bool = False
    classify: tuple[ClassifyRule, ...] = field(default=())
    # Ports whose owned flows are diverted by the ``-m socket`` rule, in addition to ``ports``
    # (so the default, empty, means "the intercepted ports"). The drain plan sets it to the
    # intercepted ports it no longer intercepts, and a reload that drops a port keeps it here so
    # that port's open connections are not cut (:meth:`keeping_divert`).
    divert_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # No LAN interface or no port is allowed: the plan then keeps only the divert for flows
        # the daemon already owns (used to drain before a stop); callers that mean to intercept
        # check ``intercepts()``.
        for name in self.lan_interfaces:
            if not _IFNAME.match(name):
                raise ValueError(f"not an interface name: {name!r}")
        for port in (*self.ports, *self.https_ports, *self.divert_ports, self.listen_port):
            if not 1 <= port <= 65535:
                raise ValueError(f"not a TCP port: {port}")
        overlap = sorted(set(self.ports) & set(self.https_ports))
        if overlap:
            raise ValueError(f"ports {overlap} are both intercepted and queued for SNI")
        if self.https_ports and self.nfqueue_num is None:
            raise ValueError("https_ports need an nfqueue_num")
        if self.nfqueue_num is not None and not 0 <= self.nfqueue_num <= NFQUEUE_NUM_MAX:
            raise ValueError(f"queue number {self.nfqueue_num} is outside 0..{NFQUEUE_NUM_MAX}")
        if not 0 < self.fwmark_mask <= MARK_MAX or self.fwmark == 0:
            raise ValueError("fwmark and fwmark_mask must be non-zero 32-bit values")
        if self.fwmark & ~self.fwmark_mask:
            raise ValueError(
                f"fwmark {self.fwmark:#x} has bits outside fwmark_mask {self.fwmark_mask:#x}"
            )
        reserved = MARK_RESERVED | (MARK_SLOT_MASK if self.classify else 0)
        if self.fwmark_mask & reserved:
            raise ValueError(
                f"fwmark_mask {self.fwmark_mask:#x} overlaps the bits tproxy marks packets with "
                f"{reserved:#x}"
            )
        if not 1 <= self.rule_priority <= RULE_PRIORITY_MAX:
            raise ValueError(f"rule priority {self.rule_priority} is outside 1..32765")
        if not 1 <= self.route_table <= ROUTE_TABLE_MAX or self.route_table in RESERVED_TABLES:
            raise ValueError(f"route table {self.route_table} is reserved or out of range")
        ipaddress.IPv4Address(self.on_ip4)
        ipaddress.IPv6Address(self.on_ip6)

    def intercepts(self) -> bool:
        """Whether any new connection would be diverted or queued."""
        return bool(self.lan_interfaces) and bool(self.ports or self.https_ports)

    def families(self) -> tuple[int, ...]:
        return FAMILIES if self.ipv6 else (4,)

    def diverted_ports(self) -> tuple[int, ...]:
        """The ports (either side) whose packets of owned flows the socket rule diverts."""
        return tuple(sorted({*self.ports, *self.divert_ports}))

    def draining(self) -> RulesPlan:
        """The plan that diverts no new connection but keeps the flows this one owns."""
        return replace(self, ports=(), https_ports=(), divert_ports=self.diverted_ports())

    def keeping_divert(self, old: RulesPlan) -> RulesPlan:
        """This plan, still diverting the flows ``old`` owned (for a reload): a port dropped
        from the config keeps its socket divert until a restart, so its open connections go
        on instead of being forwarded half-way through. Unchanged when nothing is dropped, so
        equal configs still give equal plans."""
        extra = sorted(set(old.diverted_ports()) - set(self.diverted_ports()))
        if not extra:
            return self
        return replace(self, divert_ports=tuple(sorted({*self.divert_ports, *extra})))


# -- rendering ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableRules:
    """Our part of one netfilter table: chains (declared, hence flushed), their rules in order,
    and hook jumps ``(builtin_chain, our_chain)`` inserted at position 1."""

    name: str
    chains: tuple[str, ...]
    rules: tuple[str, ...]  # "-A CHAIN ..." lines
    hooks: tuple[tuple[str, str], ...]


def _port_groups(ports: Sequence[int], side: str = "dport") -> list[str]:
    """Port match fragments for ``side`` ("dport" or "sport"), split at the multiport limit.

    A single port is rendered as ``--dport``/``--sport``, which iptables-nft turns into a native
    payload comparison; ``-m multiport`` runs as an xtables match through nft_compat.
    """
    unique = sorted(set(ports))
    groups = [unique[i : i + MULTIPORT_MAX] for i in range(0, len(unique), MULTIPORT_MAX)]
    out: list[str] = []
    for group in groups:
        if len(group) == 1:
            out.append(f"--{side} {group[0]}")
        else:
            out.append(f"-m multiport --{side}s " + ",".join(str(p) for p in group))
    return out


def _nets(nets: Iterable[IPNetwork], family: int) -> list[str]:
    return [str(n) for n in nets if n.version == family]


def _mangle(plan: RulesPlan, family: int) -> TableRules:
    on_ip = plan.on_ip4 if family == 4 else plan.on_ip6
    tproxy = (
        f"-j TPROXY --on-port {plan.listen_port} --on-ip {on_ip} "
        f"--tproxy-mark {plan.fwmark:#x}/{plan.fwmark_mask:#x}"
    )
    pre: list[str] = []

    def add(rule: str) -> None:
        pre.append(f"-A {CHAIN_PRE} {rule}")

    mfwd: list[str] = []

    if plan.nfqueue_num is not None:
        # Every packet of a forwarded flow traverses this chain, so the common case (a packet of
        # an accepted HTTPS flow) must leave after as little work as possible. iptables-nft
        # compiles -p/--sport/--dport/-m mark to native nftables expressions, while connmark,
        # CONNMARK and addrtype run as xtables extensions through nft_compat (addrtype also does
        # a FIB lookup), so the native tests come first in each rule and guard the rest.
        verdict = f"0x0/{MARK_VERDICT_MASK:#x}"
        accepted = f"{MARK_VERDICT_ACCEPT:#x}/{MARK_VERDICT_MASK:#x}"
        reset = f"{MARK_VERDICT_RESET:#x}/{MARK_VERDICT_RESET:#x}"
        conn = f"--nfmask {MARK_CONN_MASK:#x} --ctmask {MARK_CONN_MASK:#x}"
        # A plan without HTTPS ports but with a queue is the drain plan (no new flows are
        # queued): flows decided before keep their verdict, matched on any TCP port.
        sides = [
            f"-p tcp {ports}"
            for side in ("sport", "dport")
            for ports in _port_groups(plan.https_ports, side)
        ] or ["-p tcp"]
        # Packets of an accepted flow, both directions (server → client first: the bulk of a
        # download), RETURN: past the queue, and past TPROXY (HTTPS ports are never intercepted
        # ones). The shaping class stays in the connmark; TPROXY-POST restores it.
        # A SYN from the LAN to an HTTPS port on an entry that has a verdict is a new
        # connection on a reused 4-tuple (conntrack lets such a SYN through on an old entry,
        # e.g. one the client kept in CLOSE_WAIT): its hello is judged afresh, not waved
        # through on the old verdict.
        for lan in plan.lan_interfaces:
            for ports in _port_groups(plan.https_ports):
                add(
                    f"-i {lan} -p tcp --syn {ports} -m connmark ! --mark {verdict} "
                    f"-j CONNMARK --set-xmark {verdict}"
                )
        for ports in sides:
            add(f"{ports} -m connmark --mark {accepted} -j RETURN")
        # A reset flow's packets carry the verdict in their mark, for the TPROXY-FWD REJECT.
        for ports in sides:
            add(f"{ports} -m connmark --mark {reset} -j CONNMARK --restore-mark {conn}")
        # A packet re-injected by the queue handler (NF_REPEAT) carries a fresh verdict that the
        # connection does not have yet: remember it, with the class bits, in the connmark.
        add(
            f"-m mark ! --mark {verdict} -m connmark --mark {verdict} "
            f"-j CONNMARK --save-mark {conn}"
        )
        # Packets with a verdict skip the rest: the queue and TPROXY.
        add(f"-m mark ! --mark {verdict} -j RETURN")
    # Packets of flows we own, the bulk of what reaches this chain, leave first: origin replies
    # (a diverted source port) before client packets. Not SYNs: a new SYN must reach TPROXY
    # below even when its 4-tuple matches one of our TIME_WAIT sockets. A plan with no diverted
    # port owns no flow: no socket rule at all.
    diverted = plan.diverted_ports()
    for side in ("sport", "dport"):
        for ports in _port_groups(diverted, side):
            add(f"-p tcp {ports} ! --syn -m socket --transparent -j {CHAIN_DIVERT}")
    # Only packets that a rule below could divert or queue need the LOCAL test (a FIB lookup):
    # those to an intercepted port (TPROXY) and, with the queue, to an HTTPS port (decided
    # HTTPS flows left above). It stays before every TPROXY and NFQUEUE rule.
    # The bypasses likewise only guard those rules (none in a drain plan).
    queued = plan.https_ports if plan.nfqueue_num is not None else ()
    for ports in _port_groups((*plan.ports, *queued)):
        add(f"-p tcp {ports} -m addrtype --dst-type LOCAL -j RETURN")
    for lan in plan.lan_interfaces if plan.ports or queued else ():
        for net in _nets(plan.bypass_clients, family):
            add(f"-i {lan} -s {net} -j RETURN")
        for net in _nets(plan.bypass_destinations, family):
            add(f"-i {lan} -d {net} -j RETURN")
    for lan in plan.lan_interfaces:
        for ports in _port_groups(plan.ports):
            add(f"-i {lan} -p tcp --syn {ports} {tproxy}")
    for lan in plan.lan_interfaces:
        for ports in _port_groups(plan.ports):
            add(f"-i {lan} -p tcp ! --syn {ports} {tproxy}")
    if plan.nfqueue_num is not None and plan.https_ports:
        # Every packet of a flow without a verdict is queued; a verdict (saved in the connmark
        # by the bookkeeping rules above) sends the rest of the flow past the queue. No packet
        # count here: one the daemon could not follow exactly (a flow it forgot, a packet it
        # could not parse) would let the packets after it pass unseen. The daemon decides every
        # flow within a few packets (tproxy.nfqueue.DECIDE_PACKETS).
        # An INVALID packet (out of connection tracking's window, say) carries no connmark, so
        # a decided flow's stray one reaches the queue too: it is marked for the daemon, which
        # judges it with its flow if it has one and else lets it pass. Before, INVALID packets
        # were not queued but forwarded unjudged, and conntrack's window and the server's do
        # not agree everywhere (a hello conntrack calls INVALID may be one the server takes).
        # Untracked packets (the admin's NOTRACK) are left alone.
        # Only the client's direction (--ctdir ORIGINAL): a LAN packet in the server's
        # direction of such a flow (one forged with the server's address, the client's own
        # port being 443) must never carry a verdict into the flow's connmark.
        queue = (
            f"-m conntrack ! --ctstate UNTRACKED --ctdir ORIGINAL "
            f"-j NFQUEUE --queue-num {plan.nfqueue_num} --queue-bypass"
        )
        flag = f"{MARK_INVALID:#x}/{MARK_INVALID:#x}"
        invalid = f"-m conntrack --ctstate INVALID -j MARK --set-xmark {flag}"
        queued_bit = f"{MARK_QUEUED:#x}/{MARK_QUEUED:#x}"
        for lan in plan.lan_interfaces:
            for side in ("dport", "sport"):
                for ports in _port_groups(plan.https_ports, side):
                    # A LAN packet whose source the gateway would not route back out of that
                    # interface: one posing as a server (to forge its answer, or to open the
                    # flow in the other direction). Dropped (strict reverse path, xt_rpfilter).
                    add(f"-i {lan} -p tcp {ports} -m rpfilter --invert -j DROP")
        for lan in plan.lan_interfaces:
            for ports in _port_groups(plan.https_ports):
                add(
                    f"-i {lan} -p tcp --syn {ports} -m conntrack --ctdir ORIGINAL "
                    f"-j CONNMARK --set-xmark {queued_bit}"
                )
                add(f"-i {lan} -p tcp {ports} {invalid}")
                add(f"-i {lan} -p tcp {ports} {queue}")
        # The server's replies in those flows (connmark 0x10, no verdict: decided flows left
        # above), marked for the daemon: it gives the verdict mark only once the server has
        # acknowledged the hello judged, so a fake one the server dropped cannot earn it.
        reply = f"{MARK_REPLY:#x}/{MARK_REPLY:#x}"
        # Marked here, queued in FORWARD (TPROXY-MFWD): only there has NAT given a reply its
        # real destination back (nat PREROUTING runs after mangle's), the client's address
        # that the daemon knows the flow by.
        # Only replies from the WAN side: a LAN client could forge the server's answer (loose
        # reverse-path filtering lets a LAN packet carry the server's address) to earn the mark
        # early. A server on another LAN interface is not queued; the daemon then waits for the
        # client's next data as it does for a flow whose SYN-ACK it did not see.
        for lan in plan.lan_interfaces:
            for ports in _port_groups(plan.https_ports, "sport"):
                add(f"-i {lan} -p tcp {ports} -m conntrack --ctdir REPLY -j RETURN")
        for ports in _port_groups(plan.https_ports, "sport"):
            add(
                f"-p tcp {ports} -m connmark --mark {queued_bit} -m conntrack --ctdir REPLY "
                f"-j MARK --set-xmark {reply}"
            )
            mfwd.append(
                f"-A {CHAIN_MFWD} -p tcp {ports} -m mark --mark {reply} "
                f"-j NFQUEUE --queue-num {plan.nfqueue_num} --queue-bypass"
            )

    divert = (
        f"-A {CHAIN_DIVERT} -j MARK --set-xmark {plan.fwmark:#x}/{plan.fwmark_mask:#x}",
        f"-A {CHAIN_DIVERT} -j ACCEPT",
    )
    chains = [CHAIN_PRE, CHAIN_DIVERT]
    hooks = [("PREROUTING", CHAIN_PRE)]
    if mfwd:
        # A reply re-injected with a verdict (NF_REPEAT runs this chain again) saves it in the
        # connmark, as TPROXY-PRE does for the client's packets; then it leaves.
        verdict = f"0x0/{MARK_VERDICT_MASK:#x}"
        conn = f"--nfmask {MARK_CONN_MASK:#x} --ctmask {MARK_CONN_MASK:#x}"
        mfwd[:0] = [
            f"-A {CHAIN_MFWD} -m mark ! --mark {verdict} -m connmark --mark {verdict} "
            f"-j CONNMARK --save-mark {conn}",
            f"-A {CHAIN_MFWD} -m mark ! --mark {verdict} -j RETURN",
        ]
        chains.append(CHAIN_MFWD)
        hooks.append(("FORWARD", CHAIN_MFWD))
    post: list[str] = []
    if plan.classify:
        # The class lives in the connmark (saved with the verdict); packets the daemon sends
        # carry it already via SO_MARK, so restore only into packets without class bits.
        # The connmark test keeps flows without a class (most forwarded traffic) from running
        # the CONNMARK target, which would rewrite their mark for nothing.
        post.append(
            f"-A {CHAIN_POST} -m mark --mark 0x0/{MARK_CLASS_MASK:#x} "
            f"-m connmark ! --mark 0x0/{MARK_CLASS_MASK:#x} -j CONNMARK --restore-mark "
            f"--nfmask {MARK_SHAPING_MASK:#x} --ctmask {MARK_SHAPING_MASK:#x}"
        )
        if all(rule.mark & MARK_CLASS_MASK for rule in plan.classify):
            # Every CLASSIFY rule needs class bits: packets without them leave after one native
            # comparison instead of testing each rule.
            post.append(f"-A {CHAIN_POST} -m mark --mark 0x0/{MARK_CLASS_MASK:#x} -j RETURN")
        for rule in plan.classify:
            out = f"-o {rule.out_interface} " if rule.out_interface else ""
            post.append(
                f"-A {CHAIN_POST} {out}-m mark --mark {rule.mark:#x}/{rule.mask:#x} "
                f"-j CLASSIFY --set-class {rule.class_id}"
            )
        chains.append(CHAIN_POST)
        hooks.append(("POSTROUTING", CHAIN_POST))
    return TableRules("mangle", tuple(chains), (*pre, *divert, *mfwd, *post), tuple(hooks))


def _filter(plan: RulesPlan, family: int) -> TableRules | None:
    rules: list[str] = []
    if plan.nfqueue_num is not None:
        # Both directions: the client gets a reset for its next packet, and so does the server
        # when it sends, instead of staying half-open (DESIGN.md §3). TPROXY-PRE restored the
        # verdict into the mark of every packet of a reset flow, so this is a native mark test
        # (no connmark lookup) for every forwarded packet; first, as it is the one every packet
        # is tested against.
        rules.append(
            f"-A {CHAIN_FWD} -p tcp -m mark --mark {MARK_VERDICT_RESET:#x}/"
            f"{MARK_VERDICT_RESET:#x} -j REJECT --reject-with tcp-reset"
        )
    if plan.quic_reject:
        # QUIC (RFC 9000) carries its handshake encrypted per connection ID and cannot be peeked
        # cheaply; an ICMP port unreachable makes browsers fall back to TCP at once.
        icmp = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
        for lan in plan.lan_interfaces:
            for ports in _port_groups(plan.https_ports or (443,)):
                rules.append(
                    f"-A {CHAIN_FWD} -i {lan} -p udp {ports} -j REJECT --reject-with {icmp}"
                )
    if not rules:
        return None
    return TableRules("filter", (CHAIN_FWD,), tuple(rules), (("FORWARD", CHAIN_FWD),))


def render_tables(plan: RulesPlan, family: int) -> tuple[TableRules, ...]:
    """Our chains, rules and hooks for one address family, table by table."""
    if family not in FAMILIES:
        raise ValueError(f"family must be 4 or 6, not {family}")
    if family == 6 and not plan.ipv6:
        raise ValueError("the plan has IPv6 disabled")
    tables = [_mangle(plan, family)]
    filt = _filter(plan, family)
    if filt is not None:
        tables.append(filt)
    return tuple(tables)


@dataclass(frozen=True)
class LiveTable:
    """What of ours exists in one live table: chain names and hook rules (``-A`` lines of a
    built-in or foreign chain jumping to one of our chains, as ``iptables-save`` prints them)."""

    name: str
    chains: tuple[str, ...] = ()
    hooks: tuple[str, ...] = ()


def compose(tables: Sequence[TableRules], live: Sequence[LiveTable] = (), header: str = "") -> str:
    """One ``iptables-restore --noflush`` input that replaces our state atomically.

    Per table: delete the live hook jumps (exact ``-D`` of what iptables-save printed), declare
    our chains (in ``--noflush`` mode declaring a user chain flushes it), delete our chains the
    new rules no longer use, fill the chains and insert the hooks at position 1. iptables-restore
    commits each table as one transaction (with the nf_tables backend the whole input is one
    batch), so packets never see a half-built chain.
    """
    wanted = {t.name: t for t in tables}
    seen = {t.name: t for t in live}
    names = [t.name for t in tables] + [n for n in seen if n not in wanted]
    lines: list[str] = [header] if header else []
    for name in names:
        new = wanted.get(name)
        old = seen.get(name, LiveTable(name))
        new_chains = new.chains if new else ()
        stale = [c for c in old.chains if c not in new_chains]
        if new is None and not old.chains and not old.hooks:
            continue
        lines.append(f"*{name}")
        lines.extend("-D" + hook[2:] for hook in old.hooks)
        lines.extend(f":{chain} - [0:0]" for chain in (*new_chains, *stale))
        lines.extend(f"-X {chain}" for chain in stale)
        if new is not None:
            lines.extend(new.rules)
            lines.extend(f"-I {builtin} 1 -j {chain}" for builtin, chain in new.hooks)
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


def render(plan: RulesPlan, family: int) -> str:
    """The complete ``iptables-restore --noflush`` (or ``ip6tables-restore``) input for a
    clean system: our chains, their rules, and the hook jumps."""
    header = f"# tproxy netfilter rules, IPv{family}: only {CHAIN_PREFIX}* chains and their hooks"
    return compose(render_tables(plan, family), (), header)


# -- routing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyRule:
    """``ip rule add fwmark MARK/MASK lookup TABLE priority PRIORITY``."""

    family: int
    priority: int
    fwmark: int
    fwmask: int
    table: int


@dataclass(frozen=True)
class LocalRoute:
    """``ip route add local DST dev lo table TABLE``: every address is local in this table, so a
    diverted packet is delivered up the stack to the socket TPROXY assigned
    (Documentation/networking/tproxy.rst)."""

    family: int
    dst: str
    table: int
    dev: str = "lo"


@dataclass(frozen=True)
class RoutingPlan:
    rules: tuple[PolicyRule, ...]
    routes: tuple[LocalRoute, ...]


def render_routing(plan: RulesPlan) -> RoutingPlan:
    rules: list[PolicyRule] = []
    routes: list[LocalRoute] = []
    for family in plan.families():
        rules.append(
            PolicyRule(family, plan.rule_priority, plan.fwmark, plan.fwmark_mask, plan.route_table)
        )
        routes.append(LocalRoute(family, "0.0.0.0/0" if family == 4 else "::/0", plan.route_table))
    return RoutingPlan(tuple(rules), tuple(routes))


# -- reading iptables-save ------------------------------------------------------------------------


def is_ours(chain: str) -> bool:
    return chain.startswith(CHAIN_PREFIX)


_JUMP_OURS = re.compile(r"\s-[jg]\s+(" + re.escape(CHAIN_PREFIX) + r"\S+)")


def parse_save(text: str) -> tuple[tuple[LiveTable, ...], str]:
    """From ``iptables-save`` output: what of ours is live, and our rules as text.

    Returns the live tables (for :func:`compose`) and an ``iptables-save``-style excerpt holding
    only our chains, their rules and the hook jumps — counters and comments dropped, so two
    excerpts compare equal exactly when the rules are the same.
    """
    tables: list[LiveTable] = []
    excerpt: list[str] = []
    table = ""
    chains: list[str] = []
    hooks: list[str] = []
    rules: list[str] = []

    def close() -> None:
        if table and (chains or hooks):
            tables.append(LiveTable(table, tuple(chains), tuple(hooks)))
            excerpt.append(f"*{table}")
            excerpt.extend(f":{c} - [0:0]" for c in chains)
            excerpt.extend(hooks)
            excerpt.extend(rules)
            excerpt.append("COMMIT")

    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            close()
            table, chains, hooks, rules = line[1:], [], [], []
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if is_ours(name):
                chains.append(name)
        elif line.startswith("-A "):
            chain = line.split()[1]
            if is_ours(chain):
                rules.append(line)
            elif _JUMP_OURS.search(line):
                hooks.append(line)
        elif line == "COMMIT":
            close()
            table = ""
    close()
    return tuple(tables), "\n".join(excerpt) + "\n" if excerpt else ""
