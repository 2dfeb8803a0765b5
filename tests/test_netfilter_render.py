"""The pure side of tproxy.netfilter: rules as text, golden files, parsing iptables-save.

Golden files live in tests/golden/netfilter/; after an intended change run
``UPDATE_GOLDEN=1 pytest tests/test_netfilter_render.py`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy import config
from tproxy.netfilter import (
    ClassifyRule,
    RulesPlan,
    class_mark,
    plan_from_config,
    render,
    render_routing,
)
from tproxy.netfilter.apply import explain_failure
from tproxy.netfilter.render import (
    MULTIPORT_MAX,
    LiveTable,
    compose,
    parse_save,
    render_tables,
)

GOLDEN = Path(__file__).parent / "golden" / "netfilter"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def full_plan() -> RulesPlan:
    """A realistic gateway: two LANs, bypasses of both families, every extra switched on."""
    return RulesPlan(
        lan_interfaces=("br-lan", "wlan0"),
        ports=(80, 8080),
        listen_port=3129,
        fwmark=0x1,
        fwmark_mask=0x1,
        route_table=100,
        rule_priority=10000,
        bypass_clients=(net("192.168.1.10/32"), net("fd00:1::10/128")),
        bypass_destinations=(net("203.0.113.0/24"), net("2001:db8:5::/48")),
        ipv6=True,
        https_ports=(443,),
        nfqueue_num=7,
        quic_reject=True,
        classify=(
            ClassifyRule(mark=class_mark(1), out_interface="br-lan", major=1, minor=0x10),
            ClassifyRule(mark=class_mark(2), out_interface="br-lan", major=1, minor=0x20),
            ClassifyRule(mark=class_mark(1), out_interface="eth0", major=2, minor=0x10),
        ),
    )


def minimal_plan(**kw: object) -> RulesPlan:
    args: dict[str, object] = {"lan_interfaces": ("lan0",), "ports": (80,), "listen_port": 3129}
    args.update(kw)
    return RulesPlan(**args)  # type: ignore[arg-type]


def rules_of(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


@pytest.mark.parametrize("family", [4, 6])
def test_golden(family: int) -> None:
    text = render(full_plan(), family)
    path = GOLDEN / f"full-ipv{family}.rules"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing {path}; run with UPDATE_GOLDEN=1"
    assert text == path.read_text()


def test_rule_order_in_prerouting() -> None:
    pre = rules_of(render(full_plan(), 4), "TPROXY-PRE")
    index = {
        "local": next(i for i, r in enumerate(pre) if "--dst-type LOCAL -j RETURN" in r),
        "bypass": next(i for i, r in enumerate(pre) if "-s 192.168.1.10/32 -j RETURN" in r),
        "syn": next(i for i, r in enumerate(pre) if "-p tcp --syn " in r and "-j TPROXY " in r),
        "socket": next(i for i, r in enumerate(pre) if "-m socket" in r),
        "nonsyn": next(i for i, r in enumerate(pre) if "! --syn" in r and "-j TPROXY " in r),
        "queue": next(i for i, r in enumerate(pre) if "-j NFQUEUE" in r),
    }
    # Only the verdict bookkeeping and the socket divert of owned flows (the bulk of the chain's
    # packets) come before LOCAL: both leave before the addrtype FIB lookup.
    socket_rules = [r for r in pre if "-m socket" in r]
    first_socket = pre.index(socket_rules[0])
    assert all("--mark 0x" in r for r in pre[:first_socket])
    assert pre[first_socket : index["local"]] == socket_rules
    # The connmark is only read for packets on an HTTPS port (a native port comparison first):
    # first a new SYN's stale verdict is cleared (a reused 4-tuple), per LAN interface.
    assert all(
        re.search(r" -p tcp --syn --dport 443 -m connmark ! --mark 0x0/0x6 ", r) for r in pre[:2]
    )
    assert all(re.search(r"-p tcp --[sd]port 443 -m connmark ", r) for r in pre[2:6])
    assert index["local"] < index["bypass"] < index["syn"] < index["nonsyn"] < index["queue"]
    # The socket rules are not tied to a LAN interface (they catch WAN-side return traffic),
    # never look up a SYN (TIME_WAIT, DESIGN.md §3), and take origin replies first.
    for rule in socket_rules:
        assert " -i " not in rule and " ! --syn " in rule and rule.endswith("-j TPROXY-DIVERT")
    assert "--sports" in socket_rules[0] and "--dports" in socket_rules[-1]
    # Every TPROXY and queue rule is limited to a LAN interface, but for the servers' replies
    # in flows a LAN client started to an HTTPS port (connmark 0x10 set on its SYN from the
    # LAN; the mark 0x20 only the rule before sets).
    # Replies are marked here and queued in mangle FORWARD, after NAT has restored their
    # destination (the client's address, which the daemon knows the flow by).
    mfwd = rules_of(render(full_plan(), 4), "TPROXY-MFWD")
    replies = [r for r in mfwd if "--sport 443 -m mark --mark 0x20/0x20 -j NFQUEUE" in r]
    assert len(replies) == 1 and mfwd[-1] == replies[0]
    assert "CONNMARK --save-mark" in mfwd[0] and mfwd[1].endswith(
        "-m mark ! --mark 0x0/0x6 -j RETURN"
    )
    assert not [r for r in pre if "--sport 443 -m mark --mark 0x20/0x20 -j NFQUEUE" in r]
    marks = [r for r in pre if "-j MARK --set-xmark 0x20/0x20" in r]
    assert len(marks) == 1 and "-m connmark --mark 0x10/0x10 -m conntrack --ctdir REPLY" in marks[0]
    assert pre.index(marks[0]) == len(pre) - 1 or "-j NFQUEUE" not in pre[pre.index(marks[0]) + 1]
    # LAN packets of HTTPS flows whose source would not be routed back out of that interface
    # (a host posing as a server) are dropped before anything is queued.
    rp = [r for r in pre if "-m rpfilter --invert -j DROP" in r]
    assert len(rp) == 4 and {r.split()[3] for r in rp} == {"br-lan", "wlan0"}
    assert {r.split()[6] for r in rp} == {"--dport", "--sport"}
    assert max(pre.index(r) for r in rp) < min(pre.index(r) for r in pre if "NFQUEUE" in r)
    # Replies arriving on a LAN interface (a client forging the server's answer) never get it.
    lan_replies = [r for r in pre if "--sport 443 -m conntrack --ctdir REPLY -j RETURN" in r]
    assert [r.split()[3] for r in lan_replies] == ["br-lan", "wlan0"]
    assert all(pre.index(r) < pre.index(marks[0]) for r in lan_replies)
    for rule in pre:
        if "-j CONNMARK --set-xmark 0x10/0x10" in rule:
            assert re.search(r" -i (br-lan|wlan0) -p tcp --syn --dport 443 ", rule), rule
        if "-j TPROXY " in rule or "-j NFQUEUE" in rule:
            assert re.search(r" -i (br-lan|wlan0) ", rule), rule


def test_bypasses_are_split_per_family() -> None:
    v4 = render(full_plan(), 4)
    v6 = render(full_plan(), 6)
    assert "192.168.1.10/32" in v4 and "203.0.113.0/24" in v4
    assert "fd00:1::10" not in v4 and "2001:db8:5::/48" not in v4
    assert "fd00:1::10/128" in v6 and "2001:db8:5::/48" in v6
    assert "192.168.1.10" not in v6
    assert "--on-ip 127.0.0.1" in v4 and "--on-ip ::1" in v6
    assert "icmp6-port-unreachable" in v6 and "icmp6" not in v4


def test_minimal_plan_has_no_extras() -> None:
    text = render(minimal_plan(), 4)
    assert "*filter" not in text
    assert "TPROXY-POST" not in text
    assert "NFQUEUE" not in text and "CONNMARK" not in text
    assert rules_of(text, "TPROXY-PRE") == [
        "-A TPROXY-PRE -p tcp --sport 80 ! --syn -m socket --transparent -j TPROXY-DIVERT",
        "-A TPROXY-PRE -p tcp --dport 80 ! --syn -m socket --transparent -j TPROXY-DIVERT",
        "-A TPROXY-PRE -p tcp --dport 80 -m addrtype --dst-type LOCAL -j RETURN",
        "-A TPROXY-PRE -i lan0 -p tcp --syn --dport 80 -j TPROXY --on-port 3129 "
        "--on-ip 127.0.0.1 --tproxy-mark 0x1/0x1",
        "-A TPROXY-PRE -i lan0 -p tcp ! --syn --dport 80 -j TPROXY --on-port 3129 "
        "--on-ip 127.0.0.1 --tproxy-mark 0x1/0x1",
    ]
    # The hooks go to position 1 so that an operator's ACCEPT rules cannot hide our divert.
    assert "-I PREROUTING 1 -j TPROXY-PRE" in text.splitlines()


def test_custom_mark_and_on_ip() -> None:
    plan = minimal_plan(fwmark=0x10000, fwmark_mask=0x30000, on_ip4="0.0.0.0", on_ip6="::")
    v4 = render(plan, 4)
    assert "--on-ip 0.0.0.0 --tproxy-mark 0x10000/0x30000" in v4
    assert "-A TPROXY-DIVERT -j MARK --set-xmark 0x10000/0x30000" in v4
    assert "--on-ip :: " in render(plan, 6)


@settings(max_examples=50, deadline=None)
@given(st.sets(st.integers(1, 65535), min_size=1, max_size=40))
def test_port_groups_cover_every_port_within_the_multiport_limit(ports: set[int]) -> None:
    text = render(minimal_plan(ports=tuple(ports)), 4)
    syn = [r for r in rules_of(text, "TPROXY-PRE") if "-p tcp --syn " in r]
    covered: list[int] = []
    for rule in syn:
        m = re.search(r"(?:--dport|--dports) (\S+)", rule)
        assert m is not None
        group = [int(p) for p in m.group(1).split(",")]
        assert len(group) <= MULTIPORT_MAX
        covered += group
    assert sorted(covered) == sorted(ports)


def test_ipv6_disabled_plan() -> None:
    plan = minimal_plan(ipv6=False)
    assert plan.families() == (4,)
    with pytest.raises(ValueError, match="IPv6 disabled"):
        render(plan, 6)
    assert [r.family for r in render_routing(plan).rules] == [4]


def test_routing_description() -> None:
    routing = render_routing(full_plan())
    assert [(r.family, r.priority, r.fwmark, r.fwmask, r.table) for r in routing.rules] == [
        (4, 10000, 1, 1, 100),
        (6, 10000, 1, 1, 100),
    ]
    assert [(r.family, r.dst, r.dev, r.table) for r in routing.routes] == [
        (4, "0.0.0.0/0", "lo", 100),
        (6, "::/0", "lo", 100),
    ]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"lan_interfaces": ("bad name",)}, "not an interface name"),
        ({"ports": (0,)}, "not a TCP port"),
        ({"https_ports": (80,), "nfqueue_num": 1}, "both intercepted and queued"),
        ({"https_ports": (443,)}, "need an nfqueue_num"),
        ({"fwmark": 0x3, "fwmark_mask": 0x1}, "outside fwmark_mask"),
        ({"fwmark": 0x2, "fwmark_mask": 0x2}, "overlaps the bits tproxy marks packets with"),
        ({"route_table": 254}, "reserved"),
        ({"rule_priority": 40000}, "outside"),
    ],
)
def test_invalid_plans(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        minimal_plan(**kw)


def test_classify_rule_validation() -> None:
    assert ClassifyRule(class_mark(3), "", 0xA, 0xFF).class_id == "a:ff"
    with pytest.raises(ValueError, match="outside mask"):
        ClassifyRule(0x1, "eth0", 1, 1)
    with pytest.raises(ValueError):
        class_mark(256)
    # Without an interface the class applies on every egress interface.
    plan = minimal_plan(classify=(ClassifyRule(class_mark(5), "", 1, 5),))
    assert "-A TPROXY-POST -m mark --mark 0x500/0xff00 -j CLASSIFY --set-class 1:5" in render(
        plan, 4
    )


# -- compose / parse_save: the pieces apply() builds its one restore from ----------------------

SAVED = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Sun Nov 29 03:40:58 2026
*mangle
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:TPROXY-DIVERT - [0:0]
:TPROXY-POST - [0:0]
:TPROXY-PRE - [0:0]
:operator - [0:0]
-A PREROUTING -j TPROXY-PRE
-A PREROUTING -s 1.2.3.4/32 -j MARK --set-xmark 0x7/0xffffffff
-A POSTROUTING -j TPROXY-POST
-A TPROXY-DIVERT -j ACCEPT
-A TPROXY-PRE -i lan0 -p tcp -m tcp --dport 80 -j TPROXY --on-port 3129 --on-ip 127.0.0.1 \
--tproxy-mark 0x1/0x1
-A operator -j RETURN
COMMIT
# Completed on Sun Nov 29 03:40:58 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
-A FORWARD -i eth9 -j ACCEPT
COMMIT
"""


def test_parse_save_finds_only_ours() -> None:
    tables, excerpt = parse_save(SAVED)
    assert tables == (
        LiveTable(
            "mangle",
            ("TPROXY-DIVERT", "TPROXY-POST", "TPROXY-PRE"),
            ("-A PREROUTING -j TPROXY-PRE", "-A POSTROUTING -j TPROXY-POST"),
        ),
    )
    # The TPROXY *target* inside our chain is a rule of ours, not a hook.
    assert "-A TPROXY-PRE -i lan0 -p tcp -m tcp --dport 80 -j TPROXY" in excerpt
    assert "operator" not in excerpt and "1.2.3.4" not in excerpt and "*filter" not in excerpt
    assert "Generated" not in excerpt


def test_compose_replaces_hooks_and_drops_stale_chains() -> None:
    live, _ = parse_save(SAVED)
    text = compose(render_tables(minimal_plan(), 4), live)
    lines = text.splitlines()
    assert lines[0] == "*mangle"
    # Old hooks are deleted exactly as iptables-save printed them, before anything else.
    assert lines[1:3] == ["-D PREROUTING -j TPROXY-PRE", "-D POSTROUTING -j TPROXY-POST"]
    # TPROXY-POST is no longer wanted: declared (flushed) and then deleted.
    assert ":TPROXY-POST - [0:0]" in lines and "-X TPROXY-POST" in lines
    assert lines.index(":TPROXY-POST - [0:0]") < lines.index("-X TPROXY-POST")
    assert "-X TPROXY-PRE" not in lines and "-X TPROXY-DIVERT" not in lines
    assert lines[-2:] == ["-I PREROUTING 1 -j TPROXY-PRE", "COMMIT"]
    assert "operator" not in text and "eth9" not in text


def test_compose_flush_only_names_ours() -> None:
    live, _ = parse_save(SAVED)
    text = compose((), live)
    assert text.splitlines() == [
        "*mangle",
        "-D PREROUTING -j TPROXY-PRE",
        "-D POSTROUTING -j TPROXY-POST",
        ":TPROXY-DIVERT - [0:0]",
        ":TPROXY-POST - [0:0]",
        ":TPROXY-PRE - [0:0]",
        "-X TPROXY-DIVERT",
        "-X TPROXY-POST",
        "-X TPROXY-PRE",
        "COMMIT",
    ]
    assert compose((), ()) == ""


# -- error translation (stderr captured from iptables 1.8.9 nf_tables on this kernel) ----------

MISSING_KERNEL = (
    "Warning: Extension TPROXY revision 0 not supported, missing kernel module?\n"
    "iptables-restore v1.8.9 (nf_tables): \n"
    "line 3: RULE_APPEND failed (No such file or directory): rule in chain TPROXY-PRE\n"
)

MISSING_USERSPACE = """\
iptables-restore v1.8.9 (nf_tables): Couldn't load match `addrtype':No such file or directory

Error occurred at line: 3
Try `iptables-restore -h' or 'iptables-restore --help' for more information.
"""


def test_missing_kernel_feature_is_named_with_its_option() -> None:
    stdin = "*mangle\n:TPROXY-PRE - [0:0]\n-A TPROXY-PRE -p tcp -j TPROXY --on-port 1\nCOMMIT\n"
    msg = explain_failure("iptables-restore", 4, stdin, MISSING_KERNEL)
    assert msg == (
        "kernel lacks the TPROXY target (CONFIG_NETFILTER_XT_TARGET_TPROXY) for IPv4 rules"
    )
    msg = explain_failure("ip6tables-restore", 6, stdin, MISSING_USERSPACE)
    assert "kernel lacks the addrtype match (CONFIG_NETFILTER_XT_MATCH_ADDRTYPE)" in msg
    assert "\n" not in msg


def test_other_failures_quote_the_line() -> None:
    stdin = "*mangle\n:TPROXY-X - [0:0]\n-A TPROXY-X --bogus\nCOMMIT\n"
    stderr = (
        'iptables-restore v1.8.9 (nf_tables): unknown option "--bogus"\n'
        "Error occurred at line: 3\n"
        "Try `iptables-restore -h' or 'iptables-restore --help' for more information.\n"
    )
    msg = explain_failure("iptables-restore", 4, stdin, stderr)
    assert msg == (
        'iptables-restore failed at `-A TPROXY-X --bogus`: unknown option "--bogus" '
        "Error occurred at line: 3"
    )


# -- from the config --------------------------------------------------------------------------


def test_plan_from_config() -> None:
    cfg = config.parse(
        {
            "proxy": {"lan_interfaces": ["eth1"], "ports": [80, 8000], "listen_port": 4000},
            "rules": {"bypass_clients": ["10.0.0.9"], "fwmark": 0x100000, "fwmark_mask": 0x100000},
        }
    )
    plan = plan_from_config(cfg)
    assert plan.lan_interfaces == ("eth1",)
    assert plan.ports == (80, 8000) and plan.listen_port == 4000
    assert plan.fwmark == 0x100000 and plan.bypass_clients == (net("10.0.0.9/32"),)
    assert plan_from_config(cfg, ["br0", "br1"]).lan_interfaces == ("br0", "br1")
    extra = plan_from_config(cfg, https_ports=[443], nfqueue_num=2, quic_reject=True)
    assert "NFQUEUE --queue-num 2" in render(extra, 4)


def test_plan_from_config_errors() -> None:
    # Without LAN interfaces the plan is valid (flush needs its table and priority) but
    # intercepts nothing.
    assert not plan_from_config(config.parse({})).intercepts()
    # The config refuses reserved mark bits with the key's line (check-config sees it too);
    # the plan still refuses them for a config built some other way.
    with pytest.raises(config.ConfigError, match="overlaps the bits tproxy marks packets with"):
        config.parse({"proxy": {"lan_interfaces": ["eth1"]}, "rules": {"fwmark_mask": 0xFF}})
    cfg = config.parse({"proxy": {"lan_interfaces": ["eth1"]}})
    cfg = dataclasses.replace(cfg, rules=dataclasses.replace(cfg.rules, fwmark_mask=0xFF))
    with pytest.raises(config.ConfigError, match="overlaps the bits tproxy marks packets with"):
        plan_from_config(cfg)


def test_drain_plan_keeps_only_the_divert() -> None:
    """No ports: new connections are no longer diverted, flows we own still are."""
    plan = full_plan().draining()
    assert plan == dataclasses.replace(
        full_plan(), ports=(), https_ports=(), divert_ports=(80, 8080)
    )
    assert not plan.intercepts() and full_plan().intercepts()
    pre = rules_of(render(plan, 4), "TPROXY-PRE")
    assert not [r for r in pre if "-j TPROXY " in r or "-j NFQUEUE" in r]
    # Nothing is intercepted or queued any more, so no LOCAL test protects anything: the socket
    # divert of the open flows is all that is left (after the verdict bookkeeping).
    assert not [r for r in pre if "-m addrtype" in r]
    assert pre[-2:] == [
        "-A TPROXY-PRE -p tcp -m multiport --sports 80,8080 ! --syn -m socket --transparent "
        "-j TPROXY-DIVERT",
        "-A TPROXY-PRE -p tcp -m multiport --dports 80,8080 ! --syn -m socket --transparent "
        "-j TPROXY-DIVERT",
    ]
    # Decided HTTPS flows keep their verdict (resets keep resetting).
    assert any("--restore-mark" in r for r in pre)


def test_socket_divert_and_local_test_only_for_diverted_ports() -> None:
    """Forwarded TCP on other ports never pays the socket lookup nor the addrtype FIB lookup."""
    pre = rules_of(render(full_plan(), 4), "TPROXY-PRE")
    for rule in pre:
        if "-m socket" in rule:
            assert re.search(r"-p tcp -m multiport --[sd]ports 80,8080 ! --syn -m socket", rule)
        if "-m addrtype" in rule:
            # Destination ports that a rule below intercepts or queues: HTTPS too, so the
            # gateway's own HTTPS service is never queued for SNI.
            assert "-p tcp -m multiport --dports 80,443,8080 -m addrtype" in rule, rule
    # A plan that diverts nothing owns no flow: neither lookup is rendered.
    bare = rules_of(render(minimal_plan(ports=()), 4), "TPROXY-PRE")
    assert not [r for r in bare if "-m socket" in r or "-m addrtype" in r]


def test_divert_ports_split_at_the_multiport_limit() -> None:
    plan = minimal_plan(ports=tuple(range(1000, 1010)), divert_ports=tuple(range(1005, 1020)))
    assert plan.diverted_ports() == tuple(range(1000, 1020))
    pre = rules_of(render(plan, 4), "TPROXY-PRE")
    socket_rules = [r for r in pre if "-m socket" in r]
    local_rules = [r for r in pre if "-m addrtype" in r]
    # Two groups of at most 15 ports, for each side; the LOCAL test covers the intercepted
    # ports only (10 of them: one rule).
    assert len(socket_rules) == 4 and len(local_rules) == 1
    for side in ("sports", "dports"):
        listed = [
            p
            for r in socket_rules
            if f"--{side} " in r
            for p in r.split(f"--{side} ")[1].split()[0].split(",")
        ]
        assert sorted(map(int, listed)) == list(range(1000, 1020))
    assert "--dports 1000,1001,1002,1003,1004,1005,1006,1007,1008,1009 " in local_rules[0]
    # Every LOCAL test comes before every TPROXY rule.
    first_tproxy = next(i for i, r in enumerate(pre) if "-j TPROXY " in r)
    assert all(pre.index(r) < first_tproxy for r in local_rules)
    with pytest.raises(ValueError, match="not a TCP port"):
        minimal_plan(divert_ports=(0,))


def test_reload_keeps_the_divert_of_dropped_ports() -> None:
    old = minimal_plan(ports=(80, 8080))
    # Same ports: the plan is unchanged (a reload of an equal config changes no rule).
    assert minimal_plan(ports=(80, 8080)).keeping_divert(old) == old
    new = minimal_plan(ports=(80,)).keeping_divert(old)
    assert new.ports == (80,) and new.diverted_ports() == (80, 8080)
    pre = rules_of(render(new, 4), "TPROXY-PRE")
    assert (
        "-A TPROXY-PRE -p tcp -m multiport --sports 80,8080 ! --syn -m socket --transparent "
        "-j TPROXY-DIVERT" in pre
    )
    assert not [r for r in pre if "-j TPROXY " in r and "8080" in r]
    # Kept across a further reload, and through a drain.
    again = minimal_plan(ports=(81,)).keeping_divert(new)
    assert again.diverted_ports() == (80, 81, 8080)
    assert again.draining().diverted_ports() == (80, 81, 8080)
