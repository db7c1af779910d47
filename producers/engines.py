"""Fetch engines: how many requests are in flight at once, and how they are sent. Nothing else.

Both drive the same :class:`producers.fetch.Fetch` core (paging, retries, stream outcomes) and call
its callbacks -- and so publish -- on one thread, the one that called ``run_*``:

* :func:`run_async` (the default, ``ETL_HTTP_ENGINE=async``): one uvloop event loop, ``concurrency``
  coroutines, HTTP/1.1 keep-alive through ``producers.http_async`` (~50 µs of client CPU per
  request; docs/extraction.md has the measurements). No thread hand-off, no GIL ping-pong.
* :func:`run_threads` (``threads``, chosen automatically when an HTTP(S) proxy applies, which the
  asyncio client does not support): ``requests`` in a thread pool; the calling thread dispatches
  requests and handles every answer.

Worker processes (``producers.process_engine``) run one of these in each process.

Stopping: when ``stop`` is set no new request starts, waits (a retry's backoff, a 429 pause) end
early, and the engine returns once the requests already sent have been answered.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from common.metrics import API_LATENCY, API_REQUESTS, status_class
from producers.cc_client import CCClient, page_from_response
from producers.errors import ApiConnectionError, ApiTimeoutError, MalformedResponseError
from producers.fetch import Fetch
from producers.http_async import AsyncHttpClient, HttpProtocolError
from producers.pages import Page
from producers.paging import Request

TICK = 0.25


class _Cancelled(Exception):
    """The run stopped before this request was sent."""


# -- threads ----------------------------------------------------------------------------------------

def run_threads(fetch: Fetch, client: CCClient, *, concurrency: int, stop: threading.Event,
                on_tick: Callable[[], None] | None = None) -> None:
    """Fetch with ``concurrency`` requests in flight on a thread pool; callbacks on this thread."""
    concurrency = max(1, concurrency)
    endpoint = fetch.endpoint

    def send(req: Request) -> Page:
        wait_s = req.not_before - time.monotonic()
        if (wait_s > 0 and not client.pause(wait_s)) or stop.is_set():
            raise _Cancelled()
        client.limiter.acquire()
        if stop.is_set():
            raise _Cancelled()
        return client.attempt(req.url, endpoint)

    in_flight: dict[Future[Page], Request] = {}
    last_tick = time.monotonic()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="fetch") as pool:
        while True:
            while len(in_flight) < concurrency and (req := fetch.next_request()) is not None:
                in_flight[pool.submit(send, req)] = req
            if not in_flight:
                break
            done, _ = wait(in_flight, timeout=TICK, return_when=FIRST_COMPLETED)
            for f in done:
                _report(fetch, in_flight.pop(f), f)
            now = time.monotonic()
            if on_tick is not None and now - last_tick >= TICK:
                last_tick = now
                on_tick()
    if on_tick is not None:
        on_tick()


def _report(fetch: Fetch, req: Request, f: Future[Page]) -> None:
    try:
        page = f.result()
    except _Cancelled:
        fetch.cancelled(req)
    except Exception as e:  # noqa: BLE001 - ApiError or a bug: the core decides (retry / fail the stream)
        fetch.error(req, e)
    else:
        fetch.complete(req, page)


# -- asyncio ----------------------------------------------------------------------------------------

class AsyncTransport:
    """:meth:`CCClient.attempt` on an event loop: same headers, classification and metrics."""

    #: the HTTP client class (bench/http_clients.py swaps in aiohttp to compare the two in one run)
    http_class: type = AsyncHttpClient

    def __init__(self, client: CCClient, endpoint: str, max_idle: int):
        self.client = client
        self.endpoint = endpoint
        self.http = self.http_class(dict(client.headers), timeout=client.timeout[1],
                                    connect_timeout=client.timeout[0], max_idle=max_idle, verify=client.verify)
        self._counts: dict[str, int] = {}
        self._latency = API_LATENCY.labels(endpoint)

    async def attempt(self, url: str) -> Page:
        c = self.client
        c.api_calls += 1  # the loop thread is the only writer during an async run
        t0 = time.perf_counter()
        try:
            resp = await self.http.get(url)
        except TimeoutError:
            self._observe(None, t0)
            raise ApiTimeoutError("the API did not answer in time (ETL_REQUEST_TIMEOUT_SECONDS)", url=url,
                                  endpoint=self.endpoint) from None
        except HttpProtocolError as e:
            self._observe(None, t0)
            raise MalformedResponseError("the response was cut off or is not valid HTTP", url=url,
                                         endpoint=self.endpoint, detail=str(e)) from None
        except OSError as e:
            self._observe(None, t0)
            raise ApiConnectionError("could not reach the API (connection refused, reset or dropped)", url=url,
                                     endpoint=self.endpoint, detail=f"{type(e).__name__}: {e}") from None
        self._observe(resp.status, t0)
        return page_from_response(resp.status, resp.header, resp.body, url=url, endpoint=self.endpoint,
                                  key_header=c.key_header)

    def _observe(self, status: int | None, t0: float) -> None:
        # counts reach the counter in batches (every tick and at the end): one request is ~50 µs of
        # CPU here, and a locked counter increment per request is a visible share of it
        cls = status_class(status)
        self._counts[cls] = self._counts.get(cls, 0) + 1
        self._latency.observe(time.perf_counter() - t0)

    def flush_metrics(self) -> None:
        counts, self._counts = self._counts, {}
        for cls, n in counts.items():
            API_REQUESTS.labels(self.endpoint, cls).inc(n)

    async def close(self) -> None:
        self.flush_metrics()
        closed = self.http.close()
        if closed is not None:  # an async client's close() is a coroutine
            await closed


def run_async(fetch: Fetch, client: CCClient, *, concurrency: int, stop: threading.Event,
              on_tick: Callable[[], None] | None = None) -> None:
    """Fetch with ``concurrency`` requests in flight on a fresh uvloop loop in this thread."""
    import uvloop

    uvloop.run(_async_main(fetch, client, max(1, concurrency), stop, on_tick))


async def _async_main(fetch: Fetch, client: CCClient, concurrency: int, stop: threading.Event,
                      on_tick: Callable[[], None] | None) -> None:
    transport = AsyncTransport(client, fetch.endpoint, max_idle=concurrency + 4)
    wake = asyncio.Event()
    gate = asyncio.Lock()
    limiter = client.limiter

    async def sleep(seconds: float) -> None:
        end = time.monotonic() + seconds
        while not stop.is_set() and (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.2))

    async def send(req: Request) -> Page:
        if req.not_before > time.monotonic():
            await sleep(req.not_before - time.monotonic())
        if limiter.rate > 0:
            async with gate:  # one sender at a time: spacing holds between actual sends
                if (w := limiter.reserve()) > 0:
                    await sleep(w)
                limiter.confirm()
        elif (w := limiter.reserve()) > 0:  # only a 429 pause can make us wait
            await sleep(w)
        if stop.is_set():
            raise _Cancelled()
        return await transport.attempt(req.url)

    async def worker() -> None:
        while True:
            req = fetch.next_request()
            if req is None:
                if fetch.in_flight == 0:
                    wake.set()
                    return
                wake.clear()
                await wake.wait()
                continue
            try:
                page = await send(req)
            except _Cancelled:
                fetch.cancelled(req)
            except Exception as e:  # noqa: BLE001 - ApiError or a bug: the core decides
                fetch.error(req, e)
            else:
                fetch.complete(req, page)
            wake.set()

    async def ticker() -> None:
        while True:
            await asyncio.sleep(TICK)
            transport.flush_metrics()
            if on_tick is not None:
                on_tick()

    tick = asyncio.create_task(ticker())
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        tick.cancel()
        await transport.close()
    if on_tick is not None:
        on_tick()
