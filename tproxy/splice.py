"""Zero-copy relay of a response body: origin socket -> pipe -> client socket (splice(2)).

A body that the proxy neither stores nor inspects only has to move from one socket to the
other. Relayed through user space it is copied twice (recv into a Python bytes object, send
out of it); ``splice(2)`` instead moves the origin's received pages into a pipe
(``tcp_splice_read``) and from the pipe into the client socket's send queue by reference, so
the proxy's CPU time per byte drops to well under half and its core stops being the limit of a
fast download.

This is I/O shell code: it owns two duplicated descriptors and a pipe for the length of one
body, and tells its owner about progress and the end through callbacks. The descriptors are
duplicates because uvloop refuses ``add_reader`` on a descriptor one of its transports uses;
both transports are quiet meanwhile (the origin's reading is paused, nothing is written to the
client), and the duplicates are unregistered before they are closed, so an epoll registration
never outlives its descriptor.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import time
from collections.abc import Callable

# Only a body with at least this many bytes still to come is spliced: below it the set-up (a
# pipe, two dup(2)s, two epoll registrations) costs more than the copies it saves.
SPLICE_MIN = 1 << 20
# Pipe capacity: how much one splice call may move. 1 MiB is the default fs.pipe-max-size for
# an unprivileged process; larger moves would not cut the number of calls much further.
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

# Batching (SO_RCVLOWAT on the origin socket). Every wake-up of the proxy is an interrupt to
# its CPU from the one that received the packet, and every batch is one more round of splice
# calls; so the origin socket reports readable only once a batch has gathered: as many bytes
# as arrive in LOWAT_DELAY at the rate measured since the last reset, at most LOWAT_MAX, never
# more than is still due (the tail must not wait for bytes that will not come), and at most a
# quarter of the socket's receive buffer - a larger value makes the kernel grow the buffer and
# clamp the advertised window to it (tcp_set_rcvlowat), which would cap a long-distance
# download. Below LOWAT_MIN batching is off: a slow origin's bytes go on as they come. And if a
# batch has not gathered within LOWAT_WAIT the origin has slowed down: the socket goes back to
# waking on every byte at once and the rate is measured afresh.
LOWAT_MAX = 256 * 1024
LOWAT_MIN = 16 * 1024
LOWAT_DELAY = 0.002  # seconds
LOWAT_WAIT = 0.010  # seconds


def batch_lowat(remaining: int, rate: float, rcvbuf: int) -> int:
    """SO_RCVLOWAT for the next batch: ``rate`` bytes/s measured, ``remaining`` bytes still
    due, ``rcvbuf`` the socket's receive buffer (see LOWAT_DELAY); 1 turns batching off."""
    want = min(remaining, LOWAT_MAX, int(rate * LOWAT_DELAY), rcvbuf // 4)
    return want if want >= LOWAT_MIN else 1


class BodySplice:
    """Move exactly ``length`` bytes from ``src_fd`` to ``dst_fd``, then call ``done(None,
    None)``.

    ``progress(n)`` is called after each batch written to the client. On a failure ``done``
    gets the side that failed ("origin" or "client") and the error (``None`` for an origin
    that closed before the body ended). ``cancel()`` stops at once and releases everything;
    it is safe to call more than once and after the end."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        src_fd: int,
        dst_fd: int,
        length: int,
        progress: Callable[[int], None],
        done: Callable[[str | None, OSError | None], None],
    ) -> None:
        self.loop = loop
        self.remaining = length  # bytes still to take from the origin
        self.in_pipe = 0  # bytes taken but not yet handed to the client
        self.moved = 0  # bytes handed to the client
        self.progress = progress
        self.done = done
        self.reading = False
        self.writing = False
        self.active = True
        self.lowat = 1  # the origin socket's SO_RCVLOWAT
        self.rate_since = time.monotonic()  # rate = (moved - rate_base) / (now - rate_since)
        self.rate_base = 0
        self.timer: asyncio.TimerHandle | None = None
        self.pr, self.pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.src = self.dst = -1
        self.src_sock: socket.socket | None = None  # for its socket options
        try:
            try:
                fcntl.fcntl(self.pw, _F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # a smaller pipe only means more calls
            self.src_sock = socket.socket(fileno=os.dup(src_fd))
            self.src = self.src_sock.fileno()
            self.dst = os.dup(dst_fd)
        except OSError:
            self._release()
            raise

    def start(self) -> None:
        self._move()

    def cancel(self) -> None:
        if self.active:
            self.active = False
            self._release()

    # -- internals ---------------------------------------------------------------------

    def _set_lowat(self, value: int) -> None:
        assert self.src_sock is not None
        self.src_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
        self.lowat = value

    def _batch(self) -> None:
        """Set the origin socket's SO_RCVLOWAT for the next batch (batch_lowat)."""
        assert self.src_sock is not None
        now = time.monotonic()
        rate = (self.moved - self.rate_base) / max(now - self.rate_since, 1e-6)
        rcvbuf = self.src_sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        want = batch_lowat(self.remaining, rate, rcvbuf)
        if want != self.lowat:
            self._set_lowat(want)
        if want > 1:
            self.timer = self.loop.call_later(LOWAT_WAIT, self._slowed)

    def _slowed(self) -> None:
        """A batch did not gather in LOWAT_WAIT: wake on every byte and measure afresh."""
        self.timer = None
        if not self.active:
            return
        self.rate_since = time.monotonic()
        self.rate_base = self.moved
        try:
            self._set_lowat(1)  # the kernel reports what is already there at once
        except OSError as exc:
            self._finish("origin", exc)

    def _release(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.reading:
            self.loop.remove_reader(self.src)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.dst)
            self.writing = False
        if self.lowat != 1 and self.src_sock is not None:
            # The connection goes back to the ordinary relay (or the pool): whole reads again.
            try:
                self._set_lowat(1)
            except OSError:
                pass  # the connection is gone
        if self.src_sock is not None:
            self.src_sock.close()
            self.src_sock = None
        for fd in (self.dst, self.pr, self.pw):
            if fd >= 0:
                os.close(fd)
        self.src = self.dst = self.pr = self.pw = -1

    def _finish(self, side: str | None, err: OSError | None) -> None:
        self.cancel()
        self.done(side, err)

    def _want(self, read: bool, write: bool) -> None:
        if read != self.reading:
            if read:
                self.loop.add_reader(self.src, self._move)
            else:
                self.loop.remove_reader(self.src)
            self.reading = read
        if write != self.writing:
            if write:
                self.loop.add_writer(self.dst, self._move)
            else:
                self.loop.remove_writer(self.dst)
            self.writing = write

    def _move(self) -> None:
        """Alternate: drain the pipe into the client, refill it from the origin. At most one
        of the two waits is armed: the client's writability while the pipe holds bytes, the
        origin's readability while it is empty."""
        if not self.active:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        written = 0
        # A failure ends the relay only after the bytes already handed to the client in this
        # round are reported: they reached the client, and the access log counts them.
        failure: tuple[str, OSError | None] | None = None
        while True:
            if self.in_pipe:
                try:
                    n = os.splice(self.pr, self.dst, self.in_pipe, flags=_FLAGS)
                except BlockingIOError:
                    break
                except OSError as exc:
                    failure = ("client", exc)
                    break
                self.in_pipe -= n
                written += n
                if self.in_pipe:
                    continue
            if not self.remaining:
                break
            try:
                n = os.splice(self.src, self.pw, min(self.remaining, PIPE_SIZE), flags=_FLAGS)
            except BlockingIOError:
                break
            except OSError as exc:
                failure = ("origin", exc)
                break
            if n == 0:  # the origin closed before the body ended
                failure = ("origin", None)
                break
            self.remaining -= n
            self.in_pipe += n
        if written:
            self.moved += written
            self.progress(written)
            if not self.active:  # the owner gave up in its callback
                return
        if failure is not None:
            self._finish(*failure)
            return
        if not self.remaining and not self.in_pipe:
            self._finish(None, None)
            return
        if not self.in_pipe:
            try:
                self._batch()
            except OSError as exc:
                self._finish("origin", exc)
                return
        self._want(read=not self.in_pipe, write=bool(self.in_pipe))
