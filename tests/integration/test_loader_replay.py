"""Replay: rebuild a table from its topic; refuse when the topic has lost its history."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.replay import ReplayError, ReplayOptions, replay
from tests.loader_support import (
    REPO,
    TRIALSYNC,
    Ctx,
    Rec,
    create_table,
    drop_table,
    expected_state,
    finish_run,
    load_once,
    make_ctx,
    new_run,
    publish,
    ts,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def ctx(stack, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctx]:
    yield from make_ctx(unique, tmp_path, monkeypatch)


def _recs(n: int = 1500, start: int = 0) -> list[Rec]:
    out = []
    for i in range(start, start + n):
        out.append(Rec(f"cc1:{i % 500}", {"i": i % 500, "rev": i}, extracted_at=ts(i)))
        if i % 97 == 0:
            out.append(Rec(f"cc1:{(i + 1) % 500}", None, extracted_at=ts(i)))
    return out


def test_replay_rebuilds_a_table_emptied_or_damaged_by_hand(ctx: Ctx) -> None:
    recs = _recs()
    publish(ctx.settings, ctx.table, recs)
    load_once(ctx.settings, ctx.group, [ctx.table], batch_size=400)
    good = ctx.state()
    assert good == expected_state(recs)

    # someone deletes everything by hand: a plain replay (idempotent upsert) brings it all back
    ctx.conn.execute(f'DELETE FROM bronze."{ctx.table}"')
    res = replay(ReplayOptions(table=ctx.table, batch_size=300), ctx.settings)
    assert res.records_read == len(recs) and not res.rebuilt
    assert ctx.state() == good

    # damage: a hand edit, a row the topic never had, a lost row -> --truncate makes it exact,
    # and concurrent readers never see the table empty
    ctx.conn.execute(f'UPDATE bronze."{ctx.table}" SET data = \'{{"hacked": true}}\' WHERE source_id = \'cc1:7\'')
    ctx.conn.execute(f'DELETE FROM bronze."{ctx.table}" WHERE source_id = \'cc1:8\'')
    ctx.conn.execute(f'INSERT INTO bronze."{ctx.table}" (source_id, data, is_deleted) VALUES (\'cc1:junk\', \'{{}}\', true)')
    seen: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        from common.db import connect

        with connect(ctx.settings, autocommit=True) as c:
            while not stop.is_set():
                seen.append(c.execute(f'SELECT count(*) FROM bronze."{ctx.table}"').fetchone()[0])

    t = threading.Thread(target=reader)
    t.start()
    try:
        res = replay(ReplayOptions(table=ctx.table, truncate=True, batch_size=300), ctx.settings)
    finally:
        stop.set()
        t.join()
    assert res.rebuilt and res.rows_removed == 1
    assert ctx.state() == good
    assert seen and min(seen) > 0
    # the shadow table is gone
    left = ctx.conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname IN ('etl', 'bronze') AND tablename LIKE '\\_replay\\_%'"
                            ).fetchone()[0]
    assert left == 0


def test_replay_recreates_a_dropped_table(ctx: Ctx) -> None:
    job_id = 900_000 + int(ctx.prefix[-4:], 16) % 90_000
    ctx.conn.execute("INSERT INTO etl.dw_etl_jobs (id, name, source_endpoint, target_table, category) "
                     "VALUES (%s, 'replay test', '/api/v1/x', %s, 'test')", (job_id, ctx.table))
    try:
        recs = _recs(300)
        publish(ctx.settings, ctx.table, recs)
        load_once(ctx.settings, ctx.group, [ctx.table])
        good = ctx.state()
        drop_table(ctx.conn, ctx.table)
        res = replay(ReplayOptions(table=ctx.table, truncate=True), ctx.settings)
        assert res.rows_before == 0 and ctx.state() == good
    finally:
        ctx.conn.execute("DELETE FROM etl.dw_etl_jobs WHERE id = %s", (job_id,))


def test_replay_refuses_when_the_topic_lost_its_history(ctx: Ctx) -> None:
    recs = _recs(200)
    publish(ctx.settings, ctx.table, recs)
    load_once(ctx.settings, ctx.group, [ctx.table])
    good = ctx.state()

    # 1) the topic is gone (embedded broker restart): refused up front, table untouched
    other = ctx.table + "_x"
    create_table(ctx.conn, other)
    try:
        ctx.conn.execute(f'INSERT INTO bronze."{other}" (source_id, data) VALUES (\'cc1:1\', \'{{}}\')')
        with pytest.raises(ReplayError, match=r"does not exist on the broker.*history is gone.*still has its 1 rows"):
            replay(ReplayOptions(table=other, truncate=True), ctx.settings)
        assert ctx.conn.execute(f'SELECT count(*) FROM bronze."{other}"').fetchone()[0] == 1
    finally:
        drop_table(ctx.conn, other)

    # 2) the topic only holds part of what the table has (e.g. recreated after a restart):
    #    --truncate would lose rows -> refused, nothing changed
    ctx.conn.execute(f'INSERT INTO bronze."{ctx.table}" (source_id, data, loaded_at) '
                     "VALUES ('cc1:only-in-table', '{\"x\": 1}', now() - interval '1 hour')")
    with pytest.raises(ReplayError, match=r"lost history: 1 live row.*Not rebuilding"):
        replay(ReplayOptions(table=ctx.table, truncate=True), ctx.settings)
    state = ctx.state()
    assert state.pop("cc1:only-in-table") == ({"x": 1}, False) and state == good

    # 3) the CLI says so in one line and exits 1
    proc = subprocess.run([TRIALSYNC, "replay", "--table", ctx.table, "--truncate"],
                          capture_output=True, text=True, env=ctx.env(), cwd=str(REPO), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "lost history" in proc.stderr and "Traceback" not in proc.stderr


def test_replay_one_run_or_since_a_time(ctx: Ctx) -> None:
    r1 = new_run(ctx.conn, topic=ctx.topic)
    first = [Rec(f"cc1:{i}", {"i": i, "run": 1}, r1, extracted_at=ts(i)) for i in range(100)]
    ends = publish(ctx.settings, ctx.table, first)
    finish_run(ctx.conn, r1, ctx.topic, ends, published=100)
    time.sleep(1.2)
    cut = time.time()
    time.sleep(0.2)
    r2 = new_run(ctx.conn, topic=ctx.topic)
    second = [Rec(f"cc1:{i}", {"i": i, "run": 2}, r2, extracted_at=ts(1000 + i)) for i in range(50, 150)]
    publish(ctx.settings, ctx.table, second)

    res = replay(ReplayOptions(table=ctx.table, mode="run", run_id=r1), ctx.settings)
    assert res.records_replayed == 100
    assert ctx.state() == {f"cc1:{i}": ({"i": i, "run": 1}, False) for i in range(100)}
    assert ctx.conn.execute("SELECT records_loaded FROM etl.dw_etl_runs WHERE id = %s", (r1,)).fetchone()[0] == 0

    from datetime import UTC, datetime

    res = replay(ReplayOptions(table=ctx.table, mode="since", since=datetime.fromtimestamp(cut, UTC)), ctx.settings)
    assert res.records_replayed == 100
    assert ctx.state() == expected_state(first + second)
    with pytest.raises(ReplayError, match="--truncate rebuilds the whole table"):
        replay(ReplayOptions(table=ctx.table, mode="run", run_id=r1, truncate=True), ctx.settings)
