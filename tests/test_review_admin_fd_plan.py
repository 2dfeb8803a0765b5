"""The daemon's descriptor sizing rule (tproxy.daemon.fd_plan), fed plain numbers: how many
descriptors limits.max_connections needs and what soft RLIMIT_NOFILE to ask for. The shell
that reads and sets the real limit is tested in test_review_load_shell.py."""

from __future__ import annotations

import resource

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.daemon import FD_RESERVE, FDS_PER_CONNECTION, fd_plan

INF = resource.RLIM_INFINITY
NEED_1000 = 1000 * FDS_PER_CONNECTION + FD_RESERVE


@pytest.mark.parametrize(
    ("soft", "hard", "want"),
    [
        (1024, 524288, NEED_1000),  # systemd's default for a hand-started process: raised
        (1024, INF, NEED_1000),  # no hard cap: exactly the need
        (NEED_1000, 524288, None),  # just enough already
        (65536, 524288, None),  # more than enough: never lowered
        (INF, INF, None),  # unlimited
        (1024, 1500, 1500),  # the hard limit caps the raise; the need stays unmet
        (1024, 1024, None),  # nothing to gain: soft is at the hard limit already
        (2000, 1500, None),  # a soft above the hard (as reported) is not "raised" lower
    ],
)
def test_fd_plan(soft: int, hard: int, want: int | None) -> None:
    assert fd_plan(1000, soft, hard) == (NEED_1000, want)


def test_fd_plan_need_grows_with_connections() -> None:
    assert fd_plan(0, 1024, INF) == (FD_RESERVE, None)
    assert fd_plan(10_000, 1024, INF)[0] == 10_000 * FDS_PER_CONNECTION + FD_RESERVE


@settings(max_examples=200, deadline=None)
@given(
    conns=st.integers(0, 1_000_000),
    soft=st.integers(0, 1 << 22) | st.just(INF),
    hard=st.integers(0, 1 << 22) | st.just(INF),
)
def test_fd_plan_only_raises_within_the_hard_limit(conns: int, soft: int, hard: int) -> None:
    need, want = fd_plan(conns, soft, hard)
    assert need == conns * FDS_PER_CONNECTION + FD_RESERVE
    if want is None:
        return
    assert soft != INF and soft < want <= need
    assert hard == INF or want <= hard
    # Raised as far as it helps: to the need, or to the hard limit when that is lower.
    assert want in (need, hard)
