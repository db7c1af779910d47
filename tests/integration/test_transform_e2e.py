"""End to end: CC simulator → extractor → topics → loader → Bronze → transform consumer → Silver/Gold.

The whole pipeline over real HTTP, the real broker and the real database: the warehouse reconciles
with the simulator's ground truth, every error-severity quality check passes, and a study whose
status changes in the simulator gets exactly one new SCD2 version after re-extract, re-load and
transform.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from common import config
from common.catalog import load_catalog
from common.config import Settings
from consumers.transform_runner import ProcedureRunner
from consumers.transform_settings import load_transform_settings
from consumers.transformer import Transformer
from simulator.testing import SimulatorProcess
from tests.integration.transform_support import (
    fixture_tx,  # noqa: F401 - pytest fixture
    fixture_tx_dsn,  # noqa: F401 - pytest fixture
    rows,
    scalar,
)

# the extractor (issue 4) and the loader (issue 5) are imported where used: until they are on the
# branch, this module skips instead of failing to import
run_job = pytest.importorskip("producers.extractor").run_job
_loader = pytest.importorskip("consumers.loader")

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY = "e2e-transform-key-7Qm2"
#: extraction stages: parents are loaded before the jobs that fan out over them
STAGES = ([1, 35, 26, 2, 3, 127, 9], [10], [24])


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(scale=0.002, seed=7, api_key=KEY) as s:
        yield s


@pytest.fixture
def pipeline_env(sim: SimulatorProcess, tx_dsn: str, unique: str) -> Iterator[Settings]:
    values = {"CC_API_BASE_URL": sim.base_url, "CC_API_KEY": sim.api_key, "CC_API_KEY_HEADER": sim.key_header,
              "KAFKA_TOPIC_PREFIX": f"e2e{unique}", "ETL_RETRY_DELAY_SECONDS": "0.01"}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    config.reset_settings()
    try:
        yield config.get_settings()
    finally:
        try:
            from producers.publisher import reset_publishers

            reset_publishers()
        except ImportError:  # pragma: no cover
            pass
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        config.reset_settings()


def extract_and_load(settings: Settings, job_ids: list[int], group: str, mode: str = "full") -> list[int]:
    catalog = load_catalog(settings)
    run_ids = []
    for j in job_ids:
        r = run_job(catalog.get(j), mode=mode, settings=settings)  # type: ignore[arg-type]
        assert r.status == "success", (j, r.to_dict())
        run_ids.append(r.run_id)
    _loader.run_loader(_loader.LoaderOptions(group=group, once=True, install_signal_handlers=False, idle_exit_s=5),
                       settings)
    return run_ids


def transform_until_idle(t: Transformer, conn, run_ids: list[int], timeout: float = 180.0) -> None:
    """Step the consumer until every given run was transformed (and nothing is pending)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t.step()
        done = {r[0] for r in conn.execute("SELECT DISTINCT unnest(trigger_run_ids) FROM etl.dw_transform_runs")}
        if set(run_ids) <= done and not t.pending.runs:
            return
    raise AssertionError(f"runs {run_ids} not transformed in {timeout:g} s; pending {t.pending.runs}")


def test_simulator_to_gold_and_one_new_version_per_status_change(tx, pipeline_env, sim, unique) -> None:
    s = pipeline_env
    group = f"loader-e2e{unique}"
    t = Transformer(s, load_transform_settings(group_id=f"transformer-e2e{unique}", coalesce_seconds=0.5,
                                               poll_interval_seconds=0.2))
    t.open()
    try:
        run_ids: list[int] = []
        for stage in STAGES:
            run_ids += extract_and_load(s, stage, group)
        transform_until_idle(t, tx, run_ids)
        failed = [(r.procedure, r.error) for b in t.batches for r in b.procedures if r.status != "success"]
        assert not failed, failed

        # the warehouse reconciles with the simulator's ground truth
        def truth(job: int) -> list[dict]:
            return [e["record"] for e in sim.expected(job=job)]

        studies, subjects, visits = truth(2), truth(10), truth(9)
        assert scalar(tx, "SELECT count(*) FROM silver.dim_studies WHERE is_current AND NOT is_deleted") == len(studies)
        assert scalar(tx, "SELECT count(*) FROM silver.dim_subjects WHERE is_current AND NOT is_deleted") == len(subjects)
        assert scalar(tx, "SELECT count(*) FROM silver.fact_enrollment") == len(subjects)
        assert scalar(tx, "SELECT count(*) FROM silver.fact_visit_timelines") == len(visits)
        assert scalar(tx, "SELECT count(*) FROM silver.dim_sites") == len(truth(1))
        assert scalar(tx, "SELECT count(*) FROM silver.dim_patients") == len(truth(3))
        completed = [e for e in truth(24) if e.get("completedOn")]
        assert scalar(tx, "SELECT count(*) FROM silver.fact_element_completions") == len(completed)
        assert scalar(tx, "SELECT count(*) FROM silver.fact_element_completions WHERE subject_key IS NULL") == 0
        assert scalar(tx, "SELECT sum(total_subjects) FROM gold.v_study_enrollment_summary") == len(subjects)
        assert scalar(tx, "SELECT sum(visits_due) FROM gold.mv_study_performance_metrics") == len(
            [v for v in visits if v.get("targetDueDate")])
        by_status: dict[str, int] = {}
        for sub in subjects:
            by_status[sub["status"]] = by_status.get(sub["status"], 0) + 1
        got = {r["subject_status"]: r["n"] for r in rows(
            tx, "SELECT subject_status, sum(subject_count) AS n FROM gold.v_subject_status_summary GROUP BY 1")}
        assert got == by_status
        # every error-severity check passed on the pipeline's data
        assert rows(tx, "SELECT check_name, failed_rows, sample_keys FROM etl.v_quality_latest "
                        "WHERE severity = 'error' AND status IN ('fail', 'error')") == []

        # a study's status changes in the source
        sid = next(st["id"] for st in studies if any(sub["study"]["id"] == st["id"] for sub in subjects))
        before = next(st for st in studies if st["id"] == sid)
        sim.mutate("studies", modify_ids=[sid])
        after = next(e["record"] for e in sim.expected(job=2) if e["record"]["id"] == sid)
        assert after["status"] != before["status"]
        run_ids = extract_and_load(s, [2], group, mode="incremental")
        transform_until_idle(t, tx, run_ids)

        v = rows(tx, "SELECT study_status, effective_start_date, effective_end_date, is_current FROM silver.dim_studies "
                     "WHERE source_id = %s ORDER BY study_key", f"cc1:{sid}")
        assert [x["study_status"] for x in v] == [before["status"], after["status"]]
        changed_at = datetime.fromisoformat(after["lastUpdatedOn"].replace("Z", "+00:00"))
        assert v[0]["effective_end_date"] == v[1]["effective_start_date"] == changed_at
        assert [x["is_current"] for x in v] == [False, True]
        assert scalar(tx, "SELECT count(*) FROM silver.dim_studies") == len(studies) + 1
        assert scalar(tx, "SELECT count(*) FROM (SELECT source_id FROM silver.dim_studies WHERE is_current "
                          "GROUP BY source_id HAVING count(*) > 1) d") == 0
        assert rows(tx, "SELECT study_status FROM gold.v_study_enrollment_summary WHERE study_source_id = %s",
                    f"cc1:{sid}") == [{"study_status": after["status"]}]
    finally:
        t.close()

    # and running the whole transform again changes nothing
    runner = ProcedureRunner(s, load_transform_settings())
    try:
        tx.execute("SELECT etl.reset_transform_watermarks()")
        batch = runner.run_batch(runner.plan.all(), trigger="manual")
        assert not batch.failed
        changed = {r.procedure: r.counts for r in batch.procedures
                   if not r.procedure.startswith("gold.refresh_mv_") and any(r.counts.values())}
        assert changed == {}
    finally:
        runner.close()
