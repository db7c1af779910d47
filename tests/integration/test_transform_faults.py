"""A transformer killed in the middle of a procedure loses nothing and duplicates nothing: the
procedure's transaction rolls back, the control offset was not committed, the next transformer
marks the dead run abandoned, gets the message again and transforms exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from common import kafka as ck
from common.config import load_settings
from tests.integration.test_transform_consumer import committed, finished, new_run, publish
from tests.integration.transform_support import (
    fixture_tx,  # noqa: F401 - pytest fixture
    fixture_tx_dsn,  # noqa: F401 - pytest fixture
    load,
    rows,
    scalar,
    study,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_for(cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached in {timeout:g} s")


def start_transformer(env: dict[str, str], log_path: str) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "common.cli", "transform"], cwd=REPO, env=env,
                            stdout=log, stderr=log, start_new_session=True)


def test_kill_during_a_procedure_then_restart_transforms_exactly_once(tx, tx_dsn, stack, unique, tmp_path) -> None:
    settings = load_settings(database_url=tx_dsn, kafka_topic_prefix=f"tf{unique}", enable_metrics=False)
    ck.ensure_system_topics(settings)
    group = f"trialsync-transformer-tf{unique}"
    env = {**os.environ, "DATABASE_URL": tx_dsn, "KAFKA_TOPIC_PREFIX": f"tf{unique}", "ENABLE_METRICS": "false",
           "LOG_FORMAT": "json", "TRANSFORM_GROUP_ID": group, "TRANSFORM_COALESCE_SECONDS": "0.3",
           "TRANSFORM_POLL_INTERVAL_SECONDS": "0.2", "TRANSFORM_QUALITY_ENABLED": "false"}
    load(tx, "dim_studies_staging", [study(i) for i in range(1, 11)])
    run = new_run(tx, 2)
    # hold load_dim_studies' lock so the first transformer is caught inside the procedure
    lock = "SELECT pg_advisory_lock(hashtextextended('trialsync.transform:silver.load_dim_studies', 0))"
    tx.execute(lock)
    first = start_transformer(env, str(tmp_path / "first.log"))
    try:
        publish(settings, finished(run, 2, "dim_studies_staging"))
        wait_for(lambda: scalar(tx, "SELECT count(*) FROM etl.dw_transform_runs WHERE status = 'running' "
                                    "AND procedure_name = 'silver.load_dim_studies'") == 1,
                 what="the procedure to start")
        db_pid = scalar(tx, "SELECT db_pid FROM etl.dw_transform_runs WHERE status = 'running'")
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        # the server notices the dead client (client_connection_check_interval) and rolls back
        wait_for(lambda: scalar(tx, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", db_pid) == 0,
                 timeout=30, what="the orphaned backend to go away")
    finally:
        tx.execute("SELECT pg_advisory_unlock_all()")
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert scalar(tx, "SELECT count(*) FROM silver.dim_studies") == 0
    assert committed(settings, group) == 0  # the work did not happen, so neither did the commit

    second = start_transformer(env, str(tmp_path / "second.log"))
    try:
        wait_for(lambda: committed(settings, group) == 1, timeout=90, what="the re-delivered message to be done")
        assert scalar(tx, "SELECT count(*) FROM silver.dim_studies") == 10
        assert scalar(tx, "SELECT count(*) FROM silver.dim_studies WHERE is_current") == 10
        got = rows(tx, "SELECT status, error_class, trigger FROM etl.dw_transform_runs "
                       "WHERE procedure_name = 'silver.load_dim_studies' ORDER BY id")
        assert got[0] == {"status": "failed", "error_class": "Abandoned", "trigger": "control"}
        assert {"status": "success", "error_class": None, "trigger": "control"} in got[1:]
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        assert second.wait(30) == 0, (tmp_path / "second.log").read_text()[-3000:]
