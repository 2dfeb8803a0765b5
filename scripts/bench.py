"""Side-by-side benchmark in the netns lab: routed (no proxy), Squid and tproxy.

One lab (client / gateway / origin nginx, tests/lab.py) hosts every configuration in turn, so the
three see the same kernel, links and origin:

* ``noproxy`` - the gateway only forwards;
* ``squid``   - Debian's Squid as a TPROXY interceptor (``http_port 3129 tproxy``) behind the same
  kernel rules tproxy installs (``tproxy rules apply``: ``-m socket`` divert, ``TPROXY --on-port
  3129 --on-ip 127.0.0.1``, fwmark route into the ``local`` table);
* ``tproxy``  - ``tproxy run`` with its own rules;
* ``haproxy`` - (not in the default run; ``--configs noproxy,squid,tproxy,haproxy``) Debian's
  HAProxy in HTTP mode splicing response bodies, behind the same rules as Squid: a second,
  event-driven C peer, whose 16m figure shows what an established splicing proxy reaches in
  this lab.

The load generator (wrk) and the origin (nginx) are pinned to one core and the proxy to the other,
so the proxy's CPU time is its own; with 2 cores the client side can be the bottleneck, which is
why the proxy's CPU time per request is reported next to req/s. Receive steering (RPS) keeps
each flow's packets in order on the veth links and, by default, the kernel's receive work on the
load core too, for every config alike (``--steer``, see :func:`steer_lab`).

Each (round, config, cache mode) starts a fresh proxy, warms it up, and runs the scenarios of that
cache mode; figures are medians over ``--rounds``. Only ratios within one run mean anything on a
shared machine.

Scenarios (``--scenarios``, comma list; default: 1k-ka,1k-close,64k-ka,16m,idle-conns):
miss path ``1k-ka``, ``1k-close``, ``64k-ka``, ``16m``; hit path ``1k-hit-ka``, ``1k-hit-close``,
``64k-hit-disk`` (tproxy's cache on, Squid's cache_mem; ``origin_share`` in the JSON shows how
many requests still reached the origin); ``idle-conns`` (RSS per idle keep-alive connection,
``rss_kib_per_idle_conn``, proxies only).

Adding a scenario: add a :class:`Scenario` to ``SCENARIOS``. ``kind="wrk"`` scenarios are a wrk
run against a path on the origin; ``cache`` selects how both proxies are configured (off: miss
path, Squid with ``cache deny all``; memory / disk: hit path, primed before timing). Scenarios
whose prerequisite is missing from the daemon are reported as pending and skipped.

Usage: scripts/bench [--rounds N] [--short] [--scenarios a,b,...] [--configs ...] [--steer MODE]
             [--congestion-control ALGO|host]
             [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.lab import ORIGIN_V4, Lab, LabError, skip_reason, tool  # noqa: E402

CONFIGS = ("noproxy", "squid", "tproxy", "haproxy")
DEFAULT_CONFIGS = ("noproxy", "squid", "tproxy")
REFERENCE = "squid"  # ratios are to this config
ROUTED = "noproxy"

# taskset(1) CPU numbers: wrk, the idle client and nginx share LOAD_CPU, the proxy gets PROXY_CPU.
LOAD_CPU = 0
PROXY_CPU = 1
# Receive steering of the lab's links: see steer_lab().
STEER_MODES = ("hash", "split", "load", "none")
DEFAULT_STEER = "load"
# TCP congestion control of every lab connection: see set_congestion_control().
DEFAULT_CC = "cubic"
HOST_CC = "host"  # --congestion-control host: whatever this kernel defaults to

PROXY_PORT = 3129  # the TPROXY --on-port of tproxy's default rules; Squid's tproxy port too
SQUID_FORWARD_PORT = 3128  # Squid refuses to start with only intercepting ports
ORIGIN_HOST = ORIGIN_V4  # a literal: "origin.lab" also resolves to v6 and wrk would pick either

DEFAULT_ROUNDS = 3
CELL_SECONDS = 5.0
SHORT_CELL_SECONDS = 2.0
WARMUP_SECONDS = 1.0
WRK_TIMEOUT = "10s"  # per request; a 16 MiB download on a loaded core can take a while
IDLE_CONNS = 10_000
SHORT_IDLE_CONNS = 1_000
IDLE_CONCURRENCY = 64  # requests in flight while the idle connections are set up
IDLE_SETTLE = 0.5  # seconds between the last idle connection and the RSS sample
IDLE_MIN_HELD = 0.95  # share of idle connections the proxy must still hold when sampled
NOFILE = 65_536  # RLIMIT_NOFILE for the proxies and the idle client (10,000 conns + upstream)

PROXY_START_TIMEOUT = 20.0  # Squid takes a few seconds (notes/peers.md)
PROXY_STOP_TIMEOUT = 10.0
WARMUP_TIMEOUT = 20.0  # a fresh Squid may answer its first request with 502
CLK_TCK = os.sysconf("SC_CLK_TCK")
ORIGIN_LOG_LAG = 0.2  # nginx logs a request after its response has gone out
MB = 1_000_000  # MB/s are decimal megabytes, as wrk prints them

CacheMode = Literal["off", "memory", "disk"]

# Scenarios whose target is a ratio to routing (16m >= 0.9x routed). One flow's MB/s on this
# VM drifts by up to +-20 % within a minute, and in a round other cells stand between a
# proxy's cell and routing's, so the drift alone can move that ratio by more than the margin
# being judged. Each proxied cell of these is therefore paired with a routed cell measured
# seconds after it: the cell is its group's last, and the partner runs as soon as the proxy
# has stopped and its rules and routes are gone - a plain router again, as for the noproxy
# config. (Not while the proxy runs, on a port it does not intercept: with either proxy
# running, other traffic through the gateway measured 6-18 % slower on 16m in three runs
# here, so that partner would flatter the proxy.) The ratio is the median of the per-round
# ratios of each pair; the noproxy config's own cells stay in the table.
PAIRED = ("16m",)


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: Literal["wrk", "idle"]
    description: str
    path: str = ""
    connections: int = 16
    close: bool = False  # a new connection per request (wrk -H 'Connection: close')
    cache: CacheMode = "off"


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("1k-ka", "wrk", "1 KiB, keep-alive", "/files/1k"),
        Scenario("1k-close", "wrk", "1 KiB, new connection per request", "/files/1k", close=True),
        Scenario("64k-ka", "wrk", "64 KiB, keep-alive", "/files/64k"),
        Scenario("16m", "wrk", "16 MiB download, one connection", "/files/16m", connections=1),
        Scenario("idle-conns", "idle", "RSS per idle keep-alive client connection", "/files/1k"),
        # Hit path: tproxy with its cache on, Squid with cache_mem; primed before timing.
        Scenario("1k-hit-ka", "wrk", "1 KiB cache hit, keep-alive", "/files/1k", cache="memory"),
        Scenario(
            "1k-hit-close",
            "wrk",
            "1 KiB cache hit, new connection per request",
            "/files/1k",
            close=True,
            cache="memory",
        ),
        Scenario(
            "64k-hit-disk", "wrk", "64 KiB hit from tproxy's disk tier", "/files/64k", cache="disk"
        ),
    )
}
DEFAULT_SCENARIOS = (
    "1k-ka", "1k-close", "64k-ka", "16m", "1k-hit-ka", "1k-hit-close", "64k-hit-disk", "idle-conns"
)  # fmt: skip


def cache_wired() -> bool:
    """Whether the daemon serves from its [cache]: the cache registers as a component."""
    from tproxy import component

    return any("cache" in spec for spec in component.COMPONENTS)


def pending_reason(s: Scenario) -> str | None:
    if s.cache != "off" and not cache_wired():
        return "tproxy's daemon does not serve from [cache] yet (no cache component)"
    return None


# ------------------------------------------------------------------------- processes


class ProcWatch:
    """CPU time and memory of one process from /proc (proc(5))."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        # utime and stime are fields 14 and 15 of the line; all threads are summed by the kernel.
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def _status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise LabError(f"no {key} in /proc/{self.pid}/status")

    def rss_kib(self) -> int:
        return self._status_kib("VmRSS")

    def peak_kib(self) -> int:
        return self._status_kib("VmHWM")

    def reset_peak(self) -> None:
        # proc(5) clear_refs: "5" resets VmHWM to the current RSS (Linux >= 4.0), so each cell
        # reports its own peak rather than the process's lifetime one.
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def alive(self) -> bool:
        return Path(f"/proc/{self.pid}").exists()


def _raise_nofile() -> None:
    """Children inherit the limit: the proxies and the idle client hold 10,000+ sockets."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else max(NOFILE, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _stop(proc: subprocess.Popen[Any], sig: signal.Signals = signal.SIGTERM) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(PROXY_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(PROXY_STOP_TIMEOUT)


class Runner:
    """One configuration on the lab gateway; ``pid`` is the proxy process (None: routing only)."""

    name = ""

    def __init__(self, lab: Lab, scratch: Path, cache: CacheMode) -> None:
        self.lab = lab
        self.scratch = scratch
        self.cache = cache
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def watch(self) -> ProcWatch | None:
        return ProcWatch(self.proc.pid) if self.proc is not None else None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        """Stop the proxy (if any) and remove the interception rules: the daemon removes its
        own on exit and the peers' are ours; the flush also covers a crash."""
        if self.proc is None:
            return
        _stop(self.proc)
        self.proc = None
        with contextlib.suppress(subprocess.SubprocessError, LabError):
            self.tproxy_cli("rules", "flush", "--config", str(self.rules_config()))

    def log_tail(self) -> str:
        return ""

    def tproxy_cli(self, *args: str) -> None:
        self.lab.run("gateway", [sys.executable, "-m", "tproxy.cli", *args], timeout=30)

    def rules_config(self) -> Path:
        path = self.scratch / f"rules-{self.name}.toml"
        path.write_text(f"[proxy]\nlisten_port = {PROXY_PORT}\n")
        return path


class NoProxy(Runner):
    name = "noproxy"


class TproxyRunner(Runner):
    name = "tproxy"

    def config_text(self) -> str:
        cache_dir = self.scratch / "tproxy-cache"
        cache_dir.mkdir(exist_ok=True)
        lines = [
            "[proxy]",
            f"listen_port = {PROXY_PORT}",
            "[log]",
            'level = "warning"',
            # Our own control socket: the default path in /run is shared with other daemons.
            "[control]",
            f'socket = "{self.scratch / "control.sock"}"',
            # One lab client stands for a whole LAN here; Squid has no per-client limits either.
            "[limits]",
            "enabled = false",
            "[cache]",
            f"enabled = {'false' if self.cache == 'off' else 'true'}",
            f'disk_dir = "{cache_dir}"',
        ]
        if self.cache == "memory":
            lines += ['memory_size = "256 MiB"', 'max_memory_object_size = "16 MiB"']
        elif self.cache == "disk":
            # Objects above the memory tier's limit live on disk only.
            lines += ['max_memory_object_size = "1 KiB"', 'disk_size = "1 GiB"']
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        conf = self.scratch / "tproxy.toml"
        conf.write_text(self.config_text())
        self.log = self.scratch / "tproxy.stderr"
        argv = [
            tool("taskset"), "-c", str(PROXY_CPU),
            sys.executable, "-m", "tproxy.cli", "run", "--config", str(conf),
            "-i", self.lab.gw_lan_if, "--access-log", "",
        ]  # fmt: skip
        with self.log.open("wb") as err:
            self.proc = self.lab.popen(
                "gateway", argv, stdout=subprocess.DEVNULL, stderr=err, cwd=str(REPO)
            )
        _wait_rules(self.lab, self.proc, self.log_tail)

    def log_tail(self) -> str:
        path = self.scratch / "tproxy.stderr"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


class PeerRunner(Runner):
    """A peer proxy (Squid, HAProxy) on the gateway, behind the rules tproxy installs
    (``tproxy rules apply``): it only has to take the TPROXY'd connections on PROXY_PORT."""

    logs: tuple[str, ...] = ("stderr.log",)  # in its directory, for log_tail

    def config_text(self, d: Path) -> str:
        raise NotImplementedError

    def argv(self, conf: Path) -> list[str]:
        raise NotImplementedError

    def prepare(self, d: Path) -> None:
        """Anything the peer needs in its directory before it starts."""

    def start(self) -> None:
        d = self.scratch / f"{self.name}-{time.monotonic_ns()}"
        d.mkdir()
        self.dir = d
        self.prepare(d)
        conf = d / f"{self.name}.conf"
        conf.write_text(self.config_text(d))
        self.tproxy_cli("rules", "apply", "--config", str(self.rules_config()),
                        "-i", self.lab.gw_lan_if)  # fmt: skip
        argv = [tool("taskset"), "-c", str(PROXY_CPU), *self.argv(conf)]
        with (d / "stderr.log").open("wb") as err:
            self.proc = self.lab.popen("gateway", argv, stdout=subprocess.DEVNULL, stderr=err)
        try:
            self.lab.wait_port("gateway", PROXY_PORT, timeout=PROXY_START_TIMEOUT)
        except LabError:
            raise LabError(f"{self.name} did not start: {self.log_tail()}") from None

    def log_tail(self) -> str:
        out = []
        for name in self.logs:
            p = self.dir / name
            if p.exists():
                out.append(p.read_text(errors="replace")[-1500:])
        return "\n".join(out)


class SquidRunner(PeerRunner):
    name = "squid"
    logs = ("stderr.log", "cache.log")

    def config_text(self, d: Path) -> str:
        if self.cache == "off":
            # Miss path: nothing is stored, every request goes to the origin.
            cache = "cache deny all\ncache_mem 8 MB"
        else:
            # notes/peers.md: memory cache only, no cache_dir (Squid's disk store would need
            # `squid -z` and is not what the hit comparison is about).
            cache = "cache_mem 256 MB\nmaximum_object_size_in_memory 16 MB"
        return f"""\
# Generated by scripts/bench.py (lab only).
http_port {SQUID_FORWARD_PORT}
http_port {PROXY_PORT} tproxy
http_access allow all
{cache}
workers 1
max_filedescriptors {NOFILE}
pid_filename {d}/squid.pid
cache_log {d}/cache.log
access_log none
cache_store_log none
coredump_dir {d}
shutdown_lifetime 1 seconds
# Without these Squid does an ARP lookup and a reverse-DNS query per accepted connection, which
# halves its connection rate in a lab without DNS (notes/peers.md).
eui_lookup off
hosts_file /etc/hosts
dns_timeout 1 seconds
"""

    def prepare(self, d: Path) -> None:
        # Squid drops to user "proxy" and must write its pid file and logs there.
        proxy_user = pwd.getpwnam("proxy")
        os.chown(d, proxy_user.pw_uid, proxy_user.pw_gid)

    def argv(self, conf: Path) -> list[str]:
        return [tool("squid"), "-N", "-f", str(conf)]


class HaproxyRunner(PeerRunner):
    """HAProxy as an intercepting HTTP proxy: ``bind ... transparent`` takes the TPROXY'd
    connections, ``server 0.0.0.0`` sends each to its original destination (HAProxy's
    configuration manual, "server" address 0.0.0.0), response bodies are spliced through 1 MiB
    pipes as tproxy's are, and idle origin connections are reused (http-reuse)."""

    name = "haproxy"

    def config_text(self, d: Path) -> str:
        return f"""\
# Generated by scripts/bench.py (lab only).
global
    # maxconn follows from RLIMIT_NOFILE (HAProxy computes it when not set)
    nbthread 1
    tune.pipesize 1048576
    pidfile {d}/haproxy.pid
defaults
    mode http
    option http-keep-alive
    # splice-auto left 16 MiB bodies in user space here (12 ms of CPU per body); forced, they
    # are spliced as tproxy's are
    option splice-response
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend intercept
    bind :{PROXY_PORT} transparent
    default_backend origin
backend origin
    server original-destination 0.0.0.0
"""

    def argv(self, conf: Path) -> list[str]:
        return [tool("haproxy"), "-db", "-f", str(conf)]


RUNNERS: dict[str, type[Runner]] = {
    "noproxy": NoProxy,
    "squid": SquidRunner,
    "tproxy": TproxyRunner,
    "haproxy": HaproxyRunner,
}


def _wait_rules(lab: Lab, proc: subprocess.Popen[Any], tail: Callable[[], str]) -> None:
    """tproxy binds first and applies its rules second (daemon.py): rules present = ready."""
    deadline = time.monotonic() + PROXY_START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise LabError(f"tproxy exited with {proc.returncode}: {tail()}")
        if "TPROXY" in lab.run("gateway", ["iptables-save", "-t", "mangle"]).stdout:
            return
        if time.monotonic() > deadline:
            raise LabError(f"tproxy did not apply its rules: {tail()}")
        time.sleep(0.1)


# ------------------------------------------------------------------------- measurements

WRK_LUA = """\
-- Machine-readable summary (wrk calls done() once, after the run).
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p99_us":%d,' ..
    '"errors":%d,"status_errors":%d}\\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


@dataclass
class Cell:
    """One measurement of one (config, scenario) in one round."""

    values: dict[str, float | None] = field(default_factory=dict)
    errors: int = 0


def url(path: str) -> str:
    return f"http://{ORIGIN_HOST}{path}"


def warm_up(lab: Lab, runner: Runner) -> None:
    """Until the first 200 (a fresh Squid may answer 502), then prime cached scenarios."""
    deadline = time.monotonic() + WARMUP_TIMEOUT
    while True:
        res = lab.curl("client", url("/files/1k"), "--max-time", "3")
        if res.status == 200:
            return
        if runner.proc is not None and runner.proc.poll() is not None:
            raise LabError(f"{runner.name} exited during warm-up: {runner.log_tail()}")
        if time.monotonic() > deadline:
            raise LabError(f"{runner.name}: no 200 after {WARMUP_TIMEOUT}s ({res.status})")
        time.sleep(0.2)


def run_wrk(lab: Lab, s: Scenario, seconds: float, lua: Path) -> dict[str, Any]:
    whole = max(1, round(seconds))  # wrk takes whole seconds
    argv = [
        tool("taskset"), "-c", str(LOAD_CPU), tool("wrk"), "-t1", f"-c{s.connections}",
        f"-d{whole}s", "--timeout", WRK_TIMEOUT, "-s", str(lua),
    ]  # fmt: skip
    if s.close:
        argv += ["-H", "Connection: close"]
    argv.append(url(s.path))
    res = lab.run("client", argv, timeout=seconds + 60)
    m = re.search(r"^BENCHJSON (.*)$", res.stdout, re.M)
    if not m:
        raise LabError(f"wrk printed no summary: {res.stdout[-1000:]} {res.stderr[-1000:]}")
    out: dict[str, Any] = json.loads(m.group(1))
    return out


def measure_wrk(lab: Lab, runner: Runner, s: Scenario, seconds: float, lua: Path) -> Cell:
    watch = runner.watch
    if watch is not None:
        watch.reset_peak()
        cpu0 = watch.cpu_seconds()
    origin0 = origin_requests(lab) if s.cache != "off" else 0
    w = run_wrk(lab, s, seconds, lua)
    cell = Cell(errors=int(w["errors"]) + int(w["status_errors"]))
    n = int(w["requests"])
    dur = int(w["duration_us"]) / 1e6
    cell.values = {
        "rps": n / dur,
        "p50_ms": w["p50_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000,
        "mbps": int(w["bytes"]) / dur / MB,
        "cpu_us_per_req": None,
        "rss_mib": None,
    }
    if s.cache != "off":
        # Share of requests that still reached the origin: ~0 proves the hit path was measured.
        cell.values["origin_share"] = (origin_requests(lab) - origin0) / n if n else None
    if watch is not None:
        cpu = watch.cpu_seconds() - cpu0
        cell.values["cpu_us_per_req"] = cpu / n * 1e6 if n else None
        cell.values["rss_mib"] = watch.peak_kib() / 1024
    if s.cache != "off" and getattr(runner, "name", "") == "tproxy":
        # The cache index's RAM per stored object, from the daemon itself.
        cell.values["index_bytes_per_object"] = cache_index_bytes(runner)
    return cell


def measure_routed_partner(
    lab: Lab, s: Scenario, plan: Plan, lua: Path, config: str, rnd: int,
    cells: dict[tuple[str, str], list[Cell]], log: Callable[[str], None],
) -> None:  # fmt: skip
    """``s`` routed, just after ``config``'s proxy stopped (see PAIRED)."""
    if rules := proxy_rules(lab):
        raise LabError(f"{config} left rules behind; the partner would not be routed: {rules}")
    pair = measure_wrk(lab, RUNNERS[ROUTED](lab, Path(), "off"), s, plan.seconds, lua)
    cells.setdefault((paired_config(config), s.name), []).append(pair)
    log(f"round {rnd + 1} {'routed':8} {s.name:12} right after {config}: " + brief(pair))


def proxy_rules(lab: Lab) -> str:
    """Interception rules still in the gateway (TPROXY targets in either family)."""
    out = []
    for save in ("iptables-save", "ip6tables-save"):
        res = lab.run("gateway", [tool(save), "-t", "mangle"], check=False)
        out += [line for line in res.stdout.splitlines() if "TPROXY" in line]
    return "\n".join(out)


def paired_config(config: str) -> str:
    """The cells key of a proxy config's routed partner cells (see PAIRED)."""
    return f"routed after {config}"


def cache_index_bytes(runner: Runner) -> float | None:
    from tproxy import status_cli

    try:
        st = status_cli.request(str(runner.scratch / "control.sock"), "cache-stats")
    except (status_cli.ControlUnavailable, status_cli.CommandFailed):
        return None
    value = st.get("index_bytes_per_object")
    return float(value) if isinstance(value, (int, float)) else None


def origin_requests(lab: Lab) -> int:
    """Requests nginx has logged so far (one line each; see tests/lab.py)."""
    time.sleep(ORIGIN_LOG_LAG)
    with (lab.origin_dir / "access.log").open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


IDLE_CLIENT = """\
import asyncio, resource, sys

host, port, path, count, conc = sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:6])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < count + 256:
    resource.setrlimit(resource.RLIMIT_NOFILE, (count + 256, max(hard, count + 256)))
REQ = f"GET {path} HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n".encode()


async def one(sem, conns):
    async with sem:
        r, w = await asyncio.open_connection(host, port)
        w.write(REQ)
        head = await r.readuntil(b"\\r\\n\\r\\n")
        length = 0
        for line in head.split(b"\\r\\n"):
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        await r.readexactly(length)
        conns.append((r, w))


async def main():
    sem, conns = asyncio.Semaphore(conc), []
    res = await asyncio.gather(*(one(sem, conns) for _ in range(count)), return_exceptions=True)
    errors = [x for x in res if isinstance(x, BaseException)]
    print(f"READY {len(conns)} {len(errors)} {errors[:1]!r}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for _, w in conns:
        w.close()


asyncio.run(main())
"""


def measure_idle(lab: Lab, runner: Runner, s: Scenario, count: int) -> Cell:
    """RSS growth of the proxy per idle keep-alive client connection.

    Each connection makes one request (so it is a real keep-alive connection between requests,
    with whatever per-connection state a request leaves) and then stays open."""
    watch = runner.watch
    assert watch is not None
    time.sleep(IDLE_SETTLE)
    before = watch.rss_kib()
    fds_before = watch.fds()
    argv = [
        tool("taskset"), "-c", str(LOAD_CPU), sys.executable, "-c", IDLE_CLIENT,
        ORIGIN_HOST, "80", s.path, str(count), str(IDLE_CONCURRENCY),
    ]  # fmt: skip
    client = lab.popen(
        "client", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert client.stdout is not None and client.stdin is not None
        line = client.stdout.readline()
        if not line.startswith("READY"):
            err = client.stderr.read() if client.stderr else ""
            raise LabError(f"idle client failed: {line!r} {err[-1000:]}")
        _, ok, errors, *_ = line.split(maxsplit=3)
        time.sleep(IDLE_SETTLE)
        after = watch.rss_kib()
        peak = watch.peak_kib()
        held = watch.fds() - fds_before
        client.stdin.close()
        client.wait(30)
    finally:
        _stop(client)
    n = int(ok)
    if held < n * IDLE_MIN_HELD:
        # The proxy closed them (or never accepted): the RSS delta would not be per connection.
        print(f"bench: {runner.name} holds {held} fds for {n} idle connections", file=sys.stderr)
    cell = Cell(errors=int(errors))
    cell.values = {
        "rps": None, "p50_ms": None, "p99_ms": None, "mbps": None, "cpu_us_per_req": None,
        "rss_mib": peak / 1024,
        "idle_conns": float(n),
        "rss_kib_per_idle_conn": (after - before) / n if n else None,
    }  # fmt: skip
    return cell


# ------------------------------------------------------------------------- the run


@dataclass
class Plan:
    configs: list[str]
    scenarios: list[Scenario]
    pending: dict[str, str]
    rounds: int
    seconds: float
    idle_conns: int
    steer: str = DEFAULT_STEER
    cc: str = DEFAULT_CC


def groups(scenarios: Sequence[Scenario]) -> Iterator[tuple[CacheMode, list[Scenario]]]:
    """Scenarios by the proxy setup they need; idle first, on a proxy that has not yet grown."""
    modes: list[CacheMode] = []
    for s in scenarios:
        if s.cache not in modes:
            modes.append(s.cache)
    for mode in modes:
        group = [s for s in scenarios if s.cache == mode]
        # PAIRED scenarios last: their routed partner follows the proxy's stop.
        yield mode, sorted(group, key=lambda s: (s.kind != "idle", s.name in PAIRED))


def applicable(config: str, s: Scenario) -> bool:
    # Routing alone has no cache and no proxy process whose memory could be measured; HAProxy
    # is configured without a cache, so it runs the miss path only.
    if config == ROUTED:
        return s.cache == "off" and s.kind != "idle"
    return config != "haproxy" or s.cache == "off"


def run_plan(plan: Plan, log: Callable[[str], None]) -> dict[tuple[str, str], list[Cell]]:
    cells: dict[tuple[str, str], list[Cell]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="tproxy-bench-"))
    os.chmod(scratch, 0o755)  # Squid (user proxy) needs to reach its own subdirectory
    lua = scratch / "summary.lua"
    lua.write_text(WRK_LUA)
    try:
        with Lab(clients=1) as lab:
            pin_origin(lab)
            tune_lab(lab)
            steer_lab(lab, plan.steer)
            cc = set_congestion_control(lab, plan.cc)
            log(f"lab {lab.tag} up; load+origin on cpu {LOAD_CPU}, proxy on cpu {PROXY_CPU}, "
                f"receive steering {plan.steer}, congestion control {cc}")  # fmt: skip
            for rnd in range(plan.rounds):
                # Rotate the order so no config always runs first (or last) in a round.
                k = rnd % len(plan.configs)
                for config in plan.configs[k:] + plan.configs[:k]:
                    for mode, group in groups(plan.scenarios):
                        todo = [s for s in group if applicable(config, s)]
                        if todo:
                            run_group(lab, scratch, lua, plan, config, mode, todo, rnd, cells, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return cells


def run_group(
    lab: Lab, scratch: Path, lua: Path, plan: Plan, config: str, mode: CacheMode,
    todo: list[Scenario], rnd: int, cells: dict[tuple[str, str], list[Cell]],
    log: Callable[[str], None],
) -> None:  # fmt: skip
    runner = RUNNERS[config](lab, scratch, mode)
    runner.start()
    partners: list[Scenario] = []
    try:
        warm_up(lab, runner)
        primed = False
        for s in todo:
            if s.kind == "idle":
                cell = measure_idle(lab, runner, s, plan.idle_conns)
            else:
                if not primed:
                    # Connections, pools, allocator arenas (and the cache for hit runs).
                    warm = Scenario("warm", "wrk", "", s.path, cache=s.cache)
                    run_wrk(lab, warm, WARMUP_SECONDS, lua)
                    primed = True
                if s.cache != "off":
                    lab.curl("client", url(s.path))
                cell = measure_wrk(lab, runner, s, plan.seconds, lua)
                if config != ROUTED and s.name in PAIRED:
                    partners.append(s)
            cells.setdefault((config, s.name), []).append(cell)
            log(f"round {rnd + 1} {config:8} {s.name:12} " + brief(cell))
            if runner.proc is not None and runner.proc.poll() is not None:
                raise LabError(f"{config} died: {runner.log_tail()}")
    finally:
        runner.stop()
        clear_time_wait(lab)
    for s in partners:
        measure_routed_partner(lab, s, plan, lua, config, rnd, cells, log)


# Load-generator tuning (as for any wrk host). Through a proxy the client usually closes first
# (it has the whole response before the proxy's FIN), so the client namespace collects
# TIME_WAIT sockets towards the one origin address: 10,000 idle connections plus a
# close-per-request cell exhaust the default 28,000 ephemeral ports and connect() stalls, which
# then slows whichever config runs next. tcp_tw_reuse=1 lets connect() reuse a TIME_WAIT port
# once its timestamps make that safe (kernel Documentation/networking/ip-sysctl.rst).
#
# The load generator's receive buffer starts at CLIENT_RCVBUF rather than the kernel's 128 KiB.
# Receive-buffer autotuning (tcp_rcv_space_adjust) grows a socket's buffer by what the
# application read within one receiver-measured RTT, and between namespaces that RTT is a few
# microseconds: whether a connection's buffer ever grows is then decided by chance in its first
# milliseconds, and it keeps that size. With the default start, one connection's 16 MiB
# downloads ran at 4.7 or 6.0 GB/s routed and at 3.2 or 4.1 GB/s through tproxy, depending on
# whether wrk's buffer had stayed at 0.2-1 MiB or grown to 4-27 MiB (`ss -tm`, 8 cells each),
# so a ratio was mostly which of them had been lucky. Started at 4 MiB, every config's 16m
# cells agree within 5 %. (On a real LAN the RTT is 100x longer and autotuning does grow.)
CLIENT_RCVBUF = 4 * 1024 * 1024
CLIENT_SYSCTLS = {
    "net.ipv4.ip_local_port_range": "1024 65535",
    "net.ipv4.tcp_tw_reuse": "1",
}
# The proxies' upstream sockets pick ephemeral ports in the gateway namespace.
GATEWAY_SYSCTLS = {"net.ipv4.ip_local_port_range": "1024 65535"}

# Receive steering (RPS, kernel Documentation/networking/scaling.rst) of the lab's veth links.
#
# Why at all: a veth transmit hands the packet to the backlog queue of the CPU that sent it
# (netif_rx without RPS). A TCP socket sends from two CPUs - from its process (sendmsg) and
# from the softirq that processes the peer's ACKs - so one flow's packets land in two CPUs'
# backlogs and arrive reordered, and the sender takes the reordering for loss: 15,000-75,000
# spurious fast retransmits and 60-100 ms stalls per 16m cell through a proxy (none when
# routed, where every packet stays on the load CPU). A NIC's receive queue keeps a flow in
# order; RPS does the same for veth: each receiving interface's packets go to the backlog of
# one CPU chosen from its rps_cpus mask.
#
# Modes (--steer), the same for every config:
#   hash     every receiving interface in all three namespaces hashes flows over both CPUs
#            (rps_cpus=3). In order, but which CPU a flow's receive work lands on is chance,
#            so a one-connection cell (16m) moves by up to 2x between rounds.
#   split    the gateway's interfaces on PROXY_CPU, the client's and the origin's on LOAD_CPU:
#            each host's packet processing on its own CPU, as on separate machines. Every
#            hand-over between hosts is a cross-CPU interrupt, which costs several µs in this
#            VM; routing pays it as much as the proxies do.
#   load     every interface on LOAD_CPU: the proxy's CPU runs only the proxy; the load CPU
#            does all receive processing (wrk, nginx and every host's kernel side).
#   none     no steering (reordering through proxies, see above).


# Congestion control. Without it every lab connection takes this kernel's default, and that is
# not Debian's: this VM's kernel defaults to bbr, Debian's (the gateway we ship for, and most
# clients and servers a gateway sees) to cubic. bbr without the fq qdisc paces in the TCP stack,
# and over veth links at these rates that pacing, not the hosts, sets the figures (measured
# here, one run each, 3 rounds): routed 64k-ka 16,700 req/s under bbr against 43,700 under
# cubic, routed 16m 1.2 against 4.1 GB/s, and ~50 ms p99 tails on 64k-ka through either proxy
# (Squid 53 ms, tproxy 53 ms; under cubic 5.5 and 2.6 ms), which routing does not show. So
# every route in the lab's namespaces carries `congctl` (ip-route(8) RTAX_CC_ALGO): both ends
# of each connection, the proxies' included, use the algorithm asked for. A route attribute,
# because a namespace's net.ipv4.tcp_congestion_control may only name an algorithm the host
# allows unprivileged users (tcp_allowed_congestion_control, a global setting this benchmark
# does not touch). `--congestion-control host` leaves the kernel's default.
def set_congestion_control(lab: Lab, algo: str) -> str:
    """Pin every route of every lab namespace to ``algo``; returns what the lab uses."""
    if algo == HOST_CC:
        res = lab.run("gateway", [tool("sysctl"), "-n", "net.ipv4.tcp_congestion_control"])
        return f"{res.stdout.strip()} (this kernel's default)"
    hosts = [*(f"client{i + 1}" for i in range(len(lab.ns_clients))), "gateway", "origin"]
    for host in hosts:
        for fam in ("-4", "-6"):
            routes = lab.run(host, ["ip", fam, "route", "show"]).stdout.splitlines()
            for route in routes:
                words = [w for w in route.split() if w != "linkdown"]
                if not words:
                    continue
                res = lab.run(
                    host, ["ip", fam, "route", "replace", *words, "congctl", algo], check=False
                )
                if res.returncode != 0:
                    raise LabError(f"congctl {algo} on {host}'s route {route!r}: {res.stderr}")
    return algo


def client_rmem(current: str, start: int = CLIENT_RCVBUF) -> str:
    """net.ipv4.tcp_rmem with its default (middle) value raised to ``start``, capped at the
    maximum; minimum and maximum stay as this kernel has them."""
    lo, mid, hi = (int(v) for v in current.split())
    return f"{lo} {max(mid, min(start, hi))} {hi}"


def tune_lab(lab: Lab) -> None:
    rmem = lab.run("client", [tool("sysctl"), "-n", "net.ipv4.tcp_rmem"]).stdout
    lab.sysctl("client", {**CLIENT_SYSCTLS, "net.ipv4.tcp_rmem": client_rmem(rmem)})
    lab.sysctl("gateway", GATEWAY_SYSCTLS)


def _cpu_mask(*cpus: int) -> str:
    return format(sum(1 << c for c in cpus), "x")


def steer_lab(lab: Lab, mode: str = DEFAULT_STEER) -> dict[str, str]:
    """Set rps_cpus on every rx queue of the lab's receiving interfaces; returns iface -> mask."""
    if mode == "none":
        return {}
    both = _cpu_mask(LOAD_CPU, PROXY_CPU)
    gateway = {"hash": both, "split": _cpu_mask(PROXY_CPU), "load": _cpu_mask(LOAD_CPU)}[mode]
    ends = both if mode == "hash" else _cpu_mask(LOAD_CPU)
    plan = [
        *(("gateway", iface, gateway) for iface in (*lab.gw_lan_ports, lab.gw_wan_if)),
        *((f"client{i + 1}", lab.client_if, ends) for i in range(len(lab.ns_clients))),
        ("origin", lab.origin_if, ends),
    ]
    done: dict[str, str] = {}
    for host, iface, mask in plan:
        # `ip netns exec` mounts the namespace's own /sys, where its interfaces are.
        script = f"for q in /sys/class/net/{iface}/queues/rx-*; do echo {mask} > $q/rps_cpus; done"
        res = lab.run(host, ["sh", "-c", script], check=False)
        if res.returncode != 0:
            raise LabError(f"rps_cpus on {iface} in {host}: {res.stderr.strip()}")
        done[f"{host}/{iface}"] = mask
    return done


def clear_time_wait(lab: Lab) -> None:
    """Destroy the stopped proxy's TIME_WAIT sockets in the gateway namespace.

    Early demux (tcp_v4_early_demux) attaches a local TIME_WAIT socket with the same 4-tuple to
    an arriving packet before routing, and ip_forward() drops packets that carry a socket. So
    for up to 60 s after a proxy stops, a routed client SYN that reuses such a 4-tuple is
    dropped and retried a second later: the next config (routing above all) would measure the
    previous one's debris. ``ss -K`` (SOCK_DESTROY, CONFIG_INET_DIAG_DESTROY) removes them."""
    res = lab.run("gateway", [tool("ss"), "-K", "-t", "state", "time-wait"], check=False)
    if res.returncode != 0:
        print(f"bench: ss -K failed, next cell may stall: {res.stderr.strip()}", file=sys.stderr)


def pin_origin(lab: Lab) -> None:
    """nginx (master and workers) onto the load generator's core."""
    out = subprocess.run(
        [tool("ip"), "netns", "pids", lab.ns_origin], capture_output=True, text=True, check=True
    ).stdout
    for pid in out.split():
        subprocess.run(
            [tool("taskset"), "-a", "-p", "-c", str(LOAD_CPU), pid],
            capture_output=True, check=False,
        )  # fmt: skip


def brief(cell: Cell) -> str:
    v = cell.values
    parts = []
    for key, fmt in (
        ("rps", "{:.0f} req/s"), ("p50_ms", "p50 {:.2f} ms"), ("p99_ms", "p99 {:.2f} ms"),
        ("mbps", "{:.1f} MB/s"), ("cpu_us_per_req", "{:.0f} us/req"), ("rss_mib", "{:.1f} MiB"),
        ("rss_kib_per_idle_conn", "{:.2f} KiB/idle conn"),
        ("origin_share", "origin {:.1%}"),
    ):  # fmt: skip
        if v.get(key) is not None:
            parts.append(fmt.format(v[key]))
    if cell.errors:
        parts.append(f"{cell.errors} errors")
    return ", ".join(parts)


def paired_ratios(
    cells: dict[tuple[str, str], list[Cell]], plan: Plan, metric: str = "mbps"
) -> list[dict[str, Any]]:
    """Per PAIRED scenario and proxy config: the median over rounds of proxied / its partner."""
    out: list[dict[str, Any]] = []
    for s in plan.scenarios:
        if s.name not in PAIRED:
            continue
        for config in plan.configs:
            if config == ROUTED:
                continue
            mine = cells.get((config, s.name), [])
            theirs = cells.get((paired_config(config), s.name), [])
            ratios = [
                a / b
                for c, r in zip(mine, theirs, strict=False)
                if (a := c.values.get(metric)) is not None and (b := r.values.get(metric))
            ]
            if ratios:
                routed = [v for r in theirs if (v := r.values.get(metric)) is not None]
                out.append({
                    "config": config, "scenario": s.name, "metric": metric,
                    "ratio": round(statistics.median(ratios), 3),
                    "ratios": [round(x, 3) for x in ratios],
                    "routed": round(statistics.median(routed), 3),
                })  # fmt: skip
    return out


def medians(cells: dict[tuple[str, str], list[Cell]], plan: Plan) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for s in plan.scenarios:
        for config in plan.configs:
            got = cells.get((config, s.name))
            if not got:
                continue
            keys = dict.fromkeys(k for c in got for k in c.values)
            entry: dict[str, Any] = {"config": config, "scenario": s.name}
            for key in keys:
                vals = [v for c in got if (v := c.values.get(key)) is not None]
                entry[key] = round(statistics.median(vals), 3) if vals else None
            entry["errors"] = sum(c.errors for c in got)
            entry["rounds"] = len(got)
            runs.append(entry)
    return runs


# ------------------------------------------------------------------------- report


def _ratio(a: Any, b: Any) -> str:
    return (
        f"{a / b:.2f}x" if isinstance(a, int | float) and isinstance(b, int | float) and b else "-"
    )


def table(runs: list[dict[str, Any]]) -> str:
    by = {(r["config"], r["scenario"]): r for r in runs}
    head = (
        f"{'scenario':13}{'config':9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'MB/s':>9}"
        f"{'us/req':>8}{'RSS MiB':>9}{'KiB/idle':>9}  {'rps÷sq':>7}{'p99÷sq':>7}{'cpu÷sq':>7}"
        f"{'MB/s÷rt':>8}"
    )
    lines = [head, "-" * len(head)]

    def num(v: Any, fmt: str, width: int) -> str:
        return f"{fmt.format(v) if v is not None else '-':>{width}}"

    for r in runs:
        ref = by.get((REFERENCE, r["scenario"]), {})
        routed = by.get((ROUTED, r["scenario"]), {})
        lines.append(
            f"{r['scenario']:13}{r['config']:9}"
            + num(r.get("rps"), "{:.0f}", 9)
            + num(r.get("p50_ms"), "{:.2f}", 9)
            + num(r.get("p99_ms"), "{:.2f}", 9)
            + num(r.get("mbps"), "{:.1f}", 9)
            + num(r.get("cpu_us_per_req"), "{:.0f}", 8)
            + num(r.get("rss_mib"), "{:.1f}", 9)
            + num(r.get("rss_kib_per_idle_conn"), "{:.2f}", 9)
            + f"  {_ratio(r.get('rps'), ref.get('rps')):>7}"
            + f"{_ratio(r.get('p99_ms'), ref.get('p99_ms')):>7}"
            + f"{_ratio(r.get('cpu_us_per_req'), ref.get('cpu_us_per_req')):>7}"
            + f"{_ratio(r.get('mbps'), routed.get('mbps')):>8}"
            + (f"  ({r['errors']} errors)" if r.get("errors") else "")
            + (f"  (origin {r['origin_share']:.1%})" if r.get("origin_share") is not None else "")
        )
    return "\n".join(lines)


TARGETS: tuple[tuple[str, str, str, str, float, bool], ...] = (
    # (scenario, metric, vs config, label, factor, higher is better)
    ("1k-ka", "rps", REFERENCE, "1k-ka req/s >= 2.5x Squid", 2.5, True),
    ("1k-close", "rps", REFERENCE, "1k-close req/s >= 1.2x Squid", 1.2, True),
    ("16m", "mbps", ROUTED, "16m MB/s >= 0.9x routed", 0.9, True),
    ("1k-ka", "p99_ms", REFERENCE, "1k-ka p99 <= Squid", 1.0, False),
    ("1k-close", "p99_ms", REFERENCE, "1k-close p99 <= Squid", 1.0, False),
    ("64k-ka", "p99_ms", REFERENCE, "64k-ka p99 <= Squid", 1.0, False),
)


def targets(runs: list[dict[str, Any]], paired: Sequence[dict[str, Any]] = ()) -> str:
    by = {(r["config"], r["scenario"]): r for r in runs}
    pairs = {(p["config"], p["scenario"], p["metric"]): p["ratio"] for p in paired}
    out = []
    for scenario, metric, ref, label, factor, higher in TARGETS:
        if ref == ROUTED and ("tproxy", scenario, metric) in pairs:
            ratio = pairs[("tproxy", scenario, metric)]
            label += " (paired)"
        else:
            a = by.get(("tproxy", scenario), {}).get(metric)
            b = by.get((ref, scenario), {}).get(metric)
            if a is None or not b:
                continue
            ratio = a / b
        ok = ratio >= factor if higher else ratio <= factor
        out.append(f"  {'met ' if ok else 'MISS'} {label}: {ratio:.2f}x")
    return "targets (tproxy; informative, noisy):\n" + "\n".join(out) if out else ""


# ------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench", description="tproxy vs Squid vs routing in the netns lab (wrk)"
    )
    ap.add_argument("--rounds", type=int, default=None, help=f"default {DEFAULT_ROUNDS}")
    ap.add_argument("--seconds", type=float, default=None, help="wrk duration per cell")
    ap.add_argument("--short", action="store_true", help="CI: 1 round, 2 s cells, fewer idle conns")
    ap.add_argument(
        "--scenarios", default=",".join(DEFAULT_SCENARIOS),
        help=f"comma list of {', '.join(SCENARIOS)} (default: %(default)s)",
    )  # fmt: skip
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"comma list of {', '.join(CONFIGS)} (default: %(default)s)")  # fmt: skip
    ap.add_argument("--idle-conns", type=int, default=None, help=f"default {IDLE_CONNS}")
    ap.add_argument("--run-pending", action="store_true",
                    help="run scenarios whose daemon prerequisite looks missing")  # fmt: skip
    ap.add_argument("--steer", choices=STEER_MODES, default=DEFAULT_STEER,
                    help="receive steering of the lab links (see STEER_MODES in bench.py; "
                    "default: %(default)s)")  # fmt: skip
    ap.add_argument("--congestion-control", default=DEFAULT_CC, metavar="ALGO",
                    help="TCP congestion control of every lab connection, or 'host' for this "
                    "kernel's default (see set_congestion_control in bench.py; default: "
                    "%(default)s)")  # fmt: skip
    ap.add_argument("--json", metavar="FILE", help="write the medians as JSON")
    return ap.parse_args(argv)


def make_plan(a: argparse.Namespace) -> Plan:
    names = [n.strip() for n in a.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"bench: unknown scenario(s) {unknown}; known: {list(SCENARIOS)}")
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    if bad := [c for c in configs if c not in CONFIGS]:
        raise SystemExit(f"bench: unknown config(s) {bad}; known: {list(CONFIGS)}")
    pending: dict[str, str] = {}
    scenarios = []
    for n in names:
        s = SCENARIOS[n]
        reason = pending_reason(s)
        if reason and not a.run_pending:
            pending[n] = reason
        else:
            scenarios.append(s)
    return Plan(
        configs=configs,
        scenarios=scenarios,
        pending=pending,
        rounds=a.rounds or (1 if a.short else DEFAULT_ROUNDS),
        seconds=a.seconds or (SHORT_CELL_SECONDS if a.short else CELL_SECONDS),
        idle_conns=a.idle_conns or (SHORT_IDLE_CONNS if a.short else IDLE_CONNS),
        steer=a.steer,
        cc=a.congestion_control,
    )


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind through every `finally` (proxies, rules, the lab) as Ctrl-C does.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if reason := skip_reason():
        print(f"bench: {reason}", file=sys.stderr)
        return 1
    for needed in ("wrk", "squid", "taskset", "iptables-save"):
        if shutil.which(needed, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            print(f"bench: {needed} is not installed", file=sys.stderr)
            return 1
    if (os.cpu_count() or 1) < 2:
        print("bench: needs 2 CPUs (load generator and proxy on separate cores)", file=sys.stderr)
        return 1
    plan = make_plan(a)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _raise_nofile()
    os.chdir(REPO)  # `python -m tproxy.cli` in the gateway resolves the package from here
    for name, reason in plan.pending.items():
        print(f"bench: {name}: pending - {reason}", file=sys.stderr)
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:5.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        cells = run_plan(plan, log)
    except KeyboardInterrupt:
        print("bench: interrupted; lab torn down", file=sys.stderr)
        return 130
    runs = medians(cells, plan)
    paired = paired_ratios(cells, plan)
    print(table(runs))
    for p in paired:
        each = ", ".join(f"{x:.2f}" for x in p["ratios"])
        print(
            f"{p['scenario']} {p['config']} MB/s / routed right after it: {p['ratio']:.2f}x "
            f"(median of {each}; routed {p['routed']:.1f} MB/s)"
        )
    if t := targets(runs, paired):
        print(t)
    took = time.time() - started
    print(f"({plan.rounds} round(s) of {plan.seconds:g} s cells, medians; {took:.0f} s)")
    if a.json:
        doc = {
            "runs": runs,
            "paired": paired,
            "pending": plan.pending,
            "meta": {
                "rounds": plan.rounds,
                "cell_seconds": plan.seconds,
                "idle_conns": plan.idle_conns,
                "load_cpu": LOAD_CPU,
                "proxy_cpu": PROXY_CPU,
                "reference": REFERENCE,
                "steer": plan.steer,
                "congestion_control": plan.cc,
                "started": started,
                "elapsed_s": round(time.time() - started, 1),
            },
        }
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
