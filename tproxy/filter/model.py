"""The ``[filter]`` config section: client groups, time windows and ordered rules.

Example::

    [filter]
    default = "allow"                 # global default action: allow | deny
    categories_dir = "/var/lib/tproxy/blacklists"
    block_page = "/etc/tproxy/block.html"   # optional; an embedded page otherwise
    sni_default = "allow"             # no SNI / encrypted ClientHello: allow | deny
    quic_reject = "auto"              # auto | true | false
    https = true                      # SNI filtering of port-443 flows

    [[filter.group]]
    name = "kids"
    cidrs = ["192.168.10.0/24", "fd00:10::/64"]
    macs = ["02:00:00:00:00:01"]      # optional; a client is in the group by CIDR *or* MAC
    default = "deny"                  # optional; else the global default

    [[filter.window]]
    name = "school"
    days = ["mon", "tue", "wed", "thu", "fri"]
    hours = "08:00-16:30"             # local time; "22:00-06:00" wraps past midnight

    [[filter.rule]]
    group = "kids"                    # a group name, or "*" for every group
    action = "allow"
    window = "school"                 # optional: the rule applies only inside the window
    domains = ["school.example", "=exact.example"]

A rule matches when *every* matcher it has matches (a list matcher matches when any element
does); the first matching rule of the client's group decides, else the group default, else the
global default. The semantics of matching live in :mod:`tproxy.filter.verdict`.

Parsing is pure: the category folders and the block page are only *named* here, with where
each was written (:class:`Origin`); :func:`tproxy.filter.component.load_files` checks and reads
them when the filter loads, and reports a problem at that file, line and key.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any, Literal

import re2

from tproxy.config import DEFAULTS_PATH, ConfigError, IPNetwork, Reader, register_section
from tproxy.filter.domains import normalize_domain
from tproxy.filter.urlnorm import normalize_target
from tproxy.uri import split_authority

Action = Literal["allow", "deny"]
ACTIONS: tuple[Action, ...] = ("allow", "deny")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ALL_GROUPS = "*"
DEFAULT_GROUP = "default"
# re2 refuses programs larger than this; a pattern that needs more is a config error rather
# than an out-of-memory at request time.
RE2_MAX_MEM = 8 << 20
# Placeholders a block page template may use ($url etc., string.Template syntax).
TEMPLATE_FIELDS = frozenset({"url", "host", "group", "rule", "reason", "action", "category"})
MAX_TEMPLATE_BYTES = 256 * 1024

_MAC_RE = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_HOURS_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_METHOD_RE = re.compile(r"[A-Z][A-Z0-9_\-]{0,31}")
_MIME_RE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+\-]*/(?:\*|[a-z0-9][a-z0-9!#$&^_.+\-]*)")
_EXT_RE = re.compile(r"\.[a-z0-9_\-]{1,16}")


def re2_options() -> Any:
    opts = re2.Options()
    # re2 logs compile errors to stderr by default; we report them as config errors instead.
    opts.log_errors = False
    opts.max_mem = RE2_MAX_MEM
    return opts


def compile_re2(pattern: str) -> Any:
    """Compile with re2 (linear-time matching); raises ValueError with re2's reason."""
    try:
        return re2.compile(pattern, options=re2_options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(str(reason)) from None


@dataclass(frozen=True)
class Origin:
    """Where a setting was written, for a problem only the loader can see (a missing folder)."""

    path: str  # the config file
    key: str  # dotted key: "filter.rule[0].categories[1]"
    line: int | None = None

    @classmethod
    def of(cls, r: Reader, key: str) -> Origin:
        return cls(r.path, r.dotted(key), r.line_of(key))

    def error(self, reason: str) -> ConfigError:
        return ConfigError(self.path, self.key, reason, self.line)


@dataclass(frozen=True)
class CategoryRef:
    """A category a rule names: its folder must exist under ``categories_dir``."""

    name: str
    origin: Origin


@dataclass(frozen=True)
class HourRange:
    """``start <= t < end`` in minutes since midnight; ``end <= start`` wraps past midnight."""

    start: int
    end: int

    @property
    def wraps(self) -> bool:
        return self.end <= self.start

    def __str__(self) -> str:
        return (
            f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"
        )


@dataclass(frozen=True)
class WindowConfig:
    name: str
    # Weekday numbers as datetime.weekday(): 0 = Monday.
    days: frozenset[int]
    hours: tuple[HourRange, ...]
    key: str = ""

    def active(self, weekday: int, minute: int) -> bool:
        """Whether local ``weekday`` (0 = Monday) at ``minute`` since midnight is inside.

        ``days`` names the day a range *starts*: ``fri 22:00-06:00`` covers Friday 22:00 to
        Saturday 06:00, which is what "Friday night" means to the person writing it.
        """
        yesterday = (weekday - 1) % 7
        for r in self.hours:
            if not r.wraps:
                if weekday in self.days and r.start <= minute < r.end:
                    return True
            else:
                if weekday in self.days and minute >= r.start:
                    return True
                if yesterday in self.days and minute < r.end:
                    return True
        return False


@dataclass(frozen=True)
class GroupConfig:
    name: str
    cidrs: tuple[IPNetwork, ...] = ()
    macs: frozenset[str] = frozenset()
    default: Action | None = None
    key: str = ""


@dataclass(frozen=True)
class RuleConfig:
    key: str  # "filter.rule[3]": names the rule in verdicts, logs and explain output
    group: str
    action: Action
    window: str | None = None
    description: str = ""
    domains: tuple[str, ...] = ()
    url_prefix: tuple[str, ...] = ()
    url_regex: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    user_agent: str | None = None
    mime: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()
    max_response_size: int | None = None

    @property
    def response_side(self) -> bool:
        """Needs the response head (Content-Type / Content-Length) to decide."""
        return bool(self.mime) or self.max_response_size is not None

    @property
    def sni_applicable(self) -> bool:
        """Decidable from a TLS SNI alone: only domains, categories and a window."""
        return not (
            self.url_prefix
            or self.url_regex
            or self.methods
            or self.user_agent is not None
            or self.mime
            or self.extensions
            or self.max_response_size is not None
        )


@dataclass(frozen=True)
class FilterConfig:
    default: Action = "allow"
    categories_dir: str = "/var/lib/tproxy/blacklists"
    block_page: str | None = None
    # The template text read from block_page by the loader (None: the embedded default).
    block_template: str | None = None
    sni_default: Action = "allow"
    quic_reject: Literal["auto", "true", "false"] = "auto"
    https: bool = True
    groups: tuple[GroupConfig, ...] = ()
    windows: tuple[WindowConfig, ...] = ()
    rules: tuple[RuleConfig, ...] = ()
    # Where the file system names were written. Not part of the settings: two configs that say
    # the same in different places are equal (a reload that only moves lines changes nothing).
    block_page_origin: Origin = field(
        default=Origin(DEFAULTS_PATH, "filter.block_page"), compare=False
    )
    category_refs: tuple[CategoryRef, ...] = field(default=(), compare=False)

    @property
    def used_categories(self) -> frozenset[str]:
        """Categories some rule refers to: the only ones worth loading."""
        return frozenset(c for rule in self.rules for c in rule.categories)


def _action(r: Reader, key: str, default: Action) -> Action:
    value = r.string(key, default, ACTIONS)
    return "deny" if value == "deny" else "allow"


def _str_or_list(r: Reader, key: str) -> list[str]:
    """A matcher given as one string or a list of strings."""
    if isinstance(r.data.get(key), str):
        return [r.string(key, "")]
    return r.str_list(key)


def validate_template(text: str) -> str | None:
    """The problem with a block page template, or None."""
    try:
        tpl = string.Template(text)
        if not tpl.is_valid():
            return "invalid $placeholder syntax (write $$ for a literal dollar sign)"
        unknown = set(tpl.get_identifiers()) - TEMPLATE_FIELDS
    except (ValueError, AttributeError) as exc:
        return f"invalid template: {exc}"
    if unknown:
        return f"unknown placeholders {sorted(unknown)}; known: {sorted(TEMPLATE_FIELDS)}"
    return None


def _parse_hours(r: Reader, key: str, text: str) -> HourRange | None:
    m = _HOURS_RE.match(text)
    if not m:
        r.error(key, f'expected "HH:MM-HH:MM", got {text!r}')
        return None
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2 != 0):
        r.error(key, f"not a time of day in {text!r}")
        return None
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        r.error(key, f"empty range {text!r}; use 00:00-24:00 for all day")
        return None
    return HourRange(start, end)


def _parse_window(r: Reader) -> WindowConfig | None:
    name = r.string("name", "")
    if not _NAME_RE.fullmatch(name):
        r.error("name", f"a window needs a name of letters, digits, _.-; got {name!r}")
    days: set[int] = set()
    for index, day in enumerate(r.str_list("days", DAYS)):
        d = day.strip().lower()[:3]
        if d not in DAYS:
            r.error(f"days[{index}]", f"not a weekday: {day!r} (use {', '.join(DAYS)})")
        else:
            days.add(DAYS.index(d))
    if not days:
        r.error("days", "no days: the window would never be active")
    hours: list[HourRange] = []
    if isinstance(r.data.get("hours"), str):
        texts = [(r"hours", r.string("hours", ""))]
    else:
        texts = [(f"hours[{i}]", t) for i, t in enumerate(r.str_list("hours", ["00:00-24:00"]))]
    for key, text in texts:
        parsed = _parse_hours(r, key, text)
        if parsed:
            hours.append(parsed)
    r.finish()
    if not _NAME_RE.fullmatch(name):
        return None
    return WindowConfig(name, frozenset(days), tuple(hours), r.prefix)


def _parse_group(r: Reader) -> GroupConfig | None:
    name = r.string("name", "")
    if not _NAME_RE.fullmatch(name) or name == ALL_GROUPS:
        r.error("name", f"a group needs a name of letters, digits, _.-; got {name!r}")
        name = ""
    cidrs = r.networks("cidrs")
    macs: set[str] = set()
    for index, mac in enumerate(r.str_list("macs")):
        norm = mac.strip().lower().replace("-", ":")
        if not _MAC_RE.fullmatch(norm):
            r.error(f"macs[{index}]", f"not a MAC address: {mac!r}")
        else:
            macs.add(norm)
    default: Action | None = _action(r, "default", "allow") if r.has("default") else None
    # Judge the raw lists: an invalid entry is already reported on its own key.
    if name and name != DEFAULT_GROUP and not r.data.get("cidrs") and not r.data.get("macs"):
        r.error("cidrs", f"group {name!r} has no cidrs and no macs: no client can be in it")
    r.finish()
    return GroupConfig(name, cidrs, frozenset(macs), default, r.prefix) if name else None


def _parse_rule(
    r: Reader, groups: set[str], windows: set[str], refs: list[CategoryRef]
) -> RuleConfig:
    group = r.string("group", "")
    if not r.has("group"):
        r.error("group", f'missing: name a [[filter.group]] or "{ALL_GROUPS}" for every group')
    elif group != ALL_GROUPS and group not in groups:
        r.error("group", f"no [[filter.group]] named {group!r}")
    if not r.has("action"):
        r.error("action", "missing: allow or deny")
    action = _action(r, "action", "allow")
    window = r.string("window", "") or None
    if window is not None and window not in windows:
        r.error("window", f"no [[filter.window]] named {window!r}")
    description = r.string("description", "")

    domains: list[str] = []
    for index, entry in enumerate(_str_or_list(r, "domains")):
        exact = entry.startswith("=")
        result = normalize_domain(entry[1:] if exact else entry)
        if isinstance(result, str):
            r.error(f"domains[{index}]", f"{result}: {entry!r}")
        else:
            domains.append(("=" if exact else "") + result[0])

    prefixes: list[str] = []
    for index, entry in enumerate(_str_or_list(r, "url_prefix")):
        norm = normalize_url_prefix(entry)
        if norm is None:
            r.error(
                f"url_prefix[{index}]", f'expected "http://host/path" or "host/path": {entry!r}'
            )
        else:
            prefixes.append(norm)

    regexes = _str_or_list(r, "url_regex")
    single = isinstance(r.data.get("url_regex"), str)
    for index, pattern in enumerate(regexes):
        try:
            compile_re2(pattern)
        except ValueError as exc:
            key = "url_regex" if single else f"url_regex[{index}]"
            r.error(key, f"re2 cannot compile {pattern!r}: {exc} (no backreferences/lookaround)")

    cats = _str_or_list(r, "categories")
    for index, cat in enumerate(cats):
        if not _NAME_RE.fullmatch(cat):
            r.error(f"categories[{index}]", f"not a category name: {cat!r}")
        else:
            refs.append(CategoryRef(cat, Origin.of(r, f"categories[{index}]")))

    methods: list[str] = []
    for index, method in enumerate(_str_or_list(r, "methods")):
        m = method.strip().upper()
        if not _METHOD_RE.fullmatch(m):
            r.error(f"methods[{index}]", f"not an HTTP method: {method!r}")
        else:
            methods.append(m)

    user_agent: str | None = r.string("user_agent", "") if r.has("user_agent") else None
    if user_agent is not None:
        try:
            compile_re2(user_agent)
        except ValueError as exc:
            r.error("user_agent", f"re2 cannot compile {user_agent!r}: {exc}")

    mimes: list[str] = []
    for index, mime in enumerate(_str_or_list(r, "mime")):
        m = mime.strip().lower()
        if not _MIME_RE.fullmatch(m):
            r.error(f"mime[{index}]", f'expected "type/subtype" or "type/*": {mime!r}')
        else:
            mimes.append(m)

    exts: list[str] = []
    for index, ext in enumerate(_str_or_list(r, "extensions")):
        e = ext.strip().lower()
        e = e if e.startswith(".") else "." + e
        if not _EXT_RE.fullmatch(e):
            r.error(f"extensions[{index}]", f'expected a file extension like ".exe": {ext!r}')
        else:
            exts.append(e)

    max_size: int | None = r.size("max_response_size", 0) if r.has("max_response_size") else None
    r.finish()
    return RuleConfig(
        key=r.prefix,
        group=group,
        action=action,
        window=window,
        description=description,
        domains=tuple(domains),
        url_prefix=tuple(prefixes),
        url_regex=tuple(regexes),
        categories=tuple(cats),
        methods=tuple(methods),
        user_agent=user_agent,
        mime=tuple(mimes),
        extensions=tuple(exts),
        max_response_size=max_size,
    )


def normalize_url_prefix(entry: str) -> str | None:
    """``http://host/path`` in the form requests are matched in; a bare ``host/path`` gets
    http://. The host is normalised like a request's (case, trailing dot, default port, IDN)
    and the path like a request target (:mod:`tproxy.filter.urlnorm`: escapes, dot segments),
    so ``Example.com/%41ds/`` and a request for ``/Ads/`` meet. An entry without a path gets
    ``/``: ``http://a.example`` must not match ``http://a.example.evil/``.

    Prefixes are compared with the absolute request URL (RFC 9112 §3.2.2 absolute-form),
    which only exists for plain HTTP here: HTTPS is never decrypted.
    """
    text = entry.strip()
    if not text or any(c.isspace() for c in text):
        return None
    lower = text.lower()
    if lower.startswith("http://"):
        text = text[7:]
    elif "://" in text:
        return None
    slash = text.find("/")
    host, path = (text, "/") if slash < 0 else (text[:slash], text[slash:])
    if not host:
        return None
    name, port = split_authority(host)
    if not name:
        return None
    if not name.startswith("["):
        result = normalize_domain(name)
        if isinstance(result, str):
            return None
        name = result[0]
    authority = f"{name}:{port}" if port else name
    return "http://" + authority + normalize_target(path)


def parse_filter(r: Reader) -> FilterConfig:
    d = FilterConfig()
    default = _action(r, "default", d.default)
    categories_dir = r.string("categories_dir", d.categories_dir)
    block_page = r.string("block_page", "") or None
    sni_default = _action(r, "sni_default", d.sni_default)
    quic = r.data.get("quic_reject")
    # Accept TOML booleans as well as the strings: `quic_reject = true` is what people write.
    if isinstance(quic, bool):
        r.boolean("quic_reject", False)
        quic_reject: Literal["auto", "true", "false"] = "true" if quic else "false"
    else:
        value = r.string("quic_reject", d.quic_reject, ("auto", "true", "false"))
        quic_reject = "true" if value == "true" else "false" if value == "false" else "auto"
    https = r.boolean("https", d.https)

    groups = r.named_tables("group", _parse_group, "group")
    windows = r.named_tables("window", _parse_window, "window")
    seen = {g.name for g in groups}
    wseen = {w.name for w in windows}

    refs: list[CategoryRef] = []
    rules = [_parse_rule(sub, seen, wseen, refs) for sub in r.tables("rule")]
    r.finish()
    # config.parse() calls finish() on this table again; mark every key seen so an unknown
    # key is reported once, not twice.
    r.keys()
    return FilterConfig(
        default=default,
        categories_dir=categories_dir,
        block_page=block_page,
        sni_default=sni_default,
        quic_reject=quic_reject,
        https=https,
        groups=tuple(groups),
        windows=tuple(windows),
        rules=tuple(rules),
        block_page_origin=Origin.of(r, "block_page"),
        category_refs=tuple(refs),
    )


register_section("filter", parse_filter)
