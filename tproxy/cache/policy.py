"""HTTP caching rules for a *shared* cache, as pure functions (RFC 9111, RFC 9110, RFC 5861).

Nothing here does I/O or reads a clock: every function takes the headers, status codes and
times it needs and returns data. The proxy shell calls, in order:

* on a request: :func:`cache_key` → look up stored variants → :func:`vary_matches` →
  :func:`decide` (FRESH / STALE_OK / REVALIDATE / MISS / GATEWAY_TIMEOUT); for a hit,
  :func:`evaluate_conditionals` (client's If-None-Match …) and :func:`plan_range`, then
  :func:`hit_fields` (then the cache's Age) for the stored header block;
* on a response from the origin: :func:`storable` → :func:`make_entry` with
  :func:`headers_to_store`; a 304 to our conditional request → :func:`select_for_304` and
  :func:`refresh_entry`; 5xx / connect failure → :func:`stale_if_error_ok`;
  an unsafe method → :func:`invalidate_uris`.

Headers are ``Sequence[tuple[bytes, bytes]]`` exactly as parsed off the wire (names in any case,
repeated field lines kept apart); :class:`Fields` gives case-insensitive access.
"""

from __future__ import annotations

import calendar
import datetime
import enum
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import urljoin, urlsplit

# request_url is part of this module's interface (the cache CLI and the store normalise with it).
from tproxy.http1 import format_http_date as format_http_date
from tproxy.uri import bracket, list_tokens, split_authority
from tproxy.uri import request_url as request_url

Header = tuple[bytes, bytes]
Headers = Sequence[Header]

# RFC 9111 §1.2.2: a delta-seconds value too large to represent is taken as 2^31.
DELTA_SECONDS_MAX = 2**31
# RFC 9111 §4.2.2 suggests 10% of the time since Last-Modified; the cap keeps a file untouched
# for years from being served unvalidated for months.
DEFAULT_HEURISTIC_FRACTION = 0.1
DEFAULT_HEURISTIC_MAX = 86400.0
# RFC 9110 §14.2 lets a server ignore a Range it finds unreasonable; a request with more ranges
# than this is answered in full (a defence against range amplification).
MAX_RANGES = 100
# RFC 9110 §8.8.2.2: a cache may treat Last-Modified as strong when the stored Date is at least
# one second after it.
STRONG_LAST_MODIFIED_GAP = 1.0

# RFC 9110 §9.2.1: safe methods; everything else (including unknown methods) is unsafe for §4.4.
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
# RFC 9110 §15.1: status codes that are heuristically cacheable.
HEURISTICALLY_CACHEABLE = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
# Final status codes whose caching semantics this cache knows (the RFC 9110 registry); the
# must-understand directive (RFC 9111 §5.2.2.3) allows storage only for these.
UNDERSTOOD_STATUSES = frozenset(
    {200, 201, 202, 203, 204, 205, 206, 300, 301, 302, 303, 304, 305, 307, 308}
    | set(range(400, 418))
    | {421, 422, 426}
    | {500, 501, 502, 503, 504, 505}
)
# RFC 5861 §4: the errors for which stale-if-error applies.
STALE_IF_ERROR_STATUSES = frozenset({500, 502, 503, 504})
# RFC 9110 §7.6.1 hop-by-hop fields; RFC 9111 §3.1 allows removing them before storage.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"trailer",
    }
)
# RFC 9111 §3.2: a 304/HEAD must not replace Content-Length, nor fields the recipient processes
# itself (Content-Range). Set-Cookie is per-user: a shared cache must not attach one client's
# cookie to the stored response everybody gets.
NOT_UPDATED_FROM_304 = HOP_BY_HOP | {b"content-length", b"content-range", b"set-cookie"}
# RFC 9110 §15.4.5: fields a 304 carries when they would have been sent in a 200.
FIELDS_IN_304 = (
    b"cache-control",
    b"content-location",
    b"date",
    b"etag",
    b"expires",
    b"vary",
    b"last-modified",
)


# -- header access ---------------------------------------------------------------------------


class Fields:
    """Case-insensitive read access to a raw header list."""

    __slots__ = ("_index", "headers")

    def __init__(self, headers: Headers) -> None:
        self.headers = headers
        index: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            index.setdefault(name.strip().lower(), []).append(value.strip())
        self._index = index

    def __contains__(self, name: bytes) -> bool:
        return name.lower() in self._index

    def values(self, name: bytes) -> list[bytes]:
        """Every field line's value for ``name``, in order."""
        return list(self._index.get(name.lower(), ()))

    def get(self, name: bytes) -> bytes | None:
        """All field lines combined with ", " (RFC 9110 §5.3); None when absent."""
        found = self._index.get(name.lower())
        return b", ".join(found) if found is not None else None

    def one(self, name: bytes) -> bytes | None:
        """The value of a singleton field; None when absent *or* sent more than once."""
        found = self._index.get(name.lower())
        return found[0] if found is not None and len(found) == 1 else None

    def tokens(self, name: bytes) -> list[bytes]:
        """Members of a list-based field (RFC 9110 §5.6.1), stripped, lowercased, no empties."""
        return list_tokens(self._index.get(name.lower(), ()))


def _fields(headers: Headers | Fields) -> Fields:
    return headers if isinstance(headers, Fields) else Fields(headers)


# -- small parsers ---------------------------------------------------------------------------


def split_list(value: str) -> list[str]:
    """Split a list-based field value on commas outside quoted strings (RFC 9110 §5.6.1)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def delta_seconds(value: str | None) -> int | None:
    """RFC 9111 §1.2.2 delta-seconds; None when missing or invalid; capped at 2^31."""
    if value is None or not re.fullmatch(r"[0-9]+", value):
        return None
    return min(int(value), DELTA_SECONDS_MAX)


# Directives whose argument is delta-seconds. Conflicting duplicates make the value invalid
# ("" below): RFC 9111 §4.2.1 lets a cache treat such a response as stale.
_DELTA_DIRECTIVES = frozenset(
    {"max-age", "s-maxage", "max-stale", "min-fresh", "stale-while-revalidate", "stale-if-error"}
)
INVALID = ""


def parse_cache_control(values: Iterable[bytes]) -> dict[str, str | None]:
    """Parse Cache-Control field lines into ``{directive: argument or None}``.

    Names are lowercased; quoted arguments unquoted (RFC 9111 §5.2 asks recipients to accept
    ``max-age="5"``). Unknown directives are kept (callers ignore them). A directive repeated
    with a different delta-seconds value becomes :data:`INVALID`; a repeated directive with
    field-name arguments (``no-cache="a", no-cache="b"``) merges them, and the unqualified form
    wins over the qualified one because it is more restrictive (§4.2.1).
    """
    out: dict[str, str | None] = {}
    for raw in values:
        for item in split_list(raw.decode("latin-1")):
            name, eq, arg = item.partition("=")
            name = name.strip().lower()
            if not name:
                continue
            value: str | None = _unquote(arg.strip()) if eq else None
            if name not in out:
                out[name] = value
                continue
            old = out[name]
            if old == value:
                continue
            if name in _DELTA_DIRECTIVES:
                out[name] = INVALID
            elif old is None or value is None:
                out[name] = None
            else:
                out[name] = f"{old}, {value}"
    return out


def request_cache_control(headers: Headers | Fields) -> dict[str, str | None]:
    """Request directives; ``Pragma: no-cache`` counts as ``no-cache`` only when the request
    has no Cache-Control field at all (RFC 9111 §5.4)."""
    f = _fields(headers)
    if b"cache-control" in f:
        return parse_cache_control(f.values(b"cache-control"))
    if b"no-cache" in f.tokens(b"pragma"):
        return {"no-cache": None}
    return {}


def response_cache_control(headers: Headers | Fields) -> dict[str, str | None]:
    return parse_cache_control(_fields(headers).values(b"cache-control"))


def field_names(arg: str | None) -> frozenset[bytes]:
    """The field names of a qualified ``private="a, b"`` / ``no-cache="a"`` argument."""
    if not arg:
        return frozenset()
    return frozenset(n.strip().lower().encode("latin-1") for n in arg.split(",") if n.strip())


_MONTHS = {m: i for i, m in enumerate(calendar.month_abbr) if m}
_MONTHS_LOWER = {k.lower(): v for k, v in _MONTHS.items()}
_IMF = re.compile(
    r"^[A-Za-z]{3}, (\d{1,2}) ([A-Za-z]{3}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) GMT$"
)  # Sun, 06 Nov 1994 08:49:37 GMT
_RFC850 = re.compile(
    r"^[A-Za-z]{6,9}, (\d{2})-([A-Za-z]{3})-(\d{2}) (\d{2}):(\d{2}):(\d{2}) GMT$"
)  # Sunday, 06-Nov-94 08:49:37 GMT
_ASCTIME = re.compile(
    r"^[A-Za-z]{3} ([A-Za-z]{3}) ([ \d]\d) (\d{2}):(\d{2}):(\d{2}) (\d{4})$"
)  # Sun Nov  6 08:49:37 1994


def parse_http_date(value: bytes | str | None, now: float | None = None) -> float | None:
    """An HTTP-date (RFC 9110 §5.6.7, all three formats) as a Unix time; None when invalid.

    ``now`` resolves rfc850's two-digit year: a year more than 50 years in the future means
    the most recent past year with those digits. Without ``now``, 00-69 → 20xx, 70-99 → 19xx.
    """
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    m = _IMF.match(text)
    if m:
        day, mon, year, hh, mm, ss = m.groups()
    elif m := _ASCTIME.match(text):
        mon, day, hh, mm, ss, year = m.groups()
    elif m := _RFC850.match(text):
        day, mon, yy, hh, mm, ss = m.groups()
        if now is None:
            year = str(2000 + int(yy) if int(yy) < 70 else 1900 + int(yy))
        else:
            this_year = time_year(now)
            candidate = this_year - this_year % 100 + int(yy)
            if candidate > this_year + 50:
                candidate -= 100
            year = str(candidate)
    else:
        return None
    month = _MONTHS_LOWER.get(mon.lower())
    if month is None:
        return None
    try:
        fields = (int(year), month, int(day), int(hh), int(mm), int(ss))
        if not (1 <= fields[2] <= 31 and fields[3] < 24 and fields[4] < 60 and fields[5] < 61):
            return None
        datetime.date(fields[0], fields[1], fields[2])  # rejects 31 Feb
    except ValueError:
        return None
    return float(calendar.timegm((*fields, 0, 0, 0)))


def time_year(ts: float) -> int:
    return time.gmtime(ts).tm_year


# -- entity tags (RFC 9110 §8.8.3) ------------------------------------------------------------


@dataclass(frozen=True)
class ETag:
    weak: bool
    opaque: bytes  # between the quotes

    def __bytes__(self) -> bytes:
        return (b'W/"' if self.weak else b'"') + self.opaque + b'"'


_ETAG = re.compile(rb'\s*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*')


def parse_etag(value: bytes | None) -> ETag | None:
    """One entity-tag; None when absent or malformed (e.g. missing quotes)."""
    if value is None:
        return None
    m = _ETAG.fullmatch(value)
    return ETag(m.group(1) is not None, m.group(2)) if m else None


def parse_etag_list(value: bytes) -> list[ETag] | None:
    """An If-Match / If-None-Match value: ``*`` → None (any), else the tags (bad ones skipped)."""
    if value.strip() == b"*":
        return None
    out: list[ETag] = []
    pos = 0
    while pos < len(value):
        m = _ETAG.match(value, pos)
        if m is None:  # skip a malformed member up to the next comma
            comma = value.find(b",", pos)
            if comma < 0:
                break
            pos = comma + 1
            continue
        out.append(ETag(m.group(1) is not None, m.group(2)))
        pos = m.end()
        if pos < len(value) and value[pos : pos + 1] == b",":
            pos += 1
    return out


def strong_match(a: ETag, b: ETag) -> bool:
    """RFC 9110 §8.8.3.2: both strong and identical."""
    return not a.weak and not b.weak and a.opaque == b.opaque


def weak_match(a: ETag, b: ETag) -> bool:
    """RFC 9110 §8.8.3.2: identical opaque-tags, weakness ignored."""
    return a.opaque == b.opaque


# -- the stored-response record --------------------------------------------------------------


@dataclass(frozen=True)
class CacheEntry:
    """What the policy needs to know about one stored response.

    ``key`` is the primary cache key (:func:`cache_key`), ``url`` the plain URL (for purge and
    invalidation), ``vary_key`` the normalised selecting request fields (:func:`vary_key`).
    Times are Unix seconds: ``request_time`` when the request was sent upstream,
    ``response_time`` when the response head arrived (RFC 9111 §4.2.3).
    """

    method: bytes
    key: str
    url: str
    status: int
    headers: tuple[Header, ...]
    request_time: float
    response_time: float
    vary_key: str = ""
    body_length: int | None = None
    reason: bytes = b""
    fields: Fields = field(init=False, repr=False, compare=False, hash=False)
    # Values every hit needs, derived once (see :func:`hot`). An entry never changes: a 304
    # refresh or a HEAD freshening builds a new one, so nothing here can go stale.
    _hot: HotEntry | None = field(default=None, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", Fields(self.headers))


def make_entry(
    *,
    method: bytes,
    key: str,
    url: str,
    status: int,
    request_headers: Headers,
    response_headers: Headers,
    request_time: float,
    response_time: float,
    body_length: int | None = None,
    reason: bytes = b"",
) -> CacheEntry:
    """Build the record for a response :func:`storable` accepted (headers cleaned for storage)."""
    stored = tuple(_with_date(headers_to_store(response_headers), response_time))
    vk = vary_key(Fields(stored).values(b"vary"), request_headers)
    return CacheEntry(
        method=method.upper(),
        key=key,
        url=url,
        status=status,
        headers=stored,
        request_time=request_time,
        response_time=response_time,
        vary_key=vk if vk is not None else "*",
        body_length=body_length,
        reason=reason,
    )


def _with_date(headers: list[Header], received: float) -> list[Header]:
    """``headers`` with a Date of ``received`` appended when they have none: RFC 9110 §6.6.1
    makes a recipient with a clock add Date to a response it caches, so the stored response
    (and the Age and freshness measured from it) says when it was generated."""
    if any(n.strip().lower() == b"date" for n, _ in headers):
        return headers
    return [*headers, (b"Date", format_http_date(received))]


def headers_to_store(response_headers: Headers) -> list[Header]:
    """RFC 9111 §3.1: drop hop-by-hop fields (and those Connection names) and fields named by a
    qualified ``private`` (a shared cache must not store them, §5.2.2.7)."""
    f = Fields(response_headers)
    drop = set(HOP_BY_HOP) | set(f.tokens(b"connection"))
    private = response_cache_control(f).get("private", "")
    drop |= field_names(private)
    return [(n, v) for n, v in response_headers if n.strip().lower() not in drop]


# -- cache keys and Vary ---------------------------------------------------------------------


def cache_key(
    scheme: str,
    host_header: bytes | str | None,
    dest_ip: str,
    dest_port: int,
    target: bytes | str,
    shared: bool,
) -> str:
    """The primary cache key.

    When the daemon verified that Host and the intercepted destination agree (``shared``), the
    key is the URL and every client shares the entry. Otherwise the key also names the
    destination address, so a client that forges ``Host: victim.example`` towards its own
    server can only poison entries for that same destination — never what other clients get
    for the real victim.example.
    """
    url = request_url(scheme, host_header, target)
    if not url:  # no Host (HTTP/1.0): the destination is all we know
        url = request_url(scheme, bracket(dest_ip) + f":{dest_port}", target)
        return url
    if shared:
        return url
    return f"{url} @{bracket(dest_ip)}:{dest_port}"


def vary_key(vary_values: Iterable[bytes], request_headers: Headers | Fields) -> str | None:
    """Normalise the request fields a response's Vary names (RFC 9111 §4.1).

    Multiple field lines are combined with ", ", whitespace runs collapse, list members are
    trimmed; names are case-insensitive and sorted. An absent field is distinct from an empty
    one. ``Vary: *`` → None (never matches). No Vary → "".
    """
    names: set[bytes] = set()
    for value in vary_values:
        for name in value.split(b","):
            name = name.strip().lower()
            if name == b"*":
                return None
            if name:
                names.add(name)
    if not names:
        return ""  # no Vary: every request selects alike (and no Fields index to build)
    f = _fields(request_headers)
    parts: list[str] = []
    for name in sorted(names):
        lines = f.values(name)
        if not lines:
            parts.append(name.decode("latin-1") + "!")  # absent
            continue
        members = [re.sub(rb"[ \t]+", b" ", m.strip()) for line in lines for m in line.split(b",")]
        joined = b", ".join(m for m in members if m)
        parts.append(name.decode("latin-1") + "=" + joined.decode("latin-1"))
    return "\n".join(parts)


def vary_matches(entry: CacheEntry, request_headers: Headers | Fields) -> bool:
    """Whether a stored response may be selected for this request (RFC 9111 §4.1)."""
    if entry.vary_key == "*":
        return False
    current = vary_key(entry.fields.values(b"vary"), request_headers)
    return current is not None and current == entry.vary_key


# -- storing (RFC 9111 §3) -------------------------------------------------------------------


def storable(
    method: bytes,
    request_headers: Headers,
    status: int,
    response_headers: Headers,
    *,
    store_set_cookie: bool = False,
) -> tuple[bool, str]:
    """May a shared cache store this response? Returns ``(ok, reason)``; the reason is a short
    token for logs and metrics ("ok", "method", "no-store", …).

    HEAD responses are not stored (they have no content); they freshen a stored GET with
    :func:`freshen_from_head`. 206 is not stored as a complete response, nor is 304.
    Set-Cookie responses are refused unless ``store_set_cookie``: RFC 9111 allows storing them,
    but a transparent shared cache would hand one user's cookie to everybody (RFC 9111 §7.3).
    """
    method = method.upper()
    if method != b"GET":
        return False, "method"
    if status < 200:
        return False, "not-final"
    if status == 206:
        return False, "partial"
    if status == 304:
        return False, "not-modified"
    req = request_cache_control(request_headers)
    resp_fields = Fields(response_headers)
    cc = response_cache_control(resp_fields)
    if "must-understand" in cc:
        # §5.2.2.3: store only if we understand the status code; then no-store is ignored.
        if status not in UNDERSTOOD_STATUSES:
            return False, "must-understand"
    elif "no-store" in cc:
        return False, "no-store"
    if "no-store" in req:
        return False, "request-no-store"
    if "private" in cc and cc["private"] is None:
        return False, "private"
    if b"authorization" in Fields(request_headers) and not (
        "must-revalidate" in cc or "public" in cc or "s-maxage" in cc
    ):
        return False, "authorization"  # §3.5
    vary = vary_key(resp_fields.values(b"vary"), request_headers)
    if vary is None:
        return False, "vary-star"  # §4.1: never matches, storing is useless
    # A Set-Cookie that a qualified private names is removed before storage (§5.2.2.7,
    # headers_to_store), so only one that would be stored makes the response unstorable.
    private_names = field_names(cc.get("private"))
    if b"set-cookie" in resp_fields and b"set-cookie" not in private_names and not store_set_cookie:
        return False, "set-cookie"
    explicit = "public" in cc or "max-age" in cc or "s-maxage" in cc or b"expires" in resp_fields
    if not explicit and status not in HEURISTICALLY_CACHEABLE:
        return False, "no-freshness"
    validators = b"etag" in resp_fields or b"last-modified" in resp_fields
    stale_ext = "stale-while-revalidate" in cc or "stale-if-error" in cc
    if (
        not validators
        and not stale_ext
        and freshness_lifetime(response_headers, status, response_time=0.0) <= 0
    ):
        # Legal to store, but it could never be served without a full refetch.
        return False, "never-usable"
    return True, "ok"


# -- freshness (RFC 9111 §4.2) ---------------------------------------------------------------


def freshness_lifetime(
    response_headers: Headers | Fields,
    status: int,
    heuristic_fraction: float = DEFAULT_HEURISTIC_FRACTION,
    heuristic_max: float = DEFAULT_HEURISTIC_MAX,
    *,
    response_time: float | None = None,
) -> float:
    """Freshness lifetime in seconds for a shared cache (RFC 9111 §4.2.1, §4.2.2).

    s-maxage > max-age > Expires − Date; an invalid (or conflicting) value of the directive that
    applies makes the response stale (lifetime 0), an invalid Expires such as "0" means already
    expired (§5.3). A missing Date is taken as ``response_time``. Without explicit expiration a
    heuristic of ``heuristic_fraction`` × (Date − Last-Modified), at most ``heuristic_max``,
    applies to heuristically cacheable status codes and to ``public`` responses.
    """
    f = _fields(response_headers)
    cc = response_cache_control(f)
    if "s-maxage" in cc:
        return float(delta_seconds(cc["s-maxage"]) or 0)
    if "max-age" in cc:
        return float(delta_seconds(cc["max-age"]) or 0)
    date = parse_http_date(f.one(b"date"))
    if date is None:
        date = response_time
    if b"expires" in f:
        expires = parse_http_date(f.one(b"expires"))  # two Expires lines → None → stale
        if expires is None or date is None:
            return 0.0
        return max(0.0, expires - date)
    if status not in HEURISTICALLY_CACHEABLE and "public" not in cc:
        return 0.0
    last_modified = parse_http_date(f.one(b"last-modified"))
    if last_modified is None or date is None or date <= last_modified:
        return 0.0
    return float(min(heuristic_max, heuristic_fraction * (date - last_modified)))


def current_age(entry: CacheEntry, now: float) -> float:
    """RFC 9111 §4.2.3, step by step."""
    resident_time = now - entry.response_time
    return corrected_initial_age(entry) + resident_time


def corrected_initial_age(entry: CacheEntry) -> float:
    """The part of :func:`current_age` fixed when the response arrived (RFC 9111 §4.2.3)."""
    f = entry.fields
    age_value = 0
    age_lines = f.values(b"age")
    if age_lines:  # a list ("5, 7") from a buggy upstream: take the first member
        first = age_lines[0].split(b",")[0].strip().decode("latin-1")
        age_value = delta_seconds(first) or 0
    date_value = parse_http_date(f.one(b"date"))
    if date_value is None:
        date_value = entry.response_time
    apparent_age = max(0.0, entry.response_time - date_value)
    response_delay = entry.response_time - entry.request_time
    corrected_age_value = age_value + response_delay
    return max(apparent_age, corrected_age_value)


# -- serving (RFC 9111 §4) -------------------------------------------------------------------


class Kind(enum.Enum):
    FRESH = "fresh"  # serve the stored response
    STALE_OK = "stale"  # serve stale (client max-stale or stale-while-revalidate)
    REVALIDATE = "revalidate"  # send `conditional` headers upstream first
    MISS = "miss"  # forward; nothing usable stored
    GATEWAY_TIMEOUT = "only-if-cached"  # answer 504 (RFC 9111 §5.2.1.7)


@dataclass(frozen=True)
class Decision:
    kind: Kind
    reason: str
    age: float = 0.0
    lifetime: float = 0.0
    # stale-while-revalidate (RFC 5861 §3): serve now, refresh in the background.
    background_revalidate: bool = False
    conditional: tuple[Header, ...] = ()

    @property
    def status(self) -> int | None:
        return 504 if self.kind is Kind.GATEWAY_TIMEOUT else None

    @property
    def age_header(self) -> bytes:
        """The Age value to send: whole seconds (RFC 9111 §5.1)."""
        return age_value(self.age)


def _forbids_stale(cc: dict[str, str | None]) -> bool:
    """RFC 9111 §4.2.4: a shared cache must not serve stale under these directives
    (s-maxage implies proxy-revalidate, §5.2.2.10)."""
    return (
        "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc or "no-cache" in cc
    )


def decide(
    request_method: bytes,
    request_headers: Headers,
    entry: CacheEntry | None,
    now: float,
    *,
    heuristic_fraction: float = DEFAULT_HEURISTIC_FRACTION,
    heuristic_max: float = DEFAULT_HEURISTIC_MAX,
) -> Decision:
    """How to answer ``request`` given a stored response (RFC 9111 §4, §5.2.1, RFC 5861).

    The caller has already picked ``entry`` among the variants (:func:`vary_matches` is
    checked again here). HEAD may be answered from a stored GET.
    """
    method = request_method.upper()
    req_fields = Fields(request_headers)
    req = request_cache_control(req_fields)
    only_if_cached = "only-if-cached" in req

    def miss(reason: str) -> Decision:
        if only_if_cached:
            return Decision(Kind.GATEWAY_TIMEOUT, reason)
        return Decision(Kind.MISS, reason)

    if method not in (b"GET", b"HEAD"):
        return Decision(Kind.MISS, "method")
    if entry is None:
        return miss("not-stored")
    if b"if-match" in req_fields or b"if-unmodified-since" in req_fields:
        # RFC 9111 §4.3.2: "The If-Match and If-Unmodified-Since conditional header fields
        # are not applicable to a cache": they are the origin's to judge (a stored copy may
        # be older than the state the client's precondition names), so the request goes on.
        return miss("origin-precondition")
    if entry.method != b"GET":
        return miss("stored-method")
    if not vary_matches(entry, req_fields):
        return miss("vary")
    age = current_age(entry, now)
    lifetime = freshness_lifetime(
        entry.fields,
        entry.status,
        heuristic_fraction,
        heuristic_max,
        response_time=entry.response_time,
    )
    cc = response_cache_control(entry.fields)

    def revalidate(reason: str) -> Decision:
        if only_if_cached:
            return Decision(Kind.GATEWAY_TIMEOUT, reason, age, lifetime)
        return Decision(Kind.REVALIDATE, reason, age, lifetime, False, conditional_headers(entry))

    # §5.2.2.4: no-cache (with or without field names, which we treat as the whole response)
    # means every reuse needs a successful validation.
    if "no-cache" in cc:
        return revalidate("response-no-cache")
    if "no-cache" in req:
        return revalidate("request-no-cache")
    if "max-age" in req:
        # An invalid request max-age is honoured as the most restrictive value, 0.
        limit = delta_seconds(req["max-age"]) or 0
        if age > limit:
            return revalidate("request-max-age")
    remaining = lifetime - age
    if "min-fresh" in req:
        need = delta_seconds(req["min-fresh"])
        if need is not None and remaining < need:
            return revalidate("request-min-fresh")
    if remaining > 0:
        return Decision(Kind.FRESH, "fresh", age, lifetime)
    staleness = -remaining
    if _forbids_stale(cc):
        return revalidate("must-revalidate")
    if "max-stale" in req:
        arg = req["max-stale"]
        allowed = delta_seconds(arg) if arg is not None else None
        if arg is None or (allowed is not None and staleness <= allowed):
            return Decision(Kind.STALE_OK, "request-max-stale", age, lifetime)
    swr = delta_seconds(cc.get("stale-while-revalidate"))
    if swr is not None and staleness <= swr and not only_if_cached:
        return Decision(
            Kind.STALE_OK,
            "stale-while-revalidate",
            age,
            lifetime,
            True,
            conditional_headers(entry),
        )
    return revalidate("stale")


# -- the hit fast path -----------------------------------------------------------------------

# Request fields that can change what decide(), evaluate_conditionals() or plan_range() return.
# A request with none of them ("plain") meets an empty request Cache-Control (RFC 9111 §5.2.1,
# §5.4), no preconditions (RFC 9110 §13) and no Range (RFC 9110 §14.2).
_NOT_PLAIN = frozenset(
    {
        b"cache-control",
        b"pragma",
        b"if-match",
        b"if-none-match",
        b"if-modified-since",
        b"if-unmodified-since",
        b"if-range",
        b"range",
    }
)


def request_is_plain(request_headers: Headers) -> bool:
    """True when the request carries no caching, conditional or range field: then a stored
    2xx is served as is, and only the stored response decides whether it is fresh."""
    for name, _ in request_headers:  # noqa: SIM110 - a plain loop beats all(<generator>) here
        if name.strip().lower() in _NOT_PLAIN:
            return False
    return True


class HotEntry:
    """What :func:`plain_fresh` needs from a stored response, derived once per entry.

    ``memo`` is for the shell: serialised forms of the same immutable entry (head bytes)."""

    __slots__ = ("_lifetime", "initial_age", "memo", "no_cache", "vary_free")

    def __init__(self, entry: CacheEntry) -> None:
        cc = response_cache_control(entry.fields)
        self.no_cache = "no-cache" in cc
        # No Vary: vary_key() of any request is "", so the entry matches iff it stored "".
        self.vary_free = not entry.fields.values(b"vary") and entry.vary_key == ""
        self.initial_age = corrected_initial_age(entry)
        self._lifetime: tuple[float, float, float] | None = None
        self.memo: dict[object, object] = {}

    def lifetime(self, entry: CacheEntry, fraction: float, maximum: float) -> float:
        cached = self._lifetime
        if cached is not None and cached[0] == fraction and cached[1] == maximum:
            return cached[2]
        value = freshness_lifetime(
            entry.fields, entry.status, fraction, maximum, response_time=entry.response_time
        )
        self._lifetime = (fraction, maximum, value)
        return value


def hot(entry: CacheEntry) -> HotEntry:
    """The entry's :class:`HotEntry`, computed on first use."""
    h = entry._hot
    if h is None:
        h = HotEntry(entry)
        object.__setattr__(entry, "_hot", h)
    return h


def plain_fresh(
    request_method: bytes,
    request_headers: Headers,
    entry: CacheEntry,
    now: float,
    *,
    heuristic_fraction: float = DEFAULT_HEURISTIC_FRACTION,
    heuristic_max: float = DEFAULT_HEURISTIC_MAX,
) -> tuple[float, float] | None:
    """``(age, lifetime)`` when :func:`decide` would answer FRESH for a *plain* request
    (:func:`request_is_plain`, which the caller checked); None when the full rules must run.

    With an empty request Cache-Control, decide() reaches FRESH through exactly these checks:
    a GET or HEAD, a stored GET whose Vary selection matches, no ``no-cache`` in the stored
    response (§5.2.2.4), and a positive remaining freshness lifetime (§4.2)."""
    if (request_method == b"GET" or request_method == b"HEAD") and entry.method == b"GET":
        h = hot(entry)
        if not h.no_cache and (h.vary_free or vary_matches(entry, request_headers)):
            age = h.initial_age + (now - entry.response_time)
            lifetime = h.lifetime(entry, heuristic_fraction, heuristic_max)
            if lifetime - age > 0:
                return age, lifetime
    return None


def stale_if_error_ok(
    entry: CacheEntry,
    request_headers: Headers,
    status: int | None,
    now: float,
    *,
    heuristic_fraction: float = DEFAULT_HEURISTIC_FRACTION,
    heuristic_max: float = DEFAULT_HEURISTIC_MAX,
) -> bool:
    """RFC 5861 §4: may the stale ``entry`` answer instead of an upstream error?

    ``status`` is the origin's status, None for a connect/read failure. The response's or the
    request's ``stale-if-error=N`` bounds the staleness; directives that forbid serving stale
    (must-revalidate, proxy-revalidate, s-maxage, no-cache — RFC 9111 §4.2.4) and a request's
    no-cache win over it.
    """
    if status is not None and status not in STALE_IF_ERROR_STATUSES:
        return False
    cc = response_cache_control(entry.fields)
    req = request_cache_control(request_headers)
    if _forbids_stale(cc) or "no-cache" in req:
        return False
    limits = [delta_seconds(d.get("stale-if-error")) for d in (cc, req) if "stale-if-error" in d]
    valid = [x for x in limits if x is not None]
    if not valid:
        return False
    lifetime = freshness_lifetime(
        entry.fields,
        entry.status,
        heuristic_fraction,
        heuristic_max,
        response_time=entry.response_time,
    )
    staleness = current_age(entry, now) - lifetime
    return staleness <= max(valid)


def conditional_headers(entries: CacheEntry | Sequence[CacheEntry]) -> tuple[Header, ...]:
    """Validators for a conditional request (RFC 9111 §4.3.1): If-None-Match with the entity
    tags of all given stored responses; If-Modified-Since with Last-Modified when exactly one
    response is being validated. The caller removes the client's own conditionals first."""
    group = [entries] if isinstance(entries, CacheEntry) else list(entries)
    tags: list[bytes] = []
    for e in group:
        tag = parse_etag(e.fields.one(b"etag"))
        if tag is not None and bytes(tag) not in tags:
            tags.append(bytes(tag))
    out: list[Header] = []
    if tags:
        out.append((b"If-None-Match", b", ".join(tags)))
    if len(group) == 1:
        lm = group[0].fields.one(b"last-modified")
        if lm is not None and parse_http_date(lm) is not None:
            out.append((b"If-Modified-Since", lm))
    return tuple(out)


# Stored fields a hit replaces with the cache's own (Age, RFC 9111 §5.1; X-Cache).
HIT_REPLACED = frozenset({b"age", b"x-cache"})


def age_value(age: float) -> bytes:
    """The Age field value for ``age`` seconds: a non-negative integer (RFC 9111 §5.1)."""
    return b"%d" % min(int(max(age, 0.0)), DELTA_SECONDS_MAX)


def hit_fields(entry: CacheEntry) -> list[Header]:
    """The stored fields a response served from cache repeats: all but the ones the cache
    replaces with its own (:data:`HIT_REPLACED`). Age and X-Cache follow them."""
    return [(n, v) for n, v in entry.headers if n.lower() not in HIT_REPLACED]


# -- updating stored responses (RFC 9111 §4.3.4, §4.3.5) -------------------------------------


def update_from_304(stored_headers: Headers, not_modified_headers: Headers) -> list[Header]:
    """Replace every stored field that the 304 carries with the 304's field lines (§4.3.4,
    §3.2), except framing, Content-Range, hop-by-hop fields and Set-Cookie."""
    new_f = Fields(not_modified_headers)
    skip = set(NOT_UPDATED_FROM_304) | set(new_f.tokens(b"connection"))
    skip |= field_names(response_cache_control(new_f).get("private", ""))
    replacing = {n.strip().lower() for n, _ in not_modified_headers} - skip
    out = [(n, v) for n, v in stored_headers if n.strip().lower() not in replacing]
    out.extend((n, v) for n, v in not_modified_headers if n.strip().lower() in replacing)
    return out


def refresh_entry(
    entry: CacheEntry,
    not_modified_headers: Headers,
    request_time: float,
    response_time: float,
) -> CacheEntry:
    """The entry after a successful validation: headers merged, times of the 304 exchange (so
    its Date/Age are measured against the right clock readings)."""
    # The 304 is the newest word from the origin: its Date (appended if missing, RFC 9110
    # §6.6.1) and its Age (none: 0) are what the refreshed entry's age is measured from
    # (RFC 9111 §4.2.3). Keeping the first response's Date made a refreshed entry stale at
    # once; keeping its Age added that age again to a clock that restarted at the 304.
    new = _with_date(list(not_modified_headers), response_time)
    headers = update_from_304(entry.headers, new)
    if b"age" not in Fields(new):
        headers = [(n, v) for n, v in headers if n.strip().lower() != b"age"]
    return replace(
        entry,
        headers=tuple(headers),
        request_time=request_time,
        response_time=response_time,
    )


def select_for_304(stored: Sequence[CacheEntry], not_modified_headers: Headers) -> list[int]:
    """Indices of the stored responses a 304 updates (RFC 9111 §4.3.4).

    A strong ETag in the 304 selects all stored responses with that strong ETag (none → no
    update). Otherwise a weak ETag or a Last-Modified selects the most recent matching one.
    Without any validator, the only stored response is selected if it has none either.
    """
    f = Fields(not_modified_headers)
    tag = parse_etag(f.one(b"etag"))
    if tag is not None and not tag.weak:
        return [
            i
            for i, e in enumerate(stored)
            if (t := parse_etag(e.fields.one(b"etag"))) is not None and strong_match(t, tag)
        ]
    lm = parse_http_date(f.one(b"last-modified"))
    if tag is not None or lm is not None:
        matches: list[int] = []
        for i, e in enumerate(stored):
            t = parse_etag(e.fields.one(b"etag"))
            if tag is not None:
                if t is not None and weak_match(t, tag):
                    matches.append(i)
            elif lm is not None and parse_http_date(e.fields.one(b"last-modified")) == lm:
                matches.append(i)
        if not matches:
            return []
        return [max(matches, key=lambda i: stored[i].response_time)]
    if len(stored) == 1:
        only = stored[0].fields
        if b"etag" not in only and b"last-modified" not in only:
            return [0]
    return []


def freshen_from_head(stored_headers: Headers, head_headers: Headers) -> list[Header] | None:
    """RFC 9111 §4.3.5: a HEAD response updates a stored GET like a 304 does, unless its
    Content-Length, ETag or Last-Modified differ — then None: the stored response is outdated
    and should be invalidated."""
    s, h = Fields(stored_headers), Fields(head_headers)
    for name in (b"content-length", b"etag", b"last-modified"):
        if name in h and h.get(name) != s.get(name):
            return None
    return update_from_304(stored_headers, head_headers)


# -- invalidation (RFC 9111 §4.4) ------------------------------------------------------------


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host, port = split_authority(parts.netloc, scheme)
    return scheme, host, port


def invalidate_uris(
    method: bytes, status: int, request_uri: str, response_headers: Headers
) -> list[str]:
    """URIs to invalidate after a response to ``method``: for an unsafe method (or unknown one)
    and a non-error status (2xx/3xx), the target URI and the Location / Content-Location URIs
    when they have the same origin (a cross-origin one could be used to purge someone else's
    entries). Returned normalised like :func:`request_url`."""
    if method.upper() in SAFE_METHODS or not 200 <= status < 400:
        return []
    target = _origin(request_uri)
    out = [request_url(target[0], None, request_uri)]
    f = Fields(response_headers)
    for name in (b"location", b"content-location"):
        value = f.one(name)
        if value is None:
            continue
        try:
            absolute = urljoin(request_uri, value.decode("latin-1").strip())
            if _origin(absolute) != target:
                continue
        except ValueError:  # an origin's malformed Location invalidates nothing more
            continue
        url = request_url(target[0], None, absolute)
        if url and url not in out:
            out.append(url)
    return out


# -- conditional requests answered from cache (RFC 9110 §13) ---------------------------------


def evaluate_conditionals(
    method: bytes, request_headers: Headers, entry_headers: Headers, status: int = 200
) -> int | None:
    """RFC 9110 §13.2.2 evaluation against a stored representation: None (serve normally),
    304 or 412. Preconditions are ignored unless the stored response is 2xx (§13.2.1)."""
    if not 200 <= status < 300:
        return None
    method = method.upper()
    req = Fields(request_headers)
    rep = Fields(entry_headers)
    etag = parse_etag(rep.one(b"etag"))
    last_modified = parse_http_date(rep.one(b"last-modified"))
    # Step 1: If-Match, strong comparison (§13.1.1).
    if_match = req.get(b"if-match")
    if if_match is not None:
        tags = parse_etag_list(if_match)
        if tags is not None and (etag is None or not any(strong_match(t, etag) for t in tags)):
            return 412
    # Step 2: If-Unmodified-Since, only without If-Match (§13.1.4).
    elif b"if-unmodified-since" in req:
        since = parse_http_date(req.one(b"if-unmodified-since"))
        if since is not None and last_modified is not None and last_modified > since:
            return 412
    # Step 3: If-None-Match, weak comparison (§13.1.2).
    if_none_match = req.get(b"if-none-match")
    if if_none_match is not None:
        tags = parse_etag_list(if_none_match)
        matched = tags is None or (etag is not None and any(weak_match(t, etag) for t in tags))
        if matched:
            return 304 if method in (b"GET", b"HEAD") else 412
        return None
    # Step 4: If-Modified-Since, only for GET/HEAD and without If-None-Match (§13.1.3).
    if method in (b"GET", b"HEAD") and b"if-modified-since" in req:
        since = parse_http_date(req.one(b"if-modified-since"))
        if since is not None and last_modified is not None and last_modified <= since:
            return 304
    return None


def not_modified_headers(entry_headers: Headers) -> list[Header]:
    """Fields a 304 generated from a stored response carries (RFC 9110 §15.4.5)."""
    return [(n, v) for n, v in entry_headers if n.strip().lower() in FIELDS_IN_304]


# -- ranges (RFC 9110 §14) -------------------------------------------------------------------


@dataclass(frozen=True)
class RangePlan:
    """200 (send everything), 206 (one range, inclusive bounds) or 416."""

    status: int
    ranges: tuple[tuple[int, int], ...] = ()
    content_range: bytes | None = None


FULL = RangePlan(200)
_RANGE_SPEC = re.compile(rb"^\s*(\d*)\s*-\s*(\d*)\s*$")


def _if_range_ok(value: bytes, entry: Fields) -> bool:
    """RFC 9110 §13.1.5: strong ETag match, or an exact date match with a strong
    Last-Modified (stored Date at least a second later, §8.8.2.2)."""
    value = value.strip()
    if value.startswith((b'"', b"W/")):
        tag, stored = parse_etag(value), parse_etag(entry.one(b"etag"))
        return tag is not None and stored is not None and strong_match(tag, stored)
    when = parse_http_date(value)
    last_modified = parse_http_date(entry.one(b"last-modified"))
    date = parse_http_date(entry.one(b"date"))
    if when is None or last_modified is None or date is None:
        return False
    return when == last_modified and date - last_modified >= STRONG_LAST_MODIFIED_GAP


def plan_range(
    method: bytes,
    request_headers: Headers,
    entry_headers: Headers,
    length: int,
    status: int = 200,
) -> RangePlan:
    """How to answer a Range request from a stored complete 200 of ``length`` bytes.

    Only GET has range semantics (§14.2). Invalid syntax or another unit → full response; an
    If-Range that does not match → full response; no satisfiable range → 416 with
    ``bytes */length``; one (or overlapping ones that coalesce into one) → 206; several
    disjoint ranges → full 200, which §14.2 allows (no multipart/byteranges).
    """
    if method.upper() != b"GET" or status != 200:
        return FULL
    req = Fields(request_headers)
    raw = req.get(b"range")
    if raw is None:
        return FULL
    if_range = req.get(b"if-range")
    if if_range is not None and not _if_range_ok(if_range, Fields(entry_headers)):
        return FULL
    unit, eq, specs = raw.partition(b"=")
    if not eq or unit.strip().lower() != b"bytes":
        return FULL
    members = [s for s in specs.split(b",") if s.strip()]
    if not members or len(members) > MAX_RANGES:
        return FULL
    wanted: list[tuple[int, int]] = []
    for spec in members:
        m = _RANGE_SPEC.match(spec)
        if m is None or (not m.group(1) and not m.group(2)):
            return FULL  # invalid syntax: ignore the whole header
        first, last = m.group(1), m.group(2)
        if first:
            start = int(first)
            end = int(last) if last else length - 1
            if last and end < start:
                return FULL  # §14.1.2: last-pos < first-pos is invalid
            if start >= length:
                continue  # unsatisfiable member
            wanted.append((start, min(end, length - 1)))
        else:
            suffix = int(last)
            if suffix == 0 or length == 0:
                continue
            wanted.append((max(0, length - suffix), length - 1))
    if not wanted:
        return RangePlan(416, (), b"bytes */%d" % length)
    wanted.sort()
    merged = [wanted[0]]
    for start, end in wanted[1:]:
        last_start, last_end = merged[-1]
        if start <= last_end + 1:
            merged[-1] = (last_start, max(last_end, end))
        else:
            merged.append((start, end))
    if len(merged) > 1:
        return FULL
    start, end = merged[0]
    return RangePlan(206, ((start, end),), b"bytes %d-%d/%d" % (start, end, length))
