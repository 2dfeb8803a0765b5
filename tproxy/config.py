"""Configuration: one TOML file → frozen dataclasses, validated in one pass.

Every error is a :class:`ConfigError` naming the file, the line and the dotted key, so an admin
can fix a config without reading code. ``tomllib`` does not report line numbers for values, so
:func:`locate_keys` scans the text for table headers and ``key =`` lines to find them.

Feature modules (cache, filter, shaping, limits) parse their own sections with :class:`Reader`
and register the parser in :data:`SECTION_PARSERS`'s callers (see :func:`load`).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


DEFAULTS_PATH = "<defaults>"


class ConfigError(Exception):
    """A configuration problem, with the file, line and key a user needs to fix it."""

    def __init__(self, path: str, key: str, reason: str, line: int | None = None) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.key}: {self.reason}" if self.key else f"{where}: {self.reason}"


class ConfigErrors(ConfigError):
    """Several problems found in one pass; ``str`` lists one per line."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.path, first.key, first.reason, first.line)

    def __str__(self) -> str:
        return "\n".join(ConfigError.__str__(e) for e in self.errors)


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\.\"' ]+?)\s*=")


def _norm_key(raw: str) -> str:
    parts = [p.strip().strip("\"'") for p in raw.split(".")]
    return ".".join(parts)


def locate_keys(text: str) -> dict[str, int]:
    """Map dotted keys (``table.key``, ``array[2].key``) to 1-based line numbers.

    A line-oriented scan, good enough for the error messages it feeds: it understands table
    headers, arrays of tables and ``key = value`` lines, and ignores multi-line values.
    """
    lines: dict[str, int] = {}
    prefix = ""
    array_counts: dict[str, int] = {}
    in_multiline: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_multiline is not None:
            if in_multiline in line:
                in_multiline = None
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        header = _HEADER.match(line)
        if header:
            name = _norm_key(header.group(2))
            if header.group(1) == "[[":
                index = array_counts.get(name, -1) + 1
                array_counts[name] = index
                prefix = f"{name}[{index}]"
            else:
                prefix = name
            lines.setdefault(prefix, number)
            continue
        key = _KEY.match(line)
        if key:
            full = f"{prefix}.{_norm_key(key.group(1))}" if prefix else _norm_key(key.group(1))
            lines.setdefault(full, number)
            rest = line[key.end() :]
            for quote in ('"""', "'''"):
                if rest.count(quote) == 1:
                    in_multiline = quote
    return lines


# The longest duration a setting takes (a year): anything longer means "never" in practice,
# and the event loop's timers overflow long before inf.
DURATION_MAX = 365 * 86400.0
_DURATION = re.compile(r"^\s*(-?[0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*$")
_SIZE = re.compile(r"^\s*(-?[0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_RATE = re.compile(r"^\s*(-?[0-9]*\.?[0-9]+)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)\s*$", re.I)

_DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS: dict[str, float] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ti": 1024**4,
    "tib": 1024**4,
}
# Rates follow tc(8): "bit" units are bits per second, "bps" units are bytes per second.
_RATE_UNITS: dict[str, float] = {
    "bit": 1,
    "kbit": 1000,
    "mbit": 1000**2,
    "gbit": 1000**3,
    "bps": 8,
    "kbps": 8000,
    "mbps": 8 * 1000**2,
    "gbps": 8 * 1000**3,
}


class Reader:
    """Typed, error-reporting access to one TOML table.

    Every getter records the key it read; :meth:`finish` then rejects unknown keys, so a typo
    (``lan_interface`` for ``lan_interfaces``) is an error and not a silently ignored setting.
    Errors are collected in a shared list so one pass reports all of them.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        path: str,
        prefix: str = "",
        lines: Mapping[str, int] | None = None,
        errors: list[ConfigError] | None = None,
    ) -> None:
        self.data = data
        self.path = path
        self.prefix = prefix
        self.lines: Mapping[str, int] = lines if lines is not None else {}
        self.errors: list[ConfigError] = errors if errors is not None else []
        self._seen: set[str] = set()

    # -- error plumbing -------------------------------------------------------------------

    def dotted(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def line_of(self, key: str) -> int | None:
        full = self.dotted(key)
        if full in self.lines:
            return self.lines[full]
        # "ports[1]" is on the line of "ports" (arrays of scalars are one key = value line).
        base = re.sub(r"\[\d+\]$", "", full)
        if base in self.lines:
            return self.lines[base]
        if f"{full}[0]" in self.lines:  # written as [[name]] where a table was due
            return self.lines[f"{full}[0]"]
        return self.lines.get(self.prefix) if self.prefix else None

    def error(self, key: str, reason: str) -> None:
        self.errors.append(ConfigError(self.path, self.dotted(key), reason, self.line_of(key)))

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, default: T, kinds: tuple[type, ...], what: str) -> Any:
        self._seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        # bool is an int subclass in Python; TOML keeps them apart, and so do we.
        if isinstance(value, bool) and bool not in kinds:
            self.error(key, f"expected {what}, got {value!r}")
            return default
        if not isinstance(value, kinds):
            self.error(key, f"expected {what}, got {value!r}")
            return default
        return value

    # -- scalar getters -------------------------------------------------------------------

    def string(self, key: str, default: str, choices: Sequence[str] | None = None) -> str:
        value: str = self._get(key, default, (str,), "a string")
        if choices is not None and value not in choices:
            self.error(key, f"must be one of {', '.join(choices)}; got {value!r}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value: bool = self._get(key, default, (bool,), "true or false")
        return value

    def integer(self, key: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        value: int = self._get(key, default, (int,), "an integer")
        if lo is not None and value < lo:
            self.error(key, f"must be at least {lo}; got {value}")
            return default
        if hi is not None and value > hi:
            self.error(key, f"must be at most {hi}; got {value}")
            return default
        return value

    def number(
        self, key: str, default: float, lo: float | None = None, hi: float | None = None
    ) -> float:
        value = self._get(key, default, (int, float), "a number")
        value = float(value)
        if not math.isfinite(value):
            # TOML has nan and inf; every comparison with nan is false, so it would pass the
            # range checks below and reach the daemon (a NaN timeout hung every request).
            self.error(key, f"must be a finite number; got {value}")
            return default
        if lo is not None and value < lo:
            self.error(key, f"must be at least {lo}; got {value}")
            return default
        if hi is not None and value > hi:
            self.error(key, f"must be at most {hi}; got {value}")
            return default
        return value

    def _quantity(
        self,
        key: str,
        default: float,
        kinds: tuple[type, ...],
        pattern: re.Pattern[str],
        units: dict[str, float],
        default_unit: str,
        what: str,
        example: str,
        minimum: float,
    ) -> float | None:
        """A number, or a string ``<number><unit>``; None (and an error) when invalid."""
        value = self._get(key, default, kinds, f"{what} like {example}")
        if isinstance(value, str):
            m = pattern.match(value)
            unit = (m.group(2) or default_unit).lower() if m else ""
            if not m or unit not in units:
                self.error(key, f"not {what}: {value!r} (use e.g. {example})")
                return None
            value = float(m.group(1)) * units[unit]
        if not math.isfinite(value):
            self.error(key, f"must be a finite {what[2:]}; got {value}")
            return None
        if value < minimum:
            bound = "must not be negative" if minimum == 0 else "must be positive"
            self.error(key, f"{bound}; got {value:g}")
            return None
        return float(value)

    def duration(self, key: str, default: float) -> float:
        """Seconds, from a number or a string like ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``."""
        value = self._quantity(key, default, (int, float, str), _DURATION, _DURATION_UNITS, "s",
                               "a duration", '"500ms", "30s", "5m"', 0)  # fmt: skip
        if value is not None and value > DURATION_MAX:
            # Beyond any use, and beyond what the event loop's timers take (1e300 overflows).
            self.error(key, f"must be at most 365d; got {value:g} s")
            return default
        return default if value is None else value

    def size(self, key: str, default: int) -> int:
        """Bytes, from an integer or a string like ``"64MiB"``, ``"1G"``, ``"512k"``."""
        value = self._quantity(key, default, (int, str), _SIZE, _SIZE_UNITS, "",
                               "a size", '"512KiB", "64MiB", "1GB"', 0)  # fmt: skip
        if value is None:
            return default
        whole = round(value)
        if abs(value - whole) > 1e-6 * max(1.0, value):
            # "0.5" would silently become 0 bytes; "1.5KiB" is a whole 1536, and "4.1MB" is
            # 4100000 (its float, 4099999.9999999995, is not a reason to refuse it).
            self.error(key, f"not a whole number of bytes: {value:g}")
            return default
        return int(whole)

    def rate(self, key: str, default: int) -> int:
        """Bits per second, from a tc(8)-style string (``"2mbit"``, ``"500kbit"``, ``"1mbps"``)."""
        value = self._quantity(key, default, (int, str), _RATE, _RATE_UNITS, "",
                               "a rate", '"2mbit", "500kbit", "1mbps"', 1)  # fmt: skip
        return default if value is None else int(value)

    # -- compound getters -----------------------------------------------------------------

    def items(self, key: str, default: Sequence[T], item: type[T], what: str) -> list[T]:
        value = self._get(key, list(default), (list,), f"a list of {what}")
        out: list[T] = []
        for index, element in enumerate(value):
            if (isinstance(element, bool) and item is not bool) or not isinstance(element, item):
                self.error(f"{key}[{index}]", f"expected {what}, got {element!r}")
            else:
                out.append(element)
        return out

    def str_list(self, key: str, default: Sequence[str] = ()) -> list[str]:
        return self.items(key, default, str, "strings")

    def networks(self, key: str, default: Sequence[str] = ()) -> tuple[IPNetwork, ...]:
        """CIDRs (v4 or v6); a bare address means a single host."""
        out: list[IPNetwork] = []
        for index, text in enumerate(self.str_list(key, default)):
            where = f"{key}[{index}]"
            if "%" in text:
                # Python takes "fe80::1%eth0"; iptables does not (and a rule set that fails to
                # load is found only at start). A zone names no address the rules can match.
                self.error(where, f"an address with a zone (%) cannot be matched: {text!r}")
                continue
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                self.error(where, f"not an IP address or CIDR: {text!r}")
                continue
            host = ipaddress.ip_interface(text.strip()).ip if "/" in text else None
            if host is not None and host != net.network_address:
                # "192.168.10.7/24" is a host's address with its prefix; as a network it would
                # silently mean the whole /24. Say which of the two to write.
                self.error(
                    where,
                    f"{text!r} has host bits set: write {str(net)!r} for the network "
                    f"or {str(host)!r} for the one host",
                )
                continue
            mapped = getattr(net.network_address, "ipv4_mapped", None)
            if mapped is not None:
                # IPv4 clients arrive as IPv4 packets: "::ffff:10.0.0.5" matches nothing.
                self.error(where, f"write the IPv4 form {str(mapped)!r}, not {text!r}")
                continue
            out.append(net)
        return tuple(out)

    def ports(self, key: str, default: Sequence[int]) -> tuple[int, ...]:
        out: list[int] = []
        for index, port in enumerate(self.items(key, default, int, "port numbers")):
            if not 1 <= port <= 65535:
                self.error(f"{key}[{index}]", f"not a TCP port: {port}")
            elif port in out:
                self.error(f"{key}[{index}]", f"port {port} is listed twice")
            else:
                out.append(port)
        return tuple(out)

    def table(self, key: str) -> Reader:
        value = self._get(key, {}, (dict,), "a table")
        return Reader(value, self.path, self.dotted(key), self.lines, self.errors)

    def tables(self, key: str) -> list[Reader]:
        """An array of tables (``[[key]]``); each element gets its own reader."""
        value = self._get(key, [], (list,), "an array of tables")
        out: list[Reader] = []
        for index, element in enumerate(value):
            if not isinstance(element, dict):
                self.error(f"{key}[{index}]", f"expected a table, got {element!r}")
                continue
            out.append(
                Reader(element, self.path, f"{self.dotted(key)}[{index}]", self.lines, self.errors)
            )
        return out

    def named_tables(self, key: str, parse: Callable[[Reader], T | None], what: str) -> list[T]:
        """``[[key]]`` entries parsed by ``parse``, each with a ``name`` unique among them."""
        out: list[T] = []
        seen: set[str] = set()
        for sub in self.tables(key):
            item = parse(sub)
            if item is None:
                continue
            name = str(getattr(item, "name", ""))
            if name in seen:
                sub.error("name", f"duplicate {what} name {name!r}")
                continue
            seen.add(name)
            out.append(item)
        return out

    def keys(self) -> list[str]:
        """All keys of this table (marks them as seen: for tables keyed by user names)."""
        self._seen.update(self.data)
        return list(self.data)

    def finish(self) -> None:
        """Report keys that no getter asked for: most likely typos, so name the closest known
        one (``[filtr]`` → did you mean [filter]?)."""
        for key in self.data:
            if key in self._seen:
                continue
            table = isinstance(self.data[key], dict)
            what = "unknown section" if table and not self.prefix else "unknown key"
            if not table and not self.prefix:
                what += " (options belong under a section header such as [proxy])"
            close = difflib.get_close_matches(key, sorted(self._seen), n=1, cutoff=0.6)
            if close and not self.prefix and isinstance(self.data.get(close[0], {}), dict):
                what += f" (did you mean [{close[0]}]?)"
            elif close:
                what += f" (did you mean {close[0]}?)"
            self.error(key, what)


# -- the foundation's sections --------------------------------------------------------------


@dataclass(frozen=True)
class ProxyConfig:
    lan_interfaces: tuple[str, ...] = ()
    # Interception: destination ports diverted to the daemon from the LAN.
    ports: tuple[int, ...] = (80,)
    # The local port TPROXY delivers diverted connections to (never reachable directly).
    listen_port: int = 3129
    ipv6: bool = True
    # Full transparency: upstream connections keep the client's source address.
    transparent_upstream: bool = True
    # Announce the proxy with Via (RFC 9110 §7.6.3) on what it forwards and serves from cache.
    # Off by default: an intercepting proxy that announces itself changes what origins send
    # (nginx's default `gzip_proxied off` stops compressing for requests that carry Via).
    via: bool = False
    connect_timeout: float = 10.0
    # Whole request head (slow-header clients) and stalled request bodies.
    request_timeout: float = 30.0
    # From the request being sent to the origin's response head (then 504).
    response_timeout: float = 60.0
    # A client's idle keep-alive connection between requests.
    keepalive_timeout: float = 60.0
    # Any connection with no bytes moving in either direction (tunnels, stalled transfers),
    # and idle pooled upstream connections.
    idle_timeout: float = 300.0
    drain_timeout: float = 10.0


@dataclass(frozen=True)
class RulesConfig:
    # Marks and routing table owned by tproxy. The mark selects policy routing into a table
    # whose only route is "local 0/0 dev lo", which delivers diverted packets to our socket.
    fwmark: int = 0x1
    fwmark_mask: int = 0x1
    route_table: int = 100
    rule_priority: int = 10000
    bypass_clients: tuple[IPNetwork, ...] = ()
    bypass_destinations: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class LogConfig:
    # Squid native access.log format; "" disables the access log, "-" writes to stdout.
    access_log: str = "/var/log/tproxy/access.log"
    level: str = "info"


@dataclass(frozen=True)
class Config:
    path: str = "<defaults>"
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Feature sections parsed by their own modules, keyed by section name.
    sections: Mapping[str, Any] = field(default_factory=dict)

    def section(self, name: str, kind: type[T]) -> T:
        """The parsed ``[name]`` section, or ``kind()`` (its defaults) when it is absent.

        Sections are only present when their module was imported before ``load``; a caller
        that asks for one always gets a usable value of the type it expects."""
        value = self.sections.get(name)
        return value if isinstance(value, kind) else kind()


# A feature module registers ``name -> parser(reader) -> frozen dataclass`` here; ``load``
# hands each parser its table (empty when absent, so defaults apply).
SectionParser = Callable[[Reader], Any]
SECTION_PARSERS: dict[str, SectionParser] = {}


def register_section(name: str, parser: SectionParser) -> None:
    SECTION_PARSERS[name] = parser


def _parse_proxy(r: Reader) -> ProxyConfig:
    d = ProxyConfig()
    lan: tuple[str, ...] = tuple(r.str_list("lan_interfaces", d.lan_interfaces))
    for index, name in enumerate(lan):
        if not re.fullmatch(r"[A-Za-z0-9_.:@\-+]{1,15}", name):
            r.error(f"lan_interfaces[{index}]", f"not an interface name: {name!r}")
        elif name in lan[:index]:
            r.error(f"lan_interfaces[{index}]", f"{name!r} is listed twice")
    cfg = ProxyConfig(
        lan_interfaces=lan,
        ports=r.ports("ports", d.ports),
        listen_port=r.integer("listen_port", d.listen_port, 1, 65535),
        ipv6=r.boolean("ipv6", d.ipv6),
        transparent_upstream=r.boolean("transparent_upstream", d.transparent_upstream),
        via=r.boolean("via", d.via),
        connect_timeout=r.duration("connect_timeout", d.connect_timeout),
        request_timeout=r.duration("request_timeout", d.request_timeout),
        response_timeout=r.duration("response_timeout", d.response_timeout),
        keepalive_timeout=r.duration("keepalive_timeout", d.keepalive_timeout),
        idle_timeout=r.duration("idle_timeout", d.idle_timeout),
        drain_timeout=r.duration("drain_timeout", d.drain_timeout),
    )
    for key in ZERO_TIMEOUT_MEANS_NOW:
        if getattr(cfg, key) == 0:
            # A zero deadline expires at once: every connection would get 504/408 or be cut,
            # never "no timeout" (Squid's habit for some of its 0s); say so before it runs.
            r.error(key, "must be positive: 0 would time out every connection at once")
    r.finish()
    return cfg


# Proxy timeouts for which 0 is not "off" but "immediately" (drain_timeout 0 is a valid choice:
# stop without waiting for connections to finish).
ZERO_TIMEOUT_MEANS_NOW = (
    "connect_timeout",
    "request_timeout",
    "response_timeout",
    "keepalive_timeout",
    "idle_timeout",
)


def _parse_rules(r: Reader) -> RulesConfig:
    d = RulesConfig()
    cfg = RulesConfig(
        fwmark=r.integer("fwmark", d.fwmark, 1, 0xFFFFFFFF),
        fwmark_mask=r.integer("fwmark_mask", d.fwmark_mask, 1, 0xFFFFFFFF),
        route_table=r.integer("route_table", d.route_table, 1, 0xFFFFFFFE),
        rule_priority=r.integer("rule_priority", d.rule_priority, 1, 32765),
        bypass_clients=r.networks("bypass_clients"),
        bypass_destinations=r.networks("bypass_destinations"),
    )
    if cfg.fwmark & cfg.fwmark_mask != cfg.fwmark:
        r.error("fwmark", f"mark {cfg.fwmark:#x} has bits outside fwmark_mask {cfg.fwmark_mask:#x}")
    reserved = _reserved_marks(False)
    if cfg.fwmark_mask & reserved:
        # Checked here, not only when the rules are built, so that check-config (the unit's
        # ExecStartPre) refuses it too, with the line.
        r.error("fwmark_mask", f"{cfg.fwmark_mask:#x} overlaps the bits tproxy marks packets "
                f"with ({reserved:#x}); pick bits outside them, e.g. 0x10000000")  # fmt: skip
    if cfg.route_table in (253, 254, 255):
        r.error("route_table", "253-255 are the kernel's default/main/local tables; pick another")
    r.finish()
    return cfg


def _check_shaping_against(root: Reader, proxy: ProxyConfig, shaping: Any, filt: Any) -> None:
    """What [shaping] names from other sections must exist there and be usable by it."""
    r = root.table("shaping")
    wild = [i for i in proxy.lan_interfaces if i.endswith("+")]
    if wild and len(wild) == len(proxy.lan_interfaces):
        # A wildcard has no HTB tree (named interfaces beside it are shaped; README): with
        # only wildcards, downloads would go unshaped while shaping says it is on.
        r.error(
            "enabled",
            f"shaping needs a named LAN interface (an HTB tree on each): proxy.lan_interfaces "
            f"has only {', '.join(map(repr, wild))}",
        )
    groups = {g.name: g for g in getattr(filt, "groups", ())}
    windows = {w.name for w in getattr(filt, "windows", ())}
    for i, sel in enumerate(getattr(shaping, "selectors", ())):
        group = groups.get(sel.group) if sel.group else None
        if sel.group and sel.group != "default" and group is None:
            r.error(f"select[{i}].group", f"no [[filter.group]] named {sel.group!r}")
        elif group is not None and group.macs and not group.cidrs and sel.group != "default":
            # The filter finds MAC groups through the neighbour table; shaping marks flows by
            # address only (a group's cidrs), so a group of MACs alone would match nothing.
            r.error(
                f"select[{i}].group",
                f"group {sel.group!r} has only macs, which shaping cannot see: give it cidrs",
            )
        if sel.window and sel.window not in windows:
            r.error(f"select[{i}].window", f"no [[filter.window]] named {sel.window!r}")


def _reserved_marks(shaping: bool) -> int:
    """The packet mark bits tproxy's own rules use (netfilter.render); the shaping slot bits
    only while shaping classes exist."""
    from tproxy.netfilter.render import MARK_RESERVED, MARK_SLOT_MASK

    return MARK_RESERVED | (MARK_SLOT_MASK if shaping else 0)


def _parse_log(r: Reader) -> LogConfig:
    d = LogConfig()
    cfg = LogConfig(
        access_log=r.string("access_log", d.access_log),
        level=r.string("level", d.level, ("debug", "info", "warning", "error")),
    )
    r.finish()
    return cfg


def parse(data: Mapping[str, Any], path: str = "<defaults>", text: str = "") -> Config:
    """Validate a decoded TOML document; raise :class:`ConfigErrors` listing every problem."""
    root = Reader(data, path, "", locate_keys(text) if text else {})
    proxy = _parse_proxy(root.table("proxy"))
    rules = _parse_rules(root.table("rules"))
    log = _parse_log(root.table("log"))
    sections: dict[str, Any] = {}
    for name, parser in SECTION_PARSERS.items():
        sub = root.table(name)
        sections[name] = parser(sub)  # each parser calls finish() on its own tables
    shaping = sections.get("shaping")
    if getattr(shaping, "enabled", False):
        _check_shaping_against(root, proxy, shaping, sections.get("filter"))
    if getattr(shaping, "enabled", False) and getattr(shaping, "classes", ()):
        slots = _reserved_marks(True) & ~_reserved_marks(False)
        if rules.fwmark_mask & slots:
            root.table("rules").error(
                "fwmark_mask",
                f"{rules.fwmark_mask:#x} overlaps the bits shaping marks flows with "
                f"({slots:#x}); pick bits outside them, e.g. 0x10000000",
            )
    root.finish()
    if root.errors:
        raise ConfigErrors(root.errors)
    return Config(path=path, proxy=proxy, rules=rules, log=log, sections=sections)


def load(path: str | Path | None) -> Config:
    """Load a config file (or the embedded defaults when ``path`` is None)."""
    _register_builtin_sections()
    if path is None:
        return parse({})
    name = str(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(name, "", "no such file") from None
    except OSError as exc:
        raise ConfigError(name, "", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(name, "", f"not UTF-8 text: {exc.reason}") from None
    # A byte order mark (which some Windows editors write) is not TOML; it is invisible in
    # the error tomllib gives, so it is dropped here rather than reported.
    text = text.removeprefix("\ufeff")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        line = int(m.group(1)) if m else None
        key, hint, line = _syntax_hint(text, reason, line)
        if key:
            raise ConfigError(name, key, hint, line) from None
        raise ConfigError(name, "", f"TOML syntax error: {reason}{hint}", line) from None
    return parse(data, name, text)


_DUP_TABLE = re.compile(r"Cannot declare \((.*)\) twice")


def _syntax_hint(text: str, reason: str, line: int | None) -> tuple[str, str, int | None]:
    """(dotted key, reason, line) for a duplicate key or table, else ("", the offending line's
    text, line)."""
    # tomllib may report a repeated key as "Cannot overwrite a value" at the *end of the
    # document* (no line, no key), so the key and its lines are found here by scanning the text.
    dup_table = _DUP_TABLE.search(reason)
    if dup_table:
        parts = [p.strip().strip("'\"") for p in dup_table.group(1).split(",") if p.strip()]
        name = ".".join(parts)
        return name, f"section [{name}] appears twice; merge the two into one", line
    if reason.startswith("Cannot overwrite a value"):
        seen: dict[str, int] = {}
        prefix = ""
        array_counts: dict[str, int] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            header = _HEADER.match(raw)
            if header:
                prefix = _norm_key(header.group(2))
                if header.group(1) == "[[":
                    # Each [[x]] block is a new table: its keys start afresh (as in locate_keys).
                    index = array_counts.get(prefix, -1) + 1
                    array_counts[prefix] = index
                    prefix = f"{prefix}[{index}]"
                continue
            key = _KEY.match(raw)
            if key and not raw.lstrip().startswith("#"):
                full = f"{prefix}.{_norm_key(key.group(1))}" if prefix else _norm_key(key.group(1))
                if full in seen:
                    return full, f"set twice (first on line {seen[full]}); keep one", number
                seen[full] = number
        return "", " (a key is set twice)", line
    lines = text.splitlines()
    if line and 0 < line <= len(lines) and lines[line - 1].strip():
        return "", f" in `{lines[line - 1].strip()}`", line
    return "", "", line


def with_overrides(cfg: Config, **proxy_overrides: Any) -> Config:
    """Apply command-line flags (which win over the file) to the proxy section."""
    from dataclasses import replace

    values = {k: v for k, v in proxy_overrides.items() if v is not None}
    return replace(cfg, proxy=replace(cfg.proxy, **values)) if values else cfg


def _register_builtin_sections() -> None:
    """Import the feature modules that own config sections, so they register themselves."""
    # Feature modules call register_section() at import; importing them here keeps the
    # config loader the single entry point. Missing modules simply contribute no section.
    import importlib

    for module in FEATURE_MODULES:
        importlib.import_module(module)


FEATURE_MODULES: list[str] = [
    "tproxy.cache.store",
    "tproxy.limits",
    "tproxy.control",
    "tproxy.metrics",
    "tproxy.shaping",
    "tproxy.filter",
]
