"""Prometheus ``/metrics`` on a management address, served from the daemon's event loop.

The figures are read at scrape time by a custom collector (server statistics plus every
component's ``status()``), inside one event-loop callback: a scrape is a consistent snapshot,
and no thread touches the daemon's state. prometheus-client's own HTTP server runs in a thread and
is not used; this module answers ``GET /metrics`` itself with ``generate_latest`` (or OpenMetrics
when the scraper asks for it in ``Accept``).

The endpoint must not be exposed to the LAN by accident: a wildcard address is refused when the
config is read, and an address that belongs to a LAN interface is refused at start (interface
addresses are only known then), both unless ``allow_lan = true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from tproxy import __version__
from tproxy.config import Config, ConfigError, Reader, register_section
from tproxy.uri import bracket

if TYPE_CHECKING:
    from tproxy.daemon import Daemon

log = logging.getLogger("tproxy.metrics")

DEFAULT_LISTEN = "127.0.0.1:9101"
PREFIX = "tproxy"
# A scrape request head is a few hundred bytes; anything much larger is not a scraper.
MAX_REQUEST_HEAD = 16 * 1024
# A client that does not send its request head in this time is dropped (Slowloris).
REQUEST_TIMEOUT = 10.0
# Nested component status dicts are flattened at most this deep.
MAX_STATUS_DEPTH = 4

Address = tuple[str, int]


# -- config ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    listen: tuple[Address, ...] = (("127.0.0.1", 9101),)
    # Serving metrics on an address of a LAN interface (or every address) needs this.
    allow_lan: bool = False


_HOSTPORT = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+)):(\d{1,5})$")


def parse_listen(text: str) -> Address:
    """``"127.0.0.1:9101"`` or ``"[::1]:9101"`` → (ip, port); ValueError with the reason."""
    m = _HOSTPORT.match(text.strip())
    if m is None:
        raise ValueError(f'not an address:port: {text!r} (use "127.0.0.1:9101" or "[::1]:9101")')
    host = m.group(1) or m.group(2)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP address: {host!r}") from None
    if m.group(1) is not None and addr.version != 6:
        raise ValueError(f"brackets are for IPv6 addresses: {text!r}")
    port = int(m.group(3))
    if not 1 <= port <= 65535:
        raise ValueError(f"not a TCP port: {port}")
    return str(addr), port


def parse_metrics(r: Reader) -> MetricsConfig:
    d = MetricsConfig()
    enabled = r.boolean("enabled", d.enabled)
    allow_lan = r.boolean("allow_lan", d.allow_lan)
    # One address as a string, or several as a list (an IPv4 and an IPv6 loopback, say).
    many = isinstance(r.data.get("listen"), list)
    texts = r.str_list("listen") if many else [r.string("listen", DEFAULT_LISTEN)]
    listen: list[Address] = []
    for index, text in enumerate(texts):
        key = f"listen[{index}]" if many else "listen"
        try:
            addr = parse_listen(text)
        except ValueError as exc:
            r.error(key, str(exc))
            continue
        if ipaddress.ip_address(addr[0]).is_unspecified and not allow_lan:
            r.error(
                key,
                f"{text} listens on every address, the LAN's included; use 127.0.0.1 or set "
                "metrics.allow_lan = true",
            )
            continue
        if addr in listen:
            r.error(key, f"{text} is listed twice")
            continue
        listen.append(addr)
    if enabled and not texts:
        r.error("listen", "no address to listen on (set metrics.enabled = false to turn off)")
    r.finish()
    return MetricsConfig(enabled=enabled, listen=tuple(listen) or d.listen, allow_lan=allow_lan)


register_section("metrics", parse_metrics)


def metrics_config(cfg: Config) -> MetricsConfig:
    return cfg.section("metrics", MetricsConfig)


def format_address(addr: Address) -> str:
    return f"{bracket(addr[0])}:{addr[1]}"


def lan_conflicts(
    listen: Sequence[Address], lan_addresses: Mapping[str, Iterable[str]]
) -> list[tuple[Address, str]]:
    """The listen addresses that belong to a LAN interface, with that interface's name."""
    owners: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    for ifname, addrs in lan_addresses.items():
        for a in addrs:
            owners.setdefault(ipaddress.ip_address(a), ifname)
    out: list[tuple[Address, str]] = []
    for addr in listen:
        ip = ipaddress.ip_address(addr[0])
        if ip in owners:
            out.append((addr, owners[ip]))
    return out


def interface_addresses(names: Sequence[str]) -> dict[str, list[str]]:
    """Addresses configured on the named interfaces now (missing interfaces are skipped)."""
    from pyroute2 import IPRoute

    out: dict[str, list[str]] = {}
    with IPRoute() as ipr:
        for name in names:
            index = ipr.link_lookup(ifname=name)
            if not index:
                continue
            out[name] = [
                str(a.get_attr("IFA_ADDRESS")).split("%", 1)[0]
                for a in ipr.get_addr(index=index[0])
                if a.get_attr("IFA_ADDRESS")
            ]
    return out


# -- figures -----------------------------------------------------------------------------------

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]+")


def metric_name(*parts: str) -> str:
    """Join parts into a valid Prometheus metric name (``[a-zA-Z_:][a-zA-Z0-9_:]*``)."""
    name = "_".join(p for p in (_NAME_BAD.sub("_", part).strip("_") for part in parts) if p)
    return name if name and not name[0].isdigit() else f"_{name}"


def flatten_status(status: Mapping[str, Any], depth: int = 0) -> Iterator[tuple[str, float]]:
    """Numeric leaves of a status dict as (``a_b_c``, value); strings and lists are skipped."""
    for key, value in status.items():
        if isinstance(value, bool):
            yield str(key), 1.0 if value else 0.0
        elif isinstance(value, (int, float)):
            yield str(key), float(value)
        elif isinstance(value, Mapping) and depth < MAX_STATUS_DEPTH:
            for sub, number in flatten_status(value, depth + 1):
                yield f"{key}_{sub}", number


# The daemon-wide figures of the status snapshot: (family, name, help, path in the snapshot).
SERVER_FIGURES: tuple[tuple[type[GaugeMetricFamily] | type[CounterMetricFamily], str, str,
                            tuple[str, ...]], ...] = (
    (GaugeMetricFamily, "connections_active", "Client connections open now",
     ("connections", "active")),
    (CounterMetricFamily, "connections", "Client connections accepted", ("connections", "total")),
    (CounterMetricFamily, "requests", "HTTP requests completed (access log lines)",
     ("requests", "total")),
    (CounterMetricFamily, "bad_requests", "Requests refused as malformed (400 and similar)",
     ("bad_requests",)),
    (CounterMetricFamily, "spliced_bodies", "Response bodies relayed in the kernel (splice)",
     ("spliced_bodies",)),
    (CounterMetricFamily, "spliced_bytes", "Response body bytes relayed in the kernel",
     ("bytes", "spliced")),
    (CounterMetricFamily, "upstream_connects", "Upstream connections opened",
     ("upstream", "connects")),
    (CounterMetricFamily, "upstream_errors", "Upstream connections that failed",
     ("upstream", "errors")),
    (GaugeMetricFamily, "upstream_pool_idle", "Idle upstream connections kept for reuse",
     ("upstream", "pool_idle")),
    (GaugeMetricFamily, "overloaded", "1 while the daemon sheds load", ("overloaded",)),
    (GaugeMetricFamily, "draining", "1 while the daemon drains before exit", ("draining",)),
)  # fmt: skip


class TproxyCollector(Collector):
    """Reads the daemon's figures at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        from tproxy.control import snapshot

        snap = snapshot(self.daemon, None)
        info = InfoMetricFamily(PREFIX, "tproxy build and configuration")
        info.add_metric([], {"version": __version__, "config": str(snap["config"])})
        yield info
        yield GaugeMetricFamily(
            f"{PREFIX}_start_time_seconds", "Daemon start, seconds since the epoch", snap["started"]
        )
        for kind, name, help_text, path in SERVER_FIGURES:
            value: Any = snap
            for part in path:
                value = value[part]
            yield kind(f"{PREFIX}_{name}", help_text, int(value))
        traffic = CounterMetricFamily(
            f"{PREFIX}_client_bytes", "Bytes on client connections", labels=["direction"]
        )
        traffic.add_metric(["received"], snap["bytes"]["in"])
        traffic.add_metric(["sent"], snap["bytes"]["out"])
        yield traffic
        limits = snap.get("limits", {})
        refused = CounterMetricFamily(
            f"{PREFIX}_limits_refused",
            "Connections and requests refused by the per-client limits and the ceiling",
            labels=["kind"],
        )
        for kind, count in sorted(limits.get("refused", {}).items()):
            refused.add_metric([kind], count)
        yield refused
        yield GaugeMetricFamily(
            f"{PREFIX}_limits_active_clients", "Clients with connections",
            limits.get("active_clients", 0),
        )  # fmt: skip
        seen: set[str] = set()
        for comp in self.daemon.components:
            # A component may publish its own families (labels, histograms) instead of a
            # flattened status.
            own = getattr(comp, "metrics", None)
            if callable(own):
                yield from own()
                continue
            status = snap["components"].get(comp.name)
            if not isinstance(status, Mapping):
                continue
            counters = frozenset(getattr(comp, "metric_counters", ()))
            yield from component_families(comp.name, status, seen, counters)


def component_families(
    component: str,
    status: Mapping[str, Any],
    seen: set[str],
    counters: Collection[str] = frozenset(),
) -> Iterator[Metric]:
    """``tproxy_<component>_<key>`` per numeric leaf of a component's status.

    A counter when the (flattened) key ends in ``_total`` (OpenMetrics' counter suffix) or is
    listed in the component's ``metric_counters``; otherwise a gauge.
    """
    for key, value in flatten_status(status):
        name = metric_name(PREFIX, component, key)
        counter = name.endswith("_total") or key in counters
        if name.endswith("_total"):
            name = name[: -len("_total")]
        if name in seen:
            continue
        seen.add(name)
        doc = f"{component} status: {key}"
        if counter:
            yield CounterMetricFamily(name, doc, value)
        else:
            yield GaugeMetricFamily(name, doc, value)


# -- HTTP --------------------------------------------------------------------------------------


def http_response(status: str, content_type: str, body: bytes, head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + (b"" if head_only else body)


def answer(registry: CollectorRegistry, head: bytes) -> bytes:
    """The whole response to one request head (pure apart from reading the registry)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return http_response("400 Bad Request", "text/plain", b"bad request\n")
    method, target = parts[0], parts[1]
    path = target.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return http_response("405 Method Not Allowed", "text/plain", b"GET /metrics\n")
    if path == "/":
        body = b"tproxy metrics: GET /metrics\n"
        return http_response("200 OK", "text/plain; charset=utf-8", body, method == "HEAD")
    if path != "/metrics":
        return http_response("404 Not Found", "text/plain", b"not found; try /metrics\n")
    accept = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    encoder, content_type = choose_encoder(accept)
    return http_response("200 OK", content_type, encoder(registry), method == "HEAD")


# -- the component -----------------------------------------------------------------------------


class Metrics:
    name = "metrics"

    metric_counters = ("scrapes",)

    def __init__(self, cfg: MetricsConfig) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry(auto_describe=False)
        self.servers: dict[Address, asyncio.AbstractServer] = {}
        self.clients: set[asyncio.Task[Any]] = set()
        self.scrapes = 0
        self.collector: TproxyCollector | None = None
        # process_* (CPU, memory, fds) and python_info: what an admin graphs next to ours.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def rules_extras(self, cfg: Config) -> dict[str, Any]:
        return {}

    def status(self) -> dict[str, Any]:
        return {"listen": [format_address(a) for a in self.servers], "scrapes": self.scrapes}

    async def start(self, daemon: Daemon) -> None:
        if self.collector is None:
            self.collector = TproxyCollector(daemon)
            self.registry.register(self.collector)
        if self.cfg.enabled:
            await self._check_lan(daemon.cfg, self.cfg)
            await self._bind(daemon.cfg.path, self.cfg.listen)

    async def reload(self, daemon: Daemon, cfg: Config) -> None:
        new = metrics_config(cfg)
        want = new.listen if new.enabled else ()
        if new.enabled:
            await self._check_lan(cfg, new)
        added = [a for a in want if a not in self.servers]
        await self._bind(cfg.path, added)  # may refuse: nothing old is closed yet
        for addr in [a for a in self.servers if a not in want]:
            self.servers.pop(addr).close()
            log.info("metrics: no longer listening on %s", format_address(addr))
        self.cfg = new

    async def stop(self, daemon: Daemon) -> None:
        for srv in self.servers.values():
            srv.close()
        self.servers.clear()
        for task in list(self.clients):
            task.cancel()
        if self.clients:
            await asyncio.gather(*self.clients, return_exceptions=True)
        if self.collector is not None:
            with contextlib.suppress(KeyError):
                self.registry.unregister(self.collector)
            self.collector = None

    async def _check_lan(self, cfg: Config, mcfg: MetricsConfig) -> None:
        if mcfg.allow_lan:
            return
        lan = cfg.proxy.lan_interfaces
        addresses = await asyncio.to_thread(interface_addresses, lan)
        for addr, ifname in lan_conflicts(mcfg.listen, addresses):
            raise ConfigError(
                cfg.path,
                "metrics.listen",
                f"{format_address(addr)} is an address of LAN interface {ifname}; "
                "metrics stay off the LAN unless metrics.allow_lan = true",
            )

    async def _bind(self, cfg_path: str, addrs: Sequence[Address]) -> None:
        new: dict[Address, asyncio.AbstractServer] = {}
        try:
            for addr in addrs:
                try:
                    new[addr] = await asyncio.start_server(
                        self._client, addr[0], addr[1], reuse_address=True,
                        limit=MAX_REQUEST_HEAD,
                    )  # fmt: skip
                except OSError as exc:
                    reason = exc.strerror or repr(exc)
                    raise ConfigError(
                        cfg_path,
                        "metrics.listen",
                        f"cannot listen on {format_address(addr)}: {reason}",
                    ) from None
        except ConfigError:
            for srv in new.values():
                srv.close()
            raise
        for addr in new:
            log.info("metrics on http://%s/metrics", format_address(addr))
        self.servers.update(new)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.clients.add(task)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except asyncio.LimitOverrunError:
                writer.write(
                    http_response("431 Request Header Fields Too Large", "text/plain", b"")
                )
                await writer.drain()
                return
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            self.scrapes += 1
            try:
                response = answer(self.registry, head)
            except Exception:  # a collector bug answers 500; the daemon goes on
                log.exception("metrics: collecting failed")
                response = http_response("500 Internal Server Error", "text/plain", b"error\n")
            writer.write(response)
            await writer.drain()
        except ConnectionError:
            return
        finally:
            if task is not None:
                self.clients.discard(task)
            writer.close()


def create(cfg: Config) -> Metrics:
    """Component factory (tproxy.component.COMPONENTS)."""
    return Metrics(metrics_config(cfg))
