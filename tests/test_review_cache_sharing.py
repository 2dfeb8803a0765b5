"""What a shared cache must not share (review of the cache against RFC 9111, session 6).

Each test drives ``Cache.on_request`` / ``on_response`` the way the proxy does, with a
connection that only records what the cache answers, and checks what a second client gets.
"""

from __future__ import annotations

from tests.test_cache_hitpath import Recorder, request
from tproxy import http1
from tproxy.cache import policy
from tproxy.cache.component import Cache
from tproxy.cache.store import CacheConfig
from tproxy.httpconn import Exchange
from tproxy.uri import effective_url, request_origin

VICTIM = "198.51.100.7"
ATTACKER = "203.0.113.5"


def new_cache() -> Cache:
    cache = Cache(CacheConfig(disk_dir="", disk_size=0))
    cache.verifier.addresses["victim.example"] = frozenset({VICTIM})
    return cache


def client(ip: str, port: int = 80) -> Recorder:
    conn = Recorder()
    conn.sockname = (ip, port)
    return conn


def response(raw: bytes, method: bytes = b"GET") -> http1.ResponseHead:
    parser = http1.ResponseParser()
    parser.expect(method)
    return next(e for e in parser.feed(raw) if isinstance(e, http1.ResponseHead))


def exchange(
    cache: Cache, conn: Recorder, raw: bytes, answer: bytes | None = None, body: bytes = b""
) -> bool:
    """One request through the cache; when it goes upstream and ``answer`` is given, that
    response (and ``body``) comes back through ``on_response``. True: the cache answered,
    from the store or after its own revalidation."""
    head = request(raw)
    ex = Exchange(head, effective_url(head.target, head.host, conn.sockname[0]))
    if cache.on_request(conn, ex):  # type: ignore[arg-type]
        return True
    if answer is None:
        return False
    if cache.on_response(conn, ex, response(answer, head.method)):  # type: ignore[arg-type]
        return True  # answered from the stored response (a 304 to the cache's revalidation)
    if ex.sink is not None:
        ex.sink.data(body)
        ex.sink.end(())
    if ex.on_finish is not None:
        ex.on_finish(ex)
    return False


FOR_A_DAY = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=86400\r\nContent-Length: 4\r\n\r\n"


def test_absolute_form_cannot_plant_a_response_under_another_hosts_url() -> None:
    # RFC 9112 §3.2.2: the absolute-form's authority, not Host, names the target, and it is
    # what the cache key is built from; so it is what must match the real destination.
    cache = new_cache()
    attacker = client(ATTACKER)
    raw = b"GET http://victim.example/app.js HTTP/1.1\r\nHost: " + ATTACKER.encode() + b"\r\n\r\n"
    assert not exchange(cache, attacker, raw, FOR_A_DAY, b"EVIL")
    victim = client(VICTIM)
    assert not exchange(cache, victim, b"GET /app.js HTTP/1.1\r\nHost: victim.example\r\n\r\n")
    assert victim.sent == []
    # The planted copy answers only requests to the attacker's own address.
    again = client(ATTACKER)
    assert exchange(cache, again, raw)
    assert again.sent[0][0].endswith(b"EVIL")


def test_absolute_form_to_its_real_destination_is_shared() -> None:
    cache = new_cache()
    raw = b"GET http://victim.example/a.css HTTP/1.1\r\nHost: victim.example\r\n\r\n"
    assert not exchange(cache, client(VICTIM), raw, FOR_A_DAY, b"GOOD")
    other = client(VICTIM)
    assert exchange(cache, other, b"GET /a.css HTTP/1.1\r\nHost: victim.example\r\n\r\n")
    assert other.sent[0][0].endswith(b"GOOD")


def test_a_verified_name_on_another_port_is_not_shared_with_port_80() -> None:
    # The name resolving to the address says nothing about which service answered.
    cache = new_cache()
    raw = b"GET /x HTTP/1.1\r\nHost: victim.example\r\n\r\n"
    assert not exchange(cache, client(VICTIM, 8080), raw, FOR_A_DAY, b"P808")
    web = client(VICTIM, 80)
    assert not exchange(cache, web, raw)
    assert web.sent == []
    assert request_origin("http", b"victim.example", b"/x") == ("victim.example", 80)
    assert request_origin("http", b"victim.example:8080", b"/x") == ("victim.example", 8080)
    assert request_origin("http", b"x", b"http://[::1]:81/") == ("[::1]", 81)


ETAGGED = b'HTTP/1.1 200 OK\r\nCache-Control: max-age=0\r\nETag: "1"\r\nContent-Length: 4\r\n\r\n'


def test_a_private_304_is_not_merged_into_the_shared_copy() -> None:
    # RFC 9111 §4.3.4 merges the 304's fields into the stored response; one that makes it
    # private (and carries a per-user field) answers its own request only.
    cache = new_cache()
    get = b"GET /p HTTP/1.1\r\nHost: victim.example\r\n\r\n"
    assert not exchange(cache, client(VICTIM), get, ETAGGED, b"pub!")
    alice = client(VICTIM)
    not_modified = (
        b'HTTP/1.1 304 Not Modified\r\nETag: "1"\r\n'
        b"Cache-Control: private, max-age=600\r\nX-User-Token: alice-secret\r\n\r\n"
    )
    alices = b"GET /p HTTP/1.1\r\nHost: victim.example\r\nCookie: sid=alice\r\n\r\n"
    assert exchange(cache, alice, alices, not_modified)
    assert alice.sent[0][2] == "TCP_REFRESH_UNMODIFIED"
    assert b"alice-secret" in alice.sent[0][0] and alice.sent[0][0].endswith(b"pub!")
    bob = client(VICTIM)
    assert not exchange(cache, bob, get)
    assert bob.sent == []


def test_a_304_that_keeps_the_response_shareable_still_refreshes_it() -> None:
    cache = new_cache()
    get = b"GET /q HTTP/1.1\r\nHost: victim.example\r\n\r\n"
    assert not exchange(cache, client(VICTIM), get, ETAGGED, b"pub!")
    fresh = b'HTTP/1.1 304 Not Modified\r\nETag: "1"\r\nCache-Control: max-age=600\r\n\r\n'
    assert exchange(cache, client(VICTIM), get, fresh)
    bob = client(VICTIM)
    assert exchange(cache, bob, get)
    assert bob.sent[0][2] == "TCP_MEM_HIT"


def test_a_private_head_response_drops_the_stored_get() -> None:
    # RFC 9111 §4.3.5: a HEAD response updates the stored GET as a 304 does.
    cache = new_cache()
    get = b"GET /h HTTP/1.1\r\nHost: victim.example\r\n\r\n"
    assert not exchange(cache, client(VICTIM), get, FOR_A_DAY, b"body")
    head = b"HEAD /h HTTP/1.1\r\nHost: victim.example\r\nCache-Control: no-cache\r\n\r\n"
    answer = (
        b"HTTP/1.1 200 OK\r\nCache-Control: private, max-age=600\r\n"
        b"X-User-Token: alice-secret\r\nContent-Length: 4\r\n\r\n"
    )
    assert not exchange(cache, client(VICTIM), head, answer)
    bob = client(VICTIM)
    assert not exchange(cache, bob, get)
    assert bob.sent == []


def test_if_match_and_if_unmodified_since_go_to_the_origin() -> None:
    # RFC 9111 §4.3.2: these two are "not applicable to a cache".
    cache = new_cache()
    get = b"GET /m HTTP/1.1\r\nHost: victim.example\r\n"
    stored = (
        b'HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nETag: "a"\r\n'
        b"Last-Modified: Sun, 01 Nov 2026 00:00:00 GMT\r\nContent-Length: 4\r\n\r\n"
    )
    assert not exchange(cache, client(VICTIM), get + b"\r\n", stored, b"body")
    for extra in (b'If-Match: "zzz"', b"If-Unmodified-Since: Sun, 01 Nov 2020 00:00:00 GMT"):
        conn = client(VICTIM)
        assert not exchange(cache, conn, get + extra + b"\r\n\r\n"), extra
        assert conn.sent == []
    hit = client(VICTIM)
    assert exchange(cache, hit, get + b'If-None-Match: "a"\r\n\r\n')
    assert hit.sent[0][1] == 304


def test_a_cached_204_has_no_content_length() -> None:
    cache = new_cache()
    get = b"GET /n HTTP/1.1\r\nHost: victim.example\r\n\r\n"
    empty = b"HTTP/1.1 204 No Content\r\nCache-Control: max-age=600\r\n\r\n"
    assert not exchange(cache, client(VICTIM), get, empty)
    conn = client(VICTIM)
    assert exchange(cache, conn, get)
    head = conn.sent[0][0]
    assert head.startswith(b"HTTP/1.1 204 ") and b"content-length" not in head.lower()
    assert policy.storable(b"GET", [], 204, [(b"Cache-Control", b"max-age=600")])[0]


def test_a_revalidation_for_one_client_does_not_drop_the_shared_copy() -> None:
    # Only the response's own fields decide whether the refreshed copy stays shared: a client
    # that sends Authorization or no-store (and no-cache, to make the cache revalidate) must
    # not throw it away for everybody.
    for extra in (b"Authorization: Basic eDp5\r\n", b"Cache-Control: no-store, no-cache\r\n"):
        cache = new_cache()
        get = b"GET /s HTTP/1.1\r\nHost: victim.example\r\n"
        assert not exchange(cache, client(VICTIM), get + b"\r\n", ETAGGED, b"pub!")
        fresh = b'HTTP/1.1 304 Not Modified\r\nETag: "1"\r\nCache-Control: max-age=600\r\n\r\n'
        exchange(
            cache, client(VICTIM), get + b"Cache-Control: no-cache\r\n" + extra + b"\r\n", fresh
        )
        bob = client(VICTIM)
        assert exchange(cache, bob, get + b"\r\n"), extra
        assert bob.sent[0][2] == "TCP_MEM_HIT"


def test_a_reload_changes_the_fields_hits_carry() -> None:
    import asyncio
    import dataclasses

    from tproxy import config

    cache = new_cache()
    assert cache.own == ()
    cfg = config.with_overrides(config.load(None), via=True)
    section = CacheConfig(disk_dir="", disk_size=0, x_cache_header=True)
    cfg = dataclasses.replace(cfg, sections={**cfg.sections, "cache": section})
    asyncio.run(cache.reload(None, cfg))  # type: ignore[arg-type]
    assert cache.own == ((b"X-Cache", b"HIT"), (b"Via", b"1.1 tproxy"))
