"""Adversarial review of tproxy.cache.policy: RFC 9111 corners the first tests did not reach."""

from __future__ import annotations

from tproxy.cache import policy
from tproxy.cache.component import _hit_head
from tproxy.cache.policy import CacheEntry, Fields, Kind

NOW = 1_700_000_000.0


def served_fields(e: CacheEntry, age: float) -> list[tuple[bytes, bytes]]:
    """The fields of the head the cache answers a hit with (the production builder)."""
    prefix, suffix = _hit_head(200, b"OK", policy.hit_fields(e), (), [], 0, b"1.1", True)
    lines = (prefix + policy.age_value(age) + suffix).split(b"\r\n")[1:]
    return [(n, v.strip()) for n, _, v in (ln.partition(b":") for ln in lines if ln)]


def entry(lines: list[tuple[bytes, bytes]], t: float = NOW) -> CacheEntry:
    return policy.make_entry(
        method=b"GET",
        key="http://example.com/x",
        url="http://example.com/x",
        status=200,
        request_headers=[],
        response_headers=lines,
        request_time=t,
        response_time=t,
    )


def test_a_304_without_date_makes_the_entry_fresh_again() -> None:
    """RFC 9110 §6.6.1: a recipient appends Date to a Date-less response it caches. Measured
    against the first response's Date, a refreshed entry was stale at once, so every later
    request revalidated again."""
    e = entry(
        [(b"Date", policy.format_http_date(NOW)), (b"Cache-Control", b"max-age=100"),
         (b"ETag", b'"a"')]
    )  # fmt: skip
    later = NOW + 300
    assert policy.decide(b"GET", [], e, later).kind is Kind.REVALIDATE
    fresh = policy.refresh_entry(e, [(b"ETag", b'"a"')], later, later)
    decision = policy.decide(b"GET", [], fresh, later + 1)
    assert decision.kind is Kind.FRESH
    assert decision.age < 5


def test_a_304_restarts_the_age_the_first_response_carried() -> None:
    """RFC 9111 §4.2.3: the age of a validated response is that of the 304 (its Date and Age);
    the first response's Age (from a cache upstream) must not be added to the new clock."""
    e = entry(
        [(b"Date", policy.format_http_date(NOW)), (b"Cache-Control", b"max-age=100"),
         (b"ETag", b'"a"'), (b"Age", b"90")]
    )  # fmt: skip
    later = NOW + 300
    fresh = policy.refresh_entry(
        e, [(b"ETag", b'"a"'), (b"Date", policy.format_http_date(later))], later, later
    )
    decision = policy.decide(b"GET", [], fresh, later + 1)
    assert decision.kind is Kind.FRESH and decision.age < 5
    # An Age the 304 itself carries does count.
    aged = policy.refresh_entry(
        e,
        [(b"ETag", b'"a"'), (b"Date", policy.format_http_date(later)), (b"Age", b"40")],
        later,
        later,
    )
    assert 40 <= policy.decide(b"GET", [], aged, later + 1).age < 45


def test_a_date_less_response_is_stored_with_the_time_it_arrived() -> None:
    """RFC 9110 §6.6.1: a cache MUST append Date to a response without one; the stored Date
    is then what a hit's client (and a later Age) is measured against."""
    e = entry([(b"Cache-Control", b"max-age=100")], t=NOW + 0.4)
    assert e.fields.one(b"date") == policy.format_http_date(NOW)
    assert policy.decide(b"GET", [], e, NOW + 50).kind is Kind.FRESH
    # A Date the origin sent is kept as it is.
    sent = policy.format_http_date(NOW - 5)
    assert entry([(b"Date", sent), (b"Cache-Control", b"max-age=100")]).fields.get(b"date") == sent


def test_set_cookie_named_by_private_is_stripped_and_the_rest_stored() -> None:
    """RFC 9111 §5.2.2.7: ``private="Set-Cookie"`` lets a shared cache store the response
    without that field; the cookie must never reach the stored headers."""
    lines = [(b"Cache-Control", b'max-age=100, private="Set-Cookie"'), (b"Set-Cookie", b"s=1")]
    assert policy.storable(b"GET", [], 200, lines) == (True, "ok")
    assert b"set-cookie" not in Fields(policy.headers_to_store(lines))
    # Without the qualification it is still refused.
    assert policy.storable(b"GET", [], 200, [(b"Cache-Control", b"max-age=100"),
                                             (b"Set-Cookie", b"s=1")])[0] is False  # fmt: skip


def test_hop_by_hop_and_connection_named_fields_never_replayed() -> None:
    e = entry(
        [(b"Cache-Control", b"max-age=100"), (b"Connection", b"close, X-Trace"),
         (b"Keep-Alive", b"timeout=5"), (b"Transfer-Encoding", b"chunked"),
         (b"X-Trace", b"1"), (b"Age", b"3"), (b"Proxy-Connection", b"keep-alive")]
    )  # fmt: skip
    fields = served_fields(e, 12.7)
    names = {n.lower() for n, _ in fields}
    assert names.isdisjoint(
        {b"connection", b"keep-alive", b"transfer-encoding", b"x-trace", b"proxy-connection"}
    )
    assert (b"Age", b"12") in fields


def test_request_directives() -> None:
    e = entry([(b"Date", policy.format_http_date(NOW)), (b"Cache-Control", b"max-age=100"),
               (b"ETag", b'"a"')])  # fmt: skip

    def kind(cc: bytes, t: float = NOW + 10) -> Kind:
        return policy.decide(b"GET", [(b"Cache-Control", cc)], e, t).kind

    assert kind(b"max-age=5") is Kind.REVALIDATE
    assert kind(b"max-age=50") is Kind.FRESH
    assert kind(b"min-fresh=95") is Kind.REVALIDATE
    assert kind(b"min-fresh=50") is Kind.FRESH
    assert kind(b"only-if-cached") is Kind.FRESH
    assert kind(b"only-if-cached", NOW + 500) is Kind.GATEWAY_TIMEOUT
    assert policy.decide(b"GET", [(b"Cache-Control", b"only-if-cached")], None, NOW).status == 504
    assert kind(b"max-stale=1000", NOW + 500) is Kind.STALE_OK
    assert policy.storable(b"GET", [(b"Cache-Control", b"no-store")], 200,
                           list(e.headers))[0] is False  # fmt: skip


def test_must_revalidate_and_max_age_zero() -> None:
    zero = entry([(b"Cache-Control", b"max-age=0"), (b"ETag", b'"a"')])
    strict = entry([(b"Cache-Control", b"max-age=0, must-revalidate"), (b"ETag", b'"a"')])
    stale_ok = [(b"Cache-Control", b"max-stale")]
    # max-age=0 alone: a client's max-stale may take it (RFC 9111 §4.2.4) ...
    assert policy.decide(b"GET", stale_ok, zero, NOW + 1).kind is Kind.STALE_OK
    # ... must-revalidate forbids that (§5.2.2.2).
    assert policy.decide(b"GET", stale_ok, strict, NOW + 1).kind is Kind.REVALIDATE


def test_statuses_and_partial_and_head_are_not_stored() -> None:
    lm = policy.format_http_date(NOW - 86400)
    heuristic = [(b"Date", policy.format_http_date(NOW)), (b"Last-Modified", lm)]
    assert policy.storable(b"GET", [], 200, heuristic)[0]
    assert policy.storable(b"GET", [], 302, heuristic) == (False, "no-freshness")
    assert policy.storable(b"GET", [], 206, [*heuristic, (b"Cache-Control", b"max-age=9")]) == (
        False,
        "partial",
    )
    assert policy.storable(b"HEAD", [], 200, heuristic)[0] is False
    auth = [(b"Authorization", b"Basic eDp5")]
    assert policy.storable(b"GET", auth, 200, heuristic) == (False, "authorization")
    assert policy.storable(b"GET", auth, 200, [*heuristic, (b"Cache-Control", b"public")])[0]


def test_vary_absent_empty_case_and_whitespace() -> None:
    vary = [b"Accept-Encoding, accept-language"]
    base = policy.vary_key(vary, [(b"accept-encoding", b"gzip,  br"), (b"Accept-Language", b"en")])
    assert base == policy.vary_key(
        [b"accept-language", b"ACCEPT-ENCODING"],
        [(b"Accept-Encoding", b" gzip, br "), (b"accept-language", b"en")],
    )
    absent = policy.vary_key(vary, [(b"Accept-Language", b"en")])
    empty = policy.vary_key(vary, [(b"Accept-Encoding", b""), (b"Accept-Language", b"en")])
    assert len({base, absent, empty}) == 3
