"""Forget the proxy's TIME_WAIT sockets once interception is gone.

After the daemon stops, the kernel keeps the proxy's closed connections in TIME_WAIT for up to
60 s. Their 4-tuples are the clients' own (full transparency: an upstream socket's local address
is the client's), so when the same flow is later merely *routed*, the kernel's early demux
attaches the returning packet to that TIME_WAIT socket and ``ip_forward`` drops packets that
carry a socket (measured: routed connections stalled after the proxy stopped). Destroying those
sockets (``ss -K``, SOCK_DESTROY, needs CONFIG_INET_DIAG_DESTROY) lets the LAN fail open at once.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence

from .apply import netns_argv

log = logging.getLogger("tproxy.netfilter")


def timewait_filter(ports: Sequence[int]) -> str:
    """The ss(8) filter for TIME_WAIT sockets on the intercepted ports (either side)."""
    terms = [f"sport = :{p} or dport = :{p}" for p in sorted(set(ports))]
    return "( " + " or ".join(terms) + " )"


def forget_timewait(ports: Sequence[int], netns: str | None = None) -> bool:
    """Destroy TIME_WAIT sockets of intercepted flows; False when the kernel cannot."""
    if not ports:
        return True
    ss = shutil.which("ss") or "/usr/bin/ss"
    argv = netns_argv([ss, "-K", "-tan", "state", "time-wait", timewait_filter(ports)], netns)
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("could not clear TIME_WAIT sockets: %s", exc)
        return False
    if res.returncode != 0:
        log.info("could not clear TIME_WAIT sockets: %s", res.stderr.strip().splitlines()[:1])
        return False
    return True
