"""aiohttp (C speedups, on uvloop) behind the asyncio engine's HTTP client interface, so the bench can
measure it against the hand-written ``producers.http_async`` client on the same fan-out job.

The interface the engine uses (``producers.engines.AsyncTransport``): ``Client(headers, timeout=,
connect_timeout=, max_idle=, verify=)``, ``await get(url)`` -> an object with ``status``,
``header(name)`` and ``body`` (decoded bytes), and ``close()``. Errors map as the engine expects:
``TimeoutError`` for the deadline, ``OSError`` for connection failures, ``HttpProtocolError`` for a
broken response.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class _Response:
    status: int
    headers: Any
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


class AiohttpClient:
    """One aiohttp ``ClientSession`` per run, created lazily inside the engine's event loop."""

    def __init__(self, headers: dict[str, str], *, timeout: float = 30.0, connect_timeout: float = 10.0,
                 max_idle: int = 64, verify: bool | str = True):
        self.headers = headers
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self.limit = max_idle
        self.verify = verify
        self._session: Any = None

    def _make_session(self) -> Any:
        import aiohttp

        ssl_ctx: ssl.SSLContext | bool = True
        if self.verify is False:
            ssl_ctx = False
        elif isinstance(self.verify, str):
            ssl_ctx = ssl.create_default_context(cafile=self.verify)
        conn = aiohttp.TCPConnector(limit=self.limit, ssl=ssl_ctx, keepalive_timeout=30)
        return aiohttp.ClientSession(
            connector=conn, headers=self.headers, auto_decompress=True, skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=self.timeout, connect=self.connect_timeout))

    async def get(self, url: str) -> _Response:
        import aiohttp

        from producers.http_async import HttpProtocolError

        if self._session is None:
            self._session = self._make_session()
        try:
            async with self._session.get(url, allow_redirects=False) as resp:
                body = await resp.read()
                return _Response(resp.status, resp.headers, body)
        except (aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as e:
            raise HttpProtocolError(str(e)) from None
        except aiohttp.ServerTimeoutError as e:
            raise TimeoutError(str(e)) from None
        except aiohttp.ClientConnectionError as e:
            raise ConnectionError(str(e)) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


@contextlib.contextmanager
def using(client_class: type) -> Iterator[None]:
    """Run the asyncio engine with ``client_class`` as its HTTP client for the duration."""
    from producers.engines import AsyncTransport

    old = AsyncTransport.http_class
    AsyncTransport.http_class = client_class
    try:
        yield
    finally:
        AsyncTransport.http_class = old
