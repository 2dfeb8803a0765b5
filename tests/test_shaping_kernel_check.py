"""The shaping component's kernel check as data: is the tree still on every interface
(tree_intact), and what to log and keep after a repair (judge_kernel). The I/O shell around it
(check_kernel reading counters and repairing with pyroute2) runs in the lab in
test_review_shaping_kernel.py."""

from __future__ import annotations

from tproxy.shaping.component import KernelVerdict, judge_kernel, tree_intact
from tproxy.shaping.model import UNSHAPED_CLASSID

OTHER_CLASS = UNSHAPED_CLASSID + 0x10
GONE = "interface lan1 not found"
FOREIGN = "eth1 carries a qdisc tproxy did not create (left alone)"


def test_tree_intact_needs_the_unshaped_class_on_every_interface() -> None:
    both = {("lan0", UNSHAPED_CLASSID), ("lan1", UNSHAPED_CLASSID), ("lan1", OTHER_CLASS)}
    assert tree_intact(["lan0", "lan1"], both)
    # lan1 re-created: the kernel's default qdisc, none of our classes.
    assert not tree_intact(["lan0", "lan1"], {("lan0", UNSHAPED_CLASSID)})
    # Another class alone is not the tree (the unshaped class is in every tree of ours).
    assert not tree_intact(["lan1"], {("lan1", OTHER_CLASS)})
    assert tree_intact([], set())


def test_intact_tree_changes_nothing_until_problems_were_reported() -> None:
    assert judge_kernel((), None) is None
    assert judge_kernel((GONE,), None) == KernelVerdict((), None, recovered=True)


def test_repaired_interfaces_are_named_once_each_in_order() -> None:
    actions = ["lan1: add qdisc htb 1:", "lan1: add class 1:10", "wan0: add qdisc htb 1:"]
    verdict = judge_kernel((), (actions, []))
    assert verdict == KernelVerdict((), None, repaired=("lan1", "wan0"))


def test_a_problem_is_logged_once_per_change() -> None:
    first = judge_kernel((), ([], [GONE]))
    assert first == KernelVerdict((GONE,), GONE, report=(GONE,))
    # The same problem at the next check: kept, not logged again.
    again = judge_kernel(first.problems if first else (), ([], [GONE]))
    assert again == KernelVerdict((GONE,), GONE)
    # Another set of problems is a change: all of them are logged.
    changed = judge_kernel((GONE,), (["lan1: add qdisc htb 1:"], [FOREIGN]))
    assert changed == KernelVerdict((FOREIGN,), FOREIGN, repaired=("lan1",), report=(FOREIGN,))
    both = judge_kernel((FOREIGN,), ([], [FOREIGN, GONE]))
    assert both is not None
    assert both.report == (FOREIGN, GONE)
    assert both.error == f"{FOREIGN}; {GONE}"


def test_a_repair_that_clears_the_problems_resets_them_without_a_recovery_line() -> None:
    # The repair itself is the news (a warning names the interface); no "carries again" line.
    verdict = judge_kernel((GONE,), (["lan1: add qdisc htb 1:"], []))
    assert verdict == KernelVerdict((), None, repaired=("lan1",))
