"""A scriptable origin server for lab tests (run in the origin namespace).

    python tests/origin_app.py PORT LOGFILE

Every request (or non-HTTP connection) is appended to LOGFILE as one JSON line, so tests can
check exactly what reached the origin. Paths:

- ``/echo`` (any method): the request body back, with Content-Length; request framing logged.
- ``/chunked``: a chunked response with a chunk extension and a trailer.
- ``/close``: a close-delimited response (no Content-Length, no chunked).
- ``/ws``: a WebSocket (RFC 6455) echo after the 101 handshake.
- ``/slow?ms=N``: the response head after N ms.
- ``/headers?h=Name:Value&h=...``: a 200 whose headers the test chooses; ``&body=...``.
- ``/count``: a counter of requests for this path (collapsed forwarding tests).
- ``/bad/<case>``: a malformed response (``both-cl-te``, ``bad-cl``, ``bare-lf``, ``bad-chunk``).
- anything that does not start with an HTTP request line: echoed back byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sys
import time
import urllib.parse
from typing import Any

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"
METHODS = (b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH")

LOG: Any = None
COUNTS: dict[str, int] = {}
STATE: dict[str, str] = {"etag": '"v1"', "cc": "max-age=0"}


def log(entry: dict[str, Any]) -> None:
    entry["t"] = time.time()
    LOG.write(json.dumps(entry) + "\n")
    LOG.flush()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def parse_head(raw: bytes) -> tuple[str, str, dict[str, str], list[tuple[str, str]]]:
    lines = raw.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    fields = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            fields.append((name.strip(), value.strip()))
    return method, target, {k.lower(): v for k, v in fields}, fields


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> tuple[bytes, str]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return body, "chunked"
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"])), "length"
    return b"", "none"


def response(status: str, body: bytes, extra: list[tuple[str, str]] = ()) -> bytes:  # type: ignore[assignment]
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in extra)
    return head.encode() + b"\r\n" + body


async def websocket_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        b0, b1 = await reader.readexactly(2)
        length = b1 & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await reader.readexactly(8), "big")
        mask = await reader.readexactly(4) if b1 & 0x80 else b"\0\0\0\0"
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(await reader.readexactly(length)))
        opcode = b0 & 0x0F
        log({"ws": opcode, "data": data.decode("latin-1")})
        header = bytes([0x80 | opcode])
        header += bytes([length]) if length < 126 else bytes([126]) + length.to_bytes(2, "big")
        writer.write(header + data)
        await writer.drain()
        if opcode == 8:
            return


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")[0]
    conn_id = id(writer)
    try:
        first = await reader.read(1)
        while True:
            peek = first + await reader.read(0) if first else b""
            if not peek:
                return
            if not any(peek == m[:1] for m in METHODS) and not peek.isalpha():
                # Not HTTP: echo everything, byte for byte.
                log({"raw": True, "peer": peer})
                writer.write(peek)
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()
                return
            raw = peek + await read_head(reader)
            method, target, headers, fields = parse_head(raw)
            if headers.get("expect", "").lower() == "100-continue":
                # RFC 9110 §10.1.1: the client waits for this before sending the body.
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
            body, framing = await read_body(reader, headers)
            url = urllib.parse.urlsplit(target)
            query = urllib.parse.parse_qs(url.query)
            path = url.path
            COUNTS[path] = COUNTS.get(path, 0) + 1
            log(
                {
                    "peer": peer,
                    "conn": conn_id,
                    "method": method,
                    "target": target,
                    "headers": fields,
                    "framing": framing,
                    "body_len": len(body),
                }
            )
            if path == "/echo":
                writer.write(response("200 OK", body, [("Content-Type", "application/x-echo")]))
            elif path == "/v":
                # Validation: 304 when the client (the cache) holds the current ETag.
                etag, cc = STATE["etag"], STATE["cc"]
                if headers.get("if-none-match") == etag:
                    writer.write(
                        f"HTTP/1.1 304 Not Modified\r\nETag: {etag}\r\n"
                        f"Cache-Control: {cc}\r\nX-Validated: yes\r\n\r\n".encode()
                    )
                else:
                    body_v = f"version {etag} #{COUNTS[path]}".encode()
                    writer.write(
                        response("200 OK", body_v, [("ETag", etag), ("Cache-Control", cc)])
                    )
            elif path == "/set":
                for k, v in query.items():
                    STATE[k] = v[0]
                writer.write(response("200 OK", b"set"))
            elif path == "/vary":
                lang = headers.get("accept-language", "none")
                writer.write(
                    response(
                        "200 OK",
                        f"lang={lang} #{COUNTS[path]}".encode(),
                        [("Vary", "Accept-Language"), ("Cache-Control", "max-age=60")],
                    )
                )
            elif path == "/inv":
                writer.write(
                    response(
                        "200 OK",
                        f"{method} #{COUNTS[path]}".encode(),
                        [("Cache-Control", "max-age=60")],
                    )
                )
            elif path == "/whoami":
                here = writer.get_extra_info("sockname")[0]
                writer.write(
                    response(
                        "200 OK", f"served by {here}".encode(), [("Cache-Control", "max-age=600")]
                    )
                )
            elif path == "/slowbig":
                size = int(query.get("size", ["4194304"])[0])
                step = int(query.get("step", ["65536"])[0])
                pause = int(query.get("ms", ["50"])[0]) / 1000
                writer.write(
                    f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nCache-Control: max-age=600\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n".encode()
                )
                sent = 0
                while sent < size:
                    n = min(step, size - sent)
                    writer.write(bytes((sent + i) % 251 for i in range(n)))
                    sent += n
                    await writer.drain()
                    await asyncio.sleep(pause)
            elif path == "/dies":
                # Promises 1 MiB, sends half, then the connection dies: nothing may be stored.
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n"
                    b"Cache-Control: max-age=600\r\n\r\n" + b"d" * 524288
                )
                await writer.drain()
                transport = writer.transport
                transport.abort()
                return
            elif path == "/chunked":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                    b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n"
                )
            elif path == "/close":
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
                await writer.drain()
                writer.close()
                return
            elif path == "/ws":
                key = headers.get("sec-websocket-key", "").encode()
                accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
                writer.write(
                    (
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                    ).encode()
                )
                await writer.drain()
                await websocket_echo(reader, writer)
                return
            elif path == "/slow":
                await asyncio.sleep(int(query.get("ms", ["1000"])[0]) / 1000)
                writer.write(response("200 OK", b"slow"))
            elif path == "/headers":
                extra = [tuple(h.split(":", 1)) for h in query.get("h", [])]
                body_out = query.get("body", ["x"])[0].encode()
                status = query.get("status", ["200 OK"])[0]
                if method == "HEAD":
                    head = response(status, body_out, extra)  # type: ignore[arg-type]
                    writer.write(head[: len(head) - len(body_out)])
                else:
                    writer.write(response(status, body_out, extra))  # type: ignore[arg-type]
            elif path == "/count":
                delay = int(query.get("ms", ["0"])[0])
                if delay:
                    await asyncio.sleep(delay / 1000)
                writer.write(
                    response(
                        "200 OK",
                        str(COUNTS[path]).encode(),
                        [("Cache-Control", "max-age=60")],
                    )
                )
            elif path.startswith("/bad/"):
                case = path[5:]
                bad = {
                    "both-cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                    "bad-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
                    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello",
                    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"0x5\r\nhello\r\n0\r\n\r\n",
                }[case]
                writer.write(bad)
                await writer.drain()
                writer.close()
                return
            else:
                writer.write(response("404 Not Found", b"no such path"))
            await writer.drain()
            if headers.get("connection", "").lower() == "close":
                writer.close()
                return
            first = await reader.read(1)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main() -> None:
    global LOG
    port = int(sys.argv[1])
    LOG = open(sys.argv[2], "a")  # noqa: SIM115
    servers = [
        await asyncio.start_server(handle, "0.0.0.0", port),
        await asyncio.start_server(handle, "::", port),
    ]
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main())
