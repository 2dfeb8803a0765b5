"""tproxy.limits: admission decisions, bounded memory, log throttling, config and cost."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy import config
from tproxy.limits import (
    DEFAULT_MAX_CONNECTIONS,
    Kind,
    Limiter,
    LimitsConfig,
    TokenBucket,
    client_key,
)


def cfg(**kw: object) -> LimitsConfig:
    return LimitsConfig(**kw)  # type: ignore[arg-type]


def parse(table: dict[str, object]) -> LimitsConfig:
    config.load(None)  # imports the feature modules (registers the sections)
    import tproxy.limits  # noqa: F401  (registers "limits" even before the lead wires it in)

    result: LimitsConfig = config.parse({"limits": table}).sections["limits"]
    return result


# -- config -----------------------------------------------------------------------------------


def test_defaults() -> None:
    c = parse({})
    assert c == LimitsConfig()
    assert c.max_connections == DEFAULT_MAX_CONNECTIONS == 20_000
    assert c.per_client_connections == 256
    assert (c.per_client_new_per_second, c.per_client_new_burst) == (100.0, 200)
    assert (c.per_client_requests_per_second, c.per_client_requests_burst) == (200.0, 400)
    assert c.ipv6_prefix == 128  # per address: the hosts of a LAN segment share its /64
    assert c.log_interval == 60.0


def test_config_values() -> None:
    c = parse(
        {
            "max_connections": 500,
            "per_client_connections": 0,
            "per_client_new_per_second": 2.5,
            "per_client_new_burst": 5,
            "per_client_requests_per_second": 0,
            "ipv6_prefix": 56,
            "log_interval": "5m",
            "max_clients": 1000,
        }
    )
    assert c.max_connections == 500
    assert c.per_client_connections == 0
    assert c.per_client_new_per_second == 2.5
    assert c.ipv6_prefix == 56
    assert c.log_interval == 300.0


@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        ({"max_connections": 0}, "limits.max_connections", "at least 1"),
        ({"per_client_connections": -1}, "limits.per_client_connections", "at least 0"),
        ({"per_client_new_per_second": -1}, "limits.per_client_new_per_second", "at least"),
        ({"per_client_new_burst": 0}, "limits.per_client_new_burst", "at least 1"),
        ({"ipv6_prefix": 129}, "limits.ipv6_prefix", "at most 128"),
        ({"max_clients": 10}, "limits.max_clients", "smaller than max_connections"),
        ({"max_conections": 10}, "limits.max_conections", "unknown key"),
        ({"log_interval": "soon"}, "limits.log_interval", "not a duration"),
    ],
)
def test_config_errors(table: dict[str, object], key: str, words: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        parse(table)
    errors = info.value.errors if isinstance(info.value, config.ConfigErrors) else [info.value]
    assert any(e.key == key and words in e.reason for e in errors), str(info.value)


# -- client keys ------------------------------------------------------------------------------


def test_client_key_ipv4_is_the_address() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert Limiter().client_key("10.1.2.3") == "10.1.2.3"


def test_client_key_ipv6_prefix() -> None:
    a = client_key("2001:db8:1:2:aaaa::1", 64)
    b = client_key("2001:db8:1:2:ffff:1:2:3", 64)
    assert a == b == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1", 64) != a
    # By default each address is its own client (one LAN segment is one /64).
    assert client_key("2001:db8:1:2:aaaa::1") != client_key("2001:db8:1:2:ffff:1:2:3")
    assert client_key("2001:db8:1:2:aaaa::1", 48) == "2001:db8:1::/48"
    assert client_key("2001:db8::1", 128) == "2001:db8::1"
    assert Limiter(cfg(ipv6_prefix=56)).client_key("2001:db8:0:ff12::9") == "2001:db8:0:ff00::/56"


def test_client_key_mapped_and_zoned() -> None:
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("fe80::1%eth0") == client_key("fe80::1") == "fe80::1"
    assert client_key("fe80::1%eth0", 64) == client_key("fe80::2", 64) == "fe80::/64"
    assert client_key("not-an-address:") == "not-an-address:"
    assert client_key("") == ""


# -- token bucket -----------------------------------------------------------------------------


def test_token_bucket_burst_then_rate() -> None:
    b = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = b.take(0.0)
    assert wait == pytest.approx(0.1)
    assert b.take(0.05) == pytest.approx(0.05)
    assert b.take(0.1) == 0.0
    assert b.full_at() == pytest.approx(0.1 + 3 / 10)
    # Refill stops at the burst, and a clock stepping back does not drain it.
    assert b.take(100.0) == 0.0
    assert b.tokens == 2.0
    assert b.take(50.0) == 0.0
    assert b.tokens == 1.0


# -- admission --------------------------------------------------------------------------------


def test_ceiling_refuses_with_503_then_recovers() -> None:
    lim = Limiter(cfg(max_connections=3, max_clients=3))
    keys = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert all(lim.on_accept(k, 0.0) is None for k in keys)
    assert lim.overloaded and lim.stats()["at_ceiling"]
    r = lim.on_accept("10.0.0.4", 0.0)
    assert r is not None and r.kind is Kind.CEILING and r.status == 503 and r.retry_after >= 1
    lim.on_close("10.0.0.2")
    assert not lim.overloaded
    assert lim.on_accept("10.0.0.4", 0.1) is None
    assert lim.stats()["refused"]["ceiling"] == 1


def test_per_client_concurrency() -> None:
    lim = Limiter(cfg(per_client_connections=2, per_client_new_per_second=0))
    assert lim.on_accept("a", 0.0) is None
    assert lim.on_accept("a", 0.0) is None
    r = lim.on_accept("a", 0.0)
    assert r is not None and r.kind is Kind.CONNECTIONS and r.status == 429
    assert lim.on_accept("b", 0.0) is None  # other clients are unaffected
    lim.on_close("a")
    assert lim.on_accept("a", 0.0) is None
    assert lim.connections_of("a") == 2
    assert lim.stats()["active_connections"] == 3
    assert lim.stats()["active_clients"] == 2


def test_new_connection_rate() -> None:
    lim = Limiter(cfg(per_client_new_per_second=10, per_client_new_burst=5))
    admitted = 0
    for _ in range(20):
        r = lim.on_accept("c", 1.0)
        if r is None:
            admitted += 1
            lim.on_close("c")
        else:
            assert r.kind is Kind.CONNECT_RATE and r.status == 429 and r.retry_after == 1
    assert admitted == 5
    # Refused attempts take no tokens: 0.5 s later exactly 5 more are allowed.
    assert sum(lim.on_accept("c", 1.5) is None for _ in range(10)) == 5


def test_sustained_rate_over_time() -> None:
    """Over 10 s at 1000 attempts/s, about burst + rate*10 are admitted."""
    lim = Limiter(cfg(per_client_new_per_second=100, per_client_new_burst=200))
    admitted = 0
    for i in range(10_000):
        if lim.on_accept("flood", i / 1000) is None:
            admitted += 1
            lim.on_close("flood")
    assert 200 + 100 * 10 - 2 <= admitted <= 200 + 100 * 10 + 1


def test_request_rate_429_with_retry_after() -> None:
    lim = Limiter(cfg(per_client_requests_per_second=0.5, per_client_requests_burst=2))
    assert lim.on_accept("k", 0.0) is None
    assert lim.on_request("k", 0.0) is None
    assert lim.on_request("k", 0.0) is None
    r = lim.on_request("k", 0.0)
    assert r is not None and r.kind is Kind.REQUEST_RATE and r.status == 429
    assert r.retry_after == 2  # one token at 0.5/s
    assert lim.on_request("k", 2.0) is None
    assert lim.on_request("unknown", 0.0) is None  # never admitted: nothing to limit


def test_disabled_per_client_limits_keep_the_ceiling() -> None:
    lim = Limiter(cfg(enabled=False, max_connections=50, max_clients=50))
    for _ in range(50):
        assert lim.on_accept("one", 0.0) is None
        assert lim.on_request("one", 0.0) is None
    r = lim.on_accept("one", 0.0)
    assert r is not None and r.kind is Kind.CEILING


def test_close_without_accept_counts_nothing() -> None:
    lim = Limiter()
    lim.on_close("ghost")
    assert lim.on_accept("x", 0.0) is None
    lim.on_close("x")
    lim.on_close("x")  # a double close must not drive the counts negative
    assert lim.stats()["active_connections"] == 0
    assert lim.stats()["active_clients"] == 0


def test_refused_accept_is_not_counted() -> None:
    lim = Limiter(cfg(per_client_connections=1))
    assert lim.on_accept("a", 0.0) is None
    assert lim.on_accept("a", 0.0) is not None
    assert lim.active == 1 and lim.connections_of("a") == 1


def test_reconfigure_keeps_counts_and_sheds_above_a_lowered_ceiling() -> None:
    lim = Limiter(cfg(max_connections=10, max_clients=10))
    for i in range(6):
        assert lim.on_accept(f"10.0.0.{i}", 0.0) is None
    lim.reconfigure(cfg(max_connections=4, max_clients=4), 1.0)
    assert lim.active == 6 and lim.overloaded
    r = lim.on_request("10.0.0.0", 1.0)
    assert r is not None and r.kind is Kind.CEILING and r.status == 503
    lim.on_close("10.0.0.0")
    lim.on_close("10.0.0.1")
    assert lim.on_request("10.0.0.2", 1.0) is None  # at the ceiling, not above: served
    assert lim.on_accept("10.0.0.9", 1.0) is not None  # but no new connection
    # Turning a rate off and on again works on existing clients.
    lim.reconfigure(cfg(per_client_requests_per_second=0), 2.0)
    assert all(lim.on_request("10.0.0.2", 2.0) is None for _ in range(1000))
    lim.reconfigure(cfg(per_client_requests_per_second=1, per_client_requests_burst=1), 3.0)
    assert lim.on_request("10.0.0.2", 3.0) is None
    assert lim.on_request("10.0.0.2", 3.0) is not None


# -- memory -----------------------------------------------------------------------------------


def test_idle_client_forgotten_once_buckets_are_full() -> None:
    # Retention = max(200/100, 400/200) = 2 s with the defaults.
    lim = Limiter()
    assert lim.on_accept("a", 0.0) is None
    lim.on_close("a", 0.0)
    assert len(lim) == 1
    lim.on_accept("b", 1.9)
    assert len(lim) == 2
    lim.on_accept("b", 2.1)
    assert len(lim) == 1  # "a" dropped: forgetting it changes no decision
    lim.on_accept("c", 100.0)
    assert len(lim) == 2  # "b" still has connections


def test_forgetting_never_changes_a_decision() -> None:
    """A client dropped after going idle is admitted exactly as if it had been kept."""
    keep = Limiter(cfg(max_clients=10**9))
    lim = Limiter()
    times = [0.0, 0.001, 0.002, 0.003, 2.5, 2.5001, 2.5002, 10.0]
    for t in times:
        a, b = keep.on_accept("x", t), lim.on_accept("x", t)
        assert (a is None) == (b is None)
        if a is None:
            keep.on_close("x")
            lim.on_close("x")


def test_spoofed_source_flood_is_bounded() -> None:
    """100,000 one-shot clients: the table never exceeds max_clients."""
    lim = Limiter(cfg(max_connections=100, max_clients=1000))
    for i in range(100_000):
        key = client_key(f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::1")
        assert lim.on_accept(key, i * 1e-6) is None
        lim.on_close(key)
        assert len(lim) <= 1000
    assert lim.evicted > 0
    assert len(lim._idle) == len(lim)


def test_full_table_keeps_clients_with_connections() -> None:
    lim = Limiter(cfg(max_connections=3, max_clients=3))
    for k in ("a", "b"):
        assert lim.on_accept(k, 0.0) is None
    assert lim.on_accept("c", 0.0) is None
    lim.on_close("c")
    assert lim.on_accept("d", 0.0) is None  # evicts idle "c", never "a" or "b"
    assert lim.connections_of("a") == lim.connections_of("b") == lim.connections_of("d") == 1
    assert lim.stats()["evicted_clients"] == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["accept", "close", "request"]),
            st.integers(0, 7),
            st.floats(0, 0.5),
        ),
        max_size=200,
    )
)
def test_counts_consistent(ops: list[tuple[str, int, float]]) -> None:
    """Random operations keep: active = Σ per-client counts ≤ ceiling, table ≤ max_clients."""
    lim = Limiter(
        cfg(
            max_connections=6,
            max_clients=6,
            per_client_connections=3,
            per_client_new_per_second=5,
            per_client_new_burst=3,
            per_client_requests_per_second=5,
            per_client_requests_burst=2,
        )
    )
    open_: dict[str, int] = {}
    now = 0.0
    for op, who, dt in ops:
        now += dt
        key = f"10.0.0.{who}"
        if op == "accept":
            if lim.on_accept(key, now) is None:
                open_[key] = open_.get(key, 0) + 1
        elif op == "close":
            if open_.get(key):
                open_[key] -= 1
                lim.on_close(key, now)
        else:
            lim.on_request(key, now)
        assert lim.active == sum(open_.values()) <= 6
        assert all(lim.connections_of(k) == n for k, n in open_.items())
        assert lim.active_clients == sum(1 for n in open_.values() if n)
        assert len(lim) <= 6


# -- logging ----------------------------------------------------------------------------------


def test_should_log_once_per_interval_per_client_and_kind() -> None:
    lim = Limiter(cfg(log_interval=60.0))
    flood = [lim.should_log("a", Kind.CONNECT_RATE, t / 100) for t in range(1000)]
    assert flood.count(True) == 1 and flood[0]
    assert lim.should_log("a", Kind.REQUEST_RATE, 1.0)  # another kind
    assert lim.should_log("b", Kind.CONNECT_RATE, 1.0)  # another client
    assert not lim.should_log("a", Kind.CONNECT_RATE, 59.9)
    assert lim.should_log("a", Kind.CONNECT_RATE, 60.0)


def test_ceiling_is_logged_once_for_all_clients() -> None:
    lim = Limiter()
    lines = [lim.should_log(f"10.0.{i >> 8}.{i & 255}", Kind.CEILING, 5.0) for i in range(5000)]
    assert lines.count(True) == 1


def test_log_state_is_bounded() -> None:
    lim = Limiter(cfg(max_connections=10, max_clients=100))
    for i in range(10_000):
        lim.should_log(str(i), Kind.CONNECTIONS, 0.0)
    assert len(lim._logged) <= 100


# -- cost -------------------------------------------------------------------------------------


def _per_call(fn: object, n: int) -> float:
    assert callable(fn)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def test_cost_per_call() -> None:
    """Each call is O(1) and cheap: generous bounds (µs) so a loaded CI box does not flake."""
    lim = Limiter()
    keys = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(10_000)]

    def accept_close(n: int) -> None:
        t = time.monotonic()
        for i in range(n):
            k = keys[i % 10_000]
            lim.on_accept(k, t)
            lim.on_close(k)

    def request(n: int) -> None:
        t = time.monotonic()
        lim.on_accept("r", t)
        for _ in range(n):
            lim.on_request("r", t)

    def key6(n: int) -> None:
        for i in range(n):
            client_key("2001:db8::%x" % (i % 1000))

    pair = _per_call(accept_close, 50_000)
    req = _per_call(request, 50_000)
    k6 = _per_call(key6, 50_000)
    print(f"accept+close {pair * 1e6:.2f} µs, request {req * 1e6:.2f} µs, v6 key {k6 * 1e6:.2f} µs")
    assert pair < 10e-6 and req < 5e-6 and k6 < 5e-6
