"""Connection and request limits: who may open how many connections, how fast. Pure, no I/O.

The shell asks a :class:`Limiter` at three points — a connection was accepted
(:meth:`Limiter.on_accept`), closed (:meth:`Limiter.on_close`), a request head arrived
(:meth:`Limiter.on_request`) — and acts on the :class:`Refusal` it gets back. The clock is an
argument (``time.monotonic()`` in the shell), so tests drive time by hand.

What is limited, and why here and not only in the kernel:

* A **daemon ceiling** (``max_connections``): file descriptors and per-connection memory are
  finite; above the ceiling, new connections are refused at once (reset) so the daemon keeps
  serving the ones it has instead of degrading for everybody.
* **Per-client concurrency** (``per_client_connections``): one busy or hostile host cannot take
  the whole ceiling.
* **Per-client new-connection rate** and **request rate**: token buckets (rate, burst). A burst
  of page loads passes; a sustained flood is refused. Connection refusals become a reset (we do
  not read or answer: that would be the work we refuse to do); request refusals become
  ``429 Too Many Requests`` with ``Retry-After`` (RFC 6585 §4, RFC 9110 §10.2.3).

A "client" is an IPv4 address, or an IPv6 prefix (``ipv6_prefix``, default /128: one address).
On a LAN segment every host's addresses lie in the segment's one /64 (SLAAC, RFC 4862), so
counting per /64 would make all of a segment's IPv6 clients one client, sharing one budget. A
host can take several addresses of that /64 (temporary addresses, RFC 8981) and so several
budgets; the daemon's ceiling still holds, and ``ipv6_prefix`` can be narrowed where each host
has a prefix of its own (e.g. /64 per host from DHCPv6-PD).

Memory stays bounded under a flood from many sources. TCP limits what a spoofed source can do —
only a completed handshake reaches ``accept()``, and SYN floods are the kernel's business
(syncookies) — but one IPv6 attacker with a /48 still has 65,536 /64s. So: a client's entry is
dropped once it has no connections and its buckets are full again (then forgetting it changes
nothing), and the table holds at most ``max_clients`` entries. When it is full, the entry idle
for longest is forgotten early (that client's next connection finds full buckets: a bounded
leniency, never a refusal of an innocent client). Entries with open connections are never
evicted; since each holds at least one of the ``max_connections`` connections, the table can
only be full of them if ``max_clients < max_connections``, which the config rejects.

Exemptions (``exempt``, CIDRs): clients inside them pass every per-client limit, as hosts a
Squid admin lists in an ACL before ``maxconn``/delay pools (the office server, a monitoring
box, a NATed lab behind one address). They still count toward the daemon ceiling, which
protects the daemon, not fairness. An IPv6 entry must cover whole ``/ipv6_prefix`` groups:
limits count per group, so one address inside a group cannot be exempt alone.

Logging: :meth:`Limiter.should_log` says yes once per client, per kind of refusal, per
``log_interval``, so a flood produces one log line per interval and not one per connection.

Cost: every call is O(1) amortised (dict lookups, two float operations per bucket; expiry pops
from the front of an ordered dict). Measured about 1 µs per call (see tests/test_limits.py).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import math
import socket
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from tproxy.config import IPNetwork, Reader, register_section

__all__ = [
    "DEFAULT_IPV6_PREFIX",
    "DEFAULT_LOG_INTERVAL",
    "DEFAULT_MAX_CLIENTS",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_PER_CLIENT_CONNECTIONS",
    "Kind",
    "Limiter",
    "LimitsConfig",
    "LogThrottle",
    "Refusal",
    "TokenBucket",
    "client_key",
    "is_exempt",
    "parse_limits",
]

# -- defaults (named so the README and the tests quote the same numbers) ------------------------

#: Daemon-wide ceiling on client connections. Each costs two sockets (client + upstream), so
#: 20,000 needs a LimitNOFILE of at least 40,000 plus listeners and the cache's files.
DEFAULT_MAX_CONNECTIONS = 20_000
#: Simultaneous connections per client. Browsers open 6 per origin (and a page talks to tens of
#: origins); a NATed household or a download manager needs more; 256 leaves room for both.
DEFAULT_PER_CLIENT_CONNECTIONS = 256
#: New connections per second per client, sustained, and the burst allowed above that.
DEFAULT_NEW_PER_SECOND = 100.0
DEFAULT_NEW_BURST = 200
#: Requests per second per client, sustained, and the burst.
DEFAULT_REQUESTS_PER_SECOND = 200.0
DEFAULT_REQUESTS_BURST = 400
#: Limits hold per IPv6 address: the hosts of a LAN segment share its /64 (see the module doc).
DEFAULT_IPV6_PREFIX = 128
#: At most one log line per client and kind of refusal per this many seconds.
DEFAULT_LOG_INTERVAL = 60.0
#: Most clients tracked at once (about 300 bytes each: 65,536 entries ≈ 20 MB at worst).
DEFAULT_MAX_CLIENTS = 65_536
#: Retry-After for refusals that no bucket can predict (concurrency, ceiling), in seconds.
RETRY_AFTER_BUSY = 1
#: Bounded cache of IPv6 address → prefix key (prefix formatting costs ~3 µs; a hit ~0.1 µs).
KEY_CACHE_SIZE = 4096
#: The key under which daemon-wide refusals (the ceiling) are throttled in the log.
DAEMON_KEY = "*"
#: Most (key, kind) pairs a :class:`LogThrottle` remembers; the oldest is forgotten beyond it
#: (which can only let one more line through for it, never hold back a first one).
THROTTLE_KEYS = 65_536


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LimitsConfig:
    # false turns the per-client limits off; the daemon ceiling always holds (it protects the
    # daemon's file descriptors and memory, not fairness between clients).
    enabled: bool = True
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # 0 disables a per-client limit.
    per_client_connections: int = DEFAULT_PER_CLIENT_CONNECTIONS
    per_client_new_per_second: float = DEFAULT_NEW_PER_SECOND
    per_client_new_burst: int = DEFAULT_NEW_BURST
    per_client_requests_per_second: float = DEFAULT_REQUESTS_PER_SECOND
    per_client_requests_burst: int = DEFAULT_REQUESTS_BURST
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX
    log_interval: float = DEFAULT_LOG_INTERVAL
    max_clients: int = DEFAULT_MAX_CLIENTS
    # Clients not held to the per-client limits (the ceiling still counts them).
    exempt: tuple[IPNetwork, ...] = ()


def parse_limits(r: Reader) -> LimitsConfig:
    d = LimitsConfig()
    cfg = LimitsConfig(
        enabled=r.boolean("enabled", d.enabled),
        max_connections=r.integer("max_connections", d.max_connections, 1),
        per_client_connections=r.integer("per_client_connections", d.per_client_connections, 0),
        per_client_new_per_second=r.number(
            "per_client_new_per_second", d.per_client_new_per_second, 0.0
        ),
        per_client_new_burst=r.integer("per_client_new_burst", d.per_client_new_burst, 1),
        per_client_requests_per_second=r.number(
            "per_client_requests_per_second", d.per_client_requests_per_second, 0.0
        ),
        per_client_requests_burst=r.integer(
            "per_client_requests_burst", d.per_client_requests_burst, 1
        ),
        ipv6_prefix=r.integer("ipv6_prefix", d.ipv6_prefix, 1, 128),
        log_interval=r.duration("log_interval", d.log_interval),
        max_clients=r.integer("max_clients", d.max_clients, 1),
        exempt=r.networks("exempt"),
    )
    for index, net in enumerate(cfg.exempt):
        if net.version == 6 and net.prefixlen > cfg.ipv6_prefix:
            r.error(
                f"exempt[{index}]",
                f"{net} is narrower than the /{cfg.ipv6_prefix} IPv6 clients are counted by"
                f" (ipv6_prefix): exempt the whole /{cfg.ipv6_prefix} or raise ipv6_prefix",
            )
    if cfg.max_clients < cfg.max_connections:
        # Every client with an open connection must fit in the table (see module docstring).
        r.error(
            "max_clients",
            f"{cfg.max_clients} is smaller than max_connections {cfg.max_connections}",
        )
    r.finish()
    return cfg


register_section("limits", parse_limits)


# -- client keys ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=KEY_CACHE_SIZE)
def _v6_key(ip: str, prefix: int) -> str:
    try:
        packed = socket.inet_pton(socket.AF_INET6, ip)
    except (OSError, ValueError):
        return ip  # not an address (a test or an odd transport): its own key
    if packed[:12] == b"\0" * 10 + b"\xff\xff":
        # IPv4-mapped (RFC 4291 §2.5.5.2): the same host as the plain IPv4 address.
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    if prefix >= 128:
        return str(ipaddress.IPv6Address(packed))
    value = int.from_bytes(packed, "big") >> (128 - prefix) << (128 - prefix)
    return f"{ipaddress.IPv6Address(value)}/{prefix}"


def client_key(ip: str, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> str:
    """The unit limits apply to: the IPv4 address itself, or the IPv6 ``/prefix``."""
    if ":" not in ip:
        return ip
    pct = ip.find("%")
    if pct >= 0:
        ip = ip[:pct]  # a zone index (fe80::1%eth0) names the link, not the host
    return _v6_key(ip, ipv6_prefix)


# -- token bucket -----------------------------------------------------------------------------


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; each admitted event takes one.

    Refilled lazily from the time of the last call, so an idle bucket costs nothing.
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> float:
        elapsed = now - self.stamp
        if elapsed > 0:  # a clock that steps back must not drain the bucket
            tokens = self.tokens + elapsed * self.rate
            self.tokens = tokens if tokens < self.burst else self.burst
            self.stamp = now
        return self.tokens

    def take(self, now: float) -> float:
        """Take a token: 0.0 on success, else the seconds until one is available."""
        tokens = self._refill(now)
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        return (1.0 - tokens) / self.rate

    def full_at(self) -> float:
        """The time at which the bucket is full again if nothing takes from it."""
        return self.stamp + (self.burst - self.tokens) / self.rate

    def reconfigure(self, rate: float, burst: float, now: float) -> None:
        self._refill(now)
        self.rate = rate
        self.burst = burst
        if self.tokens > burst:
            self.tokens = burst


# -- refusals ---------------------------------------------------------------------------------


class Kind(enum.StrEnum):
    """Why something was refused; also the key of :meth:`Limiter.stats` ``refused``."""

    CEILING = "ceiling"  # daemon-wide max_connections
    CONNECTIONS = "connections"  # per_client_connections
    CONNECT_RATE = "connect_rate"  # per_client_new_per_second
    REQUEST_RATE = "request_rate"  # per_client_requests_per_second


@dataclass(frozen=True, slots=True)
class Refusal:
    kind: Kind
    #: The HTTP status if answered over HTTP (429 per client, RFC 6585 §4; 503 for the daemon,
    #: RFC 9110 §15.6.4), and the status an access-log or metrics line records.
    status: int
    #: Seconds for the Retry-After field (RFC 9110 §10.2.3), at least 1.
    retry_after: int
    reason: str


def _refusal(kind: Kind, retry_after: int) -> Refusal:
    return _REFUSALS.get((kind, retry_after)) or Refusal(
        kind, 503 if kind is Kind.CEILING else 429, retry_after, _REASONS[kind]
    )


_REASONS = {
    Kind.CEILING: "the proxy is at its connection limit",
    Kind.CONNECTIONS: "too many simultaneous connections from this client",
    Kind.CONNECT_RATE: "too many new connections per second from this client",
    Kind.REQUEST_RATE: "too many requests per second from this client",
}
# Refusals are immutable: share them instead of allocating one per refused packet of a flood.
_REFUSALS = {
    (k, s): Refusal(k, 503 if k is Kind.CEILING else 429, s, _REASONS[k])
    for k in Kind
    for s in range(1, 61)
}


# -- log throttling ---------------------------------------------------------------------------


class LogThrottle:
    """At most one log line per key per ``interval``; the lines held back are counted.

    For the daemon's per-connection diagnostics (a malformed request, a failed connect, an
    origin's bad response): each is worth a line, but one client repeating it must not write a
    line per connection — that fills the disk or the journal, whose rate limit (journald's
    RateLimitBurst) then drops the daemon's *other* messages too.
    """

    __slots__ = ("_held", "_last", "interval", "max_keys")

    def __init__(self, interval: float, max_keys: int = THROTTLE_KEYS) -> None:
        self.interval = interval
        self.max_keys = max_keys
        # key -> time of its last line, oldest first (insertion = time order, see allow()).
        self._last: OrderedDict[Any, float] = OrderedDict()
        self._held: dict[Any, int] = {}

    def allow(self, key: Any, now: float) -> int | None:
        """None: stay quiet about ``key`` now; else log, mentioning the returned number of
        lines held back since the last one."""
        last = self._last
        while last:  # forget keys whose interval is over (front = oldest)
            first, stamp = next(iter(last.items()))
            if stamp + self.interval > now and len(last) < self.max_keys:
                break
            del last[first]
        if key in last:
            held = self._held
            if key not in held and len(held) >= self.max_keys:
                held.clear()  # bounded: only the "N held back" remarks are lost
            held[key] = held.get(key, 0) + 1
            return None
        last[key] = now
        return self._held.pop(key, 0)

    def __len__(self) -> int:
        """How many keys are remembered (at most ``max_keys``)."""
        return len(self._last)


# -- the limiter ------------------------------------------------------------------------------


class _Client:
    __slots__ = ("conns", "exempt", "new", "requests")

    def __init__(
        self, new: TokenBucket | None, requests: TokenBucket | None, exempt: bool = False
    ) -> None:
        self.conns = 0
        self.new = new
        self.requests = requests
        self.exempt = exempt


def _key_network(key: str) -> IPNetwork | None:
    """The addresses a client key stands for: ``10.0.0.5``, ``2001:db8::/64`` (or None)."""
    try:
        return ipaddress.ip_network(key)
    except ValueError:
        return None  # not an address (a test or an odd transport)


def is_exempt(key: str, exempt: tuple[IPNetwork, ...]) -> bool:
    """Whether every address of the client ``key`` lies inside one of the ``exempt`` CIDRs."""
    if not exempt:
        return False
    net = _key_network(key)
    if net is None:
        return False
    return any(net.version == e.version and net.subnet_of(e) for e in exempt)  # type: ignore[arg-type]


class Limiter:
    """Per-client and daemon-wide admission state (one per daemon)."""

    def __init__(self, cfg: LimitsConfig | None = None) -> None:
        self.cfg = cfg or LimitsConfig()
        self._clients: dict[str, _Client] = {}
        # Clients without connections, in the order they became idle: the expiry queue.
        self._idle: OrderedDict[str, float] = OrderedDict()
        # Refusal log lines, once per (key, kind) per log_interval (set by _apply).
        self._logged = LogThrottle(0.0)
        self._refused = dict.fromkeys(Kind, 0)
        self._now = 0.0
        self.active = 0  # connections counted by on_accept and not yet by on_close
        self.active_clients = 0  # clients with at least one connection
        self.evicted = 0  # idle entries forgotten early because the table was full
        self._apply(self.cfg)

    # -- configuration --------------------------------------------------------------------

    def _apply(self, cfg: LimitsConfig) -> None:
        self.cfg = cfg
        self._max = cfg.max_connections
        self._logged.interval = cfg.log_interval
        self._logged.max_keys = cfg.max_clients
        self._per_client = cfg.per_client_connections if cfg.enabled else 0
        self._new_rate = cfg.per_client_new_per_second if cfg.enabled else 0.0
        self._req_rate = cfg.per_client_requests_per_second if cfg.enabled else 0.0
        #: Whether :meth:`on_request` can refuse anything below the ceiling: without a request
        #: rate (limits off, or the rate 0) the shell skips the call while ``active`` is at most
        #: ``ceiling`` (the fast path of :meth:`tproxy.server.Server.limit_request`).
        self.limits_requests = bool(self._req_rate)
        self.ceiling = cfg.max_connections
        # An idle client's buckets are certainly full this long after its last call.
        fill = 0.0
        if self._new_rate:
            fill = max(fill, cfg.per_client_new_burst / self._new_rate)
        if self._req_rate:
            fill = max(fill, cfg.per_client_requests_burst / self._req_rate)
        self._retention = fill

    def reconfigure(self, cfg: LimitsConfig, now: float) -> None:
        """Adopt a reloaded config, keeping connection counts and bucket levels.

        Lowering ``max_connections`` below the current count does not close anything; the
        next request on a surplus connection is refused with 503 (see :meth:`on_request`).
        """
        self._apply(cfg)
        for key, client in self._clients.items():
            client.exempt = is_exempt(key, cfg.exempt)
            new_rate = 0.0 if client.exempt else self._new_rate
            req_rate = 0.0 if client.exempt else self._req_rate
            client.new = self._rebucket(client.new, new_rate, cfg.per_client_new_burst, now)
            client.requests = self._rebucket(
                client.requests, req_rate, cfg.per_client_requests_burst, now
            )

    @staticmethod
    def _rebucket(
        bucket: TokenBucket | None, rate: float, burst: int, now: float
    ) -> TokenBucket | None:
        if not rate:
            return None
        if bucket is None:
            return TokenBucket(rate, burst, now)
        bucket.reconfigure(rate, burst, now)
        return bucket

    def client_key(self, ip: str) -> str:
        """The IPv4 address, or the IPv6 address's ``/ipv6_prefix`` (see :func:`client_key`)."""
        return client_key(ip, self.cfg.ipv6_prefix)

    # -- the three calls ------------------------------------------------------------------

    def on_accept(self, key: str, now: float) -> Refusal | None:
        """A connection from ``key`` was accepted: None admits (and counts) it."""
        self._now = now
        if self._idle:
            self._expire(now)
        if self.active >= self._max:
            return self._refuse(Kind.CEILING, RETRY_AFTER_BUSY)
        client = self._clients.get(key)
        if client is None:
            client = self._new_client(key, now)
        else:
            if self._per_client and client.conns >= self._per_client and not client.exempt:
                return self._refuse(Kind.CONNECTIONS, RETRY_AFTER_BUSY)
            bucket = client.new
            if bucket is not None:
                wait = bucket.take(now)
                if wait:
                    return self._refuse(Kind.CONNECT_RATE, math.ceil(wait))
            if client.conns == 0:
                self._idle.pop(key, None)
        if client.conns == 0:
            self.active_clients += 1
        client.conns += 1
        self.active += 1
        return None

    def on_close(self, key: str, now: float | None = None) -> None:
        """A connection admitted by :meth:`on_accept` ended (call exactly once per admission)."""
        client = self._clients.get(key)
        if client is None or client.conns == 0:
            return  # not admitted (or closed twice): nothing was counted
        client.conns -= 1
        self.active -= 1
        if client.conns == 0:
            self.active_clients -= 1
            # Buckets only change inside calls, so they are full by the latest time we know
            # plus the retention — with or without ``now``.
            stamp = self._now if now is None else max(now, self._now)
            self._idle[key] = stamp

    def on_request(self, key: str, now: float) -> Refusal | None:
        """A request head arrived on one of ``key``'s admitted connections."""
        self._now = now
        if self.active > self._max:
            # Only after a reload lowered the ceiling: shed surplus connections one by one.
            return self._refuse(Kind.CEILING, RETRY_AFTER_BUSY)
        client = self._clients.get(key)
        if client is None:
            return None
        bucket = client.requests
        if bucket is None:
            return None
        wait = bucket.take(now)
        if wait:
            return self._refuse(Kind.REQUEST_RATE, math.ceil(wait))
        return None

    def should_log(self, key: str, kind: Kind, now: float) -> bool:
        """True for the first refusal of ``kind`` for ``key`` in each ``log_interval``.

        The ceiling is the daemon's state, not a client's: it is throttled as one key, so a
        flood from many clients at the ceiling still logs one line per interval.
        """
        if kind is Kind.CEILING:
            key = DAEMON_KEY
        return self._logged.allow((key, kind), now) is not None

    # -- introspection --------------------------------------------------------------------

    @property
    def overloaded(self) -> bool:
        """At (or, after a reload lowered it, above) the daemon ceiling: new connections are
        being refused."""
        return self.active >= self._max

    def stats(self) -> dict[str, Any]:
        """Figures for ``tproxy status`` and the metrics endpoint."""
        return {
            "active_connections": self.active,
            "active_clients": self.active_clients,
            "tracked_clients": len(self._clients),
            "max_connections": self._max,
            "at_ceiling": self.overloaded,
            "evicted_clients": self.evicted,
            "refused": {kind.value: n for kind, n in self._refused.items()},
        }

    def connections_of(self, key: str) -> int:
        client = self._clients.get(key)
        return client.conns if client is not None else 0

    def __len__(self) -> int:
        """Clients tracked (with connections, or idle with buckets still refilling)."""
        return len(self._clients)

    # -- internals ------------------------------------------------------------------------

    def _refuse(self, kind: Kind, retry_after: int) -> Refusal:
        self._refused[kind] += 1
        return _refusal(kind, max(1, retry_after))

    def _new_client(self, key: str, now: float) -> _Client:
        if len(self._clients) >= self.cfg.max_clients and self._idle:
            # Full of idle clients still refilling: forget the one idle longest (it gets
            # full buckets on its next connection — lenient, never unfair).
            old, _ = self._idle.popitem(last=False)
            del self._clients[old]
            self.evicted += 1
        cfg = self.cfg
        # Decided once per entry (an address parse), not per call: exempt clients simply have
        # no buckets and skip the concurrency test.
        exempt = is_exempt(key, cfg.exempt)
        new_rate = 0.0 if exempt else self._new_rate
        req_rate = 0.0 if exempt else self._req_rate
        new = TokenBucket(new_rate, cfg.per_client_new_burst, now) if new_rate else None
        req = TokenBucket(req_rate, cfg.per_client_requests_burst, now) if req_rate else None
        client = _Client(new, req, exempt)
        if new is not None:
            new.take(now)  # this connection's token; a fresh bucket always has one
        self._clients[key] = client
        return client

    def _expire(self, now: float) -> None:
        """Drop idle clients whose buckets are full again (the queue is in idle-time order and
        the retention is the same for all, so expired entries are always at the front)."""
        idle = self._idle
        clients = self._clients
        horizon = now - self._retention
        while idle:
            key, since = next(iter(idle.items()))
            if since > horizon:
                break
            del idle[key]
            del clients[key]
