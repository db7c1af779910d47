"""The embedded stack's life cycle through the real CLI, as an operator meets it.

* PostgreSQL stops within seconds while the loader and transformer hold pooled connections (fast
  shutdown), and a smart shutdown stuck on those connections is seen as such by ``stack status``
  and healed by ``stack up``; the services ride through both restarts and keep loading.
* ``stack down`` where there is no stack says so and where it looked.
* As root in a folder other users cannot enter (a clone under /root), ``stack up`` works without
  opening that folder: PostgreSQL's files go where its system user can reach them.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from common import stack as stack_mod
from tests.integration.stack_support import PrivateStack
from tests.loader_support import REPO, TRIALSYNC, LoaderProcess, Rec, create_table, publish, ts, wait_until

pytestmark = pytest.mark.integration

TABLE = "lifecycle_staging"


def _count(dsn: str) -> int:
    with psycopg.connect(dsn, connect_timeout=3) as c:
        return int(c.execute(f'SELECT count(*) FROM bronze."{TABLE}"').fetchone()[0])


def _loaded(dsn: str, n: int) -> bool:
    try:
        return _count(dsn) == n
    except psycopg.OperationalError:
        return False


def _recs(start: int, n: int) -> list[Rec]:
    return [Rec(f"cc1:{i}", {"id": i}, extracted_at=ts(i)) for i in range(start, start + n)]


@pytest.mark.heavy  # ~45 s: two PostgreSQL restarts and a broker restart under running services
def test_postgres_stops_fast_with_services_connected_and_they_ride_through(tmp_path: Path) -> None:
    with PrivateStack(storage="durable") as ps:
        ps.cli("stack", "up")
        ps.cli("db", "migrate")
        dsn = ps.dsn()
        with psycopg.connect(dsn, autocommit=True) as c:
            create_table(c, TABLE)
        env = {**ps.env, "KAFKA_SESSION_TIMEOUT_MS": "6000"}
        loader = LoaderProcess(env, tmp_path / "loader.log", "--tables", TABLE)
        with open(tmp_path / "transform.log", "ab") as tlog:
            transformer = subprocess.Popen([TRIALSYNC, "transform"], env=env, cwd=REPO, stdout=tlog,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        try:
            publish(ps.settings(), TABLE, _recs(0, 200))
            wait_until(lambda: _loaded(dsn, 200), 90, what="first records loaded")
            idle = psycopg.connect(dsn)  # a session idle in a transaction, like a pooled one
            idle.execute("SELECT 1")

            # 1. a smart shutdown (plain SIGTERM) waits for every client: status must not say "running"
            pg_pid = ps.state().pg_pid
            os.kill(pg_pid, signal.SIGTERM)
            rc, st = wait_until(lambda: (lambda r: r if r[1]["postgres"].get("state") == "shutting down" else None)(
                ps.status()), 20, what="status to report the shutdown")
            assert rc == 3 and st["postgres"]["running"] is False
            assert "no (shutting down)" in ps.cli("stack", "status", check=False).stdout
            t0 = time.monotonic()
            ps.cli("stack", "up")  # heals it: finishes the shutdown fast, starts again
            assert time.monotonic() - t0 < 45
            rc, st = ps.status()
            assert rc == 0 and st["postgres"]["state"] == "ready"

            publish(ps.settings(), TABLE, _recs(200, 100))
            wait_until(lambda: _loaded(dsn, 300), 120, what="records loaded after the PostgreSQL restart")

            # 2. `stack down` with the services connected: a fast shutdown, within seconds
            idle = psycopg.connect(dsn)
            idle.execute("SELECT 1")
            pg_pid = ps.state().pg_pid
            t0 = time.monotonic()
            down = ps.cli("stack", "down")
            took = time.monotonic() - t0
            assert took < 25, f"stack down took {took:.1f} s"
            assert "stopped (postgres, broker, s3 store, retention keeper)" in down.stdout
            assert not stack_mod.pid_alive(pg_pid)
            rc, st = ps.status()
            assert rc == 3 and st["postgres"]["running"] is False and st["broker"]["running"] is False

            ps.cli("stack", "up")
            publish(ps.settings(), TABLE, _recs(300, 100))
            wait_until(lambda: _loaded(dsn, 400), 120, what="records loaded after stack down / up")
            assert loader.alive(), loader.log_text()[-2000:]
            assert transformer.poll() is None, (tmp_path / "transform.log").read_text()[-2000:]
        finally:
            if loader.alive():
                loader.stop(60)
            transformer.terminate()
            try:
                transformer.wait(60)
            except subprocess.TimeoutExpired:
                transformer.kill()


def test_stack_down_without_a_stack_says_so_and_where() -> None:
    d = Path(tempfile.mkdtemp(prefix="trialsync-nostack-"))
    try:
        ps = PrivateStack(state_dir=d / "nothing-here")
        p = ps.cli("stack", "down")
        assert "no embedded stack under" in p.stdout and str(d / "nothing-here") in p.stdout, p.stdout
        assert "stopped" not in p.stdout
        assert not (d / "nothing-here").exists(), "stack down must not create a state directory"
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL's own system user exists only when run as root")
def test_root_in_a_folder_other_users_cannot_enter(tmp_path: Path) -> None:
    """A clone under /root (mode 0700): `stack up` works, and /root stays closed."""
    home = Path(tempfile.mkdtemp(prefix="trialsync-roothome-"))  # mode 0700, like /root
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    clone = home / "clone"
    clone.mkdir()
    ps = PrivateStack(storage="memory", state_dir=clone / ".trialsync")
    try:
        up = ps.cli("stack", "up")
        assert "yes" in up.stdout
        rc, st = ps.status()
        assert rc == 0 and st["postgres"]["running"]
        data = Path(st["postgres"]["data"])
        assert not data.is_relative_to(home), "the data must live where the server's user can reach it"
        assert data.owner() == stack_mod.PG_SYSTEM_USER
        assert stat.S_IMODE(home.stat().st_mode) == 0o700, "the operator's folder must stay closed"
        with psycopg.connect(ps.dsn()) as c:
            assert c.execute("SHOW data_directory").fetchone()[0] == str(data)
        down = ps.cli("stack", "down", "--purge")
        assert "stopped" in down.stdout
        assert not data.exists(), "--purge removes the data kept outside the state directory too"
    finally:
        ps.close()
        import shutil

        shutil.rmtree(home, ignore_errors=True)
