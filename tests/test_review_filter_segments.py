"""A ClientHello cut into many tiny TCP segments cannot slip past the SNI filter.

The daemon decides every flow within DECIDE_PACKETS packets; a hello whose name arrives after
them used to be decided without a name (``sni_default``, usually allow). Now a hello still
incomplete by then whose segments averaged below
:data:`EVASION_SEGMENT_BYTES` is an evasion: reset, one throttled log line naming the client.
Hellos that are merely large (full-sized segments) and clients the filter does not judge by
name are decided as before. Pure tests feed packets to :class:`FlowInspector`; the component
test asks the real policy; the lab test sends a hello in 8-byte segments through the gateway.
"""

from __future__ import annotations

import itertools
import logging
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab import Lab
from tests.proxy import Proxy
from tests.test_filter_lab import HELLO_PY
from tests.test_tls_sni import BIG, ipv4, real_hello, tcp_header
from tproxy import config
from tproxy.filter.component import FilterComponent
from tproxy.nfqueue import (
    EVASION_SEGMENT_BYTES,
    MAX_HELLO_SEGMENTS,
    Action,
    FlowDecision,
    FlowInspector,
    Outcome,
)

SYN, ACK, PSH_ACK = 0x02, 0x10, 0x18
ISN = 9000


def allow_all(*a: Any) -> FlowDecision:
    return FlowDecision(True)


def send(
    insp: FlowInspector, data: bytes, size: int, *, syn: bool = True, start: int = 0
) -> list[Outcome]:
    """``data`` (the stream from byte ``start``) in ``size``-byte segments after SYN, ACK."""
    if syn:
        insp.inspect(ipv4(tcp_header(40000, 443, ISN, SYN)), None, 0.0)
        insp.inspect(ipv4(tcp_header(40000, 443, ISN + 1, ACK)), None, 0.0)
    out = []
    for a in range(0, len(data), size):
        raw = ipv4(tcp_header(40000, 443, ISN + 1 + start + a, PSH_ACK) + data[a : a + size])
        out.append(insp.inspect(raw, None, 0.0))
        if out[-1].action is not Action.PASS:
            break  # decided: the kernel queues no more of the flow
    return out


def decided(outs: list[Outcome]) -> Outcome:
    found = [o for o in outs if o.action is not Action.PASS]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("size", [1, 8, 20])
def test_tiny_segments_are_reset_whatever_the_name(size: int) -> None:
    insp = FlowInspector(allow_all)
    hello = real_hello("harmless.example")
    assert hello.index(b"harmless") > MAX_HELLO_SEGMENTS * size  # the name comes too late
    out = decided(send(insp, hello, size))
    assert out.action is Action.RESET and out.sni is None
    assert f"cut into {MAX_HELLO_SEGMENTS} segments of {size} bytes" in out.evasion
    assert insp.stats.evasions == 1 and insp.flows == {}


def test_a_name_that_arrived_in_time_still_decides() -> None:
    # 100-byte segments: the name of a short hello is among the first six.
    hello = real_hello("a.example")
    assert hello.index(b"a.example") < 5 * 100
    out = decided(send(FlowInspector(allow_all), hello, 100))
    assert out.action is Action.ACCEPT and out.sni == "a.example" and out.evasion == ""


def test_real_clients_are_not_evasions() -> None:
    # A post-quantum-sized hello in two full segments, and a 5-byte record header sent on its
    # own first (some stacks write the header separately): decided by name.
    for cuts in ([1460], [5, 1465]):
        insp = FlowInspector(allow_all)
        insp.inspect(ipv4(tcp_header(40000, 443, ISN, SYN)), None, 0.0)
        outs = [
            insp.inspect(ipv4(tcp_header(40000, 443, ISN + 1 + a, PSH_ACK) + BIG[a:b]), None, 0)
            for a, b in itertools.pairwise([0, *cuts, len(BIG)])
        ]
        assert decided(outs).action is Action.ACCEPT and decided(outs).sni == "www.example.com"


def test_mid_stream_bytes_are_not_judged() -> None:
    # A flow joined after a daemon restart: its first queued bytes are not a hello start, so
    # tiny encrypted records are no evidence of tiny segments. A client the filter does not
    # judge by name gets sni_default as before (one filtered by name is reset: where the stream
    # starts is unknown, see test_review_filter_budget).
    asked: list[str] = []

    def decide(*a: Any) -> FlowDecision:
        asked.append(a[6])
        return FlowDecision(True)

    insp = FlowInspector(decide, evasion=lambda *a: False)
    out = decided(send(insp, b"\x17\x03\x03\x00\x40" + bytes(64), 10, syn=False, start=700))
    assert out.action is Action.ACCEPT and out.evasion == "" and len(asked) == 1


def test_retransmitted_tiny_pieces_do_not_inflate_the_mean() -> None:
    # The mean is taken over the contiguous bytes: resending the same 20 bytes in 6 segments
    # (each one "large" on the wire) is still 20 bytes of hello.
    insp = FlowInspector(allow_all)
    hello = real_hello("x.example")
    insp.inspect(ipv4(tcp_header(40000, 443, ISN, SYN)), None, 0.0)
    outs = [
        insp.inspect(ipv4(tcp_header(40000, 443, ISN + 1, PSH_ACK) + hello[:20]), None, 0.0)
        for _ in range(MAX_HELLO_SEGMENTS)
    ]
    assert decided(outs).action is Action.RESET
    assert EVASION_SEGMENT_BYTES == 536  # RFC 9293 §3.7.1 default send MSS


# -- the filter's answer -----------------------------------------------------------------------

POLICY = """
[filter]
default = "allow"

[[filter.group]]
name = "pupils"
cidrs = ["10.0.0.0/24"]

[[filter.rule]]
group = "pupils"
action = "deny"
domains = ["bad.example"]
"""


def test_component_resets_filtered_clients_only_and_throttles_its_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    comp = FilterComponent(config.parse(tomllib.loads(POLICY)))
    caplog.set_level(logging.WARNING, "tproxy.filter")
    what = "ClientHello cut into 6 segments of 5 bytes on average"
    assert comp.sni_evasion("10.9.0.5", None, "192.0.2.1", 443, what) is False  # not a pupil
    for _ in range(3):
        assert comp.sni_evasion("10.0.0.5", None, "192.0.2.1", 443, what) is True
    assert comp.sni_evasion("10.0.0.6", None, "2001:db8::1", 443, what) is True
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # one per client within the interval
    assert lines[0].startswith("evasion 10.0.0.5 TLS to 192.0.2.1:443: ClientHello cut")
    assert "[2001:db8::1]:443" in lines[1]
    assert comp.stats.sni_evasions == 4
    # After the interval the next line tells how many were left out.
    comp._evasion_log["10.0.0.5"] = (comp._evasion_log["10.0.0.5"][0] - 61.0, 2)
    comp.sni_evasion("10.0.0.5", None, "192.0.2.1", 443, what)
    assert "(2 more from this client in the last 60s not logged)" in caplog.records[-1].message
    assert caplog.records[-1].message.startswith("evasion 10.0.0.5 TLS to 192.0.2.1:443: ")
    assert "; flow reset" in caplog.records[-1].message
    # A fake hello dropped (the flow goes on, its real hello is judged): said so.
    fake = "a data segment without the ACK flag"
    assert comp.sni_evasion("10.0.0.7", None, "192.0.2.1", 443, fake, False) is True
    assert caplog.records[-1].message.endswith(f"{fake}; packet dropped")
    assert comp.sni_evasion("10.9.0.7", None, "192.0.2.1", 443, fake, False) is False


# -- lab ---------------------------------------------------------------------------------------

LAB_FILTER = """
[filter]
default = "allow"

[[filter.group]]
name = "{group}"
cidrs = ["{cidr}"]

[[filter.rule]]
group = "{group}"
action = "deny"
domains = ["bad.example"]
"""

TINY_CLIENT = HELLO_PY + textwrap.dedent(
    """
    name, ip, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    hello = hello(name)
    s = socket.create_connection((ip, 443), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def pieces():
        for i in range(0, len(hello), size):   # one TCP segment per send (Nagle is off)
            s.send(hello[i : i + size])
            time.sleep(0.01)

    outcome(s, pieces)
    """
)


@pytest.fixture(scope="module")
def tls_origin(lab_module: Lab) -> Iterator[Lab]:
    lab = lab_module
    assert lab.tmpdir is not None
    d = lab.tmpdir / "segments"
    d.mkdir()
    lab.run(
        "origin",
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=lab", "-keyout", str(d / "key.pem"),
         "-out", str(d / "cert.pem")],
    )  # fmt: skip
    proc = lab.popen(
        "origin",
        ["openssl", "s_server", "-accept", "443", "-cert", str(d / "cert.pem"),
         "-key", str(d / "key.pem"), "-www", "-quiet"],
    )  # fmt: skip
    lab.wait_port("origin", 443)
    try:
        yield lab
    finally:
        proc.kill()
        proc.wait(5)


def tiny(lab: Lab, name: str, size: int) -> str:
    argv = [sys.executable, "-c", TINY_CLIENT, name, lab.origin_v4, str(size)]
    return str(lab.run("client", argv).stdout.strip())


@pytest.mark.lab
def test_tiny_segments_are_reset_on_the_wire_for_filtered_clients(tls_origin: Lab) -> None:
    lab = tls_origin
    with Proxy(lab, LAB_FILTER.format(group="all", cidr="0.0.0.0/0")) as proxy:
        assert tiny(lab, "good.example", 8) == "reset"
        assert tiny(lab, "good.example", 8) == "reset"
        # Full-sized segments: the same hello is decided by its name.
        assert tiny(lab, "good.example", 1400) == "handshake"
        assert tiny(lab, "bad.example", 1400) == "reset"
        err = proxy.stderr()
        assert err.count("evasion 10.77.1.10 TLS to") == 1, err  # throttled
        assert "ClientHello cut into 6 segments of 8 bytes on average" in err
        lines = proxy.log_lines(4)
        assert sum(" TCP_DENIED/403 " in x and "CONNECT" in x for x in lines) >= 3, lines
    # A client outside every group that denies by name is not the filter's business.
    with Proxy(lab, LAB_FILTER.format(group="others", cidr="10.99.0.0/24")) as proxy:
        assert tiny(lab, "good.example", 8) == "handshake"
        assert "evasion" not in proxy.stderr()
