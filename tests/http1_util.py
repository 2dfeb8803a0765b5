"""Helpers for the tproxy.http1 tests: drive parsers over byte streams."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tproxy.http1 import (
    Body,
    Event,
    Limits,
    ProtocolError,
    RequestParser,
    ResponseParser,
)


def merge(events: Iterable[Event]) -> list[Event]:
    """Join consecutive Body events: how bytes are split must not matter."""
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, Body) and out and isinstance(out[-1], Body):
            out[-1] = Body(out[-1].data + ev.data)
        elif isinstance(ev, Body) and not ev.data:
            continue
        else:
            out.append(ev)
    return out


def requests(
    chunks: Iterable[bytes], limits: Limits | None = None, eof: bool = False
) -> list[Event]:
    """Feed ``chunks`` to one RequestParser, resuming after every request like the shell does."""
    p = RequestParser(limits or Limits())
    events: list[Event] = []
    for chunk in chunks:
        events += p.feed(chunk)
        while p.paused:
            events += p.resume()
    if eof:
        events += p.feed_eof()
    return merge(events)


def responses(
    methods: Sequence[bytes | tuple[bytes, bool]],
    chunks: Iterable[bytes],
    eof: bool = False,
    limits: Limits | None = None,
) -> list[Event]:
    """Feed ``chunks`` to a ResponseParser that expects answers to ``methods``."""
    p = ResponseParser(limits or Limits())
    for m in methods:
        if isinstance(m, tuple):
            p.expect(m[0], upgrade=m[1])
        else:
            p.expect(m)
    events: list[Event] = []
    for chunk in chunks:
        events += p.feed(chunk)
    if eof:
        events += p.feed_eof()
    return merge(events)


def only_error(events: Sequence[Event]) -> ProtocolError:
    """The request was rejected before anything forwardable was produced."""
    assert len(events) == 1, events
    err = events[0]
    assert isinstance(err, ProtocolError), events
    return err


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out: list[bytes] = []
    prev = 0
    for c in [*points, len(data)]:
        out.append(data[prev:c])
        prev = c
    return out
