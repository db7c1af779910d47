"""A night's call budget: a first load too big for one night spreads over several, each night's data
consistent and complete for what it asked, changed parents first; the orchestration's ledger gives
changed parents of every job priority over sweeps and first passes; ``run --dry-run`` says what a
night costs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from common import kafka as K
from common.catalog import load_catalog, sync
from common.config import Settings
from common.db import connect, migrate
from producers.call_plan import CallEstimate, LedgerBudget, open_night
from producers.extractor import run_job
from simulator.testing import SimulatorProcess
from tests.integration.extract_helpers import ExtractEnv, expected_by_key, read_topic, run_row
from tests.integration.orch_pipeline import Pipeline, pipeline  # noqa: F401 - the fixture
from tests.loader_support import load_once

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(scale=0.002, seed=23, api_key="it-budget-Zx8") as s:
        yield s


@pytest.fixture
def env(sim: SimulatorProcess, fresh_db: str, unique: str) -> Iterator[Settings]:
    migrate()
    sync(load_catalog())
    with ExtractEnv(sim, f"bg{unique}", CC_INCREMENTAL_OVERLAP_SECONDS="0", ETL_FANOUT_INCREMENTAL="changed") as s:
        yield s


def studies_night(env: Settings) -> None:
    studies = load_catalog(env).get(2)
    assert run_job(studies, mode="incremental", settings=env).status == "success"
    load_once(env, "bg-loader", [studies.target_table], batch_size=5000)


def test_a_first_load_spreads_over_nights_changed_parents_first(env: Settings, sim: SimulatorProcess) -> None:
    subjects = load_catalog(env).get(10)
    studies_night(env)
    runs, fans = [], []
    for night in range(50):
        if night == 1:  # between two nights, some subjects change (and CC touches their studies)
            change = sim.mutate("subjects", modify_count=5, touch_parents=True)
            assert change["modified"]
            studies_night(env)
        r = run_job(subjects, mode="incremental", settings=env, max_calls=40)
        f = run_row(env, r.run_id)["run_context"]["fanout"]
        runs.append(r)
        fans.append(f)
        assert r.status == "success" and r.api_calls <= 40
        if f["first_pass"]["done"]:
            break
    assert len(runs) > 3, "the budget should have spread the first pass over several nights"
    # every night stopped at the budget and said what it left
    for f in fans[:-1]:
        assert f["budget"]["max_calls"] == 40 and f["budget"]["parents_left"]["unfinished"] > 0
    # the pass moved forward night by night, through every parent once
    afters = [tuple(f["first_pass"]["after"]) for f in fans if f["first_pass"]["after"]]
    assert afters == sorted(afters) and len(set(afters)) == len(afters)
    # the changed studies came first the night after the change (before the pass continued)
    f1 = fans[1]
    assert f1["parents_changed"] > 0 and f1["asked"] == "first_pass"
    # and nothing is missing: the nights together published every subject, in its latest version
    published: dict[str, object] = {}
    for m in read_topic(env, K.bronze_topic(subjects.target_table, env)):
        published[m.key] = m.value
    truth = expected_by_key(sim, subjects)
    assert set(published) == set(truth)
    assert all(published[k] == truth[k][-1] for k in truth)
    # the first pass is done: the next night, unbudgeted, asks every parent until the job has seen
    # CC announce its changes (the assumption the `changed` policy relies on)
    nxt = run_job(subjects, mode="incremental", settings=env)
    f = run_row(env, nxt.run_id)["run_context"]["fanout"]
    assert f["asked"] == "verify" and "budget" not in f and nxt.parents_total == f["parent_rows"]


def test_the_ledger_keeps_room_for_the_changed_parents_of_jobs_still_to_run(env: Settings) -> None:
    catalog = load_catalog(env)
    oid = str(uuid.uuid4())
    with connect(env, autocommit=True) as conn:
        open_night(conn, oid, 100, [CallEstimate(10, "Subjects", "fan-out", 500, 80, by_reason={"changed": 0}),
                                    CallEstimate(11, "Visits", "fan-out", 500, 60, by_reason={"changed": 30})])
        first = LedgerBudget.of(conn, oid)
        assert first is not None
        # job 10 wants 80 calls of first pass: it may take only what job 11's changed parents leave
        assert first.claim(catalog.get(10), changed=0, others=80) == 70
        first.settle(catalog.get(10), 70, {"unfinished": 10})
        second = LedgerBudget.of(conn, oid)
        assert second is not None
        assert second.claim(catalog.get(11), changed=30, others=30) == 30  # its changed parents, nothing more
        second.settle(catalog.get(11), 25)  # 5 unused come back
        row = conn.execute("SELECT budget, reserved, planned, claims FROM etl.dw_call_budgets "
                           "WHERE orchestration_id = %s", (oid,)).fetchone()
    assert row[0] == 100 and row[1] == 95 and row[2] == {}
    assert row[3]["10"] == {"granted": 70, "used": 70, "left": {"unfinished": 10}}


def test_orchestrated_night_claims_from_its_budget_and_dry_run_shows_the_cost(pipeline: Pipeline) -> None:  # noqa: F811
    budget_env = {"ETL_CALL_BUDGET": "25", "ETL_PARALLEL_JOBS": "2"}
    proc = pipeline.cli("run", "-j", "10", "--with-deps", "--wait-load", "--json", extra_env=budget_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with pipeline.conn() as conn:
        budget, reserved, claims = conn.execute(
            "SELECT budget, reserved, claims FROM etl.dw_call_budgets ORDER BY created_at DESC LIMIT 1").fetchone()
        calls = dict(conn.execute("SELECT job_id, api_calls FROM etl.dw_etl_runs").fetchall())
    # every job of the night settled its calls; the first pass of job 10 took what the others left
    assert budget == 25 and {"2", "10"} <= set(claims) and {int(k) for k in claims} == set(calls)
    assert all(c["used"] == calls[int(k)] for k, c in claims.items())
    assert claims["10"]["granted"] == calls[10] > 0 and claims["10"]["left"]["unfinished"] > 0
    assert reserved == sum(calls.values()) == 25
    plan = pipeline.cli("run", "-j", "10", "--with-deps", "--dry-run", extra_env={**budget_env, "COLUMNS": "200"})
    assert plan.returncode == 0, plan.stderr
    assert "calls full" in plan.stdout and "unfinished" in plan.stdout
    assert "the night's budget: 25 calls" in plan.stdout and "left for the next night" in plan.stdout
