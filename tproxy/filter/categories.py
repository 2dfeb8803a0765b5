"""Category blacklists in the UT1 (Université Toulouse 1 Capitole) / squidGuard layout.

::

    DIR/<category>/domains   one domain per line: the domain and all its subdomains
    DIR/<category>/urls      one ``host/path`` prefix per line
    (comments start with ``#``; blank lines are ignored)

A malformed line is skipped and reported as a :class:`ListWarning` ``(file, line, reason)``;
it is never fatal, because public lists always contain a few odd entries and one bad line must
not take filtering down. :func:`parse_domains` and :func:`parse_urls` are pure (text in, data
out); :func:`load_categories` reads the files and builds an immutable :class:`Categories`
object, so the daemon can run it in a worker thread on SIGHUP and swap the result in
atomically while connections keep using the old lists.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from tproxy.filter.domains import DomainIndex, normalize_domain
from tproxy.filter.urlnorm import normalize_target

DOMAINS_FILE = "domains"
URLS_FILE = "urls"
# Keep at most this many warnings (the count of all is still reported): a corrupt list with a
# million bad lines must not flood the journal.
MAX_WARNINGS = 1000
# A category name is a directory name; keep it to something safe to print and to use in keys.
MAX_CATEGORY_NAME = 64
UTF8_BOM = b"\xef\xbb\xbf"


class ListWarning(NamedTuple):
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.file}:{self.line}: {self.reason}"
            if self.line
            else f"{self.file}: {self.reason}"
        )


class _Warnings:
    """Bounded warning collector: keeps the first MAX_WARNINGS, counts all."""

    def __init__(self, limit: int = MAX_WARNINGS) -> None:
        self.items: list[ListWarning] = []
        self.total = 0
        self.limit = limit

    def add(self, file: str, line: int, reason: str) -> None:
        self.total += 1
        if len(self.items) < self.limit:
            self.items.append(ListWarning(file, line, reason))


def _entries(text: str) -> Iterable[tuple[int, str]]:
    """(line number, entry) for non-blank, non-comment lines."""
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if line and line[0] != "#":
            yield number, line


def _decode(data: bytes) -> str:
    # Lists are ASCII in practice; a stray Latin-1 byte becomes a lone surrogate here, fails
    # validation on its own line and is reported — the rest of the file still loads. A UTF-8
    # byte order mark (Windows editors write one) is not part of the first line: with it a
    # leading "# comment" line was taken for a bad entry.
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM) :]
    return data.decode("utf-8", errors="surrogateescape")


def parse_domains(
    text: str, file: str, into: dict[str, tuple[str, ...]], tag: tuple[str, ...], warn: _Warnings
) -> int:
    """Add the domains of one ``domains`` file to ``into`` (name → tags); return how many."""
    count = 0
    category = tag[0]
    for number, line in _entries(text):
        result = normalize_domain(line)
        if isinstance(result, str):
            warn.add(file, number, f"{result}: {line[:80]!r}")
            continue
        name = result[0]
        old = into.get(name)
        if old is None:
            into[name] = tag
        elif category not in old:
            into[name] = (*old, category)
        count += 1
    return count


def strip_www(host: str) -> str:
    """squidGuard compares URL hosts without a leading ``www.``; so do we (both sides)."""
    return host[4:] if host.startswith("www.") else host


def parse_urls(
    text: str,
    file: str,
    into: dict[str, list[tuple[str, str]]],
    category: str,
    warn: _Warnings,
) -> int:
    """Add ``host/path`` prefixes of one ``urls`` file to ``into`` (host → [(path, cat)])."""
    count = 0
    for number, line in _entries(text):
        entry = line
        lower = entry.lower()
        for scheme in ("http://", "https://"):
            if lower.startswith(scheme):
                entry = entry[len(scheme) :]
                break
        if any(c.isspace() for c in entry):
            warn.add(file, number, f"whitespace inside the entry: {line[:80]!r}")
            continue
        slash = entry.find("/")
        host, path = (entry, "") if slash < 0 else (entry[:slash], entry[slash:])
        result = normalize_domain(host)
        if isinstance(result, str):
            warn.add(file, number, f"bad host: {result}: {line[:80]!r}")
            continue
        if not path.isascii() or not path.isprintable():
            warn.add(file, number, f"invalid characters in the path: {line[:80]!r}")
            continue
        # Paths are compared lower-cased, as squidGuard does: lists are written for any case;
        # and in the form requests are matched in (urlnorm: escapes, dot segments). An entry
        # for a whole site ("host" or "host/") keeps an empty path: it matches every path.
        norm = normalize_target(path).lower() if path not in ("", "/") else ""
        into.setdefault(strip_www(result[0]), []).append((norm, category))
        count += 1
    return count


@dataclass(frozen=True)
class CategoryStats:
    name: str
    domains: int
    urls: int


class Categories:
    """Loaded category lists: immutable once built, safe to share across threads."""

    __slots__ = ("_domains", "_urls", "names", "stats")

    def __init__(
        self,
        domains: DomainIndex,
        urls: dict[str, tuple[tuple[str, str], ...]],
        stats: tuple[CategoryStats, ...],
    ) -> None:
        self._domains = domains
        self._urls = urls
        self.stats = stats
        self.names: frozenset[str] = frozenset(s.name for s in stats)

    @classmethod
    def empty(cls) -> Categories:
        return cls(DomainIndex({}), {}, ())

    def domain_categories(self, host: str) -> dict[str, str]:
        """``{category: matched domain}`` for a normalised host."""
        return self._domains.lookup(host)

    def url_categories(self, host: str, path: str) -> dict[str, str]:
        """``{category: matched "host/path" entry}``; ``path`` includes the query string."""
        if not self._urls:
            return {}
        key = strip_www(host)
        entries = self._urls.get(key)
        if not entries:
            return {}
        found: dict[str, str] = {}
        lower = path.lower()
        for prefix, category in entries:
            if category not in found and lower.startswith(prefix):
                found[category] = key + prefix
        return found

    def match(self, host: str, path: str | None = None) -> dict[str, str]:
        """Both lookups; ``path`` None (SNI) uses the domain lists only."""
        found = self.domain_categories(host)
        if path is not None:
            for category, entry in self.url_categories(host, path).items():
                found.setdefault(category, entry)
        return found


class LoadResult(NamedTuple):
    categories: Categories
    warnings: list[ListWarning]
    # All warnings, including those past MAX_WARNINGS that were not kept.
    warnings_total: int
    # Categories that could not be loaded at all ({name: why}): no directory, no list file,
    # an unreadable file. A rule naming one would match nothing.
    failed: dict[str, str] = {}  # noqa: RUF012 -- NamedTuple default, never mutated


def load_categories(
    directory: str | os.PathLike[str], names: Iterable[str] | None = None
) -> LoadResult:
    """Load the named categories (all subdirectories when ``names`` is None).

    Never raises for list problems: a missing directory, a missing category or an unreadable
    file is a warning with line 0, and loading goes on with what is there.
    """
    root = Path(directory)
    warn = _Warnings()
    failed: dict[str, str] = {}
    if names is None:
        try:
            wanted = sorted(p.name for p in root.iterdir() if p.is_dir())
        except OSError as exc:
            warn.add(str(root), 0, f"cannot list categories: {exc.strerror or exc}")
            wanted = []
    else:
        wanted = sorted(set(names))
    domain_map: dict[str, tuple[str, ...]] = {}
    url_map: dict[str, list[tuple[str, str]]] = {}
    stats: list[CategoryStats] = []
    for category in wanted:
        cdir = root / category
        if len(category) > MAX_CATEGORY_NAME or "/" in category or category in ("", ".", ".."):
            warn.add(str(cdir), 0, "not a usable category name")
            failed[category] = "not a usable category name"
            continue
        if not cdir.is_dir():
            warn.add(str(cdir), 0, "no such category directory")
            failed[category] = f"no such category directory {cdir}"
            continue
        counts = {DOMAINS_FILE: 0, URLS_FILE: 0}
        present = unreadable = 0
        for kind in (DOMAINS_FILE, URLS_FILE):
            file = cdir / kind
            try:
                data = file.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                warn.add(str(file), 0, f"cannot read: {exc.strerror or exc}")
                failed[category] = f"cannot read {file}: {exc.strerror or exc}"
                unreadable += 1
                continue
            present += 1
            text = _decode(data)
            if kind == DOMAINS_FILE:
                counts[kind] = parse_domains(text, str(file), domain_map, (category,), warn)
            else:
                counts[kind] = parse_urls(text, str(file), url_map, category, warn)
        if not present and not unreadable:  # one that cannot be read is reported above
            warn.add(str(cdir), 0, f"neither {DOMAINS_FILE!r} nor {URLS_FILE!r} file present")
            failed.setdefault(category, f"neither {DOMAINS_FILE!r} nor {URLS_FILE!r} in {cdir}")
        stats.append(CategoryStats(category, counts[DOMAINS_FILE], counts[URLS_FILE]))
    urls = {host: tuple(entries) for host, entries in url_map.items()}
    result = Categories(DomainIndex(domain_map), urls, tuple(stats))
    return LoadResult(result, warn.items, warn.total, failed)
