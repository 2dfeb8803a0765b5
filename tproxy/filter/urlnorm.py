"""The one spelling of a URL that filter rules are matched against (pure, no I/O).

A client can name the same resource in many ways, and the origin server undoes them before it
looks up the file: ``/%73ecret``, ``/public/../secret``, ``/public/%2e%2e/secret`` and
``//secret`` all reach ``/secret`` on common servers (nginx decodes the path, resolves dot
segments and merges slashes before matching locations). A filter comparing the raw text would
let every one of them past a ``url_prefix`` of ``/secret``. So requests, ``url_prefix`` entries
and category ``urls`` entries are all brought to one form first:

* percent-encoded octets that stand for printable ASCII are decoded in the path (RFC 3986
  §6.2.2.2 makes that an equivalence for unreserved characters; for ``/`` and sub-delims it is
  what servers do) — except ``%``, ``?`` and ``#``, whose decoding would change the structure;
  other escapes get upper-case hex (§6.2.2.1), and raw non-ASCII/space is percent-encoded;
* dot segments are removed (RFC 3986 §5.2.4) and runs of ``/`` merged;
* the query keeps its structure: only escapes of unreserved characters are decoded there.

Servers disagree on two more things: IIS reads a backslash as ``/``, and Tomcat and Jetty drop
path parameters (``;...`` up to the next ``/``, RFC 3986 §3.3), so they serve ``/a/..;/secret``
and ``/a/..\\secret`` as ``/secret`` where nginx sees a segment named ``..;`` (and serves
``/secret/..;x/../x`` as ``/secret/x``). Neither reading is the one true form, so a target that
reads differently under them gets both (:func:`match_forms`), and the filter denies when either
is denied.

The access log, block page and upstream request keep the client's own spelling; only matching
uses these. The host is :func:`tproxy.uri.normalize_host` plus IDNA (RFC 5891) for a Unicode
name, so ``bücher.example`` from ``tproxy filter explain`` agrees with its ``xn--`` entry.
"""

from __future__ import annotations

from tproxy.uri import normalize_host, split_url

_HEX = "0123456789abcdefABCDEF"
# RFC 3986 §2.3 unreserved characters.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Decoding these would change how the target splits (RFC 3986 §3: "?" starts the query, "#" the
# fragment; a decoded "%" would start a new escape: decoding is done once, as servers do).
_KEEP_ENCODED = frozenset("%?#")


def _decode(text: str, path: bool) -> str:
    """Decode the escapes that are safe to decode (see the module doc); one pass only."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "%" and i + 2 < n and text[i + 1] in _HEX and text[i + 2] in _HEX:
            ch = chr(int(text[i + 1 : i + 3], 16))
            printable = "\x21" <= ch <= "\x7e"
            if (ch in _UNRESERVED) or (path and printable and ch not in _KEEP_ENCODED):
                out.append(ch)
            else:
                out.append("%" + text[i + 1 : i + 3].upper())
            i += 3
            continue
        if c <= " " or c > "\x7e":
            # Raw space/control/non-ASCII (a list entry written in Unicode): its UTF-8 escapes,
            # the form a client sends (RFC 3986 §2.5).
            out.extend(f"%{b:02X}" for b in c.encode("utf-8", "surrogateescape"))
        else:
            out.append(c)
        i += 1
    return "".join(out)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on an absolute path, with empty segments (``//``) dropped as well."""
    out: list[str] = []
    segments = path.split("/")
    for index, seg in enumerate(segments[1:], start=1):
        last = index == len(segments) - 1
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        elif seg == ".":
            if last:
                out.append("")
        elif seg or last:
            out.append(seg)
    return "/" + "/".join(out)


def normalize_target(target: str, servlet: bool = False) -> str:
    """The matching form of an origin-form target (path and optional query); ``servlet``: as
    IIS/Tomcat read it (backslash as ``/``, path parameters dropped; see the module doc)."""
    path, sep, query = target.partition("?")
    if not path.startswith("/"):
        path = "/" + path
    path = _decode(path, path=True)
    if servlet:
        path = path.replace("\\", "/")
        if ";" in path:
            path = "/".join(segment.split(";", 1)[0] for segment in path.split("/"))
    path = remove_dot_segments(path)
    return path + (sep + _decode(query, path=False) if sep else "")


def match_host(host: str) -> str:
    """:func:`normalize_host`, and a Unicode name in its IDNA ``xn--`` form."""
    h = normalize_host(host)
    if not h.isascii():
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError:
            pass  # names nothing we could reach; it matches nothing
    return h


def match_parts(url: str, servlet: bool = False) -> tuple[str, str, str]:
    """``(URL, host, path+query)`` in matching form for a request URL (never raises)."""
    full, host, target = split_url(url)
    authority = full[len("http://") : len(full) - len(target)]
    mhost = match_host(host)
    if mhost != host:
        authority = authority.replace(host, mhost, 1)
    norm = normalize_target(target, servlet)
    return "http://" + authority + norm, mhost, norm


def match_forms(url: str) -> list[tuple[str, str, str]]:
    """:func:`match_parts` of a request URL, and its servlet reading when that differs: a
    target with a backslash or a ``;`` in its path can name two resources (module doc)."""
    first = match_parts(url)
    path = url.partition("?")[0]
    upper = path.upper()
    if ";" not in path and "\\" not in path and "%5C" not in upper and "%3B" not in upper:
        return [first]
    other = match_parts(url, servlet=True)
    return [first] if other == first else [first, other]


def match_url(url: str) -> str:
    """The matching form of a request URL."""
    return match_parts(url)[0]
