"""NFQUEUE shell for the HTTPS SNI peek: packets in, verdicts (accept with a mark, or reset) out.

The kernel queues every packet of a port-443 flow from the LAN until the flow has a verdict
(``--queue-bypass``; see :mod:`tproxy.netfilter.render`), and this module gives every flow one
within :data:`DECIDE_PACKETS` packets. For each flow it reassembles the TLS ClientHello
(:class:`tproxy.tls.ClientHelloAssembler`), asks a ``decide`` callback for a verdict on the server
name, and gives the verdict as a packet mark with ``NF_REPEAT``: the re-injected packet's mark is
saved in the connmark and every later packet of the flow — both directions — skips the queue and
stays in the kernel's fast path.

Evasions (see :class:`FlowInspector`): a hello cut into tiny segments so that its name would
arrive after the daemon must decide, pure ACKs or decoys sent to spend those packets before the
hello, and a second ClientHello after a HelloRetryRequest that names another server (RFC 8446
§4.1.2), are reset when the ``evasion`` hook says the client is filtered by name. To see a
second hello, and a hello that replaces a fake one the server never got, an accepted flow
keeps its verdict mark until the server has answered the hello judged (the rules queue the
server's replies too; :meth:`FlowInspector._reply`), or, for a flow whose SYN-ACK was not
seen, until the client's next data segment (at most :data:`RETRY_PACKETS` packets). Segments
the server would drop unread (fake hellos, :func:`server_drops`) are dropped, not judged. A
flow the daemon does not know (its entry expired, or the daemon restarted) is decided on its
first packet without data.

* accept: ``MARK_VERDICT_ACCEPT`` plus the shaping class bits from the ``sni_class`` hook.
* reset: ``MARK_VERDICT_RESET``; the ``TPROXY-FWD`` rule answers the client's packet with a TCP
  reset. The server has seen the handshake and waits for the ClientHello, so it would stay
  half-open: we also send it a RST for the exact next sequence number from a raw socket
  (RFC 9293 §3.10.7.4 / RFC 5961 §3.2: a RST is accepted when its sequence number is exactly
  RCV.NXT). If our guess is off, the server answers with a challenge ACK, which the same connmark
  REJECT rule answers with a reset whose sequence number is the server's own ACK: exact.

Failure behaviour (the LAN keeps working whatever happens to the daemon):

* an exception while inspecting never leaves a packet without a verdict (``finally``);
* a dead daemon: ``--queue-bypass`` makes the kernel accept packets when nobody listens;
* a hung daemon: the queue's ``NFQA_CFG_F_FAIL_OPEN`` flag makes the kernel accept packets once
  the queue or our socket buffer is full (nfnetlink_queue.c ``__nfqnl_enqueue_packet``), and the
  systemd watchdog restarts us. netfilterqueue does not expose the flag, so :func:`set_fail_open`
  sends the ``NFQNL_MSG_CONFIG`` message itself on the library's own netlink socket (the kernel
  only accepts queue config from the port id that bound the queue: ``nfqnl_recv_config``).

The event loop reads the queue with ``loop.add_reader`` in bounded batches: netfilterqueue's
``run(block=False)`` reads until EAGAIN and stalled the loop for a second under load
(DESIGN.md §3), so :class:`_BatchSocket` makes ``run_socket`` stop after :data:`BATCH` packets.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

from tproxy.netfilter.render import (
    MARK_INVALID,
    MARK_MAX,
    MARK_REPLY,
    MARK_VERDICT_ACCEPT,
    MARK_VERDICT_MASK,
    MARK_VERDICT_RESET,
)
from tproxy.tls import (
    CCS_RECORD_LEN,
    SEQ_MOD,
    SERVER_HEAD_LEN,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    TCP_URG,
    ClientHelloAssembler,
    ClientHelloInfo,
    TcpSegment,
    leading_ccs,
    looks_like_hello_start,
    maybe_tcp,
    parse_ip_tcp,
    parse_second_flight,
    server_answer,
    sni_from_prefix,
)

log = logging.getLogger("tproxy.nfqueue")

# Packets handled per event-loop callback; the loop gets control back in between (DESIGN.md §3).
BATCH = 64
# Flows whose ClientHello is still being assembled. A flow normally lives here for one RTT;
# the bound protects against SYN floods, the TTL against flows that never send data.
MAX_FLOWS = 16384
FLOW_TTL = 60.0  # a flow forgotten before its verdict is decided on its next packet
DECIDED_TTL = 5.0
MAX_SYN_STARTS = 8  # SYN start candidates kept per flow (two per SYN)
# Every flow is decided by this packet (SYN and pure ACKs included): the kernel queues every
# packet of a flow without a verdict, so this bounds what a flow costs in user space. A
# post-quantum ClientHello spans two segments and the handshake may carry retransmissions.
DECIDE_PACKETS = 8
# Data segments we wait for a whole ClientHello before deciding without a name.
MAX_HELLO_SEGMENTS = 6
# Packets an accepted flow may send after its hello before its next data (a second
# hello, or its answer to the server's flight) decides whether it keeps the verdict. A real
# client acknowledges the server's flight (a few KiB, up to tens with long certificate chains;
# the first 16 segments acknowledged one by one in quick-ACK mode) and answers.
RETRY_PACKETS = 64
# Smallest mean size (bytes) of the segments of a ClientHello still incomplete at the end of
# DECIDE_PACKETS for it to count as merely large. 536 is the default send MSS (RFC 9293
# §3.7.1, RFC 1122 §4.2.2.6), which every path carries: a real client fills each segment of
# its hello up to the path MSS (usually 1200-1460) but the last, so six segments of a real
# hello hold several KiB. A mean below it means the client cut its hello on purpose (DPI
# evasion tools send a few bytes per segment) so that the name arrives after the daemon had to
# decide: such a flow is reset rather than decided without a name.
EVASION_SEGMENT_BYTES = 536
# Packets without data for the server, beyond the handshake's ACK, that a client may send
# before its ClientHello is whole. In TLS the client speaks first (RFC 8446 §2), so until its
# hello is whole the server has sent nothing to acknowledge: a real client repeats its ACK
# only when the server repeats its SYN-ACK. More only spend the packets the daemon waits for a hello
# (DECIDE_PACKETS), so that it decides before the hello: such a flow is reset like a hello cut into
# tiny segments. Decoys (MIN_FORWARD_TTL), and a FIN or RST that leaves the connection open to the
# kernel, count alike. The ACK number is no evidence either way: the kernel's connection tracking
# accepts one tens of KB off in both directions, so a client could fake a server that spoke first.
# (A real server-first protocol on an HTTPS port gets this verdict too if it makes the client
# acknowledge more than two segments before sending anything.)
IDLE_ACKS_MAX = 2
# A data segment arriving with this TTL/hop limit or less is never forwarded (see inspect).
MIN_FORWARD_TTL = 1
# Data segments of one flow remembered for in_order_end (a hello and its flight need a few).
MAX_SPANS = 256
# Kernel queue length (packets awaiting a verdict). With fail-open, packets beyond it pass
# unfiltered, so it must absorb bursts of new flows: 8 packets × 512 flows arriving at once.
QUEUE_MAX_LEN = 4096
# netfilterqueue's socket receive buffer request (bytes): room for a full queue of small
# handshake packets; the kernel doubles it (socket(7) SO_RCVBUF).
SOCK_RCVBUF = 4 * 1024 * 1024

# linux/netfilter/nfnetlink.h, nfnetlink_queue.h, netlink.h
NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NFNETLINK_V0 = 0
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 0x1
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLMSG_HDRLEN = 16
CONFIG_ACK_TIMEOUT = 1.0
_NLMSG = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_NFGEN = struct.Struct("=BBH")


class Action(Enum):
    PASS = "pass"  # accept, no verdict yet (handshake, first part of a split ClientHello)
    ACCEPT = "accept"  # accept with the verdict mark: the flow leaves the queue
    RESET = "reset"  # verdict mark "reset": the flow is torn down in both directions
    DROP = "drop"  # a packet we cannot read (see FlowInspector.inspect): it goes no further


class FlowDecision(NamedTuple):
    allowed: bool
    reason: str = ""


class Outcome(NamedTuple):
    action: Action
    mark: int = 0
    segment: TcpSegment | None = None
    sni: str | None = None
    ech: bool = False
    # Why the flow was reset as an evasion (empty: a policy verdict, or no verdict yet).
    evasion: str = ""
    # The flow's first stream bytes the verdict was given on (an accepted flow): packets
    # queued before the mark reached the connmark are held to them (FlowInspector.decided).
    judged: ClientHelloAssembler | None = None


# decide(client_ip, client_mac, server_ip, server_port, sni, ech, why_no_sni) -> FlowDecision
Decide = Callable[[str, "str | None", str, int, "str | None", bool, str], FlowDecision]
# sni_class(client_ip, sni or "") -> shaping mark bits (class << 8 | slot << 16; 0: none)
SniClass = Callable[[str, str], int]
# evasion(client_ip, client_mac, server_ip, server_port, what, reset) -> whether the client is
# filtered by name (and logged): then the flow is reset, or with reset False only the packet is
# dropped. Without a hook: True.
Evasion = Callable[[str, "str | None", str, int, str, bool], bool]


@dataclass
class _Retry:
    """An accepted flow whose verdict mark waits for what follows its ClientHello: a second
    ClientHello (after a HelloRetryRequest) is checked before the flow leaves the queue."""

    sni: str | None
    ech: bool
    mark: int
    assembler: ClientHelloAssembler
    segments: int = 0
    packets: int = 0  # since the hello (RETRY_PACKETS)
    # A hello judged on a TCP Fast Open SYN's data, not yet known to have reached the server:
    # a server without Fast Open ignores SYN data (RFC 7413 §3), so the wait does not end on
    # data after it until the client's ACK says the server took it, or the client sends the
    # same hello again after the handshake.
    unconfirmed: bool = False
    # With the server's replies queued (flow.server_isn known) the mark waits for the server:
    # what it answered the hello with (tls.server_answer), where the second hello after a
    # HelloRetryRequest ends once judged, and how far the server's data had gone at the retry.
    answer: str | None = None
    second_end: int | None = None
    retry_data_end: int = 0


@dataclass
class _Flow:
    assembler: ClientHelloAssembler
    expires: float
    segments: int = 0
    # Packets of the flow seen in the queue (SYN and pure ACKs included; DECIDE_PACKETS).
    packets: int = 0
    retry: _Retry | None = None
    # The SYN's sequence number (None while not seen); whether the handshake's ACK has been
    # seen; and packets since that gave the server nothing new (IDLE_ACKS_MAX).
    isn: int | None = None
    # Where the client's next byte may be after each SYN seen (ISN + 1, and after a TCP Fast
    # Open SYN's data too) -> that SYN's ISN: what the handshake's ACK may choose from.
    starts: dict[int, int] = field(default_factory=dict)
    acked: bool = False
    idle_acks: int = 0
    closed: bool = False  # the client ended it with an exact FIN or RST
    syn_data: bool = False  # bytes came on a SYN (TCP Fast Open): not yet known to be taken
    started: bool = False  # a packet after the SYN came: later SYNs are stray
    ambiguous: bool = False  # SYNs with different sequence numbers before it
    # Per ISN of the SYNs seen: their highest TTL/hop limit and their earliest TSval (None
    # without timestamps). Once the handshake's ACK says which SYN the server took, those are
    # what server_drops checks data against (ttl 0: not known yet), with the ACK number: all
    # the server has sent before the client's hello is its SYN.
    syns: dict[int, tuple[int, int | None]] = field(default_factory=dict)
    ttl: int = 0
    ts_first: int | None = None
    server_next: int | None = None
    # From the server's replies, when the rules queue them (render rule 8): its ISN (SYN-ACK),
    # the highest ACK it sent, the first bytes of its stream and where its data has reached.
    server_isn: int | None = None
    server_took: int | None = None  # the SYN-ACK's ACK: the client's first byte the server wants
    # Client data that went on, as (first, end) sequence numbers: what the server may have read.
    spans: list[tuple[int, int]] = field(default_factory=list)
    server_acked: int | None = None
    server_head: bytes = b""
    server_data_end: int = 0

    def syn_seen(self, seg: TcpSegment) -> None:
        ttl, ts = self.syns.get(seg.seq, (0, None))
        if seg.tsval is not None and (ts is None or _older(seg.tsval, ts)):
            ts = seg.tsval
        if len(self.syns) < MAX_SYN_STARTS or seg.seq in self.syns:
            self.syns[seg.seq] = (max(ttl, seg.ttl), ts)

    def sent(self, seq: int, length: int) -> None:
        """Note client data that went on to the server (not dropped, not a decoy)."""
        if len(self.spans) < MAX_SPANS:
            self.spans.append((seq % SEQ_MOD, (seq + length) % SEQ_MOD))

    def in_order_end(self) -> int | None:
        """Where the client's bytes seen here run without a gap from the stream's start to."""
        end = self.assembler.start
        if end is None:
            return None
        grown = True
        while grown:
            grown = False
            for a, b in self.spans:
                if not _older(end, a) and _older(end, b):
                    end, grown = b, True
        return end

    def reference(self, seq: int) -> None:
        """TTL and timestamp references without the handshake's ACK (a client that sends its
        first data with it): from the SYN this segment continues, or the only SYN seen."""
        isn = self.starts.get(seq)
        if isn is None and len(self.syns) == 1:
            isn = next(iter(self.syns))
        if isn is not None:
            self.ttl, self.ts_first = self.syns.get(isn, (0, None))

    def handshake_acked(self, isn: int | None, ack: int) -> None:
        self.ttl, self.ts_first = self.syns.get(isn, (0, None)) if isn is not None else (0, None)
        if self.server_isn is None:
            self.server_next = ack

    def at_next(self, seq: int) -> bool:
        """Whether ``seq`` is the next byte the server expects from the client."""
        asm = self.retry.assembler if self.retry is not None else self.assembler
        start = asm.start
        return start is not None and (seq - start - len(asm.contiguous())) % SEQ_MOD == 0


TLS_HANDSHAKE = b"\x16"  # a TLS handshake record's content type (RFC 8446 §5.1)
# The other record types (RFC 8446 §5.1), none of which starts a client's stream.
NOT_HELLO_RECORDS = {20: "change_cipher_spec", 21: "alert", 23: "application_data"}


def _older(a: int, b: int) -> bool:
    """Whether 32-bit timestamp ``a`` is older than ``b`` (modular, RFC 7323 §5.2)."""
    return 0 < (b - a) % SEQ_MOD < SEQ_MOD // 2


def _tls_or_unknown(flow: _Flow, seg: TcpSegment) -> bool:
    """Whether the client's stream is (or may be) TLS: it starts with a handshake record, or
    this segment is not its start and the start has not come yet (a piece of a hello sent
    ahead of its first byte is judged like the hello)."""
    first = flow.assembler.contiguous()[:1]
    if first:
        return first == TLS_HANDSHAKE
    start = flow.assembler.start
    return seg.payload[:1] == TLS_HANDSHAKE or start is None or seg.seq != start


def server_drops(flow: _Flow, seg: TcpSegment) -> str:
    """Why the server's TCP stack would drop this data segment of ``flow`` unread, or "".

    Evasion tools send a harmless ClientHello that the server never reads, so that a filter
    judges it and lets the real hello behind it pass ("fake" packets, and the "fooling" that
    makes the server drop them): a TTL too small to reach the server, no ACK flag, a TCP MD5
    signature, an old timestamp, a wrong acknowledgment number, an IPv6 option the receiver
    must discard the packet for. A too small TTL is told by the SYN the server took, whose TTL
    did reach it and which every later packet of a real client repeats (one host, one route);
    the old timestamp likewise by that SYN's. Checked only once the handshake's ACK has said
    which SYN that was. A real client never sends any of these before its verdict, so the
    queue drops them (see _inspect) at no cost to it."""
    if seg.ttl < flow.ttl:
        return f"a data segment with TTL/hop limit {seg.ttl}, below its SYN's {flow.ttl}"
    if not seg.flags & (TCP_ACK | TCP_RST):
        # RFC 9293 §3.10.7.4, "fifth, check the ACK field": "if the ACK bit is off, drop the
        # segment".
        return "a data segment without the ACK flag"
    if seg.discard_option:
        return "a data segment with IP options (IPv4) or an IPv6 option to discard it for"
    if (
        flow.retry is None
        and flow.server_next is not None
        and seg.flags & TCP_ACK
        and seg.ack != flow.server_next
        and _tls_or_unknown(flow, seg)
    ):
        # Before the client's hello a TLS server has sent only its SYN (the client speaks
        # first, RFC 8446 §2), so every real segment up to the verdict acknowledges exactly
        # that. Beyond it: RFC 9293 §3.10.7.4, "If the ACK acknowledges something not yet sent
        # (SEG.ACK > SND.NXT) then send an ACK, drop the segment, and return". Behind it:
        # Linux drops an ACK older than what it has had acknowledged (tcp_ack, "too old"),
        # except on its fast path, and connection tracking calls one far behind INVALID. (Only
        # for TLS: in a protocol whose server speaks first, SSH say, the client's first data
        # rightly acknowledges the server's.)
        return (
            f"a data segment that acknowledges {seg.ack}, not the server's SYN ({flow.server_next})"
        )
    if seg.signed:
        # The RFCs (2385, 5925) define these for connections configured with a key; Linux
        # drops a signed segment for a connection without one (tcp_inbound_hash), and an
        # HTTPS server has none.
        return "a data segment with a TCP MD5/AO signature"
    if flow.ts_first is not None and seg.tsval is not None and _older(seg.tsval + 1, flow.ts_first):
        # RFC 7323 §5.3 (PAWS): once timestamps are in use, a segment whose TSval is older
        # than the one the server last took is dropped (Linux allows a difference of 1,
        # TCP_PAWS_WINDOW); the server took its SYN's at least.
        return f"a data segment whose timestamp {seg.tsval} is older than its SYN's {flow.ts_first}"
    return ""


def format_mac(hw: bytes | None) -> str | None:
    if not hw or len(hw) < 6:
        return None
    return ":".join(f"{b:02x}" for b in hw[:6])


@dataclass
class InspectorStats:
    packets: int = 0
    accepted: int = 0
    reset: int = 0
    no_sni: int = 0
    decoys: int = 0
    evasions: int = 0
    second_hellos: int = 0
    flows_evicted: int = 0
    unreadable: int = 0
    invalid: int = 0  # queued packets connection tracking found INVALID
    replies: int = 0  # queued packets from servers (render rule 8)
    errors: int = 0


@dataclass
class FlowInspector:
    """The per-packet logic, free of I/O: raw packet bytes in, an :class:`Outcome` out.

    A flow is decided on its ClientHello, at the latest on the last packet the kernel queues.
    Three evasions are answered (the ``evasion`` hook says whether the client is filtered at
    all; its answer True resets the flow):

    * a hello cut into tiny segments so that its name arrives after the kernel's queue budget
      (:data:`EVASION_SEGMENT_BYTES`);
    * pure ACKs or decoys sent to spend that budget before the hello is whole
      (:data:`IDLE_ACKS_MAX`);
    * a second ClientHello, sent after a HelloRetryRequest (RFC 8446 §4.1.4), that names
      another server than the first. An accepted flow keeps its verdict mark until the server
      has acknowledged the hello judged and answered it (_reply): a HelloRetryRequest keeps
      the wait for the second hello, which is checked. Without the server's replies (a flow
      whose SYN-ACK was not seen) the client's next data ends the wait instead — a second
      hello is checked, anything else (its encrypted flight, a TLS 1.2 ClientKeyExchange) gets
      the mark at once — or the last packet the kernel queues. Any segment over the hello seen
      meanwhile must repeat the bytes judged: that catches a fake whole hello the server never
      gets followed by the real one. Hellos of every TLS version wait, because the fake may
      offer TLS 1.2 only whatever the real hello offers.
    """

    decide: Decide
    sni_class: SniClass | None = None
    max_flows: int = MAX_FLOWS
    flow_ttl: float = FLOW_TTL
    evasion: Evasion | None = None
    # Watch for a second ClientHello (see above). The queue shell turns it on; off, a flow
    # gets its verdict mark on its first hello (one userspace round less per flow).
    second_hello: bool = False
    flows: OrderedDict[tuple[str, int, str, int], _Flow] = field(default_factory=OrderedDict)
    # Verdicts given in the last DECIDED_TTL seconds: packets of the flow queued before its
    # verdict reached the connmark get the same one (not taken for a flow of unknown start).
    decided: OrderedDict[tuple[str, int, str, int], tuple[float, Outcome]] = field(
        default_factory=OrderedDict
    )
    stats: InspectorStats = field(default_factory=InspectorStats)

    def _expire(self, now: float) -> None:
        flows = self.flows
        # Insertion order = creation order and the TTL is fixed, so expired flows are in front.
        while flows:
            key, flow = next(iter(flows.items()))
            if flow.expires > now and len(flows) <= self.max_flows:
                break
            del flows[key]
            if flow.expires > now:
                self.stats.flows_evicted += 1

    def inspect(
        self,
        packet: bytes,
        hw: bytes | None,
        now: float,
        invalid: bool = False,
        reply: bool = False,
    ) -> Outcome:
        """The verdict on one queued packet; ``invalid``: connection tracking found it INVALID
        (it carries no connmark, so it may belong to a flow decided long ago); ``reply``: the
        server's packet in a flow being decided (render rule 8)."""
        self.stats.packets += 1
        if reply:
            return self._reply(packet, now)
        out = self._inspect(packet, hw, now, invalid)
        seg = out.segment
        if seg is not None and out.action in (Action.ACCEPT, Action.RESET):
            self._remember((seg.src, seg.sport, seg.dst, seg.dport), out, now)
        return out

    def _remember(self, key: tuple[str, int, str, int], out: Outcome, now: float) -> Outcome:
        """Keep a flow's verdict for packets queued before it reached the connmark."""
        decided = self.decided
        decided.pop(key, None)
        decided[key] = (now + DECIDED_TTL, out)
        while decided and (next(iter(decided.values()))[0] <= now or len(decided) > self.max_flows):
            decided.popitem(last=False)
        return out

    def _inspect(self, packet: bytes, hw: bytes | None, now: float, invalid: bool) -> Outcome:
        seg = parse_ip_tcp(packet)
        if seg is None:
            if not maybe_tcp(packet):
                return Outcome(Action.PASS)
            # The kernel queued it as TCP to an HTTPS port, yet we cannot find its TCP header
            # (an IPv6 extension header chain longer than we follow, say): passing it would let
            # its payload - a ClientHello - through unjudged, and every packet like it after.
            self.stats.unreadable += 1
            return Outcome(Action.DROP)
        key = (seg.src, seg.sport, seg.dst, seg.dport)
        back = (seg.dst, seg.dport, seg.src, seg.sport)
        flags = seg.flags
        if back in self.flows and flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
            # A client's SYN whose 4-tuple, reversed, is a pending "flow": that one was opened
            # from the LAN in the server's direction (forged with the server's address; the
            # rules drop such packets by reverse path). This client's flow is the real one.
            del self.flows[back]
        elif back in self.flows:
            # From the LAN, yet in the direction of a pending flow's server: forged to pose
            # as the server's answer. Never the client's stream, and never a verdict.
            return Outcome(Action.DROP)
        elif back in self.decided:
            return Outcome(Action.PASS)
        given = self.decided.get(key)
        if given is not None and given[0] > now and key not in self.flows:
            if not flags & TCP_SYN:
                judged = given[1].judged
                if seg.payload and judged is not None and not judged.repeats(seg.seq, seg.payload):
                    # Other bytes over what the verdict was given on, just after it: the
                    # server may read these instead.
                    what = (
                        "a segment over the ClientHello judged with other bytes, after the verdict"
                    )
                    if self._is_evasion(seg, hw, what):
                        return self._reset(seg, None, given[1].ech, what)
                return given[1]._replace(segment=seg, evasion="")
            del self.decided[key]  # a new connection on the same ports
        if flags & TCP_RST and seg.payload:
            # A RST's payload is never stream data (RFC 9293 §3.5.3): judge it as a RST.
            seg = seg._replace(payload=b"")
        flow = self.flows.get(key)
        if invalid:
            self.stats.invalid += 1
            if flow is None:
                return self._invalid_stray(seg, hw)
            if seg.payload:
                # Connection tracking found it out of its window, or its checksum bad: the
                # server may drop it (a fake hello) or take it (the windows do not agree
                # everywhere). Neither is safe to judge: it is dropped for a client filtered
                # by name (a real client sends it again) and passes unjudged for others.
                what = "an INVALID data segment (connection tracking) before the verdict"
                if self._is_evasion(seg, hw, what, reset=False):
                    self.stats.decoys += 1
                    return Outcome(Action.DROP, segment=seg, evasion=what)
                return Outcome(Action.PASS, segment=seg)
        decoy = seg.ttl <= MIN_FORWARD_TTL
        if flow is not None and seg.payload and not flags & TCP_SYN and not decoy:
            if not flow.ttl:
                flow.reference(seg.seq)
            # A fake hello (server_drops) is dropped here: judged, it would stand in for the
            # real one behind it; the server would have dropped it anyway, so a real client
            # loses nothing.
            why = server_drops(flow, seg)
            if why and self._is_evasion(seg, hw, why, reset=False):
                self.stats.decoys += 1
                return Outcome(Action.DROP, segment=seg, evasion=why)
            decoy = bool(why)
            if not decoy:
                flow.sent(seg.seq, len(seg.payload))
        # A SYN that is not taken as the connection's start: one that dies at this router, or
        # another ISN once the connection has started (the server answers that with a
        # challenge ACK at most, RFC 5961 §4): taking it would misplace the real hello.
        stray_syn = False
        if flags & TCP_SYN:
            if decoy:
                stray_syn = True
            elif flow is not None and flow.isn is not None and flow.isn != seg.seq:
                if flow.closed:
                    # A new connection on the same 4-tuple after the client ended the old one.
                    del self.flows[key]
                    flow = None
                elif flow.started:
                    stray_syn = True
                else:
                    flow.ambiguous = True  # settled by the handshake's ACK (below)
            if stray_syn:
                seg = seg._replace(payload=b"")
            elif flow is None:
                self._expire(now)
                flow = _Flow(ClientHelloAssembler(seg.seq), now + self.flow_ttl)
                self.flows[key] = flow
                flow.isn = seg.seq
            else:
                # A repeat; or, before the connection started, the latest SYN counts (as it
                # does for connection tracking); or one that overtook the data.
                flow.assembler.syn(seg.seq)
                flow.isn = seg.seq
            if not stray_syn and flow is not None:
                flow.syn_seen(seg)
            if not stray_syn and flow is not None and len(flow.starts) < MAX_SYN_STARTS:
                for nxt in {seg.seq + 1, seg.seq + 1 + len(seg.payload)}:
                    flow.starts[nxt % SEQ_MOD] = seg.seq
        if flags & TCP_URG and seg.payload and not decoy:
            # Urgent data (RFC 9293 §3.8.5): the server's stack takes the urgent byte out of
            # the stream its application reads (unless SO_OOBINLINE), so the hello read here
            # would not be the one the server reads. No TLS client sends it.
            what = "urgent data (TCP URG) before the flow's verdict"
            if self._is_evasion(seg, hw, what):
                self.flows.pop(key, None)
                return self._reset(seg, None, False, what)
        if flow is None:
            if flags & TCP_SYN:
                return Outcome(Action.PASS, segment=seg)  # a stray SYN of no known flow
            unknown = self._unknown(seg, hw)
            if unknown is not None:
                return unknown
        else:
            # A FIN or RST does not end the entry: the connection may well go on (a RST that
            # only draws a challenge ACK, RFC 5961 §3; a decoy), and its hello is still to be
            # judged. Only one at the exact next sequence number ends it at the server (RFC
            # 9293 §3.10.7.4, RFC 5961 §3.2); then a new SYN may follow.
            flow.packets += 1
            if flags & (TCP_FIN | TCP_RST) and not decoy:
                flow.closed = flow.at_next(seg.seq)
            if flow.retry is not None:
                return self._after_hello(key, flow, seg, hw, decoy=decoy)
            matched = False
            if not flags & TCP_SYN and not decoy and not flow.started:
                if not seg.payload:
                    isn = flow.starts.get(seg.seq)
                    syn_ttl, syn_ts = (
                        flow.syns.get(isn, (0, None)) if isn is not None else (0, None)
                    )
                    if isn is not None and (
                        (flow.server_isn is not None and seg.ack != flow.server_next)
                        or (flow.server_took is not None and seg.seq != flow.server_took)
                        or seg.ttl < syn_ttl
                        or (
                            syn_ts is not None
                            and seg.tsval is not None
                            and _older(seg.tsval + 1, syn_ts)
                        )
                    ):
                        # One the server would not take (server_drops): it says nothing.
                        isn = None
                    if isn is not None:
                        # The handshake's ACK continues the SYN the server took: the stream
                        # starts after that one, whatever SYNs came before (one the server
                        # dropped, say). Only a SYN seen counts: an ACK elsewhere would let a
                        # client place a harmless hello where the filter reads and the real one
                        # where the server does (such an ACK is counted as idle below).
                        matched = flow.started = True
                        if flow.isn != isn:
                            flow.assembler.syn(isn)
                            flow.isn = isn
                        flow.ambiguous = False
                else:
                    flow.started = True
                    if flow.ambiguous:
                        # SYNs with different sequence numbers, then data without the ACK that
                        # tells which one the server took: where the hello starts is unknown.
                        what = "SYNs with different sequence numbers, then data before the ACK"
                        if self._is_evasion(seg, hw, what):
                            del self.flows[key]
                            return self._reset(seg, None, False, what)
            if stray_syn:
                flow.idle_acks += 1
            elif not seg.payload or decoy:
                handshake_ack = (
                    matched
                    and not flow.acked
                    and flags & (TCP_ACK | TCP_SYN | TCP_FIN | TCP_RST) == TCP_ACK
                )
                if handshake_ack:
                    flow.acked = True
                    flow.handshake_acked(flow.isn, seg.ack)
                elif not flags & TCP_SYN:
                    flow.idle_acks += 1
        if not seg.payload or decoy:
            if seg.payload:
                # A decoy: this router drops a forwarded packet whose TTL/hop limit would reach
                # 0 (RFC 1812 §5.3.1, RFC 8200 §3), or the server drops it (server_drops, for
                # a client not filtered by name), so the server never sees these bytes;
                # evasion tools send a harmless ClientHello this way before the real one. Not
                # ours to judge.
                self.stats.decoys += 1
            if flow is not None and flow.packets >= DECIDE_PACKETS:
                # A client that spends its packets on pure ACKs or decoys before (or in the
                # middle of) its hello is decided now, on what has arrived.
                return self._decide(key, flow, seg, hw, flow.assembler.result, now)
            return Outcome(Action.PASS, segment=seg)
        if flow is None:
            # The start was not seen, and the client is not judged by name (see _unknown):
            # its hello still sets the shaping class and the log line.
            self._expire(now)
            flow = _Flow(ClientHelloAssembler(), now + self.flow_ttl, packets=1, started=True)
            self.flows[key] = flow
        flow.segments += 1
        # TCP Fast Open: a SYN's data starts one after its sequence number (RFC 7413 §2).
        seq = (seg.seq + 1) % SEQ_MOD if flags & TCP_SYN else seg.seq
        if flags & TCP_SYN:
            flow.syn_data = True
            flow.sent(seq, len(seg.payload))
        info = flow.assembler.add(seq, seg.payload)
        last = flow.segments >= MAX_HELLO_SEGMENTS or flow.packets >= DECIDE_PACKETS
        if info.incomplete and not last:
            return Outcome(Action.PASS, segment=seg)
        return self._decide(key, flow, seg, hw, info, now)

    def _decide(
        self,
        key: tuple[str, int, str, int],
        flow: _Flow,
        seg: TcpSegment,
        hw: bytes | None,
        info: ClientHelloInfo,
        now: float,
    ) -> Outcome:
        """The verdict on a flow's first hello: whole, invalid, or what arrived of it before
        the end of the queue budget."""
        del self.flows[key]
        sni = info.sni if info.complete else None
        if info.conflict and self._is_evasion(seg, hw, info.reason):
            return self._reset(seg, None, info.ech, info.reason)
        first = flow.assembler.first or flow.assembler.contiguous()[:1]
        if first and first[0] in NOT_HELLO_RECORDS and not info.complete:
            # A TLS record of another type where the ClientHello must be (RFC 8446 §2: the
            # client's first flight is its hello): some stacks step over a warning alert or a
            # change_cipher_spec there (Go's does), so the hello behind it would go unjudged.
            what = f"a TLS {NOT_HELLO_RECORDS[first[0]]} record before the ClientHello"
            if self._is_evasion(seg, hw, what):
                return self._reset(seg, None, info.ech, what)
        if info.incomplete:
            # Out of queue budget: a name that has already arrived still decides.
            data = flow.assembler.contiguous()
            sni = sni_from_prefix(data)
            if sni is None:
                what = (
                    _cut_hello(data, flow.segments, "ClientHello")
                    or _idle_acks(flow)
                    or _no_start(flow, data)
                )
                if what and self._is_evasion(seg, hw, what):
                    return self._reset(seg, None, info.ech, what)
        why = ""
        if info.incomplete and not sni:
            why = f"no complete ClientHello in {flow.packets} packets ({flow.segments} with data)"
        outcome = self._verdict(seg, hw, info, sni, why)
        judged = flow.assembler
        if not judged.judged:
            judged.judged = judged.contiguous()  # out of budget: what had arrived
        if (
            outcome.action is Action.ACCEPT
            and self.second_hello
            and judged.judged
            and flow.packets < RETRY_PACKETS
            and judged.start is not None
        ):
            # The verdict mark waits for what follows the bytes judged, whatever the verdict
            # was given on: a whole hello, a name from its first part, or no hello at all
            # (see the class docstring). Given at once, it would leave the flow's queue on the
            # client's word, and the server may never have read those bytes.
            end = (judged.start + len(judged.judged) - 1) % SEQ_MOD
            after = ClientHelloAssembler(end, parse=parse_second_flight)
            flow.retry = _Retry(sni, info.ech, outcome.mark, after, unconfirmed=flow.syn_data)
            # Back in at the end with a fresh TTL: the table stays in expiry order (_expire).
            flow.expires = now + self.flow_ttl
            self.flows[key] = flow
            # Bytes after the hello in this segment (early data, a pipelined flight).
            return self._after_hello(key, flow, seg, hw, counted=True)
        return outcome

    def _after_hello(
        self,
        key: tuple[str, int, str, int],
        flow: _Flow,
        seg: TcpSegment,
        hw: bytes | None,
        counted: bool = False,
        decoy: bool = False,
    ) -> Outcome:
        """A packet of an accepted flow whose verdict mark waits (``flow.retry``); ``decoy``:
        one the server never reads (see _inspect)."""
        retry = flow.retry
        assert retry is not None
        retry.packets += 1
        last = retry.packets >= RETRY_PACKETS
        info = retry.assembler.result
        start = retry.assembler.start
        # A retransmission of the hello (it ends where the bytes after it start): the server
        # has those bytes; a packet, not a segment of the client's next flight.
        # TCP Fast Open: a SYN's data starts one after its sequence number (RFC 7413 §2).
        seq = (seg.seq + 1) % SEQ_MOD if seg.flags & TCP_SYN else seg.seq
        resent = start is not None and (start - seq - len(seg.payload)) % SEQ_MOD < SEQ_MOD // 2
        second_judged = retry.second_end is not None and not retry.assembler.repeats(
            seq, seg.payload
        )
        if seg.payload and not decoy and second_judged:
            what = "a segment over the second ClientHello with other bytes than the one judged"
            del self.flows[key]
            if self._is_evasion(seg, hw, what):
                return self._reset(seg, None, retry.ech, what)
            return Outcome(
                Action.ACCEPT, retry.mark, seg, retry.sni, retry.ech, judged=flow.assembler
            )
        if seg.payload and not decoy and not flow.assembler.repeats(seq, seg.payload):
            # A segment over the judged hello (a retransmission, or one that runs on past its
            # end) with other bytes there: the server may have kept these.
            what = "a retransmission of the ClientHello with other bytes than the hello judged"
            del self.flows[key]
            if self._is_evasion(seg, hw, what):
                return self._reset(seg, None, retry.ech, what)
            return Outcome(
                Action.ACCEPT, retry.mark, seg, retry.sni, retry.ech, judged=flow.assembler
            )
        if retry.unconfirmed and not decoy and not seg.flags & TCP_SYN:
            end = (start or 0) % SEQ_MOD
            if (seq == end and not seg.payload) or (seg.payload and resent):
                retry.unconfirmed = False  # the server took the SYN's data / it came again
            elif not last:
                # Nothing after a Fast Open hello counts before that: a fake hello in a SYN to a
                # server without Fast Open, then a segment to end the wait, then the real hello.
                return Outcome(Action.PASS, segment=seg)
        if seg.payload and not decoy and not resent:
            if not counted:
                retry.segments += 1
            info = retry.assembler.add(seq, seg.payload)
        elif seg.payload and decoy:
            self.stats.decoys += 1
        if info.incomplete and not last and retry.segments < MAX_HELLO_SEGMENTS:
            return Outcome(Action.PASS, segment=seg)
        del self.flows[key]
        second: str | None = None
        what = ""
        if info.conflict:
            what = f"after the ClientHello, {info.reason}"
        elif info.complete:
            self.stats.second_hellos += 1
            second = info.sni
            if second != retry.sni:
                # RFC 8446 §4.1.2: after a HelloRetryRequest the client "MUST send the same
                # ClientHello" but for listed extensions; server_name is not among them.
                what = (
                    f"second ClientHello (after a HelloRetryRequest) names "
                    f"{second or '(no SNI)'}, the first named {retry.sni or '(no SNI)'}"
                )
        elif info.incomplete:
            # Out of queue budget before the client's next flight was whole.
            data = retry.assembler.contiguous()
            ccs = max(leading_ccs(data), 0)
            second = sni_from_prefix(data[ccs:])
            if second is not None and second != retry.sni:
                what = (
                    f"second ClientHello names {second}, the first named {retry.sni or '(no SNI)'}"
                )
            elif second is None and ccs > CCS_RECORD_LEN:
                # Appendix D.4: one dummy record; more only spend the budget before a hello.
                what = f"{ccs // CCS_RECORD_LEN} change_cipher_spec records after the ClientHello"
            elif second is None and retry.segments and not data:
                what = (
                    f"{retry.segments} segments after the ClientHello, none with the bytes that "
                    f"follow it"
                )
            elif second is None and retry.segments:
                what = _cut_hello(data[ccs:], retry.segments, "second ClientHello")
            elif second is None:
                # A real client answers the server's flight (its Finished, a second hello).
                what = f"{flow.packets} packets without data after an accepted ClientHello"
        if what and self._is_evasion(seg, hw, what):
            return self._reset(seg, second, retry.ech, what)
        if flow.server_isn is not None:
            # The server's replies are queued: the mark waits for its answer (_reply), not
            # for what the client sends, which a fake hello's sender controls too.
            if retry.answer == "retry" and not info.complete and not info.incomplete:
                # After a HelloRetryRequest the client's next flight is its second hello.
                what = f"after a HelloRetryRequest, no second ClientHello ({info.reason})"
                if self._is_evasion(seg, hw, what):
                    return self._reset(seg, None, retry.ech, what)
            if info.complete:
                retry.second_end = ((retry.assembler.start or 0) + info.length) % SEQ_MOD
            if not last:
                self.flows[key] = flow
                return Outcome(Action.PASS, segment=seg)
            what = f"no answer from the server to the ClientHello within {RETRY_PACKETS} packets"
            if self._is_evasion(seg, hw, what):
                return self._reset(seg, None, retry.ech, what)
        return Outcome(Action.ACCEPT, retry.mark, seg, retry.sni, retry.ech, judged=flow.assembler)

    def _unknown(self, seg: TcpSegment, hw: bytes | None) -> Outcome | None:
        """A packet of a flow whose start the daemon did not see (its entry expired or was
        evicted, or the daemon restarted). Where its stream starts is unknown, so its hello
        cannot be read safely (an old duplicate could pose as one): a client filtered by name
        is reset, and will connect again. For other clients a packet without data decides the
        flow without a name (it must not stay in the queue for its lifetime); with data, None:
        its hello is read for the shaping class and the log."""
        what = "a flow whose start the daemon did not see (expired, evicted, or a restart)"
        if self._is_evasion(seg, hw, what):
            return self._reset(seg, None, False, what)
        if seg.payload and seg.ttl > MIN_FORWARD_TTL:
            return None
        info = ClientHelloInfo(reason="no ClientHello seen (the flow's start was not seen)")
        return self._verdict(seg, hw, info, None, "")

    def _reply(self, packet: bytes, now: float) -> Outcome:
        """A server's packet in a flow without a verdict. Never judged itself (PASS), but it
        carries the verdict mark once the server has acknowledged the ClientHello judged and
        answered it: until then the mark waits, so a fake hello that the server dropped cannot
        earn the mark for the real one behind it (which would then leave the queue unseen)."""
        seg = parse_ip_tcp(packet)
        if seg is None:
            return Outcome(Action.PASS)
        self.stats.replies += 1
        key = (seg.dst, seg.dport, seg.src, seg.sport)  # the client's side
        flow = self.flows.get(key)
        if flow is None:
            given = self.decided.get(key)
            if given is not None and given[0] > now:
                return given[1]._replace(segment=None, evasion="")
            return Outcome(Action.PASS)
        flags = seg.flags
        if flags & TCP_SYN:
            if flags & TCP_ACK:
                flow.server_isn = seg.seq
                flow.server_next = (seg.seq + 1) % SEQ_MOD
                # Its ACK says which SYN the server took, and so where the client's stream
                # starts: that, not the client's say, places the hello (two SYNs, one that
                # never reached the server, must not let the two disagree).
                flow.server_took = seg.ack
                isn = flow.starts.get(seg.ack)
                if isn is not None and not flow.started and flow.isn != isn:
                    flow.assembler.syn(isn)
                    flow.isn = isn
                elif flow.started and isn != flow.isn:
                    # The stream was placed after another SYN than the one the server took
                    # (an ACK for a SYN that never reached it): what is judged here is not
                    # what the server will read.
                    what = "the server took another SYN than the one the client's stream follows"
                    return self._reset_reply(key, flow, now, what)
                retry = flow.retry
                if retry is not None and retry.unconfirmed and seg.ack == retry.assembler.start:
                    retry.unconfirmed = False  # it acknowledges the Fast Open SYN's data
            return Outcome(Action.PASS)
        if flow.server_isn is None:
            return Outcome(Action.PASS)
        if flags & TCP_ACK and (flow.server_acked is None or _older(flow.server_acked, seg.ack)):
            flow.server_acked = seg.ack
        if seg.payload:
            offset = (seg.seq - flow.server_isn - 1) % SEQ_MOD
            if offset < SEQ_MOD // 2:
                flow.server_data_end = max(flow.server_data_end, offset + len(seg.payload))
            have = len(flow.server_head)
            if offset <= have < SERVER_HEAD_LEN and offset + len(seg.payload) > have:
                flow.server_head += seg.payload[have - offset : SERVER_HEAD_LEN - offset]
        retry = flow.retry
        if retry is None:
            return Outcome(Action.PASS)
        if retry.answer is None:
            retry.answer = server_answer(flow.server_head)
            if retry.answer == "retry":
                retry.retry_data_end = flow.server_data_end
                # The second hello comes after whatever the client sent before the retry
                # reached it (0-RTT early data, which a server that asks for a retry skips,
                # RFC 8446 §4.2.10): read from there.
                # The retry's ACK says how far the server read; the client's bytes held here
                # may say more.
                old = retry.assembler
                if old.start is not None:
                    sent = (old.start + len(old.contiguous() or old.judged) - 1) % SEQ_MOD
                    if flags & TCP_ACK and _older(sent, (seg.ack - 1) % SEQ_MOD):
                        sent = (seg.ack - 1) % SEQ_MOD
                    retry.assembler = ClientHelloAssembler(sent, parse=parse_second_flight)
                    retry.segments = 0
        if retry.answer is None and flow.assembler.judged[:1] != TLS_HANDSHAKE:
            # No hello was judged (bytes of another protocol, under sni_default): there is no
            # HelloRetryRequest to wait for, and the server's ACK of those bytes is enough (a
            # server that only takes an upload answers with nothing else).
            retry.answer = "answer"
        if retry.answer is None or retry.unconfirmed:
            return Outcome(Action.PASS)
        if retry.answer == "retry":
            # After a HelloRetryRequest: the second hello judged (see _after_hello), then the
            # server's acknowledgment of it and its next answer.
            end = retry.second_end
            if end is None or flow.server_data_end <= retry.retry_data_end:
                return Outcome(Action.PASS)
        else:
            end = retry.assembler.start
        acked = flow.server_acked
        if end is None or acked is None or _older(acked, end):
            return Outcome(Action.PASS)
        seen = flow.in_order_end()
        if seen is None or _older(seen, acked):
            # The server has read bytes that never went past here in order: not the ones
            # judged (a stream placed elsewhere, a hello sent beyond a gap).
            what = "the server acknowledged client bytes the filter did not see in order"
            return self._reset_reply(key, flow, now, what, retry.mark)
        del self.flows[key]
        out = Outcome(Action.ACCEPT, retry.mark, None, retry.sni, retry.ech, judged=flow.assembler)
        return self._remember(key, out, now)

    def _reset_reply(
        self,
        key: tuple[str, int, str, int],
        flow: _Flow,
        now: float,
        what: str,
        mark: int | None = None,
    ) -> Outcome:
        """An evasion seen in the server's reply: the flow is reset (the reply carries the
        reset verdict; the connmark then rejects both directions) for a client filtered by
        name; for others the flow gets its verdict ``mark`` (or waits, without one)."""
        client_ip, _, server_ip, server_port = key
        hook = self.evasion
        if hook is None or hook(client_ip, None, server_ip, server_port, what, True):
            del self.flows[key]
            self.stats.evasions += 1
            self.stats.reset += 1
            out = Outcome(Action.RESET, MARK_VERDICT_RESET, None, None, False, what)
        elif mark is not None:
            del self.flows[key]
            out = Outcome(Action.ACCEPT, mark, None, None, False, judged=flow.assembler)
        else:
            return Outcome(Action.PASS)
        return self._remember(key, out, now)

    def _invalid_stray(self, seg: TcpSegment, hw: bytes | None) -> Outcome:
        """An INVALID packet of no flow being decided: most likely a stray packet of a flow
        decided long ago (its connmark cannot be read without a conntrack entry), which passes
        as it did before INVALID packets were queued. Not a TLS handshake record from a client
        filtered by name, though: that would be the hello of a flow whose start the daemon
        never saw, and connection tracking and the server's stack disagree at the edges of
        the window (older kernels called an overly delayed ACK INVALID, and a Linux server
        queues such in-order data on its fast path before it looks at the ACK)."""
        if seg.payload[:1] == TLS_HANDSHAKE and not seg.flags & TCP_RST:
            what = (
                "an out-of-window (INVALID) TLS handshake record of a flow the daemon did not see"
            )
            if self._is_evasion(seg, hw, what, reset=False):
                self.stats.decoys += 1
                return Outcome(Action.DROP, segment=seg, evasion=what)
        return Outcome(Action.PASS, segment=seg)

    def _is_evasion(self, seg: TcpSegment, hw: bytes | None, what: str, reset: bool = True) -> bool:
        hook = self.evasion
        return hook is None or hook(seg.src, format_mac(hw), seg.dst, seg.dport, what, reset)

    def _reset(self, seg: TcpSegment, sni: str | None, ech: bool, what: str) -> Outcome:
        self.stats.evasions += 1
        self.stats.reset += 1
        return Outcome(Action.RESET, MARK_VERDICT_RESET, seg, sni, ech, what)

    def _verdict(
        self, seg: TcpSegment, hw: bytes | None, info: ClientHelloInfo, sni: str | None, why: str
    ) -> Outcome:
        if not sni:
            why = why or info.reason or "no server_name extension"
        if sni is None:
            self.stats.no_sni += 1
        decision = self.decide(seg.src, format_mac(hw), seg.dst, seg.dport, sni, info.ech, why)
        if not decision.allowed:
            self.stats.reset += 1
            return Outcome(Action.RESET, MARK_VERDICT_RESET, seg, sni, info.ech)
        mark = MARK_VERDICT_ACCEPT
        if self.sni_class is not None:
            # The shaping hook answers mark bits (class number << 8, client slot); the verdict
            # bits are ours.
            mark |= self.sni_class(seg.src, sni or "") & ~MARK_VERDICT_MASK & MARK_MAX
        self.stats.accepted += 1
        return Outcome(Action.ACCEPT, mark, seg, sni, info.ech)


def _cut_hello(data: bytes, segments: int, what: str) -> str:
    """Why a ClientHello still incomplete after ``segments`` data segments, whose name has not
    arrived, was cut on purpose ("" when it is merely large: full-sized segments, or a stream
    that does not start like a ClientHello, e.g. one joined mid-flow after a restart)."""
    if segments <= 0 or not looks_like_hello_start(data):
        return ""
    mean = len(data) // segments
    if mean >= EVASION_SEGMENT_BYTES:
        return ""
    return (
        f"{what} cut into {segments} segments of {mean} bytes on average "
        f"(below {EVASION_SEGMENT_BYTES}) without its server_name in the first "
        f"{len(data)} bytes"
    )


def _idle_acks(flow: _Flow) -> str:
    """Why a flow whose ClientHello was not whole at the end of the queue budget spent it on
    purpose ("" when it did not: see IDLE_ACKS_MAX)."""
    if flow.idle_acks <= IDLE_ACKS_MAX:
        return ""
    return (
        f"{flow.idle_acks} packets that gave the server nothing new (pure ACKs, decoys) before "
        f"a whole ClientHello (the daemon decides a flow by its {DECIDE_PACKETS}th packet)"
    )


def _no_start(flow: _Flow, data: bytes) -> str:
    """Why a flow whose SYN was seen sent packets without the first byte of its stream (old
    duplicates, a hello that slipped past while the queue failed open, bytes placed off the
    stream's start): nothing that could be judged ("" when bytes did start the stream)."""
    if flow.isn is None or data:
        return ""
    return (
        f"{flow.packets} packets ({flow.segments} with data) without the first byte of the "
        f"stream, where the ClientHello starts"
    )


# -- RST towards the server --------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_rst(seg: TcpSegment) -> tuple[int, bytes]:
    """``(family, IP packet)``: a RST from the client to the server at ``seg.seq``.

    The RST carries no ACK (RFC 9293 §3.10.7: a RST is checked by its sequence number only).
    """
    v6 = ":" in seg.src
    af = socket.AF_INET6 if v6 else socket.AF_INET
    src = socket.inet_pton(af, seg.src)
    dst = socket.inet_pton(af, seg.dst)
    tcp = struct.pack("!HHIIBBHHH", seg.sport, seg.dport, seg.seq, 0, 5 << 4, TCP_RST, 0, 0, 0)
    if v6:
        pseudo = src + dst + struct.pack("!IxxxB", len(tcp), socket.IPPROTO_TCP)
    else:
        pseudo = src + dst + struct.pack("!xBH", socket.IPPROTO_TCP, len(tcp))
    csum = _checksum(pseudo + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    if v6:
        ip = struct.pack("!IHBB", 6 << 28, len(tcp), socket.IPPROTO_TCP, 64) + src + dst
    else:
        # The kernel fills in the IP checksum (and the id when 0) for IP_HDRINCL (raw(7)).
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0) + src + dst
    return af, ip + tcp


class RstSender:
    """Raw IPPROTO_RAW sockets (header included, raw(7)), opened on first use."""

    def __init__(self) -> None:
        self._socks: dict[int, socket.socket] = {}

    def send(self, seg: TcpSegment) -> None:
        af, packet = build_rst(seg)
        sock = self._socks.get(af)
        if sock is None:
            sock = socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW)
            sock.setblocking(False)
            self._socks[af] = sock
        sock.sendto(packet, (seg.dst, 0))

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()


# -- queue configuration -----------------------------------------------------------------------


def config_message(queue_num: int, flags: int, mask: int, seq: int) -> bytes:
    """NFQNL_MSG_CONFIG with NFQA_CFG_FLAGS/NFQA_CFG_MASK (big-endian u32 attributes)."""
    attrs = b"".join(
        _NLATTR.pack(8, kind) + struct.pack("!I", value)
        for kind, value in ((NFQA_CFG_MASK, mask), (NFQA_CFG_FLAGS, flags))
    )
    body = _NFGEN.pack(socket.AF_UNSPEC, NFNETLINK_V0, socket.htons(queue_num)) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG
    return _NLMSG.pack(NLMSG_HDRLEN + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def set_fail_open(fd: int, queue_num: int) -> bool | None:
    """Set NFQA_CFG_F_FAIL_OPEN on the queue bound through netlink socket ``fd``.

    Returns True when the kernel acknowledged it, None when the answer could not be read (a
    queued packet was first in the socket: it is left for the library), and raises OSError
    when the kernel refused. Call it right after ``bind``, before rules send packets.
    """
    seq = int.from_bytes(os.urandom(4), "little") | 1
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.send(config_message(queue_num, NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_FAIL_OPEN, seq))
        deadline = time.monotonic() + CONFIG_ACK_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                return None
            # Peek: anything but our acknowledgement belongs to the library's reader.
            data = sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            if len(data) < NLMSG_HDRLEN + 4 + NLMSG_HDRLEN:
                return None
            _, kind, _, _, _ = _NLMSG.unpack_from(data)
            (error,) = struct.unpack_from("=i", data, NLMSG_HDRLEN)
            _, _, _, their_seq, _ = _NLMSG.unpack_from(data, NLMSG_HDRLEN + 4)
            if kind != NLMSG_ERROR or their_seq != seq:
                return None
            sock.recv(65536, socket.MSG_DONTWAIT)
            if error:
                raise OSError(-error, f"NFQA_CFG_F_FAIL_OPEN refused: {os.strerror(-error)}")
            return True
    finally:
        # Only our duplicate descriptor is closed; the library's socket stays open.
        sock.close()


class _BatchSocket:
    """What ``NetfilterQueue.run_socket`` reads from: the real socket, but EAGAIN after
    ``limit`` datagrams so one callback never drains an endless stream."""

    __slots__ = ("left", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.left = 0

    def recv(self, size: int) -> bytes:
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "batch done")
        self.left -= 1
        return self.sock.recv(size)


# -- the shell ---------------------------------------------------------------------------------


@dataclass
class QueueStats:
    batches: int = 0
    verdict_errors: int = 0
    rst_sent: int = 0
    rst_errors: int = 0
    fail_open: bool | None = None


class SniQueue:
    """Binds NFQUEUE ``queue_num`` and gives every queued packet a verdict."""

    def __init__(
        self,
        queue_num: int,
        decide: Decide,
        *,
        sni_class: SniClass | None = None,
        evasion: Evasion | None = None,
        second_hello: bool = True,
        batch: int = BATCH,
        max_len: int = QUEUE_MAX_LEN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue_num = queue_num
        self.inspector = FlowInspector(
            decide, sni_class, evasion=evasion, second_hello=second_hello
        )
        self.batch = batch
        self.max_len = max_len
        self.clock = clock
        self.stats = QueueStats()
        self.rst = RstSender()
        self._nfq: Any = None
        self._sock: socket.socket | None = None
        self._reader: _BatchSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def sni_class(self) -> SniClass | None:
        return self.inspector.sni_class

    @sni_class.setter
    def sni_class(self, hook: SniClass | None) -> None:
        self.inspector.sni_class = hook

    @property
    def running(self) -> bool:
        return self._nfq is not None

    def open(self) -> None:
        """Bind the queue and set fail-open; no reading yet (see :meth:`attach`)."""
        from netfilterqueue import COPY_PACKET, NetfilterQueue

        nfq = NetfilterQueue()
        try:
            # COPY_PACKET: we need the TCP payload; the library caps the copy at ~4 KB, which
            # holds any MTU-sized segment (the kernel segments GSO packets for queues without
            # NFQA_CFG_F_GSO).
            nfq.bind(
                self.queue_num, self._on_packet, max_len=self.max_len, mode=COPY_PACKET,
                sock_len=SOCK_RCVBUF,
            )  # fmt: skip
            fd = nfq.get_fd()
            try:
                self.stats.fail_open = set_fail_open(fd, self.queue_num)
            except OSError as exc:
                self.stats.fail_open = False
                log.warning("queue %d: cannot set fail-open: %s", self.queue_num, exc)
            if self.stats.fail_open is None:
                log.warning("queue %d: fail-open flag not confirmed by the kernel", self.queue_num)
            sock = socket.socket(fileno=os.dup(fd))
            sock.setblocking(False)
        except BaseException:
            nfq.unbind()
            raise
        self._nfq = nfq
        self._sock = sock
        self._reader = _BatchSocket(sock)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._sock is not None
        self._loop = loop
        loop.add_reader(self._sock.fileno(), self.read_batch)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.open()
        self.attach(loop)

    def read_batch(self) -> None:
        """One bounded batch (event-loop reader callback)."""
        reader = self._reader
        if reader is None or self._nfq is None:
            return
        reader.left = self.batch
        self.stats.batches += 1
        try:
            self._nfq.run_socket(reader)
        except OSError as exc:
            log.warning("queue %d: read failed: %s", self.queue_num, exc)

    def _on_packet(self, pkt: Any) -> None:
        outcome = Outcome(Action.PASS)
        mark = 0
        try:
            mark = pkt.get_mark()
            outcome = self.inspector.inspect(
                pkt.get_payload(),
                pkt.get_hw(),
                self.clock(),
                invalid=bool(mark & MARK_INVALID),
                reply=bool(mark & MARK_REPLY),
            )
        except Exception:
            self.inspector.stats.errors += 1
            log.exception("queue %d: inspecting a packet failed; accepting it", self.queue_num)
        finally:
            # Always a verdict: a packet without one is stuck until the queue is unbound.
            try:
                if outcome.action is Action.PASS and mark & MARK_REPLY:
                    # Through the rest of mangle FORWARD (an admin's TCPMSS clamp, say): an
                    # accepted packet would skip it; repeated without the reply bit, it is not
                    # queued again.
                    pkt.set_mark(mark & ~MARK_REPLY)
                    pkt.repeat()
                elif outcome.action is Action.PASS:
                    pkt.accept()
                elif outcome.action is Action.DROP:
                    pkt.drop()
                else:
                    pkt.set_mark(outcome.mark)
                    pkt.repeat()
            except Exception:
                self.stats.verdict_errors += 1
                log.exception("queue %d: giving a verdict failed", self.queue_num)
        if outcome.action is Action.RESET and outcome.segment is not None:
            try:
                self.rst.send(outcome.segment)
                self.stats.rst_sent += 1
            except OSError as exc:
                self.stats.rst_errors += 1
                log.warning(
                    "queue %d: RST to %s failed: %s", self.queue_num, outcome.segment.dst, exc
                )

    def close(self) -> None:
        if self._loop is not None and self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._loop = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._reader = None
        if self._nfq is not None:
            self._nfq.unbind()
            self._nfq = None
        self.rst.close()
        self.inspector.flows.clear()

    def status(self) -> dict[str, Any]:
        s, q = self.inspector.stats, self.stats
        return {
            "queue": self.queue_num,
            "running": self.running,
            "fail_open": q.fail_open,
            "packets": s.packets,
            "accepted": s.accepted,
            "reset": s.reset,
            "no_sni": s.no_sni,
            "decoys": s.decoys,
            "evasions": s.evasions,
            "second_hellos": s.second_hellos,
            "replies": s.replies,
            "invalid": s.invalid,
            "flows_pending": len(self.inspector.flows),
            "flows_evicted": s.flows_evicted,
            "errors": s.errors + q.verdict_errors,
            "rst_sent": q.rst_sent,
        }


__all__ = [
    "BATCH",
    "Action",
    "Decide",
    "Evasion",
    "FlowDecision",
    "FlowInspector",
    "Outcome",
    "SniClass",
    "SniQueue",
    "build_rst",
    "config_message",
    "set_fail_open",
]
