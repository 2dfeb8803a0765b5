"""The demo behind ``scripts/demo``: tproxy on a lab gateway, shown with real curl."""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.lab import Lab
from tests.proxy import Proxy

BOLD = "\033[1m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""


def step(text: str) -> None:
    print(f"\n{BOLD}==> {text}{RESET}", flush=True)


def show(label: str, value: str) -> None:
    print(f"    {label:<22} {value}", flush=True)


def demo_config(lab: Lab, cache_dir: Path) -> str:
    return textwrap.dedent(
        f"""
        [proxy]
        lan_interfaces = ["{lab.gw_lan_if}"]

        [cache]
        disk_dir = "{cache_dir}"

        # Every client, every time: blocked.lab is not allowed.
        [[filter.rule]]
        group = "*"
        action = "deny"
        domains = ["blocked.lab"]

        # Downloads (by content type) share 2 Mbit/s; everything else gets 50 Mbit/s.
        [shaping]
        enabled = true
        default_class = "web"

        [[shaping.class]]
        name = "web"
        rate = "50mbit"

        [[shaping.class]]
        name = "downloads"
        rate = "2mbit"
        ceil = "2mbit"

        [[shaping.select]]
        class = "downloads"
        content_type = "application/octet-stream"
        """
    )


def main() -> int:
    lab = Lab()
    failed = False
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        step(f"Building the lab (namespaces tpl-{lab.tag}-*): client -> gateway -> origin")
        lab.up()
        show("client", f"{lab.client_v4}  {lab.client_v6}")
        show(
            "gateway LAN / WAN",
            f"{lab.gw_lan_if} {lab.gw_lan_v4} / {lab.gw_wan_if} {lab.gw_wan_v4}",
        )
        show("origin (nginx)", f"{lab.origin_v4}  {lab.origin_v6}  name {lab.origin_name}")

        assert lab.tmpdir is not None
        proxy = Proxy(lab, demo_config(lab, Path(lab.tmpdir) / "cache"))
        step("Starting tproxy on the gateway: tproxy run -i " + lab.gw_lan_if)
        proxy.start()
        for line in proxy.rules().splitlines():
            if line.startswith("-A TPROXY-PRE") and "TPROXY --on-port" in line:
                show("kernel rule", line)
                break

        step("IP forwarding off on the gateway: only intercepted traffic can pass now")
        lab.set_forwarding(False)

        step("The client (no proxy settings) fetches http://origin.lab/ip over IPv4 and IPv6")
        for v6 in (False, True):
            res = lab.curl("client", lab.url("/ip", v6=v6))
            fam = "IPv6" if v6 else "IPv4"
            show(f"{fam} status", str(res.status))
            saw = res.body.decode(errors="replace").strip()
            show(f"{fam} origin saw", saw or res.stderr)
            failed |= res.status != 200 or saw != (lab.client_v6 if v6 else lab.client_v4)

        step("A cacheable file twice: the second answer comes from tproxy's cache (RFC 9111)")
        url = lab.url("/files/64k", v6=False)
        for attempt in ("first", "second"):
            res = lab.curl("client", url)
            show(f"{attempt} request", f"{res.status}, {len(res.body)} bytes")
            failed |= res.status != 200
        codes = [line.split()[3] for line in proxy.log_lines(4) if "/files/64k" in line]
        show("cache result codes", ", ".join(codes))
        failed |= codes[-1:] != ["TCP_MEM_HIT/200"]
        origin_saw = sum("/files/64k" in line for line in lab.origin_log())
        show("origin saw", f"{origin_saw} request(s) for it")
        failed |= origin_saw != 1

        step("A blocked site: tproxy answers with its block page; the origin never sees it")
        blocked = lab.curl(
            "client", "http://blocked.lab/", "--resolve", f"blocked.lab:80:{lab.origin_v4}"
        )
        title = blocked.body.decode(errors="replace").split("<title>")[-1].split("</title>")[0]
        show("status", str(blocked.status))
        show("block page title", title.strip())
        reached = sum("blocked.lab" in line for line in lab.origin_log())
        show("origin saw", f"{reached} request(s) for it")
        failed |= blocked.status != 403 or reached != 0

        step("A shaped download: the 'downloads' class is capped at 2 Mbit/s by the kernel (HTB)")
        out = lab.run(
            "client",
            ["curl", "-s", "-o", "/dev/null", "--max-time", "3", "-w", "%{speed_download}",
             lab.url("/nocache/16m", v6=False)],
            check=False,
        ).stdout  # fmt: skip
        rate = float(out or 0) * 8 / 1e6
        show("measured at client", f"{rate:.2f} Mbit/s (class rate 2 Mbit/s)")
        failed |= not 1.6 <= rate <= 2.4
        shown = lab.run(
            "gateway",
            [sys.executable, "-m", "tproxy.cli", "shaping", "show", "-c", str(proxy.config_path)],
            check=False,
        ).stdout
        for line in shown.splitlines()[:6]:
            print("    " + line, flush=True)
        failed |= not any(line.strip().startswith("downloads") for line in shown.splitlines())

        step("tproxy's access log (Squid native format)")
        for line in proxy.log_lines(6):
            print("    " + line, flush=True)
            failed |= len(line.split()) != 10  # Squid's native format has ten fields

        step("Stopping tproxy: its rules go away and clients browse directly again")
        lab.set_forwarding(True)
        proxy.stop()
        left = [r for r in proxy.rules().splitlines() if "TPROXY" in r]
        show("tproxy rules left", str(len(left)))
        res = lab.curl("client", lab.url("/ip", v6=False))
        show("direct request", f"{res.status} (routed, not intercepted)")
        failed |= bool(left) or res.status != 200
    except Exception as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        failed = True
    finally:
        step("Tearing the lab down")
        lab.down()
    print("\ndemo " + ("FAILED" if failed else "finished: all steps as expected"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
