"""`trialsync scheduler` as real processes: two replicas run one scheduled fire once (advisory lock +
reuse), a fire brings its dependencies, SIGTERM shuts down gracefully (running jobs cancelled)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bench.procwatch import descendants, proc_table
from common.stack import pid_alive
from tests.integration.orch_pipeline import (
    REPO,
    TRIALSYNC,
    Pipeline,
    pipeline,  # noqa: F401 - fixture
    require_pipeline_modules,
    wait_until,
)

pytestmark = pytest.mark.integration
require_pipeline_modules()


@pytest.fixture(scope="module")
def sim() -> Iterator[Any]:
    from simulator.testing import SimulatorProcess

    with SimulatorProcess(scale=0.002, seed=13, api_key="sched-test-key") as s:
        yield s


class Replica:
    def __init__(self, p: Pipeline, name: str, grace: float = 30.0):
        from common.stack import free_port

        self.log = p.state_dir / f"scheduler-{name}.log"
        self.metrics_port = free_port()
        env = {**p.env, "SCHEDULER_REFRESH_SECONDS": "1", "SCHEDULER_COALESCE_SECONDS": "0.5",
               "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "ENABLE_METRICS": "true",
               "METRICS_PORT": str(self.metrics_port)}
        self.out = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([TRIALSYNC, "scheduler", "--shutdown-grace", str(grace)], env=env, cwd=REPO,
                                     stdout=self.out, stderr=subprocess.STDOUT)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.out.close()
        return code

    def text(self) -> str:
        return Path(self.log).read_text(errors="replace")


def schedule_missed_fire(p: Pipeline, job_id: int) -> datetime:
    """Give ``job_id`` a daily schedule whose fire time was a minute ago (set before that): every
    scheduler that starts now catches that fire up once; the next fire is tomorrow."""
    now = datetime.now(UTC)
    fire = (now - timedelta(minutes=1)).replace(second=0, microsecond=0)
    with p.conn() as c:
        c.execute("UPDATE etl.dw_etl_jobs SET schedule = NULL")
        c.execute("UPDATE etl.dw_etl_jobs SET schedule = %s WHERE id = %s", (f"{fire.minute} {fire.hour} * * *", job_id))
        c.execute("UPDATE etl.dw_etl_jobs SET schedule_updated_at = %s WHERE id = %s",
                  (fire - timedelta(minutes=2), job_id))
    return fire


def fires(p: Pipeline, job_id: int) -> list[tuple[Any, ...]]:
    with p.conn() as c:
        return c.execute("""SELECT scheduled_for, kind, outcome, run_id, orchestration_id FROM etl.dw_scheduler_fires
                             WHERE job_id = %s ORDER BY id""", (job_id,)).fetchall()


def test_two_replicas_run_one_fire_once(pipeline: Pipeline) -> None:  # noqa: F811
    """Both replicas catch the same missed fire up; one extracts, the other waits for its lock and
    reuses that run. (A replica that starts *after* the other recorded the fire does not catch it up
    at all: its catch-up reference is the latest recorded fire. The test makes both read their
    reference first, by holding inserts into the fires table until both have started; otherwise
    a slow start on a busy machine turned this into that other, one-fire case.)"""
    pipeline.sim.set_faults("latency@/api/v1/sites,ms=3000")  # the run lasts a while: the replicas overlap
    fire = schedule_missed_fire(pipeline, 1)
    gate = pipeline.conn()
    gate.execute("BEGIN")
    gate.execute("LOCK TABLE etl.dw_scheduler_fires IN SHARE MODE")  # readers pass, record_fire waits
    a, b = Replica(pipeline, "a"), Replica(pipeline, "b")

    def logs() -> str:
        return "\n".join(f"--- replica {r.log.name}:\n{r.text()[-3000:]}" for r in (a, b))

    try:
        try:
            wait_until(lambda: all('"event":"scheduler_started"' in r.text() for r in (a, b)), 90,
                       "both replicas to start", detail=logs)
        finally:
            gate.execute("COMMIT")
            gate.close()
        wait_until(lambda: len([f for f in fires(pipeline, 1) if f[2] != "running"]) >= 2, 120,
                   "both replicas to finish their fire", detail=lambda: f"fires: {fires(pipeline, 1)}\n{logs()}")
        time.sleep(2)  # nothing else may happen
        got = fires(pipeline, 1)
        assert len(got) == 2, got
        assert {f[0] for f in got} == {fire} and {f[1] for f in got} == {"catch_up"}
        assert sorted(f[2] for f in got) == ["reused", "success"], got
        with pipeline.conn() as c:
            runs = c.execute("""SELECT id, run_status, trigger FROM etl.dw_etl_runs WHERE job_id = 1""").fetchall()
        assert len(runs) == 1 and runs[0][1:] == ("success", "scheduler"), runs  # extracted exactly once
        assert {f[3] for f in got} == {runs[0][0]}  # the reusing replica points at that run
        assert len({f[4] for f in got}) == 2  # two orchestrations, one per replica
        # a replica started now finds the fire recorded: it does not catch it up again
        late = Replica(pipeline, "late")
        try:
            wait_until(lambda: '"event":"scheduler_started"' in late.text(), 90, "the late replica to start",
                       detail=lambda: late.text()[-3000:])
            time.sleep(2)
            assert len(fires(pipeline, 1)) == 2, fires(pipeline, 1)
            assert '"event":"schedule_fired"' not in late.text()
        finally:
            assert late.stop() == 0
    finally:
        codes = (a.stop(), b.stop())
    assert codes == (0, 0), (a.text()[-2000:], b.text()[-2000:])
    for r in (a, b):
        assert '"event":"scheduler_stopped"' in r.text()


def test_fire_runs_the_job_with_its_dependencies(pipeline: Pipeline) -> None:  # noqa: F811
    schedule_missed_fire(pipeline, 10)
    r = Replica(pipeline, "deps")
    try:
        wait_until(lambda: any(f[2] != "running" for f in fires(pipeline, 10)), 120, "the fire to finish")
        (f,) = fires(pipeline, 10)
        assert f[2] == "success", r.text()[-3000:]
        with pipeline.conn() as c:
            rows = {j: (started, loaded) for j, started, loaded in c.execute(
                """SELECT job_id, started_at, load_completed_at FROM etl.dw_etl_runs
                    WHERE orchestration_id = %s AND run_status = 'success'""", (f[4],)).fetchall()}
        assert set(rows) == {2, 164, 10}  # Subjects and both jobs that fill its parameter table
        assert rows[10][0] >= max(rows[2][1], rows[164][1])
        # the scheduler's /metrics shows its own families and its extraction workers' (multiprocess)
        import requests

        text = requests.get(f"http://127.0.0.1:{r.metrics_port}/metrics", timeout=10).text
        assert 'trialsync_scheduler_fires_total{job_id="10",outcome="success"} 1.0' in text
        assert 'trialsync_job_runs_total{job_id="10",status="success"} 1.0' in text
        assert 'trialsync_scheduler_next_fire_timestamp_seconds{job_id="10"}' in text
    finally:
        assert r.stop() == 0


def test_sigterm_cancels_a_running_orchestration_after_the_grace(pipeline: Pipeline) -> None:  # noqa: F811
    pipeline.sim.set_faults("latency@/api/v1/sites,ms=120000")
    schedule_missed_fire(pipeline, 1)
    r = Replica(pipeline, "stop", grace=1)
    with pipeline.conn() as c:
        wait_until(lambda: c.execute("SELECT count(*) FROM etl.dw_etl_runs WHERE job_id = 1 AND run_status = 'running'")
                   .fetchone()[0] == 1, 60, "the scheduled run to start")
    t0 = time.monotonic()
    code = r.stop(timeout=60)
    assert code == 0, r.text()[-2000:]
    assert time.monotonic() - t0 < 30
    with pipeline.conn() as c:
        status, error = c.execute("SELECT run_status, error_message FROM etl.dw_etl_runs WHERE job_id = 1").fetchone()
    assert status == "cancelled" and "scheduler shut down" in error
    (f,) = fires(pipeline, 1)
    assert f[2] == "cancelled"
    # the next start runs the interrupted fire again (a deploy at 02:30 does not cost the night)
    assert_next_start_catches_up(pipeline, f[0], "after-stop")


def assert_next_start_catches_up(p: Pipeline, scheduled_for: datetime, name: str) -> None:
    p.sim.clear_faults()
    r = Replica(p, name)
    try:
        wait_until(lambda: any(f[2] not in ("running", "cancelled", "abandoned") for f in fires(p, 1)), 90,
                   "the interrupted fire to be caught up", detail=lambda: f"fires: {fires(p, 1)}\n{r.text()[-3000:]}")
        done = [f for f in fires(p, 1) if f[2] not in ("cancelled", "abandoned")]
        assert [(f[0], f[1], f[2]) for f in done] == [(scheduled_for, "catch_up", "success")], done
        with p.conn() as c:
            runs = c.execute("SELECT run_status FROM etl.dw_etl_runs WHERE job_id = 1 AND run_status = 'success'"
                             ).fetchall()
            assert len(runs) == 1
            wait_until(lambda: c.execute("SELECT count(*) FROM bronze.dim_sites_staging").fetchone()[0] > 0, 60,
                       "the loader to load the caught-up run")
    finally:
        assert r.stop() == 0


def test_fire_of_a_killed_scheduler_is_abandoned_and_run_again_at_the_next_start(pipeline: Pipeline) -> None:  # noqa: F811
    pipeline.sim.set_faults("latency@/api/v1/sites,ms=120000")
    fire = schedule_missed_fire(pipeline, 1)
    r = Replica(pipeline, "killed")
    with pipeline.conn() as c:
        wait_until(lambda: c.execute("SELECT count(*) FROM etl.dw_etl_runs WHERE job_id = 1 AND run_status = 'running'")
                   .fetchone()[0] == 1, 60, "the scheduled run to start", detail=lambda: r.text()[-3000:])
    tree = descendants(r.proc.pid, proc_table())[1:]  # forkserver, extraction worker, resource tracker
    assert tree, "the scheduler runs its extraction in child processes"
    r.proc.kill()  # kill -9: no shutdown, no fire bookkeeping
    r.proc.wait(30)
    r.out.close()
    # no orphan goes on extracting without the job's lock (it would run beside the next scheduler)
    wait_until(lambda: not [p for p in tree if pid_alive(p)], 15, "the killed scheduler's processes to exit",
               detail=lambda: f"still alive: {[p for p in tree if pid_alive(p)]}")
    (f,) = fires(pipeline, 1)
    assert f[2] == "running"
    assert_next_start_catches_up(pipeline, fire, "after-kill")
    abandoned = [x for x in fires(pipeline, 1) if x[2] == "abandoned"]
    assert len(abandoned) == 1 and abandoned[0][0] == fire
    with pipeline.conn() as c:
        (detail,) = c.execute("""SELECT detail FROM etl.dw_scheduler_fires WHERE outcome = 'abandoned'""").fetchone()
    assert f"scheduler process {r.proc.pid}" in detail and "runs it again" in detail
