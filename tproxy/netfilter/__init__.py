"""Kernel side of interception: netfilter rules (TPROXY, divert, NFQUEUE, CLASSIFY) and the
policy routing that delivers diverted packets to the daemon.

``render`` is pure (plan → ``iptables-restore`` text); ``apply``/``flush``/``show`` run
iptables-restore/-save; ``apply_routing``/``flush_routing`` use rtnetlink. All take an optional
``netns`` so the lab can drive a gateway namespace.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import Config, ConfigError
from .apply import RulesError, apply, flush, run_restore, show, show_by_family
from .render import (
    DEFAULT_ON_IP4,
    DEFAULT_ON_IP6,
    MARK_CLASS_MASK,
    MARK_CLASS_SHIFT,
    MARK_VERDICT_ACCEPT,
    MARK_VERDICT_MASK,
    MARK_VERDICT_RESET,
    ClassifyRule,
    RulesPlan,
    class_mark,
    render,
    render_routing,
)
from .routing import apply_routing, flush_routing

__all__ = [
    "MARK_CLASS_MASK",
    "MARK_CLASS_SHIFT",
    "MARK_VERDICT_ACCEPT",
    "MARK_VERDICT_MASK",
    "MARK_VERDICT_RESET",
    "ClassifyRule",
    "RulesError",
    "RulesPlan",
    "apply",
    "apply_routing",
    "class_mark",
    "flush",
    "flush_routing",
    "plan_from_config",
    "render",
    "render_routing",
    "run_restore",
    "show",
    "show_by_family",
]


def plan_from_config(
    cfg: Config,
    lan_interfaces: Sequence[str] | None = None,
    *,
    https_ports: Sequence[int] = (),
    nfqueue_num: int | None = None,
    quic_reject: bool = False,
    classify: Sequence[ClassifyRule] = (),
    on_ip4: str | None = None,
    on_ip6: str | None = None,
) -> RulesPlan:
    """The rules plan for a loaded config. ``lan_interfaces`` (e.g. from the command line)
    overrides ``proxy.lan_interfaces``; the extras come from the feature sections that own them
    (SNI peek, shaping). A plan the kernel cannot express is a :class:`ConfigError`; a plan
    without LAN interfaces is valid but intercepts nothing (check ``plan.intercepts()``)."""
    lan = tuple(lan_interfaces) if lan_interfaces else cfg.proxy.lan_interfaces
    rules = cfg.rules
    try:
        return RulesPlan(
            lan_interfaces=lan,
            ports=tuple(cfg.proxy.ports),
            listen_port=cfg.proxy.listen_port,
            fwmark=rules.fwmark,
            fwmark_mask=rules.fwmark_mask,
            route_table=rules.route_table,
            rule_priority=rules.rule_priority,
            bypass_clients=tuple(rules.bypass_clients),
            bypass_destinations=tuple(rules.bypass_destinations),
            ipv6=cfg.proxy.ipv6,
            https_ports=tuple(https_ports),
            nfqueue_num=nfqueue_num,
            quic_reject=quic_reject,
            classify=tuple(classify),
            on_ip4=DEFAULT_ON_IP4 if on_ip4 is None else on_ip4,
            on_ip6=DEFAULT_ON_IP6 if on_ip6 is None else on_ip6,
        )
    except ValueError as exc:
        raise ConfigError(cfg.path, "rules", str(exc)) from None
