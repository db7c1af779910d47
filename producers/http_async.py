"""A small asyncio HTTP/1.1 GET client on uvloop + httptools: the extraction hot path.

Why not ``requests`` here: fan-out jobs make 10^5-10^6 small requests, and CPU per request decides
how close we get to the API's capacity. Measured against the simulator on the 2-core reference
machine (bench/extract_bench.py): ``requests.Session.get`` ~1000 us of client CPU per request,
``HTTPAdapter.send`` ~550 us, ``http.client`` ~190 us (but threads convoy on the GIL), this client
~50 us with many requests in flight on one event loop. ``requests`` stays the reference client
(``producers.cc_client``; engine ``threads``) and is chosen automatically when an HTTP(S) proxy is
configured, which this client does not support.

Scope, on purpose: GET only; keep-alive connection pool per origin; HTTP/1.1 responses with
Content-Length, chunked, or close-delimited bodies (parsed by httptools' llhttp); gzip/deflate
bodies; TLS through ``ssl.create_default_context()`` (system CA bundle or ``REQUESTS_CA_BUNDLE``/
``SSL_CERT_FILE``); one overall deadline per request (connect + headers + body, so a server that
drips bytes cannot hold a worker forever). Redirects are not followed (neither does the requests
engine): a 3xx is an error. A request on a reused keep-alive connection that the server had
already closed is retried once on a fresh connection before it counts as a failure.

Measured against aiohttp (C speedups, uvloop) behind the same engine on the fan-out job: aiohttp
reached 0.38 of this client's requests/s at 3x the CPU per request (docs/performance.md), so this
client stays.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import zlib
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools


class HttpProtocolError(Exception):
    """The response was cut off or is not valid HTTP."""


@dataclass(slots=True)
class HttpResponse:
    status: int
    headers: dict[bytes, bytes]  # lower-case names, raw values (decoded on demand)
    body: bytes

    def header(self, name: str) -> str | None:
        v = self.headers.get(name.lower().encode("latin-1"))
        return None if v is None else v.decode("latin-1")


class _Conn(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[HttpResponse] | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.closed = False
        self.keep_alive = True
        self.got_data = False
        self.headers_done = False

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP connection's transport

    def data_received(self, data: bytes) -> None:
        self.got_data = True
        if self.parser is None:
            return  # unsolicited bytes between requests: the next request gets a fresh parser
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(HttpProtocolError(f"malformed HTTP response: {e}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self.waiter
        if w is None or w.done():
            return
        # a body delimited by the end of the connection (no Content-Length, not chunked) is complete
        if (self.headers_done and b"content-length" not in self.headers
                and b"chunked" not in self.headers.get(b"transfer-encoding", b"").lower()):
            self.keep_alive = False
            self._complete()
            return
        if self.got_data:
            self._fail(HttpProtocolError("the connection closed before the response was complete"))
        else:
            self._fail(ConnectionResetError("the server closed the connection without answering"))

    # -- httptools callbacks ------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()
        self._complete()

    # -- requests -----------------------------------------------------------------------------
    def _complete(self) -> None:
        w = self.waiter
        self.waiter = None
        self.parser = None
        if w is not None and not w.done():
            w.set_result(HttpResponse(self.status, self.headers, b"".join(self.body)))

    def _fail(self, exc: BaseException) -> None:
        w = self.waiter
        self.waiter = None
        if w is not None and not w.done():
            w.set_exception(exc)

    def send(self, request: bytes) -> asyncio.Future[HttpResponse]:
        assert self.transport is not None
        self.parser = httptools.HttpResponseParser(self)
        self.status, self.headers, self.body = 0, {}, []
        self.got_data = self.headers_done = False
        self.waiter = self.loop.create_future()
        self.transport.write(request)
        return self.waiter

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


@dataclass(slots=True)
class _Origin:
    scheme: str
    host: str
    port: int
    host_header: str
    ssl: ssl.SSLContext | None
    #: the request's bytes after the target: "Host: ...", the static headers, the blank line
    prefix: bytes = b""


class AsyncHttpClient:
    """Connection-pooled GETs. Create and use it inside one event loop."""

    def __init__(self, headers: dict[str, str], *, timeout: float = 30.0, connect_timeout: float = 10.0,
                 max_idle: int = 64, verify: bool | str = True):
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self.max_idle = max_idle
        self._static = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._origins: dict[str, _Origin] = {}
        self._verify = verify
        self._ssl: ssl.SSLContext | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            cafile = self._verify if isinstance(self._verify, str) else (
                os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") or None)
            ctx = ssl.create_default_context(cafile=cafile)
            if self._verify is False:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl = ctx
        return self._ssl

    def _origin(self, url: str) -> tuple[_Origin, str]:
        # fast path: "scheme://netloc" is everything before the first '/' after the '//'
        cut = url.find("/", url.find("//") + 2)
        key = url if cut < 0 else url[:cut]
        target = "/" if cut < 0 else url[cut:]
        o = self._origins.get(key)
        if o is None:
            u = urlsplit(url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"not an http(s) URL: {url}")
            port = u.port or (443 if u.scheme == "https" else 80)
            default = port == (443 if u.scheme == "https" else 80)
            hh = u.hostname if default else f"{u.hostname}:{port}"
            if ":" in (u.hostname or "") and not hh.startswith("["):
                hh = f"[{u.hostname}]" + ("" if default else f":{port}")
            o = _Origin(u.scheme, u.hostname, port, hh, self._ssl_context() if u.scheme == "https" else None)
            o.prefix = b"\r\nHost: " + hh.encode("idna") + b"\r\n" + self._static + b"\r\n"
            self._origins[key] = o
        if "#" in target:
            target = target.split("#", 1)[0]
        return o, target

    async def _connect(self, o: _Origin) -> _Conn:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await loop.create_connection(lambda: _Conn(loop), o.host, o.port, ssl=o.ssl,
                                                   server_hostname=o.host if o.ssl else None)
        return conn

    async def get(self, url: str) -> HttpResponse:
        """GET ``url``; raises ``TimeoutError``, ``OSError``/``ConnectionError`` or ``HttpProtocolError``."""
        o, target = self._origin(url)
        req = b"GET " + target.encode("ascii") + b" HTTP/1.1" + o.prefix
        pool = self._idle.setdefault((o.scheme, o.host, o.port), [])
        for attempt in (0, 1):
            conn = None
            while pool:
                c = pool.pop()
                if not c.closed:
                    conn = c
                    break
            reused = conn is not None
            try:
                async with asyncio.timeout(self.timeout):
                    if conn is None:
                        conn = await self._connect(o)
                    resp = await conn.send(req)
            except (ConnectionError, HttpProtocolError):
                if conn is not None:
                    conn.abort()
                if reused and attempt == 0 and conn is not None and not conn.got_data:
                    continue  # the server had closed this idle connection: try a fresh one, once
                raise
            except BaseException:
                if conn is not None:
                    conn.abort()  # timeout/cancel mid-response: the connection state is unknown
                raise
            if conn.keep_alive and not conn.closed and len(pool) < self.max_idle:
                pool.append(conn)
            else:
                conn.abort()
            enc = resp.headers.get(b"content-encoding")
            if enc and enc.lower() != b"identity":
                resp.body = _decode(resp.body, enc.decode("latin-1").lower())
            return resp
        raise ConnectionResetError("unreachable")  # pragma: no cover

    def close(self) -> None:
        for pool in self._idle.values():
            for c in pool:
                c.abort()
        self._idle.clear()


def _decode(body: bytes, encoding: str) -> bytes:
    try:
        if encoding in ("gzip", "x-gzip"):
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if encoding == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except zlib.error as e:
        raise HttpProtocolError(f"cannot decode {encoding} body: {e}") from None
    raise HttpProtocolError(f"unsupported Content-Encoding {encoding!r}")
