"""`trialsync run` against real services: dependency order with load barriers, parallelism,
automatic and manual retries of partial runs (only failed parents), skipped children, timeouts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.orch_pipeline import (
    Pipeline,
    pipeline,  # noqa: F401 - fixture
    reconcile,
    require_pipeline_modules,
    set_env,
)

pytestmark = pytest.mark.integration
require_pipeline_modules()


@pytest.fixture(scope="module")
def sim() -> Iterator[Any]:
    from simulator.testing import SimulatorProcess

    with SimulatorProcess(scale=0.002, seed=11, api_key="orch-test-key") as s:
        yield s


def run(job_refs: list[int], with_deps: bool = True, **opts: Any) -> Any:
    from common.catalog import load_catalog
    from common.config import get_settings
    from orchestrator.dag import build_plan, select_jobs
    from orchestrator.runner import RunnerOptions, run_plan

    s = get_settings()
    catalog = load_catalog(s)
    plan = build_plan(catalog, select_jobs(catalog, job_refs=job_refs, with_deps=with_deps))
    opts.setdefault("wait_all_loads", True)
    return catalog, run_plan(plan, options=RunnerOptions.from_settings(s, **opts), settings=s)


def runs_of(p: Pipeline, oid: str) -> list[dict[str, Any]]:
    with p.conn() as c:
        cur = c.execute(
            """SELECT id, job_id, run_status, mode, attempt, parent_run_id, started_at, completed_at,
                      load_completed_at, parents_total, api_calls, error_class, error_message,
                      run_context -> 'failed_parents' AS failed_parents, pid
                 FROM etl.dw_etl_runs WHERE orchestration_id = %s ORDER BY id""", (oid,))
        cols = [d.name for d in cur.description or []]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def test_dependency_order_load_barrier_parallelism_and_exact_data(pipeline: Pipeline) -> None:  # noqa: F811
    catalog, res = run([160, 175, 13, 1, 8, 26, 32, 33], parallel=3)
    assert res.status == "success", {j: (s.status, s.error, s.reason) for j, s in res.jobs.items()}
    plan = res.plan
    assert {2, 10, 11} <= set(plan.job_ids)  # ancestors came with --with-deps
    rows = {r["job_id"]: r for r in runs_of(pipeline, res.orchestration_id)}
    assert set(rows) == set(plan.job_ids)
    edges = [(p, c) for c in plan.job_ids for p in plan.parents[c]]
    assert edges, "the plan has dependencies"
    for p, c in edges:
        parent, child = rows[p], rows[c]
        assert parent["load_completed_at"] is not None, f"parent {p} never marked loaded"
        assert child["started_at"] >= parent["load_completed_at"], (
            f"job {c} started at {child['started_at']} before parent {p} was loaded at {parent['load_completed_at']}")
    # at most 3 extractions at once, and independent jobs did overlap
    events = sorted([(r["started_at"], 1) for r in rows.values()] + [(r["completed_at"], -1) for r in rows.values()],
                    key=lambda e: (e[0], e[1]))
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    assert 2 <= peak <= 3
    with pipeline.conn() as c:
        assert reconcile(c, pipeline.sim, catalog, plan.job_ids) == {}


def test_partial_run_is_retried_for_its_failed_parents_only(pipeline: Pipeline,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch, ETL_MAX_RETRIES="2")
    studies = sorted({int(x["params"]["studyId"]) for x in pipeline.sim.expected(job=10)})[:2]
    assert len(studies) == 2
    # each failing call is tried 1 + ETL_MAX_RETRIES = 3 times by the client: the first attempt of
    # the run fails for these two studies, the orchestrator's retry finds them healthy
    pipeline.sim.set_faults(";".join(f"500@/api/v1/studies/{sid}/subjects/odata,count=3" for sid in studies))
    catalog, res = run([10])
    assert res.jobs[10].status == "success", (res.jobs[10].error, res.jobs[10].statuses)
    runs = [r for r in runs_of(pipeline, res.orchestration_id) if r["job_id"] == 10]
    assert [(r["attempt"], r["run_status"]) for r in runs] == [(1, "partial"), (2, "success")]
    first, second = runs
    assert sorted(int(fp["studyId"]) for fp in first["failed_parents"]) == studies
    assert second["mode"] == "retry" and second["parent_run_id"] == first["id"]
    assert second["parents_total"] == 2 and second["api_calls"] == 2  # only the failed parents
    assert first["parents_total"] > 2
    with pipeline.conn() as c:
        assert reconcile(c, pipeline.sim, catalog, [2, 10]) == {}


def test_manual_retry_redoes_only_failed_parents(pipeline: Pipeline) -> None:  # noqa: F811
    studies = sorted({int(x["params"]["studyId"]) for x in pipeline.sim.expected(job=10)})
    bad = studies[-1]
    pipeline.sim.set_faults(f"500@/api/v1/studies/{bad}/subjects/odata")
    catalog, res = run([10])
    assert res.jobs[10].status == "partial"
    rows = runs_of(pipeline, res.orchestration_id)
    (partial,) = [r for r in rows if r["job_id"] == 10]
    (studies_run,) = [r for r in rows if r["job_id"] == 2]
    pipeline.sim.clear_faults()
    with pipeline.conn() as c:
        assert reconcile(c, pipeline.sim, catalog, [2, 10]) != {}  # the failed study's subjects are missing
    done = pipeline.cli("retry", "--run-id", str(partial["id"]), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    with pipeline.conn() as c:
        row = c.execute("""SELECT run_status, mode, parent_run_id, parents_total, attempt FROM etl.dw_etl_runs
                            WHERE parent_run_id = %s""", (partial["id"],)).fetchone()
        assert row == ("success", "retry", partial["id"], 1, 2)
    wait_loaded = pipeline.cli("run", "--job", "10", "--wait-load", "--json")  # incremental top-up, waits for load
    assert wait_loaded.returncode == 0, wait_loaded.stderr[-2000:]
    with pipeline.conn() as c:
        assert reconcile(c, pipeline.sim, catalog, [2, 10]) == {}
    again = pipeline.cli("retry", "--run-id", str(studies_run["id"]))
    assert again.returncode == 2 and "succeeded: nothing to retry" in again.stderr


def test_failed_parent_skips_children_with_reason(pipeline: Pipeline) -> None:  # noqa: F811
    pipeline.sim.set_faults("500@/api/v1/studies/odata")
    _, res = run([10, 11])
    assert res.jobs[2].status == "failed"
    assert res.jobs[10].status == "skipped" and res.jobs[11].status == "skipped"
    rows = runs_of(pipeline, res.orchestration_id)
    skipped = [r for r in rows if r["job_id"] in (10, 11)]
    assert [r["run_status"] for r in skipped] == ["skipped", "skipped"]
    for r in skipped:
        assert "parent job 2 (Studies) failed" in r["error_message"]
    # job 164 fills the same staging table from another endpoint: it ran, so the run is partial
    assert res.jobs[164].status == "success" and res.status == "partial"


def test_timeout_stops_the_job_and_marks_it_failed(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    import time

    from common.stack import pid_alive

    set_env(monkeypatch, ETL_TIMEOUT_SECONDS="2", ETL_TIMEOUT_GRACE_SECONDS="1")
    pipeline.sim.set_faults("latency@/api/v1/sites,ms=60000")
    t0 = time.monotonic()
    _, res = run([1], with_deps=False)
    elapsed = time.monotonic() - t0
    assert res.jobs[1].status == "failed"
    (row,) = runs_of(pipeline, res.orchestration_id)
    assert row["run_status"] == "failed"
    assert "timeout of 2 s" in row["error_message"]
    assert row["error_class"] in ("JobTimeout", "TimeoutError")  # killed by the runner, or stopped itself
    assert elapsed < 45  # nowhere near the 60 s the API would have taken
    assert row["pid"] is None or not pid_alive(row["pid"])


def test_csv_source_runs_through_extract_topic_load(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                                    tmp_path: Any) -> None:
    """Seed 004's second kind of source: the clinical-trials CSV shipped in data/, as job 1001."""
    import csv

    from tests.integration.orch_pipeline import REPO

    csv_path = REPO / "data" / "clinical_trials.csv"
    jobs_file = tmp_path / "jobs.yaml"
    jobs_file.write_text(
        (REPO / "config" / "jobs.yaml").read_text(encoding="utf-8")
        + "sources:\n  - id: 1001\n    name: Clinical Trials CSV\n    source_type: csv\n"
        f"    path: {csv_path}\n    target_table: raw_clinical_trials_staging\n    key_column: nct_number\n"
        "    delimiter: ','\n", encoding="utf-8")
    set_env(monkeypatch, ETL_JOBS_FILE=str(jobs_file))
    from common.catalog import load_catalog, sync

    sync(load_catalog())
    done = pipeline.cli("run", "--job", "1001", "--wait-load", "--json", extra_env={"ETL_JOBS_FILE": str(jobs_file)})
    assert done.returncode == 0, done.stderr[-2000:]
    with csv_path.open(newline="", encoding="utf-8") as f:
        want = {f"cc1:{row['nct_number']}": row for row in csv.DictReader(f)}
    with pipeline.conn() as c:
        rows = c.execute("SELECT source_id, data FROM bronze.raw_clinical_trials_staging").fetchall()
    assert {r[0] for r in rows} == set(want) and len(rows) == len(want) == 50
    sid, data = rows[0]
    assert data["title"] == want[sid]["title"] and data["enrollment"] == want[sid]["enrollment"]
