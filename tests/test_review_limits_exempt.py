"""Review of tproxy.limits as an admin would use it: exemptions, many clients, IPv6, reload.

A Squid admin exempts hosts from delay pools and maxconn ACLs (the office's own server, a
monitoring box, a NATed lab); tproxy needs the same, or a busy legitimate host gets 429s.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from tproxy import config
from tproxy.config import ConfigError, ConfigErrors
from tproxy.limits import Kind, Limiter, LimitsConfig


def parse(table: dict[str, Any]) -> LimitsConfig:
    config.load(None)
    result: LimitsConfig = config.parse({"limits": table}).sections["limits"]
    return result


def strict(**kw: Any) -> LimitsConfig:
    """Tight per-client limits so a handful of calls reach them."""
    base: dict[str, Any] = {
        "per_client_connections": 2,
        "per_client_new_per_second": 1.0,
        "per_client_new_burst": 2,
        "per_client_requests_per_second": 1.0,
        "per_client_requests_burst": 2,
        "max_connections": 50,
        "max_clients": 100,
    }
    return LimitsConfig(**(base | kw))


EXEMPT = (ipaddress.ip_network("10.0.9.0/24"), ipaddress.ip_network("2001:db8:5::/48"))


def test_exempt_is_parsed_as_networks_and_defaults_to_none() -> None:
    assert parse({}).exempt == ()
    cfg = parse({"exempt": ["10.0.9.0/24", "10.0.0.7", "2001:db8:5::/48"]})
    assert [str(n) for n in cfg.exempt] == ["10.0.9.0/24", "10.0.0.7/32", "2001:db8:5::/48"]


@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        ({"exempt": ["10.0.0.300"]}, "limits.exempt[0]", "not an IP address"),
        # Counted per /64: one address inside a group cannot be exempt on its own.
        ({"exempt": ["2001:db8::10"], "ipv6_prefix": 64}, "limits.exempt[0]", "/64"),
        ({"exempt": ["2001:db8::/96"], "ipv6_prefix": 64}, "limits.exempt[0]", "/64"),
    ],
)
def test_exempt_errors_name_the_entry(table: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises((ConfigError, ConfigErrors)) as info:
        parse(table)
    assert key in str(info.value) and words in str(info.value)


def test_exempt_ipv6_host_with_per_address_limits() -> None:
    cfg = parse({"exempt": ["2001:db8::10"], "ipv6_prefix": 128})
    lim = Limiter(strict(exempt=cfg.exempt, ipv6_prefix=128))
    key = lim.client_key("2001:db8::10")
    assert all(lim.on_accept(key, 0.0) is None for _ in range(20))


def test_exempt_clients_pass_every_per_client_limit() -> None:
    lim = Limiter(strict(exempt=EXEMPT))
    for ip in ("10.0.9.5", "2001:db8:5:1::1", "2001:db8:5:2::1"):
        key = lim.client_key(ip)
        assert all(lim.on_accept(key, 0.0) is None for _ in range(10)), ip
        assert all(lim.on_request(key, 0.0) is None for _ in range(100)), ip
    # Everybody else is still limited.
    other = lim.client_key("10.0.0.5")
    results = [lim.on_accept(other, 0.0) for _ in range(3)]
    assert results[2] is not None and results[2].kind is Kind.CONNECTIONS
    assert lim.on_request(other, 0.0) is None and lim.on_request(other, 0.0) is None
    refused = lim.on_request(other, 0.0)
    assert refused is not None and refused.status == 429 and refused.retry_after == 1


def test_exempt_clients_still_count_toward_the_ceiling() -> None:
    # The ceiling protects the daemon's descriptors, not fairness: nobody is above it.
    lim = Limiter(strict(exempt=EXEMPT, max_connections=5, max_clients=100))
    key = lim.client_key("10.0.9.5")
    assert all(lim.on_accept(key, 0.0) is None for _ in range(5))
    refused = lim.on_accept(key, 0.0)
    assert refused is not None and refused.kind is Kind.CEILING and refused.status == 503


def test_reload_adds_and_removes_an_exemption_for_known_clients() -> None:
    lim = Limiter(strict())
    key = lim.client_key("10.0.9.5")
    assert lim.on_accept(key, 0.0) is None and lim.on_accept(key, 0.0) is None
    assert lim.on_accept(key, 0.0) is not None  # per-client limit of 2
    lim.reconfigure(strict(exempt=EXEMPT), 0.0)
    assert lim.on_accept(key, 0.0) is None  # exempt now, with its 2 connections kept
    assert lim.connections_of(key) == 3
    lim.reconfigure(strict(), 0.0)
    assert lim.on_accept(key, 0.0) is not None  # limited again: 3 >= 2
    for _ in range(3):
        lim.on_close(key, 0.0)
    assert lim.connections_of(key) == 0 and lim.active == 0


def test_many_clients_each_limited_alone_with_bounded_memory() -> None:
    lim = Limiter(strict(max_connections=2_000, max_clients=2_000, ipv6_prefix=64))
    keys = [lim.client_key(f"2001:db8:{i:x}::{j}") for i in range(500) for j in (1, 2)]
    admitted = [k for k in keys if lim.on_accept(k, 0.0) is None]
    assert len(admitted) == 1000  # two addresses of one /64 share its per-client budget of 2
    assert len(lim) == 500
    assert lim.stats()["active_clients"] == 500
    refused = lim.stats()["refused"]
    assert refused == {"ceiling": 0, "connections": 0, "connect_rate": 0, "request_rate": 0}
    for k in admitted:
        lim.on_close(k, 0.0)
    # A later flood of new clients evicts the idle ones rather than growing.
    for i in range(5_000):
        k = lim.client_key(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
        assert lim.on_accept(k, 0.5) is None
        lim.on_close(k, 0.5)
    assert len(lim) <= 2_000
