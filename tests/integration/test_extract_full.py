"""Full extraction runs against the real simulator, real broker and real PostgreSQL: every record
of an entity exactly once, with its headers, run bookkeeping and control messages."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from common import kafka as K
from common.catalog import load_catalog, sync
from common.config import Settings
from common.db import connect, migrate
from producers.extractor import run_job
from producers.watermarks import max_timestamp
from simulator.testing import SimulatorProcess
from tests.integration.extract_helpers import (
    ExtractEnv,
    control_messages,
    expected_by_key,
    read_topic,
    run_row,
    seed_parents_from_sim,
    truncate,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(scale=0.002, seed=42, api_key="it-full-key-5Rt8") as s:
        yield s


@pytest.fixture
def env(sim: SimulatorProcess, fresh_db: str, unique: str) -> Iterator[Settings]:
    migrate()
    sync(load_catalog())
    with ExtractEnv(sim, f"t{unique}") as s:
        yield s


def messages_of_run(settings: Settings, table: str, run_id: int) -> list:
    return [m for m in read_topic(settings, K.bronze_topic(table, settings))
            if m.headers.get(K.H_RUN_ID) == str(run_id)]


@pytest.mark.parametrize("engine", ["async", "threads"])
def test_paged_entity_is_published_exactly_once(env: Settings, sim: SimulatorProcess, engine: str) -> None:
    job = load_catalog(env).get(9)
    sim.reset_stats()
    r = run_job(job, mode="full", engine=engine, settings=env)
    assert r.status == "success", r.error
    expected = expected_by_key(sim, job)
    msgs = read_topic(env, K.bronze_topic(job.target_table, env))
    keys = Counter(m.key for m in msgs)
    assert len(expected) > 4000 and set(keys.values()) == {1}
    assert set(keys) == set(expected)
    assert r.records_published == r.records_extracted == len(expected)
    assert r.api_calls == sim.requests_to("/api/v1/patient-visits/odata") == 5
    for m in msgs:
        assert m.value == expected[m.key][0]  # the raw record, unchanged
        h = m.headers
        assert (h[K.H_JOB_ID], h[K.H_RUN_ID], h[K.H_INSTANCE]) == ("9", str(r.run_id), "cc1")
        assert h[K.H_MODIFIED_AT] == m.value["modifiedDate"]
        assert K.H_PARAMS not in h
        datetime.fromisoformat(h[K.H_EXTRACTED_AT])
    last = {}
    for m in msgs:
        last[m.partition] = max(last.get(m.partition, -1), m.offset)
    assert r.end_offsets == last
    assert sum(r.records_per_partition.values()) == len(expected)

    row = run_row(env, r.run_id)
    assert row["run_status"] == "success" and row["mode"] == "full" and row["completed_at"] is not None
    assert (row["records_extracted"], row["records_published"], row["api_calls"]) == (len(expected), len(expected), 5)
    ctx = row["run_context"]
    assert ctx["topic"] == K.bronze_topic(job.target_table, env)
    assert ctx["end_offsets"] == {str(p): o for p, o in last.items()}
    assert ctx["failed_parents"] == [] and ctx["engine"] == engine
    assert row["watermark_to"] == max_timestamp(m.value["modifiedDate"] for m in msgs)
    assert row["records_loaded"] == 0 and row["load_completed_at"] is None  # the loader's columns

    started, finished = control_messages(env, r.run_id)
    assert started.type == "run_started" and started.target_table == job.target_table
    assert finished.type == "run_finished" and finished.status == "success"
    assert finished.end_offsets == last and finished.records_published == len(expected)
    assert finished.records_per_partition == r.records_per_partition

    with connect(env, autocommit=True) as conn:
        jr = conn.execute("SELECT last_run_id, last_run_status, last_run_records, last_success_at "
                          "FROM etl.dw_etl_jobs WHERE id = 9").fetchone()
        assert jr[:3] == (r.run_id, "success", len(expected)) and jr[3] is not None
        wm = conn.execute("SELECT value FROM etl.dw_etl_watermarks WHERE job_id = 9 AND parent_key = ''").fetchone()
        assert wm[0] == row["watermark_to"]


def test_every_plain_job_matches_the_ground_truth(env: Settings, sim: SimulatorProcess) -> None:
    """All runnable non-parameterized API jobs: every response shape (arrays, PageResult, objects,
    plain strings, composite keys) lands as exactly the records the API serves."""
    catalog = load_catalog(env)
    jobs = [j for j in catalog.runnable if not j.requires_parameters and j.source_type == "cc_api"]
    assert len(jobs) > 30
    runs = {}
    for job in jobs:
        r = run_job(job, mode="full", settings=env)
        assert r.status == "success", (job.id, r.error)
        runs[job.id] = r
    by_table: dict[str, list] = {}
    for job in jobs:
        if job.target_table not in by_table:
            by_table[job.target_table] = read_topic(env, K.bronze_topic(job.target_table, env))
    for job in jobs:
        r = runs[job.id]
        expected = expected_by_key(sim, job)
        got = Counter(m.key for m in by_table[job.target_table] if m.headers.get(K.H_RUN_ID) == str(r.run_id))
        assert None not in expected, f"job {job.id}: ground truth has records without a key"
        assert set(got.values()) <= {1}, f"job {job.id}: repeated keys"
        assert set(got) == set(expected), f"job {job.id} ({job.endpoint})"
        assert r.records_published == len(expected)


def test_parameterized_jobs_cover_every_parent(env: Settings, sim: SimulatorProcess) -> None:
    catalog = load_catalog(env)
    truncate(env, "dim_studies_staging", "dim_visits_staging", "dim_subjects_staging")
    n_studies = seed_parents_from_sim(env, sim, 2, "dim_studies_staging")
    assert n_studies == 315
    for job_id in (10, 11):
        job = catalog.get(job_id)
        sim.reset_stats()
        r = run_job(job, mode="full", settings=env)
        assert r.status == "success", r.error
        assert r.parents_total == r.parents_done == n_studies and r.parents_failed == 0
        assert sim.requests_to(job.endpoint) == n_studies  # one call per parent: no extra pages
        msgs = messages_of_run(env, job.target_table, r.run_id)
        expected = expected_by_key(sim, job)
        assert Counter(m.key for m in msgs) == Counter({k: 1 for k in expected})
        for m in msgs:
            assert m.value == expected[m.key][0]
            assert m.headers[K.H_PARAMS] == f'{{"studyId":"{m.value["study"]["id"]}"}}'

    # nested parameters from one parent row: 175 (study -> visit) and 160 (study -> subject)
    seed_parents_from_sim(env, sim, 11, "dim_visits_staging")
    seed_parents_from_sim(env, sim, 10, "dim_subjects_staging")
    for job_id, parents in ((175, 520), (160, 178)):
        job = catalog.get(job_id)
        r = run_job(job, mode="full", settings=env)
        assert r.status == "success", (job_id, r.error)
        assert r.parents_total == parents
        msgs = messages_of_run(env, job.target_table, r.run_id)
        expected = expected_by_key(sim, job)
        assert Counter(m.key for m in msgs) == Counter({k: 1 for k in expected}), job_id
    assert len(expected) == 4595


def test_patient_fan_out_with_worker_processes(env: Settings, sim: SimulatorProcess) -> None:
    truncate(env, "dim_patients_staging")
    n = seed_parents_from_sim(env, sim, 3, "dim_patients_staging")
    job = load_catalog(env).get(148)
    r = run_job(job, mode="full", settings=env, processes=2, workers=4)
    assert r.status == "success", r.error
    assert r.parents_total == r.parents_done == n and r.api_calls == n
    msgs = messages_of_run(env, job.target_table, r.run_id)
    assert Counter(m.key for m in msgs) == Counter({k: 1 for k in expected_by_key(sim, job)})
    last = {}
    for m in msgs:
        last[m.partition] = max(last.get(m.partition, -1), m.offset)
    assert r.end_offsets == last
    assert run_row(env, r.run_id)["run_context"]["engine"] == "processes"


def test_job_without_parents_succeeds_with_a_warning(env: Settings, sim: SimulatorProcess) -> None:
    truncate(env, "dim_studies_staging")
    r = run_job(load_catalog(env).get(10), mode="full", settings=env)
    assert r.status == "success" and r.records_published == 0 and r.parents_total == 0
    assert any("no parents" in w for w in r.warnings)
    row = run_row(env, r.run_id)
    assert row["run_status"] == "success" and row["parents_total"] == 0
    assert "no parents" in row["run_context"]["warnings"][0]


def cli(env: Settings, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "LOG_FORMAT": "json", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "common.cli", *args], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=300)


def test_cli_dry_run_prints_requests_and_publishes_nothing(env: Settings, sim: SimulatorProcess) -> None:
    truncate(env, "dim_studies_staging")
    seed_parents_from_sim(env, sim, 2, "dim_studies_staging")
    sim.reset_stats()
    p = cli(env, "extract", "--job", "10", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "parents: 315 from bronze.dim_studies_staging" in p.stdout
    assert f"GET {sim.base_url}/api/v1/studies/" in p.stdout and "/subjects/odata?$top=1000" in p.stdout
    assert sim.api_key not in p.stdout + p.stderr
    assert sim.stats()["requests"] == {}
    with connect(env, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM etl.dw_etl_runs").fetchone()[0] == 0
    assert read_topic(env, K.bronze_topic("dim_subjects_staging", env)) == []


def test_cli_runs_a_job_and_exits_zero(env: Settings, sim: SimulatorProcess) -> None:
    p = cli(env, "extract", "--job", "Studies", "--full")
    assert p.returncode == 0, p.stderr
    assert "success" in p.stdout and "315 records published" in p.stdout
    assert '"event": "run_finished"' in p.stderr or '"event":"run_finished"' in p.stderr


def test_csv_source_goes_through_the_same_path(env: Settings, tmp_path: Path) -> None:
    jobs_file = tmp_path / "jobs.yaml"
    jobs_file.write_text(
        "sources:\n"
        "  - id: 1001\n    name: Clinical Trials CSV\n    source_type: csv\n"
        f"    path: {REPO / 'data' / 'clinical_trials.csv'}\n"
        "    target_table: raw_clinical_trials_staging\n    key_column: nct_number\n    delimiter: ','\n"
        "    timestamp_field: last_update_posted\n", encoding="utf-8")
    os.environ["ETL_JOBS_FILE"] = str(jobs_file)
    from common import config

    config.reset_settings()
    s = config.get_settings()
    catalog = load_catalog(s)
    sync(catalog)  # registers job 1001 and creates its staging table
    job = catalog.get(1001)
    r = run_job(job, mode="incremental", settings=s)
    assert r.status == "success", r.error
    assert r.records_published == 50 and r.mode == "full"
    msgs = read_topic(s, K.bronze_topic("raw_clinical_trials_staging", s))
    assert len({m.key for m in msgs}) == 50 and all(m.key.startswith("cc1:NCT") for m in msgs)
    m = msgs[0]
    assert set(m.value) >= {"nct_number", "title", "phase", "status", "enrollment"}
    assert m.key == f"cc1:{m.value['nct_number']}"
    assert m.headers[K.H_JOB_ID] == "1001" and m.headers[K.H_MODIFIED_AT] == m.value["last_update_posted"]
    assert run_row(s, r.run_id)["run_status"] == "success"


def test_cli_category_runs_in_order_and_invalid_job_is_refused(env: Settings) -> None:
    p = cli(env, "extract", "--category", "system", "--dry-run")
    assert p.returncode == 0, p.stderr
    catalog = load_catalog(env)
    system = [j for j in catalog.by_category("system") if j.runnable]
    heads = [line for line in p.stdout.splitlines() if line.startswith("job ")]
    assert [int(h.split()[1]) for h in heads] == [i for lvl in catalog.topological_order([j.id for j in system])
                                                 for i in lvl]
    p = cli(env, "extract", "--job", "14")
    assert p.returncode == 2 and "cannot run: endpoint answers HTTP 404" in p.stderr
    p = cli(env, "extract")
    assert p.returncode == 2 and "choose what to extract" in p.stderr
