"""Shaping end to end: the daemon marks its sockets, the kernel's HTB classes set the pace.

Rates are measured at the client, by a small Python client that reads a download through the
daemon and reports how many bytes had arrived when (one line per REPORT_EVERY seconds). The
origin serves /nocache/16m (application/octet-stream, ``Cache-Control: no-store``), so a cache
in the daemon never answers these downloads.

One two-client lab is shared by the module (each test starts and stops its own daemon); the
pure helpers of the component are tested first, without a lab.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

import tproxy.filter  # noqa: F401  (registers [filter], whose groups shaping reuses)
from tests.lab import Lab, skip_reason
from tests.proxy import Proxy
from tproxy import config
from tproxy.config import ConfigError
from tproxy.shaping.component import (
    Clients,
    ShapingComponent,
    classify_for,
    interfaces,
    plan_for,
    request_facts,
)
from tproxy.shaping.model import MARK_MASK, UNSHAPED_MARK, classify_rules, client_slot

MBIT = 1_000_000
TOLERANCE = 0.10  # a capped class delivers its rate within ±10 %
FAIR_TOLERANCE = 0.15  # clients sharing a fair class get equal parts within ±15 %
WARMUP = 0.6  # s: TCP and the HTB queue settle before the measured window starts
WINDOW = 2.4  # s measured
REPORT_EVERY = 0.2
BIG = "/nocache/16m"
F = TypeVar("F", bound=Any)

# Reads http://<host><path> from <addr>:80 for <seconds>, printing "elapsed bytes" lines.
READER = f"""
import socket, sys, time
host, path, addr, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
s = socket.create_connection((addr, 80), timeout=5)
s.sendall(f"GET {{path}} HTTP/1.1\\r\\nHost: {{host}}\\r\\nConnection: close\\r\\n\\r\\n".encode())
t0 = time.monotonic()
total, due = 0, {REPORT_EVERY}
while True:
    data = s.recv(262144)
    now = time.monotonic() - t0
    if not data:
        print(f"{{now:.3f}} {{total}} eof", flush=True)
        break
    total += len(data)
    if now >= due:
        print(f"{{now:.3f}} {{total}}", flush=True)
        due += {REPORT_EVERY}
    if now >= seconds:
        print(f"{{now:.3f}} {{total}} stop", flush=True)
        break
"""

UPLOAD_PORT = 8090
# Origin side of the upload test: counts request body bytes as they arrive.
SINK = f"""
import socket, sys, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(8)
while True:
    conn, _ = srv.accept()
    buf = b""
    while b"\\r\\n\\r\\n" not in buf:
        buf += conn.recv(65536)
    total = len(buf.split(b"\\r\\n\\r\\n", 1)[1])
    t0, due = time.monotonic(), {REPORT_EVERY}
    while True:
        data = conn.recv(262144)
        now = time.monotonic() - t0
        if not data or now > float(sys.argv[2]):
            break
        total += len(data)
        if now >= due:
            print(f"{{now:.3f}} {{total}}", flush=True)
            due += {REPORT_EVERY}
    print("done", flush=True)
    conn.close()
"""
# Client side: a POST whose body it sends for argv[3] seconds.
SENDER = """
import socket, sys, time
addr, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((addr, port), timeout=5)
s.sendall(f"POST /up HTTP/1.1\\r\\nHost: origin.lab:{port}\\r\\nContent-Length: 1000000000\\r\\n\\r\\n".encode())
chunk = bytes(65536)
t0 = time.monotonic()
try:
    while time.monotonic() - t0 < seconds:
        s.sendall(chunk)
except OSError:  # the origin hung up once it had measured enough
    pass
s.close()
"""


# -- pure helpers (no lab) ---------------------------------------------------------------------


def cfg_of(text: str, lan: tuple[str, ...] = ("lan0",)) -> config.Config:
    import tomllib

    cfg = config.parse(tomllib.loads(text))
    return config.with_overrides(cfg, lan_interfaces=lan)


SIMPLE = """
[shaping]
enabled = true
wan_interfaces = ["wan0", "lan0"]
default_class = "web"
[[shaping.class]]
name = "web"
rate = "10mbit"
[[shaping.class]]
name = "kids"
rate = "2mbit"
per_client_fair = true
fair_slots = 4
[[shaping.select]]
class = "kids"
group = "kids"
[[shaping.select]]
class = "web"
domains = ["example.org"]
[filter]
https = false
[[filter.group]]
name = "kids"
cidrs = ["10.9.0.0/24"]
"""


def test_classify_rules_cover_every_leaf_on_lan_and_wan() -> None:
    cfg = cfg_of(SIMPLE)
    assert interfaces(cfg) == (("lan0",), ("wan0",))  # a LAN interface is never also WAN
    plan = plan_for(cfg)
    rules = classify_for(plan)
    assert [(r.mark, r.mask, r.out_interface, r.class_id) for r in rules] == classify_rules(plan)
    assert {r.out_interface for r in rules} == {"lan0", "wan0"}
    assert all(r.mask == MARK_MASK for r in rules)
    # web, four kids slots and the unshaped mark, per interface
    assert len(rules) == 2 * (1 + 4 + 1)
    assert ShapingComponent(cfg).rules_extras(cfg) == {"classify": rules}
    off = cfg_of("[shaping]\nenabled = false\n")
    assert ShapingComponent(off).rules_extras(off) == {}


def test_request_facts_and_groups_from_the_filter_section() -> None:
    clients = Clients.from_config(cfg_of(SIMPLE))
    facts = request_facts("http://WWW.Example.org:8080/a?b", None, "10.9.0.7", clients)
    assert (facts.host, facts.groups) == ("www.example.org", frozenset({"kids"}))
    assert request_facts("/x", b"h.test:81", "::ffff:10.9.0.1", clients).host == "h.test"
    assert clients.groups_of("10.8.0.1") == frozenset({"default"})
    assert Clients().groups_of("10.9.0.7") == frozenset({"default"})


def test_sni_class_marks_the_class_and_the_client_slot() -> None:
    comp = ShapingComponent(cfg_of(SIMPLE))
    assert comp.sni_class("10.9.0.7", "example.org") == 0  # not applied: nothing to steer into
    comp.applied = True
    kids = comp.plan.numbers["kids"] << 8 | client_slot("10.9.0.7", 4) << 16
    assert comp.sni_class("10.9.0.7", "example.org") == kids
    assert comp.sni_class("10.8.0.1", "www.example.org.") == comp.plan.numbers["web"] << 8
    unshaped = cfg_of(SIMPLE.replace('default_class = "web"\n', ""))
    comp = ShapingComponent(unshaped)
    comp.applied = True
    assert comp.sni_class("10.8.0.1", "other.test") == UNSHAPED_MARK


def test_wan_interfaces_must_be_interface_names() -> None:
    with pytest.raises(ConfigError, match=r"wan_interfaces\[1\]"):
        cfg_of('[shaping]\nwan_interfaces = ["eth1", "bad name"]\n')


# -- lab ---------------------------------------------------------------------------------------


def lab_test(fn: F) -> F:
    return pytest.mark.timeout(40)(pytest.mark.lab(fn))


@pytest.fixture(scope="module")
def lab2() -> Iterator[Lab]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    lab = Lab(clients=2)
    try:
        lab.up()
        assert lab.tmpdir is not None
        (lab.tmpdir / "reader.py").write_text(READER)
        (lab.tmpdir / "sender.py").write_text(SENDER)
        yield lab
    finally:
        lab.down()


def shaping(classes: str, selects: str = "", extra: str = "") -> str:
    return f"[shaping]\nenabled = true\n{extra}\n{classes}\n{selects}\n"


def klass(name: str, rate: str, ceil: str | None = None, **kw: object) -> str:
    lines = [f'name = "{name}"', f'rate = "{rate}"', f'ceil = "{ceil or rate}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in kw.items()]
    return "[[shaping.class]]\n" + "\n".join(lines) + "\n"


def select(cls: str, **kw: object) -> str:
    lines = [f'class = "{cls}"'] + [f"{k} = {json.dumps(v)}" for k, v in kw.items()]
    return "[[shaping.select]]\n" + "\n".join(lines) + "\n"


def reader(
    lab: Lab,
    host: str,
    seconds: float,
    path: str = BIG,
    name: str | None = None,
    addr: str | None = None,
) -> str:
    """Start the reading client in ``host``; returns its raw output when it ends."""
    assert lab.tmpdir is not None
    res = lab.run(
        host,
        [sys.executable, str(lab.tmpdir / "reader.py"), name or lab.origin_name, path,
         addr or lab.origin_v4, str(seconds)],
        timeout=seconds + 20,
    )  # fmt: skip
    return res.stdout


def samples(out: str) -> list[tuple[float, int]]:
    rows = []
    for line in out.splitlines():
        parts = line.split()
        rows.append((float(parts[0]), int(parts[1])))
    assert rows, out
    return rows


def rate(out: str, start: float = WARMUP, end: float | None = None) -> float:
    """bit/s between the first report at or after ``start`` and the last before ``end``."""
    rows = samples(out)
    a = next(r for r in rows if r[0] >= start)
    b = [r for r in rows if end is None or r[0] <= end][-1]
    assert b[0] - a[0] > 0.5, out
    return (b[1] - a[1]) * 8 / (b[0] - a[0])


def assert_near(measured: float, want: float, tol: float = TOLERANCE) -> None:
    assert abs(measured - want) <= tol * want, (
        f"{measured / MBIT:.3f} Mbit/s, want {want / MBIT:.3f} ±{tol:.0%}"
    )


def htb_bytes(lab: Lab, classid: str) -> int:
    out = lab.run("gateway", ["tc", "-s", "class", "show", "dev", lab.gw_lan_if]).stdout
    blocks = out.split("class htb ")
    for block in blocks:
        if block.startswith(classid + " "):
            return int(block.split("Sent ", 1)[1].split(" ", 1)[0])
    raise AssertionError(f"no class {classid}:\n{out}")


def qdiscs(lab: Lab) -> str:
    return lab.run("gateway", ["tc", "qdisc", "show", "dev", lab.gw_lan_if]).stdout


@lab_test
def test_capped_class_delivers_its_rate_and_stop_removes_the_qdisc(lab2: Lab) -> None:
    cfg = shaping(klass("web", "50mbit", "1gbit") + klass("slow", "2mbit"),
                  select("slow", url_prefix="http://origin.lab/nocache/"),
                  'default_class = "web"')  # fmt: skip
    with Proxy(lab2, cfg) as proxy:
        lab2.set_forwarding(False)  # only what the daemon relays gets through
        try:
            assert "htb 1:" in qdiscs(lab2)
            out = reader(lab2, "client", WARMUP + WINDOW)
            assert_near(rate(out), 2 * MBIT)
            # The live counters, from a separate process, name the class that carried it.
            show = proxy.tproxy(
                "shaping", "show", "--config", str(proxy.config_path),
                "--lan-interface", lab2.gw_lan_if, "--interval", "0.2",
            ).stdout  # fmt: skip
            line = next(x for x in show.splitlines() if x.strip().startswith("slow"))
            assert int(line.split()[4].rstrip("B")) >= samples(out)[-1][1], show
        finally:
            lab2.set_forwarding(True)
    assert proxy.proc is not None and proxy.proc.returncode == 0, proxy.stderr()
    assert "htb" not in qdiscs(lab2)
    assert "CLASSIFY" not in proxy.rules()


@lab_test
def test_ipv6_downloads_are_shaped_too(lab2: Lab) -> None:
    # Squid's per-host delay pools are IPv4-only; marks and CLASSIFY work the same for IPv6.
    cfg = shaping(klass("web", "50mbit", "1gbit") + klass("slow", "2mbit"),
                  select("slow", url_prefix="http://origin.lab/nocache/"),
                  'default_class = "web"')  # fmt: skip
    with Proxy(lab2, cfg):
        lab2.set_forwarding(False)
        try:
            out = reader(lab2, "client", WARMUP + WINDOW, addr=lab2.origin_v6)
            assert_near(rate(out), 2 * MBIT)
        finally:
            lab2.set_forwarding(True)


@lab_test
def test_two_clients_in_two_classes_each_get_their_rate(lab2: Lab) -> None:
    cfg = (
        shaping(
            klass("kids", "2mbit") + klass("adults", "5mbit"),
            select("kids", group="kids") + select("adults", group="default"),
        )
        + f'[filter]\nhttps = false\n[[filter.group]]\nname = "kids"\ncidrs = ["{lab2.clients_v4[1]}/32"]\n'
    )
    with Proxy(lab2, cfg), ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(reader, lab2, host, WARMUP + WINDOW) for host in ("client", "client2")]
        adults, kids = (j.result() for j in jobs)
    assert_near(rate(kids), 2 * MBIT)
    assert_near(rate(adults), 5 * MBIT)


@lab_test
def test_two_clients_in_one_fair_class_share_it(lab2: Lab) -> None:
    slots = next(n for n in range(2, 64) if len({client_slot(c, n) for c in lab2.clients_v4}) == 2)
    cfg = shaping(
        klass("shared", "4mbit", per_client_fair=True, fair_slots=slots),
        select("shared", url_prefix="http://origin.lab/nocache/"),
    )
    with Proxy(lab2, cfg), ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(reader, lab2, host, WARMUP + WINDOW) for host in ("client", "client2")]
        one, two = (rate(j.result()) for j in jobs)
    assert_near(one, 2 * MBIT, FAIR_TOLERANCE)
    assert_near(two, 2 * MBIT, FAIR_TOLERANCE)
    assert_near(one + two, 4 * MBIT)


@lab_test
def test_response_content_type_moves_the_flow_to_another_class(lab2: Lab) -> None:
    # The request selects "fast" (by URL); the response head says octet-stream, which selects
    # "bulk". hits_unshaped = false: the client socket is in "fast" from the request on, so
    # the response hook really re-marks a socket that already carries a class.
    cfg = shaping(
        klass("fast", "20mbit") + klass("bulk", "2mbit"),
        select("bulk", content_type="application/*")
        + select("fast", url_prefix="http://origin.lab/nocache/"),
        "hits_unshaped = false",
    )
    with Proxy(lab2, cfg):
        out = reader(lab2, "client", WARMUP + WINDOW)
        assert_near(rate(out), 2 * MBIT)
        assert htb_bytes(lab2, "1:200") >= samples(out)[-1][1]  # bulk carried the body
        assert htb_bytes(lab2, "1:100") < 64 * 1024  # fast: at most the head's packets
        # A text response keeps the request's class.
        text = reader(lab2, "client", 1.0, path="/")
        assert samples(text)[-1][1] > 0


@lab_test
def test_reload_changes_the_rate_of_a_running_download(lab2: Lab) -> None:
    before = shaping(klass("dl", "2mbit"), select("dl", url_prefix="http://origin.lab/nocache/"))
    # "other" takes class number 1 (mark 0x100, the one the running socket carries): without
    # re-marking by name the download would run at 8 Mbit/s instead of dl's new 4 Mbit/s.
    after = shaping(
        klass("other", "8mbit") + klass("dl", "4mbit"),
        select("dl", url_prefix="http://origin.lab/nocache/"),
    )
    with Proxy(lab2, before) as proxy:
        assert lab2.tmpdir is not None
        argv = [sys.executable, str(lab2.tmpdir / "reader.py"), lab2.origin_name, BIG,
                lab2.origin_v4, "5.5"]  # fmt: skip
        proc = lab2.popen("client", argv, stdout=subprocess.PIPE, text=True)
        # Reload by the reader's own clock, not ours: under load its start-up can take long
        # enough to push a fixed sleep into the early window measured below.
        assert proc.stdout is not None
        early = ""
        for line in proc.stdout:
            early += line
            if float(line.split()[0]) >= 2.0:
                break
        proxy.config_path.write_text(after)
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGHUP)
        rest, _ = proc.communicate(timeout=20)
        out = early + rest
        assert "reloaded" in proxy.stderr(), proxy.stderr()
    assert out.splitlines()[-1].endswith("stop"), out  # the download was never cut
    # The reader starts its clock a little after popen: measure well clear of the SIGHUP.
    assert_near(rate(out, WARMUP, 1.8), 2 * MBIT)
    assert_near(rate(out, 3.2), 4 * MBIT)


@lab_test
def test_cache_hits_are_not_shaped(lab2: Lab) -> None:
    cfg = shaping(klass("slow", "1mbit"), "", 'default_class = "slow"') + (
        '[cache]\nenabled = true\nmemory_size = "16m"\n'
    )
    with Proxy(lab2, cfg) as proxy:
        url = lab2.url("/files/64k")
        first = lab2.curl("client", url)
        assert first.status == 200, first.stderr
        shaped = htb_bytes(lab2, "1:100")
        second = lab2.curl("client", url)
        lines = proxy.log_lines(2)
        assert "HIT" in lines[1].split()[3], lines
        assert second.body == first.body
        # The hit's 64 KiB did not go through the class (at 1 Mbit/s it would take 0.5 s).
        assert htb_bytes(lab2, "1:100") - shaped < 16 * 1024


@lab_test
def test_uploads_are_shaped_on_the_wan_interface(lab2: Lab) -> None:
    assert lab2.tmpdir is not None
    lab2.start_origin_python(SINK, UPLOAD_PORT, [str(WARMUP + WINDOW + 0.2)])
    log = lab2.tmpdir / f"pyorigin-{UPLOAD_PORT}.log"
    cfg = f"[proxy]\nports = [80, {UPLOAD_PORT}]\n" + shaping(
        klass("up", "2mbit"),
        select("up", url_prefix=f"http://origin.lab:{UPLOAD_PORT}/"),
        f'wan_interfaces = ["{lab2.gw_wan_if}"]',
    )
    with Proxy(lab2, cfg) as proxy:
        lab2.set_forwarding(False)
        try:
            argv = [sys.executable, str(lab2.tmpdir / "sender.py"), lab2.origin_v4,
                    str(UPLOAD_PORT), str(WARMUP + WINDOW + 2)]  # fmt: skip
            lab2.run("client", argv, timeout=20)
            deadline = time.monotonic() + 5
            while "done" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            lab2.set_forwarding(True)
        assert "TPROXY" in proxy.rules()
    out = "\n".join(x for x in log.read_text().splitlines() if x[:1].isdigit())
    assert_near(rate(out, WARMUP, WARMUP + WINDOW), 2 * MBIT)


@lab_test
def test_per_connection_cap_paces_each_download(lab2: Lab) -> None:
    # A wide class whose connections are each paced to 2 Mbit/s (SO_MAX_PACING_RATE): two
    # downloads at once get 2 Mbit/s each, not a share of the class.
    cfg = shaping(
        klass("capped", "40mbit", per_connection_cap="2mbit"),
        select("capped", url_prefix="http://origin.lab/nocache/"),
    )
    with Proxy(lab2, cfg), ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(reader, lab2, host, WARMUP + WINDOW) for host in ("client", "client2")]
        rates = [rate(j.result()) for j in jobs]
    for r in rates:
        assert_near(r, 2 * MBIT)
