"""The filter's response rules hold for answers from the cache too (review, session 6).

A `mime` or `max_response_size` rule is judged on the response head. A hit, or a stored body
that a 304 releases, never passes the forwarded-response hook, so the cache asks the same
check before it answers (``httpconn.RESPONSE_CHECK``). Runs the daemon's Server in-process with
a scripted origin on loopback (tests/test_review_cache_component.py's rig).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path

from tests.test_review_cache_component import read_response, rig, run
from tests.test_review_filter_evasion import make_policy
from tproxy import config
from tproxy.filter.component import FilterComponent

MONDAY, SATURDAY = datetime(2024, 1, 1, 10, 0), datetime(2024, 1, 6, 10, 0)
RULES = """
[[filter.window]]
name = "school"
days = ["mon"]
hours = "08:00-16:00"

[[filter.rule]]
group = "*"
action = "deny"
window = "school"
mime = ["video/*"]
"""


async def origin(_: object, head: bytes, writer: asyncio.StreamWriter) -> None:
    line = head.split(b"\r\n", 1)[0]
    if b"if-none-match" in head.lower():
        writer.write(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nCache-Control: max-age=0\r\n\r\n')
    else:
        fresh = b"0" if b"stale" in line else b"3600"
        writer.write(
            b'HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nETag: "v1"\r\n'
            b"Cache-Control: max-age=%s\r\nContent-Length: 5\r\n\r\nVIDEO" % fresh
        )
    await writer.drain()


def test_a_stored_video_is_not_served_inside_the_rules_window(tmp_path: Path) -> None:
    clock = [SATURDAY]

    async def main() -> None:
        async with rig(origin, tmp_path) as r:
            component = FilterComponent(config.load(None), clock=lambda: clock[0])
            component.policy = make_policy(RULES)
            component.allows_all = False
            r.server.request_hooks.insert(0, component.on_request)
            r.server.response_hooks.insert(0, component.on_response)

            async def get(path: bytes) -> tuple[int, bytes]:
                reader, writer = await r.client()
                writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: v.example\r\n\r\n")
                status, _, body = await read_response(reader)
                writer.close()
                return status, body

            # Saturday, outside the window: fetched and stored.
            assert await get(b"/fresh") == (200, b"VIDEO")
            assert await get(b"/stale") == (200, b"VIDEO")
            seen = len(r.origin.requests)
            assert await get(b"/fresh") == (200, b"VIDEO")  # a hit
            assert len(r.origin.requests) == seen
            clock[0] = MONDAY
            # Inside the window: the hit is refused...
            status, body = await get(b"/fresh")
            assert status == 403 and b"VIDEO" not in body
            assert len(r.origin.requests) == seen
            # ...and so is the stored body a 304 to the cache's revalidation would release.
            status, body = await get(b"/stale")
            assert status == 403 and b"VIDEO" not in body
            assert b"if-none-match" in r.origin.requests[-1].lower()
            assert component.stats.responses_denied == 2

    run(main())
