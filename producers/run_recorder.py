"""The end of a run, in the order the delivery contract needs (steps 7-10 of ``producers.extractor``).

Everything here runs after the records are published and acknowledged, so it is worth waiting for
through a database restart or failover: a run whose end offsets are not recorded can never be seen
as loaded (its children would wait for ``ETL_LOAD_TIMEOUT_SECONDS``, then be skipped). Each step
reconnects and retries for up to :data:`FINISH_DB_WAIT_SECONDS`; a step that still cannot be
recorded turns the run ``failed`` so the orchestrator retries it, and never lets a watermark move
past a run the warehouse knows nothing of.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from common import kafka as K
from common.config import Settings
from common.db import DatabaseError, connect
from common.logging import scrub
from common.metrics import JOB_DURATION, JOB_LAST_SUCCESS, JOB_RUNS, RUNS_IN_PROGRESS
from producers import runs as runs_mod
from producers import watermarks as wm_mod
from producers.fetch_driver import FetchDriver, describe, error_dict
from producers.planner import RunPlan
from producers.publisher import DeliveryTracker, Publisher, PublishError
from schemas.jobs import Job
from schemas.messages import RunFinished, RunStarted
from schemas.runs import RunResult

#: how long the end of a run waits for the database (records are already published: recording the
#: run, its end offsets and watermarks is worth waiting for through a restart or failover)
FINISH_DB_WAIT_SECONDS = 120.0
#: at most this many failed-parent error details are kept in run_context (the parameter dicts
#: themselves are always kept in full: `trialsync retry` needs every one)
MAX_ERROR_DETAILS = 200
_DB_DOWN = (psycopg.OperationalError, psycopg.InterfaceError, DatabaseError)


@dataclass
class RunFacts:
    """What the run was asked to do (recorded in ``run_context``)."""

    mode: str
    only_parents: list[dict[str, Any]] | None
    limit: int | None
    processes: int


def publish_control(publisher: Publisher, settings: Settings, msg: RunStarted | RunFinished) -> None:
    """One message on the control topic, acknowledged within 60 s."""
    if publisher.fatal is not None:  # do not wait another 60 s on a producer known to be dead
        raise PublishError(f"control message {msg.type} not sent: the producer is unusable ({publisher.fatal})")
    topic = K.control_topic(settings)
    tr = DeliveryTracker(topic)
    publisher.publish_values(topic, [(str(msg.run_id).encode(), msg.to_bytes())], None, tr)
    publisher.wait(tr, timeout=60)
    if tr.failed:
        raise PublishError(f"control message {msg.type} not acknowledged: {tr.first_error}")


class RunRecorder:
    """Owns the end-of-run bookkeeping of one run."""

    def __init__(self, job: Job, settings: Settings, run_id: int, topic: str, log: Any):
        self.job, self.s, self.run_id, self.topic, self.log = job, settings, run_id, topic, log

    def finish(self, conn: psycopg.Connection, publisher: Publisher | None, *, status: str, error: str | None,
               error_class: str | None, driver: FetchDriver, plan: RunPlan | None, tracker: DeliveryTracker,
               facts: RunFacts, warnings: list[str], counters: dict[str, Any], duration: Callable[[], float],
               fetch_seconds: float) -> RunResult:
        """Steps 7-10 of the delivery contract; returns the run's result (its status may turn
        ``failed`` here when the database cannot record it)."""
        job, pages = self.job, driver.pages
        snap = tracker.snapshot()
        failed_parents = driver.failed_parents()
        new_wm = driver.new_watermarks(status, tracker) if error is None or status in ("success", "partial") else {}
        cap = wm_mod.parse_timestamp(plan.resume.get("cap")) if plan is not None and plan.resume else None
        if cap is not None:
            # a resumed run read its early pages in an earlier attempt: a record changed since then
            # must stay newer than the watermark, so it may not pass what that attempt saw
            new_wm = {pk: min(v, cap) for pk, v in new_wm.items()}
        wm_to = max(new_wm.values()) if new_wm else None
        fallback = self._timestamp_fallback(driver, status)
        if fallback:
            warnings.append(fallback)
        wm_from = plan.watermark_from if plan is not None else None
        context: dict[str, Any] = {
            "topic": self.topic,
            "end_offsets": {str(p): o for p, o in sorted(snap["last_offset"].items())},
            "records_per_partition": {str(p): n for p, n in sorted(snap["per_partition"].items())},
            "failed_parents": failed_parents,
            "failed_parent_errors": [
                {"params": driver.streams[i].params, **error_dict(e)}
                for i, e in sorted(driver.failed.items())[:MAX_ERROR_DETAILS] if i < len(driver.streams)
            ],
            "parents_not_attempted": driver.not_attempted(status),
            "records_missing_key": pages.records_missing_key,
            "records_repeated_in_page": pages.records_repeated,
            "fetch_seconds": round(fetch_seconds, 3),
            "pages": pages.pages,
            "retries": driver.retries,
            "processes": facts.processes,
            "warnings": warnings,
            "watermarks_committed": len(new_wm),
        }
        if job.requires_parameters and facts.only_parents is None and facts.limit is None and plan is not None:
            if plan.parents_as_of is not None:
                # the next `changed`-policy run starts from here if this one succeeds
                context["parents_as_of"] = plan.parents_as_of.isoformat()
                if plan.parents_ts_as_of is not None:
                    context["parents_ts_as_of"] = plan.parents_ts_as_of.isoformat()
            if plan.fanout:
                context["fanout"] = self._fanout_outcome(conn, plan, driver, tracker, status)
        if pages.records_missing_parent:
            context["records_missing_parent"] = pages.records_missing_parent
        if counters.get("resume"):
            context["resume"] = counters["resume"]
        if plan is not None and plan.resume:
            context["resumed_from"] = plan.resume["from_run"]
        deadline = time.monotonic() + FINISH_DB_WAIT_SECONDS
        db = _Db(self.s, conn)
        # -- 7. counters, end offsets, failed parents and the watermark range, still `running` --------
        recorded = True
        try:
            db.call("record_results", lambda c: runs_mod.record_results(c, self.run_id, counters, context, wm_from,
                                                                        wm_to), deadline, self.log)
        except Exception as e:  # noqa: BLE001
            recorded = False
            self.log.error("record_results_failed", error=describe(e))
            if status != "failed":
                status, error_class = "failed", "DatabaseError"
                error = f"the run's results could not be recorded in the database: {describe(e)}"
            new_wm = {}  # never advance watermarks past a run the warehouse knows nothing of
        # -- 8. watermarks of the completed streams (topic, then etl.dw_etl_watermarks) ---------------
        if new_wm and publisher is not None:
            try:
                db.call("watermarks", lambda c: wm_mod.commit(
                    c, publisher, job_id=job.id, field=job.timestamp_field, run_id=self.run_id, values=new_wm,
                    previous=plan.previous_watermarks if plan is not None else {}), deadline, self.log)
            except Exception as e:  # noqa: BLE001 - stale watermarks only cost a larger next run
                self.log.error("watermark_commit_failed", error=describe(e))
                warnings.append(f"watermarks not saved: {describe(e)}")
        # -- 9. run_finished with per-partition end offsets ----------------------------------------------
        if publisher is not None:
            try:
                publish_control(publisher, self.s, RunFinished(
                    run_id=self.run_id, job_id=job.id, target_table=job.target_table, topic=self.topic,
                    instance_id=self.s.cc_instance_id, status=status,  # type: ignore[arg-type]  # one of success/partial/failed here
                    records_published=snap["delivered"], records_per_partition=snap["per_partition"],
                    end_offsets=snap["last_offset"], error=error, watermark=wm_to))
            except Exception as e:  # noqa: BLE001 - the DB row below still records the outcome
                self.log.error("run_finished_publish_failed", error=describe(e))
        # -- 10. the final status and the job's last_run_* ------------------------------------------------
        try:
            db.call("finish_run", lambda c: runs_mod.finish_run(c, self.run_id, job.id, status, error_class=error_class,
                                                                error_message=scrub(error) if error else None,
                                                                records=snap["delivered"]), deadline, self.log)
        except Exception as e:  # noqa: BLE001
            self.log.error("finish_run_failed", error=describe(e))
            if recorded and status != "failed":
                # the row stays 'running' (closed later as stale): report the run failed so it is retried
                status, error_class = "failed", "DatabaseError"
                error = f"the run's final status could not be recorded in the database: {describe(e)}"
        if db.conn is not conn:  # a replacement made above; the run closes its own
            db.close()
        seconds = duration()
        JOB_RUNS.labels(str(job.id), status).inc()
        JOB_DURATION.labels(str(job.id)).observe(seconds)
        RUNS_IN_PROGRESS.dec()
        if status == "success":
            JOB_LAST_SUCCESS.labels(str(job.id)).set(time.time())
        return RunResult(
            job_id=job.id, status=status, run_id=self.run_id, mode=facts.mode, topic=self.topic,
            records_extracted=pages.records, records_published=snap["delivered"],
            records_missing_key=pages.records_missing_key, api_calls=counters["api_calls"], pages=pages.pages,
            parents_total=counters["parents_total"], parents_done=counters["parents_done"],
            parents_failed=counters["parents_failed"], failed_parents=failed_parents,
            records_per_partition=snap["per_partition"], end_offsets=snap["last_offset"],
            watermark_from=wm_from, watermark_to=wm_to, error=scrub(error) if error else None,
            error_class=error_class, duration_s=round(seconds, 3), fetch_s=round(fetch_seconds, 3),
            warnings=warnings)


    def _timestamp_fallback(self, driver: FetchDriver, status: str) -> str | None:
        """A job whose records carry no timestamp field keeps no watermark: every incremental run
        reads everything. Say so (warning, metric) instead of re-reading silently night after night."""
        from common.metrics import INCREMENTAL_FALLBACK

        pages = driver.pages
        if not pages.track_timestamps or not pages.records or pages.records_without_timestamp < pages.records \
                or status == "failed":
            return None
        INCREMENTAL_FALLBACK.labels(str(self.job.id)).inc()
        text = (f"none of the {pages.records} records carries `{self.job.timestamp_field}`: no watermark can be kept, "
                f"so every incremental run of job {self.job.id} reads everything (falls back to full) -- set the "
                f"job's `timestamp_field` in config/jobs.yaml to a field its records have, or `incremental: false`")
        if self.job.asks_per_parent:
            text += (" -- under the `changed` fan-out policy it still asks only changed parents and a sweep slice: "
                     "its records are compared with staging by content to check that CC moves the parent when "
                     "a child changes (docs/extraction.md)")
        self.log.warning("incremental_fallback_to_full", field=self.job.timestamp_field, records=pages.records,
                         detail=text)
        return text

    def _sibling_evidence(self, conn: psycopg.Connection) -> int | None:
        """Another fan-out job on the same parent table whose latest run holds the assumption on its
        own announced changes (its id), else None."""
        from common.catalog import load_catalog

        table = self.job.parameter_source_table
        siblings = [j.id for j in load_catalog(self.s)
                    if j.id != self.job.id and j.asks_per_parent and j.parameter_source_table == table]
        if not siblings:
            return None
        row = conn.execute(
            """SELECT job_id FROM (
                 SELECT DISTINCT ON (job_id) job_id, run_context->'fanout' AS f FROM etl.dw_etl_runs
                  WHERE job_id = ANY(%s) AND run_context->'fanout' ? 'assumption_after'
                  ORDER BY job_id, id DESC) latest
                WHERE f->>'assumption_after' = 'holds' AND f->>'assumption_evidence' = 'announced'
                ORDER BY job_id LIMIT 1""", (siblings,)).fetchone()
        return int(row[0]) if row else None

    def _fanout_outcome(self, conn: psycopg.Connection, plan: RunPlan, driver: FetchDriver,
                        tracker: DeliveryTracker, status: str) -> dict[str, Any]:
        """The run's fan-out record, completed with what happened: how far the first pass got, the
        changes found under parents marked changed and not, and what that shows of the assumption
        the `changed` policy relies on (``assumption_after``)."""
        from common.metrics import CALLS_BUDGET_LEFT, FANOUT_GUARD, FANOUT_UNANNOUNCED

        fan = dict(plan.fanout)
        job_id = str(self.job.id)
        if "first_pass" in fan and not fan["first_pass"]["done"]:
            start, end = plan.first_pass
            attempted = driver.ok | set(driver.failed)
            reached = 0
            if not tracker.failed:  # records not acknowledged: the pass has not reached them
                while start + reached < end and start + reached in attempted:
                    reached += 1
            vals = plan.first_pass_values
            left = fan.get("budget", {}).get("parents_left", {}).get("unfinished", 0)
            fan["first_pass"] = {"done": reached == len(vals) and left == 0,
                                 "after": list(vals[reached - 1]) if reached else fan["first_pass"]["after"]}
        pages = driver.pages
        seen = pages.changes
        fan["announced_changes"] = seen.announced
        fan["unannounced_changes"] = seen.missed
        if seen.missed_parents:
            fan["unannounced_parents"] = seen.missed_parents
        changed_policy = fan.get("policy") in ("changed", "assumed")
        if seen.missed and changed_policy:
            FANOUT_UNANNOUNCED.labels(job_id).inc(seen.missed)
            self.log.warning("fanout_unannounced_changes", changes=seen.missed,
                             parents=seen.missed_parents, note="changes under parents whose own timestamp did not "
                             "move: the job asks every parent until a complete run shows CC announces them")
        left = fan.get("budget", {}).get("parents_left", {})
        complete_all = fan.get("asked") in ("all", "guard", "verify") and status == "success" \
            and not any(left.values())
        before = fan.get("assumption", "unverified")
        judged = pages.watch is not None and pages.watch.can_judge
        if seen.missed:
            after = "broken"
        elif before != "holds" and complete_all and seen.announced:
            # every parent asked with its own filter; changes seen, each under a parent marked changed
            after = "holds"
            fan["assumption_evidence"] = "announced"
        elif before != "holds" and complete_all and judged and fan.get("asked") != "all":
            # a complete clean night -- a verification or the guard, every parent asked, no change
            # seen at all: nothing against the assumption, nothing for it. Trusted: the sweep keeps
            # checking every parent once per cycle and the first unannounced change it finds sends
            # the job back to the guard (a change waits at most one cycle); otherwise a child that
            # rarely changes would pay a full read every night (after its first pass, or after one
            # stray change). A full run or the first pass (no filter: they cannot tell announced
            # from not) prove nothing.
            after = "holds"
            if before == "broken":
                fan["assumption_evidence"] = "clean guard night (no change seen)"
            elif (sibling := self._sibling_evidence(conn)) is not None:
                fan["assumption_evidence"] = f"announced on job {sibling} (same parents)"
            else:
                fan["assumption_evidence"] = "quiet (no change seen on the verification night)"
        else:
            after = before
        fan["assumption_after"] = after
        fan["guard_after"] = changed_policy and after == "broken"
        FANOUT_GUARD.labels(job_id).set(1 if fan["guard_after"] else 0)
        for reason, n in left.items():
            CALLS_BUDGET_LEFT.labels(job_id, reason).set(n)
        return fan


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
                log.warning("database_unavailable_retrying", step=what, retry_in_s=round(delay, 2), error=describe(e))
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
