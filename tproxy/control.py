"""Local control socket: ``tproxy status``, ``reload`` and feature commands (``cache-purge`` …).

A Unix stream socket (unix(7)) in the daemon's own event loop, so a status answer is one
consistent snapshot taken between two callbacks and nothing is shared across threads. Access is
controlled by the socket file's mode and group: connect(2) on a Unix socket needs write permission
on the file, so ``0660`` root:adm lets the adm group ask for status and reload, nobody else.

Protocol, one request per line, one response line each (several requests per connection are fine)::

    → {"cmd": "status", "args": {}}          (or just the word: status)
    ← {"ok": true, "result": {...}}
    ← {"ok": false, "error": "unknown command 'x' (commands: reload, status)"}

Features add commands with :meth:`Control.register`; a handler is ``async fn(args) -> dict`` and
raises :class:`CommandError` for an answer the admin should read.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import re
import socket
import stat
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tproxy import __version__
from tproxy.config import Config, ConfigError, Reader, register_section

if TYPE_CHECKING:
    from tproxy.daemon import Daemon

log = logging.getLogger("tproxy.control")

DEFAULT_SOCKET = "/run/tproxy/control.sock"
DEFAULT_MODE = 0o660
# sun_path is 108 bytes including the terminating NUL (unix(7)).
MAX_SOCKET_PATH = 107
# One request line; anything longer is refused (StreamReader's buffer limit).
MAX_REQUEST_LINE = 64 * 1024
# An idle client is dropped after this long, so a forgotten `socat` cannot pin a task forever.
CLIENT_IDLE_TIMEOUT = 30.0
# Probing an existing socket file: does a live daemon answer on it?
STALE_PROBE_TIMEOUT = 1.0
# requests/s is measured over the last RATE_WINDOW seconds from samples taken every
# SAMPLE_INTERVAL; a rate over less than MIN_RATE_SPAN is not a rate but noise.
RATE_WINDOW = 10.0
SAMPLE_INTERVAL = 1.0
MIN_RATE_SPAN = 1.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class CommandError(Exception):
    """A command failed in a way the admin should read (sent back as ``{"ok": false}``)."""


class SocketInUse(ConfigError):
    """A live daemon already answers on the configured socket path."""


# -- config ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlConfig:
    enabled: bool = True
    socket: str = DEFAULT_SOCKET
    mode: int = DEFAULT_MODE
    # Group owning the socket file ("" keeps the daemon's group, root on a gateway).
    group: str = ""


_OCTAL = re.compile(r"^0?o?([0-7]{1,4})$")


def parse_control(r: Reader) -> ControlConfig:
    d = ControlConfig()
    enabled = r.boolean("enabled", d.enabled)
    path = r.string("socket", d.socket)
    if not path.startswith("/"):
        r.error("socket", f"must be an absolute path; got {path!r}")
        path = d.socket
    elif len(os.fsencode(path)) > MAX_SOCKET_PATH:
        r.error("socket", f"longer than {MAX_SOCKET_PATH} bytes (the limit of unix(7) sockets)")
        path = d.socket
    mode = d.mode
    if isinstance(r.data.get("mode"), str):
        # "0660" in quotes is how admins write modes; TOML's 0o660 works too.
        text = r.string("mode", "")
        m = _OCTAL.match(text)
        if m is None or int(m.group(1), 8) > 0o777:
            r.error("mode", f'not a file mode: {text!r} (use e.g. "0660" or 0o660)')
        else:
            mode = int(m.group(1), 8)
    else:
        mode = r.integer("mode", d.mode, 0, 0o777)
    group = r.string("group", d.group)
    r.finish()
    return ControlConfig(enabled=enabled, socket=path, mode=mode, group=group)


register_section("control", parse_control)


def control_config(cfg: Config) -> ControlConfig:
    return cfg.section("control", ControlConfig)


# -- pure parts --------------------------------------------------------------------------------


class RateMeter:
    """Events per second over a sliding window, from a small ring of (time, total) samples."""

    def __init__(self, window: float = RATE_WINDOW, interval: float = SAMPLE_INTERVAL) -> None:
        self.window = window
        # One extra slot so the oldest sample is a full window old once the ring is full.
        self.samples: deque[tuple[float, int]] = deque(maxlen=int(window / interval) + 1)

    def sample(self, now: float, total: int) -> None:
        self.samples.append((now, total))

    def rate(self, now: float, total: int) -> float:
        """Rate from the oldest sample inside the window up to ``(now, total)``."""
        base: tuple[float, int] | None = None
        for t, value in self.samples:
            if now - t <= self.window:
                base = (t, value)
                break
        if base is None:
            return 0.0
        span = max(now - base[0], MIN_RATE_SPAN)
        # A counter never goes down; a negative difference would be a bug, not traffic.
        return max(total - base[1], 0) / span


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """One request line → (command, args); raises CommandError with the reason."""
    text = line.decode("utf-8", "replace").strip()
    if text[:1] not in ("{", "[", '"'):
        # A bare word (`echo status | socat - UNIX:/run/tproxy/control.sock`).
        words = text.split()
        if len(words) != 1:
            raise CommandError('expected a JSON object like {"cmd": "status"} or one word')
        return words[0], {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CommandError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CommandError("the request must be a JSON object")
    cmd = data.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise CommandError('missing "cmd" (a string)')
    args = data.get("args", {})
    if not isinstance(args, dict):
        raise CommandError('"args" must be a JSON object')
    return cmd, args


def encode_response(response: Mapping[str, Any]) -> bytes:
    # default=str: a component status may hold a Path or an address object; never fail on it.
    return json.dumps(response, default=str, separators=(",", ":")).encode() + b"\n"


def snapshot(daemon: Daemon, meter: RateMeter | None, now: float | None = None) -> dict[str, Any]:
    """The daemon's live figures as plain data (the ``status`` command's result)."""
    now = time.monotonic() if now is None else now
    server = daemon.server
    s = server.stats
    live_in = live_out = 0
    for conn in server.connections:
        live_in += conn.bytes_in
        live_out += conn.bytes_out
    components: dict[str, Any] = {}
    for comp in daemon.components:
        try:
            components[comp.name] = comp.status()
        except Exception as exc:  # one broken component must not hide the others' figures
            log.exception("status of %s failed", comp.name)
            components[comp.name] = {"error": repr(exc)}
    started = getattr(daemon, "started", None)
    stopping = getattr(daemon, "stopping", None)
    if stopping is not None and stopping.is_set():
        state = "stopping"
    elif started is not None and not started.is_set():
        state = "starting"  # the control socket is up before the rules: not intercepting yet
    else:
        state = "running"
    return {
        "version": __version__,
        "pid": os.getpid(),
        "state": state,
        "config": daemon.cfg.path,
        "started": s.started,
        "uptime": max(time.time() - s.started, 0.0),
        "connections": {"active": s.connections_active, "total": s.connections_total},
        "requests": {
            "total": s.requests_total,
            "per_second": round(meter.rate(now, s.requests_total), 2) if meter else 0.0,
            "window": meter.window if meter else 0.0,
        },
        "bad_requests": s.bad_requests,
        "bytes": {
            "in": s.bytes_in + live_in,
            "out": s.bytes_out + live_out,
            "spliced": s.spliced_bytes,
        },
        "spliced_bodies": s.spliced_bodies,
        "upstream": {
            "connects": s.upstream_connects,
            "errors": s.upstream_errors,
            "pool_idle": server.pool.count,
        },
        "overloaded": server.overloaded,
        "draining": server.draining,
        "limits": server.limiter.stats(),
        "components": components,
    }


def human_duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


def format_status_line(
    connections: int, shedding: bool, rps: float, requests: int, errors: int, uptime: float
) -> str:
    """The STATUS= text from the figures (pure)."""
    state = " OVERLOADED," if shedding else ""
    return (
        f"{connections} connections,{state} {rps:.1f} req/s, "
        f"{requests} requests, {errors} upstream errors, up {human_duration(uptime)}"
    )


def status_line(daemon: Daemon) -> str:
    """A one-line summary for systemd's STATUS= (shown by ``systemctl status``)."""
    ctl = find(daemon)
    s = daemon.server.stats
    rps = ctl.meter.rate(time.monotonic(), s.requests_total) if ctl is not None else 0.0
    return format_status_line(
        s.connections_active,
        daemon.server.overloaded,
        rps,
        s.requests_total,
        s.upstream_errors,
        time.time() - s.started,
    )


def find(daemon: Daemon) -> Control | None:
    """The daemon's control component (features call ``find(daemon).register(...)``)."""
    for comp in daemon.components:
        if isinstance(comp, Control):
            return comp
    return None


# -- the component -----------------------------------------------------------------------------


class Control:
    name = "control"
    metric_counters = ("requests",)

    def __init__(self, cfg: ControlConfig) -> None:
        self.cfg = cfg
        self.meter = RateMeter()
        self.handlers: dict[str, Handler] = {}
        self.daemon: Daemon | None = None
        self.server: asyncio.AbstractServer | None = None
        self.bound: tuple[str, int, int] | None = None  # (path, st_dev, st_ino) of our socket
        self.sampler: asyncio.Task[None] | None = None
        self.clients: set[asyncio.Task[Any]] = set()
        self.reload_lock = asyncio.Lock()
        self.requests = 0
        self.register("status", self._cmd_status)
        self.register("reload", self._cmd_reload)
        self.register("help", self._cmd_help)

    # -- registry ----------------------------------------------------------------------------

    def register(self, name: str, handler: Handler) -> None:
        """Add command ``name``; registering a name twice is a programming error."""
        if name in self.handlers:
            raise ValueError(f"control command {name!r} is already registered")
        self.handlers[name] = handler

    async def dispatch(self, line: bytes) -> dict[str, Any]:
        self.requests += 1
        try:
            cmd, args = parse_request(line)
            handler = self.handlers.get(cmd)
            if handler is None:
                known = ", ".join(sorted(self.handlers))
                raise CommandError(f"unknown command {cmd!r} (commands: {known})")
            return {"ok": True, "result": await handler(args)}
        except CommandError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a handler bug is answered, logged, and the daemon goes on
            log.exception("control command failed")
            return {"ok": False, "error": f"internal error: {exc!r}"}

    # -- built-in commands -------------------------------------------------------------------

    async def _cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.daemon is None:
            raise CommandError("the daemon is not running")
        return snapshot(self.daemon, self.meter)

    async def _cmd_reload(self, args: dict[str, Any]) -> dict[str, Any]:
        daemon = self.daemon
        if daemon is None:
            raise CommandError("the daemon is not running")
        async with self.reload_lock:
            # This reload's own outcome: a SIGHUP's reload may run just before or after it.
            if not await daemon.reload():
                # Daemon.reload logs the reason and keeps the old config running.
                raise CommandError("reload refused, the running configuration is kept; see the log")
        return {"reloaded": True, "config": daemon.cfg.path}

    async def _cmd_help(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"commands": sorted(self.handlers)}

    # -- Component protocol ------------------------------------------------------------------

    def rules_extras(self, cfg: Config) -> dict[str, Any]:
        return {}

    def status(self) -> dict[str, Any]:
        return {
            "socket": self.bound[0] if self.bound else None,
            "clients": len(self.clients),
            "requests": self.requests,
        }

    async def start(self, daemon: Daemon) -> None:
        self.daemon = daemon
        stats = daemon.server.stats
        self.meter.sample(time.monotonic(), stats.requests_total)
        self.sampler = asyncio.get_running_loop().create_task(
            self._sample_loop(daemon), name="control rate sampler"
        )
        if self.cfg.enabled:
            try:
                await self._listen(daemon.cfg.path, self.cfg)
            except SocketInUse as exc:
                # Two daemons in one network namespace already collide on the TPROXY port, so
                # a live socket belongs to a daemon in another namespace sharing /run (a lab, a
                # container): proxying matters more than status, so run on without the socket.
                log.error("%s; `tproxy status` will not reach this daemon", exc)

    async def reload(self, daemon: Daemon, cfg: Config) -> None:
        new = control_config(cfg)
        if new == self.cfg:
            return
        old_server, old_bound = self.server, self.bound
        if new.enabled and (not self.cfg.enabled or new.socket != self.cfg.socket):
            # Bind the new socket before closing the old: a failure refuses the reload and
            # leaves the running socket as it was.
            await self._listen(cfg.path, new)
        elif new.enabled:
            _set_owner(cfg.path, new.socket, new)
            old_server = None
        else:
            self.server, self.bound = None, None
        if old_server is not None and old_server is not self.server:
            self._close(old_server, old_bound)
        self.cfg = new

    async def stop(self, daemon: Daemon) -> None:
        if self.sampler is not None:
            self.sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sampler
            self.sampler = None
        if self.server is not None:
            self._close(self.server, self.bound)
            self.server, self.bound = None, None
        for task in list(self.clients):
            task.cancel()
        if self.clients:
            await asyncio.gather(*self.clients, return_exceptions=True)
        self.daemon = None

    # -- socket ------------------------------------------------------------------------------

    async def _sample_loop(self, daemon: Daemon) -> None:
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            self.meter.sample(time.monotonic(), daemon.server.stats.requests_total)

    async def _listen(self, cfg_path: str, cfg: ControlConfig) -> None:
        path = cfg.socket
        key = "control.socket"
        try:
            # /run/tproxy normally comes from systemd's RuntimeDirectory=; create it otherwise.
            Path(path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                cfg_path, key, f"cannot create {Path(path).parent}: {exc.strerror}"
            ) from None
        await _clear_stale(cfg_path, path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # Permissions are set before listen(): until then connect(2) is refused, so there is
            # no moment in which the socket is reachable with the umask's looser mode.
            _set_owner(cfg_path, path, cfg)
            st = os.stat(path)
            server = await asyncio.start_unix_server(
                self._client, sock=sock, limit=MAX_REQUEST_LINE
            )
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise ConfigError(cfg_path, key, f"cannot listen on {path}: {exc.strerror}") from None
        except ConfigError:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self.server = server
        self.bound = (path, st.st_dev, st.st_ino)
        log.info("control socket %s (mode %04o)", path, cfg.mode)

    def _close(self, server: asyncio.AbstractServer, bound: tuple[str, int, int] | None) -> None:
        server.close()
        if bound is None:
            return
        path, dev, ino = bound
        # Remove the file only if it is still ours: another daemon may have replaced it.
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.clients.add(task)
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), CLIENT_IDLE_TIMEOUT)
                except ValueError:  # StreamReader.readline: the line passed the buffer limit
                    writer.write(encode_response({"ok": False, "error": "request too long"}))
                    await writer.drain()
                    return
                except TimeoutError:
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                writer.write(encode_response(await self.dispatch(line)))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if task is not None:
                self.clients.discard(task)
            writer.close()


def _set_owner(cfg_path: str, path: str, cfg: ControlConfig) -> None:
    if cfg.group:
        try:
            gid = grp.getgrnam(cfg.group).gr_gid
        except KeyError:
            raise ConfigError(cfg_path, "control.group", f"no such group: {cfg.group!r}") from None
        try:
            os.chown(path, -1, gid)
        except OSError as exc:
            # The unit keeps no CAP_CHOWN: a file can go only to a group the daemon is in.
            raise ConfigError(
                cfg_path,
                "control.group",
                f"cannot give {path} to group {cfg.group!r}: {exc.strerror}; the daemon must be "
                f"in that group (systemctl edit tproxy: [Service] SupplementaryGroups="
                f"{cfg.group})",
            ) from None
    try:
        os.chmod(path, cfg.mode)
    except OSError as exc:
        raise ConfigError(
            cfg_path, "control.mode", f"cannot set owner/mode of {path}: {exc.strerror}"
        ) from None


async def _clear_stale(cfg_path: str, path: str) -> None:
    """Remove a socket file left by a daemon that died; refuse to steal a live one's."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(cfg_path, "control.socket", f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(probe, path), STALE_PROBE_TIMEOUT)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("removed stale control socket %s", path)
        return
    except (OSError, TimeoutError) as exc:
        raise ConfigError(cfg_path, "control.socket", f"cannot probe {path}: {exc!r}") from None
    finally:
        probe.close()
    raise SocketInUse(
        cfg_path, "control.socket", f"{path} is in use: another tproxy daemon is running"
    )


def create(cfg: Config) -> Control:
    """Component factory (tproxy.component.COMPONENTS)."""
    return Control(control_config(cfg))
