"""Policy routing for diverted packets, with pyroute2: the fwmark rule and the local routes.

A packet marked by TPROXY (or by the ``-m socket`` divert) must be delivered locally even though
its destination address is not the gateway's: ``ip rule fwmark M/M lookup T`` sends it to table
``T``, whose only route ``local default dev lo`` makes every address local
(Documentation/networking/tproxy.rst). Both are owned by tproxy and identified exactly by
(priority, table) for rules and (table, type local, default) for routes.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .apply import RulesError
from .render import FAMILIES, RulesPlan, render_routing

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
# rtnetlink constants (linux/rtnetlink.h): RTN_LOCAL route type, RT_SCOPE_HOST. The kernel
# refuses a local route with the default universe scope (EINVAL), as `ip route` sets host scope.
RTN_LOCAL = 2
RT_SCOPE_HOST = 254
# FR_ACT_TO_TBL (linux/fib_rules.h): a rule that looks up a table.
FR_ACT_TO_TBL = 1
LOOPBACK = "lo"


@contextmanager
def _iproute(netns: str | None) -> Iterator[Any]:
    try:
        ipr = IPRoute(netns=netns) if netns else IPRoute()
    except (OSError, NetlinkError) as exc:
        where = f" in netns {netns}" if netns else ""
        raise RulesError(f"cannot open rtnetlink{where}: {exc}") from None
    try:
        yield ipr
    finally:
        ipr.close()


def _table(msg: Any) -> int:
    value = msg.get("table")
    attr = msg.get("FRA_TABLE") or msg.get("RTA_TABLE")
    return int(attr if attr is not None else value)


def _our_rules(ipr: Any, family: int, table: int, priority: int) -> list[Any]:
    return [
        r
        for r in ipr.rule("dump", family=_AF[family])
        if r.get("priority") == priority and _table(r) == table
    ]


def _our_routes(ipr: Any, family: int, table: int) -> list[Any]:
    return [
        r
        for r in ipr.route("dump", family=_AF[family], table=table)
        if _table(r) == table and r.get("type") == RTN_LOCAL and r.get("dst_len") == 0
    ]


def _rule_kw(family: int, rule: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "family": _AF[family],
        "priority": rule.get("priority"),
        "table": _table(rule),
    }
    if rule.get("fwmark") is not None:
        kw["fwmark"] = rule.get("fwmark")
        kw["fwmask"] = rule.get("fwmask")
    return kw


def _netlink(what: str, exc: NetlinkError) -> RulesError:
    code = exc.code if isinstance(exc.code, int) else 0
    hint = ""
    if code == 97:  # EAFNOSUPPORT
        hint = " (IPv6 disabled? set proxy.ipv6 = false)"
    return RulesError(f"{what}: {exc.args[1] if len(exc.args) > 1 else exc}{hint}")


def apply_routing(plan: RulesPlan, netns: str | None = None) -> None:
    """Make the fwmark rule and the local default route exist exactly once per family.

    A rule at our priority that points to our table but differs (an older fwmark) is replaced.
    With ``plan.ipv6`` off, our IPv6 rule and route are removed.
    """
    want = render_routing(plan)
    with _iproute(netns) as ipr:
        for rule in want.rules:
            try:
                found = _our_rules(ipr, rule.family, rule.table, rule.priority)
                keep = [
                    r
                    for r in found
                    if r.get("fwmark") == rule.fwmark and r.get("fwmask") == rule.fwmask
                ][:1]
                for r in found:
                    if not any(r is k for k in keep):
                        ipr.rule("del", **_rule_kw(rule.family, r))
                if not keep:
                    ipr.rule(
                        "add",
                        family=_AF[rule.family],
                        priority=rule.priority,
                        fwmark=rule.fwmark,
                        fwmask=rule.fwmask,
                        table=rule.table,
                        action=FR_ACT_TO_TBL,
                    )
            except NetlinkError as exc:
                raise _netlink(f"cannot set the IPv{rule.family} fwmark rule", exc) from None
        for route in want.routes:
            try:
                # "replace" is idempotent: one route however often it runs.
                ipr.route(
                    "replace",
                    family=_AF[route.family],
                    dst=route.dst,
                    type=RTN_LOCAL,
                    scope=RT_SCOPE_HOST,
                    table=route.table,
                    oif=ipr.link_lookup(ifname=route.dev)[0],
                )
            except (NetlinkError, IndexError) as exc:
                reason = exc if isinstance(exc, NetlinkError) else NetlinkError(19, "no lo")
                raise _netlink(
                    f"cannot add the IPv{route.family} local route to table {route.table}", reason
                ) from None
        if not plan.ipv6:
            _flush_family(ipr, 6, plan.route_table, plan.rule_priority)


def _flush_family(ipr: Any, family: int, table: int, priority: int) -> None:
    try:
        rules = _our_rules(ipr, family, table, priority)
        routes = _our_routes(ipr, family, table)
    except NetlinkError as exc:
        if exc.code == 97 and family == 6:  # IPv6 unavailable: nothing of ours can be there
            return
        raise _netlink(f"cannot read IPv{family} routing state", exc) from None
    try:
        for r in rules:
            ipr.rule("del", **_rule_kw(family, r))
        for r in routes:
            ipr.route(
                "del",
                family=_AF[family],
                dst_len=0,
                type=RTN_LOCAL,
                scope=RT_SCOPE_HOST,
                table=table,
                oif=r.get("RTA_OIF"),
            )
    except NetlinkError as exc:
        raise _netlink(f"cannot remove IPv{family} routing of ours", exc) from None


def flush_routing(table: int, priority: int, netns: str | None = None) -> None:
    """Remove our fwmark rules (priority + table) and local default routes in ``table``."""
    with _iproute(netns) as ipr:
        for family in FAMILIES:
            _flush_family(ipr, family, table, priority)
