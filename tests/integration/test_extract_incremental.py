"""Incremental runs: watermarks per job and per parent, exactly the changed records, --full,
the database mirror when the (memory-only) watermark topic is gone, and what never moves them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import kafka as K
from common.catalog import load_catalog, sync
from common.config import Settings
from common.db import connect, migrate
from producers.extractor import run_job
from producers.keys import parent_key
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


@pytest.fixture
def sim() -> Iterator[SimulatorProcess]:
    """Each test mutates the data: its own simulator."""
    with SimulatorProcess(scale=0.002, seed=7, api_key="it-incr-key-Pp3") as s:
        yield s


@pytest.fixture
def env(sim: SimulatorProcess, fresh_db: str, unique: str) -> Iterator[Settings]:
    migrate()
    sync(load_catalog())
    # the per-parent watermark mechanics under the `all` fan-out policy (every parent asked with its
    # own filter); the `changed` policy is tested in test_extract_fanout_changed.py
    with ExtractEnv(sim, f"t{unique}", CC_INCREMENTAL_OVERLAP_SECONDS="0", ETL_FANOUT_INCREMENTAL="all") as s:
        yield s


def run_keys(settings: Settings, table: str, run_id: int) -> list[str | None]:
    return [m.key for m in read_topic(settings, K.bronze_topic(table, settings))
            if m.headers.get(K.H_RUN_ID) == str(run_id)]


def watermarks(settings: Settings, job_id: int) -> dict[str, object]:
    with connect(settings, autocommit=True) as conn:
        return dict(conn.execute("SELECT parent_key, value FROM etl.dw_etl_watermarks WHERE job_id = %s",
                                 (job_id,)).fetchall())


def test_incremental_publishes_exactly_the_changed_records(env: Settings, sim: SimulatorProcess) -> None:
    job = load_catalog(env).get(9)
    full = run_job(job, mode="full", settings=env)
    assert full.status == "success" and full.records_published == 4595
    wm1 = watermarks(env, 9)[""]

    change = sim.mutate("patient_visits", modify_count=7, insert_count=3, delete_count=2)
    changed = {f"cc1:{i}" for i in change["modified"] + change["inserted"]}
    assert len(changed) == 10
    sim.reset_stats()
    inc = run_job(job, mode="incremental", settings=env)
    assert inc.status == "success" and inc.mode == "incremental"
    got = run_keys(env, job.target_table, inc.run_id)
    assert sorted(got) == sorted(changed)
    assert inc.api_calls == 1 and inc.watermark_from == wm1 and inc.watermark_to > wm1
    row = run_row(env, inc.run_id)
    assert row["mode"] == "incremental" and row["watermark_from"] == wm1
    assert watermarks(env, 9)[""] == inc.watermark_to

    # nothing changed since: one request, nothing published, watermark unchanged
    again = run_job(job, mode="incremental", settings=env)
    assert again.status == "success" and again.records_published == 0 and again.api_calls == 1
    assert watermarks(env, 9)[""] == inc.watermark_to

    # --full ignores the watermark
    everything = run_job(job, mode="full", settings=env)
    assert everything.records_published == len(expected_by_key(sim, job)) == 4595 + 3 - 2


def test_parameterized_incremental_keeps_a_watermark_per_parent(env: Settings, sim: SimulatorProcess) -> None:
    job = load_catalog(env).get(10)
    truncate(env, "dim_studies_staging")
    seed_parents_from_sim(env, sim, 2, "dim_studies_staging")
    full = run_job(job, mode="full", settings=env)
    assert full.status == "success"
    wms = watermarks(env, 10)
    studies_with_subjects = {str(r[0]["study"]["id"]) for r in expected_by_key(sim, job).values()}
    assert set(wms) == {parent_key({"studyId": s}) for s in studies_with_subjects}

    change = sim.mutate("subjects", modify_count=4, insert_count=3)
    changed = {f"cc1:{i}" for i in change["modified"] + change["inserted"]}
    inc = run_job(job, mode="incremental", settings=env)
    assert inc.status == "success"
    assert sorted(run_keys(env, job.target_table, inc.run_id)) == sorted(changed)
    ctx = run_row(env, inc.run_id)["run_context"]
    assert ctx["watermarks_committed"] >= 1
    after = watermarks(env, 10)
    moved = {pk for pk in after if pk not in wms or after[pk] > wms[pk]}
    truth = expected_by_key(sim, job)
    changed_studies = {str(truth[k][0]["study"]["id"]) for k in changed}
    assert moved == {parent_key({"studyId": s}) for s in changed_studies}


def test_database_mirror_is_the_truth_when_the_watermark_topic_is_gone(env: Settings, sim: SimulatorProcess) -> None:
    job = load_catalog(env).get(9)
    assert run_job(job, mode="full", settings=env).status == "success"
    change = sim.mutate("patient_visits", modify_count=5)
    # a new topic prefix = a broker that lost its (in-memory) topics: only etl.dw_etl_watermarks remains
    with ExtractEnv(sim, f"lost{uuid.uuid4().hex[:6]}", CC_INCREMENTAL_OVERLAP_SECONDS="0") as s2:
        assert read_topic(s2, K.watermark_topic(s2)) == []
        inc = run_job(job, mode="incremental", settings=s2)
        assert sorted(run_keys(s2, job.target_table, inc.run_id)) == sorted(f"cc1:{i}" for i in change["modified"])
        republished = [m for m in read_topic(s2, K.watermark_topic(s2)) if m.key == "9:"]
        assert republished and republished[-1].value["run_id"] == inc.run_id


def test_overlap_window_refetches_recent_records(env: Settings, sim: SimulatorProcess) -> None:
    job = load_catalog(env).get(9)
    assert run_job(job, mode="full", settings=env).status == "success"
    change = sim.mutate("patient_visits", modify_count=3, spread_ms=1000)
    first = run_job(job, mode="incremental", settings=env)
    assert len(run_keys(env, job.target_table, first.run_id)) == 3
    with ExtractEnv(sim, env.kafka_topic_prefix, CC_INCREMENTAL_OVERLAP_SECONDS="3600") as s2:
        second = run_job(job, mode="incremental", settings=s2)
        # nothing changed, but the hour before the watermark is read again (late commits are not missed)
        assert sorted(run_keys(s2, job.target_table, second.run_id)) == sorted(f"cc1:{i}" for i in change["modified"])


def test_limited_and_failed_runs_never_move_watermarks(env: Settings, sim: SimulatorProcess) -> None:
    job = load_catalog(env).get(9)
    limited = run_job(job, mode="full", settings=env, limit=1500)
    assert limited.status == "success" and limited.records_published == 1500
    assert watermarks(env, 9) == {}
    sim.set_faults("500@/api/v1/patient-visits/odata,after=2")
    failed = run_job(job, mode="full", settings=env)
    assert failed.status == "failed" and failed.records_published == 2000
    assert watermarks(env, 9) == {}
    sim.clear_faults()


def test_failed_parent_keeps_its_old_watermark(env: Settings, sim: SimulatorProcess) -> None:
    job = load_catalog(env).get(10)
    truncate(env, "dim_studies_staging")
    seed_parents_from_sim(env, sim, 2, "dim_studies_staging")
    assert run_job(job, mode="full", settings=env).status == "success"
    before = watermarks(env, 10)
    change = sim.mutate("subjects", modify_count=6)
    truth = expected_by_key(sim, job)
    studies = sorted({str(truth[f"cc1:{i}"][0]["study"]["id"]) for i in change["modified"]})
    sim.set_faults(f"500@/api/v1/studies/{studies[0]}/subjects/odata")
    inc = run_job(job, mode="incremental", settings=env)
    assert inc.status == "partial" and inc.failed_parents == [{"studyId": studies[0]}]
    after = watermarks(env, 10)
    pk = parent_key({"studyId": studies[0]})
    assert after[pk] == before[pk]
    sim.clear_faults()
    retry = run_job(job, mode="incremental", settings=env, only_parents=inc.failed_parents)
    assert retry.status == "success" and retry.records_published >= 1
    assert watermarks(env, 10)[pk] > before[pk]


def test_topic_restores_watermarks_when_the_database_mirror_is_empty(env: Settings, sim: SimulatorProcess) -> None:
    job = load_catalog(env).get(9)
    assert run_job(job, mode="full", settings=env).status == "success"
    change = sim.mutate("patient_visits", modify_count=4)
    with connect(env, autocommit=True) as conn:  # e.g. a new warehouse database, same broker
        conn.execute("DELETE FROM etl.dw_etl_watermarks WHERE job_id = 9")
    inc = run_job(job, mode="incremental", settings=env)
    assert sorted(run_keys(env, job.target_table, inc.run_id)) == sorted(f"cc1:{i}" for i in change["modified"])
    assert watermarks(env, 9)[""] == inc.watermark_to


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "common.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "LOG_FORMAT": "json", **env}, timeout=300)


def test_the_filter_a_run_sent_is_on_its_row_and_in_run_started(env: Settings, sim: SimulatorProcess) -> None:
    assert _cli("extract", "--job", "9", "--full").returncode == 0
    sim.mutate("patient_visits", modify_count=2)
    inc = _cli("extract", "--job", "9", "--json")
    assert inc.returncode == 0, inc.stderr
    run_id = json.loads(inc.stdout)["run_id"]
    sent = run_row(env, run_id)["run_context"]["request_filter"]
    assert sent["filter"].startswith("modifiedDate gt 20") and sent["watermark_from"]
    started = [json.loads(line) for line in inc.stderr.splitlines() if '"run_started"' in line]
    assert started and started[0]["filter"] == sent["filter"] and started[0]["run_id"] == run_id


def test_records_without_the_timestamp_field_say_every_run_reads_everything(env: Settings, sim: SimulatorProcess,
                                                                             tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("jobs:\n  9: {timestamp_field: lastChangedOn}\n")  # a field the API does not send
    first = _cli("extract", "--job", "9", "--json", ETL_JOBS_FILE=str(jobs))
    second = _cli("extract", "--job", "9", "--json", ETL_JOBS_FILE=str(jobs))
    assert first.returncode == second.returncode == 0, second.stderr
    r1, r2 = json.loads(first.stdout), json.loads(second.stdout)
    # the second, incremental run had no watermark to filter on: it read everything again -- and says so
    assert r2["records_published"] == r1["records_published"] > 0
    assert any("carries `lastChangedOn`" in w and "falls back to full" in w for w in r2["warnings"])
    assert "falls back to full" in second.stderr
    assert run_row(env, r2["run_id"])["run_context"]["request_filter"]["filter"] is None


@pytest.mark.parametrize("job_id", [10, 11, 160, 165])
def test_list_source_incremental_reads_only_what_changed(env: Settings, sim: SimulatorProcess, job_id: int) -> None:
    """A fan-out job reading its cheaper list (``source: list``) keeps one watermark, like a plain
    job, and its incremental run pages the list with a timestamp filter: the changed records only,
    under the same keys and parent parameters as the per-parent reads."""
    job = load_catalog(env).get(job_id).model_copy(update={"source": "list"})
    assert job.reads_list
    full = run_job(job, mode="full", settings=env)
    assert full.status == "success" and full.records_published > 0, full.error
    assert list(watermarks(env, job_id)) == [""]

    change = sim.mutate(endpoint=job.endpoint, modify_count=4)
    truth = expected_by_key(sim, job)
    changed = {f"cc1:{i}" for i in change["modified"]} & set(truth)
    assert changed, f"none of the records modified under {job.endpoint} is served by job {job_id}"
    inc = run_job(job, mode="incremental", settings=env)
    assert inc.status == "success", inc.error
    assert inc.mode == "incremental" and inc.watermark_from is not None
    got = run_keys(env, job.target_table, inc.run_id)
    assert set(got) == changed and len(got) == len(changed)
    assert inc.api_calls < full.api_calls or full.api_calls == 1
