"""The HTTP cache in the lab: the real daemon between curl and an origin that counts requests."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
from collections.abc import Iterator

import pytest

from tests.lab import Lab, origin_file_bytes
from tests.proxy import APP_PORT, Origin, Proxy, through_proxy

pytestmark = pytest.mark.lab

CONFIG = f"""
[proxy]
ports = [80, {APP_PORT}]
"""


@pytest.fixture(scope="module")
def env(lab_module: Lab) -> Iterator[tuple[Lab, Proxy, Origin]]:
    with through_proxy(lab_module, CONFIG) as (proxy, origin):
        yield lab_module, proxy, origin


def app(lab: Lab, path: str) -> str:
    return f"http://{lab.origin_v4}:{APP_PORT}{path}"


def results(proxy: Proxy, needle: str, count: int | None = None) -> list[str]:
    """Squid result codes of the access-log lines whose URL contains ``needle``.

    The daemon writes a line just after the response, so a client can be done a moment before
    it appears: wait (briefly) for ``count`` lines, by default as many requests as the test's
    curls made for that URL.
    """
    deadline = time.monotonic() + 3.0
    while True:
        found = [line.split()[3] for line in proxy.log_lines() if needle in line.split()[6]]
        if count is None or len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def origin_hits(origin: Origin, target: str) -> int:
    return sum(1 for r in origin.requests() if r.get("target") == target)


def test_second_request_is_a_memory_hit(env: tuple[Lab, Proxy, Origin]) -> None:
    lab, proxy, _ = env
    url = lab.url("/files/1k?t=hit", v6=False)
    first = lab.curl("client", url)
    second = lab.curl("client", url, "-D", "/dev/stderr")
    assert first.status == second.status == 200
    assert first.body == second.body == origin_file_bytes("1k")
    assert results(proxy, "/files/1k?t=hit", 2) == ["TCP_MISS/200", "TCP_MEM_HIT/200"]
    # The origin (nginx) saw exactly one request for it.
    assert sum("/files/1k?t=hit" in line for line in lab.origin_log()) == 1
    # A hit carries an Age field (RFC 9111 §5.1) and no X-Cache (off by default).
    assert "age:" in second.stderr.lower()
    assert "x-cache" not in second.stderr.lower()


def test_head_is_answered_from_a_stored_get(env: tuple[Lab, Proxy, Origin]) -> None:
    lab, proxy, _ = env
    url = lab.url("/files/1k?t=head", v6=False)
    assert lab.curl("client", url).status == 200
    head = lab.curl("client", url, "-I")
    assert head.status == 200
    assert b"content-length: 1024" in head.body.lower()
    assert results(proxy, "/files/1k?t=head", 2) == ["TCP_MISS/200", "TCP_MEM_HIT/200"]


def test_range_requests_from_a_complete_stored_object(env: tuple[Lab, Proxy, Origin]) -> None:
    lab, _proxy, _ = env
    url = lab.url("/files/64k?t=range", v6=False)
    assert lab.curl("client", url).status == 200
    part = lab.curl("client", url, "-r", "100-199", "-D", "/dev/stderr")
    assert part.status == 206
    assert part.body == origin_file_bytes("64k")[100:200]
    assert "content-range: bytes 100-199/65536" in part.stderr.lower()
    tail = lab.curl("client", url, "-r", "-10")
    assert tail.status == 206 and tail.body == origin_file_bytes("64k")[-10:]
    bad = lab.curl("client", url, "-r", "70000-", "-D", "/dev/stderr")
    assert bad.status == 416
    assert "content-range: bytes */65536" in bad.stderr.lower()
    assert sum("/files/64k?t=range" in line for line in lab.origin_log()) == 1


def test_client_conditional_is_answered_from_cache(env: tuple[Lab, Proxy, Origin]) -> None:
    lab, proxy, _ = env
    url = lab.url("/files/1k?t=ims", v6=False)
    first = lab.curl("client", url, "-D", "/dev/stderr")
    etag = next(
        line.split(":", 1)[1].strip()
        for line in first.stderr.splitlines()
        if line.lower().startswith("etag:")
    )
    res = lab.curl("client", url, "-H", f"If-None-Match: {etag}")
    assert res.status == 304 and res.body == b""
    assert results(proxy, "/files/1k?t=ims", 2)[-1] == "TCP_IMS_HIT/304"


def test_revalidation_304_and_200(env: tuple[Lab, Proxy, Origin]) -> None:
    lab, proxy, origin = env
    assert lab.curl("client", app(lab, "/set?etag=%22a1%22&cc=max-age%3D0")).status == 200
    first = lab.curl("client", app(lab, "/v"))
    assert first.status == 200 and first.body.startswith(b'version "a1"')
    # Stale at once (max-age=0): the cache asks the origin with its validator, gets 304, and
    # serves the stored body.
    again = lab.curl("client", app(lab, "/v"))
    assert again.status == 200 and again.body == first.body
    reval = [r for r in origin.requests() if r.get("target") == "/v"][-1]
    assert ["If-None-Match", '"a1"'] in reval["headers"]
    assert results(proxy, "/v", 2)[-1] == "TCP_REFRESH_UNMODIFIED/200"
    # The representation changes: the conditional gets a 200, which replaces the stored one.
    assert lab.curl("client", app(lab, "/set?etag=%22a2%22")).status == 200
    changed = lab.curl("client", app(lab, "/v"))
    assert changed.status == 200 and changed.body.startswith(b'version "a2"')
    assert results(proxy, "/v", 3)[-1] == "TCP_REFRESH_MODIFIED/200"


def test_vary_keeps_variants_apart(env: tuple[Lab, Proxy, Origin]) -> None:
    lab, proxy, origin = env
    en1 = lab.curl("client", app(lab, "/vary"), "-H", "Accept-Language: en")
    de1 = lab.curl("client", app(lab, "/vary"), "-H", "Accept-Language: de")
    en2 = lab.curl("client", app(lab, "/vary"), "-H", "Accept-Language:   en")  # normalised
    de2 = lab.curl("client", app(lab, "/vary"), "-H", "Accept-Language: de")
    assert en1.body.startswith(b"lang=en") and de1.body.startswith(b"lang=de")
    assert en2.body == en1.body and de2.body == de1.body
    assert origin_hits(origin, "/vary") == 2
    assert results(proxy, "/vary", 4) == ["TCP_MISS/200", "TCP_MISS/200"] + ["TCP_MEM_HIT/200"] * 2


def test_unsafe_method_invalidates(env: tuple[Lab, Proxy, Origin]) -> None:
    lab, proxy, _origin = env
    one = lab.curl("client", app(lab, "/inv"))
    assert lab.curl("client", app(lab, "/inv")).body == one.body  # a hit
    assert lab.curl("client", app(lab, "/inv"), "-X", "POST", "-d", "x").status == 200
    after = lab.curl("client", app(lab, "/inv"))
    assert after.body != one.body  # RFC 9111 §4.4: the POST's 200 invalidated the entry
    assert results(proxy, "/inv", 4)[-1] == "TCP_MISS/200"


def test_collapsed_forwarding(env: tuple[Lab, Proxy, Origin]) -> None:
    lab, _proxy, origin = env
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(lab.curl, "client", app(lab, "/count?ms=700")) for _ in range(6)]
        replies = [f.result() for f in futures]
    assert all(r.status == 200 for r in replies)
    assert len({r.body for r in replies}) == 1
    # Six clients, one upstream request (RFC 9111 does not require it; origins are grateful).
    assert origin_hits(origin, "/count?ms=700") == 1


def test_forged_host_cannot_poison_other_clients(env: tuple[Lab, Proxy, Origin]) -> None:
    lab, _proxy, _origin = env
    evil = "10.77.2.81"
    lab.run("origin", ["ip", "addr", "add", f"{evil}/24", "dev", "eth0"])
    try:
        # The attacker asks its "own" server for the victim's URL (Host: origin.lab).
        forged = lab.curl(
            "client", f"http://{evil}:{APP_PORT}/whoami", "-H", f"Host: origin.lab:{APP_PORT}"
        )
        assert forged.body == f"served by {evil}".encode()
        # A normal client asks for the real thing and must get the real origin's answer.
        honest = lab.curl("client", f"http://origin.lab:{APP_PORT}/whoami", "-4")
        assert honest.body == f"served by {lab.origin_v4}".encode()
    finally:
        lab.run("origin", ["ip", "addr", "del", f"{evil}/24", "dev", "eth0"])


def test_restart_keeps_a_warm_disk_cache_and_kill9_never_serves_a_torn_object(
    lab: Lab,
) -> None:
    origin = Origin(lab)
    assert lab.tmpdir is not None
    config = CONFIG + (
        f'\n[cache]\ndisk_dir = "{lab.tmpdir}/cache"\n'
        'memory_size = "2MiB"\nmax_memory_object_size = "64KiB"\n'
    )
    proxy = Proxy(lab, config)
    config_path = proxy.config_path.read_text()
    proxy.start()
    big = lab.url("/files/16m?t=disk", v6=False)
    assert lab.curl("client", big).body == origin_file_bytes("16m")
    # A slow large download is being stored when the daemon is killed.
    slow = app(lab, "/slowbig?size=4194304&step=65536&ms=100")
    downloader = lab.popen("client", ["curl", "-s", "-o", "/dev/null", slow])
    time.sleep(1.0)
    proxy.stop(signal.SIGKILL)
    downloader.wait(10)
    proxy.tproxy("rules", "flush")

    restarted = Proxy(lab, "")
    restarted.config_path.write_text(config_path)  # same cache directory
    restarted.start()
    try:
        again = lab.curl("client", big)
        assert again.body == origin_file_bytes("16m")
        assert results(restarted, "/files/16m?t=disk", 1) == ["TCP_HIT/200"]
        whole = lab.curl("client", slow, timeout=30)
        assert len(whole.body) == 4194304
        assert whole.body == bytes(i % 251 for i in range(4194304))
        # The torn object was not served: the restarted daemon fetched it (a miss).
        assert results(restarted, "/slowbig", 1)[0] == "TCP_MISS/200"
        assert [r["target"] for r in origin.requests()].count(
            "/slowbig" + slow.split("/slowbig")[1]
        ) == 2
    finally:
        restarted.stop()


def test_stale_while_revalidate_serves_stale_and_refreshes_behind(
    env: tuple[Lab, Proxy, Origin],
) -> None:
    lab, proxy, origin = env
    cc = "max-age%3D1%2C%20stale-while-revalidate%3D30"
    assert lab.curl("client", app(lab, f"/set?etag=%22s1%22&cc={cc}")).status == 200
    first = lab.curl("client", app(lab, "/v?swr"))
    assert first.body.startswith(b'version "s1"')
    assert lab.curl("client", app(lab, "/set?etag=%22s2%22")).status == 200
    time.sleep(1.5)  # now stale, but within stale-while-revalidate
    stale = lab.curl("client", app(lab, "/v?swr"))
    assert stale.body == first.body  # served at once from the cache (RFC 5861 §3)
    deadline = time.monotonic() + 5
    while origin_hits(origin, "/v?swr") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert origin_hits(origin, "/v?swr") == 2  # the background revalidation
    time.sleep(0.3)
    fresh = lab.curl("client", app(lab, "/v?swr"))
    assert fresh.body.startswith(b'version "s2"')
    assert results(proxy, "/v?swr", 3)[1:] == ["TCP_MEM_HIT/200", "TCP_MEM_HIT/200"]


def test_failed_upstream_transfer_is_not_stored(env: tuple[Lab, Proxy, Origin]) -> None:
    lab, _proxy, origin = env
    broken = lab.curl("client", app(lab, "/dies"))
    assert len(broken.body) < 1048576  # the client sees a short body, not a complete one
    lab.curl("client", app(lab, "/dies"))
    assert origin_hits(origin, "/dies") == 2  # nothing was stored: a miss again


def test_a_leaving_client_does_not_abort_a_store_others_wait_for(
    env: tuple[Lab, Proxy, Origin],
) -> None:
    lab, proxy, origin = env
    url = app(lab, "/slowbig?size=1048576&step=65536&ms=60")  # about one second
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # The first client gives up after 0.3 s; the second is collapsed onto its fetch.
        quitter = pool.submit(lab.curl, "client", url, timeout=0.3)
        time.sleep(0.1)
        waiter = pool.submit(lab.curl, "client", url, timeout=10)
        assert len(quitter.result().body) < 1048576
        whole = waiter.result()
    assert whole.status == 200 and len(whole.body) == 1048576
    assert whole.body == bytes(i % 251 for i in range(1048576))
    assert origin_hits(origin, "/slowbig?size=1048576&step=65536&ms=60") == 1
    assert lab.curl("client", url).body == whole.body
    assert results(proxy, "slowbig?size=1048576", 3)[-1] == "TCP_MEM_HIT/200"


def test_cache_stats_purge_and_x_cache(lab: Lab) -> None:
    Origin(lab)
    with Proxy(lab, CONFIG + "\n[cache]\nx_cache_header = true\n") as proxy:
        url = lab.url("/files/1k?t=cli", v6=False)
        miss = lab.curl("client", url, "-D", "/dev/stderr")
        hit = lab.curl("client", url, "-D", "/dev/stderr")
        assert "x-cache: miss" in miss.stderr.lower()
        assert "x-cache: hit" in hit.stderr.lower()
        sock = str(proxy.control_socket)
        stats = json.loads(proxy.tproxy("cache", "stats", "--json", "--socket", sock).stdout)
        assert stats["objects"] >= 1 and stats["hits"] >= 1 and stats["hit_ratio"] > 0
        out = proxy.tproxy("cache", "purge", url, "--socket", sock).stdout
        assert "purged 1 object" in out
        again = lab.curl("client", url, "-D", "/dev/stderr")
        assert "x-cache: miss" in again.stderr.lower()
        out = proxy.tproxy("cache", "purge", "--all", "--socket", sock).stdout
        assert "purged" in out
        assert (
            json.loads(proxy.tproxy("cache", "stats", "--json", "--socket", sock).stdout)["objects"]
            == 0
        )


def test_requests_by_name_hit_before_and_after_the_host_check(
    env: tuple[Lab, Proxy, Origin],
) -> None:
    # The first request is stored under a destination key (the Host is not verified yet); once
    # the Host is known to resolve to the destination, the same object is still found.
    lab, proxy, origin = env
    url = f"http://origin.lab:{APP_PORT}/inv?byname"
    bodies = [lab.curl("client", url, "-4").body for _ in range(3)]
    assert len(set(bodies)) == 1
    assert origin_hits(origin, "/inv?byname") == 1
    assert results(proxy, "/inv?byname", 3) == ["TCP_MISS/200"] + ["TCP_MEM_HIT/200"] * 2
