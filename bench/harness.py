"""The benchmark's private TrialSync installation: one embedded stack, databases, services, runs.

Why a private installation: ``python -m bench.run`` must be one command that measures every
number on the same simulator and the same PostgreSQL server, without touching a developer's
``.trialsync/`` or a colleague's services. So it

* starts its own embedded stack (PostgreSQL 16 + tansu) in a temporary state directory;
* gives every measurement that needs empty staging tables a **fresh database** on that server
  (``use_database``; DATABASE_URL for this process and every child), migrated and with the job
  catalog synced -- cheaper and cleaner than truncating 88 tables plus the loader's bookkeeping;
* gives every measurement its own **topic prefix** (``use_prefix``), so a loader never sees an
  earlier measurement's records;
* runs the real services (``orchestrator.services.Services``: ``trialsync simulator serve``,
  ``trialsync load``, ``trialsync transform``) and the real ``trialsync run`` command in child
  processes whose process trees the RSS sampler can watch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import requests
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
SIM_KEY = "bench-key"  # a throwaway key for a simulator on 127.0.0.1 (bench/simulator_bench.py uses it too)
_FOREIGN_ENV = ("DATABASE_URL", "DATABASE_HOST", "KAFKA_BOOTSTRAP_SERVERS", "CC_API_KEY", "CC_API_BASE_URL",
                "KAFKA_TOPIC_PREFIX", "PROMETHEUS_MULTIPROC_DIR")


@dataclass
class CliRun:
    """One ``trialsync`` command run by the bench."""

    code: int
    wall_s: float
    result: dict[str, Any] | None
    stderr_tail: str


class Harness:
    """Owns the temporary state directory, the stack, the simulator and the consumer services."""

    def __init__(self, log_level: str | None = None):
        log_level = log_level or os.environ.get("BENCH_LOG_LEVEL", "WARNING")
        for k in _FOREIGN_ENV:
            os.environ.pop(k, None)
        self.state = Path(tempfile.mkdtemp(prefix="trialsync-bench-run-"))
        self.state.chmod(0o755)
        os.environ.update({"TRIALSYNC_STATE_DIR": str(self.state), "LOG_LEVEL": log_level, "LOG_FORMAT": "json",
                           "ENABLE_METRICS": "false", "COLUMNS": "200"})
        # the default 300 s per job is too short for the patient-visit fan-outs at scale >= 0.05 on a
        # small machine (~115 k calls each at 0.05, ~460 k at 0.2); a timed-out fan-out fails whole and
        # its retry starts over, so the bench would measure timeouts instead of throughput
        os.environ.setdefault("ETL_TIMEOUT_SECONDS", "7200")
        from common import config

        config.reset_settings()
        self.pg_port: int | None = None
        self.pg_pid: int | None = None
        self.broker_pid: int | None = None
        self.services: Any = None
        self.sim: Any = None
        self.database: str | None = None

    # -- stack -------------------------------------------------------------------------------------
    def up(self) -> None:
        from common import stack
        from orchestrator.services import Services

        st = stack.up()
        self.pg_port, self.pg_pid, self.broker_pid = st.pg_port, st.pg_pid, st.kafka_pid
        self.services = Services()

    def admin_dsn(self, dbname: str = "postgres") -> str:
        """The superuser's DSN (password from the embedded stack's logins file)."""
        from common import stack

        return stack.database_dsn(dbname=dbname, login="admin")

    def use_database(self, name: str) -> str:
        """Create database ``name`` (dropping an old one), point this process and its children at it,
        apply the migrations and sync the job catalog. Returns its DSN."""
        from common import config, kafka
        from common.catalog import load_catalog, sync
        from common.db import migrate

        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        dsn = self.admin_dsn(name)
        os.environ["DATABASE_URL"] = dsn
        config.reset_settings()
        migrate()
        sync(load_catalog())
        kafka.ensure_system_topics()
        self.database = name
        return dsn

    def empty_database(self, name: str) -> str:
        """Create database ``name`` (dropping an old one) for a peer tool; nothing else changes."""
        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.admin_dsn(name)

    def use_prefix(self, prefix: str) -> None:
        from common import config

        os.environ["KAFKA_TOPIC_PREFIX"] = prefix
        config.reset_settings()

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)

    def pg_version(self) -> str:
        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    # -- simulator ----------------------------------------------------------------------------------
    def start_simulator(self, scale: float, seed: int = 42) -> dict[str, str]:
        from common import config

        info = self.services.start_simulator(scale, seed, SIM_KEY, timeout=600)
        self.sim = info
        os.environ.update({"CC_API_BASE_URL": info.urls["api"], "CC_API_KEY": SIM_KEY})
        config.reset_settings()
        return info.urls

    @property
    def sim_admin(self) -> str:
        return str(self.sim.urls["admin"])

    def sim_get(self, path: str, **params: Any) -> Any:
        r = requests.get(self.sim_admin + path, params=params, timeout=600)
        r.raise_for_status()
        return r.json()

    def sim_post(self, path: str, body: dict[str, Any]) -> Any:
        r = requests.post(self.sim_admin + path, json=body, timeout=600)
        if r.status_code >= 400:
            raise RuntimeError(f"POST /_sim{path} -> {r.status_code}: {r.text[:500]}")
        return r.json()

    def sim_reset_stats(self) -> None:
        requests.delete(self.sim_admin + "/stats", timeout=60).raise_for_status()

    def sim_api_calls(self) -> int:
        """API requests the simulator answered since the last reset (every route, every status)."""
        stats = self.sim_get("/stats")
        return sum(int(n) for by_status in stats.get("requests", {}).values() for n in by_status.values())

    def sim_faults(self, spec: str | None) -> None:
        if spec:
            self.sim_post("/faults", {"spec": spec})
        else:
            requests.delete(self.sim_admin + "/faults", timeout=60).raise_for_status()

    # -- consumer services ------------------------------------------------------------------------
    def start_loader(self, workers: int = 1, wait_assigned: float = 0.0) -> int:
        """Start ``trialsync load``; with ``wait_assigned`` wait (up to that many seconds) until its
        consumer group has partitions -- only possible when the topics already exist."""
        logf = self.state / "logs" / "loader.log"
        offset = logf.stat().st_size if logf.exists() else 0
        saved = os.environ.get("LOG_LEVEL")
        # the loader logs partitions_assigned at INFO (BENCH_LOADER_LOG_LEVEL=DEBUG: every batch)
        os.environ["LOG_LEVEL"] = os.environ.get("BENCH_LOADER_LOG_LEVEL", "INFO")
        try:
            info = self.services.start_loader(workers=workers)
        finally:
            os.environ["LOG_LEVEL"] = saved or "WARNING"
        deadline = time.monotonic() + wait_assigned
        while time.monotonic() < deadline:
            with open(info.log, "rb") as f:
                f.seek(offset)
                if b'"partitions_assigned"' in f.read():
                    break
            time.sleep(0.2)
        return int(info.pid)

    def start_transformer(self) -> int:
        return int(self.services.start_transformer().pid)

    def stop_consumers(self) -> None:
        for name in ("transformer", "loader"):
            self.services.stop(name)

    def service_pid(self, name: str) -> int | None:
        info = self.services.read().get(name)
        return int(info.pid) if info is not None and info.alive else None

    # -- commands ---------------------------------------------------------------------------------
    def trialsync(self, args: list[str], on_start: Any = None, timeout: float = 3600) -> CliRun:
        """Run ``trialsync <args> --json`` as a child process; ``on_start(pid)`` is called once it runs."""
        logf = self.state / "logs" / f"cli-{int(time.time() * 1000)}.log"
        logf.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(logf, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "common.cli", *args, "--json"], cwd=REPO, env=dict(os.environ),
                                    stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
            if on_start is not None:
                on_start(proc.pid)
            out, _ = proc.communicate(timeout=timeout)
        wall = time.perf_counter() - t0
        result = None
        with contextlib.suppress(ValueError):
            result = json.loads(out) if out.strip() else None
        return CliRun(proc.returncode, wall, result, logf.read_text(errors="replace")[-3000:])

    def close(self) -> None:
        from common import config, stack

        with contextlib.suppress(Exception):
            if self.services is not None:
                self.services.stop_all()
        os.environ.pop("DATABASE_URL", None)
        config.reset_settings()
        with contextlib.suppress(Exception):
            stack.down()
        keep = os.environ.get("BENCH_KEEP_LOGS")
        if keep:  # for diagnosis: the services' and commands' logs survive the run
            shutil.copytree(self.state / "logs", Path(keep), dirs_exist_ok=True)
        shutil.rmtree(self.state, ignore_errors=True)


def orchestration_stats(conn: psycopg.Connection, orchestration_id: str) -> dict[str, Any]:
    """What one ``run`` did, from the database: first request (earliest run start) to the last
    record committed (latest loader batch of its runs), records, API calls as the runs counted them."""
    runs = conn.execute(
        """SELECT count(*), count(*) FILTER (WHERE run_status = 'success'), min(started_at),
                  coalesce(sum(records_extracted), 0), coalesce(sum(records_published), 0),
                  coalesce(sum(api_calls), 0), max(completed_at)
             FROM etl.dw_etl_runs WHERE orchestration_id = %s AND run_status <> 'skipped'""",
        (orchestration_id,)).fetchone()
    loads = conn.execute(
        """SELECT max(p.updated_at), coalesce(sum(p.records_loaded), 0), coalesce(sum(p.records_rejected), 0)
             FROM etl.loader_run_partitions p JOIN etl.dw_etl_runs r ON r.id = p.run_id
            WHERE r.orchestration_id = %s""", (orchestration_id,)).fetchone()
    assert runs is not None and loads is not None
    first, last = runs[2], loads[0] or runs[6]
    span = (last - first).total_seconds() if first and last else None
    # where the time went: the longest runs on a timeline starting at the first request
    slow = conn.execute(
        """SELECT job_id, attempt, run_status, api_calls, records_published, duration_seconds,
                  extract(epoch FROM started_at - %s), extract(epoch FROM coalesce(load_completed_at, completed_at) - %s)
             FROM etl.dw_etl_runs WHERE orchestration_id = %s ORDER BY duration_seconds DESC NULLS LAST LIMIT 8""",
        (first, first, orchestration_id)).fetchall() if first else []
    bad = conn.execute(
        """SELECT job_id, attempt, run_status, error_class, left(error_message, 300), duration_seconds
             FROM etl.dw_etl_runs WHERE orchestration_id = %s AND run_status <> 'success' ORDER BY id""",
        (orchestration_id,)).fetchall()
    return {"runs": int(runs[0]), "runs_succeeded": int(runs[1]), "records_extracted": int(runs[3]),
            "records_published": int(runs[4]), "runs_api_calls": int(runs[5]), "records_loaded": int(loads[1]),
            "records_rejected": int(loads[2]), "first_request_to_last_commit_s": round(span, 3) if span else None,
            "slowest_runs": [{"job": r[0], "attempt": r[1], "status": r[2], "api_calls": int(r[3]), "records": int(r[4]),
                              "duration_s": float(r[5] or 0), "started_at_s": round(float(r[6] or 0), 1),
                              "loaded_at_s": round(float(r[7]), 1) if r[7] is not None else None} for r in slow],
            "attempts_not_success": [{"job": r[0], "attempt": r[1], "status": r[2], "error_class": r[3], "error": r[4],
                                      "duration_s": float(r[5] or 0)} for r in bad]}


def staging_rows(conn: psycopg.Connection) -> dict[str, int]:
    """Exact row counts of every non-empty bronze table."""
    names = [r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'bronze' AND c.relkind = 'r' ORDER BY 1").fetchall()]
    out = {}
    for name in names:
        row = conn.execute(sql.SQL("SELECT count(*) FROM bronze.{}").format(sql.Identifier(name))).fetchone()
        if row and row[0]:
            out[name] = int(row[0])
    return out
