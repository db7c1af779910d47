"""Test session plumbing: one real embedded stack (PostgreSQL 16 + Kafka-API broker) per session.

Integration tests talk to real servers over real connections. The session stack lives in its own
temporary state directory on free ports, so it never touches a developer's ``.trialsync/``.
Where a Docker engine exists and TRIALSYNC_TEST_DOCKER=1, testcontainers (Postgres, Redpanda) are
used instead of the embedded parts.

Fixtures for other test modules:

* ``stack``      -- session: env pointing at the running stack, migrated, catalog synced; ``dsn`` is
  the superuser's, ``writer_dsn`` / ``reader_dsn`` the least-privilege logins'; its broker uses
  memory storage (TRIALSYNC_TEST_BROKER_STORAGE=durable runs the suite on the durable one);
* ``settings``   -- the Settings of that stack (fresh object per test);
* ``db``         -- a connection (autocommit) to the session database;
* ``fresh_db``   -- a brand-new empty database on the same server (Settings pointing at it);
* ``unique``     -- a short unique string for topic prefixes / group ids;
* ``cc_simulator`` -- session: a real CC simulator subprocess (scale 0.002, seed 42, key
  "test-key"), exported as CC_API_BASE_URL / CC_API_KEY; see simulator/README.md. Tests that
  mutate data or inject faults should start their own ``simulator.testing.SimulatorProcess``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

REPO = Path(__file__).resolve().parent.parent
_ENV_KEYS = ("DATABASE_URL", "DATABASE_HOST", "KAFKA_BOOTSTRAP_SERVERS", "TRIALSYNC_STATE_DIR", "CC_API_KEY",
             "CC_API_BASE_URL", "KAFKA_TOPIC_PREFIX", "ENABLE_METRICS", "LOG_FORMAT", "TRIALSYNC_BROKER_STORAGE")


def _docker_available() -> bool:
    if os.environ.get("TRIALSYNC_TEST_DOCKER") != "1":
        return False
    try:
        import docker

        docker.from_env().ping()
        return True
    except Exception:  # noqa: BLE001 - no engine: use the embedded stack
        return False


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Start the stack once per session; export its location through the environment."""
    from common import config
    from common import stack as stack_mod

    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    os.chdir(REPO)
    state = Path(tempfile.mkdtemp(prefix="trialsync-test-"))
    state.chmod(0o755)
    os.environ["TRIALSYNC_STATE_DIR"] = str(state)
    os.environ["ENABLE_METRICS"] = "false"
    os.environ["LOG_FORMAT"] = "json"
    # memory storage: ~2x faster end to end than the durable default (bench/broker_bench.py, docs/
    # deployment.md); the durable broker has its own tests on private stacks
    os.environ["TRIALSYNC_BROKER_STORAGE"] = os.environ.get("TRIALSYNC_TEST_BROKER_STORAGE", "memory")
    for k in ("DATABASE_URL", "DATABASE_HOST", "KAFKA_BOOTSTRAP_SERVERS"):
        os.environ.pop(k, None)
    containers = []
    if _docker_available():  # pragma: no cover - exercised only where Docker exists
        from testcontainers.kafka import RedpandaContainer
        from testcontainers.postgres import PostgresContainer

        pg = PostgresContainer("postgres:16", driver=None).start()
        rp = RedpandaContainer().start()
        containers = [pg, rp]
        os.environ["DATABASE_URL"] = pg.get_connection_url()
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = rp.get_bootstrap_server()
    config.reset_settings()
    try:
        stack_mod.up()
        from common.catalog import load_catalog, sync
        from common.db import migrate

        migrate()
        sync(load_catalog())
        # "dsn" is the superuser's (tests create databases with it); the processes under test log in
        # as the writer (every service) or the reader (history API, quality checks) by themselves
        yield {"state_dir": str(state), "dsn": stack_mod.database_dsn(login="admin"),
               "writer_dsn": stack_mod.database_dsn(login="writer"),
               "reader_dsn": stack_mod.database_dsn(login="reader"),
               "bootstrap": stack_mod.bootstrap_servers()}
    finally:
        with contextlib.suppress(Exception):
            stack_mod.down()
        for c in containers:  # pragma: no cover
            c.stop()
        shutil.rmtree(state, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        config.reset_settings()


@pytest.fixture
def settings(stack: dict[str, str]):
    from common import config

    config.reset_settings()
    return config.get_settings()


@pytest.fixture
def db(stack: dict[str, str]) -> Iterator[psycopg.Connection]:
    from common.db import connect

    conn = connect(autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def fresh_db(stack: dict[str, str], unique: str) -> Iterator[str]:
    """A new empty database on the session server; yields its DSN (DATABASE_URL for the test)."""
    from common import config

    base = stack["dsn"]
    name = f"t_{unique}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = base.rsplit("/", 1)[0] + "/" + name
    old = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = dsn
    config.reset_settings()
    try:
        yield dsn
    finally:
        if old is None:
            os.environ.pop("DATABASE_URL", None)
        else:
            os.environ["DATABASE_URL"] = old
        config.reset_settings()
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def cc_simulator() -> Iterator[object]:
    """One simulator for the session; CC_API_BASE_URL / CC_API_KEY / CC_API_KEY_HEADER point at it."""
    from common import config
    from simulator.testing import SimulatorProcess

    keys = ("CC_API_BASE_URL", "CC_API_KEY", "CC_API_KEY_HEADER")
    saved = {k: os.environ.get(k) for k in keys}
    with SimulatorProcess(scale=0.002, seed=42, api_key="test-key") as sim:
        os.environ.update({"CC_API_BASE_URL": sim.base_url, "CC_API_KEY": sim.api_key,
                           "CC_API_KEY_HEADER": sim.key_header})
        config.reset_settings()
        try:
            yield sim
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            config.reset_settings()
