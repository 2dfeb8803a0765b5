"""Run the real tproxy daemon in a lab's gateway namespace (for integration tests and the demo)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.lab import Lab

REPO = Path(__file__).resolve().parent.parent
TPROXY = [sys.executable, "-m", "tproxy.cli"]
START_TIMEOUT = 15.0


class Proxy:
    """``tproxy run`` in the gateway of ``lab`` with a config written for the test."""

    def __init__(self, lab: Lab, config: str = "", *, args: tuple[str, ...] = ()) -> None:
        assert lab.tmpdir is not None
        self.lab = lab
        self.dir = Path(lab.tmpdir) / f"tproxy-{time.monotonic_ns()}"
        self.dir.mkdir()
        self.access_log = self.dir / "access.log"
        self.stderr_path = self.dir / "stderr.log"
        self.config_path = self.dir / "tproxy.toml"
        self.control_socket = self.dir / "control.sock"
        self.cache_dir = self.dir / "cache"
        # Keep every run's state inside its own directory (parallel labs share /run and /var).
        if "[control]" not in config:
            config += f'\n[control]\nsocket = "{self.control_socket}"\n'
        if "[cache]" not in config:
            config += f'\n[cache]\ndisk_dir = "{self.cache_dir}"\n'
        elif "disk_dir" not in config:
            config = config.replace("[cache]\n", f'[cache]\ndisk_dir = "{self.cache_dir}"\n', 1)
        self.config_path.write_text(config)
        self.args = args
        self.proc: subprocess.Popen[Any] | None = None

    def start(self) -> Proxy:
        argv = [
            *TPROXY, "run", "--config", str(self.config_path),
            "--lan-interface", self.lab.gw_lan_if, "--access-log", str(self.access_log),
            *self.args,
        ]  # fmt: skip
        self.proc = self.lab.popen(
            "gateway", argv, stdout=subprocess.DEVNULL, stderr=self.stderr_path.open("wb"),
            cwd=str(REPO),
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while "TPROXY-" not in self.rules():
            if self.proc.poll() is not None:
                raise RuntimeError(f"tproxy exited {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tproxy did not apply its rules: {self.stderr()}")
            time.sleep(0.05)
        return self

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def rules(self) -> str:
        out = []
        for tool in ("iptables-save", "ip6tables-save"):
            out.append(self.lab.run("gateway", [tool], check=False).stdout)
        return "\n".join(out)

    def routes(self) -> str:
        out = []
        for fam in ("-4", "-6"):
            out.append(self.lab.run("gateway", ["ip", fam, "rule", "show"]).stdout)
            out.append(self.lab.run("gateway", ["ip", fam, "route", "show", "table", "all"]).stdout)
        return "\n".join(out)

    def log_lines(self, min_lines: int = 0, timeout: float = 3.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            text = self.access_log.read_text() if self.access_log.exists() else ""
            lines = text.splitlines()
            if len(lines) >= min_lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def tproxy(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a ``tproxy`` subcommand in the gateway namespace."""
        return self.lab.run("gateway", [*TPROXY, *args], check=check)

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        # Shown by pytest only when the test failed.
        print(f"--- tproxy stderr ---\n{self.stderr()}")


APP_PORT = 8081
ORIGIN_APP = Path(__file__).with_name("origin_app.py")


class Origin:
    """tests/origin_app.py in the origin namespace; ``requests()`` is what reached it."""

    def __init__(self, lab: Lab) -> None:
        assert lab.tmpdir is not None
        self.lab = lab
        self.log = Path(lab.tmpdir) / "origin_app.jsonl"
        self.log.write_text("")
        lab.popen("origin", [sys.executable, str(ORIGIN_APP), str(APP_PORT), str(self.log)])
        lab.wait_port("origin", APP_PORT)

    def requests(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def clear(self) -> None:
        self.log.write_text("")


@contextlib.contextmanager
def through_proxy(lab: Lab, config: str = "") -> Iterator[tuple[Proxy, Origin]]:
    """The origin app and a running daemon, with the gateway's forwarding off for the duration:
    every answer a test gets came through the daemon. The daemon's stderr is printed at the end
    (pytest shows it for a failing test)."""
    origin = Origin(lab)
    proxy = Proxy(lab, config).start()
    lab.set_forwarding(False)
    try:
        yield proxy, origin
    finally:
        lab.set_forwarding(True)
        proxy.stop()
        print(proxy.stderr())


def client_py(lab: Lab, code: str, *args: str, timeout: float = 20) -> str:
    """Run a Python snippet in the client namespace; return its stdout."""
    res = lab.run("client", [sys.executable, "-c", textwrap.dedent(code), *args], timeout=timeout)
    return res.stdout
