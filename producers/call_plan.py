"""What a night costs in API calls, and the budget it is allowed to spend.

A real Clinical Conductor answers tens of requests per second, so a night has a call budget: the
operator's ``ETL_CALL_BUDGET``, or the window (``ETL_NIGHT_WINDOW_HOURS``) times the instance's
rate limit (``CC_RATE_LIMIT_RPS``). Two parts:

* :func:`estimate` -- per job, the calls a full run and an incremental run would make *now*, from
  the Bronze row counts, the job's own history (calls per parent, last incremental run) and the
  same parent selection a run would make (``producers.planner.SelectionRule``, counted in SQL,
  nothing transferred). ``trialsync run --all --dry-run`` prints it with the time at the rate.
* :class:`LedgerBudget` -- the budget of one orchestration, in ``etl.dw_call_budgets``. Every
  fan-out run claims its share when it has selected its parents: its *changed* parents first (as
  long as the budget lasts), then sweep, unfinished first-pass and other parents -- but only from
  what is left after the changed parents of the jobs still to run (their estimates, ``planned``).
  So a night spends calls on changed parents across all jobs before any sweep or first load; the
  rest waits for the next night, recorded in the run (``run_context.fanout.budget``). A run gives
  back what it did not use when it ends.

Plain jobs (one stream, paged) are never cut: their incremental runs are a few pages; their calls
are counted against the budget when they end.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg

from common.config import Settings
from common.db import staging_table
from common.logging import get_logger
from producers.planner import FanoutHistory, SelectionRule, fanout_policy
from schemas.jobs import Job

log = get_logger("call_plan")


@dataclass
class CallEstimate:
    """One job's calls, now."""

    job_id: int
    name: str
    #: plain | fan-out | list
    kind: str
    full: int
    incremental: int
    parents: int | None = None
    calls_per_parent: float | None = None
    #: fan-out incremental calls by why the parents are due (changed, swept, unfinished, rest)
    by_reason: dict[str, int] = field(default_factory=dict)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _rows(conn: psycopg.Connection, table: str) -> int:
    try:
        row = conn.execute(psycopg.sql.SQL("SELECT count(*) FROM {} WHERE NOT is_deleted").format(
            staging_table(table))).fetchone()
    except psycopg.errors.UndefinedTable:  # (an autocommit connection: nothing to roll back)
        return 0
    return int(row[0]) if row else 0


def _last_incremental_calls(conn: psycopg.Connection, job_id: int) -> int | None:
    row = conn.execute("""SELECT api_calls FROM etl.dw_etl_runs WHERE job_id = %s AND mode = 'incremental'
                          AND run_status IN ('success', 'partial') ORDER BY id DESC LIMIT 1""", (job_id,)).fetchone()
    return int(row[0]) if row else None


def estimate(conn: psycopg.Connection, job: Job, settings: Settings) -> CallEstimate:
    """The calls a full and an incremental run of ``job`` would make now (module docstring)."""
    if job.source_type != "cc_api":
        return CallEstimate(job.id, job.name, "file", 0, 0, note="a file, not the API")
    if not job.requires_parameters or job.reads_list:
        rows = _rows(conn, job.target_table)
        pages = max(1, math.ceil(rows / job.page_size)) if job.fetch_paging == "odata" else 1
        last = _last_incremental_calls(conn, job.id)
        inc = pages if not job.supports_incremental else (last if last is not None else pages)
        kind = "list" if job.reads_list else "plain"
        note = "" if job.supports_incremental else "no $filter: every run reads everything"
        return CallEstimate(job.id, job.name, kind, pages, inc, note=note)
    h = FanoutHistory.load(conn, job.id)
    rule = SelectionRule.of(job, settings, h)
    try:
        sel = rule.select(conn, job, count_only=True)
    except Exception as e:  # noqa: BLE001 - a parent table not created yet: nothing to ask
        return CallEstimate(job.id, job.name, "fan-out", 0, 0, parents=0, note=str(e).splitlines()[0])
    cpp = h.calls_per_parent
    by_reason = {k: round(v * cpp) for k, v in sel.counts.items()}
    policy = fanout_policy(job, settings)
    note = f"{policy} policy" + (f", assumption {h.assumption}" if policy != "all" else "") + \
        ("" if h.first_pass_done else ", first pass not done")
    return CallEstimate(job.id, job.name, "fan-out", round(sel.parent_rows * cpp), sum(by_reason.values()),
                        parents=sel.parent_rows, calls_per_parent=round(cpp, 3), by_reason=by_reason, note=note)


def estimate_all(conn: psycopg.Connection, jobs: list[Job], settings: Settings) -> list[CallEstimate]:
    return [estimate(conn, j, settings) for j in jobs]


def allocate(estimates: list[CallEstimate], budget: int | None) -> dict[int, dict[str, int]]:
    """What a night with ``budget`` calls would give each job if it ran now, in the order runs
    claim (changed parents of every job first, then the rest in job order): job id -> {granted,
    left}. For the plan display; a real night claims as it goes (:class:`LedgerBudget`)."""
    out: dict[int, dict[str, int]] = {e.job_id: {"granted": 0, "left": 0} for e in estimates}
    free = budget if budget is not None else math.inf
    for e in estimates:  # changed parents and plain jobs first
        need = e.by_reason.get("changed", 0) if e.kind == "fan-out" else e.incremental
        take = int(min(need, free))
        out[e.job_id]["granted"] += take
        out[e.job_id]["left"] += need - take
        free -= take
    for e in estimates:
        if e.kind != "fan-out":
            continue
        need = e.incremental - e.by_reason.get("changed", 0)
        take = int(min(need, free))
        out[e.job_id]["granted"] += take
        out[e.job_id]["left"] += need - take
        free -= take
    return out


# -- the budget of one night ------------------------------------------------------------------------

def open_night(conn: psycopg.Connection, orchestration_id: str, budget: int, estimates: list[CallEstimate]) -> None:
    """Create the orchestration's budget row with every job's expected changed-parent calls."""
    planned = {str(e.job_id): (e.by_reason.get("changed", 0) if e.kind == "fan-out" else e.incremental)
               for e in estimates}
    conn.execute("""INSERT INTO etl.dw_call_budgets (orchestration_id, budget, planned)
                    VALUES (%s, %s, %s::jsonb) ON CONFLICT (orchestration_id) DO NOTHING""",
                 (uuid.UUID(orchestration_id), budget, orjson.dumps(planned).decode()))
    log.info("call_budget_opened", orchestration_id=orchestration_id, budget=budget,
             planned_changed_calls=sum(planned.values()))


class LedgerBudget:
    """A run's claim on its orchestration's budget (``etl.dw_call_budgets``)."""

    def __init__(self, conn: psycopg.Connection, orchestration_id: str):
        self.conn = conn
        self.oid = uuid.UUID(orchestration_id)
        self.granted = 0
        self.claimed = False

    @classmethod
    def of(cls, conn: psycopg.Connection, orchestration_id: str | None) -> LedgerBudget | None:
        """The orchestration's budget, or None when it has none."""
        if not orchestration_id:
            return None
        try:
            oid = uuid.UUID(orchestration_id)
        except ValueError:
            return None
        row = conn.execute("SELECT 1 FROM etl.dw_call_budgets WHERE orchestration_id = %s", (oid,)).fetchone()
        return cls(conn, orchestration_id) if row else None

    def claim(self, job: Job, *, changed: float, others: float) -> int | None:
        """Calls this run may make: its changed parents' as far as the budget lasts, then the others'
        from what the jobs still to run do not need for their changed parents."""
        key = str(job.id)
        with self.conn.transaction():
            row = self.conn.execute("""SELECT budget, reserved, planned FROM etl.dw_call_budgets
                                       WHERE orchestration_id = %s FOR UPDATE""", (self.oid,)).fetchone()
            assert row is not None
            budget, reserved, planned = int(row[0]), int(row[1]), dict(row[2] or {})
            planned.pop(key, None)
            free = max(0, budget - reserved)
            for_changed = int(min(math.ceil(changed), free))
            keep = sum(int(v) for v in planned.values())  # the other jobs' changed parents come first
            for_others = int(min(math.ceil(others), max(0, free - for_changed - keep)))
            self.granted = for_changed + for_others
            self.conn.execute("""UPDATE etl.dw_call_budgets SET reserved = reserved + %s, planned = %s::jsonb,
                                    updated_at = now() WHERE orchestration_id = %s""",
                              (self.granted, orjson.dumps(planned).decode(), self.oid))
        self.claimed = True
        log.info("call_budget_claimed", job_id=job.id, changed_calls=math.ceil(changed), other_calls=math.ceil(others),
                 granted=self.granted, budget_left=free - self.granted)
        return self.granted

    def settle(self, job: Job, used: int, left: dict[str, int] | None = None) -> None:
        """The run ended having made ``used`` calls: the budget keeps those, gets the rest back."""
        key = str(job.id)
        claim = {"granted": self.granted, "used": used, "left": left or {}}
        self.conn.execute(
            """UPDATE etl.dw_call_budgets SET reserved = greatest(0, reserved - %s + %s),
                      planned = planned - %s::text, claims = claims || jsonb_build_object(%s::text, %s::jsonb),
                      updated_at = now()
               WHERE orchestration_id = %s""",
            (self.granted, used, key, key, orjson.dumps(claim).decode(), self.oid))
