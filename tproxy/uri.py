"""Authorities, hosts, URLs, media types and list fields: one copy of each, pure (no I/O).

Every module that turns a request into a URL, a host name or a media type uses these, so the
cache key, the filter's URL, the shaping facts and the access log agree on what a request names.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

# RFC 9110 §4.2.1/§4.2.2: the port a URI without one implies; "host:80" and "host" are the same
# origin for http (§4.2.3), so the normal form leaves the default port out.
DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 9110 §5.6.3: optional whitespace is spaces and horizontal tabs only.
OWS = b" \t"


def bracket(host: str) -> str:
    """``host`` as it stands in an authority: an IPv6 literal in brackets (RFC 3986 §3.2.2)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _is_port(text: str) -> bool:
    # RFC 3986 §3.2.3: port = *DIGIT, ASCII only (str.isdigit also takes "²" and "٣").
    return text.isascii() and text.isdigit()


def split_authority(authority: str, scheme: str = "http") -> tuple[str, int | None]:
    """``(host, port)`` of an authority, lower-cased, userinfo and a trailing dot dropped; the
    port is None when absent, empty or the scheme's default. IPv6 literals keep brackets.

    A port that is not all digits is taken as part of the host: such a host names nothing we
    could connect to, so it matches nothing rather than something else. (:func:`parse_host`
    with ``host_form=False``.)
    """
    return parse_host(authority, scheme, host_form=False)


def normalize_host(host: str) -> str:
    """Canonical form of a host as it appears in a request (Host header, URL, SNI).

    Lower-cases, drops a port, brackets and a trailing dot; IPv6 literals are compressed. Does
    not validate: a host we cannot read simply matches nothing. (:func:`parse_host` with
    ``host_form=True``.)
    """
    return parse_host(host, host_form=True)[0]


def parse_host(text: str, scheme: str = "http", *, host_form: bool) -> tuple[str, int | None]:
    """The one host parser: :func:`split_authority` and :func:`normalize_host` are its two
    forms. Both lower-case, trim whitespace and drop a trailing dot ("example.com." names the
    same host, RFC 1034 §3.1). ``host_form`` picks the differences, which follow from the use:

    ``host_form=False`` — an *authority* for a URL or a cache key (RFC 3986 §3.2), where the
    port counts: ``(host, port)``, the port None when absent, empty or ``scheme``'s default
    (RFC 9110 §4.2.3). Userinfo is dropped (RFC 9110 §4.2.4). An IPv6 literal keeps its
    brackets as written (it stands in a URL that way); an unbracketed one is not an authority
    and is read as host:port. A port that is not all digits stays part of the host, so the
    authority names nothing rather than merging with the port-less one. Every trailing dot
    goes.

    ``host_form=True`` — a *host name* to compare with names and addresses (filter domains,
    shaping classes, the shared-cache check), where the port never counts: ``(host, None)``.
    An IPv6 literal, bracketed or bare (a Host header or SNI as sent), becomes its compressed
    form without brackets, so ``[FD00:0::1]:80`` and ``fd00::1`` compare equal; after a single
    colon anything is dropped as a port, digits or not, so a junk port cannot make a name dodge
    a rule. No userinfo is expected (Host and SNI carry none, RFC 9110 §7.2): an ``@`` stays and
    names nothing. One trailing dot goes.
    """
    text = text.lower()
    if not host_form and "@" in text:  # userinfo is deprecated in http URIs (RFC 9110 §4.2.4)
        text = text.rsplit("@", 1)[1]
    text = text.strip()
    port: int | None = None
    if text.startswith("["):
        end = text.find("]")
        if host_form:
            return _ipv6_or_text(text[1:end] if end > 0 else text[1:]), None
        host, rest = text[: end + 1], text[end + 1 :]
        if rest.startswith(":") and _is_port(rest[1:]):
            port = int(rest[1:])
    elif host_form and text.count(":") > 1:
        return _ipv6_or_text(text), None
    else:
        host, sep, digits = text.rpartition(":")
        if not sep:
            host = text
        elif host_form:
            pass  # the port, whatever it holds, is not part of a host name
        elif _is_port(digits):
            port = int(digits)
        elif digits:
            host = text
    if host_form:
        return (host[:-1] if host.endswith(".") else host), None
    host = host.rstrip(".")
    if port == DEFAULT_PORTS.get(scheme):
        port = None
    return host, port


def _ipv6_or_text(text: str) -> str:
    """An IPv6 literal in its compressed form (RFC 5952); other text as it is."""
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        return text


def _join_authority(host: str, port: int | None) -> str:
    return f"{host}:{port}" if port else host


def _target_parts(
    scheme: str, host_header: bytes | str | None, target: bytes | str
) -> tuple[str, str, str]:
    """(scheme, authority, path-and-query) of a request as RFC 9112 §3.3 reconstructs it:
    absolute-form's own authority wins over Host (§3.2.2)."""
    tgt = target.decode("latin-1") if isinstance(target, bytes) else target
    scheme = scheme.lower()
    # The form is decided by the first character, as the parser and the forwarder decide it
    # (RFC 9112 §3.2): "/" is origin-form whatever follows ("/?://" included), anything else
    # with "://" is absolute-form. Judging by where "://" stands made the filter and the
    # forwarder read different hosts from one target.
    if not tgt.startswith("/") and "://" in tgt:
        parts = urlsplit(tgt)
        scheme = parts.scheme.lower() or scheme
        authority = parts.netloc
        tgt = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    else:
        authority = (
            host_header.decode("latin-1") if isinstance(host_header, bytes) else host_header or ""
        )
        if not tgt.startswith("/"):
            tgt = "/" + tgt if tgt != "*" else tgt
    return scheme, authority, tgt


def request_origin(
    scheme: str, host_header: bytes | str | None, target: bytes | str
) -> tuple[str, int]:
    """(host, port) the request's target URI names (the port made explicit): what a cache
    must check against the connection's real destination before it shares a response under
    that URI. Absolute-form's authority counts, not Host, because it is what the URI (and so
    the cache key) is built from. ("", 0) when no host is known."""
    scheme, authority, _ = _target_parts(scheme, host_header, target)
    host, port = split_authority(authority, scheme)
    return host, port if port is not None else DEFAULT_PORTS.get(scheme, 0)


def request_url(scheme: str, host_header: bytes | str | None, target: bytes | str) -> str:
    """The target URI of a request (RFC 9112 §3.3), normalised: absolute-form wins over Host;
    lower-case scheme and host, default port dropped, empty path → "/". "" when no host is
    known (an HTTP/1.0 request without Host)."""
    scheme, authority, tgt = _target_parts(scheme, host_header, target)
    host, port = split_authority(authority, scheme)
    if not host:
        return ""
    return f"{scheme}://{_join_authority(host, port)}{tgt}"


def effective_url(target: bytes, host_header: bytes | None, dest_ip: str) -> str:
    """The URL a proxied request names: :func:`request_url`, with the intercepted destination
    address standing in for a missing Host (RFC 9112 §3.3 lets the server supply a default
    authority; for a transparent proxy the destination the client connected to is that)."""
    try:
        return request_url("http", host_header, target) or request_url(
            "http", bracket(dest_ip), target
        )
    except ValueError:  # urlsplit's verdict on a bracketed host; the parser lets none through
        return target.decode("latin-1")


def split_url(url: str) -> tuple[str, str, str]:
    """``(normalised http URL, host, path+query)`` of a URL; tolerant of junk, never raises.

    The scheme is always http: the proxy only sees cleartext requests, and an absolute-form
    ``https://`` target sent to port 80 must match the same rules as its ``http://`` twin. The
    authority is normalised like :func:`request_url`'s (RFC 9110 §4.2.3 equivalent URIs), so a
    prefix written ``http://Example.com/`` matches ``http://example.com.:80/`` as well.
    """
    rest = url
    scheme_end = url.find("://")
    if scheme_end >= 0:
        rest = url[scheme_end + 3 :]
    slash = rest.find("/")
    query = rest.find("?")
    if query >= 0 and (slash < 0 or query < slash):
        slash = query
    hostport, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    if path.startswith("?"):
        path = "/" + path
    authority = _join_authority(*split_authority(hostport, "http"))
    return "http://" + authority + path, normalize_host(authority), path


def media_type(content_type: bytes | str | None) -> str | None:
    """``type/subtype`` of a Content-Type value, lower-cased (types are case-insensitive,
    RFC 9110 §8.3.1), without parameters; None when absent or empty."""
    if not content_type:
        return None
    text = content_type.decode("latin-1") if isinstance(content_type, bytes) else content_type
    return text.split(";", 1)[0].strip().lower() or None


def list_tokens(values: Iterable[bytes]) -> list[bytes]:
    """Members of a list-based field's lines (RFC 9110 §5.6.1: ``#token``), OWS trimmed,
    lower-cased, empty members dropped (a recipient must accept and ignore them)."""
    out: list[bytes] = []
    for value in values:
        for member in value.split(b","):
            member = member.strip(OWS).lower()
            if member:
                out.append(member)
    return out
