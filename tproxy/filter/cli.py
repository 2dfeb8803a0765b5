"""``tproxy filter explain URL --client IP`` and ``tproxy filter check-lists``.

``explain`` loads the config and the category lists the rules use, exactly as the daemon does,
and prints the client's group, the windows, every rule's outcome and the verdict with the rule
that decided. ``https://host/...`` (or ``--sni``) explains an HTTPS flow, which the filter only
knows by its server name. Exit status: 0 allow, 1 deny, 2 config error.
"""

from __future__ import annotations

import argparse
import re
from datetime import datetime, timedelta

from tproxy.config import ConfigError
from tproxy.filter.categories import load_categories
from tproxy.filter.component import clock_from_env, filter_config, load_files, load_policy
from tproxy.filter.model import DAYS
from tproxy.filter.verdict import RequestInfo, explain_sni

_CLOCK = re.compile(r"^(?:(?P<day>[a-z]{3})[a-z]*\s+)?(?P<h>\d{1,2}):(?P<m>\d{2})$", re.I)


def parse_time(text: str, today: datetime | None = None) -> datetime:
    """ISO 8601 (``2025-01-06T09:30``), or ``HH:MM`` / ``mon 09:30`` in the current week."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        pass
    m = _CLOCK.match(text.strip())
    if not m:
        raise ValueError(f'not a time: {text!r} (use "2025-01-06T09:30", "09:30" or "mon 09:30")')
    base = today or datetime.now()
    hour, minute = int(m["h"]), int(m["m"])
    if hour > 23 or minute > 59:
        raise ValueError(f"not a time of day: {text!r}")
    if m["day"]:
        day = m["day"].lower()
        if day not in DAYS:
            raise ValueError(f"not a weekday: {m['day']!r}")
        base = base + timedelta(days=DAYS.index(day) - base.weekday())
    return base.replace(hour=hour, minute=minute, second=0, microsecond=0)


def cmd_explain(args: argparse.Namespace) -> int:
    from tproxy.cli import load_config

    cfg = load_config(args.config)
    fcfg = filter_config(cfg)
    policy, warnings = load_policy(fcfg)
    for text in warnings:
        print(f"warning: {text}")
    try:
        now = parse_time(args.time) if args.time else clock_from_env()()
    except ValueError as exc:
        raise ConfigError("--time", "", str(exc)) from None
    url: str = args.url
    sni = args.sni
    if sni is None and url.lower().startswith("https://"):
        sni = url[8:].split("/", 1)[0].split("?", 1)[0]
    if sni is not None:
        print(
            explain_sni(
                policy, args.client, sni or None, now, client_mac=args.mac, dest_ip=args.dest
            )
        )
        verdict = policy.sni_verdict(
            args.client, sni or None, now, client_mac=args.mac, dest_ip=args.dest
        )
        return 0 if verdict.allowed else 1
    if "://" not in url:
        url = "http://" + url
    info = RequestInfo(
        client_ip=args.client,
        client_mac=args.mac,
        method=args.method.upper(),
        host="",
        url=url,
        user_agent=args.user_agent,
        now=now,
        dest_ip=args.dest,
    )
    response = None
    if args.response_type is not None or args.response_length is not None:
        response = (args.status, args.response_type, args.response_length)
    print(policy.explain(info, response))
    if response is None:
        v = policy.request_verdict(info)
    else:
        v = policy.response_verdict(info, *response)
    return 0 if v.allowed else 1


def cmd_check_lists(args: argparse.Namespace) -> int:
    from tproxy.cli import load_config

    cfg = load_config(args.config)
    # The config is checked as the daemon would load it (folders, block page), also with
    # --dir: a list set that passes here must not meet a config the daemon refuses.
    fcfg = load_files(filter_config(cfg))
    directory = args.dir or fcfg.categories_dir
    names = None if args.all or args.dir else sorted(fcfg.used_categories)
    if names == []:
        print("no rule uses a category; pass --all to check every list in " + directory)
        return 0
    result = load_categories(directory, names)
    for s in result.categories.stats:
        print(f"{s.name}: {s.domains} domains, {s.urls} urls")
    for w in result.warnings:
        print(f"warning: {w}")
    if result.warnings_total > len(result.warnings):
        print(f"... {result.warnings_total - len(result.warnings)} more warnings")
    return 1 if result.warnings_total else 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("filter", help="content filter tools")
    fsub = p.add_subparsers(dest="filter_command", required=True)

    ex = fsub.add_parser("explain", help="show the verdict for a URL and the rule that decided")
    ex.add_argument("url", help="http://host/path, host/path, or https://host (SNI)")
    ex.add_argument("--client", required=True, help="client IP address")
    ex.add_argument("--mac", help="client MAC address (for MAC-based groups)")
    ex.add_argument(
        "--dest", help="the server address the client connects to (matched by address entries)"
    )
    ex.add_argument("--time", help='"2025-01-06T09:30", "09:30" or "mon 09:30" (default: now)')
    ex.add_argument("--config", "-c", help="TOML config (default /etc/tproxy/tproxy.toml)")
    ex.add_argument("--method", default="GET")
    ex.add_argument("--user-agent")
    ex.add_argument("--sni", help="explain a TLS flow with this server name")
    ex.add_argument("--status", type=int, default=200, help="response status (with --type)")
    ex.add_argument("--type", dest="response_type", help="response Content-Type")
    ex.add_argument("--length", dest="response_length", type=int, help="response length")
    ex.set_defaults(func=cmd_explain)

    ch = fsub.add_parser("check-lists", help="load the category lists and report bad lines")
    ch.add_argument("--config", "-c")
    ch.add_argument("--dir", help="a list directory (default: filter.categories_dir)")
    ch.add_argument("--all", action="store_true", help="every category, not only those in use")
    ch.set_defaults(func=cmd_check_lists)
