"""The request-rate limit through the daemon's real Server on loopback: the 429 a client sees,
its Retry-After, the counters ``tproxy status``/metrics show, exemptions and a reload.

No root: the Server runs in-process and a scripted origin listens on the connection's
"original destination" (the accepted socket's local address), as under TPROXY.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import pytest

from tests.inproc import Records, hand_over
from tproxy import config
from tproxy.limits import LimitsConfig
from tproxy.server import Server

WAIT = 5.0
LIMITS: dict[str, Any] = {"per_client_requests_per_second": 0.5, "per_client_requests_burst": 2}


async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    writer.close()


async def exchange_statuses(server: Server, count: int) -> tuple[list[int], bytes]:
    """Send ``count`` requests on one keep-alive connection; the statuses until it closes."""
    client, port = await hand_over(server)
    up = await asyncio.start_server(origin, "127.0.0.1", port, reuse_address=True)
    reader, writer = await asyncio.open_connection(sock=client)
    statuses: list[int] = []
    last = b""
    try:
        for _ in range(count):
            writer.write(b"GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n")
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            except asyncio.IncompleteReadError:
                break
            last = head
            statuses.append(int(head.split(b" ", 2)[1]))
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await asyncio.wait_for(reader.readexactly(length), WAIT)
    finally:
        writer.close()
        up.close()
        await up.wait_closed()
    return statuses, last


def make_server(limits: dict[str, Any]) -> Server:
    config.load(None)
    cfg = config.with_overrides(config.parse({"limits": limits}), transparent_upstream=False)
    return Server(cfg, Records())  # type: ignore[arg-type]


def test_request_flood_gets_429_with_retry_after_and_is_counted() -> None:
    async def main() -> None:
        server = make_server(LIMITS)
        try:
            statuses, head = await exchange_statuses(server, 5)
            # Burst 2, then 429; the proxy closes after it (a flood is capped at the
            # connection rate instead of being answered at full speed).
            assert statuses == [200, 200, 429]
            assert b"\r\nRetry-After: 2\r\n" in head  # 1 token at 0.5/s: 2 s (RFC 9110 §10.2.3)
            assert b"connection: close" in head.lower()
            stats = server.limiter.stats()
            assert stats["refused"]["request_rate"] == 1
        finally:
            await server.drain(0.5)
            await server.stop()
        assert server.limiter.stats()["active_connections"] == 0

    asyncio.run(asyncio.wait_for(main(), 20))


def test_exempt_client_and_a_reload_that_lifts_the_limit() -> None:
    async def main() -> None:
        server = make_server(LIMITS | {"exempt": ["127.0.0.0/8"]})
        try:
            statuses, _ = await exchange_statuses(server, 6)
            assert statuses == [200] * 6
            # Reload: the exemption goes, the limit applies again (to a known client too).
            config.load(None)
            limited = config.parse({"limits": LIMITS}).section("limits", LimitsConfig)
            server.limiter.reconfigure(limited, time.monotonic())
            statuses, _ = await exchange_statuses(server, 5)
            assert statuses == [200, 200, 429]
        finally:
            await server.drain(0.5)
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_apply_limits_gives_the_log_throttle_the_new_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A reload's log_interval reaches the per-client diagnostics throttle, not only the
    limiter: a line held back under the old hour is let through under the new interval."""
    server = make_server({"log_interval": "1h"})
    logger = logging.getLogger("tproxy.test.throttle")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == logger.name]

    with caplog.at_level(logging.INFO, logger=logger.name):
        server.log_throttled(logger, "10.0.0.1", "kind", logging.INFO, "first")
        server.log_throttled(logger, "10.0.0.1", "kind", logging.INFO, "held")
        assert lines() == ["first"]
        config.load(None)
        short = config.parse({"limits": {"log_interval": "1ms"}}).section("limits", LimitsConfig)
        server.apply_limits(short, time.monotonic())
        assert server.limiter.cfg is short
        time.sleep(0.01)
        server.log_throttled(logger, "10.0.0.1", "kind", logging.INFO, "again")
    assert lines() == ["first", "again (1 more like it since the last such line)"]
