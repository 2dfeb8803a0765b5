"""HTB shaping on the real kernel: two namespaces joined by a veth, TCP from A to B.

The sender's socket carries SO_MARK; a CLASSIFY rule in A's mangle POSTROUTING (in a chain of
this test) steers the mark into the class, exactly as the daemon's rules will. Rates are
measured at the receiver. Namespaces are unique per test and deleted in teardown, which also
takes the veth, the qdiscs and the iptables rules with them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tproxy.shaping.apply import (
    ShapingError,
    apply_plan,
    mark_socket,
    read_counters,
    remove_everywhere,
    remove_plan,
    translate_error,
    update_plan,
)
from tproxy.shaping.model import (
    ShapingClass,
    ShapingConfig,
    ShapingPlan,
    build_plan,
    classify_rules,
    client_slot,
    format_show,
    mark_for,
)

pytestmark = [
    pytest.mark.lab,
    pytest.mark.timeout(30),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

CLONE_NEWNET = 0x40000000
ADDR_A, ADDR_B = "10.213.0.1", "10.213.0.2"
PORT = 5201
CHUNK = 64 * 1024
WARMUP = 0.6  # s: let the queue fill and TCP settle before measuring
WINDOW = 2.5  # s of measurement
TOLERANCE = 0.10
# HTB counts whole frames (qdisc_pkt_len: Ethernet + IP + TCP headers) while the receiver counts
# payload: 1448 of every 1514 bytes with timestamps on (measured 3.84 Mbit/s for a 4mbit class).
GOODPUT = 1448 / 1514
CONNECT_TIMEOUT = 5.0

_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body in namespace ``name`` (this thread only, setns(2)); sockets created here
    stay in it after we switch back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(home)


@dataclass
class Pair:
    ns_a: str
    ns_b: str
    if_a: str
    if_b: str
    chain: str

    def run(self, ns: str, *argv: str) -> None:
        subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True)

    def add_classify(self, plan: ShapingPlan) -> None:
        """Our own mangle chain in A with the plan's CLASSIFY rules for A's interface."""
        ipt = ("iptables", "-w", "-t", "mangle")
        self.run(self.ns_a, *ipt, "-N", self.chain)
        self.run(self.ns_a, *ipt, "-A", "POSTROUTING", "-j", self.chain)
        for mark, mask, iface, classid in classify_rules(plan):
            if iface == self.if_a:
                self.run(
                    self.ns_a, *ipt, "-A", self.chain, "-o", iface,
                    "-m", "mark", "--mark", f"{mark:#x}/{mask:#x}",
                    "-j", "CLASSIFY", "--set-class", classid,
                )  # fmt: skip


@pytest.fixture
def pair() -> Iterator[Pair]:
    tag = secrets.token_hex(3)
    p = Pair(f"tpsh-{tag}-a", f"tpsh-{tag}-b", f"tsa{tag}", f"tsb{tag}", f"TPSH{tag}")
    lines = [
        f"netns add {p.ns_a}",
        f"netns add {p.ns_b}",
        f"link add {p.if_a} netns {p.ns_a} type veth peer name {p.if_b} netns {p.ns_b}",
        f"-n {p.ns_a} addr add {ADDR_A}/24 dev {p.if_a}",
        f"-n {p.ns_b} addr add {ADDR_B}/24 dev {p.if_b}",
        f"-n {p.ns_a} link set {p.if_a} up",
        f"-n {p.ns_b} link set {p.if_b} up",
        f"-n {p.ns_a} link set lo up",
        f"-n {p.ns_b} link set lo up",
    ]
    try:
        for line in lines:
            subprocess.run(["ip", *line.split()], check=True, capture_output=True)
        yield p
    finally:
        for ns in (p.ns_a, p.ns_b):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@dataclass
class Flow:
    """One TCP transfer A → B on its own threads; ``received`` counts bytes at B."""

    sender: socket.socket
    conn: socket.socket
    received: int = 0
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def _send(self) -> None:
        data = b"x" * CHUNK
        try:
            while not self.stop.is_set():
                self.sender.sendall(data)
        except OSError as exc:
            if not self.stop.is_set():
                self.error = exc

    def _recv(self) -> None:
        try:
            while True:
                chunk = self.conn.recv(1 << 18)
                if not chunk:
                    return
                self.received += len(chunk)
        except OSError as exc:
            if not self.stop.is_set():
                self.error = exc

    def start(self) -> None:
        for fn in (self._send, self._recv):
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self.threads.append(t)

    def rate_bps(self, window: float = WINDOW) -> float:
        b0, t0 = self.received, time.monotonic()
        time.sleep(window)
        return (self.received - b0) * 8 / (time.monotonic() - t0)

    def close(self) -> None:
        self.stop.set()
        for s in (self.sender, self.conn):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self.threads:
            t.join(timeout=2)
        for s in (self.sender, self.conn):
            s.close()


@contextlib.contextmanager
def flows(
    pair: Pair, marks: list[int], sender_class: tuple[ShapingPlan, str] | None = None
) -> Iterator[list[Flow]]:
    """Start one transfer per mark (SO_MARK on the sender socket) and stop them all after."""
    with in_netns(pair.ns_b):
        listener = socket.create_server((ADDR_B, PORT), backlog=len(marks))
    listener.settimeout(CONNECT_TIMEOUT)
    started: list[Flow] = []
    try:
        for mark in marks:
            with in_netns(pair.ns_a):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            if sender_class is not None:
                mark_socket(s, *sender_class)
            s.settimeout(CONNECT_TIMEOUT)
            s.connect((ADDR_B, PORT))
            s.settimeout(None)
            conn, _ = listener.accept()
            f = Flow(s, conn)
            started.append(f)
            f.start()
        time.sleep(WARMUP)
        yield started
    finally:
        for f in started:
            f.close()
        listener.close()


def plan_for(pair: Pair, *classes: ShapingClass, default: str | None = None) -> ShapingPlan:
    cfg = ShapingConfig(
        enabled=True,
        lan_interface_rate=1_000_000_000,
        classes=tuple(classes),
        default_class=default,
    )
    return build_plan(cfg, [pair.if_a])


def assert_rate(measured: float, want: float) -> None:
    assert abs(measured - want) <= TOLERANCE * want, (
        f"{measured / 1e6:.3f} Mbit/s, want {want / 1e6:.3f}"
    )


def assert_class_rate(measured: float, rate: float) -> None:
    assert_rate(measured, rate * GOODPUT)


def root_qdisc(pair: Pair) -> tuple[str, int]:
    with IPRoute(netns=pair.ns_a, flags=0) as ipr:
        index = ipr.link_lookup(ifname=pair.if_a)[0]
        for q in ipr.get_qdiscs(index=index):
            if q["parent"] == 0xFFFFFFFF:
                return str(q.get_attr("TCA_KIND")), int(q["handle"])
    raise AssertionError("no root qdisc")


def test_class_rate_is_enforced(pair: Pair) -> None:
    plan = plan_for(pair, ShapingClass("slow", rate=2_000_000, ceil=2_000_000))
    apply_plan(plan, pair.ns_a)
    pair.add_classify(plan)
    with flows(pair, [mark_for(plan, "slow")]) as (flow,):
        assert_class_rate(flow.rate_bps(), 2_000_000)
        assert flow.error is None
    counters = read_counters([pair.if_a], pair.ns_a)
    slow = plan.interfaces[0].classes[1]
    assert counters[(pair.if_a, slow.classid)].bytes > 500_000
    assert "slow" in format_show(plan, counters)


def test_two_marks_two_rates_at_once(pair: Pair) -> None:
    plan = plan_for(
        pair,
        ShapingClass("two", rate=2_000_000, ceil=2_000_000),
        ShapingClass("four", rate=4_000_000, ceil=4_000_000),
    )
    apply_plan(plan, pair.ns_a)
    pair.add_classify(plan)
    with flows(pair, [mark_for(plan, "two"), mark_for(plan, "four")]) as (a, b):
        b0a, b0b, t0 = a.received, b.received, time.monotonic()
        time.sleep(WINDOW)
        dt = time.monotonic() - t0
        assert_class_rate((a.received - b0a) * 8 / dt, 2_000_000)
        assert_class_rate((b.received - b0b) * 8 / dt, 4_000_000)


def test_update_changes_running_transfer(pair: Pair) -> None:
    old = plan_for(pair, ShapingClass("c", rate=2_000_000, ceil=2_000_000))
    new = plan_for(pair, ShapingClass("c", rate=4_000_000, ceil=4_000_000))
    apply_plan(old, pair.ns_a)
    pair.add_classify(old)
    with flows(pair, [mark_for(old, "c")]) as (flow,):
        assert_class_rate(flow.rate_bps(2.0), 2_000_000)
        actions = update_plan(old, new, pair.ns_a)
        assert actions == [f"{pair.if_a}: change class 1:100 c"]  # in place: no new qdisc
        time.sleep(0.3)
        assert_class_rate(flow.rate_bps(2.0), 4_000_000)
        assert flow.error is None


def test_apply_twice_is_idempotent_and_remove_leaves_nothing(pair: Pair) -> None:
    plan = plan_for(
        pair,
        ShapingClass("web", rate=20_000_000, ceil=80_000_000, prio=1),
        ShapingClass("video", rate=30_000_000),
        ShapingClass("hd", rate=10_000_000, parent="video", per_client_fair=True, fair_slots=4),
        ShapingClass("bulk", rate=5_000_000),
        default="bulk",
    )
    first = apply_plan(plan, pair.ns_a)
    assert len(first) == 1 + len(plan.interfaces[0].classes)
    assert apply_plan(plan, pair.ns_a) == []
    # A class deleted by hand is repaired, nothing else is touched.
    pair.run(pair.ns_a, "tc", "class", "del", "dev", pair.if_a, "classid", "1:304")
    assert apply_plan(plan, pair.ns_a) == [f"{pair.if_a}: add class 1:304 hd#3"]
    # A vanished class and a moved class.
    smaller = plan_for(
        pair,
        ShapingClass("web", rate=20_000_000, ceil=80_000_000, prio=1),
        ShapingClass("video", rate=30_000_000),
        ShapingClass("hd", rate=10_000_000),
        ShapingClass("bulk", rate=5_000_000),
        default="bulk",
    )
    actions = update_plan(plan, smaller, pair.ns_a)
    assert f"{pair.if_a}: del class 1:300" in actions
    assert f"{pair.if_a}: add class 1:300 hd" in actions
    assert apply_plan(smaller, pair.ns_a) == []
    assert root_qdisc(pair) == ("htb", 0x10000)
    # HTB cannot change its default class in place: the tree is rebuilt.
    other_default = plan_for(
        pair,
        ShapingClass("web", rate=20_000_000, ceil=80_000_000, prio=1),
        ShapingClass("video", rate=30_000_000),
        ShapingClass("hd", rate=10_000_000),
        ShapingClass("bulk", rate=5_000_000),
        default="web",
    )
    actions = update_plan(smaller, other_default, pair.ns_a)
    assert actions[:2] == [f"{pair.if_a}: del qdisc 1:", f"{pair.if_a}: qdisc htb 1: default 100"]
    assert len(actions) == 2 + len(other_default.interfaces[0].classes)
    assert apply_plan(other_default, pair.ns_a) == []
    assert remove_plan(other_default, pair.ns_a) == [pair.if_a]
    kind, handle = root_qdisc(pair)
    assert handle == 0 and kind != "htb"  # back to the kernel's default (noqueue on veth)
    assert remove_plan([pair.if_a], pair.ns_a) == []


def test_trees_left_behind_are_found_by_their_signature_and_removed(pair: Pair) -> None:
    # What a crash leaves: our HTB tree on A, a foreign one on B. `tproxy rules flush` (the
    # unit's ExecStopPost) and the daemon's start remove ours wherever it is, and only ours.
    apply_plan(plan_for(pair, ShapingClass("c", rate=2_000_000), default="c"), pair.ns_a)
    pair.run(pair.ns_b, "tc", "qdisc", "add", "dev", pair.if_b, "root", "handle", "1:", "htb")
    assert remove_everywhere([pair.if_a], pair.ns_a) == []  # kept when asked
    assert remove_everywhere(netns=pair.ns_a) == [pair.if_a]
    kind, handle = root_qdisc(pair)
    assert handle == 0 and kind != "htb"
    assert remove_everywhere(netns=pair.ns_b) == []  # htb 1: without our r2q is not ours
    out = subprocess.run(
        ["ip", "netns", "exec", pair.ns_b, "tc", "qdisc", "show", "dev", pair.if_b],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "qdisc htb 1: root" in out


def test_foreign_qdisc_is_left_alone(pair: Pair) -> None:
    pair.run(pair.ns_a, "tc", "qdisc", "add", "dev", pair.if_a, "root", "handle", "2:", "htb")
    plan = plan_for(pair, ShapingClass("c", rate=2_000_000))
    with pytest.raises(ShapingError, match="not created by tproxy"):
        apply_plan(plan, pair.ns_a)
    assert remove_plan(plan, pair.ns_a) == []
    assert root_qdisc(pair) == ("htb", 0x20000)


def test_missing_interface_and_namespace_are_one_line_errors(pair: Pair) -> None:
    plan = build_plan(ShapingConfig(enabled=True), ["nosuch0"])
    with pytest.raises(ShapingError, match="interface nosuch0 not found"):
        apply_plan(plan, pair.ns_a)
    with pytest.raises(ShapingError, match="does not exist"):
        apply_plan(plan, pair.ns_a + "x")
    assert not os.path.exists(f"/run/netns/{pair.ns_a}x")


def test_missing_qdisc_kind_names_the_kernel_option(pair: Pair) -> None:
    # sfq is not built on the target kernel (DESIGN.md §3); on a kernel that has it the
    # translation is exercised with a kind no kernel has.
    with IPRoute(netns=pair.ns_a, flags=0) as ipr:
        index = ipr.link_lookup(ifname=pair.if_a)[0]
        # The last kind exists on no kernel, so the translation is always exercised.
        for kind in ("sfq", "cake", "nosuchqdisc"):
            try:
                ipr.tc("add", kind, index=index, handle="9:")
            except NetlinkError as exc:
                assert exc.code == errno.ENOENT
                err = translate_error(exc, "add", pair.if_a, kind)
                assert str(err) == f"kernel lacks sch_{kind} (CONFIG_NET_SCH_{kind.upper()})"
                return
            ipr.tc("del", index=index, handle="9:", parent=0xFFFFFFFF)
    pytest.fail("even a made-up qdisc kind was accepted")


def test_so_max_pacing_rate_caps_one_connection(pair: Pair) -> None:
    # No qdisc at all (veth's noqueue): TCP paces internally once SO_MAX_PACING_RATE is set
    # (net/core/sock.c sets sk_pacing_status = SK_PACING_NEEDED).
    plan = plan_for(
        pair,
        ShapingClass("capped", rate=8_000, per_connection_cap=2_000_000),
        ShapingClass("free", rate=8_000),
    )
    with flows(pair, [0], sender_class=(plan, "capped")) as (flow,):
        # Not from the first byte: what the connection sent before pacing took hold (its
        # initial window) arrives at once, and measured 2.23 against 2 Mbit/s once in CI.
        time.sleep(0.5)
        assert_rate(flow.rate_bps(2.0), 2_000_000)
        # Moving the socket to an uncapped class lifts the cap on the running connection.
        mark_socket(flow.sender, plan, "free")
        time.sleep(0.3)
        assert flow.rate_bps(1.0) > 20_000_000


def test_per_client_fair_slots_share_the_class_equally(pair: Pair) -> None:
    plan = plan_for(
        pair,
        ShapingClass("fair", rate=4_000_000, ceil=4_000_000, per_client_fair=True, fair_slots=2),
    )
    apply_plan(plan, pair.ns_a)
    pair.add_classify(plan)
    # Two clients that hash to different slots (the slot is part of the mark). Client A opens
    # two connections, client B one: fairness is per client, so each client gets half.
    clients = {client_slot(f"10.9.0.{i}", 2): f"10.9.0.{i}" for i in range(1, 10)}
    mark_a, mark_b = (mark_for(plan, "fair", clients[s]) for s in (0, 1))
    assert mark_a != mark_b
    with flows(pair, [mark_a, mark_a, mark_b]) as (a1, a2, b):
        before = [f.received for f in (a1, a2, b)]
        t0 = time.monotonic()
        time.sleep(WINDOW)
        dt = time.monotonic() - t0
        got = [(f.received - n) * 8 / dt for f, n in zip((a1, a2, b), before, strict=True)]
        assert_class_rate(got[0] + got[1], 2_000_000)
        assert_class_rate(got[2], 2_000_000)


def test_unmarked_goes_to_default_and_unshaped_mark_bypasses(pair: Pair) -> None:
    plan = plan_for(pair, ShapingClass("slow", rate=2_000_000, ceil=2_000_000), default="slow")
    apply_plan(plan, pair.ns_a)
    pair.add_classify(plan)
    slow = plan.interfaces[0].classes[1]
    with flows(pair, [0, mark_for(plan, None)]) as (_unmarked, unshaped):
        b0, t0 = unshaped.received, time.monotonic()
        # The default class's rate from HTB's own byte counter (whole frames, so no GOODPUT):
        # the receiving thread of a 2 Mbit/s flow next to an unlimited one in the same process
        # can be starved of the GIL long enough to skew a receiver-side count by 10 %+. Next to
        # a flow saturating the VM, HTB's own counter was measured up to 13 % over the rate in
        # some runs (1.5 s windows), so this test, whose point is which queue each flow lands
        # in, allows 25 %; the exact rate is test_class_rate_is_enforced's job.
        sampled = read_counters([pair.if_a], pair.ns_a, interval=1.5)
        dt = time.monotonic() - t0
        rate = sampled[(pair.if_a, slow.classid)].rate_bps
        assert rate is not None
        assert 0.75 * 2_000_000 <= rate <= 1.25 * 2_000_000, f"{rate / 1e6:.3f} Mbit/s, want 2"
        assert (unshaped.received - b0) * 8 / dt > 50_000_000  # HTB's direct queue: no limit
    counters = read_counters([pair.if_a], pair.ns_a)
    assert counters[(pair.if_a, 0x10000)].packets > 1000  # direct_pkts
