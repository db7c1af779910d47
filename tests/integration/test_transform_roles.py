"""Least privilege: the ETL writer role can run every procedure (including the materialized-view
refresh it does not own); the analytics role reads Silver, Gold and the status views but can change
nothing and cannot read the pseudonymisation key."""

from __future__ import annotations

import psycopg
import pytest

from tests.integration.transform_support import (
    fixture_tx,  # noqa: F401 - pytest fixture
    fixture_tx_dsn,  # noqa: F401 - pytest fixture
    scalar,
    seed_small,
)

pytestmark = pytest.mark.integration


def test_etl_role_runs_every_procedure(tx) -> None:
    seed_small(tx, studies=1, subjects_per_study=2)
    names = [r[0] for r in tx.execute("SELECT procedure_name FROM etl.dw_transform_procedures ORDER BY run_order")]
    with tx.transaction(force_rollback=True):
        tx.execute("SET LOCAL ROLE trialsync_etl")
        for name in names:
            schema, proc = name.split(".")
            tx.execute(psycopg.sql.SQL("CALL {}.{}()").format(psycopg.sql.Identifier(schema), psycopg.sql.Identifier(proc)))
        tx.execute("CALL silver.load_all_new_dimensions()")
        tx.execute("CALL silver.load_all_new_facts()")
        assert scalar(tx, "SELECT count(*) FROM gold.mv_study_performance_metrics") == 1
        assert scalar(tx, "SELECT count(*) FROM etl.v_quality_latest") > 0


def test_analytics_role_reads_but_cannot_write(tx) -> None:
    seed_small(tx, studies=1, subjects_per_study=1)
    tx.execute("CALL silver.load_all_new_dimensions()")
    tx.execute("CALL silver.load_all_new_facts()")
    for q in ("SELECT count(*) FROM gold.v_study_enrollment_summary", "SELECT count(*) FROM gold.v_subject_status_summary",
              "SELECT count(*) FROM gold.mv_study_performance_metrics", "SELECT count(*) FROM silver.fact_enrollment",
              "SELECT count(*) FROM etl.v_quality_latest", "SELECT count(*) FROM etl.v_transform_status"):
        with tx.transaction(force_rollback=True):
            tx.execute("SET LOCAL ROLE trialsync_analytics")
            assert scalar(tx, q) >= 0
    for q in ("CALL silver.load_dim_studies()", "CALL gold.refresh_mv_study_performance_metrics()",
              "DELETE FROM silver.dim_studies", "SELECT secret FROM etl.dw_pseudonym_secret"):
        with tx.transaction(force_rollback=True):
            tx.execute("SET LOCAL ROLE trialsync_analytics")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                tx.execute(q)
