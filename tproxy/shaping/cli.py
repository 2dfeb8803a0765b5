"""``tproxy shaping show | plan``: the shaping classes with the kernel's live counters.

Runs as its own process and needs no daemon connection: the class names and rates come from
the config, the bytes, drops and rates from the HTB classes in the kernel (netlink), which
carry the numbering the config implies (:func:`tproxy.shaping.model.build_plan`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from tproxy.shaping.model import UNSHAPED_CLASSID, class_rows, format_show, render_plan

# Seconds between the two counter reads that give the "now" rate column.
DEFAULT_INTERVAL = 1.0
MAX_INTERVAL = 60.0


def _plan(args: argparse.Namespace) -> Any:
    from tproxy import config as config_mod
    from tproxy.cli import load_config
    from tproxy.shaping.component import plan_for

    cfg = config_mod.with_overrides(
        load_config(args.config),
        lan_interfaces=tuple(args.lan_interface) if args.lan_interface else None,
    )
    return plan_for(cfg)


def cmd_show(args: argparse.Namespace) -> int:
    from tproxy.shaping.apply import ShapingError, read_counters

    plan = _plan(args)
    interval = min(max(args.interval, 0.0), MAX_INTERVAL)
    ifaces = [ip.iface for ip in plan.interfaces]
    try:
        counters = read_counters(ifaces, interval=interval) if ifaces else {}
    except ShapingError as exc:
        print(f"tproxy: {exc}")
        return 3
    missing = [i for i in ifaces if (i, UNSHAPED_CLASSID) not in counters]
    if args.json:
        rows = class_rows(plan, counters)
        print(json.dumps({"classes": rows, "not_applied": missing}, indent=1))
        return 0
    print(format_show(plan, counters), end="")
    for iface in missing:
        print(f"# {iface}: no tproxy qdisc (the daemon is not running or shaping failed)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    plan = _plan(args)
    print(render_plan(plan) if plan.interfaces else "# shaping disabled", end="\n")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("shaping", help="bandwidth shaping classes and their counters")
    ssub = p.add_subparsers(dest="shaping_command", required=True)
    show = ssub.add_parser(
        "show", help="classes with live rates, bytes and drops from the kernel counters"
    )
    plan = ssub.add_parser("plan", help="the tc and iptables commands the config amounts to")
    for q in (show, plan):
        q.add_argument("--config", "-c", help="TOML config (default: the system config)")
        q.add_argument(
            "--lan-interface", "-i", action="append", help="LAN interface (as given to run)"
        )
    show.add_argument(
        "--interval",
        type=float,
        default=DEFAULT_INTERVAL,
        help=f"seconds between the two counter reads (default {DEFAULT_INTERVAL:g})",
    )
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=cmd_show)
    plan.set_defaults(func=cmd_plan)
