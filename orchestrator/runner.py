"""Execute a plan of jobs: dependency order, bounded parallelism, load barriers, retries, timeouts.

The rules (issue 7, seed 001 §A/§E, seed 003's phases):

* **Parallel up to ETL_PARALLEL_JOBS** extractions at once. A job starts the moment every parent
  *in the plan* has finished and its records are **loaded** into Bronze
  (``consumers.run_progress``: the loader committed past the run's end offsets), because a
  parameterized job reads its parameters from the parent's staging table -- a published but not
  yet loaded parent would silently shrink the child's parent list.
* **A failed parent skips its children**: each gets a ``skipped`` row in ``dw_etl_runs`` with the
  reason, and so do their descendants. A *partial* parent (some parameter values failed) does not
  block: its children run over what was loaded.
* **Retries**: a failed or partial attempt is retried after ``ETL_RETRY_DELAY_SECONDS *
  2^(attempt-1)`` (capped, jittered) up to ``ETL_MAX_RETRIES`` times; a partial attempt retries
  only its failed parents (``run_context->'failed_parents'``); permanent errors are not retried
  (``orchestrator.retry``). Each attempt is its own run row (``attempt``, ``parent_run_id``).
* **Timeouts**: each attempt runs in a child process (``orchestrator.launcher``). The extractor
  stops itself at ``timeout_seconds`` (job) or ``ETL_TIMEOUT_SECONDS``; if it is still alive
  ``ETL_TIMEOUT_GRACE_SECONDS`` later its process group is killed and its run is marked failed
  with the reason.
* **Never twice at once**: a per-job PostgreSQL advisory lock is taken before the first attempt
  and held until the last. A job whose lock another orchestrator holds (a second scheduler
  replica, an operator's ``trialsync run``) waits for it; once it has the lock, a complete run of
  the job that another process started since this orchestration began (the scheduler: since the
  scheduled time) is **reused** instead of extracting the same data twice.

The loop is single-threaded and event-driven (pipes and process sentinels), so its decisions are
deterministic and testable with the fakes in tests/unit.
"""

from __future__ import annotations

import multiprocessing.connection
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from common.config import Settings, get_settings
from common.logging import get_logger, scrub
from orchestrator.dag import Plan
from orchestrator.launcher import JobHandle, Launcher, LaunchRequest
from orchestrator.retry import RetryPolicy, RetryRequest, next_attempt
from orchestrator.settings import OrchestratorSettings, get_orchestrator_settings
from orchestrator.store import RunRow, RunStore
from schemas.runs import ChildMessage, LaunchFailure, RunProgress, RunResult

if TYPE_CHECKING:
    from producers.extractor import Mode

log = get_logger("orchestrator")

# phases of a job inside one orchestration
WAITING, LOCKWAIT, RUNNING, BACKOFF, LOADING, DONE = "waiting", "lockwait", "running", "backoff", "loading", "done"
FINAL = ("success", "partial", "failed", "skipped", "cancelled")


@dataclass
class JobState:
    """Everything the runner knows about one job of the plan (also what the live display shows)."""

    job_id: int
    name: str
    requires_parameters: bool = False
    phase: str = WAITING
    status: str | None = None
    attempt: int = 0
    run_ids: list[int] = field(default_factory=list)
    #: runs whose records children wait for (success/partial attempts)
    data_run_ids: list[int] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    records_extracted: int = 0
    records_published: int = 0
    records_loaded: int = 0
    api_calls: int = 0
    parents_total: int | None = None
    parents_done: int | None = None
    parents_failed: int | None = None
    started_at: float | None = None        # wall clock (epoch) of the first attempt
    extracted_at: float | None = None      # wall clock when the last attempt ended
    finished_at: float | None = None       # wall clock when the job reached DONE
    loaded: bool | None = None
    error: str | None = None
    error_class: str | None = None
    reason: str | None = None
    # runtime (monotonic clock)
    handle: JobHandle | None = None
    request: RetryRequest | None = None
    deadline: float | None = None
    kill_at: float | None = None
    backoff_until: float | None = None
    load_deadline: float | None = None
    lock_deadline: float | None = None
    reused_run_id: int | None = None
    result: RunResult | None = None
    child_error: LaunchFailure | None = None
    live: RunProgress = field(default_factory=RunProgress)
    locked: bool = False

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.extracted_at or self.finished_at or time.time()
        return max(0.0, end - self.started_at)

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id, "name": self.name, "status": self.status or self.phase, "attempts": self.attempt,
            "run_ids": self.run_ids, "records_extracted": self.records_extracted,
            "records_published": self.records_published, "records_loaded": self.records_loaded,
            "api_calls": self.api_calls, "parents_total": self.parents_total, "parents_failed": self.parents_failed,
            "duration_seconds": round(self.duration, 3) if self.duration is not None else None,
            "loaded": self.loaded, "error": self.error, "reason": self.reason,
            "started_at": _iso(self.started_at), "finished_at": _iso(self.finished_at),
        }


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, UTC).isoformat() if t is not None else None


def _keep_outcome(s: JobState, msg: ChildMessage) -> None:
    """Keep an attempt's result or error; progress that arrives once it is ending no longer matters."""
    match msg:
        case ("result", result):
            s.result = result
        case ("error", failure):
            s.child_error = failure


@dataclass
class OrchestrationResult:
    orchestration_id: str
    status: str
    jobs: dict[int, JobState]
    started_at: float
    finished_at: float
    plan: Plan

    @property
    def duration(self) -> float:
        return self.finished_at - self.started_at

    def count(self, status: str) -> int:
        return sum(1 for s in self.jobs.values() if s.status == status)

    @property
    def counts(self) -> dict[str, int]:
        out = {k: self.count(k) for k in FINAL}
        out["records_extracted"] = sum(s.records_extracted for s in self.jobs.values())
        out["records_published"] = sum(s.records_published for s in self.jobs.values())
        out["records_loaded"] = sum(s.records_loaded for s in self.jobs.values())
        out["api_calls"] = sum(s.api_calls for s in self.jobs.values())
        return out

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def as_dict(self) -> dict[str, Any]:
        return {"orchestration_id": self.orchestration_id, "status": self.status,
                "duration_seconds": round(self.duration, 3), "counts": self.counts,
                "jobs": [self.jobs[j].as_dict() for j in self.plan.job_ids]}


@dataclass
class RunnerOptions:
    parallel: int = 5
    mode: Mode = "incremental"
    trigger: str = "cli"
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_seconds: int = 300
    timeout_grace: float = 15.0
    load_timeout: float = 1800.0
    #: wait until every run is loaded before returning (the demo does; ``run`` only on --wait-load)
    wait_all_loads: bool = False
    fanout_workers: int | None = None
    plain_workers: int | None = None
    #: check loads at most this often (seconds)
    load_poll: float = 0.5
    #: seconds a cancelled extraction gets to stop cleanly before it is killed
    cancel_grace: float = 10.0
    #: reuse a complete run another process started at/after this epoch time (None = this
    #: orchestration's start); reuse is off for --full runs
    reuse_since: float | None = None
    allow_reuse: bool = True
    #: the night's API call budget (ETL_CALL_BUDGET or window x rate; incremental runs only)
    call_budget: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings | None = None, orch: OrchestratorSettings | None = None,
                      **overrides: Any) -> RunnerOptions:
        s = settings or get_settings()
        o = orch or get_orchestrator_settings()
        opts = cls(
            parallel=s.etl_parallel_jobs,
            policy=RetryPolicy(max_retries=s.etl_max_retries, base_delay=s.etl_retry_delay_seconds,
                               max_delay=o.etl_retry_max_delay_seconds),
            timeout_seconds=s.etl_timeout_seconds, timeout_grace=o.etl_timeout_grace_seconds,
            load_timeout=o.etl_load_timeout_seconds,
            fanout_workers=o.etl_fanout_workers or s.etl_parallel_jobs,
            plain_workers=o.etl_plain_workers or s.etl_parallel_jobs,
            call_budget=s.call_budget(),
        )
        for k, v in overrides.items():
            if v is not None:
                setattr(opts, k, v)
        return opts


class Runner:
    """Runs one plan to completion (see the module docstring)."""

    def __init__(self, plan: Plan, store: RunStore, launcher: Launcher, options: RunnerOptions,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 wait: Callable[[list[Any], float], Any] | None = None,
                 on_tick: Callable[[Runner], None] | None = None,
                 initial_requests: dict[int, RetryRequest] | None = None,
                 orchestration_id: str | None = None, selection: dict[str, Any] | None = None):
        self.plan = plan
        self.store = store
        self.launcher = launcher
        self.opt = options
        self.clock = clock
        self.wall = wall
        self._wait = wait or _wait_objects
        self.on_tick = on_tick
        self.initial = dict(initial_requests or {})
        self.oid = orchestration_id or str(uuid.uuid4())
        self.selection = selection or {"jobs": list(plan.job_ids)}
        self.states: dict[int, JobState] = {
            j: JobState(j, plan.job(j).name, plan.job(j).requires_parameters) for j in plan.job_ids}
        self._cancel_reason: str | None = None
        self._last_load_poll = -1e9
        self._last_count_poll = -1e9
        self._order: list[int] = list(plan.job_ids)
        self._costs: dict[int, float] = {}
        self.started_at = 0.0
        self.log = log.bind(orchestration_id=self.oid)

    # -- control ---------------------------------------------------------------------------------
    def cancel(self, reason: str = "cancelled by the operator") -> None:
        """Stop starting jobs; stop running ones (the next loop iteration does it)."""
        self._cancel_reason = reason

    @property
    def cancelled(self) -> bool:
        return self._cancel_reason is not None

    def counts(self) -> dict[str, int]:
        out = {p: 0 for p in (WAITING, LOCKWAIT, RUNNING, BACKOFF, LOADING, DONE)}
        for s in self.states.values():
            out[s.phase] += 1
        return out

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> OrchestrationResult:
        self.started_at = self.wall()
        try:
            self._costs = dict(self.store.last_costs(list(self.plan.job_ids)))
        except Exception:  # noqa: BLE001 - ordering hint only
            self._costs = {}
        self._order = self.plan.start_order(self._costs)
        self.store.begin_orchestration(self.oid, self.opt.trigger, self.selection, self.opt.mode, len(self.plan))
        if self.opt.call_budget is not None and self.opt.mode == "incremental":
            try:
                self.store.open_budget(self.oid, self.opt.call_budget, [self.plan.job(j) for j in self.plan.job_ids])
            except Exception as e:  # noqa: BLE001 - without the ledger the runs are simply not budgeted
                self.log.error("call_budget_not_opened", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        self.log.info("orchestration_started", jobs=len(self.plan), parallel=self.opt.parallel, mode=self.opt.mode,
                      trigger=self.opt.trigger, levels=len(self.plan.levels))
        error: str | None = None
        try:
            while not all(s.phase == DONE for s in self.states.values()):
                now = self.clock()
                self._check_running(now)
                if self.cancelled:
                    self._cancel_all(now)
                    continue
                self._check_backoff(now)
                self._check_lockwait(now)
                self._check_loading(now)
                self._resolve_waiting(now)
                self._start_ready(now)
                self._poll_counts(now)
                if self.on_tick is not None:
                    self.on_tick(self)
                if not all(s.phase == DONE for s in self.states.values()):
                    self._sleep(now)
            if self.opt.wait_all_loads and not self.cancelled:
                self._wait_remaining_loads()
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
            self._cancel_reason = self._cancel_reason or "the orchestrator stopped: " + error
            self._cancel_all(self.clock())
            raise
        finally:
            self._refresh_counts(force=True)
            for s in self.states.values():
                self._unlock(s)
            status = self._overall_status()
            result = OrchestrationResult(self.oid, status, self.states, self.started_at, self.wall(), self.plan)
            try:
                self.store.finish_orchestration(self.oid, status, result.counts, error or self._cancel_reason)
            except Exception as e:  # noqa: BLE001 - the run rows are the record; this is a summary
                self.log.warning("orchestration_finish_not_recorded", error=str(e).splitlines()[0] if str(e) else "")
            if self.on_tick is not None:
                self.on_tick(self)
            self.log.info("orchestration_finished", status=status, duration_s=round(result.duration, 3),
                          **{k: v for k, v in result.counts.items() if v})
        return result

    def _overall_status(self) -> str:
        statuses = [s.status for s in self.states.values()]
        if self.cancelled:
            return "cancelled"
        # a job whose records never reached Bronze (load timeout) is not a success: found by the fault
        # suite, where a broker restart lost records and `run --all --wait-load` still exited 0
        unloaded = any(s.loaded is False for s in self.states.values())
        if all(st == "success" for st in statuses) and not unloaded:
            return "success"
        if any(st == "success" or st == "partial" for st in statuses):
            return "partial"
        return "failed"

    def _sleep(self, now: float) -> None:
        timeouts = [0.5]
        for s in self.states.values():
            for t in (s.kill_at, s.backoff_until):
                if t is not None and s.phase in (RUNNING, BACKOFF) and t > now:
                    timeouts.append(t - now)
        if any(s.phase == LOADING for s in self.states.values()):
            timeouts.append(self.opt.load_poll)
        timeout = max(0.0, min(timeouts))
        objs = [o for s in self.states.values() if s.phase == RUNNING and s.handle is not None
                for o in s.handle.wait_objects()]
        self._wait(objs, timeout)

    # -- running attempts ------------------------------------------------------------------------
    def _check_running(self, now: float) -> None:
        for s in self.states.values():
            if s.phase != RUNNING or s.handle is None:
                continue
            for msg in s.handle.poll():
                match msg:
                    case ("progress", progress):
                        s.live = s.live.model_copy(update=progress.model_dump(exclude_none=True))
                        self._apply_live(s)
                    case ("result", result):
                        s.result = result
                    case ("error", failure):
                        s.child_error = failure
            if s.result is not None or s.child_error is not None:
                s.handle.join(timeout=5)
                self._attempt_ended(s, now)
            elif not s.handle.is_alive():
                for msg in s.handle.poll():  # a result sent just before exiting
                    _keep_outcome(s, msg)
                if s.result is None and s.child_error is None:
                    code = s.handle.exitcode()
                    s.child_error = LaunchFailure(
                        error_class="ProcessDied",
                        message=f"the extraction process exited with code {code} before reporting a result")
                self._attempt_ended(s, now)
            elif s.kill_at is not None and now >= s.kill_at:
                timeout = self._timeout_of(s.job_id)
                s.handle.kill()
                s.handle.join(timeout=10)
                s.child_error = LaunchFailure(error_class="JobTimeout", message=(
                    f"job {s.job_id} ({s.name}) exceeded its timeout of {timeout} s and was stopped "
                    "(timeout_seconds in config/jobs.yaml, or ETL_TIMEOUT_SECONDS)"))
                self.log.error("job_timeout_killed", job_id=s.job_id, timeout_s=timeout, child_pid=s.handle.pid)
                self._attempt_ended(s, now)

    def _apply_live(self, s: JobState) -> None:
        live = s.live
        for k in ("parents_total", "parents_done", "parents_failed"):
            if getattr(live, k) is not None:
                setattr(s, k, getattr(live, k))

    def _attempt_ended(self, s: JobState, now: float) -> None:
        """One attempt is over: record it, then retry, wait for its load, or finish the job."""
        res, err = s.result, s.child_error
        s.result = s.child_error = None
        s.handle = None
        s.extracted_at = self.wall()
        run_id: int | None = None
        failed_parents: list[dict[str, Any]] | None = None
        if res is not None:
            status = res.status
            run_id = res.run_id
            error, error_class = res.error, res.error_class
            failed_parents = res.failed_parents or None
            s.records_extracted += res.records_extracted
            s.records_published += res.records_published
            s.api_calls += res.api_calls
            for k in ("parents_total", "parents_done", "parents_failed"):
                if getattr(res, k) is not None:
                    setattr(s, k, getattr(res, k))
        else:
            assert err is not None
            status, error, error_class = "failed", err.message, err.error_class
            s.records_extracted += s.live.records
            s.api_calls += s.live.api_calls
            if err.record:
                try:
                    run_id = self.store.mark_failed(s.job_id, self.oid, s.attempt, self.opt.trigger,
                                                    error_class, scrub(error),
                                                    s.request.parent_run_id if s.request else None)
                except Exception as e:  # noqa: BLE001
                    self.log.error("failed_run_not_recorded", job_id=s.job_id, error=str(e).splitlines()[0])
        s.live = RunProgress()
        if run_id is not None:
            s.run_ids.append(int(run_id))
            if status in ("success", "partial"):
                s.data_run_ids.append(int(run_id))
        s.statuses.append(status)
        s.error, s.error_class = (scrub(error) if error else None), error_class
        self.log.info("attempt_finished", job_id=s.job_id, attempt=s.attempt, run_id=run_id, status=status,
                      error_class=error_class, error=s.error)
        if not self.cancelled and self.opt.policy.should_retry(status, s.attempt, error_class, failed_parents):
            s.request = next_attempt(s.job_id, status, run_id, s.attempt, failed_parents)
            delay = self.opt.policy.delay(s.attempt)
            s.backoff_until = now + delay
            s.phase = BACKOFF
            s.deadline = s.kill_at = None
            self.log.warning("retry_scheduled", job_id=s.job_id, next_attempt=s.request.attempt,
                             delay_s=round(delay, 2), scope=s.request.scope, after_status=status)
            return
        final = self._final_status(s)
        s.deadline = s.kill_at = None
        self._unlock(s)
        if final in ("success", "partial") and (self._has_children(s.job_id) or self.opt.wait_all_loads):
            s.status = final
            s.phase = LOADING
            s.load_deadline = now + self.opt.load_timeout
            return
        self._done(s, final)

    def _final_status(self, s: JobState) -> str:
        last = s.statuses[-1]
        if last in ("success", "partial"):
            return last
        if last == "cancelled":
            return "cancelled"
        # the last attempt failed: earlier partial attempts still loaded data
        return "partial" if "partial" in s.statuses[:-1] or (
            "success" in s.statuses[:-1]) else "failed"

    def _has_children(self, job_id: int) -> bool:
        return bool(self.plan.children.get(job_id))

    def _done(self, s: JobState, status: str, reason: str | None = None) -> None:
        s.phase = DONE
        s.status = status
        s.finished_at = self.wall()
        if reason:
            s.reason = reason
        self._unlock(s)

    def _unlock(self, s: JobState) -> None:
        if s.locked:
            s.locked = False
            try:
                self.store.unlock(s.job_id)
            except Exception as e:  # noqa: BLE001
                self.log.warning("unlock_failed", job_id=s.job_id, error=str(e).splitlines()[0] if str(e) else "")

    def _timeout_of(self, job_id: int) -> int:
        return self.plan.job(job_id).timeout_seconds or self.opt.timeout_seconds

    # -- retries ---------------------------------------------------------------------------------
    def _check_lockwait(self, now: float) -> None:
        for j in self._order:
            s = self.states[j]
            if s.phase != LOCKWAIT:
                continue
            if self._running_count() < self.opt.parallel:
                self._acquire_and_start(s, now)
            if s.phase == LOCKWAIT and s.lock_deadline is not None and now >= s.lock_deadline:
                self._skip(s, f"job {j} stayed locked by another process (or the database unreachable) for "
                              f"{self.opt.load_timeout:g} s (ETL_LOAD_TIMEOUT_SECONDS); not started twice")

    def _check_backoff(self, now: float) -> None:
        for s in self.states.values():
            if s.phase == BACKOFF and s.backoff_until is not None and now >= s.backoff_until:
                if self._running_count() < self.opt.parallel:
                    s.backoff_until = None
                    self._launch(s, now, s.request)

    # -- loads -----------------------------------------------------------------------------------
    def _check_loading(self, now: float) -> None:
        loading = [s for s in self.states.values() if s.phase == LOADING]
        if not loading or now - self._last_load_poll < self.opt.load_poll:
            return
        self._last_load_poll = now
        ids = sorted({r for s in loading for r in s.data_run_ids})
        try:
            got = self.store.loaded(ids)
        except Exception as e:  # noqa: BLE001 - keep waiting; the deadline still applies
            self.log.warning("load_check_failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            got = {}
        for s in loading:
            if all(got.get(r, False) for r in s.data_run_ids):
                s.loaded = True
                self._done(s, s.status or "success")
                self.log.info("job_loaded", job_id=s.job_id, run_ids=s.data_run_ids)
            elif s.load_deadline is not None and now >= s.load_deadline:
                s.loaded = False
                pending = [r for r in s.data_run_ids if not got.get(r, False)]
                s.reason = (f"run(s) {pending} not loaded within {self.opt.load_timeout:g} s "
                            "(ETL_LOAD_TIMEOUT_SECONDS): is `trialsync load` running?")
                self.log.error("load_timeout", job_id=s.job_id, run_ids=pending, timeout_s=self.opt.load_timeout)
                self._done(s, s.status or "success")

    def _wait_remaining_loads(self) -> None:
        """--wait-load / the demo: block until every data run is loaded (bounded by the load timeout)."""
        deadline = self.clock() + self.opt.load_timeout
        while True:
            # runs whose load already timed out (s.loaded False) were reported; do not wait for them again
            pending = [r for s in self.states.values() if s.loaded is None for r in s.data_run_ids]
            if not pending:
                return
            try:
                got = self.store.loaded(pending)
            except Exception as e:  # noqa: BLE001 - database unreachable: keep waiting, the deadline applies
                self.log.warning("load_check_failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
                got = {}
            for s in self.states.values():
                if s.data_run_ids and s.loaded is not True and all(got.get(r, False) for r in s.data_run_ids):
                    s.loaded = True
            self._poll_counts(self.clock())
            if self.on_tick is not None:
                self.on_tick(self)
            if all(got.get(r, False) for r in pending) or self.cancelled:
                return
            if self.clock() >= deadline:
                for s in self.states.values():
                    if s.data_run_ids and s.loaded is None:
                        s.loaded = False
                        late = [r for r in s.data_run_ids if not got.get(r, False)]
                        s.reason = s.reason or (f"run(s) {late} not loaded within {self.opt.load_timeout:g} s "
                                                "(ETL_LOAD_TIMEOUT_SECONDS): is `trialsync load` running?")
                        self.log.error("load_timeout", job_id=s.job_id, run_ids=late, timeout_s=self.opt.load_timeout)
                return
            self._wait([], self.opt.load_poll)

    # -- waiting -> ready / skipped ----------------------------------------------------------------
    def _resolve_waiting(self, now: float) -> None:
        changed = True
        while changed:
            changed = False
            for j in self._order:
                s = self.states[j]
                if s.phase != WAITING or s.status == "ready":
                    continue
                parents = [self.states[p] for p in self.plan.parents.get(j, ())]
                if not all(p.phase == DONE for p in parents):
                    continue
                blocking = [p for p in parents if p.status not in ("success", "partial") or p.loaded is False]
                if blocking:
                    p = blocking[0]
                    if p.status in ("success", "partial"):
                        why = f"parent job {p.job_id} ({p.name}) was not loaded: {p.reason}"
                    elif p.status == "skipped":
                        why = f"parent job {p.job_id} ({p.name}) was skipped"
                    elif p.status == "cancelled":
                        why = f"parent job {p.job_id} ({p.name}) was cancelled"
                    else:
                        last = f" (run {p.run_ids[-1]}: {p.error})" if p.run_ids and p.error else (
                            f": {p.error}" if p.error else "")
                        why = f"parent job {p.job_id} ({p.name}) failed{last}"
                    self._skip(s, why)
                    changed = True
                else:
                    s.status = "ready"
                    self._estimate_cost(s)

    def _estimate_cost(self, s: JobState) -> None:
        """A parameterized job without history costs about one call per parent row: now that its
        parents are loaded, count them and re-rank the start order."""
        job = self.plan.job(s.job_id)
        if s.job_id in self._costs or not job.requires_parameters or not job.parameter_source_table:
            return
        try:
            self._costs[s.job_id] = float(self.store.count_rows(job.parameter_source_table))
        except Exception:  # noqa: BLE001 - ordering hint only
            return
        self._order = self.plan.start_order(self._costs)

    def _skip(self, s: JobState, why: str) -> None:
        reason = f"skipped: {why}"
        try:
            rid = self.store.record_skipped(s.job_id, self.oid, self.opt.trigger, reason)
            s.run_ids.append(rid)
        except Exception as e:  # noqa: BLE001
            self.log.error("skip_not_recorded", job_id=s.job_id, error=str(e).splitlines()[0] if str(e) else "")
        self.log.warning("job_skipped", job_id=s.job_id, reason=reason)
        self._done(s, "skipped", reason)

    # -- starting ----------------------------------------------------------------------------------
    def _running_count(self) -> int:
        return sum(1 for s in self.states.values() if s.phase == RUNNING)

    def _start_ready(self, now: float) -> None:
        for j in self._order:
            if self._running_count() >= self.opt.parallel:
                return
            s = self.states[j]
            if s.phase != WAITING or s.status != "ready":
                continue
            s.status = None
            self._acquire_and_start(s, now)

    def _acquire_and_start(self, s: JobState, now: float) -> None:
        """Take the job's lock (or wait for it), reuse a fresh run of another process, or launch."""
        j = s.job_id
        try:
            got = self.store.try_lock(j)
        except Exception as e:  # noqa: BLE001 - database unreachable: wait for it like for a held lock
            if s.phase != LOCKWAIT:
                s.phase = LOCKWAIT
                s.lock_deadline = now + self.opt.load_timeout
                self.log.warning("job_lock_unavailable", job_id=j, error=str(e).splitlines()[0] if str(e) else "",
                                 detail="the database is not reachable; the job starts when it is")
            return
        if not got:
            if s.phase != LOCKWAIT:
                s.phase = LOCKWAIT
                s.lock_deadline = now + self.opt.load_timeout
                self.log.warning("job_locked_elsewhere", job_id=j,
                                 detail="another process runs this job; waiting for it, then reusing its run")
            return
        s.locked = True
        s.phase = WAITING
        if self._reuse(s, now):
            return
        s.started_at = self.wall()
        self._launch(s, now, self.initial.get(j))

    def _reuse(self, s: JobState, now: float) -> bool:
        if not self.opt.allow_reuse or self.opt.mode == "full" or s.job_id in self.initial:
            return False
        since = self.opt.reuse_since if self.opt.reuse_since is not None else self.started_at
        try:
            found = self.store.recent_run(s.job_id, since, self.oid)
        except Exception as e:  # noqa: BLE001 - without the answer, run the job
            self.log.warning("reuse_check_failed", job_id=s.job_id, error=str(e).splitlines()[0] if str(e) else "")
            return False
        if found is None or found[1] not in ("success", "partial"):
            return False
        rid, status = found
        s.reused_run_id = rid
        s.run_ids.append(rid)
        s.data_run_ids.append(rid)
        s.statuses.append(status)
        s.reason = f"reused run {rid} of another process (it ran this job while this orchestration waited)"
        s.started_at = s.extracted_at = self.wall()
        self.log.info("job_run_reused", job_id=s.job_id, run_id=rid, status=status)
        self._unlock(s)
        if self._has_children(s.job_id) or self.opt.wait_all_loads:
            s.status = status
            s.phase = LOADING
            s.load_deadline = now + self.opt.load_timeout
        else:
            self._done(s, status)
        return True

    def _launch(self, s: JobState, now: float, request: RetryRequest | None) -> None:
        job = self.plan.job(s.job_id)
        s.attempt = request.attempt if request is not None else s.attempt + 1
        s.request = request
        fanout = job.requires_parameters
        workers = self.opt.fanout_workers if fanout else self.opt.plain_workers
        lr = LaunchRequest(
            job=job, mode=self.opt.mode, only_parents=request.only_parents if request else None,
            trigger=self.opt.trigger, parent_run_id=request.parent_run_id if request else None,
            orchestration_id=self.oid, attempt=s.attempt, workers=workers,
            resume_from=request.resume_from if request else None)
        try:
            s.handle = self.launcher.start(lr)
        except Exception as e:  # noqa: BLE001 - e.g. fork failed: the attempt fails, retries may follow
            s.phase = RUNNING
            s.child_error = LaunchFailure(error_class=type(e).__name__,
                                          message=f"could not start the extraction: {e}")
            self._attempt_ended(s, now)
            return
        timeout = self._timeout_of(s.job_id)
        s.phase = RUNNING
        s.deadline = now + timeout
        s.kill_at = now + timeout + self.opt.timeout_grace
        self.log.info("attempt_started", job_id=s.job_id, attempt=s.attempt, child_pid=s.handle.pid, workers=workers,
                      only_parents=len(lr.only_parents) if lr.only_parents is not None else None,
                      timeout_s=timeout)

    # -- counters for the display --------------------------------------------------------------------
    def _poll_counts(self, now: float) -> None:
        if now - self._last_count_poll < 1.0:
            return
        self._last_count_poll = now
        self._refresh_counts()

    def _refresh_counts(self, force: bool = False) -> None:
        ids = [r for s in self.states.values() for r in s.run_ids]
        if not ids:
            return
        try:
            rows: dict[int, RunRow] = self.store.run_rows(ids)
        except Exception:  # noqa: BLE001 - display only
            return
        for s in self.states.values():
            mine = [rows[r] for r in s.run_ids if r in rows]
            if mine:
                s.records_loaded = sum(r.records_loaded for r in mine)
                if force:
                    s.records_extracted = max(s.records_extracted, sum(r.records_extracted for r in mine))
                    s.records_published = max(s.records_published, sum(r.records_published for r in mine))
                    # the loader dead-lettered records of the job's last run (it turned the run
                    # partial): the job is partial too, so `run` says so (found by the fault suite)
                    last = rows.get(s.run_ids[-1])
                    if s.status == "success" and last is not None and last.records_rejected > 0:
                        s.status = "partial"
                        s.reason = s.reason or (f"{last.records_rejected} record(s) of run {last.run_id} rejected by "
                                                "the loader: see etl.dw_etl_rejects and the dead-letter topic")

    # -- cancellation --------------------------------------------------------------------------------
    def _cancel_all(self, now: float) -> None:
        """Stop everything: running extractions get SIGTERM (they stop cleanly and record their end
        offsets) and ``opt.cancel_grace`` seconds, then SIGKILL; every stopped run is ``cancelled``."""
        reason = self._cancel_reason or "cancelled"
        running = [s for s in self.states.values() if s.phase == RUNNING and s.handle is not None]
        for s in running:
            assert s.handle is not None
            s.handle.terminate()
        deadline = self.clock() + self.opt.cancel_grace
        pending = list(running)
        while pending and self.clock() < deadline:
            for s in list(pending):
                assert s.handle is not None
                for msg in s.handle.poll():
                    _keep_outcome(s, msg)
                if s.result is not None or s.child_error is not None or not s.handle.is_alive():
                    pending.remove(s)
            if pending:
                self._wait([o for s in pending if s.handle is not None for o in s.handle.wait_objects()], 0.1)
        for s in running:
            assert s.handle is not None
            rid = s.result.run_id if s.result is not None else None
            if s.result is None:
                s.handle.kill()
                s.handle.join(timeout=10)
            try:
                if rid is not None:
                    self.store.mark_cancelled(int(rid), reason)
                else:
                    rid = self.store.mark_failed(s.job_id, self.oid, s.attempt, self.opt.trigger, "Cancelled", reason,
                                                 status="cancelled")
                s.run_ids.append(int(rid))
            except Exception as e:  # noqa: BLE001
                self.log.warning("cancel_not_recorded", job_id=s.job_id, error=str(e).splitlines()[0] if str(e) else "")
            s.statuses.append("cancelled")
            s.result = s.child_error = None
            s.handle = None
            self._done(s, "cancelled", reason)
        for s in self.states.values():
            if s.phase in (WAITING, LOCKWAIT, BACKOFF, LOADING):
                self._done(s, "cancelled" if s.phase != LOADING else (s.status or "success"),
                           None if s.phase == LOADING else reason)


def _wait_objects(objs: list[Any], timeout: float) -> Any:
    if objs:
        return multiprocessing.connection.wait(objs, timeout)
    time.sleep(timeout)
    return []


def run_plan(plan: Plan, *, options: RunnerOptions, launcher: Launcher | None = None, store: RunStore | None = None,
             on_tick: Callable[[Runner], None] | None = None, initial_requests: dict[int, RetryRequest] | None = None,
             selection: dict[str, Any] | None = None, settings: Settings | None = None,
             runner_hook: Callable[[Runner], None] | None = None) -> OrchestrationResult:
    """Run ``plan`` with the real store and launcher (unless given); always closes what it opened."""
    from orchestrator.launcher import PoolLauncher
    from orchestrator.store import DbRunStore

    own_store = store is None
    own_launcher = launcher is None
    if store is None:
        store = DbRunStore(settings)
        try:
            store.preflight(list(plan.job_ids))
        except BaseException:
            store.close()
            raise
    launcher = launcher or PoolLauncher()
    try:
        runner = Runner(plan, store, launcher, options, on_tick=on_tick, initial_requests=initial_requests,
                        selection=selection)
        if runner_hook is not None:
            runner_hook(runner)
        return runner.run()
    finally:
        if own_launcher:
            launcher.close()
        if own_store:
            store.close()
