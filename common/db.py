"""Database access: connections, a pool, the migrations runner and identifier helpers.

Every table or column name that comes from configuration (a job's ``target_table``, a parameter
source table) passes :func:`staging_table` / :func:`ident`, which validate it and return a
``psycopg.sql.Identifier``; no configured name is ever formatted into SQL text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.abc import Params, QueryNoTemplate
from psycopg_pool import ConnectionPool

from common.config import READER_LOGIN, WRITER_LOGIN, Settings, get_settings
from common.stack import database_dsn, embedded_passwords
from schemas.jobs import check_identifier

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"
BRONZE = "bronze"
SILVER = "silver"
GOLD = "gold"
ETL = "etl"
#: schema search path every TrialSync connection uses, so seed-style unqualified SQL
#: (``SELECT * FROM dw_etl_jobs``) keeps working for operators.
SEARCH_PATH = f"{ETL}, {BRONZE}, {SILVER}, {GOLD}, public"
MIGRATION_LOCK_KEY = 0x7472_6961_6C73  # advisory lock id: 'trials'
MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class DatabaseError(RuntimeError):
    """The database is unreachable or refused an operation; the message says which and what to do."""


def ident(name: str, what: str = "identifier") -> sql.Identifier:
    return sql.Identifier(check_identifier(name, what))


def staging_table(name: str) -> sql.Composed:
    """``bronze.<name>`` as a safe, quoted identifier."""
    return sql.SQL("{}.{}").format(sql.Identifier(BRONZE), ident(name, "staging table name"))


def qualified(schema: str, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(ident(schema, "schema name"), ident(name, "table name"))


def scalar(conn: psycopg.Connection[Any], query: QueryNoTemplate, params: Params | None = None) -> Any:
    """The first column of the one row ``query`` answers: ``count(*)``, ``now()``,
    ``to_regclass(...)``, a function call. Such a query always answers a row, so a missing one is a
    bug and fails here, by name, rather than as ``'NoneType' object is not subscriptable``."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, "a single-row query answered no row"
    return row[0]


def dsn(settings: Settings | None = None, login: str = "writer") -> str:
    """DSN of ``login``: ``writer`` (services, the default), ``admin`` (migrations), ``reader``
    (history API, quality checks); see common/logins.py."""
    return database_dsn(settings, login=login)


def _configure(conn: psycopg.Connection) -> None:
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.SQL(SEARCH_PATH)))
    if not conn.autocommit:
        conn.commit()


def connect(settings: Settings | None = None, autocommit: bool = False, connect_timeout: int = 5,
            application_name: str = "trialsync", login: str = "writer") -> psycopg.Connection:
    """One connection with the TrialSync search path; errors become a clear DatabaseError."""
    s = settings or get_settings()
    try:
        conn = psycopg.connect(dsn(s, login), autocommit=autocommit, connect_timeout=connect_timeout,
                               application_name=application_name)
    except psycopg.OperationalError as e:
        raise DatabaseError(describe_connect_error(e, s)) from None
    _configure(conn)
    return conn


def describe_connect_error(e: Exception, settings: Settings | None = None) -> str:
    """One line for a failed connection, without the DSN (it may hold a password)."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    msg = re.sub(r"postgres(ql)?://\S+", "<dsn>", msg)
    embedded = settings is not None and settings.uses_embedded_database
    if embedded and re.search(r"password authentication failed for user \"trialsync_(writer|reader)\"|"
                              r"role \"trialsync_(writer|reader)\" does not exist", msg):
        return (f"the embedded database has no login for this process yet ({msg}): run `trialsync db migrate` "
                "(it creates the logins trialsync_writer and trialsync_reader)")
    return (f"cannot connect to PostgreSQL ({msg}): start it with `trialsync stack up`, "
            "or check DATABASE_URL / DATABASE_HOST and that the server accepts connections")


def make_pool(settings: Settings | None = None, min_size: int = 1, max_size: int | None = None,
              name: str = "trialsync", login: str = "writer") -> ConnectionPool:
    s = settings or get_settings()
    pool = ConnectionPool(
        dsn(s, login), min_size=min_size, max_size=max_size or s.database_pool_size, name=name,
        configure=_configure, open=False, kwargs={"application_name": name},
        reconnect_timeout=60,
    )
    pool.open(wait=False)
    return pool


@contextmanager
def transaction(settings: Settings | None = None) -> Iterator[psycopg.Connection]:
    conn = connect(settings)
    try:
        with conn.transaction():
            yield conn
    finally:
        conn.close()


# -- migrations ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def discover_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    out: list[Migration] = []
    seen: dict[int, str] = {}
    for p in sorted(directory.glob("*.sql")):
        m = MIGRATION_RE.match(p.name)
        if not m:
            raise DatabaseError(f"migration file {p.name} does not match NNNN_name.sql")
        v = int(m.group(1))
        if v in seen:
            raise DatabaseError(f"two migrations share version {v:04d}: {seen[v]} and {p.name}")
        seen[v] = p.name
        out.append(Migration(v, m.group(2), p))
    return out


def migrate(settings: Settings | None = None, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply pending migrations in order, each in its own transaction; return those applied. Then
    create/update the least-privilege logins whose passwords are known (common/logins.py).

    Runs as the admin login (DATABASE_ADMIN_URL, else DATABASE_URL / DATABASE_*, else the embedded
    superuser) -- the only place TrialSync uses it. Safe to run twice and concurrently: a session
    advisory lock serializes runners, and ``etl.schema_migrations`` records what is applied (with a
    checksum, so an edited migration is reported instead of silently skipped). A missing privilege
    is one line naming it (``describe_privilege_error``), not a traceback.
    """
    from common.logins import describe_privilege_error, provision_logins

    s = settings or get_settings()
    migrations = discover_migrations(directory)
    applied: list[Migration] = []
    with connect(s, autocommit=True, application_name="trialsync-migrate", login="admin") as conn:
        user = conn.info.user
        step = "trialsync db migrate"
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
            try:
                step = "trialsync db migrate (creating schema etl and etl.schema_migrations)"
                conn.execute("CREATE SCHEMA IF NOT EXISTS etl")
                conn.execute(
                    """CREATE TABLE IF NOT EXISTS etl.schema_migrations (
                            version integer PRIMARY KEY,
                            name text NOT NULL,
                            checksum text NOT NULL,
                            applied_at timestamptz NOT NULL DEFAULT now())"""
                )
                done = {v: c for v, c in conn.execute("SELECT version, checksum FROM etl.schema_migrations")}
                for m in migrations:
                    if m.version in done:
                        if done[m.version] != m.checksum:
                            raise DatabaseError(
                                f"migration {m.path.name} changed after it was applied: add a new migration instead of editing it"
                            )
                        continue
                    step = f"migration {m.path.name} failed"
                    with conn.transaction():
                        conn.execute(m.path.read_text(encoding="utf-8"))  # trusted: a file of this repository
                        conn.execute(
                            "INSERT INTO etl.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                            (m.version, m.name, m.checksum),
                        )
                    applied.append(m)
                step = "creating the logins trialsync_writer / trialsync_reader"
                provision_logins(conn, passwords_to_provision(s))
            finally:
                if not conn.broken:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        except psycopg.Error as e:
            why = describe_privilege_error(e, user, step)
            if why is None:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                why = f"{step}: {first}" if step.startswith("migration ") else f"{step} failed: {first}"
            raise DatabaseError(why) from None
    return applied


def migration_status(settings: Settings | None = None) -> list[tuple[Migration, bool]]:
    migrations = discover_migrations()
    with connect(settings, autocommit=True) as conn:
        exists = scalar(conn, "SELECT to_regclass('etl.schema_migrations')")
        done = set()
        if exists:
            done = {v for (v,) in conn.execute("SELECT version FROM etl.schema_migrations")}
    return [(m, m.version in done) for m in migrations]


def ensure_staging_tables(conn: psycopg.Connection, tables: list[str]) -> list[str]:
    """Create missing staging tables (``etl.create_staging_table``); return the ones created."""
    created = []
    for t in tables:
        check_identifier(t, "staging table name")
        row = conn.execute("SELECT etl.create_staging_table(%s)", (t,)).fetchone()
        if row and row[0]:
            created.append(t)
    return created


def passwords_to_provision(settings: Settings) -> dict[str, str]:
    """The logins ``db migrate`` should set up: both for the embedded stack (its generated
    passwords), else those whose password is configured."""
    if settings.uses_embedded_database:
        pw = embedded_passwords(settings)
        return {WRITER_LOGIN: pw[WRITER_LOGIN], READER_LOGIN: pw[READER_LOGIN]}
    out = {}
    if settings.database_writer_password is not None:
        out[WRITER_LOGIN] = settings.database_writer_password.get_secret_value()
    if settings.database_reader_password is not None:
        out[READER_LOGIN] = settings.database_reader_password.get_secret_value()
    return out
