"""``tproxy cache stats | purge``: through the running daemon, or on the disk store directly."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tproxy.cache.store import CacheConfig, CacheStore


def _daemon(args: argparse.Namespace, cmd: str, cargs: dict[str, Any]) -> dict[str, Any] | None:
    """The daemon's answer, or None when no daemon is running (then we work on the disk)."""
    from tproxy import status_cli

    path = args.socket or status_cli.socket_path(args.config)
    try:
        return status_cli.request(path, cmd, cargs)
    except status_cli.ControlUnavailable:
        return None


def _offline_store(args: argparse.Namespace) -> CacheStore:
    from tproxy.cli import load_config

    cfg = load_config(args.config).section("cache", CacheConfig)
    return CacheStore(memory_size=1, disk_dir=cfg.disk_dir or None, disk_size=cfg.disk_size,
                      max_object_size=cfg.max_object_size, max_memory_object_size=0)  # fmt: skip


def cmd_stats(args: argparse.Namespace) -> int:
    st = _daemon(args, "cache-stats", {})
    source = "daemon"
    if st is None:
        store = _offline_store(args)
        s = store.stats()
        st = {"objects": s.disk_objects, "disk_bytes": s.disk_bytes,
              "index_bytes_per_object": s.index_bytes_per_object}  # fmt: skip
        source = "disk (daemon not running)"
    if args.json:
        print(json.dumps(st, indent=1, sort_keys=True))
        return 0
    print(f"cache ({source})")
    for key in sorted(st):
        print(f"  {key:<24} {st[key]}")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    if not args.all and not args.url:
        print("tproxy cache purge: give a URL or --all", file=sys.stderr)
        return 2
    cargs: dict[str, Any] = {"all": True} if args.all else {"url": args.url}
    res = _daemon(args, "cache-purge", cargs)
    if res is None:
        store = _offline_store(args)
        from tproxy.cache import policy

        url = args.url and (policy.request_url("http", None, args.url) or args.url)
        purged = store.purge_all() if args.all else store.purge_url(url)
        res = {"purged": purged}
    print(f"purged {res['purged']} object(s)")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", help="cache statistics and purging")
    csub = p.add_subparsers(dest="cache_command", required=True)
    stats = csub.add_parser("stats", help="objects, bytes, hit ratio")
    stats.add_argument("--json", action="store_true")
    purge = csub.add_parser("purge", help="remove a URL (all its variants) or everything")
    purge.add_argument("url", nargs="?")
    purge.add_argument("--all", action="store_true")
    for q in (stats, purge):
        q.add_argument("--config", "-c")
        q.add_argument("--socket", help="control socket of the running daemon")
    stats.set_defaults(func=cmd_stats)
    purge.set_defaults(func=cmd_purge)
