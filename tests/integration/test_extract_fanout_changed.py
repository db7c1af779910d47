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


def test_only_changed_parents_are_asked_once_cc_is_seen_to_touch_them(env: Settings, sim: SimulatorProcess) -> None:
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

    def night() -> tuple[RunResult, dict, set[str], set[str]]:
        change = sim.mutate("subjects", modify_count=4, insert_count=2, touch_parents=True)
        changed = {f"cc1:{i}" for i in change["modified"] + change["inserted"]}
        truth = expected_by_key(sim, subjects)
        studies = {str(truth[k][-1]["study"]["id"]) for k in changed}
        parents_night(env)
        sim.reset_stats()
        run = run_job(subjects, mode="incremental", settings=env)
        assert run.status == "success"
        return run, fanout(env, run), changed, studies

    # not yet shown to hold: the job asks every parent, each with its own filter, and looks whether
    # each change came under a parent marked changed -- all did (CC touched the studies)
    verify, f, changed, studies = night()
    assert f["asked"] == "verify" and verify.parents_total == all_parents
    # (the 4 modified subjects at least: a new subject under a study never read before has no
    # watermark to be newer than)
    assert f["parents_changed"] == len(studies) and 4 <= f["announced_changes"] <= len(changed)
    assert f["unannounced_changes"] == 0 and f["assumption_after"] == "holds"
    assert published(env, verify) == changed

    # shown to hold: only the changed studies and one sweep slice are asked
    inc, f, changed, studies = night()
    assert f["asked"] == "changed" and f["parents_changed"] == len(studies)
    assert f["sweep_slice"] == 0 and f["sweep_runs"] == 1000
    assert inc.parents_total == f["parents_changed"] + f["parents_swept"] < all_parents // 10
    assert sim.requests_to(SUBJECTS_ENDPOINT) == inc.api_calls == inc.parents_total
    assert published(env, inc) == changed  # exactly the changed records, nothing missed
    assert f["unannounced_changes"] == 0 and f["assumption_after"] == "holds" and not f["guard_after"]

    # nothing changed since: only the next sweep slice is asked (the sweep reads unfiltered)
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


def test_changes_cc_does_not_announce_are_never_lost(sim: SimulatorProcess, fresh_db: str, unique: str) -> None:
    """The assumption is checked from the first incremental night on: a job asks every parent until a
    complete run shows each change under a parent marked changed; a change that comes unannounced
    (found then, or later by the sweep) breaks it again -- and every change arrives."""
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
        all_parents = first.parents_total

        def change(touch: bool) -> set[str]:
            got = sim.mutate("subjects", modify_count=8, touch_parents=touch)
            parents_night(env)
            return {f"cc1:{i}" for i in got["modified"]}

        def run() -> tuple[RunResult, dict]:
            r = run_job(subjects, mode="incremental", settings=env)
            assert r.status == "success", r.error
            return r, fanout(env, r)

        # A. CC does not touch the studies: the first incremental night asks every parent and brings
        #    every change -- each counted as unannounced and exported; the assumption is broken
        before = counted()
        changed = change(touch=False)
        r, f = run()
        assert f["asked"] == "verify" and r.parents_total == all_parents and published(env, r) >= changed
        assert f["unannounced_changes"] == len(changed) == counted() - before and f["announced_changes"] == 0
        assert f["assumption_after"] == "broken" and f["guard_after"]
        # the guard asks every parent; while it finds unannounced changes it stays on (every run exact)
        changed = change(touch=False)
        r, f = run()
        assert f["asked"] == "guard" and r.parents_total == all_parents and published(env, r) >= changed
        assert f["unannounced_changes"] == len(changed) and f["assumption_after"] == "broken" and f["guard_after"]
        # a complete clean guard night (nothing unannounced) lifts it
        r, f = run()
        assert f["asked"] == "guard" and r.parents_total == all_parents and f["unannounced_changes"] == 0
        assert f["assumption_after"] == "holds" and not f["guard_after"]
        assert f["assumption_evidence"].startswith("clean guard night")
        # B. changes CC does announce: changed parents + the sweep, each change counted announced
        changed = change(touch=True)
        r, f = run()
        assert f["asked"] == "changed" and r.parents_total < all_parents and published(env, r) >= changed
        assert f["announced_changes"] == len(changed) and f["assumption_after"] == "holds"
        # C. then CC stops announcing: the changed runs miss the changes, but the sweep (two slices
        #    here) brings every one within one cycle, and the run that finds them breaks it again
        changed = change(touch=False)
        r1, f1 = run()
        assert f1["asked"] == "changed" and f1["parents_changed"] == 0  # the studies did not move
        r2, f2 = run()
        # within one sweep cycle (two slices here) every change has arrived -- late, never lost: by
        # the second slice, or by the guard run that follows the first slice that found some
        assert changed <= published(env, r1) | published(env, r2)
        if f1["unannounced_changes"]:
            assert f1["assumption_after"] == "broken" and f2["asked"] == "guard" and r2.parents_total == all_parents
        else:
            assert f2["asked"] == "changed" and f2["unannounced_changes"] and f2["assumption_after"] == "broken"
            r, f = run()
            assert f["asked"] == "guard" and r.parents_total == all_parents
        assert set(expected_by_key(sim, subjects)) == {m.key for m in read_topic(
            env, K.bronze_topic("dim_subjects_staging", env))}


def test_a_quiet_verification_trusts_the_job_and_names_a_sibling_that_saw_cc_announce(
        env: Settings, sim: SimulatorProcess) -> None:
    """Subjects (10) and visits (11) are both read per study. A verification night in which only
    subjects changed, each announced on its study, trusts job 10 on its own evidence; job 11 saw no
    change of its own -- nothing against the assumption, nothing for it: it is trusted (its sweep
    keeps checking; otherwise a rarely changing child collection would pay a full read every night),
    and its evidence names job 10, which has just seen CC move these very parents. (A quiet
    verification with no such sibling: tests/integration/test_extract_fanout_content.py.)"""
    catalog = load_catalog(env)
    subjects, visits = catalog.get(10), catalog.get(11)
    parents_night(env)
    for job in (visits, subjects):  # first passes
        assert run_job(job, mode="incremental", settings=env).status == "success"

    sim.mutate("subjects", modify_count=4, touch_parents=True)
    parents_night(env)
    r10 = run_job(subjects, mode="incremental", settings=env)
    f10 = fanout(env, r10)
    assert f10["asked"] == "verify" and f10["announced_changes"] >= 4 and f10["assumption_after"] == "holds"
    assert f10["assumption_evidence"] == "announced"
    r11 = run_job(visits, mode="incremental", settings=env)
    f11 = fanout(env, r11)
    assert f11["asked"] == "verify" and f11["announced_changes"] == f11["unannounced_changes"] == 0
    assert f11["assumption_after"] == "holds" and f11["assumption_evidence"] == "announced on job 10 (same parents)"
    assert fanout(env, run_job(visits, mode="incremental", settings=env))["asked"] == "changed"


def test_a_parent_whose_content_changed_without_its_timestamp_is_not_a_changed_parent(
        env: Settings, sim: SimulatorProcess) -> None:
    """A renamed organization changes the preview embedded in its studies, and the unfiltered study
    list (job 164) brings that into every such study's row -- but no study's own timestamp moved, so
    no child change is announced there: those parents are counted (``parents_content_only``), not asked."""
    subjects, study_list = load_catalog(env).get(10), load_catalog(env).get(164)
    parents_night(env)
    assert run_job(subjects, mode="incremental", settings=env).status == "success"  # first pass
    sim.mutate("subjects", modify_count=3, touch_parents=True)
    parents_night(env)
    verify = run_job(subjects, mode="incremental", settings=env)
    assert fanout(env, verify)["assumption_after"] == "holds"

    sim.mutate("organizations", modify_count=1)
    r = run_job(study_list, mode="incremental", settings=env)
    assert r.status == "success", r.error
    load_once(env, "fc-loader", [study_list.target_table], batch_size=5000)
    got = sim.mutate("subjects", modify_count=3, touch_parents=True)
    changed = {f"cc1:{i}" for i in got["modified"]}
    parents_night(env)
    inc = run_job(subjects, mode="incremental", settings=env)
    f = fanout(env, inc)
    assert inc.status == "success" and f["asked"] == "changed"
    truth = expected_by_key(sim, subjects)
    studies = {str(truth[k][-1]["study"]["id"]) for k in changed}
    # (a study whose own timestamp moved within parents.PARENT_CLOCK_MARGIN of the newest one the
    # last read saw -- the ones touched last night -- counts as changed either way)
    assert f["parents_content_only"] > 0, f
    assert len(studies) <= f["parents_changed"] <= len(studies) + 3 + 3, f
    assert published(env, inc) == changed


def test_assumed_trusts_from_the_first_pass_and_evidence_against_still_breaks_it(
        sim: SimulatorProcess, fresh_db: str, unique: str) -> None:
    """``fanout_incremental: assumed`` (for jobs whose records carry no timestamp, where the
    assumption cannot be checked): changed parents + the sweep from the night after the first pass,
    no verification night; an unannounced change the sweep finds still sends it to the guard."""
    migrate()
    sync(load_catalog())
    with _env(sim, f"fa{unique}", 2) as env:
        subjects = load_catalog(env).get(10).model_copy(update={"fanout_incremental": "assumed"})
        parents_night(env)
        first = run_job(subjects, mode="incremental", settings=env)
        assert fanout(env, first)["asked"] == "first_pass"
        got = sim.mutate("subjects", modify_count=4, touch_parents=True)
        changed = {f"cc1:{i}" for i in got["modified"]}
        parents_night(env)
        r = run_job(subjects, mode="incremental", settings=env)
        f = fanout(env, r)
        assert f["policy"] == "assumed" and f["asked"] == "changed" and r.parents_total < first.parents_total
        assert published(env, r) >= changed  # (and the swept half's subjects, read unfiltered)
        got = sim.mutate("subjects", modify_count=4, touch_parents=False)
        parents_night(env)
        runs = [run_job(subjects, mode="incremental", settings=env) for _ in range(2)]  # one sweep cycle
        fans = [fanout(env, x) for x in runs]
        assert {f"cc1:{i}" for i in got["modified"]} <= published(env, runs[0]) | published(env, runs[1])
        assert "broken" in {x["assumption_after"] for x in fans}
        assert fanout(env, run_job(subjects, mode="incremental", settings=env))["asked"] == "guard"
