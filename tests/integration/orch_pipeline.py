"""A real pipeline for orchestration tests: a fresh warehouse database on the session server, a
unique topic prefix on the session broker, a CC simulator over HTTP and a `trialsync load`
service process -- and the exact reconciliation of Bronze against the simulator's ground truth."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

REPO = Path(__file__).resolve().parents[2]
TRIALSYNC = str(Path(sys.executable).parent / "trialsync")


@dataclass
class Pipeline:
    dsn: str
    env: dict[str, str]
    state_dir: Path
    sim: Any
    loader: subprocess.Popen[bytes] | None = None

    def conn(self) -> psycopg.Connection:
        from common.db import connect

        return connect(autocommit=True)

    def cli(self, *args: str, timeout: float = 300, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TRIALSYNC, *args], env={**self.env, **(extra_env or {})}, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)

    def start_loader(self) -> None:
        log = open(self.state_dir / "loader.log", "ab")  # noqa: SIM115 - closed with the process
        self.loader = subprocess.Popen([TRIALSYNC, "load"], env=self.env, cwd=REPO, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)

    def stop_loader(self) -> None:
        if self.loader is not None and self.loader.poll() is None:
            self.loader.terminate()
            try:
                self.loader.wait(30)
            except subprocess.TimeoutExpired:
                self.loader.kill()
                self.loader.wait(10)


def require_pipeline_modules() -> None:
    """The pipeline needs the extractor, loader and simulator packages."""
    for mod in ("producers.extractor", "consumers.run_progress", "simulator.testing"):
        pytest.importorskip(mod, reason=f"{mod} is not on this branch yet")


@pytest.fixture
def pipeline(stack: dict[str, str], sim: Any, unique: str, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Pipeline]:
    """Fresh database + unique topics + the module's simulator + a running loader service."""
    from common import config
    from orchestrator import settings as osettings
    from tests.integration.orch_support import prepare_warehouse

    name = f"o_{unique}"
    with psycopg.connect(stack["dsn"], autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    dsn = stack["dsn"].rsplit("/", 1)[0] + "/" + name
    tmp_path.chmod(0o755)
    env_over = {
        "DATABASE_URL": dsn, "KAFKA_BOOTSTRAP_SERVERS": stack["bootstrap"], "KAFKA_TOPIC_PREFIX": f"t{unique}",
        "TRIALSYNC_STATE_DIR": str(tmp_path), "CC_API_BASE_URL": sim.base_url, "CC_API_KEY": sim.api_key,
        "ENABLE_METRICS": "false", "LOG_FORMAT": "json", "ETL_RETRY_DELAY_SECONDS": "0.2",
        "ETL_MAX_RETRIES": "0", "ETL_TIMEOUT_SECONDS": "120", "ETL_LOAD_TIMEOUT_SECONDS": "120",
        "LOADER_FLUSH_MS": "100",
    }
    for k, v in env_over.items():
        monkeypatch.setenv(k, v)
    config.reset_settings()
    osettings.reset_orchestrator_settings()
    prepare_warehouse()
    p = Pipeline(dsn, dict(os.environ), tmp_path, sim)
    p.start_loader()
    try:
        yield p
    finally:
        p.stop_loader()
        sim.clear_faults()
        config.reset_settings()
        osettings.reset_orchestrator_settings()
        with psycopg.connect(stack["dsn"], autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def set_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    from common import config
    from orchestrator import settings as osettings

    for k, v in values.items():
        monkeypatch.setenv(k, v)
    config.reset_settings()
    osettings.reset_orchestrator_settings()


# -- exactness --------------------------------------------------------------------------------------

def expected_ids(sim: Any, job: Any, instance: str) -> set[str]:
    from producers.keys import key_builder

    fn = key_builder(job.primary_key, instance)
    out = set()
    for item in sim.expected(job=job.id):
        sid = fn(item["record"], item.get("params"))
        assert sid is not None, f"ground truth of job {job.id} has a record without its key: {item}"
        out.add(sid)
    return out


def reconcile(conn: psycopg.Connection, sim: Any, catalog: Any, job_ids: Iterable[int],
              instance: str = "cc1") -> dict[str, Any]:
    """Per job and per staging table: the source ids in Bronze vs the simulator's ground truth.

    Several jobs feed one table; a table must hold exactly the union of its jobs' expected ids,
    and each job's own rows (etl_job_id) must be a subset of that job's expected ids.
    """
    from psycopg import sql

    from common.db import staging_table

    by_table: dict[str, set[str]] = {}
    per_job: dict[int, set[str]] = {}
    for j in job_ids:
        job = catalog.get(j)
        ids = expected_ids(sim, job, instance)
        per_job[j] = ids
        by_table.setdefault(job.target_table, set()).update(ids)
    problems: dict[str, Any] = {}
    for table, want in by_table.items():
        rows = conn.execute(sql.SQL("SELECT source_id, etl_job_id FROM {} WHERE NOT is_deleted").format(
            staging_table(table))).fetchall()
        have = {r[0] for r in rows}
        dup = len(rows) - len(have)
        if have != want or dup:
            problems[table] = {"missing": len(want - have), "extra": len(have - want), "duplicates": dup,
                               "expected": len(want), "loaded": len(have),
                               "sample_missing": sorted(want - have)[:3], "sample_extra": sorted(have - want)[:3]}
        for sid, jid in rows:
            if jid in per_job and sid not in per_job[jid]:
                problems.setdefault(f"job {jid}", []).append(sid)
    return problems


def wait_until(pred: Any, timeout: float, what: str, poll: float = 0.2,
               detail: Any = None) -> None:
    """Poll ``pred`` until true; on timeout fail with ``detail()`` (e.g. process logs) in the message."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")
        time.sleep(poll)
