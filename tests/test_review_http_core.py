"""Adversarial review of the pure HTTP/1.1 core: cases found while reviewing the HTTP path."""

from __future__ import annotations

import pytest

from tproxy.http1 import (
    Body,
    EndOfMessage,
    Informational,
    ProtocolError,
    ResponseHead,
    ResponseParser,
    origin_form,
)


@pytest.mark.parametrize(
    ("method", "response"),
    [
        (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello"),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello"),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ],
)
def test_bytes_after_a_bodiless_response_make_the_connection_unusable(
    method: bytes, response: bytes
) -> None:
    """RFC 9112 §6.3 items 1-2: the response ends at its head.  What follows answers nothing,
    and the connection must not be pooled: ``reusable`` is False although nothing is pending."""
    p = ResponseParser()
    p.expect(method)
    events = p.feed(response)
    assert isinstance(events[0], ResponseHead)
    assert events[1] == EndOfMessage()
    assert isinstance(events[2], ProtocolError)
    assert p.pending == 0
    assert not p.reusable


def test_a_clean_exchange_leaves_the_parser_reusable() -> None:
    p = ResponseParser()
    p.expect(b"HEAD")
    assert not p.reusable  # a response is expected
    events = p.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert [type(e) for e in events] == [ResponseHead, EndOfMessage]
    assert p.reusable
    p.expect(b"GET")
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    assert not p.reusable  # mid-body
    p.feed(b"cd")
    assert p.reusable
    assert p.feed_eof() == []
    assert not p.reusable  # the origin closed


def test_103_early_hints_then_the_final_response() -> None:
    """RFC 8297 / RFC 9110 §15.2: any number of interim responses precede the final one."""
    p = ResponseParser()
    p.expect(b"GET")
    events = p.feed(
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    assert [type(e) for e in events] == [Informational, Informational, ResponseHead, Body,
                                          EndOfMessage]  # fmt: skip
    first = events[0]
    assert isinstance(first, Informational)
    assert first.status == 103 and first.headers == [(b"Link", b"</s.css>; rel=preload")]
    assert p.reusable


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"http://a.test/p?q=1", (b"a.test", b"/p?q=1")),
        (b"http://a.test", (b"a.test", b"/")),  # RFC 9112 §3.2.1: empty path → "/"
        (b"http://a.test?q", (b"a.test", b"/?q")),
        (b"http://user:pw@a.test:8080/x", (b"a.test:8080", b"/x")),
        (b"HTTP://[2001:db8::1]:81/x#frag", (b"[2001:db8::1]:81", b"/x")),
        (b"/p", None),
        (b"*", None),
        (b"/redirect?to=http://b.test/", None),
    ],
)
def test_origin_form_of_a_target(target: bytes, expected: tuple[bytes, bytes] | None) -> None:
    assert origin_form(target) == expected
