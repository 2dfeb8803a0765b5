"""Fuzzing tproxy.tls: ClientHello parsing, segment reassembly and IP/TCP header parsing never
raise and keep their documented contract on any bytes.

Like tests/test_fuzz_http1.py, one harness (:func:`one_input`) is driven by hypothesis, by the
seed corpus ``tests/fuzz_corpus/tls/`` (each file a test case) and by atheris
(``scripts/fuzz tls``). Input encoding: byte 0 is a mode, byte 1 a seed, the rest the data.

    mode & 3 == 0   parse_client_hello(data)
    mode & 3 == 1   ClientHelloAssembler over data cut into segments (seed: cuts and order);
                    bit 2: ISN known up front; bit 3: SYN seen only midway; bit 4: retransmits
    mode & 3 == 2   parse_ip_tcp(data)
    mode & 3 == 3   parse_ip_tcp(data), then its payload through parse_client_hello
"""

from __future__ import annotations

import itertools
import random
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_util import corpus_files, corpus_params
from tests.test_tls_sni import ipv4, ipv6, real_hello, tcp_header, with_extensions
from tproxy.tls import (
    EXT_ALPN,
    EXT_ECH,
    EXT_SERVER_NAME,
    MAX_HELLO_BYTES,
    MAX_HOSTNAME,
    MAX_SEGMENTS,
    SEQ_MOD,
    ClientHelloAssembler,
    ClientHelloInfo,
    TcpSegment,
    parse_client_hello,
    parse_ip_tcp,
)

CORPUS = Path(__file__).parent / "fuzz_corpus" / "tls"

M_HELLO, M_ASSEMBLE, M_PACKET, M_PACKET_HELLO = 0, 1, 2, 3
M_ISN, M_LATE_SYN, M_RETRANSMIT = 4, 8, 16


class Violation(AssertionError):
    """A documented property does not hold (a finding, not a test bug)."""


def _check(cond: object, what: str) -> None:
    if not cond:
        raise Violation(what[:2000])


def check_info(info: ClientHelloInfo, data: bytes) -> None:
    """The ClientHelloInfo contract (tproxy/tls.py)."""
    _check(isinstance(info, ClientHelloInfo), f"not a ClientHelloInfo: {info!r}")
    _check(info.complete + info.incomplete + (not info.valid) == 1, f"state unclear: {info!r}")
    if not info.valid:
        _check(info.reason, "invalid without a reason")
        _check(info.sni is None and not info.alpn and not info.ech, f"facts on invalid: {info!r}")
    if info.complete:
        _check(0 < info.length <= len(data), f"length {info.length} of {len(data)} bytes")
        sni = info.sni
        if sni is not None:
            _check(0 < len(sni) <= MAX_HOSTNAME, f"sni length {len(sni)}")
            _check(sni.isascii() and sni.isprintable() and " " not in sni, f"sni {sni!r}")
            _check(sni == sni.lower() and not sni.endswith("."), f"sni not normalised {sni!r}")
        _check(all(isinstance(p, str) and p for p in info.alpn), f"alpn {info.alpn!r}")


def hello_case(data: bytes, seed: int) -> ClientHelloInfo:
    info = parse_client_hello(data)
    check_info(info, data)
    rng = random.Random(seed)
    if info.complete:
        # Exactly the first ``length`` bytes matter; every shorter prefix is merely incomplete.
        again = parse_client_hello(data[: info.length])
        _check(again == info, f"prefix of the reported length differs: {again!r} vs {info!r}")
        cut = rng.randrange(info.length)
        short = parse_client_hello(data[:cut])
        _check(short.incomplete, f"prefix of {cut} bytes is not incomplete: {short!r}")
    elif not info.valid:
        # Invalid stays invalid whatever follows: the NFQUEUE path decides early on it.
        tail = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        more = parse_client_hello(data + tail)
        _check(not more.valid, f"invalid {info.reason!r} became valid with more bytes: {more!r}")
    return info


def assemble_case(mode: int, seed: int, stream: bytes, strict: bool = True) -> None:
    rng = random.Random(seed)
    isn = rng.randrange(SEQ_MOD)
    # Segments: the stream cut at random points, delivered in a random order.
    n = len(stream)
    cuts = (
        sorted({rng.randrange(1, n) for _ in range(min(n - 1, rng.randrange(1, 12)))})
        if n > 1
        else []
    )
    bounds = [0, *cuts, n]
    segs = [(a, stream[a:b]) for a, b in itertools.pairwise(bounds) if b > a]
    if mode & M_RETRANSMIT and segs:
        for _ in range(rng.randrange(1, 4)):
            a = rng.randrange(n)
            segs.append((a, stream[a : a + rng.randrange(1, 1500)]))  # repacketised retransmit
    in_order = not rng.randrange(3)
    if not in_order:
        rng.shuffle(segs)
    known = bool(mode & M_ISN)
    late_syn = mode & M_LATE_SYN and not known
    asm = ClientHelloAssembler(isn if known else None)
    result = asm.result
    syn_at = rng.randrange(len(segs) + 1)
    for i, (off, payload) in enumerate(segs):
        if late_syn and i == syn_at:
            asm.syn(isn)
        before_done = asm.done
        prev = asm.result
        result = asm.add((isn + 1 + off) % SEQ_MOD, payload)
        check_info(result, stream)
        if before_done:
            _check(result == prev, "a decided assembler changed its mind")
        _check(len(asm._segments) <= MAX_SEGMENTS, f"{len(asm._segments)} segments stored")
        held = sum(len(d) for d in asm._segments.values())
        _check(held <= MAX_SEGMENTS * MAX_HELLO_BYTES, f"{held} bytes held")
        if strict:
            # add() never stores at or beyond max_bytes; a rebase must not move data there.
            _check(all(0 <= o < MAX_HELLO_BYTES for o in asm._segments), "segment beyond bound")
    whole = parse_client_hello(stream)
    # With the start of the stream known (ISN, or in-order arrival), reassembly must agree with
    # parsing the stream in one piece — as long as the segment budget was not the limit.
    start_known = (
        known or (late_syn and syn_at < len(segs)) or (in_order and not mode & M_RETRANSMIT)
    )
    small = len(segs) < MAX_SEGMENTS and n <= MAX_HELLO_BYTES
    if start_known and small and segs:
        if whole.complete:
            _check(
                result.complete
                and (result.sni, result.alpn, result.ech) == (whole.sni, whole.alpn, whole.ech),
                f"reassembled {result!r} but the stream parses as {whole!r}",
            )
        if result.complete:
            _check(whole.complete and whole.sni == result.sni, f"{result!r} vs whole {whole!r}")


def packet_case(data: bytes, seed: int, then_hello: bool) -> None:
    seg = parse_ip_tcp(data)
    if seg is None:
        return
    _check(isinstance(seg, TcpSegment), f"not a TcpSegment: {seg!r}")
    _check(0 <= seg.sport < 65536 and 0 <= seg.dport < 65536, "port out of range")
    _check(0 <= seg.seq < SEQ_MOD and 0 <= seg.flags < 256, "seq/flags out of range")
    for addr in (seg.src, seg.dst):
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        socket.inet_pton(family, addr)  # raises if not an address
    _check(len(seg.payload) <= len(data) - 40, "payload larger than the packet allows")
    _check(not seg.payload or seg.payload in data, "payload is not part of the packet")
    if then_hello:
        hello_case(seg.payload, seed)


# Known deviations, reported to the lead; the corpus files named here are replayed strictly and
# expected to fail until tproxy/tls.py changes, while the lenient harness tolerates them.
#
# Was: assembler-rebase-beyond-bound: without the SYN, an earlier segment arriving late rebases the
# stream and shifts the stored segments up by as much as max_bytes, so data ends up stored at
# offsets >= max_bytes, where add() itself would refuse it. (Memory stays bounded by
# MAX_SEGMENTS segments; the data is merely useless.) Minimal: ClientHelloAssembler() then
# add(100_000, b"\0" * 10), add(100_000 - MAX_HELLO_BYTES, b"\x16\x03\x01\x00\x05\x01").
# Fixed in tproxy/tls.py (the rebase drops what it pushes past max_bytes); the file stays as a
# regression case, replayed with the strict checks.
KNOWN: dict[str, str] = {}
REGRESSIONS = {"regress-assembler-rebase-beyond-bound.bin"}


def one_input(data: bytes, strict: bool = False) -> None:
    mode = data[0] if data else 0
    seed = data[1] if len(data) > 1 else 0
    rest = data[2:]
    kind = mode & 3
    if kind == M_HELLO:
        hello_case(rest, seed)
    elif kind == M_ASSEMBLE:
        assemble_case(mode, seed, rest, strict)
    else:
        packet_case(rest, seed, kind == M_PACKET_HELLO)


def encode(mode: int, seed: int, data: bytes) -> bytes:
    return bytes((mode, seed)) + data


# -- structured inputs --------------------------------------------------------------------------


def _vec16(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


@st.composite
def extensions(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([EXT_SERVER_NAME, EXT_ALPN, EXT_ECH, 10, 43, 51, 0x0A0A]))
    if kind == EXT_SERVER_NAME:
        names = draw(
            st.lists(
                st.tuples(
                    st.sampled_from([0, 0, 1, 255]),
                    st.one_of(
                        st.from_regex(rb"\A[a-zA-Z0-9.-]{1,40}\Z", fullmatch=True),
                        st.binary(max_size=12),
                        st.just(b"a" * 254),
                    ),
                ),
                max_size=3,
            )
        )
        body = b"".join(bytes([t]) + _vec16(n) for t, n in names)
        body = _vec16(body) if draw(st.booleans()) else body
    elif kind == EXT_ALPN:
        protos = draw(st.lists(st.binary(max_size=10), max_size=4))
        body = _vec16(b"".join(bytes([len(p)]) + p for p in protos))
    else:
        body = draw(st.binary(max_size=40))
    length = len(body) + draw(st.sampled_from([0, 0, 0, 1, -1]))
    return struct.pack("!HH", kind, max(0, length) & 0xFFFF) + body


@st.composite
def hellos(draw: st.DrawFn) -> bytes:
    """ClientHellos built from parts, mostly well-formed, with the occasional bad length."""
    sid = draw(st.binary(max_size=33))
    suites = draw(st.binary(max_size=12))
    comp = draw(st.binary(min_size=1, max_size=3))
    exts = b"".join(draw(st.lists(extensions(), max_size=6)))
    body = b"\x03\x03" + bytes(32) + bytes([len(sid)]) + sid + _vec16(suites)
    body += bytes([len(comp)]) + comp
    if draw(st.booleans()) or exts:
        body += _vec16(exts)
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    records = draw(st.integers(1, 4))
    size = max(1, -(-len(message) // records))
    version = draw(st.sampled_from([b"\x03\x01", b"\x03\x03", b"\x03\x05", b"\x02\x00"]))
    out = b"".join(
        b"\x16" + version + _vec16(message[i : i + size]) for i in range(0, len(message), size)
    )
    return out + draw(st.binary(max_size=8))


HELLO = real_hello("www.example.com", ["h2", "http/1.1"])
BIG = with_extensions(HELLO, [(0x0A0A, bytes(1300))])
REAL = [HELLO, BIG, real_hello(None), with_extensions(HELLO, [], records=3)]

SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.integers(0, 255), st.one_of(hellos(), st.binary(max_size=300)))
def test_hello_contract(seed: int, data: bytes) -> None:
    one_input(encode(M_HELLO, seed, data))


@SETTINGS
@given(st.data())
def test_mutated_real_hellos(data: st.DataObject) -> None:
    buf = bytearray(data.draw(st.sampled_from(REAL)))
    for _ in range(data.draw(st.integers(0, 6))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    mode = data.draw(st.sampled_from([M_HELLO, M_ASSEMBLE]))
    flags = data.draw(st.sampled_from([0, M_ISN, M_LATE_SYN, M_RETRANSMIT, M_ISN | M_RETRANSMIT]))
    one_input(encode(mode | flags, data.draw(st.integers(0, 255)), bytes(buf)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 31), st.integers(0, 255), st.one_of(hellos(), st.sampled_from(REAL)))
def test_assembler_contract(flags: int, seed: int, stream: bytes) -> None:
    one_input(encode(M_ASSEMBLE | (flags & ~3), seed, stream))


@st.composite
def packets(draw: st.DrawFn) -> bytes:
    payload = draw(st.one_of(st.binary(max_size=60), hellos()))
    opts = draw(st.sampled_from([b"", b"\x01\x01\x01\x01", bytes(40)]))
    tcp = tcp_header(
        draw(st.integers(0, 65535)),
        443,
        draw(st.integers(0, SEQ_MOD - 1)),
        draw(st.integers(0, 255)),
        opts,
    )
    if draw(st.booleans()):
        pkt = ipv4(tcp + payload, frag=draw(st.sampled_from([0, 0, 0x2000, 0x0010, 0x4000])))
    else:
        ext = b""
        nh = 6
        for h in draw(st.lists(st.sampled_from([0, 43, 60, 44, 51]), max_size=4)):
            if h == 51:  # AH: length in 4-octet units minus 2 (RFC 4302 §2.2)
                ext = bytes([nh, 1]) + bytes(10) + ext
            elif h == 44:
                ext = (
                    bytes([nh, 0])
                    + draw(st.sampled_from([b"\x00\x00", b"\x00\x01"]))
                    + bytes(4)
                    + ext
                )
            else:
                ext = bytes([nh, 0]) + bytes(6) + ext
            nh = h
        pkt = ipv6(tcp + payload, nh=nh, ext=ext)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(pkt)))
        pkt = pkt[:cut]
    return pkt


@SETTINGS
@given(st.integers(0, 255), st.one_of(packets(), st.binary(max_size=120)))
def test_packet_contract(seed: int, pkt: bytes) -> None:
    one_input(encode(M_PACKET_HELLO, seed, pkt))


def test_well_formed_packet_round_trip() -> None:
    tcp = tcp_header(40000, 443, 12345, 0x18, b"\x01\x01\x01\x01")
    for pkt, src in ((ipv4(tcp + HELLO), "10.0.0.2"), (ipv6(tcp + HELLO), "fd00::2")):
        seg = parse_ip_tcp(pkt)
        assert seg is not None and seg.src == src and seg.payload == HELLO
        one_input(encode(M_PACKET_HELLO, 1, pkt))


# -- corpus ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", corpus_params(CORPUS, KNOWN, Violation), ids=lambda p: p.name)
def test_corpus(path: Path) -> None:
    one_input(path.read_bytes(), strict=path.name in KNOWN or path.name in REGRESSIONS)


def test_assembler_rebase_stays_within_bound() -> None:
    """A late earlier segment rebases the stream; nothing is kept at offsets >= max_bytes."""
    a = ClientHelloAssembler()
    a.add(100_000, bytes(10))
    info = a.add(100_000 - MAX_HELLO_BYTES, b"\x16\x03\x01\x00\x05\x01")
    assert info.incomplete and len(a._segments) <= MAX_SEGMENTS
    assert all(off < MAX_HELLO_BYTES for off in a._segments), sorted(a._segments)


def test_corpus_is_there() -> None:
    assert len(corpus_files(CORPUS)) >= 10


def test_oracle_can_fail() -> None:
    with pytest.raises(Violation):
        check_info(ClientHelloInfo(complete=True, incomplete=True), b"")
    with pytest.raises(Violation):
        check_info(ClientHelloInfo(sni="Upper.Example", complete=True, length=1), b"x")
