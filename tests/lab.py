"""The test lab: client(s), a gateway and an origin, each in its own network namespace.

    client(s) ── veth ── [bridge l<tag>] gateway [w<tag>] ── veth ── origin (nginx)

Every lab has a unique tag; its namespaces are ``tpl-<tag>-c1`` (``-c2`` …), ``tpl-<tag>-gw`` and
``tpl-<tag>-or``. Addresses are fixed (the same in every lab) because each lab's links live only
inside its own namespaces, so two labs never share an address space.

The LAN side of the gateway is a bridge even with one client so that netfilter rules written for
``-i l<tag>`` see every client on the same input interface.

State of a running lab is written to ``/run/tproxy-lab/<tag>.json`` *before* anything is created,
so ``down`` works from another process and a crashed owner's debris is found by
``Lab.cleanup_stale()`` (called from every ``up()``).

Only the standard library is used: the file also runs as a script behind ``scripts/lab``::

    lab.py up [--tag T] [--clients N] [--origin-workers N] [--json]
                                           # prints the tag; the lab persists until `down`
    lab.py down TAG | --all
    lab.py exec TAG client|client2|gateway|origin -- CMD...
    lab.py list
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

STATE_DIR = Path("/run/tproxy-lab")
NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")
NS_PREFIX = "tpl-"

# Tags become part of interface names; IFNAMSIZ is 16 including the NUL (linux/if.h), and the
# longest name we build is "l" + tag + "p" + two digits.
TAG_RE = re.compile(r"^[a-z0-9]{1,10}$")
MAX_CLIENTS = 8

LAN_V4_NET = "10.77.1.0/24"
WAN_V4_NET = "10.77.2.0/24"
LAN_V6_NET = "fd77:1::/64"
WAN_V6_NET = "fd77:2::/64"
GW_LAN_V4 = "10.77.1.1"
GW_WAN_V4 = "10.77.2.1"
GW_LAN_V6 = "fd77:1::1"
GW_WAN_V6 = "fd77:2::1"
ORIGIN_V4 = "10.77.2.80"
ORIGIN_V6 = "fd77:2::80"
CLIENT_HOST_BASE = 10  # client i (0-based) is 10.77.1.(10+i) and fd77:1::(10+i)
ORIGIN_NAME = "origin.lab"
ORIGIN_NAMES = (ORIGIN_NAME, "www.origin.lab")
HOST_IF = "eth0"  # interface name inside client and origin namespaces

ORIGIN_PORTS = (80, 8080)
ORIGIN_FILES = {"1k": 1024, "64k": 64 * 1024, "16m": 16 * 1024 * 1024}
ORIGIN_FILE_SEED = 0x7A5  # same bytes in every lab, so content can be compared across runs
KEEPALIVE_REQUESTS = 1_000_000
WORKER_CONNECTIONS = 8192

DEFAULT_RUN_TIMEOUT = 30.0
CURL_MAX_TIME = 5.0
START_TIMEOUT = 5.0  # for a server in the lab to start listening
STOP_GRACE = 2.0  # SIGTERM → SIGKILL
POLL = 0.02
UNWRITTEN_STATE_AGE = 60.0  # an empty state file older than this is debris

# Proxy variables from the caller's environment must never redirect lab traffic elsewhere.
PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")


class LabError(RuntimeError):
    """A lab could not be built, driven or torn down."""


class LabCommandError(subprocess.CalledProcessError):
    """A command in the lab failed; unlike its base class, the message shows its stderr."""

    def __str__(self) -> str:
        err = self.stderr if isinstance(self.stderr, str) else ""
        return f"{super().__str__()}\nstderr: {err.strip()[-2000:]}"


class CurlResult(NamedTuple):
    status: int  # 0 when no response arrived (see stderr)
    body: bytes
    stderr: str


@dataclass(frozen=True)
class _Proc:
    pid: int
    start: int  # /proc/<pid>/stat starttime: tells a reused PID from ours
    group: bool  # started in its own session: signal the whole process group


# ip, nginx and sysctl live in sbin, which a non-login environment may lack on PATH.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def clean_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for lab processes: no proxy variables, sbin on PATH."""
    base = dict(os.environ if env is None else env)
    for name in PROXY_ENV:
        base.pop(name, None)
        base.pop(name.upper(), None)
    path = base.get("PATH", "/usr/bin:/bin").split(":")
    base["PATH"] = ":".join(path + [d for d in SBIN_DIRS if d not in path])
    return base


def tool(name: str) -> str:
    """Absolute path of a system tool, or the bare name when it is not installed."""
    return shutil.which(name, path=clean_env()["PATH"]) or name


LAB_TOOLS = ("ip", "nginx", "curl", "sysctl")


def skip_reason() -> str | None:
    """Why a lab cannot be built here (for pytest.skip), or None when it can."""
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, veth, sysctl)"
    path = clean_env()["PATH"]
    missing = [t for t in LAB_TOOLS if shutil.which(t, path=path) is None]
    if missing:
        return f"lab tests need {', '.join(missing)} installed"
    return None


def _proc_start(pid: int) -> int | None:
    """Start time of a live (non-zombie) process, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _alive(proc: _Proc) -> bool:
    return _proc_start(proc.pid) == proc.start


def _signal(proc: _Proc, sig: signal.Signals) -> None:
    if not _alive(proc):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if proc.group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)


def _stop_procs(procs: Sequence[_Proc], popens: Mapping[int, subprocess.Popen[Any]]) -> None:
    """SIGTERM, wait up to STOP_GRACE, then SIGKILL; reap our own children."""
    for p in procs:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for p in procs:
        while _alive(p) and time.monotonic() < deadline:
            child = popens.get(p.pid)
            if child is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=POLL)
            else:
                time.sleep(POLL)
        if _alive(p):
            _signal(p, signal.SIGKILL)
    for p in procs:
        child = popens.get(p.pid)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=STOP_GRACE)


def _ns_pids(ns: str) -> list[int]:
    if not (NETNS_RUN / ns).exists():
        return []
    out = subprocess.run(
        [tool("ip"), "netns", "pids", ns], capture_output=True, text=True, check=False
    ).stdout
    return [int(x) for x in out.split()]


def _ip_batch(lines: Sequence[str], ns: str | None = None, force: bool = False) -> None:
    argv = [tool("ip")]
    if ns is not None:
        argv += ["-n", ns]
    if force:
        argv.append("-force")
    argv += ["-batch", "-"]
    res = subprocess.run(
        argv, input="\n".join(lines) + "\n", capture_output=True, text=True, check=False
    )
    if res.returncode != 0 and not force:
        raise LabError(f"{' '.join(argv)} failed: {res.stderr.strip()}")


def _teardown(state: Mapping[str, Any], popens: Mapping[int, subprocess.Popen[Any]]) -> None:
    """Undo everything a state file describes; every step tolerates missing pieces."""
    procs = [_Proc(p["pid"], p["start"], p["group"]) for p in state.get("procs", [])]
    _stop_procs(procs, popens)
    namespaces: list[str] = list(state.get("namespaces", []))
    # Whatever still runs inside our namespaces was started there by lab users (a shell from
    # `lab exec`, a daemon under test): without this sweep it would keep the namespace alive.
    stray = [
        _Proc(pid, start, False)
        for ns in namespaces
        for pid in _ns_pids(ns)
        if (start := _proc_start(pid)) is not None
    ]
    _stop_procs(stray, {})
    live = [ns for ns in namespaces if (NETNS_RUN / ns).exists()]
    if live:
        _ip_batch([f"netns del {ns}" for ns in live], force=True)
    for ns in namespaces:
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    tmpdir = state.get("tmpdir")
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"{state['tag']}.json").unlink()


def _read_state(tag: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((STATE_DIR / f"{tag}.json").read_text())
    except (OSError, ValueError):
        return None
    return data


def _state_tags() -> list[str]:
    if not STATE_DIR.is_dir():
        return []
    return sorted(p.stem for p in STATE_DIR.glob("*.json"))


def _owner_alive(state: Mapping[str, Any]) -> bool:
    pid = state.get("owner_pid")
    if pid is None:  # persistent lab from `lab up`: lives until `lab down`
        return True
    return _proc_start(int(pid)) == state.get("owner_start")


def _listening(pid: int) -> set[int]:
    """TCP ports in LISTEN in the network namespace of `pid` (proc(5): /proc/<pid>/net/tcp)."""
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _nginx_conf(root: Path, workers: int) -> str:
    www = root / "www"
    listen = "\n".join(
        f"        listen {port} reuseport backlog=4096;\n"
        f"        listen [::]:{port} ipv6only=on reuseport backlog=4096;"
        for port in ORIGIN_PORTS
    )
    temps = "\n".join(
        f"    {kind}_temp_path {root}/tmp/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
# Generated by tests/lab.py; everything nginx writes stays in {root}.
daemon off;
master_process on;
worker_processes {workers};
user root;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections {WORKER_CONNECTIONS}; }}
http {{
    log_format lab '$remote_addr $connection $connection_requests "$request" $status';
    access_log {root}/access.log lab;
{temps}
    sendfile on;
    tcp_nopush on;
    keepalive_requests {KEEPALIVE_REQUESTS};
    keepalive_timeout 120s;
    server_tokens off;
    default_type application/octet-stream;
    server {{
{listen}
        server_name _;
        root {www};
        location = / {{
            default_type text/plain;
            return 200 "{ORIGIN_NAME}\\n";
        }}
        location /files/ {{
            add_header Cache-Control "max-age=3600";
        }}
        location /nocache/ {{
            alias {www}/files/;
            add_header Cache-Control "no-store";
        }}
        location = /ip {{
            default_type text/plain;
            return 200 "$remote_addr\\n";
        }}
        location = /conn {{
            default_type text/plain;
            return 200 "$connection $connection_requests\\n";
        }}
    }}
}}
"""


def origin_file_bytes(name: str) -> bytes:
    """The exact content the origin serves at /files/<name> in every lab."""
    size = ORIGIN_FILES[name]
    return random.Random(f"{ORIGIN_FILE_SEED}:{name}").randbytes(size)


class Lab:
    """One lab. Use as a context manager, or call up() and down() (both idempotent)."""

    def __init__(
        self, tag: str | None = None, clients: int = 1, *, origin_workers: int = 1
    ) -> None:
        if tag is None:
            tag = secrets.token_hex(3)
        if not TAG_RE.match(tag):
            raise LabError(f"lab tag {tag!r} must match {TAG_RE.pattern}")
        if not 1 <= clients <= MAX_CLIENTS:
            raise LabError(f"clients must be 1..{MAX_CLIENTS}, got {clients}")
        self.tag = tag
        self.clients = clients
        self.origin_workers = origin_workers  # nginx worker processes (the benchmark wants more)
        self.persistent = False  # set by the CLI: no owner process, lives until `lab down`

        # Namespaces
        self.ns_clients = [f"{NS_PREFIX}{tag}-c{i + 1}" for i in range(clients)]
        self.ns_client = self.ns_clients[0]
        self.ns_gateway = f"{NS_PREFIX}{tag}-gw"
        self.ns_origin = f"{NS_PREFIX}{tag}-or"
        self.namespaces = [*self.ns_clients, self.ns_gateway, self.ns_origin]

        # Interfaces
        self.gw_lan_if = f"l{tag}"  # a bridge over the client veths
        self.gw_wan_if = f"w{tag}"
        self.gw_lan_ports = [f"l{tag}p{i + 1}" for i in range(clients)]
        self.client_if = HOST_IF
        self.origin_if = HOST_IF

        # Addresses
        self.lan_v4_net, self.lan_v6_net = LAN_V4_NET, LAN_V6_NET
        self.wan_v4_net, self.wan_v6_net = WAN_V4_NET, WAN_V6_NET
        self.gw_lan_v4, self.gw_lan_v6 = GW_LAN_V4, GW_LAN_V6
        self.gw_wan_v4, self.gw_wan_v6 = GW_WAN_V4, GW_WAN_V6
        self.origin_v4, self.origin_v6 = ORIGIN_V4, ORIGIN_V6
        self.clients_v4 = [f"10.77.1.{CLIENT_HOST_BASE + i}" for i in range(clients)]
        self.clients_v6 = [f"fd77:1::{CLIENT_HOST_BASE + i}" for i in range(clients)]
        self.client_v4, self.client_v6 = self.clients_v4[0], self.clients_v6[0]
        self.origin_name = ORIGIN_NAME

        self.tmpdir: Path | None = None
        self._procs: list[_Proc] = []
        self._popens: dict[int, subprocess.Popen[Any]] = {}
        self._nginx: subprocess.Popen[Any] | None = None
        self._up = False
        self._owner = os.getpid()
        self._seq = itertools.count(1)  # next() is atomic under the GIL: curl() from threads

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    @property
    def is_up(self) -> bool:
        return self._up

    @property
    def state_path(self) -> Path:
        return STATE_DIR / f"{self.tag}.json"

    def _state(self) -> dict[str, Any]:
        owner = None if self.persistent else os.getpid()
        return {
            "tag": self.tag,
            "clients": self.clients,
            "owner_pid": owner,
            "owner_start": None if owner is None else _proc_start(owner),
            "namespaces": self.namespaces,
            "tmpdir": str(self.tmpdir) if self.tmpdir else None,
            "procs": [{"pid": p.pid, "start": p.start, "group": p.group} for p in self._procs],
            "created": time.time(),
        }

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state(), indent=1))
        tmp.replace(self.state_path)  # atomic: a concurrent `down` never reads half a file

    def up(self) -> Lab:
        if self._up:
            return self
        Lab.cleanup_stale()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        if any((NETNS_RUN / ns).exists() for ns in self.namespaces):
            raise LabError(f"a lab with tag {self.tag!r} already exists")
        try:  # O_EXCL claims the tag atomically against a concurrent up() with the same tag
            self.state_path.open("x").close()
        except FileExistsError:
            raise LabError(f"a lab with tag {self.tag!r} already exists") from None
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{self.tag}-"))
        # Record first, create second: a crash at any later point leaves debris `down` can find.
        self._save_state()
        self._up = True
        self._owner = os.getpid()
        if not self.persistent:
            atexit.register(self._atexit)
        try:
            self._build_network()
            self._write_names()
            self._start_nginx()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        if not self._up:
            return
        self._up = False
        atexit.unregister(self._atexit)
        _teardown(self._state(), self._popens)
        self._procs.clear()
        self._popens.clear()
        self._nginx = None

    def _atexit(self) -> None:
        # A forked child inherits atexit handlers; only the process that built the lab may
        # tear it down at exit.
        if os.getpid() == self._owner:
            self.down()

    @staticmethod
    def cleanup_stale() -> list[str]:
        """Tear down labs whose owner process is dead; returns their tags."""
        removed = []
        for tag in _state_tags():
            state = _read_state(tag)
            if state is None or "tag" not in state:
                # Claimed by up() but never written: its owner died within microseconds.
                path = STATE_DIR / f"{tag}.json"
                with contextlib.suppress(OSError):
                    if time.time() - path.stat().st_mtime > UNWRITTEN_STATE_AGE:
                        path.unlink()
                continue
            if not _owner_alive(state):
                _teardown(state, {})
                removed.append(tag)
        return removed

    @staticmethod
    def down_tag(tag: str) -> bool:
        """Tear down the lab recorded under `tag` (from any process); False if unknown."""
        state = _read_state(tag)
        if state is None:
            return False
        _teardown(state, {})
        return True

    # ------------------------------------------------------------------- network

    def _build_network(self) -> None:
        root = [f"netns add {ns}" for ns in self.namespaces]
        for ns, port in zip(self.ns_clients, self.gw_lan_ports, strict=True):
            root.append(
                f"link add {HOST_IF} netns {ns} type veth peer name {port} netns {self.ns_gateway}"
            )
        root.append(
            f"link add {HOST_IF} netns {self.ns_origin} type veth "
            f"peer name {self.gw_wan_if} netns {self.ns_gateway}"
        )
        _ip_batch(root)

        # Before any link is up. accept_dad=0: a tentative link-local address cannot source the
        # Neighbor Solicitations the kernel sends for forwarded packets (ndisc_solicit), which
        # stalled the first forwarded v6 connection for ~2 s (RFC 4862 §5.4: DAD takes ~1 s
        # plus a random delay). The effective value is max(all, interface) (kernel
        # Documentation/networking/ip-sysctl.rst), so all, default and each interface are set.
        no_dad = {f"net.ipv6.conf.{i}.accept_dad": "0" for i in ("all", "default")}
        for ns in [*self.ns_clients, self.ns_origin]:
            self._sysctl_ns(ns, {**no_dad, f"net.ipv6.conf.{HOST_IF}.accept_dad": "0"})
        gw_ifs = [*self.gw_lan_ports, self.gw_wan_if]
        # rp_filter is max(all, interface) as well; the bridge created below takes `default`.
        self._sysctl_ns(
            self.ns_gateway,
            {
                **no_dad,
                **{f"net.ipv6.conf.{i}.accept_dad": "0" for i in gw_ifs},
                "net.ipv4.ip_forward": "1",
                "net.ipv6.conf.all.forwarding": "1",
                "net.ipv4.conf.all.rp_filter": "0",
                "net.ipv4.conf.default.rp_filter": "0",
                **{f"net.ipv4.conf.{i}.rp_filter": "0" for i in gw_ifs},
            },
        )
        if Path("/proc/sys/net/bridge").exists():
            # br_netfilter (loaded on hosts that run Docker, for one) runs the iptables hooks at
            # the bridge layer, and ip_rcv then orphans the socket TPROXY assigned: diverted
            # SYNs are answered with RST. The setting is per namespace (tproxy's preflight
            # names it); the lab gateway runs as a gateway with it off.
            self._sysctl_ns(
                self.ns_gateway,
                {
                    "net.bridge.bridge-nf-call-iptables": "0",
                    "net.bridge.bridge-nf-call-ip6tables": "0",
                },
            )

        gw = [
            "link set lo up",
            # stp off and no forward delay: ports forward as soon as they are up.
            f"link add {self.gw_lan_if} type bridge stp_state 0 forward_delay 0",
            *(f"link set {p} master {self.gw_lan_if} up" for p in self.gw_lan_ports),
            # `nodad`: usable at once instead of tentative (RFC 4862 §5.4).
            f"addr add {GW_LAN_V4}/24 dev {self.gw_lan_if}",
            f"addr add {GW_LAN_V6}/64 dev {self.gw_lan_if} nodad",
            f"addr add {GW_WAN_V4}/24 dev {self.gw_wan_if}",
            f"addr add {GW_WAN_V6}/64 dev {self.gw_wan_if} nodad",
            f"link set {self.gw_lan_if} up",
            f"link set {self.gw_wan_if} up",
        ]
        _ip_batch(gw, ns=self.ns_gateway)
        for ns, v4, v6 in zip(self.ns_clients, self.clients_v4, self.clients_v6, strict=True):
            _ip_batch(self._host_lines(v4, v6, GW_LAN_V4, GW_LAN_V6), ns=ns)
        _ip_batch(self._host_lines(ORIGIN_V4, ORIGIN_V6, GW_WAN_V4, GW_WAN_V6), ns=self.ns_origin)

    @staticmethod
    def _sysctl_ns(ns: str, values: Mapping[str, str]) -> None:
        argv = [tool("ip"), "netns", "exec", ns, tool("sysctl"), "-q", "-w"]
        argv += [f"{k}={v}" for k, v in values.items()]
        res = subprocess.run(argv, capture_output=True, text=True, check=False, env=clean_env())
        if res.returncode != 0:
            raise LabError(f"sysctl in {ns} failed: {res.stderr.strip()}")

    @staticmethod
    def _host_lines(v4: str, v6: str, gw4: str, gw6: str) -> list[str]:
        return [
            "link set lo up",
            f"addr add {v4}/24 dev {HOST_IF}",
            f"addr add {v6}/64 dev {HOST_IF} nodad",
            f"link set {HOST_IF} up",
            f"route add default via {gw4}",
            f"route add ::/0 via {gw6}",
        ]

    def _write_names(self) -> None:
        # `ip netns exec` bind-mounts /etc/netns/<ns>/<file> over /etc/<file> (ip-netns(8)).
        lines = [
            "127.0.0.1 localhost",
            "::1 localhost ip6-localhost ip6-loopback",
            f"{ORIGIN_V4} {' '.join(ORIGIN_NAMES)}",
            f"{ORIGIN_V6} {' '.join(ORIGIN_NAMES)}",
            f"{GW_LAN_V4} gateway.lab",
            f"{GW_LAN_V6} gateway.lab",
        ]
        for i, (v4, v6) in enumerate(zip(self.clients_v4, self.clients_v6, strict=True)):
            name = "client.lab" if i == 0 else f"client{i + 1}.lab"
            lines += [f"{v4} {name}", f"{v6} {name}"]
        hosts = "\n".join(lines) + "\n"
        for ns in self.namespaces:
            d = NETNS_ETC / ns
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text(hosts)
            if Path("/etc/resolv.conf").exists():
                # A name missing from hosts must not leave the lab: ask loopback, get nothing.
                (d / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1\n")

    # ------------------------------------------------------------------ origin

    def _start_nginx(self) -> None:
        assert self.tmpdir is not None
        root = self.tmpdir / "nginx"
        (root / "www" / "files").mkdir(parents=True)
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (root / "tmp" / kind).mkdir(parents=True)
        for name in ORIGIN_FILES:
            (root / "www" / "files" / name).write_bytes(origin_file_bytes(name))
        (root / "access.log").touch()
        conf = root / "nginx.conf"
        conf.write_text(_nginx_conf(root, self.origin_workers))
        out = (root / "stderr.log").open("wb")
        try:
            # -e: errors before the config is read go to our dir, not /var/log/nginx.
            self._nginx = self.popen(
                "origin",
                [tool("nginx"), "-p", f"{root}/", "-c", str(conf), "-e", f"{root}/error.log"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            out.close()
        self._wait_listen(self._nginx, ORIGIN_PORTS, root / "error.log")

    def _wait_listen(
        self, proc: subprocess.Popen[Any], ports: Sequence[int], log: Path | None
    ) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                text = log.read_text(errors="replace") if log and log.exists() else ""
                raise LabError(f"{proc.args!r} exited with {proc.returncode}: {text[-2000:]}")
            if set(ports) <= _listening(proc.pid):
                return
            if time.monotonic() > deadline:
                raise LabError(f"{proc.args!r} did not listen on {list(ports)} in time")
            time.sleep(POLL)

    @property
    def origin_dir(self) -> Path:
        assert self.tmpdir is not None, "lab is not up"
        return self.tmpdir / "nginx"

    def origin_file(self, name: str) -> Path:
        """Path of the file served at /files/<name> and /nocache/<name>."""
        return self.origin_dir / "www" / "files" / name

    def origin_log(self, min_lines: int = 0, timeout: float = 2.0) -> list[str]:
        """Lines of the origin's access log: `$remote_addr $connection $connection_requests
        "$request" $status`. nginx logs after the response is sent, so this waits up to
        `timeout` for at least `min_lines` lines."""
        path = self.origin_dir / "access.log"
        deadline = time.monotonic() + timeout
        while True:
            lines = path.read_text(errors="replace").splitlines()
            if len(lines) >= min_lines or time.monotonic() > deadline:
                return lines
            time.sleep(POLL)

    def start_origin_python(
        self, script: str | Path, port: int, args: Sequence[str] = ()
    ) -> subprocess.Popen[Any]:
        """Run a Python server in the origin namespace and wait until it listens on `port`.

        `script` is a path to a file or Python source. The port arrives as sys.argv[1] and in
        $LAB_PORT. Output goes to <tmpdir>/pyorigin-<port>.log. Killed on down()."""
        assert self.tmpdir is not None, "lab is not up"
        path = Path(script)
        is_file = isinstance(script, Path) or (
            "\n" not in script and len(script) < 4096 and path.is_file()
        )
        target = ["-u", str(path)] if is_file else ["-u", "-c", str(script)]
        log = self.tmpdir / f"pyorigin-{port}.log"
        env = clean_env()
        env["LAB_PORT"] = str(port)
        with log.open("wb") as out:
            proc = self.popen(
                "origin",
                [sys.executable, *target, str(port), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self._wait_listen(proc, [port], log)
        return proc

    # ----------------------------------------------------------------- commands

    def ns(self, host: str) -> str:
        """Namespace of "client" (the first), "clientN", "gateway" or "origin"."""
        if host in ("gateway", "gw"):
            return self.ns_gateway
        if host in ("origin", "or"):
            return self.ns_origin
        if host == "client":
            return self.ns_clients[0]
        m = re.fullmatch(r"client(\d+)", host)
        if m and 1 <= int(m.group(1)) <= self.clients:
            return self.ns_clients[int(m.group(1)) - 1]
        raise LabError(f"unknown lab host {host!r} (lab has {self.clients} client(s))")

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside `host`'s namespace (for callers that exec themselves)."""
        return [tool("ip"), "netns", "exec", self.ns(host), *map(str, argv)]

    def run(
        self,
        host: str,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = DEFAULT_RUN_TIMEOUT,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion in `host`; stdout/stderr captured as text."""
        self._require_up()
        res = subprocess.run(
            self.argv(host, argv),
            check=False,
            timeout=timeout,
            input=input,
            capture_output=True,
            text=True,
            errors="replace",
            env=clean_env(env),
        )
        if check and res.returncode != 0:
            raise LabCommandError(res.returncode, res.args, res.stdout, res.stderr)
        return res

    def popen(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process in `host`, tracked and killed (with its process group) on down()."""
        self._require_up()
        kw.setdefault("start_new_session", True)
        kw["env"] = clean_env(kw.get("env"))
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(host, argv), **kw)
        start = _proc_start(proc.pid)
        if start is not None:
            self._procs.append(_Proc(proc.pid, start, bool(kw["start_new_session"])))
            self._popens[proc.pid] = proc
            self._save_state()
        return proc

    def curl(self, host: str, url: str, *args: str, timeout: float = CURL_MAX_TIME) -> CurlResult:
        """Real curl in `host`. Later `args` override the defaults (e.g. "--max-time", "2")."""
        assert self.tmpdir is not None, "lab is not up"
        body_path = self.tmpdir / f"curl-{os.getpid()}-{next(self._seq)}.body"
        argv = [
            "curl", "-sS", "--noproxy", "*", "--max-time", f"{timeout:g}",
            "-o", str(body_path), "-w", "%{http_code}", *args, url,
        ]  # fmt: skip
        res = self.run(host, argv, check=False, timeout=timeout + 30)
        try:
            body = body_path.read_bytes()
            body_path.unlink()
        except FileNotFoundError:
            body = b""
        code = res.stdout.strip()[-3:]
        return CurlResult(int(code) if code.isdigit() else 0, body, res.stderr)

    def sysctl(self, host: str, values: Mapping[str, str]) -> None:
        """Set sysctls inside `host` (net.* keys are per namespace)."""
        self._require_up()
        self._sysctl_ns(self.ns(host), values)

    def set_forwarding(self, on: bool) -> None:
        """IP forwarding on the gateway, v4 and v6 (DESIGN.md §4: off proves interception)."""
        v = "1" if on else "0"
        self.sysctl("gateway", {"net.ipv4.ip_forward": v, "net.ipv6.conf.all.forwarding": v})

    def wait_port(self, host: str, port: int, timeout: float = START_TIMEOUT) -> None:
        """Wait until something listens on TCP `port` in `host`."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.run(host, ["cat", "/proc/net/tcp", "/proc/net/tcp6"]).stdout
            for line in out.splitlines():
                f = line.split()
                if len(f) > 3 and f[3] == "0A" and f[1].endswith(f":{port:04X}"):
                    return
            if time.monotonic() > deadline:
                raise LabError(f"nothing listens on {host}:{port} after {timeout}s")
            time.sleep(POLL)

    def url(self, path: str = "/", v6: bool | None = None, port: int = 80) -> str:
        """Origin URL: by name (v6=None), or by literal v4 / v6 address."""
        literal = f"[{ORIGIN_V6}]" if v6 else ORIGIN_V4
        host = ORIGIN_NAME if v6 is None else literal
        return f"http://{host}{'' if port == 80 else f':{port}'}{path}"

    def _require_up(self) -> None:
        if not self._up:
            raise LabError(f"lab {self.tag} is not up")

    def describe(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "namespaces": {
                "clients": self.ns_clients,
                "gateway": self.ns_gateway,
                "origin": self.ns_origin,
            },
            "interfaces": {"gw_lan": self.gw_lan_if, "gw_wan": self.gw_wan_if},
            "addresses": {
                "clients_v4": self.clients_v4,
                "clients_v6": self.clients_v6,
                "gw_lan": [GW_LAN_V4, GW_LAN_V6],
                "gw_wan": [GW_WAN_V4, GW_WAN_V6],
                "origin": [ORIGIN_V4, ORIGIN_V6],
            },
            "tmpdir": str(self.tmpdir),
        }


# ---------------------------------------------------------------------- CLI


def _cli_exec(tag: str, host: str, cmd: list[str]) -> int:
    state = _read_state(tag)
    if state is None:
        print(f"lab: no lab {tag!r}", file=sys.stderr)
        return 2
    lab = Lab(tag, clients=int(state.get("clients", 1)))
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("lab: exec needs a command after --", file=sys.stderr)
        return 2
    argv = lab.argv(host, cmd)
    os.execvpe(argv[0], argv, clean_env())
    return 127  # not reached


def _iter_list() -> Iterator[str]:
    for tag in _state_tags():
        state = _read_state(tag) or {}
        owner = state.get("owner_pid")
        who = "persistent" if owner is None else f"owner={owner}"
        status = "up" if _owner_alive(state) else "stale"
        yield f"{tag}\t{status}\t{who}\t{' '.join(state.get('namespaces', []))}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lab", description="tproxy test lab (network namespaces)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="build a lab that persists until `down`; prints its tag")
    p_up.add_argument("--tag")
    p_up.add_argument("--clients", type=int, default=1)
    p_up.add_argument("--origin-workers", type=int, default=1)
    p_up.add_argument("--json", action="store_true", help="print a JSON description instead")
    p_down = sub.add_parser("down", help="tear down a lab by tag, or all labs")
    p_down.add_argument("tag", nargs="?")
    p_down.add_argument("--all", action="store_true")
    p_exec = sub.add_parser("exec", help="run a command in a lab host")
    p_exec.add_argument("tag")
    p_exec.add_argument("host", help="client, client2, gateway or origin")
    p_exec.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("list", help="list labs")
    a = ap.parse_args(argv)

    if os.geteuid() != 0 and a.cmd != "list":
        print("lab: must run as root (network namespaces)", file=sys.stderr)
        return 1
    try:
        if a.cmd == "up":
            lab = Lab(a.tag, clients=a.clients, origin_workers=a.origin_workers)
            lab.persistent = True
            lab.up()
            print(json.dumps(lab.describe(), indent=1) if a.json else lab.tag)
            return 0
        if a.cmd == "down":
            if a.all == (a.tag is not None):
                print("lab: down needs a TAG or --all", file=sys.stderr)
                return 2
            tags = _state_tags() if a.all else [a.tag]
            rc = 0
            for tag in tags:
                if not Lab.down_tag(tag):
                    print(f"lab: no lab {tag!r}", file=sys.stderr)
                    rc = 1
            return rc
        if a.cmd == "exec":
            return _cli_exec(a.tag, a.host, list(a.command))
        for line in _iter_list():
            print(line)
        return 0
    except LabError as e:
        print(f"lab: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `scripts/lab list | head` closed the pipe: not an error
        return 0


if __name__ == "__main__":
    sys.exit(main())
