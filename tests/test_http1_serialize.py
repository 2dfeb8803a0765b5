"""Forwarding: head serialization, hop-by-hop removal, framing decisions, chunks, sniffing."""

from __future__ import annotations

import pytest

from tests.http1_util import requests, responses
from tproxy.http1 import (
    LAST_CHUNK,
    Body,
    EndOfMessage,
    Framing,
    Informational,
    RequestHead,
    ResponseHead,
    Sniff,
    encode_chunk,
    encode_last_chunk,
    forward_framing,
    is_opaque,
    max_forwards,
    serialize_request_head,
    serialize_response_head,
    sniff,
)


def _req(data: bytes) -> RequestHead:
    ev = requests([data])[0]
    assert isinstance(ev, RequestHead), ev
    return ev


def _resp(data: bytes, method: bytes = b"GET", eof: bool = False) -> ResponseHead:
    ev = responses([method], [data], eof=eof)[0]
    assert isinstance(ev, ResponseHead), ev
    return ev


def _names(head_bytes: bytes) -> list[bytes]:
    lines = head_bytes.split(b"\r\n")[1:-2]
    return [line.split(b":", 1)[0].lower() for line in lines]


# --------------------------------------------------------------------------- hop-by-hop


def test_request_hop_by_hop_removed() -> None:
    head = _req(
        b"GET /p HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret, te\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
        b"x-secret: 1\r\nUpgrade: h2c\r\nAccept: */*\r\n\r\n"
    )
    out = serialize_request_head(head)
    assert out == b"GET /p HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"


@pytest.mark.parametrize("named", [b"content-length", b"Content-Length, keep-alive", b"host"])
def test_connection_cannot_remove_content_length_or_host(named: bytes) -> None:
    # RFC 9110 §7.6.1: honoured, "Connection: content-length" forwarded the body without its
    # length, so the origin read the body's bytes as a second request (smuggling past the
    # filter and the log), and a response's ran into the next one.
    body = b"GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n"
    head = _req(
        b"POST /x HTTP/1.1\r\nHost: origin.test\r\nConnection: " + named + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    out = serialize_request_head(head)
    assert b"\r\nContent-Length: %d\r\n" % len(body) in out
    assert b"\r\nHost: origin.test\r\n" in out
    resp = _resp(b"HTTP/1.1 200 OK\r\nConnection: content-length, date\r\nContent-Length: 3\r\n"
                 b"Date: Sun, 29 Nov 2026 16:36:44 GMT\r\n\r\n")  # fmt: skip
    out = serialize_response_head(resp)
    assert b"\r\nContent-Length: 3\r\n" in out and b"\r\nDate: " in out


def test_request_framing_headers() -> None:
    chunked = _req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert forward_framing(chunked) is Framing.CHUNKED
    assert serialize_request_head(chunked) == (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    length = _req(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
    assert forward_framing(length) is Framing.LENGTH
    assert serialize_request_head(length) == (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n"
    )
    assert forward_framing(_req(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")) is Framing.NONE


def test_request_options() -> None:
    head = _req(b"GET http://a/x HTTP/1.0\r\nUser-Agent: u\r\n\r\n")
    out = serialize_request_head(
        head,
        target=b"/x",
        keep_alive=False,
        drop=(b"user-agent",),
        add=[(b"Host", b"a"), (b"Via", b"1.1 tproxy")],
    )
    # We always speak HTTP/1.1 upstream (RFC 9110 §2.5).
    assert out == b"GET /x HTTP/1.1\r\nHost: a\r\nVia: 1.1 tproxy\r\nConnection: close\r\n\r\n"


def test_relay_upgrade_keeps_upgrade() -> None:
    head = _req(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, X-Hop\r\nUpgrade: websocket\r\n"
        b"X-Hop: 1\r\nSec-WebSocket-Key: k\r\n\r\n"
    )
    out = serialize_request_head(head, relay_upgrade=True)
    assert out == (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n"
        b"Connection: upgrade\r\n\r\n"
    )
    assert b"Upgrade" not in serialize_request_head(head)


def test_trailer_field_kept_only_with_chunked() -> None:
    head = _req(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
    )
    assert b"trailer" in _names(serialize_request_head(head))
    resp = _resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n")
    to_10 = serialize_response_head(resp, peer_version=b"1.0")
    assert b"trailer" not in _names(to_10)


def test_response_framing_decisions() -> None:
    close = _resp(b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\n\r\n")
    # Close-delimited: re-chunked for HTTP/1.1 clients, raw + close for HTTP/1.0.
    assert forward_framing(close) is Framing.CHUNKED
    assert serialize_response_head(close) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert forward_framing(close, b"1.0") is Framing.CLOSE
    assert serialize_response_head(close, peer_version=b"1.0") == (
        b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nConnection: close\r\n\r\n"
    )
    chunked = _resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert forward_framing(chunked) is Framing.CHUNKED
    assert forward_framing(chunked, b"1.0") is Framing.CLOSE
    length = _resp(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nab")
    assert forward_framing(length, b"1.0") is Framing.LENGTH
    # Keep-alive to the client is the shell's decision, not the origin's Connection: close.
    assert serialize_response_head(length) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
    assert serialize_response_head(length, peer_version=b"1.0") == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n"
    )
    assert serialize_response_head(length, keep_alive=False) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
    )


def test_head_response_keeps_content_length() -> None:
    head = _resp(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", method=b"HEAD")
    assert forward_framing(head) is Framing.NONE
    assert serialize_response_head(head) == b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"


def test_informational_serialization() -> None:
    info = Informational(
        101,
        b"Switching Protocols",
        [(b"Connection", b"upgrade"), (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Accept", b"x")],
        frozenset({b"upgrade"}),
    )
    assert serialize_response_head(info, relay_upgrade=True) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\n"
        b"Connection: upgrade\r\n\r\n"
    )
    cont = Informational(100, b"Continue", [], frozenset())
    assert serialize_response_head(cont) == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_request_round_trip() -> None:
    raw = (
        b"PUT /x?y HTTP/1.1\r\nHost: h.example:8080\r\nX-A: 1\r\nx-a: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    head = _req(raw)
    out = serialize_request_head(head)
    body = encode_chunk(b"hello") + encode_chunk(b"") + encode_last_chunk([(b"T", b"v")])
    again = requests([out + body])
    assert again[0] == head
    assert again[1:] == [Body(b"hello"), EndOfMessage(((b"T", b"v"),))]


def test_response_round_trip() -> None:
    head = _resp(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nSet-Cookie: a\r\n\r\n")
    out = serialize_response_head(head) + b"abc"
    again = responses([b"GET"], [out])
    assert again == [head, Body(b"abc"), EndOfMessage()]


def test_chunk_helpers() -> None:
    assert encode_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert encode_chunk(b"") == b""
    assert LAST_CHUNK == b"0\r\n\r\n" == encode_last_chunk()
    assert encode_last_chunk([(b"A", b"1")]) == b"0\r\nA: 1\r\n\r\n"


# --------------------------------------------------------------------------- sniffing

SNIFF_CASES = {
    "GET": (b"GET / HTTP/1.1\r\n", Sniff.HTTP),
    "method and slash": (b"POST /", Sniff.HTTP),
    "absolute-form": (b"GET http://x/", Sniff.HTTP),
    "asterisk": (b"OPTIONS *", Sniff.HTTP),
    "leading CRLF": (b"\r\n\r\nGET /", Sniff.HTTP),
    "empty": (b"", Sniff.UNDECIDED),
    "partial method": (b"GE", Sniff.UNDECIDED),
    "method and space": (b"GET ", Sniff.UNDECIDED),
    "lone CR": (b"\r\n\r", Sniff.UNDECIDED),
    "TLS ClientHello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", Sniff.OPAQUE),
    "SSH banner": (b"SSH-2.0-OpenSSH_9.2\r\n", Sniff.OPAQUE),
    "binary": (b"\x00\x01\x02", Sniff.OPAQUE),
    "double space": (b"GET  /", Sniff.OPAQUE),
    "space then digit": (b"GET 1", Sniff.OPAQUE),
    "token then CR": (b"HELLO\r\n", Sniff.OPAQUE),
    "overlong token": (b"A" * 40, Sniff.OPAQUE),
    "bare LF first": (b"\nGET /", Sniff.OPAQUE),
    "h2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Sniff.OPAQUE),
    "h2 preface start": (b"PRI * HTTP/2", Sniff.UNDECIDED),
    "PRIVATE method": (b"PRIVATE /x", Sniff.HTTP),
}


@pytest.mark.parametrize("data,expected", SNIFF_CASES.values(), ids=SNIFF_CASES.keys())
def test_sniff(data: bytes, expected: Sniff) -> None:
    assert sniff(data) is expected
    assert is_opaque(data) is (expected is Sniff.OPAQUE)


def test_last_chunk_drops_framing_trailers() -> None:
    trailers = [(b"Content-Length", b"5"), (b"transfer-encoding", b"chunked"), (b"X-Sum", b"1")]
    assert encode_last_chunk(trailers) == b"0\r\nX-Sum: 1\r\n\r\n"
    assert encode_last_chunk([(b"Host", b"evil")]) == LAST_CHUNK


@pytest.mark.parametrize(
    ("method", "value", "hops"),
    [
        (b"TRACE", b"0", 0),
        (b"OPTIONS", b" 7 ", 7),
        (b"GET", b"0", None),
        (b"TRACE", b"-1", None),
        (b"TRACE", b"1e3", None),
        (b"TRACE", b"99999999999", None),
    ],
)
def test_max_forwards_counts_for_trace_and_options_only(
    method: bytes, value: bytes, hops: int | None
) -> None:
    head = _req(method + b" / HTTP/1.1\r\nHost: a\r\nMax-Forwards: " + value + b"\r\n\r\n")
    assert max_forwards(head) == hops


def test_trailer_fields_named_in_connection_are_not_forwarded() -> None:
    # RFC 9110 §7.6.1 covers the trailer section too.
    out = encode_last_chunk([(b"X-Hop", b"1"), (b"X-End", b"2")], frozenset({b"x-hop"}))
    assert out == b"0\r\nX-End: 2\r\n\r\n"
