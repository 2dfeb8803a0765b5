"""Adversarial review of the HTTPS (SNI) path: ClientHellos as browsers and evasion tools send
them, through :class:`FlowInspector` (raw packets in) and the compiled policy."""

from __future__ import annotations

import itertools
import struct
import tomllib
from datetime import datetime
from typing import Any

import pytest

from tests.test_tls_sni import ipv4, ipv6, real_hello, tcp_header, with_extensions
from tproxy.config import Reader
from tproxy.filter import Policy, parse_filter
from tproxy.filter.verdict import explain_sni
from tproxy.nfqueue import MAX_HELLO_SEGMENTS, Action, FlowDecision, FlowInspector
from tproxy.tls import EXT_ECH, parse_client_hello, sni_from_prefix

MON_10 = datetime(2024, 1, 1, 10, 0)
SYN, ACK, PSH_ACK = 0x02, 0x10, 0x18
ISN = 5000
# Chrome's GREASE ECH (draft-ietf-tls-esni §6.2): an outer ECHClientHello with random bytes,
# sent in every ClientHello when the client has no ECH config. Shape only; contents are random.
GREASE_ECH = b"\x00" + struct.pack("!HH", 1, 1) + b"\x2a" + struct.pack("!H", 32) + bytes(32)
GREASE_ECH += struct.pack("!H", 144) + bytes(144)
CHROME_LIKE_EXTS = [(0x0A0A, b""), (EXT_ECH, GREASE_ECH), (0x1A1A, b"\x00")]

SCHOOL = """
[filter]
sni_default = "deny"

[[filter.group]]
name = "pupils"
cidrs = ["10.0.0.0/24", "fd00::/64"]

[[filter.rule]]
group = "pupils"
action = "deny"
domains = ["blocked.example", "cloudflare-ech.com"]
"""


def make_policy(text: str = SCHOOL) -> Policy:
    r = Reader(tomllib.loads(text).get("filter", {}), "t.toml", "filter")
    cfg = parse_filter(r)
    assert r.errors == [], [str(e) for e in r.errors]
    return Policy.compile(cfg)


POLICY = make_policy()


def decide(client: str, mac: Any, server: str, port: int, sni: Any, ech: bool, why: str) -> Any:
    v = POLICY.sni_verdict(client, sni, MON_10, client_mac=mac)
    return FlowDecision(v.allowed, v.reason)


def flow(hello: bytes, cuts: list[int], *, v6: bool = False, ttl: int = 64) -> list[Any]:
    insp = FlowInspector(decide)

    def pkt(seq: int, flags: int, payload: bytes = b"") -> bytes:
        tcp = tcp_header(40000, 443, seq, flags) + payload
        if v6:
            return ipv6(tcp)
        p = bytearray(ipv4(tcp))
        p[8] = ttl
        return bytes(p)

    insp.inspect(pkt(ISN, SYN), None, 0.0)
    insp.inspect(pkt(ISN + 1, ACK), None, 0.0)
    out = []
    for a, b in itertools.pairwise([0, *cuts, len(hello)]):
        out.append(insp.inspect(pkt(ISN + 1 + a, PSH_ACK, hello[a:b]), None, 0.0))
    return out


def test_grease_ech_does_not_turn_every_chrome_flow_into_sni_default() -> None:
    # Chrome sends an ECH extension in every hello (GREASE). With sni_default = "deny" (what a
    # school sets to stop flows without a name) it must still reach unlisted sites by name.
    hello = with_extensions(real_hello("wikipedia.example"), CHROME_LIKE_EXTS)
    info = parse_client_hello(hello)
    assert info.complete and info.ech and info.sni == "wikipedia.example"
    assert flow(hello, [])[-1].action is Action.ACCEPT
    blocked = with_extensions(real_hello("www.blocked.example"), CHROME_LIKE_EXTS)
    assert flow(blocked, [])[-1].action is Action.RESET


def test_real_ech_is_blocked_by_denying_its_public_name() -> None:
    # Real ECH: the outer name is the provider's public name; deny that to stop hidden names.
    v = POLICY.sni_verdict("10.0.0.5", "cloudflare-ech.com", MON_10)
    assert v.action == "deny" and v.rule == "filter.rule[0]"
    text = explain_sni(POLICY, "10.0.0.5", "ok.example", MON_10, ech=True)
    assert "verdict: ALLOW" in text and "ECH" in text


def test_no_sni_and_non_tls_get_sni_default() -> None:
    assert flow(real_hello(None), [])[-1].action is Action.RESET
    assert flow(b"SSH-2.0-OpenSSH_9.2\r\n", [])[-1].action is Action.RESET
    # A client outside every filtering group is not cut off by sni_default.
    v = POLICY.sni_verdict("10.9.0.5", None, MON_10)
    assert v.action == "allow"


@pytest.mark.parametrize("name", ["BLOCKED.EXAMPLE", "blocked.example.", "Www.Blocked.Example."])
def test_sni_spellings(name: str) -> None:
    assert flow(real_hello(name), [])[-1].action is Action.RESET


def test_hello_over_tiny_records_and_segments() -> None:
    # One record per 40 bytes of handshake message, then cut into 3 segments.
    hello = with_extensions(real_hello("www.blocked.example"), [], records=12)
    assert parse_client_hello(hello).sni == "www.blocked.example"
    n = len(hello)
    assert flow(hello, [n // 3, 2 * n // 3])[-1].action is Action.RESET


def test_name_in_the_first_segments_of_an_over_fragmented_hello_is_used() -> None:
    # Split into more segments than the kernel queues (evasion tools cut hellos this way):
    # when the server_name extension has arrived, the name decides, not sni_default.
    hello = real_hello("www.blocked.example")
    at = hello.index(b"www.blocked.example") + 30
    tail = [at + 10 * i for i in range(1, MAX_HELLO_SEGMENTS + 2)]
    outs = flow(hello, [at, *tail])
    decided = [o for o in outs if o.action is not Action.PASS]
    assert decided and decided[0].action is Action.RESET and decided[0].sni == "www.blocked.example"
    # ... and an allowed name is allowed (sni_default would reset it).
    ok = real_hello("ok.example")
    at = ok.index(b"ok.example") + 30
    outs = flow(ok, [at, *(at + 10 * i for i in range(1, MAX_HELLO_SEGMENTS + 2))])
    assert next(o.action for o in outs if o.action is not Action.PASS) is Action.ACCEPT


def test_sni_from_prefix() -> None:
    hello = real_hello("prefix.example")
    at = hello.index(b"prefix.example")
    assert sni_from_prefix(hello[: at + 5]) is None  # the name is cut
    assert sni_from_prefix(hello[: at + len("prefix.example")]) == "prefix.example"
    assert sni_from_prefix(b"\x16\x03\x01") is None
    assert sni_from_prefix(b"GET / HTTP/1.1\r\n") is None


def test_fake_hello_that_cannot_reach_the_server_is_ignored() -> None:
    # zapret-style "fake": a decoy ClientHello with TTL 1 dies at this router (RFC 1812 §5.3.1)
    # and never reaches the server; the real one follows. The decoy must not decide the flow.
    insp = FlowInspector(decide)
    decoy = real_hello("ok.example")
    real = real_hello("www.blocked.example")

    def pkt(seq: int, flags: int, payload: bytes = b"", ttl: int = 64, v6: bool = False) -> bytes:
        tcp = tcp_header(40000, 443, seq, flags) + payload
        if v6:
            p = bytearray(ipv6(tcp))
            p[7] = ttl
        else:
            p = bytearray(ipv4(tcp))
            p[8] = ttl
        return bytes(p)

    for v6 in (False, True):
        insp.inspect(pkt(ISN, SYN, v6=v6), None, 0.0)
        assert insp.inspect(pkt(ISN + 1, PSH_ACK, decoy, 1, v6), None, 0.0).action is Action.PASS
        out = insp.inspect(pkt(ISN + 1, PSH_ACK, real, 64, v6), None, 0.0)
        assert out.action is Action.RESET and out.sni == "www.blocked.example"


def test_ipv6_https_flow_and_group() -> None:
    assert flow(real_hello("blocked.example"), [], v6=True)[-1].action is Action.RESET
    assert flow(real_hello("ok.example"), [], v6=True)[-1].action is Action.ACCEPT
