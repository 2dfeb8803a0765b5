"""The gateway box: a debootstrapped Debian 12 with systemd as PID 1, booted in systemd-nspawn.

The box is the gateway an admin would run: the test installs the built .deb with apt inside it
and drives the unit with ``systemctl``. Client and origin are plain network namespaces joined to
the box with veth pairs::

    client ns (eth0 10.77.1.2) ── lan0 10.77.1.1 [box] wan0 10.77.2.1 ── origin ns (eth0 10.77.2.2)

Recipe and pitfalls: ../shared/notes/gateway-box.md. Why the flags are what they are:

- The host's PID 1 is not systemd, so nspawn cannot register with machined (``--register=no
  --keep-unit``) and ``machinectl``/``systemctl -M`` do not work; commands run through
  ``nsenter -t <container systemd> -a``.
- ``--private-network`` gives the box its own network namespace with a writable /proc/sys/net;
  the veths are created from the host straight into the target namespaces.
- ``--volatile=overlay`` keeps the cached root file system pristine: every boot writes to a tmpfs.

The root file system is built once with debootstrap from the Debian mirror this machine's apt
uses, with the .deb's Debian dependencies pre-installed (the box has no network to fetch them),
and cached under ``.cache/box/`` keyed by the package list.

Upgrades: :func:`booted_box` takes further .debs (a later version built with
``scripts/package --version``, see :func:`upgrade_version`) and offers them all under /debs;
:func:`repack_deb` makes a release the tree cannot produce (a changed shipped conffile).

Also a script: ``python3 tests/box.py origin PORT`` serves the origin's test content (used inside
the origin namespace), ``python3 tests/box.py rootfs [PKG...]`` builds the cache ahead of time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO / ".cache" / "box"
SUITE = "bookworm"
FALLBACK_MIRROR = "http://deb.debian.org/debian"

# What every box has: systemd as init, the tools the package drives, and what the tests use
# inside the box. The .deb's own Debian dependencies are added to this list per build.
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "iproute2",
    "iptables",
    "procps",
    "python3",
    "logrotate",
)

LAN_PREFIX = "10.77.1"
WAN_PREFIX = "10.77.2"
GATEWAY_LAN = f"{LAN_PREFIX}.1"
GATEWAY_WAN = f"{WAN_PREFIX}.1"
CLIENT_IP = f"{LAN_PREFIX}.2"
ORIGIN_IP = f"{WAN_PREFIX}.2"
ORIGIN_PORT = 80

# Timeouts (seconds).
BOOT_TIMEOUT = 30.0
# nspawn ignores SIGTERM very early in boot; the notes measured a clean halt at about 2 s.
STOP_GRACE = 4.0
DEBOOTSTRAP_TIMEOUT = 900.0


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 60.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; a failure raises with the output attached."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
        )
    return proc


# -- the root file system --------------------------------------------------------------------


def apt_mirror() -> str:
    """The Debian archive URI this machine's apt uses for ``bookworm`` (not -security)."""
    texts: list[str] = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if path.suffix in (".sources", ".list") or path.name == "sources.list":
            with contextlib.suppress(OSError):
                texts.append(path.read_text())
    for text in texts:
        # deb822 stanzas: URIs + Suites.
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
        # one-line format.
        for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if m.group(2) == SUITE:
                return m.group(1)
    return FALLBACK_MIRROR


def deb_dependencies(deb: Path) -> list[str]:
    """Package names from the .deb's Depends/Pre-Depends (first alternative, no versions)."""
    names: list[str] = []
    for fieldname in ("Pre-Depends", "Depends"):
        value = run(["dpkg-deb", "-f", str(deb), fieldname]).stdout.strip()
        for clause in filter(None, (c.strip() for c in value.split(","))):
            first = clause.split("|")[0].strip()
            name = re.split(r"[\s(:\[]", first, maxsplit=1)[0]
            if name:
                names.append(name)
    return names


def _configure_rootfs(root: Path) -> None:
    """Make the minbase system a quiet, deterministic box."""
    (root / "etc/hostname").write_text("gateway\n")
    # An empty machine-id makes systemd generate a transient one per boot (see machine-id(5)).
    (root / "etc/machine-id").write_text("")
    # Units that only cost boot time or would touch the network in a box without one.
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer"):
        (root / "etc/systemd/system" / unit).unlink(missing_ok=True)
        with contextlib.suppress(FileExistsError):
            (root / "etc/systemd/system" / unit).symlink_to("/dev/null")
    # Keep apt from trying to download anything when installing the local .deb.
    (root / "etc/apt/apt.conf.d/99box").write_text(
        'APT::Install-Recommends "false";\nAcquire::Languages "none";\n'
    )
    run(["chroot", str(root), "apt-get", "clean"], check=False)


def ensure_rootfs(extra_packages: Sequence[str] = ()) -> Path:
    """Return the cached root file system holding BASE_PACKAGES + extra, building it once."""
    packages = sorted(set(BASE_PACKAGES) | {p for p in extra_packages if p})
    mirror = apt_mirror()
    key = hashlib.sha256(f"{SUITE} {mirror} {' '.join(packages)}".encode()).hexdigest()[:12]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    root = CACHE_DIR / f"rootfs-{key}"
    with open(CACHE_DIR / ".lock", "w") as lock:
        # Parallel test runs wait for one build instead of running debootstrap twice.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / ".complete").exists():
            return root
        tmp = CACHE_DIR / f"build-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(packages)}",
                    SUITE,
                    str(tmp),
                    mirror,
                ],
                timeout=DEBOOTSTRAP_TIMEOUT,
            )
            _configure_rootfs(tmp)
            (tmp / ".complete").write_text(" ".join(packages) + "\n")
            shutil.rmtree(root, ignore_errors=True)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # Older roots (another package list) are dead weight: about 300 MB each.
        for old in CACHE_DIR.glob("rootfs-*"):
            if old != root:
                shutil.rmtree(old, ignore_errors=True)
    return root


# -- the booted box -----------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except (OSError, ValueError):
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _find_init(nspawn_pid: int) -> int | None:
    """The container's PID 1 as seen from the host: a descendant of nspawn named systemd."""
    todo = _children(nspawn_pid)
    while todo:
        pid = todo.pop(0)
        if _comm(pid) == "systemd":
            return pid
        todo.extend(_children(pid))
    return None


@dataclass
class Box:
    """A booted gateway box with client and origin namespaces attached."""

    root: Path
    debdir: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    nspawn: subprocess.Popen[bytes] | None = None
    init_pid: int = 0
    origin: subprocess.Popen[bytes] | None = None
    console: Path | None = None
    # A directory this box made to offer several .debs under /debs; removed in teardown.
    staged: Path | None = None

    @property
    def machine(self) -> str:
        return f"tpbox-{self.tag}"

    @property
    def client_ns(self) -> str:
        return f"tpc-{self.tag}"

    @property
    def origin_ns(self) -> str:
        return f"tpo-{self.tag}"

    # -- running things ---------------------------------------------------------------------

    def sh(
        self, script: str, *, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell script inside the box (all of its namespaces)."""
        return run(
            ["nsenter", "-t", str(self.init_pid), "-a", "/bin/sh", "-c", script],
            check=check,
            timeout=timeout,
        )

    def client(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", self.client_ns, *argv], check=check, timeout=timeout)

    def client_popen(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.client_ns, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def curl(self, path: str = "/", timeout: float = 3.0) -> subprocess.CompletedProcess[str]:
        """One HTTP request from the client to the origin (intercepted by the gateway)."""
        return self.client(
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                str(timeout),
                f"http://{ORIGIN_IP}:{ORIGIN_PORT}{path}",
            ],
            check=False,
            timeout=timeout + 5,
        )

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["nsenter", "-t", str(self.init_pid), "-a", "systemctl", *args], check=check)

    def unit_property(self, unit: str, prop: str) -> str:
        out = self.systemctl("show", "-p", prop, "--value", unit).stdout
        return out.strip()

    def wait_for(self, what: str, predicate: object, timeout: float = 10.0) -> None:
        """Poll ``predicate()`` until true; fail naming ``what``."""
        assert callable(predicate)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    # -- lifecycle -------------------------------------------------------------------------

    def boot(self) -> None:
        self.console = CACHE_DIR / f"console-{self.tag}.log"
        log = open(self.console, "wb")  # noqa: SIM115 - lives as long as nspawn
        self.nspawn = subprocess.Popen(
            [
                "systemd-nspawn",
                "-D",
                str(self.root),
                "-b",
                "-M",
                self.machine,
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--volatile=overlay",
                f"--bind-ro={self.debdir}:/debs",
                "--console=read-only",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"nspawn exited {self.nspawn.returncode}: {self.console_text()}")
            pid = _find_init(self.nspawn.pid)
            if pid:
                self.init_pid = pid
                state = run(
                    ["nsenter", "-t", str(pid), "-a", "systemctl", "is-system-running"],
                    check=False,
                ).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"box did not boot in {BOOT_TIMEOUT}s: {self.console_text()}")

    def console_text(self) -> str:
        if self.console and self.console.exists():
            return self.console.read_text(errors="replace")[-4000:]
        return ""

    def wire(self) -> None:
        """Client and origin namespaces, veths into the box, addresses, routes, forwarding."""
        run(["ip", "netns", "add", self.client_ns])
        run(["ip", "netns", "add", self.origin_ns])
        pid = str(self.init_pid)
        # Interface names inside the box are fixed (its own namespace); nothing collides.
        run(["ip", "link", "add", "lan0", "netns", pid, "type", "veth", "peer", "name", "eth0",
             "netns", self.client_ns])  # fmt: skip
        run(["ip", "link", "add", "wan0", "netns", pid, "type", "veth", "peer", "name", "eth0",
             "netns", self.origin_ns])  # fmt: skip
        self.sh(
            f"ip addr add {GATEWAY_LAN}/24 dev lan0 && ip link set lan0 up && "
            f"ip addr add {GATEWAY_WAN}/24 dev wan0 && ip link set wan0 up && "
            "ip link set lo up && sysctl -qw net.ipv4.ip_forward=1"
        )
        for ns, ip, gw in (
            (self.client_ns, CLIENT_IP, GATEWAY_LAN),
            (self.origin_ns, ORIGIN_IP, GATEWAY_WAN),
        ):
            for cmd in (
                ["ip", "link", "set", "lo", "up"],
                ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"],
                ["ip", "link", "set", "eth0", "up"],
                ["ip", "route", "add", "default", "via", gw],
            ):
                run(["ip", "netns", "exec", ns, *cmd])

    def start_origin(self) -> None:
        self.origin = subprocess.Popen(
            ["ip", "netns", "exec", self.origin_ns, sys.executable, __file__, "origin",
             str(ORIGIN_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = run(
                ["ip", "netns", "exec", self.origin_ns, "curl", "-s", "-o", "/dev/null",
                 "--max-time", "1", f"http://{ORIGIN_IP}:{ORIGIN_PORT}/"],
                check=False,
            )  # fmt: skip
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("origin server did not start")

    def install(
        self, deb: Path, dpkg_options: Sequence[str] = (), *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``apt-get install /debs/<deb>`` as an unattended admin would run it.

        stdin is /dev/null, so a dpkg conffile question (which DEBIAN_FRONTEND does not
        silence: it is dpkg's, not debconf's) fails the install instead of hanging the test.
        ``dpkg_options`` are passed as ``-o Dpkg::Options::=...`` (e.g. ``--force-confold``).
        """
        opts = "".join(f" -o Dpkg::Options::={o}" for o in dpkg_options)
        return self.sh(
            f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q{opts} /debs/{deb.name}"
            " </dev/null 2>&1",
            timeout=180,
            check=check,
        )

    def package_version(self, name: str = "tproxy") -> str:
        """The installed version of ``name`` with its dpkg status, e.g. 'install ok installed 1.0'."""
        return self.sh(
            f"dpkg-query -W -f='${{Status}} ${{Version}}' {name}", check=False
        ).stdout.strip()

    def teardown(self) -> None:
        """Stop everything this box started; safe to call twice and after partial setup."""
        if self.origin is not None and self.origin.poll() is None:
            self.origin.terminate()
            try:
                self.origin.wait(5)
            except subprocess.TimeoutExpired:
                self.origin.kill()
                self.origin.wait()
        if self.nspawn is not None and self.nspawn.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    self.nspawn.send_signal(sig)
                try:
                    self.nspawn.wait(STOP_GRACE)
                    break
                except subprocess.TimeoutExpired:
                    continue
            if self.nspawn.poll() is None:
                self.nspawn.wait()
        for ns in (self.client_ns, self.origin_ns):
            run(["ip", "netns", "del", ns], check=False)
        if self.console is not None:
            self.console.unlink(missing_ok=True)
        if self.staged is not None:
            shutil.rmtree(self.staged, ignore_errors=True)


def stage_debs(debs: Sequence[Path], where: Path) -> Path:
    """One directory holding every deb (hard links where possible), to bind at /debs."""
    where.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        target = where / deb.name
        target.unlink(missing_ok=True)
        try:
            os.link(deb, target)
        except OSError:  # another file system
            shutil.copy2(deb, target)
    return where


def repack_deb(src: Path, dest: Path, version: str, edit: Callable[[Path], None]) -> Path:
    """``src`` as another version, its unpacked tree changed by ``edit(root)``, into ``dest``.

    For what the tree cannot produce by itself, e.g. a release whose shipped conffile differs.
    The control file's Version and the program's __version__ follow ``version``; md5sums is
    recomputed (it lists every file but the conffiles, deb-md5sums(5)).
    """
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
        root = Path(tmp) / "root"
        run(["dpkg-deb", "-R", str(src), str(root)])
        control = root / "DEBIAN" / "control"
        control.write_text(
            re.sub(r"^Version: .*$", f"Version: {version}", control.read_text(), flags=re.M)
        )
        for init in root.glob("usr/lib/tproxy/tproxy/__init__.py"):
            init.write_text(
                re.sub(r'^__version__ = ".*"$', f'__version__ = "{version}"', init.read_text(),
                       flags=re.M)
            )  # fmt: skip
        edit(root)
        conffiles_path = root / "DEBIAN" / "conffiles"
        conffiles = set(conffiles_path.read_text().split()) if conffiles_path.exists() else set()
        sums = []
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            listed = not rel.startswith("DEBIAN/") and "/" + rel not in conffiles
            if listed and path.is_file() and not path.is_symlink():
                sums.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {rel}\n")
        (root / "DEBIAN" / "md5sums").write_text("".join(sums))
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / src.name.replace(src.name.split("_")[1], version, 1)
        # gzip -1: a test package, built in well under a second instead of xz's several.
        run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "-b", str(root), str(out)])
    return out


def upgrade_version(version: str) -> str:
    """A version that dpkg sorts after ``version`` and that is still PEP 440 (one '+' only),
    so scripts/package --version accepts it: 0.1.0 -> 0.1.0+upgrade.1."""
    return f"{version}.upgrade.1" if "+" in version else f"{version}+upgrade.1"


@contextlib.contextmanager
def booted_box(deb: Path, *more: Path) -> Iterator[Box]:
    """Boot a box with the debs' dependencies available, wire it, start the origin.

    ``deb`` and ``more`` (e.g. a later version to upgrade to) are all under /debs in the box.
    """
    root = ensure_rootfs(sorted({d for p in (deb, *more) for d in deb_dependencies(p)}))
    box = Box(root=root, debdir=deb.parent)
    try:
        if more:
            box.staged = box.debdir = stage_debs((deb, *more), CACHE_DIR / f"debs-{box.tag}")
        box.boot()
        box.wire()
        box.start_origin()
        yield box
    finally:
        box.teardown()


# -- the origin server (runs inside the origin namespace) -----------------------------------

SLOW_CHUNK = 4096
# /slow sends SLOW_CHUNK bytes every SLOW_INTERVAL seconds: long enough to span a reload.
SLOW_INTERVAL = 0.05
SLOW_TOTAL = 4096 * 100  # 100 chunks: about 5 s


def serve_origin(port: int) -> None:
    """``/`` answers a small page; ``/slow`` trickles SLOW_TOTAL bytes over about 5 s."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path.startswith("/slow"):
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(SLOW_TOTAL))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                for _ in range(SLOW_TOTAL // SLOW_CHUNK):
                    self.wfile.write(b"x" * SLOW_CHUNK)
                    self.wfile.flush()
                    time.sleep(SLOW_INTERVAL)
                return
            body = b"hello from the origin\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "origin":
        serve_origin(int(sys.argv[2]))
    elif len(sys.argv) >= 2 and sys.argv[1] == "rootfs":
        print(ensure_rootfs(sys.argv[2:]))
    else:
        sys.exit("usage: box.py origin PORT | box.py rootfs [PACKAGE...]")
