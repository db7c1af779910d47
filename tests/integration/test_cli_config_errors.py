"""Bad configuration and missing rights through the `trialsync` command against the real database:
one line naming the problem and the fix, and nothing changed.

* ``config/jobs.yaml`` whose top level is a list, ``ETL_JOBS_FILE`` naming a missing file: `jobs sync`
  refuses (before, the list gave a traceback and the missing file silently reset every override);
* `db migrate` under a login without the rights says which privilege is missing;
* the job export's last_status / last_records are not shown as this installation's history.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from common.catalog import load_catalog, sync
from common.db import discover_migrations, migrate

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TRIALSYNC = str(Path(sys.executable).parent / "trialsync")


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRIALSYNC, *args], env={**os.environ, **(env or {})}, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def _jobs_table(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id, is_active, schedule, priority, timeout_seconds FROM etl.dw_etl_jobs "
                            "ORDER BY id").fetchall()


def test_jobs_file_whose_top_level_is_a_list_changes_nothing(fresh_db: str, tmp_path: Path) -> None:
    migrate()
    sync(load_catalog())
    before = _jobs_table(fresh_db)
    bad = tmp_path / "jobs.yaml"
    bad.write_text("- Studies:\n    priority: 1\n- Patients:\n    enabled: false\n")
    proc = _cli("jobs", "sync", env={"ETL_JOBS_FILE": str(bad)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"error: {bad}: the top level must be a mapping with `jobs:`" in lines[0], lines
    assert _jobs_table(fresh_db) == before


def test_missing_jobs_file_is_refused_not_ignored(fresh_db: str, tmp_path: Path) -> None:
    migrate()
    sync(load_catalog())
    before = _jobs_table(fresh_db)
    # the repository's overrides are in effect: e.g. Studies runs nightly
    assert any(row[0] == 2 and row[2] == "0 2 * * *" for row in before)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("UPDATE etl.dw_etl_jobs SET priority = 9 WHERE id = 2")  # an operator's change in the table
    before = _jobs_table(fresh_db)
    proc = _cli("jobs", "sync", env={"ETL_JOBS_FILE": str(tmp_path / "typo.yaml")})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ETL_JOBS_FILE=" in lines[0] and "does not exist" in lines[0], lines
    assert "nothing was changed" in lines[0]
    assert _jobs_table(fresh_db) == before
    # the default path may be absent (a checkout without overrides): no error, the plain catalog
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    ok = _cli("jobs", "list", "--json", cwd=empty)
    assert ok.returncode == 0, ok.stderr


def test_migrate_without_rights_names_the_missing_privilege(fresh_db: str, stack: dict[str, str]) -> None:
    """The writer login (what the services use) may not create schemas: `db migrate` under it says
    so in one line instead of a 44-line traceback."""
    writer = stack["writer_dsn"].rsplit("/", 1)[0] + "/" + fresh_db.rsplit("/", 1)[1]
    proc = _cli("db", "migrate", env={"DATABASE_URL": writer})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "login 'trialsync_writer' lacks CREATE on database" in lines[0], lines[0]
    assert "DATABASE_ADMIN_URL" in lines[0]
    assert str(urlsplit(writer).password) not in proc.stderr  # no password in the error
    with psycopg.connect(fresh_db) as conn:  # nothing was created
        assert conn.execute("SELECT to_regnamespace('etl')").fetchone()[0] is None

    # with DATABASE_ADMIN_URL (the owner) the same environment migrates
    proc = _cli("db", "migrate", env={"DATABASE_URL": writer, "DATABASE_ADMIN_URL": fresh_db})
    assert proc.returncode == 0, proc.stderr
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT count(*) FROM etl.schema_migrations").fetchone()[0] == len(discover_migrations())


def test_a_migration_failing_for_a_privilege_names_it(fresh_db: str, stack: dict[str, str], tmp_path: Path) -> None:
    """The first migrations succeed for an owner without CREATEROLE; the roles migration then fails:
    the line names the migration and the missing CREATEROLE."""
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS ts_owner_test")
        conn.execute("CREATE ROLE ts_owner_test LOGIN PASSWORD 'owner-test-pw'")
        conn.execute(f'ALTER DATABASE "{fresh_db.rsplit("/", 1)[1]}" OWNER TO ts_owner_test')
    d = tmp_path / "m"
    d.mkdir()
    for m in discover_migrations()[:2]:
        shutil.copy(m.path, d / m.path.name)
    # a fresh cluster would not have the roles yet: a renamed copy of 0002 makes CREATE ROLE run
    (d / "0002_roles.sql").write_text((d / "0002_roles.sql").read_text().replace(
        "CREATE ROLE trialsync_analytics NOLOGIN;", "CREATE ROLE ts_analytics_test NOLOGIN;"))
    parts = urlsplit(fresh_db)
    owner_dsn = urlunsplit(parts._replace(netloc=f"ts_owner_test:owner-test-pw@{parts.hostname}:{parts.port}"))
    try:
        from common.config import load_settings
        from common.db import DatabaseError

        with pytest.raises(DatabaseError) as e:
            migrate(load_settings(database_url=owner_dsn), directory=d)
        msg = str(e.value)
        assert "\n" not in msg
        assert "migration 0002_roles.sql failed" in msg and "lacks CREATEROLE" in msg, msg
    finally:
        with psycopg.connect(fresh_db.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{fresh_db.rsplit("/", 1)[1]}" WITH (FORCE)')
            conn.execute("DROP ROLE IF EXISTS ts_analytics_test")
            conn.execute("DROP ROLE IF EXISTS ts_owner_test")


def test_export_history_is_not_shown_as_ours(fresh_db: str, tmp_path: Path) -> None:
    # a database synced by the old code: the export's values sit in last_run_status / last_run_records
    d = tmp_path / "m"
    d.mkdir()
    for m in discover_migrations():
        if m.version < 900:
            shutil.copy(m.path, d / m.path.name)
    migrate(directory=d)
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute("INSERT INTO etl.dw_etl_jobs (id, name, source_endpoint, target_table, category, "
                     "last_run_status, last_run_records) VALUES (9, 'PatientVisits', '/x', "
                     "'dim_patient_visits_staging', 'core', 'failed', 0)")
    migrate()  # 0900 moves them
    sync(load_catalog())
    with psycopg.connect(fresh_db) as conn:
        row = conn.execute("SELECT last_run_status, last_run_records, export_last_status, export_last_records "
                           "FROM etl.dw_etl_jobs WHERE id = 9").fetchone()
        assert row == (None, None, "failed", 0)
        # every job: nothing of the export in the columns that describe our runs
        assert conn.execute("SELECT count(*) FROM etl.dw_etl_jobs WHERE last_run_id IS NULL AND "
                            "(last_run_status IS NOT NULL OR last_run_records IS NOT NULL)").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM etl.dw_etl_jobs WHERE export_last_status IS NOT NULL"
                            ).fetchone()[0] > 50
    show = _cli("jobs", "show", "9", env={"COLUMNS": "200"})
    assert show.returncode == 0, show.stderr
    assert "last_status" not in show.stdout and "last_records" not in show.stdout
    assert "export: last status (legacy system)" in show.stdout and "not a TrialSync run" in show.stdout
    assert "trialsync history --job 9" in show.stdout
