"""A close-delimited response body (RFC 9112 §6.3 item 8) stops at max_body_size exactly,
however the bytes are split, like the Content-Length and chunked framings."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.http1 import (
    Body,
    EndOfMessage,
    Event,
    Limits,
    ProtocolError,
    ResponseHead,
    ResponseParser,
)

LIMIT = 1000
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n"


def _run(body: bytes, cuts: list[int], limit: int = LIMIT) -> tuple[bytes, list[Event]]:
    """Feed head + body cut at ``cuts``, then EOF; (body bytes delivered, other events)."""
    parser = ResponseParser(Limits(max_body_size=limit))
    parser.expect(b"GET")
    stream = HEAD + body
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    events: list[Event] = []
    for a, b in itertools.pairwise(bounds):
        events.extend(parser.feed(stream[a:b]))
    events.extend(parser.feed_eof())
    data = b"".join(e.data for e in events if isinstance(e, Body))
    return data, [e for e in events if not isinstance(e, Body)]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 3 * LIMIT), st.lists(st.integers(0, 4 * LIMIT), max_size=12))
def test_close_delimited_body_stops_at_the_limit(size: int, cuts: list[int]) -> None:
    body = bytes(i % 251 for i in range(size))
    data, others = _run(body, cuts)
    assert isinstance(others[0], ResponseHead)
    if size <= LIMIT:
        assert data == body
        assert others[1:] == [EndOfMessage()]
    else:
        # Byte-exact: the first LIMIT bytes, then the error, nothing after it.
        assert data == body[:LIMIT]
        assert others[1:] == [ProtocolError(502, "body too large")]


def test_limit_reached_exactly_then_one_more_byte() -> None:
    parser = ResponseParser(Limits(max_body_size=4))
    parser.expect(b"GET")
    assert parser.feed(HEAD + b"abcd")[1:] == [Body(b"abcd")]
    # At the limit already: the next byte yields the error and no Body.
    assert parser.feed(b"e") == [ProtocolError(502, "body too large")]
    assert parser.feed(b"more") == []
    assert parser.feed_eof() == []


def test_no_limit_passes_everything() -> None:
    parser = ResponseParser(Limits(max_body_size=None))
    parser.expect(b"GET")
    events = parser.feed(HEAD + bytes(5000)) + parser.feed_eof()
    assert sum(len(e.data) for e in events if isinstance(e, Body)) == 5000
    assert events[-1] == EndOfMessage()
