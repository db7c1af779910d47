"""The real chain: simulator -> extractor (run_job) -> topics -> loader -> staging, and the loaded
parents feed the next (parameterized) job. Checks the extractor/loader contract end to end:
headers, end offsets in dw_etl_runs, run accounting, exact table content."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from common.catalog import load_catalog, sync
from common.config import Settings
from common.db import connect, migrate
from consumers import run_progress
from producers.extractor import run_job
from simulator.testing import SimulatorProcess
from tests.integration.extract_helpers import ExtractEnv, expected_by_key, run_row
from tests.loader_support import load_once, table_state

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(scale=0.002, seed=42, api_key="it-loader-key-8Qw2") as s:
        yield s


@pytest.fixture
def env(sim: SimulatorProcess, fresh_db: str, unique: str) -> Iterator[Settings]:
    migrate()
    sync(load_catalog())
    with ExtractEnv(sim, f"le{unique}") as s:
        yield s


def _check_loaded(env: Settings, sim: SimulatorProcess, job, run_id: int) -> dict:  # noqa: ANN001
    expected = {k: v[-1] for k, v in expected_by_key(sim, job).items()}
    with connect(env, autocommit=True) as conn:
        state = table_state(conn, job.target_table)
        assert run_progress.run_loaded(conn, run_id)
    assert {k: data for k, (data, deleted) in state.items() if not deleted} == expected
    row = run_row(env, run_id)
    assert row["records_loaded"] == row["records_published"] == len(expected)
    assert row["records_rejected"] == 0 and row["load_completed_at"] is not None
    assert row["run_status"] == "success"
    return row


def test_extracted_runs_load_exactly_and_feed_the_next_job(env: Settings, sim: SimulatorProcess) -> None:
    catalog = load_catalog(env)
    studies, visits = catalog.get(2), catalog.get(11)

    r2 = run_job(studies, mode="full", settings=env)
    assert r2.status == "success", r2.error
    with connect(env, autocommit=True) as conn:
        assert not run_progress.run_loaded(conn, r2.run_id)
    load_once(env, "le-loader", [studies.target_table], batch_size=5000)
    _check_loaded(env, sim, studies, r2.run_id)

    # the parameterized job reads its parents from the table the loader just filled
    r11 = run_job(visits, mode="full", settings=env)
    assert r11.status == "success", r11.error
    assert r11.parents_total == len(expected_by_key(sim, studies)) and r11.parents_failed == 0
    load_once(env, "le-loader", [visits.target_table], batch_size=5000)
    _check_loaded(env, sim, visits, r11.run_id)
    assert run_progress.wait_for_load([r2.run_id, r11.run_id], timeout=5, settings=env)

    # lineage columns come from the extractor's headers
    with connect(env, autocommit=True) as conn:
        bad = conn.execute(
            "SELECT count(*) FROM bronze.dim_visits_staging WHERE etl_run_id <> %s OR etl_job_id <> 11 "
            "OR source_instance_id <> 'cc1' OR extracted_at IS NULL OR source_params ->> 'studyId' IS NULL",
            (r11.run_id,)).fetchone()[0]
        assert bad == 0

    # an incremental re-run (watermark overlap re-reads the newest records): loaded, nothing rewritten
    with connect(env, autocommit=True) as conn:
        before = conn.execute("SELECT max(updated_at), count(*) FROM bronze.dim_studies_staging").fetchone()
    r2b = run_job(studies, mode="incremental", settings=env)
    assert r2b.status == "success" and r2b.records_published < r2.records_published
    stats = load_once(env, "le-loader", [studies.target_table])
    assert stats.records == r2b.records_published and stats.inserted == stats.updated == 0
    with connect(env, autocommit=True) as conn:
        assert run_progress.run_loaded(conn, r2b.run_id)
        assert conn.execute("SELECT max(updated_at), count(*) FROM bronze.dim_studies_staging").fetchone() == before
    assert run_row(env, r2b.run_id)["records_loaded"] == r2b.records_published
