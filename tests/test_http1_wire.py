"""Forwarding the received field section (``wire``) must write what rebuilding would write."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.http1_util import requests, responses
from tproxy.http1 import (
    Framing,
    RequestHead,
    ResponseHead,
    serialize_request_head,
    serialize_response_head,
)

REQUESTS = [
    b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n",
    b"GET /a HTTP/1.0\r\nHost: a\r\nConnection: Keep-Alive\r\nKeep-Alive: 5\r\nX: 1\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n"
    b"TE: trailers\r\nX-A: 1\r\n\r\n",
    b"PUT /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nProxy-Connection: keep-alive\r\n"
    b"connection: close\r\nCONNECTION: keep-alive\r\nX-B: a: b\r\n\r\nabc",
    b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: x-secret\r\nX-Secret: 1\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost:a\r\nX:  two spaces\r\nEmpty:\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: a\r\nX-Trailing: v \r\n\r\n",
]

RESPONSES = [
    b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\nKeep-Alive: t=5\r\n"
    b"Connection: close, keep-alive\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\nKeep-Alive: 1\r\n\r\n",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: x-hop\r\nX-Hop: 1\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
]


def _rebuilt(head: RequestHead | ResponseHead) -> RequestHead | ResponseHead:
    """The same head with its own header list: it no longer owns the wire, so it is rebuilt."""
    return replace(head, headers=list(head.headers))


def _request(raw: bytes) -> RequestHead:
    head = requests([raw])[0]
    assert isinstance(head, RequestHead), head
    return head


def _response(raw: bytes) -> ResponseHead:
    head = responses([b"GET"], [raw], eof=True)[0]
    assert isinstance(head, ResponseHead), head
    return head


@pytest.mark.parametrize("raw", REQUESTS)
@pytest.mark.parametrize("keep_alive", [True, False])
def test_request_wire_matches_rebuild(raw: bytes, keep_alive: bool) -> None:
    head = _request(raw)
    add = [(b"Via", b"1.1 tproxy")]
    fast = serialize_request_head(head, keep_alive=keep_alive, add=add)
    slow = serialize_request_head(_rebuilt(head), keep_alive=keep_alive, add=add)
    if b"  " in raw or b":a" in raw:
        # Spacing after a colon is forwarded as received: the same fields once parsed.
        assert _request(fast) == _request(slow)
    else:
        assert fast == slow


@pytest.mark.parametrize("raw", RESPONSES)
@pytest.mark.parametrize("peer_version", [b"1.1", b"1.0"])
@pytest.mark.parametrize("keep_alive", [True, False])
def test_response_wire_matches_rebuild(raw: bytes, peer_version: bytes, keep_alive: bool) -> None:
    head = _response(raw)
    fast = serialize_response_head(head, peer_version=peer_version, keep_alive=keep_alive)
    slow = serialize_response_head(_rebuilt(head), peer_version=peer_version, keep_alive=keep_alive)
    assert fast == slow


def test_changed_fields_are_not_taken_from_the_wire() -> None:
    head = _response(RESPONSES[0])
    changed = replace(head, headers=[(b"Server", b"other")])
    assert serialize_response_head(changed) == b"HTTP/1.1 200 OK\r\nServer: other\r\n\r\n"
    assert serialize_response_head(head, framing=Framing.CHUNKED) == (
        b"HTTP/1.1 200 OK\r\nServer: s\r\nTransfer-Encoding: chunked\r\n\r\n"
    )


_NAMES = st.sampled_from(
    [b"Host", b"X-A", b"Connection", b"Keep-Alive", b"TE", b"Trailer", b"Upgrade", b"Accept"]
)
_VALUES = st.sampled_from([b"a", b"keep-alive", b"close", b"x-a", b"a: b", b"trailers", b"1, 2"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=8), st.booleans())
def test_request_wire_property(fields: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(
        n + b": " + v + b"\r\n" for n, v in fields if n != b"Host"
    )
    head = requests([raw + b"\r\n"])[0]
    if not isinstance(head, RequestHead):
        return  # e.g. an Upgrade without Connection: upgrade is fine, but be lenient
    fast = serialize_request_head(head, keep_alive=keep_alive)
    assert fast == serialize_request_head(_rebuilt(head), keep_alive=keep_alive)
