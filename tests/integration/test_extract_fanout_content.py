"""The ``changed`` fan-out policy for a child read without a watermark (the patient sub-resources:
``/patients/{patientId}/allergies`` is a plain list that takes no ``$filter``, and the spec's
``PatientAllergiesViewModel`` has no modified date), on the real chain (simulator -> extractor ->
broker -> loader -> staging). The run judges its records by content instead: a record not in staging, or there with another content hash, changed since its
parent was last read -- announced if the parent (the patient) was marked changed, not if it was
not. A verification night that sees no change trusts the job; its sweep then finds a change CC did
not announce within one cycle and the guard takes over -- late, never lost -- until a clean night."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from common import kafka as K
from common.catalog import load_catalog, sync
from common.config import Settings
from common.db import migrate
from producers.extractor import RunResult, run_job
from simulator.testing import SimulatorProcess
from tests.integration.extract_helpers import ExtractEnv, read_topic, run_row
from tests.loader_support import load_once

pytestmark = pytest.mark.integration

PATIENTS, ALLERGIES = 3, 148
TABLE = "dim_patient_allergies_staging"


@pytest.fixture
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(scale=0.002, seed=23, api_key="it-fanout-content-Qp7") as s:
        yield s


@pytest.fixture
def env(sim: SimulatorProcess, fresh_db: str, unique: str) -> Iterator[Settings]:
    migrate()
    sync(load_catalog())
    with ExtractEnv(sim, f"fh{unique}", CC_INCREMENTAL_OVERLAP_SECONDS="0", ETL_FANOUT_INCREMENTAL="changed",
                    ETL_FANOUT_SWEEP_RUNS="2") as s:
        yield s


def _night(env: Settings, job_id: int, processes: int = 0) -> RunResult:
    """One incremental run of the job, loaded by the real loader (staging is what the next judges by)."""
    job = load_catalog(env).get(job_id)
    r = run_job(job, mode="incremental", settings=env, processes=processes or None)
    assert r.status == "success", r.error
    load_once(env, f"fh-loader-{job_id}", [job.target_table], batch_size=5000)
    return r


def _fanout(env: Settings, r: RunResult) -> dict:
    return run_row(env, r.run_id)["run_context"]["fanout"]


def _published(env: Settings, r: RunResult) -> set[str]:
    return {m.key for m in read_topic(env, K.bronze_topic(TABLE, env)) if m.headers.get(K.H_RUN_ID) == str(r.run_id)}


def test_a_child_without_timestamps_is_judged_by_content(env: Settings, sim: SimulatorProcess) -> None:
    sim.mutate("patient_allergies", insert_count=5)  # (a few at this scale; records to compare with)
    _night(env, PATIENTS)
    first = _night(env, ALLERGIES)
    assert _fanout(env, first)["asked"] == "first_pass" and len(_published(env, first)) >= 5
    everyone = first.parents_total
    assert everyone and everyone > 50
    patient = int(next(iter(read_topic(env, K.bronze_topic("dim_patients_staging", env)))).value["id"])

    # the first incremental night verifies: every patient asked, every record compared with staging;
    # nothing changed, nothing is counted -- and a quiet verification trusts the job (no sibling
    # on the patients has any evidence yet)
    r = _night(env, ALLERGIES)
    f = _fanout(env, r)
    assert f["asked"] == "verify" and r.parents_total == everyone
    assert f["announced_changes"] == f["unannounced_changes"] == 0
    assert f["assumption_after"] == "holds" and f["assumption_evidence"].startswith("quiet")

    # CC moves the patient: the change is asked for and counted as announced, by its content (here
    # by worker processes, which judge their pages and report the tally)
    got = sim.mutate("patient_allergies", insert_count=2, parent_id=patient, touch_parents=True)
    new = {f"cc1:{i}" for i in got["inserted"]}
    _night(env, PATIENTS)
    r = _night(env, ALLERGIES, processes=2)
    f = _fanout(env, r)
    assert f["asked"] == "changed" and r.parents_total < everyone and f["parents_changed"] >= 1
    assert new <= _published(env, r), (new, _published(env, r))
    assert f["announced_changes"] >= 2 and f["unannounced_changes"] == 0, str(f)

    # CC does not move the patient: the changed runs miss it, the sweep (two slices) finds it
    # within one cycle, counts it and breaks the assumption; the guard then asks every patient
    got = sim.mutate("patient_allergies", modify_ids=sorted(int(k.split(":")[1]) for k in new), touch_parents=False)
    _night(env, PATIENTS)
    runs = [_night(env, ALLERGIES) for _ in range(2)]
    fans = [_fanout(env, x) for x in runs]
    assert new <= _published(env, runs[0]) | _published(env, runs[1])  # late, not lost
    assert any(x["unannounced_changes"] >= 2 for x in fans), fans
    assert "broken" in {x["assumption_after"] for x in fans}
    # the run after the one that found it is the guard: every patient asked; clean, so it lifts
    if fans[0]["assumption_after"] == "broken":
        guard, g = runs[1], fans[1]
    else:
        guard = _night(env, ALLERGIES)
        g = _fanout(env, guard)
    assert g["asked"] == "guard" and guard.parents_total == everyone
    assert g["unannounced_changes"] == 0 and g["assumption_after"] == "holds"
    assert _fanout(env, _night(env, ALLERGIES))["asked"] == "changed"
