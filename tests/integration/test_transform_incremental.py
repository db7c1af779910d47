"""Incremental reads and the watermark hazard.

The loader stamps ``updated_at = now()``, i.e. its transaction's *start*. A loader transaction that
began before a transform read and commits after it leaves rows whose ``updated_at`` is older than
anything the transform saw; the watermark must not pass them (etl.transform_horizon).
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import psycopg
import pytest

from common.config import load_settings
from common.db import connect
from tests.integration.transform_support import (
    call,
    fixture_tx,  # noqa: F401 - pytest fixture
    fixture_tx_dsn,  # noqa: F401 - pytest fixture
    load,
    rows,
    scalar,
    study,
)

pytestmark = pytest.mark.integration


def watermark(conn, proc: str, source: str):
    return scalar(conn, "SELECT watermark FROM etl.dw_transform_watermarks WHERE procedure_name = %s "
                        "AND source_table = %s", proc, source)


def test_incremental_run_reads_only_changed_rows(tx) -> None:
    tx.execute("SET trialsync.watermark_margin = '0 seconds'")
    load(tx, "dim_studies_staging", [study(i) for i in range(1, 51)])
    call(tx, "silver.load_dim_studies")
    assert scalar(tx, "SELECT rows_read FROM etl.dw_transform_watermarks "
                      "WHERE procedure_name = 'silver.load_dim_studies'") == 50
    time.sleep(0.05)
    load(tx, "dim_studies_staging", [study(7, status="Closed", lastUpdatedOn="2025-07-07T00:00:00Z")])
    assert call(tx, "silver.load_dim_studies") == (1, 0, 1, 0)
    assert scalar(tx, "SELECT rows_read FROM etl.dw_transform_watermarks "
                      "WHERE procedure_name = 'silver.load_dim_studies'") == 1
    assert call(tx, "silver.load_dim_studies") == (0, 0, 0, 0)
    assert scalar(tx, "SELECT rows_read FROM etl.dw_transform_watermarks "
                      "WHERE procedure_name = 'silver.load_dim_studies'") == 0


def test_loader_transaction_committing_after_the_transform_is_not_missed(tx, tx_dsn) -> None:
    tx.execute("SET trialsync.watermark_margin = '0 seconds'")  # no slack: the horizon alone must save the row
    load(tx, "dim_studies_staging", [study(1)])
    call(tx, "silver.load_dim_studies")

    loader = connect(load_settings(database_url=tx_dsn))  # a loader's transaction, not autocommit
    try:
        load(loader, "dim_studies_staging", [study(2)])  # updated_at = the loader transaction's start
        loader_started = scalar(loader, "SELECT now()")
        time.sleep(0.3)
        # the transform runs while the loader transaction is open: it cannot see study 2 ...
        assert call(tx, "silver.load_dim_studies") == (0, 0, 0, 0)
        wm = watermark(tx, "silver.load_dim_studies", "bronze.dim_studies_staging")
        # ... and must not move its watermark past the loader's rows
        assert wm <= loader_started
        transform_clock = scalar(tx, "SELECT clock_timestamp()")
        assert transform_clock - loader_started >= timedelta(seconds=0.3)
        loader.commit()
    finally:
        loader.close()
    # the row committed after the transform read; a "max(updated_at) seen"/"now()" watermark would skip it
    assert scalar(tx, "SELECT updated_at FROM bronze.dim_studies_staging WHERE source_id = 'cc1:2'") < transform_clock
    assert call(tx, "silver.load_dim_studies") == (1, 0, 0, 0)
    assert scalar(tx, "SELECT count(*) FROM silver.dim_studies WHERE source_id = 'cc1:2' AND is_current") == 1
    # and once nothing is in flight the watermark moves on
    assert watermark(tx, "silver.load_dim_studies", "bronze.dim_studies_staging") > loader_started


def test_horizon_sees_sessions_that_began_after_an_earlier_procedure_in_the_same_transaction(tx, tx_dsn) -> None:
    """pg_stat_activity is cached per transaction; load_all_new_dimensions runs several procedures in one."""
    tx.execute("SET trialsync.watermark_margin = '0 seconds'")
    load(tx, "dim_studies_staging", [study(1)])
    outer = connect(load_settings(database_url=tx_dsn))
    loader = connect(load_settings(database_url=tx_dsn))
    try:
        outer.execute("SET trialsync.watermark_margin = '0 seconds'")
        call(outer, "silver.load_dim_sites")  # first read of pg_stat_activity in this transaction
        load(loader, "dim_studies_staging", [study(2)])  # a loader transaction starts afterwards
        loader_started = scalar(loader, "SELECT now()")
        time.sleep(0.2)
        call(outer, "silver.load_dim_studies")
        wm = watermark(outer, "silver.load_dim_studies", "bronze.dim_studies_staging")
        assert wm <= loader_started
        outer.commit()
        loader.commit()
    finally:
        outer.close()
        loader.close()
    call(tx, "silver.load_dim_studies")
    assert scalar(tx, "SELECT count(*) FROM silver.dim_studies WHERE is_current") == 2


def test_horizon_is_conservative_when_other_sessions_are_hidden(tx, tx_dsn) -> None:
    """A role that may not see other roles' xact_start falls back to clock - hidden overlap."""
    role = psycopg.sql.Identifier(f"tx_noread_{uuid.uuid4().hex[:8]}")
    other = connect(load_settings(database_url=tx_dsn))
    tx.execute(psycopg.sql.SQL("CREATE ROLE {} NOLOGIN").format(role))
    tx.execute(psycopg.sql.SQL("GRANT USAGE ON SCHEMA etl TO {}").format(role))
    try:
        other.execute("SELECT 1")  # an open transaction in another session, of a role ours cannot see
        with tx.transaction():
            tx.execute(psycopg.sql.SQL("SET LOCAL ROLE {}").format(role))
            tx.execute("SET LOCAL trialsync.watermark_hidden_overlap = '1 hour'")
            tx.execute("SET LOCAL trialsync.watermark_margin = '0 seconds'")
            gap = scalar(tx, "SELECT extract(epoch FROM clock_timestamp() - etl.transform_horizon())")
        assert 3590 < gap < 3700
        # with visibility (our own role), the same open transaction bounds the horizon instead
        started = scalar(other, "SELECT now()")
        assert scalar(tx, "SELECT etl.transform_horizon()") <= started
    finally:
        other.rollback()
        other.close()
        tx.execute(psycopg.sql.SQL("REVOKE USAGE ON SCHEMA etl FROM {}").format(role))
        tx.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(role))


def test_full_reset_rereads_everything_and_changes_nothing(tx) -> None:
    load(tx, "dim_studies_staging", [study(i) for i in range(1, 6)])
    call(tx, "silver.load_dim_studies")
    before = rows(tx, "SELECT * FROM silver.dim_studies ORDER BY study_key")
    assert scalar(tx, "SELECT etl.reset_transform_watermarks('silver.load_dim_studies')") == 1
    assert call(tx, "silver.load_dim_studies") == (0, 0, 0, 0)
    assert scalar(tx, "SELECT rows_read FROM etl.dw_transform_watermarks "
                      "WHERE procedure_name = 'silver.load_dim_studies'") == 5
    assert rows(tx, "SELECT * FROM silver.dim_studies ORDER BY study_key") == before


def test_concurrent_runs_of_one_procedure_do_not_duplicate_versions(tx, tx_dsn) -> None:
    """Two transformers (or a consumer and `--now`) calling the same SCD2 merge at once serialize."""
    load(tx, "dim_studies_staging", [study(i) for i in range(1, 21)])
    a = connect(load_settings(database_url=tx_dsn))
    b = connect(load_settings(database_url=tx_dsn), autocommit=True)
    try:
        call(a, "silver.load_dim_studies")  # holds the procedure's lock until commit
        import threading

        out: list[tuple] = []
        t = threading.Thread(target=lambda: out.append(call(b, "silver.load_dim_studies")))
        t.start()
        time.sleep(0.3)
        assert t.is_alive()  # waiting for the first run's lock
        a.commit()
        t.join(10)
        assert out and out[0][0] == 0  # the second run sees the first's versions and opens none
    finally:
        a.close()
        b.close()
    assert scalar(tx, "SELECT count(*) FROM silver.dim_studies") == 20
