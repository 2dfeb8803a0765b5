"""Content filter figures: verdict cost with a big list, NFQUEUE packet rate, HTTPS throughput.

    .venv/bin/python scripts/bench_filter.py [--domains 1000000] [--packets 40000]
                                             [--download-mb 256] [--rounds 3] [--skip-lab]
                                             [--https-only]

1. **Lookup** — a category list of ``--domains`` random names is written, loaded with
   ``load_categories`` (the daemon does this in a worker thread) and compiled; then request and
   SNI verdicts are timed for hits and misses.
2. **Queue** — in a scratch network namespace, raw TCP packets (SYN + ClientHello per flow) are
   queued in OUTPUT to an :class:`~tproxy.nfqueue.SniQueue` on a uvloop loop with a real policy;
   we report the packets per second the shell gives verdicts for (two per flow: the SYN and the
   ClientHello, each with a full parse and, for the hello, a policy decision).
3. **HTTPS** — in the netns lab, ``openssl s_server -WWW`` serves a file; curl downloads it
   routed (no daemon) and through the gateway with the daemon queueing HTTPS for SNI. Only the
   first packets of a flow touch user space, so the two should be within a few percent.
   Throughput on a shared machine is noisy (other work moves it by ±40 %), so when ``perf``
   is installed we also report CPU time per GB: the ``task-clock`` of curl and of s_server,
   which includes the softirq work done in their context — on veth that is most of the
   gateway's forwarding, netfilter rules and conntrack included. It varies by a few percent
   where throughput varies by tens.

Needs root. Only loopback and namespaces this script creates are used.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import os
import random
import resource
import secrets
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tproxy.config import parse  # noqa: E402
from tproxy.filter.categories import load_categories  # noqa: E402
from tproxy.filter.component import filter_config  # noqa: E402
from tproxy.filter.verdict import Policy, RequestInfo  # noqa: E402

CLONE_NEWNET = 0x40000000
QUEUE = 9
# Seconds between a daemon's rules appearing and the download: its start-up work would
# otherwise compete for the two CPUs with the transfer being measured.
SETTLE = 2.0


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_domain(rng: random.Random) -> str:
    label = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(5, 12)))
    return f"{label}{rng.randint(0, 99999)}.{rng.choice(['com', 'net', 'org', 'example'])}"


def bench_lookup(n: int) -> Policy:
    rng = random.Random(1)
    tmp = Path(tempfile.mkdtemp(prefix="tproxy-bench-"))
    (tmp / "big").mkdir()
    names = [random_domain(rng) for _ in range(n)]
    (tmp / "big" / "domains").write_text("\n".join(names) + "\n")
    before = rss_mb()
    t0 = time.perf_counter()
    result = load_categories(tmp, ["big"])
    load_s = time.perf_counter() - t0
    data = {
        "filter": {
            "categories_dir": str(tmp),
            "rule": [
                {"group": "*", "action": "deny", "domains": ["bad.example"]},
                {"group": "*", "action": "deny", "categories": ["big"]},
            ],
        }
    }
    import tproxy.filter  # noqa: F401  (registers the [filter] section)

    fcfg = filter_config(parse(data))
    t0 = time.perf_counter()
    policy = Policy.compile(fcfg, result.categories)
    compile_s = time.perf_counter() - t0
    print(f"lookup: {n} domains loaded in {load_s:.2f} s (+{rss_mb() - before:.0f} MB peak RSS),")
    print(f"        compiled in {compile_s * 1000:.1f} ms")
    now = datetime.now()
    hits = [f"www.{rng.choice(names)}" for _ in range(2000)]
    misses = [random_domain(rng) + ".other" for _ in range(2000)]
    for label, hosts in (("hit", hits), ("miss", misses)):
        infos = [
            RequestInfo("10.0.0.9", None, "GET", "", f"http://{h}/some/path?q=1", "curl", now)
            for h in hosts
        ]
        rounds = 10
        t0 = time.perf_counter()
        for _ in range(rounds):
            for info in infos:
                policy.request_verdict(info)
        http_us = (time.perf_counter() - t0) / (rounds * len(infos)) * 1e6
        t0 = time.perf_counter()
        for _ in range(rounds):
            for h in hosts:
                policy.sni_verdict("10.0.0.9", h, now)
        sni_us = (time.perf_counter() - t0) / (rounds * len(hosts)) * 1e6
        print(f"        {label:4s}: request verdict {http_us:.2f} µs, SNI verdict {sni_us:.2f} µs")
    sample = policy.sni_verdict("10.0.0.9", hits[0], now)
    assert sample.action == "deny", sample
    subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return policy


# -- queue throughput -------------------------------------------------------------------------


def enter_netns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


def tcp_packet(sport: int, seq: int, flags: int, payload: bytes) -> bytes:
    import struct

    from tproxy.nfqueue import _checksum

    src = dst = socket.inet_aton("127.0.0.1")
    tcp = struct.pack("!HHIIBBHHH", sport, 443, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload
    csum = _checksum(src + dst + struct.pack("!xBH", 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0) + src + dst
    return ip + tcp


def client_hello(name: str) -> bytes:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=name)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def bench_queue(policy: Policy, packets: int) -> None:
    import uvloop

    from tproxy.nfqueue import FlowDecision, SniQueue

    name = f"tpbf-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        ipt = ["ip", "netns", "exec", name, "iptables", "-A", "OUTPUT", "-p", "tcp"]
        # A re-injected packet (NF_REPEAT) carries its verdict mark: let it pass, as the
        # daemon's connmark rules do.
        subprocess.run([*ipt, "-m", "mark", "!", "--mark", "0/0x6", "-j", "ACCEPT"], check=True)
        subprocess.run(
            [*ipt, "--dport", "443", "-j", "NFQUEUE", "--queue-num", str(QUEUE), "--queue-bypass"],
            check=True,
        )
        now = datetime.now()

        def decide(
            client: str, mac: str | None, srv: str, port: int, sni: str | None, ech: bool, why: str
        ) -> FlowDecision:
            return FlowDecision(policy.sni_verdict(client, sni, now, ech=ech).allowed)

        hellos = [client_hello(n) for n in ("www.allowed.example", "bad.example")]
        flows = packets // 2
        stream = []
        for i in range(flows):
            sport = 1024 + i % 60000
            seq = random.getrandbits(32)
            stream.append(tcp_packet(sport, seq, 0x02, b""))
            stream.append(tcp_packet(sport, (seq + 1) % 2**32, 0x18, hellos[i % 2]))

        result: dict[str, float] = {}

        def run() -> None:
            enter_netns(name)  # this thread only: the queue socket and raw socket live there
            queue = SniQueue(QUEUE, decide)
            # The RST would go to 127.0.0.1:443 where nothing listens; keep the figure about
            # the queue path.
            queue.rst.send = lambda seg: None  # type: ignore[method-assign]
            loop = uvloop.new_event_loop()
            queue.open()
            queue.attach(loop)
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)

            async def main() -> None:
                done = asyncio.Event()

                def sender() -> None:
                    for pkt in stream:
                        while True:
                            try:
                                raw.sendto(pkt, ("127.0.0.1", 0))
                                break
                            except OSError as exc:
                                # A full socket buffer (ENOBUFS): wait for the reader.
                                if exc.errno not in (errno.ENOBUFS, errno.EAGAIN):
                                    raise
                                time.sleep(0.0005)

                async def watch() -> None:
                    while queue.inspector.stats.packets < len(stream):
                        await asyncio.sleep(0.01)
                    done.set()

                t0 = time.perf_counter()
                th = threading.Thread(target=sender)
                th.start()
                try:
                    await asyncio.wait_for(watch(), 60)
                finally:
                    th.join()
                result["seconds"] = time.perf_counter() - t0
                result["got"] = queue.inspector.stats.packets
                result["reset"] = queue.inspector.stats.reset
                result["batches"] = queue.stats.batches

            try:
                loop.run_until_complete(main())
            finally:
                queue.close()
                raw.close()
                loop.close()

        th = threading.Thread(target=run)
        th.start()
        th.join()
        pps = result["got"] / result["seconds"]
        print(
            f"queue:  {int(result['got'])} packets ({flows} flows, SYN + ClientHello) in "
            f"{result['seconds']:.2f} s = {pps:,.0f} packets/s, {pps / 2:,.0f} new HTTPS flows/s "
            f"({int(result['reset'])} reset, {int(result['batches'])} loop callbacks)"
        )
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


# -- HTTPS throughput in the lab ---------------------------------------------------------------


def bench_https(size_mb: int, rounds: int) -> None:
    from tests.lab import Lab
    from tests.proxy import Proxy

    with Lab() as lab:
        assert lab.tmpdir is not None
        d = lab.tmpdir / "tls"
        d.mkdir()
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             "/CN=lab", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
            check=True, capture_output=True,
        )  # fmt: skip
        with (d / "big.bin").open("wb") as fh:
            chunk = os.urandom(1 << 20)
            for _ in range(size_mb):
                fh.write(chunk)
        server = lab.popen(
            "origin",
            ["openssl", "s_server", "-accept", "443", "-cert", str(d / "cert.pem"), "-key",
             str(d / "key.pem"), "-WWW", "-quiet"],
            cwd=str(d), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        lab.wait_port("origin", 443)
        perf = shutil.which("perf")
        config = (
            '[filter]\n[[filter.rule]]\ngroup = "*"\naction = "deny"\ndomains = ["bad.example"]\n'
        )

        def task_ms(path: Path) -> float:
            # perf stat -x, lines: value,unit,event,...
            for line in path.read_text().splitlines():
                fields = line.split(",")
                if len(fields) > 2 and fields[2] == "task-clock":
                    return float(fields[0])
            raise RuntimeError(f"no task-clock in {path}: {path.read_text()!r}")

        def download() -> tuple[float, float | None]:
            """Mbit/s, and CPU ms per GB of curl + s_server (None without perf)."""
            argv = [
                "curl", "-sS", "-k", "--noproxy", "*", "-o", "/dev/null", "-w",
                "%{speed_download}", "--resolve", f"dl.example:443:{lab.origin_v4}",
                "https://dl.example/big.bin",
            ]  # fmt: skip
            if perf is None:
                res = lab.run("client", argv, timeout=300)
                return float(res.stdout) * 8 / 1e6, None
            srv_stat, cli_stat = d / "server.stat", d / "client.stat"
            stat = [perf, "stat", "-x,", "-e", "task-clock"]
            watcher = subprocess.Popen(
                [*stat, "-p", str(server.pid), "-o", str(srv_stat)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                time.sleep(0.2)  # perf attaches
                res = lab.run("client", [*stat, "-o", str(cli_stat), *argv], timeout=300)
            finally:
                watcher.send_signal(signal.SIGINT)
                watcher.wait(10)
            cpu = (task_ms(srv_stat) + task_ms(cli_stat)) * 1024 / size_mb
            return float(res.stdout) * 8 / 1e6, cpu

        # "tproxy only": the daemon without filter rules (TPROXY for port 80, no queue), to
        # tell the cost of the base rules from the cost of the SNI filter's rules.
        configs = {"tproxy only": "", "SNI filter": config}
        figures: dict[str, list[tuple[float, float | None]]] = {
            "routed": [],
            **{k: [] for k in configs},
        }
        for _ in range(rounds):
            figures["routed"].append(download())
            for label, text in configs.items():
                proxy = Proxy(lab, text).start()
                time.sleep(SETTLE)  # the daemon finishes starting before the clock runs
                try:
                    assert ("NFQUEUE" in proxy.rules()) == bool(text)
                    figures[label].append(download())
                    if text:
                        blocked = lab.curl(
                            "client", "https://bad.example/", "-k", "--resolve",
                            f"bad.example:443:{lab.origin_v4}",
                        )  # fmt: skip
                        assert blocked.status == 0, "bad.example was not blocked"
                finally:
                    proxy.stop()

        def med(label: str, i: int) -> float:
            return statistics.median(v[i] or 0.0 for v in figures[label])

        routed, routed_cpu = med("routed", 0), med("routed", 1)
        cpu_note = f", {routed_cpu:,.0f} CPU ms/GB" if perf else ""
        print(f"https:  {size_mb} MB download, median of {rounds}: routed {routed:,.0f} Mbit/s"
              f"{cpu_note}")  # fmt: skip
        for label in configs:
            mbit, cpu = med(label, 0), med(label, 1)
            if perf:
                cpu_note = f", {cpu:,.0f} CPU ms/GB ({(cpu / routed_cpu - 1) * 100:+.1f} %)"
            print(f"        through the gateway, {label}: {mbit:,.0f} Mbit/s "
                  f"({(mbit / routed - 1) * 100:+.1f} %){cpu_note}")  # fmt: skip
        for label, values in figures.items():
            print(f"        {label}: {', '.join(f'{v[0]:,.0f}' for v in values)} Mbit/s", end="")
            print(f"; {', '.join(f'{v[1]:,.0f}' for v in values)} ms/GB" if perf else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", type=int, default=1_000_000)
    p.add_argument("--packets", type=int, default=40_000)
    p.add_argument("--download-mb", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-lab", action="store_true", help="only the lookup figures")
    p.add_argument("--https-only", action="store_true", help="only the HTTPS download figures")
    args = p.parse_args()
    if args.https_only:
        bench_https(args.download_mb, args.rounds)
        return 0
    policy = bench_lookup(args.domains)
    if not args.skip_lab:
        bench_queue(policy, args.packets)
        bench_https(args.download_mb, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
