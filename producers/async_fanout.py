"""The default fetch engine: one uvloop event loop per run, ``concurrency`` requests in flight,
pages handed to the run's callbacks on the loop thread (no thread hand-off, no GIL ping-pong).

Same scheduling rules and the same retry policy, error classes, rate limiter and metrics as the
thread engine (``producers.fanout``, ``producers.cc_client``), so the two are interchangeable:

* a stream's first page asks for ``$count``; a known count without server-driven links (or with
  plain ``$skip`` links) turns the remaining pages into page tasks run concurrently; page tasks
  go before new streams;
* next links that are not plain ``$skip`` are followed one by one;
* the last planned page, when full, continues sequentially (the entity grew meanwhile).

Callbacks run on the loop thread and must be quick (publishing one page is ~6 ms for 1000
records); they may set ``stop`` (limit reached, fatal error): no new request starts after it, and
backoff waits end early.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from common.logging import get_logger
from common.metrics import API_LATENCY, API_REQUESTS, API_RETRIES, status_class
from producers.cc_client import CCClient, page_from_response
from producers.errors import (
    ApiConnectionError,
    ApiError,
    ApiTimeoutError,
    MalformedResponseError,
    RateLimitedError,
    TransientApiError,
)
from producers.fanout import Stream, advance, split_plan
from producers.http_async import AsyncHttpClient, HttpProtocolError
from producers.pages import Page

log = get_logger("fanout")

OnPage = Callable[[int, str, Page], None]
OnDone = Callable[[int], None]
OnFail = Callable[[int, BaseException], None]


class _Cancelled(Exception):
    pass


class AsyncFanout:
    def __init__(self, client: CCClient, streams: Sequence[Stream], *, endpoint: str, odata: bool,
                 page_size: int, orderby: str | None, concurrency: int, stop: threading.Event,
                 on_page: OnPage, on_done: OnDone, on_fail: OnFail, on_tick: Callable[[], None] | None = None,
                 split_pages: bool = True, claim: Callable[[], int | None] | None = None):
        self.client = client
        self.streams = streams
        self.endpoint = endpoint
        self.odata = odata
        self.page_size = max(1, min(1000, page_size))
        self.orderby = orderby
        self.concurrency = max(1, concurrency)
        self.stop = stop
        self.on_page, self.on_done, self.on_fail, self.on_tick = on_page, on_done, on_fail, on_tick
        self.split_pages = split_pages
        self._claim = claim
        self._next_stream = 0
        self._page_tasks: deque[tuple[int, int, bool, int]] = deque()
        self._pending: dict[int, int] = {}
        self._failed: set[int] = set()
        self._incomplete: set[int] = set()
        self._active = 0
        self._wake: asyncio.Event | None = None
        self._gate: asyncio.Lock | None = None
        self._http: AsyncHttpClient | None = None
        self._counts: dict[str, int] = {}
        self._latency = API_LATENCY.labels(endpoint)

    # -- entry point ----------------------------------------------------------------------------
    def run(self) -> None:
        """Run to completion on a fresh uvloop loop in the calling thread."""
        import uvloop

        uvloop.run(self._main())

    async def _main(self) -> None:
        c = self.client
        headers = {k: v for k, v in c._headers.items()}  # noqa: SLF001 - same headers as the sync client
        verify = c._verify  # noqa: SLF001
        self._http = AsyncHttpClient(headers, timeout=c.timeout[1], connect_timeout=c.timeout[0],
                                     max_idle=self.concurrency + 4, verify=verify)
        self._wake = asyncio.Event()
        self._gate = asyncio.Lock()
        ticker = asyncio.create_task(self._ticker())
        try:
            await asyncio.gather(*(self._worker() for _ in range(self.concurrency)))
        finally:
            ticker.cancel()
            self._flush_metrics()
            self._http.close()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self._flush_metrics()
            if self.on_tick is not None:
                self.on_tick()

    # -- scheduling -----------------------------------------------------------------------------
    def _next_task(self) -> tuple[Any, ...] | None:
        if self.stop.is_set():
            return None
        if self._page_tasks:
            return ("page", *self._page_tasks.popleft())
        if self._claim is not None:
            i = self._claim()
            if i is not None and i < len(self.streams):
                return ("stream", i)
            self._claim = lambda: None
            return None
        if self._next_stream < len(self.streams):
            i = self._next_stream
            self._next_stream += 1
            return ("stream", i)
        return None

    async def _worker(self) -> None:
        assert self._wake is not None
        while True:
            task = self._next_task()
            if task is None:
                if self._active == 0 or self.stop.is_set():
                    self._wake.set()
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            self._active += 1
            try:
                if task[0] == "stream":
                    await self._run_stream(task[1])
                else:
                    await self._run_page(*task[1:])
            except _Cancelled:
                pass
            except Exception as e:  # noqa: BLE001 - a bug in one stream must surface, not hang the run
                log.exception("fetch_task_error", stream=task[1])
                self._fail(task[1], e)
            finally:
                self._active -= 1
                self._wake.set()

    def _fail(self, idx: int, err: BaseException) -> None:
        if idx in self._failed:
            return
        self._failed.add(idx)
        self.on_fail(idx, err)

    # -- one request with retries -----------------------------------------------------------------
    async def _get(self, url: str) -> Page:
        c = self.client
        attempt = limited = 0
        while True:
            if self.stop.is_set():
                raise _Cancelled()
            try:
                return await self._attempt(url)
            except TransientApiError as e:
                if isinstance(e, RateLimitedError):
                    limited += 1
                else:
                    attempt += 1
                delay = c.policy.next_delay(e, attempt, limited)
                if delay is None:
                    e.attempts = attempt + limited
                    raise
                if isinstance(e, RateLimitedError):
                    c.limiter.pause(delay)
                c.retries += 1
                API_RETRIES.labels(self.endpoint, e.reason).inc()
                log.info("api_retry", endpoint=self.endpoint, reason=e.reason, status=e.status,
                         attempt=attempt + limited, delay_s=round(delay, 3))
                await self._sleep(delay)
                if self.stop.is_set():
                    raise

    async def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.2))

    async def _attempt(self, url: str) -> Page:
        c = self.client
        lim = c.limiter
        if lim.rate > 0:
            assert self._gate is not None
            async with self._gate:  # one sender at a time: spacing holds between actual sends
                wait = lim.reserve()
                if wait > 0:
                    await self._sleep(wait)
                lim.confirm()
        else:
            wait = lim.reserve()  # only a 429 pause can make us wait
            if wait > 0:
                await self._sleep(wait)
        if self.stop.is_set():
            raise _Cancelled()
        c.api_calls += 1
        t0 = time.perf_counter()
        assert self._http is not None
        try:
            resp = await self._http.get(url)
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
        # counts are added to the counter in batches (every tick and at the end): one request is
        # ~50 us of CPU here, and a locked counter increment per request is a visible share of it
        cls = status_class(status)
        self._counts[cls] = self._counts.get(cls, 0) + 1
        self._latency.observe(time.perf_counter() - t0)

    def _flush_metrics(self) -> None:
        counts, self._counts = self._counts, {}
        for cls, n in counts.items():
            API_REQUESTS.labels(self.endpoint, cls).inc(n)

    # -- streams ------------------------------------------------------------------------------------
    def _url(self, s: Stream, skip: int = 0, count: bool = False) -> str:
        c = self.client
        if not self.odata:
            return c.url_for(s.path)
        return c.url_for(s.path, c.odata_params(page_size=self.page_size, skip=skip, filter_expr=s.filter_expr,
                                                orderby=self.orderby, count=count))

    async def _run_stream(self, idx: int) -> None:
        s = self.streams[idx]
        url = self._url(s, count=True)
        try:
            page = await self._get(url)
        except ApiError as e:
            self._fail(idx, e)
            return
        self.on_page(idx, url, page)
        skips = split_plan(self.client, self.endpoint, url, page, self.page_size) \
            if self.split_pages and self.odata else None
        if skips:
            n = advance(page, self.page_size)
            self._pending[idx] = len(skips)
            for k, sk in enumerate(skips):
                self._page_tasks.append((idx, sk, k == len(skips) - 1, n))
            assert self._wake is not None
            self._wake.set()
            return
        await self._continue(idx, url, page, skip=advance(page, self.page_size), count=page.count)

    async def _run_page(self, idx: int, skip: int, last: bool, step: int) -> None:
        try:
            if idx in self._failed:
                return
            url = self._url(self.streams[idx], skip=skip)
            try:
                page = await self._get(url)
            except ApiError as e:
                self._fail(idx, e)
                return
            self.on_page(idx, url, page)
            if last and len(page.records) >= step:
                await self._continue(idx, url, page, skip=skip + advance(page, self.page_size), count=None,
                                     post_done=False)
        except _Cancelled:
            self._incomplete.add(idx)  # stopped before this page: the stream is not complete
            raise
        finally:
            self._pending[idx] -= 1
            if self._pending[idx] == 0 and idx not in self._failed and idx not in self._incomplete:
                self.on_done(idx)

    async def _continue(self, idx: int, url: str, page: Page, *, skip: int, count: int | None,
                        post_done: bool = True) -> None:
        s = self.streams[idx]
        followed = False
        try:
            while True:
                n = len(page.records)
                if page.count is not None:
                    count = page.count
                if page.next_link:
                    nxt = self.client.resolve_link(page.next_link, url, self.endpoint)
                    if n == 0 or nxt == url:
                        break
                    url, followed = nxt, True
                elif followed or n == 0 or not self.odata:
                    break
                else:
                    if count is not None and skip >= count:
                        break
                    if count is None and n < self.page_size:
                        break
                    url = self._url(s, skip=skip)
                page = await self._get(url)
                self.on_page(idx, url, page)
                skip += advance(page, self.page_size)
        except ApiError as e:
            self._fail(idx, e)
            return
        if post_done:
            self.on_done(idx)
