"""RFC 9111 / RFC 9110 / RFC 5861 rules of tproxy.cache.policy, case by case."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.cache.policy import (
    DEFAULT_HEURISTIC_FRACTION,
    DEFAULT_HEURISTIC_MAX,
    DELTA_SECONDS_MAX,
    FULL,
    INVALID,
    MAX_RANGES,
    CacheEntry,
    ETag,
    Fields,
    Headers,
    Kind,
    age_value,
    cache_key,
    conditional_headers,
    current_age,
    decide,
    delta_seconds,
    evaluate_conditionals,
    format_http_date,
    freshen_from_head,
    freshness_lifetime,
    headers_to_store,
    hit_fields,
    invalidate_uris,
    make_entry,
    not_modified_headers,
    parse_cache_control,
    parse_etag,
    parse_etag_list,
    parse_http_date,
    plain_fresh,
    plan_range,
    refresh_entry,
    request_cache_control,
    request_is_plain,
    request_url,
    select_for_304,
    stale_if_error_ok,
    storable,
    strong_match,
    update_from_304,
    vary_key,
    vary_matches,
    weak_match,
)

NOW = 1_700_000_000.0


def H(*lines: str) -> list[tuple[bytes, bytes]]:
    """Header list from "Name: value" strings."""
    out = []
    for line in lines:
        name, _, value = line.partition(":")
        out.append((name.encode(), value.strip().encode()))
    return out


def D(ts: float) -> str:
    return format_http_date(ts).decode()


def entry(
    *lines: str,
    status: int = 200,
    age: float = 0.0,
    request_headers: Headers = (),
    delay: float = 0.0,
) -> CacheEntry:
    """A stored response received ``age`` seconds before NOW, with Date = receipt time unless
    given."""
    received = NOW - age
    headers = H(*lines)
    if b"date" not in Fields(headers):
        headers.append((b"Date", format_http_date(received)))
    return make_entry(
        method=b"GET",
        key="http://example.com/",
        url="http://example.com/",
        status=status,
        request_headers=list(request_headers),
        response_headers=headers,
        request_time=received - delay,
        response_time=received,
    )


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b"max-age=60"], {"max-age": "60"}),
        ([b"Max-Age=60, PUBLIC"], {"max-age": "60", "public": None}),
        ([b'max-age="60"'], {"max-age": "60"}),
        ([b"max-age=60", b"no-transform"], {"max-age": "60", "no-transform": None}),
        ([b" , ,max-age=1,, "], {"max-age": "1"}),
        (
            [b'no-cache="Set-Cookie, X-A", max-age=5'],
            {"no-cache": "Set-Cookie, X-A", "max-age": "5"},
        ),
        ([b'ext="a,b\\"c"'], {"ext": 'a,b"c'}),
        ([b"max-age=60, max-age=60"], {"max-age": "60"}),
        ([b"max-age=60", b"max-age=10"], {"max-age": INVALID}),
        ([b'no-cache="a"', b"no-cache"], {"no-cache": None}),
        ([b"no-cache", b'no-cache="a"'], {"no-cache": None}),
        ([b'private="a"', b'private="b"'], {"private": "a, b"}),
        ([b"=5, foo"], {"foo": None}),
        ([], {}),
    ],
)
def test_parse_cache_control(values: list[bytes], expected: dict[str, str | None]) -> None:
    assert parse_cache_control(values) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("60", 60),
        ("007", 7),
        ("-1", None),
        ("1.5", None),
        ("", None),
        (" 5", None),
        (None, None),
        ("99999999999999999999", DELTA_SECONDS_MAX),
    ],
)
def test_delta_seconds(text: str | None, expected: int | None) -> None:
    assert delta_seconds(text) == expected


def test_pragma_no_cache_only_without_cache_control() -> None:
    assert request_cache_control(H("Pragma: no-cache")) == {"no-cache": None}
    assert request_cache_control(H("Pragma: no-cache", "Cache-Control: max-age=5")) == {
        "max-age": "5"
    }
    assert request_cache_control(H("Pragma: foo")) == {}


def test_fields_case_insensitive() -> None:
    f = Fields(H("Vary: a", "VARY: b", "content-length: 5"))
    assert f.get(b"vary") == b"a, b"
    assert f.values(b"Vary") == [b"a", b"b"]
    assert f.one(b"vary") is None
    assert f.one(b"Content-Length") == b"5"
    assert b"CONTENT-LENGTH" in f
    assert f.tokens(b"vary") == [b"a", b"b"]


@pytest.mark.parametrize(
    "text",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
        "sun, 06 nov 1994 08:49:37 GMT",
        "Sun, 6 Nov 1994 08:49:37 GMT",  # tolerated: single-digit day
    ],
)
def test_http_date_formats(text: str) -> None:
    assert parse_http_date(text) == 784111777.0


@pytest.mark.parametrize(
    "text",
    ["0", "-1", "", "Sun, 31 Feb 1994 08:49:37 GMT", "Sun, 06 Nov 1994 25:49:37 GMT", "tomorrow"],
)
def test_http_date_invalid(text: str) -> None:
    assert parse_http_date(text) is None


def test_rfc850_two_digit_year_50_year_rule() -> None:
    # RFC 9110 §5.6.7: more than 50 years in the future means the previous century.
    assert parse_http_date("Monday, 01-Jan-80 00:00:00 GMT", now=NOW) == 315532800.0  # 1980
    in_2030 = parse_http_date("Tuesday, 01-Jan-30 00:00:00 GMT", now=NOW)
    assert in_2030 is not None and in_2030 > NOW


# -- entity tags -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "strong", "weak"),
    [  # RFC 9110 §8.8.3.2 table
        (b'W/"1"', b'W/"1"', False, True),
        (b'W/"1"', b'W/"2"', False, False),
        (b'W/"1"', b'"1"', False, True),
        (b'"1"', b'"1"', True, True),
    ],
)
def test_etag_comparison(a: bytes, b: bytes, strong: bool, weak: bool) -> None:
    ta, tb = parse_etag(a), parse_etag(b)
    assert ta is not None and tb is not None
    assert strong_match(ta, tb) is strong
    assert weak_match(ta, tb) is weak


def test_etag_parsing() -> None:
    assert parse_etag(b'"xyzzy"') == ETag(False, b"xyzzy")
    assert parse_etag(b'W/"x"') == ETag(True, b"x")
    assert parse_etag(b'""') == ETag(False, b"")
    assert parse_etag(b"unquoted") is None
    assert parse_etag(None) is None
    assert parse_etag_list(b"*") is None
    assert parse_etag_list(b'"a", W/"b" , bogus, "c"') == [
        ETag(False, b"a"),
        ETag(True, b"b"),
        ETag(False, b"c"),
    ]
    assert bytes(ETag(True, b"q")) == b'W/"q"'


# -- storable (RFC 9111 §3) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "req", "status", "resp", "expected"),
    [
        (b"GET", [], 200, ["Cache-Control: max-age=60"], "ok"),
        (b"get", [], 200, ["Cache-Control: max-age=60"], "ok"),
        (b"POST", [], 200, ["Cache-Control: max-age=60"], "method"),
        (b"HEAD", [], 200, ["Cache-Control: max-age=60"], "method"),
        (b"GET", [], 101, [], "not-final"),
        (b"GET", [], 206, ["Cache-Control: max-age=60"], "partial"),
        (b"GET", [], 304, ["Cache-Control: max-age=60"], "not-modified"),
        (b"GET", [], 200, ["Cache-Control: max-age=60, no-store"], "no-store"),
        (
            b"GET",
            ["Cache-Control: no-store"],
            200,
            ["Cache-Control: max-age=60"],
            "request-no-store",
        ),
        (b"GET", [], 200, ["Cache-Control: no-store, must-understand, max-age=5"], "ok"),
        (b"GET", [], 299, ["Cache-Control: must-understand, max-age=5"], "must-understand"),
        (b"GET", [], 200, ["Cache-Control: private, max-age=60"], "private"),
        (b"GET", [], 200, ['Cache-Control: private="X-User", max-age=60'], "ok"),
        (
            b"GET",
            ["Authorization: Basic eA=="],
            200,
            ["Cache-Control: max-age=60"],
            "authorization",
        ),
        (b"GET", ["Authorization: x"], 200, ["Cache-Control: public, max-age=60"], "ok"),
        (b"GET", ["Authorization: x"], 200, ["Cache-Control: s-maxage=60"], "ok"),
        (b"GET", ["Authorization: x"], 200, ["Cache-Control: must-revalidate, max-age=9"], "ok"),
        (b"GET", [], 200, ["Cache-Control: max-age=60", "Vary: *"], "vary-star"),
        (b"GET", [], 200, ["Cache-Control: max-age=60", "Vary: Accept, *"], "vary-star"),
        (b"GET", [], 200, ["Cache-Control: max-age=60", "Set-Cookie: a=b"], "set-cookie"),
        (b"GET", [], 302, ["Location: /x"], "no-freshness"),
        (b"GET", [], 302, ["Location: /x", "Cache-Control: max-age=60"], "ok"),
        (b"GET", [], 500, ['ETag: "a"'], "no-freshness"),
        (b"GET", [], 404, ["Last-Modified: Sun, 06 Nov 1994 08:49:37 GMT"], "ok"),
        (b"GET", [], 200, ['ETag: "a"'], "ok"),
        (b"GET", [], 200, [], "never-usable"),
        (b"GET", [], 200, ["Cache-Control: max-age=0"], "never-usable"),
        (b"GET", [], 200, ["Expires: 0", 'ETag: "a"'], "ok"),
        (b"GET", [], 200, ["Cache-Control: max-age=0, stale-if-error=60"], "ok"),
        (b"GET", [], 200, ["Cache-Control: no-cache", 'ETag: "a"'], "ok"),
        (b"GET", [], 299, ["Cache-Control: max-age=60"], "ok"),  # explicit freshness suffices
    ],
)
def test_storable(
    method: bytes, req: list[str], status: int, resp: list[str], expected: str
) -> None:
    ok, reason = storable(method, H(*req), status, H(*resp))
    assert reason == expected
    assert ok is (expected == "ok")


def test_storable_set_cookie_when_allowed() -> None:
    resp = H("Cache-Control: max-age=60", "Set-Cookie: a=b")
    assert storable(b"GET", [], 200, resp, store_set_cookie=True) == (True, "ok")


def test_headers_to_store_strips_hop_by_hop_and_private_fields() -> None:
    stored = headers_to_store(
        H(
            "Connection: close, X-Hop",
            "X-Hop: 1",
            "Keep-Alive: timeout=5",
            "Transfer-Encoding: chunked",
            'Cache-Control: private="X-User", max-age=60',
            "X-User: alice",
            "Content-Type: text/plain",
        )
    )
    names = [n.lower() for n, _ in stored]
    assert names == [b"cache-control", b"content-type"]


# -- freshness (RFC 9111 §4.2.1, §4.2.2) ------------------------------------------------------

DATE = "Date: " + D(NOW)


@pytest.mark.parametrize(
    ("lines", "status", "expected"),
    [
        (["Cache-Control: s-maxage=10, max-age=20"], 200, 10),
        (["Cache-Control: max-age=20", "Expires: " + D(NOW + 999), DATE], 200, 20),
        (["Cache-Control: max-age=abc"], 200, 0),
        (["Cache-Control: max-age=abc, s-maxage=5"], 200, 5),
        (["Cache-Control: s-maxage=x, max-age=50"], 200, 0),
        (["Cache-Control: max-age=5", "Cache-Control: max-age=50"], 200, 0),
        (["Expires: " + D(NOW + 3600), DATE], 200, 3600),
        (["Expires: 0", DATE], 200, 0),
        (["Expires: " + D(NOW - 60), DATE], 200, 0),
        (["Expires: " + D(NOW + 60), "Expires: " + D(NOW + 60), DATE], 200, 0),
        (["Expires: " + D(NOW + 60), "Date: garbage"], 200, 60),  # Date → response_time
        (["Last-Modified: " + D(NOW - 1000), DATE], 200, 100),
        (["Last-Modified: " + D(NOW - 10 * 86400), DATE], 200, 86400),
        (["Last-Modified: " + D(NOW - 1000), DATE], 302, 0),
        (["Last-Modified: " + D(NOW - 1000), DATE, "Cache-Control: public"], 302, 100),
        (["Last-Modified: " + D(NOW - 1000), DATE], 404, 100),
        (["Last-Modified: " + D(NOW + 1000), DATE], 200, 0),
        (["Last-Modified: " + D(NOW - 1000), DATE, "Expires: 0"], 200, 0),
        ([DATE], 200, 0),
    ],
)
def test_freshness_lifetime(lines: list[str], status: int, expected: float) -> None:
    assert freshness_lifetime(H(*lines), status, response_time=NOW) == expected


def test_heuristic_parameters() -> None:
    lines = H("Last-Modified: " + D(NOW - 1000), DATE)
    assert freshness_lifetime(lines, 200, 0.5, response_time=NOW) == 500
    assert freshness_lifetime(lines, 200, 0.5, 60, response_time=NOW) == 60
    assert freshness_lifetime(lines, 200, 0.0, response_time=NOW) == 0


# -- age (RFC 9111 §4.2.3) -------------------------------------------------------------------


def _aged(date: float | None, age_header: str | None, req: float, resp: float) -> CacheEntry:
    lines = []
    if date is not None:
        lines.append((b"Date", format_http_date(date)))
    if age_header is not None:
        lines.append((b"Age", age_header.encode()))
    return CacheEntry(b"GET", "k", "u", 200, tuple(lines), req, resp)


@pytest.mark.parametrize(
    ("date", "age", "req", "resp", "expected"),
    [
        (NOW - 100, None, NOW - 100, NOW - 100, 100),  # resident time only
        (NOW - 100, "30", NOW - 102, NOW - 100, 132),  # Age + response_delay + resident
        (NOW - 150, "10", NOW - 100, NOW - 100, 150),  # apparent age (50) wins over Age
        (NOW + 500, None, NOW - 100, NOW - 100, 100),  # Date in the future: apparent age 0
        (NOW - 100, "bogus", NOW - 100, NOW - 100, 100),  # invalid Age counts as 0
        (NOW - 100, "20, 40", NOW - 100, NOW - 100, 120),  # a list: first member
        (None, "5", NOW - 10, NOW - 10, 15),  # no Date: apparent age 0
    ],
)
def test_current_age(
    date: float | None, age: str | None, req: float, resp: float, expected: float
) -> None:
    assert current_age(_aged(date, age, req, resp), NOW) == pytest.approx(expected)


# -- decide (RFC 9111 §4, §5.2) ----------------------------------------------------------------


DECIDE_CASES: list[tuple[list[str], float, list[str], Kind, str | None]] = [
    (["Cache-Control: max-age=100"], 10, [], Kind.FRESH, "fresh"),
    (["Cache-Control: max-age=100"], 200, [], Kind.REVALIDATE, "stale"),
    (["Cache-Control: max-age=100, no-cache"], 10, [], Kind.REVALIDATE, "response-no-cache"),
    (['Cache-Control: max-age=100, no-cache="Set-Cookie"'], 10, [], Kind.REVALIDATE, None),
    (["Cache-Control: max-age=100"], 10, ["Cache-Control: no-cache"], Kind.REVALIDATE, None),
    (["Cache-Control: max-age=100"], 10, ["Pragma: no-cache"], Kind.REVALIDATE, None),
    (
        ["Cache-Control: max-age=100"],
        10,
        ["Pragma: no-cache", "Cache-Control: max-stale"],
        Kind.FRESH,
        None,
    ),
    (["Cache-Control: max-age=100"], 10, ["Cache-Control: max-age=0"], Kind.REVALIDATE, None),
    (["Cache-Control: max-age=100"], 10, ["Cache-Control: max-age=50"], Kind.FRESH, None),
    (["Cache-Control: max-age=100"], 10, ["Cache-Control: max-age=x"], Kind.REVALIDATE, None),
    (
        ["Cache-Control: max-age=100"],
        60,
        ["Cache-Control: min-fresh=50"],
        Kind.REVALIDATE,
        None,
    ),
    (["Cache-Control: max-age=100"], 60, ["Cache-Control: min-fresh=30"], Kind.FRESH, None),
    (["Cache-Control: max-age=100"], 500, ["Cache-Control: max-stale"], Kind.STALE_OK, None),
    (["Cache-Control: max-age=100"], 105, ["Cache-Control: max-stale=10"], Kind.STALE_OK, None),
    (
        ["Cache-Control: max-age=100"],
        150,
        ["Cache-Control: max-stale=10"],
        Kind.REVALIDATE,
        None,
    ),
    (
        ["Cache-Control: max-age=100"],
        150,
        ["Cache-Control: max-stale=x"],
        Kind.REVALIDATE,
        None,
    ),
    (
        ["Cache-Control: max-age=100, must-revalidate"],
        500,
        ["Cache-Control: max-stale"],
        Kind.REVALIDATE,
        "must-revalidate",
    ),
    (
        ["Cache-Control: max-age=100, proxy-revalidate"],
        500,
        ["Cache-Control: max-stale"],
        Kind.REVALIDATE,
        "must-revalidate",
    ),
    (
        ["Cache-Control: s-maxage=100"],
        500,
        ["Cache-Control: max-stale"],
        Kind.REVALIDATE,
        "must-revalidate",
    ),
    (
        ["Cache-Control: max-age=100, stale-while-revalidate=60"],
        130,
        [],
        Kind.STALE_OK,
        "stale-while-revalidate",
    ),
    (["Cache-Control: max-age=100, stale-while-revalidate=60"], 190, [], Kind.REVALIDATE, None),
    (
        ["Cache-Control: max-age=100, stale-while-revalidate=60, must-revalidate"],
        130,
        [],
        Kind.REVALIDATE,
        None,
    ),
    (["Cache-Control: max-age=100"], 10, ["Cache-Control: only-if-cached"], Kind.FRESH, None),
    (
        ["Cache-Control: max-age=100"],
        200,
        ["Cache-Control: only-if-cached"],
        Kind.GATEWAY_TIMEOUT,
        None,
    ),
    (
        ["Cache-Control: max-age=100"],
        200,
        ["Cache-Control: only-if-cached, max-stale"],
        Kind.STALE_OK,
        None,
    ),
    (["Last-Modified: " + D(NOW - 100_000)], 100, [], Kind.FRESH, "fresh"),  # heuristic
    (["Cache-Control: max-age=100", "Expires: 0"], 10, [], Kind.FRESH, None),
    (["Expires: 0"], 0, [], Kind.REVALIDATE, None),
]


@pytest.mark.parametrize(("resp", "age", "req", "kind", "reason"), DECIDE_CASES)
def test_decide(
    resp: list[str], age: float, req: list[str], kind: Kind, reason: str | None
) -> None:
    e = entry(*resp, age=age)
    d = decide(b"GET", H(*req), e, NOW)
    assert d.kind is kind
    if reason is not None:
        assert d.reason == reason
    assert d.age == pytest.approx(age)


def test_decide_swr_flags_background_revalidation() -> None:
    e = entry("Cache-Control: max-age=10, stale-while-revalidate=60", 'ETag: "v1"', age=30)
    d = decide(b"GET", [], e, NOW)
    assert d.kind is Kind.STALE_OK and d.background_revalidate
    assert d.conditional == ((b"If-None-Match", b'"v1"'),)
    fresh = decide(b"GET", [], entry("Cache-Control: max-age=100", age=1), NOW)
    assert not fresh.background_revalidate


def test_decide_revalidate_carries_validators() -> None:
    lm = D(NOW - 5000)
    e = entry("Cache-Control: max-age=1", 'ETag: W/"abc"', "Last-Modified: " + lm, age=100)
    d = decide(b"GET", [], e, NOW)
    assert d.kind is Kind.REVALIDATE
    assert d.conditional == ((b"If-None-Match", b'W/"abc"'), (b"If-Modified-Since", lm.encode()))
    bare = decide(b"GET", [], entry("Cache-Control: max-age=1", age=100), NOW)
    assert bare.kind is Kind.REVALIDATE and bare.conditional == ()


def test_decide_methods_and_missing_entries() -> None:
    e = entry("Cache-Control: max-age=100", age=1)
    assert decide(b"HEAD", [], e, NOW).kind is Kind.FRESH
    assert decide(b"POST", [], e, NOW).kind is Kind.MISS
    assert decide(b"GET", [], None, NOW).kind is Kind.MISS
    d = decide(b"GET", H("Cache-Control: only-if-cached"), None, NOW)
    assert d.kind is Kind.GATEWAY_TIMEOUT and d.status == 504


def test_decide_checks_vary() -> None:
    req = H("Accept-Encoding: gzip")
    e = entry("Cache-Control: max-age=100", "Vary: Accept-Encoding", age=1, request_headers=req)
    assert decide(b"GET", H("accept-encoding:  gzip"), e, NOW).kind is Kind.FRESH
    assert decide(b"GET", H("Accept-Encoding: br"), e, NOW).kind is Kind.MISS
    assert decide(b"GET", [], e, NOW).kind is Kind.MISS


def test_decision_age_header() -> None:
    d = decide(b"GET", [], entry("Cache-Control: max-age=100", age=12, delay=0.7), NOW)
    assert d.age == pytest.approx(12.7)
    assert d.age_header == b"12"


# -- the hit fast path gives decide()'s answers -----------------------------------------------

# Request variants tried against every stored response: as in the vector, plain, plain with
# fields that do not matter, and ones that must leave the fast path.
_REQUEST_VARIANTS = (
    [],
    ["Accept: */*", "User-Agent: t"],
    ["Accept-Encoding: gzip"],
    ["cache-control: max-age=0"],
    [" Pragma : no-cache"],
    ['If-None-Match: "v1"'],
    ["Range: bytes=0-1"],
)

# (heuristic_fraction, heuristic_max): the defaults and two that change heuristic lifetimes.
_HEURISTICS = ((DEFAULT_HEURISTIC_FRACTION, DEFAULT_HEURISTIC_MAX), (0.5, 10.0), (0.1, 86400.0))


def _same_decisions(e: CacheEntry, requests: list[list[str]], ages: list[float]) -> int:
    """Compare plain_fresh() -- the shortcut the cache component takes for a plain request
    before it runs decide() -- with decide() for every method, request and clock reading.

    For a request that request_is_plain() admits, plain_fresh() answers decide()'s age and
    lifetime exactly when decide() says FRESH, and None otherwise (then the component runs
    decide()). Returns how many times the shortcut answered."""
    fast_hits = 0
    for method in (b"GET", b"HEAD", b"get", b"POST"):
        for req in requests:
            headers = H(*req)
            if not request_is_plain(headers):
                continue  # the component never asks plain_fresh() about these
            for dt in ages:
                now = e.response_time + dt
                for fraction, cap in _HEURISTICS:
                    slow = decide(
                        method, headers, e, now, heuristic_fraction=fraction, heuristic_max=cap
                    )
                    fast = plain_fresh(
                        method, headers, e, now, heuristic_fraction=fraction, heuristic_max=cap
                    )
                    if fast is not None:
                        assert slow.kind is Kind.FRESH
                        assert fast == (slow.age, slow.lifetime)
                        fast_hits += 1
                    elif method.isupper():
                        # Methods as the parser delivers them; decide() also upper-cases others.
                        assert slow.kind is not Kind.FRESH
    return fast_hits


@pytest.mark.parametrize(("resp", "age", "req", "kind", "reason"), DECIDE_CASES)
def test_plain_fresh_matches_decide(
    resp: list[str], age: float, req: list[str], kind: Kind, reason: str | None
) -> None:
    e = entry(*resp, age=age)
    ages = [age, 0.0, 9.0, 99.9, 100.0, 150.0, 10_000.0, -5.0]
    _same_decisions(e, [req, *_REQUEST_VARIANTS], ages)


def test_plain_fresh_matches_decide_on_vary_heuristics_and_refresh() -> None:
    gz = H("Accept-Encoding: gzip")
    lm = D(NOW - 100_000)
    stored = [
        entry("Cache-Control: max-age=100", "Vary: Accept-Encoding", request_headers=gz),
        entry("Cache-Control: max-age=100", "Vary: *"),
        entry("Last-Modified: " + lm),  # heuristic: depends on the fraction and the cap
        entry("Last-Modified: " + lm, status=404),
        entry("Expires: " + D(NOW + 50)),
        entry("Cache-Control: max-age=100", "Age: 40"),
        entry("Cache-Control: s-maxage=5, max-age=100", 'ETag: "v1"'),
        entry("Cache-Control: max-age=10, stale-while-revalidate=60", 'ETag: "v1"'),
        entry("Cache-Control: max-age=100", status=301),
    ]
    ages = [0.0, 4.0, 6.0, 30.0, 61.0, 99.0, 101.0, 5000.0, 20_000.0]
    requests = [*_REQUEST_VARIANTS, ["Accept-Encoding: br"], ["accept-encoding:  gzip"]]
    fast_hits = sum(_same_decisions(e, requests, ages) for e in stored)
    assert fast_hits > 50  # the comparison exercised the shortcut, not only the fallback
    # A 304 refresh makes a new entry with its own derived values (new times, new headers).
    old = entry("Cache-Control: max-age=100", age=90)
    assert plain_fresh(b"GET", [], old, NOW + 20) is None
    assert decide(b"GET", [], old, NOW + 20).kind is Kind.REVALIDATE
    fresh = refresh_entry(old, H("Date: " + D(NOW + 20)), NOW + 20, NOW + 20)
    slow = decide(b"GET", [], fresh, NOW + 20)
    assert slow.kind is Kind.FRESH
    assert plain_fresh(b"GET", [], fresh, NOW + 20) == (slow.age, slow.lifetime)


@settings(max_examples=150, deadline=None)
@given(
    directives=st.lists(
        st.sampled_from(
            [
                "max-age=60",
                "s-maxage=30",
                "no-cache",
                "must-revalidate",
                "public",
                "stale-while-revalidate=30",
                "max-age=x",
                "proxy-revalidate",
                "private",
            ]
        ),
        max_size=3,
    ),
    extra=st.lists(
        st.sampled_from(["Expires: 0", "Age: 20", "Vary: Accept", 'ETag: "e"', "Pragma: x"]),
        max_size=2,
    ),
    req=st.lists(
        st.sampled_from(
            [
                "Accept: a",
                "Accept: b",
                "Cache-Control: max-stale",
                "Cache-Control: min-fresh=5",
                "Pragma: no-cache",
                "Cache-Control: only-if-cached",
                "If-Modified-Since: x",
            ]
        ),
        max_size=2,
    ),
    age=st.floats(min_value=-10, max_value=200, allow_nan=False),
)
def test_plain_fresh_matches_decide_generated(
    directives: list[str], extra: list[str], req: list[str], age: float
) -> None:
    lines = [*(["Cache-Control: " + ", ".join(directives)] if directives else []), *extra]
    e = entry(*lines, "Last-Modified: " + D(NOW - 5000), request_headers=H("Accept: a"))
    _same_decisions(e, [req], [age])


def test_request_is_plain() -> None:
    assert request_is_plain(H("Host: a", "Accept: */*", "Accept-Encoding: gzip"))
    for name in ("Cache-Control", "PRAGMA", "If-Match", "if-none-match", "If-Modified-Since",
                 "If-Unmodified-Since", "If-Range", "Range"):  # fmt: skip
        assert not request_is_plain(H("Host: a", name + ": x"))


def test_age_value() -> None:
    assert age_value(12.7) == b"12"
    assert age_value(-3.0) == b"0"
    assert age_value(1e12) == str(DELTA_SECONDS_MAX).encode()


@pytest.mark.parametrize(
    ("resp", "age", "req", "status", "ok"),
    [
        (["Cache-Control: max-age=10, stale-if-error=60"], 40, [], 503, True),
        (["Cache-Control: max-age=10, stale-if-error=60"], 40, [], None, True),
        (["Cache-Control: max-age=10, stale-if-error=60"], 40, [], 500, True),
        (["Cache-Control: max-age=10, stale-if-error=60"], 40, [], 404, False),
        (["Cache-Control: max-age=10, stale-if-error=60"], 40, [], 501, False),
        (["Cache-Control: max-age=10, stale-if-error=60"], 100, [], 502, False),
        (["Cache-Control: max-age=10, stale-if-error=60, must-revalidate"], 40, [], 502, False),
        (["Cache-Control: max-age=10, stale-if-error=60, proxy-revalidate"], 40, [], 502, False),
        (["Cache-Control: s-maxage=10, stale-if-error=60"], 40, [], 502, False),
        (["Cache-Control: max-age=10, stale-if-error=60, no-cache"], 40, [], 502, False),
        (["Cache-Control: max-age=10"], 40, [], 502, False),
        (["Cache-Control: max-age=10"], 40, ["Cache-Control: stale-if-error=100"], 502, True),
        (["Cache-Control: max-age=10, stale-if-error=x"], 40, [], 502, False),
        (
            ["Cache-Control: max-age=10, stale-if-error=60"],
            40,
            ["Cache-Control: no-cache"],
            502,
            False,
        ),
    ],
)
def test_stale_if_error(
    resp: list[str], age: float, req: list[str], status: int | None, ok: bool
) -> None:
    assert stale_if_error_ok(entry(*resp, age=age), H(*req), status, NOW) is ok


# -- Vary (RFC 9111 §4.1) --------------------------------------------------------------------


def test_vary_key_normalisation() -> None:
    one = vary_key([b"Accept-Encoding, Accept-Language"], H("Accept-Encoding: gzip, br"))
    assert one == vary_key(
        [b"accept-language", b"ACCEPT-ENCODING"],
        H("accept-encoding: gzip", "Accept-Encoding:br"),
    )
    assert vary_key([b"Accept"], H("Accept: a  \t b")) == vary_key([b"accept"], H("Accept: a b"))
    assert vary_key([b"Accept"], H("Accept: text/html")) != vary_key([b"Accept"], H("Accept: x"))
    # absent differs from empty
    assert vary_key([b"X-A"], []) != vary_key([b"X-A"], H("X-A:"))
    assert vary_key([b"Accept, *"], []) is None
    assert vary_key([], H("Accept: x")) == ""
    assert vary_key([b" , "], []) == ""


def test_vary_matches() -> None:
    e = entry(
        "Cache-Control: max-age=60",
        "Vary: Accept-Language",
        request_headers=H("Accept-Language: de"),
    )
    assert vary_matches(e, H("ACCEPT-LANGUAGE: de"))
    assert not vary_matches(e, H("Accept-Language: en"))
    star = CacheEntry(b"GET", "k", "u", 200, ((b"Vary", b"*"),), NOW, NOW, vary_key="*")
    assert not vary_matches(star, [])
    assert (
        make_entry(
            method=b"GET",
            key="k",
            url="u",
            status=200,
            request_headers=[],
            response_headers=H("Vary: *"),
            request_time=NOW,
            response_time=NOW,
        ).vary_key
        == "*"
    )


# -- updating from 304 / HEAD (RFC 9111 §4.3.4, §4.3.5) ----------------------------------------


def test_update_from_304() -> None:
    stored = H(
        "Content-Type: text/html",
        "Content-Length: 1234",
        "Cache-Control: max-age=10",
        "X-Multi: a",
        "X-Multi: b",
        'ETag: "v1"',
        "Date: old",
    )
    new = H(
        "Cache-Control: max-age=600",
        "Content-Length: 0",
        "Date: new",
        "X-Multi: c",
        "Set-Cookie: s=1",
        "Connection: close",
        "Transfer-Encoding: chunked",
        'ETag: "v1"',
    )
    out = Fields(update_from_304(stored, new))
    assert out.values(b"cache-control") == [b"max-age=600"]
    assert out.values(b"content-length") == [b"1234"]
    assert out.values(b"x-multi") == [b"c"]
    assert out.values(b"date") == [b"new"]
    assert out.values(b"content-type") == [b"text/html"]
    assert b"set-cookie" not in out
    assert b"connection" not in out and b"transfer-encoding" not in out


def test_refresh_entry_makes_entry_fresh_again() -> None:
    e = entry("Cache-Control: max-age=10", 'ETag: "v1"', age=100)
    assert decide(b"GET", [], e, NOW).kind is Kind.REVALIDATE
    fresh = refresh_entry(e, H("Cache-Control: max-age=10", "Date: " + D(NOW)), NOW - 1, NOW)
    d = decide(b"GET", [], fresh, NOW + 2)
    assert d.kind is Kind.FRESH and d.age == pytest.approx(3)


def test_select_for_304() -> None:
    a = entry("Cache-Control: max-age=1", 'ETag: "a"', age=50)
    a2 = entry("Cache-Control: max-age=1", 'ETag: "a"', age=40)
    b = entry("Cache-Control: max-age=1", 'ETag: W/"b"', age=30)
    b2 = entry("Cache-Control: max-age=1", 'ETag: W/"b"', age=10)
    lm = "Last-Modified: " + D(NOW - 9999)
    c = entry("Cache-Control: max-age=1", lm, age=20)
    bare = entry("Cache-Control: max-age=1", age=5)
    group = [a, a2, b, b2, c]
    assert select_for_304(group, H('ETag: "a"')) == [0, 1]
    assert select_for_304(group, H('ETag: "zzz"')) == []
    assert select_for_304(group, H('ETag: W/"b"')) == [3]  # most recent weak match
    assert select_for_304(group, H(lm)) == [4]
    assert select_for_304([bare], H("Cache-Control: max-age=5")) == [0]
    assert select_for_304([bare, c], H("Cache-Control: max-age=5")) == []
    assert select_for_304([a], H("Cache-Control: max-age=5")) == []


def test_freshen_from_head() -> None:
    stored = H("Content-Length: 10", 'ETag: "a"', "Cache-Control: max-age=1")
    updated = freshen_from_head(stored, H("Content-Length: 10", "Cache-Control: max-age=99"))
    assert updated is not None and Fields(updated).get(b"cache-control") == b"max-age=99"
    assert freshen_from_head(stored, H("Content-Length: 11")) is None
    assert freshen_from_head(stored, H('ETag: "b"')) is None


# -- invalidation (RFC 9111 §4.4) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "status", "resp", "expected"),
    [
        (b"POST", 200, [], ["http://example.com/a"]),
        (b"GET", 200, [], []),
        (b"HEAD", 200, [], []),
        (b"OPTIONS", 200, [], []),
        (b"POST", 500, [], []),
        (b"POST", 404, [], []),
        (b"DELETE", 204, [], ["http://example.com/a"]),
        (b"FROBNICATE", 200, [], ["http://example.com/a"]),  # unknown → unsafe
        (b"POST", 303, ["Location: /b"], ["http://example.com/a", "http://example.com/b"]),
        (
            b"PUT",
            201,
            ["Location: http://EXAMPLE.com:80/c", "Content-Location: d"],
            ["http://example.com/a", "http://example.com/c", "http://example.com/d"],
        ),
        (b"POST", 200, ["Location: http://other.com/b"], ["http://example.com/a"]),
        (b"POST", 200, ["Location: https://example.com/b"], ["http://example.com/a"]),
        (b"POST", 200, ["Location: http://example.com:8080/b"], ["http://example.com/a"]),
    ],
)
def test_invalidate_uris(method: bytes, status: int, resp: list[str], expected: list[str]) -> None:
    assert invalidate_uris(method, status, "http://example.com/a", H(*resp)) == expected


# -- conditional requests (RFC 9110 §13) -----------------------------------------------------

LM = NOW - 1000
REP = H('ETag: "v1"', "Last-Modified: " + D(LM))


@pytest.mark.parametrize(
    ("method", "req", "expected"),
    [
        (b"GET", [], None),
        (b"GET", ['If-None-Match: "v1"'], 304),
        (b"HEAD", ['If-None-Match: "v1"'], 304),
        (b"GET", ['If-None-Match: W/"v1"'], 304),  # weak comparison
        (b"GET", ['If-None-Match: "x", "v1"'], 304),
        (b"GET", ["If-None-Match: *"], 304),
        (b"GET", ['If-None-Match: "v2"'], None),
        (b"DELETE", ['If-None-Match: "v1"'], 412),
        # If-None-Match present: If-Modified-Since is ignored
        (b"GET", ['If-None-Match: "v2"', "If-Modified-Since: " + D(NOW)], None),
        (b"GET", ["If-Modified-Since: " + D(NOW)], 304),
        (b"GET", ["If-Modified-Since: " + D(LM)], 304),
        (b"GET", ["If-Modified-Since: " + D(LM - 1)], None),
        (b"GET", ["If-Modified-Since: yesterday"], None),
        (b"POST", ["If-Modified-Since: " + D(NOW)], None),
        (b"GET", ['If-Match: "v1"'], None),
        (b"GET", ['If-Match: "v2"'], 412),
        (b"GET", ['If-Match: W/"v1"'], 412),  # strong comparison
        (b"GET", ["If-Match: *"], None),
        (b"GET", ["If-Unmodified-Since: " + D(LM - 1)], 412),
        (b"GET", ["If-Unmodified-Since: " + D(LM)], None),
        (b"GET", ['If-Match: "v1"', "If-Unmodified-Since: " + D(LM - 1)], None),
        (b"GET", ['If-Match: "v1"', 'If-None-Match: "v1"'], 304),
        (b"GET", ['If-Match: "v2"', 'If-None-Match: "v1"'], 412),
    ],
)
def test_evaluate_conditionals(method: bytes, req: list[str], expected: int | None) -> None:
    assert evaluate_conditionals(method, H(*req), REP) == expected


def test_conditionals_only_for_2xx_and_need_validators() -> None:
    assert evaluate_conditionals(b"GET", H('If-None-Match: "v1"'), REP, status=404) is None
    assert evaluate_conditionals(b"GET", H('If-None-Match: "v1"'), []) is None
    assert evaluate_conditionals(b"GET", H("If-Modified-Since: " + D(NOW)), []) is None
    assert evaluate_conditionals(b"GET", H('If-Match: "v1"'), []) == 412


def test_304_fields() -> None:
    fields = not_modified_headers(
        H("Content-Type: a", "ETag: b", "Cache-Control: c", "Content-Length: 5", "Vary: x")
    )
    assert [n for n, _ in fields] == [b"ETag", b"Cache-Control", b"Vary"]


# -- ranges (RFC 9110 §14) -------------------------------------------------------------------

STRONG_LM = H('ETag: "v1"', "Last-Modified: " + D(LM), "Date: " + D(LM + 10))


@pytest.mark.parametrize(
    ("req", "status", "ranges", "content_range"),
    [
        ([], 200, (), None),
        (["Range: bytes=0-9"], 206, ((0, 9),), b"bytes 0-9/100"),
        (["Range: bytes=90-"], 206, ((90, 99),), b"bytes 90-99/100"),
        (["Range: bytes=-10"], 206, ((90, 99),), b"bytes 90-99/100"),
        (["Range: bytes=-200"], 206, ((0, 99),), b"bytes 0-99/100"),
        (["Range: bytes=95-200"], 206, ((95, 99),), b"bytes 95-99/100"),
        (["Range: bytes = 1 - 2"], 206, ((1, 2),), b"bytes 1-2/100"),
        (["Range: BYTES=0-0"], 206, ((0, 0),), b"bytes 0-0/100"),
        (["Range: bytes=100-"], 416, (), b"bytes */100"),
        (["Range: bytes=-0"], 416, (), b"bytes */100"),
        (["Range: bytes=100-200, 300-"], 416, (), b"bytes */100"),
        (["Range: bytes=5-2"], 200, (), None),
        (["Range: bytes=a-b"], 200, (), None),
        (["Range: bytes=-"], 200, (), None),
        (["Range: items=0-1"], 200, (), None),
        (["Range: 0-1"], 200, (), None),
        (["Range: bytes=0-9,20-29"], 200, (), None),  # disjoint: full response
        (["Range: bytes=0-9,5-19"], 206, ((0, 19),), b"bytes 0-19/100"),  # coalesced
        (["Range: bytes=0-9,10-19"], 206, ((0, 19),), b"bytes 0-19/100"),
        (["Range: bytes=0-9,500-"], 206, ((0, 9),), b"bytes 0-9/100"),  # one satisfiable
        (["Range: bytes=0-9", 'If-Range: "v1"'], 206, ((0, 9),), b"bytes 0-9/100"),
        (["Range: bytes=0-9", 'If-Range: W/"v1"'], 200, (), None),
        (["Range: bytes=0-9", 'If-Range: "v2"'], 200, (), None),
        (["Range: bytes=0-9", "If-Range: " + D(LM)], 206, ((0, 9),), b"bytes 0-9/100"),
        (["Range: bytes=0-9", "If-Range: " + D(LM + 1)], 200, (), None),
        (["Range: bytes=0-9", "If-Range: garbage"], 200, (), None),
    ],
)
def test_plan_range(
    req: list[str], status: int, ranges: tuple[tuple[int, int], ...], content_range: bytes | None
) -> None:
    plan = plan_range(b"GET", H(*req), STRONG_LM, 100)
    assert (plan.status, plan.ranges, plan.content_range) == (status, ranges, content_range)


def test_plan_range_other_cases() -> None:
    assert plan_range(b"HEAD", H("Range: bytes=0-9"), STRONG_LM, 100) == FULL
    assert plan_range(b"GET", H("Range: bytes=0-9"), STRONG_LM, 100, status=404) == FULL
    many = "Range: bytes=" + ",".join(f"{i}-{i}" for i in range(MAX_RANGES + 1))
    assert plan_range(b"GET", H(many), STRONG_LM, 1000) == FULL
    assert plan_range(b"GET", H("Range: bytes=0-"), STRONG_LM, 0).status == 416
    # If-Range by date needs a strong Last-Modified: Date less than 1 s after it is weak.
    weak_lm = H("Last-Modified: " + D(LM), "Date: " + D(LM))
    assert plan_range(b"GET", H("Range: bytes=0-9", "If-Range: " + D(LM)), weak_lm, 100) == FULL


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 300)), st.none() | st.integers(0, 300))),
    st.integers(0, 250),
)
def test_plan_range_results_always_inside_representation(
    specs: list[tuple[int | None, int | None]], length: int
) -> None:
    text = ",".join(f"{'' if a is None else a}-{'' if b is None else b}" for a, b in specs)
    plan = plan_range(b"GET", [(b"Range", b"bytes=" + text.encode())], [], length)
    assert plan.status in (200, 206, 416)
    if plan.status == 206:
        ((start, end),) = plan.ranges
        assert 0 <= start <= end < length
        assert plan.content_range == b"bytes %d-%d/%d" % (start, end, length)
    if plan.status == 416:
        assert plan.content_range == b"bytes */%d" % length


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=60), max_size=4))
def test_parse_cache_control_never_raises(values: list[bytes]) -> None:
    result = parse_cache_control(values)
    assert all(k == k.lower() and k for k in result)


# -- cache keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("http", b"Example.COM", "1.2.3.4", 80, b"/a?b=1", True), "http://example.com/a?b=1"),
        (("http", b"example.com:80", "1.2.3.4", 80, b"/a", True), "http://example.com/a"),
        (("HTTP", b"example.com.", "1.2.3.4", 80, b"/a", True), "http://example.com/a"),
        (("http", b"example.com:8080", "1.2.3.4", 8080, b"/", True), "http://example.com:8080/"),
        (("https", b"example.com:443", "1.2.3.4", 443, b"/", True), "https://example.com/"),
        (("http", b"example.com", "1.2.3.4", 80, b"", True), "http://example.com/"),
        (("http", b"[::1]:80", "::1", 80, b"/", True), "http://[::1]/"),
        (("http", b"h", "1.2.3.4", 80, b"http://Other.com:80/x", True), "http://other.com/x"),
        (("http", b"Example.com", "1.2.3.4", 80, b"/a", False), "http://example.com/a @1.2.3.4:80"),
        (
            ("http", b"example.com", "2001:db8::1", 80, b"/", False),
            "http://example.com/ @[2001:db8::1]:80",
        ),
        (("http", None, "10.0.0.9", 80, b"/z", True), "http://10.0.0.9/z"),
        (("http", b"", "10.0.0.9", 8080, b"/z", True), "http://10.0.0.9:8080/z"),
    ],
)
def test_cache_key(args: tuple, expected: str) -> None:  # type: ignore[type-arg]
    assert cache_key(*args) == expected


def test_forged_host_cannot_poison_shared_entry() -> None:
    genuine = cache_key("http", b"victim.example", "192.0.2.10", 80, b"/app.js", True)
    forged = cache_key("http", b"victim.example", "198.51.100.66", 80, b"/app.js", False)
    other_forger = cache_key("http", b"victim.example", "198.51.100.77", 80, b"/app.js", False)
    assert len({genuine, forged, other_forger}) == 3
    assert request_url("http", b"Victim.Example", b"/app.js") == genuine


def served_fields(e: CacheEntry, age: float, x_cache: bool) -> Fields:
    """The fields of the head the cache answers a hit with (the production builder)."""
    from tproxy.cache.component import _hit_head

    own = ((b"X-Cache", b"HIT"),) if x_cache else ()
    prefix, suffix = _hit_head(200, b"OK", hit_fields(e), own, [], 0, b"1.1", True)
    lines = (prefix + age_value(age) + suffix).split(b"\r\n")[1:]
    return Fields([(n, v.strip()) for n, _, v in (ln.partition(b":") for ln in lines if ln)])


def test_a_hit_replaces_age_and_x_cache() -> None:
    e = entry("Cache-Control: max-age=100", "Age: 999", "X-Cache: old", age=5)
    f = served_fields(e, 42.9, x_cache=True)
    assert f.values(b"age") == [b"42"]  # RFC 9111 §5.1: the cache's own, whole seconds
    assert f.values(b"x-cache") == [b"HIT"]
    assert f.get(b"cache-control") == b"max-age=100"
    assert served_fields(e, 1, x_cache=False).values(b"x-cache") == []


def test_conditional_headers_for_several_variants() -> None:
    a = entry('ETag: "a"', "Last-Modified: " + D(LM))
    b = entry('ETag: "b"')
    c = entry('ETag: "a"')
    assert conditional_headers([a, b, c]) == ((b"If-None-Match", b'"a", "b"'),)
    assert conditional_headers(entry("Last-Modified: junk")) == ()


def test_malformed_location_invalidates_only_the_target() -> None:
    from tproxy.cache.policy import invalidate_uris

    out = invalidate_uris(b"POST", 200, "http://a.example/x", [(b"Location", b"http://[bad/")])
    assert out == ["http://a.example/x"]
