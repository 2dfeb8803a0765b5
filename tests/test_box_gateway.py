"""The .deb on a real Debian gateway: systemd as PID 1 in systemd-nspawn (tests/box.py).

The box tests run in file order against one booted box (module fixture): install, intercept,
reload, SIGKILL, SIGSTOP, log rotation, upgrade to a second version built from the same tree,
stop, remove, purge — the life of the package on an admin's gateway. Each test leaves the unit
running again for the next, except the last three, which end it.

The shipped conffile itself (every option documented with its default) is checked without a box
in tests/test_conffile.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import box

REPO = box.REPO
# Fail-open budget after the daemon dies (brief: clients keep browsing within 2 s).
FAIL_OPEN_SECONDS = 2.0
# A hung daemon is only detected by the watchdog (WatchdogSec=1s, WatchdogSignal=SIGKILL), then
# ExecStopPost flushes the rules: the same 2 s budget holds. See the unit file.
HUNG_FAIL_OPEN_SECONDS = FAIL_OPEN_SECONDS
EXPOSURE_LIMIT = 3.0

BOX_CONFIG = """\
[proxy]
lan_interfaces = ["lan0"]
ipv6 = false
drain_timeout = "2s"

[log]
access_log = "/var/log/tproxy/access.log"
"""


# -- the box -----------------------------------------------------------------------------------


def _sources_newest() -> float:
    paths = [REPO / "pyproject.toml", *REPO.glob("tproxy/**/*.py"), *REPO.glob("packaging/**/*")]
    return max(p.stat().st_mtime for p in paths if p.is_file())


def _built_deb() -> Path:
    """$TPROXY_DEB if set, else dist/tproxy_<version>_<arch>.deb, rebuilt with scripts/package
    when the sources are newer."""
    if os.environ.get("TPROXY_DEB"):
        return Path(os.environ["TPROXY_DEB"]).resolve()
    debs = sorted((REPO / "dist").glob("tproxy_*.deb"), key=lambda p: p.stat().st_mtime)
    if debs and debs[-1].stat().st_mtime >= _sources_newest():
        return debs[-1]
    subprocess.run([str(REPO / "scripts" / "package")], check=True, capture_output=True)
    debs = sorted((REPO / "dist").glob("tproxy_*.deb"), key=lambda p: p.stat().st_mtime)
    return debs[-1]


def _upgrade_deb(base: Path) -> Path:
    """$TPROXY_UPGRADE_DEB if set, else the tree packaged as the next version after ``base``
    (scripts/package --version), cached beside the box's root file system and rebuilt when the
    sources or the base package are newer."""
    if os.environ.get("TPROXY_UPGRADE_DEB"):
        return Path(os.environ["TPROXY_UPGRADE_DEB"]).resolve()
    version = box.upgrade_version(box.run(["dpkg-deb", "-f", str(base), "Version"]).stdout.strip())
    dest = box.CACHE_DIR / "upgrade"
    debs = list(dest.glob(f"tproxy_{version}_*.deb"))
    newest = max(_sources_newest(), base.stat().st_mtime)
    if debs and debs[0].stat().st_mtime >= newest:
        return debs[0]
    for old in dest.glob("tproxy_*.deb"):
        old.unlink()
    # No lintian: the base package from the same tree was checked; this only differs in version.
    box.run(
        [str(REPO / "scripts" / "package"), "--version", version, "--dest", str(dest),
         "--no-lintian"],
        timeout=600,
    )  # fmt: skip
    return next(dest.glob(f"tproxy_{version}_*.deb"))


def _box_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "dpkg-buildpackage"):
        if shutil.which(tool) is None:
            return f"{tool} missing (apt-get install debootstrap systemd-container debhelper)"
    return None


@pytest.fixture(scope="module")
def debs() -> tuple[Path, Path]:
    """The package under test and the same tree packaged as a later version."""
    reason = _box_unavailable()
    if reason:
        pytest.skip(reason)
    deb = _built_deb()
    return deb, _upgrade_deb(deb)


@pytest.fixture(scope="module")
def gateway(debs: tuple[Path, Path]) -> Iterator[box.Box]:
    deb, upgrade = debs
    with box.booted_box(deb, upgrade) as b:
        # An admin's config management writes the config before installing, so the unit starts
        # intercepting straight from the postinst. --force-confold keeps it over the shipped one.
        b.sh("mkdir -p /etc/tproxy && cat > /etc/tproxy/tproxy.toml <<'EOF'\n" + BOX_CONFIG + "EOF")
        b.sh(
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
            f"-o Dpkg::Options::=--force-confold /debs/{deb.name}",
            timeout=180,
        )
        yield b


def _main_pid(b: box.Box) -> int:
    return int(b.unit_property("tproxy.service", "MainPID") or 0)


def _wait_active(b: box.Box, timeout: float = 10.0) -> None:
    try:
        b.wait_for(
            "tproxy.service active",
            lambda: (
                b.systemctl("is-active", "tproxy.service", check=False).stdout.strip() == "active"
            ),
            timeout,
        )
    except AssertionError as exc:
        journal = b.sh("journalctl -u tproxy --no-pager | tail -40", check=False).stdout
        raise AssertionError(f"{exc}\n{journal}") from None


def _browse_time(b: box.Box, limit: float) -> float:
    """Seconds until a client request gets a 200 again (retrying short requests)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if b.curl("/", timeout=0.5).stdout == "200":
            return time.monotonic() - start
    return float("inf")


def _tproxy_rules(b: box.Box) -> str:
    out = b.sh("iptables-save; ip6tables-save; ip rule show; ip -6 rule show", check=False)
    keep = [
        line
        for line in out.stdout.splitlines()
        if "TPROXY" in line or "NFQUEUE" in line or "fwmark" in line
    ]
    return "\n".join(keep)


def _forwarding(b: box.Box, on: bool) -> None:
    b.sh(f"sysctl -qw net.ipv4.ip_forward={int(on)}")


@pytest.mark.box
def test_installed_unit_is_enabled_and_active(gateway: box.Box) -> None:
    b = gateway
    assert b.systemctl("is-enabled", "tproxy.service", check=False).stdout.strip() == "enabled"
    _wait_active(b)
    assert b.unit_property("tproxy.service", "Type") == "notify"
    assert _main_pid(b) > 0
    # The rules the daemon applied with iptables-restore under the sandbox are in place.
    assert "TPROXY-" in _tproxy_rules(b), b.sh("journalctl -u tproxy --no-pager").stdout
    # The shipped conffile (kept aside as .dpkg-dist because of --force-confold) is valid.
    b.sh("tproxy check-config /etc/tproxy/tproxy.toml.dpkg-dist")


@pytest.mark.box
def test_exposure_score(gateway: box.Box) -> None:
    out = gateway.sh("systemd-analyze security --no-pager tproxy.service", check=False).stdout
    m = re.search(r"Overall exposure level for tproxy.service: ([0-9.]+)", out)
    assert m, out[-2000:]
    print(f"exposure {m.group(1)}")
    assert float(m.group(1)) <= EXPOSURE_LIMIT, out


# Everything the daemon does that a sandbox setting could break, run under the unit's own
# sandbox settings: bundled C extensions under MemoryDenyWriteExecute, netlink (NFQUEUE,
# rtnetlink), IP_TRANSPARENT/SO_MARK, and exec'ing iptables-restore.
SANDBOX_PROBE = """\
import socket, subprocess, sys
sys.path.insert(0, "/usr/lib/tproxy")
import asyncio, cachetools, dpkt, httptools, prometheus_client, re2, uvloop
from netfilterqueue import NetfilterQueue
from pyroute2 import IPRoute
from systemd import daemon

assert re2.compile(r"^(www\\.)?example\\.(com|org)$").match("www.example.org")
httptools.HttpRequestParser(object()).feed_data(b"GET / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
uvloop.run(asyncio.sleep(0))
q = NetfilterQueue()
q.bind(4242, lambda pkt: pkt.accept())
q.unbind()
s = socket.socket()
s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x4)
s.bind(("192.0.2.1", 0))  # non-local address: only allowed with IP_TRANSPARENT
s.close()
subprocess.run(["iptables-restore", "--noflush"], check=True,
               input=b"*mangle\\n:TPROXY-PROBE - [0:0]\\nCOMMIT\\n")
subprocess.run(["iptables", "-t", "mangle", "-X", "TPROXY-PROBE"], check=True)
with IPRoute() as ipr:
    ipr.rule("add", table=4242, priority=4242, fwmark=0x4, fwmask=0x4)
    ipr.rule("del", table=4242, priority=4242, fwmark=0x4, fwmask=0x4)
print("PROBE-OK")
"""


def _sandbox_properties(unit_text: str) -> list[str]:
    """The [Service] settings from the sandbox comment on (see packaging/debian/tproxy.service)."""
    props: list[str] = []
    in_sandbox = False
    for line in unit_text.splitlines():
        if line.startswith("# -- sandbox"):
            in_sandbox = True
        elif line.startswith("["):
            in_sandbox = False
        elif in_sandbox and "=" in line and not line.startswith("#"):
            props.append(line.strip())
    return props


@pytest.mark.box
def test_sandbox_allows_what_the_daemon_needs(gateway: box.Box) -> None:
    b = gateway
    props = _sandbox_properties(b.sh("cat /lib/systemd/system/tproxy.service").stdout)
    assert any(p.startswith("MemoryDenyWriteExecute=") for p in props), props
    b.sh("cat > /run/tproxy-probe.py <<'EOF'\n" + SANDBOX_PROBE + "EOF")
    args = " ".join(f"-p '{p}'" for p in props)
    out = b.sh(
        f"systemd-run --wait --pipe --quiet {args} /usr/bin/python3 -I /run/tproxy-probe.py 2>&1",
        check=False,
    )
    assert "PROBE-OK" in out.stdout, out.stdout + out.stderr


@pytest.mark.box
def test_request_goes_through_the_daemon(gateway: box.Box) -> None:
    b = gateway
    _wait_active(b)
    # Without forwarding only the proxy path works: the daemon terminates the client's
    # connection and originates its own (DESIGN.md §4).
    _forwarding(b, False)
    try:
        assert b.curl("/").stdout == "200"
    finally:
        _forwarding(b, True)
    log = b.sh("cat /var/log/tproxy/access.log", check=False).stdout
    assert f"http://{box.ORIGIN_IP}" in log and box.CLIENT_IP in log, log


@pytest.mark.box
def test_reload_keeps_a_download_running(gateway: box.Box) -> None:
    b = gateway
    _wait_active(b)
    pid = _main_pid(b)
    download = b.client_popen(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
         "--max-time", "20", f"http://{box.ORIGIN_IP}/slow"]
    )  # fmt: skip
    try:
        time.sleep(1.0)
        assert download.poll() is None, "the download finished before the reload"
        b.systemctl("reload", "tproxy.service")
        out, err = download.communicate(timeout=25)
    finally:
        if download.poll() is None:
            download.kill()
            download.wait()
    assert download.returncode == 0, err
    assert out.decode() == f"200 {box.SLOW_TOTAL}"
    assert _main_pid(b) == pid, "reload restarted the daemon"
    assert b.curl("/").stdout == "200"


@pytest.mark.box
def test_sigkill_fails_open_and_restarts(gateway: box.Box) -> None:
    b = gateway
    _wait_active(b)
    pid = _main_pid(b)
    b.systemctl("kill", "-s", "SIGKILL", "tproxy.service")
    elapsed = _browse_time(b, 10.0)
    print(f"browsing again {elapsed:.2f}s after SIGKILL")
    assert elapsed <= FAIL_OPEN_SECONDS
    _wait_active(b)
    assert _main_pid(b) not in (0, pid)
    assert "TPROXY-" in _tproxy_rules(b)
    _forwarding(b, False)
    try:
        assert b.curl("/").stdout == "200", "the restarted daemon does not intercept"
    finally:
        _forwarding(b, True)


@pytest.mark.box
def test_hung_daemon_is_killed_by_the_watchdog(gateway: box.Box) -> None:
    """SIGSTOP: the listener stays bound, so TPROXY keeps diverting into a process that never
    accepts. Only the watchdog ends that; measure how long clients are stranded."""
    b = gateway
    _wait_active(b)
    pid = _main_pid(b)
    b.systemctl("kill", "-s", "SIGSTOP", "--kill-who=main", "tproxy.service")
    elapsed = _browse_time(b, 15.0)
    print(f"browsing again {elapsed:.2f}s after SIGSTOP")
    assert elapsed <= HUNG_FAIL_OPEN_SECONDS
    _wait_active(b, 15.0)
    assert _main_pid(b) not in (0, pid)
    assert b.unit_property("tproxy.service", "NRestarts") != "0"


@pytest.mark.box
def test_logrotate_makes_the_daemon_reopen_its_log(gateway: box.Box) -> None:
    """The package's logrotate rule sends SIGUSR1; new lines land in the new file."""
    b = gateway
    _wait_active(b)
    pid = _main_pid(b)
    assert b.curl("/?before-rotation").stdout == "200"
    b.sh("logrotate -f /etc/logrotate.d/tproxy")
    assert "before-rotation" in b.sh("cat /var/log/tproxy/access.log.1").stdout
    assert b.curl("/?after-rotation").stdout == "200"
    b.wait_for(
        "a line in the new access.log",
        lambda: "after-rotation" in b.sh("cat /var/log/tproxy/access.log", check=False).stdout,
        5.0,
    )
    assert _main_pid(b) == pid, "log rotation restarted the daemon"


def _journal_cursor(b: box.Box) -> str:
    out = b.sh("journalctl -u tproxy.service -n 1 --show-cursor --no-pager -o cat").stdout
    m = re.search(r"^-- cursor: (\S+)$", out, re.M)
    assert m, out
    return m.group(1)


def _unit_journal_since(b: box.Box, cursor: str) -> list[str]:
    return b.sh(
        f"journalctl -u tproxy.service --after-cursor '{cursor}' --no-pager -o cat"
    ).stdout.splitlines()


def _daemon_pids(b: box.Box) -> list[int]:
    """Every tproxy daemon process in the box (not just the unit's main one)."""
    out = b.sh("ps -eo pid=,args=").stdout
    return [int(line.split()[0]) for line in out.splitlines() if "/usr/bin/tproxy run" in line]


def _chains(b: box.Box) -> list[str]:
    out = b.sh("iptables-save; ip6tables-save").stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.startswith(":TPROXY"))


@dataclass(frozen=True)
class _Running:
    """What an upgrade must carry over or replace: taken while the old version runs."""

    version: str
    pid: int
    cursor: str  # journal position: unit messages after it belong to the upgrade
    config: str  # sha256sum of every file in /etc/tproxy
    rules: list[str]
    chains: list[str]


def _running(b: box.Box) -> _Running:
    _wait_active(b)
    rules = sorted(_tproxy_rules(b).splitlines())
    assert any("TPROXY-" in line for line in rules), rules
    return _Running(
        version=b.package_version().rsplit(" ", 1)[-1],
        pid=_main_pid(b),
        cursor=_journal_cursor(b),
        config=b.sh("cd /etc/tproxy && sha256sum *").stdout,
        rules=rules,
        chains=_chains(b),
    )


def _assert_upgraded(b: box.Box, before: _Running, version: str, mark: str) -> None:
    """Installed at ``version``, restarted exactly once on the new code, the old process gone,
    the same rules as before once each (the old process's flushed, not left behind), and
    intercepting: request ``/?<mark>`` goes through the daemon."""
    assert b.package_version() == f"install ok installed {version}"
    _wait_active(b)
    journal = _unit_journal_since(b, before.cursor)
    starts = [line for line in journal if line.startswith("Started tproxy")]
    stops = [line for line in journal if line.startswith("Stopping tproxy")]
    assert len(starts) == 1 and len(stops) == 1, "\n".join(journal)
    pid = _main_pid(b)
    assert pid not in (0, before.pid)
    assert _daemon_pids(b) == [pid]
    assert b.sh("tproxy --version").stdout.strip() == f"tproxy {version}"
    status = json.loads(b.sh("tproxy status --json").stdout)
    assert status["version"] == version and status["pid"] == pid, status
    assert sorted(_tproxy_rules(b).splitlines()) == before.rules
    chains = _chains(b)
    assert chains == before.chains and len(set(chains)) == len(chains), chains
    _forwarding(b, False)
    try:
        assert b.curl(f"/?{mark}").stdout == "200", "the upgraded daemon does not intercept"
    finally:
        _forwarding(b, True)
    b.wait_for(
        "the upgraded daemon's access log line",
        lambda: mark in b.sh("cat /var/log/tproxy/access.log", check=False).stdout,
        5.0,
    )


@pytest.mark.box
def test_upgrade_keeps_the_admins_config_and_restarts_once(
    gateway: box.Box, debs: tuple[Path, Path]
) -> None:
    """``apt install ./tproxy_<new>.deb`` over a running, configured tproxy, unattended.

    dh_installsystemd (compat 13) leaves the unit running through the unpack (prerm
    ``upgrade`` does not stop it) and restarts it once from postinst ``configure <old>``. The
    shipped conffile is unchanged, so dpkg keeps the admin's edited one without a question
    (deb-conffiles(5)), even without --force-confold.
    """
    b = gateway
    deb, upgrade = debs
    b.sh("echo '# edited by the admin before the upgrade' >> /etc/tproxy/tproxy.toml")
    before = _running(b)
    assert before.version == box.run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()
    version = box.run(["dpkg-deb", "-f", str(upgrade), "Version"]).stdout.strip()
    box.run(["dpkg", "--compare-versions", version, "gt", before.version])

    start = time.monotonic()
    out = b.install(upgrade, check=False)
    print(f"upgrade {before.version} -> {version} took {time.monotonic() - start:.1f}s")
    assert out.returncode == 0, out.stdout
    assert "Configuration file" not in out.stdout, out.stdout  # no conffile question
    # The admin's file byte for byte, and nothing new beside it (.dpkg-new, .dpkg-old; the
    # .dpkg-dist from the first install's --force-confold is untouched).
    assert b.sh("cd /etc/tproxy && sha256sum *").stdout == before.config
    _assert_upgraded(b, before, version, "after-upgrade")


# A later release documents a new option in the shipped conffile.
NEW_CONFFILE_LINE = "# (new in this release) an option documented with its default"


@pytest.mark.box
def test_upgrade_over_a_changed_shipped_conffile_keeps_the_admins(gateway: box.Box) -> None:
    """The admin edited tproxy.toml and the new release changed the shipped one: dpkg must ask
    (deb-conffiles(5)), and DEBIAN_FRONTEND=noninteractive does not answer dpkg's question.

    Unattended, plain ``apt install`` fails at configure and the running daemon keeps
    intercepting; ``-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold``
    finishes it, keeping the admin's file and leaving the new one as tproxy.toml.dpkg-dist.
    """
    b = gateway
    assert b.staged is not None, "booted_box stages the debs when given more than one"
    before = _running(b)
    version = box.upgrade_version(before.version)
    current = next(b.staged.glob(f"tproxy_{before.version}_*.deb"))

    def document_new_option(root: Path) -> None:
        with open(root / "etc/tproxy/tproxy.toml", "a") as f:
            f.write(NEW_CONFFILE_LINE + "\n")

    release = box.repack_deb(current, b.staged, version, document_new_option)

    out = b.install(release, check=False)
    assert out.returncode != 0, out.stdout
    assert "conffile prompt" in out.stdout, out.stdout
    # Unpacked but not configured: the old daemon was never stopped and still intercepts.
    assert _main_pid(b) == before.pid
    assert b.sh("cd /etc/tproxy && sha256sum tproxy.toml").stdout in before.config
    _forwarding(b, False)
    try:
        assert b.curl("/?half-upgraded").stdout == "200"
    finally:
        _forwarding(b, True)

    out = b.install(release, ["--force-confdef", "--force-confold"], check=False)
    assert out.returncode == 0, out.stdout
    assert b.sh("cd /etc/tproxy && sha256sum tproxy.toml").stdout in before.config
    assert NEW_CONFFILE_LINE in b.sh("cat /etc/tproxy/tproxy.toml.dpkg-dist").stdout
    assert NEW_CONFFILE_LINE not in b.sh("cat /etc/tproxy/tproxy.toml").stdout
    b.sh("tproxy check-config /etc/tproxy/tproxy.toml.dpkg-dist")
    _assert_upgraded(b, before, version, "after-conffile-upgrade")


@pytest.mark.box
def test_stop_removes_every_rule(gateway: box.Box) -> None:
    b = gateway
    _wait_active(b)
    b.systemctl("stop", "tproxy.service")
    assert _tproxy_rules(b) == ""
    assert b.sh("ip route show table all | grep -c 'table 100' || true").stdout.strip() == "0"
    # Routed again, not proxied.
    assert b.curl("/").stdout == "200"


@pytest.mark.box
def test_remove_stops_the_service_and_keeps_the_admins_config(gateway: box.Box) -> None:
    b = gateway
    b.systemctl("start", "tproxy.service")
    _wait_active(b)
    assert _tproxy_rules(b) != ""
    # The admin's edit to the conffile must survive a remove (Debian policy §10.7.3).
    b.sh("echo '# edited by the admin' >> /etc/tproxy/tproxy.toml")
    b.sh("DEBIAN_FRONTEND=noninteractive apt-get remove -y -q tproxy", timeout=120)
    assert b.systemctl("is-active", "tproxy.service", check=False).stdout.strip() != "active"
    assert _tproxy_rules(b) == ""
    assert b.curl("/").stdout == "200"  # routed again
    assert "# edited by the admin" in b.sh("cat /etc/tproxy/tproxy.toml").stdout
    assert b.sh("test -e /usr/bin/tproxy || echo gone").stdout.strip() == "gone"


@pytest.mark.box
def test_purge_removes_config_cache_and_logs(gateway: box.Box) -> None:
    b = gateway
    b.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q tproxy", timeout=120)
    left = b.sh(
        "ls -d /etc/tproxy /var/cache/tproxy /var/log/tproxy /var/lib/tproxy /usr/lib/tproxy "
        "/run/tproxy 2>/dev/null || true"
    ).stdout
    assert left.strip() == ""
    assert _tproxy_rules(b) == ""
