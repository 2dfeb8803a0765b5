"""Daemon lifecycle: bind, apply kernel state, notify systemd, reload, drain, tear down.

Order matters for an admin's network:

* start: listeners are bound *before* the TPROXY rules exist, so no diverted SYN ever meets a
  closed port; READY=1 goes to systemd only after both.
* stop: first the rules that divert *new* connections are withdrawn (clients go direct at once —
  fail open), while the ``-m socket`` divert rule stays so the return traffic of connections in
  flight still reaches their sockets; then live connections drain; then everything of ours is
  removed. The ``finally`` path removes rules even after an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from tproxy import component, netfilter, preflight
from tproxy import config as config_mod
from tproxy.accesslog import AccessLog
from tproxy.config import Config, ConfigError
from tproxy.limits import LimitsConfig
from tproxy.netfilter.sockets import forget_timewait
from tproxy.server import Server

log = logging.getLogger("tproxy.daemon")

# STATUS= lines for systemd are refreshed at this period (seconds).
STATUS_INTERVAL = 5.0
# How often the daemon checks that its access log file still exists (seconds).
LOG_CHECK_INTERVAL = 10.0
# How long a stop waits for a reload in flight (rules being applied) before it goes on.
RELOAD_WAIT_AT_STOP = 30.0
# File descriptors per client connection at the ceiling: the client's socket and the upstream's.
FDS_PER_CONNECTION = 2
# Descriptors besides connections: listeners, cache files, the access log, control and metrics
# sockets, NFQUEUE, netlink, the event loop's own.
FD_RESERVE = 256


def fd_plan(max_connections: int, soft: int, hard: int) -> tuple[int, int | None]:
    """The descriptor sizing rule, pure: ``(needed, soft limit to set)`` for ``max_connections``
    given the current soft and hard RLIMIT_NOFILE (``resource.RLIM_INFINITY``: unlimited).

    The soft limit to set is None when the current one suffices or cannot be raised; else the
    need, capped at the hard limit (an unprivileged process may raise its soft limit up to the
    hard one, getrlimit(2))."""
    need = max_connections * FDS_PER_CONNECTION + FD_RESERVE
    if soft == resource.RLIM_INFINITY or soft >= need:
        return need, None
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    return need, want if want > soft else None


def fd_budget(max_connections: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE toward what ``max_connections`` needs (:func:`fd_plan`);
    returns (limit, needed).

    Started by hand the soft limit is often 1024 (systemd's DefaultLimitNOFILE=1024:524288 for
    select() compatibility; we use epoll): the descriptors would run out at ~500 connections,
    long before the limits.max_connections ceiling that is meant to refuse cleanly."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need, want = fd_plan(max_connections, soft, hard)
    if want is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (OSError, ValueError) as exc:
            log.debug("raising RLIMIT_NOFILE to %d failed: %s", want, exc)
    return soft, need


def check_fd_budget(max_connections: int) -> None:
    limit, need = fd_budget(max_connections)
    if limit < need:
        log.warning(
            "RLIMIT_NOFILE is %d but limits.max_connections %d needs about %d: descriptors run"
            " out first (requests then get 503); raise LimitNOFILE or lower max_connections",
            limit, max_connections, need,
        )  # fmt: skip


class Notifier:
    """sd_notify(3) that never takes the daemon down.

    systemd-python's ``notify`` returns False without NOTIFY_SOCKET but raises when the socket
    path is stale (DESIGN.md §3); both mean "nobody is listening".
    """

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_interval: float | None = None
        if usec and (pid is None or pid == str(os.getpid())):
            # Ping at half the timeout, as sd_watchdog_enabled(3) recommends.
            self.watchdog_interval = int(usec) / 1_000_000 / 2

    def notify(self, state: str) -> None:
        if not self.enabled:
            return
        try:
            from systemd import daemon as sd_daemon

            sd_daemon.notify(state)
        except (OSError, ImportError) as exc:
            log.debug("sd_notify(%s) failed: %s", state.split("=", 1)[0], exc)


def make_plan(cfg: Config, components: list[component.Component]) -> netfilter.RulesPlan:
    """The kernel rules for ``cfg``, with each feature's share (SNI queue, shaping classes)."""
    extras: dict[str, Any] = {}
    for comp in components:
        extras.update(comp.rules_extras(cfg))
    return netfilter.plan_from_config(cfg, **extras)


class Daemon:
    def __init__(
        self, cfg: Config, overrides: dict[str, Any] | None = None, access_log: str | None = None
    ) -> None:
        self.overrides = overrides or {}
        # `tproxy run --access-log`: wins over the file at every reload too.
        self.access_log_override = access_log
        self.cfg = cfg
        self.components = component.build(cfg)
        self.plan = self.make_plan(cfg)
        self.access_log = AccessLog(cfg.log.access_log)
        self.server = Server(cfg, self.access_log)
        self.notifier = Notifier()
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.rules_applied = False
        # Set before the first change to the kernel: teardown removes rules only if this
        # daemon may have installed them (a second instance that failed to start must not
        # remove the first one's).
        self.kernel_touched = False
        self.instance: socket.socket | None = None  # preflight.claim_instance's lock
        self.reload_lock = asyncio.Lock()
        # Set once the daemon runs (listeners, components, rules, READY): reloads wait for it.
        self.started = asyncio.Event()

    def make_plan(self, cfg: Config) -> netfilter.RulesPlan:
        return make_plan(cfg, self.components)

    # -- kernel state ---------------------------------------------------------------------

    # pyroute2 drives its own asyncio loop internally and cannot run inside ours, and
    # iptables-restore is a subprocess: kernel changes run in a worker thread.

    async def apply_kernel_state(self, plan: netfilter.RulesPlan) -> None:
        await asyncio.to_thread(self._apply_kernel_state, plan)

    def _apply_kernel_state(self, plan: netfilter.RulesPlan) -> None:
        self.kernel_touched = True
        netfilter.apply_routing(plan)
        netfilter.apply(plan)
        self.rules_applied = True

    async def withdraw_interception(self) -> None:
        """Stop diverting new connections but keep the divert for flows we still own."""
        if not self.rules_applied:
            return
        try:
            plan = self.plan.draining()
            await asyncio.to_thread(netfilter.apply, plan)
        except netfilter.RulesError as exc:
            log.error("withdrawing interception rules failed: %s", exc)

    async def remove_kernel_state(self) -> None:
        if self.kernel_touched:
            await asyncio.to_thread(self._remove_kernel_state)

    def _remove_kernel_state(self) -> None:
        try:
            netfilter.flush()
        except netfilter.RulesError as exc:
            log.error("removing rules failed: %s", exc)
        try:
            netfilter.flush_routing(self.plan.route_table, self.plan.rule_priority)
        except netfilter.RulesError as exc:
            log.error("removing policy routing failed: %s", exc)
        # Routed flows must not meet our dead connections' TIME_WAIT sockets (see sockets.py).
        forget_timewait(self.cfg.proxy.ports)
        self.rules_applied = False

    # -- lifecycle ------------------------------------------------------------------------

    def spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.spawn(self.reload(), "reload"))
        loop.add_signal_handler(signal.SIGUSR1, self.access_log.reopen)
        preflight.check_privileges()
        preflight.check(self.plan.lan_interfaces, self.plan.ipv6)
        # Held until the process exits: a second daemon stops here, before touching anything.
        self.instance = preflight.claim_instance()
        try:
            try:
                await self.server.start()
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    raise preflight.PreflightError(
                        "IPv6 is not available on this host (disabled in the kernel?): set "
                        "proxy.ipv6 = false"
                    ) from None
                raise preflight.PreflightError(
                    f"cannot listen on port {self.cfg.proxy.listen_port} (proxy.listen_port): "
                    f"{exc.strerror or exc}"
                ) from None
            # After the listeners: a start that fails says one thing only. No connection
            # arrives before the rules below exist, so the limit is raised in time.
            check_fd_budget(self.server.limiter.cfg.max_connections)
            for comp in self.components:
                await comp.start(self)
            await self.apply_kernel_state(self.plan)
            log.info(
                "intercepting tcp ports %s from %s on port %d",
                ",".join(map(str, self.plan.ports)),
                ",".join(self.plan.lan_interfaces),
                self.plan.listen_port,
            )
            self.notifier.notify("READY=1\nSTATUS=" + self.status_line())
            self.started.set()
            if self.notifier.watchdog_interval:
                self.spawn(self._watchdog(self.notifier.watchdog_interval), "watchdog")
            if self.notifier.enabled:
                self.spawn(self._status_loop(), "status")
            self.spawn(self._log_check(), "access log check")
            await self.stopping.wait()
            # A reload in flight finishes first: its rules must not land over the drain plan
            # (or after the flush), and none starts after this (reload checks ``stopping``).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RELOAD_WAIT_AT_STOP):
                    async with self.reload_lock:
                        pass
            log.info("stopping: draining %d connections", len(self.server.connections))
            self.notifier.notify("STOPPING=1")
            self.server.close_listeners()
            await self.withdraw_interception()
            await self.server.drain(self.cfg.proxy.drain_timeout)
            return 0
        finally:
            for task in list(self.tasks):
                task.cancel()
            for comp in reversed(self.components):
                try:
                    await comp.stop(self)
                except Exception:
                    log.exception("stopping %s failed", comp.name)
            await self.server.stop()
            await self.remove_kernel_state()
            self.access_log.close()
            if self.instance is not None:
                self.instance.close()
                self.instance = None
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself: if the loop hangs, the pings stop and systemd kills
        # us; ExecStopPost then removes the rules, so the LAN fails open.
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _log_check(self) -> None:
        while True:
            await asyncio.sleep(LOG_CHECK_INTERVAL)
            self.access_log.reopen_if_deleted()

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            self.notifier.notify("STATUS=" + self.status_line())

    def status_line(self) -> str:
        from tproxy import control

        return control.status_line(self)

    async def reload(self) -> bool:
        """SIGHUP: re-read the config; a bad one is refused and the old one keeps running.
        True when this reload took effect.

        One that arrives during start waits until the daemon runs (it would otherwise apply
        rules before the components are up, and send READY early); one during stop is
        dropped."""
        await self.started.wait()
        async with self.reload_lock:  # SIGHUP and the control socket's reload never overlap
            if self.stopping.is_set():
                return False
            return await self._reload()

    async def _reload_components(self, new: Config) -> None:
        """Hand ``new`` to every component; if one refuses, the ones before it go back.

        A component refuses before changing anything, but the ones earlier in the list have
        already adopted ``new`` (a moved control socket, a rebound metrics port, shaping classes)
        by then. Handing them the running config again puts the daemon back as it was, so a
        refused reload changes nothing at all."""
        adopted: list[component.Component] = []
        try:
            for comp in self.components:
                await comp.reload(self, new)
                adopted.append(comp)
        except Exception:  # a refusal, or a failure halfway: either way all go back
            await self._restore_components(adopted)
            raise

    async def _restore_components(self, adopted: list[component.Component]) -> None:
        """Put components that took a refused reload back on the running config."""
        for comp in reversed(adopted):
            try:
                await comp.reload(self, self.cfg)
            except Exception:
                log.exception("reload: putting %s back to the running config failed", comp.name)

    async def _reload(self) -> bool:
        self.notifier.notify("RELOADING=1")
        try:
            path = None if self.cfg.path == config_mod.DEFAULTS_PATH else self.cfg.path
            new = config_mod.with_overrides(config_mod.load(path), **self.overrides)
            if self.access_log_override is not None:
                log_cfg = dataclasses.replace(new.log, access_log=self.access_log_override)
                new = dataclasses.replace(new, log=log_cfg)
            if not new.proxy.lan_interfaces:
                raise ConfigError(new.path, "proxy.lan_interfaces", "no LAN interface configured")
            for key in ("listen_port", "ipv6"):
                if getattr(new.proxy, key) != getattr(self.cfg.proxy, key):
                    # The listeners are bound once; rules pointing at an unbound port would
                    # strand every new connection.
                    raise ConfigError(new.path, f"proxy.{key}", "changing it needs a restart")
            was_on = getattr(self.cfg.sections.get("cache"), "enabled", False)
            if getattr(new.sections.get("cache"), "enabled", False) != was_on:
                # The cache's store is opened (or not) at start: said, not silently ignored.
                raise ConfigError(new.path, "cache.enabled", "changing it needs a restart")
            # The plan first: a config the kernel cannot express is refused before any
            # component has adopted it. A dropped port keeps its socket divert: its open
            # connections go on.
            plan = self.make_plan(new).keeping_divert(self.plan)
            # What start-up refuses, a reload refuses too: iptables accepts `-i` with a name no
            # interface has, so a typo'd LAN interface would silently intercept nothing.
            found = preflight.problems(plan.lan_interfaces, plan.ipv6)
            if found:
                raise ConfigError(new.path, "proxy.lan_interfaces", "; ".join(found))
            await self._reload_components(new)
            old = self.plan
            try:
                if (old.route_table, old.rule_priority) != (plan.route_table, plan.rule_priority):
                    await asyncio.to_thread(
                        netfilter.flush_routing, old.route_table, old.rule_priority
                    )
                # Applied even when the plan is unchanged (it is idempotent and atomic): after a
                # `tproxy rules flush` or another tool removed them, a reload puts them back.
                await self.apply_kernel_state(plan)
            except netfilter.RulesError:
                # The old rules go back (below); the components must match them again, and
                # a new route table / rule priority, if already installed, must not stay.
                await self._restore_components(list(self.components))
                if (old.route_table, old.rule_priority) != (plan.route_table, plan.rule_priority):
                    with contextlib.suppress(netfilter.RulesError):
                        await asyncio.to_thread(
                            netfilter.flush_routing, plan.route_table, plan.rule_priority
                        )
                raise
            self.plan = plan
            # A new path that cannot be opened keeps the old file (one error line says so).
            self.access_log.reopen(new.log.access_log)
            self.cfg = new
            self.server.cfg = new
            logging.getLogger().setLevel(getattr(logging, new.log.level.upper(), logging.INFO))
            self.server.apply_limits(new.section("limits", LimitsConfig), time.monotonic())
            check_fd_budget(self.server.limiter.cfg.max_connections)
            log.info("reloaded %s", new.path)
            return True
        except ConfigError as exc:
            errors = exc.errors if isinstance(exc, config_mod.ConfigErrors) else [exc]
            log.error(
                "reload refused, keeping the running configuration: %s",
                "; ".join(config_mod.ConfigError.__str__(e) for e in errors),
            )
        except netfilter.RulesError as exc:
            log.error("reload: applying rules failed, keeping the old ones: %s", exc)
            with contextlib.suppress(netfilter.RulesError):
                await self.apply_kernel_state(self.plan)
        except Exception:
            # Whatever went wrong, the daemon goes on with what it runs; the traceback is for a
            # bug report, the first line for the admin.
            log.exception("reload failed, keeping the running configuration")
        finally:
            self.notifier.notify("READY=1\nSTATUS=" + self.status_line())
        return False


def run(cfg: Config, overrides: dict[str, Any] | None = None, access_log: str | None = None) -> int:
    try:
        import uvloop

        runner: Callable[..., int] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        runner = asyncio.run
    daemon = Daemon(cfg, overrides, access_log)
    return runner(daemon.run())
