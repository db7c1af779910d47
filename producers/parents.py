"""Parent parameter values of a parameterized job, read from the parent's Bronze staging table.

A job maps each endpoint placeholder to a JSON path in the parent's ``data``
(``parameters: {studyId: study.id, visitId: id}``); all placeholders come from **one row**, so
nested endpoints (job 175: ``/studies/{studyId}/visits/{visitId}/elements/odata``) get consistent
pairs. The query is::

    SELECT DISTINCT data #>> %(p0)s AS p0, data #>> %(p1)s AS p1
    FROM bronze.<parameter_source_table>
    WHERE NOT is_deleted AND data #>> %(p0)s IS NOT NULL AND ...
    ORDER BY 1, 2

with every path passed as a ``text[]`` parameter and the table name validated and quoted by
``common.db.staging_table`` -- nothing from configuration is formatted into SQL text. Soft-deleted
parents are skipped (their children are gone from the source too). Values are text, so parameter
dicts look the same in headers, run records and watermark keys run after run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from common.db import staging_table
from schemas.jobs import Job


class ParentsError(RuntimeError):
    """The parent table cannot be read (missing table, bad configuration)."""


@dataclass(frozen=True)
class _ParentSql:
    """The pieces every parent query shares: one ``data #>> path`` per placeholder (paths passed
    as ``text[]`` parameters), their NOT NULL conditions, the positional ORDER/GROUP list, the table."""

    params: dict[str, Any]
    exprs: list[sql.Composed]
    conds: sql.Composable
    positions: sql.Composable
    table: sql.Composed

    @property
    def cols(self) -> sql.Composable:
        return sql.SQL(", ").join(sql.SQL("{} AS {}").format(e, sql.Identifier(f"p{i}"))
                                  for i, e in enumerate(self.exprs))


def _parent_sql(job: Job) -> _ParentSql:
    if not job.requires_parameters or not job.parameter_source_table:
        raise ParentsError(f"job {job.id} ({job.name}) is not parameterized")
    names = job.placeholders or list(job.parameters)
    params: dict[str, Any] = {f"p{i}": job.parameters[name].split(".") for i, name in enumerate(names)}
    exprs = [sql.SQL("data #>> {}").format(sql.Placeholder(f"p{i}")) for i in range(len(names))]
    return _ParentSql(params, exprs, sql.SQL(" AND ").join(sql.SQL("{} IS NOT NULL").format(e) for e in exprs),
                      sql.SQL(", ").join(sql.Literal(i + 1) for i in range(len(names))),
                      staging_table(job.parameter_source_table))


def _missing_table(job: Job) -> ParentsError:
    return ParentsError(
        f"parent table bronze.{job.parameter_source_table} of job {job.id} does not exist: "
        "run `trialsync jobs sync` (creates staging tables), then the parent job")


def parent_query(job: Job) -> tuple[sql.Composed, dict[str, Any]]:
    """The DISTINCT query for ``job``'s parents and its parameters."""
    ps = _parent_sql(job)
    q = sql.SQL("SELECT DISTINCT {cols} FROM {table} WHERE NOT is_deleted AND {conds} ORDER BY {order}").format(
        cols=ps.cols, table=ps.table, conds=ps.conds, order=ps.positions)
    return q, ps.params


def load_parent_values(conn: psycopg.Connection, job: Job) -> list[tuple[str, ...]]:
    """Every distinct parameter tuple for ``job`` (in placeholder order), ordered; ``[]`` when the
    parent table is empty. Tuples, not dicts: a patient-visit fan-out has millions of parents."""
    q, params = parent_query(job)
    try:
        with conn.cursor() as cur:
            cur.execute(q, params)
            return cur.fetchall()
    except psycopg.errors.UndefinedTable:
        raise _missing_table(job) from None


def load_parents(conn: psycopg.Connection, job: Job) -> list[dict[str, str]]:
    """Every distinct parameter dict for ``job``, ordered (``[]`` when the parent table is empty)."""
    names = job.placeholders or list(job.parameters)
    return [dict(zip(names, row, strict=True)) for row in load_parent_values(conn, job)]


@dataclass(frozen=True)
class ParentSelection:
    """The parents an incremental run of a fan-out job asks under the ``changed`` policy."""

    values: list[tuple[str, ...]]
    swept_values: list[tuple[str, ...]]  # of ``values``: unchanged, asked because of this run's sweep slice
    parent_rows: int  # live rows in the parent table (the ``all`` policy would ask about this many)
    as_of: datetime  # see read_point()

    @property
    def swept(self) -> int:
        return len(self.swept_values)

    @property
    def changed(self) -> int:
        """Parents whose row was updated since ``since`` (new parents included)."""
        return len(self.values) - len(self.swept_values)


#: when other sessions' transaction start times are hidden (another role without pg_read_all_stats),
#: assume none of them ran longer than this
HIDDEN_TRANSACTION_MARGIN = timedelta(minutes=10)


def read_point(conn: psycopg.Connection) -> datetime:
    """A time T such that every staging row the next read cannot see yet will carry
    ``updated_at >= T``: the earlier of now and the start of the oldest transaction still open.

    The loader stamps ``updated_at`` with ``now()``, its transaction's *start*; a batch that began
    before this read and commits after it is invisible to the read yet stamped earlier than it.
    Its start is in ``pg_stat_activity.xact_start``, so the next run's "changed since T" window
    includes it. Sessions of other roles hide that column: then T moves back by
    ``HIDDEN_TRANSACTION_MARGIN``. Rows seen now *and* stamped after T are asked twice (harmless).
    """
    row = conn.execute(
        """SELECT least(clock_timestamp(), min(xact_start)), count(*) FILTER (WHERE state IS NULL)
           FROM pg_stat_activity
           WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"""
    ).fetchone()
    assert row is not None  # an aggregate always answers one row; least() ignores a NULL min()
    t, hidden = row
    return t - HIDDEN_TRANSACTION_MARGIN if hidden else t


def select_changed_parents(conn: psycopg.Connection, job: Job, *, since: datetime, sweep_runs: int,
                           sweep_slice: int) -> ParentSelection:
    """Parents whose staging row changed after ``since`` (``updated_at`` moves only when a row's
    content changes or it is new), plus the parents whose hash falls in slice ``sweep_slice`` of
    ``sweep_runs``. The hash is of the parameter values, so a parent stays in its slice run after
    run and every parent is asked at least once every ``sweep_runs`` runs."""
    ps = _parent_sql(job)
    params = {**ps.params, "since": since, "n": sweep_runs, "slice": sweep_slice % sweep_runs}
    hashed = sql.SQL("(hashtext(concat_ws(chr(31), {})) & 2147483647) %% %(n)s").format(sql.SQL(", ").join(ps.exprs))
    q = sql.SQL(
        "SELECT {cols}, bool_or(updated_at > %(since)s) AS changed FROM {table} "
        "WHERE NOT is_deleted AND {conds} AND (updated_at > %(since)s OR {hashed} = %(slice)s) "
        "GROUP BY {group} ORDER BY {group}"
    ).format(cols=ps.cols, table=ps.table, conds=ps.conds, hashed=hashed, group=ps.positions)
    count = sql.SQL("SELECT count(*) FROM {table} WHERE NOT is_deleted").format(table=ps.table)
    try:
        with conn.cursor() as cur:
            as_of = read_point(conn)
            rows = cur.execute(q, params).fetchall()
            total = cur.execute(count).fetchone()[0]  # type: ignore[index]
    except psycopg.errors.UndefinedTable:
        raise _missing_table(job) from None
    return ParentSelection([tuple(r[:-1]) for r in rows], [tuple(r[:-1]) for r in rows if not r[-1]],
                           int(total), as_of)
