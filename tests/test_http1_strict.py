"""Strict HTTP/1.1 parsing: every malformed or ambiguous message is rejected (RFC 9112 §11.2).

Head errors must come as the *only* event (nothing forwardable before them), whether the bytes
arrive at once or one by one.  Body framing errors arrive after the head, but before any
EndOfMessage, so the shell aborts the forwarded message instead of completing it.
"""

from __future__ import annotations

import pytest

from tests.http1_util import only_error, requests, responses
from tproxy.http1 import (
    Body,
    EndOfMessage,
    Limits,
    ProtocolError,
    RequestHead,
    RequestParser,
    ResponseHead,
)

H = b"Host: a\r\n"


def _req(head_fields: bytes, body: bytes = b"", line: bytes = b"POST / HTTP/1.1") -> bytes:
    return line + b"\r\n" + head_fields + b"\r\n" + body


def _assert_head_rejected(data: bytes, status: int, limits: Limits | None = None) -> None:
    whole = only_error(requests([data], limits))
    assert whole.status == status, whole
    bytewise = only_error(requests([data[i : i + 1] for i in range(len(data))], limits))
    assert bytewise.status == status, bytewise


# --------------------------------------------------------------------------- request heads

HEAD_CASES = {
    # bare LF / bare CR where CRLF is required (RFC 9112 §2.2)
    "bare LF everywhere": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "bare LF after request-line": (b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    "bare LF in field line": (b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),
    "bare LF ends head": (b"GET / HTTP/1.1\r\nHost: a\r\n\n", 400),
    "bare CR in field line": (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", 400),
    "CR CR LF": (b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n", 400),
    "bare CR in request-line": (b"GET /\r HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    # obs-fold (§5.2), whitespace before colon (§5.1)
    "obs-fold SP": (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n", 400),
    "obs-fold HTAB": (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n\tc\r\n\r\n", 400),
    "first field folded": (b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400),
    "SP before colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "HTAB before colon": (b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n", 400),
    "no colon": (b"GET / HTTP/1.1\r\nHost: a\r\nXY\r\n\r\n", 400),
    "empty field name": (b"GET / HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n", 400),
    # CTLs and invalid token characters
    "NUL in value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    "SOH in value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),
    "DEL in value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n", 400),
    "NUL in name": (b"GET / HTTP/1.1\r\nHost: a\r\nX\x00Y: b\r\n\r\n", 400),
    "paren in name": (b"GET / HTTP/1.1\r\nHost: a\r\nX(Y: b\r\n\r\n", 400),
    "slash in name": (b"GET / HTTP/1.1\r\nHost: a\r\nX/Y: b\r\n\r\n", 400),
    "obs-text in name": (b"GET / HTTP/1.1\r\nHost: a\r\nX\xffY: b\r\n\r\n", 400),
    # request-line (RFC 9112 §3)
    "two spaces after method": (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "two spaces before version": (b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "trailing space": (b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400),
    "leading space": (b" GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "HTAB separator": (b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "lower-case version": (b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    "HTTP/0.9 request": (b"GET /\r\n\r\n", 400),
    "no version": (b"GET / \r\nHost: a\r\n\r\n", 400),
    "HTTP/1.2": (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
    "HTTP/2.0": (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "h2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "invalid method token": (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "method with slash": (b"GE/T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "unknown method": (b"FROB / HTTP/1.1\r\nHost: a\r\n\r\n", 501),
    "CTL in target": (b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "obs-text in target": (b"GET /a\xffb HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    # request-target forms (RFC 9112 §3.2)
    "asterisk with GET": (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "authority-form with GET": (b"GET a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "relative target": (b"GET a/b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "CONNECT not allowed": (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),
    # Host (RFC 9112 §3.2)
    "no Host in 1.1": (b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400),
    "two Host": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "two Host in 1.0": (b"GET / HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n", 400),
    "Host with space": (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    "Host with slash": (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    "Host with userinfo": (b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),
}


@pytest.mark.parametrize("data,status", HEAD_CASES.values(), ids=HEAD_CASES.keys())
def test_request_head_rejected(data: bytes, status: int) -> None:
    _assert_head_rejected(data, status)


# Content-Length / Transfer-Encoding (RFC 9112 §6.1-6.3, RFC 9110 §8.6)
FRAMING_CASES = {
    "CL and TE": (H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", 400),
    "TE and CL": (H + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", 400),
    "CL plus sign": (H + b"Content-Length: +3\r\n", 400),
    "CL minus": (H + b"Content-Length: -3\r\n", 400),
    "CL hex": (H + b"Content-Length: 0x3\r\n", 400),
    "CL list differing": (H + b"Content-Length: 3,4\r\n", 400),
    # RFC 9110 §8.6 allows accepting an identical list; we reject (decision, module docs).
    "CL list same": (H + b"Content-Length: 3, 3\r\n", 400),
    "CL list same no space": (H + b"Content-Length: 3,3\r\n", 400),
    "CL two lines same": (H + b"Content-Length: 3\r\nContent-Length: 3\r\n", 400),
    "CL two lines differing": (H + b"Content-Length: 3\r\nContent-Length: 4\r\n", 400),
    "CL inner space": (H + b"Content-Length: 3 4\r\n", 400),
    "CL empty": (H + b"Content-Length: \r\n", 400),
    "CL letters": (H + b"Content-Length: abc\r\n", 400),
    "CL overflow": (H + b"Content-Length: 999999999999999999999999\r\n", 400),
    "TE gzip alone": (H + b"Transfer-Encoding: gzip\r\n", 400),
    "TE chunked then gzip": (H + b"Transfer-Encoding: chunked, gzip\r\n", 400),
    "TE chunked twice": (H + b"Transfer-Encoding: chunked, chunked\r\n", 400),
    "TE chunked on two lines": (
        H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        400,
    ),
    "TE xchunked": (H + b"Transfer-Encoding: xchunked\r\n", 400),
    "TE chunked with parameter": (H + b"Transfer-Encoding: chunked;q=1\r\n", 400),
    "TE empty": (H + b"Transfer-Encoding: \r\n", 400),
    "TE identity": (H + b"Transfer-Encoding: identity\r\n", 400),
    "TE gzip then chunked": (H + b"Transfer-Encoding: gzip, chunked\r\n", 501),
}


@pytest.mark.parametrize("fields,status", FRAMING_CASES.values(), ids=FRAMING_CASES.keys())
def test_request_framing_rejected(fields: bytes, status: int) -> None:
    _assert_head_rejected(_req(fields, b"0\r\n\r\n"), status)


def test_transfer_encoding_in_http10_rejected() -> None:
    # RFC 9112 §6.1: faulty framing in HTTP/1.0.
    data = _req(b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n", line=b"POST / HTTP/1.0")
    _assert_head_rejected(data, 400)


def test_chunked_is_case_insensitive() -> None:
    events = requests([_req(H + b"Transfer-Encoding: ChUnKeD\r\n", b"1\r\nx\r\n0\r\n\r\n")])
    assert isinstance(events[0], RequestHead)
    assert events[1:] == [Body(b"x"), EndOfMessage()]


# --------------------------------------------------------------------------- chunk framing

CHUNK_CASES = {
    "0x prefix": b"0x3\r\nabc\r\n0\r\n\r\n",
    "plus": b"+3\r\nabc\r\n0\r\n\r\n",
    "minus": b"-3\r\nabc\r\n0\r\n\r\n",
    "underscore": b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
    "leading space": b" 3\r\nabc\r\n0\r\n\r\n",
    "trailing space": b"3 \r\nabc\r\n0\r\n\r\n",
    "trailing HTAB": b"3\t\r\nabc\r\n0\r\n\r\n",
    "empty size": b"\r\nabc\r\n0\r\n\r\n",
    "not hex": b"g\r\nabc\r\n0\r\n\r\n",
    "17 digits": b"00000000000000003\r\nabc\r\n0\r\n\r\n",
    "overflow": b"fffffffffffffffff\r\n",
    "bare LF after size": b"3\nabc\r\n0\r\n\r\n",
    "bare CR after size": b"3\rabc\r\n0\r\n\r\n",
    "bare LF after data": b"3\r\nabc\n0\r\n\r\n",
    "bare CR after data": b"3\r\nabc\r0\r\n\r\n",
    "no CRLF after data": b"3\r\nabcXY0\r\n\r\n",
    "data longer than size": b"3\r\nabcd\r\n0\r\n\r\n",
    "last chunk bare LF": b"0\n\r\n",
    "end bare LF": b"0\r\n\n",
    "ext without name": b"3;=x\r\nabc\r\n0\r\n\r\n",
    "ext unterminated quote": b'3;a="x\r\nabc\r\n0\r\n\r\n',
    "ext with space in name": b"3;a b\r\nabc\r\n0\r\n\r\n",
    "ext bare LF": b"3;a=b\nabc\r\n0\r\n\r\n",
    "ext bare CR": b"3;a=b\rc\r\nabc\r\n0\r\n\r\n",
    "ext CTL": b"3;a=\x01\r\nabc\r\n0\r\n\r\n",
    "trailer bare LF": b"0\r\nX: 1\nY: 2\r\n\r\n",
    "trailer obs-fold": b"0\r\nX: 1\r\n 2\r\n\r\n",
    "trailer SP before colon": b"0\r\nX : 1\r\n\r\n",
    "trailer no colon": b"0\r\nX\r\n\r\n",
    "trailer NUL": b"0\r\nX: a\x00\r\n\r\n",
}


@pytest.mark.parametrize("body", CHUNK_CASES.values(), ids=CHUNK_CASES.keys())
def test_request_chunk_framing_rejected(body: bytes) -> None:
    data = _req(H + b"Transfer-Encoding: chunked\r\n", body)
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        events = requests(chunks)
        assert isinstance(events[0], RequestHead)
        assert isinstance(events[-1], ProtocolError), events
        assert events[-1].status == 400
        assert not any(isinstance(e, EndOfMessage) for e in events)


def test_chunk_extensions_accepted() -> None:
    body = b'3;a=b;c="d \\" e" ; f\r\nabc\r\n0;x=y\r\nT: 1\r\n\r\n'
    events = requests([_req(H + b"Transfer-Encoding: chunked\r\n", body)])
    assert events[1:] == [Body(b"abc"), EndOfMessage(((b"T", b"1"),))]


# --------------------------------------------------------------------------- limits


def test_request_line_too_long_is_414() -> None:
    lim = Limits(max_request_line=100)
    ok = b"GET /" + b"a" * 85 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert isinstance(requests([ok], lim)[0], RequestHead)
    long = b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    _assert_head_rejected(long, 414, lim)
    # Without waiting for the rest of the head:
    err = only_error(requests([b"GET /" + b"a" * 200], lim))
    assert err.status == 414


def test_head_too_large_is_431() -> None:
    lim = Limits(max_head_size=1000)
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 1000 + b"\r\n\r\n"
    _assert_head_rejected(big, 431, lim)
    assert only_error(requests([big[:1010]], lim)).status == 431
    fits = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 900 + b"\r\n\r\n"
    assert isinstance(requests([fits], lim)[0], RequestHead)


def test_too_many_fields_is_431() -> None:
    lim = Limits(max_header_count=10)
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(10))
    _assert_head_rejected(_req(H + fields, line=b"GET / HTTP/1.1"), 431, lim)
    assert isinstance(requests([_req(fields[9:] + H, line=b"GET / HTTP/1.1")], lim)[0], RequestHead)


def test_body_limit_content_length_is_413_before_head() -> None:
    lim = Limits(max_body_size=10)
    _assert_head_rejected(_req(H + b"Content-Length: 11\r\n", b"x" * 11), 413, lim)
    events = requests([_req(H + b"Content-Length: 10\r\n", b"x" * 10)], lim)
    assert events[1:] == [Body(b"x" * 10), EndOfMessage()]


def test_body_limit_chunked_is_413() -> None:
    lim = Limits(max_body_size=10)
    body = b"6\r\nabcdef\r\n6\r\nabcdef\r\n0\r\n\r\n"
    events = requests([_req(H + b"Transfer-Encoding: chunked\r\n", body)], lim)
    assert isinstance(events[0], RequestHead)
    assert events[-1] == ProtocolError(413, "body too large")
    assert not any(isinstance(e, EndOfMessage) for e in events)


def test_chunk_line_limit() -> None:
    lim = Limits(max_chunk_line=64)
    body = b"3;" + b"a" * 100
    events = requests([_req(H + b"Transfer-Encoding: chunked\r\n", body)], lim)
    assert events[-1] == ProtocolError(400, "chunk-size line too long")


def test_trailer_limits() -> None:
    lim = Limits(max_head_size=200, max_header_count=3)
    te = H + b"Transfer-Encoding: chunked\r\n"
    big = b"0\r\nX: " + b"v" * 300
    assert requests([_req(te, big)], lim)[-1].status == 431  # type: ignore[union-attr]
    many = b"0\r\n" + b"T: 1\r\n" * 4 + b"\r\n"
    assert requests([_req(te, many)], lim)[-1].status == 431  # type: ignore[union-attr]


def test_dead_after_error() -> None:
    p = RequestParser()
    assert isinstance(p.feed(b"GET  / HTTP/1.1\r\n\r\n")[0], ProtocolError)
    assert p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == []
    assert p.resume() == []
    assert p.feed_eof() == []


# --------------------------------------------------------------------------- responses

RESPONSE_CASES = {
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "bare LF in field": b"HTTP/1.1 200 OK\r\nContent-Length: 0\nX: 1\r\n\r\n",
    "bare CR in field": b"HTTP/1.1 200 OK\r\nX: 1\rContent-Length: 0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "SP before colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "NUL in value": b"HTTP/1.1 200 OK\r\nX: a\x00\r\nContent-Length: 0\r\n\r\n",
    "bad name": b"HTTP/1.1 200 OK\r\nX{}: a\r\nContent-Length: 0\r\n\r\n",
    "4-digit status": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "status 099": b"HTTP/1.1 099 OK\r\nContent-Length: 0\r\n\r\n",
    "status 600": b"HTTP/1.1 600 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/2": b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/1.2": b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n",
    "CTL in reason": b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n",
    "double space": b"HTTP/1.1  200 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/0.9-ish": b"<html>hello</html>\r\n\r\n",
    "CL and TE": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    "CL twice": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "CL list": b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc",
    "CL plus": b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\nabc",
    "TE gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "TE gzip chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "TE chunked gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "TE twice": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
    ),
    "TE in HTTP/1.0": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunk 0x": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x1\r\na\r\n0\r\n\r\n",
    "chunk bare LF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\na\r\n0\r\n\r\n",
    "chunk data bare LF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\n0\r\n\r\n",
}


@pytest.mark.parametrize("data", RESPONSE_CASES.values(), ids=RESPONSE_CASES.keys())
def test_response_rejected_with_502(data: bytes) -> None:
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        events = responses([b"GET"], chunks, eof=True)
        assert isinstance(events[-1], ProtocolError), events
        assert events[-1].status == 502
        assert not any(isinstance(e, EndOfMessage) for e in events)


# Content-Length with Transfer-Encoding stays a 502 even there: llhttp refuses that pair while
# it reads the fields, and an origin that sends it is too broken to trust with the connection.
BODILESS_CASES = [
    (name, method, status)
    for name in ("TE gzip", "TE gzip chunked", "TE chunked gzip", "TE in HTTP/1.0")
    for method, status in ((b"HEAD", 200), (b"GET", 204), (b"GET", 304))
]


@pytest.mark.parametrize(("name", "method", "status"), BODILESS_CASES)
def test_framing_fields_do_not_spoil_a_response_that_ends_at_its_head(
    name: str, method: bytes, status: int
) -> None:
    """RFC 9112 §6.3 item 1: a response to HEAD, a 204 and a 304 end at the empty line
    "regardless of the header fields present", so Transfer-Encoding that could frame no body
    does not make them 502s; what follows is the next response."""
    head = RESPONSE_CASES[name].split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    head = head.replace(b" 200 OK", b" %d X" % status)
    nxt = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    events = responses([method, b"GET"], [head + nxt])
    assert [type(e).__name__ for e in events] == [
        "ResponseHead", "EndOfMessage", "ResponseHead", "Body", "EndOfMessage",
    ], events  # fmt: skip
    assert isinstance(events[0], ResponseHead) and events[0].status == status


def test_response_head_errors_come_alone() -> None:
    err = only_error(responses([b"GET"], [RESPONSE_CASES["obs-fold"]]))
    assert err.status == 502


def test_unsolicited_response_data() -> None:
    assert only_error(responses([], [b"HTTP/1.1 200 OK\r\n\r\n"])).status == 502
    # Extra bytes after the expected response: the connection is unusable (RFC 9112 §6.3).
    events = responses([b"GET"], [b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab"])
    assert isinstance(events[0], ResponseHead)
    assert events[1:] == [Body(b"a"), EndOfMessage(), events[-1]]
    assert isinstance(events[-1], ProtocolError)


def test_101_without_upgrade_request() -> None:
    data = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"
    assert only_error(responses([b"GET"], [data])).status == 502
    no_upgrade_field = b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    assert only_error(responses([(b"GET", True)], [no_upgrade_field])).status == 502


def test_truncated_responses_at_eof() -> None:
    cl = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc"
    assert responses([b"GET"], [cl], eof=True)[-1] == ProtocolError(
        502, "connection closed in response body"
    )
    ch = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    assert isinstance(responses([b"GET"], [ch], eof=True)[-1], ProtocolError)
    assert only_error(responses([b"GET"], [b"HTTP/1.1 200 OK\r\n"], eof=True)).status == 502
    assert only_error(responses([b"GET"], [], eof=True)).reason == (
        "connection closed before response"
    )
    assert responses([], [], eof=True) == []


def test_response_head_limit() -> None:
    lim = Limits(max_head_size=500)
    data = b"HTTP/1.1 200 OK\r\nX: " + b"v" * 600 + b"\r\nContent-Length: 0\r\n\r\n"
    assert only_error(responses([b"GET"], [data], limits=lim)).status == 502


def test_absolute_form_with_a_malformed_authority_is_400() -> None:
    from tproxy.http1 import ProtocolError, RequestParser

    (event,) = RequestParser().feed(b"GET http://[abc/x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(event, ProtocolError) and event.status == 400
