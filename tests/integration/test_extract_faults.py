"""A bad night: throttling and server-error storms, a refused key, missing parents, invalid
endpoints, malformed pages, records without ids -- against the real simulator's fault injection."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from common import kafka as K
from common.catalog import load_catalog, sync
from common.config import Settings
from common.db import connect, migrate
from producers.extractor import run_job
from simulator.testing import SimulatorProcess
from tests.integration.extract_helpers import (
    ExtractEnv,
    expected_by_key,
    read_topic,
    run_row,
    seed_parents_from_sim,
    truncate,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
KEY = "it-faults-key-Hn4Jx9Lq"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(scale=0.002, seed=42, api_key=KEY) as s:
        yield s


@pytest.fixture
def env(sim: SimulatorProcess, fresh_db: str, unique: str, request: pytest.FixtureRequest) -> Iterator[Settings]:
    sim.clear_faults()
    migrate()
    sync(load_catalog())
    # the storm fails ~36% of requests: with 6 retries a request exhausts them with p = 0.36^7 ~ 8e-4,
    # i.e. about one run in four of ~700 requests would end partial by chance; 12 retries make it 2e-6
    retries = "12" if "storm" in request.node.name else "6"
    with ExtractEnv(sim, f"t{unique}", ETL_MAX_RETRIES=retries) as s:
        yield s
    sim.clear_faults()


def run_keys(settings: Settings, table: str, run_id: int) -> Counter:
    return Counter(m.key for m in read_topic(settings, K.bronze_topic(table, settings))
                   if m.headers.get(K.H_RUN_ID) == str(run_id))


# 429/503 carry Retry-After >= 1 s from the simulator, and a 429 pauses every worker (the limit is per
# key): keep them rarer than the errors that are retried after a short backoff.
STORM = ("429,p=0.03;503,p=0.01;500,p=0.12;502,p=0.05;reset,p=0.05;truncate,p=0.05;malformed,p=0.05")


# the threads engine drives the same fetch core as async (producers/fetch.py): its storm runs in
# `make test-heavy` to keep `make test` under 25 minutes on two cores
@pytest.mark.parametrize("engine", ["async", pytest.param("threads", marks=pytest.mark.heavy)])
def test_storm_of_429_and_5xx_still_gives_complete_data(env: Settings, sim: SimulatorProcess, engine: str) -> None:
    catalog = load_catalog(env)
    truncate(env, "dim_studies_staging")
    seed_parents_from_sim(env, sim, 2, "dim_studies_staging")
    sim.set_faults(STORM)
    for job_id in (9, 10):
        job = catalog.get(job_id)
        r = run_job(job, mode="full", engine=engine, settings=env)
        assert r.status == "success", (job_id, r.error)
        assert run_keys(env, job.target_table, r.run_id) == Counter({k: 1 for k in expected_by_key(sim, job)})
        assert run_row(env, r.run_id)["run_context"]["retries"] > 0
    fired = sim.faults_status()["injected"]
    assert fired.get("429", 0) > 0 and fired.get("500", 0) > 0 and fired.get("reset", 0) > 0


def test_refused_key_fails_fast_with_a_clear_message(env: Settings, sim: SimulatorProcess) -> None:
    truncate(env, "dim_studies_staging")
    seed_parents_from_sim(env, sim, 2, "dim_studies_staging")
    os.environ["CC_API_KEY"] = "wrong-key-Zz0"
    from common import config

    config.reset_settings()
    s = config.get_settings()
    for job_id in (9, 10):
        r = run_job(load_catalog(s).get(job_id), mode="full", settings=s, workers=4)
        assert r.status == "failed" and r.error_class == "AuthError"
        assert "the API key was refused: check CC_API_KEY / CC_API_KEY_HEADER" in r.error
        assert "HTTP 401" in r.error and sim.base_url in r.error
        assert r.api_calls <= 4  # fail fast: no retries, no walking through 315 parents
        row = run_row(s, r.run_id)
        assert row["run_status"] == "failed" and "the API key was refused" in row["error_message"]


def test_refused_key_cli_exit_code_and_no_key_in_output(env: Settings, sim: SimulatorProcess) -> None:
    bad = "wrong-key-Cv7Bn2Mm"
    e = {**os.environ, "CC_API_KEY": bad, "LOG_FORMAT": "json"}
    p = subprocess.run([sys.executable, "-m", "common.cli", "extract", "--job", "9", "--full"], cwd=REPO, env=e,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert "the API key was refused: check CC_API_KEY / CC_API_KEY_HEADER" in p.stdout + p.stderr
    assert bad not in p.stdout + p.stderr


def test_missing_parents_are_skipped_reported_and_retried(env: Settings, sim: SimulatorProcess) -> None:
    catalog = load_catalog(env)
    job = catalog.get(10)
    truncate(env, "dim_studies_staging")
    seed_parents_from_sim(env, sim, 2, "dim_studies_staging")
    studies = sorted(int(p["studyId"]) for p in sim.parents(job.endpoint))
    broken = [str(studies[3]), str(studies[40])]
    # two real parents fail for good (500 on their concrete path), others answer
    sim.set_faults(";".join(f"500@/api/v1/studies/{sid}/subjects/odata" for sid in broken))
    r = run_job(job, mode="full", settings=env, workers=4)
    assert r.status == "partial"
    assert sorted(p["studyId"] for p in r.failed_parents) == broken
    assert r.parents_failed == 2 and r.parents_done == r.parents_total == len(studies)
    row = run_row(env, r.run_id)
    assert row["run_status"] == "partial" and row["parents_failed"] == 2
    assert sorted(p["studyId"] for p in row["run_context"]["failed_parents"]) == broken
    assert {e["error_class"] for e in row["run_context"]["failed_parent_errors"]} == {"ServerError"}
    expected = expected_by_key(sim, job)
    got = run_keys(env, job.target_table, r.run_id)
    missing = {k for k, recs in expected.items() if str(recs[0]["study"]["id"]) in broken}
    assert set(got) == set(expected) - missing and set(got.values()) == {1}
    with connect(env, autocommit=True) as conn:
        assert conn.execute("SELECT last_success_at FROM etl.dw_etl_jobs WHERE id = 10").fetchone()[0] is None

    # the retry redoes only the failed parents
    sim.clear_faults()
    sim.reset_stats()
    r2 = run_job(job, mode="full", settings=env, only_parents=row["run_context"]["failed_parents"],
                 parent_run_id=r.run_id)
    assert r2.status == "success" and r2.parents_total == 2 and r2.api_calls == 2
    assert sim.requests_to(job.endpoint) == 2
    assert run_row(env, r2.run_id)["mode"] == "retry"
    assert set(got) | set(run_keys(env, job.target_table, r2.run_id)) == set(expected)


def test_parents_that_do_not_exist_answer_404_and_are_skipped(env: Settings, sim: SimulatorProcess) -> None:
    job = load_catalog(env).get(10)
    truncate(env, "dim_studies_staging")
    seed_parents_from_sim(env, sim, 2, "dim_studies_staging")
    with connect(env, autocommit=True) as conn:  # two studies deleted in CC but still in staging
        conn.execute("""INSERT INTO bronze.dim_studies_staging (source_id, data)
                        VALUES ('cc1:99999901', '{"id": 99999901}'), ('cc1:99999902', '{"id": 99999902}')""")
    r = run_job(job, mode="full", settings=env)
    assert r.status == "partial"
    assert r.failed_parents == [{"studyId": "99999901"}, {"studyId": "99999902"}]
    errors = run_row(env, r.run_id)["run_context"]["failed_parent_errors"]
    assert {(e["error_class"], e["status"]) for e in errors} == {("NotFoundError", 404)}


def test_endpoint_answering_404_for_every_parent_fails_the_run(env: Settings, sim: SimulatorProcess) -> None:
    job = load_catalog(env).get(10).model_copy(update={"endpoint": "/api/v1/studies/{studyId}/screenings/odata"})
    truncate(env, "dim_studies_staging")
    seed_parents_from_sim(env, sim, 2, "dim_studies_staging")
    r = run_job(job, mode="full", settings=env, workers=2)
    assert r.status == "failed"
    assert "the endpoint itself looks invalid" in r.error and "/screenings/odata" in r.error
    assert r.api_calls < 40  # stops after the probe instead of trying all 315 parents


@pytest.mark.parametrize(("endpoint", "status", "cls"), [("/api/v1/users/odata", 404, "NotFoundError"),
                                                          ("/api/v1/engagements/odata", 501, "NotImplementedApiError")])
def test_whole_endpoint_404_or_501_fails_with_url_and_status(env: Settings, sim: SimulatorProcess, endpoint: str,
                                                            status: int, cls: str) -> None:
    job = load_catalog(env).get(9).model_copy(update={"endpoint": endpoint})
    r = run_job(job, mode="full", settings=env)
    assert r.status == "failed" and r.error_class == cls
    assert f"HTTP {status}" in r.error and f"{sim.base_url}{endpoint}" in r.error
    assert KEY not in r.error and r.api_calls == 1


def test_malformed_pages_are_retried_then_reported(env: Settings, sim: SimulatorProcess) -> None:
    job = load_catalog(env).get(9)
    sim.set_faults("malformed@/api/v1/patient-visits/odata,count=2")
    r = run_job(job, mode="full", settings=env)
    assert r.status == "success"
    assert run_keys(env, job.target_table, r.run_id) == Counter({k: 1 for k in expected_by_key(sim, job)})
    assert run_row(env, r.run_id)["run_context"]["retries"] == 2

    sim.set_faults("malformed@/api/v1/patient-visits/odata,after=1")
    r = run_job(job, mode="full", settings=env)
    assert r.status == "failed" and r.error_class == "MalformedResponseError"
    assert "not valid JSON" in r.error and "after 7 attempts" in r.error  # ETL_MAX_RETRIES=6
    row = run_row(env, r.run_id)
    assert row["run_status"] == "failed" and row["error_class"] == "MalformedResponseError"
    with connect(env, autocommit=True) as conn:  # a failed run never moves the watermark
        wm = conn.execute("SELECT run_id FROM etl.dw_etl_watermarks WHERE job_id = 9").fetchone()
        assert wm is None or wm[0] != r.run_id


def test_record_without_id_is_published_with_null_key_and_counted(env: Settings, sim: SimulatorProcess) -> None:
    job = load_catalog(env).get(9)
    sim.set_faults("no_id@/api/v1/patient-visits/odata,count=1")
    r = run_job(job, mode="full", settings=env)
    assert r.status == "success" and r.records_missing_key == 1
    keys = run_keys(env, job.target_table, r.run_id)
    assert keys[None] == 1
    assert run_row(env, r.run_id)["run_context"]["records_missing_key"] == 1


def test_page_with_a_repeated_record_publishes_it_once(env: Settings, sim: SimulatorProcess) -> None:
    job = load_catalog(env).get(9)
    sim.set_faults("duplicate@/api/v1/patient-visits/odata,after=1,count=2")
    r = run_job(job, mode="full", settings=env)
    assert r.status == "success"
    assert run_keys(env, job.target_table, r.run_id) == Counter({k: 1 for k in expected_by_key(sim, job)})
    assert run_row(env, r.run_id)["run_context"]["records_repeated_in_page"] == 2


def test_api_key_never_reaches_logs_errors_records_or_metrics(env: Settings, sim: SimulatorProcess) -> None:
    truncate(env, "dim_studies_staging")
    seed_parents_from_sim(env, sim, 2, "dim_studies_staging")
    with connect(env, autocommit=True) as conn:  # a parent that answers 404: its id must not become a label
        conn.execute("""INSERT INTO bronze.dim_studies_staging (source_id, data) VALUES ('cc1:99999901', '{"id": 99999901}')""")
    sim.set_faults("500,p=0.2;reset,p=0.05")
    e = {**os.environ, "LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG"}
    p = subprocess.run([sys.executable, "-m", "common.cli", "extract", "--job", "10", "--full", "--json"], cwd=REPO,
                       env=e, capture_output=True, text=True, timeout=300)
    assert '"event": "api_retry"' in p.stderr or '"event":"api_retry"' in p.stderr
    assert KEY not in p.stdout and KEY not in p.stderr
    with connect(env, autocommit=True) as conn:
        for (text,) in conn.execute("SELECT concat_ws(' ', error_message, run_context::text) FROM etl.dw_etl_runs"):
            assert KEY not in text
    msgs = read_topic(env, K.bronze_topic("dim_subjects_staging", env)) + read_topic(env, K.control_topic(env))
    assert msgs and all(KEY not in str(m.headers) and KEY not in str(m.value) for m in msgs)
    run_job(load_catalog(env).get(9), mode="full", settings=env)  # in-process, for the registry
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            assert all(KEY not in str(v) and "99999901" not in str(v) for v in sample.labels.values())
