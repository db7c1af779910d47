"""``trialsync scheduler``: a long-running APScheduler service that fires jobs on their cron schedules.

What it does
------------
* Schedules are the ``schedule`` column of ``etl.dw_etl_jobs`` (``trialsync schedule --job ID
  --cron "0 2 * * *"``, or ``schedule:`` in config/jobs.yaml via ``jobs sync``), 5-field cron in
  ``SCHEDULER_TIMEZONE`` (default UTC). They are re-read every ``SCHEDULER_REFRESH_SECONDS``, so
  a change needs no restart.
* A fire runs the job **with its dependencies** (every ancestor in the DAG, like ``run --job ID
  --with-deps``) through the same runner as ``trialsync run`` (load barriers, retries, timeouts).
  Fires that arrive within ``SCHEDULER_COALESCE_SECONDS`` of each other are merged into one
  orchestration, so a shared parent runs once. One orchestration at a time per replica; fires
  that arrive meanwhile queue up.
* **Replicas are safe**: every job takes a PostgreSQL advisory lock while it runs, so two
  replicas never run one job at once. The replica that waits for the lock then finds the run the
  other replica made for the same scheduled time (started at or after it) and reuses it instead
  of extracting again (outcome ``reused`` in ``etl.dw_scheduler_fires``).

Missed runs (the documented catch-up policy)
--------------------------------------------
A fire time is *missed* when no scheduler was running at that moment (all replicas down, machine
asleep, a long pause). When a scheduler starts, and whenever APScheduler wakes up late:

* missed fire times not older than ``SCHEDULER_MISFIRE_GRACE_SECONDS`` (default 3600) are
  **caught up once** -- several missed times of one job coalesce into a single run, marked
  ``catch_up``;
* older missed times are **skipped**: recorded once per job as outcome ``missed`` (with how many
  and the range) and counted in ``trialsync_scheduler_fires_total{outcome="missed"}``;
* the reference for "missed since when" is the job's latest fire in ``etl.dw_scheduler_fires``
  (any replica), or, for a schedule that never fired, when the schedule was set
  (``dw_etl_jobs.schedule_updated_at``) -- a new schedule never fires for times before it existed;
* a fire that did not finish does not count as the reference: ``cancelled`` (a shutdown stopped
  it after the grace) and ``abandoned`` (its scheduler died: at start-up a scheduler marks the
  ``running`` fires of dead scheduler processes on its host so). The next start therefore runs an
  interrupted nightly fire again -- a deploy or a crash at 02:30 does not cost the night's data.
  A dead replica on *another* host cannot be told from a slow one; its fire stays ``running``
  and counts as done (the other replicas' own fires of that time still run it).

Shutdown
--------
SIGTERM/SIGINT stop new fires at once; a running orchestration gets
``--shutdown-grace`` seconds to finish, then its extractions are stopped and their runs marked
``cancelled`` (a second signal cancels at once). Unstarted queued fires are dropped and are
caught up by the next scheduler start if within the grace.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.schedulers.base import BaseScheduler
from apscheduler.triggers.cron import CronTrigger

from common.config import Settings, get_settings
from common.logging import get_logger
from common.metrics import SCHEDULER_FIRES, SCHEDULER_NEXT_FIRE
from orchestrator.settings import OrchestratorSettings, get_orchestrator_settings

log = get_logger("scheduler")

FireHandler = Callable[[int, datetime, str], None]
MissedHandler = Callable[[int, list[datetime]], None]


# -- pure schedule arithmetic ---------------------------------------------------------------------

_DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _dow_token(tok: str) -> int:
    tok = tok.strip().lower()
    if tok[:3] in _DOW_NAMES and tok.isalpha():
        return _DOW_NAMES.index(tok[:3])
    n = int(tok)
    if not 0 <= n <= 7:
        raise ValueError(f"day of week {tok!r} is not 0-7 (0 and 7 = Sunday)")
    return n


def crontab_day_of_week(field: str) -> str:
    """Translate a crontab day-of-week field (0/7 = Sunday, 1 = Monday) to APScheduler's names.

    APScheduler 3 numbers days from Monday = 0, so ``CronTrigger.from_crontab("0 2 * * 1")`` fires
    on *Tuesdays*. Every schedule here is a standard crontab line, so the field is expanded to the
    set of days it means and handed over as names (``mon,wed``), which both agree on.
    """
    if field == "*":
        return field
    days: set[int] = set()
    for part in field.split(","):
        step = 1
        if "/" in part:
            part, st = part.split("/", 1)
            step = int(st)
            if step < 1:
                raise ValueError(f"step {st!r} must be at least 1")
        if part == "*":
            lo, hi = 0, 6
        elif "-" in part:
            a, b = part.split("-", 1)
            lo, hi = _dow_token(a), _dow_token(b)
        else:
            lo = _dow_token(part)
            hi = 6 if step > 1 else lo
        if hi < lo:
            raise ValueError(f"day-of-week range {part!r} runs backwards")
        days.update(n % 7 for n in range(lo, hi + 1, step))
    return ",".join(_DOW_NAMES[d] for d in sorted(days))


def cron_trigger(expr: str, timezone: str = "UTC") -> CronTrigger:
    """A trigger for a standard 5-field crontab line (minute hour day-of-month month day-of-week).

    One difference from Vixie cron remains: when both day-of-month and day-of-week are restricted,
    cron fires when *either* matches, APScheduler when *both* do.
    """
    from schemas.jobs import CatalogError, validate_cron

    validate_cron(expr)
    minute, hour, day, month, dow = expr.split()
    try:
        return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=crontab_day_of_week(dow),
                           timezone=timezone)
    except ValueError as e:
        raise CatalogError(f"cron expression {expr!r} is invalid: {e}") from None


def fire_times_between(expr: str, after: datetime, until: datetime, timezone: str = "UTC",
                       limit: int = 100_000) -> list[datetime]:
    """Every fire time t of ``expr`` with ``after < t <= until`` (at most ``limit``, the latest kept)."""
    trig = cron_trigger(expr, timezone)
    out: list[datetime] = []
    t = trig.get_next_fire_time(None, after + timedelta(microseconds=1))
    while t is not None and t <= until:
        out.append(t)
        if len(out) > limit:
            out.pop(0)
        t = trig.get_next_fire_time(t, t + timedelta(microseconds=1))
    return out


def split_missed(times: list[datetime], now: datetime, grace_seconds: float) -> tuple[datetime | None, list[datetime]]:
    """The catch-up policy: (the one fire to run now, the fire times skipped as too old)."""
    due = [t for t in times if (now - t).total_seconds() <= grace_seconds]
    old = [t for t in times if (now - t).total_seconds() > grace_seconds]
    return (due[-1] if due else None), old


# -- APScheduler glue -------------------------------------------------------------------------------

class FireExecutor(BaseExecutor):
    """Hands APScheduler's due run times to the service instead of running a function.

    APScheduler computes *when* (cron triggers, wake-ups, late wake-ups); this executor applies
    our misfire policy to the run times it is given and passes the scheduled time itself on, which
    a plain job function would never see.
    """

    def __init__(self, on_fire: FireHandler, on_missed: MissedHandler, grace_seconds: float,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)):
        super().__init__()
        self.on_fire = on_fire
        self.on_missed = on_missed
        self.grace = grace_seconds
        self.now = now

    def submit_job(self, job: Any, run_times: list[datetime]) -> None:
        self._do_submit_job(job, run_times)

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        fire, old = split_missed(sorted(run_times), self.now(), self.grace)
        job_id = int(job.id)
        if old:
            self.on_missed(job_id, old)
        if fire is not None:
            self.on_fire(job_id, fire, "on_time" if len(run_times) == 1 and not old else "catch_up")


class ScheduleBook:
    """The set of cron schedules inside an APScheduler instance (add / change / remove)."""

    def __init__(self, scheduler: BaseScheduler, timezone: str = "UTC"):
        self.scheduler = scheduler
        self.timezone = timezone
        self.schedules: dict[int, str] = {}

    def sync(self, schedules: dict[int, str]) -> dict[str, list[int]]:
        changes: dict[str, list[int]] = {"added": [], "changed": [], "removed": []}
        for job_id in sorted(set(self.schedules) - set(schedules)):
            self.scheduler.remove_job(str(job_id))
            del self.schedules[job_id]
            changes["removed"].append(job_id)
            with contextlib.suppress(KeyError):
                SCHEDULER_NEXT_FIRE.remove(str(job_id))
        for job_id, expr in sorted(schedules.items()):
            if self.schedules.get(job_id) == expr:
                continue
            try:
                trig = cron_trigger(expr, self.timezone)
            except Exception as e:  # noqa: BLE001 - one bad row must not stop the others
                log.error("schedule_invalid", job_id=job_id, cron=expr, error=str(e))
                continue
            kind = "changed" if job_id in self.schedules else "added"
            self.scheduler.add_job(_never_called, trig, id=str(job_id), name=f"job {job_id}", executor="fire",
                                   replace_existing=True, coalesce=False, max_instances=1,
                                   misfire_grace_time=None)
            self.schedules[job_id] = expr
            changes[kind].append(job_id)
        self.update_metrics()
        return changes

    def next_fire_times(self) -> dict[int, datetime | None]:
        out: dict[int, datetime | None] = {}
        for job_id in self.schedules:
            j = self.scheduler.get_job(str(job_id))
            out[job_id] = getattr(j, "next_run_time", None) if j is not None else None
        return out

    def update_metrics(self) -> None:
        for job_id, t in self.next_fire_times().items():
            if t is not None:
                SCHEDULER_NEXT_FIRE.labels(str(job_id)).set(t.timestamp())


def _never_called() -> None:  # pragma: no cover - FireExecutor never calls job functions
    raise AssertionError("scheduled jobs are dispatched by FireExecutor")


# -- the service ----------------------------------------------------------------------------------

@dataclass
class Fire:
    job_id: int
    scheduled_for: datetime
    kind: str
    row_id: int | None = None


@dataclass
class BatchOutcome:
    fires: list[Fire]
    orchestration_id: str | None
    outcomes: dict[int, tuple[str, int | None, str | None]] = field(default_factory=dict)


RunBatch = Callable[[list[Fire]], BatchOutcome]


class SchedulerService:
    """APScheduler + fire log + dispatcher thread running one orchestration at a time."""

    def __init__(self, settings: Settings | None = None, orch: OrchestratorSettings | None = None,
                 scheduler_factory: Callable[..., BaseScheduler] = BackgroundScheduler,
                 run_batch: RunBatch | None = None, now: Callable[[], datetime] = lambda: datetime.now(UTC),
                 evaluate_alerts: bool = True):
        self.s = settings or get_settings()
        self.o = orch or get_orchestrator_settings()
        self.now = now
        self.executor = FireExecutor(self.on_fire, self.on_missed, self.o.scheduler_misfire_grace_seconds, now)
        self.scheduler = scheduler_factory(timezone=self.o.scheduler_timezone,
                                           executors={"fire": self.executor})
        self.book = ScheduleBook(self.scheduler, self.o.scheduler_timezone)
        self.queue: queue.Queue[Fire] = queue.Queue()
        self.run_batch = run_batch or self._run_batch
        self.evaluate_alerts = evaluate_alerts
        self.stopping = threading.Event()
        self.cancel_now = threading.Event()
        self._runner: Any = None
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="scheduler-dispatch", daemon=True)
        self.busy = threading.Event()

    # -- database ------------------------------------------------------------------------------
    def _conn(self) -> Any:
        from common.db import connect

        return connect(self.s, autocommit=True, application_name="trialsync-scheduler")

    def load_schedules(self) -> tuple[dict[int, str], dict[int, datetime]]:
        """Active jobs' schedules, and per job the catch-up reference time (the latest fire that
        was not interrupted)."""
        with self._conn() as conn:
            rows = conn.execute(
                """SELECT j.id, j.schedule, greatest(j.schedule_updated_at, f.last_fire)
                     FROM etl.dw_etl_jobs j
                     LEFT JOIN (SELECT job_id, max(scheduled_for) AS last_fire FROM etl.dw_scheduler_fires
                                 WHERE outcome NOT IN ('cancelled', 'abandoned')
                                 GROUP BY job_id) f ON f.job_id = j.id
                    WHERE j.schedule IS NOT NULL AND j.is_active AND j.is_valid""").fetchall()
        return ({int(r[0]): str(r[1]) for r in rows}, {int(r[0]): r[2] for r in rows if r[2] is not None})

    def record_fire(self, fire: Fire, outcome: str = "running", detail: str | None = None) -> int | None:
        from orchestrator.store import HOST

        try:
            with self._conn() as conn:
                row = conn.execute(
                    """INSERT INTO etl.dw_scheduler_fires (job_id, scheduled_for, kind, outcome, host, pid, detail,
                                                           finished_at)
                       VALUES (%s, %s, %s, %s, %s, %s, %s,
                               CASE WHEN %s = 'running' THEN NULL ELSE now() END) RETURNING id""",
                    (fire.job_id, fire.scheduled_for, fire.kind, outcome, HOST, os.getpid(), detail,
                     outcome)).fetchone()
            return int(row[0]) if row else None
        except Exception as e:  # noqa: BLE001 - the log row is bookkeeping; the run still happens
            log.error("fire_not_recorded", job_id=fire.job_id, error=str(e).splitlines()[0] if str(e) else "")
            return None

    def finish_fire(self, fire: Fire, outcome: str, run_id: int | None, orchestration_id: str | None,
                    detail: str | None) -> None:
        if fire.row_id is None:
            return
        try:
            with self._conn() as conn:
                conn.execute(
                    """UPDATE etl.dw_scheduler_fires SET outcome = %s, run_id = %s, orchestration_id = %s,
                              detail = %s, finished_at = now() WHERE id = %s""",
                    (outcome, run_id, orchestration_id, detail, fire.row_id))
        except Exception as e:  # noqa: BLE001
            log.error("fire_not_updated", job_id=fire.job_id, error=str(e).splitlines()[0] if str(e) else "")

    def close_abandoned_fires(self) -> list[int]:
        """Mark ``abandoned`` the ``running`` fires of scheduler processes on this host that are gone.

        Called at start-up, before the catch-up reference is read, so a fire that a killed
        scheduler left behind is caught up instead of counting as done. Only this host's processes
        can be checked (``kill(pid, 0)``); the fire's extraction died with its scheduler (the
        launcher's owner watch) and its advisory lock with the scheduler's database session.
        """
        from common.stack import pid_alive
        from orchestrator.store import HOST

        with self._conn() as conn:
            rows = conn.execute("""SELECT id, job_id, pid FROM etl.dw_scheduler_fires
                                    WHERE outcome = 'running' AND host = %s""", (HOST,)).fetchall()
            # no fire of this process exists yet: a row with our pid is a predecessor's (a container
            # restarted with the same pid)
            dead = [(i, j) for i, j, pid in rows if pid is None or pid == os.getpid() or not pid_alive(int(pid))]
            if not dead:
                return []
            conn.execute(
                """UPDATE etl.dw_scheduler_fires
                      SET outcome = 'abandoned', finished_at = now(),
                          detail = 'the scheduler process ' || coalesce(pid::text, '?') || ' on ' || host
                                   || ' stopped before this fire finished; a scheduler start within '
                                   || 'SCHEDULER_MISFIRE_GRACE_SECONDS of the fire time runs it again'
                    WHERE id = ANY(%s) AND outcome = 'running'""", ([i for i, _ in dead],))
        for _, job_id in dead:
            SCHEDULER_FIRES.labels(str(job_id), "abandoned").inc()
        log.warning("scheduler_fires_abandoned", fire_ids=[i for i, _ in dead],
                    detail="their scheduler process died; the catch-up policy runs them again")
        return [int(i) for i, _ in dead]

    # -- fire intake (APScheduler threads) -------------------------------------------------------
    def on_fire(self, job_id: int, scheduled_for: datetime, kind: str) -> None:
        if self.stopping.is_set():
            return
        log.info("schedule_fired", job_id=job_id, scheduled_for=scheduled_for.isoformat(), kind=kind)
        self.queue.put(Fire(job_id, scheduled_for.astimezone(UTC), kind))

    def on_missed(self, job_id: int, times: list[datetime]) -> None:
        times = sorted(times)
        detail = (f"{len(times)} fire time(s) from {times[0].isoformat()} to {times[-1].isoformat()} were missed by "
                  f"more than SCHEDULER_MISFIRE_GRACE_SECONDS={self.o.scheduler_misfire_grace_seconds}: skipped")
        log.warning("schedule_missed", job_id=job_id, missed=len(times), first=times[0].isoformat(),
                    last=times[-1].isoformat())
        SCHEDULER_FIRES.labels(str(job_id), "missed").inc(len(times))
        self.record_fire(Fire(job_id, times[-1], "missed"), outcome="missed", detail=detail)

    def catch_up(self, schedules: dict[int, str], refs: dict[int, datetime], now: datetime) -> None:
        """Apply the missed-run policy for the time no scheduler was running (at start-up)."""
        for job_id, expr in schedules.items():
            ref = refs.get(job_id)
            if ref is None:
                continue
            times = fire_times_between(expr, ref, now, self.o.scheduler_timezone)
            fire, old = split_missed(times, now, self.o.scheduler_misfire_grace_seconds)
            if old:
                self.on_missed(job_id, old)
            if fire is not None:
                self.on_fire(job_id, fire, "catch_up")

    def export_fanout_state(self) -> None:
        """The fan-out jobs' guard and budget standing, and the per-job counters at 0, as metrics
        from the start: a dashboard panel shows 0 rather than nothing before the first event."""
        from common.catalog import load_catalog
        from common.db import connect
        from common.metrics import INCREMENTAL_FALLBACK
        from producers.planner import export_fanout_state

        jobs = list(load_catalog(self.s))
        for job in jobs:
            INCREMENTAL_FALLBACK.labels(str(job.id))
        with connect(self.s, autocommit=True) as conn:
            export_fanout_state(conn, jobs)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self.close_abandoned_fires()
        except Exception as e:  # noqa: BLE001 - bookkeeping: scheduling goes on without it
            log.warning("abandoned_fire_check_failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        try:
            self.export_fanout_state()
        except Exception as e:  # noqa: BLE001 - metrics only: scheduling goes on without them
            log.warning("fanout_state_export_failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        schedules, refs = self.load_schedules()
        self.scheduler.start()
        changes = self.book.sync(schedules)
        log.info("scheduler_started", schedules=len(schedules), timezone=self.o.scheduler_timezone,
                 misfire_grace_s=self.o.scheduler_misfire_grace_seconds, added=changes["added"])
        self.catch_up(schedules, refs, self.now())
        self._dispatcher.start()

    def refresh(self) -> None:
        schedules, _ = self.load_schedules()
        changes = self.book.sync(schedules)
        if any(changes.values()):
            log.info("schedules_changed", **changes)

    def run_forever(self, shutdown_grace: float = 60.0) -> None:
        """The service's main loop: refresh schedules and alerts until SIGTERM/SIGINT."""
        def _signal(signum: int, frame: Any) -> None:
            if self.stopping.is_set():
                self.cancel_now.set()
                if self._runner is not None:
                    self._runner.cancel("scheduler stopped (second signal)")
            self.stopping.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        while not self.stopping.wait(self.o.scheduler_refresh_seconds):
            try:
                self.refresh()
            except Exception as e:  # noqa: BLE001 - the database may be restarting; try again later
                log.warning("schedule_refresh_failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            if self.evaluate_alerts and not self.busy.is_set():
                self._alerts()
        self.shutdown(shutdown_grace)

    def shutdown(self, grace: float = 60.0) -> None:
        self.stopping.set()
        try:
            self.scheduler.shutdown(wait=False)
        except Exception:  # noqa: BLE001 - not started
            pass
        deadline = time.monotonic() + grace
        while self.busy.is_set() and time.monotonic() < deadline and not self.cancel_now.is_set():
            time.sleep(0.2)
        if self.busy.is_set() and self._runner is not None:
            log.warning("scheduler_cancelling_running_jobs", grace_s=grace)
            self._runner.cancel("scheduler shut down")
        if self._dispatcher.is_alive():
            self._dispatcher.join(timeout=60)
        dropped = 0
        while True:
            try:
                self.queue.get_nowait()
                dropped += 1
            except queue.Empty:
                break
        log.info("scheduler_stopped", dropped_fires=dropped)

    # -- dispatch ------------------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                first = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.o.scheduler_coalesce_seconds
            while time.monotonic() < deadline:
                try:
                    batch.append(self.queue.get(timeout=max(0.01, deadline - time.monotonic())))
                except queue.Empty:
                    break
            if self.stopping.is_set():
                break
            self.busy.set()
            try:
                self.dispatch(batch)
            except Exception as e:  # noqa: BLE001 - one bad batch must not stop the service
                log.exception("fire_batch_failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            finally:
                self.busy.clear()
            if self.evaluate_alerts:
                self._alerts()
            self.book.update_metrics()

    def dispatch(self, batch: list[Fire]) -> BatchOutcome:
        # one fire per job: the latest scheduled time wins
        latest: dict[int, Fire] = {}
        for f in batch:
            if f.job_id not in latest or f.scheduled_for > latest[f.job_id].scheduled_for:
                latest[f.job_id] = f
        fires = list(latest.values())
        for f in fires:
            f.row_id = self.record_fire(f)
        out = self.run_batch(fires)
        for f in fires:
            outcome, run_id, detail = out.outcomes.get(f.job_id, ("error", None, "no result"))
            self.finish_fire(f, outcome, run_id, out.orchestration_id, detail)
            SCHEDULER_FIRES.labels(str(f.job_id), outcome).inc()
            log.info("fire_finished", job_id=f.job_id, scheduled_for=f.scheduled_for.isoformat(), outcome=outcome,
                     run_id=run_id, orchestration_id=out.orchestration_id)
        return out

    def _run_batch(self, fires: list[Fire]) -> BatchOutcome:
        """Run the fired jobs with their ancestors through the orchestrator's runner."""
        from common.catalog import load_catalog
        from orchestrator.dag import build_plan
        from orchestrator.runner import RunnerOptions, run_plan

        catalog = load_catalog(self.s)
        outcome = BatchOutcome(fires, None)
        runnable = []
        for f in fires:
            job = catalog.jobs.get(f.job_id)
            if job is None or not job.runnable:
                outcome.outcomes[f.job_id] = ("skipped", None, "job is not active and valid in the catalog")
            else:
                runnable.append(f.job_id)
        if not runnable:
            return outcome
        ids = [j for j in catalog.with_ancestors(runnable) if catalog.get(j).runnable]
        plan = build_plan(catalog, ids)
        since = min(f.scheduled_for for f in fires if f.job_id in runnable).timestamp()
        options = RunnerOptions.from_settings(self.s, self.o, trigger="scheduler", reuse_since=since)

        def hook(r: Any) -> None:
            self._runner = r
            outcome.orchestration_id = r.oid

        try:
            result = run_plan(plan, options=options, runner_hook=hook, settings=self.s,
                              selection={"scheduled": runnable, "with_ancestors": ids})
        finally:
            self._runner = None
        for j in runnable:
            st = result.jobs[j]
            status = st.status or "error"
            if st.reused_run_id is not None:
                status = "reused"
            outcome.outcomes[j] = (status, st.run_ids[-1] if st.run_ids else None, st.reason or st.error)
        return outcome

    def _alerts(self) -> None:
        try:
            from orchestrator.alerts import evaluate_and_notify

            evaluate_and_notify(self.s)
        except Exception as e:  # noqa: BLE001 - alerting must never stop scheduling
            log.warning("alert_evaluation_failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)


def serve(metrics_port: int | None = None, shutdown_grace: float = 60.0) -> None:
    """Entry point of ``trialsync scheduler``."""
    from common.db import connect
    from common.metrics import start_metrics_server

    s = get_settings()

    def db_ready() -> tuple[bool, str]:
        with connect(s, autocommit=True, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True, "ok"

    server = None
    try:
        server = start_metrics_server("scheduler", metrics_port, {"database": db_ready})
    except OSError as e:
        log.warning("metrics_port_unavailable", error=str(e))
    try:
        SchedulerService(s).run_forever(shutdown_grace)
    finally:
        if server is not None:
            server.stop()
