"""Fetch across worker *processes* (``run_job(..., processes=N)``, ``trialsync extract --processes N``).

Each worker process claims streams from a shared counter and runs the same fetch core and engine as
a single-process run (``producers.fetch``, ``producers.engines``), publishing through its own
:class:`~producers.page_publisher.PagePublisher` and idempotent producer -- records never cross a
process boundary. The extracting process receives only small typed messages: a stream's outcome
(:class:`StreamDone` / :class:`StreamFailed`), periodic :class:`WorkerProgress`, and at the end
each worker's :class:`WorkerFinal` with its delivery bookkeeping, which it merges into the run's
tracker. All workers share one :class:`~producers.rate_limit.SharedRateLimiter`.

Why it is not the default: measured on the 2-core reference machine (bench/extract_bench.py), one
process reaches the simulator's capacity, and processes add start-up (spawn + imports, ~1 s each),
a producer per process and IPC. They help where one core cannot keep up with the API (many cores,
a fast API, large pages). Caveat: the shared limiter is per run; two concurrent runs in different
modes against one instance do not share a limiter.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from common.config import Settings
from producers.paging import Stream
from schemas.jobs import Job

if TYPE_CHECKING:
    from producers.page_publisher import ChangeTally, ChangeWatch
    from producers.pages import Page


@dataclass(frozen=True, slots=True)
class StreamDone:
    stream: int
    records: int
    max_timestamp: datetime | None


@dataclass(frozen=True, slots=True)
class StreamFailed:
    stream: int
    error: BaseException


@dataclass(frozen=True, slots=True)
class WorkerProgress:
    worker: int
    records: int
    pages: int
    api_calls: int
    delivered: int


@dataclass(frozen=True, slots=True)
class WorkerFinal:
    progress: WorkerProgress
    delivery: dict[str, Any]  # DeliveryTracker.snapshot()
    records_missing_key: int
    retries: int
    #: what the worker's records showed of the `changed` policy's assumption
    changes: ChangeTally | None = None


@dataclass(frozen=True, slots=True)
class WorkerDied:
    worker: int
    exitcode: int | None


WorkerMessage = StreamDone | StreamFailed | WorkerProgress | WorkerFinal | WorkerDied


def _picklable(err: BaseException) -> BaseException:
    try:
        pickle.dumps(err)
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(err).__name__}: {err}")


def worker_main(worker: int, settings: Settings, job: Job, run_id: int, streams: Sequence[Stream], counter: Any,
                results: Any, limiter: Any, concurrency: int, stop_evt: Any, track_timestamps: bool,
                engine: str = "async", watch: ChangeWatch | None = None) -> None:
    """Body of one worker process (spawned): fetch claimed streams, publish, report."""
    from common import kafka as K
    from common.logging import setup_logging
    from producers.cc_client import CCClient
    from producers.engines import run_async, run_threads
    from producers.fetch import Fetch
    from producers.page_publisher import PagePublisher
    from producers.paging import paginator_for
    from producers.publisher import DeliveryTracker, Publisher

    setup_logging("extractor")
    topic = K.bronze_topic(job.target_table, settings)
    publisher = Publisher(settings)
    tracker = DeliveryTracker(topic)
    stop = threading.Event()
    client = CCClient.from_settings(settings, limiter=limiter, pool_size=concurrency + 2, cancel=stop)
    pages = PagePublisher(job, run_id=run_id, instance_id=settings.cc_instance_id, publisher=publisher,
                          tracker=tracker, topic=topic, track_timestamps=track_timestamps, stop=stop)
    pages.watch = watch

    def claim() -> int | None:
        if stop_evt.is_set():
            return None
        with counter.get_lock():
            i = int(counter.value)
            counter.value = i + 1
        return i

    def progress() -> WorkerProgress:
        return WorkerProgress(worker, pages.records, pages.pages, client.api_calls, tracker.delivered)

    def on_tick() -> None:
        if stop_evt.is_set():
            stop.set()
        results.put(progress())

    def on_page(i: int, url: str, page: Page) -> None:
        pages.publish(streams[i], page)

    fetch = Fetch(streams, paginator_for(job, client.urls), policy=client.policy, limiter=client.limiter, stop=stop,
                  on_page=on_page,
                  on_done=lambda i: results.put(StreamDone(i, pages.stream_records.get(i, 0),
                                                           pages.stream_max.get(i))),
                  on_fail=lambda i, e: results.put(StreamFailed(i, _picklable(e))), claim=claim)
    try:
        run = run_async if engine == "async" else run_threads
        run(fetch, client, concurrency=concurrency, stop=stop, on_tick=on_tick)
        publisher.wait(tracker)
    finally:
        stop.set()
        client.close()
        results.put(WorkerFinal(progress(), tracker.snapshot(), pages.records_missing_key, fetch.retries,
                                pages.changes))


class ProcessEngine:
    """Starts the workers and yields their messages to the extracting process."""

    def __init__(self, settings: Settings, job: Job, run_id: int, streams: Sequence[Stream], *, processes: int,
                 concurrency: int, track_timestamps: bool, engine: str = "async", watch: ChangeWatch | None = None):
        from producers.rate_limit import SharedRateLimiter

        self.ctx = mp.get_context("spawn")
        self.limiter = SharedRateLimiter(settings.cc_rate_limit_rps, ctx=self.ctx)
        self.counter = self.ctx.Value("q", 0)
        self.results = self.ctx.Queue()
        self.stop = self.ctx.Event()
        self.procs = [
            self.ctx.Process(target=worker_main, name=f"extract-worker-{k}", daemon=True,
                             args=(k, settings, job, run_id, streams, self.counter, self.results, self.limiter,
                                   concurrency, self.stop, track_timestamps, engine, watch))
            for k in range(max(1, processes))
        ]
        self._progress: dict[int, WorkerProgress] = {}
        self._ended: set[int] = set()

    def start(self) -> ProcessEngine:
        for p in self.procs:
            p.start()
        return self

    def messages(self, tick: float = 0.25) -> Iterator[WorkerMessage | None]:
        """Worker messages until every worker sent its final report (or died); None every ``tick``."""
        while len(self._ended) < len(self.procs):
            try:
                msg = self.results.get(timeout=tick)
            except queue.Empty:
                dead = [k for k, p in enumerate(self.procs) if not p.is_alive() and k not in self._ended]
                if dead:
                    try:  # what a dying worker may still have queued
                        while True:
                            yield self._note(self.results.get(timeout=0.5))
                    except queue.Empty:
                        pass
                    for k in dead:
                        if k not in self._ended:
                            self._ended.add(k)
                            yield WorkerDied(k, self.procs[k].exitcode)
                yield None
                continue
            yield self._note(msg)

    def _note(self, msg: WorkerMessage) -> WorkerMessage:
        if isinstance(msg, WorkerProgress):
            self._progress[msg.worker] = msg
        elif isinstance(msg, WorkerFinal):
            self._ended.add(msg.progress.worker)
            self._progress[msg.progress.worker] = msg.progress
        return msg

    def totals(self) -> WorkerProgress:
        """Records, pages, API calls and deliveries summed over workers, as last reported."""
        ps = self._progress.values()
        return WorkerProgress(-1, sum(p.records for p in ps), sum(p.pages for p in ps), sum(p.api_calls for p in ps),
                              sum(p.delivered for p in ps))

    def join(self, timeout: float = 30) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
