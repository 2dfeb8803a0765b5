"""Bandwidth shaping enforced by the kernel: an HTB tree per interface, fed by socket marks.

``model`` is pure (config, plan, rendering); ``apply`` talks to the kernel with pyroute2 and is
imported on demand (``from tproxy.shaping.apply import apply_plan``) so that config checking
does not load pyroute2. Importing the package registers the ``[shaping]`` config section.
"""

from tproxy.shaping.model import (
    MARK_MASK,
    UNSHAPED_MARK,
    ClassCounters,
    ClassRecord,
    FlowFacts,
    InterfacePlan,
    ShapingClass,
    ShapingConfig,
    ShapingPlan,
    ShapingSelector,
    build_plan,
    classify_rules,
    client_slot,
    format_show,
    mark_for,
    pacing_rate_bytes,
    parse_shaping,
    render_plan,
    select_class,
)

__all__ = [
    "MARK_MASK",
    "UNSHAPED_MARK",
    "ClassCounters",
    "ClassRecord",
    "FlowFacts",
    "InterfacePlan",
    "ShapingClass",
    "ShapingConfig",
    "ShapingPlan",
    "ShapingSelector",
    "build_plan",
    "classify_rules",
    "client_slot",
    "format_show",
    "mark_for",
    "pacing_rate_bytes",
    "parse_shaping",
    "render_plan",
    "select_class",
]
