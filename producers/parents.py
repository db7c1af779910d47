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

from typing import Any

import psycopg
from psycopg import sql

from common.db import staging_table
from schemas.jobs import Job


class ParentsError(RuntimeError):
    """The parent table cannot be read (missing table, bad configuration)."""


def parent_query(job: Job) -> tuple[sql.Composed, dict[str, Any]]:
    """The DISTINCT query for ``job``'s parents and its parameters."""
    if not job.requires_parameters or not job.parameter_source_table:
        raise ParentsError(f"job {job.id} ({job.name}) is not parameterized")
    names = job.placeholders or list(job.parameters)
    params: dict[str, Any] = {}
    cols, conds = [], []
    for i, name in enumerate(names):
        path = job.parameters[name]
        params[f"p{i}"] = path.split(".")
        cols.append(sql.SQL("data #>> {} AS {}").format(sql.Placeholder(f"p{i}"), sql.Identifier(f"p{i}")))
        conds.append(sql.SQL("data #>> {} IS NOT NULL").format(sql.Placeholder(f"p{i}")))
    order = sql.SQL(", ").join(sql.Literal(i + 1) for i in range(len(names)))
    q = sql.SQL("SELECT DISTINCT {cols} FROM {table} WHERE NOT is_deleted AND {conds} ORDER BY {order}").format(
        cols=sql.SQL(", ").join(cols), table=staging_table(job.parameter_source_table),
        conds=sql.SQL(" AND ").join(conds), order=order,
    )
    return q, params


def load_parent_values(conn: psycopg.Connection, job: Job) -> list[tuple[str, ...]]:
    """Every distinct parameter tuple for ``job`` (in placeholder order), ordered; ``[]`` when the
    parent table is empty. Tuples, not dicts: a patient-visit fan-out has millions of parents."""
    q, params = parent_query(job)
    try:
        with conn.cursor() as cur:
            cur.execute(q, params)
            return cur.fetchall()
    except psycopg.errors.UndefinedTable:
        raise ParentsError(
            f"parent table bronze.{job.parameter_source_table} of job {job.id} does not exist: "
            "run `trialsync jobs sync` (creates staging tables), then the parent job") from None


def load_parents(conn: psycopg.Connection, job: Job) -> list[dict[str, str]]:
    """Every distinct parameter dict for ``job``, ordered (``[]`` when the parent table is empty)."""
    names = job.placeholders or list(job.parameters)
    return [dict(zip(names, row, strict=True)) for row in load_parent_values(conn, job)]
