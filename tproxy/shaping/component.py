"""The shaping component: puts every proxied flow into its HTB class while the daemon runs.

What it does, in the daemon's order:

* ``rules_extras``: the CLASSIFY rules (mangle POSTROUTING) that map socket marks to HTB classes
  on the LAN interfaces (downloads) and on ``shaping.wan_interfaces`` (uploads).
* ``start``: applies the HTB plan (pyroute2, in a worker thread: pyroute2 runs its own asyncio
  loop and cannot run inside ours) and registers the HTTP hooks — only while shaping is active
  (a plan with interfaces, applied); ``reload`` adds or removes them as it turns shaping on or
  off, so with shaping off a request costs nothing here.
* the request hook chooses the class from the request head (client group, time window, host,
  URL) and keeps it in ``ex.notes``; the upstream socket gets the mark when it is bound to the
  exchange (uploads); the client-facing socket gets it when the origin's response head arrives,
  where the class is chosen again with the content type and the size (downloads).
* ``reload``: changes the HTB classes in place (running transfers keep their sockets and
  queues) and re-marks the sockets of exchanges in flight by class name.
* ``stop``: removes the qdiscs.

Marks apply to packets sent after the change: the kernel copies ``sk_mark`` into each packet
when it is transmitted (``__ip_queue_xmit`` in net/ipv4/ip_output.c, ``ip6_xmit`` for IPv6), so
re-marking a socket in the middle of a response moves the rest of it, including bytes already
queued in the socket, to the new class.

Cache hits are sent unshaped (``hits_unshaped``, the default): until the origin answers, the
client socket carries :data:`~tproxy.shaping.model.UNSHAPED_MARK`, so a response the daemon
produces itself (a cache hit, a block page) never waits in a class. A hit is recognised by
``ex.result`` (``TCP_HIT``, ``TCP_MEM_HIT``, ...) or ``ex.notes["cache"] == "hit"`` when the
response hooks run for it.

HTTPS flows are not proxied; the NFQUEUE handler asks :meth:`ShapingComponent.sni_class` for
the mark of a flow from its client address and SNI, and the connmark carries it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
import weakref
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tproxy import http1
from tproxy.config import Config, ConfigError
from tproxy.netfilter import ClassifyRule
from tproxy.netutil import unsent_bytes
from tproxy.shaping.model import (
    UNSHAPED_CLASSID,
    UNSHAPED_MARK,
    ClassCounters,
    FlowFacts,
    ShapingConfig,
    ShapingPlan,
    build_plan,
    class_rows,
    classify_rules,
    mark_for,
    select_class,
)
from tproxy.uri import media_type, normalize_host, split_url

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from tproxy.daemon import Daemon
    from tproxy.httpconn import ClientConnection, Exchange, Upstream
    from tproxy.server import Server

log = logging.getLogger("tproxy.shaping")

NAME = "shaping"
# ex.notes keys: our per-exchange state, and the mark an upstream socket should carry (read by
# the server when it opens or binds the upstream connection, if it supports that).
NOTE = "shaping"
NOTE_UPSTREAM_MARK = "upstream_mark"
# ex.result values of responses served from the cache (Squid's result codes).
HIT_RESULTS = frozenset(
    {"TCP_HIT", "TCP_MEM_HIT", "TCP_IMS_HIT", "TCP_REFRESH_UNMODIFIED", "TCP_REFRESH_FAIL_OLD"}
)
# Kernel counters are read this often for status() (pyroute2 cannot be called from the loop).
COUNTER_INTERVAL = 5.0

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class FlowState:
    """One exchange's shaping state, kept in ``ex.notes[NOTE]``."""

    facts: FlowFacts
    class_name: str | None
    mark: int  # what the flow's sockets carry (or will, once bound)
    reclassified: bool = False


@dataclass(frozen=True)
class Clients:
    """Client groups and time windows, from the ``[filter]`` section when there is one.

    A client is in every group one of whose CIDRs contains its address (MAC addresses are not
    known to the proxy at request time and are not used here); a client in no group is in
    ``"default"``, as in the filter.
    """

    groups: tuple[tuple[str, tuple[IPNet, ...]], ...] = ()
    windows: tuple[Any, ...] = ()  # tproxy.filter.model.WindowConfig

    @classmethod
    def from_config(cls, cfg: Config) -> Clients:
        filt = cfg.sections.get("filter")
        if filt is None:
            return cls()
        groups = tuple((g.name, tuple(g.cidrs)) for g in getattr(filt, "groups", ()))
        return cls(groups, tuple(getattr(filt, "windows", ())))

    def groups_of(self, client_ip: str) -> frozenset[str]:
        try:
            addr: IPAddr = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            return frozenset()
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
        found = frozenset(
            name
            for name, nets in self.groups
            if any(addr.version == n.version and addr in n for n in nets)
        )
        return found or frozenset({"default"})

    def active_windows(self, now: datetime | None = None) -> frozenset[str]:
        if not self.windows:
            return frozenset()
        t = (now or datetime.now()).astimezone()
        minute = t.hour * 60 + t.minute
        return frozenset(w.name for w in self.windows if w.active(t.weekday(), minute))


# -- pure helpers -----------------------------------------------------------------------------


def shaping_config(cfg: Config) -> ShapingConfig:
    return cfg.section(NAME, ShapingConfig)


def interfaces(cfg: Config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(LAN, WAN) interfaces that get an HTB tree; a WAN name also listed as LAN is LAN."""
    lan = tuple(dict.fromkeys(i for i in cfg.proxy.lan_interfaces if not i.endswith("+")))
    wan = tuple(i for i in dict.fromkeys(shaping_config(cfg).wan_interfaces) if i not in lan)
    return lan, wan


def plan_for(cfg: Config) -> ShapingPlan:
    lan, wan = interfaces(cfg)
    return build_plan(shaping_config(cfg), lan, wan)


def classify_for(plan: ShapingPlan) -> tuple[ClassifyRule, ...]:
    """The plan's CLASSIFY rules in the netfilter module's terms."""
    out: list[ClassifyRule] = []
    for mark, mask, iface, classid in classify_rules(plan):
        major, _, minor = classid.partition(":")
        out.append(ClassifyRule(mark, iface, int(major, 16), int(minor, 16), mask))
    return tuple(out)


def request_facts(
    url: str, host_header: bytes | None, client_ip: str, clients: Clients
) -> FlowFacts:
    host = split_url(url)[1]
    if not host and host_header:
        host = normalize_host(host_header.decode("latin-1"))
    return FlowFacts(
        host=host,
        url=url,
        groups=clients.groups_of(client_ip),
        windows=clients.active_windows(),
    )


def is_cache_hit(ex: Exchange) -> bool:
    return ex.result in HIT_RESULTS or ex.notes.get("cache") == "hit"


def response_facts(facts: FlowFacts, head: http1.ResponseHead, hit: bool) -> FlowFacts:
    ctype = http1.header_value(head.headers, b"content-type")
    return dataclasses.replace(
        facts,
        content_type=media_type(ctype),
        response_size=head.content_length,
        cache="hit" if hit else "miss",
    )


def tree_intact(ifaces: Sequence[str], sampled: Collection[tuple[str, int]]) -> bool:
    """Whether every interface still carries our tree: its counters (``(iface, classid)``
    keys) include the class of unshaped traffic, which every tree of ours has. An interface
    deleted and created again comes back with the kernel's default qdisc and lacks it."""
    return all((iface, UNSHAPED_CLASSID) in sampled for iface in ifaces)


@dataclass(frozen=True)
class KernelVerdict:
    """What :meth:`ShapingComponent.check_kernel` logs and keeps after a look at the kernel."""

    problems: tuple[str, ...]  # what could not be repaired (remembered: logged once per change)
    error: str | None  # for status()
    repaired: tuple[str, ...] = ()  # interfaces whose classes were put back (one warning)
    report: tuple[str, ...] = ()  # problems to log now: they differ from the last ones
    recovered: bool = False  # every interface carries its classes again after problems


def judge_kernel(
    reported: tuple[str, ...], repair: tuple[Sequence[str], Sequence[str]] | None
) -> KernelVerdict | None:
    """The repair/log decision, pure. ``reported``: the problems logged last time; ``repair``:
    ``(actions, problems)`` of a repair that ran, None when the tree was intact (no repair).
    None: nothing to log or change.

    An operator's own qdisc, or an interface still missing, is logged when it first appears
    and again only when the set of problems changes, not every COUNTER_INTERVAL."""
    if repair is None:
        if not reported:
            return None
        return KernelVerdict((), None, recovered=True)
    actions, problems = repair
    current = tuple(problems)
    return KernelVerdict(
        problems=current,
        error="; ".join(current) or None,
        # An action reads "<iface>: <what>"; one name per interface, in order.
        repaired=tuple(dict.fromkeys(a.split(":", 1)[0] for a in actions)),
        report=current if current != reported else (),
    )


# -- the component ----------------------------------------------------------------------------


class ShapingComponent:
    name = NAME
    # Status figures that only grow: Prometheus counters, not gauges (metrics()).
    metric_counters = ("requests_marked", "reclassified")

    def __init__(self, cfg: Config) -> None:
        self.config = shaping_config(cfg)
        self.plan = plan_for(cfg)
        self.clients = Clients.from_config(cfg)
        self.applied = False  # the plan is in the kernel
        self.error: str | None = None
        self.server: Server | None = None
        self.counters: dict[tuple[str, int], ClassCounters] = {}
        self.counters_at = 0.0
        self.marked = 0  # requests put into a class
        self.reclassified = 0  # flows moved by their response head
        self.hooked = False  # our HTTP hooks are registered on the server (while active)
        # The mark each client socket carries, so a keep-alive connection is re-marked only
        # when its class changes (setsockopt per request would be wasted syscalls).
        self._client_marks: weakref.WeakKeyDictionary[ClientConnection, int] = (
            weakref.WeakKeyDictionary()
        )
        self._task: asyncio.Task[None] | None = None
        # What check_kernel last found it could not repair (logged once per change).
        self._repair_problems: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return self.applied and bool(self.plan.interfaces)

    # -- Component protocol -------------------------------------------------------------------

    def rules_extras(self, cfg: Config) -> dict[str, Any]:
        rules = classify_for(plan_for(cfg))
        return {"classify": rules} if rules else {}

    async def start(self, daemon: Daemon) -> None:
        self.server = daemon.server
        await self._apply(ShapingPlan(), self.plan)
        self._sync_hooks()
        self._task = asyncio.get_running_loop().create_task(
            self._counter_loop(), name="shaping counters"
        )

    async def reload(self, daemon: Daemon, cfg: Config) -> None:
        new_plan = plan_for(cfg)
        old_plan = self.plan
        if new_plan != old_plan or not self.applied:
            try:
                await self._update(old_plan if self.applied else ShapingPlan(), new_plan)
            except Exception as exc:
                # Put back what ran before, then refuse: the daemon keeps the old config.
                try:
                    await self._update(new_plan, old_plan if self.applied else ShapingPlan())
                except Exception as again:
                    log.error("shaping: restoring the previous plan failed: %s", again)
                raise ConfigError(cfg.path, NAME, f"applying the new plan failed: {exc}") from None
        self.config = shaping_config(cfg)
        self.plan = new_plan
        self.clients = Clients.from_config(cfg)
        self.applied = True
        self.error = None
        self.remark_live()
        self._sync_hooks()

    async def stop(self, daemon: Daemon) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._unhook()
        if self.plan.interfaces:  # applied or not: only trees carrying our signature go
            from tproxy.shaping.apply import ShapingError, remove_plan

            try:
                removed = await asyncio.to_thread(remove_plan, self.plan)
                log.info("shaping: removed qdiscs from %s", ", ".join(removed) or "nothing")
            except ShapingError as exc:
                log.error("shaping: removing the qdiscs failed: %s", exc)
        self.applied = False

    def status(self) -> dict[str, Any]:
        classes = class_rows(self.plan, self.counters)
        return {
            "enabled": self.config.enabled,
            "applied": self.active,
            "error": self.error,
            "interfaces": [ip.iface for ip in self.plan.interfaces],
            "requests_marked": self.marked,
            "reclassified": self.reclassified,
            "counters_age": round(time.monotonic() - self.counters_at, 1)
            if self.counters_at
            else None,
            "classes": classes,
        }

    def metrics(self) -> Iterator[Metric]:
        """Prometheus families: the flat figures of :meth:`status`, and per class (labelled by
        interface and class name) its bytes, packets and drops from the kernel's counters and
        its current rate. The label values come from the config, so the series are bounded."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from tproxy.metrics import PREFIX, component_families

        status = self.status()
        flat = {k: v for k, v in status.items() if k != "classes"}
        yield from component_families(self.name, flat, set(), frozenset(self.metric_counters))
        labels = ["interface", "class"]
        families = {
            key: CounterMetricFamily(f"{PREFIX}_shaping_class_{key}", doc, labels=labels)
            for key, doc in (
                ("bytes", "Bytes sent through the class (tc counters)"),
                ("packets", "Packets sent through the class"),
                ("drops", "Packets the class dropped"),
            )
        }
        rate = GaugeMetricFamily(
            f"{PREFIX}_shaping_class_rate_bps", "The class's current rate, bits/s", labels=labels
        )
        for row in status["classes"]:
            values = [str(row["interface"]), str(row["class"])]
            for key, family in families.items():
                if row[key] is not None:
                    family.add_metric(values, row[key])
            if row["rate_bps"] is not None:
                rate.add_metric(values, row["rate_bps"])
        yield from families.values()
        yield rate

    # -- hooks on the server ------------------------------------------------------------------

    def _sync_hooks(self) -> None:
        """The HTTP hooks are on the server exactly while shaping is active: with shaping off
        (or its plan refused by the kernel) a request pays nothing for it, not even a call."""
        if self.active:
            self._hook()
        else:
            self._unhook()

    def _hook(self) -> None:
        server = self.server
        if server is None or self.hooked:
            return
        # First, so the class is known before the filter or the cache answer a request, and
        # so our response hook re-marks before any other hook writes the head.
        server.request_hooks.insert(0, self.on_request)
        server.response_hooks.insert(0, self.on_response)
        server.upstream_hooks.append(self.on_upstream)
        self.hooked = True

    def _unhook(self) -> None:
        server = self.server
        if server is None or not self.hooked:
            return
        # Bound methods compare equal when they bind the same object and function.
        if self.on_request in server.request_hooks:
            server.request_hooks.remove(self.on_request)
        if self.on_response in server.response_hooks:
            server.response_hooks.remove(self.on_response)
        if self.on_upstream in server.upstream_hooks:
            server.upstream_hooks.remove(self.on_upstream)
        self.hooked = False

    # -- kernel -------------------------------------------------------------------------------

    async def _apply(self, old: ShapingPlan, new: ShapingPlan) -> None:
        """Start: a plan that cannot be applied leaves the proxy running unshaped, loudly.

        Trees of ours on interfaces outside the plan (a crash's, or shaping since turned off)
        go first; a plan that fails halfway takes back the interfaces it had done, so nothing
        caps traffic while the daemon says shaping is off."""
        from tproxy.shaping.apply import ShapingError, remove_everywhere, remove_plan

        stale: list[str] = []
        if self.config.enabled:  # (with shaping off, `rules flush` at the last stop cleaned up)
            try:
                keep = [i.iface for i in new.interfaces]
                stale = await asyncio.to_thread(remove_everywhere, keep)
            except (ShapingError, OSError) as exc:
                log.warning("shaping: looking for qdiscs left behind failed: %s", exc)
        if stale:
            log.warning("shaping: removed qdiscs left behind on %s", ", ".join(stale))
        if not new.interfaces:
            self.applied = True
            return
        try:
            await self._update(old, new)
        except Exception as exc:
            self.error = str(exc)
            self.applied = False
            log.error("shaping disabled: %s", exc)
            try:
                await asyncio.to_thread(remove_plan, new)
            except ShapingError as again:
                log.error("shaping: removing the partly applied qdiscs failed: %s", again)
            return
        self.applied = True

    async def _update(self, old: ShapingPlan, new: ShapingPlan) -> None:
        from tproxy.shaping.apply import update_plan

        actions = await asyncio.to_thread(update_plan, old, new)
        for action in actions:
            log.debug("shaping: %s", action)
        if actions:
            log.info("shaping: %d tc changes on %s", len(actions), _names(new, old))

    async def _counter_loop(self) -> None:
        while True:
            await self.check_kernel()
            await asyncio.sleep(COUNTER_INTERVAL)

    async def check_kernel(self) -> None:
        """Read the class counters; put the tree back on interfaces that lost it.

        An interface deleted and created again (bridge rebuilt, VLAN or USB NIC re-plugged)
        comes back with the kernel's default qdisc: its traffic would pass unshaped until a
        restart, silently. Noticed here within :data:`COUNTER_INTERVAL`, it is repaired (an
        operator's own qdisc found there is reported, never replaced).
        """
        from tproxy.shaping.apply import ShapingError, read_counters, repair_plan

        ifaces = [ip.iface for ip in self.plan.interfaces]
        if not ifaces or not self.applied:
            return
        try:
            sample = await asyncio.to_thread(read_counters, ifaces)
        except ShapingError as exc:
            log.debug("shaping: reading counters failed: %s", exc)
            return
        now = time.monotonic()
        self.counters = with_rates(self.counters, sample, now - self.counters_at)
        self.counters_at = now
        if tree_intact(ifaces, sample):
            verdict = judge_kernel(self._repair_problems, None)
        else:
            try:
                actions, problems = await asyncio.to_thread(repair_plan, self.plan)
            except ShapingError as exc:
                actions, problems = [], [str(exc)]
            verdict = judge_kernel(self._repair_problems, (actions, problems))
        if verdict is not None:
            self._adopt(verdict)

    def _adopt(self, verdict: KernelVerdict) -> None:
        """Log and keep what :func:`judge_kernel` decided."""
        if verdict.recovered:
            log.info("shaping: every interface carries its classes again")
        if verdict.repaired:
            log.warning(
                "shaping: re-applied the classes on %s (the interface lost its qdisc)",
                ", ".join(verdict.repaired),
            )
        for problem in verdict.report:
            log.warning("shaping: not shaping: %s", problem)
        self._repair_problems = verdict.problems
        self.error = verdict.error

    # -- hooks --------------------------------------------------------------------------------

    def on_request(self, conn: ClientConnection, ex: Exchange) -> bool:
        if not self.active:
            return False
        facts = request_facts(ex.url, ex.head.host, conn.client_ip, self.clients)
        name = select_class(self.config, facts)
        mark = mark_for(self.plan, name, conn.client_ip)
        ex.notes[NOTE] = FlowState(facts, name, mark)
        ex.notes[NOTE_UPSTREAM_MARK] = mark
        self.marked += 1
        # Until the origin answers, whatever the daemon sends itself (a cache hit, a block
        # page) goes unshaped; with hits_unshaped = false it is shaped like the request.
        if self.config.hits_unshaped:
            self._mark_client(conn, UNSHAPED_MARK, None)
        else:
            self._mark_client(conn, mark, name)
        return False

    def on_upstream(self, conn: ClientConnection, ex: Exchange, up: Upstream) -> None:
        """An upstream connection was bound to the exchange: mark it for the upload."""
        state = ex.notes.get(NOTE)
        if not isinstance(state, FlowState) or not self.active:
            return
        _mark(_socket_of(up.transport), self.plan, state.class_name, conn.client_ip)

    def on_response(self, conn: ClientConnection, ex: Exchange, head: http1.ResponseHead) -> bool:
        state = ex.notes.get(NOTE)
        if not isinstance(state, FlowState) or not self.active:
            return False
        # A 304 has no body: if anything follows, it is the cache's stored copy (a refreshed
        # hit, RFC 9111 §4.3.4), which is sent like any other hit.
        facts = response_facts(state.facts, head, is_cache_hit(ex) or head.status == 304)
        name = select_class(self.config, facts)
        if name != state.class_name:
            self.reclassified += 1
            log.debug("%s: %s moves from %s to %s", conn.client_ip, ex.url, state.class_name, name)
            state.reclassified = True
            state.class_name = name
            state.mark = mark_for(self.plan, name, conn.client_ip)
            if ex.upstream is not None:
                _mark(_socket_of(ex.upstream.transport), self.plan, name, conn.client_ip)
        state.facts = facts
        self._mark_client(conn, state.mark, name)
        return False

    def _mark_client(self, conn: ClientConnection, mark: int, name: str | None) -> None:
        if self._client_marks.get(conn) == mark:
            return
        sock = _socket_of(conn.transport)
        if sock is None:
            return
        if mark == UNSHAPED_MARK and conn in self._client_marks and _unsent(conn, sock):
            # The mark is read when a packet is sent, so bytes of the previous (shaped) response
            # still queued would leave unshaped too: a client pipelining a cache hit behind a
            # shaped download would get the download's tail for free. Until they are out, the
            # hit goes in the previous class.
            return
        if _mark(sock, self.plan, name, conn.client_ip):
            self._client_marks[conn] = mark

    def remark_live(self) -> None:
        """After a reload: class numbers may have moved, classes vanished or caps changed;
        every exchange in flight is put into its class of the new config by name."""
        if self.server is None:
            return
        self._client_marks.clear()
        for conn in list(self.server.connections):
            ex = conn.exchange
            state = ex.notes.get(NOTE) if ex is not None else None
            if ex is None or not isinstance(state, FlowState):
                continue
            name = select_class(self.config, state.facts) if self.active else None
            state.class_name = name
            state.mark = mark_for(self.plan, name, conn.client_ip)
            ex.notes[NOTE_UPSTREAM_MARK] = state.mark
            if ex.upstream is not None:
                _mark(_socket_of(ex.upstream.transport), self.plan, name, conn.client_ip)
            if ex.response_started or not self.config.hits_unshaped:
                self._mark_client(conn, state.mark, name)

    # -- HTTPS (NFQUEUE) ------------------------------------------------------------------------

    def sni_class(self, client_ip: str, sni: str) -> int:
        """The mark bits (class and client slot) for an HTTPS flow known by its SNI only.

        For the NFQUEUE handler, which ORs them into its verdict mark; the connmark carries
        them to the rest of the flow. 0 while shaping is off.
        """
        if not self.active:
            return 0
        facts = FlowFacts(
            host=normalize_host(sni),
            url=f"https://{sni.lower()}/",
            groups=self.clients.groups_of(client_ip),
            windows=self.clients.active_windows(),
        )
        return mark_for(self.plan, select_class(self.config, facts), client_ip)


# -- helpers ----------------------------------------------------------------------------------


def _socket_of(transport: Any) -> Any:
    if transport is None or transport.is_closing():
        return None
    return transport.get_extra_info("socket")


def _unsent(conn: ClientConnection, sock: Any) -> bool:
    """Whether response bytes still wait: in the transport's buffer or the kernel's unsent queue."""
    if conn.transport is not None and conn.transport.get_write_buffer_size():
        return True
    return unsent_bytes(sock) > 0


def _mark(sock: Any, plan: ShapingPlan, name: str | None, client: str) -> bool:
    if sock is None or not plan.interfaces:
        return False
    from tproxy.shaping.apply import mark_socket

    try:
        mark_socket(sock, plan, name, client)
    except OSError as exc:  # the socket closed under us; nothing left to shape
        log.debug("shaping: marking a socket failed: %s", exc)
        return False
    return True


def _names(*plans: ShapingPlan) -> str:
    return ", ".join(dict.fromkeys(ip.iface for p in plans for ip in p.interfaces))


def with_rates(
    before: Mapping[tuple[str, int], ClassCounters],
    after: Mapping[tuple[str, int], ClassCounters],
    elapsed: float,
) -> dict[tuple[str, int], ClassCounters]:
    """``after`` with ``rate_bps`` from the byte difference (None for new classes)."""
    out: dict[tuple[str, int], ClassCounters] = {}
    for key, c in after.items():
        prev = before.get(key)
        rate = None
        if prev is not None and elapsed > 0 and c.bytes >= prev.bytes:
            rate = (c.bytes - prev.bytes) * 8 / elapsed
        out[key] = dataclasses.replace(c, rate_bps=rate)
    return out


def component(cfg: Config) -> ShapingComponent:
    """Factory for ``tproxy.component.COMPONENTS``. Always built, so that a reload can turn
    shaping on; with ``enabled = false`` it installs nothing and registers no hooks."""
    return ShapingComponent(cfg)
