"""Database and broker outages during a load, on a separate embedded stack started for this module:
the loader pauses with backoff (no busy loop, no offset commits), resumes, and the result is exact."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers import run_progress
from tests.loader_support import (
    Ctx,
    LoaderProcess,
    Rec,
    create_table,
    expected_state,
    finish_run,
    loaders,
    new_run,
    publish,
    run_row,
    ts,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture(scope="module")
def own_stack(stack) -> Iterator[str]:
    """A second embedded stack (PostgreSQL + broker) this module may restart at will."""
    from common import config
    from common import stack as stack_mod
    from common.db import migrate

    state = Path(tempfile.mkdtemp(prefix="trialsync-outage-"))
    state.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRIALSYNC_STATE_DIR", str(state))
        config.reset_settings()
        try:
            stack_mod.up()
            migrate()
            from common.catalog import load_catalog, sync

            sync(load_catalog())  # runs reference jobs
            yield str(state)
        finally:
            with contextlib.suppress(Exception):
                stack_mod.down()
            shutil.rmtree(state, ignore_errors=True)
    config.reset_settings()


@pytest.fixture
def octx(own_stack: str, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctx]:
    from common import config
    from common.db import connect
    from common.kafka import bronze_topic

    monkeypatch.setenv("TRIALSYNC_STATE_DIR", own_stack)
    monkeypatch.setenv("KAFKA_TOPIC_PREFIX", f"lo{unique}")
    config.reset_settings()
    s = config.get_settings()
    table = f"lo_{unique}_staging"
    conn = connect(s, autocommit=True)
    create_table(conn, table)
    ctx = Ctx(s, f"lo{unique}", table, bronze_topic(table, s), f"lo{unique}-loader", conn, tmp_path)
    try:
        yield ctx
    finally:
        ctx.conn.close()
        config.reset_settings()


def _reconnect(ctx: Ctx) -> None:
    from common.db import connect

    with contextlib.suppress(Exception):
        ctx.conn.close()
    ctx.conn = wait_until(lambda: _try_connect(ctx.settings, connect), 60, what="the database to accept connections")


def _try_connect(settings, connect):  # noqa: ANN001, ANN202
    try:
        return connect(settings, autocommit=True)
    except Exception:  # noqa: BLE001 - still starting
        return None


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _recs(run_id: int, n: int, start: int = 0, keys: int = 8000) -> list[Rec]:
    rnd = random.Random(start)
    out = []
    for i in range(start, start + n):
        k = rnd.randrange(keys)
        out.append(Rec(f"cc1:{k}", None if rnd.random() < 0.03 else {"k": k, "rev": i}, run_id, extracted_at=ts(i)))
    return out


def _start(ctx: Ctx, name: str) -> LoaderProcess:
    return LoaderProcess(ctx.env(), ctx.tmp / f"{name}.log", "--tables", ctx.table, "--group", ctx.group,
                         "--batch-size", "1000", "--flush-ms", "50")


def test_database_restart_during_a_load_resumes_exactly(octx: Ctx) -> None:
    from common.stack import restart_postgres

    ctx = octx
    run_id = new_run(ctx.conn, topic=ctx.topic)
    recs = _recs(run_id, 80_000)
    ends = publish(ctx.settings, ctx.table, recs)
    finish_run(ctx.conn, run_id, ctx.topic, ends, published=len(recs))
    p = _start(ctx, "restart")
    with loaders(p):
        wait_until(lambda: ctx.count() > 0, 90, what="the loader to write")
        restart_postgres(ctx.settings)
        _reconnect(ctx)
        assert run_progress.wait_for_load([run_id], timeout=180, settings=ctx.settings, raise_on_timeout=True)
        assert p.alive()
        backoffs = p.events("backing_off")
        assert backoffs and backoffs[0]["dependency"] == "database", p.log_text()[-3000:]
        assert p.events("dependency_recovered")
        assert p.stop() == 0
    assert ctx.state() == expected_state(recs)
    assert run_row(ctx.conn, run_id)["records_loaded"] == len(recs)


def test_database_outage_pauses_without_spinning(octx: Ctx) -> None:
    from common.stack import start_postgres, stop_postgres, write_state

    ctx = octx
    run_id = new_run(ctx.conn, topic=ctx.topic)
    first = _recs(run_id, 2000)
    publish(ctx.settings, ctx.table, first)
    p = _start(ctx, "outage")
    with loaders(p):
        wait_until(lambda: ctx.state() == expected_state(first), 90, what="the first records")
        ctx.conn.close()
        st = stop_postgres(ctx.settings)
        write_state(st, ctx.settings)
        try:
            second = _recs(run_id, 3000, start=2000)
            publish(ctx.settings, ctx.table, second)  # arrives while the database is down
            time.sleep(1.5)
            cpu0, t0 = _cpu_seconds(p.pid), time.monotonic()
            time.sleep(5)
            cpu = (_cpu_seconds(p.pid) - cpu0) / (time.monotonic() - t0)
        finally:
            st = start_postgres(ctx.settings, st)
            write_state(st, ctx.settings)
        assert p.alive()
        assert cpu < 0.5, f"loader used {cpu:.0%} of a CPU while the database was down: busy loop?"
        _reconnect(ctx)
        wait_until(lambda: ctx.state() == expected_state(first + second), 120, what="the records published during the outage")
        assert len(p.events("backing_off")) >= 2  # exponential backoff: several attempts, not one per poll
        assert p.stop() == 0
    assert run_row(ctx.conn, run_id)["records_loaded"] == len(first) + len(second)


def test_broker_outage_and_restart_without_crash(octx: Ctx) -> None:
    from common.stack import read_state, start_broker, stop_broker, write_state

    ctx = octx
    r1 = new_run(ctx.conn, topic=ctx.topic)
    first = _recs(r1, 3000)
    ends = publish(ctx.settings, ctx.table, first)
    finish_run(ctx.conn, r1, ctx.topic, ends, published=len(first))
    p = _start(ctx, "broker")
    with loaders(p):
        assert run_progress.wait_for_load([r1], timeout=90, settings=ctx.settings, raise_on_timeout=True)
        st = stop_broker(ctx.settings, read_state(ctx.settings))
        write_state(st, ctx.settings)
        try:
            time.sleep(1)
            cpu0, t0 = _cpu_seconds(p.pid), time.monotonic()
            time.sleep(6)
            cpu = (_cpu_seconds(p.pid) - cpu0) / (time.monotonic() - t0)
        finally:
            st = start_broker(ctx.settings, st)  # same port; memory storage: every topic is gone
            write_state(st, ctx.settings)
        assert p.alive() and cpu < 0.5, f"cpu {cpu:.0%}"
        # a new run publishes into the recreated topic: offsets start at 0 again
        r2 = new_run(ctx.conn, topic=ctx.topic)
        second = _recs(r2, 2000, start=3000)
        ends2 = publish(ctx.settings, ctx.table, second)
        finish_run(ctx.conn, r2, ctx.topic, ends2, published=len(second))
        assert run_progress.wait_for_load([r2], timeout=180, settings=ctx.settings, raise_on_timeout=True)
        assert p.alive()
        assert p.stop() == 0
    assert ctx.state() == expected_state(first + second)
    assert run_row(ctx.conn, r2)["records_loaded"] == len(second)
    assert run_row(ctx.conn, r1)["records_loaded"] == len(first)
