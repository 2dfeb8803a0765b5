"""Access log in Squid's native format, so existing log tools (calamaris, SARG, GoAccess's squid
format, fail2ban filters) read it unchanged.

Squid's native ``logformat squid`` is::

    %ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt

time (seconds.milliseconds), elapsed ms, client address, result code/status, bytes sent to the
client, method, URL, user ("-"), hierarchy code/peer address, content type.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import TextIO

log = logging.getLogger("tproxy.accesslog")

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


class AccessLogError(OSError):
    """The access log cannot be opened; ``str`` is one line naming the file and the setting."""


class AccessLog:
    """Line-buffered access log; ``reopen`` after logrotate moves the file (SIGUSR1/SIGHUP).

    Failures never take the proxy down, and each is one line in the daemon log: a full disk
    when the first line is lost (and how many were lost once writing works again), a reopen
    that fails (the old file is kept), a log file deleted under the daemon (see
    :meth:`reopen_if_deleted`).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fh: TextIO | None = None
        self.lost = 0  # lines dropped since writing last failed (0: writing works)
        # The open file was found deleted and could not be opened again: said once.
        self._deleted_told = False
        try:
            self._fh = self._open(path)
        except OSError as exc:
            raise AccessLogError(_cannot_open(path, exc)) from None

    @staticmethod
    def _open(path: str) -> TextIO | None:
        if not path:
            return None
        if path == "-":
            return sys.stdout
        directory = os.path.dirname(path)
        if directory:
            # The log directory may have been removed (by hand, or a tmpfs /var/log after a
            # reboot): create it again rather than stop logging.
            os.makedirs(directory, exist_ok=True)
        return open(path, "a", encoding="utf-8", buffering=1)

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
            except (OSError, ValueError, io.UnsupportedOperation) as exc:
                # A full disk must not take the proxy down; the daemon log says it once.
                if not self.lost:
                    reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                    log.error(
                        "access log %s: write failed (%s); lines are dropped until it works",
                        self.path,
                        reason,
                    )
                self.lost += 1
                return
            if self.lost:
                log.warning("access log %s: writing again, %d lines lost", self.path, self.lost)
                self.lost = 0

    def reopen(self, path: str | None = None) -> bool:
        """Open ``path`` (default: the same one) afresh, after logrotate renamed the file or a
        reload moved it. If it cannot be opened, the old file and path stay in use and the
        daemon log says why: False."""
        path = self.path if path is None else path
        try:
            fh = self._open(path)
        except OSError as exc:
            log.error("%s; still writing to %s", _cannot_open(path, exc), self.path or "nothing")
            return False
        with self._lock:
            self._close_locked()
            self._fh = fh
            self.path = path
        return True

    def reopen_if_deleted(self) -> bool:
        """Reopen when the open file was deleted (``rm -r /var/log/tproxy``): lines written to an
        unlinked file are lost without an error. True when it reopened."""
        fh = self._fh
        if fh is None or fh is sys.stdout or not self.path:
            return False
        try:
            if os.fstat(fh.fileno()).st_nlink > 0:
                self._deleted_told = False
                return False
        except (OSError, ValueError):
            pass
        if self._deleted_told:
            # Said once already; retried quietly every check until it can be opened again.
            try:
                new = self._open(self.path)
            except OSError:
                return False
            with self._lock:
                self._close_locked()
                self._fh = new
            log.warning("access log %s opened again", self.path)
            self._deleted_told = False
            return True
        log.warning("access log %s was deleted; opening it again", self.path)
        self._deleted_told = not self.reopen()
        return not self._deleted_told

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._fh is not None and self._fh is not sys.stdout:
            try:
                self._fh.close()
            except OSError:
                pass  # flushing the last line failed (disk full): already counted as lost
        self._fh = None


def _cannot_open(path: str, exc: OSError) -> str:
    return f"cannot open the access log {path} (log.access_log): {exc.strerror or exc}"
