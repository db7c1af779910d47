"""Cheaper sources: a fan-out job that reads its list across parents (``source: list``) lands exactly
the records the per-parent reads land -- same source_id, same parent parameters (``ts-params``, the
row's ``source_params``), same content -- in a few pages instead of one call per parent; and
``trialsync doctor --sources`` tells a trustworthy list from one that is not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from common import kafka as K
from common.catalog import load_catalog, sync
from common.config import Settings
from common.db import connect, migrate
from producers.extractor import run_job
from producers.source_check import check_job
from schemas.jobs import ListSource
from simulator.testing import SimulatorProcess
from tests.integration.extract_helpers import ExtractEnv, load_into_staging, read_topic

pytestmark = pytest.mark.integration

LIST_JOBS = (10, 11, 160, 165)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(scale=0.002, seed=17, api_key="it-sources-Pq3") as s:
        yield s


@pytest.fixture
def env(sim: SimulatorProcess, fresh_db: str, unique: str) -> Iterator[Settings]:
    migrate()
    sync(load_catalog())
    with ExtractEnv(sim, f"src{unique}") as s:
        yield s


def _records(env: Settings, table: str, run_id: int | None) -> dict[str | None, tuple[str | None, object]]:
    """source_id -> (parent parameters header, record) of one run's messages."""
    out: dict[str | None, tuple[str | None, object]] = {}
    for m in read_topic(env, K.bronze_topic(table, env)):
        if m.headers.get(K.H_RUN_ID) == str(run_id):
            assert m.key not in out, f"{m.key} published twice by run {run_id}"
            out[m.key] = (m.headers.get(K.H_PARAMS), m.value)
    return out


def test_every_list_source_lands_the_records_of_the_per_parent_reads(env: Settings) -> None:
    catalog = load_catalog(env)
    assert {j.id for j in catalog if j.list_source} == set(LIST_JOBS)
    for parent in (2, 10):  # studies, then subjects (the parents of 160) the per-parent way
        assert run_job(catalog.get(parent), mode="full", settings=env).status == "success"
        load_into_staging(env, catalog.get(parent).target_table)
    for jid in LIST_JOBS:
        job = catalog.get(jid)
        per = run_job(job, mode="full", settings=env)
        lst = run_job(job.model_copy(update={"source": "list"}), mode="full", settings=env)
        assert per.status == lst.status == "success", (jid, per.error, lst.error)
        a, b = _records(env, job.target_table, per.run_id), _records(env, job.target_table, lst.run_id)
        assert a and a == b, f"job {jid}: {len(a)} records per parent, {len(b)} from the list"
        assert lst.api_calls < per.api_calls, (jid, lst.api_calls, per.api_calls)
        assert lst.parents_total is None and per.parents_total and per.parents_total > 0


def test_doctor_trusts_a_matching_list_and_not_a_different_one(env: Settings, sim: SimulatorProcess) -> None:
    catalog = load_catalog(env)
    assert run_job(catalog.get(2), mode="full", settings=env).status == "success"
    load_into_staging(env, catalog.get(2).target_table)
    proc = subprocess.run([sys.executable, "-m", "common.cli", "doctor", "--sources", "-j", "10", "-j", "11",
                           "--sample", "5", "--json"], capture_output=True, text=True, env=dict(os.environ),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] and [v["job_id"] for v in out["jobs"]] == [10, 11]
    assert all(v["trusted"] and v["parents_sampled"] == 5 and v["records_compared"] > 0 for v in out["jobs"])
    assert sim.api_key not in proc.stdout + proc.stderr
    # a list of another model (visits read as if they were subjects) is told apart
    wrong = catalog.get(10).model_copy(update={"list_source": ListSource(
        endpoint="/api/v1/visits/odata", parameters={"studyId": "study.id"})})
    with connect(env, autocommit=True) as conn:
        v = check_job(conn, wrong, env, sample=5)
    assert not v.trusted and v.error is None and v.differences
    assert any(d.only_per_parent or d.only_in_list or d.different for d in v.differences)
