"""Adversarial review of policy edges: windows across midnight and DST, IPv6 groups, the block
page (escaping, status, HEAD, keep-alive) and that a blocked request never reaches the origin."""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from tests.test_review_http_shell import GET, rig, run, serve_ok
from tproxy.config import Reader
from tproxy.filter import Policy, RequestInfo, Verdict, parse_filter, render_block_page
from tproxy.filter.component import FilterComponent, block_response

POLICY_TEXT = """
[filter]
sni_default = "deny"

[[filter.group]]
name = "pupils"
cidrs = ["192.168.10.0/24", "fd00:10::/64"]

[[filter.group]]
name = "staff"
cidrs = ["192.168.0.0/16", "fd00::/16"]

[[filter.window]]
name = "night"
days = ["fri", "sun"]
hours = "22:00-06:00"

[[filter.window]]
name = "early"
hours = "02:00-03:00"

[[filter.rule]]
group = "pupils"
action = "deny"
window = "night"
domains = ["games.example"]

[[filter.rule]]
group = "*"
action = "deny"
window = "early"
domains = ["early.example"]

[[filter.rule]]
group = "*"
action = "deny"
domains = ["blocked.example"]
"""


def make_policy(text: str = POLICY_TEXT) -> Policy:
    r = Reader(tomllib.loads(text).get("filter", {}), "t.toml", "filter")
    cfg = parse_filter(r)
    assert r.errors == [], [str(e) for e in r.errors]
    return Policy.compile(cfg)


POLICY = make_policy()


def verdict(url: str, now: datetime, client: str = "192.168.10.5") -> str:
    return POLICY.request_verdict(RequestInfo(client, None, "GET", "", url, None, now)).action


# 2024-01-05 is a Friday.
@pytest.mark.parametrize(
    ("now", "action"),
    [
        (datetime(2024, 1, 5, 21, 59), "allow"),  # Friday before the window
        (datetime(2024, 1, 5, 22, 0), "deny"),  # Friday night
        (datetime(2024, 1, 6, 0, 0), "deny"),  # past midnight: Saturday, still Friday's night
        (datetime(2024, 1, 6, 5, 59), "deny"),
        (datetime(2024, 1, 6, 6, 0), "allow"),  # the end is exclusive
        (datetime(2024, 1, 6, 23, 0), "allow"),  # Saturday night is not listed
        (datetime(2024, 1, 7, 1, 0), "allow"),  # ... nor is its morning after
        (datetime(2024, 1, 7, 23, 30), "deny"),  # Sunday night
        (datetime(2024, 1, 8, 3, 0), "deny"),  # into Monday morning (week wraps)
        (datetime(2024, 1, 8, 22, 30), "allow"),  # Monday night is not listed
    ],
)
def test_window_across_midnight(now: datetime, action: str) -> None:
    assert verdict("http://games.example/", now) == action


@pytest.fixture
def berlin() -> Iterator[None]:
    old = time.tzname
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()
        assert time.tzname == old


def test_windows_follow_local_wall_clock_across_dst(berlin: None) -> None:
    # Spring forward 2024-03-31: 02:00 CET becomes 03:00 CEST; "02:00-03:00" does not exist.
    assert verdict("http://early.example/", datetime(2024, 3, 31, 0, 59, tzinfo=UTC)) == "allow"
    assert verdict("http://early.example/", datetime(2024, 3, 31, 1, 0, tzinfo=UTC)) == "allow"
    # Fall back 2024-10-27: 02:00-03:00 local happens twice, both are in the window.
    assert verdict("http://early.example/", datetime(2024, 10, 27, 0, 30, tzinfo=UTC)) == "deny"
    assert verdict("http://early.example/", datetime(2024, 10, 27, 1, 30, tzinfo=UTC)) == "deny"
    assert verdict("http://early.example/", datetime(2024, 10, 27, 2, 30, tzinfo=UTC)) == "allow"
    # Friday 2024-03-29 21:30 UTC is 22:30 local: inside "night" (a UTC clock would say no).
    assert verdict("http://games.example/", datetime(2024, 3, 29, 21, 30, tzinfo=UTC)) == "deny"
    text = POLICY.explain(
        RequestInfo(
            "192.168.10.5",
            None,
            "GET",
            "",
            "http://games.example/",
            None,
            datetime(2024, 3, 29, 21, 30, tzinfo=UTC),
        )
    )
    assert "fri 22:30 local" in text and "window night" in text and "ACTIVE" in text


@pytest.mark.parametrize(
    ("client", "group"),
    [
        ("192.168.10.5", "pupils"),
        ("192.168.20.5", "staff"),
        ("::ffff:192.168.10.5", "pupils"),  # a dual-stack socket's view of an IPv4 client
        ("fd00:10::5", "pupils"),
        ("FD00:10::ABCD", "pupils"),
        ("fd00:10::5%eth0", "pupils"),
        ("fd00:10:0:0:ffff::1", "pupils"),
        ("fd00:11::5", "staff"),
        ("2001:db8::5", "default"),
        ("10.0.0.1", "default"),
        ("not-an-ip", "default"),
    ],
)
def test_groups_by_cidr_ipv4_and_ipv6(client: str, group: str) -> None:
    assert POLICY.select_group(client).name == group


XSS = "http://blocked.example/\"><script>alert(1)</script>?a=<b>&c='d'"


def test_block_page_escapes_every_field() -> None:
    v = Verdict("deny", "<g>", "filter.rule[2]", "domain <blocked.example>", "<cat>")
    page = render_block_page(POLICY.block_template, v, XSS).decode()
    assert "<script>" not in page and "<b>" not in page and "<g>" not in page
    assert "&lt;script&gt;" in page and "&quot;&gt;" in page
    custom = "<a href=\"$url\" title='$reason'>$host</a> $category"
    page = render_block_page(custom, v, XSS).decode()
    assert '"><' not in page and "'d'" not in page and "<cat>" not in page


def test_block_response_head_and_keep_alive() -> None:
    v = Verdict("deny", "pupils", "filter.rule[2]", "domain blocked.example")
    full = block_response(POLICY, v, XSS, head_only=False, keep=True)
    head, _, body = full.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 403 Forbidden"
    assert b"Content-Length: %d" % len(body) in lines
    assert b"Connection: keep-alive" in lines and b"Cache-Control: no-store" in lines
    assert sum(line.startswith(b"Date: ") for line in lines) == 1  # RFC 9110 §6.6.1
    only = block_response(POLICY, v, XSS, head_only=True, keep=False)
    assert only.endswith(b"\r\n\r\n") and b"Connection: close" in only
    # HEAD: the same Content-Length as GET would get (RFC 9110 §9.3.2), and no body.
    assert b"Content-Length: %d" % len(body) in only


def test_blocked_requests_never_reach_the_origin_and_the_connection_stays() -> None:
    async def main() -> None:
        async with rig(serve_ok) as r:
            comp = FilterComponent(r.server.cfg)
            comp.policy = make_policy(POLICY_TEXT.replace("192.168.0.0/16", "127.0.0.0/8"))
            comp.allows_all = False
            r.server.request_hooks.insert(0, comp.on_request)
            # A blocked GET with an XSS-laden target, a blocked HEAD, a blocked POST with a
            # body, then an allowed request: all on one keep-alive connection.
            r.send(b'GET /"><script>x</script> HTTP/1.1\r\nHost: blocked.example\r\n\r\n')
            status, head, body = await r.response()
            assert status == 403 and b"<script>" not in body and b"&lt;script&gt;" in body
            r.send(b"HEAD / HTTP/1.1\r\nHost: WWW.Blocked.Example.:80\r\n\r\n")
            r.send(b"POST /up HTTP/1.1\r\nHost: blocked.example\r\nContent-Length: 5\r\n\r\nhello")
            r.send(GET % b"fine")
            head = await r.reader.readuntil(b"\r\n\r\n")  # HEAD: no body follows
            assert head.startswith(b"HTTP/1.1 403") and b"Content-Length:" in head
            assert (await r.response())[0] == 403
            status, head, body = await r.response()
            assert status == 200 and body == b"ok"
            sent = r.origin_requests()
            assert len(sent) == 1 and sent[0].startswith(b"GET /fine "), sent
            results = [(rec.result, rec.status) for rec in r.log.records]
            assert results[:3] == [("TCP_DENIED", 403)] * 3, results

    run(main())
