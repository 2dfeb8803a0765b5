"""Content filtering end to end: the real daemon in the lab gateway, real curl / openssl / TLS.

HTTP: a denied request gets the block page from the daemon and never reaches the origin (its
access log proves it); a MIME rule stops a response before its body reaches the client.
HTTPS: a threaded Python TLS origin with an ``openssl req`` certificate; the daemon reads the SNI from the queued ClientHello and
resets blocked flows in both directions. QUIC is rejected. Killing or stopping the daemon never
cuts HTTPS traffic.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import Lab
from tests.proxy import Proxy

pytestmark = pytest.mark.lab

TLS_PORT = 443
BIG_FILE = "big.bin"
BIG_SIZE = 8 * 1024 * 1024
DOWNLOAD_RATE = "3M"  # curl --limit-rate: the download lasts ~3 s, long enough to kill under it
TIMEOUT = 5.0


def filter_config(lists: Path, extra: str = "") -> str:
    return f"""
[filter]
default = "allow"
categories_dir = "{lists}"

[[filter.rule]]
group = "*"
action = "deny"
domains = ["bad.example"]

[[filter.rule]]
group = "*"
action = "deny"
url_prefix = ["http://origin.lab/nocache/"]
mime = ["application/octet-stream"]
{extra}
"""


TLS_SERVER = textwrap.dedent(
    """
    import http.server, ssl, sys
    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("0.0.0.0", port), Quiet)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.serve_forever()
    """
)


@pytest.fixture(scope="module")
def tls_lab(lab_module: Lab) -> Iterator[Lab]:
    """A TLS origin on origin:443 (a self-signed certificate made by ``openssl req``) serving
    index.html and a big file; threaded, so a download does not hold up other handshakes."""
    lab = lab_module
    assert lab.tmpdir is not None
    d = lab.tmpdir / "tls"
    d.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=lab", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    (d / BIG_FILE).write_bytes(bytes(range(256)) * (BIG_SIZE // 256))
    (d / "index.html").write_text("tls origin\n")
    proc = lab.popen(
        "origin",
        [sys.executable, "-c", TLS_SERVER, str(TLS_PORT), str(d / "cert.pem"), str(d / "key.pem")],
        cwd=str(d), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    lab.wait_port("origin", TLS_PORT)
    try:
        yield lab
    finally:
        proc.kill()
        proc.wait(5)


def https(lab: Lab, name: str, path: str = "/index.html", *args: str) -> tuple[int, bytes, str]:
    res = lab.curl(
        "client", f"https://{name}{path}", "-k", "--resolve", f"{name}:443:{lab.origin_v4}", *args
    )
    return res.status, res.body, res.stderr


def http(lab: Lab, name: str, path: str = "/") -> tuple[int, bytes]:
    res = lab.curl("client", f"http://{name}{path}", "--resolve", f"{name}:80:{lab.origin_v4}")
    return res.status, res.body


def lists_dir(lab: Lab, name: str = "lists") -> Path:
    assert lab.tmpdir is not None
    d = lab.tmpdir / name
    (d / "adult").mkdir(parents=True, exist_ok=True)
    return d


def wait_for(predicate: object, timeout: float = TIMEOUT) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


# -- HTTP ------------------------------------------------------------------------------------


def test_http_block_page_and_nothing_reaches_the_origin(lab_module: Lab) -> None:
    lab = lab_module
    with Proxy(lab, filter_config(lists_dir(lab))) as proxy:
        before = len(lab.origin_log())
        for name in ("bad.example", "x.bad.example"):
            status, body = http(lab, name, "/files/1k?secret")
            assert status == 403, name
            assert b"Access to this page is blocked" in body
            assert b"filter.rule[0]" in body and f"http://{name}/files/1k?secret".encode() in body
        # Suffix boundary: notbad.example is another domain.
        status, body = http(lab, "notbad.example", "/")
        assert status == 200 and body == b"origin.lab\n"
        origin = lab.origin_log(before + 1)
        assert len(origin) == before + 1, origin  # only the allowed request got there
        assert "secret" not in "\n".join(origin)
        lines = proxy.log_lines(3)
        denied = [x for x in lines if " TCP_DENIED/403 " in x]
        assert len(denied) == 2 and all("HIER_NONE/-" in x for x in denied), lines
        assert any(" TCP_MISS/200 " in x and "notbad.example" in x for x in lines)
        assert (
            "deny 10.77.1.10 GET http://bad.example/files/1k?secret: request by filter.rule[0]"
            in (proxy.stderr())
        )


def test_http_mime_rule_stops_the_body(lab_module: Lab) -> None:
    lab = lab_module
    with Proxy(lab, filter_config(lists_dir(lab))) as proxy:
        res = lab.curl("client", lab.url("/nocache/64k"))
        assert res.status == 403
        assert b"Access to this page is blocked" in res.body
        assert b"application/octet-stream" in res.body  # the reason names the type
        assert len(res.body) < 4096  # the block page, not a byte of the 64k file
        # The same connection style still works for allowed content afterwards.
        ok = lab.curl("client", lab.url("/files/64k"))
        assert ok.status == 200 and len(ok.body) == 64 * 1024
        lines = proxy.log_lines(2)
        assert any(" TCP_DENIED/403 " in x and "/nocache/64k" in x for x in lines), lines
        assert "response by filter.rule[1]" in proxy.stderr()


def test_categories_with_malformed_lines_and_reload(lab_module: Lab) -> None:
    lab = lab_module
    lists = lists_dir(lab, "cats")
    domains = lists / "adult" / "domains"
    domains.write_text(
        "porn.example\nbad line with spaces\n# comment\nx..y.example\nfine.example\n"
    )
    extra = '[[filter.rule]]\ngroup = "*"\naction = "deny"\ncategories = ["adult"]\n'
    with Proxy(lab, filter_config(lists, extra)) as proxy:
        err = proxy.stderr()
        assert f"{domains}:2:" in err and f"{domains}:4:" in err, err
        assert http(lab, "www.porn.example")[0] == 403
        assert http(lab, "fine.example")[0] == 403
        assert http(lab, "other.example")[0] == 200
        # SIGHUP re-reads the lists in a worker thread; then other.example is blocked too.
        domains.write_text("porn.example\nother.example\n")
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: proxy.stderr().count("reloaded") >= 1), proxy.stderr()
        assert http(lab, "other.example")[0] == 403
        assert http(lab, "fine.example")[0] == 200
        # A broken config is refused and the running policy stays.
        proxy.config_path.write_text("[filter]\ndefault = 'maybe'\n")
        proxy.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reload refused" in proxy.stderr()), proxy.stderr()
        assert http(lab, "other.example")[0] == 403
        assert http(lab, "bad.example")[0] == 403
        # So is a config whose category folder does not exist (the parser does no I/O: the
        # filter's loader finds it), with file, line and key; the new fine.example rule is
        # not adopted either.
        gone = (
            '[[filter.rule]]\ngroup = "*"\naction = "deny"\ndomains = ["fine.example"]\n'
            '[[filter.rule]]\ngroup = "*"\naction = "deny"\ncategories = ["gambling"]\n'
        )
        text = filter_config(lists, extra + gone)
        proxy.config_path.write_text(text)
        line = text.splitlines().index('categories = ["gambling"]') + 1
        proxy.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: proxy.stderr().count("reload refused") >= 2), proxy.stderr()
        where = f"{proxy.config_path}:{line}: filter.rule[4].categories[0]"
        assert f"{where}: no category 'gambling' in {lists}" in proxy.stderr()
        assert http(lab, "fine.example")[0] == 200
        assert http(lab, "other.example")[0] == 403


@pytest.mark.parametrize(
    ("now", "blocked"), [("2025-01-06T09:30", True), ("2025-01-11T09:30", False)]
)
def test_time_window_with_injected_clock(
    tls_lab: Lab, monkeypatch: pytest.MonkeyPatch, now: str, blocked: bool
) -> None:
    lab = tls_lab
    config = f"""
[filter]
categories_dir = "{lists_dir(lab)}"

[[filter.window]]
name = "school"
days = ["mon", "tue", "wed", "thu", "fri"]
hours = "08:00-16:00"

[[filter.rule]]
group = "*"
action = "deny"
window = "school"
domains = ["games.example"]
"""
    monkeypatch.setenv("TPROXY_FAKE_NOW", now)  # Monday 09:30 vs Saturday 09:30
    with Proxy(lab, config):
        assert http(lab, "games.example")[0] == (403 if blocked else 200)
        assert http(lab, "school.example")[0] == 200
        status, _, _ = https(lab, "games.example")
        assert (status == 0) is blocked


# -- HTTPS (SNI) -------------------------------------------------------------------------------


# The start of the client scripts below: hello(name) is the ClientHello Python's ssl would send
# for ``name`` (only built, never sent by ssl: the scripts send it the way they test).
HELLO_PY = textwrap.dedent(
    """
    import socket, ssl, sys, time

    def hello(name):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        out = ssl.MemoryBIO()
        obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return out.read()

    def outcome(s, send):
        # Run send(), then print how the server answered: its handshake, or our reset.
        try:
            send()
            data = s.recv(5)
            print("handshake" if data[:1] == b"\\x16" else "other %r" % data)
        except (ConnectionResetError, BrokenPipeError):
            print("reset")
        except socket.timeout:
            print("timeout")
    """
)

SPLIT_CLIENT = HELLO_PY + textwrap.dedent(
    """
    name, ip, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
    hello = hello(name)
    s = socket.create_connection((ip, 443), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.send(hello[:first])   # two TCP segments: the name is in the second one
    time.sleep(0.1)
    outcome(s, lambda: s.send(hello[first:]))
    """
)


def server_established(lab: Lab) -> list[str]:
    out = lab.run("origin", ["ss", "-Htn", "state", "established", "( sport = :443 )"]).stdout
    return [x for x in out.splitlines() if x.strip()]


def test_sni_block_allow_suffix_and_both_sides_reset(tls_lab: Lab) -> None:
    lab = tls_lab
    with Proxy(lab, filter_config(lists_dir(lab))) as proxy:
        assert "TPROXY-" in proxy.rules() and "NFQUEUE" in proxy.rules()
        for name, allowed in (
            ("good.example", True),
            ("bad.example", False),
            ("x.bad.example", False),
            ("notbad.example", True),
            ("BAD.example", False),
        ):
            status, body, err = https(lab, name)
            if allowed:
                assert status == 200 and body == b"tls origin\n", (name, err)
            else:
                assert status == 0 and ("reset" in err.lower() or "35" in err), (name, err)
        # The server side was reset too: nothing half-open waits for a ClientHello.
        assert wait_for(lambda: server_established(lab) == [], 2.0), server_established(lab)
        lines = proxy.log_lines(5)
        assert sum(" TCP_DENIED/403 " in x and "CONNECT" in x for x in lines) == 3, lines
        assert any(" TCP_TUNNEL/200 " in x and "good.example:443" in x for x in lines), lines
        assert "deny 10.77.1.10 TLS bad.example" in proxy.stderr()


def test_split_client_hello(tls_lab: Lab) -> None:
    lab = tls_lab
    with Proxy(lab, filter_config(lists_dir(lab))):
        for name, expect in (("bad.example", "reset"), ("good.example", "handshake")):
            out = lab.run(
                "client", [sys.executable, "-c", SPLIT_CLIENT, name, lab.origin_v4, "40"]
            ).stdout.strip()
            assert out == expect, (name, out)
        assert wait_for(lambda: server_established(lab) == [], 2.0)


def test_quic_is_rejected_while_the_daemon_runs(tls_lab: Lab) -> None:
    lab = tls_lab
    echo = lab.popen(
        "origin",
        [sys.executable, "-c", textwrap.dedent(
            """
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", 443))
            while True:
                data, peer = s.recvfrom(2048)
                s.sendto(data, peer)
            """
        )],
    )  # fmt: skip
    probe = textwrap.dedent(
        """
        import socket, sys
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        s.connect((sys.argv[1], 443))
        for _ in range(3):
            s.send(b"quic")
            try:
                print(s.recv(16).decode()); break
            except ConnectionRefusedError:
                print("refused"); break
            except socket.timeout:
                continue
        """
    )
    try:
        time.sleep(0.3)
        argv = [sys.executable, "-c", probe, lab.origin_v4]
        assert lab.run("client", argv).stdout.strip() == "quic"  # echo works when routed
        with Proxy(lab, filter_config(lists_dir(lab))):
            assert lab.run("client", argv).stdout.strip() == "refused"
        assert lab.run("client", argv).stdout.strip() == "quic"
    finally:
        echo.kill()
        echo.wait(5)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_dead_or_stopped_daemon_does_not_cut_https(tls_lab: Lab, how: signal.Signals) -> None:
    lab = tls_lab
    proxy = Proxy(lab, filter_config(lists_dir(lab))).start()
    try:
        assert https(lab, "bad.example")[0] == 0
        argv = [
            "curl", "-sS", "-k", "--noproxy", "*", "--limit-rate", DOWNLOAD_RATE,
            "--resolve", f"dl.example:443:{lab.origin_v4}", "-o", "-", "-w", "\n%{http_code}",
            "--max-time", "20", f"https://dl.example/{BIG_FILE}",
        ]  # fmt: skip
        download = lab.popen("client", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.0)
        assert download.poll() is None  # still in flight
        proxy.stop(how)
        # New HTTPS connections work at once: --queue-bypass with nobody on the queue (SIGKILL)
        # or no rules at all (SIGTERM).
        status, body, err = https(lab, "good.example")
        assert status == 200 and body == b"tls origin\n", err
        out, err_b = download.communicate(timeout=30)
        assert out.endswith(b"\n200"), err_b
        assert len(out) == BIG_SIZE + 4
    finally:
        proxy.stop(signal.SIGKILL)
        lab.run("gateway", [sys.executable, "-m", "tproxy.cli", "rules", "flush"], check=False)


def test_explain_cli_with_time(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text(
        f"""
[filter]
categories_dir = "{tmp_path}"
[[filter.window]]
name = "night"
hours = "22:00-06:00"
[[filter.rule]]
group = "*"
action = "deny"
window = "night"
domains = ["video.example"]
"""
    )
    base = [sys.executable, "-m", "tproxy.cli", "filter", "explain", "--config", str(config)]
    night = subprocess.run(
        [*base, "http://video.example/x", "--client", "10.0.0.5", "--time", "wed 23:15"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert night.returncode == 1, night.stderr
    assert "verdict: DENY by filter.rule[0]: domain video.example" in night.stdout
    assert "window night (mon,tue,wed,thu,fri,sat,sun 22:00-06:00): ACTIVE" in night.stdout
    day = subprocess.run(
        [*base, "https://video.example/", "--client", "10.0.0.5", "--time", "2025-01-08T12:00"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert day.returncode == 0, day.stderr
    assert "TLS server name video.example" in day.stdout
    assert "verdict: ALLOW" in day.stdout


def test_https_flows_are_shaped_by_their_sni(tls_lab: Lab) -> None:
    # The NFQUEUE verdict carries the shaping class (chosen by the ClientHello's name) in the
    # connmark; CLASSIFY in POSTROUTING then puts the whole forwarded HTTPS flow into it.
    lab = tls_lab
    config = """
[shaping]
enabled = true
default_class = "web"

[[shaping.class]]
name = "web"
rate = "200mbit"

[[shaping.class]]
name = "video"
rate = "2mbit"
ceil = "2mbit"

[[shaping.select]]
class = "video"
domains = ["videos.example"]
"""
    with Proxy(lab, config) as proxy:
        assert "NFQUEUE" in proxy.rules()

        def speed(name: str) -> float:
            res = lab.run(
                "client",
                ["curl", "-sk", "-o", "/dev/null", "--max-time", "4", "-w", "%{speed_download}",
                 "--resolve", f"{name}:443:{lab.origin_v4}", f"https://{name}/{BIG_FILE}"],
                check=False,
            )  # fmt: skip
            return float(res.stdout or 0) * 8

        video = speed("videos.example")
        other = speed("other.example")
    assert 1.6e6 <= video <= 2.3e6, video
    assert other > 10e6, other
