"""``tproxy status``: ask the running daemon over its control socket (see tproxy.control).

:func:`request` is the client other commands reuse (``tproxy cache purge`` …).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Mapping
from typing import Any

from tproxy import control
from tproxy.config import ConfigError

# The daemon answers status from memory; a slow answer means it is stuck, and the admin
# should hear so rather than wait.
REQUEST_TIMEOUT = 5.0
# A status answer with many components stays far below this.
MAX_RESPONSE = 16 * 1024 * 1024
# LSB init-script convention for "status": 3 means the program is not running.
EXIT_NOT_RUNNING = 3
EXIT_FAILED = 1


class ControlUnavailable(Exception):
    """No daemon answers on the socket; the message is one line for the admin."""


class CommandFailed(Exception):
    """The daemon answered ``{"ok": false}``; the message is its error."""


def request(
    path: str, cmd: str, args: Mapping[str, Any] | None = None, timeout: float = REQUEST_TIMEOUT
) -> dict[str, Any]:
    """Send one command and return its result; raises ControlUnavailable or CommandFailed."""
    line = json.dumps({"cmd": cmd, "args": dict(args or {})}).encode() + b"\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlUnavailable(
                f"tproxy is not running (no daemon on control socket {path})"
            ) from None
        except PermissionError:
            raise ControlUnavailable(
                f"permission denied on {path} (run as root or as a member of its group)"
            ) from None
        except OSError as exc:
            raise ControlUnavailable(f"cannot connect to {path}: {exc.strerror or exc}") from None
        buf = b""
        try:
            sock.sendall(line)
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_RESPONSE:
                    raise ControlUnavailable(f"answer on {path} is larger than {MAX_RESPONSE} B")
        except TimeoutError:
            raise ControlUnavailable(
                f"tproxy did not answer on {path} within {timeout:g}s"
            ) from None
        except OSError as exc:
            raise ControlUnavailable(
                f"connection to {path} failed: {exc.strerror or exc}"
            ) from None
    finally:
        sock.close()
    try:
        response = json.loads(buf)
    except ValueError:
        response = None
    if not isinstance(response, dict):
        raise ControlUnavailable(f"garbled answer on {path}: {buf[:80]!r}")
    if not response.get("ok"):
        raise CommandFailed(str(response.get("error", "command failed")))
    result = response.get("result", {})
    return result if isinstance(result, dict) else {"result": result}


def socket_path(config_path: str | None) -> str:
    """The control socket named by the config (the system one when present), else the default."""
    from tproxy.cli import load_config

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        if config_path is not None:
            raise
        print(f"warning: {exc}; using {control.DEFAULT_SOCKET}", file=sys.stderr)
        return control.DEFAULT_SOCKET
    return control.control_config(cfg).socket


# -- formatting --------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def _flat(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, Mapping):
        out: list[str] = []
        for k, v in value.items():
            out.extend(_flat(v, f"{prefix}{k}." if isinstance(v, Mapping) else f"{prefix}{k}"))
        return out
    if isinstance(value, float):
        value = f"{value:.2f}".rstrip("0").rstrip(".")
    elif isinstance(value, (list, tuple)):
        value = ",".join(map(str, value)) or "-"
    return [f"{prefix.rstrip('.')}={value}"]


def format_status(st: Mapping[str, Any]) -> str:
    """A readable summary of a ``status`` result; one line per figure, components last."""
    conns, reqs, up = st["connections"], st["requests"], st["upstream"]
    if st.get("draining"):
        state = "draining (stopping)"
    elif st.get("overloaded"):
        state = "OVERLOADED (shedding new connections)"
    else:
        state = "running"
    rows = [
        (
            "tproxy",
            f"{st['version']} pid {st['pid']}, {st.get('state', 'running')}, "
            f"up {control.human_duration(st['uptime'])}",
        ),
        ("config", str(st["config"])),
        ("state", state),
        ("connections", f"{conns['active']} active, {conns['total']} total"),
        (
            "requests",
            f"{reqs['total']} total, {reqs['per_second']:.1f}/s (last {reqs['window']:g} s)",
        ),
        ("bad requests", str(st["bad_requests"])),
        (
            "traffic",
            f"{human_bytes(st['bytes']['in'])} from clients, "
            f"{human_bytes(st['bytes']['out'])} to clients"
            + (
                f" ({human_bytes(spliced)} of it spliced)"
                if (spliced := st["bytes"].get("spliced"))
                else ""
            ),
        ),
        (
            "upstream",
            f"{up['connects']} connects, {up['errors']} errors, {up['pool_idle']} idle in pool",
        ),
    ]
    for name, status in st.get("components", {}).items():
        rows.append((name, " ".join(_flat(status)) or "-"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# -- command -----------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    path = args.socket or socket_path(args.config)
    try:
        result = request(path, "status")
    except ControlUnavailable as exc:
        print(f"tproxy: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except CommandFailed as exc:
        print(f"tproxy: status failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        print(format_status(result))
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="show the running daemon's figures")
    p.add_argument(
        "--socket",
        "-s",
        help=f"control socket (default: from the config, {control.DEFAULT_SOCKET})",
    )
    p.add_argument("--config", "-c", help="config naming the control socket")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.set_defaults(func=cmd_status)


if __name__ == "__main__":  # pragma: no cover - `python -m tproxy.status_cli` for debugging
    parser = argparse.ArgumentParser(prog="tproxy")
    add_commands(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
