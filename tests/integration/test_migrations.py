"""Migrations: ordered, recorded, idempotent, safe concurrently; roles enforce least privilege."""

from __future__ import annotations

import threading

import psycopg
import pytest
from psycopg import errors

from common.db import DatabaseError, discover_migrations, migrate

pytestmark = pytest.mark.integration


def test_migrate_twice(fresh_db: str) -> None:
    first = migrate()
    assert [m.version for m in first] == [m.version for m in discover_migrations()]
    assert migrate() == []
    with psycopg.connect(fresh_db) as conn:
        n = conn.execute("SELECT count(*) FROM etl.schema_migrations").fetchone()[0]
        assert n == len(first)
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'bronze'").fetchone()[0]
        assert tables == 88


def test_concurrent_migrations(fresh_db: str) -> None:
    results: list[object] = []

    def run() -> None:
        try:
            results.append(migrate())
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [r for r in results if isinstance(r, Exception)], results
    applied = sorted(len(r) for r in results)  # type: ignore[arg-type]
    assert applied[-1] == len(discover_migrations()) and applied[:-1] == [0, 0]


def test_edited_migration_is_reported(fresh_db: str, tmp_path) -> None:
    src = discover_migrations()
    d = tmp_path / "m"
    d.mkdir()
    for m in src[:1]:
        (d / m.path.name).write_text(m.path.read_text())
    migrate(directory=d)
    (d / src[0].path.name).write_text(src[0].path.read_text() + "\n-- edited\n")
    with pytest.raises(DatabaseError, match="changed after it was applied"):
        migrate(directory=d)


def test_staging_table_pattern(db) -> None:
    cols = {r[0]: r[1] for r in db.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema='bronze' AND table_name='dim_patients_staging'")}
    for c in ("id", "data", "source_id", "etl_job_id", "etl_run_id", "loaded_at", "created_at", "updated_at",
              "is_deleted"):
        assert c in cols
    assert cols["data"] == "jsonb"
    uniq = db.execute(
        "SELECT count(*) FROM pg_indexes WHERE schemaname='bronze' AND tablename='dim_patients_staging' "
        "AND indexdef ILIKE '%UNIQUE%(source_id)%'").fetchone()[0]
    assert uniq == 1


def test_staging_factory_refuses_unsafe_names(db) -> None:
    with pytest.raises(errors.InvalidName):
        db.execute("SELECT etl.create_staging_table(%s)", ('x"; DROP TABLE etl.dw_etl_jobs; --',))
    assert db.execute("SELECT to_regclass('etl.dw_etl_jobs')").fetchone()[0] is not None


def test_analytics_role_cannot_write(db) -> None:
    with db.transaction():
        db.execute("SET LOCAL ROLE trialsync_analytics")
        assert db.execute("SELECT count(*) FROM bronze.dim_sites_staging").fetchone()[0] >= 0
        with pytest.raises(errors.InsufficientPrivilege):
            with db.transaction():
                db.execute("INSERT INTO bronze.dim_sites_staging (data, source_id) VALUES ('{}', 'x:1')")
        with pytest.raises(errors.InsufficientPrivilege):
            with db.transaction():
                db.execute("SELECT * FROM etl.dw_api_credentials")


def test_etl_role_can_write_staging(db) -> None:
    with db.transaction():
        db.execute("SET LOCAL ROLE trialsync_etl")
        db.execute("INSERT INTO bronze.dim_sites_staging (data, source_id) VALUES ('{}', 'role-test:1')")
        db.execute("DELETE FROM bronze.dim_sites_staging WHERE source_id = 'role-test:1'")
