"""The content filter in the running daemon: HTTP hooks, the HTTPS SNI queue, reloads.

* HTTP: a request hook asks :meth:`Policy.request_verdict`; a deny is answered with the block
  page (403, result ``TCP_DENIED``) by the proxy itself, so nothing reaches the origin. A verdict
  that a MIME/size rule may still reverse (``final=False``) is re-checked by a response hook when
  the response head arrives — before any of it is sent: a deny then answers the block page in
  place of the response and drops the upstream connection, so the body never reaches the client.
* HTTPS: when some rule could deny by server name, the kernel queues the first packets of
  port-443 flows (:mod:`tproxy.nfqueue`) and each flow gets :meth:`Policy.sni_verdict`.
* Lists: category lists are loaded in a worker thread (``asyncio.to_thread``) at start and on
  every SIGHUP, and the new policy replaces the old one in one assignment; connections keep
  using the old one meanwhile. A reload that cannot compile is refused and the old policy stays.

Every verdict is logged: denies in the access log (``TCP_DENIED/403``) and at info level in the
daemon log; HTTPS flows as ``CONNECT host:443`` lines (``TCP_TUNNEL/200`` or ``TCP_DENIED/403``).

The clock is injectable for tests: ``TPROXY_FAKE_NOW=2025-01-06T09:30`` (ISO 8601; naive means
local time) freezes the time that windows are evaluated at.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tproxy import http1
from tproxy.accesslog import AccessRecord
from tproxy.config import Config, ConfigError, ConfigErrors
from tproxy.filter.categories import Categories, load_categories
from tproxy.filter.model import MAX_TEMPLATE_BYTES, FilterConfig, validate_template
from tproxy.filter.verdict import Policy, RequestInfo, Verdict, render_block_page
from tproxy.httpconn import RESPONSE_CHECK, http_date
from tproxy.nfqueue import FlowDecision, SniClass, SniQueue
from tproxy.uri import bracket

if TYPE_CHECKING:
    from tproxy.daemon import Daemon
    from tproxy.httpconn import ClientConnection, Exchange

log = logging.getLogger("tproxy.filter")

# The NFQUEUE number of the SNI peek (0..65535; queue numbers are per network namespace). Not 0,
# which IDS setups (Suricata, Snort) use by default.
NFQUEUE_NUM = 443
HTTPS_PORTS = (443,)
FAKE_NOW_ENV = "TPROXY_FAKE_NOW"
# MAC-based groups: the neighbour table is re-read at most this often (seconds) on a miss, and
# refreshed in the background at this period while some group names MACs.
NEIGH_REFRESH = 5.0
NEIGH_MISS_INTERVAL = 1.0
NOTE = "filter"
# Evasion lines in the daemon log: at most one per client per interval (seconds), with the
# count of the ones left out; the access log still gets every reset flow. The table of
# clients is bounded (an address spoofing flood must not grow it).
EVASION_LOG_INTERVAL = 60.0
EVASION_LOG_CLIENTS = 4096


def clock_from_env() -> Callable[[], datetime]:
    """``datetime.now`` unless TPROXY_FAKE_NOW fixes the time (tests, demos)."""
    fake = os.environ.get(FAKE_NOW_ENV)
    if not fake:
        return datetime.now
    fixed = datetime.fromisoformat(fake)
    return lambda: fixed


def filter_config(cfg: Config) -> FilterConfig:
    return cfg.section("filter", FilterConfig)


def sni_can_deny(policy: Policy) -> bool:
    """Whether any client could be denied by server name (else the SNI peek is pointless)."""
    return policy.https and any(g.sni_can_deny for g in (*policy.groups, policy.fallback))


def allows_everything(policy: Policy) -> bool:
    return all(not g.rules and g.default == "allow" for g in (*policy.groups, policy.fallback))


def uses_macs(policy: Policy) -> bool:
    return any(g.macs for g in policy.groups)


def read_block_page(fcfg: FilterConfig) -> tuple[str | None, ConfigError | None]:
    """The block page template ``filter.block_page`` names (None: the embedded page), or the
    problem with it, reported at the setting."""
    path = fcfg.block_page
    if path is None:
        return None, None
    at = fcfg.block_page_origin
    try:
        with open(path, "rb") as fh:
            # One byte past the limit is enough to know it is too large.
            raw = fh.read(MAX_TEMPLATE_BYTES + 1)
    except OSError as exc:
        return None, at.error(f"cannot read {path}: {exc.strerror or exc}")
    if len(raw) > MAX_TEMPLATE_BYTES:
        return None, at.error(f"{path}: larger than {MAX_TEMPLATE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, at.error(f"{path}: not UTF-8 text")
    problem = validate_template(text)
    if problem:
        return None, at.error(f"{path}: {problem}")
    return text, None


def load_files(fcfg: FilterConfig) -> FilterConfig:
    """Check the folders and read the page the config names (blocking I/O, as the parser does
    none): ``fcfg`` with its block page template read. Raises :class:`ConfigErrors` naming
    file, line and key of each setting whose folder or file is missing or unusable.

    A missing category folder is an error here, not a list warning: the rule would silently
    match nothing, which is the opposite of what the admin who wrote it wants.
    """
    errors: list[ConfigError] = []
    for ref in fcfg.category_refs:
        if not (Path(fcfg.categories_dir) / ref.name).is_dir():
            errors.append(ref.origin.error(f"no category {ref.name!r} in {fcfg.categories_dir}"))
    template, problem = read_block_page(fcfg)
    if problem is not None:
        errors.append(problem)
    if errors:
        raise ConfigErrors(errors)
    return replace(fcfg, block_template=template) if template is not None else fcfg


def check_config_files(cfg: Config) -> None:
    """What ``tproxy check-config`` adds to parsing: the filter's folders and block page."""
    load_files(filter_config(cfg))


def load_policy(cfg: FilterConfig) -> tuple[Policy, list[str]]:
    """Check the files the config names, load the lists the rules use and compile (blocking:
    run it in a worker thread). Raises :class:`ConfigErrors` (see :func:`load_files`).

    Returns the policy and the warnings to log (``file:line: reason`` for list problems).
    """
    return compile_policy(load_files(cfg))


def compile_policy(cfg: FilterConfig) -> tuple[Policy, list[str]]:
    """:func:`load_policy` for a config whose files :func:`load_files` has already read: the
    category lists are loaded (blocking) and the policy compiled."""
    warnings: list[str] = []
    categories = Categories.empty()
    if cfg.used_categories:
        result = load_categories(cfg.categories_dir, cfg.used_categories)
        if result.failed:
            # Like a missing folder (load_files): a rule whose list cannot be read would match
            # nothing, and a reload caught while a list updater replaces the files would open
            # the filter up. Refused: the running policy and its lists stay.
            raise ConfigErrors(
                [
                    ref.origin.error(f"category {ref.name!r}: {result.failed[ref.name]}")
                    for ref in cfg.category_refs
                    if ref.name in result.failed
                ]
            )
        categories = result.categories
        warnings += [f"category list {w}" for w in result.warnings]
        if result.warnings_total > len(result.warnings):
            more = result.warnings_total - len(result.warnings)
            warnings.append(f"category lists: {more} more warnings not shown")
    policy = Policy.compile(cfg, categories)
    warnings += list(policy.warnings)
    return policy, warnings


def block_response(
    policy: Policy, verdict: Verdict, url: str, head_only: bool, keep: bool
) -> bytes:
    body = render_block_page(policy.block_template, verdict, url)
    # RFC 9110 §15.5.4 403: understood and refused; no-store keeps the page out of any cache
    # (ours included) so lifting the block takes effect at once.
    head = (
        "HTTP/1.1 403 Forbidden\r\n"
        f"Date: {http_date().decode()}\r\n"  # RFC 9110 §6.6.1
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
    ).encode()
    return head if head_only else head + body


# -- neighbour table (for MAC-based groups) ----------------------------------------------------


def read_arp(path: str = "/proc/net/arp") -> dict[str, str]:
    """IPv4 neighbours from procfs (proc(5) /proc/net/arp): address → MAC."""
    out: dict[str, str] = {}
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            next(fh, None)
            for line in fh:
                f = line.split()
                # flags 0x2 = ATF_COM: a complete entry.
                if len(f) >= 4 and int(f[2], 16) & 0x2:
                    out[f[0]] = f[3].lower()
    except OSError:
        pass
    return out


def read_neighbours() -> dict[str, str]:
    """IPv4 and IPv6 neighbours (blocking: a worker thread runs it)."""
    out = read_arp()
    try:
        res = subprocess.run(
            ["ip", "-6", "-o", "neigh", "show"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return out
    for line in res.stdout.splitlines():
        f = line.split()
        if "lladdr" in f and f.index("lladdr") + 1 < len(f):
            out[f[0]] = f[f.index("lladdr") + 1].lower()
    return out


@dataclass
class Neighbours:
    table: dict[str, str] = field(default_factory=dict)
    last_miss_read: float = 0.0

    def mac(self, ip: str) -> str | None:
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        found = self.table.get(ip)
        if found is None and ":" not in ip:
            now = time.monotonic()
            if now - self.last_miss_read >= NEIGH_MISS_INTERVAL:
                # A new IPv4 client: /proc/net/arp is small and read in microseconds.
                self.last_miss_read = now
                self.table.update(read_arp())
                found = self.table.get(ip)
        return found


# -- the component -----------------------------------------------------------------------------


@dataclass
class FilterStats:
    requests_checked: int = 0
    requests_denied: int = 0
    responses_denied: int = 0
    sni_allowed: int = 0
    sni_denied: int = 0
    sni_evasions: int = 0
    reloads: int = 0
    list_warnings: int = 0


def _shaping_needs_sni(cfg: Config) -> bool:
    """Shaping selectors (domain, group, window) classify HTTPS flows by their ClientHello too:
    the queue's verdict carries the class mark in the connmark."""
    shaping = cfg.sections.get("shaping")
    return bool(getattr(shaping, "enabled", False) and getattr(shaping, "selectors", ()))


class FilterComponent:
    name = "filter"

    def __init__(self, cfg: Config, clock: Callable[[], datetime] | None = None) -> None:
        self.cfg = cfg
        self.fcfg = filter_config(cfg)
        self.now = clock or clock_from_env()
        # Until start() has loaded the lists: the rules without category entries.
        self.policy = Policy.compile(self.fcfg)
        self.allows_all = allows_everything(self.policy)
        self.stats = FilterStats()
        self.queue: SniQueue | None = None
        self.neighbours = Neighbours()
        self._sni_class: SniClass | None = None
        self._daemon: Daemon | None = None
        self._neigh_task: asyncio.Task[None] | None = None
        # (section as parsed, section with its files read): see _files.
        self._loaded: tuple[FilterConfig, FilterConfig] | None = None
        # client -> (time of its last evasion line, lines left out since)
        self._evasion_log: dict[str, tuple[float, int]] = {}

    # -- shaping hook -----------------------------------------------------------------------

    @property
    def sni_class(self) -> SniClass | None:
        """``(client_ip, sni) -> mark bits``: HTTPS flows go into shaping classes by server name
        (the verdict mark carries the bits). Taken from a component with ``sni_class`` (shaping)
        at start, or set here."""
        return self._sni_class

    @sni_class.setter
    def sni_class(self, hook: SniClass | None) -> None:
        self._sni_class = hook
        if self.queue is not None:
            self.queue.sni_class = hook

    # -- Component protocol -----------------------------------------------------------------

    def rules_extras(self, cfg: Config) -> dict[str, Any]:
        # The daemon asks for the plan before start and, on a reload, before any component
        # adopts the new config: a missing category folder or a broken block page refuses it
        # here, while nothing has changed yet (shaping would already have moved its classes
        # if only our own reload() refused).
        policy = Policy.compile(self._files(filter_config(cfg)))
        extras: dict[str, Any] = {}
        if sni_can_deny(policy) or _shaping_needs_sni(cfg):
            extras.update(https_ports=HTTPS_PORTS, nfqueue_num=NFQUEUE_NUM)
        if policy.quic_reject:
            extras["quic_reject"] = True
        return extras

    async def start(self, daemon: Daemon) -> None:
        self._daemon = daemon
        policy, warnings = await asyncio.to_thread(self._load_policy, self.fcfg)
        self._adopt(policy, warnings)
        self._sync_hooks()
        if self._sni_class is None:
            for comp in daemon.components:
                hook = getattr(comp, "sni_class", None)
                if comp is not self and callable(hook):
                    self._sni_class = hook
        if daemon.plan.nfqueue_num == NFQUEUE_NUM and daemon.plan.https_ports:
            self._open_queue(daemon)
        self._sync_neighbours()

    async def reload(self, daemon: Daemon, cfg: Config) -> None:
        fcfg = filter_config(cfg)
        try:
            policy, warnings = await asyncio.to_thread(self._load_policy, fcfg)
        except ConfigError:  # a category folder went away since rules_extras looked
            raise
        except Exception as exc:  # compile problems the config check could not foresee
            raise ConfigError(cfg.path, "filter", f"cannot compile the filter: {exc}") from None
        plan = daemon.make_plan(cfg)
        if plan.nfqueue_num == NFQUEUE_NUM and plan.https_ports and self.queue is None:
            # Bound before the daemon applies the rules that send packets to it.
            try:
                self._open_queue(daemon)
            except OSError as exc:
                raise ConfigError(cfg.path, "filter.https", str(exc)) from None
        self.cfg, self.fcfg = cfg, fcfg
        self.stats.reloads += 1
        self._adopt(policy, warnings)
        self._sync_hooks()
        self._sync_neighbours()

    async def stop(self, daemon: Daemon) -> None:
        self._unhook()
        if self.queue is not None:
            self.queue.close()
            self.queue = None
        if self._neigh_task is not None:
            self._neigh_task.cancel()
            self._neigh_task = None

    def status(self) -> dict[str, Any]:
        s = self.stats
        cats = {
            c.name: {"domains": c.domains, "urls": c.urls} for c in self.policy.categories.stats
        }
        return {
            "rules": len(self.fcfg.rules),
            "groups": len(self.fcfg.groups),
            "categories": cats,
            "requests_checked": s.requests_checked,
            "requests_denied": s.requests_denied,
            "responses_denied": s.responses_denied,
            "sni_allowed": s.sni_allowed,
            "sni_denied": s.sni_denied,
            "sni_evasions": s.sni_evasions,
            "reloads": s.reloads,
            "list_warnings": s.list_warnings,
            "sni_queue": self.queue.status() if self.queue is not None else None,
        }

    # -- hooks on the server ----------------------------------------------------------------

    @property
    def hooked(self) -> bool:
        daemon = self._daemon
        return daemon is not None and self.on_request in daemon.server.request_hooks

    def _sync_hooks(self) -> None:
        """The HTTP hooks are on the server exactly while some rule can deny: a policy that
        allows everything costs a request nothing, not even a call. A reload that lifts every
        rule also lifts the response check of exchanges in flight (the new policy allows them).
        """
        if self.allows_all:
            self._unhook()
            return
        daemon = self._daemon
        if daemon is None or self.hooked:
            return
        server = daemon.server
        # After shaping (which classifies first, also block pages) and before the components
        # that follow us in COMPONENTS — the cache: a denied URL is never served a hit. Hooks
        # are kept in component order, so a filter turned on by a reload slots in before the
        # cache's hooks instead of behind them.
        comps = daemon.components
        later = comps[comps.index(self) + 1 :] if self in comps else []
        _insert_before(server.request_hooks, self.on_request, later)
        _insert_before(server.response_hooks, self.on_response, later)

    def _unhook(self) -> None:
        daemon = self._daemon
        if daemon is None:
            return
        # Bound methods compare equal when they bind the same object and function.
        if self.on_request in daemon.server.request_hooks:
            daemon.server.request_hooks.remove(self.on_request)
        if self.on_response in daemon.server.response_hooks:
            daemon.server.response_hooks.remove(self.on_response)

    # -- internals --------------------------------------------------------------------------

    def _files(self, fcfg: FilterConfig) -> FilterConfig:
        """``load_files(fcfg)``, read once per loaded config: the daemon asks for the rules
        plan (:meth:`rules_extras`) before :meth:`start`/:meth:`reload`, and a reload makes the
        plan twice, so without this the block page and the folders were read three times per
        SIGHUP. Keyed on the section object's identity: every config load (start, SIGHUP)
        parses a new one, so an edited block page is read again on the next reload."""
        cached = self._loaded
        if cached is not None and cached[0] is fcfg:
            return cached[1]
        loaded = load_files(fcfg)
        self._loaded = (fcfg, loaded)
        return loaded

    def _load_policy(self, fcfg: FilterConfig) -> tuple[Policy, list[str]]:
        """:func:`load_policy` with the files :meth:`rules_extras` read (blocking)."""
        return compile_policy(self._files(fcfg))

    def _adopt(self, policy: Policy, warnings: list[str]) -> None:
        for text in warnings:
            log.warning("%s", text)
        self.stats.list_warnings = len(warnings)
        self.policy = policy
        self.allows_all = allows_everything(policy)
        loaded = ", ".join(f"{c.name}={c.domains + c.urls}" for c in policy.categories.stats)
        log.info(
            "filter: %d rules, %d groups%s; HTTPS by SNI %s",
            len(policy.config.rules),
            len(policy.groups),
            f", categories {loaded}" if loaded else "",
            "on" if sni_can_deny(policy) else "off",
        )

    def _open_queue(self, daemon: Daemon) -> None:
        queue = SniQueue(
            NFQUEUE_NUM, self.decide_sni, sni_class=self._sni_class, evasion=self.sni_evasion
        )
        try:
            queue.open()
        except ImportError:
            raise OSError(
                "the netfilterqueue module is missing: HTTPS filtering needs it"
            ) from None
        except OSError as exc:
            raise OSError(f"cannot bind NFQUEUE {NFQUEUE_NUM} for HTTPS filtering: {exc}") from None
        queue.attach(asyncio.get_running_loop())
        self.queue = queue
        log.info(
            "HTTPS SNI peek on NFQUEUE %d (fail-open %s)",
            NFQUEUE_NUM,
            {True: "set", False: "REFUSED", None: "unconfirmed"}[queue.stats.fail_open],
        )

    def _sync_neighbours(self) -> None:
        want = uses_macs(self.policy)
        if want and self._neigh_task is None and self._daemon is not None:
            self._neigh_task = asyncio.get_running_loop().create_task(
                self._refresh_neighbours(), name="filter neighbours"
            )
        elif not want and self._neigh_task is not None:
            self._neigh_task.cancel()
            self._neigh_task = None

    async def _refresh_neighbours(self) -> None:
        while True:
            try:
                self.neighbours.table = await asyncio.to_thread(read_neighbours)
            except Exception:
                log.exception("reading the neighbour table failed")
            await asyncio.sleep(NEIGH_REFRESH)

    def _mac(self, policy: Policy, ip: str) -> str | None:
        return self.neighbours.mac(ip) if policy.groups and uses_macs(policy) else None

    # -- HTTP hooks -------------------------------------------------------------------------

    def on_request(self, conn: ClientConnection, ex: Exchange) -> bool:
        policy = self.policy
        if self.allows_all:  # only between a reload's adopt and its hook sync
            return False
        self.stats.requests_checked += 1
        head = ex.head
        ua = http1.header_value(head.headers, b"user-agent")
        info = RequestInfo(
            client_ip=conn.client_ip,
            client_mac=self._mac(policy, conn.client_ip),
            method=head.method.decode("latin-1"),
            host="",  # the URL's authority: built by the connection from target/Host/dst
            url=ex.url,
            user_agent=ua.decode("latin-1") if ua is not None else None,
            now=self.now(),
            dest_ip=ex.dst_host or None,
        )
        verdict = policy.request_verdict(info)
        if not verdict.allowed:
            self.stats.requests_denied += 1
            self._deny(conn, ex, policy, verdict, "request")
            return True
        if not verdict.final:
            ex.notes[NOTE] = (policy, info)
            # The response rules judge every answer, the cache's included (its hits and the
            # stored body a 304 releases never pass on_response).
            ex.notes[RESPONSE_CHECK] = self.check_response
        return False

    def on_response(self, conn: ClientConnection, ex: Exchange, head: http1.ResponseHead) -> bool:
        if NOTE not in ex.notes:
            return False
        return self.check_response(conn, ex, head.status, head.headers, head.content_length)

    def check_response(
        self,
        conn: ClientConnection,
        ex: Exchange,
        status: int,
        headers: Iterable[tuple[bytes, bytes]],
        content_length: int | None,
    ) -> bool:
        """The response stage for a head, from the origin or from the cache: True when it is
        denied and the block page has been sent instead."""
        pending = ex.notes.get(NOTE)
        if pending is None:
            return False
        policy, info = pending
        ctype = http1.header_value(headers, b"content-type")
        verdict = policy.response_verdict(
            info,
            status,
            ctype.decode("latin-1") if ctype is not None else None,
            content_length,
        )
        if verdict.allowed:
            return False
        self.stats.responses_denied += 1
        # Stop the transfer: the origin's connection is dropped (its body must not be read
        # into the next exchange), and the client gets the block page instead of the head.
        conn.drop_upstream(ex.upstream, ex)
        self._deny(conn, ex, policy, verdict, "response")
        return True

    def _deny(
        self, conn: ClientConnection, ex: Exchange, policy: Policy, v: Verdict, stage: str
    ) -> None:
        # Mirrors respond_local: the connection stays when the request is complete or its
        # remaining body is small enough to read and discard.
        done = ex.request_done or conn.can_discard(ex)
        keep = ex.client_keep_alive and done and not conn.server.draining
        data = block_response(policy, v, ex.url, ex.head.method == b"HEAD", keep)
        ex.content_type = "text/html"
        log.info(
            "deny %s %s %s: %s by %s (group %s): %s",
            conn.client_ip,
            ex.head.method.decode("latin-1"),
            ex.url,
            stage,
            v.rule,
            v.group,
            v.reason,
        )
        conn.respond_local(ex, data, 403, "TCP_DENIED")

    # -- HTTPS (NFQUEUE) ----------------------------------------------------------------------

    def decide_sni(
        self,
        client_ip: str,
        client_mac: str | None,
        server_ip: str,
        server_port: int,
        sni: str | None,
        ech: bool,
        why: str,
    ) -> FlowDecision:
        v = self.policy.sni_verdict(
            client_ip, sni, self.now(), client_mac=client_mac, dest_ip=server_ip
        )
        server = bracket(server_ip)
        name = sni or server
        if v.allowed:
            self.stats.sni_allowed += 1
        else:
            self.stats.sni_denied += 1
            log.info(
                "deny %s TLS %s (server %s:%d): by %s (group %s): %s%s%s",
                client_ip,
                sni or "(no SNI)",
                server,
                server_port,
                v.rule,
                v.group,
                v.reason,
                f" [{why}]" if why and not sni else "",
                # Decided by the outer name either way (Policy.sni_verdict); the admin sees it.
                " [ECH]" if ech else "",
            )
        self._tunnel_line(client_ip, server_ip, f"{name}:{server_port}", v.allowed)
        return FlowDecision(v.allowed, v.reason)

    def sni_evasion(
        self,
        client_ip: str,
        client_mac: str | None,
        server_ip: str,
        server_port: int,
        what: str,
        reset: bool = True,
    ) -> bool:
        """The queue's evasion hook: a ClientHello cut so that its name escapes the queue, a
        second hello naming another server, a fake hello the server would drop. Acted on (True)
        when the client's group could be denied by name at all; a client the filter does not
        judge by name is left alone (DPI evasion tools split hellos against other middleboxes
        too). ``reset``: the flow is reset (a TCP_DENIED line in the access log); else only
        the packet is dropped and the flow's real hello is judged as usual."""
        policy = self.policy
        if not (policy.https and policy.select_group(client_ip, client_mac).sni_can_deny):
            return False
        self.stats.sni_evasions += 1
        now = time.monotonic()
        last = self._evasion_log.get(client_ip)
        if last is not None and now - last[0] < EVASION_LOG_INTERVAL:
            self._evasion_log[client_ip] = (last[0], last[1] + 1)
        else:
            if last is None and len(self._evasion_log) >= EVASION_LOG_CLIENTS:
                # Forget the client logged longest ago (insertion order = first line).
                del self._evasion_log[next(iter(self._evasion_log))]
            self._evasion_log.pop(client_ip, None)
            self._evasion_log[client_ip] = (now, 0)
            left_out = last[1] if last is not None else 0
            log.warning(
                "evasion %s TLS to %s:%d: %s; %s%s",
                client_ip,
                bracket(server_ip),
                server_port,
                what,
                "flow reset" if reset else "packet dropped",
                f" ({left_out} more from this client in the last "
                f"{EVASION_LOG_INTERVAL:.0f}s not logged)"
                if left_out
                else "",
            )
        if reset:
            self._tunnel_line(client_ip, server_ip, f"{bracket(server_ip)}:{server_port}", False)
        return True

    def _tunnel_line(self, client_ip: str, server_ip: str, url: str, allowed: bool) -> None:
        daemon = self._daemon
        if daemon is None:
            return
        daemon.access_log.write(
            AccessRecord(
                start=time.time(),
                elapsed_ms=0,
                client=client_ip,
                result="TCP_TUNNEL" if allowed else "TCP_DENIED",
                status=200 if allowed else 403,
                size=0,
                method="CONNECT",
                url=url,
                hierarchy="HIER_DIRECT" if allowed else "HIER_NONE",
                peer=server_ip if allowed else "-",
                content_type="-",
            )
        )


def _insert_before(hooks: list[Any], hook: Any, later: Sequence[object]) -> None:
    """Insert ``hook`` before the first hook bound to one of the ``later`` components."""
    for index, other in enumerate(hooks):
        if any(getattr(other, "__self__", None) is comp for comp in later):
            hooks.insert(index, hook)
            return
    hooks.append(hook)


def make_component(cfg: Config) -> FilterComponent:
    """Factory for ``tproxy.component.COMPONENTS``. Always present, so that a reload can turn
    filtering on; with no rules it registers no hooks and no HTTPS packet is queued."""
    return FilterComponent(cfg)
