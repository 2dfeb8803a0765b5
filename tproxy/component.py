"""Feature components plugged into the daemon (filter + NFQUEUE, cache, shaping, control, ...).

A component owns one feature's runtime state. The daemon asks each for its share of the kernel
rules, starts it after the listeners, hands it every reloaded config, and stops it before the
rules are removed. Components register HTTP hooks on ``daemon.server`` in ``start``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from tproxy.config import Config

if TYPE_CHECKING:
    from tproxy.daemon import Daemon


class Component(Protocol):
    name: str

    def rules_extras(self, cfg: Config) -> dict[str, Any]:
        """Keyword arguments for ``netfilter.plan_from_config`` (https_ports, classify, ...)."""
        ...

    async def start(self, daemon: Daemon) -> None: ...

    async def reload(self, daemon: Daemon, cfg: Config) -> None:
        """Adopt ``cfg``; raise ConfigError (before changing anything) to refuse it."""
        ...

    async def stop(self, daemon: Daemon) -> None: ...

    def status(self) -> dict[str, Any]:
        """Live figures for ``tproxy status`` and the metrics endpoint."""
        ...


Factory = Callable[[Config], "Component | None"]

# "module:function" factories, in start order; a factory returns None when its feature is off.
COMPONENTS: list[str] = [
    "tproxy.control:create",
    "tproxy.metrics:create",
    "tproxy.shaping.component:component",
    "tproxy.filter.component:make_component",
    "tproxy.cache.component:create",
]


def build(cfg: Config) -> list[Component]:
    out: list[Component] = []
    for spec in COMPONENTS:
        module, _, func = spec.partition(":")
        factory: Factory = getattr(importlib.import_module(module), func)
        comp = factory(cfg)
        if comp is not None:
            out.append(comp)
    return out
