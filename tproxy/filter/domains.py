"""Domain names: validation, normalisation and suffix sets with label-boundary matching.

A *suffix* entry ``bad.example`` matches ``bad.example`` and every name below it
(``x.bad.example``), but never ``notbad.example``: matching walks the looked-up name and each
of its parents (cut at a ``.``), so a lookup costs one hash probe per label — O(labels), not
O(entries). An *exact* entry (written ``=example.com`` in rules) matches that name only.

IP literals are accepted as exact entries only: a parent of ``1.2.3.4`` (``2.3.4``) is not a
network, and an all-numeric name that is not a dotted quad is rejected as ambiguous (some
resolvers read ``10.1`` as ``10.0.0.1``; RFC 1123 §2.1 forbids all-numeric top-level labels).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator

# One normal form for request hosts, shared with the cache and shaping (re-exported here).
from tproxy.uri import normalize_host as normalize_host

# RFC 1035 §2.3.4: 63 octets per label, 255 per name on the wire = 253 characters in text.
MAX_LABEL = 63
MAX_NAME = 253

# Underscores are not valid in host names (RFC 952) but occur in real DNS names and in
# blacklists (``_dmarc``, ``my_host.example``); hyphens are accepted anywhere in a label for
# the same reason (blogspot-style ``-x-.example``). Everything else is rejected.
_NAME_RE = re.compile(r"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_RE = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def _why_bad(name: str) -> str:
    """The reason a name failed the fast check (slow path, only for malformed entries)."""
    if not name:
        return "empty name"
    if any(c.isspace() for c in name):
        return "whitespace inside the name"
    if len(name) > MAX_NAME:
        return f"name longer than {MAX_NAME} characters"
    for label in name.split("."):
        if not label:
            return "empty label (consecutive or leading dots)"
        if len(label) > MAX_LABEL:
            return f"label longer than {MAX_LABEL} characters: {label[:20]}…"
    bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "._-"))})
    if bad:
        return "invalid characters: " + " ".join(repr(c) for c in bad[:5])
    return "not a domain name"


def normalize_domain(text: str) -> tuple[str, bool] | str:
    """Validate one domain entry.

    Returns ``(name, is_ip)`` with the canonical lower-case name, or a string giving the reason
    the entry is malformed. Accepts a trailing dot (a fully-qualified name), a leading dot or
    ``*.`` (squid/dnsmasq style "and subdomains" — the default meaning anyway), IDNs in Unicode
    (converted to their ``xn--`` form, RFC 3490) and bracketed or bare IPv6 literals.
    """
    name = text.strip().lower()
    if name.startswith("*."):
        name = name[2:]
    elif name.startswith("."):
        name = name[1:]
    if name.endswith(".") and not name.endswith(".."):
        name = name[:-1]
    if "/" in name:
        # "http://x.example/" or "x.example/path": a URL, which a domain list cannot hold.
        return "a URL, not a domain name (URLs go in a category's urls file, or url_prefix)"
    if ":" in name or name.startswith("["):
        inner = name[1:-1] if name.startswith("[") and name.endswith("]") else name
        try:
            return ipaddress.IPv6Address(inner).compressed, True
        except ValueError:
            return "not a valid IPv6 literal"
    if not name.isascii():
        if any(c.isspace() for c in name):
            return "whitespace inside the name"
        try:
            name = name.encode("idna").decode("ascii")
        except (UnicodeError, ValueError):
            return _why_bad(name)
    if len(name) > MAX_NAME or not _NAME_RE.fullmatch(name):
        return _why_bad(name)
    # A top-level label is never all-digits (RFC 1123 §2.1), so a trailing digit means the
    # entry is meant as an IPv4 literal and must be a canonical dotted quad.
    if name[-1].isdigit():
        last = name.rsplit(".", 1)[-1]
        if last.isdigit():
            if _IPV4_RE.fullmatch(name):
                return name, True
            return "numeric name that is not a canonical dotted-quad IPv4 address"
    return name, False


def parents(host: str) -> Iterator[str]:
    """The name itself, then each parent cut at a label boundary: a.b.c, b.c, c."""
    yield host
    i = host.find(".")
    while i != -1:
        yield host[i + 1 :]
        i = host.find(".", i + 1)


class DomainSet:
    """An immutable set of exact names and suffixes (name + all subdomains).

    Build with :meth:`from_patterns`; look up with :meth:`match` on a normalised host.
    """

    __slots__ = ("_exact", "_suffix")

    def __init__(self, exact: Iterable[str] = (), suffix: Iterable[str] = ()) -> None:
        self._exact: frozenset[str] = frozenset(exact)
        self._suffix: frozenset[str] = frozenset(suffix)

    @classmethod
    def from_patterns(cls, patterns: Iterable[str]) -> DomainSet:
        """``=name`` is exact; anything else is a suffix. Raises ValueError on a bad entry."""
        exact: list[str] = []
        suffix: list[str] = []
        for pattern in patterns:
            is_exact = pattern.startswith("=")
            result = normalize_domain(pattern[1:] if is_exact else pattern)
            if isinstance(result, str):
                raise ValueError(f"{pattern!r}: {result}")
            name, is_ip = result
            (exact if is_exact or is_ip else suffix).append(name)
        return cls(exact, suffix)

    def __len__(self) -> int:
        return len(self._exact) + len(self._suffix)

    def __bool__(self) -> bool:
        return bool(self._exact) or bool(self._suffix)

    def __contains__(self, host: object) -> bool:
        return isinstance(host, str) and self.match(host) is not None

    def match(self, host: str) -> str | None:
        """The entry that matches a normalised host (``=name`` for exact entries), or None."""
        if host in self._exact:
            return "=" + host
        suffix = self._suffix
        if not suffix:
            return None
        if host in suffix:
            return host
        i = host.find(".")
        while i != -1:
            parent = host[i + 1 :]
            if parent in suffix:
                return parent
            i = host.find(".", i + 1)
        return None


class DomainIndex:
    """Suffix entries tagged with labels (category names), for many lists in one dict.

    One dict for all categories keeps a lookup at one probe per label no matter how many
    categories are loaded. Values are shared tuples, so a million entries of one category
    cost one pointer each.
    """

    __slots__ = ("_map",)

    def __init__(self, mapping: dict[str, tuple[str, ...]]) -> None:
        # Ownership of ``mapping`` passes to the index; nobody mutates it afterwards.
        self._map = mapping

    def __len__(self) -> int:
        return len(self._map)

    def lookup(self, host: str) -> dict[str, str]:
        """``{tag: matched entry}`` for every tag whose list holds the host or a parent."""
        found: dict[str, str] = {}
        m = self._map
        tags = m.get(host)
        if tags is not None:
            for tag in tags:
                found.setdefault(tag, host)
        i = host.find(".")
        while i != -1:
            parent = host[i + 1 :]
            tags = m.get(parent)
            if tags is not None:
                for tag in tags:
                    found.setdefault(tag, parent)
            i = host.find(".", i + 1)
        return found
