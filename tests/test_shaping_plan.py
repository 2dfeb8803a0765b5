"""The [shaping] section and the HTB plan: pure, no kernel."""

# Golden texts are compared line for line; wrapping them would hide what tc receives.

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy import http1
from tproxy.config import ConfigError, ConfigErrors, load, parse
from tproxy.shaping.component import response_facts
from tproxy.shaping.model import (
    MARK_MASK,
    UNSHAPED_MARK,
    ClassCounters,
    FlowFacts,
    ShapingClass,
    ShapingConfig,
    ShapingPlan,
    ShapingSelector,
    build_plan,
    classify_rules,
    client_slot,
    fair_leaf_rate,
    format_show,
    mark_for,
    pacing_rate_bytes,
    render_plan,
    select_class,
)

EXAMPLE: dict[str, Any] = {
    "enabled": True,
    "lan_interface_rate": "100mbit",
    "wan_interface_rate": "20mbit",
    "default_class": "bulk",
    "class": [
        {"name": "web", "rate": "20mbit", "ceil": "80mbit", "prio": 1},
        {"name": "video", "rate": "30mbit", "per_connection_cap": "4mbit"},
        {
            "name": "hd",
            "parent": "video",
            "rate": "10mbit",
            "per_client_fair": True,
            "fair_slots": 4,
        },
        {"name": "bulk", "rate": "5mbit", "prio": 6},
    ],
    "select": [
        {"class": "hd", "content_type": "video/*", "min_response_size": "1MiB"},
        {"class": "web", "domains": ["Example.COM", ".wiki.org"], "group": "staff"},
        {"class": "bulk", "cache": "miss", "window": "night"},
    ],
}


# The client group and time window EXAMPLE's selectors name, defined where they live.
FILTER: dict[str, Any] = {
    "group": [{"name": "staff", "cidrs": ["10.0.1.0/24"]}],
    "window": [{"name": "night", "hours": "22:00-06:00"}],
}


def shaping(section: dict[str, Any]) -> ShapingConfig:
    load(None)  # registers every section, [filter] included
    cfg = parse({"shaping": section, "filter": FILTER}).sections["shaping"]
    assert isinstance(cfg, ShapingConfig)
    return cfg


def errors(section: dict[str, Any]) -> dict[str, str]:
    load(None)
    with pytest.raises(ConfigError) as info:
        parse({"shaping": section, "filter": FILTER})
    err = info.value
    found = err.errors if isinstance(err, ConfigErrors) else [err]
    return {e.key: e.reason for e in found}


def with_classes(*classes: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"enabled": True, "lan_interface_rate": "100mbit", "class": list(classes), **top}


# -- config ---------------------------------------------------------------------------------


def test_defaults_are_disabled_and_plan_empty() -> None:
    cfg = shaping({})
    assert cfg == ShapingConfig()
    assert not cfg.enabled and cfg.hits_unshaped
    assert build_plan(cfg, ["lan0"]) == ShapingPlan()


def test_example_parses() -> None:
    cfg = shaping(EXAMPLE)
    assert cfg.lan_interface_rate == 100_000_000
    assert cfg.wan_interface_rate == 20_000_000
    assert [c.name for c in cfg.classes] == ["web", "video", "hd", "bulk"]
    assert cfg.classes[0] == ShapingClass("web", 20_000_000, 80_000_000, 1)
    assert cfg.classes[1].ceil is None and cfg.classes[1].per_connection_cap == 4_000_000
    assert cfg.classes[2].parent == "video" and cfg.classes[2].fair_slots == 4
    assert cfg.selectors[0] == ShapingSelector(
        "hd", content_type="video/*", min_response_size=1 << 20
    )
    assert cfg.selectors[1].domains == ("example.com", "wiki.org")
    assert cfg.selectors[2].cache == "miss" and cfg.selectors[2].window == "night"
    assert cfg.default_class == "bulk"


@pytest.mark.parametrize(
    ("section", "key", "reason"),
    [
        (
            with_classes({"name": "a", "rate": "1mbit", "parent": "nope"}),
            "shaping.class[0].parent",
            "no class named 'nope'",
        ),
        (
            with_classes({"name": "a", "rate": "1mbit"}, {"name": "a", "rate": "2mbit"}),
            "shaping.class[1].name",
            "duplicate class name 'a' (see class[0])",
        ),
        (
            with_classes({"name": "a", "rate": "0mbit"}),
            "shaping.class[0].rate",
            "must be positive; got 0",
        ),
        (
            with_classes({"name": "a", "rate": -5}),
            "shaping.class[0].rate",
            "must be positive; got -5",
        ),
        (
            with_classes({"name": "a", "rate": "1mbit", "prio": 8}),
            "shaping.class[0].prio",
            "must be at most 7; got 8",
        ),
        (
            with_classes({"name": "a", "rate": "1mbit", "prio": -1}),
            "shaping.class[0].prio",
            "must be at least 0; got -1",
        ),
        (
            with_classes({"name": "a", "rate": "2mbit", "ceil": "1mbit"}),
            "shaping.class[0].ceil",
            "ceil 1mbit is below the class rate 2mbit",
        ),
        (
            with_classes({"name": "a"}),
            "shaping.class[0].rate",
            "a class needs a guaranteed rate",
        ),
        (
            with_classes({"name": "bad name", "rate": "1mbit"}),
            "shaping.class[0].name",
            "class name must match ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$; got 'bad name'",
        ),
        (
            with_classes({"name": "a", "rate": "1mbit", "fair_slots": 4}),
            "shaping.class[0].fair_slots",
            "only meaningful with per_client_fair = true",
        ),
        (
            with_classes({"name": "a", "rate": "1mbit", "per_client_fair": True, "fair_slots": 1}),
            "shaping.class[0].fair_slots",
            "must be at least 2; got 1",
        ),
        (
            with_classes({"name": "a", "rate": "1mbit", "colour": "red"}),
            "shaping.class[0].colour",
            "unknown key",
        ),
        (
            with_classes(
                {"name": "p", "rate": "10mbit", "ceil": "10mbit"},
                {"name": "x", "rate": "6mbit", "parent": "p"},
                {"name": "y", "rate": "5mbit", "parent": "p"},
            ),
            "shaping.class[0].rate",
            "guaranteed rates of x, y sum to 11mbit, more than 10mbit of class 'p'",
        ),
        (
            with_classes({"name": "a", "rate": "60mbit"}, {"name": "b", "rate": "50mbit"}),
            "shaping.lan_interface_rate",
            "guaranteed rates of a, b sum to 110mbit, more than 100mbit of the LAN link",
        ),
        (
            with_classes(
                {"name": "p", "rate": "10mbit", "ceil": "20mbit"},
                {"name": "x", "rate": "1mbit", "ceil": "30mbit", "parent": "p"},
            ),
            "shaping.class[1].ceil",
            "ceil 30mbit exceeds the ceil of class 'p' (20mbit)",
        ),
        (
            with_classes(
                {"name": "p", "rate": "10mbit", "ceil": "20mbit"},
                {"name": "x", "rate": "25mbit", "parent": "p"},
            ),
            "shaping.class[1].rate",
            "rate 25mbit exceeds the class ceil 20mbit",
        ),
        (
            with_classes(
                {"name": "p", "rate": "10mbit", "per_client_fair": True},
                {"name": "x", "rate": "1mbit", "parent": "p"},
            ),
            "shaping.class[0].per_client_fair",
            "a class with child classes cannot also split per client",
        ),
        (
            with_classes({"name": "a", "rate": "1mbit"}, default_class="b"),
            "shaping.default_class",
            "no class named 'b'",
        ),
        (
            with_classes(
                {"name": "p", "rate": "2mbit"},
                {"name": "x", "rate": "1mbit", "parent": "p"},
                default_class="p",
            ),
            "shaping.default_class",
            "class 'p' has child classes; name a leaf class",
        ),
        (
            with_classes(
                {"name": "f", "rate": "2mbit", "per_client_fair": True}, default_class="f"
            ),
            "shaping.default_class",
            "cannot be per_client_fair: unmarked traffic carries no client slot",
        ),
        (
            with_classes({"name": "a", "rate": "1mbit"}, select=[{"class": "zz"}]),
            "shaping.select[0].class",
            "no class named 'zz'",
        ),
        (
            with_classes(
                {"name": "p", "rate": "2mbit"},
                {"name": "x", "rate": "1mbit", "parent": "p"},
                select=[{"class": "x"}, {"class": "p"}],
            ),
            "shaping.select[1].class",
            "class 'p' has child classes; name a leaf class",
        ),
        (
            with_classes({"name": "a", "rate": "1mbit"}, select=[{"class": "a", "cache": "hit"}]),
            "shaping.select[0].cache",
            "cache hits are never shaped while hits_unshaped = true",
        ),
        (
            with_classes({"name": "a", "rate": "1mbit"}, select=[{"class": "a", "cache": "maybe"}]),
            "shaping.select[0].cache",
            "must be one of , hit, miss; got 'maybe'",
        ),
        (
            with_classes(
                {"name": "a", "rate": "1mbit"}, select=[{"class": "a", "content_type": "video"}]
            ),
            "shaping.select[0].content_type",
            'expected "type/subtype" or "type/*"; got \'video\'',
        ),
        (
            with_classes({"name": "a", "rate": "1mbit"}, select=[{"domains": ["a.org"]}]),
            "shaping.select[0].class",
            "a selector needs the name of the class it selects",
        ),
        (
            {"enabled": True, "wan_interface_rate": "fast"},
            "shaping.wan_interface_rate",
            'not a rate: \'fast\' (use e.g. "2mbit", "500kbit", "1mbps")',
        ),
    ],
)
def test_invalid_config_names_the_key(section: dict[str, Any], key: str, reason: str) -> None:
    assert errors(section) == {key: reason}


def test_cycles_are_reported_once_with_the_chain() -> None:
    found = errors(
        with_classes(
            {"name": "a", "rate": "1mbit", "parent": "c"},
            {"name": "b", "rate": "1mbit", "parent": "a"},
            {"name": "c", "rate": "1mbit", "parent": "b"},
            {"name": "s", "rate": "1mbit", "parent": "s"},
        )
    )
    assert found == {
        "shaping.class[0].parent": "parent chain forms a cycle: a → c → b → a",
        "shaping.class[3].parent": "parent chain forms a cycle: s → s",
    }


def test_nesting_depth_is_limited() -> None:
    chain = [{"name": "c0", "rate": "1mbit"}]
    chain += [{"name": f"c{i}", "rate": "1mbit", "parent": f"c{i - 1}"} for i in range(1, 7)]
    assert errors(with_classes(*chain)) == {
        "shaping.class[6].parent": "classes nest at most 6 deep"
    }


def test_error_carries_the_line() -> None:
    text = (
        '[shaping]\nenabled = true\n\n[[shaping.class]]\nname = "a"\nrate = "1mbit"\nparent = "x"\n'
    )
    import tomllib

    with pytest.raises(ConfigError) as info:
        parse(tomllib.loads(text), "t.toml", text)
    assert str(info.value) == "t.toml:7: shaping.class[0].parent: no class named 'x'"


# -- plan -----------------------------------------------------------------------------------

GOLDEN = """\
# CLASSIFY rules live in tproxy's mangle chain TPROXY-POST (from POSTROUTING), for iptables and ip6tables; `tproxy rules show` prints the whole chain
# lan0 (lan, link 100mbit)
tc qdisc replace dev lan0 root handle 1: htb default 400 r2q 29808
tc class replace dev lan0 parent 1: classid 1:1 htb rate 100000000bit ceil 100000000bit burst 62500b cburst 62500b quantum 200000 prio 0  # root
tc class replace dev lan0 parent 1:1 classid 1:100 htb rate 20000000bit ceil 80000000bit burst 12500b cburst 50000b quantum 200000 prio 1  # web mark 0x100
tc class replace dev lan0 parent 1:1 classid 1:200 htb rate 30000000bit ceil 100000000bit burst 18750b cburst 62500b quantum 200000 prio 3  # video
tc class replace dev lan0 parent 1:200 classid 1:300 htb rate 10000000bit ceil 100000000bit burst 6250b cburst 62500b quantum 125000 prio 3  # hd
tc class replace dev lan0 parent 1:300 classid 1:301 htb rate 2500000bit ceil 100000000bit burst 3028b cburst 62500b quantum 31250 prio 3  # hd#0 mark 0x300
tc class replace dev lan0 parent 1:300 classid 1:302 htb rate 2500000bit ceil 100000000bit burst 3028b cburst 62500b quantum 31250 prio 3  # hd#1 mark 0x10300
tc class replace dev lan0 parent 1:300 classid 1:303 htb rate 2500000bit ceil 100000000bit burst 3028b cburst 62500b quantum 31250 prio 3  # hd#2 mark 0x20300
tc class replace dev lan0 parent 1:300 classid 1:304 htb rate 2500000bit ceil 100000000bit burst 3028b cburst 62500b quantum 31250 prio 3  # hd#3 mark 0x30300
tc class replace dev lan0 parent 1:1 classid 1:400 htb rate 5000000bit ceil 100000000bit burst 3125b cburst 62500b quantum 62500 prio 6  # bulk mark 0x400
iptables -t mangle -A TPROXY-POST -o lan0 -m mark --mark 0x100/0xffff00 -j CLASSIFY --set-class 1:100
iptables -t mangle -A TPROXY-POST -o lan0 -m mark --mark 0x300/0xffff00 -j CLASSIFY --set-class 1:301
iptables -t mangle -A TPROXY-POST -o lan0 -m mark --mark 0x10300/0xffff00 -j CLASSIFY --set-class 1:302
iptables -t mangle -A TPROXY-POST -o lan0 -m mark --mark 0x20300/0xffff00 -j CLASSIFY --set-class 1:303
iptables -t mangle -A TPROXY-POST -o lan0 -m mark --mark 0x30300/0xffff00 -j CLASSIFY --set-class 1:304
iptables -t mangle -A TPROXY-POST -o lan0 -m mark --mark 0x400/0xffff00 -j CLASSIFY --set-class 1:400
iptables -t mangle -A TPROXY-POST -o lan0 -m mark --mark 0xff00/0xffff00 -j CLASSIFY --set-class 1:0
# wan0 (wan, link 20mbit)
tc qdisc replace dev wan0 root handle 1: htb default 400 r2q 29808
tc class replace dev wan0 parent 1: classid 1:1 htb rate 20000000bit ceil 20000000bit burst 12500b cburst 12500b quantum 200000 prio 0  # root
tc class replace dev wan0 parent 1:1 classid 1:100 htb rate 7272727bit ceil 20000000bit burst 4545b cburst 12500b quantum 90909 prio 1  # web mark 0x100
tc class replace dev wan0 parent 1:1 classid 1:200 htb rate 10909090bit ceil 20000000bit burst 6818b cburst 12500b quantum 136363 prio 3  # video
tc class replace dev wan0 parent 1:200 classid 1:300 htb rate 3636363bit ceil 20000000bit burst 3028b cburst 12500b quantum 45454 prio 3  # hd
tc class replace dev wan0 parent 1:300 classid 1:301 htb rate 909090bit ceil 20000000bit burst 3028b cburst 12500b quantum 11363 prio 3  # hd#0 mark 0x300
tc class replace dev wan0 parent 1:300 classid 1:302 htb rate 909090bit ceil 20000000bit burst 3028b cburst 12500b quantum 11363 prio 3  # hd#1 mark 0x10300
tc class replace dev wan0 parent 1:300 classid 1:303 htb rate 909090bit ceil 20000000bit burst 3028b cburst 12500b quantum 11363 prio 3  # hd#2 mark 0x20300
tc class replace dev wan0 parent 1:300 classid 1:304 htb rate 909090bit ceil 20000000bit burst 3028b cburst 12500b quantum 11363 prio 3  # hd#3 mark 0x30300
tc class replace dev wan0 parent 1:1 classid 1:400 htb rate 1818181bit ceil 20000000bit burst 3028b cburst 12500b quantum 22727 prio 6  # bulk mark 0x400
iptables -t mangle -A TPROXY-POST -o wan0 -m mark --mark 0x100/0xffff00 -j CLASSIFY --set-class 1:100
iptables -t mangle -A TPROXY-POST -o wan0 -m mark --mark 0x300/0xffff00 -j CLASSIFY --set-class 1:301
iptables -t mangle -A TPROXY-POST -o wan0 -m mark --mark 0x10300/0xffff00 -j CLASSIFY --set-class 1:302
iptables -t mangle -A TPROXY-POST -o wan0 -m mark --mark 0x20300/0xffff00 -j CLASSIFY --set-class 1:303
iptables -t mangle -A TPROXY-POST -o wan0 -m mark --mark 0x30300/0xffff00 -j CLASSIFY --set-class 1:304
iptables -t mangle -A TPROXY-POST -o wan0 -m mark --mark 0x400/0xffff00 -j CLASSIFY --set-class 1:400
iptables -t mangle -A TPROXY-POST -o wan0 -m mark --mark 0xff00/0xffff00 -j CLASSIFY --set-class 1:0
# per-connection caps (SO_MAX_PACING_RATE, bytes/s)
pacing video 500000
"""


def example_plan() -> ShapingPlan:
    return build_plan(shaping(EXAMPLE), ["lan0"], ["wan0"])


def test_render_plan_golden() -> None:
    assert render_plan(example_plan()) == GOLDEN


def test_wan_rates_scale_to_the_slower_link_keeping_ratios() -> None:
    lan, wan = example_plan().interfaces
    lan_rates = {c.name: c.rate for c in lan.classes}
    wan_rates = {c.name: c.rate for c in wan.classes}
    top = ("web", "video", "bulk")
    assert sum(wan_rates[n] for n in top) <= wan.link_rate
    for a in top:
        for b in top:
            assert abs(wan_rates[a] / wan_rates[b] - lan_rates[a] / lan_rates[b]) < 1e-3
    assert all(c.ceil <= wan.link_rate for c in wan.classes)


def test_default_class_and_no_default() -> None:
    assert example_plan().interfaces[0].default_minor == 0x400
    cfg = shaping(with_classes({"name": "a", "rate": "1mbit"}))
    assert build_plan(cfg, ["lan0"]).interfaces[0].default_minor == 0  # HTB direct: unshaped


def test_marks_rules_and_classes_agree() -> None:
    plan = example_plan()
    rules = classify_rules(plan)
    lan_rules = {mark: classid for mark, mask, iface, classid in rules if iface == "lan0"}
    assert all(mask == MARK_MASK for _, mask, _, _ in rules)
    assert len(lan_rules) == len([r for r in rules if r[2] == "lan0"])  # distinct marks
    assert mark_for(plan, "web") == 0x100 and mark_for(plan, "bulk") == 0x400
    assert lan_rules[mark_for(plan, "web")] == "1:100"
    assert lan_rules[mark_for(plan, None)] == "1:0" and mark_for(plan, None) == UNSHAPED_MARK
    # A fair class's client mark lands in that client's slot leaf.
    slot = client_slot("192.168.1.20", 4)
    assert lan_rules[mark_for(plan, "hd", "192.168.1.20")] == f"1:{0x301 + slot:x}"
    assert mark_for(plan, "hd") == 0x300  # no client known: slot 0
    # Inner classes take no mark: nothing may be queued in them.
    assert "1:200" not in lan_rules.values() and "1:300" not in lan_rules.values()
    with pytest.raises(KeyError):
        mark_for(plan, "nosuch")


def test_client_slot_is_stable_and_spreads() -> None:
    # CRC-32 of the packed address: fixed across runs and processes (hash() is salted).
    # Pinned values: a change would silently move every client to another slot on upgrade,
    # and the NFQUEUE handler and the daemon must agree.
    assert client_slot("10.0.0.1", 16) == 14
    assert client_slot("fd00::1234", 7) == 6  # the whole address (test_review_shaping_config)
    lan = ipaddress.ip_network("192.168.1.0/24")
    used = {client_slot(str(h), 16) for h in list(lan.hosts())[:64]}
    assert len(used) >= 12  # 64 clients cover most of 16 slots


def test_fair_leaves_share_the_class_equally() -> None:
    lan = example_plan().interfaces[0]
    leaves = [c for c in lan.classes if c.name.startswith("hd#")]
    hd = next(c for c in lan.classes if c.name == "hd")
    assert len(leaves) == 4
    assert {(c.rate, c.ceil, c.quantum, c.prio) for c in leaves} == {(2_500_000, hd.ceil, 31250, 3)}
    assert sum(c.rate for c in leaves) <= hd.rate
    assert all(c.parent == hd.classid for c in leaves)
    assert fair_leaf_rate(10_000, 16) == 8_000  # floor at MIN_RATE


def test_pacing() -> None:
    assert pacing_rate_bytes(ShapingClass("a", 1_000_000, per_connection_cap=2_000_000)) == 250_000
    assert pacing_rate_bytes(ShapingClass("a", 1_000_000)) is None
    assert example_plan().pacing == {"video": 500_000}


def test_marks_keep_clear_of_the_tproxy_divert_bits() -> None:
    for mark, _, _, _ in classify_rules(example_plan()):
        assert mark & 0xFF == 0


# -- selection ------------------------------------------------------------------------------


def test_select_class() -> None:
    cfg = shaping(EXAMPLE)
    assert select_class(cfg, FlowFacts(content_type="video/mp4", response_size=2 << 20)) == "hd"
    # Not known yet, or too small: the next selector, then the default.
    assert select_class(cfg, FlowFacts(content_type="video/mp4")) == "bulk"
    assert select_class(cfg, FlowFacts(content_type="text/html", response_size=9 << 20)) == "bulk"
    assert (
        select_class(cfg, FlowFacts(host="www.example.com", groups=frozenset({"staff"}))) == "web"
    )
    assert select_class(cfg, FlowFacts(host="example.com.", groups=frozenset({"staff"}))) == "web"
    assert (
        select_class(cfg, FlowFacts(host="notexample.com", groups=frozenset({"staff"}))) == "bulk"
    )
    assert select_class(cfg, FlowFacts(host="example.com")) == "bulk"  # not in group
    night = FlowFacts(cache="miss", windows=frozenset({"night"}))
    assert select_class(cfg, night) == "bulk"
    # Cache hits are never shaped, whatever else matches.
    hit = FlowFacts(content_type="video/mp4", response_size=9 << 20, cache="hit")
    assert select_class(cfg, hit) is None
    shaped_hits = ShapingConfig(
        enabled=True,
        classes=(ShapingClass("h", 1_000_000),),
        selectors=(ShapingSelector("h", cache="hit"),),
        hits_unshaped=False,
    )
    assert select_class(shaped_hits, FlowFacts(cache="hit")) == "h"
    assert select_class(shaped_hits, FlowFacts(cache="miss")) is None
    url = ShapingConfig(selectors=(ShapingSelector("u", url_prefix="http://a.org/big/"),))
    assert select_class(url, FlowFacts(url="http://a.org/big/x.iso")) == "u"
    assert select_class(url, FlowFacts(url="http://a.org/small")) is None


def test_a_content_type_header_selects_by_its_media_type() -> None:
    # response_facts reduces the header to its media type (tproxy.uri.media_type), which is
    # all select_class compares: parameters and letter case do not change the class.
    cfg = shaping(EXAMPLE)
    for value in (b"Video/MP4; codecs=x", b"video/webm", b" VIDEO/mp4 ;q=1"):
        head = http1.ResponseHead(
            status=200,
            reason=b"OK",
            version=b"1.1",
            headers=[(b"Content-Type", value), (b"Content-Length", b"3000000")],
            keep_alive=True,
            body_kind=http1.BodyKind.LENGTH,
            content_length=3_000_000,
            connection=frozenset(),
        )
        facts = response_facts(FlowFacts(), head, hit=False)
        assert facts.content_type is not None and facts.content_type.startswith("video/")
        assert select_class(cfg, facts) == "hd", value
    plain = http1.ResponseHead(
        200, b"OK", b"1.1", [], True, http1.BodyKind.LENGTH, 3_000_000, frozenset()
    )
    assert response_facts(FlowFacts(), plain, hit=False).content_type is None
    assert select_class(cfg, response_facts(FlowFacts(), plain, hit=False)) == "bulk"


# -- show -----------------------------------------------------------------------------------


def test_format_show() -> None:
    plan = build_plan(
        shaping(
            with_classes(
                {"name": "web", "rate": "2mbit"},
                {"name": "f", "rate": "4mbit", "per_client_fair": True, "fair_slots": 2},
            )
        ),
        ["lan0"],
    )
    counters = {
        ("lan0", 0x10100): ClassCounters(1_000_000, 700, 3, 9, 1_950_000.0),
        ("lan0", 0x10202): ClassCounters(5000, 4, 0, 0, None),
        ("lan0", 0x10000): ClassCounters(0, 12, 0, 0),
    }
    assert format_show(plan, counters) == (
        "lan0 (lan, link 100mbit)\n"
        "class                classid       rate      ceil         sent      pkts   drops        now\n"
        "(root)               1:1        100mbit   100mbit            -         -       -          -\n"
        "  web                1:100        2mbit   100mbit     1000000B       700       3   1.95mbit\n"
        "  f                  1:200        4mbit   100mbit            -         -       -          -\n"
        "    f#1              1:202        2mbit   100mbit        5000B         4       0          -\n"
        "(unshaped)           1:0              -         -            -        12\n"
    )
    assert format_show(ShapingPlan(), {}) == "shaping disabled\n"


# -- properties -----------------------------------------------------------------------------


@st.composite
def class_trees(draw: st.DrawFn) -> ShapingConfig:
    n = draw(st.integers(1, 12))
    classes: list[ShapingClass] = []
    for i in range(n):
        parent = draw(st.sampled_from([None, *[c.name for c in classes if not c.per_client_fair]]))
        fair = draw(st.booleans())
        classes.append(
            ShapingClass(
                name=f"c{i}",
                rate=draw(st.integers(8_000, 50_000_000)),
                prio=draw(st.integers(0, 7)),
                parent=parent,
                per_client_fair=fair,
                fair_slots=draw(st.integers(2, 20)),
            )
        )
    # per_client_fair only on classes without children (the config rejects the others).
    parents = {c.parent for c in classes}
    classes = [
        ShapingClass(
            c.name,
            c.rate,
            None,
            c.prio,
            c.parent,
            c.per_client_fair and c.name not in parents,
            c.fair_slots,
        )
        for c in classes
    ]
    return ShapingConfig(
        enabled=True,
        lan_interface_rate=10_000_000_000,
        wan_interface_rate=draw(st.integers(1_000_000, 10_000_000_000)),
        classes=tuple(classes),
    )


@settings(max_examples=60, deadline=None)
@given(class_trees())
def test_plan_invariants(cfg: ShapingConfig) -> None:
    plan = build_plan(cfg, ["lan0"], ["wan0"])
    for ip in plan.interfaces:
        seen: set[int] = {0x10000}
        depth = {0x10000: 0}
        for rec in ip.classes:
            assert rec.parent in seen, "parents precede children"
            assert rec.classid not in seen, "class ids are unique"
            seen.add(rec.classid)
            depth[rec.classid] = depth[rec.parent] + 1
            assert depth[rec.classid] <= 8  # TC_HTB_MAXDEPTH
            assert 8_000 <= rec.rate <= rec.ceil <= ip.link_rate
            assert rec.burst >= 3028 and rec.quantum >= 1514
        has_children = {rec.parent for rec in ip.classes}
        leaves = [rec for rec in ip.classes if rec.classid not in has_children and rec.name]
        assert all(rec.mark is not None for rec in leaves)
        assert all(rec.mark is None for rec in ip.classes if rec.classid in has_children)
        marks = [rec.mark for rec in leaves]
        assert len(set(marks)) == len(marks)
    rules = classify_rules(plan)
    for c in cfg.classes:
        if c.name in {x.parent for x in cfg.classes}:
            continue
        for client in ("10.0.0.1", "10.0.0.2", "fd00::9"):
            mark = mark_for(plan, c.name, client)
            assert (
                sum(1 for m, mask, iface, _ in rules if iface == "lan0" and mark & mask == m) == 1
            )
