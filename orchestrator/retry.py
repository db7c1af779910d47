"""Retry policy: which failed runs are worth another attempt, what the attempt redoes, and when.

Seed 001's strategy (``delay = base * 2 ** attempt``, at most ``ETL_MAX_RETRIES``) applied to whole
runs, on top of the API client's own per-request retries:

* a **failed** run is redone in full (its watermarks never moved, so an incremental redo fetches
  the same window again) -- a paged stream continues from the failed run's resume point, the last
  record every earlier page was acknowledged up to, instead of page 1;
* a **partial** parameterized run redoes **only its failed parents** -- the parameter dicts the
  extractor stored in ``dw_etl_runs.run_context->'failed_parents'`` -- so one flaky study does not
  cost a second pass over thousands of healthy ones;
* **permanent** errors (the API refused the key, the endpoint does not exist, bad configuration)
  are not retried: the same request would fail the same way, only later;
* the delay grows ``ETL_RETRY_DELAY_SECONDS * 2^(attempt-1)``, capped, with a little jitter so
  many jobs failing together (an API outage) do not come back in lock-step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

#: error classes (``dw_etl_runs.error_class``) that another attempt cannot fix
PERMANENT_ERRORS = frozenset({
    "AuthError", "NotImplementedApiError", "UnsafeLinkError", "_EndpointInvalid", "EndpointInvalid",
    "BadRequestError", "ClientError", "ConfigError", "CatalogError", "JobNotRunnable", "NotFoundError",
})


class TransientError(Exception):
    """Raised by callers of :func:`retry_with_backoff` for failures worth another try."""


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3
    base_delay: float = 5.0
    max_delay: float = 600.0
    jitter: float = 0.1

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` = the one that just failed, 1-based)."""
        d = min(self.max_delay, self.base_delay * (2 ** max(0, attempt - 1)))
        if self.jitter and d > 0:
            d *= 1 + self.jitter * (2 * rng() - 1)
        return max(0.0, d)

    def should_retry(self, status: str, attempt: int, error_class: str | None,
                     failed_parents: list[dict[str, Any]] | None = None) -> bool:
        """True when a run that ended ``status`` after ``attempt`` attempts gets another one."""
        if attempt > self.max_retries:
            return False
        if status == "failed":
            return error_class not in PERMANENT_ERRORS
        if status == "partial":
            # a partial run without failed parents (records the loader rejected) cannot be redone
            return bool(failed_parents)
        return False


@dataclass(frozen=True)
class RetryRequest:
    """What the next attempt of a job does."""

    job_id: int
    attempt: int
    parent_run_id: int | None
    #: None = the whole job; a list = only these parents (a partial run's failed ones)
    only_parents: list[dict[str, Any]] | None = None
    #: a failed run to continue from (its resume point, when it has one)
    resume_from: int | None = None

    @property
    def scope(self) -> str:
        return "whole job" if self.only_parents is None else f"{len(self.only_parents)} failed parent(s)"


def next_attempt(job_id: int, status: str, run_id: int | None, attempt: int,
                 failed_parents: list[dict[str, Any]] | None) -> RetryRequest:
    """The retry of a run: a partial run redoes its failed parents, a failed one everything."""
    only = list(failed_parents) if status == "partial" and failed_parents else None
    return RetryRequest(job_id=job_id, attempt=attempt + 1, parent_run_id=run_id, only_parents=only,
                        resume_from=run_id if status == "failed" else None)


class NotRetryable(ValueError):
    """``trialsync retry --run-id R`` on a run that cannot be retried; the message says why."""


def manual_retry_request(conn: psycopg.Connection, run_id: int) -> RetryRequest:
    """What ``trialsync retry --run-id R`` redoes, read from the run's row."""
    row = conn.execute(
        """SELECT job_id, run_status, attempt, run_context -> 'failed_parents',
                  coalesce((run_context ->> 'parents_not_attempted')::int, 0)
           FROM etl.dw_etl_runs WHERE id = %s""", (run_id,)).fetchone()
    if row is None:
        raise NotRetryable(f"run {run_id} does not exist: see `trialsync history --job ID` for run ids")
    job_id, status, attempt, failed_parents, not_attempted = row
    if status in ("running", "pending"):
        raise NotRetryable(f"run {run_id} of job {job_id} is still {status}: wait for it to finish "
                           "(a run whose process died is marked failed by the next run of the job)")
    if status == "success":
        raise NotRetryable(f"run {run_id} of job {job_id} succeeded: nothing to retry "
                           f"(run the job again with `trialsync run --job {job_id}`)")
    if status == "cancelled":
        raise NotRetryable(f"run {run_id} of job {job_id} was cancelled: run the job again with "
                           f"`trialsync run --job {job_id}`")
    parents = failed_parents if isinstance(failed_parents, list) else []
    if status == "partial" and not parents:
        raise NotRetryable(f"run {run_id} of job {job_id} is partial because the loader rejected records, "
                           "not because parents failed: see etl.dw_etl_rejects and the dead-letter topic")
    if status == "partial" and not_attempted:
        parents = []  # parents were never tried: only a full redo covers them
    return RetryRequest(job_id=int(job_id), attempt=int(attempt) + 1, parent_run_id=run_id,
                        only_parents=parents if status == "partial" and parents else None,
                        resume_from=run_id if status == "failed" else None)


def retry_with_backoff[T](func: Callable[[], T], max_retries: int = 3, base_delay: float = 5.0,
                       sleep: Callable[[float], None] = time.sleep,
                       retry_on: tuple[type[BaseException], ...] = (TransientError,)) -> T:
    """Seed 001's helper: call ``func``; on a transient error wait ``base * 2^attempt`` and retry."""
    for attempt in range(max_retries + 1):
        try:
            return func()
        except retry_on:
            if attempt == max_retries:
                raise
            sleep(base_delay * (2 ** attempt))
    raise AssertionError("unreachable")  # pragma: no cover
