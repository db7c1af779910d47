"""Run one extraction job: plan -> fetch -> publish -> finish.

Python API (used by ``trialsync extract`` and by the orchestrator, in-process)::

    from producers.extractor import run_job, RunResult
    result: RunResult = run_job(
        job,                        # schemas.jobs.Job (from the catalog)
        mode="incremental",         # or "full"; incremental only where the job supports it
        only_parents=None,          # [{"studyId": "12"}, ...]: redo just these parents (retry)
        limit=None,                 # stop after N records (sampling; watermarks are not advanced)
        dry_run=False,              # print the plan (first requests, parent count), publish nothing
        settings=None,              # common.config.Settings; default get_settings()
        trigger="cli",              # recorded in dw_etl_runs.trigger (cli | orchestrator | scheduler | retry)
        progress=None,              # an object with start(total)/update(**counters)/finish(result), or None
        parent_run_id=None, orchestration_id=None, attempt=1,
        workers=None,               # default ETL_PARALLEL_JOBS
    )
    result.run_id, result.status ("success" | "partial" | "failed"), result.records_published,
    result.failed_parents, result.error, ...

``run_job`` never raises for a failure of the *run* (API down, key refused, broker error): it
records the run as ``failed`` and returns the result with ``error``. It raises only when there is
no run to record: configuration problems (``ConfigError``, ``CatalogError``), a disabled/invalid
job (``JobNotRunnable``), or an unreachable database (``DatabaseError``).

What one run does (the order is the delivery contract, see docs/architecture.md):

1. marks stale ``running`` rows of dead extractors ``failed`` (``producers.runs``);
2. inserts its ``running`` row; starts a heartbeat;
3. creates the table's topic on first use; plans the streams -- one for a plain job, one per
   distinct parent parameter dict for a parameterized job (``producers.parents``) -- and the
   ``$filter`` of each from the watermarks (``producers.watermarks``);
4. publishes ``run_started`` on the control topic;
5. fetches with ``ETL_PARALLEL_JOBS`` worker threads (``producers.fanout``) and publishes every
   record (key ``source_id``, value the raw record, headers job/run/instance/extracted-at/params/
   modified-at) through the process's idempotent producer;
6. waits until the broker acknowledged every record (delivery reports: per-partition count and
   last offset);
7. writes counters, ``run_context.topic``/``end_offsets``/``failed_parents`` and watermark range to
   ``dw_etl_runs`` (status still ``running``);
8. commits the watermarks (topic + ``dw_etl_watermarks``) -- only for streams that completed;
9. publishes ``run_finished`` (status, records per partition, end offsets);
10. sets the final status and the job's ``last_run_*``.

A run killed anywhere before step 10 is found stale by the next run; its records already published
are harmless repeats for the upserting loader, and its watermarks never moved.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import orjson
import psycopg

from common import kafka as K
from common.config import ConfigError, Settings, get_settings
from common.db import DatabaseError, connect
from common.logging import get_logger, scrub
from common.metrics import (
    JOB_DURATION,
    JOB_LAST_SUCCESS,
    JOB_RUNS,
    JOB_RUNS_STARTED,
    JOB_TIMEOUT,
    RECORDS_EXTRACTED,
    RECORDS_PUBLISHED,
    RUNS_IN_PROGRESS,
)
from producers import parents as parents_mod
from producers import runs as runs_mod
from producers import watermarks as wm_mod
from producers.async_fanout import AsyncFanout
from producers.cc_client import CCClient
from producers.errors import (
    ApiError,
    AuthError,
    BadRequestError,
    NotFoundError,
    NotImplementedApiError,
    UnsafeLinkError,
)
from producers.fanout import Stream, ThreadFanout, drive
from producers.keys import key_builder, parent_key
from producers.publisher import DeliveryTracker, Publisher, PublishError, get_publisher, record_headers
from schemas.jobs import Job
from schemas.messages import RunFinished, RunStarted

log = get_logger("extractor")

Mode = Literal["incremental", "full"]
#: errors that mean the endpoint (not one parent) is unusable: stop the whole run at once
FATAL_API_ERRORS = (AuthError, NotImplementedApiError, UnsafeLinkError)
#: a parameterized job whose first N parents all answer 404/400 has an invalid endpoint
ENDPOINT_PROBE_PARENTS = 10
#: at most this many failed-parent error details are kept in run_context (the parameter dicts
#: themselves are always kept in full: `trialsync retry` needs every one)
MAX_ERROR_DETAILS = 200
DRY_RUN_SAMPLE = 5


class Interrupted(Exception):
    """The run was asked to stop (SIGTERM, Ctrl-C): recorded as failed with this reason."""


_ACTIVE: set[_Extraction] = set()
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
        if ex.fatal is None:
            ex.fatal = Interrupted(reason)
        ex.stop.set()
    return len(runs)


class JobNotRunnable(ValueError):
    """The job is disabled or its endpoint is invalid; the message says how to enable it."""


class ProgressSink(Protocol):
    def start(self, job: Job, parents_total: int | None) -> None: ...

    def update(self, **counters: Any) -> None: ...

    def finish(self, result: RunResult) -> None: ...


@dataclass
class RunResult:
    job_id: int
    status: str
    run_id: int | None = None
    mode: str = "full"
    topic: str | None = None
    records_extracted: int = 0
    records_published: int = 0
    records_missing_key: int = 0
    api_calls: int = 0
    pages: int = 0
    parents_total: int | None = None
    parents_done: int | None = None
    parents_failed: int | None = None
    failed_parents: list[dict[str, str]] = field(default_factory=list)
    records_per_partition: dict[int, int] = field(default_factory=dict)
    end_offsets: dict[int, int] = field(default_factory=dict)
    watermark_from: datetime | None = None
    watermark_to: datetime | None = None
    error: str | None = None
    error_class: str | None = None
    duration_s: float = 0.0
    #: seconds from the first request to the last delivery report (the run's steady-state work)
    fetch_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("watermark_from", "watermark_to"):
            if d[k] is not None:
                d[k] = d[k].isoformat()
        return d


def check_runnable(job: Job) -> None:
    if not job.is_valid:
        raise JobNotRunnable(f"job {job.id} ({job.name}) cannot run: {job.invalid_reason}")
    if not job.is_active:
        raise JobNotRunnable(f"job {job.id} ({job.name}) is disabled: enable it in config/jobs.yaml "
                             f"(jobs: {{{job.id}: {{enabled: true}}}}) and run `trialsync jobs sync`")


def endpoint_renderer(job: Job) -> Callable[[dict[str, Any]], str]:
    """``job.render_endpoint`` compiled once: parents are rendered 10^5-10^6 times per run, and
    plain ids (the usual case) need no URL quoting."""
    from urllib.parse import quote

    from schemas.jobs import PLACEHOLDER_RE

    parts = PLACEHOLDER_RE.split(job.endpoint)  # literal, name, literal, name, ..., literal

    def render(params: dict[str, Any]) -> str:
        out = []
        for i, p in enumerate(parts):
            if i % 2:
                v = str(params[p])
                out.append(v if v.isascii() and v.isalnum() else quote(v, safe=""))
            else:
                out.append(p)
        return "".join(out)

    return render


class StreamPlan(Sequence[Stream]):
    """The run's streams, built on access from compact parent tuples.

    A patient-visit fan-out has ~2.3 M parents: as tuples they cost ~120 bytes each; as Stream
    objects with a rendered path, a parameter dict and a parent key, ~4x that. Recently used
    streams are cached (each is touched a few times while its pages are fetched and published).
    Picklable (worker processes receive it).
    """

    def __init__(self, job: Job, values: list[tuple[str, ...]] | None, names: list[str],
                 watermarks: dict[str, datetime] | None = None, overlap_seconds: float = 0.0):
        self.job, self.values, self.names = job, values, names
        self.watermarks, self.overlap = watermarks or None, overlap_seconds
        self._setup()

    def _setup(self) -> None:
        self._render = endpoint_renderer(self.job)
        self._cache: dict[int, Stream] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_render", "_cache")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    def _filter(self, pk: str) -> str | None:
        wm = self.watermarks.get(pk) if self.watermarks else None
        return None if wm is None else wm_mod.filter_expression(self.job.timestamp_field, wm, self.overlap)

    def __len__(self) -> int:
        return 1 if self.values is None else len(self.values)

    def __getitem__(self, i: int | slice) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        st = self._cache.get(i)
        if st is not None:
            return st
        if self.values is None:
            if i != 0:
                raise IndexError(i)
            st = Stream(0, self.job.endpoint, None, self._filter(""))
        else:
            params = dict(zip(self.names, self.values[i], strict=True))
            st = Stream(i, self._render(params), params, self._filter(parent_key(params)) if self.watermarks else None)
        if len(self._cache) >= 4096:
            self._cache.clear()
        self._cache[i] = st
        return st


def stable_orderby(job: Job) -> str | None:
    """``$orderby`` that keeps ``$skip`` paging stable: the key, when it is one top-level field."""
    if job.is_odata and len(job.primary_key) == 1 and not job.primary_key[0].startswith("$") \
            and "." not in job.primary_key[0]:
        return job.primary_key[0]
    return None


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
            processes: int | None = None, engine: str | None = None) -> RunResult:
    """Run ``job`` once (see the module docstring); return its :class:`RunResult`."""
    s = settings or get_settings()
    check_runnable(job)
    if mode not in ("incremental", "full"):
        raise ConfigError(f"mode must be 'incremental' or 'full', not {mode!r}")
    if limit is not None and limit < 1:
        raise ConfigError("--limit must be at least 1")
    if job.source_type == "cc_api" and not s.cc_api_base_url:
        raise ConfigError("CC_API_BASE_URL is not set: point it at the Clinical Conductor API "
                          "(or at `trialsync simulator serve`)")
    ex = _Extraction(job, s, mode=mode, only_parents=only_parents, limit=limit, trigger=trigger,
                     progress=progress, parent_run_id=parent_run_id, orchestration_id=orchestration_id,
                     attempt=attempt, workers=workers or s.etl_parallel_jobs, processes=processes or 0,
                     engine=choose_engine(s, engine))
    if dry_run:
        return ex.dry_run()
    return ex.run()


class _Extraction:
    """State of one run. Only the calling thread publishes; worker threads only fetch."""

    def __init__(self, job: Job, settings: Settings, *, mode: Mode, only_parents: list[dict[str, Any]] | None,
                 limit: int | None, trigger: str, progress: ProgressSink | None, parent_run_id: int | None,
                 orchestration_id: str | None, attempt: int, workers: int, processes: int = 0,
                 engine: str = "async"):
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
        #: >0: fan out over worker processes (parameterized API jobs without --limit), see procfanout
        self.processes = processes if (processes and job.requires_parameters and job.source_type == "cc_api"
                                       and limit is None) else 0
        self.engine = engine
        self._proc_api_calls = 0
        self._deadline = float("inf")
        self._probe = ENDPOINT_PROBE_PARENTS
        self._publisher: Publisher | None = None
        self._extracted_metric = RECORDS_EXTRACTED.labels(job.target_table)
        self._proc_delivered = 0
        self._proc_retries = 0
        self.topic = K.bronze_topic(job.target_table, settings)
        self.table = job.target_table
        self.log = log.bind(job_id=job.id, table=self.table)
        self.keyfn = key_builder(job.primary_key, settings.cc_instance_id)
        self.ts_field = job.timestamp_field or None
        self.tracks_watermarks = job.supports_incremental and job.source_type == "cc_api"
        # counters (written only by the publishing thread)
        self.run_id: int | None = None
        self.records_extracted = 0
        self.records_missing_key = 0
        self.records_repeated = 0
        self.fetch_seconds = 0.0
        self._hdr_base: list[tuple[str, bytes]] | None = None
        self._hdr_time = 0.0
        self.pages = 0
        self.parents_total: int | None = None
        self.streams: Sequence[Stream] = []
        self.stream_ok: set[int] = set()
        self.stream_failed: dict[int, ApiError | BaseException] = {}
        self.stream_max: dict[int, datetime] = {}
        self.stream_records: dict[int, int] = {}
        self.previous_wm: dict[str, datetime] = {}
        self.used_wm: list[datetime] = []
        self.filtered_streams = 0
        #: parameterized runs: the database clock when the parents were read (complete runs only)
        self.parents_as_of: datetime | None = None
        self.fanout: dict[str, Any] = {}
        self.swept: list[tuple[str, ...]] = []  # `changed` policy: unchanged parents asked for the sweep
        self.warnings: list[str] = []
        self.client: CCClient | None = None
        self.tracker = DeliveryTracker(self.topic)
        self.stop = threading.Event()
        self.fatal: BaseException | None = None
        self.published_metric = 0

    # -- planning -------------------------------------------------------------------------------
    def _plan(self, conn: psycopg.Connection) -> None:
        job = self.job
        values: list[tuple[str, ...]] | None = None
        names = job.placeholders or list(job.parameters)
        if job.requires_parameters:
            if self.only_parents is not None:
                values = []
                for p in self.only_parents:
                    missing = [n for n in names if n not in p]
                    if missing:
                        raise ConfigError(f"parent {p} for job {job.id} lacks parameters {missing}")
                    values.append(tuple(str(p[n]) for n in names))
            else:
                values = self._select_parents(conn)
            self.parents_total = len(values)
        if self.tracks_watermarks:
            self.previous_wm = wm_mod.load(conn, self.s, job.id)
        if self.incremental and self.previous_wm:
            wms = self.previous_wm
            if values is None or self.only_parents is not None:
                used = [wms[pk] for pk in (parent_key(dict(zip(names, v, strict=True))) for v in (values or [()]))
                        if pk in wms]
            else:
                used = list(wms.values())
            self.used_wm = [min(used)] if used else []
            self.filtered_streams = len(used)
        wms_used = self.previous_wm if self.incremental else None
        if wms_used and self.swept:
            # the sweep asks its parents without a filter: it also refreshes what moved without the
            # child's timestamp moving (a renamed arm inside a subject's `arm` preview)
            swept_keys = {parent_key(dict(zip(names, v, strict=True))) for v in self.swept}
            wms_used = {pk: v for pk, v in wms_used.items() if pk not in swept_keys}
        self.streams = StreamPlan(job, values, names, wms_used,
                                  self.s.cc_incremental_overlap_seconds)

    @property
    def fanout_policy(self) -> str:
        return self.job.fanout_incremental or self.s.etl_fanout_incremental

    def _select_parents(self, conn: psycopg.Connection) -> list[tuple[str, ...]]:
        """Every parent, or -- incremental run, ``changed`` policy, a complete earlier run to start
        from -- the parents changed since that run plus this run's sweep slice.

        The reference is the last *successful* run that read its parents (every stream asked and
        answered): a partial run's failed parents stay inside the next run's "changed since" window.
        Its time is ``parents.read_point()``, which no row written after that read can predate.
        """
        job = self.job
        if self.requested_mode == "incremental" and self.fanout_policy == "changed" and self.limit is None \
                and job.source_type == "cc_api":
            # the last complete run's read point, and the sweep slice the latest run used
            since, last_slice = conn.execute(
                """SELECT (SELECT (run_context->>'parents_as_of')::timestamptz FROM etl.dw_etl_runs
                            WHERE job_id = %(j)s AND run_status = 'success' AND run_context ? 'parents_as_of'
                            ORDER BY id DESC LIMIT 1),
                          (SELECT (run_context->'fanout'->>'sweep_slice')::int FROM etl.dw_etl_runs
                            WHERE job_id = %(j)s AND run_context->'fanout' ? 'sweep_slice'
                            ORDER BY id DESC LIMIT 1)""", {"j": job.id}).fetchone()  # type: ignore[misc]
            if since is not None:
                n = self.s.etl_fanout_sweep_runs
                slice_ = 0 if last_slice is None else (last_slice + 1) % n
                sel = parents_mod.select_changed_parents(conn, job, since=since, sweep_runs=n, sweep_slice=slice_)
                self.parents_as_of, self.swept = sel.as_of, sel.swept_values
                self.fanout = {"policy": "changed", "asked": "changed", "since": since.isoformat(),
                               "parents_changed": sel.changed, "parents_swept": sel.swept,
                               "parent_rows": sel.parent_rows, "sweep_slice": slice_, "sweep_runs": n}
                self.log.info("fanout_parents_selected", **{k: v for k, v in self.fanout.items()
                                                           if k not in ("policy", "asked")})
                return sel.values
            self.fanout = {"policy": "changed", "asked": "all", "reason": "no complete earlier run to start from"}
        self.parents_as_of = parents_mod.read_point(conn)
        return parents_mod.load_parent_values(conn, job)

    # -- dry run --------------------------------------------------------------------------------
    def dry_run(self) -> RunResult:
        job = self.job
        res = RunResult(job_id=job.id, status="dry-run", mode=self.mode, topic=self.topic)
        plan = [f"job {job.id} ({job.name}) -> topic {self.topic} -> bronze.{self.table}",
                f"mode: {self.mode}" + ("" if self.mode == self.requested_mode else
                                        f" (requested {self.requested_mode}; the endpoint is not OData, "
                                        "so it cannot filter by timestamp)")]
        if job.source_type == "csv":
            from producers.csv_source import describe

            plan.extend(describe(job))
            res.plan = plan
            return res
        with connect(self.s, autocommit=True, application_name="trialsync-extract") as conn:
            self._plan(conn)
        client = CCClient.from_settings(self.s)
        try:
            if job.requires_parameters:
                plan.append(f"parents: {self.parents_total} from bronze.{job.parameter_source_table} "
                            f"({', '.join(f'{k} <- data.{v}' for k, v in job.parameters.items())})")
                if not self.streams:
                    plan.append("no parents: the run would finish with 0 records (load the parent job first)")
            if self.fanout.get("asked") == "changed":
                f = self.fanout
                plan.append(f"fan-out policy changed: {f['parents_changed']} parents changed since {f['since']} + "
                            f"{f['parents_swept']} in sweep slice {f['sweep_slice']}/{f['sweep_runs']} "
                            f"(of {f['parent_rows']} parent rows)")
            elif job.requires_parameters and self.fanout_policy == "changed" and self.requested_mode == "incremental":
                plan.append(f"fan-out policy changed: asking every parent ({self.fanout.get('reason', 'see log')})")
            if self.tracks_watermarks:
                plan.append(f"watermarks: {len(self.previous_wm)} stored; {self.filtered_streams} of "
                            f"{len(self.streams)} "
                            "requests would be filtered")
            plan.append(f"workers: {self.workers}, page size: {job.page_size}, "
                        f"rate limit: {self.s.cc_rate_limit_rps or 'none'} req/s")
            plan.append("first requests (API key sent in the " + self.s.cc_api_key_header + " header):")
            for st in self.streams[:DRY_RUN_SAMPLE]:
                if job.is_odata:
                    url = client.url_for(st.path, client.odata_params(
                        page_size=job.page_size, filter_expr=st.filter_expr, orderby=stable_orderby(job), count=True))
                else:
                    url = client.url_for(st.path)
                plan.append(f"  GET {url}")
            if len(self.streams) > DRY_RUN_SAMPLE:
                plan.append(f"  ... and {len(self.streams) - DRY_RUN_SAMPLE} more parents")
        finally:
            client.close()
        res.parents_total = self.parents_total
        res.plan = plan
        return res

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> RunResult:
        t0 = time.monotonic()
        job = self.job
        conn = connect(self.s, autocommit=True, application_name="trialsync-extract")
        with _ACTIVE_LOCK:
            _ACTIVE.add(self)
        publisher: Publisher | None = None
        heartbeat: runs_mod.Heartbeat | None = None
        status, error, error_class = "failed", None, None
        try:
            runs_mod.detect_stale_runs(conn)
            self.run_id = runs_mod.create_run(
                conn, job_id=job.id, mode="retry" if self.only_parents is not None else self.mode,
                trigger=self.trigger, parent_run_id=self.parent_run_id, orchestration_id=self.orchestration_id,
                attempt=self.attempt,
                context={"topic": self.topic, "instance_id": self.s.cc_instance_id, "fetch_mode": self.mode,
                         "requested_mode": self.requested_mode, "limit": self.limit, "workers": self.workers,
                         "engine": "processes" if self.processes else self.engine},
            )
            self.log = self.log.bind(run_id=self.run_id)
            JOB_RUNS_STARTED.labels(str(job.id)).inc()
            JOB_TIMEOUT.labels(str(job.id)).set(job.timeout_seconds or self.s.etl_timeout_seconds)
            RUNS_IN_PROGRESS.inc()
            heartbeat = runs_mod.Heartbeat(self.s, self.run_id, self.counters).start()
            try:
                publisher = get_publisher(self.s)
                publisher.ensure_topic(self.topic)
                publisher.ensure_system_topics()
                self._plan(conn)
                self._control(publisher, RunStarted(
                    run_id=self.run_id, job_id=job.id, target_table=self.table, topic=self.topic,
                    instance_id=self.s.cc_instance_id, mode="retry" if self.only_parents is not None else self.mode,
                    parents_total=self.parents_total))
                self.log.info("run_started", mode=self.mode, parents_total=self.parents_total,
                              filtered_streams=self.filtered_streams, workers=self.workers, engine=self.engine)
                if self.progress is not None:
                    self.progress.start(job, self.parents_total)
                if job.requires_parameters and not self.streams:
                    msg = (f"no parents in bronze.{job.parameter_source_table}: nothing to extract "
                           f"(run and load the parent job first)")
                    self.warnings.append(msg)
                    self.log.warning("no_parents", parent_table=job.parameter_source_table)
                elif self.fatal is not None:
                    raise self.fatal
                else:
                    t_fetch = time.monotonic()
                    try:
                        if job.source_type == "csv":
                            self._fetch_csv(publisher)
                        elif self.processes:
                            self._fetch_api_processes(publisher)
                        else:
                            self._fetch_api(publisher)
                        publisher.wait(self.tracker, progress=self._publish_progress)
                    finally:
                        self.fetch_seconds = time.monotonic() - t_fetch
                publisher.wait(self.tracker, progress=self._publish_progress)
                if isinstance(self.fatal, Interrupted):
                    raise self.fatal
                status, error, error_class = self._outcome()
            except Exception as e:  # noqa: BLE001 - the run is recorded as failed with the reason
                status, error, error_class = "failed", _describe(e), type(e).__name__
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
                result = self._finish(conn, publisher, heartbeat, status, error, error_class, t0)
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(self)
            conn.close()
        return result

    def counters(self) -> dict[str, Any]:
        ok, failed = len(self.stream_ok), len(self.stream_failed)
        return {
            "records_extracted": self.records_extracted,
            "records_published": max(self.tracker.delivered, self._proc_delivered),
            "api_calls": self.client.api_calls if self.client else self._proc_api_calls,
            "parents_total": self.parents_total,
            "parents_done": ok + failed if self.job.requires_parameters else None,
            "parents_failed": failed if self.job.requires_parameters else None,
        }

    def _publish_progress(self) -> None:
        d = self.tracker.delivered - self.published_metric
        if d > 0:
            RECORDS_PUBLISHED.labels(self.table).inc(d)
            self.published_metric += d

    # -- fetching -------------------------------------------------------------------------------
    def _fetch_api(self, publisher: Publisher) -> None:
        job = self.job
        self.client = CCClient.from_settings(self.s, pool_size=self.workers + 2, cancel=self.stop)
        self._deadline = time.monotonic() + (job.timeout_seconds or self.s.etl_timeout_seconds)
        self._probe = min(ENDPOINT_PROBE_PARENTS, len(self.streams))
        self._extracted_metric = RECORDS_EXTRACTED.labels(self.table)
        self._publisher = publisher
        common = {"endpoint": job.endpoint, "odata": job.is_odata, "page_size": job.page_size,
                  "orderby": stable_orderby(job), "stop": self.stop}
        try:
            if self.engine == "async":
                AsyncFanout(self.client, self.streams, concurrency=self.workers, on_page=self._on_page,
                            on_done=self.stream_ok.add, on_fail=self._on_fail, on_tick=self._on_tick,
                            **common).run()
            else:
                fan = ThreadFanout(self.client, self.streams, workers=self.workers, **common).start()
                try:
                    drive(fan, on_page=self._on_page, on_done=self.stream_ok.add, on_fail=self._on_fail,
                          on_tick=self._on_tick)
                finally:
                    self.stop.set()
                    fan.join(timeout=5)
        finally:
            self.stop.set()
        self._on_tick()
        if self.fatal is not None:
            raise self.fatal

    def _on_page(self, idx: int, url: str, page: Any) -> None:
        if self.fatal is not None:
            return  # the run is failing: pages still in flight are not published
        self._extracted_metric.inc(self._publish(self._publisher, self.streams[idx], page))

    def _on_fail(self, idx: int, err: BaseException) -> None:
        self._stream_failed(idx, err, self._probe)

    def _on_tick(self) -> None:
        self._tick_progress()
        self._publish_progress()
        if time.monotonic() > self._deadline and self.fatal is None:
            limit_s = self.job.timeout_seconds or self.s.etl_timeout_seconds
            self.fatal = TimeoutError(
                f"the run exceeded its timeout of {limit_s} s (timeout_seconds in config/jobs.yaml, "
                "or ETL_TIMEOUT_SECONDS)")
            self.stop.set()

    def _fetch_api_processes(self, publisher: Publisher) -> None:
        from producers.procfanout import ProcessFanout

        threads = max(1, self.workers // self.processes)
        pf = ProcessFanout(self.s, self.job, self.run_id or 0, self.streams, processes=self.processes,
                           threads=threads, tracks_watermarks=self.tracks_watermarks, engine=self.engine).start()
        deadline = time.monotonic() + (self.job.timeout_seconds or self.s.etl_timeout_seconds)
        probe = min(ENDPOINT_PROBE_PARENTS, len(self.streams))
        extracted_metric = RECORDS_EXTRACTED.labels(self.table)
        try:
            for msg in pf.messages():
                if msg is not None:
                    kind = msg[0]
                    if kind == "done":
                        _, idx, n, mt = msg
                        self.stream_ok.add(idx)
                        self.stream_records[idx] = n
                        if mt is not None:
                            self.stream_max[idx] = mt
                    elif kind == "fail":
                        self._stream_failed(msg[1], msg[2], probe)
                    elif kind == "final":
                        snap, missing, retries = msg[2], msg[5], msg[7]
                        self.tracker.merge(snap["per_partition"], snap["last_offset"], snap["delivered"],
                                           snap["failed"], snap["first_error"])
                        self.records_missing_key += missing
                        self._proc_retries += retries
                    elif kind == "died" and self.fatal is None:
                        self.fatal = RuntimeError(f"extract worker process {msg[1]} died (exit code {msg[2]})")
                        self.stop.set()
                records, pages, calls, delivered = pf.totals()
                if records > self.records_extracted:
                    extracted_metric.inc(records - self.records_extracted)
                self.records_extracted, self.pages = records, pages
                self._proc_api_calls, self._proc_delivered = calls, delivered
                self._tick_progress()
                if time.monotonic() > deadline and self.fatal is None:
                    self.fatal = TimeoutError(f"the run exceeded its timeout of "
                                              f"{self.job.timeout_seconds or self.s.etl_timeout_seconds} s")
                    self.stop.set()
                if self.stop.is_set():
                    pf.stop.set()
        finally:
            pf.stop.set()
            pf.join()
        if self.fatal is not None:
            raise self.fatal

    def _stream_failed(self, idx: int, err: BaseException, probe: int) -> None:
        self.stream_failed[idx] = err
        st = self.streams[idx]
        if isinstance(err, FATAL_API_ERRORS) or not isinstance(err, ApiError) or not self.job.requires_parameters:
            if self.fatal is None:
                self.fatal = err
                self.stop.set()
            return
        self.log.warning("parent_failed", params=st.params, error_class=type(err).__name__,
                         status=getattr(err, "status", None), error=str(err))
        if (not self.stream_ok and isinstance(err, NotFoundError | BadRequestError) and self.fatal is None
                and len(self.stream_failed) >= probe
                and all(isinstance(e, NotFoundError | BadRequestError) for e in self.stream_failed.values())):
            self.fatal = _EndpointInvalid(
                f"every one of the first {len(self.stream_failed)} parents answered HTTP {getattr(err, 'status', '?')}: "
                f"the endpoint itself looks invalid for this API (last: GET {getattr(err, 'url', '?')}); "
                "fix or disable the job")
            self.stop.set()

    def _publish(self, publisher: Publisher, st: Stream, page: Any) -> int:
        recs = page.records
        self.pages += 1
        if self.limit is not None:
            room = self.limit - self.records_extracted
            if room <= 0:
                self.stop.set()
                return 0
            if len(recs) >= room:
                recs = recs[:room]
                self.stop.set()
        headers = self._headers_for(st)
        n, missing, stamps, repeats = publisher.publish_page(self.topic, recs, self.keyfn, st.params, headers, self.tracker,
                                                    self.ts_field)
        self.records_extracted += n + repeats
        self.records_missing_key += missing
        self.records_repeated += repeats
        self.stream_records[st.idx] = self.stream_records.get(st.idx, 0) + n
        if stamps and self.tracks_watermarks:
            mt = wm_mod.max_timestamp(stamps)
            if mt is not None:
                cur = self.stream_max.get(st.idx)
                if cur is None or mt > cur:
                    self.stream_max[st.idx] = mt
        return n + repeats

    def _headers_for(self, st: Stream) -> list[tuple[str, bytes]]:
        """Record headers of a page. The run-wide part is rebuilt once per tick (``ts-extracted-at``
        to 0.25 s), the parameters once per stream: per-page work adds up on fan-out jobs."""
        now = time.monotonic()
        if now - self._hdr_time > 0.25 or self._hdr_base is None:
            self._hdr_time = now
            self._hdr_base = record_headers(self.job.id, self.run_id or 0, self.s.cc_instance_id,
                                            datetime.now(UTC), None)
        if st.params is None:
            return self._hdr_base
        return [*self._hdr_base, (K.H_PARAMS, orjson.dumps(st.params))]

    def _fetch_csv(self, publisher: Publisher) -> None:
        from producers.csv_source import read_pages

        st = Stream(0, self.job.endpoint, None)
        self.streams = [st]
        deadline = time.monotonic() + (self.job.timeout_seconds or self.s.etl_timeout_seconds)
        extracted_metric = RECORDS_EXTRACTED.labels(self.table)
        for page in read_pages(self.job, timeout=self.s.etl_request_timeout_seconds):
            extracted_metric.inc(self._publish(publisher, st, page))
            self._tick_progress()
            if self.stop.is_set():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the run exceeded its timeout of {self.job.timeout_seconds or self.s.etl_timeout_seconds} s")
        self.stream_ok.add(0)

    def _tick_progress(self) -> None:
        if self.progress is not None:
            c = self.counters()
            self.progress.update(records=self.records_extracted, pages=self.pages, **{
                k: c[k] for k in ("api_calls", "parents_total", "parents_done", "parents_failed")})

    # -- outcome --------------------------------------------------------------------------------
    def _outcome(self) -> tuple[str, str | None, str | None]:
        t = self.tracker
        if t.failed:
            return ("failed", f"{t.failed} of {t.produced} records were not acknowledged by the broker "
                              f"({t.first_error}): the run is incomplete and will be re-run", "PublishError")
        if not self.job.requires_parameters:
            if self.stream_failed:
                err = next(iter(self.stream_failed.values()))
                return "failed", _describe(err), type(err).__name__
            return "success", None, None
        failed = len(self.stream_failed)
        if failed == 0:
            return "success", None, None
        if self.stream_ok:
            first = next(iter(self.stream_failed.values()))
            return ("partial", f"{failed} of {len(self.streams)} parents failed (first: {_describe(first)}); "
                               f"`trialsync retry --run-id {self.run_id}` redoes only those", "PartialFailure")
        first = next(iter(self.stream_failed.values()))
        return "failed", f"all {failed} parents failed (first: {_describe(first)})", type(first).__name__

    def _new_watermarks(self, status: str) -> dict[str, datetime]:
        if not self.tracks_watermarks or self.limit is not None or self.tracker.failed:
            return {}
        if status == "failed" and not self.job.requires_parameters:
            return {}
        out: dict[str, datetime] = {}
        for idx in self.stream_ok:
            mt = self.stream_max.get(idx)
            if mt is not None:
                out[self.streams[idx].parent_key] = mt
        return out

    def _finish(self, conn: psycopg.Connection, publisher: Publisher | None, heartbeat: runs_mod.Heartbeat | None,
                status: str, error: str | None, error_class: str | None, t0: float) -> RunResult:
        job = self.job
        if heartbeat is not None:
            heartbeat.stop()
        if self.client is not None:
            self.client.close()
        res = RunResult(job_id=job.id, status=status, run_id=self.run_id, mode=self.mode, topic=self.topic,
                        warnings=self.warnings)
        if self.run_id is None:
            return res
        self._publish_progress()
        snap = self.tracker.snapshot()
        failed_parents = [self.streams[i].params for i in sorted(self.stream_failed)
                          if i < len(self.streams) and self.streams[i].params] if job.requires_parameters else []
        # parents never attempted because the run stopped early also need a retry
        not_attempted = 0
        if job.requires_parameters and status == "failed" and self.streams:
            done = self.stream_ok | set(self.stream_failed)
            not_attempted = len(self.streams) - len(done)
        new_wm: dict[str, datetime] = {}
        if error is None or status in ("success", "partial"):
            new_wm = self._new_watermarks(status)
        wm_to = max(new_wm.values()) if new_wm else None
        wm_from = min(self.used_wm) if self.used_wm else None
        counters = self.counters()
        context: dict[str, Any] = {
            "topic": self.topic,
            "end_offsets": {str(p): o for p, o in sorted(snap["last_offset"].items())},
            "records_per_partition": {str(p): n for p, n in sorted(snap["per_partition"].items())},
            "failed_parents": failed_parents,
            "failed_parent_errors": [
                {"params": self.streams[i].params, **_error_dict(e)}
                for i, e in sorted(self.stream_failed.items())[:MAX_ERROR_DETAILS] if i < len(self.streams)
            ],
            "parents_not_attempted": not_attempted,
            "records_missing_key": self.records_missing_key,
            "records_repeated_in_page": self.records_repeated,
            "fetch_seconds": round(self.fetch_seconds, 3),
            "pages": self.pages,
            "retries": self.client.retries if self.client else self._proc_retries,
            "processes": self.processes,
            "warnings": self.warnings,
            "watermarks_committed": len(new_wm),
        }
        if job.requires_parameters and self.only_parents is None and self.limit is None \
                and self.parents_as_of is not None:
            # the next `changed`-policy run starts from here if this one succeeds
            context["parents_as_of"] = self.parents_as_of.isoformat()
            context["fanout"] = self.fanout or {"policy": self.fanout_policy, "asked": "all"}
        # Everything below survives a database restart: the records are published, and a run whose
        # end offsets are not recorded can never be seen as loaded (its children would wait for
        # ETL_LOAD_TIMEOUT_SECONDS, then be skipped). Not recorded after FINISH_DB_WAIT_SECONDS: the
        # run is reported failed, so the orchestrator retries it.
        db_deadline = time.monotonic() + FINISH_DB_WAIT_SECONDS
        db = _Db(self.s, conn)
        recorded = True
        try:
            db.call("record_results", lambda c: runs_mod.record_results(c, self.run_id, counters, context, wm_from,
                                                                        wm_to), db_deadline, self.log)
        except Exception as e:  # noqa: BLE001
            recorded = False
            self.log.error("record_results_failed", error=_describe(e))
            if status != "failed":
                status, error_class = "failed", "DatabaseError"
                error = f"the run's results could not be recorded in the database: {_describe(e)}"
            new_wm = {}  # never advance watermarks past a run the warehouse knows nothing of
        if new_wm and publisher is not None:
            try:
                db.call("watermarks", lambda c: wm_mod.commit(c, publisher, job_id=job.id, field=job.timestamp_field,
                                                              run_id=self.run_id, values=new_wm,
                                                              previous=self.previous_wm), db_deadline, self.log)
            except Exception as e:  # noqa: BLE001 - stale watermarks only cost a larger next run
                self.log.error("watermark_commit_failed", error=_describe(e))
                self.warnings.append(f"watermarks not saved: {_describe(e)}")
        if publisher is not None:
            try:
                self._control(publisher, RunFinished(
                    run_id=self.run_id, job_id=job.id, target_table=self.table, topic=self.topic,
                    instance_id=self.s.cc_instance_id, status=status,  # type: ignore[arg-type]
                    records_published=snap["delivered"], records_per_partition=snap["per_partition"],
                    end_offsets=snap["last_offset"], error=error, watermark=wm_to))
            except Exception as e:  # noqa: BLE001 - the DB row below still records the outcome
                self.log.error("run_finished_publish_failed", error=_describe(e))
        try:
            db.call("finish_run", lambda c: runs_mod.finish_run(c, self.run_id, job.id, status, error_class=error_class,
                                                                error_message=scrub(error) if error else None,
                                                                records=snap["delivered"]), db_deadline, self.log)
        except Exception as e:  # noqa: BLE001
            self.log.error("finish_run_failed", error=_describe(e))
            if recorded and status != "failed":
                # the row stays 'running' (closed later as stale): report the run failed so it is retried
                status, error_class = "failed", "DatabaseError"
                error = f"the run's final status could not be recorded in the database: {_describe(e)}"
        if db.conn is not conn:  # a replacement made above; the run closes its own
            db.close()
        res.status = status
        duration = time.monotonic() - t0
        JOB_RUNS.labels(str(job.id), status).inc()
        JOB_DURATION.labels(str(job.id)).observe(duration)
        RUNS_IN_PROGRESS.dec()
        if status == "success":
            JOB_LAST_SUCCESS.labels(str(job.id)).set(time.time())
        res.records_extracted = self.records_extracted
        res.records_published = snap["delivered"]
        res.records_missing_key = self.records_missing_key
        res.api_calls = counters["api_calls"]
        res.pages = self.pages
        res.parents_total = self.parents_total
        res.parents_done = counters["parents_done"]
        res.parents_failed = counters["parents_failed"]
        res.failed_parents = failed_parents
        res.records_per_partition = snap["per_partition"]
        res.end_offsets = snap["last_offset"]
        res.watermark_from, res.watermark_to = wm_from, wm_to
        res.error = scrub(error) if error else None
        res.error_class = error_class
        res.duration_s = round(duration, 3)
        res.fetch_s = round(self.fetch_seconds, 3)
        level = self.log.info if status == "success" else (self.log.warning if status == "partial" else self.log.error)
        level("run_finished", status=status, records_extracted=res.records_extracted,
              records_published=res.records_published, api_calls=res.api_calls, pages=self.pages,
              parents_total=res.parents_total, parents_failed=res.parents_failed,
              records_missing_key=self.records_missing_key, duration_s=res.duration_s, error=res.error)
        if self.progress is not None:
            self.progress.finish(res)
        return res

    def _control(self, publisher: Publisher, msg: RunStarted | RunFinished) -> None:
        if publisher.fatal is not None:  # do not wait another 60 s on a producer known to be dead
            raise PublishError(f"control message {msg.type} not sent: the producer is unusable ({publisher.fatal})")
        topic = K.control_topic(self.s)
        tr = DeliveryTracker(topic)
        publisher.publish_values(topic, [(str(msg.run_id).encode(), msg.to_bytes())], None, tr)
        publisher.wait(tr, timeout=60)
        if tr.failed:
            raise PublishError(f"control message {msg.type} not acknowledged: {tr.first_error}")


#: how long the end of a run waits for the database (records are already published: recording the
#: run, its end offsets and watermarks is worth waiting for through a restart or failover)
FINISH_DB_WAIT_SECONDS = 120.0
_DB_DOWN = (psycopg.OperationalError, psycopg.InterfaceError, DatabaseError)


class _Db:
    """The run's database connection, replaced when it breaks (server restart, network cut)."""

    def __init__(self, settings: Settings, conn: psycopg.Connection):
        self.s, self.conn = settings, conn

    def call(self, what: str, fn: Callable[[psycopg.Connection], Any], deadline: float, log: Any) -> Any:
        """``fn(conn)``; on a lost connection reconnect and retry with backoff until ``deadline``."""
        delay = 0.25
        while True:
            try:
                return fn(self.conn)
            except _DB_DOWN as e:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("database_unavailable_retrying", step=what, retry_in_s=round(delay, 2), error=_describe(e))
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
            try:
                self.conn = connect(self.s, autocommit=True, application_name="trialsync-extract")
            except _DB_DOWN:
                pass  # still down: the next call fails fast and we wait again

    def close(self) -> None:
        self.conn.close()


class _EndpointInvalid(Exception):
    """Every parent tried answered 404/400: the endpoint, not the parents, is wrong."""


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return scrub(text.splitlines()[0] if "\n" in text else text)


def _error_dict(e: BaseException) -> dict[str, Any]:
    if isinstance(e, ApiError):
        return {"error_class": type(e).__name__, "status": e.status, "message": _describe(e)}
    return {"error_class": type(e).__name__, "status": None, "message": _describe(e)}


def run_jobs(jobs: list[Job], *, on_result: Callable[[RunResult], None] | None = None, **kw: Any) -> list[RunResult]:
    """Run several jobs one after the other (``--all``/``--category``); never stops at a failure."""
    out = []
    for job in jobs:
        r = run_job(job, **kw)
        out.append(r)
        if on_result is not None:
            on_result(r)
    return out
