"""Valid HTTP/1.1 messages: heads, bodies, pipelining, pausing, interim responses, upgrades."""

from __future__ import annotations

from tests.http1_util import requests, responses
from tproxy.http1 import (
    Body,
    BodyKind,
    EndOfMessage,
    Informational,
    Limits,
    ProtocolError,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    Tunnel,
    header_value,
)

EOM = EndOfMessage()


def _head(data: bytes, limits: Limits | None = None) -> RequestHead:
    ev = requests([data], limits)[0]
    assert isinstance(ev, RequestHead), ev
    return ev


# --------------------------------------------------------------------------- requests


def test_simple_get() -> None:
    p = RequestParser()
    events = p.feed(b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n")
    head, eom = events
    assert head == RequestHead(
        method=b"GET",
        target=b"/a?b=c",
        version=b"1.1",
        headers=[(b"Host", b"example.com"), (b"Accept", b"*/*")],
        keep_alive=True,
        body_kind=BodyKind.NONE,
        content_length=None,
        upgrade=False,
        expect_continue=False,
        host=b"example.com",
        connection=frozenset(),
    )
    assert eom == EOM
    assert p.paused


def test_field_values_trimmed_and_names_kept() -> None:
    head = _head(
        b"GET / HTTP/1.1\r\nhOsT:   a.b  \r\nX-Empty:\r\nX-Sp: \t \r\nX-In: a  b\t\r\n\r\n"
    )
    assert head.headers == [
        (b"hOsT", b"a.b"),
        (b"X-Empty", b""),
        (b"X-Sp", b""),
        (b"X-In", b"a  b"),
    ]
    assert head.host == b"a.b"
    assert header_value(head.headers, b"x-in") == b"a  b"
    assert header_value(head.headers, b"missing") is None


def test_obs_text_in_value_accepted() -> None:
    # RFC 9110 §5.5: obs-text is allowed in field values.
    assert _head(b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xe9\r\n\r\n").headers[1] == (
        b"X",
        b"caf\xe9",
    )


def test_content_length_body() -> None:
    data = b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    head, body, eom = requests([data])
    assert isinstance(head, RequestHead)
    assert (head.body_kind, head.content_length) == (BodyKind.LENGTH, 5)
    assert body == Body(b"hello")
    assert eom == EOM


def test_content_length_zero() -> None:
    data = b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
    head, eom = requests([data])
    assert isinstance(head, RequestHead)
    assert (head.body_kind, head.content_length, eom) == (BodyKind.LENGTH, 0, EOM)


def test_chunked_with_extensions_and_trailers() -> None:
    data = (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b"5;name=val\r\nhello\r\n"
        b"6\r\n world\r\n"
        b"A\r\n0123456789\r\n"
        b"0\r\nX-Sum: 42 \r\nX-Other:x\r\n\r\n"
    )
    head, body, eom = requests([data])
    assert isinstance(head, RequestHead) and head.body_kind is BodyKind.CHUNKED
    assert body == Body(b"hello world0123456789")
    assert eom == EndOfMessage(((b"X-Sum", b"42"), (b"X-Other", b"x")))


def test_chunked_sizes_hex_case_and_leading_zeros() -> None:
    body = b"0000a\r\n" + b"x" * 10 + b"\r\nB\r\n" + b"y" * 11 + b"\r\n000\r\n\r\n"
    data = b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    assert requests([data])[1:] == [Body(b"x" * 10 + b"y" * 11), EOM]


def test_keep_alive_rules() -> None:
    assert _head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").keep_alive
    assert not _head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive
    h10 = _head(b"GET / HTTP/1.0\r\n\r\n")
    assert (h10.keep_alive, h10.version, h10.host) == (False, b"1.0", None)
    assert _head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive
    multi = _head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: X-A, close\r\nConnection: x-b\r\n\r\n")
    assert multi.connection == frozenset({b"x-a", b"close", b"x-b"})
    assert not multi.keep_alive


def test_target_forms() -> None:
    assert _head(b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n").target == (
        b"http://a.example/x"
    )
    assert _head(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").target == b"*"
    connect = _head(
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n", Limits(allow_connect=True)
    )
    assert (connect.method, connect.upgrade, connect.body_kind) == (
        b"CONNECT",
        True,
        BodyKind.NONE,
    )


def test_connect_needs_authority_form_when_allowed() -> None:
    events = requests([b"CONNECT /x HTTP/1.1\r\nHost: a\r\n\r\n"], Limits(allow_connect=True))
    assert events == [ProtocolError(400, "CONNECT needs authority-form target")]


def test_upgrade_and_expect_flags() -> None:
    up = _head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert up.upgrade
    # Upgrade without the "upgrade" connection option is not an upgrade (RFC 9110 §7.8).
    assert not _head(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n").upgrade
    h10 = b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    assert not _head(h10).upgrade
    exp = b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n"
    assert _head(exp).expect_continue
    assert not _head(exp.replace(b"1.1", b"1.0")).expect_continue


def test_leading_empty_lines_ignored() -> None:
    # RFC 9112 §2.2: ignore at least one empty line before a request-line.
    events = requests([b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n\r\n"], eof=True)
    assert isinstance(events[0], RequestHead) and events[1:] == [EOM]


def test_unusual_but_valid_methods() -> None:
    for method in (b"PROPFIND", b"PATCH", b"PURGE", b"MKCOL", b"SEARCH"):
        assert _head(method + b" / HTTP/1.1\r\nHost: a\r\n\r\n").method == method


# --------------------------------------------------------------------------- pausing


def test_pipelined_requests_pause_after_each() -> None:
    p = RequestParser()
    stream = (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\nGET /4"
    )
    first = p.feed(stream)
    assert [type(e) for e in first] == [RequestHead, EndOfMessage]
    assert first[0].target == b"/1"  # type: ignore[union-attr]
    assert p.paused
    assert p.feed(b" HTTP/1.1\r\nHost: a\r\n\r\n") == []  # buffered while paused
    second = p.resume()
    assert [type(e) for e in second] == [RequestHead, Body, EndOfMessage]
    third = p.resume()
    assert third[0].target == b"/3"  # type: ignore[union-attr]
    fourth = p.resume()
    assert fourth[0].target == b"/4"  # type: ignore[union-attr]
    assert p.paused and p.buffered == 0
    assert p.resume() == []
    assert not p.paused
    assert p.feed_eof() == []


def test_resume_with_partial_request() -> None:
    p = RequestParser()
    p.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\n")
    assert p.resume() == []
    assert not p.paused
    events = p.feed(b"Host: a\r\n\r\n")
    assert events[0].target == b"/2"  # type: ignore[union-attr]


def test_eof_while_paused_reported_on_resume() -> None:
    p = RequestParser()
    p.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HT")
    assert p.feed_eof() == []
    assert p.resume() == [ProtocolError(400, "connection closed in request head")]


def test_eof_in_body() -> None:
    data = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nabc"
    events = requests([data], eof=True)
    assert events[-1] == ProtocolError(400, "connection closed in request body")


def test_into_tunnel_returns_buffered_bytes() -> None:
    p = RequestParser()
    events = p.feed(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05"
    )
    assert events[0].upgrade and events[1] == EOM  # type: ignore[union-attr]
    p.feed(b"hello")
    assert p.into_tunnel() == b"\x81\x05hello"
    assert p.feed(b"more") == []


def test_large_body_streams_without_copying_whole_feeds() -> None:
    p = RequestParser()
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 300000\r\n\r\n")
    chunk = b"z" * 100000
    for _ in range(3):
        (ev,) = p.feed(chunk)[:1]
        assert isinstance(ev, Body) and ev.data is chunk
    assert p.paused


# --------------------------------------------------------------------------- responses


def test_response_content_length() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nServer: x\r\n\r\nabc"
    head, body, eom = responses([b"GET"], [data])
    assert head == ResponseHead(
        status=200,
        reason=b"OK",
        version=b"1.1",
        headers=[(b"Content-Length", b"3"), (b"Server", b"x")],
        keep_alive=True,
        body_kind=BodyKind.LENGTH,
        content_length=3,
        connection=frozenset(),
    )
    assert (body, eom) == (Body(b"abc"), EOM)


def test_response_chunked_with_trailers() -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;x\r\nWiki\r\n5\r\npedia\r\n0\r\nExpires: never\r\n\r\n"
    )
    head, body, eom = responses([b"GET"], [data])
    assert isinstance(head, ResponseHead) and head.body_kind is BodyKind.CHUNKED
    assert body == Body(b"Wikipedia")
    assert eom == EndOfMessage(((b"Expires", b"never"),))


def test_close_delimited_response_ends_at_eof() -> None:
    p = ResponseParser()
    p.expect(b"GET")
    head, body = p.feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nsome")
    assert body == Body(b"some")
    assert isinstance(head, ResponseHead)
    assert (head.body_kind, head.keep_alive) == (BodyKind.CLOSE, False)
    assert p.feed(b" data") == [Body(b" data")]
    assert p.feed_eof() == [EOM]
    assert p.pending == 0


def test_http10_response() -> None:
    data = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx"
    head = responses([b"GET"], [data])[0]
    assert isinstance(head, ResponseHead)
    assert (head.version, head.keep_alive) == (b"1.0", True)
    head = responses([b"GET"], [b"HTTP/1.0 200 OK\r\n\r\nx"], eof=True)[0]
    assert isinstance(head, ResponseHead) and not head.keep_alive


def test_head_response_has_no_body() -> None:
    # RFC 9112 §6.3 item 1: Content-Length of a HEAD response describes the GET body.
    stream = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    events = responses([b"HEAD", b"HEAD", b"GET"], [stream])
    kinds = [type(e) for e in events]
    assert kinds == [ResponseHead, EndOfMessage] * 2 + [ResponseHead, Body, EndOfMessage]
    assert events[0].content_length == 1000  # type: ignore[union-attr]
    assert events[0].body_kind is BodyKind.NONE  # type: ignore[union-attr]
    assert events[-2] == Body(b"ok")


def test_204_and_304_have_no_body() -> None:
    stream = (
        b"HTTP/1.1 204 No Content\r\n\r\n"
        b'HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\nETag: "x"\r\n\r\n'
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!"
    )
    events = responses([b"GET", b"GET", b"GET"], [stream])
    assert [getattr(e, "status", None) for e in events if isinstance(e, ResponseHead)] == [
        204,
        304,
        200,
    ]
    assert events[-2:] == [Body(b"!"), EOM]
    assert sum(isinstance(e, EndOfMessage) for e in events) == 3


def test_100_continue_then_final_response() -> None:
    p = ResponseParser()
    p.expect(b"PUT")
    events = p.feed(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    )
    assert events[0] == Informational(100, b"Continue", [], frozenset())
    assert events[1] == Informational(
        103, b"Early Hints", [(b"Link", b"</s.css>; rel=preload")], frozenset()
    )
    assert isinstance(events[2], ResponseHead) and events[2].status == 201
    assert events[3] == EOM
    assert p.pending == 0


def test_101_upgrade_then_opaque_bytes() -> None:
    p = ResponseParser()
    p.expect(b"GET", upgrade=True)
    events = p.feed(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"\x81\x02hi HTTP/1.1 200 OK\r\n\r\n"
    )
    assert events == [
        Informational(
            101,
            b"Switching Protocols",
            [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
            frozenset({b"upgrade"}),
        ),
        Tunnel(b"\x81\x02hi HTTP/1.1 200 OK\r\n\r\n"),
    ]
    assert p.feed(b"more") == []


def test_declined_upgrade_continues_as_http() -> None:
    stream = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno"
    events = responses([(b"GET", True)], [stream])
    assert isinstance(events[0], ResponseHead) and events[1:] == [Body(b"no"), EOM]


def test_connect_2xx_becomes_tunnel_and_error_does_not() -> None:
    ok = b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x01"
    events = responses([(b"CONNECT", True)], [ok])
    assert isinstance(events[0], ResponseHead) and events[0].body_kind is BodyKind.NONE
    assert events[1] == Tunnel(b"\x16\x03\x01")
    denied = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"
    events = responses([(b"CONNECT", True)], [denied])
    assert events[1:] == [Body(b"no"), EOM]


def test_pipelined_responses_follow_fifo() -> None:
    stream = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nc\r\n0\r\n\r\n"
    )
    events = responses([b"GET", b"HEAD", b"GET"], [stream])
    bodies = [e for e in events if isinstance(e, Body)]
    assert bodies == [Body(b"a"), Body(b"c")]
    assert sum(isinstance(e, EndOfMessage) for e in events) == 3


def test_response_reason_optional() -> None:
    for line in (b"HTTP/1.1 200\r\n", b"HTTP/1.1 200 \r\n"):
        head = responses([b"GET"], [line + b"Content-Length: 0\r\n\r\n"])[0]
        assert isinstance(head, ResponseHead) and head.reason == b""
