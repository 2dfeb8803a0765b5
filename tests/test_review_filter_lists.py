"""Adversarial review of category lists: file formats seen in the wild, size, and lists that
change or break under a running filter."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pytest

from tproxy.config import ConfigErrors, Reader
from tproxy.filter import load_categories, parse_filter
from tproxy.filter.component import load_policy
from tproxy.filter.model import FilterConfig


def cats(tmp_path: Path, domains: bytes | None = None, urls: bytes | None = None) -> Path:
    d = tmp_path / "adult"
    d.mkdir(exist_ok=True)
    if domains is not None:
        (d / "domains").write_bytes(domains)
    if urls is not None:
        (d / "urls").write_bytes(urls)
    return tmp_path


def fcfg(lists: Path) -> FilterConfig:
    text = (
        f'[filter]\ncategories_dir = "{lists}"\n'
        '[[filter.rule]]\ngroup = "*"\naction = "deny"\ncategories = ["adult"]\n'
    )
    r = Reader(tomllib.loads(text)["filter"], "t.toml", "filter")
    cfg = parse_filter(r)
    assert r.errors == []
    return cfg


def test_bom_crlf_tabs_comments_and_wildcards(tmp_path: Path) -> None:
    data = (
        b"\xef\xbb\xbfbom.example\r\n"
        b"  spaced.example \t\r\n"
        b"\r\n"
        b"# a comment\r\n"
        b"\t# an indented comment\r\n"
        b"*.wild.example\r\n"
        b".dot.example\r\n"
        b"UPPER.Example.\r\n"
        b"last.example"  # no newline at the end
    )
    result = load_categories(cats(tmp_path, data), ["adult"])
    assert result.warnings == [], [str(w) for w in result.warnings]
    c = result.categories
    for host in (
        "bom.example",
        "spaced.example",
        "wild.example",
        "a.wild.example",
        "dot.example",
        "x.dot.example",
        "upper.example",
        "last.example",
    ):
        assert "adult" in c.match(host), host
    assert c.match("notwild.example") == {}


def test_bom_before_a_comment_is_still_a_comment(tmp_path: Path) -> None:
    result = load_categories(cats(tmp_path, b"\xef\xbb\xbf# UT1 list\nx.example\n"), ["adult"])
    assert result.warnings == [], [str(w) for w in result.warnings]


def test_utf16_list_is_reported_not_silently_empty(tmp_path: Path) -> None:
    data = "a.example\nb.example\n".encode("utf-16")
    result = load_categories(cats(tmp_path, data), ["adult"])
    assert result.warnings_total >= 1


def test_large_list_loads_quickly(tmp_path: Path) -> None:
    n = 300_000
    lines = "".join(f"site{i}.example{i % 97}.com\n" for i in range(n))
    lists = cats(tmp_path, lines.encode())
    t0 = time.perf_counter()
    result = load_categories(lists, ["adult"])
    elapsed = time.perf_counter() - t0
    assert result.categories.stats[0].domains == n
    assert elapsed < 5.0, elapsed  # ~1 s per million on this machine (README)
    t0 = time.perf_counter()
    for i in range(10_000):
        result.categories.match(f"www.site{i}.example{i % 97}.com")
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "break_it",
    [
        # An unreadable list (as root, a directory in place of the file gives the same EISDIR
        # an EACCES would give another user).
        lambda d: ((d / "domains").unlink(), (d / "domains").mkdir()),
        # A list updater that empties the folder before refilling it: no file at all.
        lambda d: (d / "domains").unlink(),
    ],
)
def test_a_used_category_that_cannot_be_read_refuses_the_load(
    tmp_path: Path, break_it: object
) -> None:
    # A reload must not swap in a category that silently matches nothing (the filter would
    # open up while the lists are being replaced): refuse it, naming the rule that uses it.
    lists = cats(tmp_path, b"porn.example\n")
    policy, _ = load_policy(fcfg(lists))
    assert policy.categories.match("porn.example")
    break_it(lists / "adult")  # type: ignore[operator]
    with pytest.raises(ConfigErrors) as info:
        load_policy(fcfg(lists))
    text = str(info.value)
    assert "filter.rule[0].categories[0]" in text and "adult" in text, text
