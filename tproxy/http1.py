"""HTTP/1.1 message framing: bytes in, events out (RFC 9112). No sockets, no asyncio.

The proxy shell owns two parsers per client connection:

* ``RequestParser`` reads what the client sends.  ``feed(data)`` returns events
  ``RequestHead``, ``Body``\\*, ``EndOfMessage``.  After every ``EndOfMessage`` the parser
  **pauses**: later bytes (pipelined requests, or what follows an Upgrade/CONNECT request) are
  buffered, and ``feed`` returns nothing more until the shell calls ``resume()`` (when the
  response to that request is done), which parses the buffered bytes.  This is the h11 model: one
  request in flight per connection, pipelined requests wait in order (RFC 9112 §9.3.2).  If the
  response was a ``101`` (or a 2xx to CONNECT), the shell calls ``into_tunnel()`` instead and
  gets the buffered bytes to relay opaquely.
* ``ResponseParser`` reads what the origin sends.  Before writing each request upstream the
  shell calls ``expect(method, upgrade=...)`` (a FIFO, so pipelining works); a response to HEAD and
  1xx/204/304 responses have no body (RFC 9112 §6.3 items 1-2).  Interim 1xx responses are
  ``Informational`` events; the final one is ``ResponseHead``.  A ``101`` to an upgrade request,
  or a 2xx to CONNECT, is followed by ``Tunnel(rest)``: everything after it is opaque and the
  parser is finished.  ``feed_eof()`` ends a close-delimited body (§6.3 item 8).

Errors are ``ProtocolError(status, reason)`` events; after one the parser is dead (further feeds
return ``[]``) and the shell must close the connection.  Request-side statuses are what the proxy
answers (400, 413, 414, 431, 501, 505); every response-side error has status 502.  A
``ProtocolError`` from the response parser after the ``EndOfMessage`` of the last expected
response (bytes nobody asked for, RFC 9112 §6.3 last paragraph) means the upstream connection is
unusable, not that the delivered response was bad.

Strictness (RFC 9112 §6.3, §11.2 request smuggling).  httptools 0.9 (llhttp 9) is strict by
default, and we feed it one complete head at a time, so it rejects: bare CR/LF in the head,
obs-fold (§5.2), whitespace before the colon (§5.1), CTLs in field names/values, invalid field-name
tokens, malformed or duplicate Content-Length (also ``5, 5`` and two identical lines: RFC 9110 §8.6
lets a recipient reject them, and we do), Content-Length together with Transfer-Encoding, bad URL
characters.  Measured gaps that this module closes itself: extra spaces and HTTP/0.9/2.0 request
lines, unknown methods (llhttp cannot tell them from invalid tokens), CTLs in the reason phrase,
status codes outside 100-599, ``Transfer-Encoding`` other than exactly one ``chunked`` in a
response, duplicate ``chunked`` split over two field lines, TE in HTTP/1.0 (§6.1), missing or
repeated Host (§3.2), request-target forms (§3.2), head size limits (httptools has none), responses
to HEAD (httptools does not know them), and body framing: we decode Content-Length and chunked
bodies ourselves so that message boundaries are exact (pausing, upgrades, pipelining).  Chunk-size
lines are 1-16 hex digits (longer, even with leading zeros, is rejected) with RFC 9112 §7.1.1
extensions, each line ending in CRLF.

Decisions: Transfer-Encoding in a request must be exactly ``chunked`` (case-insensitive): if
chunked is not the final coding the length is unknowable → 400 (§6.3 item 4); other codings
before chunked (``gzip, chunked``) → 501 (§6.1).  A request-line longer than
``Limits.max_request_line`` → 414 (RFC 9112 §3); a head larger than ``max_head_size`` or with more
than ``max_header_count`` fields → 431 (RFC 6585 §5); a body above ``max_body_size`` → 413.
Targets: origin-form, absolute-form (``scheme://``), ``*`` only with OPTIONS; authority-form only
with CONNECT, and CONNECT itself → 501 unless ``Limits.allow_connect`` (then it is reported with
``upgrade=True`` and tunnels if the origin answers 2xx).  Target characters outside RFC 3986
that llhttp accepts (``|``, ``{``, ``"`` ...) are accepted: origins serve them and they do not
affect framing.  Head errors are always the only event of a message (nothing was forwardable);
a body framing error (bad chunk line, 413 on a chunked body) comes after the head and some
``Body`` events, before any ``EndOfMessage``: the shell aborts the forwarded message (close the
upstream connection without a last chunk), so the next hop never sees a complete message.

Forwarding: ``forward_framing(head, peer_version)`` says how the body goes to the next hop —
Content-Length is kept, chunked stays chunked, and a close-delimited response is re-chunked
for an HTTP/1.1 client (so its connection stays persistent) or sent raw followed by a close for
an HTTP/1.0 client, which does not know chunked.  ``serialize_request_head`` /
``serialize_response_head`` write the head with hop-by-hop fields removed (RFC 9110 §7.6.1) and
framing fields matching that decision; bodies go through ``encode_chunk`` /
``encode_last_chunk`` when chunked.  ``sniff`` / ``is_opaque`` classify the first bytes of an
intercepted connection.

Cost: one fresh llhttp parser per head (≈0.15 µs) plus one Python callback per field line; a
1 KiB browser GET parses in ≈7 µs and a 1 KiB response in ≈6 µs on the 2-core dev box.  ``Body``
events reuse the fed ``bytes`` object when a whole feed is body (no copy).
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate

from httptools import (
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserUpgrade,
    HttpRequestParser,
    HttpResponseParser,
)

from tproxy.uri import list_tokens

__all__ = [
    "LAST_CHUNK",
    "MAX_BODY_SIZE",
    "MAX_CHUNK_LINE",
    "MAX_HEADER_COUNT",
    "MAX_HEAD_SIZE",
    "MAX_REQUEST_LINE",
    "Body",
    "BodyKind",
    "EndOfMessage",
    "Event",
    "Framing",
    "Headers",
    "Informational",
    "Limits",
    "ProtocolError",
    "RequestHead",
    "RequestParser",
    "ResponseHead",
    "ResponseParser",
    "Sniff",
    "Tunnel",
    "chunk_pieces",
    "encode_chunk",
    "encode_last_chunk",
    "forward_framing",
    "header_value",
    "is_opaque",
    "origin_form",
    "serialize_request_head",
    "serialize_response_head",
    "sniff",
]

# --------------------------------------------------------------------------- limits

#: Longest request-line / status-line in bytes, without CRLF (RFC 9112 §3 suggests at least
#: 8000 octets); longer request-lines get 414.
MAX_REQUEST_LINE = 8190
#: Largest head (start line + field lines + final CRLF), and also the largest trailer section.
MAX_HEAD_SIZE = 65536
#: Most field lines in a request head or trailer section (431; Apache's LimitRequestFields).
MAX_HEADER_COUNT = 100
#: Most field lines in a response head from an origin (502 beyond). Origins send more than
#: clients (Set-Cookie, Link, security policies); the head's byte limit still bounds the memory.
MAX_RESPONSE_HEADER_COUNT = 256
#: Longest chunk-size line including extensions (RFC 9112 §7.1.1 lets us limit them).
MAX_CHUNK_LINE = 4096
#: Default body limit: none.  The shell may configure one for requests (413).
MAX_BODY_SIZE: int | None = None
#: Longest method token still considered plausible when sniffing a connection's first bytes.
MAX_SNIFF_METHOD = 24


@dataclass(frozen=True, slots=True)
class Limits:
    max_request_line: int = MAX_REQUEST_LINE
    max_head_size: int = MAX_HEAD_SIZE
    max_header_count: int = MAX_HEADER_COUNT
    max_chunk_line: int = MAX_CHUNK_LINE
    max_body_size: int | None = MAX_BODY_SIZE
    #: Accept CONNECT (authority-form) and let the shell tunnel on a 2xx; otherwise 501.
    allow_connect: bool = False


#: What origins get by default (the request defaults, with more room for response fields).
RESPONSE_LIMITS = Limits(max_header_count=MAX_RESPONSE_HEADER_COUNT)


def format_http_date(ts: float) -> bytes:
    """``ts`` as an IMF-fixdate (RFC 9110 §5.6.7), whatever the locale."""
    return formatdate(ts, usegmt=True).encode("ascii")


# --------------------------------------------------------------------------- events

Headers = list[tuple[bytes, bytes]]


# A head's field section as received, so forwarding can copy it instead of rebuilding it:
# (headers, len(headers), raw, special).  ``raw`` is the bytes from the start line's CRLF up to
# (not including) the empty line that ends the head, every field line preceded by CRLF; it is
# kept only when it has the form the serializers write.  ``special`` lists (lower-cased name,
# value) of the framing and hop-by-hop fields present, which forwarding may have to cut.
# ``headers`` is the list object the parser produced: a head whose fields were changed
# (``replace(head, headers=...)``) no longer owns its wire, and the serializers rebuild it.
Wire = tuple[list[tuple[bytes, bytes]], int, bytes, list[tuple[bytes, bytes]]]


class BodyKind(enum.Enum):
    NONE = "none"  # no body (GET, HEAD response, 1xx/204/304)
    LENGTH = "length"  # Content-Length bytes
    CHUNKED = "chunked"  # chunked transfer coding
    CLOSE = "close"  # response delimited by connection close (RFC 9112 §6.3 item 8)


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: bytes
    target: bytes
    version: bytes  # b"1.1" or b"1.0"
    headers: Headers  # names as received, values without surrounding OWS
    keep_alive: bool
    body_kind: BodyKind
    content_length: int | None
    upgrade: bool  # Upgrade + "Connection: upgrade" in HTTP/1.1, or CONNECT
    expect_continue: bool  # "Expect: 100-continue" in HTTP/1.1 (RFC 9110 §10.1.1)
    # The Host field value (None only for HTTP/1.0 without one).  With an absolute-form target
    # the target's authority wins over Host (RFC 9112 §3.2.2): the shell decides.
    host: bytes | None
    connection: frozenset[bytes]  # lower-cased Connection options
    # The received field section, for forwarding without rebuilding (None: always rebuild).
    wire: Wire | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: bytes
    headers: Headers
    keep_alive: bool
    body_kind: BodyKind
    content_length: int | None
    connection: frozenset[bytes]
    wire: Wire | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Informational:
    """An interim 1xx response (RFC 9110 §15.2); 101 is followed by ``Tunnel``."""

    status: int
    reason: bytes
    headers: Headers
    connection: frozenset[bytes]


@dataclass(frozen=True, slots=True)
class Body:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    trailers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Tunnel:
    """The protocol switched (101, or 2xx to CONNECT): ``rest`` and all later bytes are opaque."""

    rest: bytes


@dataclass(frozen=True, slots=True)
class ProtocolError:
    status: int
    reason: str


Event = RequestHead | ResponseHead | Informational | Body | EndOfMessage | Tunnel | ProtocolError

_EOM = EndOfMessage()

# --------------------------------------------------------------------------- grammar

# RFC 9110 §5.6.2 token characters, as a regex class body.
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = rb"[" + _TCHAR + rb"]+"
# RFC 9112 §3: request-line = method SP request-target SP HTTP-version, single spaces.
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])")
_ANY_VERSION = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/[0-9]\.[0-9]")
# RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]; the second SP is
# often missing in the wild and harmless to accept.
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: ([\t \x21-\x7e\x80-\xff]*))?")
# Absolute-form for the schemes an HTTP/1.1 origin serves (RFC 9110 §4.2): a proxy in front of
# port 80 has nothing to do with ftp:// or a made-up scheme, and the filter judges http URLs.
_ABSOLUTE_FORM = re.compile(rb"[Hh][Tt][Tt][Pp][Ss]?://[\x21-\x7e]*")
_AUTHORITY_FORM = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+):[0-9]{1,5}")
# RFC 9110 §7.2: Host = uri-host [ ":" port ]; may be empty.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.vV]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# RFC 9112 §7.1 chunk-size / §7.1.1 chunk-ext; at most 16 hex digits (64-bit sizes).
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*"
    + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + _TOKEN
    + rb"|"
    + _QUOTED
    + rb"))?)*"
)
# RFC 9112 §5: field-line = field-name ":" OWS field-value OWS (used for trailers).
_FIELD_LINE = re.compile(
    rb"(" + _TOKEN + rb"):[ \t]*((?:[\x21-\x7e\x80-\xff](?:[\t \x21-\x7e\x80-\xff]*"
    rb"[\x21-\x7e\x80-\xff])?)?)[ \t]*"
)
_SNIFF_METHOD = re.compile(rb"[" + _TCHAR + rb"]{1,%d}" % MAX_SNIFF_METHOD)
_H2_PREFACE_LINE = b"PRI * HTTP/2.0\r\n"
_SNIFF_TARGET_START = frozenset(b"/*ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

# Field names the parser must interpret (lower-case).
_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
_CONNECTION = b"connection"
_HOST_NAME = b"host"
_EXPECT = b"expect"
_UPGRADE = b"upgrade"
_TRAILER = b"trailer"
# RFC 9110 §7.6.1 hop-by-hop fields (plus the de-facto Proxy-Connection); Transfer-Encoding is
# re-framed by us and TE is meaningful only for this hop.
_HOP_BY_HOP = frozenset(
    {_CONNECTION, b"keep-alive", b"proxy-connection", b"te", _TRANSFER_ENCODING, _UPGRADE}
)
# Fields the parser interprets or forwarding edits; collected (lower-cased) while parsing.
_SPECIAL = _HOP_BY_HOP | {_CONTENT_LENGTH, _HOST_NAME, _EXPECT, _TRAILER}
# Fields a Connection option never removes. RFC 9110 §7.6.1: a sender "MUST NOT send a
# connection option corresponding to a header field that is intended for all recipients of the
# content"; honouring one would forward a body without its Content-Length (the body's bytes then
# read as a second request upstream, or run two responses together: smuggling) or a request
# without its Host. So these are kept whatever Connection says.
_END_TO_END = frozenset({_CONTENT_LENGTH, _HOST_NAME, b"date"})
# A framing error that only matters where a body follows (ResponseParser: §6.3 item 1). (Both
# Content-Length and Transfer-Encoding is refused by llhttp itself, bodiless or not.)
_BOTH_CL_AND_TE = "both Content-Length and Transfer-Encoding"
_TE_IN_HTTP10 = "Transfer-Encoding in HTTP/1.0"
# Connection options that name no field of their own to remove (RFC 9112 §9.6, §9.3).
_PLAIN_OPTIONS = frozenset({b"keep-alive", b"close"})
_NO_TOKENS: frozenset[bytes] = frozenset()
# Connection values nearly every message carries, parsed once (values arrive without OWS).
_COMMON_CONNECTION = {
    v: frozenset((v.lower(),))
    for v in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
}

# Parser states.
_S_HEAD = 0
_S_LENGTH = 1
_S_CHUNK_SIZE = 2
_S_CHUNK_DATA = 3
_S_CHUNK_CRLF = 4
_S_TRAILERS = 5
_S_CLOSE_BODY = 6  # responses only: until EOF
_S_PAUSED = 7  # requests only: after EndOfMessage, until resume()
_S_DEAD = 8  # after ProtocolError or Tunnel

_CR = 0x0D


# --------------------------------------------------------------------------- parsers


class _Parser:
    """Shared buffering, body framing (Content-Length / chunked / close) and head collection."""

    __slots__ = (
        "_body_seen",
        "_buf",
        "_eof",
        "_err",
        "_fields",
        "_limits",
        "_remaining",
        "_scan",
        "_special",
        "_state",
        "_trailer_bytes",
        "_trailers",
    )

    @property
    def length_remaining(self) -> int:
        """Body bytes still due in a Content-Length body (0 in any other state)."""
        return self._remaining if self._state == _S_LENGTH else 0

    def __init__(self, limits: Limits, err: int) -> None:
        self._limits = limits
        self._err = err  # status used for errors: 0 → the specific one (requests), else 502
        self._buf = b""
        self._state = _S_HEAD
        self._remaining = 0
        self._body_seen = 0
        self._scan = 0  # bytes at the head start already searched for CRLFCRLF
        self._fields: Headers = []
        self._special: Headers = []  # (lower-cased name, value) of the fields in _SPECIAL
        self._trailers: list[tuple[bytes, bytes]] = []
        self._trailer_bytes = 0
        self._eof = False

    # httptools callback: the only one we register (the head is all httptools sees).  Kept
    # minimal: it runs once per field line on the hot path.
    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))
        lname = name.lower()
        if lname in _SPECIAL:
            self._special.append((lname, value))

    def _parse_fields(
        self,
        parser: HttpRequestParser | HttpResponseParser,
        buf: bytes,
        pos: int,
        line_end: int,
        end: int,
    ) -> tuple[Headers, str, Wire | None]:
        """Run llhttp over the complete head ``buf[pos:end]`` (start line ends at ``line_end``).

        Returns (fields, error reason or "", the received field section if it is in the form
        the serializers write)."""
        fields: Headers = []
        self._fields = fields
        self._special = []
        try:
            parser.feed_data(buf if pos == 0 and end == len(buf) else memoryview(buf)[pos:end])
        except HttpParserUpgrade:
            pass  # Upgrade/CONNECT/101: decided by the caller, not by llhttp
        except HttpParserInvalidMethodError:
            return fields, "method", None
        except HttpParserError as exc:
            # llhttp pauses (reported as an error, after the last field) on some 101 responses;
            # the response parser decides about those itself.
            reason = str(exc)
            if not (self._err and reason.startswith("Pause on")):
                return fields, reason or "invalid head", None
        count = len(fields)
        if count > self._limits.max_header_count:
            return fields, "too many header fields", None
        if buf.find(b" \r\n", pos, end) >= 0 or buf.find(b"\t\r\n", pos, end) >= 0:
            # llhttp strips leading OWS but keeps trailing OWS (RFC 9112 §5: not in the value).
            fields[:] = [(n, v.rstrip(b" \t")) for n, v in fields]
            self._special = [(n, v.rstrip(b" \t")) for n, v in self._special]
            return fields, "", None
        raw = buf[line_end : end - 4]
        # The serializers write "name: value"; a section with fewer ": " than lines ("name:v",
        # empty values) is rebuilt in that form.  Other spacing after a colon is forwarded as
        # received: the same field (RFC 9112 §5, OWS is optional), and checking it costs more
        # than the rebuild it saves.
        if raw.count(b": ") < count:
            return fields, "", None
        return fields, "", (fields, count, raw, self._special)

    def _error(self, status: int, reason: str) -> ProtocolError:
        self._state = _S_DEAD
        self._buf = b""
        return ProtocolError(self._err or status, reason)

    # -- head boundary ------------------------------------------------------------------
    def _head_end(self, buf: bytes, pos: int, events: list[Event]) -> tuple[int, int]:
        """(index past the head's CRLFCRLF, index of its start line's CRLF); (-1, -1) if the
        head is incomplete or bad (then an error may be in ``events``)."""
        if not self._scan:
            # Fast path: a whole head with a start line within the limit (the usual case).
            lim = self._limits
            end = buf.find(b"\r\n\r\n", pos, pos + lim.max_head_size)
            if end >= 0:
                line_end = buf.find(b"\r\n", pos)
                if line_end - pos <= lim.max_request_line:
                    return end + 4, line_end
        end = self._find_head(buf, pos, events)
        return end, (buf.find(b"\r\n", pos) if end >= 0 else -1)

    def _find_head(self, buf: bytes, pos: int, events: list[Event]) -> int:
        """Index just past CRLFCRLF of the head starting at ``pos``; -1 if incomplete (or error
        appended to ``events``)."""
        lim = self._limits
        start = pos + self._scan
        end = buf.find(b"\r\n\r\n", start, pos + lim.max_head_size)
        if end >= 0:
            self._scan = 0
            line_end = buf.find(b"\r\n", pos)
            if line_end - pos > lim.max_request_line:
                events.append(self._error(414, "start line too long"))
                return -1
            return end + 4
        size = len(buf) - pos
        if size >= lim.max_head_size:
            if buf.find(b"\n", pos, pos + lim.max_request_line + 2) < 0:
                events.append(self._error(414, "start line too long"))
            else:
                events.append(self._error(431, "header section too large"))
            return -1
        if buf.find(b"\n", pos, pos + lim.max_request_line + 2) < 0 and (
            size > lim.max_request_line + 1
        ):
            events.append(self._error(414, "start line too long"))
            return -1
        # Fail fast on a bare LF instead of waiting for a CRLFCRLF that never comes (§2.2).
        lf = buf.find(b"\n", max(start, pos))
        while lf >= 0:
            if lf == pos or buf[lf - 1] != _CR:
                events.append(self._error(400, "bare LF in header section"))
                return -1
            lf = buf.find(b"\n", lf + 1)
        self._scan = max(0, size - 3)
        return -1

    # -- body framing -------------------------------------------------------------------
    def _start_body(self, kind: BodyKind, length: int | None) -> bool:
        """Enter the body state; True if the message is already complete."""
        self._body_seen = 0
        if kind is BodyKind.LENGTH:
            assert length is not None
            if length == 0:
                return True
            self._remaining = length
            self._state = _S_LENGTH
        elif kind is BodyKind.CHUNKED:
            self._state = _S_CHUNK_SIZE
            self._trailers = []
            self._trailer_bytes = 0
        elif kind is BodyKind.CLOSE:
            self._state = _S_CLOSE_BODY
        else:
            return True
        return False

    def _body(self, buf: bytes, pos: int, events: list[Event]) -> tuple[int, bool]:
        """Decode body bytes from ``buf[pos:]``; returns (new pos, message complete)."""
        lim = self._limits
        n = len(buf)
        while True:
            st = self._state
            if st in (_S_LENGTH, _S_CHUNK_DATA):
                avail = n - pos
                if avail == 0:
                    return pos, False
                take = self._remaining if self._remaining < avail else avail
                events.append(Body(buf if take == n else buf[pos : pos + take]))
                pos += take
                self._remaining -= take
                if self._remaining:
                    return pos, False
                if st == _S_LENGTH:
                    events.append(_EOM)
                    return pos, True
                self._state = _S_CHUNK_CRLF
            elif st == _S_CHUNK_SIZE:
                lf = buf.find(b"\n", pos, pos + lim.max_chunk_line + 1)
                if lf < 0:
                    if n - pos > lim.max_chunk_line:
                        events.append(self._error(400, "chunk-size line too long"))
                    return pos, False
                if lf == pos or buf[lf - 1] != _CR:
                    events.append(self._error(400, "bare LF in chunk-size line"))
                    return pos, False
                m = _CHUNK_LINE.fullmatch(buf, pos, lf - 1)
                if m is None:
                    events.append(self._error(400, "invalid chunk-size line"))
                    return pos, False
                size = int(m.group(1), 16)
                pos = lf + 1
                if size == 0:
                    self._state = _S_TRAILERS
                    continue
                self._body_seen += size
                if lim.max_body_size is not None and self._body_seen > lim.max_body_size:
                    events.append(self._error(413, "body too large"))
                    return pos, False
                self._remaining = size
                self._state = _S_CHUNK_DATA
            elif st == _S_CHUNK_CRLF:
                if n - pos < 2:
                    if n > pos and buf[pos] != _CR:
                        events.append(self._error(400, "chunk data not followed by CRLF"))
                    return pos, False
                if not buf.startswith(b"\r\n", pos):
                    events.append(self._error(400, "chunk data not followed by CRLF"))
                    return pos, False
                pos += 2
                self._state = _S_CHUNK_SIZE
            elif st == _S_TRAILERS:
                room = lim.max_head_size - self._trailer_bytes
                lf = buf.find(b"\n", pos, pos + room + 1)
                if lf < 0:
                    if n - pos > room:
                        events.append(self._error(431, "trailer section too large"))
                    return pos, False
                if lf == pos or buf[lf - 1] != _CR:
                    events.append(self._error(400, "bare LF in trailer section"))
                    return pos, False
                self._trailer_bytes += lf + 1 - pos
                if lf - 1 == pos:
                    pos = lf + 1
                    trailers = self._trailers
                    events.append(EndOfMessage(tuple(trailers)) if trailers else _EOM)
                    return pos, True
                m = _FIELD_LINE.fullmatch(buf, pos, lf - 1)
                if m is None:
                    # Also catches obs-fold (a line starting with SP/HTAB, RFC 9112 §5.2).
                    events.append(self._error(400, "invalid trailer field"))
                    return pos, False
                self._trailers.append((m.group(1), m.group(2)))
                if len(self._trailers) > lim.max_header_count:
                    events.append(self._error(431, "too many trailer fields"))
                    return pos, False
                pos = lf + 1
            elif st == _S_CLOSE_BODY:
                if n > pos:
                    limit = lim.max_body_size
                    if limit is not None and self._body_seen + (n - pos) > limit:
                        # RFC 9112 §6.3 item 8 gives this body no length to check up front:
                        # deliver it up to the limit and no further, then fail, so what gets
                        # through does not depend on how the bytes were split (the other
                        # framings never pass the limit either).
                        take = limit - self._body_seen
                        if take > 0:
                            events.append(Body(buf[pos : pos + take]))
                            self._body_seen = limit
                        events.append(self._error(413, "body too large"))
                        return n, False
                    self._body_seen += n - pos
                    events.append(Body(buf if pos == 0 else buf[pos:]))
                return n, False
            else:  # pragma: no cover - callers only enter with a body state
                raise AssertionError(st)


class _Meta:
    """What the parser needs from a head's fields, gathered in one pass."""

    __slots__ = ("cl", "conn", "error", "expect", "host", "n_host", "te", "upgrade")

    def __init__(self, special: Headers, minor: bytes) -> None:
        self.cl: int | None = None
        self.te: list[bytes] | None = None
        self.host: bytes | None = None
        self.n_host = 0
        self.expect = False
        self.upgrade = False  # an Upgrade field is present
        self.error = ""
        conn: list[bytes] | None = None
        for lname, value in special:
            if lname == _CONNECTION:
                if conn is None:
                    conn = []
                conn.append(value)
            elif lname == _HOST_NAME:
                self.n_host += 1
                self.host = value
            elif lname == _CONTENT_LENGTH:
                # llhttp already rejected lists, signs and duplicates; re-check to be sure.
                if self.cl is not None or not value.isdigit():
                    self.error = "invalid Content-Length"
                else:
                    self.cl = int(value)
            elif lname == _TRANSFER_ENCODING:
                if self.te is None:
                    self.te = []
                self.te.extend(list_tokens((value,)) or [b""])
            elif lname == _EXPECT:
                self.expect = value.lower() == b"100-continue"
            elif lname == _UPGRADE:
                self.upgrade = True
        if conn is None:
            self.conn: frozenset[bytes] = _NO_TOKENS
        elif len(conn) == 1 and conn[0] in _COMMON_CONNECTION:
            self.conn = _COMMON_CONNECTION[conn[0]]
        else:
            if len(conn) == 1 and b"," not in conn[0]:
                self.conn = frozenset((conn[0].strip(b" \t").lower(),))
            else:
                self.conn = frozenset(list_tokens(conn))
            if self.conn & _END_TO_END:  # (the common values above name none of them)
                self.conn = self.conn - _END_TO_END
        if self.te is not None:
            if self.cl is not None:
                self.error = _BOTH_CL_AND_TE
            elif minor == b"0":
                # RFC 9112 §6.1: TE in HTTP/1.0 means faulty framing.
                self.error = _TE_IN_HTTP10


class RequestParser(_Parser):
    """Parses the client side; pauses after each request (see module docstring)."""

    __slots__ = ()

    def __init__(self, limits: Limits = Limits()) -> None:
        super().__init__(limits, 0)

    @property
    def paused(self) -> bool:
        """True after an ``EndOfMessage`` until ``resume()``."""
        return self._state == _S_PAUSED

    @property
    def buffered(self) -> int:
        """Bytes held back (while paused); the shell stops reading when this grows."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Event]:
        st = self._state
        if st == _S_DEAD:
            return []
        if st == _S_PAUSED:
            self._buf += data
            return []
        if self._eof:
            raise RuntimeError("feed() after feed_eof()")
        self._buf = self._buf + data if self._buf else data
        return self._run()

    def resume(self) -> list[Event]:
        """Continue after an ``EndOfMessage`` with the buffered (pipelined) bytes."""
        if self._state != _S_PAUSED:
            return []
        self._state = _S_HEAD
        events = self._run()
        # EOF behind a complete request that now waits in its turn (paused again) only means
        # no further request follows; it is judged when that one's turn comes.
        if self._eof and self._state not in (_S_DEAD, _S_PAUSED):
            events.extend(self._eof_events())
        return events

    def into_tunnel(self) -> bytes:
        """The origin switched protocols: return the buffered bytes; the parser is finished."""
        rest = self._buf
        self._buf = b""
        self._state = _S_DEAD
        return rest

    def feed_eof(self) -> list[Event]:
        """The client closed its sending side."""
        if self._eof:
            return []
        self._eof = True
        if self._state in (_S_DEAD, _S_PAUSED):
            return []
        return self._eof_events()

    def _eof_events(self) -> list[Event]:
        if self._state == _S_HEAD and not self._buf.strip(b"\r\n"):
            return []
        what = "request head" if self._state == _S_HEAD else "request body"
        return [self._error(400, f"connection closed in {what}")]

    def _run(self) -> list[Event]:
        events: list[Event] = []
        buf = self._buf
        pos = 0
        while True:
            if self._state == _S_HEAD:
                # RFC 9112 §2.2: ignore empty lines before a request-line.
                while buf.startswith(b"\r\n", pos):
                    pos += 2
                if pos == len(buf):
                    break
                end, line_end = self._head_end(buf, pos, events)
                if end < 0:
                    break
                head = self._parse_head(buf, pos, line_end, end)
                pos = end
                events.append(head)
                if isinstance(head, ProtocolError):
                    return events
                if head.body_kind is not BodyKind.NONE and not self._start_body(
                    head.body_kind, head.content_length
                ):
                    continue
                events.append(_EOM)
                self._state = _S_PAUSED
                break
            pos, done = self._body(buf, pos, events)
            if self._state == _S_DEAD:
                return events
            if not done:
                break
            self._state = _S_PAUSED
            break
        self._buf = buf[pos:] if pos else buf
        return events

    def _parse_head(
        self, buf: bytes, pos: int, line_end: int, end: int
    ) -> RequestHead | ProtocolError:
        lim = self._limits
        m = _REQUEST_LINE.fullmatch(buf, pos, line_end)
        if m is None:
            if _ANY_VERSION.fullmatch(buf, pos, line_end):
                return self._error(505, "HTTP version not supported")
            return self._error(400, "invalid request-line")
        method, target, minor = m.group(1, 2, 3)
        # Request-target forms, RFC 9112 §3.2.
        if method == b"CONNECT":
            if not lim.allow_connect:
                return self._error(501, "CONNECT not supported")
            if not _AUTHORITY_FORM.fullmatch(target):
                return self._error(400, "CONNECT needs authority-form target")
        elif target[0] != 0x2F:  # not "/"
            if target == b"*":
                if method != b"OPTIONS":
                    return self._error(400, "asterisk-form only with OPTIONS")
            elif not _ABSOLUTE_FORM.fullmatch(target) or not _HOST.fullmatch(
                target.split(b"://", 1)[1].split(b"/", 1)[0].split(b"?", 1)[0].rsplit(b"@", 1)[-1]
            ):
                # RFC 9112 §3.2.2: absolute-form carries an authority (RFC 3986 §3.2) that
                # must parse; a malformed one ("http://[abc/") is a bad request, not our crash.
                return self._error(400, "invalid request-target")
        fields, why, wire = self._parse_fields(HttpRequestParser(self), buf, pos, line_end, end)
        if why:
            if why == "method":
                # Our regex accepted the token, so llhttp just does not know it (RFC 9110 §9.1).
                return self._error(501, "method not implemented")
            if why == "too many header fields":
                return self._error(431, why)
            return self._error(400, f"invalid request head: {why}")
        meta = _Meta(self._special, minor)
        if meta.error:
            return self._error(400, meta.error)
        cl = meta.cl
        te = meta.te
        if te is not None:
            if te[-1] != b"chunked" or te.count(b"chunked") != 1:
                # RFC 9112 §6.3 item 4: length cannot be determined.
                return self._error(400, "chunked must be the final transfer coding, once")
            if len(te) != 1:
                return self._error(501, "transfer coding not implemented")  # RFC 9112 §6.1
            kind = BodyKind.CHUNKED
        elif cl is not None:
            kind = BodyKind.LENGTH
            if lim.max_body_size is not None and cl > lim.max_body_size:
                return self._error(413, "body too large")
        else:
            kind = BodyKind.NONE
        host = meta.host
        # RFC 9112 §3.2: exactly one valid Host in HTTP/1.1, at most one in HTTP/1.0.
        if meta.n_host > 1 or (meta.n_host == 0 and minor == b"1"):
            return self._error(400, "missing or repeated Host")
        if host is not None and not _HOST.fullmatch(host):
            return self._error(400, "invalid Host")
        conn = meta.conn
        expect = meta.expect
        if minor == b"1":
            keep_alive = b"close" not in conn
            upgrade = meta.upgrade and b"upgrade" in conn  # RFC 9110 §7.8
        else:
            keep_alive = b"keep-alive" in conn and b"close" not in conn
            upgrade = False  # RFC 9110 §7.8: ignore Upgrade in HTTP/1.0
            expect = False  # RFC 9110 §10.1.1: ignore 100-continue from HTTP/1.0
        if method == b"CONNECT":
            upgrade = True
        return RequestHead(
            method,
            target,
            b"1.1" if minor == b"1" else b"1.0",
            fields,
            keep_alive,
            kind,
            cl,
            upgrade,
            expect,
            host,
            conn,
            wire,
        )


class ResponseParser(_Parser):
    """Parses the origin side; call ``expect()`` before each request is sent."""

    __slots__ = ("_pending",)

    def __init__(self, limits: Limits = RESPONSE_LIMITS) -> None:
        super().__init__(limits, 502)
        self._pending: deque[tuple[bytes, bool]] = deque()

    def expect(self, method: bytes, *, upgrade: bool = False) -> None:
        """A request with ``method`` was sent; ``upgrade`` if it asked to switch protocols."""
        self._pending.append((method, upgrade))

    @property
    def pending(self) -> int:
        """Responses still expected (including the one being parsed)."""
        return len(self._pending)

    @property
    def reusable(self) -> bool:
        """True when the connection may carry another request: every expected response has
        ended and nothing came after them.  Bytes past the last expected response (a 204 or a
        HEAD response with a body, RFC 9112 §6.3 items 1-2) kill the parser in the same
        ``feed`` that delivered the ``EndOfMessage``, so this is the check to make before
        pooling, not ``pending == 0``."""
        return self._state == _S_HEAD and not self._pending and not self._buf and not self._eof

    def feed(self, data: bytes) -> list[Event]:
        if self._state == _S_DEAD:
            return []
        if self._eof:
            raise RuntimeError("feed() after feed_eof()")
        self._buf = self._buf + data if self._buf else data
        return self._run()

    def body_passed(self, n: int) -> list[Event]:
        """``n`` bytes of the current Content-Length body went by without feed() (the shell
        relayed them in the kernel); returns [EndOfMessage] when they were the last."""
        if self._state != _S_LENGTH or self._buf or not 0 < n <= self._remaining:
            raise ValueError("body_passed outside a Content-Length body")
        self._remaining -= n
        if self._remaining:
            return []
        self._pending.popleft()
        self._state = _S_HEAD
        return [_EOM]

    def feed_eof(self) -> list[Event]:
        """The origin closed: ends a close-delimited body (RFC 9112 §6.3 item 8)."""
        if self._eof or self._state == _S_DEAD:
            return []
        self._eof = True
        st = self._state
        if st == _S_CLOSE_BODY:
            self._state = _S_DEAD
            self._pending.popleft()
            return [_EOM]
        if st == _S_HEAD:
            if not self._buf and not self._pending:
                return []
            if not self._buf:
                return [self._error(502, "connection closed before response")]
            return [self._error(502, "connection closed in response head")]
        return [self._error(502, "connection closed in response body")]

    def _run(self) -> list[Event]:
        events: list[Event] = []
        buf = self._buf
        pos = 0
        n = len(buf)
        while pos < n:
            if self._state == _S_HEAD:
                if not self._pending:
                    # RFC 9112 §6.3: never forward data as a response nobody asked for.
                    events.append(self._error(502, "unsolicited data from origin"))
                    return events
                end, line_end = self._head_end(buf, pos, events)
                if end < 0:
                    break
                tunnel = self._parse_head(buf, pos, line_end, end, events)
                pos = end
                if self._state == _S_DEAD:
                    if tunnel:
                        events.append(Tunnel(buf[pos:]))
                    return events
                head = events[-1]
                if isinstance(head, Informational):
                    continue
                assert isinstance(head, ResponseHead)
                cl = head.content_length
                if head.body_kind is BodyKind.LENGTH and cl is not None and 0 < cl <= n - pos:
                    # The whole body arrived with the head (small responses): no body state.
                    events.append(Body(buf[pos : pos + cl]))
                    events.append(_EOM)
                    pos += cl
                    self._pending.popleft()
                    continue
                if self._start_body(head.body_kind, cl):
                    events.append(_EOM)
                    self._pending.popleft()
                continue
            pos, done = self._body(buf, pos, events)
            if self._state == _S_DEAD:
                return events
            if not done:
                break
            self._pending.popleft()
            self._state = _S_HEAD
        self._buf = buf[pos:] if pos else buf
        return events

    def _parse_head(
        self, buf: bytes, pos: int, line_end: int, end: int, events: list[Event]
    ) -> bool:
        """Append the head event (or error); True if a tunnel starts after it."""
        m = _STATUS_LINE.fullmatch(buf, pos, line_end)
        if m is None:
            events.append(self._error(502, "invalid status-line"))
            return False
        minor, code, reason = m.group(1, 2, 3)
        status = int(code)
        fields, why, wire = self._parse_fields(HttpResponseParser(self), buf, pos, line_end, end)
        if why:
            events.append(self._error(502, f"invalid response head: {why}"))
            return False
        reason = reason or b""
        meta = _Meta(self._special, minor)
        conn = meta.conn
        method, upgrade_requested = self._pending[0]
        if status < 200:
            if status == 101:
                if not upgrade_requested or method == b"CONNECT":
                    events.append(self._error(502, "101 without an upgrade request"))
                    return False
                if not meta.upgrade:
                    # RFC 9110 §15.2.2: a 101 names the new protocol in Upgrade.
                    events.append(self._error(502, "101 without Upgrade"))
                    return False
                self._pending.popleft()
                events.append(Informational(status, reason, fields, conn))
                self._state = _S_DEAD
                return True
            events.append(Informational(status, reason, fields, conn))
            return False
        # RFC 9112 §6.3 item 1: a response to HEAD, a 204 and a 304 end at their head
        # "regardless of the header fields present", so framing fields that could not frame a
        # body do not make them malformed (Transfer-Encoding is hop-by-hop and not forwarded).
        bodiless = method == b"HEAD" or status == 204 or status == 304
        if meta.error and not (bodiless and meta.error == _TE_IN_HTTP10):
            events.append(self._error(502, meta.error))
            return False
        cl = meta.cl
        te = meta.te
        if te is not None and te != [b"chunked"] and not bodiless:
            # A close-delimited TE body (§6.3 item 4) could not be re-framed faithfully.
            events.append(self._error(502, "unsupported Transfer-Encoding"))
            return False
        keep_alive = (
            (b"close" not in conn)
            if minor == b"1"
            else (b"keep-alive" in conn and b"close" not in conn)
        )
        version = b"1.1" if minor == b"1" else b"1.0"
        if method == b"CONNECT" and status < 300:
            # RFC 9110 §9.3.6: the connection becomes a tunnel right after this head.
            self._pending.popleft()
            events.append(
                ResponseHead(
                    status, reason, version, fields, keep_alive, BodyKind.NONE, cl, conn, wire
                )
            )
            self._state = _S_DEAD
            return True
        if bodiless:
            kind = BodyKind.NONE  # RFC 9112 §6.3 items 1-2; CL describes the would-be body
        elif te is not None:
            kind = BodyKind.CHUNKED
        elif cl is not None:
            kind = BodyKind.LENGTH
            if self._limits.max_body_size is not None and cl > self._limits.max_body_size:
                events.append(self._error(413, "body too large"))
                return False
        else:
            kind = BodyKind.CLOSE
            keep_alive = False
        events.append(
            ResponseHead(status, reason, version, fields, keep_alive, kind, cl, conn, wire)
        )
        return False


# --------------------------------------------------------------------------- forwarding


class Framing(enum.Enum):
    """How a body is sent to the next hop."""

    NONE = "none"  # no body; Content-Length (e.g. of a HEAD response) is kept as metadata
    LENGTH = "length"  # keep Content-Length, copy body bytes
    CHUNKED = "chunked"  # Transfer-Encoding: chunked, encode_chunk() + encode_last_chunk()
    CLOSE = "close"  # raw body bytes, then close the connection ("Connection: close")


def forward_framing(head: RequestHead | ResponseHead, peer_version: bytes = b"1.1") -> Framing:
    """Framing for forwarding ``head``'s body to a peer speaking ``peer_version``.

    Requests go upstream in HTTP/1.1, so their framing is kept.  A close-delimited response is
    re-chunked for an HTTP/1.1 client so its connection can stay persistent; an HTTP/1.0 client
    does not understand chunked (RFC 9112 §7: never send TE to it), so it gets the raw body and
    the connection is closed after it.
    """
    kind = head.body_kind
    if kind is BodyKind.NONE:
        return Framing.NONE
    if kind is BodyKind.LENGTH:
        return Framing.LENGTH
    return Framing.CHUNKED if peer_version == b"1.1" else Framing.CLOSE


def _serialize_fields(
    out: list[bytes],
    headers: Headers,
    connection: frozenset[bytes],
    framing: Framing,
    relay_upgrade: bool,
    drop: Collection[bytes],
) -> None:
    for name, value in headers:
        lname = name.lower()
        if (lname in _HOP_BY_HOP or lname in connection or lname in drop) and not (
            relay_upgrade and lname == _UPGRADE
        ):
            continue
        if lname == _CONTENT_LENGTH and (framing is Framing.CHUNKED or framing is Framing.CLOSE):
            continue
        # The Trailer field announces trailers, which only survive chunked framing.
        if lname == b"trailer" and framing is not Framing.CHUNKED:
            continue
        out.append(name + b": " + value + b"\r\n")


def _wire_fields(
    head: RequestHead | ResponseHead,
    framing: Framing,
    relay_upgrade: bool,
    drop: Collection[bytes],
) -> bytes | None:
    """The received field section with the lines ``_serialize_fields`` would skip cut out, or
    None when it cannot be used (rebuild then).  Each line is preceded by CRLF.

    Forwarding a head mostly changes nothing but the hop-by-hop fields, so copying the bytes
    as received and cutting a line or two is cheaper than rebuilding every field line.
    """
    wire = head.wire
    if wire is None or drop or relay_upgrade:
        return None
    headers, count, raw, special = wire
    if headers is not head.headers or count != len(headers):
        return None
    if not special:
        return raw
    if head.connection and not head.connection <= _PLAIN_OPTIONS:
        return None  # Connection names fields to remove (RFC 9110 §7.6.1)
    lower = b""
    parts: list[bytes] = []
    last = 0
    # ``special`` is in line order, so each hop-by-hop line is the first one with its name
    # after the previous cut.  Field names are tokens and values hold no CR/LF, so
    # "CRLF name:" in the lower-cased section is exactly the start of that line.
    for name, _ in special:
        if name not in _HOP_BY_HOP:
            if (name == _TRAILER and framing is not Framing.CHUNKED) or (
                name == _CONTENT_LENGTH and (framing is Framing.CHUNKED or framing is Framing.CLOSE)
            ):
                return None
            continue
        if not lower:
            lower = raw.lower()
        start = lower.find(b"\r\n" + name + b":", last)
        parts.append(raw[last:start])
        last = raw.find(b"\r\n", start + 2)
        if last < 0:
            last = len(raw)
    if not parts:
        return raw
    parts.append(raw[last:])
    return b"".join(parts)


def _connection_field(
    out: list[bytes], keep_alive: bool, relay_upgrade: bool, peer_version: bytes
) -> None:
    opts: list[bytes] = []
    if relay_upgrade:
        opts.append(b"upgrade")
    if not keep_alive:
        opts.append(b"close")
    elif peer_version == b"1.0":
        opts.append(b"keep-alive")  # RFC 9112 §9.3: HTTP/1.0 persistence is opt-in
    if opts:
        out.append(b"Connection: " + b", ".join(opts) + b"\r\n")


def serialize_request_head(
    head: RequestHead,
    *,
    target: bytes | None = None,
    framing: Framing | None = None,
    keep_alive: bool = True,
    relay_upgrade: bool = False,
    drop: Collection[bytes] = (),
    add: Sequence[tuple[bytes, bytes]] = (),
) -> bytes:
    """The head to send upstream, in HTTP/1.1 (RFC 9110 §2.5: we send our own version).

    Hop-by-hop fields and those named in Connection are removed (RFC 9110 §7.6.1); ``Upgrade``
    survives with ``relay_upgrade``.  ``drop`` names (lower-case) more fields to remove, ``add``
    appends fields (e.g. Host for an HTTP/1.0 request without one).  ``framing`` defaults to
    ``forward_framing(head)``; Transfer-Encoding / Connection fields are written to match.
    """
    if framing is None:
        framing = forward_framing(head)
    raw = _wire_fields(head, framing, relay_upgrade, drop)
    if raw is not None:
        out = [head.method, b" ", head.target if target is None else target, b" HTTP/1.1", raw]
        out.append(b"\r\n")
    else:
        out = [head.method, b" ", head.target if target is None else target, b" HTTP/1.1\r\n"]
        _serialize_fields(out, head.headers, head.connection, framing, relay_upgrade, drop)
    for name, value in add:
        out.append(name + b": " + value + b"\r\n")
    if framing is Framing.CHUNKED:
        out.append(b"Transfer-Encoding: chunked\r\n")
    _connection_field(
        out, keep_alive and framing is not Framing.CLOSE, relay_upgrade, peer_version=b"1.1"
    )
    out.append(b"\r\n")
    return b"".join(out)


def serialize_response_head(
    head: ResponseHead | Informational,
    *,
    peer_version: bytes = b"1.1",
    framing: Framing | None = None,
    keep_alive: bool = True,
    relay_upgrade: bool = False,
    drop: Collection[bytes] = (),
    add: Sequence[tuple[bytes, bytes]] = (),
) -> bytes:
    """The head to send to the client (``peer_version`` is the client request's version).

    ``framing`` defaults to ``forward_framing(head, peer_version)``; ``keep_alive`` is the
    shell's decision for the client connection (forced off by ``Framing.CLOSE``).  For a
    ``101`` pass ``relay_upgrade=True`` to keep Upgrade and send ``Connection: upgrade``.
    """
    if isinstance(head, Informational):
        framing = Framing.NONE
        keep_alive = True
    elif framing is None:
        framing = forward_framing(head, peer_version)
    raw = None if isinstance(head, Informational) else _wire_fields(head, framing, False, drop)
    if raw is not None and not relay_upgrade:
        out = [b"HTTP/1.1 %d " % head.status, head.reason, raw, b"\r\n"]
    else:
        out = [b"HTTP/1.1 %d " % head.status, head.reason, b"\r\n"]
        _serialize_fields(out, head.headers, head.connection, framing, relay_upgrade, drop)
    for name, value in add:
        out.append(name + b": " + value + b"\r\n")
    if framing is Framing.CHUNKED:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if not isinstance(head, Informational):
        _connection_field(
            out, keep_alive and framing is not Framing.CLOSE, relay_upgrade, peer_version
        )
    elif relay_upgrade:
        out.append(b"Connection: upgrade\r\n")
    out.append(b"\r\n")
    return b"".join(out)


_NOT_TRAILERS = _HOP_BY_HOP | {_CONTENT_LENGTH, _HOST_NAME, b"trailer", b"content-range"}

#: The last chunk with no trailers (RFC 9112 §7.1).
LAST_CHUNK = b"0\r\n\r\n"


_NO_CHUNK = (b"", b"", b"")


def chunk_pieces(data: bytes) -> tuple[bytes, bytes, bytes]:
    """``data`` framed as one chunk (RFC 9112 §7.1: chunk-size CRLF chunk-data CRLF), in the
    three pieces a gather write sends without joining them. Empty data gives empty pieces: a
    zero-size chunk is the last chunk and would end the body."""
    if not data:
        return _NO_CHUNK
    return (b"%x\r\n" % len(data), data, b"\r\n")


def encode_chunk(data: bytes) -> bytes:
    """One chunk as one bytes object (``chunk_pieces`` joined); empty data gives b""."""
    return b"".join(chunk_pieces(data))


def encode_last_chunk(
    trailers: Iterable[tuple[bytes, bytes]] = (), connection: Collection[bytes] = ()
) -> bytes:
    """The last chunk and trailer section (RFC 9112 §7.1.2).

    Fields that must not be trailers (framing, routing, hop-by-hop: RFC 9110 §6.5.1) are
    dropped, so a trailer can never be mistaken for framing by the next hop; so are the ones
    the message's ``connection`` options name (§7.6.1 covers trailer fields too).
    """
    lines = b"".join(
        n + b": " + v + b"\r\n"
        for n, v in trailers
        if n.lower() not in _NOT_TRAILERS and n.lower() not in connection
    )
    return b"0\r\n" + lines + b"\r\n" if lines else LAST_CHUNK


# RFC 9110 §7.6.3: Via = received-protocol RWS received-by; "HTTP/" is left out, and a
# pseudonym may stand for the host. One more field line appends to any Via already there
# (§5.3: field lines of one name combine in order).
VIA_BY = b"tproxy"


def via_value(received_version: bytes) -> bytes:
    """The Via entry for a message received in HTTP/``received_version``."""
    return received_version + b" " + VIA_BY


# RFC 9110 §7.6.2: Max-Forwards counts hops for TRACE and OPTIONS only.
MAX_FORWARDS_METHODS = frozenset({b"TRACE", b"OPTIONS"})
# Fields a TRACE echo leaves out: §9.3.8 says the final recipient "SHOULD exclude any request
# fields that are likely to contain sensitive data" from the reflected message.
_TRACE_EXCLUDED = frozenset({b"authorization", b"proxy-authorization", b"cookie"})


def max_forwards(head: RequestHead) -> int | None:
    """The hops a TRACE or OPTIONS request may still be forwarded (RFC 9110 §7.6.2); None for
    other methods, or without a valid ``Max-Forwards`` (a decimal integer), which leaves the
    request as it is."""
    if head.method not in MAX_FORWARDS_METHODS:
        return None
    for name, value in head.headers:
        if name.lower() == b"max-forwards":
            digits = value.strip()
            if digits.isdigit() and len(digits) <= 10:  # ASCII digits only (bytes.isdigit)
                return int(digits)
            return None
    return None


def final_recipient_answer(head: RequestHead, date: bytes, keep_alive: bool) -> bytes:
    """The answer of a proxy that a TRACE or OPTIONS request reaches with ``Max-Forwards: 0``:
    it "MUST respond as the final recipient" (RFC 9110 §7.6.2). TRACE reflects the request
    (``message/http``, §9.3.8); OPTIONS gets an empty 200 (§9.3.7)."""
    body = b""
    fields = [b"Date: " + date]
    if head.method == b"TRACE":
        lines = [b"%s %s HTTP/%s" % (head.method, head.target, head.version)]
        lines += [n + b": " + v for n, v in head.headers if n.lower() not in _TRACE_EXCLUDED]
        body = b"\r\n".join(lines) + b"\r\n\r\n"
        fields.append(b"Content-Type: message/http")
    fields.append(b"Content-Length: %d" % len(body))
    fields.append(b"Connection: keep-alive" if keep_alive else b"Connection: close")
    return b"HTTP/1.1 200 OK\r\n" + b"\r\n".join(fields) + b"\r\n\r\n" + body


def origin_form(target: bytes) -> tuple[bytes, bytes] | None:
    """``(authority, origin-form target)`` of an absolute-form request-target; None for the
    other forms.

    A proxy sends an origin only origin-form (RFC 9112 §3.2.1: an empty path becomes "/") and
    must replace the received Host with the target's authority (RFC 9112 §3.2.2), so that an
    origin routing by Host serves what the filter and the cache saw in the target.  Userinfo is
    not part of Host (RFC 9110 §7.2).  The parser has already checked the form.
    """
    sep = target.find(b"://")
    if sep <= 0 or target[0] == 0x2F:
        return None
    rest = target[sep + 3 :]
    end = len(rest)
    for delim in b"/?#":
        i = rest.find(bytes((delim,)))
        if 0 <= i < end:
            end = i
    authority = rest[:end].rpartition(b"@")[2]
    path = rest[end:].partition(b"#")[0]
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """First value of field ``name`` (lower-case), or None."""
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


# --------------------------------------------------------------------------- sniffing


class Sniff(enum.Enum):
    HTTP = "http"  # starts like a request-line: hand it to RequestParser
    OPAQUE = "opaque"  # not HTTP/1.x: relay as an opaque tunnel
    UNDECIDED = "undecided"  # too few bytes yet (the shell should time-box waiting)


def sniff(data: bytes) -> Sniff:
    """Classify the first bytes of an intercepted connection.

    Plausible HTTP is ``token SP`` followed by the start of a request-target (``/``, ``*`` or a
    letter for absolute/authority form), after optional empty lines (RFC 9112 §2.2).  Anything
    else (TLS records, SSH banners, binary, the HTTP/2 preface) is opaque as soon as it differs.
    UNDECIDED needs more bytes; a client that sends nothing (server-speaks-first protocols) never
    decides, so the shell time-boxes the wait and then relays opaquely.  The RequestParser
    still validates strictly, so a plausible-but-bad request gets a 400, not a tunnel.
    """
    pos = 0
    n = len(data)
    while data.startswith(b"\r\n", pos):
        pos += 2
    if pos == n or data[pos:] == b"\r":
        return Sniff.UNDECIDED
    start = data[pos : pos + len(_H2_PREFACE_LINE)]
    if _H2_PREFACE_LINE.startswith(start):
        # HTTP/2 with prior knowledge (RFC 9113 §3.3) is relayed, not answered with 505.
        return Sniff.OPAQUE if len(start) == len(_H2_PREFACE_LINE) else Sniff.UNDECIDED
    m = _SNIFF_METHOD.match(data, pos)
    if m is None:
        return Sniff.OPAQUE
    end = m.end()
    if end == n:
        return Sniff.UNDECIDED
    if data[end] != 0x20 or (end + 1 < n and data[end + 1] not in _SNIFF_TARGET_START):
        return Sniff.OPAQUE
    return Sniff.UNDECIDED if end + 1 == n else Sniff.HTTP


def is_opaque(first_bytes: bytes) -> bool:
    """True when ``first_bytes`` cannot be the start of an HTTP/1.x request."""
    return sniff(first_bytes) is Sniff.OPAQUE
