"""The two ASGI responses every part of the simulator sends (the CC API and the admin API)."""

from __future__ import annotations

from collections.abc import Callable

import orjson

JSON = b"application/json; charset=utf-8"


async def send_bytes(send: Callable, status: int, body: bytes, ctype: bytes = JSON,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    h = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
    if headers:
        h.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": h})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Callable, status: int, error: str, message: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send_bytes(send, status, orjson.dumps({"error": error, "message": message, "status": status}),
                     headers=headers)
