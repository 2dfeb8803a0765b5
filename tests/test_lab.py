"""The lab itself: routing, naming, the origin, isolation between labs, and clean teardown."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.lab import (
    NETNS_ETC,
    NETNS_RUN,
    ORIGIN_FILES,
    STATE_DIR,
    Lab,
    LabCommandError,
    origin_file_bytes,
    skip_reason,
    tool,
)

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent
FAIL_FAST = ("--max-time", "2")


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _assert_gone(tag: str, namespaces: list[str], pids: list[int], tmpdir: str | None) -> None:
    for ns in namespaces:
        assert not (NETNS_RUN / ns).exists(), ns
        assert not (NETNS_ETC / ns).exists(), ns
    listed = subprocess.run([tool("ip"), "netns", "list"], capture_output=True, text=True).stdout
    assert f"tpl-{tag}-" not in listed
    for pid in pids:
        assert not _pid_alive(pid), pid
    assert not (STATE_DIR / f"{tag}.json").exists()
    if tmpdir:
        assert not Path(tmpdir).exists()


def test_routed_v4_and_v6_keep_client_address(lab_module: Lab) -> None:
    lab = lab_module
    r4 = lab.curl("client", "http://origin.lab/ip", "-4")
    assert (r4.status, r4.body) == (200, f"{lab.client_v4}\n".encode()), r4.stderr
    r6 = lab.curl("client", "http://origin.lab/ip", "-6")
    assert (r6.status, r6.body) == (200, f"{lab.client_v6}\n".encode()), r6.stderr
    # The origin's own log agrees, so tests can check what the origin saw after the fact.
    log = lab.origin_log(min_lines=2)
    assert any(
        line.startswith(f"{lab.client_v4} ") and '"GET /ip HTTP/1.1" 200' in line for line in log
    )
    assert any(line.startswith(f"{lab.client_v6} ") for line in log)


def test_files_sizes_and_cache_headers(lab_module: Lab) -> None:
    lab = lab_module
    big = lab.curl("client", lab.url("/files/16m"))
    assert big.status == 200
    assert len(big.body) == ORIGIN_FILES["16m"]
    assert hashlib.sha256(big.body).digest() == hashlib.sha256(origin_file_bytes("16m")).digest()
    head = lab.run("client", ["curl", "-sS", "-D", "-", "-o", "/dev/null", lab.url("/files/1k")])
    assert "Cache-Control: max-age=3600" in head.stdout
    assert "ETag: " in head.stdout and "Last-Modified: " in head.stdout
    nc = lab.run("client", ["curl", "-sS", "-D", "-", "-o", "/dev/null", lab.url("/nocache/64k")])
    assert "Cache-Control: no-store" in nc.stdout
    assert "Content-Length: 65536" in nc.stdout
    # Port 8080 serves the same site.
    assert lab.curl("client", lab.url("/files/1k", v6=True, port=8080)).body == origin_file_bytes(
        "1k"
    )


def test_keepalive_reuse_visible(lab_module: Lab) -> None:
    # One curl invocation with two URLs reuses its connection: same $connection, requests 1 and 2.
    url = lab_module.url("/conn")
    out = lab_module.run("client", ["curl", "-sS", "--max-time", "5", url, url]).stdout
    first, second = out.splitlines()
    conn1, n1 = first.split()
    conn2, n2 = second.split()
    assert conn1 == conn2 and (n1, n2) == ("1", "2")


def test_forwarding_off_stops_routed_traffic(lab: Lab) -> None:
    assert lab.curl("client", lab.url("/ip", v6=False), *FAIL_FAST).status == 200
    lab.set_forwarding(False)
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:  # both time out; in parallel that costs 2 s, not 4
        results = list(
            pool.map(
                lambda v6: lab.curl("client", lab.url("/ip", v6=v6), *FAIL_FAST), [False, True]
            )
        )
    assert [r.status for r in results] == [0, 0], results
    assert time.monotonic() - t0 < 5
    lab.set_forwarding(True)
    assert lab.curl("client", lab.url("/ip", v6=True), *FAIL_FAST).status == 200


def test_python_origin_and_tracked_processes_die_on_down(tmp_path: Path) -> None:
    if reason := skip_reason():
        pytest.skip(reason)
    server = textwrap.dedent(
        """
        import http.server, os, socket
        class S(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = b"custom\\n"
                self.send_response(203)
                self.send_header("X-Lab", "python")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        S(("::", int(os.environ["LAB_PORT"])), H).serve_forever()
        """
    )
    lab = Lab()
    try:
        lab.up()
        py = lab.start_origin_python(server, 8081)
        r = lab.curl("client", lab.url("/x", v6=True, port=8081), "-i")
        assert r.status == 203 and b"X-Lab: python" in r.body and r.body.endswith(b"custom\n")
        # The same server from a file; the port also arrives as argv[1].
        script = tmp_path / "origin.py"
        script.write_text(
            server.replace('int(os.environ["LAB_PORT"])', "int(__import__('sys').argv[1])")
        )
        py2 = lab.start_origin_python(script, 8082)
        assert lab.curl("client", lab.url("/y", v6=True, port=8082)).status == 203
        with pytest.raises(LabCommandError, match=r"stderr: .*No such file"):
            lab.run("client", ["ls", "/nonexistent-lab-path"])
        sleeper = lab.popen("client", ["sleep", "60"])
        # A process started in a namespace behind the lab's back is swept up too.
        stray = subprocess.Popen([tool("ip"), "netns", "exec", lab.ns_gateway, "sleep", "60"])
        lab.wait_port("origin", 80)
        state = json.loads(lab.state_path.read_text())
        pids = [p["pid"] for p in state["procs"]]
        assert {py.pid, py2.pid, sleeper.pid} <= set(pids)
        namespaces, tmpdir = list(lab.namespaces), str(lab.tmpdir)
    finally:
        lab.down()
    stray.wait(timeout=5)
    _assert_gone(lab.tag, namespaces, [*pids, stray.pid], tmpdir)
    lab.down()  # idempotent


def test_two_labs_at_once_do_not_collide() -> None:
    if reason := skip_reason():
        pytest.skip(reason)
    with Lab() as a, Lab(clients=2) as b:
        assert set(a.namespaces).isdisjoint(b.namespaces)
        assert a.gw_lan_if != b.gw_lan_if
        assert a.curl("client", a.url("/ip", v6=False)).body == b"10.77.1.10\n"
        assert b.curl("client2", b.url("/ip", v6=False)).body == b"10.77.1.11\n"
        assert b.curl("client2", b.url("/ip", v6=True)).body == b"fd77:1::11\n"
        # Requests land only in their own lab's origin.
        assert all("10.77.1.11" not in line for line in a.origin_log())
        a.set_forwarding(False)
        assert b.curl("client", b.url("/ip"), *FAIL_FAST).status == 200
    _assert_gone(a.tag, a.namespaces, [], None)
    _assert_gone(b.tag, b.namespaces, [], None)


def test_cleanup_stale_removes_crashed_owner() -> None:
    if reason := skip_reason():
        pytest.skip(reason)
    tag = os.urandom(3).hex()
    code = (
        "import sys, time\n"
        "from tests.lab import Lab\n"
        f"Lab({tag!r}).up()\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "up\n"
        state = json.loads((STATE_DIR / f"{tag}.json").read_text())
        nginx_pids = [p["pid"] for p in state["procs"]]
        assert nginx_pids and all(_pid_alive(p) for p in nginx_pids)
        owner.kill()  # a crash: no teardown runs
        owner.wait()
        assert (NETNS_RUN / f"tpl-{tag}-gw").exists()
        Lab.cleanup_stale()  # a concurrent run may have beaten us to it: either way it is gone
        _assert_gone(tag, state["namespaces"], nginx_pids, state["tmpdir"])
    finally:
        owner.kill()
        owner.wait()
        Lab.down_tag(tag)


def test_cli_up_exec_down() -> None:
    if reason := skip_reason():
        pytest.skip(reason)
    tag = "cli" + os.urandom(3).hex()
    script = f"""
        set -euo pipefail
        T=$(scripts/lab up --tag {tag} --clients 2)
        [ "$T" = {tag} ]
        scripts/lab list | grep "^$T" >/dev/null
        scripts/lab exec "$T" client2 -- curl -sS --max-time 5 -4 http://origin.lab/ip
        scripts/lab exec "$T" gateway -- sysctl -n net.ipv4.ip_forward
        scripts/lab down "$T"
    """
    try:
        res = subprocess.run(
            ["bash", "-c", textwrap.dedent(script)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["10.77.1.11", "1"]
        _assert_gone(
            tag, [f"tpl-{tag}-c1", f"tpl-{tag}-c2", f"tpl-{tag}-gw", f"tpl-{tag}-or"], [], None
        )
    finally:
        Lab.down_tag(tag)


@pytest.mark.parametrize("lab", [2], indirect=True)
def test_fixture_takes_client_count(lab: Lab) -> None:
    assert lab.ns("client2") == lab.namespaces[1]
    assert lab.curl("client2", lab.url("/ip", v6=True)).body == b"fd77:1::11\n"
    with pytest.raises(Exception, match="unknown lab host"):
        lab.ns("client3")


def test_fixtures_tear_down_after_a_failing_test(tmp_path: Path) -> None:
    if reason := skip_reason():
        pytest.skip(reason)
    record = tmp_path / "tags"
    (tmp_path / "test_fails.py").write_text(
        textwrap.dedent(
            f"""
            from tests.conftest import lab, lab_module

            def test_a(lab, lab_module):
                with open({str(record)!r}, "a") as f:
                    f.write(lab.tag + " " + lab_module.tag + "\\n")
                assert False, "deliberate"
            """
        )
    )
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "deliberate" in res.stdout and res.returncode == 1, res.stdout + res.stderr
    tags = record.read_text().split()
    assert len(tags) == 2 and tags[0] != tags[1]
    for tag in tags:
        ns = [f"tpl-{tag}-{h}" for h in ("c1", "gw", "or")]
        _assert_gone(tag, ns, [], None)
