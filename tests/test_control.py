"""Operations: control socket (`tproxy status`, reload, registrable commands) and /metrics.

Unit part: the pure pieces (rate ring, request parsing, config, metric naming, HTTP answers) and
the two components on a real event loop with real sockets in a temp dir / on loopback.
Lab part: the real daemon in the gateway namespace, driven by curl from the client.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.inproc import hand_over
from tests.lab import Lab
from tests.proxy import Proxy
from tproxy import config as config_mod
from tproxy import control, metrics, status_cli
from tproxy.config import ConfigError, ConfigErrors
from tproxy.daemon import Daemon
from tproxy.server import Server

# -- pure parts --------------------------------------------------------------------------------


def test_rate_meter_window_and_ring() -> None:
    m = control.RateMeter(window=10.0, interval=1.0)
    assert m.rate(100.0, 0) == 0.0  # no samples yet
    for i in range(30):  # 30 s at 5 req/s
        m.sample(100.0 + i, 5 * i)
    assert len(m.samples) == 11  # the ring keeps one window, not the history
    assert m.rate(129.0, 145) == pytest.approx(5.0)
    # Traffic stops: the rate falls to zero once the window has passed.
    assert m.rate(135.0, 145) == pytest.approx((145 - 5 * 25) / 10)
    assert m.rate(140.0, 145) == 0.0
    # Just after start, a rate over a fraction of a second is not extrapolated to huge values.
    fresh = control.RateMeter()
    fresh.sample(0.0, 0)
    assert fresh.rate(0.01, 3) == pytest.approx(3.0)


def test_parse_request_forms_and_errors() -> None:
    assert control.parse_request(b'{"cmd": "status"}\n') == ("status", {})
    assert control.parse_request(b'{"cmd":"cache-purge","args":{"url":"http://a/"}}') == (
        "cache-purge",
        {"url": "http://a/"},
    )
    assert control.parse_request(b"status\r\n") == ("status", {})
    for bad, reason in [
        (b"{not json", "not JSON"),
        (b"[1]", "must be a JSON object"),
        (b'{"args": {}}', 'missing "cmd"'),
        (b'{"cmd": "x", "args": [1]}', '"args" must be'),
        (b"two words", "one word"),
    ]:
        with pytest.raises(control.CommandError, match=re.escape(reason)):
            control.parse_request(bad)


def _cfg(text: str) -> config_mod.Config:
    import tomllib

    config_mod.load(None)  # registers the feature sections
    return config_mod.parse(tomllib.loads(text), "t.toml", text)


def test_control_config() -> None:
    d = _cfg("").sections["control"]
    assert d == control.ControlConfig(True, "/run/tproxy/control.sock", 0o660, "")
    c = _cfg('[control]\nsocket = "/tmp/x.sock"\nmode = "0600"\ngroup = "adm"\n')
    assert c.sections["control"] == control.ControlConfig(True, "/tmp/x.sock", 0o600, "adm")
    assert _cfg("[control]\nmode = 0o640\n").sections["control"].mode == 0o640
    with pytest.raises(ConfigErrors) as err:
        _cfg('[control]\nsocket = "rel.sock"\nmode = "rw-rw----"\nsockt = 1\n')
    text = str(err.value)
    assert "t.toml:2: control.socket: must be an absolute path" in text
    assert "t.toml:3: control.mode: not a file mode" in text
    assert "control.sockt: unknown key" in text
    with pytest.raises(ConfigError, match="longer than 107 bytes"):
        _cfg(f'[control]\nsocket = "/{"x" * 120}"\n')


def test_metrics_config() -> None:
    assert _cfg("").sections["metrics"] == metrics.MetricsConfig(True, (("127.0.0.1", 9101),))
    v6 = _cfg('[metrics]\nlisten = ["127.0.0.1:9101", "[::1]:9102"]\n').sections["metrics"]
    assert v6.listen == (("127.0.0.1", 9101), ("::1", 9102))
    assert _cfg('[metrics]\nlisten = "[::1]:9101"\n').sections["metrics"].listen == (("::1", 9101),)
    for bad, reason in [
        ('"localhost:9101"', "not an address:port"),
        ('"127.0.0.1:70000"', "not a TCP port"),
        ('"[127.0.0.1]:9101"', "brackets are for IPv6"),
        ('"0.0.0.0:9101"', "listens on every address"),
        ('"[::]:9101"', "listens on every address"),
        ('["127.0.0.1:1", "127.0.0.1:1"]', "listed twice"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(reason)):
            _cfg(f"[metrics]\nlisten = {bad}\n")
    # A wildcard is the admin's explicit choice with allow_lan.
    ok = _cfg('[metrics]\nlisten = "0.0.0.0:9101"\nallow_lan = true\n').sections["metrics"]
    assert ok.listen == (("0.0.0.0", 9101),) and ok.allow_lan


def test_lan_conflicts_and_names() -> None:
    lan = {"br0": ["192.168.1.1", "fd00::1"], "lan2": ["10.0.0.1"]}
    listen = [("127.0.0.1", 9101), ("192.168.1.1", 9101), ("fd00:0::1", 9101)]
    assert metrics.lan_conflicts(listen, lan) == [
        (("192.168.1.1", 9101), "br0"),
        (("fd00:0::1", 9101), "br0"),
    ]
    assert metrics.metric_name("tproxy", "cache", "hits-ratio.5m") == "tproxy_cache_hits_ratio_5m"
    assert dict(metrics.flatten_status({"a": 1, "b": {"c": 2.5, "d": True}, "s": "x", "l": [1]}))
    assert dict(metrics.flatten_status({"a": 1, "b": {"c": 2.5, "d": True}, "s": "x"})) == {
        "a": 1.0,
        "b_c": 2.5,
        "b_d": 1.0,
    }


def test_component_families_counter_suffix_and_dedup() -> None:
    seen: set[str] = set()
    fams = list(
        metrics.component_families("cache", {"hits_total": 7, "size_bytes": 10, "hits": 1}, seen)
    )
    by_name = {f.name: f for f in fams}
    assert by_name["tproxy_cache_hits"].type == "counter"  # from hits_total
    assert by_name["tproxy_cache_size_bytes"].type == "gauge"
    assert len(fams) == 2  # "hits" would collide with the counter's name and is dropped
    declared = list(metrics.component_families("f", {"denied": 3, "rules": 2}, set(), {"denied"}))
    assert [(f.name, f.type) for f in declared] == [
        ("tproxy_f_denied", "counter"),
        ("tproxy_f_rules", "gauge"),
    ]


def test_http_answers() -> None:
    reg = CollectorRegistry()
    ok = metrics.answer(reg, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and b"text/plain; version=0.0.4" in ok
    om = metrics.answer(reg, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n")
    assert b"application/openmetrics-text" in om and om.endswith(b"# EOF\n")
    head = metrics.answer(reg, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert head.endswith(b"\r\n\r\n")
    assert metrics.answer(reg, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert metrics.answer(reg, b"GET /admin HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert metrics.answer(reg, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")


def test_format_status_is_readable() -> None:
    st = {
        "version": "0.1.0", "pid": 42, "config": "/etc/tproxy/tproxy.toml", "uptime": 3725.0,
        "started": 0.0, "connections": {"active": 3, "total": 120},
        "requests": {"total": 999, "per_second": 12.345, "window": 10.0}, "bad_requests": 2,
        "bytes": {"in": 2048, "out": 5 * 1024 * 1024, "spliced": 4 * 1024 * 1024},
        "overloaded": True, "draining": False,
        "upstream": {"connects": 50, "errors": 1, "pool_idle": 4},
        "components": {"cache": {"entries": 5, "memory": {"bytes": 100}, "ratio": 0.5}},
    }  # fmt: skip
    text = status_cli.format_status(st)
    assert "up 1h02m" in text
    assert "pid 42, starting, up" in status_cli.format_status({**st, "state": "starting"})
    assert re.search(r"^connections\s+3 active, 120 total$", text, re.M)
    assert re.search(r"^requests\s+999 total, 12.3/s \(last 10 s\)$", text, re.M)
    assert "2.0 KiB from clients, 5.0 MiB to clients (4.0 MiB of it spliced)" in text
    assert "OVERLOADED" in text
    assert re.search(r"^cache\s+entries=5 memory.bytes=100 ratio=0.5$", text, re.M)


# -- components on a real loop -----------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tpc-") as d:
        yield Path(d)


def _daemon(text: str) -> Daemon:
    # Upstream connections from the proxy's own address: binding the client's needs root.
    head = (
        '[log]\naccess_log = ""\n[proxy]\nlan_interfaces = ["lo"]\ntransparent_upstream = false\n'
    )
    cfg = _cfg(head + text)
    return Daemon(cfg)


def _component(daemon: Daemon, kind: type[Any]) -> Any:
    return next(c for c in daemon.components if isinstance(c, kind))


async def _ask(path: Path, line: bytes) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(line)
    await writer.drain()
    answer = json.loads(await reader.readline())
    writer.close()
    assert isinstance(answer, dict)
    return answer


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# Real traffic through the daemon's in-process server, without root or rules: see intercept().
ORIGIN_BODY = b"from the origin\n"
REQUEST = b"GET /x HTTP/1.1\r\nHost: origin.test\r\n\r\n"
WAIT = 3.0


async def _serve_origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (
        len(ORIGIN_BODY),
        ORIGIN_BODY,
    )
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


class Client:
    """One client connection the proxy serves as if TPROXY had diverted it to ``port``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.sent = self.received = 0

    async def get(self) -> tuple[int, bytes]:
        self.writer.write(REQUEST)
        self.sent += len(REQUEST)
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), WAIT)
        length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
        body = await asyncio.wait_for(self.reader.readexactly(length), WAIT)
        self.received += len(head) + len(body)
        return int(head.split()[1]), body

    def close(self) -> None:
        self.writer.close()


async def intercept(server: Server, origin: bool = True) -> tuple[Client, asyncio.Server | None]:
    """A client connection handed to ``server`` the way TPROXY hands it over: the proxy's end
    has the original destination as its local address (getsockname), and that is where the
    proxy connects upstream. Without root: accept on a listener at the destination, close the
    listener, then (``origin``) start an origin on that very port (SO_REUSEADDR)."""
    client, port = await hand_over(server)
    reader, writer = await asyncio.open_connection(sock=client)
    srv = await asyncio.start_server(_serve_origin, "127.0.0.1", port) if origin else None
    return Client(reader, writer), srv


async def until(predicate: Any) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_control_component_end_to_end(sock_dir: Path) -> None:
    path = sock_dir / "c.sock"

    async def main() -> None:
        daemon = _daemon(
            f'[control]\nsocket = "{path}"\nmode = "0600"\n[metrics]\nenabled = false\n'
        )
        ctl = _component(daemon, control.Control)
        await ctl.start(daemon)
        client, origin = await intercept(daemon.server)
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            for _ in range(3):  # one keep-alive connection
                assert await client.get() == (200, ORIGIN_BODY)
            await until(lambda: daemon.server.stats.requests_total == 3)
            st = await _ask(path, b'{"cmd": "status"}\n')
            assert st["ok"], st
            res = st["result"]
            assert res["requests"]["total"] == 3
            assert res["connections"] == {"active": 1, "total": 1}
            # The live connection's bytes count before it closes.
            assert res["bytes"] == {"in": client.sent, "out": client.received, "spliced": 0}
            assert res["spliced_bodies"] == 0  # small bodies go through user space
            assert res["upstream"]["connects"] == 1 and res["upstream"]["errors"] == 0
            assert res["pid"] == os.getpid()
            assert {"control", "metrics"} <= set(res["components"])

            async def purge(args: dict[str, Any]) -> dict[str, Any]:
                if "url" not in args:
                    raise control.CommandError("cache-purge needs a url")
                return {"purged": args["url"]}

            ctl.register("cache-purge", purge)
            with pytest.raises(ValueError, match="already registered"):
                ctl.register("cache-purge", purge)
            ok = await _ask(path, b'{"cmd":"cache-purge","args":{"url":"http://a/"}}\n')
            assert ok == {"ok": True, "result": {"purged": "http://a/"}}
            bad = await _ask(path, b'{"cmd":"cache-purge"}\n')
            assert bad == {"ok": False, "error": "cache-purge needs a url"}
            unknown = await _ask(path, b"nope\n")
            assert not unknown["ok"] and "cache-purge, help, reload, status" in unknown["error"]
            # Several requests on one connection, and an over-long line is refused.
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b"help\n\nstatus\n" + b"x" * (control.MAX_REQUEST_LINE + 10) + b"\n")
            answers = [json.loads(await reader.readline()) for _ in range(3)]
            writer.close()
            assert answers[0]["result"]["commands"][0] == "cache-purge"
            assert answers[1]["ok"] and answers[2] == {"ok": False, "error": "request too long"}
            # The synchronous client used by `tproxy status` (in a thread: the loop serves).
            res2 = await asyncio.to_thread(status_cli.request, str(path), "status")
            assert res2["requests"]["total"] == 3
            with pytest.raises(status_cli.CommandFailed, match="unknown command"):
                await asyncio.to_thread(status_cli.request, str(path), "frobnicate")
            # Closed: the connection's bytes move into the daemon's totals, nothing counts twice.
            client.close()
            await until(lambda: not daemon.server.connections)
            res3 = (await _ask(path, b"status\n"))["result"]
            assert res3["connections"] == {"active": 0, "total": 1}
            assert res3["bytes"] == {"in": client.sent, "out": client.received, "spliced": 0}
        finally:
            client.close()
            assert origin is not None
            origin.close()
            await daemon.server.stop()
            await ctl.stop(daemon)
        assert not path.exists()  # removed on stop

    run(main())


def test_stale_socket_is_replaced_and_live_one_refused(sock_dir: Path) -> None:
    path = sock_dir / "c.sock"
    # A dead daemon's socket file: bound, never listening → connect is refused.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    assert path.exists()

    async def main() -> None:
        text = f'[control]\nsocket = "{path}"\n[metrics]\nenabled = false\n'
        first = _daemon(text)
        ctl1 = _component(first, control.Control)
        await ctl1.start(first)
        try:
            second = _daemon(text)
            ctl2 = _component(second, control.Control)
            # Another namespace's daemon owns the path: this one runs on without a socket ...
            await ctl2.start(second)
            assert ctl2.status()["socket"] is None
            # ... and a reload that moves a socket onto a live one is refused.
            moved = _cfg(f'[control]\nsocket = "{path}"\n')
            ctl2.cfg = control.ControlConfig(socket=str(sock_dir / "other.sock"))
            with pytest.raises(control.SocketInUse):
                await ctl2.reload(second, moved)
            await ctl2.stop(second)
            assert (await _ask(path, b"help\n"))["ok"]  # the first one still serves
        finally:
            await ctl1.stop(first)
        assert not path.exists()
        path.write_text("not a socket")
        third = _daemon(text)
        ctl3 = _component(third, control.Control)
        with pytest.raises(ConfigError, match="exists and is not a socket"):
            await ctl3.start(third)
        await ctl3.stop(third)

    run(main())


def test_not_running_is_one_clear_line(sock_dir: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "tproxy.cli", "status", "--socket", str(sock_dir / "none.sock")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == status_cli.EXIT_NOT_RUNNING
    assert res.stderr.strip().splitlines() == [
        f"tproxy: tproxy is not running (no daemon on control socket {sock_dir}/none.sock)"
    ]


@pytest.mark.parametrize("answer", [b"not json\n", b"[1, 2]\n", b'"ok"\n'])
def test_a_garbled_answer_is_one_clear_error(sock_dir: Path, answer: bytes) -> None:
    # A peer on the socket that is not tproxy (or a broken one): the admin reads what came back.
    path = str(sock_dir / "odd.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(5)  # the peer thread ends even if the client never comes

    def answer_once() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)

    peer = threading.Thread(target=answer_once, name="fake control peer")
    peer.start()
    try:
        with pytest.raises(status_cli.ControlUnavailable, match=r"garbled answer on .*odd\.sock"):
            status_cli.request(path, "status")
    finally:
        peer.join(5)
        server.close()


def test_metrics_component_serves_and_refuses_lan(sock_dir: Path) -> None:
    async def main() -> None:
        daemon = _daemon("[control]\nenabled = false\n")
        m = _component(daemon, metrics.Metrics)
        m.cfg = metrics.MetricsConfig(listen=(("127.0.0.1", 0),))  # an ephemeral port
        # lan_interfaces = ["lo"] in _daemon: 127.0.0.1 belongs to a "LAN" interface here.
        with pytest.raises(ConfigError, match="is an address of LAN interface lo"):
            await m.start(daemon)
        assert not m.servers
        m.cfg = metrics.MetricsConfig(listen=(("127.0.0.1", 0),), allow_lan=True)
        await m.start(daemon)
        good, origin = await intercept(daemon.server)
        dead, _ = await intercept(daemon.server, origin=False)  # nobody at the destination
        try:
            port = next(iter(m.servers.values())).sockets[0].getsockname()[1]
            for _ in range(2):
                assert await good.get() == (200, ORIGIN_BODY)
            assert (await dead.get())[0] == 502
            await until(lambda: daemon.server.stats.requests_total == 3)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await reader.read()
            writer.close()
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            values = {
                s.name + str(sorted(s.labels.items())): s.value
                for fam in text_string_to_metric_families(body.decode())
                for s in fam.samples
            }
            assert values["tproxy_requests_total[]"] == 3
            assert values["tproxy_upstream_connects_total[]"] == 2
            assert values["tproxy_upstream_errors_total[]"] == 1
            assert values["tproxy_connections_total[]"] == 2
            assert values["tproxy_connections_active[]"] == 2
            assert values["tproxy_overloaded[]"] == 0
            assert values["tproxy_metrics_scrapes_total[]"] == 1  # a component's status, flattened
            assert "process_resident_memory_bytes[]" in values
            # Every daemon-wide metric the README lists is published.
            names = {name.split("[")[0] for name in values}
            for listed in (
                "tproxy_connections_active", "tproxy_connections_total", "tproxy_requests_total",
                "tproxy_bad_requests_total", "tproxy_client_bytes_total",
                "tproxy_upstream_connects_total", "tproxy_upstream_errors_total",
                "tproxy_upstream_pool_idle", "tproxy_overloaded", "tproxy_draining",
                "tproxy_limits_active_clients",
            ):  # fmt: skip
                assert listed in names, listed
        finally:
            good.close()
            dead.close()
            assert origin is not None
            origin.close()
            await daemon.server.stop()
            await m.stop(daemon)

    run(main())


# -- the real daemon in the lab ----------------------------------------------------------------

METRICS_PORT = 19101  # inside the gateway namespace only: no clash with other labs or the host
# Holds a TCP port on 127.0.0.1 (argv[1]) until killed.
HOLD_PORT = (
    "import socket, sys, time\n"
    "s = socket.socket()\n"
    "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "s.listen()\n"
    "time.sleep(3600)\n"
)


def _scrape(lab: Lab, host: str, addr: str) -> dict[str, float]:
    res = lab.run(
        host, ["curl", "-sS", "--noproxy", "*", "--max-time", "5", f"http://{addr}/metrics"]
    )
    return {
        s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
        for fam in text_string_to_metric_families(res.stdout)
        for s in fam.samples
    }


@pytest.mark.lab
def test_status_and_metrics_of_the_running_daemon(lab: Lab) -> None:
    assert lab.tmpdir is not None
    sock = Path(lab.tmpdir) / "run" / "control.sock"
    config = f'[control]\nsocket = "{sock}"\n[metrics]\nlisten = "127.0.0.1:{METRICS_PORT}"\n'
    with Proxy(lab, config) as proxy:
        lab.set_forwarding(False)  # only traffic through the daemon flows
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        before = json.loads(proxy.tproxy("status", "--socket", str(sock), "--json").stdout)
        assert before["requests"]["total"] == 0 and before["connections"]["total"] == 0
        for _ in range(5):
            assert lab.curl("client", lab.url("/files/1k", v6=False)).status == 200
        assert len(proxy.log_lines(5)) == 5
        st = json.loads(proxy.tproxy("status", "--socket", str(sock), "--json").stdout)
        assert st["requests"]["total"] == 5
        assert st["connections"]["total"] == 5  # curl: one connection per run
        assert st["bytes"]["out"] > 5 * 1024 and st["bytes"]["in"] > 5 * 50
        assert st["requests"]["per_second"] > 0
        assert st["upstream"]["errors"] == 0
        text = proxy.tproxy("status", "--socket", str(sock)).stdout
        assert re.search(r"^requests\s+5 total, \d+\.\d/s \(last 10 s\)$", text, re.M), text
        assert re.search(r"^connections\s+\d+ active, 5 total$", text, re.M), text

        values = _scrape(lab, "gateway", f"127.0.0.1:{METRICS_PORT}")
        assert values["tproxy_requests_total"] == 5
        assert values["tproxy_connections_total"] == 5
        assert values["tproxy_upstream_errors_total"] == 0
        assert values["tproxy_client_bytes_total{direction=sent}"] == st["bytes"]["out"]
        assert values["tproxy_metrics_scrapes_total"] == 1

        # Not reachable from the LAN: the gateway's LAN address has nothing on that port.
        url = f"http://{lab.gw_lan_v4}:{METRICS_PORT}/metrics"
        assert lab.curl("client", url, timeout=2).status == 0

        # reload over the socket (the same path as SIGHUP), from outside the namespace:
        # a Unix socket is found by its path, not through the network namespace.
        assert status_cli.request(str(sock), "reload")["reloaded"] is True
        proxy.config_path.write_text(config + "[proxy]\nlisten_port = 0\n")
        with pytest.raises(status_cli.CommandFailed, match="reload refused"):
            status_cli.request(str(sock), "reload")
        assert status_cli.request(str(sock), "status")["requests"]["total"] == 5

        # A reload that one component refuses after an earlier one took it changes nothing:
        # the control socket (first in line) would move, the metrics port (next) is taken.
        busy = METRICS_PORT + 1
        holder = lab.popen("gateway", [sys.executable, "-c", HOLD_PORT, str(busy)])
        try:
            lab.wait_port("gateway", busy)
            moved = sock.with_name("moved.sock")
            proxy.config_path.write_text(
                f'[control]\nsocket = "{moved}"\n[metrics]\nlisten = "127.0.0.1:{busy}"\n'
            )
            with pytest.raises(status_cli.CommandFailed, match="reload refused"):
                status_cli.request(str(sock), "reload")
            assert not moved.exists()
            assert status_cli.request(str(sock), "status")["requests"]["total"] == 5
            assert (
                _scrape(lab, "gateway", f"127.0.0.1:{METRICS_PORT}")["tproxy_requests_total"] == 5
            )
        finally:
            holder.kill()
            holder.wait()
    assert proxy.proc is not None and proxy.proc.returncode == 0
    assert not sock.exists()  # removed on stop
    gone = proxy.tproxy("status", "--socket", str(sock), check=False)
    assert gone.returncode == status_cli.EXIT_NOT_RUNNING
    assert "tproxy is not running" in gone.stderr


@pytest.mark.lab
def test_metrics_on_a_lan_address_needs_allow_lan(lab: Lab) -> None:
    assert lab.tmpdir is not None
    sock = Path(lab.tmpdir) / "run" / "control.sock"
    listen = f'[control]\nsocket = "{sock}"\n[metrics]\nlisten = "{lab.gw_lan_v4}:{METRICS_PORT}"\n'
    refused = Proxy(lab, listen)
    with pytest.raises(RuntimeError, match="tproxy exited 2"):
        refused.start()
    assert (
        f"metrics.listen: {lab.gw_lan_v4}:{METRICS_PORT} is an address of LAN interface "
        f"{lab.gw_lan_if}; metrics stay off the LAN unless metrics.allow_lan = true"
    ) in refused.stderr()
    assert "TPROXY" not in refused.rules()
    assert not sock.exists()
    # The admin's explicit choice: then the LAN can scrape (and the refusal above was real).
    with Proxy(lab, listen + "allow_lan = true\n"):
        url = f"http://{lab.gw_lan_v4}:{METRICS_PORT}/metrics"
        res = lab.curl("client", url)
        assert res.status == 200 and b"tproxy_requests_total 0.0" in res.body


def test_status_line_for_systemd() -> None:
    line = control.format_status_line(7, False, 13.16, 125, 3, 3725.0)
    assert line == "7 connections, 13.2 req/s, 125 requests, 3 upstream errors, up 1h02m"
    shed = control.format_status_line(1, True, 0.0, 0, 0, 5.0)
    assert shed == "1 connections, OVERLOADED, 0.0 req/s, 0 requests, 0 upstream errors, up 5s"


def test_overloaded_follows_the_connection_ceiling() -> None:
    # max_connections = 1: the first connection fills the daemon's ceiling (tproxy.limits).
    async def main() -> None:
        daemon = _daemon(
            "[control]\nenabled = false\n[metrics]\nenabled = false\n"
            "[limits]\nmax_connections = 1\n"
        )
        first, origin = await intercept(daemon.server)
        try:
            assert await first.get() == (200, ORIGIN_BODY)
            snap = control.snapshot(daemon, None)
            assert snap["overloaded"] is True and snap["limits"]["at_ceiling"] is True
            assert control.status_line(daemon).startswith("1 connections, OVERLOADED, ")
            # The next connection is refused with a reset, unread.
            second, _ = await intercept(daemon.server, origin=False)
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await second.get()
            second.close()
            first.close()
            await until(lambda: not daemon.server.overloaded)
            snap = control.snapshot(daemon, None)
            assert snap["overloaded"] is False
            assert snap["limits"]["refused"]["ceiling"] == 1
            assert " OVERLOADED" not in control.status_line(daemon)
        finally:
            first.close()
            assert origin is not None
            origin.close()
            await daemon.server.stop()

    run(main())


# -- reload's lifecycle, without root: rules are not applied (apply_kernel_state is stubbed) --


def _reloading_daemon(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Daemon:
    path = tmp_path / "tproxy.toml"
    path.write_text(
        '[log]\naccess_log = ""\n[proxy]\nlan_interfaces = ["lo"]\n'
        "transparent_upstream = false\n" + text
    )
    daemon = Daemon(config_mod.load(path))
    applied: list[Any] = []

    async def apply(plan: Any) -> None:
        applied.append(plan)

    monkeypatch.setattr(daemon, "apply_kernel_state", apply)
    return daemon


def test_a_reload_during_start_waits_and_one_during_stop_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = _reloading_daemon(tmp_path, "", monkeypatch)
    assert control.snapshot(daemon, None)["state"] == "starting"
    ran: list[str] = []

    async def fake_reload() -> bool:
        ran.append("reload")
        return True

    monkeypatch.setattr(daemon, "_reload", fake_reload)

    async def main() -> None:
        early = asyncio.get_running_loop().create_task(daemon.reload())
        await asyncio.sleep(0.05)
        assert ran == [] and not early.done()  # SIGHUP before READY waits
        daemon.started.set()
        await asyncio.wait_for(early, 1)
        assert ran == ["reload"]
        assert control.snapshot(daemon, None)["state"] == "running"
        daemon.stopping.set()
        assert control.snapshot(daemon, None)["state"] == "stopping"
        assert not await daemon.reload()
        assert ran == ["reload"]  # none after the stop began

    run(main())


def test_reload_applies_the_log_level_keeps_the_access_log_flag_and_refuses_cache_toggles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = _reloading_daemon(tmp_path, "", monkeypatch)
    daemon.access_log_override = str(tmp_path / "flag.log")
    path = tmp_path / "tproxy.toml"
    base = (
        '[proxy]\nlan_interfaces = ["lo"]\ntransparent_upstream = false\n'
        "[metrics]\nenabled = false\n[control]\nenabled = false\n"
    )
    root = logging.getLogger()
    level = root.level

    async def main() -> None:
        daemon.started.set()
        try:
            path.write_text(base + '[log]\nlevel = "debug"\naccess_log = "/nonexistent/x.log"\n')
            assert await daemon.reload()
            assert root.level == logging.DEBUG
            assert daemon.cfg.log.access_log == str(tmp_path / "flag.log")
            path.write_text(base + "[cache]\nenabled = false\n")
            with caplog.at_level(logging.ERROR):
                assert not await daemon.reload()
            assert "cache.enabled: changing it needs a restart" in caplog.text
            assert daemon.cfg.log.level == "debug"  # the refused reload changed nothing
        finally:
            root.setLevel(level)
            daemon.access_log.close()

    run(main())


def test_a_group_the_daemon_cannot_give_the_socket_to_names_the_key_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tproxy import control

    def eperm(*_: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chown", eperm)  # as under the unit, which keeps no CAP_CHOWN
    sock = tmp_path / "s"
    sock.touch()
    cfg = control.ControlConfig(group="root")
    with pytest.raises(ConfigError) as info:
        control._set_owner("t.toml", str(sock), cfg)
    assert info.value.key == "control.group"
    assert "SupplementaryGroups=root" in str(info.value)


def test_no_ipv6_in_the_kernel_is_one_line_naming_proxy_ipv6(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tproxy import preflight

    daemon = _reloading_daemon(tmp_path, "", monkeypatch)
    monkeypatch.setattr(preflight, "check_privileges", lambda: None)
    monkeypatch.setattr(preflight, "check", lambda *_: None)
    monkeypatch.setattr(preflight, "claim_instance", lambda: None)

    async def no_ipv6() -> None:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(daemon.server, "start", no_ipv6)
    with pytest.raises(preflight.PreflightError, match=r"set proxy.ipv6 = false"):
        run(daemon.run())
