"""The fast paths of the HTTP engine keep their behaviour.

Features that are off cost a request nothing: their hooks are not on the server at all. Unit
tests drive the real components against a real :class:`~tproxy.server.Server` (no sockets are
opened) and read its hook lists; a lab test shows that a filter turned on by a reload still
comes before the cache (a denied URL is never served a stored copy) and that turning it off
again lets the request through. Large body pieces go out as gather writes (head + body, chunk
header + data without a joined copy): a lab test checks big chunked, re-chunked and
length-delimited responses byte for byte, with the access log's lazily read content type.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.lab import Lab
from tests.proxy import Proxy
from tproxy import config
from tproxy.accesslog import AccessLog
from tproxy.filter.component import FilterComponent
from tproxy.limits import Limiter, LimitsConfig
from tproxy.server import Server
from tproxy.shaping.component import ShapingComponent

DENY_BAD = """
[filter]
default = "allow"
[[filter.rule]]
group = "*"
action = "deny"
domains = ["bad.example"]
"""


@dataclass
class Plan:
    nfqueue_num: int = 0
    https_ports: tuple[int, ...] = ()


@dataclass
class FakeDaemon:
    """The parts of tproxy.daemon.Daemon the two components use (no kernel, no sockets)."""

    cfg: config.Config
    server: Server
    components: list[Any] = field(default_factory=list)
    plan: Plan = field(default_factory=Plan)

    def make_plan(self, cfg: config.Config) -> Plan:
        return Plan()


def parse(text: str) -> config.Config:
    import tomllib

    return config.parse(tomllib.loads(text), "<test>", text)


def daemon_for(text: str) -> FakeDaemon:
    cfg = parse(text)
    server = Server(cfg, AccessLog(""))
    return FakeDaemon(cfg, server)


def names(hooks: list[Any]) -> list[str]:
    return [f"{type(h.__self__).__name__}.{h.__name__}" for h in hooks]


class Later:
    """A component after the filter in COMPONENTS order (as the cache is)."""

    def on_request(self, conn: Any, ex: Any) -> bool:
        return False

    def on_response(self, conn: Any, ex: Any, head: Any) -> bool:
        return False


def test_filter_hooks_only_while_a_rule_can_deny() -> None:
    async def run() -> None:
        d = daemon_for("")
        filt = FilterComponent(d.cfg)
        later = Later()
        d.components = [filt, later]
        await filt.start(d)  # type: ignore[arg-type]
        d.server.request_hooks.append(later.on_request)
        d.server.response_hooks.append(later.on_response)
        assert names(d.server.request_hooks) == ["Later.on_request"]
        # A reload with a deny rule puts the filter before the later component.
        await filt.reload(d, parse(DENY_BAD))  # type: ignore[arg-type]
        assert names(d.server.request_hooks) == ["FilterComponent.on_request", "Later.on_request"]
        assert names(d.server.response_hooks) == [
            "FilterComponent.on_response",
            "Later.on_response",
        ]
        await filt.reload(d, parse(DENY_BAD))  # type: ignore[arg-type]
        assert len(d.server.request_hooks) == 2  # registered once
        await filt.reload(d, parse(""))  # type: ignore[arg-type]
        assert names(d.server.request_hooks) == ["Later.on_request"]
        assert names(d.server.response_hooks) == ["Later.on_response"]
        await filt.reload(d, parse(DENY_BAD))  # type: ignore[arg-type]
        await filt.stop(d)  # type: ignore[arg-type]
        assert names(d.server.request_hooks) == ["Later.on_request"]

    asyncio.run(run())


def test_shaping_off_registers_no_hooks() -> None:
    async def run() -> None:
        d = daemon_for("[shaping]\nenabled = false\n")
        shaping = ShapingComponent(d.cfg)
        d.components = [shaping]
        await shaping.start(d)  # type: ignore[arg-type]
        server = d.server
        assert not shaping.active
        assert (server.request_hooks, server.response_hooks, server.upstream_hooks) == ([], [], [])
        await shaping.reload(d, parse("[shaping]\nenabled = false\n"))  # type: ignore[arg-type]
        assert (server.request_hooks, server.response_hooks, server.upstream_hooks) == ([], [], [])
        await shaping.stop(d)  # type: ignore[arg-type]

    asyncio.run(run())


@dataclass
class LimitedConn:
    """The two attributes Server.admit() and Server.limit_request() use of a connection."""

    client_ip: str
    limit_key: str | None = None


@pytest.mark.parametrize(
    "cfg",
    [
        LimitsConfig(enabled=False),
        LimitsConfig(per_client_requests_per_second=0.0),
        LimitsConfig(per_client_requests_per_second=2.0, per_client_requests_burst=3),
        LimitsConfig(enabled=False, max_connections=2, max_clients=10),
    ],
)
def test_limit_request_fast_path_never_skips_a_refusal(cfg: LimitsConfig) -> None:
    server = daemon_for("").server
    server.limiter = Limiter(LimitsConfig(enabled=False, max_connections=10, max_clients=10))
    conns = [LimitedConn(f"10.0.0.{i % 2}") for i in range(4)]
    assert all(server.admit(c) for c in conns)  # type: ignore[arg-type]
    lim = server.limiter
    lim.reconfigure(cfg, time.monotonic())  # may lower the ceiling below the 4 open connections
    # The 50 requests take well under 1/rate: the burst of 3 per client is all a client gets.
    refused = 0
    for i in range(50):
        refused += server.limit_request(conns[i % 2]) is not None  # type: ignore[arg-type]
    limited = cfg.enabled and cfg.per_client_requests_per_second > 0
    assert lim.limits_requests is limited
    # Refused only by a request rate or by the lowered ceiling, and then never skipped.
    assert (refused > 0) is (limited or cfg.max_connections < 4)
    if limited:
        assert refused <= 50 - 2 * 3  # each client's burst went through


@pytest.mark.lab
def test_filter_turned_on_by_reload_comes_before_the_cache(lab: Lab) -> None:
    url = "http://bad.example/files/1k"
    resolve = ("--resolve", f"bad.example:80:{lab.origin_v4}")
    base = "[cache]\nenabled = true\nx_cache_header = true\n"
    with Proxy(lab, base) as proxy:
        assert proxy.proc is not None
        assert lab.curl("client", url, *resolve).status == 200
        # Stored now (max-age=3600): a hit unless something before the cache answers.
        assert lab.tmpdir is not None
        head_file = lab.tmpdir / "hit-head.txt"
        assert lab.curl("client", url, *resolve, "-D", str(head_file)).status == 200
        assert "x-cache: hit" in head_file.read_text().lower()
        proxy.config_path.write_text(proxy.config_path.read_text() + DENY_BAD)
        proxy.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while proxy.stderr().count("reloaded") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lab.curl("client", url, *resolve).status == 403
        proxy.config_path.write_text(proxy.config_path.read_text().replace(DENY_BAD, ""))
        proxy.proc.send_signal(signal.SIGHUP)
        while proxy.stderr().count("reloaded") < 2 and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        assert lab.curl("client", url, *resolve).status == 200


BIG_ORIGIN = r"""
import hashlib, socket, sys, threading

PIECES = [bytes([i % 251]) * n for i, n in enumerate((100, 70000, 9000, 8192, 8193, 300000, 1))]

def serve(conn):
    with conn:
        buf = b""
        while b"\r\n\r\n" not in buf:
            more = conn.recv(4096)
            if not more:
                return
            buf += more
        path = buf.split(b" ", 2)[1]
        if path == b"/chunked":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/x-big; q=1\r\n"
                         b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            for piece in PIECES:
                conn.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
            conn.sendall(b"0\r\n\r\n")
        elif path == b"/close":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/x-close\r\n"
                         b"Connection: close\r\n\r\n")
            for piece in PIECES:
                conn.sendall(piece)
        else:
            body = b"".join(PIECES)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""
BIG_PIECES = [bytes([i % 251]) * n for i, n in enumerate((100, 70000, 9000, 8192, 8193, 300000, 1))]
BIG_PORT = 8090


@pytest.mark.lab
def test_big_bodies_arrive_intact_through_gather_writes(lab: Lab) -> None:
    lab.start_origin_python(BIG_ORIGIN, BIG_PORT)
    want = hashlib.sha256(b"".join(BIG_PIECES)).hexdigest()
    with Proxy(lab, f"[proxy]\nports = [80, {BIG_PORT}]\n") as proxy:
        for path, ctype in (("/chunked", "text/x-big"), ("/close", "text/x-close"), ("/cl", "-")):
            res = lab.curl("client", f"http://{lab.origin_v4}:{BIG_PORT}{path}", "--raw")
            assert res.status == 200, path
            body = res.body
            if path != "/cl":  # chunked to the client (re-chunked for /close): decode
                out, rest = b"", body
                while True:
                    size_line, _, rest = rest.partition(b"\r\n")
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        break
                    out, rest = out + rest[:size], rest[size + 2 :]
                body = out
            assert hashlib.sha256(body).hexdigest() == want, path
            deadline = time.monotonic() + 5
            while path not in proxy.access_log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            line = [x for x in proxy.access_log.read_text().splitlines() if path in x][-1]
            assert line.endswith(" " + ctype), line
