"""Shared fixtures. The lab fixtures build real network namespaces (tests/lab.py).

Ask for more clients with indirect parametrization::

    @pytest.mark.parametrize("lab", [2], indirect=True)
    def test_two_clients(lab: Lab) -> None: ...
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.lab import Lab, clean_env

LAB_TOOLS = ("ip", "nginx", "curl", "sysctl")


def lab_skip_reason() -> str | None:
    """Why lab tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, veth, sysctl)"
    path = clean_env()["PATH"]
    missing = [t for t in LAB_TOOLS if shutil.which(t, path=path) is None]
    if missing:
        return f"lab tests need {', '.join(missing)} installed"
    return None


def _clients(request: pytest.FixtureRequest) -> int:
    param = getattr(request, "param", 1)
    return int(param["clients"]) if isinstance(param, dict) else int(param)


def _lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    lab = Lab(clients=_clients(request))
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A fresh lab for one test, torn down even when the test fails."""
    yield from _lab(request)


@pytest.fixture(scope="module")
def lab_module(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """One lab shared by a module's tests; tests must leave it as they found it."""
    yield from _lab(request)
