"""Adversarial review of the kernel relay of response bodies (tproxy.splice in httpconn).

Each case runs the daemon's ``Server`` in-process with real loopback sockets
(tests.test_review_http_shell's rig), under uvloop (the daemon's loop) and asyncio's own, and
attacks one edge of a spliced body: what may not splice (HEAD, 304), what comes before or after
it (1xx, a pipelined request, a half-close), timeouts while it runs, a client that stops
reading, an origin that trickles or resets, running out of descriptors, shutdown.
"""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy import http1
from tproxy.http1 import Body, EndOfMessage
from tproxy.splice import SPLICE_MIN

BIG = 2 * SPLICE_MIN + 777


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# ------------------------------------------------------------------ chunk framing (pure)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_chunk_pieces_frame_what_the_parser_reads_back(pieces: list[bytes]) -> None:
    """The pieces of each chunk, sent as they are (a gather write) or joined
    (encode_chunk), are one chunked body the response parser reads back unchanged."""
    assert all(http1.encode_chunk(p) == b"".join(http1.chunk_pieces(p)) for p in pieces)
    wire = b"".join(b"".join(http1.chunk_pieces(p)) for p in pieces) + http1.LAST_CHUNK
    parser = http1.ResponseParser()
    parser.expect(b"GET")
    events = parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + wire)
    assert b"".join(e.data for e in events if isinstance(e, Body)) == b"".join(pieces)
    assert isinstance(events[-1], EndOfMessage)


def test_an_empty_piece_is_no_chunk_at_all() -> None:
    """A zero-size chunk is the last chunk (RFC 9112 §7.1): empty data must frame to nothing."""
    assert http1.chunk_pieces(b"") == (b"", b"", b"")
    assert http1.chunk_pieces(b"\x00" * 26) == (b"1a\r\n", b"\x00" * 26, b"\r\n")
