"""Review of the HTB plan on the real kernel: what an operator's gateway does to interfaces.

One namespace per test holding veth pairs (both ends inside it); no traffic leaves it. The
kernel state is compared as ``tc`` prints it (qdisc, class lines), so a difference is shown
the way an operator would see it.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tproxy.shaping.apply import ShapingError, apply_plan, remove_plan, repair_plan, update_plan
from tproxy.shaping.model import ShapingClass, ShapingConfig, ShapingPlan, build_plan

pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(30),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


@dataclass
class Box:
    ns: str
    lan: str
    lan_peer: str
    wan: str
    wan_peer: str

    def ip(self, *argv: str, check: bool = True) -> None:
        subprocess.run(["ip", "-n", self.ns, *argv], check=check, capture_output=True)

    def tc(self, *argv: str, check: bool = True) -> str:
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns, "tc", *argv],
            check=check,
            capture_output=True,
            text=True,
        )
        return out.stdout

    def dump(self, iface: str) -> str:
        """qdiscs and classes without counters, sorted: equal dumps = equal kernel state."""
        lines = self.tc("qdisc", "show", "dev", iface).splitlines()
        lines += self.tc("class", "show", "dev", iface).splitlines()
        # HTB prints a live counter in its qdisc line (a stray IPv6 neighbour packet moves it).
        lines = [re.sub(r"direct_packets_stat \d+ ?", "", line) for line in lines]
        return "\n".join(sorted(line.strip() for line in lines if line.strip()))

    def add_pair(self, a: str, b: str) -> None:
        self.ip("link", "add", a, "type", "veth", "peer", "name", b)
        self.ip("link", "set", a, "up")
        self.ip("link", "set", b, "up")


@pytest.fixture
def box() -> Iterator[Box]:
    tag = secrets.token_hex(3)
    b = Box(f"tprs-{tag}", f"rl{tag}", f"rp{tag}", f"rw{tag}", f"rq{tag}")
    try:
        subprocess.run(["ip", "netns", "add", b.ns], check=True, capture_output=True)
        b.add_pair(b.lan, b.lan_peer)
        b.add_pair(b.wan, b.wan_peer)
        yield b
    finally:
        subprocess.run(["ip", "netns", "del", b.ns], check=False, capture_output=True)


def plan(box: Box, web: str = "4mbit", fair: bool = True) -> ShapingPlan:
    cfg = ShapingConfig(
        enabled=True,
        lan_interface_rate=100_000_000,
        wan_interface_rate=20_000_000,
        classes=(
            ShapingClass("web", rate=int(web.removesuffix("mbit")) * 1_000_000, prio=1),
            ShapingClass("bulk", rate=1_000_000, per_client_fair=fair, fair_slots=4),
        ),
        default_class="bulk" if not fair else "web",
    )
    return build_plan(cfg, [box.lan], [box.wan])


def test_apply_twice_gives_the_same_dump_and_no_actions(box: Box) -> None:
    p = plan(box)
    assert apply_plan(p, box.ns)
    first = (box.dump(box.lan), box.dump(box.wan))
    assert apply_plan(p, box.ns) == []
    assert update_plan(p, p, box.ns) == []
    assert (box.dump(box.lan), box.dump(box.wan)) == first
    assert first[0].count("class htb") == 1 + 2 + 4  # root, two classes, four fair leaves


def test_link_down_and_up_keeps_the_tree(box: Box) -> None:
    p = plan(box)
    apply_plan(p, box.ns)
    before = box.dump(box.lan)
    box.ip("link", "set", box.lan, "down")
    box.ip("link", "set", box.lan, "up")
    assert box.dump(box.lan) == before
    assert repair_plan(p, box.ns) == ([], [])


def test_a_recreated_interface_gets_its_tree_back(box: Box) -> None:
    p = plan(box)
    apply_plan(p, box.ns)
    before = box.dump(box.lan)
    wan_before = box.dump(box.wan)
    box.ip("link", "del", box.lan)  # takes the peer with it
    actions, problems = repair_plan(p, box.ns)
    assert actions == [] and problems == [f"interface {box.lan} not found"]
    box.add_pair(box.lan, box.lan_peer)
    assert "htb" not in box.dump(box.lan)  # the kernel's default qdisc: unshaped
    actions, problems = repair_plan(p, box.ns)
    assert problems == [] and actions and all(a.startswith(box.lan) for a in actions)
    assert box.dump(box.lan) == before
    assert box.dump(box.wan) == wan_before  # the other interface was not touched
    assert repair_plan(p, box.ns) == ([], [])


def test_an_operator_qdisc_is_never_replaced_and_named_clearly(box: Box) -> None:
    box.tc("qdisc", "add", "dev", box.lan, "root", "handle", "1:", "htb", "default", "30")
    operator = box.dump(box.lan)
    with pytest.raises(ShapingError) as info:
        apply_plan(plan(box), box.ns)
    text = str(info.value)
    assert box.lan in text and "htb 1:" in text and "not created by tproxy" in text
    assert box.dump(box.lan) == operator
    # The same while running: the repair reports it and leaves it alone.
    _actions, problems = repair_plan(plan(box), box.ns)
    assert len(problems) == 1 and "not created by tproxy" in problems[0]
    assert box.dump(box.lan) == operator
    assert remove_plan(plan(box), box.ns) == [box.wan]  # only what we installed
    assert box.dump(box.lan) == operator


def test_remove_leaves_the_operators_ingress_and_other_interfaces(box: Box) -> None:
    box.tc("qdisc", "add", "dev", box.lan, "ingress")
    box.tc("qdisc", "add", "dev", box.lan_peer, "root", "tbf", "rate", "1mbit", "burst",
           "10kb", "latency", "50ms")  # fmt: skip
    peer = box.dump(box.lan_peer)
    p = plan(box)
    apply_plan(p, box.ns)
    assert "ingress" in box.dump(box.lan)
    assert remove_plan(p, box.ns) == [box.lan, box.wan]
    lan = box.dump(box.lan)
    assert "htb" not in lan and "ingress" in lan
    assert box.dump(box.lan_peer) == peer
    assert remove_plan(p, box.ns) == []  # twice: nothing left of ours, no error


def test_reload_changes_rates_in_place_without_a_new_qdisc(box: Box) -> None:
    old, new = plan(box, "4mbit"), plan(box, "6mbit")
    apply_plan(old, box.ns)
    actions = update_plan(old, new, box.ns)
    # Only the changed class (on each interface), no qdisc replaced: queued packets survive.
    assert actions and all("change class" in a for a in actions), actions
    assert "rate 6Mbit" in box.dump(box.lan)
    assert apply_plan(new, box.ns) == []


# The component in the box's namespace (a child process: netlink sockets belong to the
# namespace of the process that opens them, and the component opens them in worker threads).
COMPONENT_SCRIPT = """
import asyncio, logging, subprocess, sys
from tproxy import config
from tproxy.shaping.component import ShapingComponent
lan, logfile = sys.argv[1], sys.argv[2]
logging.basicConfig(filename=logfile, level=logging.INFO, format="%(message)s")
config.load(None)
cfg = config.parse({"proxy": {"lan_interfaces": [lan]}, "shaping": {
    "enabled": True, "lan_interface_rate": "100mbit", "default_class": "a",
    "class": [{"name": "a", "rate": "2mbit"}]}})
comp = ShapingComponent(cfg)

async def main() -> None:
    await comp._apply(comp.plan.__class__(), comp.plan)
    assert comp.active, comp.error
    await comp.check_kernel()
    subprocess.run(["ip", "link", "del", lan], check=True)
    await comp.check_kernel()
    print("gone:", comp.error)
    await comp.check_kernel()  # the same problem again: logged once
    subprocess.run(["ip", "link", "add", lan, "type", "veth", "peer", "name", lan + "p"],
                   check=True)
    await comp.check_kernel()
    print("back:", comp.error)
    await comp.stop(None)

asyncio.run(main())
"""


def test_the_component_repairs_a_recreated_interface_and_logs_once(
    box: Box, tmp_path: os.PathLike[str]
) -> None:
    logfile = os.path.join(tmp_path, "log")
    out = subprocess.run(
        ["ip", "netns", "exec", box.ns, sys.executable, "-c", COMPONENT_SCRIPT, box.lan, logfile],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stderr
    assert f"gone: interface {box.lan} not found" in out.stdout
    assert "back: None" in out.stdout
    with open(logfile) as f:
        log = f.read()
    assert log.count(f"not shaping: interface {box.lan} not found") == 1
    assert f"re-applied the classes on {box.lan}" in log
    assert "htb" not in box.dump(box.lan)  # stop removed it
