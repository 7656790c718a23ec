#!/usr/bin/env python3
"""A fast stand-in backend for scripts/bench_proxy.py: a WebSocket echo and an upload sink.

    .venv/bin/python scripts/bench_backend.py [--host 0.0.0.0] [--port 8888]

- GET /ws (WebSocket upgrade): echoes every data frame back as it came (text or binary, fragmented
  or not), answers pings, echoes a close. No extensions are negotiated (no compression).
- POST or PUT /upload: reads and discards a request body of any size (Content-Length or chunked,
  Expect: 100-continue honoured) and answers 200 with the byte count as its body.
- Anything else: 404.

Plain asyncio and nothing else on the hot path, so it costs little next to the proxy it measures.
bench_proxy.py runs it in a holder container's network namespace (nsenter), so the proxy routes to
it as to an instance.
"""

from __future__ import annotations

import argparse
import asyncio

from websockets.utils import accept_key

try:  # websockets' C helper when built, else its pure-Python one
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

BLOCK = 1 << 20


async def read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]] | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) < 3:
        return None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


def answer(status: str, body: bytes, extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nContent-Type: text/plain\r\n{extra}\r\n"
    return head.encode() + body


async def drain_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> int:
    """Read and drop the body; its size in bytes."""
    total = 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return total
            left = size
            while left:
                chunk = await reader.read(min(left, BLOCK))
                if not chunk:
                    raise ConnectionError("body cut short")
                left -= len(chunk)
            total += size
            await reader.readexactly(2)
    left = int(headers.get("content-length", "0") or 0)
    while left:
        chunk = await reader.read(min(left, BLOCK))
        if not chunk:
            raise ConnectionError("body cut short")
        left -= len(chunk)
        total += len(chunk)
    return total


def frame(first: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([first, n])
    elif n < 1 << 16:
        head = bytes([first, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, 127]) + n.to_bytes(8, "big")
    return head + payload


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            first, second = await reader.readexactly(2)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        n = second & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await reader.readexactly(8), "big")
        mask = await reader.readexactly(4) if second & 0x80 else b""
        payload = await reader.readexactly(n)
        if mask:
            payload = apply_mask(payload, mask)
        opcode = first & 0x0F
        if opcode == 0x8:  # close: echo it, then end
            writer.write(frame(0x88, payload[:2]))
            await writer.drain()
            return
        if opcode == 0x9:  # ping
            writer.write(frame(0x8A, payload))
        elif opcode != 0xA:  # data or continuation: back as it came
            writer.write(frame(first, payload))
        await writer.drain()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while (head := await read_head(reader)) is not None:
            method, target, headers = head
            path = target.split("?", 1)[0]
            if path == "/ws" and headers.get("upgrade", "").lower() == "websocket":
                accept = accept_key(headers["sec-websocket-key"]).encode()  # RFC 6455 4.2.2
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                )
                await writer.drain()
                await echo(reader, writer)
                return
            if path == "/upload" and method in ("POST", "PUT"):
                if headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                size = await drain_body(reader, headers)
                writer.write(answer("200 OK", str(size).encode()))
            else:
                await drain_body(reader, headers)
                writer.write(answer("404 Not Found", b"not here\n"))
            await writer.drain()
            if headers.get("connection", "").lower() == "close":
                return
    except (ConnectionError, asyncio.IncompleteReadError, ValueError, KeyError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port, limit=1 << 16, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8888)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
