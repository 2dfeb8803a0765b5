"""HTTP cache: RFC 9111 policy (``policy``, pure) and the memory/disk object store (``store``).

``tproxy.cache.store`` registers the ``[cache]`` config section when imported.
"""
