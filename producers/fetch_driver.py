"""Step 5 of a run: fetch every stream and publish every page, and judge what came back.

:class:`FetchDriver` picks the source (a CSV file, the API in this process, the API across worker
processes), runs the engine over the fetch core, and keeps the streams' outcomes: which completed,
which failed and why, and whether the whole run must stop -- a fatal API error (key refused, 501,
a next link to another host), an endpoint that answers 404/400 for every one of its first parents
(the endpoint, not the parents, is wrong), the run's timeout, or an operator's stop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from common.config import Settings
from common.logging import get_logger, scrub
from common.metrics import RECORDS_EXTRACTED
from producers.cc_client import CCClient
from producers.engines import run_async, run_threads
from producers.errors import (
    ApiError,
    AuthError,
    BadRequestError,
    NotFoundError,
    NotImplementedApiError,
    UnsafeLinkError,
)
from producers.fetch import Fetch
from producers.page_publisher import PagePublisher
from producers.paging import Stream, paginator_for
from producers.publisher import DeliveryTracker
from schemas.jobs import Job

log = get_logger("extractor")

#: errors that mean the endpoint (not one parent) is unusable: stop the whole run at once
FATAL_API_ERRORS = (AuthError, NotImplementedApiError, UnsafeLinkError)
#: a parameterized job whose first N parents all answer 404/400 has an invalid endpoint
ENDPOINT_PROBE_PARENTS = 10


class Interrupted(Exception):
    """The run was asked to stop (SIGTERM, Ctrl-C): recorded as failed with this reason."""


class EndpointInvalid(Exception):
    """Every parent tried answered 404/400: the endpoint, not the parents, is wrong."""


class FetchDriver:
    """Fetches one run's streams. Its callbacks run on one thread (the engine's)."""

    def __init__(self, job: Job, settings: Settings, pages: PagePublisher, *, workers: int, processes: int,
                 engine: str, stop: threading.Event):
        self.job = job
        self.s = settings
        self.pages = pages
        self.workers = workers
        self.processes = processes
        self.engine = engine
        self.stop = stop
        self.streams: Sequence[Stream] = []
        #: stream outcomes
        self.ok: set[int] = set()
        self.failed: dict[int, BaseException] = {}
        #: the reason the whole run stops (set once; also set from a signal handler via interrupt())
        self.fatal: BaseException | None = None
        self.api_calls = 0
        self.retries = 0
        self._client: CCClient | None = None
        self._probe = ENDPOINT_PROBE_PARENTS
        self._deadline = float("inf")
        #: process engine: what the workers report (this process publishes nothing then)
        self._proc: Any = None

    # -- control --------------------------------------------------------------------------------------
    def interrupt(self, reason: str) -> None:
        """Stop the run (signal-safe: sets flags only); it is recorded failed with ``reason``."""
        if self.fatal is None:
            self.fatal = Interrupted(reason)
        self.stop.set()

    @property
    def timeout_s(self) -> int:
        return self.job.timeout_seconds or self.s.etl_timeout_seconds

    def _check_deadline(self) -> None:
        if time.monotonic() > self._deadline and self.fatal is None:
            self.fatal = TimeoutError(f"the run exceeded its timeout of {self.timeout_s} s (timeout_seconds in "
                                      "config/jobs.yaml, or ETL_TIMEOUT_SECONDS)")
            self.stop.set()

    # -- counters (read by the heartbeat and the progress display from other threads) ----------------
    @property
    def records(self) -> int:
        return self._proc.totals().records if self._proc is not None else self.pages.records

    @property
    def page_count(self) -> int:
        return self._proc.totals().pages if self._proc is not None else self.pages.pages

    def live_api_calls(self) -> int:
        if self._proc is not None:
            return int(self._proc.totals().api_calls)
        return self._client.api_calls if self._client is not None else self.api_calls

    def delivered(self, tracker: DeliveryTracker) -> int:
        return max(tracker.delivered, self._proc.totals().delivered if self._proc is not None else 0)

    # -- fetching -------------------------------------------------------------------------------------
    def run(self, streams: Sequence[Stream], run_id: int, on_tick: Any) -> None:
        """Fetch and publish every stream; raises the fatal error that stopped the run, if any."""
        self.streams = streams
        self._deadline = time.monotonic() + self.timeout_s
        self._probe = min(ENDPOINT_PROBE_PARENTS, len(streams))

        def tick() -> None:
            on_tick()
            self._check_deadline()

        if self.job.source_type == "csv":
            self._run_csv(tick)
        elif self.processes:
            self._run_processes(run_id, tick)
        else:
            self._run_engine(tick)
        if self.fatal is not None:
            raise self.fatal

    def _run_engine(self, tick: Any) -> None:
        client = CCClient.from_settings(self.s, pool_size=self.workers + 2, cancel=self.stop)
        self._client = client
        fetch = Fetch(self.streams, paginator_for(self.job, client.urls), policy=client.policy,
                      limiter=client.limiter, stop=self.stop, on_page=self._on_page, on_done=self.ok.add,
                      on_fail=self.stream_failed)
        try:
            run = run_async if self.engine == "async" else run_threads
            run(fetch, client, concurrency=self.workers, stop=self.stop, on_tick=tick)
        finally:
            self.stop.set()
            self.api_calls, self.retries = client.api_calls, fetch.retries
            client.close()

    def _on_page(self, idx: int, url: str, page: Any) -> None:
        if self.fatal is not None:
            return  # the run is failing: pages still in flight are not published
        self.pages.publish(self.streams[idx], page, url)

    def _run_csv(self, tick: Any) -> None:
        from producers.csv_source import read_pages

        st = Stream(0, self.job.endpoint, None)
        self.streams = [st]
        for page in read_pages(self.job, timeout=self.s.etl_request_timeout_seconds):
            self.pages.publish(st, page)
            tick()
            if self.stop.is_set():
                break
        if self.fatal is None:  # read to the end, or to --limit
            self.ok.add(0)

    def _run_processes(self, run_id: int, tick: Any) -> None:
        from producers.process_engine import (
            ProcessEngine,
            StreamDone,
            StreamFailed,
            WorkerDied,
            WorkerFinal,
        )

        pe = ProcessEngine(self.s, self.job, run_id, self.streams, processes=self.processes,
                           concurrency=max(1, self.workers // self.processes),
                           track_timestamps=self.pages.track_timestamps, engine=self.engine,
                           watch=self.pages.watch).start()
        self._proc = pe
        extracted = RECORDS_EXTRACTED.labels(self.job.target_table)
        seen = 0
        try:
            for msg in pe.messages():
                if isinstance(msg, StreamDone):
                    self.ok.add(msg.stream)
                    self.pages.stream_records[msg.stream] = msg.records
                    if msg.max_timestamp is not None:
                        self.pages.stream_max[msg.stream] = msg.max_timestamp
                elif isinstance(msg, StreamFailed):
                    self.stream_failed(msg.stream, msg.error)
                elif isinstance(msg, WorkerFinal):
                    d = msg.delivery
                    self.pages.tracker.merge(d["per_partition"], d["last_offset"], d["delivered"], d["failed"],
                                             d["first_error"])
                    self.pages.records_missing_key += msg.records_missing_key
                    if msg.changes is not None:
                        self.pages.changes.add(msg.changes)
                    self.retries += msg.retries
                elif isinstance(msg, WorkerDied) and self.fatal is None:
                    self.fatal = RuntimeError(f"extract worker process {msg.worker} died (exit code {msg.exitcode})")
                    self.stop.set()
                total = pe.totals().records
                if total > seen:  # worker processes count into their own registries
                    extracted.inc(total - seen)
                    seen = total
                tick()
                if self.stop.is_set():
                    pe.stop.set()
        finally:
            pe.join()
            t = pe.totals()
            self.pages.records, self.pages.pages, self.api_calls = t.records, t.pages, t.api_calls
            self._proc = None

    # -- outcomes ---------------------------------------------------------------------------------------
    def stream_failed(self, idx: int, err: BaseException) -> None:
        """A stream failed for good: skip that parent, or stop the run when the error says the
        endpoint itself (or the key) is unusable."""
        self.failed[idx] = err
        st = self.streams[idx]
        if isinstance(err, FATAL_API_ERRORS) or not isinstance(err, ApiError) or not self.job.requires_parameters:
            if self.fatal is None:
                self.fatal = err
                self.stop.set()
            return
        log.warning("parent_failed", job_id=self.job.id, params=st.params, error_class=type(err).__name__,
                    status=getattr(err, "status", None), error=str(err))
        if (not self.ok and isinstance(err, NotFoundError | BadRequestError) and self.fatal is None
                and len(self.failed) >= self._probe
                and all(isinstance(e, NotFoundError | BadRequestError) for e in self.failed.values())):
            self.fatal = EndpointInvalid(
                f"every one of the first {len(self.failed)} parents answered HTTP {getattr(err, 'status', '?')}: "
                f"the endpoint itself looks invalid for this API (last: GET {getattr(err, 'url', '?')}); "
                "fix or disable the job")
            self.stop.set()

    def outcome(self, tracker: DeliveryTracker, run_id: int | None) -> tuple[str, str | None, str | None]:
        """(status, error, error class) of the fetch once every delivery report is in."""
        if tracker.failed:
            return ("failed", f"{tracker.failed} of {tracker.produced} records were not acknowledged by the broker "
                              f"({tracker.first_error}): the run is incomplete and will be re-run", "PublishError")
        if not self.job.requires_parameters:
            if self.failed:
                err = next(iter(self.failed.values()))
                return "failed", describe(err), type(err).__name__
            return "success", None, None
        n = len(self.failed)
        if n == 0:
            return "success", None, None
        first = next(iter(self.failed.values()))
        if self.ok:
            return ("partial", f"{n} of {len(self.streams)} parents failed (first: {describe(first)}); "
                               f"`trialsync retry --run-id {run_id}` redoes only those", "PartialFailure")
        return "failed", f"all {n} parents failed (first: {describe(first)})", type(first).__name__

    def new_watermarks(self, status: str, tracker: DeliveryTracker) -> dict[str, datetime]:
        """Per parent key, the watermark each completed stream earned (none for samples, runs with
        unacknowledged records, or a failed plain job)."""
        if not self.pages.track_timestamps or self.pages.limit is not None or tracker.failed:
            return {}
        if status == "failed" and not self.job.requires_parameters:
            return {}
        out: dict[str, datetime] = {}
        for idx in self.ok:
            mt = self.pages.stream_max.get(idx)
            if mt is not None:
                out[self.streams[idx].parent_key] = mt
        return out

    def failed_parents(self) -> list[dict[str, str]]:
        if not self.job.requires_parameters:
            return []
        return [p for i in sorted(self.failed) if i < len(self.streams) and (p := self.streams[i].params)]

    def not_attempted(self, status: str) -> int:
        """Parents never asked because the run stopped early (a retry needs them too)."""
        if not (self.job.requires_parameters and status == "failed" and self.streams):
            return 0
        return len(self.streams) - len(self.ok | set(self.failed))


def describe(e: BaseException) -> str:
    """One scrubbed line of an error."""
    text = str(e) or type(e).__name__
    return scrub(text.splitlines()[0] if "\n" in text else text)


def error_dict(e: BaseException) -> dict[str, Any]:
    return {"error_class": type(e).__name__, "status": e.status if isinstance(e, ApiError) else None,
            "message": describe(e)}
