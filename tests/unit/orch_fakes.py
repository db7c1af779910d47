"""Fakes for the orchestrator's unit tests: a virtual clock, scripted extraction attempts and an
in-memory run store that records when each run started, ended and was loaded."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from orchestrator.launcher import LaunchRequest
from orchestrator.store import RunRow
from schemas.jobs import Job, JobCatalog
from schemas.runs import RunResult


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.t

    def wait(self, objs: list[Any], timeout: float) -> list[Any]:
        self.t += max(timeout, 0.05)
        return []


@dataclass
class Script:
    """What one attempt does: run for ``duration`` then end with ``status`` (or hang / die)."""

    status: str = "success"
    duration: float = 1.0
    records: int = 10
    hang: bool = False
    die: bool = False
    error_class: str | None = None
    error: str | None = None
    failed_parents: list[dict[str, Any]] = field(default_factory=list)
    load_delay: float = 2.0


class FakeHandle:
    def __init__(self, world: FakeWorld, request: LaunchRequest, script: Script, run_id: int):
        self.world = world
        self.request = request
        self.script = script
        self.job_id = request.job.id
        self.pid = 10000 + run_id
        self.run_id = run_id
        self.ends_at = world.clock.t + script.duration
        self.killed = False
        self.sent = False

    def _ended(self) -> bool:
        return self.killed or (not self.script.hang and self.world.clock.t >= self.ends_at)

    def poll(self) -> list[tuple[str, Any]]:
        if self.sent or not self._ended() or self.killed or self.script.die:
            return []
        self.sent = True
        self.world.finish(self)
        s = self.script
        return [("result", RunResult(job_id=self.job_id, run_id=self.run_id, status=s.status,
                                     records_extracted=s.records, records_published=s.records, api_calls=1,
                                     error=s.error, error_class=s.error_class, failed_parents=s.failed_parents))]

    def is_alive(self) -> bool:
        return not self._ended()

    def exitcode(self) -> int | None:
        return None if self.is_alive() else (-9 if self.killed else (3 if self.script.die else 0))

    def terminate(self) -> None:
        """A clean stop: a hanging script ignores it (the runner then kills), others end now."""
        if not self.script.hang:
            self.ends_at = min(self.ends_at, self.world.clock.t)
            self.script = Script(**{**self.script.__dict__, "status": "failed", "error": "stopped by the orchestrator",
                                    "error_class": "Interrupted"})

    def kill(self) -> None:
        self.killed = True
        self.world.killed.append((self.job_id, self.request.attempt, self.world.clock.t))

    def join(self, timeout: float | None = None) -> None:
        return

    def wait_objects(self) -> list[Any]:
        return []


class FakeWorld:
    """Launcher + store in one: scripted attempts, run rows, loads, locks."""

    def __init__(self, clock: FakeClock, scripts: dict[tuple[int, int], Script] | None = None,
                 default: Script | None = None, locked_elsewhere: set[int] | None = None):
        self.clock = clock
        self.scripts = scripts or {}
        self.default = default or Script()
        self.locked_elsewhere = locked_elsewhere or set()
        self.ids = itertools.count(1)
        self.runs: dict[int, dict[str, Any]] = {}
        self.launches: list[LaunchRequest] = []
        self.started: dict[int, list[float]] = {}
        self.killed: list[tuple[int, int, float]] = []
        self.skipped: dict[int, str] = {}
        self.locks: set[int] = set()
        self.max_running = 0
        self.running: set[int] = set()
        self.orchestration: dict[str, Any] = {}
        #: job id -> (run id, status) another process ran (see recent_run)
        self.foreign_runs: dict[int, tuple[int, str]] = {}
        #: ordering inputs: API calls of previous runs, rows of parameter source tables
        self.history: dict[int, float] = {}
        self.table_rows: dict[str, int] = {}
        #: job id -> virtual time at which the other process releases its lock
        self.release_at: dict[int, float] = {}

    # launcher
    def start(self, request: LaunchRequest) -> FakeHandle:
        script = self.scripts.get((request.job.id, request.attempt), self.default)
        run_id = next(self.ids)
        self.launches.append(request)
        self.started.setdefault(request.job.id, []).append(self.clock.t)
        self.runs[run_id] = {"job_id": request.job.id, "attempt": request.attempt, "status": "running",
                             "started": self.clock.t, "ended": None, "loaded_at": None, "script": script,
                             "only_parents": request.only_parents, "parent_run_id": request.parent_run_id}
        self.running.add(request.job.id)
        self.max_running = max(self.max_running, len(self.running))
        return FakeHandle(self, request, script, run_id)

    def finish(self, h: FakeHandle) -> None:
        r = self.runs[h.run_id]
        r["status"], r["ended"] = h.script.status, self.clock.t
        r["loaded_at"] = self.clock.t + h.script.load_delay
        self.running.discard(h.job_id)

    def close(self) -> None:
        return

    # store
    def begin_orchestration(self, oid: str, trigger: str, selection: dict[str, Any], mode: str, jobs_total: int) -> None:
        self.orchestration = {"id": oid, "trigger": trigger, "jobs_total": jobs_total}

    def open_budget(self, oid: str, budget: int, jobs: list[Job]) -> None:
        self.orchestration["budget"] = (budget, [j.id for j in jobs])

    def finish_orchestration(self, oid: str, status: str, counts: dict[str, int], error: str | None = None) -> None:
        self.orchestration.update(status=status, counts=counts, error=error)

    def record_skipped(self, job_id: int, oid: str, trigger: str, reason: str) -> int:
        rid = next(self.ids)
        self.skipped[job_id] = reason
        self.runs[rid] = {"job_id": job_id, "status": "skipped", "reason": reason}
        return rid

    def mark_failed(self, job_id: int, oid: str, attempt: int, trigger: str, error_class: str, message: str,
                    parent_run_id: int | None = None, status: str = "failed") -> int:
        for rid, r in self.runs.items():
            if r["job_id"] == job_id and r.get("attempt") == attempt and r["status"] == "running":
                r.update(status=status, error_class=error_class, error=message, ended=self.clock.t)
                self.running.discard(job_id)
                return rid
        rid = next(self.ids)
        self.runs[rid] = {"job_id": job_id, "attempt": attempt, "status": status, "error_class": error_class,
                          "error": message}
        return rid

    def mark_cancelled(self, run_id: int, reason: str) -> None:
        self.runs[run_id].update(status="cancelled", error=reason)

    def try_lock(self, job_id: int) -> bool:
        if job_id in self.release_at and self.clock.t >= self.release_at[job_id]:
            self.locked_elsewhere.discard(job_id)
        if job_id in self.locked_elsewhere or job_id in self.locks:
            return False
        self.locks.add(job_id)
        return True

    def unlock(self, job_id: int) -> None:
        self.locks.discard(job_id)

    def loaded(self, run_ids: list[int]) -> dict[int, bool]:
        out = {}
        for r in run_ids:
            la = self.runs[r].get("loaded_at")
            out[r] = la is not None and self.clock.t >= la
        return out

    def run_rows(self, run_ids: list[int]) -> dict[int, RunRow]:
        out = {}
        for r in run_ids:
            row = self.runs[r]
            n = row["script"].records if "script" in row and row["status"] in ("success", "partial") else 0
            loaded = n if row.get("loaded_at") is not None and self.clock.t >= row["loaded_at"] else 0
            out[r] = RunRow(r, row["job_id"], row["status"], n, n, loaded)
        return out

    def last_costs(self, job_ids: list[int]) -> dict[int, float]:
        return dict(self.history)

    def count_rows(self, table: str) -> int:
        return self.table_rows.get(table, 0)

    def recent_run(self, job_id: int, since: float, exclude_orchestration: str) -> tuple[int, str] | None:
        found = self.foreign_runs.get(job_id)
        if found and found[0] not in self.runs:
            self.runs[found[0]] = {"job_id": job_id, "status": found[1], "loaded_at": self.clock.t + 1,
                                   "script": Script(records=5)}
        return found

    # assertions helpers
    def load_time(self, job_id: int) -> float:
        """When the job's last data run became loaded."""
        times = [r["loaded_at"] for r in self.runs.values()
                 if r["job_id"] == job_id and r["status"] in ("success", "partial") and r.get("loaded_at") is not None]
        return max(times)


def job(id: int, name: str, table: str, *, parent_table: str | None = None, depends_on: tuple[int, ...] = (),
        priority: int = 5, timeout: int | None = None, category: str = "core") -> Job:
    if parent_table:
        return Job(id=id, name=name, endpoint=f"/api/v1/things/{{thingId}}/{name.lower()}/odata", target_table=table,
                   requires_parameters=True, parameter_source_table=parent_table, parameters={"thingId": "id"},
                   depends_on=depends_on, priority=priority, timeout_seconds=timeout, category=category)
    return Job(id=id, name=name, endpoint=f"/api/v1/{name.lower()}/odata", target_table=table,
               depends_on=depends_on, priority=priority, timeout_seconds=timeout, category=category)


def small_catalog() -> JobCatalog:
    """studies(1) -> subjects(2) -> visits(3); studies -> docs(4); independent sites(5)."""
    return JobCatalog([
        job(1, "Studies", "dim_studies_staging", priority=1),
        job(2, "Subjects", "dim_subjects_staging", parent_table="dim_studies_staging"),
        job(3, "Visits", "dim_visits_staging", parent_table="dim_subjects_staging"),
        job(4, "Docs", "dim_docs_staging", parent_table="dim_studies_staging", category="study"),
        job(5, "Sites", "dim_sites_staging"),
    ])
