"""Pieces for running the daemon's ``Server`` in-process on loopback (no root, no rules)."""

from __future__ import annotations

from tproxy.accesslog import AccessRecord


class Records:
    """An access log that keeps its records (the Server only needs ``enabled`` and ``write``)."""

    enabled = True

    def __init__(self) -> None:
        self.records: list[AccessRecord] = []

    def write(self, record: AccessRecord) -> None:
        self.records.append(record)
