"""Adversarial review of HTTP request matching: what a pupil would try against the filter.

Every request goes through the same path as in the daemon: the URL is what
:func:`tproxy.uri.effective_url` rebuilds from the request target, Host and destination.
"""

from __future__ import annotations

import tomllib
from datetime import datetime
from pathlib import Path

import pytest

from tests.http1_util import requests
from tproxy.config import Reader
from tproxy.filter import Policy, RequestInfo, load_categories, parse_filter
from tproxy.filter.verdict import match_url
from tproxy.http1 import ProtocolError, RequestHead, origin_form
from tproxy.uri import effective_url

MON_10 = datetime(2024, 1, 1, 10, 0)

RULES = """
[[filter.rule]]
group = "*"
action = "deny"
domains = ["blocked.example", "bücher.example"]

[[filter.rule]]
group = "*"
action = "deny"
url_prefix = ["open.example/secret/", "open.example/x%2Fy"]

[[filter.rule]]
group = "*"
action = "deny"
url_regex = ['^http://regex\\.example/forbidden']

[[filter.rule]]
group = "*"
action = "deny"
extensions = [".exe"]
"""


def make_policy(text: str = RULES, lists: Path | None = None) -> Policy:
    head = f'[filter]\ncategories_dir = "{lists}"\n' if lists is not None else ""
    r = Reader(tomllib.loads(head + text).get("filter", {}), "t.toml", "filter")
    cfg = parse_filter(r)
    assert r.errors == [], [str(e) for e in r.errors]
    cats = None
    if lists is not None:
        cats = load_categories(lists, cfg.used_categories).categories
    return Policy.compile(cfg, cats)


POLICY = make_policy()


def action(target: bytes, host: bytes | None, dst: str = "192.0.2.1", p: Policy = POLICY) -> str:
    url = effective_url(target, host, dst)
    info = RequestInfo("10.0.0.5", None, "GET", "", url, None, MON_10)
    return p.request_verdict(info).action


@pytest.mark.parametrize(
    "host",
    [
        b"blocked.example",
        b"BLOCKED.Example",
        b"blocked.example.",
        b"blocked.example:80",
        b"blocked.example.:8080",
        b"www.blocked.example",
        b"WWW.BLOCKED.EXAMPLE.:80",
        b"xn--bcher-kva.example",
        b"XN--BCHER-KVA.EXAMPLE.",
    ],
)
def test_host_spellings_of_a_blocked_domain_are_denied(host: bytes) -> None:
    assert action(b"/", host) == "deny"


def test_look_alike_hosts_are_not_denied() -> None:
    assert action(b"/", b"notblocked.example") == "allow"
    assert action(b"/", b"blocked.example.evil") == "allow"


def test_absolute_form_names_the_host_whatever_host_says() -> None:
    # RFC 9112 §3.2.2: the target's authority wins; the proxy also forwards it that way.
    assert action(b"http://blocked.example/", b"school.example") == "deny"
    assert action(b"http://school.example/", b"blocked.example") == "allow"
    assert action(b"HTTP://Blocked.Example.:80/x", b"school.example") == "deny"


@pytest.mark.parametrize("target", [b"/?://", b"/x?u=http://a.example/", b"/a://b", b"/?:///x"])
def test_a_scheme_separator_in_an_origin_form_target_does_not_hide_the_host(target: bytes) -> None:
    # "/" starts origin-form whatever follows (RFC 9112 §3.2.1): "GET /?://" once made the URL
    # empty, so no deny rule matched while the origin served blocked.example.
    assert action(target, b"blocked.example") == "deny"
    assert effective_url(target, b"blocked.example", "192.0.2.1").startswith(
        "http://blocked.example/"
    )


@pytest.mark.parametrize(
    "target", [b"aaaaaaaaaaaaaaaaaaaaaaaa://blocked.example/x", b"ftp://blocked.example/x"]
)
def test_absolute_form_with_another_scheme_is_refused_before_any_filter(target: bytes) -> None:
    # A long scheme once made the filter judge Host while the forwarder sent the target's
    # authority upstream; only http and https targets are taken now (anything else: 400).
    (event,) = requests([b"GET " + target + b" HTTP/1.1\r\nHost: school.example\r\n\r\n"])
    assert isinstance(event, ProtocolError) and event.status == 400, event
    head = requests([b"GET HTTPS://blocked.example/x HTTP/1.1\r\nHost: s\r\n\r\n"])[0]
    assert isinstance(head, RequestHead) and origin_form(head.target) == (
        b"blocked.example",
        b"/x",
    )


def test_http10_without_host_uses_the_destination_address() -> None:
    deny_ip = make_policy('[[filter.rule]]\ngroup = "*"\naction = "deny"\ndomains = ["192.0.2.7"]')
    assert action(b"/", None, "192.0.2.7", deny_ip) == "deny"
    assert action(b"/", None, "192.0.2.8", deny_ip) == "allow"


@pytest.mark.parametrize(
    "target",
    [
        b"/secret/page",
        b"/%73ecret/page",  # %73 = "s": unreserved, RFC 3986 §6.2.2.2
        b"/%2573ecret/",  # not this one: decoded once it is "%73ecret"
        b"/secre%74/",
        b"/public/../secret/x",
        b"/public/%2e%2e/secret/x",
        b"/public/%2E%2E/secret/x",
        b"/./secret/x",
        b"//secret/x",
        b"/secret%2Fx",
        b"/secret/x?y=1",
        b"/secret;jsessionid=1/x",  # path parameters: Tomcat and Jetty drop them
        b"/public/..;/secret/x",  # Tomcat's "..;" traversal
        b"/public/..\\secret/x",  # IIS reads a backslash as "/"
        b"/public/..%5Csecret/x",
    ],
)
def test_url_prefix_sees_through_encoding_and_dot_segments(target: bytes) -> None:
    expected = "allow" if target.startswith(b"/%25") else "deny"
    assert action(target, b"open.example") == expected, target


def test_url_prefix_entries_are_normalised_like_requests() -> None:
    # The entry "open.example/x%2Fy" is kept as "/x/y", the form requests are matched in.
    assert action(b"/x/y", b"open.example") == "deny"
    assert action(b"/x%2fy", b"open.example") == "deny"
    assert action(b"/x", b"open.example") == "allow"


@pytest.mark.parametrize(
    "target",
    [b"/forbidden", b"/%66orbidden", b"/ok/../forbidden", b"/ok/%2E%2E/forbidden"],
)
def test_url_regex_sees_the_normalised_url(target: bytes) -> None:
    assert action(target, b"regex.example") == "deny"


@pytest.mark.parametrize(
    "target", [b"/f.exe", b"/f.EXE", b"/f.ex%65", b"/f.exe?x=1", b"/f%2Eexe", b"/f.exe;v=2"]
)
def test_extension_rule_sees_the_decoded_path(target: bytes) -> None:
    assert action(target, b"files.example") == "deny"


def test_query_is_not_path_normalised() -> None:
    # "/../" in a query is data, not a path step; "%3F" in the path is not a query start.
    assert match_url("http://h/p?a=/../b") == "http://h/p?a=/../b"
    assert match_url("http://h/a%3fb/../c") == "http://h/c"
    assert match_url("http://h/a%3Fb") == "http://h/a%3Fb"


def test_category_urls_see_through_encoding(tmp_path: Path) -> None:
    (tmp_path / "porn").mkdir()
    (tmp_path / "porn" / "urls").write_text("video.example/adult/\nvideo.example/x%2Dy\n")
    p = make_policy(
        '[[filter.rule]]\ngroup = "*"\naction = "deny"\ncategories = ["porn"]', tmp_path
    )
    for target in (b"/adult/1", b"/%61dult/1", b"/kids/../adult/1", b"/x-y", b"/x%2dy"):
        assert action(target, b"video.example", p=p) == "deny", target
    assert action(b"/kids/", b"video.example", p=p) == "allow"


def test_unicode_host_in_explain_matches_the_idn_entry() -> None:
    # Only `tproxy filter explain` can hand the filter a Unicode host (the HTTP parser takes
    # ASCII hosts only); it must agree with the xn-- form the config entry became.
    info = RequestInfo("10.0.0.5", None, "GET", "", "http://Bücher.example/", None, MON_10)
    assert POLICY.request_verdict(info).action == "deny"
    assert POLICY.sni_verdict("10.0.0.5", "bücher.example", MON_10).action == "deny"


def test_url_prefix_without_path_stops_at_the_host() -> None:
    p = make_policy(
        '[[filter.rule]]\ngroup = "*"\naction = "deny"\n'
        'url_prefix = ["site.example", "HTTP://Other.Example.:80/Path"]'
    )
    assert action(b"/x", b"site.example", p=p) == "deny"
    # The entry's host ends at a label: not a prefix of a longer name.
    assert action(b"/x", b"site.example.evil", p=p) == "allow"
    assert action(b"/x", b"site.examplefoo.com", p=p) == "allow"
    # Host case, trailing dot and the default port are spelling, not meaning.
    assert action(b"/Path/1", b"other.example", p=p) == "deny"
    assert action(b"/path/1", b"other.example", p=p) == "allow"  # paths keep their case


def test_ip_literal_hosts_can_be_denied_with_a_regex() -> None:
    # The filter cannot know which name an address serves (no DNS here); a school that wants
    # "no browsing by address" says so with one url_regex, which sees the rebuilt URL.
    p = make_policy(
        '[[filter.rule]]\ngroup = "*"\naction = "deny"\n'
        "url_regex = ['^http://(?:[0-9.]+|\\[[0-9a-f:.]+\\])(?::[0-9]+)?/']"
    )
    assert action(b"/", b"93.184.216.34", p=p) == "deny"
    assert action(b"/", b"93.184.216.34:8080", p=p) == "deny"
    assert action(b"/", b"[2001:DB8::1]", p=p) == "deny"
    assert action(b"/", None, "192.0.2.9", p) == "deny"  # HTTP/1.0 without Host
    assert action(b"http://10.1.2.3/x", b"school.example", p=p) == "deny"
    assert action(b"/", b"school.example", p=p) == "allow"


def test_an_address_entry_meets_the_address_the_client_connected_to() -> None:
    # The proxy always forwards to the original destination, so an allowed Host (or any
    # spelling of the address: 3232235777, 0300.0250.1.1) sent to a denied address reaches it.
    deny_ip = make_policy(
        '[[filter.rule]]\ngroup = "*"\naction = "deny"\ndomains = ["192.0.2.7", "2001:db8::7"]'
    )

    def verdict(host: bytes, dest: str) -> str:
        info = RequestInfo(
            "10.0.0.5", None, "GET", "", effective_url(b"/", host, dest), None, MON_10, dest
        )
        return deny_ip.request_verdict(info).action

    for host in (b"school.example", b"3232235777", b"0300.0000.0002.0007", b"192.0.2.7"):
        assert verdict(host, "192.0.2.7") == "deny", host
    assert verdict(b"school.example", "2001:db8::7") == "deny"
    assert verdict(b"school.example", "192.0.2.8") == "allow"
    # HTTPS: the name in the hello, or the server's address.
    assert (
        deny_ip.sni_verdict("10.0.0.5", "school.example", MON_10, dest_ip="192.0.2.7").action
        == "deny"
    )
    assert (
        deny_ip.sni_verdict("10.0.0.5", "school.example", MON_10, dest_ip="192.0.2.8").action
        == "allow"
    )


def test_category_address_entries_meet_only_the_urls_host(tmp_path: Path) -> None:
    # Category lists carry addresses of shared hosts and CDNs: matched against the connected
    # address, one entry would deny every name served there. A literal address as the host
    # still meets them.
    (tmp_path / "proxies").mkdir()
    (tmp_path / "proxies" / "domains").write_text("198.51.100.9\nanon.example\n")
    p = make_policy(
        '[[filter.rule]]\ngroup = "*"\naction = "deny"\ncategories = ["proxies"]', tmp_path
    )
    url = effective_url(b"/", b"school.example", "198.51.100.9")
    info = RequestInfo("10.0.0.5", None, "GET", "", url, None, MON_10, "198.51.100.9")
    assert p.request_verdict(info).action == "allow"
    url = effective_url(b"/", b"198.51.100.9", "198.51.100.9")
    info = RequestInfo("10.0.0.5", None, "GET", "", url, None, MON_10, "198.51.100.9")
    assert p.request_verdict(info).action == "deny"


@pytest.mark.parametrize(
    "target", [b"/secret/..;x/../x", b"/secret/..\\x/../x", b"/secret/..%3Bx/../x"]
)
def test_a_path_two_kinds_of_server_read_differently_is_denied_if_either_reading_is(
    target: bytes,
) -> None:
    # nginx sees a segment "..;x" (and serves /secret/x); Tomcat drops ";x" and IIS reads "\"
    # as "/" (and serve /x). Judged one way only, one of them was a way around the rule.
    assert action(target, b"open.example") == "deny", target
    assert action(b"/public/..;x/../x", b"open.example") == "allow"


def test_an_allow_list_is_not_escaped_through_a_second_reading() -> None:
    allow_docs = make_policy(
        '[filter]\ndefault = "deny"\n[[filter.rule]]\ngroup = "*"\naction = "allow"\n'
        'url_prefix = ["open.example/docs/"]'
    )
    assert action(b"/docs/a", b"open.example", p=allow_docs) == "allow"
    assert action(b"/x/..;q/../docs/a", b"open.example", p=allow_docs) == "deny"
    assert action(b"/docs;v=1/a", b"open.example", p=allow_docs) == "deny"
