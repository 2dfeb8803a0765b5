"""Review of the [shaping] section and the pure plan, as an admin replacing Squid delay pools.

Each case is a config an operator could plausibly write; the answer must be one clear error
naming the key, or a plan that does what the config says.
"""

from __future__ import annotations

from typing import Any

import pytest

from tproxy import config
from tproxy.config import ConfigError, ConfigErrors
from tproxy.shaping.model import (
    MAX_CLASSES,
    MIN_RATE,
    FlowFacts,
    ShapingConfig,
    build_plan,
    client_slot,
    mark_for,
    select_class,
)

BASE: dict[str, Any] = {"enabled": True, "lan_interface_rate": "10mbit"}


def parse(table: dict[str, Any]) -> ShapingConfig:
    config.load(None)  # registers the feature sections
    result: ShapingConfig = config.parse({"shaping": table}).sections["shaping"]
    return result


def error_of(table: dict[str, Any]) -> str:
    with pytest.raises((ConfigError, ConfigErrors)) as info:
        parse(table)
    return str(info.value)


# -- what was already right (kept as regression tests) ------------------------------------------


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ({"class": [{"name": "a", "rate": "20mbit"}]}, "class[0].rate", "exceeds"),
        ({"class": [{"name": "a", "rate": "2mbit", "ceil": "20mbit"}]}, "class[0].ceil", "exceeds"),
        ({"class": [{"name": "a", "rate": "2mbit", "ceil": "1mbit"}]}, "class[0].ceil", "below"),
        ({"class": [{"name": "a", "rate": "0mbit"}]}, "class[0].rate", "positive"),
        ({"class": [{"name": "a", "rate": -5}]}, "class[0].rate", "positive"),
        ({"class": [{"name": "a", "rate": "1mbit", "ceil": 0}]}, "class[0].ceil", "positive"),
        ({"lan_interface_rate": 0}, "lan_interface_rate", "positive"),
        (
            {"class": [{"name": "a", "rate": "6mbit"}, {"name": "b", "rate": "6mbit"}]},
            "lan_interface_rate",
            "sum to 12mbit",
        ),
        (
            {"class": [{"name": "a", "rate": "1mbit"}, {"name": "a", "rate": "1mbit"}]},
            "class[1].name",
            "duplicate",
        ),
        (
            {"class": [{"name": "a", "rate": "1mbit"}], "select": [{"class": "zz"}]},
            "select[0].class",
            "no class named 'zz'",
        ),
        (
            {"class": [{"name": "a", "rate": "1mbit"}], "default_class": "zz"},
            "default_class",
            "no class named 'zz'",
        ),
        ({"default_class": "zz"}, "default_class", "no class named"),
        (
            {
                "lan_interface_rate": "10gbit",
                "class": [{"name": f"c{i}", "rate": "10kbit"} for i in range(MAX_CLASSES + 1)],
            },
            "shaping.class",
            f"at most {MAX_CLASSES}",
        ),
    ],
)
def test_operator_mistakes_are_one_error_naming_the_key(
    extra: dict[str, Any], key: str, words: str
) -> None:
    text = error_of({**BASE, **extra})
    assert key in text and words in text


def test_the_largest_class_count_builds_distinct_marks_and_classids() -> None:
    classes = [{"name": f"c{i}", "rate": "10kbit"} for i in range(MAX_CLASSES)]
    cfg = parse({**BASE, "lan_interface_rate": "10gbit", "class": classes})
    plan = build_plan(cfg, ["lan0"])
    ids = [rec.classid for rec in plan.interfaces[0].classes]
    marks = {mark_for(plan, f"c{i}") for i in range(MAX_CLASSES)}
    assert len(ids) == len(set(ids)) == MAX_CLASSES + 1  # + the root
    assert len(marks) == MAX_CLASSES and mark_for(plan, None) not in marks


def test_ipv6_group_cidrs_select_classes() -> None:
    import ipaddress

    from tproxy.shaping.component import Clients

    clients = Clients(groups=(("kids", (ipaddress.ip_network("2001:db8:1::/48"),)),))
    assert clients.groups_of("2001:db8:1:2::99") == {"kids"}
    assert clients.groups_of("2001:db8:2::1") == {"default"}
    assert clients.groups_of("fe80::1%eth0") == {"default"}


# -- defects found --------------------------------------------------------------------------------


def test_fair_slot_is_the_same_for_a_mapped_and_a_plain_ipv4_client() -> None:
    # The daemon on a dual-stack socket sees ::ffff:a.b.c.d, the NFQUEUE handler a.b.c.d: the
    # same client must land in the same leaf for HTTP and HTTPS.
    for last in range(1, 40):
        assert client_slot(f"::ffff:10.0.0.{last}", 16) == client_slot(f"10.0.0.{last}", 16)


def test_fair_slots_spread_the_ipv6_hosts_of_one_lan_segment() -> None:
    # All hosts of a LAN segment are in its one /64 (SLAAC): hashed by the /64 they all shared
    # one slot, and fairness between them was none.
    slots = {client_slot(f"2001:db8:0:7::{i:x}", 16) for i in range(1, 200)}
    assert len(slots) > 8
    assert client_slot("::ffff:10.0.0.5", 16) == client_slot("10.0.0.5", 16)


def test_per_connection_cap_below_the_minimum_rate_is_refused() -> None:
    # 1bit would pace at 1 byte/s: a connection that never finishes, not a cap.
    text = error_of({**BASE, "class": [{"name": "a", "rate": "1mbit", "per_connection_cap": 8}]})
    assert "class[0].per_connection_cap" in text and "at least" in text


def test_link_rate_below_the_minimum_rate_is_refused() -> None:
    text = error_of({**BASE, "lan_interface_rate": "1kbit"})
    assert "lan_interface_rate" in text and "at least" in text


def test_fair_slots_that_cannot_each_get_the_minimum_rate_are_refused() -> None:
    # 1mbit over 255 slots is 3.9kbit a slot; HTB would get 255 x 8kbit = 2mbit of guarantees
    # under a 1mbit parent and silently over-commit it.
    table = {"name": "a", "rate": "1mbit", "per_client_fair": True, "fair_slots": 255}
    text = error_of({**BASE, "class": [table]})
    assert "class[0].fair_slots" in text and str(MIN_RATE // 1000) in text


def test_selector_without_criteria_catches_everything_like_a_default() -> None:
    cfg = parse({**BASE, "class": [{"name": "a", "rate": "1mbit"}], "select": [{"class": "a"}]})
    assert select_class(cfg, FlowFacts(host="x.org", cache="miss")) == "a"


def test_metrics_publish_each_class_with_its_interface_and_name() -> None:
    # The README promises shaping figures in /metrics; per-class counters are lists in the
    # status, which the generic flattening skips, so the component publishes them labelled.
    from tproxy.shaping.component import ShapingComponent
    from tproxy.shaping.model import ClassCounters

    config.load(None)
    cfg = config.parse(
        {
            "proxy": {"lan_interfaces": ["eth1"]},
            "shaping": {
                **BASE,
                "class": [{"name": "web", "rate": "4mbit"}, {"name": "kids", "rate": "2mbit"}],
            },
        }
    )
    comp = ShapingComponent(cfg)
    ip = comp.plan.interfaces[0]
    web = next(rec for rec in ip.classes if rec.name == "web")
    comp.counters = {(ip.iface, web.classid): ClassCounters(1500, 3, 1, 0, 8000.0)}
    comp.marked = 7
    families = {f.name: f for f in comp.metrics()}
    assert [s.value for s in families["tproxy_shaping_requests_marked"].samples] == [7]
    assert families["tproxy_shaping_requests_marked"].type == "counter"
    samples = {
        (s.name, s.labels["interface"], s.labels["class"]): s.value
        for key in ("bytes", "packets", "drops", "rate_bps")
        for s in families[f"tproxy_shaping_class_{key}"].samples
    }
    assert samples[("tproxy_shaping_class_bytes_total", "eth1", "web")] == 1500
    assert samples[("tproxy_shaping_class_drops_total", "eth1", "web")] == 1
    assert samples[("tproxy_shaping_class_rate_bps", "eth1", "web")] == 8000.0
    assert ("tproxy_shaping_class_bytes_total", "eth1", "kids") not in samples  # no counters yet


def test_selectors_name_groups_and_windows_that_exist_and_that_shaping_can_see() -> None:
    config.load(None)

    def errs(shaping: dict[str, Any], filt: dict[str, Any], lan: list[str] | None = None) -> str:
        data: dict[str, Any] = {"shaping": shaping, "filter": filt}
        if lan is not None:
            data["proxy"] = {"lan_interfaces": lan}
        with pytest.raises((ConfigError, ConfigErrors)) as info:
            config.parse(data)
        return str(info.value)

    classes = {**BASE, "class": [{"name": "a", "rate": "1mbit"}]}
    text = errs({**classes, "select": [{"class": "a", "group": "kisd"}]}, {})
    assert "shaping.select[0].group: no [[filter.group]] named 'kisd'" in text
    text = errs({**classes, "select": [{"class": "a", "window": "nite"}]}, {})
    assert "shaping.select[0].window: no [[filter.window]] named 'nite'" in text
    # The filter finds MAC groups through the neighbour table; shaping marks by address only.
    macs = {"group": [{"name": "kids", "macs": ["02:00:00:00:00:01"]}]}
    text = errs({**classes, "select": [{"class": "a", "group": "kids"}]}, macs)
    assert "shaping.select[0].group: group 'kids' has only macs, which shaping cannot see" in text
    # A wildcard LAN interface has no HTB tree: with only wildcards, downloads would silently
    # go unshaped.
    assert "shaping needs a named LAN interface" in errs(classes, {}, ["br+"])
    # Named interfaces beside a wildcard are shaped; a group with cidrs too is selected by them.
    both = {"group": [{"name": "kids", "cidrs": ["10.0.0.0/24"], "macs": ["02:00:00:00:00:01"]}]}
    ok = config.parse(
        {
            "proxy": {"lan_interfaces": ["eth1", "wg+"]},
            "shaping": {**classes, "select": [{"class": "a", "group": "kids"}]},
            "filter": both,
        }
    )
    assert ok.sections["shaping"].selectors[0].group == "kids"


def test_children_are_held_to_their_parents_guaranteed_rate_not_its_ceiling() -> None:
    text = error_of(
        {
            **BASE,
            "class": [
                {"name": "p", "rate": "5mbit", "ceil": "10mbit"},
                {"name": "x", "rate": "3mbit", "parent": "p"},
                {"name": "y", "rate": "3mbit", "parent": "p"},
            ],
        }
    )
    assert "class[0].rate" in text and "sum to 6mbit, more than 5mbit of class 'p'" in text
