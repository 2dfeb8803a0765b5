"""Admin-facing behaviour without a lab: the access log when disks fill and directories vanish,
the one-line startup refusals, per-client limits with IPv6 clients, and what the package ships.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from tproxy import preflight
from tproxy.accesslog import AccessLog, AccessLogError, AccessRecord
from tproxy.limits import Kind, Limiter, LimitsConfig

REPO = Path(__file__).resolve().parent.parent
DEBIAN = REPO / "packaging" / "debian"


def record(url: str = "http://example.org/") -> AccessRecord:
    return AccessRecord(
        1700000000.0, 5, "10.0.0.2", "TCP_MISS", 200, 100, "GET", url, "HIER_DIRECT",
        "192.0.2.1", "text/html",
    )  # fmt: skip


# -- access log ----------------------------------------------------------------------------------


def test_disk_full_is_one_error_line_then_a_recovery_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tproxy.accesslog")
    log = AccessLog("/dev/full")  # every write fails with ENOSPC, like a full /var/log
    for _ in range(5):
        log.write(record())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "No space left on device" in errors[0].getMessage()
    assert log.lost == 5
    # Space again (here: a file that can be written): one line says how much was lost.
    assert log.reopen(str(tmp_path / "access.log"))
    log.write(record("http://after/"))
    log.write(record("http://after2/"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"access log {tmp_path / 'access.log'}: writing again, 5 lines lost"]
    assert (tmp_path / "access.log").read_text().count("http://after") == 2
    log.close()


def test_reopen_that_fails_keeps_the_old_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = tmp_path / "access.log"
    log = AccessLog(str(good))
    (tmp_path / "plainfile").write_text("")
    bad = tmp_path / "plainfile" / "access.log"  # its "directory" is a file
    assert not log.reopen(str(bad))
    assert log.path == str(good)
    log.write(record("http://still-logged/"))
    assert "http://still-logged/" in good.read_text()
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"cannot open the access log {bad} (log.access_log)" in message
    assert f"still writing to {good}" in message
    log.close()


def test_unopenable_log_at_startup_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    (tmp_path / "plainfile").write_text("")
    with pytest.raises(AccessLogError) as info:
        AccessLog(str(tmp_path / "plainfile" / "access.log"))
    assert str(info.value).startswith(
        f"cannot open the access log {tmp_path / 'plainfile' / 'access.log'} (log.access_log): "
    )
    assert "\n" not in str(info.value)


def test_deleted_log_directory_is_recreated(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "access.log"
    log = AccessLog(str(path))
    log.write(record("http://one/"))
    assert not log.reopen_if_deleted()  # intact: nothing to do
    shutil.rmtree(tmp_path / "logs")  # an admin's `rm -r /var/log/tproxy`
    log.write(record("http://lost/"))  # goes to the unlinked inode: lost, no error
    assert log.reopen_if_deleted()
    log.write(record("http://two/"))
    assert path.read_text().splitlines()[-1].split()[6] == "http://two/"
    log.close()


def test_a_log_that_cannot_be_opened_again_is_reported_once_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As under the unit when /var/log/tproxy itself is gone (ProtectSystem=strict: no mkdir).
    path = tmp_path / "logs" / "access.log"
    log = AccessLog(str(path))
    shutil.rmtree(tmp_path / "logs")
    (tmp_path / "logs").write_text("")  # a file where the directory was: cannot be opened
    with caplog.at_level(logging.WARNING, logger="tproxy.accesslog"):
        for _ in range(5):
            assert not log.reopen_if_deleted()
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 2  # one warn+err
    (tmp_path / "logs").unlink()
    (tmp_path / "logs").mkdir()
    assert log.reopen_if_deleted()
    log.write(record("http://back/"))
    assert path.read_text().split()[6] == "http://back/"
    log.close()


def test_logrotate_rename_then_reopen(tmp_path: Path) -> None:
    # What the shipped logrotate rule does: rename (no copytruncate), then SIGUSR1 → reopen.
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.write(record("http://before/"))
    path.rename(tmp_path / "access.log.1")
    log.write(record("http://between/"))  # still the renamed file, as delaycompress expects
    assert log.reopen()
    log.write(record("http://after/"))
    assert "http://between/" in (tmp_path / "access.log.1").read_text()
    assert path.read_text().count("\n") == 1 and "http://after/" in path.read_text()
    log.close()


def test_shipped_logrotate_rule_renames_and_signals() -> None:
    text = (DEBIAN / "tproxy.logrotate").read_text()
    # copytruncate would lose lines written between the copy and the truncation.
    assert "copytruncate" not in text
    assert "/var/log/tproxy/*.log" in text
    assert "--signal=USR1" in text and "delaycompress" in text


# -- startup refusals ----------------------------------------------------------------------------


def test_missing_cap_net_admin_is_named() -> None:
    root = "Name:\tx\nCapEff:\t000001ffffffffff\n"
    nobody = "Name:\tx\nCapEff:\t0000000000000000\n"
    only_raw = "CapEff:\t0000000000002000\n"  # CAP_NET_RAW alone
    assert preflight.missing_capability(root) is None
    for status in (nobody, only_raw):
        reason = preflight.missing_capability(status)
        assert reason is not None and "CAP_NET_ADMIN" in reason and "root" in reason


def test_check_privileges_reads_the_status_file(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("CapEff:\t0000000000000000\n")
    with pytest.raises(preflight.PreflightError, match="needs CAP_NET_ADMIN"):
        preflight.check_privileges(status)
    status.write_text("CapEff:\t0000000000001000\n")
    preflight.check_privileges(status)


def test_instance_lock_admits_one_daemon_per_namespace(tmp_path: Path) -> None:
    name = f"tproxy-test-{tmp_path.name}"  # never the real daemon's lock
    assert not preflight.instance_running(name)
    held = preflight.claim_instance(name)
    try:
        assert preflight.instance_running(name)
        with pytest.raises(preflight.PreflightError, match="already running"):
            preflight.claim_instance(name)
    finally:
        held.close()
    # Released with the socket (and by the kernel when the process dies): no stale lock.
    assert not preflight.instance_running(name)


# -- limits with IPv6 clients --------------------------------------------------------------------


def test_ipv6_clients_are_limited_per_64_when_asked() -> None:
    # ipv6_prefix = 64: for networks that give each host a /64 of its own (the default, 128,
    # counts per address: on a LAN segment every host is in the one /64).
    lim = Limiter(
        LimitsConfig(per_client_connections=2, max_clients=100, max_connections=50, ipv6_prefix=64)
    )
    same = ["2001:db8:1:2::10", "2001:db8:1:2:aaaa::1", "2001:db8:1:2:ffff:ffff:ffff:ffff"]
    keys = {lim.client_key(ip) for ip in same}
    assert keys == {"2001:db8:1:2::/64"}
    key = lim.client_key(same[0])
    assert lim.on_accept(key, 0.0) is None
    assert lim.on_accept(lim.client_key(same[1]), 0.0) is None
    # A third address of the same /64 is the same client: privacy addresses do not help.
    refusal = lim.on_accept(lim.client_key(same[2]), 0.0)
    assert refusal is not None and refusal.kind is Kind.CONNECTIONS
    # The neighbouring /64 is another household.
    assert lim.on_accept(lim.client_key("2001:db8:1:3::10"), 0.0) is None
    # One log line per /64 and interval, naming the /64.
    assert lim.should_log(key, Kind.CONNECTIONS, 1.0)
    assert not lim.should_log(key, Kind.CONNECTIONS, 2.0)
    assert lim.should_log(key, Kind.CONNECTIONS, 1.0 + lim.cfg.log_interval)


def test_many_ipv6_sources_keep_the_table_bounded() -> None:
    lim = Limiter(LimitsConfig(max_clients=1000, max_connections=1000))
    for n in range(20_000):  # a /48 walking through its /64s, one short connection each
        key = lim.client_key(f"2001:db8:0:{n:x}::1")
        assert lim.on_accept(key, n * 0.001) is None
        lim.on_close(key, n * 0.001)
        assert len(lim) <= 1000
    assert lim.stats()["evicted_clients"] > 0


# -- packaging ------------------------------------------------------------------------------------


def test_unit_does_not_restart_on_config_errors() -> None:
    unit = (DEBIAN / "tproxy.service").read_text()
    assert "RestartPreventExitStatus=2" in unit
    assert "ExecStopPost=/usr/bin/tproxy rules flush" in unit


def test_prerm_flushes_rules_on_remove() -> None:
    prerm = DEBIAN / "tproxy.prerm"
    text = prerm.read_text()
    assert "#DEBHELPER#" in text
    assert text.index("#DEBHELPER#") < text.index("rules flush")  # after the service stopped
    # ... and after py3clean: byte-code written now would keep /usr/lib/tproxy after a purge.
    assert "python3 -I -B /usr/bin/tproxy rules flush" in text
    subprocess.run(["sh", "-n", str(prerm)], check=True)
    assert prerm.stat().st_mode & 0o111


def test_postrm_purge_removes_config_cache_logs_and_state() -> None:
    text = (DEBIAN / "tproxy.postrm").read_text()
    purge = text[text.index("purge)") : text.index(";;")]
    for path in ("/etc/tproxy", "/var/cache/tproxy", "/var/log/tproxy", "/var/lib/tproxy"):
        assert path in purge
