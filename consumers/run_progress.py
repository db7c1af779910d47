"""Is a run's data in Bronze yet? The contract between the loader and the transformer/orchestrator.

A run is **loaded** when every record it published has been written (or dead-lettered) by a
loader in a committed database transaction. The extractor stores, before the run's final status,
``dw_etl_runs.run_context->'end_offsets'`` = ``{"<partition>": <offset of its last record there>}``
and ``run_context->>'topic'``. For each of those partitions the loader proves it is past the end
offset in one of two ways, both written in the same transaction as the batch itself:

1. ``etl.loader_run_partitions`` -- per (run, partition) the highest offset of that run's records
   the loader committed. The record at the end offset *is* the run's last record there, so
   ``max_offset >= end_offset`` is exact, needs no clock, and cannot be fooled by offsets that
   restart at 0 after an embedded-broker restart (it is keyed by run id).
2. ``etl.loader_positions`` -- the group's next offset per partition, committed with the batch
   (the fallback when the last record lacks its ``ts-run-id`` header). A position only counts if
   it was written after the run started, so a position left over from before a broker restart
   cannot mark a newer run loaded.

A run that published nothing (``end_offsets`` empty, or no end offsets, ``records_published = 0``
and a final status) is loaded immediately. The loader sets ``load_completed_at`` (and turns a
``success`` run with load-time rejects into ``partial``) once the run has a final status; readers
should use :func:`run_loaded` / :func:`wait_for_load`, which evaluate the rule directly and so do
not depend on a loader being up to set the flag.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import psycopg

from common.config import Settings
from common.db import connect
from common.logging import get_logger

log = get_logger("loader.runs")

# The loaded predicate over a dw_etl_runs row aliased r.
_PREDICATE = """(
    r.load_completed_at IS NOT NULL
    OR (jsonb_typeof(r.run_context -> 'end_offsets') = 'object'
        AND NOT EXISTS (
            SELECT 1 FROM jsonb_each_text(r.run_context -> 'end_offsets') e(part, off)
            WHERE NOT (e.part ~ '^[0-9]{1,9}$' AND e.off ~ '^-?[0-9]{1,18}$')
               OR (NOT EXISTS (SELECT 1 FROM etl.loader_run_partitions p
                               WHERE p.run_id = r.id AND p.kafka_partition = e.part::integer
                                 AND p.max_offset >= e.off::bigint)
                   AND NOT EXISTS (SELECT 1 FROM etl.loader_positions lp
                                   WHERE lp.topic = r.run_context ->> 'topic'
                                     AND lp.kafka_partition = e.part::integer
                                     AND lp.next_offset > e.off::bigint
                                     AND lp.updated_at >= r.started_at))))
    OR (r.run_status IN ('success', 'partial', 'failed', 'skipped', 'cancelled')
        AND r.records_published = 0 AND r.run_context -> 'end_offsets' IS NULL)
)"""

_LOADED = f"SELECT r.id, {_PREDICATE} FROM etl.dw_etl_runs r WHERE r.id = ANY(%s)"  # noqa: S608 - constant SQL

_MARK = f"""
WITH marked AS (
UPDATE etl.dw_etl_runs AS u SET
    load_completed_at = now(),
    run_status = CASE WHEN u.run_status = 'success' AND u.records_rejected > 0 THEN 'partial' ELSE u.run_status END,
    error_message = CASE WHEN u.run_status = 'success' AND u.records_rejected > 0
                         THEN concat_ws('; ', u.error_message, u.records_rejected
                              || ' record(s) rejected by the loader: see etl.dw_etl_rejects and the dead-letter topic')
                         ELSE u.error_message END
WHERE u.id IN (
    SELECT r.id FROM etl.dw_etl_runs r
    WHERE r.load_completed_at IS NULL
      AND r.run_status IN ('success', 'partial', 'failed', 'skipped', 'cancelled')
      AND (%(topics)s::text[] IS NULL OR r.run_context ->> 'topic' = ANY(%(topics)s::text[]))
      AND (%(ids)s::bigint[] IS NULL OR r.id = ANY(%(ids)s::bigint[]))
      AND {_PREDICATE}
    FOR UPDATE SKIP LOCKED)
RETURNING u.id, u.job_id, u.run_status),
jobs AS (  -- the job's last_run_status follows a run turned partial by load rejects
    UPDATE etl.dw_etl_jobs j SET last_run_status = 'partial'
    FROM marked m WHERE m.run_status = 'partial' AND j.id = m.job_id AND j.last_run_id = m.id
      AND j.last_run_status = 'success'
    RETURNING 1)
SELECT id FROM marked
"""  # noqa: S608 - constant SQL


class LoadTimeout(TimeoutError):
    """wait_for_load gave up; the message names the runs not loaded and how far each got."""


@dataclass
class RunLoadStatus:
    run_id: int
    exists: bool
    loaded: bool
    status: str | None = None
    topic: str | None = None
    records_published: int = 0
    records_loaded: int = 0
    records_rejected: int = 0
    #: partition -> (end offset, highest offset of this run the loader committed or None)
    partitions: dict[int, tuple[int, int | None]] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.exists:
            return f"run {self.run_id}: no such run in etl.dw_etl_runs"
        if self.loaded:
            return f"run {self.run_id}: loaded ({self.records_loaded} loaded, {self.records_rejected} rejected)"
        if not self.partitions:
            return (f"run {self.run_id} ({self.status}): no end offsets recorded yet -- the extractor has not "
                    "finished publishing it")
        behind = [f"partition {p}: at {'-' if got is None else got} of {end}"
                  for p, (end, got) in sorted(self.partitions.items()) if got is None or got < end]
        return (f"run {self.run_id} on {self.topic}: {self.records_loaded + self.records_rejected} of "
                f"{self.records_published} records processed; " + ", ".join(behind)
                + " -- is `trialsync load` running for this table?")


def run_loaded(conn: psycopg.Connection, run_id: int, mark: bool = True) -> bool:
    """True when every record of ``run_id`` is in its staging table (or dead-lettered).

    With ``mark`` the run's ``load_completed_at`` is set when it is loaded and final (idempotent).
    Unknown run ids raise ``KeyError``.
    """
    got = runs_loaded(conn, [run_id], mark=mark)
    if run_id not in got:
        raise KeyError(f"run {run_id} does not exist in etl.dw_etl_runs")
    return got[run_id]


def runs_loaded(conn: psycopg.Connection, run_ids: Sequence[int], mark: bool = True) -> dict[int, bool]:
    """``{run_id: loaded}`` for the runs that exist."""
    ids = [int(r) for r in run_ids]
    out = {rid: bool(ok) for rid, ok in conn.execute(_LOADED, (ids,)).fetchall()}
    if mark and any(out.values()):
        mark_loaded(conn, run_ids=[r for r, ok in out.items() if ok])
    return out


def mark_loaded(conn: psycopg.Connection, topics: Iterable[str] | None = None,
                run_ids: Iterable[int] | None = None) -> list[int]:
    """Set load_completed_at on final runs that are loaded; returns their ids.

    Rows another session holds are skipped (``SKIP LOCKED``), so loaders never wait on each other
    here; the next evaluation picks them up.
    """
    params = {"topics": list(topics) if topics is not None else None,
              "ids": [int(r) for r in run_ids] if run_ids is not None else None}
    if conn.autocommit:
        with conn.transaction():
            rows = conn.execute(_MARK, params).fetchall()
    else:
        rows = conn.execute(_MARK, params).fetchall()
    done = [r[0] for r in rows]
    if done:
        log.info("runs_loaded", run_ids=done)
    return done


def load_status(conn: psycopg.Connection, run_ids: Sequence[int]) -> dict[int, RunLoadStatus]:
    """Per run: loaded?, counts, and per partition the end offset vs what the loader committed."""
    ids = [int(r) for r in run_ids]
    loaded = {rid: bool(ok) for rid, ok in conn.execute(_LOADED, (ids,)).fetchall()}
    out = {rid: RunLoadStatus(rid, exists=False, loaded=False) for rid in ids}
    rows = conn.execute(
        """SELECT id, run_status, run_context ->> 'topic', run_context -> 'end_offsets', records_published,
                  records_loaded, records_rejected FROM etl.dw_etl_runs WHERE id = ANY(%s)""", (ids,)).fetchall()
    progress: dict[int, dict[int, int]] = {}
    for rid, part, mx in conn.execute(
            "SELECT run_id, kafka_partition, max_offset FROM etl.loader_run_partitions WHERE run_id = ANY(%s)",
            (ids,)).fetchall():
        progress.setdefault(rid, {})[part] = mx
    for rid, status, topic, ends, published, nloaded, nrejected in rows:
        st = RunLoadStatus(rid, True, loaded.get(rid, False), status, topic, published, nloaded, nrejected)
        if isinstance(ends, dict):
            for p, end in ends.items():
                try:
                    st.partitions[int(p)] = (int(end), progress.get(rid, {}).get(int(p)))
                except (TypeError, ValueError):
                    continue
        out[rid] = st
    return out


def wait_for_load(run_ids: Iterable[int], timeout: float, poll: float = 0.5, settings: Settings | None = None,
                  conn: psycopg.Connection | None = None, raise_on_timeout: bool = False) -> bool:
    """Block until every run in ``run_ids`` is loaded; False (or LoadTimeout) after ``timeout`` s.

    Database hiccups while waiting are retried until the deadline (the loader may be riding out
    the same outage).
    """
    pending = {int(r) for r in run_ids}
    deadline = time.monotonic() + timeout
    own = conn is None
    last_error: Exception | None = None
    try:
        while True:
            try:
                if conn is None or conn.closed:
                    conn = connect(settings, autocommit=True, application_name="trialsync-wait-load")
                got = runs_loaded(conn, sorted(pending))
                missing = pending - set(got)
                if missing:
                    raise KeyError(f"run(s) {sorted(missing)} do not exist in etl.dw_etl_runs")
                pending -= {r for r, ok in got.items() if ok}
                last_error = None
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                last_error = e
                if own and conn is not None:
                    conn.close()
                    conn = None
            except Exception as e:  # DatabaseError from connect(): keep waiting until the deadline
                from common.db import DatabaseError

                if not isinstance(e, DatabaseError):
                    raise
                last_error = e
            if not pending:
                return True
            if time.monotonic() >= deadline:
                break
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        if not raise_on_timeout:
            return False
        detail = ""
        if conn is not None and not conn.closed:
            try:
                detail = "; ".join(s.describe() for s in load_status(conn, sorted(pending)).values())
            except psycopg.Error:
                detail = ""
        if last_error is not None:
            detail += f" (last database error: {str(last_error).strip().splitlines()[0]})"
        raise LoadTimeout(f"{len(pending)} run(s) not loaded after {timeout:g} s: {detail}")
    finally:
        if own and conn is not None:
            conn.close()
