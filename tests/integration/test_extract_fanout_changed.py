"""The ``changed`` fan-out policy on the real chain (simulator -> extractor -> broker -> loader ->
staging): after a first pass over every parent, an incremental run of a parameterized job asks only
the parents whose staging row changed since the job's last complete run, plus one sweep slice; a
partial run's failed parents are asked again. Both simulator modes: when CC moves the parent with a
child change (``touch_parents``) nothing is ever unannounced; when it does not, the sweep finds the
changes within one cycle, counts them, and the guard asks every parent until a complete run finds
none -- no change is lost, only delayed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from common import kafka as K
from common.catalog import load_catalog, sync
from common.config import Settings
from common.db import migrate
from producers.extractor import RunResult, run_job
from simulator.testing import SimulatorProcess
from tests.integration.extract_helpers import ExtractEnv, expected_by_key, read_topic, run_row
from tests.loader_support import load_once

pytestmark = pytest.mark.integration

SUBJECTS_ENDPOINT = "/api/v1/studies/{studyId}/subjects/odata"


@pytest.fixture
def sim() -> Iterator[SimulatorProcess]:
    with SimulatorProcess(scale=0.002, seed=11, api_key="it-fanout-changed-Kk4") as s:
        yield s


def _env(sim: SimulatorProcess, prefix: str, sweep_runs: int) -> ExtractEnv:
    return ExtractEnv(sim, prefix, CC_INCREMENTAL_OVERLAP_SECONDS="0", ETL_FANOUT_INCREMENTAL="changed",
                      ETL_FANOUT_SWEEP_RUNS=str(sweep_runs))


@pytest.fixture
def env(sim: SimulatorProcess, fresh_db: str, unique: str) -> Iterator[Settings]:
    migrate()
    sync(load_catalog())
    with _env(sim, f"fc{unique}", 1000) as s:
        yield s


def parents_night(env: Settings) -> None:
    """The parent job's incremental run, loaded by the real loader (updated_at moves only on change)."""
    studies = load_catalog(env).get(2)
    r = run_job(studies, mode="incremental", settings=env)
    assert r.status == "success", r.error
    load_once(env, "fc-loader", [studies.target_table], batch_size=5000)


def published(env: Settings, run: RunResult) -> set[str]:
    return {m.key for m in read_topic(env, K.bronze_topic("dim_subjects_staging", env))
            if m.headers.get(K.H_RUN_ID) == str(run.run_id)}


def fanout(env: Settings, run: RunResult) -> dict:
    return run_row(env, run.run_id)["run_context"]["fanout"]


def test_only_changed_parents_are_asked_when_cc_touches_them(env: Settings, sim: SimulatorProcess) -> None:
    subjects = load_catalog(env).get(10)
    parents_night(env)
    first = run_job(subjects, mode="incremental", settings=env)
    assert first.status == "success"
    f0 = fanout(env, first)
    # the first run is the first pass: every parent, in order, none "changed" (no reference yet)
    assert f0["policy"] == "changed" and f0["asked"] == "first_pass" and f0["first_pass"]["done"]
    assert f0["parents_unfinished"] == first.parents_total and f0["parents_changed"] == 0
    all_parents = first.parents_total
    assert all_parents and all_parents > 100

    change = sim.mutate("subjects", modify_count=4, insert_count=2, touch_parents=True)
    changed = {f"cc1:{i}" for i in change["modified"] + change["inserted"]}
    truth = expected_by_key(sim, subjects)
    changed_studies = {str(truth[k][-1]["study"]["id"]) for k in changed}
    parents_night(env)
    sim.reset_stats()
    inc = run_job(subjects, mode="incremental", settings=env)
    assert inc.status == "success"
    f = fanout(env, inc)
    assert f["asked"] == "changed" and f["parents_changed"] == len(changed_studies)
    assert f["sweep_slice"] == 0 and f["sweep_runs"] == 1000
    assert inc.parents_total == f["parents_changed"] + f["parents_swept"] < all_parents // 10
    assert sim.requests_to(SUBJECTS_ENDPOINT) == inc.api_calls == inc.parents_total
    assert published(env, inc) == changed  # exactly the changed records, nothing missed
    # CC announced every child change on its parent: the sweep found nothing new, the guard is clear
    assert f["unannounced_changes"] == 0 and f["guard_after"] is False

    # nothing changed since: only the next sweep slice is asked (test 3: the sweep reads unfiltered)
    again = run_job(subjects, mode="incremental", settings=env)
    f = fanout(env, again)
    assert again.status == "success" and f["parents_changed"] == 0 and f["sweep_slice"] == 1
    assert again.parents_total == f["parents_swept"] < all_parents // 10
    # --full still asks every parent
    full = run_job(subjects, mode="full", settings=env)
    assert full.parents_total == all_parents + 0 and fanout(env, full)["asked"] == "all"


def test_a_partial_runs_failed_parent_is_asked_again(env: Settings, sim: SimulatorProcess) -> None:
    subjects = load_catalog(env).get(10)
    parents_night(env)
    assert run_job(subjects, mode="incremental", settings=env).status == "success"
    change = sim.mutate("subjects", modify_count=6, touch_parents=True)
    truth = expected_by_key(sim, subjects)
    changed = {f"cc1:{i}" for i in change["modified"]}
    studies = sorted({str(truth[k][-1]["study"]["id"]) for k in changed})
    assert len(studies) >= 2
    parents_night(env)
    sim.set_faults(f"500@/api/v1/studies/{studies[0]}/subjects/odata")
    partial = run_job(subjects, mode="incremental", settings=env)
    assert partial.status == "partial" and partial.failed_parents == [{"studyId": studies[0]}]
    sim.clear_faults()
    nxt = run_job(subjects, mode="incremental", settings=env)
    assert nxt.status == "success"
    # the window still starts at the last complete run: the failed study is asked again
    assert fanout(env, nxt)["parents_changed"] == len(studies)
    assert published(env, partial) | published(env, nxt) == changed
    missed = {k for k in changed if str(truth[k][-1]["study"]["id"]) == studies[0]}
    assert missed and missed <= published(env, nxt)


def test_unannounced_changes_arrive_within_one_sweep_and_the_guard_asks_every_parent(
        sim: SimulatorProcess, fresh_db: str, unique: str) -> None:
    from prometheus_client import REGISTRY

    def counted() -> float:
        return REGISTRY.get_sample_value("trialsync_fanout_unannounced_changes_total", {"job_id": "10"}) or 0.0

    migrate()
    sync(load_catalog())
    with _env(sim, f"fs{unique}", 2) as env:
        subjects = load_catalog(env).get(10)
        parents_night(env)
        first = run_job(subjects, mode="incremental", settings=env)
        assert first.status == "success"
        change = sim.mutate("subjects", modify_count=8)  # CC does not touch the studies
        changed = {f"cc1:{i}" for i in change["modified"]}
        parents_night(env)
        before = counted()
        runs = [run_job(subjects, mode="incremental", settings=env) for _ in range(4)]
        fans = [fanout(env, r) for r in runs]
        assert all(r.status == "success" for r in runs)
        assert all(f["parents_changed"] == 0 for f in fans)  # the studies did not move
        # within one sweep cycle (two slices) every change has arrived: late, never lost
        assert changed <= published(env, runs[0]) | published(env, runs[1])
        # each was counted once, as a change its parent did not announce, and exported
        assert sum(f["unannounced_changes"] for f in fans) == len(changed) == counted() - before
        for prev, nxt in zip(fans, fans[1:], strict=False):
            if prev["unannounced_changes"]:
                # the guard: the next run asks every parent (a complete sweep)...
                assert prev["guard_after"] and nxt["asked"] == "guard" and "sweep_slice" not in nxt
            elif prev["asked"] == "guard":
                # ...until one complete run finds none; then the sweep takes over again
                assert not prev["guard_after"] and nxt["asked"] == "changed"
        assert fans[-1]["asked"] == "changed" and not fans[-1]["guard_after"]
        guard_runs = [r for r, f in zip(runs, fans, strict=True) if f["asked"] == "guard"]
        assert guard_runs and all(r.parents_total == first.parents_total for r in guard_runs)
        assert set(expected_by_key(sim, subjects)) == {m.key for m in read_topic(
            env, K.bronze_topic("dim_subjects_staging", env))}
