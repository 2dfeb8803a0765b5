"""README commands that need no daemon: `tproxy shaping plan`, `tproxy filter check-lists`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TPROXY = [sys.executable, "-m", "tproxy.cli"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TPROXY, *args], capture_output=True, text=True, timeout=60)


def test_shaping_plan_prints_the_tc_and_classify_commands(tmp_path: Path) -> None:
    conf = tmp_path / "s.toml"
    conf.write_text(
        '[shaping]\nenabled = true\ndefault_class = "web"\n'
        '[[shaping.class]]\nname = "web"\nrate = "2mbit"\n'
    )
    res = run("shaping", "plan", "-c", str(conf), "-i", "eth9")
    assert res.returncode == 0, res.stderr
    assert "tc qdisc replace dev eth9 root handle 1: htb default 100" in res.stdout
    assert "classid 1:100 htb rate 2000000bit" in res.stdout
    assert "-o eth9 -m mark --mark 0x100/0xffff00 -j CLASSIFY --set-class 1:100" in res.stdout


def test_filter_check_lists_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "games").mkdir()
    (tmp_path / "games" / "domains").write_text("good.example\nbad line here\nok.example\n")
    res = run("filter", "check-lists", "--dir", str(tmp_path), "--all")
    assert res.returncode == 1
    assert "games: 2 domains" in res.stdout
    assert f"{tmp_path}/games/domains:2: whitespace inside the name" in res.stdout + res.stderr
