"""The admin's day on a real gateway (netns lab): a second `tproxy run`, a port already taken,
reloads of a config that went missing or bad, `tproxy rules flush` under a running daemon.

The rules are compared with ``iptables-save`` before and after: "nothing changed" is checked,
not assumed.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from tests.lab import Lab
from tests.proxy import TPROXY, Proxy

pytestmark = pytest.mark.lab

_COUNTERS = re.compile(r"\[\d+:\d+\]")


def kernel_state(proxy: Proxy) -> str:
    """Rules and policy routing of the gateway, without counters and timestamps. (Only the
    routes of tproxy's table: forwarding on/off adds and removes IPv6 anycast local routes.)"""
    text = proxy.rules()
    for fam in ("-4", "-6"):
        text += proxy.lab.run("gateway", ["ip", fam, "rule", "show"]).stdout
        text += proxy.lab.run("gateway", ["ip", fam, "route", "show", "table", "100"]).stdout
    return "\n".join(
        _COUNTERS.sub("", line) for line in text.splitlines() if not line.startswith("#")
    )


def wait_for(proxy: Proxy, words: str, count: int = 1, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in proxy.stderr().splitlines() if words in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def browse_through(lab: Lab) -> None:
    lab.set_forwarding(False)  # only intercepted traffic flows (DESIGN.md §4)
    try:
        res = lab.curl("client", lab.url("/ip", v6=False), timeout=5)
        assert res.status == 200, res.stderr
    finally:
        lab.set_forwarding(True)


@pytest.mark.parametrize("port", [None, 3999], ids=["same-port", "other-port"])
def test_second_instance_leaves_the_first_ones_rules(lab: Lab, port: int | None) -> None:
    with Proxy(lab) as proxy:
        before = kernel_state(proxy)
        argv = ["run", "--config", str(proxy.config_path), "-i", lab.gw_lan_if, "--access-log", ""]
        if port is not None:
            argv += ["--port", str(port)]  # binds fine: only the instance lock can stop it
        res = proxy.tproxy(*argv, check=False)
        assert res.returncode == 3, res.stderr
        assert res.stderr.startswith("tproxy: another tproxy daemon is already running"), res.stderr
        assert len(res.stderr.splitlines()) == 1, res.stderr
        assert kernel_state(proxy) == before
        browse_through(lab)


def test_port_in_use_is_one_line_and_touches_nothing(lab: Lab) -> None:
    code = (
        "import socket,time;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
        "s.bind(('127.0.0.1',3129));s.listen();print('up',flush=True);time.sleep(60)"
    )
    holder = lab.popen("gateway", [sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"up"
    proxy = Proxy(lab)
    res = proxy.tproxy(
        "run", "--config", str(proxy.config_path), "-i", lab.gw_lan_if, "--access-log", "",
        check=False,
    )  # fmt: skip
    assert res.returncode == 3, res.stderr
    assert res.stderr.strip() == (
        "tproxy: cannot listen on port 3129 (proxy.listen_port): Address already in use"
    )
    assert "TPROXY" not in proxy.rules()


def test_missing_lan_interface_is_one_line(lab: Lab) -> None:
    proxy = Proxy(lab)
    res = proxy.tproxy(
        "run", "--config", str(proxy.config_path), "-i", "nosuch0", "--access-log", "",
        check=False,
    )  # fmt: skip
    assert res.returncode == 3
    assert res.stderr.strip() == "tproxy: LAN interface 'nosuch0' does not exist"
    assert "TPROXY" not in proxy.rules()


def test_reload_of_a_missing_unreadable_or_bad_config_keeps_everything(lab: Lab) -> None:
    with Proxy(lab) as proxy:
        assert proxy.proc is not None
        path = proxy.config_path
        good = path.read_text()
        before = kernel_state(proxy)
        cases = [
            (lambda: path.unlink(), f"{path}: no such file"),
            (lambda: path.mkdir(), f"{path}: cannot read: Is a directory"),
            (
                lambda: (path.rmdir(), path.write_text('[proxy]\nlisten_port = "x"\n' + good)),
                f"{path}:2: proxy.listen_port: expected an integer, got 'x'",
            ),
            (lambda: path.write_text("[proxy\n"), f"{path}:1: TOML syntax error"),
        ]
        for number, (break_it, words) in enumerate(cases, start=1):
            break_it()
            proxy.proc.send_signal(signal.SIGHUP)
            refused = wait_for(proxy, "reload refused", number)
            assert len(refused) == number, proxy.stderr()
            # One line, naming the file (and line and key when there are some).
            assert words in refused[-1], refused[-1]
            assert "keeping the running configuration" in refused[-1]
            assert kernel_state(proxy) == before
        assert proxy.proc.poll() is None
        assert "reloaded" not in proxy.stderr()
        browse_through(lab)
        # Fixed again: the reload goes through.
        path.write_text(good)
        proxy.proc.send_signal(signal.SIGHUP)
        assert wait_for(proxy, "reloaded"), proxy.stderr()
        assert kernel_state(proxy) == before


def test_rules_flush_under_a_running_daemon_warns_and_reload_restores(lab: Lab) -> None:
    with Proxy(lab) as proxy:
        assert proxy.proc is not None
        before = kernel_state(proxy)
        res = proxy.tproxy("rules", "flush")
        assert "TPROXY" not in proxy.rules()
        assert "still running but intercepts nothing" in res.stderr
        assert "systemctl reload tproxy" in res.stderr
        proxy.proc.send_signal(signal.SIGHUP)
        assert wait_for(proxy, "reloaded"), proxy.stderr()
        assert kernel_state(proxy) == before
        browse_through(lab)
    # Stopped: a flush (ExecStopPost) says nothing more than that it removed the rules.
    res = proxy.lab.run("gateway", [*TPROXY, "rules", "flush"])
    assert res.stderr == ""


def test_rules_show_is_readable(lab: Lab) -> None:
    with Proxy(lab) as proxy:
        out = proxy.tproxy("rules", "show", "-i", lab.gw_lan_if).stdout
    assert "# iptables-restore --noflush (rendered)" in out
    assert "# live rules of tproxy's chains" in out
    assert "--on-port 3129" in out
    assert "Traceback" not in out


def test_rules_apply_without_a_daemon_warns(lab: Lab) -> None:
    proxy = Proxy(lab)
    try:
        res = proxy.tproxy("rules", "apply", "-c", str(proxy.config_path), "-i", lab.gw_lan_if)
        assert "TPROXY-" in proxy.rules()
        assert "no tproxy daemon runs here" in res.stderr
    finally:
        proxy.tproxy("rules", "flush")
    assert "TPROXY" not in proxy.rules()


def test_reload_to_a_missing_lan_interface_is_refused(lab: Lab) -> None:
    proxy = Proxy(lab, f'[proxy]\nlan_interfaces = ["{lab.gw_lan_if}"]\n')
    argv = [*TPROXY, "run", "--config", str(proxy.config_path), "--access-log", ""]
    proxy.proc = lab.popen(
        "gateway", argv, stdout=subprocess.DEVNULL, stderr=proxy.stderr_path.open("wb")
    )
    try:
        assert wait_for(proxy, "intercepting", timeout=15), proxy.stderr()
        before = kernel_state(proxy)
        text = proxy.config_path.read_text().replace(lab.gw_lan_if, "nosuch0")
        proxy.config_path.write_text(text)
        proxy.proc.send_signal(signal.SIGHUP)
        (line,) = wait_for(proxy, "reload refused")
        assert "proxy.lan_interfaces: LAN interface 'nosuch0' does not exist" in line
        assert kernel_state(proxy) == before
    finally:
        proxy.stop()
