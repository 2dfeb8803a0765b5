"""Content filter: config model, domain sets, category lists and verdicts (pure code).

Importing the package registers the ``[filter]`` config section.
"""

from tproxy.filter.categories import (
    Categories,
    CategoryStats,
    ListWarning,
    LoadResult,
    load_categories,
)
from tproxy.filter.domains import DomainSet, normalize_domain, normalize_host
from tproxy.filter.model import (
    FilterConfig,
    GroupConfig,
    RuleConfig,
    WindowConfig,
    parse_filter,
)
from tproxy.filter.verdict import (
    DEFAULT_BLOCK_TEMPLATE,
    Policy,
    RequestInfo,
    Verdict,
    explain,
    explain_sni,
    render_block_page,
)

__all__ = [
    "DEFAULT_BLOCK_TEMPLATE",
    "Categories",
    "CategoryStats",
    "DomainSet",
    "FilterConfig",
    "GroupConfig",
    "ListWarning",
    "LoadResult",
    "Policy",
    "RequestInfo",
    "RuleConfig",
    "Verdict",
    "WindowConfig",
    "explain",
    "explain_sni",
    "load_categories",
    "normalize_domain",
    "normalize_host",
    "parse_filter",
    "render_block_page",
]
