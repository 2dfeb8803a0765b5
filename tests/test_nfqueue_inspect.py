"""The NFQUEUE packet logic without a kernel: raw IP packets in, outcomes (verdicts) out."""

from __future__ import annotations

import itertools
import socket
import struct
from typing import Any

import dpkt

from tests.test_tls_sni import ipv4, ipv6, real_hello, tcp_header, with_extensions
from tproxy.netfilter.render import MARK_INVALID, MARK_VERDICT_ACCEPT, MARK_VERDICT_RESET
from tproxy.nfqueue import (
    MAX_HELLO_SEGMENTS,
    NFQA_CFG_F_FAIL_OPEN,
    Action,
    FlowDecision,
    FlowInspector,
    SniQueue,
    build_rst,
    config_message,
)

SYN, ACK, PSH_ACK, FIN_ACK = 0x02, 0x10, 0x18, 0x11
ISN = 1000


class Decisions:
    """A policy stand-in: deny names ending in ``bad.example``; remembers what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str | None, bool, str]] = []

    def __call__(
        self,
        client: str,
        mac: str | None,
        server: str,
        port: int,
        sni: str | None,
        ech: bool,
        why: str,
    ) -> FlowDecision:
        self.asked.append((client, sni, ech, why))
        return FlowDecision(not (sni or "").endswith("bad.example"))


def seg(seq: int, flags: int, payload: bytes = b"", sport: int = 40000) -> bytes:
    return ipv4(tcp_header(sport, 443, seq, flags) + payload)


def flow(inspector: FlowInspector, hello: bytes, parts: list[int], sport: int = 40000) -> list[Any]:
    """SYN, ACK, then the hello cut at ``parts``; the outcomes of the data segments."""
    now = 0.0
    assert inspector.inspect(seg(ISN, SYN, sport=sport), None, now).action is Action.PASS
    assert inspector.inspect(seg(ISN + 1, ACK, sport=sport), None, now).action is Action.PASS
    cuts = [0, *parts, len(hello)]
    out = []
    for a, b in itertools.pairwise(cuts):
        out.append(inspector.inspect(seg(ISN + 1 + a, PSH_ACK, hello[a:b], sport), None, now))
    return out


def test_allowed_and_denied_in_one_segment() -> None:
    decide = Decisions()
    insp = FlowInspector(decide)
    [ok] = flow(insp, real_hello("good.example"), [])
    assert (
        ok.action is Action.ACCEPT and ok.mark == MARK_VERDICT_ACCEPT and ok.sni == "good.example"
    )
    [no] = flow(insp, real_hello("x.bad.example"), [], sport=40001)
    assert no.action is Action.RESET and no.mark == MARK_VERDICT_RESET
    assert no.segment is not None and no.segment.seq == ISN + 1
    assert [a[1] for a in decide.asked] == ["good.example", "x.bad.example"]
    assert insp.flows == {}  # decided flows are forgotten at once


def test_split_hello_waits_for_the_name() -> None:
    decide = Decisions()
    insp = FlowInspector(decide)
    hello = real_hello("split.bad.example")
    first, second = flow(insp, hello, [40])
    assert first.action is Action.PASS  # the first part goes on to the server
    assert second.action is Action.RESET and second.segment is not None
    assert second.segment.seq == ISN + 1 + 40  # the server's next expected byte: RST target
    assert len(decide.asked) == 1


def test_out_of_order_segments() -> None:
    decide = Decisions()
    insp = FlowInspector(decide)
    hello = real_hello("ooo.example")
    insp.inspect(seg(ISN, SYN), None, 0)
    assert insp.inspect(seg(ISN + 1 + 60, PSH_ACK, hello[60:]), None, 0).action is Action.PASS
    out = insp.inspect(seg(ISN + 1, PSH_ACK, hello[:60]), None, 0)
    assert out.action is Action.ACCEPT and out.sni == "ooo.example"


def test_no_sni_and_not_tls_decide_with_none() -> None:
    decide = Decisions()
    insp = FlowInspector(decide)
    [out] = flow(insp, real_hello(None), [])
    assert out.action is Action.ACCEPT and out.sni is None
    [out] = flow(insp, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", [], sport=40001)
    assert out.action is Action.ACCEPT
    assert decide.asked[0][1] is None and decide.asked[0][3] == "no server_name extension"
    assert decide.asked[1][1] is None and "not a TLS handshake" in decide.asked[1][3]


def test_incomplete_hello_is_decided_within_the_queue_budget() -> None:
    decide = Decisions()
    insp = FlowInspector(decide)
    hello = real_hello("slow.bad.example")
    outs = flow(
        insp, hello[: MAX_HELLO_SEGMENTS * 5], [5 * i for i in range(1, MAX_HELLO_SEGMENTS)]
    )
    assert [o.action for o in outs[:-1]] == [Action.PASS] * (MAX_HELLO_SEGMENTS - 1)
    # No name yet after the last segment the kernel still queues, and 5-byte segments: cut on
    # purpose (the name would arrive after the queue budget), so the flow is reset.
    assert outs[-1].action is Action.RESET and outs[-1].sni is None
    assert "cut into 6 segments of 5 bytes" in outs[-1].evasion
    assert decide.asked == [] and insp.stats.evasions == 1
    # A client the filter does not judge by name (the hook says no) is decided as before.
    seen: list[str] = []

    def not_filtered(
        client: str, mac: str | None, server: str, port: int, what: str, reset: bool
    ) -> bool:
        seen.append(what)
        return False

    insp = FlowInspector(decide, evasion=not_filtered)
    outs = flow(
        insp, hello[: MAX_HELLO_SEGMENTS * 5], [5 * i for i in range(1, MAX_HELLO_SEGMENTS)]
    )
    assert outs[-1].action is Action.ACCEPT and outs[-1].sni is None
    assert "no complete ClientHello" in decide.asked[0][3] and len(seen) == 1


def test_a_large_hello_in_full_segments_is_not_an_evasion() -> None:
    # A hello whose name lies beyond six full-sized segments (padding first) is merely large:
    # decided without a name (sni_default), as before.
    decide = Decisions()
    insp = FlowInspector(decide)
    name = b"big.bad.example"
    sni_ext = struct.pack("!HBH", len(name) + 3, 0, len(name)) + name
    hello = with_extensions(real_hello(None), [(0x0015, bytes(5000)), (0, sni_ext)])
    outs = flow(insp, hello, [700 * i for i in range(1, 8)])
    decided = [o for o in outs if o.action is not Action.PASS]
    assert decided[0].action is Action.ACCEPT and decided[0].sni is None
    assert decided[0].evasion == "" and insp.stats.evasions == 0


def test_shaping_class_bits_ride_on_the_accept_mark() -> None:
    insp = FlowInspector(Decisions(), sni_class=lambda ip, sni: 0x0312_07 if sni else 0)
    [out] = flow(insp, real_hello("video.example"), [])
    # Verdict bits are ours even if the hook sets them.
    assert out.mark == MARK_VERDICT_ACCEPT | 0x031200 | 0x01
    assert out.mark & MARK_VERDICT_RESET == 0


def test_flow_table_is_bounded_and_expires() -> None:
    insp = FlowInspector(Decisions(), max_flows=10, flow_ttl=5.0)
    for port in range(30000, 30050):
        insp.inspect(seg(ISN, SYN, sport=port), None, 0.0)
    assert len(insp.flows) <= 11 and insp.stats.flows_evicted >= 39
    insp.inspect(seg(ISN, SYN, sport=31000), None, 10.0)  # the old ones expired meanwhile
    assert list(insp.flows) == [("10.0.0.2", 31000, "192.0.2.7", 443)]
    # A FIN does not end the entry (the kernel may still count the connection): it expires.
    insp.inspect(seg(ISN + 1, FIN_ACK, sport=31000), None, 10.0)
    assert list(insp.flows) == [("10.0.0.2", 31000, "192.0.2.7", 443)]
    insp.inspect(seg(ISN, SYN, sport=32000), None, 16.0)
    assert list(insp.flows) == [("10.0.0.2", 32000, "192.0.2.7", 443)]


def test_ipv6_flow() -> None:
    decide = Decisions()
    insp = FlowInspector(decide)
    hello = real_hello("v6.bad.example")
    insp.inspect(ipv6(tcp_header(40000, 443, ISN, SYN)), None, 0)
    out = insp.inspect(ipv6(tcp_header(40000, 443, ISN + 1, PSH_ACK) + hello), b"\x02" * 6, 0)
    assert out.action is Action.RESET and decide.asked[0][0] == "fd00::2"


def test_garbage_passes() -> None:
    insp = FlowInspector(Decisions())
    for junk in (b"", b"\x45", bytes(60), ipv4(b"\x00" * 8, proto=17)):
        assert insp.inspect(junk, None, 0).action is Action.PASS


# -- RST packets -------------------------------------------------------------------------------


def test_rst_v4_checksums_verify() -> None:
    insp = FlowInspector(Decisions())
    [out] = flow(insp, real_hello("bad.example"), [])
    family, packet = build_rst(out.segment)
    assert family == socket.AF_INET
    ip = dpkt.ip.IP(packet)
    tcp = ip.data
    assert (socket.inet_ntoa(ip.src), socket.inet_ntoa(ip.dst)) == ("10.0.0.2", "192.0.2.7")
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.flags) == (40000, 443, ISN + 1, dpkt.tcp.TH_RST)
    want = tcp.sum
    tcp.sum = 0
    ip.sum = 0
    assert dpkt.ip.IP(bytes(ip)).data.sum == want  # dpkt recomputes: ours was right


def test_rst_v6_checksum_verifies() -> None:
    insp = FlowInspector(Decisions())
    insp.inspect(ipv6(tcp_header(40000, 443, ISN, SYN)), None, 0)
    out = insp.inspect(
        ipv6(tcp_header(40000, 443, ISN + 1, PSH_ACK) + real_hello("bad.example")), None, 0
    )
    family, packet = build_rst(out.segment)
    assert family == socket.AF_INET6
    ip = dpkt.ip6.IP6(packet)
    want = ip.data.sum
    ip.data.sum = 0
    assert dpkt.ip6.IP6(bytes(ip)).data.sum == want


def test_config_message_layout() -> None:
    msg = config_message(443, NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_FAIL_OPEN, 77)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq, pid) == (len(msg), 0x0302, 0x5, 77, 0)
    family, version, res_id = struct.unpack_from("!BBH", msg, 16)
    assert (family, version, res_id) == (0, 0, 443)  # res_id is the queue, big-endian
    # Two attributes, NFQA_CFG_MASK (4) and NFQA_CFG_FLAGS (5), each a big-endian u32.
    assert (
        msg[20:] == struct.pack("=HH", 8, 4) + b"\0\0\0\1" + struct.pack("=HH", 8, 5) + b"\0\0\0\1"
    )


# -- the shell's verdict guarantee -----------------------------------------------------------


class FakePacket:
    """Stands in for netfilterqueue.Packet: records the verdict given."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.verdict: str | None = None
        self.mark = 0

    def get_payload(self) -> bytes:
        return self.payload

    def get_hw(self) -> bytes | None:
        return None

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def accept(self) -> None:
        self.verdict = "accept"

    def repeat(self) -> None:
        self.verdict = "repeat"


def test_a_failing_decision_still_gives_a_verdict() -> None:
    def broken(*args: Any) -> FlowDecision:
        raise RuntimeError("policy bug")

    queue = SniQueue(1, broken)
    syn = FakePacket(seg(ISN, SYN))
    queue._on_packet(syn)
    data = FakePacket(seg(ISN + 1, PSH_ACK, real_hello("x.example")))
    queue._on_packet(data)
    assert syn.verdict == "accept" and data.verdict == "accept" and data.mark == 0
    assert queue.status()["errors"] == 1


def test_reset_verdict_is_a_marked_repeat() -> None:
    queue = SniQueue(1, Decisions())
    queue.rst.send = lambda seg: None  # type: ignore[method-assign]  # no raw socket here
    queue._on_packet(FakePacket(seg(ISN, SYN)))
    pkt = FakePacket(seg(ISN + 1, PSH_ACK, real_hello("bad.example")))
    queue._on_packet(pkt)
    assert (pkt.verdict, pkt.mark) == ("repeat", MARK_VERDICT_RESET)
    assert queue.status()["rst_sent"] == 1


def test_the_shell_tells_the_inspector_which_packets_were_invalid() -> None:
    # The rules mark what connection tracking found INVALID (render.MARK_INVALID) before they
    # queue it: a stray packet of no flow being decided passes, and is counted.
    queue = SniQueue(1, Decisions())
    pkt = FakePacket(seg(ISN + 5000, PSH_ACK, b"\x17\x03\x03\x00\x01x"))
    pkt.mark = MARK_INVALID
    queue._on_packet(pkt)
    assert pkt.verdict == "accept" and queue.inspector.stats.invalid == 1
    queue._on_packet(FakePacket(seg(ISN + 6000, PSH_ACK, b"x")))
    assert queue.inspector.stats.invalid == 1
