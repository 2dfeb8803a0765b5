"""Property tests: how a byte stream is split into feeds must never change the events."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.http1_util import merge, requests, responses, split_at
from tproxy.http1 import (
    Body,
    EndOfMessage,
    Event,
    ProtocolError,
    RequestHead,
    ResponseHead,
    encode_chunk,
    encode_last_chunk,
    serialize_request_head,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_TCHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~"
tokens = st.text(_TCHARS, min_size=1, max_size=12).map(str.encode)
# Field values: visible ASCII with inner spaces; no leading/trailing whitespace.
values = st.from_regex(r"\A([!-~]([ !-~]{0,20}[!-~])?)?\Z", fullmatch=True).map(str.encode)
fields = st.lists(st.tuples(tokens.map(lambda t: b"X-" + t), values), max_size=6)
paths = st.from_regex(r"\A/[A-Za-z0-9._~%/?=&-]{0,30}\Z", fullmatch=True).map(str.encode)
chunk_ext = st.sampled_from([b"", b";a", b";a=b", b';q="x y"', b" ; n = v"])


@dataclass
class Message:
    raw: bytes
    body: bytes
    trailers: list[tuple[bytes, bytes]]


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """(framing fields, encoded body, trailers) for a random body."""
    kind = draw(st.sampled_from(["none", "length", "chunked"]))
    if kind == "none":
        return b"", b"", []
    data = draw(st.binary(max_size=200))
    if kind == "length":
        return b"Content-Length: %d\r\n" % len(data), data, []
    pieces = draw(st.lists(st.binary(min_size=1, max_size=50), max_size=5))
    encoded = b""
    for p in pieces:
        hexsize = draw(st.sampled_from(["%x", "%X", "0%x"])) % len(p)
        encoded += hexsize.encode() + draw(chunk_ext) + b"\r\n" + p + b"\r\n"
    trailers = draw(st.lists(st.tuples(tokens.map(lambda t: b"T-" + t), values), max_size=2))
    encoded += encode_last_chunk(trailers)[:-2] if trailers else b"0\r\n"
    encoded += b"\r\n"
    return b"Transfer-Encoding: chunked\r\n", encoded, trailers


@st.composite
def request_messages(draw: st.DrawFn) -> Message:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]))
    framing, body, trailers = draw(bodies())
    head = method + b" " + draw(paths) + b" HTTP/1.1\r\nHost: h.example\r\n"
    head += b"".join(n + b": " + v + b"\r\n" for n, v in draw(fields)) + framing + b"\r\n"
    lead = draw(st.sampled_from([b"", b"\r\n"]))
    payload = body
    if framing.startswith(b"Transfer"):
        # Recover the payload bytes from the encoding we built (checked against the parser).
        payload = b"".join(e.data for e in requests([head + body]) if isinstance(e, Body))
    return Message(lead + head + body, payload, trailers)


@st.composite
def response_messages(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    """(raw response, method it answers, has body bytes on the wire)."""
    status = draw(st.sampled_from([200, 201, 204, 304, 404, 500]))
    method = draw(st.sampled_from([b"GET", b"GET", b"HEAD", b"POST"]))
    interim = draw(
        st.sampled_from([b"", b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 EH\r\n\r\n"])
    )
    framing, body, _ = draw(bodies())
    if not framing:
        framing = b"Content-Length: 0\r\n"
    wire = body if status not in (204, 304) and method != b"HEAD" else b""
    head = b"HTTP/1.1 %d R\r\n" % status
    head += b"".join(n + b": " + v + b"\r\n" for n, v in draw(fields)) + framing + b"\r\n"
    return interim + head + wire, method, bool(wire)


def _strip_error(events: list[Event]) -> tuple[list[Event], bool]:
    if events and isinstance(events[-1], ProtocolError):
        return events[:-1], True
    return events, False


@SETTINGS
@given(st.lists(request_messages(), min_size=1, max_size=4), st.lists(st.integers(0, 10**6)))
def test_request_stream_split_invariant(msgs: list[Message], cuts: list[int]) -> None:
    stream = b"".join(m.raw for m in msgs)
    whole = requests([stream], eof=True)
    assert whole == requests(split_at(stream, cuts), eof=True)
    assert whole == requests([stream[i : i + 1] for i in range(len(stream))], eof=True)
    heads = [e for e in whole if isinstance(e, RequestHead)]
    assert len(heads) == len(msgs)
    # Per message: head, merged body (if any), end of message with the trailers sent.
    it = iter(whole)
    for m in msgs:
        head = next(it)
        assert isinstance(head, RequestHead)
        ev = next(it)
        if m.body:
            assert ev == Body(m.body)
            ev = next(it)
        assert ev == EndOfMessage(tuple(m.trailers))
        # Serialize round trip: the forwarded head parses back to the same head.
        again = requests([serialize_request_head(head)])[0]
        assert again == head


@SETTINGS
@given(st.lists(response_messages(), min_size=1, max_size=4), st.lists(st.integers(0, 10**6)))
def test_response_stream_split_invariant(
    msgs: list[tuple[bytes, bytes, bool]], cuts: list[int]
) -> None:
    stream = b"".join(m[0] for m in msgs)
    methods = [m[1] for m in msgs]
    whole = responses(methods, [stream], eof=True)
    assert whole == responses(methods, split_at(stream, cuts), eof=True)
    assert whole == responses(methods, [stream[i : i + 1] for i in range(len(stream))], eof=True)
    assert not any(isinstance(e, ProtocolError) for e in whole), whole
    assert sum(isinstance(e, ResponseHead) for e in whole) == len(msgs)
    assert sum(isinstance(e, EndOfMessage) for e in whole) == len(msgs)


@SETTINGS
@given(
    st.lists(request_messages(), min_size=1, max_size=2),
    st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=3)), min_size=1, max_size=3),
    st.lists(st.integers(0, 10**6)),
)
def test_mutated_requests_never_crash(
    msgs: list[Message], edits: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(m.raw for m in msgs)
    for at, repl in edits:
        at %= len(stream) + 1
        stream = stream[:at] + repl + stream[at + len(repl) % 2 :]
    whole, whole_err = _strip_error(requests([stream], eof=True))
    split, split_err = _strip_error(requests(split_at(stream, cuts), eof=True))
    # Error statuses may differ (an early bare-LF check vs. a later version check), but the
    # events before the error and whether there is one must not.
    assert (whole, whole_err) == (split, split_err)
    assert merge(whole) == whole


@SETTINGS
@given(st.binary(max_size=300), st.lists(st.integers(0, 10**6)))
def test_arbitrary_bytes_never_crash(data: bytes, cuts: list[int]) -> None:
    for methods in ([b"GET"], [(b"GET", True), b"HEAD"]):
        whole, whole_err = _strip_error(responses(methods, [data], eof=True))
        split, split_err = _strip_error(responses(methods, split_at(data, cuts), eof=True))
        assert (whole, whole_err) == (split, split_err)
    _, err = _strip_error(requests([data], eof=True))
    _, err2 = _strip_error(requests(split_at(data, cuts), eof=True))
    assert err == err2


def test_encode_chunk_round_trip() -> None:
    pieces = [b"a", b"", b"b" * 300, bytes(range(256))]
    body = b"".join(encode_chunk(p) for p in pieces) + encode_last_chunk()
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert requests([head + body])[1:] == [Body(b"".join(pieces)), EndOfMessage()]
