"""The fetch core every engine drives: which request goes next, and what each answer means.

Sans-IO: :class:`Fetch` never touches the network or sleeps. An engine (``producers.engines``:
threads, asyncio; ``producers.process_engine``: worker processes) only decides how many requests
run at once and how they are sent; it asks :meth:`Fetch.next_request`, sends it (honouring the
request's ``not_before``), and reports back with :meth:`Fetch.complete`, :meth:`Fetch.error` or
:meth:`Fetch.cancelled`. Paging rules come from the job's paginator (``producers.paging``), retry
decisions from ``producers.retry``; so every engine pages and retries identically.

Scheduling:

* work on streams already started goes before new streams (bounds the streams in flight, and one
  big entity's planned pages are fetched by every worker at once); the next page of a sequential
  stream goes to the front, planned pages and retries in order;
* a stream is *done* when every request it spawned was answered and none failed; it *fails* once,
  with the first permanent error or the last transient one after its retry budget (its pages
  already published stay valid); a stream whose requests were dropped because the run stopped is
  neither (the extractor counts it as not attempted).

Single-threaded: one thread (the engine's loop or the thread engine's dispatcher) calls it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from common.logging import get_logger
from common.metrics import API_RETRIES
from producers.errors import ApiError, RateLimitedError, TransientApiError
from producers.pages import Page
from producers.paging import NEXT, Paginator, Request, Stream
from producers.rate_limit import Limiter
from producers.retry import RetryPolicy

log = get_logger("fetch")

OnPage = Callable[[int, str, Page], None]
OnDone = Callable[[int], None]
OnFail = Callable[[int, BaseException], None]


class Fetch:
    """The fetch state of one run (or of one worker process's share of it)."""

    def __init__(self, streams: Sequence[Stream], paginator: Paginator, *, policy: RetryPolicy, limiter: Limiter,
                 stop: threading.Event, on_page: OnPage, on_done: OnDone, on_fail: OnFail,
                 claim: Callable[[], int | None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.streams = streams
        self.paginator = paginator
        self.endpoint = paginator.endpoint
        self.policy = policy
        self.limiter = limiter
        self.stop = stop
        self.on_page, self.on_done, self.on_fail = on_page, on_done, on_fail
        #: where stream indices come from: in order here, or (worker processes) a shared counter
        self._claim = claim
        self._clock = clock
        self._ready: deque[Request] = deque()
        self._next_stream = 0
        self._pending: dict[int, int] = {}
        self._failed: set[int] = set()
        self._incomplete: set[int] = set()
        #: requests handed out and not yet reported back
        self.in_flight = 0
        self.retries = 0

    # -- what to send --------------------------------------------------------------------------------
    def next_request(self) -> Request | None:
        """The next request to send, or None when there is nothing to start now. None with
        ``in_flight == 0`` means the fetch is over (all answered, or stopped)."""
        if self.stop.is_set():
            return None
        while self._ready:
            req = self._ready.popleft()
            if req.stream in self._failed:
                self._settle(req.stream)
                continue
            self.in_flight += 1
            return req
        idx = self._new_stream()
        if idx is None:
            return None
        self._pending[idx] = 1
        self.in_flight += 1
        return self.paginator.first(self.streams[idx])

    def _new_stream(self) -> int | None:
        if self._claim is not None:
            i = self._claim()
            if i is not None and i < len(self.streams):
                return i
            self._claim = lambda: None  # exhausted: never ask the shared counter again
            return None
        if self._next_stream < len(self.streams):
            self._next_stream += 1
            return self._next_stream - 1
        return None

    # -- what came back --------------------------------------------------------------------------------
    def complete(self, req: Request, page: Page) -> None:
        """``req`` was answered with ``page``: hand it on, queue what follows it."""
        self.in_flight -= 1
        idx = req.stream
        try:
            self.on_page(idx, req.url, page)
            following = self.paginator.after(self.streams[idx], req, page)
        except ApiError as e:  # e.g. a next link to another host
            self._fail(idx, e)
            self._settle(idx)
            return
        except Exception as e:  # noqa: BLE001 - a bug in one stream must surface, not hang the run
            log.exception("fetch_stream_error", stream=idx)
            self._fail(idx, e)
            self._settle(idx)
            return
        if following:
            self._pending[idx] += len(following)
            if len(following) == 1 and following[0].kind == NEXT:
                self._ready.appendleft(following[0])
            else:
                self._ready.extend(following)
        self._settle(idx)

    def error(self, req: Request, err: BaseException) -> None:
        """Sending ``req`` failed: retry it (producers.retry decides when) or fail its stream."""
        self.in_flight -= 1
        if isinstance(err, TransientApiError):
            if isinstance(err, RateLimitedError):
                req.limited += 1
            else:
                req.attempts += 1
            delay = None if self.stop.is_set() else self.policy.next_delay(err, req.attempts, req.limited)
            if delay is not None:
                if isinstance(err, RateLimitedError):
                    # the limit is per key: hold every worker of this instance, not only this one
                    self.limiter.pause(delay)
                self.retries += 1
                API_RETRIES.labels(self.endpoint, err.reason).inc()
                log.info("api_retry", endpoint=self.endpoint, reason=err.reason, status=err.status,
                         attempt=req.attempts + req.limited, delay_s=round(delay, 3))
                req.not_before = self._clock() + delay
                self._ready.appendleft(req)
                return
            err.attempts = req.attempts + req.limited
        elif not isinstance(err, ApiError):
            log.error("fetch_request_error", stream=req.stream, error_class=type(err).__name__, error=str(err))
        self._fail(req.stream, err)
        self._settle(req.stream)

    def cancelled(self, req: Request) -> None:
        """``req`` was not sent because the run stopped: its stream is incomplete."""
        self.in_flight -= 1
        self._incomplete.add(req.stream)
        self._settle(req.stream)

    # -- stream outcomes ---------------------------------------------------------------------------------
    def _fail(self, idx: int, err: BaseException) -> None:
        if idx in self._failed:
            return
        self._failed.add(idx)
        self.on_fail(idx, err)

    def _settle(self, idx: int) -> None:
        left = self._pending[idx] - 1
        self._pending[idx] = left
        if left == 0:
            del self._pending[idx]
            if idx not in self._failed and idx not in self._incomplete:
                self.on_done(idx)


def fetch_pages(client: object, paginator: Paginator, stream: Stream, *, policy: RetryPolicy | None = None,
                stop: threading.Event | None = None) -> Iterator[tuple[str, Page]]:
    """Every page of one stream, one request at a time on the calling thread; raises the stream's
    error. For small reads (``trialsync doctor``, tests); runs use the engines."""
    from producers.cc_client import CCClient

    assert isinstance(client, CCClient)
    pages: list[tuple[str, Page]] = []
    failure: list[BaseException] = []
    stop = stop or threading.Event()
    fetch = Fetch([stream], paginator, policy=policy or client.policy, limiter=client.limiter, stop=stop,
                  on_page=lambda i, url, page: pages.append((url, page)), on_done=lambda i: None,
                  on_fail=lambda i, e: failure.append(e))
    while (req := fetch.next_request()) is not None:
        wait = req.not_before - time.monotonic()
        if wait > 0 and not client.pause(wait):
            fetch.cancelled(req)
            break
        try:
            client.limiter.acquire()
            page = client.attempt(req.url, paginator.endpoint)
        except ApiError as e:
            fetch.error(req, e)
        else:
            fetch.complete(req, page)
        yield from pages
        pages.clear()
    if failure:
        raise failure[0]
