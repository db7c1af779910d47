"""Concurrent fetching: worker threads page through many *streams* (one per parent parameter dict,
or the single stream of a plain job) and hand pages to the publishing thread through one bounded
queue.

Why threads (measured in ``bench/extract_bench.py``, see docs/extraction.md): the work per request
is ~0.4 ms of CPU in the HTTP stack and the rest is waiting on the network; threads overlap the
waits, share one connection pool, one producer and one rate limiter with no IPC, and on the
2-core reference machine (simulator on one core) they reached the simulator's capacity while worker
processes mostly added pickling and a second producer. ``producers.procfanout`` keeps the process
variant for machines where one core cannot keep up.

Scheduling:

* a stream's first page is requested with ``$count=true``; when the server answers with a count
  and no next link, the remaining pages are known (``$skip`` = k x records on the first page) and
  become *page tasks* any worker can take, so one big entity is fetched by all workers at once;
  page tasks go before new streams, which bounds the streams in flight;
* when the server sends next links, they are followed link by link by one worker -- unless the
  link is exactly our query with ``$skip`` advanced (plain ``$skip`` paging), in which case the
  parallel ``$skip`` plan fetches the very same pages; a ``$skiptoken`` or any other link is
  always followed as given;
* the worker that takes the last planned page of a stream keeps paging sequentially if that page
  was full (the entity grew during the run), so nothing added meanwhile is missed.

Queue items: ``(PAGE, stream, (url, Page))``, ``(DONE, stream, None)`` after the stream's last
page, ``(FAIL, stream, error)`` once per failed stream (its pages already queued stay valid).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from common.logging import get_logger
from producers.cc_client import MAX_PAGE_SIZE, CCClient
from producers.errors import ApiError
from producers.pages import Page

log = get_logger("fanout")

PAGE, DONE, FAIL = 0, 1, 2


@dataclass(slots=True)
class Stream:
    """One paged request sequence: an endpoint path with its parameter values substituted."""

    idx: int
    path: str
    params: dict[str, str] | None = None
    filter_expr: str | None = None

    @property
    def parent_key(self) -> str:
        """Canonical JSON of ``params`` ('' for plain jobs): the per-parent watermark key. Computed
        on demand -- only incremental-capable jobs ever need it."""
        from producers.keys import parent_key

        return parent_key(self.params)


def is_plain_skip_link(client: CCClient, endpoint: str, link: str, url: str, skip: int) -> bool:
    """True when the server's next link is our own query with ``$skip`` advanced: then pages
    requested by ``$skip`` in parallel are exactly the pages the links would give. Any other link
    (``$skiptoken``, other filters, another path) is followed as given."""
    try:
        nxt = client.resolve_link(link, url, endpoint)
    except ApiError:
        return False
    a, b = urlsplit(nxt), urlsplit(url)
    if a.path.rstrip("/") != b.path.rstrip("/"):
        return False
    qa = {k.lower(): v for k, v in parse_qsl(a.query, keep_blank_values=True)}
    qb = {k.lower(): v for k, v in parse_qsl(b.query, keep_blank_values=True)}
    if "$skiptoken" in qa or qa.get("$skip") != str(skip):
        return False
    for q in (qa, qb):
        q.pop("$skip", None)
        q.pop("$count", None)
    return qa == qb


def advance(page: Page, page_size: int) -> int:
    """How far ``$skip`` moves after ``page``: the records received, but never more than ``$top``
    (a server that capped ``$top`` lower sends fewer; a page that repeats a record sends more,
    and skipping by its length would jump over the next page's first record)."""
    return min(len(page.records), page_size)


def split_plan(client: CCClient, endpoint: str, url: str, page: Page, page_size: int) -> list[int] | None:
    """The ``$skip`` values of the remaining pages when they can be fetched in parallel, else None
    (count unknown, a single page, or server-driven links that are not plain ``$skip``)."""
    n = advance(page, page_size)
    if page.count is None or not 0 < n < page.count:
        return None
    if page.next_link and not is_plain_skip_link(client, endpoint, page.next_link, url, n):
        return None
    return list(range(n, page.count, n))


class Cancelled(Exception):
    """The run was stopped (limit reached, fatal error, timeout) while a worker waited."""


class ThreadFanout:
    def __init__(self, client: CCClient, streams: Sequence[Stream], *, endpoint: str, odata: bool,
                 page_size: int = MAX_PAGE_SIZE, orderby: str | None = None, workers: int = 4,
                 stop: threading.Event | None = None, split_pages: bool = True, queue_pages: int | None = None,
                 claim: Callable[[], int | None] | None = None):
        self.client = client
        self.streams = streams
        self.endpoint = endpoint
        self.odata = odata
        self.page_size = min(MAX_PAGE_SIZE, max(1, page_size))
        self.orderby = orderby
        self.workers = max(1, workers)
        self.stop = stop or threading.Event()
        self.split_pages = split_pages
        self.queue: queue.Queue[tuple[int, int, Any]] = queue.Queue(maxsize=queue_pages or max(4, 2 * self.workers))
        self._cond = threading.Condition()
        self._page_tasks: deque[tuple[int, int, bool, int]] = deque()
        self._next_stream = 0
        self._active = 0
        self._pending: dict[int, int] = {}
        self._failed: set[int] = set()
        self._incomplete: set[int] = set()
        self._threads: list[threading.Thread] = []
        #: where stream indices come from: a local counter, or (worker processes) a shared one
        self._claim = claim
        self._claim_exhausted = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> ThreadFanout:
        n = min(self.workers, max(1, len(self.streams))) if not self.split_pages else self.workers
        for i in range(n):
            t = threading.Thread(target=self._worker, name=f"fetch-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def results(self, tick: float = 0.25) -> Iterator[tuple[int, int, Any] | None]:
        """Queue items until every worker has finished; ``None`` every ``tick`` s of silence."""
        while True:
            try:
                yield self.queue.get(timeout=tick)
            except queue.Empty:
                if not self.alive() and self.queue.empty():
                    return
                yield None

    def join(self, timeout: float = 30.0) -> None:
        for t in self._threads:
            t.join(timeout)

    # -- scheduling -----------------------------------------------------------------------------
    def _next_task(self) -> tuple[Any, ...] | None:
        with self._cond:
            while True:
                if self.stop.is_set():
                    return None
                if self._page_tasks:
                    self._active += 1
                    return ("page", *self._page_tasks.popleft())
                if self._claim is not None:
                    if not self._claim_exhausted:
                        i = self._claim()
                        if i is not None and i < len(self.streams):
                            self._active += 1
                            return ("stream", i)
                        self._claim_exhausted = True
                elif self._next_stream < len(self.streams):
                    i = self._next_stream
                    self._next_stream += 1
                    self._active += 1
                    return ("stream", i)
                if self._active == 0:
                    self._cond.notify_all()
                    return None
                self._cond.wait(0.2)

    def _task_done(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def _put(self, item: tuple[int, int, Any]) -> None:
        while True:
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                if self.stop.is_set() and item[0] == PAGE:
                    raise Cancelled() from None

    def _worker(self) -> None:
        while True:
            task = self._next_task()
            if task is None:
                return
            try:
                if task[0] == "stream":
                    self._run_stream(task[1])
                else:
                    self._run_page(*task[1:])
            except Cancelled:
                pass
            except Exception as e:  # noqa: BLE001 - a bug in one stream must surface, not hang the run
                log.exception("fetch_worker_error", stream=task[1])
                self._fail(task[1], e)
            finally:
                self._task_done()

    def _fail(self, idx: int, err: BaseException) -> None:
        with self._cond:
            if idx in self._failed:
                return
            self._failed.add(idx)
        self._put((FAIL, idx, err))

    # -- fetching -------------------------------------------------------------------------------
    def _url(self, s: Stream, skip: int = 0, count: bool = False) -> str:
        if not self.odata:
            return self.client.url_for(s.path)
        return self.client.url_for(s.path, self.client.odata_params(
            page_size=self.page_size, skip=skip, filter_expr=s.filter_expr, orderby=self.orderby, count=count))

    def _get(self, url: str) -> Page:
        if self.stop.is_set():
            raise Cancelled()
        return self.client.get(url, endpoint=self.endpoint)

    def _run_stream(self, idx: int) -> None:
        s = self.streams[idx]
        url = self._url(s, count=True)
        try:
            page = self._get(url)
        except ApiError as e:
            self._fail(idx, e)
            return
        self._put((PAGE, idx, (url, page)))
        n = advance(page, self.page_size)
        skips = split_plan(self.client, self.endpoint, url, page, self.page_size) \
            if self.split_pages and self.odata else None
        if skips:
            with self._cond:
                self._pending[idx] = len(skips)
                # page tasks go first: finish streams already started before opening new ones
                for k, sk in enumerate(skips):
                    self._page_tasks.append((idx, sk, k == len(skips) - 1, n))
                self._cond.notify_all()
            return
        self._continue(idx, url, page, skip=n, count=page.count)

    def _run_page(self, idx: int, skip: int, last: bool, step: int) -> None:
        s = self.streams[idx]
        try:
            if idx in self._failed:
                return
            url = self._url(s, skip=skip)
            try:
                page = self._get(url)
            except ApiError as e:
                self._fail(idx, e)
                return
            self._put((PAGE, idx, (url, page)))
            if last and len(page.records) >= step:
                # the entity grew since the count: keep going until a short page
                self._continue(idx, url, page, skip=skip + advance(page, self.page_size), count=None,
                               post_done=False)
        except Cancelled:
            with self._cond:
                self._incomplete.add(idx)  # stopped before this page: the stream is not complete
            raise
        finally:
            with self._cond:
                self._pending[idx] -= 1
                finished = self._pending[idx] == 0 and idx not in self._failed and idx not in self._incomplete
            if finished:
                self._put((DONE, idx, None))

    def _continue(self, idx: int, url: str, page: Page, *, skip: int, count: int | None,
                  post_done: bool = True) -> None:
        """Sequential paging after ``page`` (next links, or ``$skip`` without a known page plan)."""
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
                page = self._get(url)
                self._put((PAGE, idx, (url, page)))
                skip += advance(page, self.page_size)
        except ApiError as e:
            self._fail(idx, e)
            return
        if post_done:
            self._put((DONE, idx, None))


def drive(fan: ThreadFanout, *, on_page: Callable[[int, str, Page], None], on_done: Callable[[int], None],
          on_fail: Callable[[int, BaseException], None], on_tick: Callable[[], None]) -> None:
    """Consume a thread fan-out's queue on the calling thread with the same callbacks the asyncio
    engine uses (the calling thread is the only one that publishes)."""
    last = 0.0
    import time

    for item in fan.results():
        if item is not None:
            kind, idx, payload = item
            if kind == PAGE:
                on_page(idx, payload[0], payload[1])
            elif kind == DONE:
                on_done(idx)
            elif kind == FAIL:
                on_fail(idx, payload)
        now = time.monotonic()
        if item is None or now - last > 0.25:
            last = now
            on_tick()
