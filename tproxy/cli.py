"""Command line: ``tproxy run | check-config | rules …``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from tproxy import __version__
from tproxy import config as config_mod
from tproxy.config import Config, ConfigError

log = logging.getLogger("tproxy")

DEFAULT_CONFIG = "/etc/tproxy/tproxy.toml"


def setup_logging(level: str) -> None:
    """Daemon logs go to stderr, and to the journal when systemd started us."""
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler

            root.addHandler(JournalHandler(SYSLOG_IDENTIFIER="tproxy"))
            return
        except ImportError:
            pass
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)


def load_config(path: str | None) -> Config:
    """The given file, else the system config when it exists, else the embedded defaults."""
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    return config_mod.load(path)


def cmd_run(args: argparse.Namespace) -> int:
    from tproxy import daemon

    overrides: dict[str, object] = {}
    if args.lan_interface:
        overrides["lan_interfaces"] = tuple(args.lan_interface)
    if args.port:
        overrides["listen_port"] = args.port
    cfg = config_mod.with_overrides(load_config(args.config), **overrides)
    if args.access_log is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, access_log=args.access_log))
    setup_logging(cfg.log.level)
    if not cfg.proxy.lan_interfaces:
        raise ConfigError(
            cfg.path, "proxy.lan_interfaces", "no LAN interface: set it or pass --lan-interface IF"
        )
    return daemon.run(cfg, overrides, args.access_log)


def cmd_check_config(args: argparse.Namespace) -> int:
    from tproxy.filter.component import check_config_files

    cfg = config_mod.load(args.file)
    # Parsing does no I/O: the folders and files the config names are checked here, as the
    # daemon checks them when it loads the filter.
    check_config_files(cfg)
    print(f"{cfg.path}: OK")
    if not cfg.proxy.lan_interfaces:
        # Valid (the packaged file ships like this), but `tproxy run` refuses it: say so here,
        # where ExecStartPre and the admin look first. Exit 0: the file itself is fine.
        print(
            f"warning: {cfg.path}: proxy.lan_interfaces is empty: the daemon will not start "
            'until it names the LAN interface(s), e.g. lan_interfaces = ["eth1"]',
            file=sys.stderr,
        )
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from tproxy import netfilter
    from tproxy.netfilter.sockets import forget_timewait

    if args.action == "flush":
        # Works without a config and after a crash: everything of ours is found by name.
        # A broken config still names the table and ports; without one, the defaults do.
        cfg = _try_config(args.config) or config_mod.load(None)
        plan = netfilter.plan_from_config(cfg)
        netfilter.flush()
        netfilter.flush_routing(plan.route_table, plan.rule_priority)
        forget_timewait(cfg.proxy.ports)
        from tproxy.shaping.apply import ShapingError, remove_everywhere

        try:
            # A crashed daemon's HTB trees: without the rules that classified into them, a
            # default class would cap all of an interface's traffic.
            gone = remove_everywhere()
        except ShapingError as exc:
            print(f"warning: removing tproxy's shaping qdiscs failed: {exc}", file=sys.stderr)
        else:
            if gone:
                print(f"tproxy shaping qdiscs removed from {', '.join(gone)}")
        print("tproxy rules and routes removed")
        from tproxy import preflight

        if preflight.instance_running():
            # Flushing under a live daemon is the admin's "fail open now" lever; it must not
            # look as if the daemon had stopped. (ExecStopPost runs after it exited: no line.)
            print(
                "warning: the tproxy daemon is still running but intercepts nothing now; "
                "`systemctl reload tproxy` puts its rules back, `systemctl stop tproxy` stops it",
                file=sys.stderr,
            )
        return 0
    cfg = config_mod.with_overrides(
        load_config(args.config),
        lan_interfaces=tuple(args.lan_interface) if args.lan_interface else None,
    )
    from tproxy import component, daemon

    # The same plan the daemon applies, features' rules included (SNI queue, CLASSIFY).
    plan = daemon.make_plan(cfg, component.build(cfg))
    if args.action == "show":
        for family in (4, 6) if plan.ipv6 else (4,):
            print(f"# ip{'6' if family == 6 else ''}tables-restore --noflush (rendered)")
            print(netfilter.render(plan, family), end="")
        live = netfilter.show()
        print("# live rules of tproxy's chains")
        print(live if live.strip() else "# (none installed)")
        return 0
    if not plan.lan_interfaces:
        raise ConfigError(
            cfg.path, "proxy.lan_interfaces", "no LAN interface: pass --lan-interface"
        )
    netfilter.apply_routing(plan)
    netfilter.apply(plan)
    print("tproxy rules applied")
    from tproxy import preflight

    if not preflight.instance_running():
        # TPROXY drops what no socket takes: without a daemon these rules cut the LAN's web.
        print(
            "warning: no tproxy daemon runs here: diverted connections are dropped until one "
            "starts; `tproxy rules flush` removes the rules",
            file=sys.stderr,
        )
    return 0


def _try_config(path: str | None) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"warning: {exc}; removing rules by name", file=sys.stderr)
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tproxy", description="Transparent intercepting proxy")
    p.add_argument("--version", action="version", version=f"tproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", "-c", help=f"TOML config (default {DEFAULT_CONFIG} if present)")
    run.add_argument("--lan-interface", "-i", action="append", help="LAN interface (repeatable)")
    run.add_argument("--port", type=int, help="local TPROXY port")
    run.add_argument("--access-log", help='access log path ("-" stdout, "" off)')
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    rules = sub.add_parser("rules", help="show, apply or flush tproxy's kernel rules")
    rules.add_argument("action", choices=["show", "apply", "flush"])
    rules.add_argument("--config", "-c")
    rules.add_argument("--lan-interface", "-i", action="append")
    rules.set_defaults(func=cmd_rules)

    # Feature modules add their own subcommands (cache, filter, shaping, status).
    import importlib

    for module in CLI_MODULES:
        importlib.import_module(module).add_commands(sub)
    return p


# Modules with ``add_commands(subparsers)``; each command sets ``func(args) -> int``.
CLI_MODULES: list[str] = [
    "tproxy.cache.cli",
    "tproxy.status_cli",
    "tproxy.filter.cli",
    "tproxy.shaping.cli",
]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"tproxy: config error:\n{exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # one clear line for the admin; details with --debug later
        from tproxy import netfilter, preflight

        if isinstance(exc, (netfilter.RulesError, preflight.PreflightError, OSError)):
            print(f"tproxy: {exc}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
