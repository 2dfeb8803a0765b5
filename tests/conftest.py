"""Shared fixtures. The lab fixtures build real network namespaces (tests/lab.py).

Ask for more clients with indirect parametrization::

    @pytest.mark.parametrize("lab", [2], indirect=True)
    def test_two_clients(lab: Lab) -> None: ...
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lab import Lab, skip_reason


def _clients(request: pytest.FixtureRequest) -> int:
    param = getattr(request, "param", 1)
    return int(param["clients"]) if isinstance(param, dict) else int(param)


def _lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    reason = skip_reason()
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
