"""The runner's decisions under a virtual clock: order, parallelism, load barriers, skips, retries,
timeouts, locks. The real child processes and database are exercised in tests/integration."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.dag import build_plan
from orchestrator.retry import RetryPolicy, RetryRequest
from orchestrator.runner import Runner, RunnerOptions
from schemas.jobs import JobCatalog
from tests.unit.orch_fakes import FakeClock, FakeWorld, Script, small_catalog


def make_runner(catalog: JobCatalog, world: FakeWorld, clock: FakeClock, ids: list[int] | None = None,
                initial: dict[int, RetryRequest] | None = None, **opts: object) -> Runner:
    plan = build_plan(catalog, ids or [j.id for j in catalog.runnable])
    options = RunnerOptions(parallel=int(opts.pop("parallel", 5)), policy=opts.pop("policy", RetryPolicy(  # type: ignore[arg-type]
        max_retries=0, base_delay=1, jitter=0)), timeout_seconds=int(opts.pop("timeout", 300)),  # type: ignore[call-overload]
        timeout_grace=float(opts.pop("grace", 5)), load_timeout=float(opts.pop("load_timeout", 600)),  # type: ignore[arg-type]
        load_poll=0.1, **opts)  # type: ignore[arg-type]
    return Runner(plan, world, world, options, clock=clock, wall=clock.wall, wait=clock.wait,
                  initial_requests=initial)


def test_children_start_only_after_parents_are_loaded() -> None:
    clock = FakeClock()
    world = FakeWorld(clock, default=Script(duration=3, load_delay=4))
    res = make_runner(small_catalog(), world, clock).run()
    assert res.status == "success"
    plan = res.plan
    for j in plan.job_ids:
        for p in plan.parents[j]:
            assert world.started[j][0] >= world.load_time(p), f"job {j} started before parent {p} was loaded"
    # independent jobs did not wait for each other: studies and sites started together
    assert world.started[1][0] == world.started[5][0]


def test_parallelism_is_bounded() -> None:
    jobs = [small_catalog().get(5).model_copy(update={"id": i, "name": f"J{i}", "target_table": f"t_{i}"})
            for i in range(1, 13)]
    cat = JobCatalog(jobs)
    clock = FakeClock()
    world = FakeWorld(clock, default=Script(duration=2))
    res = make_runner(cat, world, clock, parallel=3).run()
    assert res.status == "success"
    assert world.max_running == 3
    assert len(world.launches) == 12


def test_failed_parent_skips_descendants_with_reason() -> None:
    clock = FakeClock()
    world = FakeWorld(clock, scripts={(1, 1): Script(status="failed", error="HTTP 500 from the API",
                                                      error_class="ServerError")})
    res = make_runner(small_catalog(), world, clock).run()
    assert res.jobs[1].status == "failed"
    for child in (2, 3, 4):
        assert res.jobs[child].status == "skipped"
        assert child in world.skipped
    assert "parent job 1 (Studies) failed" in world.skipped[2]
    assert "HTTP 500" in world.skipped[2]
    assert "parent job 2 (Subjects) was skipped" in world.skipped[3]
    assert res.jobs[5].status == "success"
    assert res.status == "partial"
    assert {r.job.id for r in world.launches} == {1, 5}


def test_partial_parent_does_not_block_children() -> None:
    clock = FakeClock()
    world = FakeWorld(clock, scripts={(2, 1): Script(status="partial", failed_parents=[{"thingId": "7"}])})
    res = make_runner(small_catalog(), world, clock).run()
    assert res.jobs[2].status == "partial"
    assert res.jobs[3].status == "success"


def test_partial_run_retries_only_failed_parents_with_backoff() -> None:
    clock = FakeClock()
    failed = [{"thingId": "7"}, {"thingId": "9"}]
    world = FakeWorld(clock, scripts={(2, 1): Script(status="partial", failed_parents=failed, duration=1)})
    res = make_runner(small_catalog(), world, clock,
                      policy=RetryPolicy(max_retries=2, base_delay=10, jitter=0)).run()
    attempts = [r for r in world.launches if r.job.id == 2]
    assert [a.attempt for a in attempts] == [1, 2]
    assert attempts[0].only_parents is None
    assert attempts[1].only_parents == failed
    first_run = next(rid for rid, r in world.runs.items() if r["job_id"] == 2 and r.get("attempt") == 1)
    assert attempts[1].parent_run_id == first_run
    # the retry waited the backoff delay after the first attempt ended
    assert world.started[2][1] - world.runs[first_run]["ended"] >= 10
    assert res.jobs[2].status == "success"
    # the grandchild waited for BOTH runs of its parent to be loaded
    assert world.started[3][0] >= world.load_time(2)


def test_failed_run_retried_in_full_then_gives_up() -> None:
    clock = FakeClock()
    fail = Script(status="failed", error="HTTP 503", error_class="ServerError")
    world = FakeWorld(clock, scripts={(5, a): fail for a in (1, 2, 3)})
    res = make_runner(small_catalog(), world, clock, ids=[5],
                      policy=RetryPolicy(max_retries=2, base_delay=1, jitter=0)).run()
    attempts = [r for r in world.launches if r.job.id == 5]
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert all(a.only_parents is None for a in attempts)
    starts = world.started[5]
    assert starts[2] - starts[1] > starts[1] - starts[0]  # exponential
    assert res.jobs[5].status == "failed"


def test_permanent_error_is_not_retried() -> None:
    clock = FakeClock()
    world = FakeWorld(clock, scripts={(5, 1): Script(status="failed", error="key refused", error_class="AuthError")})
    res = make_runner(small_catalog(), world, clock, ids=[5], policy=RetryPolicy(max_retries=3, base_delay=1)).run()
    assert len(world.launches) == 1
    assert res.jobs[5].status == "failed"


def test_timeout_kills_and_marks_failed() -> None:
    clock = FakeClock()
    world = FakeWorld(clock, scripts={(5, 1): Script(hang=True)})
    res = make_runner(small_catalog(), world, clock, ids=[5], timeout=30, grace=5).run()
    assert world.killed and world.killed[0][0] == 5
    assert world.killed[0][2] >= 1000 + 35
    run = next(r for r in world.runs.values() if r["job_id"] == 5)
    assert run["status"] == "failed"
    assert run["error_class"] == "JobTimeout"
    assert "exceeded its timeout of 30 s" in run["error"]
    assert res.jobs[5].status == "failed"


def test_job_timeout_overrides_default() -> None:
    cat = JobCatalog([small_catalog().get(5).model_copy(update={"timeout_seconds": 7})])
    clock = FakeClock()
    world = FakeWorld(clock, scripts={(5, 1): Script(hang=True)})
    make_runner(cat, world, clock, timeout=300, grace=1).run()
    assert world.killed[0][2] - 1000 < 10


def test_process_death_is_recorded_as_failure() -> None:
    clock = FakeClock()
    world = FakeWorld(clock, scripts={(5, 1): Script(die=True, duration=1)})
    res = make_runner(small_catalog(), world, clock, ids=[5]).run()
    run = next(r for r in world.runs.values() if r["job_id"] == 5)
    assert run["status"] == "failed" and run["error_class"] == "ProcessDied"
    assert res.jobs[5].status == "failed"


def test_job_locked_elsewhere_waits_then_reuses_the_other_run() -> None:
    clock = FakeClock()
    world = FakeWorld(clock, locked_elsewhere={1})
    world.release_at[1] = clock.t + 30
    world.foreign_runs[1] = (900, "success")
    res = make_runner(small_catalog(), world, clock).run()
    assert 1 not in {r.job.id for r in world.launches}  # never extracted twice
    assert res.jobs[1].status == "success" and res.jobs[1].reused_run_id == 900
    assert "reused run 900" in (res.jobs[1].reason or "")
    assert world.started[2][0] >= 1030  # children waited for the lock holder's run to be loaded
    assert world.locks == set()  # every lock this run took is released


def test_job_locked_elsewhere_runs_itself_when_the_other_run_failed() -> None:
    clock = FakeClock()
    world = FakeWorld(clock, locked_elsewhere={5})
    world.release_at[5] = clock.t + 10
    world.foreign_runs[5] = (901, "failed")
    res = make_runner(small_catalog(), world, clock, ids=[5]).run()
    assert [r.job.id for r in world.launches] == [5]
    assert world.started[5][0] >= 1010
    assert res.jobs[5].status == "success"


def test_lock_never_released_skips_after_timeout() -> None:
    clock = FakeClock()
    world = FakeWorld(clock, locked_elsewhere={1})
    res = make_runner(small_catalog(), world, clock, load_timeout=100).run()
    assert res.jobs[1].status == "skipped"
    assert "stayed locked by another process" in world.skipped[1]
    assert res.jobs[2].status == "skipped"


def test_full_mode_never_reuses() -> None:
    clock = FakeClock()
    world = FakeWorld(clock)
    world.foreign_runs[5] = (902, "success")
    make_runner(small_catalog(), world, clock, ids=[5], mode="full").run()
    assert [r.job.id for r in world.launches] == [5]


def test_load_timeout_skips_children() -> None:
    clock = FakeClock()
    world = FakeWorld(clock, scripts={(1, 1): Script(load_delay=10_000)})
    res = make_runner(small_catalog(), world, clock, load_timeout=60).run()
    assert res.jobs[1].status == "success" and res.jobs[1].loaded is False
    assert res.jobs[2].status == "skipped"
    assert "not loaded within 60 s" in world.skipped[2]


def test_initial_request_runs_only_given_parents() -> None:
    clock = FakeClock()
    world = FakeWorld(clock)
    req = RetryRequest(job_id=2, attempt=3, parent_run_id=41, only_parents=[{"thingId": "1"}])
    make_runner(small_catalog(), world, clock, ids=[2], initial={2: req}).run()
    (launch,) = world.launches
    assert launch.attempt == 3 and launch.parent_run_id == 41 and launch.only_parents == [{"thingId": "1"}]


def test_cancel_stops_running_jobs() -> None:
    clock = FakeClock()
    world = FakeWorld(clock, default=Script(hang=True))
    runner = make_runner(small_catalog(), world, clock, timeout=10_000)
    orig = clock.wait

    def wait(objs: list[object], timeout: float) -> list[object]:
        if clock.t > 1010:
            runner.cancel("test stop")
        return orig(objs, timeout)

    runner._wait = wait  # type: ignore[method-assign]
    res = runner.run()
    assert res.status == "cancelled"
    assert {j for j, _, _ in world.killed} == {1, 5}
    assert all(s.status == "cancelled" for s in res.jobs.values())


def test_whole_catalog_plan_respects_every_edge() -> None:
    """All 72 runnable jobs through the runner: every child starts after all its parents loaded."""
    cat = JobCatalog.load()
    clock = FakeClock()
    world = FakeWorld(clock, default=Script(duration=2, load_delay=1))
    res = make_runner(cat, world, clock, parallel=5).run()
    assert res.status == "success"
    assert len(world.launches) == 72
    for j in res.plan.job_ids:
        for p in res.plan.parents[j]:
            assert world.started[j][0] >= world.load_time(p)
    assert world.max_running <= 5


@pytest.mark.parametrize("status,attempt,cls,parents,expected", [
    ("failed", 1, "ServerError", None, True),
    ("failed", 4, "ServerError", None, False),
    ("failed", 1, "AuthError", None, False),
    ("partial", 1, "PartialFailure", [{"a": 1}], True),
    ("partial", 1, None, [], False),
    ("success", 1, None, None, False),
])
def test_should_retry(status: str, attempt: int, cls: str | None, parents: list | None, expected: bool) -> None:
    assert RetryPolicy(max_retries=3).should_retry(status, attempt, cls, parents) is expected


def test_backoff_grows_exponentially_and_is_capped() -> None:
    p = RetryPolicy(max_retries=10, base_delay=5, max_delay=60, jitter=0)
    assert [p.delay(a) for a in (1, 2, 3, 4, 5)] == [5, 10, 20, 40, 60]
    pj = RetryPolicy(base_delay=10, jitter=0.1)
    assert 9 <= pj.delay(1, rng=lambda: 0.0) <= 11
    assert 9 <= pj.delay(1, rng=lambda: 1.0) <= 11


def test_expensive_jobs_start_first() -> None:
    """History (API calls of the last run) ranks independent jobs; row counts rank fan-out jobs."""
    from tests.unit.orch_fakes import job

    cat = JobCatalog([job(i, f"J{i}", f"t_{i}") for i in range(1, 5)])
    clock = FakeClock()
    world = FakeWorld(clock)
    world.history = {4: 1000.0, 3: 500.0}
    make_runner(cat, world, clock, parallel=1).run()
    assert [r.job.id for r in world.launches] == [4, 3, 1, 2]

    cat = JobCatalog([job(1, "P1", "t_1"), job(2, "P2", "t_2"),
                      job(3, "C1", "c_1", parent_table="t_1"), job(4, "C2", "c_2", parent_table="t_2")])
    clock = FakeClock()
    world = FakeWorld(clock)
    world.table_rows = {"t_1": 10, "t_2": 1000}
    make_runner(cat, world, clock, parallel=2).run()
    assert [r.job.id for r in world.launches] == [1, 2, 4, 3]


def test_cancel_lets_extractions_stop_cleanly_before_killing() -> None:
    clock = FakeClock()
    world = FakeWorld(clock, scripts={(1, 1): Script(duration=10_000), (5, 1): Script(hang=True)})
    runner = make_runner(small_catalog(), world, clock, timeout=100_000)
    orig = clock.wait

    def wait(objs: list[object], timeout: float) -> list[object]:
        if clock.t > 1010:
            runner.cancel("scheduler shut down")
        return orig(objs, timeout)

    runner._wait = wait  # type: ignore[method-assign]
    res = runner.run()
    assert res.status == "cancelled"
    assert [j for j, _, _ in world.killed] == [5]  # the clean stopper was not killed
    by_job = {r["job_id"]: r for r in world.runs.values() if r.get("attempt") == 1}
    assert by_job[1]["status"] == "cancelled" and by_job[1]["error"] == "scheduler shut down"
    assert by_job[5]["status"] == "cancelled"


class _DatabaseDown(FakeWorld):
    """The database is unreachable between ``down_from`` and ``down_until`` (virtual seconds)."""

    def __init__(self, clock: FakeClock, down_from: float, down_until: float, **kw: object) -> None:
        super().__init__(clock, **kw)  # type: ignore[arg-type]
        self.down = (down_from, down_until)
        self.lock_errors = 0

    def _check(self) -> None:
        if self.down[0] <= self.clock.t < self.down[1]:
            raise RuntimeError("cannot connect to PostgreSQL (connection refused)")

    def try_lock(self, job_id: int) -> bool:
        try:
            self._check()
        except RuntimeError:
            self.lock_errors += 1
            raise
        return super().try_lock(job_id)

    def loaded(self, run_ids: list[int]) -> dict[int, bool]:
        self._check()
        return super().loaded(run_ids)


def test_database_outage_delays_jobs_instead_of_skipping_them() -> None:
    """Found by the fault suite: a PostgreSQL restart mid-run skipped every job that was about to
    start ("could not take the job's lock"). Jobs now wait for the database like for a held lock."""
    clock = FakeClock()
    world = _DatabaseDown(clock, down_from=clock.t, down_until=clock.t + 12, default=Script(duration=3, load_delay=1))
    res = make_runner(small_catalog(), world, clock, load_timeout=100).run()
    assert world.lock_errors > 0, "the outage did not hit a lock attempt: the test proves nothing"
    assert res.status == "success", {j: (s.status, s.reason) for j, s in res.jobs.items()}
    assert not world.skipped


def test_database_outage_longer_than_the_load_timeout_skips_with_reason() -> None:
    clock = FakeClock()
    world = _DatabaseDown(clock, down_from=clock.t, down_until=clock.t + 10_000, default=Script(duration=3))
    res = make_runner(small_catalog(), world, clock, load_timeout=50).run()
    assert res.status != "success"
    assert any("database unreachable" in why for why in world.skipped.values()), world.skipped


def test_wait_load_does_not_wait_again_for_a_timed_out_load() -> None:
    clock = FakeClock()
    t0 = clock.t
    world = FakeWorld(clock, scripts={(5, 1): Script(duration=1, load_delay=10_000)})
    res = make_runner(small_catalog(), world, clock, ids=[5], load_timeout=60, wait_all_loads=True).run()
    assert res.jobs[5].loaded is False
    assert clock.t - t0 < 100, f"waited {clock.t - t0:.0f} s: the 60 s load timeout was applied twice"


def test_a_run_whose_records_never_load_makes_the_orchestration_partial() -> None:
    """Found by the fault suite: a broker restart lost published records, their runs never loaded,
    and `trialsync run --all --wait-load` still reported success (exit 0)."""
    clock = FakeClock()
    world = FakeWorld(clock, scripts={(5, 1): Script(duration=1, load_delay=10_000)})
    res = make_runner(small_catalog(), world, clock, ids=[5], load_timeout=30, wait_all_loads=True).run()
    assert res.jobs[5].loaded is False and "not loaded within 30 s" in (res.jobs[5].reason or "")
    assert res.status == "partial"
    # with children: they are skipped, the orchestration is partial too
    clock = FakeClock()
    world = FakeWorld(clock, scripts={(1, 1): Script(load_delay=10_000)})
    assert make_runner(small_catalog(), world, clock, load_timeout=30).run().status == "partial"


class _LoaderRejects(FakeWorld):
    """The loader dead-lettered records of job 5's run."""

    def run_rows(self, run_ids: list[int]) -> dict[int, Any]:
        out = super().run_rows(run_ids)
        for r in out.values():
            if r.job_id == 5:
                r.records_rejected = 3
        return out


def test_records_rejected_by_the_loader_make_the_job_partial() -> None:
    """Found by the fault suite: three records the API served without their id were dead-lettered
    and their run turned partial, but `trialsync run` still reported success."""
    clock = FakeClock()
    world = _LoaderRejects(clock)
    res = make_runner(small_catalog(), world, clock, ids=[5, 1], wait_all_loads=True).run()
    assert res.jobs[5].status == "partial" and "3 record(s)" in (res.jobs[5].reason or "")
    assert res.jobs[1].status == "success"
    assert res.status == "partial"
