"""The shared URL/host/media-type/list helpers: one normal form for the cache, filter, shaping
and access log."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.cache import policy
from tproxy.filter import verdict
from tproxy.shaping.component import Clients, request_facts
from tproxy.uri import (
    bracket,
    effective_url,
    list_tokens,
    media_type,
    normalize_host,
    parse_host,
    request_url,
    split_authority,
    split_url,
)


@pytest.mark.parametrize(
    ("authority", "scheme", "expected"),
    [
        ("Example.COM", "http", ("example.com", None)),
        ("example.com:80", "http", ("example.com", None)),
        ("example.com:0080", "http", ("example.com", None)),
        ("example.com:443", "https", ("example.com", None)),
        ("example.com:443", "http", ("example.com", 443)),
        ("example.com:", "http", ("example.com", None)),
        ("example.com.:8080", "http", ("example.com", 8080)),
        ("user:pw@example.com", "http", ("example.com", None)),
        ("[::1]:8080", "http", ("[::1]", 8080)),
        ("[::1]", "http", ("[::1]", None)),
        ("host:abc", "http", ("host:abc", None)),
        ("host:\u00b2", "http", ("host:\u00b2", None)),  # "²".isdigit(), yet no port
        ("", "http", ("", None)),
    ],
)
def test_split_authority(authority: str, scheme: str, expected: tuple[str, int | None]) -> None:
    assert split_authority(authority, scheme) == expected


def test_bracket_only_unbracketed_ipv6() -> None:
    assert bracket("10.0.0.1") == "10.0.0.1"
    assert bracket("fd00::1") == "[fd00::1]"
    assert bracket("[fd00::1]") == "[fd00::1]"
    assert bracket("example.com") == "example.com"


def test_request_url_normal_form() -> None:
    assert request_url("http", b"Example.com:80", b"/a?b") == "http://example.com/a?b"
    assert request_url("HTTP", "example.com", "a") == "http://example.com/a"
    assert request_url("http", None, b"/a") == ""  # HTTP/1.0 without Host
    assert request_url("http", b"ignored", b"HTTPS://X.test:443") == "https://x.test/"
    assert request_url("http", b"h", b"*") == "http://h*"
    # the cache policy exposes the same function
    assert policy.request_url is request_url


def test_effective_url_falls_back_to_the_destination() -> None:
    assert effective_url(b"/x", b"Site.Test", "10.0.0.2") == "http://site.test/x"
    assert effective_url(b"/x", None, "10.0.0.2") == "http://10.0.0.2/x"
    assert effective_url(b"/x", None, "fd00::2") == "http://[fd00::2]/x"
    assert effective_url(b"/x", b"", "10.0.0.2") == "http://10.0.0.2/x"
    assert effective_url(b"http://o.test:8080/p", b"h", "10.0.0.2") == "http://o.test:8080/p"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://Example.com/a", ("http://example.com/a", "example.com", "/a")),
        ("http://example.com:80/a", ("http://example.com/a", "example.com", "/a")),
        # equivalent spellings of one origin cannot dodge a URL prefix (RFC 9110 §4.2.3)
        ("http://example.com.:80/a", ("http://example.com/a", "example.com", "/a")),
        ("http://example.com:0080/a", ("http://example.com/a", "example.com", "/a")),
        ("http://u@example.com/a", ("http://example.com/a", "example.com", "/a")),
        ("https://example.com/a", ("http://example.com/a", "example.com", "/a")),
        ("http://example.com?q", ("http://example.com/?q", "example.com", "/?q")),
        ("http://example.com", ("http://example.com/", "example.com", "/")),
        ("http://[FD00::1]:8080/", ("http://[fd00::1]:8080/", "fd00::1", "/")),
        ("example.com/x", ("http://example.com/x", "example.com", "/x")),
        ("/x", ("http:///x", "", "/x")),
    ],
)
def test_split_url(url: str, expected: tuple[str, str, str]) -> None:
    assert split_url(url) == expected
    assert verdict.split_url is split_url


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_split_url_never_raises(url: str) -> None:
    full, _, path = split_url(url)
    assert full.startswith("http://") and full.endswith(path)


# What can stand in a request's URL: no controls or spaces (RFC 9112 §3.2).
_URL_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Zs", "Zl", "Zp")), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_URL_TEXT)
def test_split_url_is_idempotent(url: str) -> None:
    full, host, path = split_url(url)
    assert split_url(full) == (full, host, path)
    assert normalize_host(host) == host


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"[A-Za-z0-9.-]{1,12}(:[0-9]{1,5})?", fullmatch=True),
    st.from_regex(r"/[a-z0-9/?=&]{0,12}", fullmatch=True),
)
def test_cache_url_and_filter_url_agree(host: str, target: str) -> None:
    url = request_url("http", host, target)
    if url:
        assert split_url(url)[0] == url


def test_normalize_host() -> None:
    assert normalize_host("Example.COM.:8080") == "example.com"
    assert normalize_host("[FD00:0::1]:80") == "fd00::1"
    assert normalize_host("fd00:0:0::1") == "fd00::1"
    assert normalize_host("  a.test ") == "a.test"


@pytest.mark.parametrize(
    ("text", "authority", "host"),
    [
        # Where the two forms differ, and why (see parse_host).
        ("u@Example.com:8080", ("example.com", 8080), "u@example.com"),  # userinfo: URLs only
        ("[FD00:0::1]:8080", ("[fd00:0::1]", 8080), "fd00::1"),  # URL form vs compared form
        ("fd00:0::1", ("fd00:0:", 1), "fd00::1"),  # unbracketed IPv6 is no authority
        ("host:abc", ("host:abc", None), "host"),  # a junk port cannot dodge a host rule
        ("example.com..", ("example.com", None), "example.com."),
        # Where they agree.
        ("Example.COM.:80", ("example.com", None), "example.com"),
        (" a.test:81 ", ("a.test", 81), "a.test"),
        ("10.0.0.1:443", ("10.0.0.1", 443), "10.0.0.1"),
        ("", ("", None), ""),
    ],
)
def test_parse_host_forms(text: str, authority: tuple[str, int | None], host: str) -> None:
    assert parse_host(text, host_form=False) == split_authority(text) == authority
    assert parse_host(text, host_form=True) == (normalize_host(text), None) == (host, None)


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"[A-Za-z0-9-]{1,8}(\.[A-Za-z0-9-]{1,8}){0,3}\.?", fullmatch=True),
    st.one_of(st.none(), st.integers(0, 65535)),
)
def test_host_forms_agree_on_plain_names(name: str, port: int | None) -> None:
    """A name with an optional numeric port: the host form is the authority form's host."""
    text = name if port is None else f"{name}:{port}"
    assert normalize_host(text) == split_authority(text)[0]


def test_shaping_facts_use_the_shared_host_form() -> None:
    clients = Clients()
    assert request_facts("http://Example.ORG.:8080/a", None, "10.0.0.1", clients).host == (
        "example.org"
    )
    assert request_facts("/x", b"[FD00::1]:81", "10.0.0.1", clients).host == "fd00::1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (b"", None),
        (b"Text/HTML; charset=utf-8", "text/html"),
        ("video/mp4", "video/mp4"),
        (" image/png ;q=1", "image/png"),
        (b"; charset=x", None),
    ],
)
def test_media_type(value: bytes | str | None, expected: str | None) -> None:
    assert media_type(value) == expected


def test_list_tokens() -> None:
    assert list_tokens([b"Keep-Alive, Upgrade", b" ,close,, "]) == [
        b"keep-alive",
        b"upgrade",
        b"close",
    ]
    assert list_tokens([]) == []
    assert list_tokens([b"a\t,\tB"]) == [b"a", b"b"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=20).map(lambda b: b.strip()), max_size=4))
def test_fields_tokens_is_list_tokens(values: list[bytes]) -> None:
    headers = [(b"Connection", v) for v in values]
    assert policy.Fields(headers).tokens(b"connection") == list_tokens(values)
