"""Fault scenarios: each injects one kind of fault DURING a full run of all 72 jobs (real
`trialsync run --all`, real `trialsync load` services, real PostgreSQL, broker and simulator), heals
the way an operator would, then reconciles every staging table with the simulator's ground truth.

Used by ``tests/faults/test_e2e_faults.py`` (CI, scale 0.002) and ``python -m bench.faults``
(any scale; JSON + Markdown). Every scenario returns a :class:`Outcome`: the faults injected,
what was done to heal, and the reconciliation (expected / missing / duplicated / stale / extra).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.faults.lab import Lab, Proc, Scenario, wait_until

#: a mid-run fault fires once this many job runs have finished (of 72): the plain jobs are done,
#: the parameterized fan-outs are starting or running
MID_RUN = 20
RUN_TIMEOUT = 900


@dataclass
class Outcome:
    scenario: str
    description: str
    faults: list[str] = field(default_factory=list)
    heal: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    #: exit code of the faulted `trialsync run` (None: it was killed)
    run_exit: int | None = None
    run_status: str | None = None
    #: after the fault, before healing (only where the fault loses data on purpose)
    before_heal: dict[str, int] | None = None
    expected: int = 0
    loaded: int = 0
    missing: int = 0
    duplicated: int = 0
    stale: int = 0
    extra: int = 0
    rejected: int = 0  # records dead-lettered (DLQ + etl.dw_etl_rejects)
    runs: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    problems: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def exact(self) -> bool:
        return self.missing == self.duplicated == self.stale == self.extra == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exact": self.exact}


def _result_status(run: Proc) -> str | None:
    """The orchestration status from `trialsync run --json` (stdout; None if it printed none)."""
    try:
        return str(json.loads(run.output())["status"])
    except (ValueError, KeyError, TypeError):
        return None


def _finish(sc: Scenario, out: Outcome, t0: float, jobs: list[int] | None = None) -> Outcome:
    rec = sc.reconcile(jobs)
    tot = rec.totals
    out.expected, out.loaded = tot["expected"], tot["loaded"]
    out.missing, out.duplicated, out.stale, out.extra = tot["missing"], tot["duplicated"], tot["stale"], tot["extra"]
    out.problems = rec.problems()
    out.runs = sc.run_summary()
    rows = sc.query("SELECT count(*) FROM etl.dw_etl_rejects")
    out.rejected = int(rows[0][0]) if rows else 0
    zombies = sc.query("SELECT count(*) FROM etl.dw_etl_runs WHERE run_status = 'running'")
    out.checks["runs_left_running"] = int(zombies[0][0]) if zombies else None
    out.faults, out.steps = list(sc.faults), list(sc.steps)
    out.seconds = round(time.monotonic() - t0, 1)
    return out


def _run_all(sc: Scenario, *extra: str, selection: tuple[str, ...] = ("--all",),
             env: dict[str, str] | None = None) -> Proc:
    return sc.start_run(*selection, "--wait-load", *extra, extra_env=env)


def _selected(selection: tuple[str, ...]) -> list[int] | None:
    """Job ids of a `trialsync run` selection (None = all runnable jobs)."""
    if selection == ("--all",):
        return None
    from common.catalog import load_catalog
    from orchestrator.dag import select_jobs

    args = list(selection)
    category = args[args.index("--category") + 1] if "--category" in args else None
    refs = [args[i + 1] for i, a in enumerate(args) if a == "--job"]
    return select_jobs(load_catalog(), category=category, job_refs=refs, with_deps="--with-deps" in args)


def _wait_run(sc: Scenario, run: Proc, out: Outcome | None = None) -> int:
    rc = run.wait(RUN_TIMEOUT)
    status = _result_status(run)
    sc.note(f"run ended: exit {rc}, status {status}")
    if out is not None and out.run_exit is None and out.run_status is None:
        out.run_exit, out.run_status = rc, status
    return rc


def _rerun_until_success(sc: Scenario, out: Outcome, *args: str, attempts: int = 2,
                         selection: tuple[str, ...] = ("--all",)) -> int:
    """The operator's remedy: run the whole selection again (incremental unless told otherwise)."""
    rc = 1
    for _ in range(attempts):
        # the operator's run uses the default load timeout, whatever the faulted run used
        run = _run_all(sc, *args, selection=selection, env={"ETL_LOAD_TIMEOUT_SECONDS": "300"})
        rc = _wait_run(sc, run)
        out.heal.append(f"trialsync run {' '.join(selection + args)} -> exit {rc} ({_result_status(run)})")
        if rc == 0:
            break
    return rc


# -- 1. loader killed --------------------------------------------------------------------------------

def loader_kill(lab: Lab, loaders: int = 1) -> Outcome:
    """kill -9 a loader that holds partitions mid-run (with ``loaders`` > 1: one member of the group,
    whose partitions the others take over); restart it 3 s later."""
    out = Outcome("loader_kill" if loaders == 1 else f"loader_kill_{loaders}",
                  f"kill -9 {'the' if loaders == 1 else f'one of {loaders}'} loader process(es) mid-run; restart it")
    t0 = time.monotonic()
    with lab.scenario("loader_kill") as sc:
        for _ in range(loaders):
            sc.start_loader()
        run = _run_all(sc)
        sc.wait_mid_run(MID_RUN)
        victim = wait_until(lambda: next((p for p in sc.loaders if p.alive() and p.events("partitions_assigned")),
                                         None), 120, "a loader holding partitions")
        victim.kill9()
        sc.fault(f"kill -9 loader pid {victim.pid} (holding partitions) after {sc.runs_done()} job runs finished")
        time.sleep(3)
        sc.start_loader()
        out.heal.append("restarted the killed loader (trialsync load)")
        rc = _wait_run(sc, run, out)
        if rc != 0:
            _rerun_until_success(sc, out)
        return _finish(sc, out, t0)


# -- 2. extractor killed -----------------------------------------------------------------------------

def extractor_worker_kill(lab: Lab) -> Outcome:
    """kill -9 the worker process of a running parameterized (fan-out) extraction."""
    out = Outcome("extractor_worker_kill", "kill -9 the extraction worker of a running fan-out job mid-run")
    t0 = time.monotonic()
    with lab.scenario("extract_kill") as sc:
        sc.start_loader()
        run = _run_all(sc)
        sc.wait_mid_run(MID_RUN // 2)
        victim = wait_until(lambda: next((r for r in sc.running_runs() if r["fanout"]), None), 300,
                            "a running fan-out extraction")
        time.sleep(0.5)  # let it publish some records first
        try:
            os.kill(victim["pid"], signal.SIGKILL)
            sc.fault(f"kill -9 extraction worker pid {victim['pid']} (job {victim['job_id']}, run {victim['id']})")
        except ProcessLookupError:
            sc.fault(f"extraction worker pid {victim['pid']} had already finished")
        out.checks["killed_run"] = victim
        rc = _wait_run(sc, run, out)
        out.heal.append("automatic: the orchestrator retried the job (ETL_MAX_RETRIES)")
        if rc != 0:
            _rerun_until_success(sc, out)
        st = sc.query("SELECT run_status, error_class FROM etl.dw_etl_runs WHERE id = %s", (victim["id"],))
        out.checks["killed_run_final_status"] = list(st[0]) if st else None
        return _finish(sc, out, t0)


def orchestrator_kill(lab: Lab) -> Outcome:
    """kill -9 the `trialsync run` process itself; its workers die with it; the operator re-runs."""
    out = Outcome("orchestrator_kill", "kill -9 the `trialsync run --all` process mid-run; re-run it")
    t0 = time.monotonic()
    with lab.scenario("orch_kill") as sc:
        sc.start_loader()
        run = _run_all(sc)
        sc.wait_mid_run(MID_RUN)
        running = sc.running_runs()
        run.kill9()
        sc.fault(f"kill -9 `trialsync run` pid {run.pid} with {len(running)} extractions running")
        out.run_exit = run.popen.returncode
        time.sleep(1)
        orphans = [r["pid"] for r in running if _alive(r["pid"])]
        out.checks["orphan_workers_after_1s"] = orphans
        _rerun_until_success(sc, out)
        return _finish(sc, out, t0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- 3. PostgreSQL restarted -------------------------------------------------------------------------

def postgres_restart(lab: Lab, down_seconds: float = 5.0) -> Outcome:
    """Stop the embedded PostgreSQL mid-run (fast shutdown: every connection is cut), start it again."""
    out = Outcome("postgres_restart", f"stop PostgreSQL mid-run for {down_seconds:.0f} s, start it again")
    t0 = time.monotonic()
    with lab.scenario("pg_restart") as sc:
        sc.start_loader()
        run = _run_all(sc)
        sc.wait_mid_run(MID_RUN)
        lab.stop_postgres()
        sc.fault(f"PostgreSQL stopped (pg_ctl -m fast) for {down_seconds:.0f} s")
        time.sleep(down_seconds)
        lab.start_postgres()
        sc.note("PostgreSQL started")
        rc = _wait_run(sc, run, out)
        if rc != 0:
            _rerun_until_success(sc, out)
        out.checks["loaders_alive"] = all(p.alive() for p in sc.loaders)
        return _finish(sc, out, t0)


# -- 4. broker restarted -----------------------------------------------------------------------------

def broker_restart(lab: Lab, selection: tuple[str, ...] = ("--all",)) -> Outcome:
    """Restart the broker mid-run. Memory storage: topics and unconsumed records vanish; children of
    runs that can no longer be loaded are skipped after ETL_LOAD_TIMEOUT_SECONDS; a full re-extract
    heals. Durable storage: nothing is lost and the run itself completes."""
    durable = lab.durable_broker
    kind = "durable" if durable else "memory"
    jobs = _selected(selection)
    out = Outcome(f"broker_restart_{kind}", f"restart the broker ({kind} storage) mid-run"
                  + ("" if durable else "; heal with a full re-extract")
                  + ("" if jobs is None else f" ({' '.join(selection)}: {len(jobs)} jobs)"))
    t0 = time.monotonic()
    # a lost run never becomes "loaded": its children give up after this many seconds
    with lab.scenario(f"broker_{kind}", ETL_LOAD_TIMEOUT_SECONDS="300" if durable else "25") as sc:
        sc.start_loader()
        run = _run_all(sc, selection=selection)
        if jobs is None:
            sc.wait_mid_run(MID_RUN)
        else:  # a small selection: restart while a fan-out publishes
            wait_until(lambda: any(r["fanout"] for r in sc.running_runs()), 300, "a running fan-out extraction")
            if not durable:
                # The loader falls behind (stopped): what it has not consumed exists only in the
                # broker. Without this the restart can land when everything is already loaded (a
                # fast loader on an idle machine) and there is no loss to show.
                for p in list(sc.loaders):
                    p.stop()
                sc.note("loader stopped: the fan-out's records now live only in the broker")
            time.sleep(1.5)
        lab.restart_broker(down_seconds=1.0)
        sc.fault(f"broker restarted ({kind} storage, down 1 s) after {sc.runs_done()} job runs finished")
        if not durable and jobs is not None:
            sc.start_loader()
        rc = _wait_run(sc, run, out)
        if durable:
            if rc != 0:
                _rerun_until_success(sc, out, selection=selection)
        else:
            rec = sc.reconcile(jobs)
            out.before_heal = rec.totals
            sc.note(f"after the faulted run: {rec.totals}")
            # The running loader keeps its fetch positions from the lost topics; the new (empty)
            # topics start at offset 0 again and tansu answers a fetch beyond their end with an
            # empty batch, not OFFSET_OUT_OF_RANGE, so it would wait at the old position. A fresh
            # loader starts from the (new) broker's committed offsets. See docs/faults.md.
            for p in list(sc.loaders):
                p.stop()
            sc.start_loader()
            out.heal.append("restarted the loader (trialsync load)")
            _rerun_until_success(sc, out, "--full", selection=selection)
        return _finish(sc, out, t0, jobs)


# -- 5. API fault storm ------------------------------------------------------------------------------

STORM = ";".join([
    "500@*,p=0.15,count={n}",  # 30 % 5xx between them
    "502@*,p=0.15,count={n}",
    "429@*,after=500,count=25,retry_after=1",  # bursts: 25 consecutive 429s, three times
    "429@*,after=3000,count=25,retry_after=1",
    "429@*,after=8000,count=25,retry_after=1",
    "latency@*,p=0.005,ms=400,jitter_ms=400",  # latency spikes
    "malformed@*,p=0.01,count={m}",  # bad JSON pages
    "truncate@*,p=0.005,count={m}",  # bodies cut short
])
# records the API really returns without their key (must be dead-lettered, counted, reported)
BAD_RECORDS = "no_id@/api/v1/patient-visits/odata,count=3"


def api_storm(lab: Lab, storm_requests: int = 6000) -> Outcome:
    """30 % 5xx, 429 bursts with Retry-After, latency spikes, malformed and truncated pages, and three
    records served without their id. Runs end success or partial; retries and a re-run heal them; the
    three bad records are in the DLQ with their reason; a full re-run of that job brings them in."""
    n = int(storm_requests * 0.15)
    spec = STORM.format(n=n, m=max(5, storm_requests // 100)) + ";" + BAD_RECORDS
    out = Outcome("api_storm", "API fault storm during the run: 30% 5xx, 429 bursts, latency spikes, "
                               "malformed/truncated pages, 3 records without id")
    t0 = time.monotonic()
    with lab.scenario("api_storm", ETL_RETRY_DELAY_SECONDS="0.05", ETL_RETRY_MAX_DELAY_SECONDS="2",
                      ETL_MAX_RETRIES="4") as sc:
        sc.start_loader()
        lab.sim.reset_stats()
        lab.sim.set_faults(spec)
        sc.fault(f"simulator faults: {spec}")
        run = _run_all(sc)
        rc = _wait_run(sc, run, out)
        status = lab.sim.faults_status()
        out.checks["faults_injected"] = status.get("injected")
        lab.sim.clear_faults()
        sc.note("faults cleared")
        rejects = sc.query("""SELECT job_id, error_class, error_message, count(*) FROM etl.dw_etl_rejects
                               GROUP BY 1, 2, 3 ORDER BY 1""")
        out.checks["dead_letters"] = [list(r) for r in rejects]
        partial = sc.query("SELECT count(*) FROM etl.dw_etl_runs WHERE run_status = 'partial' AND records_rejected > 0")
        out.checks["partial_runs_with_rejects"] = int(partial[0][0]) if partial else 0
        if rc != 0:
            failed = sc.failed_runs()
            for rid in failed:
                r = sc.cli("retry", "--run-id", str(rid), "--json")
                out.heal.append(f"trialsync retry --run-id {rid} -> exit {r.returncode}")
        # the records the API served without an id come back once the API serves them properly:
        # the operator re-extracts the jobs named in the dead letters in full
        for job_id in sorted({r[0] for r in rejects}):
            r = sc.cli("run", "--job", str(job_id), "--full", "--wait-load", "--json")
            out.heal.append(f"trialsync run --job {job_id} --full --wait-load -> exit {r.returncode}")
        if sc.reconcile().totals["missing"]:
            _rerun_until_success(sc, out)
        return _finish(sc, out, t0)


# -- CI: three self-healing faults in one run ---------------------------------------------------------

def combined_kills(lab: Lab) -> Outcome:
    """The self-healing faults of scenarios 1-3 in ONE full run, one after the other (for CI, where
    a run each would not fit the time budget): kill -9 the loader (restart it), kill -9 a fan-out
    extraction worker (the orchestrator retries it), stop PostgreSQL for 5 s. The run itself must
    end in success, with no operator re-run."""
    out = Outcome("combined_kills", "in one run: kill -9 the loader (restarted), kill -9 a fan-out extraction "
                                    "worker, stop PostgreSQL for 5 s")
    t0 = time.monotonic()
    with lab.scenario("combined") as sc:
        sc.start_loader()
        run = _run_all(sc)
        sc.wait_mid_run(10)
        victim = wait_until(lambda: next((p for p in sc.loaders if p.alive() and p.events("partitions_assigned")),
                                         None), 120, "a loader holding partitions")
        victim.kill9()
        sc.fault(f"kill -9 loader pid {victim.pid} after {sc.runs_done()} job runs finished")
        time.sleep(2)
        sc.start_loader()
        sc.note("loader restarted")
        worker = wait_until(lambda: next((r for r in sc.running_runs() if r["fanout"]), None), 300,
                            "a running fan-out extraction")
        time.sleep(0.3)
        try:
            os.kill(worker["pid"], signal.SIGKILL)
            sc.fault(f"kill -9 extraction worker pid {worker['pid']} (job {worker['job_id']}, run {worker['id']})")
        except ProcessLookupError:
            sc.fault(f"extraction worker pid {worker['pid']} had already finished")
        out.checks["killed_run"] = worker
        later = min(sc.runs_done() + 8, 66)
        wait_until(lambda: sc.runs_done() >= later or not run.alive(), 300, f"{later} finished job runs")
        lab.stop_postgres()
        sc.fault(f"PostgreSQL stopped (pg_ctl -m fast) for 5 s after {later} job runs finished")
        time.sleep(5)
        lab.start_postgres()
        sc.note("PostgreSQL started")
        _wait_run(sc, run, out)
        out.heal.append("restarted the killed loader; everything else healed inside the run")
        st = sc.query("SELECT run_status, error_class FROM etl.dw_etl_runs WHERE id = %s", (worker["id"],))
        out.checks["killed_run_final_status"] = list(st[0]) if st else None
        return _finish(sc, out, t0)


SCENARIOS: dict[str, Callable[[Lab], Outcome]] = {
    "loader_kill": loader_kill,
    "extractor_worker_kill": extractor_worker_kill,
    "orchestrator_kill": orchestrator_kill,
    "postgres_restart": postgres_restart,
    "broker_restart_memory": broker_restart,
    "api_storm": api_storm,
}
