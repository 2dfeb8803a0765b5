"""HTTP cache: RFC 9111 policy (pure) and the memory/disk object store."""
