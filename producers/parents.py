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

from dataclasses import dataclass, field
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


@dataclass
class ParentSelection:
    """The parents a run of a fan-out job may ask, by why -- in the order a budget spends calls.

    ``changed``: the parent's staging row changed since the reference (new parents included) and
    its own timestamp moved (``content_only`` counts rows whose content changed without it: an
    embedded preview of another record, e.g. a renamed sponsor inside every study -- under the
    assumption no child change hides behind those, and the sweep still reaches them);
    ``swept``: this run's sweep slice (unchanged parents asked to check the change-propagation
    assumption and refresh embedded previews); ``unfinished``: not yet reached by the job's first
    complete pass over its parents (keyset order); ``rest``: every other parent (asked under the
    ``all`` policy or while the guard holds).
    """

    changed: list[tuple[str, ...]] = field(default_factory=list)
    swept: list[tuple[str, ...]] = field(default_factory=list)
    unfinished: list[tuple[str, ...]] = field(default_factory=list)
    rest: list[tuple[str, ...]] = field(default_factory=list)
    parent_rows: int = 0
    as_of: datetime | None = None
    #: the newest parent timestamp (``source_modified_at``) among the rows this read saw: the next
    #: run's reference for "the parent's own timestamp moved"
    ts_as_of: datetime | None = None
    #: parent rows that changed since the reference while their own timestamp did not move
    content_only: int = 0
    #: count_only: how many parents fall in each list (the lists stay empty)
    counts: dict[str, int] = field(default_factory=dict)

    def ordered(self) -> list[tuple[str, ...]]:
        return [*self.changed, *self.swept, *self.unfinished, *self.rest]


#: when other sessions' transaction start times are hidden (another role without pg_read_all_stats),
#: assume none of them ran longer than this
HIDDEN_TRANSACTION_MARGIN = timedelta(minutes=10)

#: "the parent's own timestamp moved" = newer than the newest parent timestamp the previous read saw,
#: less this margin: a parent row that reached staging only after that read (a loader lagging this
#: long) with an older timestamp still counts as changed within the margin; beyond it the sweep
#: asks it. Parents whose timestamps moved within the margin and whose content changed again are
#: asked once more (harmless).
PARENT_CLOCK_MARGIN = timedelta(hours=24)


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


def newest_parent_ts(conn: psycopg.Connection, job: Job, as_of: datetime) -> datetime | None:
    """The newest parent timestamp among the rows stamped no later than ``as_of`` (a read point):
    what a run that asked every parent records as its ``parents_ts_as_of``."""
    q = sql.SQL("SELECT max(source_modified_at) FROM {} WHERE NOT is_deleted AND updated_at <= %s").format(
        _parent_sql(job).table)
    try:
        row = conn.execute(q, (as_of,)).fetchone()
    except psycopg.errors.UndefinedTable:
        raise _missing_table(job) from None
    return row[0] if row else None


def select_parents(conn: psycopg.Connection, job: Job, *, since: datetime | None, sweep_runs: int = 0,
                   sweep_slice: int = 0, after: tuple[str, ...] | None = None, first_pass_done: bool = True,
                   everything: bool = False, count_only: bool = False,
                   ts_since: datetime | None = None) -> ParentSelection:
    """Read the parents a run may ask, each once, sorted into :class:`ParentSelection`'s lists.

    * changed: ``updated_at > since`` (``updated_at`` moves only when a row's content changes or
      it is new; no reference = none) and, given ``ts_since`` (the newest parent timestamp the
      previous read saw), the row is new or its own timestamp is unknown or newer than ``ts_since``
      less :data:`PARENT_CLOCK_MARGIN`;
    * swept: the parameter values' hash falls in slice ``sweep_slice`` of ``sweep_runs`` (so a
      parent stays in its slice run after run, and every parent is asked once every
      ``sweep_runs`` runs); ``sweep_runs = 0``: no sweep;
    * unfinished: the first pass is not done and the parent sorts after ``after``;
    * rest: the others, read only with ``everything``.

    One query; only the rows that fall in a wanted list are transferred (a patient-visit fan-out
    has millions of parents and a night asks a few per cent of them).
    """
    ps = _parent_sql(job)
    n = len(ps.exprs)
    params: dict[str, Any] = {**ps.params, "since": since, "n": max(1, sweep_runs), "slice": sweep_slice % max(1, sweep_runs)}
    touched = sql.SQL("updated_at > %(since)s") if since is not None else sql.SQL("false")
    if since is not None and ts_since is not None:
        params["ts_since"] = ts_since - PARENT_CLOCK_MARGIN
        changed: sql.Composable = sql.SQL(
            "(updated_at > %(since)s AND (created_at > %(since)s OR source_modified_at IS NULL "
            "OR source_modified_at > %(ts_since)s))")
    else:
        changed = touched
    swept = sql.SQL("(hashtext(concat_ws(chr(31), {})) & 2147483647) %% %(n)s = %(slice)s").format(
        sql.SQL(", ").join(ps.exprs)) if sweep_runs > 0 else sql.SQL("false")
    if first_pass_done:
        unfinished: sql.Composable = sql.SQL("false")
    elif after is None:
        unfinished = sql.SQL("true")
    else:
        params.update({f"a{i}": v for i, v in enumerate(after)})
        unfinished = sql.SQL("ROW({}) > ROW({})").format(
            sql.SQL(", ").join(ps.exprs), sql.SQL(", ").join(sql.Placeholder(f"a{i}") for i in range(n)))
    wanted = sql.SQL("true") if everything else sql.SQL("({}) OR ({}) OR ({})").format(changed, swept, unfinished)
    q = sql.SQL(
        "SELECT {cols}, bool_or({changed}), bool_or({swept}), bool_or({unfinished}) FROM {table} "
        "WHERE NOT is_deleted AND {conds} AND ({wanted}) GROUP BY {group} ORDER BY {group}"
    ).format(cols=ps.cols, changed=changed, swept=swept, unfinished=unfinished, table=ps.table, conds=ps.conds,
             wanted=wanted, group=ps.positions)
    # in the same scan: the rows whose content changed without their own timestamp (counted, never
    # transferred), and the newest parent timestamp among the rows this read sees (stamped no later
    # than its read point)
    count = sql.SQL("SELECT count(*), count(*) FILTER (WHERE ({touched}) AND NOT ({changed})), "
                    "max(source_modified_at) FILTER (WHERE updated_at <= %(as_of)s) "
                    "FROM {table} WHERE NOT is_deleted").format(touched=touched, changed=changed, table=ps.table)
    sel = ParentSelection()
    if count_only:  # how many of each, without transferring the parents (trialsync run --dry-run)
        q = sql.SQL("SELECT count(*) FILTER (WHERE c), count(*) FILTER (WHERE s AND NOT c), "
                    "count(*) FILTER (WHERE u AND NOT c AND NOT s), count(*) FILTER (WHERE NOT (c OR s OR u)) "
                    "FROM ({}) AS p(" + ", ".join(f"p{i}" for i in range(n)) + ", c, s, u)").format(q)
        try:
            row = conn.execute(q, params).fetchone()
            total = conn.execute(count, {**params, "as_of": None}).fetchone()
        except psycopg.errors.UndefinedTable:
            raise _missing_table(job) from None
        assert row is not None and total is not None
        sel.counts = {"changed": int(row[0]), "swept": int(row[1]), "unfinished": int(row[2]), "rest": int(row[3])}
        sel.parent_rows = int(total[0])
        return sel
    try:
        with conn.cursor() as cur:
            sel.as_of = read_point(conn)
            for *values, is_changed, is_swept, is_unfinished in cur.execute(q, params):
                v = tuple(values)
                if is_changed:
                    sel.changed.append(v)
                elif is_swept:
                    sel.swept.append(v)
                elif is_unfinished:
                    sel.unfinished.append(v)
                else:
                    sel.rest.append(v)
            row = cur.execute(count, {**params, "as_of": sel.as_of}).fetchone()
            if row:
                sel.parent_rows, sel.content_only, sel.ts_as_of = int(row[0]), int(row[1]), row[2]
    except psycopg.errors.UndefinedTable:
        raise _missing_table(job) from None
    return sel
