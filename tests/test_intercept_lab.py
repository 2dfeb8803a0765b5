"""Foundation: transparent interception end to end in the netns lab (real kernel, real curl)."""

from __future__ import annotations

import signal
import time

import pytest

from tests.lab import Lab
from tests.proxy import Proxy

pytestmark = pytest.mark.lab


def assert_nothing_of_ours(proxy: Proxy) -> None:
    rules = proxy.rules()
    assert "TPROXY" not in rules, rules
    routes = proxy.routes()
    assert "lookup 100" not in routes, routes
    assert "table 100" not in routes, routes


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_request_goes_through_the_daemon_and_keeps_client_address(lab: Lab, v6: bool) -> None:
    with Proxy(lab) as proxy:
        # Forwarding off: only traffic the daemon terminates and re-originates still flows.
        lab.set_forwarding(False)
        res = lab.curl("client", lab.url("/ip", v6=v6))
        assert res.status == 200, res.stderr
        assert res.body.decode().strip() == (lab.client_v6 if v6 else lab.client_v4)
        lines = proxy.log_lines(1)
        assert any(" TCP_MISS/200 " in line and "/ip " in line for line in lines), lines
        client = lab.client_v6 if v6 else lab.client_v4
        assert any(line.split()[2] == client for line in lines)
    assert_nothing_of_ours(proxy)


def test_bypassed_client_and_destination_are_not_intercepted(lab: Lab) -> None:
    config = f"""
[rules]
bypass_clients = ["{lab.client_v4}/32"]
bypass_destinations = ["{lab.origin_v6}/128"]
"""
    with Proxy(lab, config) as proxy:
        # Routed traffic still works for the bypassed client ...
        res = lab.curl("client", lab.url("/ip", v6=False))
        assert res.status == 200
        # ... and for the bypassed v6 destination ...
        res6 = lab.curl("client", lab.url("/ip", v6=True))
        assert res6.status == 200
        assert proxy.log_lines() == []
        # ... but only because it is routed: without forwarding it stops.
        lab.set_forwarding(False)
        assert lab.curl("client", lab.url("/ip", v6=False), timeout=1.5).status == 0
        assert lab.curl("client", lab.url("/ip", v6=True), timeout=1.5).status == 0
        assert proxy.log_lines() == []


def test_gateway_own_connections_are_not_intercepted(lab: Lab) -> None:
    with Proxy(lab) as proxy:
        res = lab.curl("gateway", lab.url("/ip", v6=False))
        assert res.status == 200
        assert res.body.decode().strip() == lab.gw_wan_v4
        assert proxy.log_lines() == []


def test_gateway_address_as_source_when_not_transparent(lab: Lab) -> None:
    with Proxy(lab, "[proxy]\ntransparent_upstream = false\n") as proxy:
        lab.set_forwarding(False)
        res = lab.curl("client", lab.url("/ip", v6=False))
        assert res.status == 200
        assert res.body.decode().strip() == lab.gw_wan_v4
        assert len(proxy.log_lines(1)) == 1


def test_stop_removes_everything_and_clients_browse_directly(lab: Lab) -> None:
    proxy = Proxy(lab).start()
    assert lab.curl("client", lab.url("/ip", v6=False)).status == 200
    assert proxy.stop(signal.SIGTERM) == 0
    assert_nothing_of_ours(proxy)
    res = lab.curl("client", lab.url("/ip", v6=False))
    assert res.status == 200
    assert len(proxy.log_lines()) == 1  # the second request did not pass the daemon


def timewait_on_port_80(lab: Lab) -> list[str]:
    out = lab.run("gateway", ["ss", "-Htan", "state", "time-wait"]).stdout
    return [line for line in out.splitlines() if ":80 " in line + " " or ":http" in line]


def test_stop_leaves_no_time_wait_sockets_that_would_stall_routed_flows(lab: Lab) -> None:
    # The proxy's closed upstream connections (source = the client's address) sit in TIME_WAIT;
    # once the same 4-tuple is merely routed, early demux would hand its packets to them and
    # ip_forward drops packets that carry a socket. Stopping must clear them.
    proxy = Proxy(lab).start()
    for _ in range(5):
        assert lab.curl("client", lab.url("/ip", v6=False)).status == 200
    proxy.stop(signal.SIGTERM)
    assert timewait_on_port_80(lab) == []
    assert lab.curl("client", lab.url("/ip", v6=False)).status == 200


def test_sigkill_then_rules_flush_leaves_nothing(lab: Lab) -> None:
    proxy = Proxy(lab).start()
    proxy.stop(signal.SIGKILL)
    assert "TPROXY-" in proxy.rules()  # a killed daemon cannot clean up ...
    out = proxy.tproxy("rules", "flush")
    assert "removed" in out.stdout
    assert_nothing_of_ours(proxy)
    assert timewait_on_port_80(lab) == []  # ... but `tproxy rules flush` can, with no config at all
    assert lab.curl("client", lab.url("/ip", v6=False)).status == 200


def test_rules_show_apply_flush_cli(lab: Lab) -> None:
    proxy = Proxy(lab)
    shown = proxy.tproxy("rules", "show", "-i", lab.gw_lan_if).stdout
    assert "-j TPROXY" in shown and "(none installed)" in shown
    proxy.tproxy("rules", "apply", "-i", lab.gw_lan_if)
    proxy.tproxy("rules", "apply", "-i", lab.gw_lan_if)  # idempotent
    rules = proxy.rules()
    assert rules.count("-A PREROUTING -j TPROXY-PRE") == 2  # one per family
    proxy.tproxy("rules", "flush")
    assert_nothing_of_ours(proxy)


def test_bad_config_is_refused_with_file_line_key(lab: Lab) -> None:
    proxy = Proxy(lab, "[proxy]\nports = [80]\nlisten_port = 0\n")
    res = proxy.tproxy("run", "--config", str(proxy.config_path), "-i", lab.gw_lan_if, check=False)
    assert res.returncode == 2
    assert f"{proxy.config_path}:3: proxy.listen_port: must be at least 1" in res.stderr
    assert "TPROXY" not in proxy.rules()


def test_reload_refuses_what_needs_a_restart_and_keeps_running(lab: Lab) -> None:
    with Proxy(lab) as proxy:
        text = proxy.config_path.read_text()
        proxy.config_path.write_text("[proxy]\nlisten_port = 3199\n" + text)
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "needs a restart" not in proxy.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "proxy.listen_port: changing it needs a restart" in proxy.stderr()
        lab.set_forwarding(False)
        assert lab.curl("client", lab.url("/ip", v6=False)).status == 200
        assert "--on-port 3129" in proxy.rules()
