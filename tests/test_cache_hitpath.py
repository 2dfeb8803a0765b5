"""The cache's fast hit path writes exactly what the general one does.

``Cache.serve_plain`` (a plain request, body in memory, head serialised once per entry) must
send the same bytes, status, result and exchange state as ``Cache.serve``; and a request routed
through ``Cache.on_request`` must get them too. The connection here only records what the
cache hands it — the bytes are what is checked.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tproxy import http1
from tproxy.cache import policy
from tproxy.cache.component import Cache
from tproxy.cache.policy import CacheEntry
from tproxy.cache.store import CacheConfig
from tproxy.httpconn import Exchange

DST = "192.0.2.10"


class _Server:
    draining = False


class Recorder:
    """The part of ClientConnection the cache's hit path writes to."""

    def __init__(self) -> None:
        self.sockname = (DST, 80)
        self.server = _Server()
        self.closed = False
        self.sent: list[tuple[bytes, int, str]] = []

    def respond_local(self, ex: Exchange, data: bytes, status: int, result: str) -> None:
        self.sent.append((data, status, result))

    def stream_local(
        self, ex: Exchange, head: bytes, body: Iterator[bytes], status: int, result: str
    ) -> None:
        self.sent.append((head + b"".join(body), status, result))


def request(raw: bytes) -> http1.RequestHead:
    events = http1.RequestParser().feed(raw)
    heads = [e for e in events if isinstance(e, http1.RequestHead)]
    assert heads, events
    return heads[0]


def store(cache: Cache, head: http1.RequestHead, status: int, lines: list[bytes], body: bytes,
          reason: bytes = b"OK") -> CacheEntry:  # fmt: skip
    now = time.time()
    key, url = cache.key_of(head.host, head.target, DST, 80, True)
    headers = [tuple(line.split(b": ", 1)) for line in lines]
    entry = policy.make_entry(
        method=b"GET", key=key, url=url, status=status, request_headers=head.headers,
        response_headers=headers, request_time=now - 1, response_time=now, reason=reason,
        body_length=len(body),
    )  # fmt: skip
    writer = cache.store.begin(entry)
    writer.write(body)
    assert writer.commit()
    found = cache.store.select(key, head.headers)
    assert found is not None
    return found


def state(ex: Exchange) -> tuple[Any, ...]:
    return ex.client_keep_alive, ex.content_type


STORED = [
    b"Date: " + policy.format_http_date(time.time() - 5),
    b"Server: origin",
    b"Content-Type: text/plain; charset=utf-8",
    b"Content-Length: %d",
    b"Age: 7",
    b"X-Cache: MISS",
    b"Connection: keep-alive",
    b"Keep-Alive: timeout=5",
    b'ETag: "abc"',
    b"Cache-Control: max-age=600",
    b"Set-Cookie2: a=b",
]

CASES = [
    (b"GET", b"1.1", b"", 200, b"x" * 1000),
    (b"HEAD", b"1.1", b"", 200, b"x" * 1000),
    (b"GET", b"1.0", b"", 200, b"y" * 10),
    (b"GET", b"1.0", b"Connection: keep-alive\r\n", 200, b"y" * 10),
    (b"GET", b"1.1", b"Connection: close\r\n", 200, b"z" * 100),
    (b"GET", b"1.1", b"", 200, b""),
    (b"GET", b"1.1", b"", 404, b"not here " * 5),
    (b"GET", b"1.1", b"", 301, b""),
]


@pytest.mark.parametrize(("method", "version", "extra", "status", "body"), CASES)
@pytest.mark.parametrize(("x_cache", "via"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("draining", [False, True])
@pytest.mark.parametrize("tier", ["memory", "disk"])
def test_serve_plain_writes_what_serve_writes(
    method: bytes, version: bytes, extra: bytes, status: int, body: bytes, x_cache: bool,
    via: bool, draining: bool, tier: str, tmp_path: Path,
) -> None:  # fmt: skip
    if tier == "memory":
        cfg = CacheConfig(disk_dir="", disk_size=0, x_cache_header=x_cache)
    else:  # bodies above 16 bytes stay on disk only and stream from their file
        cfg = CacheConfig(disk_dir=str(tmp_path), disk_size=1 << 20, memory_size=1 << 20,
                          max_memory_object_size=16, x_cache_header=x_cache)  # fmt: skip
    cache = Cache(cfg, via=via)
    raw = method + b" /a?b=1 HTTP/" + version + b"\r\nHost: example.com\r\n" + extra + b"\r\n"
    head = request(raw)
    lines = [line % len(body) if b"%d" in line else line for line in STORED]
    entry = store(cache, head, status, lines, body, reason=b"Whatever")
    out: list[tuple[tuple[bytes, int, str], tuple[Any, ...]]] = []
    for fast in (False, True, True):  # twice fast: the second time from the memoised head
        conn = Recorder()
        conn.server.draining = draining
        ex = Exchange(head, "http://example.com/a?b=1")
        age = 12.9
        if fast:
            assert cache.serve_plain(conn, ex, entry, age, None)  # type: ignore[arg-type]
        else:
            assert cache.serve(conn, ex, entry, age, None)  # type: ignore[arg-type]
        assert len(conn.sent) == 1
        out.append((conn.sent[0], state(ex)))
    assert out[1] == out[0]
    assert out[2] == out[0]
    data = out[0][0][0]
    assert b"Age: 12\r\n" in data and b"Age: 7" not in data and b"MISS" not in data
    assert (b"\r\nX-Cache: HIT\r\n" in data) == x_cache
    assert (b"\r\nVia: 1.1 tproxy\r\n" in data) == via
    assert data.endswith(b"\r\n\r\n" + (body if method == b"GET" else b""))
    on_disk = tier == "disk" and len(body) > 16
    assert out[0][0][2] == ("TCP_HIT" if on_disk else "TCP_MEM_HIT")
    assert (cache.counters.hits, cache.counters.mem_hits) == ((3, 0) if on_disk else (0, 3))


def test_on_request_fast_and_general_paths_agree() -> None:
    """A plain request takes the fast path, a conditional one the general path; both agree
    with serve() on everything but what the conditional changes."""
    cache = Cache(CacheConfig(disk_dir="", disk_size=0))
    plain = request(b"GET /p HTTP/1.1\r\nHost: " + DST.encode() + b"\r\nAccept: */*\r\n\r\n")
    body = b"q" * 300
    lines = [line % len(body) if b"%d" in line else line for line in STORED]
    entry = store(cache, plain, 200, lines, body)
    conn = Recorder()
    ex = Exchange(plain, "http://" + DST + "/p")
    assert cache.on_request(conn, ex)  # type: ignore[arg-type]
    data, status, result = conn.sent[0]
    assert (status, result) == (200, "TCP_MEM_HIT")
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(body)
    # The same bytes serve() writes for the age the hit was served with.
    age = int(data.split(b"\r\nAge: ")[1].split(b"\r\n")[0])
    ref = Recorder()
    assert cache.serve(ref, Exchange(plain, ex.url), entry, float(age), None)  # type: ignore[arg-type]
    assert ref.sent[0] == conn.sent[0]
    # A conditional request still gets its 304 from the general path.
    cond = request(
        b"GET /p HTTP/1.1\r\nHost: " + DST.encode() + b'\r\nIf-None-Match: "abc"\r\n\r\n'
    )
    conn = Recorder()
    assert cache.on_request(conn, Exchange(cond, ex.url))  # type: ignore[arg-type]
    assert conn.sent[0][1:] == (304, "TCP_IMS_HIT")
    # A Range request too.
    rng = request(b"GET /p HTTP/1.1\r\nHost: " + DST.encode() + b"\r\nRange: bytes=0-9\r\n\r\n")
    conn = Recorder()
    assert cache.on_request(conn, Exchange(rng, ex.url))  # type: ignore[arg-type]
    assert conn.sent[0][1] == 206 and conn.sent[0][0].endswith(b"\r\n\r\n" + body[:10])
    assert cache.counters.mem_hits == 3 and cache.counters.ims_hits == 1  # serve(ref) too
