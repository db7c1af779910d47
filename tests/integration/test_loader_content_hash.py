"""Re-loads decided by content hash, on the real broker and PostgreSQL: unchanged records are not
rewritten, rows stored before the hash existed are compared by data once, replays still undo hand
edits, and neither a re-load nor a replay makes the server log an error (issue 16, point 12)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumers.replay import ReplayOptions, replay
from tests.loader_support import (
    REPO,
    TRIALSYNC,
    Ctx,
    LoaderProcess,
    Rec,
    ServerLog,
    expected_state,
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


def _rows(ctx: Ctx) -> dict[str, dict[str, Any]]:
    cur = ctx.conn.execute(f'SELECT source_id, data, etl_run_id, updated_at, content_hash FROM bronze."{ctx.table}"')
    return {r[0]: {"data": r[1], "run": r[2], "updated_at": r[3], "hash": r[4]} for r in cur.fetchall()}


def _night(run_id: int, n: int, changed: set[int], base: int) -> list[Rec]:
    return [Rec(f"cc1:{i}", {"id": i, "name": f"patient {i}", "rev": 2 if i in changed else 1}, run_id,
                extracted_at=ts(base + i)) for i in range(n)]


@pytest.mark.parametrize("fmt", ["v1", "named"])
def test_a_reload_rewrites_only_the_records_that_changed(ctx: Ctx, fmt: str) -> None:
    first = new_run(ctx.conn, topic=ctx.topic)
    recs = _night(first, 400, set(), 0)
    publish(ctx.settings, ctx.table, recs, fmt=fmt)
    assert load_once(ctx.settings, ctx.group, [ctx.table], batch_size=150).inserted == 400
    before = _rows(ctx)
    # every row carries the hash of the bytes it was loaded from (sent by the publisher or computed)
    assert all(r["hash"].bytes == sha256(rec.raw_value()).digest()[:16]  # type: ignore[arg-type]
               for rec, r in zip(recs, (before[x.key] for x in recs), strict=True))  # type: ignore[index]

    second = new_run(ctx.conn, topic=ctx.topic)
    changed = {3, 77, 250}
    publish(ctx.settings, ctx.table, _night(second, 400, changed, 1000), fmt=fmt)
    stats = load_once(ctx.settings, ctx.group, [ctx.table], batch_size=150)
    assert (stats.inserted, stats.updated, stats.unchanged, stats.deleted) == (0, 3, 397, 0)
    after = _rows(ctx)
    for key, row in after.items():
        i = int(key.split(":")[1])
        if i in changed:
            assert row["data"]["rev"] == 2 and row["run"] == second and row["updated_at"] > before[key]["updated_at"]
        else:  # not touched at all: same run, same updated_at (the transformer sees no change)
            assert row == before[key]


def test_the_same_record_serialized_otherwise_is_not_a_change(ctx: Ctx) -> None:
    """Two endpoints of one model (jobs 2 and 164 both write studies) may send the same record with
    its keys in another order: other bytes, other hash, same content. The row keeps its data, run
    and ``updated_at`` (the fan-out planner reads a moved ``updated_at`` as a changed parent) and
    takes the new hash; a real change still moves it."""
    first = new_run(ctx.conn, topic=ctx.topic)
    recs = _night(first, 50, set(), 0)
    publish(ctx.settings, ctx.table, recs, fmt="v1")
    load_once(ctx.settings, ctx.group, [ctx.table])
    before = _rows(ctx)

    second = new_run(ctx.conn, topic=ctx.topic)
    reordered = [Rec(r.key, orjson.dumps(dict(reversed(list(r.value.items())))), second,  # type: ignore[union-attr]
                     job_id=164, extracted_at=ts(1000 + i)) for i, r in enumerate(recs)]
    reordered[7] = Rec(recs[7].key, orjson.dumps({"rev": 2, "name": "patient 7", "id": 7}), second, job_id=164,
                       extracted_at=ts(1007))
    assert all(a.raw_value() != b.raw_value() for a, b in zip(recs, reordered, strict=True))
    publish(ctx.settings, ctx.table, reordered, fmt="v1")
    stats = load_once(ctx.settings, ctx.group, [ctx.table])
    assert (stats.inserted, stats.updated, stats.unchanged) == (0, 1, 49)
    after = _rows(ctx)
    for rec in reordered:
        row, old = after[rec.key], before[rec.key]  # type: ignore[index]
        assert row["hash"].bytes == sha256(rec.raw_value()).digest()[:16]  # type: ignore[arg-type]
        if rec.key == "cc1:7":
            assert row["data"]["rev"] == 2 and row["run"] == second and row["updated_at"] > old["updated_at"]
        else:
            assert (row["data"], row["run"], row["updated_at"]) == (old["data"], first, old["updated_at"])


def test_rows_stored_without_a_hash_are_compared_by_data_once(ctx: Ctx) -> None:
    run = new_run(ctx.conn, topic=ctx.topic)
    publish(ctx.settings, ctx.table, _night(run, 100, set(), 0), fmt="v1")
    load_once(ctx.settings, ctx.group, [ctx.table])
    # as rows loaded before migration 0610 are
    ctx.conn.execute(f'UPDATE bronze."{ctx.table}" SET content_hash = NULL')
    before = _rows(ctx)

    publish(ctx.settings, ctx.table, _night(run, 100, {42}, 500), fmt="v1")
    stats = load_once(ctx.settings, ctx.group, [ctx.table])
    assert (stats.updated, stats.unchanged) == (1, 99)  # filling in a hash is not an update
    after = _rows(ctx)
    assert all(r["hash"] is not None for r in after.values())
    assert after["cc1:42"]["data"]["rev"] == 2
    assert all(after[k]["updated_at"] == before[k]["updated_at"] for k in after if k != "cc1:42")
    # and from now on they are compared by hash
    publish(ctx.settings, ctx.table, _night(run, 100, {42}, 900), fmt="named")
    again = load_once(ctx.settings, ctx.group, [ctx.table])
    assert (again.updated, again.unchanged) == (0, 100)


def test_replay_restores_a_row_edited_by_hand(ctx: Ctx) -> None:
    """An edit that leaves the hash as it was is invisible to a re-load (by design: only the
    records' content is compared) but a replay compares data and undoes it."""
    run = new_run(ctx.conn, topic=ctx.topic)
    recs = _night(run, 50, set(), 0)
    publish(ctx.settings, ctx.table, recs, fmt="v1")
    load_once(ctx.settings, ctx.group, [ctx.table])
    ctx.conn.execute(f'UPDATE bronze."{ctx.table}" SET data = \'{{"hacked": true}}\' WHERE source_id = \'cc1:7\'')
    load_once(ctx.settings, ctx.group + "-reload", [ctx.table])
    assert ctx.state()["cc1:7"] == ({"hacked": True}, False)
    res = replay(ReplayOptions(table=ctx.table, batch_size=20), ctx.settings)
    assert res.updated == 1 and res.unchanged == 49
    assert ctx.state() == expected_state(recs)


def test_reload_and_replay_leave_no_errors_in_the_server_log(ctx: Ctx, stack: dict[str, str]) -> None:
    """Issue 16, point 12: the loader's ordinary paths raise no database errors. The topic holds
    every key twice (two runs, as two jobs feeding one table or a re-extraction), read by real
    `trialsync load --once` and `trialsync replay` processes into an empty table: the first-load
    COPY must not meet its own keys."""
    log = ServerLog(stack)
    if not log.available:
        pytest.skip("the server log is read from the embedded PostgreSQL's data directory")
    r1, r2 = new_run(ctx.conn, topic=ctx.topic), new_run(ctx.conn, topic=ctx.topic)
    recs = _night(r1, 600, set(), 0) + _night(r2, 600, {1, 2, 3}, 5000)
    publish(ctx.settings, ctx.table, recs[:600], fmt="v1")
    publish(ctx.settings, ctx.table, recs[600:], fmt="named")
    p = LoaderProcess(ctx.env(KAFKA_SESSION_TIMEOUT_MS="6000"), ctx.tmp / "load.log", "--once", "--tables",
                      ctx.table, "--batch-size", "100")
    assert p.wait(120) == 0, p.log_text()[-2000:]
    assert ctx.state() == expected_state(recs)
    for args in (["--from-beginning"], ["--truncate"]):
        out = subprocess.run([TRIALSYNC, "replay", "--table", ctx.table, "--batch-size", "100", *args],
                             env=ctx.env(), cwd=str(REPO), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert ctx.state() == expected_state(recs)
    text = log.new_text()
    assert "duplicate key value violates unique constraint" not in text
    assert " ERROR: " not in text, [line for line in text.splitlines() if "ERROR" in line][:5]


def test_values_the_database_refuses_unchecked_are_loaded_checked(ctx: Ctx) -> None:
    """The fast path trusts values as orjson writes them; a producer that sends ts-load-v1 with
    other bytes still gets them loaded (or dead-lettered with the reason)."""
    recs = [Rec(f"cc1:{i}", {"i": i}, 5, extracted_at=ts(i)) for i in range(30)]
    recs[4] = Rec("cc1:pretty", b'{\n\t"a": "x\\\\y"\n}', 5, extracted_at=ts(4))
    recs[9] = Rec("cc1:latin1", b'{"name": "Jos\xe9"}', 5, extracted_at=ts(9))
    publish(ctx.settings, ctx.table, recs, fmt="v1")
    stats = load_once(ctx.settings, ctx.group, [ctx.table])
    assert stats.rejected == 1 and stats.inserted == 29
    assert ctx.state()["cc1:pretty"] == ({"a": "x\\y"}, False)
    cls = ctx.conn.execute("SELECT error_class FROM etl.dw_etl_rejects WHERE topic = %s", (ctx.topic,)).fetchone()
    assert cls == ("InvalidText",)
