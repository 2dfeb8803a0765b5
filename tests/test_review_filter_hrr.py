"""A second ClientHello after a TLS 1.3 HelloRetryRequest (RFC 8446 §4.1.4) is inspected too.

RFC 8446 §4.1.2: the second hello must repeat the first one's server_name. The queue keeps an
accepted TLS 1.3 flow's verdict mark until the client's next data: a second hello that names
another server resets the flow; the client's ordinary second flight gets the mark at once; the
last packet the kernel queues always carries it. Pure tests feed packets to
:class:`FlowInspector`; the lab test runs a real HRR handshake (openssl s_server offering only
P-256 to a client whose first key share is X25519) and a client that changes its name.
"""

from __future__ import annotations

import itertools
import json
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.lab import Lab
from tests.proxy import Proxy
from tests.test_filter_lab import HELLO_PY
from tests.test_tls_sni import ipv4, real_hello, tcp_header
from tproxy.netfilter.render import MARK_VERDICT_ACCEPT
from tproxy.nfqueue import (
    DECIDE_PACKETS,
    MAX_HELLO_SEGMENTS,
    RETRY_PACKETS,
    Action,
    FlowDecision,
    FlowInspector,
    Outcome,
)
from tproxy.tls import parse_client_hello, parse_second_flight

SYN, ACK, PSH_ACK = 0x02, 0x10, 0x18
ISN = 7000
CLASS_BITS = 0x0300
# RFC 8446 Appendix D.4: the dummy change_cipher_spec record of middlebox compatibility mode.
CCS = b"\x14\x03\x03\x00\x01\x01"
APP_DATA = b"\x17\x03\x03\x00\x20" + bytes(32)  # an encrypted record (the client's Finished)


class Asked:
    """Policy stand-in: names ending in bad.example are denied; the questions are kept."""

    def __init__(self) -> None:
        self.names: list[str | None] = []
        self.evasions: list[str] = []
        self.filtered = True

    def decide(self, *a: Any) -> FlowDecision:
        sni = a[4]
        self.names.append(sni)
        return FlowDecision(not (sni or "").endswith("bad.example"))

    def evasion(
        self, client: str, mac: str | None, server: str, port: int, what: str, reset: bool
    ) -> bool:
        self.evasions.append(what)
        return self.filtered


class Client:
    """One TCP flow's client packets, numbered in sequence space."""

    def __init__(self, asked: Asked, sport: int = 41000) -> None:
        self.insp = FlowInspector(
            asked.decide,
            lambda ip, sni: CLASS_BITS if sni else 0,
            evasion=asked.evasion,
            second_hello=True,
        )
        self.sport = sport
        self.next = ISN + 1
        assert self.packet(SYN, seq=ISN).action is Action.PASS

    def packet(self, flags: int = ACK, payload: bytes = b"", seq: int | None = None) -> Outcome:
        seq = self.next if seq is None else seq
        if flags != SYN:
            self.next = seq + len(payload)
        raw = ipv4(tcp_header(self.sport, 443, seq, flags) + payload)
        return self.insp.inspect(raw, None, 0.0)

    def send(self, data: bytes, cuts: list[int] | None = None) -> list[Outcome]:
        edges = [0, *(cuts or []), len(data)]
        return [self.packet(PSH_ACK, data[a:b]) for a, b in itertools.pairwise(edges)]


def tls12_hello(name: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_tls13_hello_offers_are_recognised() -> None:
    assert parse_client_hello(real_hello("a.example")).tls13
    assert not parse_client_hello(tls12_hello("a.example")).tls13


def test_parse_second_flight() -> None:
    hello = real_hello("same.example")
    both = parse_second_flight(CCS + hello)
    assert both.complete and both.sni == "same.example" and both.length == len(CCS + hello)
    assert parse_second_flight(hello).sni == "same.example"  # without compatibility mode
    assert parse_second_flight(CCS[:3]).incomplete
    assert parse_second_flight(CCS).incomplete
    assert parse_second_flight(CCS + hello[:100]).incomplete
    assert not parse_second_flight(CCS + APP_DATA).valid
    # TLS 1.2: ClientKeyExchange (handshake type 16) is no second hello.
    assert not parse_second_flight(b"\x16\x03\x03\x00\x46\x10" + bytes(70)).valid
    assert not parse_second_flight(b"\x14\x03\x03\x00\x01\x02").valid


def test_ordinary_tls13_flow_gets_its_mark_with_the_second_flight() -> None:
    asked = Asked()
    c = Client(asked)
    c.packet()
    [first] = c.send(real_hello("ok.example"))
    # Allowed, but the mark waits: the flow stays in the queue for one more data segment.
    assert first.action is Action.PASS and asked.names == ["ok.example"]
    assert c.packet().action is Action.PASS  # the client's ACK of the server's flight
    [out] = c.send(CCS + APP_DATA)
    assert out.action is Action.ACCEPT and out.mark == MARK_VERDICT_ACCEPT | CLASS_BITS
    assert out.sni == "ok.example" and c.insp.flows == {}
    assert asked.names == ["ok.example"] and asked.evasions == []


def test_hello_retry_with_the_same_name_is_accepted() -> None:
    asked = Asked()
    c = Client(asked)
    c.packet()
    hello = real_hello("ok.example")
    assert c.send(hello)[0].action is Action.PASS
    c.packet()  # ACK of the HelloRetryRequest
    # The second hello is bigger (a new key share) and spans two segments here.
    second = real_hello("ok.example")
    outs = c.send(CCS + second, [300])
    assert [o.action for o in outs] == [Action.PASS, Action.ACCEPT]
    assert outs[1].mark == MARK_VERDICT_ACCEPT | CLASS_BITS
    assert c.insp.stats.second_hellos == 1 and asked.evasions == []


@pytest.mark.parametrize("second", ["x.bad.example", "other.example", None])
def test_second_hello_naming_another_server_is_reset(second: str | None) -> None:
    asked = Asked()
    c = Client(asked)
    c.packet()
    assert c.send(real_hello("ok.example"))[0].action is Action.PASS
    c.packet()
    start = c.next
    [out] = c.send(CCS + real_hello(second))
    assert out.action is Action.RESET and out.segment is not None
    assert out.segment.seq == start  # the server's next expected byte: the RST's target
    assert "second ClientHello" in out.evasion and "the first named ok.example" in out.evasion
    assert asked.names == ["ok.example"] and len(asked.evasions) == 1
    assert c.insp.stats.evasions == 1


def test_an_unfiltered_client_may_change_its_name() -> None:
    asked = Asked()
    asked.filtered = False
    c = Client(asked)
    c.send(real_hello("ok.example"))
    [out] = c.send(CCS + real_hello("x.bad.example"))
    assert out.action is Action.ACCEPT and len(asked.evasions) == 1


def test_a_client_that_only_acks_after_its_hello_is_decided_by_retry_packets() -> None:
    # A real client answers the server's flight; one that only ACKs would spend the packets
    # the daemon waits for a second hello, so that it could follow unseen: for a client the
    # filter judges by name that is an evasion, for others the verdict mark comes then.
    for filtered in (True, False):
        asked = Asked()
        asked.filtered = filtered
        c = Client(asked)  # packet 1: SYN
        c.packet()  # 2
        assert c.send(real_hello("ok.example"))[0].action is Action.PASS  # 3
        # RETRY_PACKETS count from the hello.
        outs = [c.packet() for _ in range(RETRY_PACKETS - 1)]
        assert [o.action for o in outs[:-1]] == [Action.PASS] * (RETRY_PACKETS - 2)
        if filtered:
            assert outs[-1].action is Action.RESET
            assert "packets without data after an accepted ClientHello" in outs[-1].evasion
        else:
            assert outs[-1].action is Action.ACCEPT and outs[-1].mark & MARK_VERDICT_ACCEPT
        assert c.insp.flows == {}


def test_second_hello_cut_into_tiny_segments_is_an_evasion() -> None:
    asked = Asked()
    c = Client(asked)
    assert c.send(real_hello("ok.example"))[0].action is Action.PASS
    data = CCS + real_hello("ok.example")
    outs = c.send(data[:30], list(range(5, 30, 5)))
    decided = [o for o in outs if o.action is not Action.PASS]
    assert len(decided) == 1 and decided[0].action is Action.RESET
    assert "second ClientHello cut into" in decided[0].evasion


def test_extra_change_cipher_spec_records_hide_nothing() -> None:
    # Several dummy records before the second hello are stepped over ...
    asked = Asked()
    c = Client(asked)
    c.send(real_hello("ok.example"))
    [out] = c.send(CCS * 3 + real_hello("x.bad.example"))
    assert out.action is Action.RESET and "names x.bad.example" in out.evasion
    # ... and sending them one per segment to spend the segments waited for is an evasion.
    c = Client(asked, sport=41001)
    c.send(real_hello("ok.example"))
    outs = [c.send(CCS)[0] for _ in range(MAX_HELLO_SEGMENTS)]
    assert [o.action for o in outs[:-1]] == [Action.PASS] * (MAX_HELLO_SEGMENTS - 1)
    assert outs[-1].action is Action.RESET
    assert f"{MAX_HELLO_SEGMENTS} change_cipher_spec records after" in outs[-1].evasion
    assert not parse_second_flight(CCS + b"\x14\x03\x03\x00\x02\x01\x01").valid


def test_tls12_flow_waits_for_its_client_key_exchange_and_denied_flows_do_not_wait() -> None:
    # A TLS 1.2 hello waits like a TLS 1.3 one: a fake hello the server never gets may offer
    # TLS 1.2 only, whatever the real hello behind it offers.
    asked = Asked()
    c = Client(asked)
    [out] = c.send(tls12_hello("ok.example"))
    assert out.action is Action.PASS and c.insp.flows
    [out] = c.send(b"\x16\x03\x03\x00\x46\x10" + bytes(70))  # ClientKeyExchange
    assert out.action is Action.ACCEPT and c.insp.flows == {}
    c = Client(asked, sport=41001)
    [out] = c.send(real_hello("x.bad.example"))
    assert out.action is Action.RESET and c.insp.flows == {}


def test_bare_inspector_keeps_deciding_on_the_first_hello() -> None:
    insp = FlowInspector(Asked().decide)
    assert insp.inspect(ipv4(tcp_header(41000, 443, ISN, SYN)), None, 0.0).action is Action.PASS
    raw = ipv4(tcp_header(41000, 443, ISN + 1, PSH_ACK) + real_hello("ok.example"))
    assert insp.inspect(raw, None, 0.0).action is Action.ACCEPT
    assert MAX_HELLO_SEGMENTS < DECIDE_PACKETS  # the hello's segments leave room for SYN, ACK


# -- lab: real packets through the gateway's queue ---------------------------------------------

FILTER = """
[filter]
default = "allow"

[[filter.rule]]
group = "*"
action = "deny"
domains = ["bad.example"]
"""

# Sends a ClientHello for argv[1] (OpenSSL's first key share: X25519 only), reads the server's
# answer (a HelloRetryRequest from a P-256-only server), then a second hello for argv[2].
SWITCH_CLIENT = HELLO_PY + textwrap.dedent(
    """
    first, second, ip = sys.argv[1], sys.argv[2], sys.argv[3]
    s = socket.create_connection((ip, 443), timeout=5)
    s.sendall(hello(first))
    answer = s.recv(4096)
    # RFC 8446 §4.1.3: a HelloRetryRequest is a ServerHello with this fixed random.
    hrr = bytes.fromhex("CF21AD74E59A6111BE1D8C021E65B891C2A211167ABB8C5E079E09E2C8A8339C")
    if hrr not in answer:
        print("no HelloRetryRequest %r" % answer[:16])
        sys.exit(0)
    s.sendall(bytes.fromhex("140303000101") + hello(second))
    try:
        data = s.recv(4096)
        print("answered %r" % data[:6])
    except ConnectionResetError:
        print("reset")
    except socket.timeout:
        print("timeout")
    """
)


@pytest.fixture(scope="module")
def hrr_origin(lab_module: Lab) -> Iterator[Lab]:
    """openssl s_server on origin:443 that only accepts P-256 key exchange: every client whose
    first key share is X25519 gets a HelloRetryRequest."""
    lab = lab_module
    assert lab.tmpdir is not None
    d = lab.tmpdir / "hrr"
    d.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=lab", "-keyout", str(d / "key.pem"),
         "-out", str(d / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    proc = lab.popen(
        "origin",
        ["openssl", "s_server", "-accept", "443", "-cert", str(d / "cert.pem"),
         "-key", str(d / "key.pem"), "-groups", "P-256", "-tls1_3", "-www", "-quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    lab.wait_port("origin", 443)
    try:
        yield lab
    finally:
        proc.kill()
        proc.wait(5)


def s_client(lab: Lab, name: str) -> str:
    res = lab.run(
        "client",
        ["openssl", "s_client", "-connect", f"{lab.origin_v4}:443", "-servername", name,
         "-groups", "X25519:P-256", "-tls1_3", "-msg", "-ign_eof"],
        input="GET / HTTP/1.0\r\n\r\n", check=False, timeout=10,
    )  # fmt: skip
    return res.stdout + res.stderr


def queue_status(proxy: Proxy) -> dict[str, Any]:
    out = proxy.tproxy("status", "--json", "--socket", str(proxy.control_socket)).stdout

    def find(node: Any) -> dict[str, Any] | None:
        if isinstance(node, dict):
            if "second_hellos" in node:
                return node
            for value in node.values():
                found = find(value)
                if found is not None:
                    return found
        return None

    found = find(json.loads(out))
    assert found is not None, out
    return found


@pytest.mark.lab
def test_real_hello_retry_is_inspected_and_the_flow_keeps_its_mark(hrr_origin: Lab) -> None:
    lab = hrr_origin
    with Proxy(lab, FILTER) as proxy:
        out = s_client(lab, "good.example")
        # Two ClientHellos: the server answered the first with a HelloRetryRequest.
        assert out.count("], ClientHello") == 2 and "HTTP/1.0 200 ok" in out, out[-2000:]
        out = s_client(lab, "bad.example")
        assert "HTTP/1.0 200" not in out
        status = queue_status(proxy)
        assert status["second_hellos"] == 1 and status["evasions"] == 0, status
        # The deferred verdict reached the kernel: the flow's connmark has the accept bit.
        ct = lab.run("gateway", ["conntrack", "-L", "-p", "tcp", "--dport", "443"], check=False)
        marks = [int(w[5:]) for w in ct.stdout.split() if w.startswith("mark=")]
        assert any(m & MARK_VERDICT_ACCEPT for m in marks), ct.stdout


@pytest.mark.lab
def test_second_hello_naming_another_server_is_reset_on_the_wire(hrr_origin: Lab) -> None:
    lab = hrr_origin
    with Proxy(lab, FILTER) as proxy:
        for second in ("x.bad.example", "other.example"):
            out = lab.run(
                "client", [sys.executable, "-c", SWITCH_CLIENT, "good.example", second,
                           lab.origin_v4],
            ).stdout.strip()  # fmt: skip
            assert out == "reset", (second, out)
        # The same name twice is a legitimate retry (the server then fails the handshake
        # itself: these are two unrelated hellos, but the gateway lets it through).
        out = lab.run(
            "client",
            [sys.executable, "-c", SWITCH_CLIENT, "good.example", "good.example", lab.origin_v4],
        ).stdout.strip()
        assert out != "reset", out
        assert queue_status(proxy)["evasions"] == 2
        assert proxy.stderr().count("evasion 10.77.1.10 TLS") == 1  # throttled per client
        assert "names x.bad.example, the first named good.example" in proxy.stderr()


PIECES = [b"", CCS, APP_DATA, b"\x16\x03\x03", bytes(40), real_hello("ok.example")[:200]]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(range(len(PIECES))) | st.binary(max_size=60), max_size=70))
def test_every_flow_is_decided_within_retry_packets(steps: list[int | bytes]) -> None:
    # Whatever follows an accepted TLS 1.3 hello, the verdict comes within RETRY_PACKETS
    # packets, and exactly once: a flow must not stay in the queue.
    asked = Asked()
    c = Client(asked)
    outs = c.send(real_hello("ok.example"))
    for step in steps:
        payload = PIECES[step] if isinstance(step, int) else step
        outs.append(c.packet(PSH_ACK if payload else ACK, payload))
        if outs[-1].action is not Action.PASS:
            break
    decided = [i for i, o in enumerate(outs) if o.action is not Action.PASS]
    assert len(decided) <= 1
    if len(outs) >= RETRY_PACKETS:  # counted from the hello, outs[0]
        assert decided and decided[0] + 1 <= RETRY_PACKETS
