"""Category lists in the UT1 layout: loading, warnings, URL prefixes, size and speed."""

from __future__ import annotations

import random
import string
import time
from pathlib import Path

from tproxy.filter.categories import MAX_WARNINGS, Categories, load_categories


def write(root: Path, category: str, kind: str, text: str | bytes) -> Path:
    (root / category).mkdir(parents=True, exist_ok=True)
    path = root / category / kind
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_loads_domains_and_urls(tmp_path: Path) -> None:
    write(tmp_path, "adult", "domains", "# comment\n\nbad.example\nPorn.Example.\n")
    write(tmp_path, "adult", "urls", "www.example.org/adult/\nhttp://cdn.example.net/x\n")
    write(tmp_path, "games", "domains", "bad.example\ngames.example\r\n")
    result = load_categories(tmp_path)
    assert result.warnings == [] and result.warnings_total == 0
    cats = result.categories
    assert cats.names == {"adult", "games"}
    assert {(s.name, s.domains, s.urls) for s in cats.stats} == {("adult", 2, 2), ("games", 2, 0)}
    assert cats.domain_categories("x.bad.example") == {
        "adult": "bad.example",
        "games": "bad.example",
    }
    assert cats.domain_categories("notbad.example") == {}
    assert cats.domain_categories("porn.example") == {"adult": "porn.example"}
    # URL lists: host (leading www. ignored on both sides) + case-insensitive path prefix.
    assert cats.url_categories("example.org", "/Adult/page?x") == {"adult": "example.org/adult/"}
    assert cats.url_categories("www.example.org", "/adult/") == {"adult": "example.org/adult/"}
    assert cats.url_categories("example.org", "/other") == {}
    assert cats.url_categories("sub.example.org", "/adult/") == {}
    assert cats.match("cdn.example.net", "/x/y") == {"adult": "cdn.example.net/x"}
    assert cats.match("cdn.example.net", None) == {}  # SNI: domain lists only


def test_only_named_categories(tmp_path: Path) -> None:
    write(tmp_path, "adult", "domains", "a.example\n")
    write(tmp_path, "games", "domains", "g.example\n")
    result = load_categories(tmp_path, ["games", "nosuch"])
    assert result.categories.names == {"games"}
    assert [(w.line, w.reason) for w in result.warnings] == [(0, "no such category directory")]
    assert result.categories.domain_categories("a.example") == {}


def test_malformed_lines_are_warnings(tmp_path: Path) -> None:
    domains = write(
        tmp_path,
        "mixed",
        "domains",
        b"good.example\nhas space.example\nbad$char.example\n"
        + b"x" * 70
        + b".example\n1.2.3.999\n\xe9t\xe9.example\nalso-good.example\n[::1\n",
    )
    urls = write(tmp_path, "mixed", "urls", "ok.example/path\nbad host/x\nok2.example/a b\n")
    result = load_categories(tmp_path)
    got = [(w.file, w.line) for w in result.warnings]
    assert got == [
        (str(domains), 2),
        (str(domains), 3),
        (str(domains), 4),
        (str(domains), 5),
        (str(domains), 6),
        (str(domains), 8),
        (str(urls), 2),
        (str(urls), 3),
    ]
    reasons = [w.reason for w in result.warnings]
    assert "whitespace" in reasons[0] and "invalid characters" in reasons[1]
    assert "label longer" in reasons[2] and "dotted-quad" in reasons[3]
    assert str(result.warnings[0]).startswith(f"{domains}:2: ")
    cats = result.categories
    assert cats.domain_categories("also-good.example") == {"mixed": "also-good.example"}
    assert cats.domain_categories("good.example") == {"mixed": "good.example"}
    assert cats.url_categories("ok.example", "/path/x") == {"mixed": "ok.example/path"}
    assert cats.stats[0].domains == 2 and cats.stats[0].urls == 1


def test_warnings_are_bounded(tmp_path: Path) -> None:
    write(tmp_path, "junk", "domains", "bad entry\n" * (MAX_WARNINGS + 500))
    result = load_categories(tmp_path)
    assert len(result.warnings) == MAX_WARNINGS
    assert result.warnings_total == MAX_WARNINGS + 500


def test_missing_directory_is_a_warning(tmp_path: Path) -> None:
    result = load_categories(tmp_path / "nope")
    assert result.categories.names == frozenset()
    assert result.warnings[0].line == 0 and "cannot list" in result.warnings[0].reason
    (tmp_path / "emptycat").mkdir()
    result = load_categories(tmp_path)
    assert "neither" in result.warnings[0].reason
    assert Categories.empty().match("x.example", "/") == {}


def test_million_domains_load_and_lookup_speed(tmp_path: Path) -> None:
    rng = random.Random(42)
    alphabet = string.ascii_lowercase + string.digits
    tlds = ["com", "net", "org", "fr", "de", "info"]
    names = [
        ".".join(
            "".join(rng.choices(alphabet, k=rng.randint(3, 12))) for _ in range(rng.randint(1, 3))
        )
        + "."
        + rng.choice(tlds)
        for _ in range(1_000_000)
    ]
    write(tmp_path, "big", "domains", "\n".join(names) + "\n")
    start = time.perf_counter()
    result = load_categories(tmp_path)
    load_s = time.perf_counter() - start
    cats = result.categories
    assert result.warnings == []
    assert len(set(names)) - 10 <= cats.stats[0].domains <= 1_000_000
    probes = [f"a.b.c.{names[i]}" for i in range(0, 1_000_000, 500)]
    misses = [f"x{i}.y.z.nothing-here.example" for i in range(2000)]
    start = time.perf_counter()
    for host in probes:
        assert cats.domain_categories(host)
    for host in misses:
        assert not cats.domain_categories(host)
    lookup_us = (time.perf_counter() - start) / (len(probes) + len(misses)) * 1e6
    print(f"1M domains: load {load_s:.2f} s, lookup {lookup_us:.2f} µs")
    # Generous bounds: the targets (a few s, a few µs) are for the bench, not this test.
    assert load_s < 10
    assert lookup_us < 20
