"""Domain normalisation and suffix sets (label-boundary matching)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.filter.domains import DomainIndex, DomainSet, normalize_domain, normalize_host


def test_suffix_matches_on_label_boundaries() -> None:
    s = DomainSet.from_patterns(["bad.example"])
    assert s.match("bad.example") == "bad.example"
    assert s.match("x.bad.example") == "bad.example"
    assert s.match("a.b.c.bad.example") == "bad.example"
    assert s.match("notbad.example") is None
    assert s.match("bad.example.com") is None
    assert s.match("example") is None


def test_exact_vs_suffix() -> None:
    s = DomainSet.from_patterns(["=exact.example", "sub.exact.example"])
    assert s.match("exact.example") == "=exact.example"
    assert s.match("www.exact.example") is None
    assert s.match("a.sub.exact.example") == "sub.exact.example"
    assert "exact.example" in s and "other.example" not in s
    assert len(s) == 2


def test_tld_and_ip_entries() -> None:
    s = DomainSet.from_patterns(["xxx", "10.1.2.3", "[2001:DB8::1]"])
    assert s.match("anything.xxx") == "xxx"
    # IP literals are exact only: no "parent" of an address.
    assert s.match("10.1.2.3") == "=10.1.2.3"
    assert s.match("2001:db8::1") == "=2001:db8::1"
    assert s.match("9.10.1.2.3") is None


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Example.COM.", ("example.com", False)),
        (".example.com", ("example.com", False)),
        ("*.example.com", ("example.com", False)),
        ("_dmarc.example.com", ("_dmarc.example.com", False)),
        ("bücher.de", ("xn--bcher-kva.de", False)),
        ("192.168.0.1", ("192.168.0.1", True)),
        ("::ffff:1.2.3.4", ("::ffff:102:304", True)),
    ],
)
def test_normalize_ok(text: str, expected: tuple[str, bool]) -> None:
    assert normalize_domain(text) == expected


@pytest.mark.parametrize(
    "text,reason",
    [
        ("", "empty"),
        ("a b.com", "whitespace"),
        ("a..com", "empty label"),
        ("x" * 64 + ".com", "label longer"),
        (("a" * 60 + ".") * 5 + "com", "longer than 253"),
        ("ex$ample.com", "invalid characters"),
        ("1.2.3.256", "dotted-quad"),
        ("1.2.3", "dotted-quad"),
        ("01.2.3.4", "dotted-quad"),
        ("[::1", "IPv6"),
        ("1::2::3", "IPv6"),
        ("exa\udcffmple.com", "invalid characters"),
    ],
)
def test_normalize_rejects(text: str, reason: str) -> None:
    result = normalize_domain(text)
    assert isinstance(result, str) and reason in result, result


def test_from_patterns_rejects_bad_entry() -> None:
    with pytest.raises(ValueError, match="whitespace"):
        DomainSet.from_patterns(["good.example", "bad example"])


@pytest.mark.parametrize(
    "host,expected",
    [
        ("Example.COM:8080", "example.com"),
        ("example.com.", "example.com"),
        ("[2001:DB8::1]:443", "2001:db8::1"),
        ("2001:db8:0::1", "2001:db8::1"),
        ("10.0.0.1:80", "10.0.0.1"),
    ],
)
def test_normalize_host(host: str, expected: str) -> None:
    assert normalize_host(host) == expected


def test_index_collects_all_tags() -> None:
    index = DomainIndex({"example": ("a",), "bad.example": ("b", "c")})
    assert index.lookup("x.bad.example") == {"a": "example", "b": "bad.example", "c": "bad.example"}
    assert index.lookup("notbad.example") == {"a": "example"}
    assert index.lookup("other") == {}


_label = st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(_label, min_size=1, max_size=5), st.lists(_label, min_size=1, max_size=5))
def test_suffix_property(entry: list[str], host: list[str]) -> None:
    """A suffix entry matches exactly the names that end with its labels."""
    name, probe = ".".join(entry), ".".join(host)
    expected = host[-len(entry) :] == entry if len(host) >= len(entry) else False
    if name[-1].isdigit() or probe[-1].isdigit():
        return  # numeric names are IP literals, exact only
    s = DomainSet.from_patterns([name])
    assert (s.match(probe) is not None) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_normalize_never_raises(text: str) -> None:
    result = normalize_domain(text)
    if not isinstance(result, str):
        name, _ = result
        assert name == name.lower() and " " not in name
    normalize_host(text)


def test_a_url_in_a_domain_list_is_named_a_url() -> None:
    # It once read as "not a valid IPv6 literal" (the ":" of the scheme).
    for entry in ("http://x.example/", "x.example/path"):
        reason = normalize_domain(entry)
        assert isinstance(reason, str) and reason.startswith("a URL, not a domain name"), reason
