"""Run one extraction job: plan -> fetch -> publish -> finish.

Python API (used by ``trialsync extract`` and by the orchestrator, in-process)::

    from producers.extractor import run_job
    result: RunResult = run_job(
        job,                        # schemas.jobs.Job (from the catalog)
        mode="incremental",         # or "full"; incremental only where the job supports it
        only_parents=None,          # [{"studyId": "12"}, ...]: redo just these parents (retry)
        limit=None,                 # stop after N records (sampling; watermarks are not advanced)
        dry_run=False,              # print the plan (first requests, parent count), publish nothing
        settings=None,              # common.config.Settings; default get_settings()
        trigger="cli",              # recorded in dw_etl_runs.trigger (cli | orchestrator | scheduler | retry)
        progress=None,              # an object with start(job, parents)/update(**counters)/finish(result)
        parent_run_id=None, orchestration_id=None, attempt=1,
        workers=None,               # requests in flight; default ETL_PARALLEL_JOBS
        processes=None, engine=None,
    )
    # schemas.runs.RunResult: run_id, status ("success" | "partial" | "failed"), records_published,
    # failed_parents, end_offsets, error, warnings, ...

``run_job`` never raises for a failure of the *run* (API down, key refused, broker error): it
records the run as ``failed`` and returns the result with ``error``. It raises only when there is
no run to record: configuration problems (``ConfigError``, ``CatalogError``), a disabled/invalid
job (``JobNotRunnable``), or an unreachable database (``DatabaseError``).

The delivery contract -- what one run does, in this order (each step is marked ``# -- N.`` in
:meth:`Extraction.run` and ``producers/run_recorder.py``):

1. marks stale ``running`` rows of dead extractors ``failed`` (``producers.runs``);
2. inserts its ``running`` row; starts a heartbeat;
3. creates the table's topic on first use; plans the streams -- one for a plain job, one per
   parent parameter dict for a parameterized job -- and the ``$filter`` of each from the
   watermarks (``producers.planner``);
4. publishes ``run_started`` on the control topic;
5. fetches every stream and publishes every record (key ``source_id``, value the raw record,
   headers job/run/instance/extracted-at/params/modified-at) through the process's idempotent
   producer (``producers.fetch_driver``: the engine over the fetch core, ``producers.page_publisher``);
6. waits until the broker acknowledged every record (delivery reports: per-partition count and
   last offset);
7. writes counters, ``run_context.topic``/``end_offsets``/``failed_parents`` and watermark range to
   ``dw_etl_runs`` (status still ``running``);
8. commits the watermarks (topic + ``dw_etl_watermarks``) -- only for streams that completed;
9. publishes ``run_finished`` (status, records per partition, end offsets);
10. sets the final status and the job's ``last_run_*``.

Steps 7-10 are ``producers.run_recorder.RunRecorder.finish``. A run killed anywhere before step 10
is found stale by the next run; its records already published are harmless repeats for the
upserting loader, and its watermarks never moved.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Literal, Protocol

from common.config import ConfigError, Settings, get_settings
from common.db import connect
from common.kafka import bronze_topic
from common.logging import get_logger
from common.metrics import JOB_RUNS_STARTED, JOB_TIMEOUT, RECORDS_PUBLISHED, RUNS_IN_PROGRESS
from producers import runs as runs_mod
from producers.call_plan import LedgerBudget
from producers.fetch_driver import FetchDriver, Interrupted, describe
from producers.page_publisher import PagePublisher, ResumePoint
from producers.planner import (
    CallBudget,
    FixedBudget,
    RunPlan,
    change_watch,
    describe_filter,
    plan_run,
    resumable,
)
from producers.publisher import DeliveryTracker, Publisher, get_publisher
from producers.run_recorder import RunFacts, RunRecorder, publish_control
from schemas.jobs import Job
from schemas.messages import RunStarted
from schemas.runs import RunResult

log = get_logger("extractor")

Mode = Literal["incremental", "full"]
DRY_RUN_SAMPLE = 5

_ACTIVE: set[Extraction] = set()
_ACTIVE_LOCK = threading.Lock()


def request_stop(reason: str = "interrupted") -> int:
    """Ask every run of this process to stop now (safe from a signal handler: sets flags only).

    Each run stops issuing requests, waits for the broker to acknowledge what it published, and
    records itself ``failed`` with ``reason`` (and its end offsets), instead of being left
    ``running``. Returns the number of runs asked.
    """
    with _ACTIVE_LOCK:
        runs = list(_ACTIVE)
    for ex in runs:
        ex.driver.interrupt(reason)
    return len(runs)


class Stalled(RuntimeError):
    """No progress for ETL_STALL_SECONDS while the run was alive: failed, to be retried."""


class JobNotRunnable(ValueError):
    """The job is disabled or its endpoint is invalid; the message says how to enable it."""


class ProgressSink(Protocol):
    def start(self, job: Job, parents_total: int | None) -> None: ...

    def update(self, **counters: Any) -> None: ...

    def finish(self, result: RunResult) -> None: ...


def check_runnable(job: Job) -> None:
    if not job.is_valid:
        raise JobNotRunnable(f"job {job.id} ({job.name}) cannot run: {job.invalid_reason}")
    if not job.is_active:
        raise JobNotRunnable(f"job {job.id} ({job.name}) is disabled: enable it in config/jobs.yaml "
                             f"(jobs: {{{job.id}: {{enabled: true}}}}) and run `trialsync jobs sync`")


def choose_engine(settings: Settings, requested: str | None = None) -> str:
    """``async`` (uvloop, the default) or ``threads`` (requests); ``auto`` picks threads only when an
    HTTP(S) proxy applies to the API, which the asyncio client does not support."""
    eng = requested or settings.etl_http_engine
    if eng not in ("auto", "async", "threads"):
        raise ConfigError(f"HTTP engine must be auto, async or threads, not {eng!r}")
    if eng != "auto":
        return eng
    if settings.cc_api_base_url:
        from requests.utils import get_environ_proxies

        if get_environ_proxies(settings.cc_api_base_url):
            return "threads"
    return "async"


def run_job(job: Job, *, mode: Mode = "incremental", only_parents: list[dict[str, Any]] | None = None,
            limit: int | None = None, dry_run: bool = False, settings: Settings | None = None,
            trigger: str = "cli", progress: ProgressSink | None = None, parent_run_id: int | None = None,
            orchestration_id: str | None = None, attempt: int = 1, workers: int | None = None,
            processes: int | None = None, engine: str | None = None, max_calls: int | None = None,
            resume_from: int | None = None) -> RunResult:
    """Run ``job`` once (see the module docstring); return its :class:`RunResult`.

    ``max_calls``: the run's share of a night's call budget (fan-out jobs ask changed parents
    first, then the sweep and unfinished first-pass parents, and leave the rest for the next run).
    ``resume_from``: a failed run of this job a paged stream continues from (its resume point)
    instead of page 1 (``trialsync retry`` and the orchestrator's retries pass it).
    """
    s = settings or get_settings()
    check_runnable(job)
    if mode not in ("incremental", "full"):
        raise ConfigError(f"mode must be 'incremental' or 'full', not {mode!r}")
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be at least 1")
    if job.source_type == "cc_api" and not s.cc_api_base_url:
        raise ConfigError("CC_API_BASE_URL is not set: point it at the Clinical Conductor API "
                          "(or at `trialsync simulator serve`)")
    ex = Extraction(job, s, mode=mode, only_parents=only_parents, limit=limit, trigger=trigger,
                    progress=progress, parent_run_id=parent_run_id, orchestration_id=orchestration_id,
                    attempt=attempt, workers=workers or s.etl_parallel_jobs, processes=processes or 0,
                    engine=choose_engine(s, engine), max_calls=max_calls, resume_from=resume_from)
    if dry_run:
        return ex.dry_run()
    return ex.run()


class Extraction:
    """One run of one job: the steps of the delivery contract, in order, and nothing else."""

    def __init__(self, job: Job, settings: Settings, *, mode: Mode, only_parents: list[dict[str, Any]] | None,
                 limit: int | None, trigger: str, progress: ProgressSink | None, parent_run_id: int | None,
                 orchestration_id: str | None, attempt: int, workers: int, processes: int = 0,
                 engine: str = "async", max_calls: int | None = None, resume_from: int | None = None):
        self.job = job
        self.s = settings
        self.requested_mode = mode
        self.incremental = mode == "incremental" and job.supports_incremental and job.source_type == "cc_api"
        self.mode = "incremental" if self.incremental else "full"
        self.only_parents = only_parents
        self.limit = limit
        self.trigger = trigger
        self.progress = progress
        self.parent_run_id = parent_run_id
        self.orchestration_id = orchestration_id
        self.attempt = attempt
        self.workers = max(1, workers)
        #: >0: fan out over worker processes (parameterized API jobs without --limit)
        self.processes = processes if (processes and job.requires_parameters and job.source_type == "cc_api"
                                       and limit is None) else 0
        self.engine = engine
        self.max_calls = max_calls
        self.resume_from = resume_from
        self.budget: CallBudget | None = None
        self.topic = bronze_topic(job.target_table, settings)
        self.table = job.target_table
        self.log = log.bind(job_id=job.id, table=self.table)
        self.run_id: int | None = None
        self.plan: RunPlan | None = None
        self.warnings: list[str] = []
        self.tracker = DeliveryTracker(self.topic)
        self.stop = threading.Event()
        self.pages = PagePublisher(job, run_id=0, instance_id=settings.cc_instance_id, publisher=None,
                                   tracker=self.tracker, topic=self.topic, limit=limit, stop=self.stop,
                                   track_timestamps=job.supports_incremental and job.source_type == "cc_api")
        self.driver = FetchDriver(job, settings, self.pages, workers=self.workers, processes=self.processes,
                                  engine=engine, stop=self.stop)
        self.fetch_seconds = 0.0
        self._published_metric = 0

    @property
    def run_mode(self) -> str:
        return "retry" if self.only_parents is not None else self.mode

    # -- the run ----------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Steps 1-6 here, 7-10 in the run recorder; every outcome is recorded, never raised."""
        t0 = time.monotonic()
        job = self.job
        conn = connect(self.s, autocommit=True, application_name="trialsync-extract")
        with _ACTIVE_LOCK:
            _ACTIVE.add(self)
        publisher: Publisher | None = None
        heartbeat: runs_mod.Heartbeat | None = None
        status, error, error_class = "failed", None, None
        try:
            # -- 1. stale `running` rows of dead extractors are marked failed ---------------------------
            runs_mod.detect_stale_runs(conn)
            # -- 2. this run's `running` row and its heartbeat --------------------------------------------
            self.run_id = runs_mod.create_run(
                conn, job_id=job.id, mode=self.run_mode, trigger=self.trigger, parent_run_id=self.parent_run_id,
                orchestration_id=self.orchestration_id, attempt=self.attempt,
                context={"topic": self.topic, "instance_id": self.s.cc_instance_id, "fetch_mode": self.mode,
                         "requested_mode": self.requested_mode, "limit": self.limit, "workers": self.workers,
                         "engine": "processes" if self.processes else self.engine})
            self.pages.run_id = self.run_id
            self.log = self.log.bind(run_id=self.run_id)
            JOB_RUNS_STARTED.labels(str(job.id)).inc()
            JOB_TIMEOUT.labels(str(job.id)).set(self.driver.timeout_s)
            RUNS_IN_PROGRESS.inc()
            heartbeat = runs_mod.Heartbeat(self.s, self.run_id, self.counters, on_stall=self._stalled).start()
            try:
                # -- 3. topics, then the plan: streams and their filters --------------------------------
                publisher = get_publisher(self.s)
                self.pages.publisher = publisher
                publisher.ensure_topic(self.topic)
                publisher.ensure_system_topics()
                self.budget = FixedBudget(self.max_calls) if self.max_calls is not None else \
                    LedgerBudget.of(conn, self.orchestration_id)
                self.plan = plan_run(conn, job, self.s, incremental=self.incremental,
                                     requested_mode=self.requested_mode, only_parents=self.only_parents,
                                     limit=self.limit, track_watermarks=self.pages.track_timestamps,
                                     budget=self.budget, resume_from=self.resume_from)
                key = resumable(job)
                if key is not None and self.limit is None and job.source_type == "cc_api":
                    self.pages.resume = ResumePoint(key, job.page_size, after=self.plan.resume.get("after"))
                if self.requested_mode == "incremental":  # (also fan-out jobs that keep no watermark)
                    # the guard: parents not marked changed are checked for changes they did not announce
                    self.pages.watch = change_watch(conn, job, self.plan)
                # -- 4. run_started ------------------------------------------------------------------
                publish_control(publisher, self.s, RunStarted(
                    run_id=self.run_id, job_id=job.id, target_table=self.table, topic=self.topic,
                    instance_id=self.s.cc_instance_id, mode=self.run_mode,  # type: ignore[arg-type]  # full/incremental/retry
                    parents_total=self.plan.parents_total))
                sent = describe_filter(self.plan)
                runs_mod.record_plan(conn, self.run_id, {"request_filter": sent, **(
                    {"fanout": self.plan.fanout} if self.plan.fanout else {})}, self.plan.watermark_from)
                self.log.info("run_started", mode=self.mode, parents_total=self.plan.parents_total,
                              workers=self.workers, engine=self.engine, **sent)
                if self.progress is not None:
                    self.progress.start(job, self.plan.parents_total)
                if job.requires_parameters and not self.plan.streams:
                    self.warnings.append(f"no parents in bronze.{job.parameter_source_table}: nothing to extract "
                                         f"(run and load the parent job first)")
                    self.log.warning("no_parents", parent_table=job.parameter_source_table)
                elif self.driver.fatal is not None:
                    raise self.driver.fatal
                else:
                    # -- 5. fetch and publish ------------------------------------------------------------
                    t_fetch = time.monotonic()
                    try:
                        self.driver.run(self.plan.streams, self.run_id, self._on_tick)
                        publisher.wait(self.tracker, progress=self._count_published)
                    finally:
                        self.fetch_seconds = time.monotonic() - t_fetch
                # -- 6. every record acknowledged by the broker ------------------------------------------
                publisher.wait(self.tracker, progress=self._count_published)
                if isinstance(self.driver.fatal, Interrupted):
                    raise self.driver.fatal
                status, error, error_class = self.driver.outcome(self.tracker, self.run_id)
            except Exception as e:  # noqa: BLE001 - the run is recorded as failed with the reason
                status, error, error_class = "failed", describe(e), type(e).__name__
                self.log.error("run_error", error=error, error_class=error_class)
                if publisher is not None:
                    try:
                        publisher.wait(self.tracker, timeout=30)
                    except Exception:  # noqa: BLE001
                        pass
            except KeyboardInterrupt:
                status, error, error_class = "failed", "interrupted (SIGINT/SIGTERM) before the run finished", \
                    "Interrupted"
                self.stop.set()
                raise
            finally:
                # -- 7.-10. results, watermarks, run_finished, final status (producers.run_recorder) -----
                if heartbeat is not None:
                    heartbeat.stop()
                self._count_published()
                result = RunRecorder(job, self.s, self.run_id, self.topic, self.log).finish(
                    conn, publisher, status=status, error=error, error_class=error_class, driver=self.driver,
                    plan=self.plan, tracker=self.tracker, warnings=self.warnings, counters=self.counters(),
                    facts=RunFacts(self.mode, self.only_parents, self.limit, self.processes),
                    duration=lambda: time.monotonic() - t0, fetch_seconds=self.fetch_seconds)
                self._log_result(result)
                self._settle_budget(result)
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(self)
            conn.close()
        return result

    def _stalled(self, seconds: float) -> None:
        """The heartbeat saw no progress for ETL_STALL_SECONDS: fail the run now with the reason (a
        producer blocked on a broker that lost its state is marked unusable, so it lets go)."""
        reason = (f"the run made no progress for {seconds:.0f} s (ETL_STALL_SECONDS: no record read or "
                  "acknowledged, no API answer): it is failed and retried")
        self.log.error("run_stalled", seconds=round(seconds), counters=self.counters())
        if self.driver.fatal is None:
            self.driver.fatal = Stalled(reason)
        self.stop.set()
        if self.pages.publisher is not None and self.pages.publisher.fatal is None:
            self.pages.publisher.fatal = "the run using it stalled"

    def _settle_budget(self, result: RunResult) -> None:
        """Give the night's budget back what this run did not use (an orchestration's ledger)."""
        if not isinstance(self.budget, LedgerBudget):
            return
        left = self.plan.fanout.get("budget", {}).get("parents_left") if self.plan is not None else None
        try:
            self.budget.settle(self.job, result.api_calls, left)
        except Exception as e:  # noqa: BLE001 - bookkeeping of the budget never fails a run
            self.log.warning("call_budget_not_settled", error=describe(e))

    def counters(self) -> dict[str, Any]:
        """Live counters (the heartbeat thread reads them every few seconds)."""
        ok, failed = len(self.driver.ok), len(self.driver.failed)
        parents = self.job.requires_parameters
        resume = self.pages.resume.snapshot() if self.pages.resume is not None else None
        if resume is not None and self.plan is not None and self.plan.resume:
            resume.update(resumed_from=self.plan.resume["from_run"], cap=self.plan.resume.get("cap"),
                          records=resume["records"] + int(self.plan.resume.get("records") or 0))
        return {
            "resume": resume,
            "records_extracted": self.driver.records,
            "records_published": self.driver.delivered(self.tracker),
            "api_calls": self.driver.live_api_calls(),
            "parents_total": self.plan.parents_total if self.plan is not None else None,
            "parents_done": ok + failed if parents else None,
            "parents_failed": failed if parents else None,
        }

    def _on_tick(self) -> None:
        if self.progress is not None:
            c = self.counters()
            self.progress.update(records=c["records_extracted"], pages=self.driver.page_count, **{
                k: c[k] for k in ("api_calls", "parents_total", "parents_done", "parents_failed")})
        self._count_published()

    def _count_published(self) -> None:
        d = self.tracker.delivered - self._published_metric
        if d > 0:
            RECORDS_PUBLISHED.labels(self.table).inc(d)
            self._published_metric += d

    def _log_result(self, res: RunResult) -> None:
        level = {"success": self.log.info, "partial": self.log.warning}.get(res.status, self.log.error)
        level("run_finished", status=res.status, records_extracted=res.records_extracted,
              records_published=res.records_published, api_calls=res.api_calls, pages=res.pages,
              parents_total=res.parents_total, parents_failed=res.parents_failed,
              records_missing_key=res.records_missing_key, duration_s=res.duration_s, error=res.error)
        if self.progress is not None:
            self.progress.finish(res)

    # -- dry run ----------------------------------------------------------------------------------------
    def dry_run(self) -> RunResult:
        """The plan in words and the first requests, without publishing or recording anything."""
        from producers.cc_client import CCClient
        from producers.paging import paginator_for

        job = self.job
        res = RunResult(job_id=job.id, status="dry-run", mode=self.mode, topic=self.topic)
        lines = [f"job {job.id} ({job.name}) -> topic {self.topic} -> bronze.{self.table}",
                 f"mode: {self.mode}" + ("" if self.mode == self.requested_mode else
                                         f" (requested {self.requested_mode}; the endpoint pages with "
                                         f"'{job.paging}', which cannot filter by timestamp)")]
        if job.source_type == "csv":
            from producers.csv_source import describe as describe_csv

            res.plan = lines + describe_csv(job)
            return res
        with connect(self.s, autocommit=True, application_name="trialsync-extract") as conn:
            plan = plan_run(conn, job, self.s, incremental=self.incremental, requested_mode=self.requested_mode,
                            only_parents=self.only_parents, limit=self.limit,
                            track_watermarks=self.pages.track_timestamps,
                            budget=FixedBudget(self.max_calls) if self.max_calls is not None else None)
        client = CCClient.from_settings(self.s)
        try:
            paginator = paginator_for(job, client.urls)
            f = plan.fanout
            if job.reads_list:
                lines.append(f"source: the list across parents {job.fetch_endpoint} (config/jobs.yaml `source: list`); "
                             f"each record's parent ({', '.join(job.parameters)}) taken from the record")
            elif job.requires_parameters:
                lines.append(f"parents: {plan.parents_total} from bronze.{job.parameter_source_table} "
                             f"({', '.join(f'{k} <- data.{v}' for k, v in job.parameters.items())})")
                if not plan.streams:
                    lines.append("no parents: the run would finish with 0 records (load the parent job first)")
            if f.get("asked") and "parents_changed" in f:
                sweep = (f" + {f['parents_swept']} in sweep slice {f['sweep_slice']}/{f['sweep_runs']}"
                         if "sweep_slice" in f else "")
                lines.append(f"fan-out ({f['policy']} policy, asking {f['asked']}"
                             f", assumption {f.get('assumption')}): {f['parents_changed']} changed since "
                             f"{f['since'] or 'no complete run'}{sweep} + {f['parents_unfinished']} not yet reached "
                             f"by the first pass + {f['parents_rest']} others (of {f['parent_rows']} parent rows)")
                left = f.get("budget", {}).get("parents_left", {})
                if any(left.values()):
                    lines.append(f"budget: {f['budget']['max_calls']} calls; parents left for the next run: "
                                 + ", ".join(f"{n} {k}" for k, n in left.items() if n))
            if self.pages.track_timestamps:
                lines.append(f"watermarks: {len(plan.previous_watermarks)} stored; {plan.filtered_streams} of "
                             f"{len(plan.streams)} requests would be filtered")
            lines.append(f"paging: {paginator.describe()}")
            lines.append(f"workers: {self.workers}, rate limit: {self.s.cc_rate_limit_rps or 'none'} req/s")
            lines.append("first requests (API key sent in the " + self.s.cc_api_key_header + " header):")
            for st in plan.streams[:DRY_RUN_SAMPLE]:
                lines.append(f"  GET {paginator.first(st).url}")
            if len(plan.streams) > DRY_RUN_SAMPLE:
                lines.append(f"  ... and {len(plan.streams) - DRY_RUN_SAMPLE} more parents")
        finally:
            client.close()
        res.parents_total = plan.parents_total
        res.plan = lines
        return res


__all__ = ["Extraction", "JobNotRunnable", "RunResult", "check_runnable", "choose_engine", "request_stop", "run_job"]
