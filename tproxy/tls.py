"""TLS ClientHello parsing (SNI, ALPN, ECH) and reassembly from the first TCP segments of a flow.

Pure code for the NFQUEUE path: packets in, facts out. Nothing here decrypts anything — the
ClientHello is sent in the clear (RFC 8446 §4.1.2) and its ``server_name`` extension (RFC 6066
§3) names the server the client wants, unless the hello is encrypted (ECH,
draft-ietf-tls-esni / RFC 9849, extension 0xfe0d), in which case the visible name is only the
provider's public name.

Why not dpkt.ssl for the message itself: ``dpkt.ssl.TLSClientHello`` does not check that the
length-prefixed arrays fit the buffer (it silently truncates them), skips extension blocks
shorter than six bytes, builds an object per cipher suite (tens of µs per hello) and raises a
mix of ``NeedData``/``struct.error``/``AssertionError`` on bad input. On a path that must never
raise on attacker-controlled bytes we walk the structure ourselves with explicit bounds checks;
the tests cross-check the result against dpkt on real ClientHellos. Likewise IP/TCP headers
are read with ``struct`` (0.27 µs vs 5.4 µs with dpkt, DESIGN.md §3).

A ClientHello with a post-quantum key share (X25519MLKEM768: a 1216-byte share) no longer
fits one segment, so :class:`ClientHelloAssembler` collects segments by sequence number —
out of order and retransmitted ones included — until the whole handshake message is there.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple

# RFC 8446 §5.1 ContentType.handshake / §4 HandshakeType.client_hello.
CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
RECORD_HEADER_LEN = 5
HANDSHAKE_HEADER_LEN = 4
# RFC 8446 §5.1: a TLSPlaintext fragment MUST NOT exceed 2^14 bytes.
MAX_RECORD_PAYLOAD = 1 << 14
# Bound on what we buffer per flow. Real ClientHellos are 0.5–2 KiB (with a PQ key share);
# anything above 16 KiB is either abuse or something we would not parse in time anyway.
MAX_HELLO_BYTES = 16 * 1024
# Bound on stored segments per flow (retransmits of tiny segments must not grow a list).
MAX_SEGMENTS = 64
# Extension types (IANA "TLS ExtensionType Values").
EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43
EXT_ECH = 0xFE0D
SNI_HOST_NAME = 0  # RFC 6066 §3 NameType.host_name
MAX_HOSTNAME = 253
TLS13 = 0x0304  # RFC 8446 §4.2.1 supported_versions value
# RFC 8446 §5.1 ContentType.change_cipher_spec: TLS 1.3 clients in middlebox compatibility mode
# send one dummy record {20, 3.3, length 1, value 1} before their second flight (Appendix D.4).
CONTENT_CHANGE_CIPHER_SPEC = 20
CONTENT_ALERT = 21
CONTENT_APPLICATION_DATA = 23
ALERT_RECORD_LEN = RECORD_HEADER_LEN + 2
ALERT_LEVEL_WARNING = 1
CCS_RECORD_LEN = RECORD_HEADER_LEN + 1

_U16 = struct.Struct("!H")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBB")
_IPV6 = struct.Struct("!IHBB16s16s")
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
# IPv6 extension headers we can step over to reach TCP (RFC 8200 §4).
_V6_HOP, _V6_ROUTING, _V6_FRAGMENT, _V6_DSTOPTS, _V6_AH = 0, 43, 44, 60, 51
MAX_V6_EXT_HEADERS = 8
PROTO_TCP = 6


@dataclass(frozen=True)
class ClientHelloInfo:
    """What the first bytes of a TLS stream tell us.

    Exactly one of: ``complete`` (a whole, well-formed ClientHello: sni/alpn/ech are
    meaningful), ``incomplete`` (a valid prefix; more bytes needed), or neither — invalid, with
    ``reason``.
    """

    sni: str | None = None
    ech: bool = False
    alpn: tuple[str, ...] = ()
    complete: bool = False
    incomplete: bool = False
    reason: str = ""
    # Bytes of the stream that hold the ClientHello records (0 while unknown).
    length: int = 0
    # The hello offers TLS 1.3 (supported_versions, RFC 8446 §4.2.1): only then can the server
    # answer with a HelloRetryRequest, after which a second ClientHello follows (§4.1.4).
    tls13: bool = False
    # Two segments carried different bytes for the same place in the stream (invalid then).
    conflict: bool = False

    @property
    def valid(self) -> bool:
        return self.complete or self.incomplete


def _invalid(reason: str) -> ClientHelloInfo:
    return ClientHelloInfo(reason=reason)


def _incomplete(reason: str, length: int = 0) -> ClientHelloInfo:
    return ClientHelloInfo(incomplete=True, reason=reason, length=length)


class _Bad(Exception):
    """Internal: malformed ClientHello body (never escapes this module)."""


def _handshake_bytes(data: bytes) -> tuple[bytes, int, bool] | ClientHelloInfo:
    """Join handshake record payloads until the ClientHello message is whole.

    Returns ``(message, stream length used, complete)`` or an invalid result. RFC 8446 §5.1
    lets a handshake message span several records, so we cannot assume one record.
    """
    message = bytearray()
    offset = 0
    need: int | None = None  # full handshake message length, once the header is seen
    while True:
        if need is not None and len(message) >= need:
            return bytes(message[:need]), offset, True
        if len(data) - offset < RECORD_HEADER_LEN:
            return bytes(message), offset, False
        ctype, major, minor = data[offset], data[offset + 1], data[offset + 2]
        (rlen,) = _U16.unpack_from(data, offset + 3)
        if ctype != CONTENT_HANDSHAKE:
            if offset == 0:
                return _invalid(f"not a TLS handshake record (first byte {ctype:#04x})")
            return _invalid(f"record of type {ctype} inside the ClientHello")
        if major != 3 or minor > 4:
            return _invalid(f"unknown record version {major}.{minor}")
        if rlen == 0 or rlen > MAX_RECORD_PAYLOAD:
            return _invalid(f"record length {rlen} out of range")
        body_start = offset + RECORD_HEADER_LEN
        chunk = data[body_start : body_start + rlen]
        message += chunk
        if need is None and len(message) >= HANDSHAKE_HEADER_LEN:
            if message[0] != HANDSHAKE_CLIENT_HELLO:
                return _invalid(f"handshake type {message[0]} is not ClientHello")
            need = HANDSHAKE_HEADER_LEN + int.from_bytes(message[1:4], "big")
            if need > MAX_HELLO_BYTES:
                return _invalid(f"ClientHello of {need} bytes exceeds {MAX_HELLO_BYTES}")
        if len(chunk) < rlen:
            # Truncated record: report how long the stream must be if we know it.
            return bytes(message), body_start + rlen, False
        offset = body_start + rlen


def _extensions(body: bytes, partial: bool = False) -> Iterator[tuple[int, bytes]]:
    """(type, data) of each extension of a ClientHello body (RFC 8446 §4.1.2, §4.2); raises
    _Bad. ``partial``: the body may be cut short; the extensions that are whole are given."""
    end = len(body)
    pos = 2 + 32  # legacy_version, random
    if pos + 1 > end:
        raise _Bad("truncated before session id")
    pos += 1 + body[pos]  # legacy_session_id <0..32>
    if pos + 2 > end:
        raise _Bad("truncated before cipher suites")
    (n,) = _U16.unpack_from(body, pos)
    if n == 0 or n % 2:
        raise _Bad(f"cipher suites length {n} invalid")
    pos += 2 + n
    if pos + 1 > end:
        raise _Bad("truncated before compression methods")
    pos += 1 + body[pos]
    if pos > end:
        raise _Bad("truncated in compression methods")
    if pos == end:
        return  # no extensions at all (old TLS 1.0-1.2 clients)
    if pos + 2 > end:
        raise _Bad("truncated extensions length")
    (n,) = _U16.unpack_from(body, pos)
    pos += 2
    if pos + n != end and not partial:
        raise _Bad("extensions length does not match the message")
    seen: set[int] = set()
    while pos < end:
        if pos + 4 > end:
            raise _Bad("truncated extension header")
        etype, elen = _U16.unpack_from(body, pos)[0], _U16.unpack_from(body, pos + 2)[0]
        pos += 4
        if pos + elen > end:
            raise _Bad(f"extension {etype} overruns the message")
        if etype in seen:  # RFC 8446 §4.2: at most one extension of each type
            raise _Bad(f"duplicate extension {etype}")
        seen.add(etype)
        yield etype, body[pos : pos + elen]
        pos += elen


def _parse_body(body: bytes) -> tuple[str | None, bool, tuple[str, ...], bool]:
    """(sni, ech, alpn, tls13) from a ClientHello body (RFC 8446 §4.1.2); raises _Bad."""
    sni: str | None = None
    ech = False
    tls13 = False
    alpn: tuple[str, ...] = ()
    for etype, ext in _extensions(body):
        if etype == EXT_SERVER_NAME:
            sni = _parse_sni(ext)
        elif etype == EXT_ALPN:
            alpn = _parse_alpn(ext)
        elif etype == EXT_ECH:
            ech = True
        elif etype == EXT_SUPPORTED_VERSIONS:
            tls13 = _offers_tls13(ext)
    return sni, ech, alpn, tls13


def _offers_tls13(ext: bytes) -> bool:
    """ClientHello supported_versions: ``ProtocolVersion versions<2..254>`` (RFC 8446 §4.2.1).

    A malformed list answers False rather than invalidating the hello: the name still decides,
    only the watch for a second ClientHello is skipped (a server would refuse such a hello)."""
    if not ext or ext[0] + 1 != len(ext) or ext[0] % 2:
        return False
    return any(_U16.unpack_from(ext, pos)[0] == TLS13 for pos in range(1, len(ext), 2))


def _parse_sni(ext: bytes) -> str | None:
    """First host_name of a ServerNameList (RFC 6066 §3); raises _Bad when malformed."""
    if len(ext) == 0:
        # A server's empty server_name echo; a client must not send it, but it names nothing.
        return None
    if len(ext) < 2:
        raise _Bad("truncated server_name list")
    (n,) = _U16.unpack_from(ext, 0)
    if n + 2 != len(ext):
        raise _Bad("server_name list length mismatch")
    pos = 2
    while pos < len(ext):
        if pos + 3 > len(ext):
            raise _Bad("truncated server_name entry")
        kind = ext[pos]
        (m,) = _U16.unpack_from(ext, pos + 1)
        pos += 3
        if pos + m > len(ext):
            raise _Bad("server_name entry overruns the list")
        if kind == SNI_HOST_NAME:
            raw = ext[pos : pos + m]
            if not raw or len(raw) > MAX_HOSTNAME:
                raise _Bad(f"host_name of {len(raw)} bytes")
            try:
                name = raw.decode("ascii")
            except UnicodeDecodeError:
                raise _Bad("host_name is not ASCII (RFC 6066 §3)") from None
            if not name.isprintable() or " " in name:
                raise _Bad("host_name has control characters or spaces")
            return name.lower().rstrip(".") or None
        pos += m
    return None


def _parse_alpn(ext: bytes) -> tuple[str, ...]:
    """ProtocolNameList (RFC 7301 §3.1)."""
    if len(ext) < 2:
        raise _Bad("truncated ALPN list")
    (n,) = _U16.unpack_from(ext, 0)
    if n + 2 != len(ext):
        raise _Bad("ALPN list length mismatch")
    out: list[str] = []
    pos = 2
    while pos < len(ext):
        m = ext[pos]
        pos += 1
        if m == 0 or pos + m > len(ext):
            raise _Bad("bad ALPN protocol name length")
        out.append(ext[pos : pos + m].decode("latin-1"))
        pos += m
    return tuple(out)


def parse_client_hello(data: bytes) -> ClientHelloInfo:
    """Parse the start of a TLS client stream. Never raises, whatever the input."""
    try:
        joined = _handshake_bytes(data)
        if isinstance(joined, ClientHelloInfo):
            return joined
        message, length, whole = joined
        if not whole:
            return _incomplete("need more data", length)
        sni, ech, alpn, tls13 = _parse_body(message[HANDSHAKE_HEADER_LEN:])
        return ClientHelloInfo(
            sni=sni, ech=ech, alpn=alpn, complete=True, length=length, tls13=tls13
        )
    except _Bad as exc:
        return _invalid(str(exc))
    except (IndexError, ValueError, struct.error) as exc:  # defensive: a bounds bug
        return _invalid(f"malformed: {exc}")


def leading_ccs(data: bytes) -> int:
    """Bytes of the whole change_cipher_spec records ``data`` starts with (-1: a malformed
    one). Every one is stepped over, not just the first: a peer that tolerates several must
    not let them hide what follows."""
    pos = 0
    while data[pos : pos + 1] == bytes([CONTENT_CHANGE_CIPHER_SPEC]):
        record = data[pos : pos + CCS_RECORD_LEN]
        if len(record) < CCS_RECORD_LEN:
            break
        if record[1] != 3 or record[3:] != b"\x00\x01\x01":
            return -1
        pos += CCS_RECORD_LEN
    return pos


def leading_skipped(data: bytes) -> int:
    """Bytes of the records a peer may step over before a second ClientHello that ``data``
    starts with: change_cipher_spec records (leading_ccs) and warning-level alerts - TLS 1.3
    stacks (OpenSSL, Go, BoringSSL, NSS, rustls) ignore a user_canceled warning, so one must
    not hide the hello behind it. -1: a malformed one."""
    pos = 0
    while True:
        ccs = leading_ccs(data[pos:])
        if ccs < 0:
            return -1
        pos += ccs
        record = data[pos : pos + ALERT_RECORD_LEN]
        if record[:1] != bytes([CONTENT_ALERT]) or len(record) < ALERT_RECORD_LEN:
            return pos
        if record[1] != 3 or record[3:5] != b"\x00\x02" or record[5] != ALERT_LEVEL_WARNING:
            return pos  # a fatal alert ends the handshake: nothing follows to judge
        pos += ALERT_RECORD_LEN


def parse_second_flight(data: bytes) -> ClientHelloInfo:
    """Parse what a client sent after its first ClientHello. Never raises.

    ``complete``: a second ClientHello — the answer to a HelloRetryRequest (RFC 8446 §4.1.4),
    which must repeat the first hello's server_name (§4.1.2: the client "MUST send the same
    ClientHello without modification", except key_share, early_data, cookie, pre_shared_key
    and padding). ``incomplete``: more bytes needed to tell. Invalid (``reason``): anything
    else, i.e. the handshake went on without a retry — a TLS 1.3 client's encrypted flight
    (application_data records), a TLS 1.2 ClientKeyExchange, early data.

    A leading dummy change_cipher_spec record (middlebox compatibility mode, Appendix D.4) is
    stepped over: the client may send it "before its second ClientHello"; so are warning
    alerts, which servers ignore (leading_skipped).
    """
    skip = leading_skipped(data)
    if skip < 0:
        return _invalid("malformed change_cipher_spec record")
    if data[skip : skip + 1] == bytes([CONTENT_CHANGE_CIPHER_SPEC]):
        return _incomplete("change_cipher_spec record cut short")
    if data[skip : skip + 1] == bytes([CONTENT_ALERT]) and len(data) - skip < ALERT_RECORD_LEN:
        return _incomplete("alert record cut short")
    rest = data[skip:]
    if not rest:
        return _incomplete("nothing after change_cipher_spec yet")
    if rest[0] != CONTENT_HANDSHAKE:
        return _invalid(f"record type {rest[0]} after the ClientHello: no second ClientHello")
    if len(rest) <= RECORD_HEADER_LEN:
        return _incomplete("handshake record header only")
    if rest[RECORD_HEADER_LEN] != HANDSHAKE_CLIENT_HELLO:
        return _invalid(f"handshake type {rest[RECORD_HEADER_LEN]} is not a second ClientHello")
    info = parse_client_hello(rest)
    if info.length:
        info = replace(info, length=info.length + skip)
    return info


# RFC 8446 §4.1.3: a HelloRetryRequest is a ServerHello whose random is SHA-256 of the string
# "HelloRetryRequest".
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
HANDSHAKE_SERVER_HELLO = 2
# Bytes of the server's stream that tell a ServerHello from a HelloRetryRequest: record header
# (5), handshake header (4), legacy_version (2), random (32).
SERVER_HEAD_LEN = RECORD_HEADER_LEN + 4 + 2 + 32


def server_answer(head: bytes) -> str | None:
    """What the first bytes of a server's stream say about the ClientHello it received:
    "retry" (a HelloRetryRequest: a second ClientHello follows, RFC 8446 §4.1.4), "answer"
    (anything else: a ServerHello, an alert, not TLS at all) or None (too few bytes yet)."""
    if not head:
        return None
    if head[0] != CONTENT_HANDSHAKE:
        return "answer"
    if len(head) <= RECORD_HEADER_LEN:
        return None
    if head[RECORD_HEADER_LEN] != HANDSHAKE_SERVER_HELLO:
        return "answer"
    if len(head) < SERVER_HEAD_LEN:
        return None
    return "retry" if head[SERVER_HEAD_LEN - 32 : SERVER_HEAD_LEN] == HRR_RANDOM else "answer"


def sni_from_prefix(data: bytes) -> str | None:
    """The server name of a ClientHello of which only the first bytes are here, when its
    server_name extension is among them (else None; never raises).

    For a hello cut into more TCP segments than the kernel queues: evasion tools split hellos
    into many small segments, and a name that has arrived must decide rather than the
    no-name default. Records may be truncated; every extension before server_name must be
    whole (we walk them by their lengths, RFC 8446 §4.2).
    """
    try:
        joined = _handshake_bytes(data)
        if isinstance(joined, ClientHelloInfo):
            return None
        message = joined[0]
        if len(message) < HANDSHAKE_HEADER_LEN or message[0] != HANDSHAKE_CLIENT_HELLO:
            return None
        for etype, ext in _extensions(message[HANDSHAKE_HEADER_LEN:], partial=True):
            if etype == EXT_SERVER_NAME:
                return _parse_sni(ext)
        return None
    except (_Bad, IndexError, ValueError, struct.error):
        return None


# -- TCP reassembly ---------------------------------------------------------------------------

SEQ_MOD = 1 << 32


def _seq_diff(a: int, b: int) -> int:
    """a - b in 32-bit sequence space, as a signed value (RFC 9293 §3.4 comparisons)."""
    d = (a - b) % SEQ_MOD
    return d - SEQ_MOD if d >= SEQ_MOD // 2 else d


def looks_like_hello_start(data: bytes) -> bool:
    """A handshake record header (type 22, version 3.0-3.4) followed by ClientHello type."""
    return (
        len(data) >= 6
        and data[0] == CONTENT_HANDSHAKE
        and data[1] == 3
        and data[2] <= 4
        and data[5] == HANDSHAKE_CLIENT_HELLO
    )


class ClientHelloAssembler:
    """Collects the client's first TCP payloads of one flow until the ClientHello is whole.

    Give it the SYN's sequence number when the SYN was seen (``isn``); the first payload byte is
    ``isn + 1``. Without it the lowest sequence number seen so far is taken as the start, and a
    stream whose start does not look like a TLS record is reported as incomplete (the first
    segment may still be on its way) — the caller's packet budget ends the wait.
    """

    def __init__(
        self,
        isn: int | None = None,
        max_bytes: int = MAX_HELLO_BYTES,
        parse: Callable[[bytes], ClientHelloInfo] = parse_client_hello,
    ) -> None:
        self.max_bytes = max_bytes
        # parse_client_hello for a flow's first bytes; parse_second_flight for what follows
        # the first ClientHello (isn = the sequence number of its last byte).
        self.parse = parse
        self._base: int | None = (isn + 1) % SEQ_MOD if isn is not None else None
        self._known_start = isn is not None
        self._segments: dict[int, bytes] = {}  # offset from base -> payload
        self.judged = b""  # once decided: what the verdict was given on (repeats)
        self.first = b""  # the stream's first byte, once decided (incomplete: contiguous())
        self._result = _incomplete("no data yet")

    @property
    def result(self) -> ClientHelloInfo:
        return self._result

    @property
    def done(self) -> bool:
        return not self._result.incomplete

    @property
    def start(self) -> int | None:
        """Sequence number of the stream's first byte (None before any segment)."""
        return self._base

    def syn(self, seq: int) -> None:
        """Record the SYN's sequence number (may arrive after data when reordered)."""
        start = (seq + 1) % SEQ_MOD
        if self._base is not None and self._base != start:
            shift = _seq_diff(self._base, start)
            self._segments = {off + shift: data for off, data in self._segments.items()}
        self._base = start
        self._known_start = True
        self._segments = {o: d for o, d in self._segments.items() if o >= 0}

    def add(self, seq: int, payload: bytes) -> ClientHelloInfo:
        """Add one segment's payload; returns the current state (complete/incomplete/invalid)."""
        if self.done or not payload:
            return self._result
        seq %= SEQ_MOD
        if self._base is None:
            self._base = seq
        offset = _seq_diff(seq, self._base)
        if offset < 0:
            if self._known_start:
                # Bytes before the stream start (a bogus segment): keep what lies after it.
                payload = payload[-offset:]
                offset = 0
                if not payload:
                    return self._result
            elif -offset <= self.max_bytes:
                # An earlier segment arrived late: it becomes the start.
                shift = -offset
                # Keep the bound: data pushed past max_bytes by the new start is dropped.
                self._segments = {
                    o + shift: d[: self.max_bytes - o - shift]
                    for o, d in self._segments.items()
                    if o + shift < self.max_bytes
                }
                self._base = seq
                offset = 0
            else:
                return self._result
        if offset >= self.max_bytes:
            return self._result
        payload = payload[: self.max_bytes - offset]
        if self._conflicts(offset, payload):
            # A real TCP sender repeats the same bytes. Different ones for one place are read
            # differently by different stacks (the first copy or the last; RFC 9293 leaves it
            # open), so the server may see another hello than the one judged here.
            self._segments = {}
            self._result = ClientHelloInfo(
                reason="segments with different bytes for the same place in the stream",
                conflict=True,
            )
            return self._result
        old = self._segments.get(offset)
        if old is None or len(payload) > len(old):
            if old is None and len(self._segments) >= MAX_SEGMENTS:
                self._result = _invalid(f"more than {MAX_SEGMENTS} segments before a ClientHello")
                return self._result
            self._segments[offset] = payload
        self._result = self._evaluate()
        return self._result

    def _conflicts(self, offset: int, payload: bytes) -> bool:
        return any(_differ(off, data, offset, payload) for off, data in self._segments.items())

    def repeats(self, seq: int, payload: bytes) -> bool:
        """Whether a segment arriving once the hello was whole repeats the judged bytes it
        overlaps. Another hello there is what the server may keep if it never got the first
        (one sent to die past this router, or to be refused for its TCP options or an old
        timestamp: a known DPI evasion)."""
        if self._base is None or not self.judged:
            return True
        return not _differ(0, self.judged, _seq_diff(seq % SEQ_MOD, self._base), payload)

    def contiguous(self) -> bytes:
        """The stream bytes from the start up to the first gap."""
        out = bytearray()
        for off in sorted(self._segments):
            if off > len(out):
                break
            data = self._segments[off]
            if off + len(data) > len(out):
                out += data[len(out) - off :]
        return bytes(out)

    def _evaluate(self) -> ClientHelloInfo:
        data = self.contiguous()
        if not data:
            return _incomplete("waiting for the first segment")
        info = self.parse(data)
        if info.incomplete and len(data) >= self.max_bytes:
            return _invalid(f"no complete ClientHello within {self.max_bytes} bytes")
        if not info.valid and not self._known_start and not looks_like_hello_start(data):
            # Maybe a middle segment arrived first; the real start may still come.
            return _incomplete(f"start of stream unknown ({info.reason})")
        if not info.incomplete:
            self.first = data[:1]  # what the stream starts with, kept for the verdict
            self._segments = {}  # decided: the payloads are no longer needed
            # What the verdict is given on: the whole hello, or the bytes that are none.
            self.judged = data[: info.length] if info.complete else data
        return info


def _differ(off: int, data: bytes, offset: int, payload: bytes) -> bool:
    """Whether two pieces of one stream, at offsets ``off`` and ``offset``, disagree where
    they overlap."""
    lo, hi = max(off, offset), min(off + len(data), offset + len(payload))
    return lo < hi and data[lo - off : hi - off] != payload[lo - offset : hi - offset]


# -- raw IP/TCP -------------------------------------------------------------------------------


class TcpSegment(NamedTuple):
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    flags: int
    payload: bytes
    # IPv4 TTL / IPv6 hop limit as received: a forwarded packet with 1 or less dies here.
    ttl: int = 64
    # The timestamp option's TSval (RFC 7323 §3), None without one.
    tsval: int | None = None
    # Whether it carries a TCP MD5 signature (RFC 2385) or TCP-AO (RFC 5925) option.
    signed: bool = False
    ack: int = 0  # the acknowledgment number (meaningful with the ACK flag)
    # IPv6: a hop-by-hop or destination option that a node not knowing it must discard the
    # packet for (RFC 8200 §4.2, action bits other than 00); IPv4: any IP option (see
    # parse_ip_tcp).
    discard_option: bool = False


TCPOPT_EOL, TCPOPT_NOP, TCPOPT_TIMESTAMP, TCPOPT_MD5SIG, TCPOPT_AO = 0, 1, 8, 19, 29


def tcp_options(opts: bytes) -> tuple[int | None, bool]:
    """(TSval, signed) from a TCP header's options (RFC 9293 §3.1: kind, length, data; EOL
    and NOP are one byte). A malformed length ends the walk, as it does in Linux's
    tcp_parse_options."""
    tsval: int | None = None
    signed = False
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == TCPOPT_EOL:
            break
        if kind == TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2 or i + opts[i + 1] > len(opts):
            break
        size = opts[i + 1]
        if kind == TCPOPT_TIMESTAMP and size == 10:
            tsval = int.from_bytes(opts[i + 2 : i + 6], "big")
        elif kind in (TCPOPT_MD5SIG, TCPOPT_AO):
            signed = True
        i += size
    return tsval, signed


def _tcp(
    packet: bytes, start: int, end: int, src: str, dst: str, ttl: int, discard: bool = False
) -> TcpSegment | None:
    if end - start < 20:
        return None
    sport, dport, seq, ack, off, flags = _TCP.unpack_from(packet, start)
    doff = (off >> 4) * 4
    if doff < 20 or start + doff > end:
        return None
    tsval, signed = tcp_options(packet[start + 20 : start + doff])
    payload = packet[start + doff : end]
    return TcpSegment(src, dst, sport, dport, seq, flags, payload, ttl, tsval, signed, ack, discard)


def _v6_discard_option(options: bytes) -> bool:
    """Whether a hop-by-hop or destination options header (its option area) holds an option
    whose action bits tell a node that does not know it to discard the packet (RFC 8200
    §4.2): a client's TLS segment has no reason to carry one but to be dropped on its way.
    The two a Linux host may know are no exception: Jumbo Payload (RFC 2675) is invalid in a
    packet that is not one, and Home Address (RFC 6275 §6.3) is dropped without a mobility
    binding."""
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:  # Pad1
            i += 1
            continue
        if kind >> 6:
            return True
        if i + 1 >= len(options):
            return False
        i += 2 + options[i + 1]
    return False


def parse_ip_tcp(packet: bytes) -> TcpSegment | None:
    """IPv4/IPv6 + TCP headers of a raw packet (as NFQUEUE delivers it), or None.

    None for anything that is not a whole TCP segment: other protocols, truncated headers and
    fragments (a non-first fragment has no TCP header; a first one has a partial payload).
    """
    n = len(packet)
    if n < 20:
        return None
    version = packet[0] >> 4
    if version == 4:
        vihl, _tos, total, _ident, frag, ttl, proto, _csum, s, d = _IPV4.unpack_from(packet)
        ihl = (vihl & 0x0F) * 4
        # RFC 791: the MF flag (0x2000) or a fragment offset means this is a fragment.
        if proto != PROTO_TCP or ihl < 20 or frag & 0x3FFF:
            return None
        end = min(n, total)
        if end < ihl:
            return None
        return _tcp(
            packet,
            ihl,
            end,
            socket.inet_ntop(socket.AF_INET, s),
            socket.inet_ntop(socket.AF_INET, d),
            ttl,
            # IPv4 options: no TLS client sends any, and a malformed one makes the receiving
            # stack drop the packet after this router's queue (ip_rcv_finish): a fake's way.
            ihl > 20,
        )
    if version == 6:
        if n < 40:
            return None
        _vtf, plen, nh, hlim, s, d = _IPV6.unpack_from(packet)
        end = min(n, 40 + plen)
        pos = 40
        discard = False
        for _ in range(MAX_V6_EXT_HEADERS):
            if nh == PROTO_TCP:
                return _tcp(
                    packet,
                    pos,
                    end,
                    socket.inet_ntop(socket.AF_INET6, s),
                    socket.inet_ntop(socket.AF_INET6, d),
                    hlim,
                    discard,
                )
            if pos + 8 > end:
                return None
            if nh in (_V6_HOP, _V6_ROUTING, _V6_DSTOPTS):
                hlen = (packet[pos + 1] + 1) * 8
                if nh != _V6_ROUTING:
                    discard = discard or _v6_discard_option(packet[pos + 2 : min(pos + hlen, end)])
                nh = packet[pos]
            elif nh == _V6_FRAGMENT:
                (fo,) = _U16.unpack_from(packet, pos + 2)
                if fo & 0xFFF9:  # offset or M flag (RFC 8200 §4.5): a fragment
                    return None
                nh, hlen = packet[pos], 8
            elif nh == _V6_AH:
                nh, hlen = packet[pos], (packet[pos + 1] + 2) * 4  # RFC 4302 §2.2
            else:
                return None
            pos += hlen
        return None
    return None


def maybe_tcp(packet: bytes) -> bool:
    """Whether a packet parse_ip_tcp could not read may still carry TCP: IPv4 with protocol
    TCP, or IPv6 whose first header is neither UDP nor ICMPv6 (the queue rule only takes TCP,
    but a packet that plainly is something else is not ours to drop)."""
    if len(packet) < 20:
        return False
    version = packet[0] >> 4
    if version == 4:
        return packet[9] == PROTO_TCP
    return version == 6 and len(packet) >= 40 and packet[6] not in (17, 58)
