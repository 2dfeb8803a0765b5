"""ClientHello parsing and reassembly, on real ClientHellos made by the ssl module."""

from __future__ import annotations

import random
import socket
import ssl
import struct
import time

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tproxy.tls import (
    EXT_ECH,
    MAX_HELLO_BYTES,
    ClientHelloAssembler,
    parse_client_hello,
    parse_ip_tcp,
    parse_second_flight,
)

# -- real ClientHellos -------------------------------------------------------------------------


def real_hello(sni: str | None, alpn: list[str] | None = None) -> bytes:
    """The bytes OpenSSL sends first, for a client connecting to ``sni``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def _ext_offset(body: bytes) -> int:
    """Offset of the extensions length in a ClientHello body (test-side, simple walk)."""
    pos = 34
    pos += 1 + body[pos]
    pos += 2 + struct.unpack_from("!H", body, pos)[0]
    pos += 1 + body[pos]
    return pos


def with_extensions(hello: bytes, extra: list[tuple[int, bytes]], records: int = 1) -> bytes:
    """Rebuild a one-record ClientHello with extra extensions, optionally over N records."""
    assert hello[0] == 22 and hello[5] == 1
    body = hello[9:]
    at = _ext_offset(body)
    (n,) = struct.unpack_from("!H", body, at)
    exts = body[at + 2 : at + 2 + n]
    for etype, data in extra:
        exts += struct.pack("!HH", etype, len(data)) + data
    body = body[:at] + struct.pack("!H", len(exts)) + exts
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    out = b""
    size = -(-len(message) // records)
    for i in range(0, len(message), size):
        chunk = message[i : i + size]
        out += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
    return out


HELLO = real_hello("www.example.com", ["h2", "http/1.1"])
NO_SNI = real_hello(None)
# A post-quantum-sized hello (X25519MLKEM768 key share ≈ 1.2 KB): spans two 1460-byte segments.
BIG = with_extensions(HELLO, [(0x0A0A, bytes(1300))])


def test_real_hello_sni_and_alpn() -> None:
    info = parse_client_hello(HELLO)
    assert info.complete and not info.incomplete and info.valid
    assert info.sni == "www.example.com"
    assert info.alpn == ("h2", "http/1.1")
    assert not info.ech
    assert info.length == len(HELLO)


def test_agrees_with_dpkt() -> None:
    record = dpkt.ssl.TLSRecord(HELLO)
    hello = dpkt.ssl.TLSHandshake(record.data).data
    sni_ext = dict(hello.extensions)[0]
    # ServerNameList: u16 list length, u8 type, u16 name length, name.
    assert sni_ext[5:].decode() == parse_client_hello(HELLO).sni


def test_no_sni() -> None:
    info = parse_client_hello(NO_SNI)
    assert info.complete and info.sni is None


def test_ech_extension() -> None:
    info = parse_client_hello(with_extensions(HELLO, [(EXT_ECH, b"\x00" + bytes(40))]))
    assert info.complete and info.ech and info.sni == "www.example.com"


def test_hello_over_several_records() -> None:
    data = with_extensions(HELLO, [], records=3)
    info = parse_client_hello(data)
    assert info.complete and info.sni == "www.example.com" and info.length == len(data)


def test_trailing_data_ignored() -> None:
    info = parse_client_hello(HELLO + b"\x17\x03\x03\x00\x05hello")
    assert info.complete and info.length == len(HELLO)


@pytest.mark.parametrize("data", [HELLO, BIG, with_extensions(HELLO, [], records=4)])
def test_every_prefix_is_incomplete(data: bytes) -> None:
    for cut in range(len(data)):
        info = parse_client_hello(data[:cut])
        assert info.incomplete and not info.complete, cut
    assert parse_client_hello(data).complete


@pytest.mark.parametrize("data", [HELLO, BIG])
def test_assembler_every_split(data: bytes) -> None:
    isn = 0xFFFFFF00  # sequence numbers wrap inside the hello
    for cut in range(1, len(data)):
        first, second = data[:cut], data[cut:]
        a = ClientHelloAssembler(isn)
        assert a.add(isn + 1, first).incomplete
        info = a.add((isn + 1 + cut) % (1 << 32), second)
        assert info.complete and info.sni == "www.example.com", cut
        # Reversed arrival, no SYN seen: the late first segment becomes the start.
        b = ClientHelloAssembler()
        assert b.add((isn + 1 + cut) % (1 << 32), second).incomplete
        assert b.add(isn + 1, first).sni == "www.example.com", cut


def test_assembler_out_of_order_and_retransmits() -> None:
    rng = random.Random(7)
    data = BIG
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(data)), 4))
        bounds = [0, *cuts, len(data)]
        segs = [(bounds[i], data[bounds[i] : bounds[i + 1]]) for i in range(len(bounds) - 1)]
        # Retransmits, including one repacketised larger segment spanning two originals.
        segs += [segs[1], (bounds[1], data[bounds[1] : bounds[3]])]
        rng.shuffle(segs)
        isn = rng.randrange(1 << 32)
        a = ClientHelloAssembler(isn if rng.random() < 0.5 else None)
        results = [a.add((isn + 1 + off) % (1 << 32), seg) for off, seg in segs]
        assert results[-1].complete and results[-1].sni == "www.example.com"
        assert sum(r.complete for r in results) >= 1
        assert all(r.valid for r in results)


def test_assembler_syn_after_data() -> None:
    a = ClientHelloAssembler()
    assert a.add(1001 + 100, HELLO[100:]).incomplete
    a.syn(1000)
    assert a.add(1001, HELLO[:100]).complete


def test_assembler_bounded() -> None:
    a = ClientHelloAssembler(0)
    header = b"\x16\x03\x01\x40\x00\x01\x00\x3f\xfc"  # record 16384, hello 16380 bytes
    info = a.add(1, header)
    assert info.incomplete
    for off in range(len(header), MAX_HELLO_BYTES + 4000, 1000):
        info = a.add(1 + off, bytes(1000))
    assert not info.valid and "16384" in info.reason
    assert a.done


def test_non_tls_stream_is_invalid() -> None:
    a = ClientHelloAssembler(5)
    info = a.add(6, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not info.valid and "not a TLS handshake" in info.reason


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "not ClientHello"),
        (b"\x16\x02\x01\x00\x05", "record version"),
        (b"\x16\x03\x01\x00\x00", "record length"),
        (b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00", "truncated"),
    ],
)
def test_invalid_reasons(data: bytes, reason: str) -> None:
    info = parse_client_hello(data)
    assert not info.valid and reason in info.reason


def test_bad_sni_is_invalid() -> None:
    name = b"bad\x00name"
    entry = b"\x00" + struct.pack("!H", len(name)) + name
    sni = struct.pack("!H", len(entry)) + entry
    # Replace the hello's SNI by appending a second server_name: a duplicate is invalid too.
    info = parse_client_hello(with_extensions(NO_SNI, [(0, sni)]))
    assert not info.valid and "control characters" in info.reason
    info = parse_client_hello(with_extensions(HELLO, [(0, sni)]))
    assert not info.valid and "duplicate" in info.reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_never_raises(data: bytes) -> None:
    info = parse_client_hello(data)
    assert info.complete + info.incomplete + (not info.valid) == 1
    parse_ip_tcp(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.sampled_from([b"", b"\x14\x03\x03\x00\x01\x01"]))
def test_second_flight_garbage_never_raises(data: bytes, ccs: bytes) -> None:
    for stream in (ccs + data, ccs + HELLO[:100] + data, ccs + HELLO + data):
        info = parse_second_flight(stream)
        assert info.complete + info.incomplete + (not info.valid) == 1
    assert parse_second_flight(ccs + HELLO).sni == "www.example.com"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_hellos_never_raise(data: st.DataObject) -> None:
    buf = bytearray(data.draw(st.sampled_from([HELLO, BIG, NO_SNI])))
    for _ in range(data.draw(st.integers(1, 8))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    parse_client_hello(bytes(buf[:cut]))
    a = ClientHelloAssembler(data.draw(st.one_of(st.none(), st.integers(0, (1 << 32) - 1))))
    for _ in range(data.draw(st.integers(1, 6))):
        off = data.draw(st.integers(0, len(buf)))
        a.add(data.draw(st.integers(0, (1 << 32) - 1)), bytes(buf[off : off + 700]))


# -- IP/TCP headers ----------------------------------------------------------------------------


def tcp_header(sport: int, dport: int, seq: int, flags: int, options: bytes = b"") -> bytes:
    doff = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, doff << 4, flags, 65535, 0, 0) + options


def ipv4(payload: bytes, proto: int = 6, frag: int = 0, options: bytes = b"") -> bytes:
    ihl = (20 + len(options)) // 4
    src, dst = socket.inet_aton("10.0.0.2"), socket.inet_aton("192.0.2.7")
    total = 20 + len(options) + len(payload)
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, frag, 64, proto, 0, src, dst)
    return head + options + payload


def ipv6(payload: bytes, nh: int = 6, ext: bytes = b"") -> bytes:
    src = socket.inet_pton(socket.AF_INET6, "fd00::2")
    dst = socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    return (
        struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(payload), nh, 64, src, dst)
        + ext
        + payload
    )


def test_ipv4_tcp() -> None:
    seg = tcp_header(40000, 443, 123456, 0x18, b"\x01\x01\x08\x0a" + bytes(8)) + HELLO
    packet = ipv4(seg, options=b"\x01\x01\x01\x00")  # NOP options: IHL 6
    got = parse_ip_tcp(packet + b"\x00\x00")  # trailing padding is cut by total length
    assert got is not None
    assert (got.src, got.dst, got.sport, got.dport, got.seq, got.flags) == (
        "10.0.0.2", "192.0.2.7", 40000, 443, 123456, 0x18,
    )  # fmt: skip
    assert got.payload == HELLO
    ref = dpkt.ip.IP(packet)
    assert ref.data.data == got.payload and ref.data.seq == got.seq


def test_ipv6_tcp_with_extension_headers() -> None:
    seg = tcp_header(40000, 443, 7, 0x02)
    hop = bytes([60, 0]) + bytes(6)  # hop-by-hop, next: destination options
    dst = bytes([44, 0]) + bytes(6)  # destination options, next: fragment
    frag = bytes([6, 0, 0, 0]) + bytes(4)  # atomic fragment (offset 0, M=0)
    got = parse_ip_tcp(ipv6(seg, nh=0, ext=hop + dst + frag))
    assert got is not None and got.src == "fd00::2" and got.dst == "2001:db8::7"
    assert got.flags == 0x02 and got.payload == b""


def test_not_tcp_or_fragments() -> None:
    seg = tcp_header(1, 443, 1, 0x10) + b"x"
    assert parse_ip_tcp(ipv4(seg, proto=17)) is None
    assert parse_ip_tcp(ipv4(seg, frag=0x2000)) is None  # MF
    assert parse_ip_tcp(ipv4(seg, frag=5)) is None  # offset
    assert parse_ip_tcp(ipv6(seg, nh=44, ext=bytes([6, 0, 0, 9]) + bytes(4))) is None
    assert parse_ip_tcp(ipv4(seg)[:30]) is None  # TCP header cut
    assert parse_ip_tcp(b"\x50" + bytes(40)) is None


def test_header_parse_speed() -> None:
    packet = ipv4(tcp_header(40000, 443, 1, 0x18) + HELLO)
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        parse_ip_tcp(packet)
    per = (time.perf_counter() - start) / n
    print(f"parse_ip_tcp: {per * 1e6:.2f} µs/packet")
    start = time.perf_counter()
    for _ in range(2000):
        parse_client_hello(HELLO)
    print(f"parse_client_hello: {(time.perf_counter() - start) / 2000 * 1e6:.2f} µs")
    assert per < 50e-6  # generous: the goal (≈1 µs) belongs to the bench
