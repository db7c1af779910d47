"""Data-quality checks run after each transform batch.

A check is a row of ``etl.dw_quality_checks`` (migration 0304): a SELECT returning the key of every
failing row, a target table and a severity. Running one means counting its rows and keeping up to
ten sample keys; every run of every check is one row of ``etl.dw_quality_results`` (the latest per
check: ``etl.v_quality_latest``, which alerting reads) and sets the ``QUALITY_STATUS`` /
``QUALITY_FAILED_ROWS`` gauges. A check that itself breaks (timeout, bad SQL) is recorded with
status ``error`` and never stops the other checks or the transformer.

A check that examines nothing proves nothing: its ``scope_sql`` (migration 0803; default: the rows
of its target table) is counted first, in the same snapshot, and 0 is recorded as ``empty`` --
"nothing to check" -- never as ``pass``; an empty result does not hold a check's
``min_interval_seconds`` back, and sets no gauge sample (it neither passes nor fails).

Why the checks live in SQL rows: they are data about the model, versioned with the migrations that
define the model, readable by analysts, and extendable without a release of this code.

Why the checks run read-only: ``etl.dw_quality_checks`` is writable by the writer role, so its
``check_sql`` is untrusted input -- a writer login could plant SQL that the transformer would run
with its own rights (modify data, read the pseudonymisation key into ``sample_keys``). Each check
therefore runs in a READ ONLY transaction with a statement timeout, on a connection of the
read-only login (``trialsync_reader``: :func:`open_check_connection`), whose session cannot switch
back to a writing role; its transaction is always rolled back. Without a reader login configured
(an external database without DATABASE_READER_*), the checks run on the caller's connection in a
rolled-back read-only savepoint as ``trialsync_analytics`` -- read-only and bounded, but a check
could switch the role back, so configure the reader.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from common.db import scalar
from common.logging import get_logger
from common.metrics import QUALITY_FAILED_ROWS, QUALITY_STATUS

log = get_logger("quality")
SAMPLE_SIZE = 10


@dataclass(frozen=True)
class QualityCheck:
    name: str
    target_table: str
    severity: str  # error | warning | info
    category: str
    description: str
    check_sql: str
    scope_sql: str | None = None  # how many rows the check examines (None: its target table's rows)


@dataclass
class QualityResult:
    check: QualityCheck
    status: str  # pass | fail | error | empty (nothing to check)
    failed_rows: int = 0
    sample_keys: list[str] = field(default_factory=list)
    duration_ms: float = 0.0
    error: str | None = None
    checked_rows: int | None = None

    @property
    def is_blocking(self) -> bool:
        """An error-severity check that failed or could not run fails the transform run of its table."""
        return self.check.severity == "error" and self.status in ("fail", "error")

    def summary(self) -> str:
        if self.status == "error":
            return f"{self.check.name} could not run ({self.error})"
        if self.status == "empty":
            return f"{self.check.name}: nothing to check"
        return f"{self.check.name}: {self.failed_rows} rows (e.g. {', '.join(self.sample_keys[:3])})"


def load_checks(conn: psycopg.Connection, tables: Iterable[str] | None = None,
                names: Iterable[str] | None = None, force: bool = True) -> list[QualityCheck]:
    """Active checks, optionally only those of ``tables`` (schema-qualified; ``gold.*`` = every table
    or view of that schema) or with ``names``.

    Without ``force``, a check whose ``min_interval_seconds`` has not passed since its last result
    is left out (its last result stays the latest in etl.v_quality_latest).
    """
    rows = conn.execute(
        "SELECT c.check_name, c.target_table, c.severity, c.category, c.description, c.check_sql, c.scope_sql "
        "FROM etl.dw_quality_checks c WHERE c.is_active "
        "AND (%(t)s::text[] IS NULL OR c.target_table = ANY(%(t)s) "
        "     OR split_part(c.target_table, '.', 1) || '.*' = ANY(%(t)s)) "
        "AND (%(n)s::text[] IS NULL OR c.check_name = ANY(%(n)s)) "
        "AND (%(force)s OR c.min_interval_seconds = 0 OR NOT EXISTS ("
        "     SELECT 1 FROM etl.dw_quality_results r WHERE r.check_name = c.check_name "
        "        AND r.status NOT IN ('error', 'empty') "
        "        AND r.checked_at > now() - make_interval(secs => c.min_interval_seconds))) "
        "ORDER BY c.target_table, c.check_name",
        {"t": None if tables is None else list(tables), "n": None if names is None else list(names),
         "force": force},
    ).fetchall()
    return [QualityCheck(*r) for r in rows]


def _measure(check: QualityCheck) -> sql.Composed:
    # the check's SELECT must yield exactly one column (q(k) fails otherwise: a clear error)
    return sql.SQL("SELECT count(*), (array_agg(k::text ORDER BY k::text))[1:{}] FROM ({}) AS q(k)").format(
        sql.Literal(SAMPLE_SIZE), sql.SQL(check.check_sql))  # trusted: etl.dw_quality_checks


def _scope(check: QualityCheck) -> sql.Composed:
    """How many rows the check examines: its scope_sql, else its target table's row count."""
    if check.scope_sql:
        return sql.SQL("SELECT coalesce(({}), 0)").format(sql.SQL(check.scope_sql))  # trusted, as check_sql
    schema, table = check.target_table.split(".", 1)
    return sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))


class CheckDefinitionError(ValueError):
    """A check's SELECT does not return exactly one column (the failing row's key)."""


READ_ROLE = "trialsync_analytics"


def open_check_connection(settings: object | None = None) -> psycopg.Connection | None:
    """A connection of the read-only login to run check SQL on, or None when none is configured
    (then :func:`run_quality_checks` falls back to the caller's connection, see the module doc)."""
    from common.config import Settings, get_settings
    from common.db import connect

    s = settings if isinstance(settings, Settings) else get_settings()
    if not s.uses_embedded_database and s.explicit_login_dsn("reader") is None:
        return None
    return connect(s, autocommit=True, application_name="trialsync-quality", login="reader")


def _read_only(conn: psycopg.Connection, timeout_s: float, switch_role: bool) -> None:
    """Make the current (sub)transaction read-only, bounded and, if asked, the read-only role.
    ``transaction_read_only`` can be switched on anywhere but never off again inside it."""
    conn.execute("SELECT set_config('transaction_read_only', 'on', true), "
                 "set_config('statement_timeout', %s, true)", (str(max(1, int(timeout_s * 1000))),))
    if switch_role:
        row = conn.execute("SELECT pg_has_role(session_user, %s, 'MEMBER') OR "
                           "(SELECT rolsuper FROM pg_roles WHERE rolname = session_user)", (READ_ROLE,)).fetchone()
        if row and row[0]:
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(READ_ROLE)))


def run_check(conn: psycopg.Connection, check: QualityCheck, timeout_s: int = 300,
              table_rows: dict[str, int] | None = None, switch_role: bool = True) -> QualityResult:
    """Run one check read-only in a transaction (or savepoint) that is always rolled back.

    ``conn`` is the read-only login's connection (``switch_role`` is then moot), or the caller's own
    connection: inside a caller's transaction the check sees its uncommitted rows, and the rollback
    of the savepoint undoes the read-only switch for the caller."""
    t0 = time.perf_counter()
    try:
        with conn.transaction(force_rollback=True):
            _read_only(conn, timeout_s, switch_role)
            cur = conn.execute(sql.SQL("SELECT * FROM ({}) AS q LIMIT 0").format(sql.SQL(check.check_sql)))
            ncols = len(cur.description or ())
            if ncols != 1:
                raise CheckDefinitionError(f"the check's SELECT must return one column (the key), it returns {ncols}")
            if not check.scope_sql and table_rows is not None and check.target_table in table_rows:
                scope = table_rows[check.target_table]  # counted for another check of the same batch
            else:
                scope = scalar(conn, _scope(check))
                if not check.scope_sql and table_rows is not None:
                    table_rows[check.target_table] = scope
            if not scope:
                return QualityResult(check, "empty", 0, [], (time.perf_counter() - t0) * 1000, checked_rows=0)
            measured = conn.execute(_measure(check)).fetchone()
            assert measured is not None  # an aggregate answers one row
            n, sample = measured
        status = "pass" if n == 0 else "fail"
        return QualityResult(check, status, int(n), list(sample or []), (time.perf_counter() - t0) * 1000,
                             checked_rows=int(scope))
    except (psycopg.Error, CheckDefinitionError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return QualityResult(check, "error", 0, [], (time.perf_counter() - t0) * 1000, f"{type(e).__name__}: {msg}")


def record_results(conn: psycopg.Connection, results: list[QualityResult], batch_id: uuid.UUID | None,
                   run_ids: dict[str, int] | None = None) -> None:
    """One dw_quality_results row per result, plus the gauges."""
    run_ids = run_ids or {}
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO etl.dw_quality_results (check_name, target_table, severity, status, failed_rows, "
            "sample_keys, batch_id, transform_run_id, duration_ms, error_message, checked_rows) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [(r.check.name, r.check.target_table, r.check.severity, r.status, r.failed_rows, r.sample_keys,
              batch_id, run_ids.get(r.check.target_table), round(r.duration_ms, 3), r.error, r.checked_rows)
             for r in results],
        )
    for r in results:
        if r.status == "empty":  # nothing to check: neither passing nor failing
            for gauge in (QUALITY_STATUS, QUALITY_FAILED_ROWS):
                with contextlib.suppress(KeyError):
                    gauge.remove(r.check.name, r.check.severity)
            continue
        QUALITY_STATUS.labels(r.check.name, r.check.severity).set(1 if r.status == "pass" else 0)
        QUALITY_FAILED_ROWS.labels(r.check.name, r.check.severity).set(r.failed_rows)


def run_quality_checks(conn: psycopg.Connection, tables: Iterable[str] | None = None, *,
                       batch_id: uuid.UUID | None = None, run_ids: dict[str, int] | None = None,
                       timeout_s: int = 300, names: Iterable[str] | None = None,
                       force: bool = True, reader: psycopg.Connection | None = None) -> list[QualityResult]:
    """Run the active checks of ``tables`` (all when None), record and return the results.

    ``conn`` loads the checks and records the results; the check SQL runs on ``reader`` (the
    read-only login, :func:`open_check_connection`) when given, else read-only on ``conn``.
    ``force=False`` honours each check's min_interval_seconds (the consumer's mode)."""
    checks = load_checks(conn, tables, names, force)
    on = reader if reader is not None else conn
    table_rows: dict[str, int] = {}  # a table's row count, once per call (the default scope)
    results = [run_check(on, c, timeout_s, table_rows) for c in checks]
    for r in results:
        fields = {"check": r.check.name, "table": r.check.target_table, "severity": r.check.severity,
                  "failed_rows": r.failed_rows, "duration_ms": round(r.duration_ms, 1)}
        if r.status == "pass":
            log.debug("quality_check_passed", checked_rows=r.checked_rows, **fields)
        elif r.status == "empty":
            log.info("quality_check_nothing_to_check", **fields)
        elif r.status == "fail":
            (log.error if r.check.severity == "error" else log.warning)(
                "quality_check_failed", sample_keys=r.sample_keys[:5], **fields)
        else:
            log.error("quality_check_error", error=r.error, **fields)
    with conn.transaction():
        record_results(conn, results, batch_id, run_ids)
    return results
