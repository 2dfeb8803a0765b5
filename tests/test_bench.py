"""scripts/bench end to end (--short): every config and scenario yields numbers in the JSON.

The figures themselves are never asserted: this machine is shared and the test only proves that
the benchmark runs, measures each cell and tears its lab down.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.lab import STATE_DIR, clean_env, skip_reason

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench"
BENCH_TIMEOUT = 240  # --short is meant to take ~60-90 s; generous for a loaded CI host

CONFIGS = {"noproxy", "squid", "tproxy"}
WRK_SCENARIOS = {"1k-ka", "1k-close", "64k-ka", "16m"}
IDLE = "idle-conns"
THROUGHPUT_KEYS = ("rps", "p50_ms", "p99_ms", "mbps")
PROCESS_KEYS = ("cpu_us_per_req", "rss_mib")
RUN_KEYS = ("config", "scenario", *THROUGHPUT_KEYS, *PROCESS_KEYS)

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def run_bench(tmp_path: Path, *args: str, needs: tuple[str, ...] = ()) -> dict[str, Any]:
    """scripts/bench --short with ``args``; its JSON, stdout and stderr."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    path = clean_env()["PATH"]
    for needed in ("wrk", "taskset", *needs):
        if shutil.which(needed, path=path) is None:
            pytest.skip(f"scripts/bench needs {needed}")
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [str(BENCH), "--short", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT,
        cwd=str(REPO),
        check=False,
    )
    assert res.returncode == 0, f"stdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    # The benchmark's own lab is gone: no state file, no namespace.
    m = re.search(r"lab (\w+) up", res.stderr)
    assert m, res.stderr[-2000:]
    tag = m.group(1)
    assert not (STATE_DIR / f"{tag}.json").exists()
    assert not list(Path("/run/netns").glob(f"tpl-{tag}-*"))
    doc: dict[str, Any] = json.loads(out.read_text())
    doc["_stdout"] = res.stdout
    doc["_stderr"] = res.stderr
    return doc


@pytest.fixture
def bench_json(tmp_path: Path) -> dict[str, Any]:
    return run_bench(tmp_path, needs=("squid",))


def test_bench_short_measures_every_cell(bench_json: dict[str, Any]) -> None:
    runs = bench_json["runs"]
    assert isinstance(runs, list)
    cells = {(r["config"], r["scenario"]): r for r in runs}
    assert len(cells) == len(runs), "one entry per (config, scenario)"

    for config in CONFIGS:
        for scenario in WRK_SCENARIOS:
            run = cells.get((config, scenario))
            assert run is not None, f"no run for {config}/{scenario}"
            for key in RUN_KEYS:
                assert key in run, f"{config}/{scenario} lacks {key}"
            for key in THROUGHPUT_KEYS:
                assert _positive(run[key]), f"{config}/{scenario}: {key}={run[key]!r}"
            assert run["p99_ms"] >= run["p50_ms"]
            for key in PROCESS_KEYS:
                if config == "noproxy":
                    assert run[key] is None, "routing alone has no proxy process to measure"
                else:
                    assert _positive(run[key]), f"{config}/{scenario}: {key}={run[key]!r}"

    # Idle keep-alive connections: RSS per connection for both proxies. Only that a finite number
    # came out is checked: RSS is sampled, and a warm allocator may absorb a small delta.
    for config in ("tproxy", "squid"):
        run = cells.get((config, IDLE))
        assert run is not None, f"no idle-connection run for {config}"
        per_conn = run["rss_kib_per_idle_conn"]
        assert isinstance(per_conn, int | float) and math.isfinite(per_conn)
        assert run["idle_conns"] >= 1
    assert ("noproxy", IDLE) not in cells

    # 16m is also measured routed right after each proxy's cell, once that proxy has stopped
    # and its rules are gone (scripts/bench.py PAIRED): a ratio per proxy, used by the target.
    paired = {(p["config"], p["scenario"]): p for p in bench_json["paired"]}
    assert set(paired) == {("squid", "16m"), ("tproxy", "16m")}
    for (config, scenario), p in paired.items():
        assert len(p["ratios"]) == 1 and _positive(p["ratio"]) and _positive(p["routed"])
        assert abs(p["ratio"] - cells[(config, scenario)]["mbps"] / p["routed"]) < 0.01
    assert "16m tproxy MB/s / routed right after it" in bench_json["_stdout"]
    assert "16m MB/s >= 0.9x routed (paired)" in bench_json["_stdout"]
    assert "routed   16m          right after tproxy" in bench_json["_stderr"]

    # The table on stdout carries the ratios to Squid.
    assert "rps÷sq" in bench_json["_stdout"]
    assert set(bench_json["pending"]) <= {"1k-hit-ka", "1k-hit-close", "64k-hit-disk"}


def test_bench_haproxy_peer_runs_the_miss_path(tmp_path: Path) -> None:
    """The optional HAProxy peer intercepts through the same rules and is measured like Squid,
    16m with its routed partner; it has no cache, so hit scenarios are not run for it."""
    doc = run_bench(
        tmp_path, "--configs", "haproxy", "--scenarios", "1k-ka,16m,1k-hit-ka", needs=("haproxy",)
    )
    cells = {(r["config"], r["scenario"]): r for r in doc["runs"]}
    assert set(cells) == {("haproxy", "1k-ka"), ("haproxy", "16m")}
    for run in cells.values():
        for key in (*THROUGHPUT_KEYS, *PROCESS_KEYS):
            assert _positive(run[key]), f"{run['scenario']}: {key}={run[key]!r}"
    paired = {(p["config"], p["scenario"]) for p in doc["paired"]}
    assert paired == {("haproxy", "16m")}
    assert "routed   16m          right after haproxy" in doc["_stderr"]
