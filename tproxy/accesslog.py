"""Access log in Squid's native format, so existing log tools (calamaris, SARG, GoAccess's squid
format, fail2ban filters) read it unchanged.

Squid's native ``logformat squid`` is::

    %ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt

time (seconds.milliseconds), elapsed ms, client address, result code/status, bytes sent to the
client, method, URL, user ("-"), hierarchy code/peer address, content type.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from dataclasses import dataclass
from typing import TextIO

# Squid writes URLs and types verbatim, space separated: a space or control byte in a field would
# shift every later column for log parsers, so such bytes are percent-encoded.
_UNSAFE = {c: f"%{c:02X}" for c in range(0x21)} | {0x7F: "%7F"}


def _field(value: str) -> str:
    if not value:
        return "-"
    return value.translate(_UNSAFE)


@dataclass(slots=True)
class AccessRecord:
    start: float  # wall-clock time the request arrived (time.time())
    elapsed_ms: int
    client: str
    result: str  # Squid result code, e.g. TCP_MISS, TCP_HIT, TCP_DENIED, TCP_TUNNEL
    status: int
    size: int  # bytes sent to the client, head included
    method: str
    url: str
    hierarchy: str  # HIER_DIRECT, HIER_NONE
    peer: str  # upstream address or "-"
    content_type: str


def format_record(r: AccessRecord) -> str:
    return (
        f"{r.start:.3f} {r.elapsed_ms:6d} {r.client} {r.result}/{r.status:03d} {r.size} "
        f"{_field(r.method)} {_field(r.url)} - {r.hierarchy}/{_field(r.peer)} "
        f"{_field(r.content_type)}\n"
    )


class AccessLog:
    """Line-buffered access log; ``reopen`` after logrotate moves the file (SIGUSR1/SIGHUP)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fh: TextIO | None = None
        self._open()

    def _open(self) -> None:
        if not self.path:
            self._fh = None
        elif self.path == "-":
            self._fh = sys.stdout
        else:
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    @property
    def enabled(self) -> bool:
        """Whether records are written at all: with the log off the shell skips building them
        (one AccessRecord per exchange is measurable on the 1 KiB keep-alive path)."""
        return self._fh is not None

    def write(self, record: AccessRecord) -> None:
        fh = self._fh
        if fh is None:
            return
        line = format_record(record)
        with self._lock:
            try:
                fh.write(line)
            except (OSError, ValueError, io.UnsupportedOperation):
                # A full disk must not take the proxy down; the daemon log reports it once.
                pass

    def reopen(self) -> None:
        with self._lock:
            self._close_locked()
            self._open()

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._fh is not None and self._fh is not sys.stdout:
            self._fh.close()
        self._fh = None
