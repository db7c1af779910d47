"""Bad records never stop the line: DLQ topic + etl.dw_etl_rejects + metrics, the rest loads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from common.kafka import dlq_topic
from common.metrics import RECORDS_REJECTED
from consumers import run_progress
from tests.loader_support import (
    Ctx,
    Rec,
    dlq_messages,
    finish_run,
    load_once,
    make_ctx,
    new_run,
    publish,
    run_row,
    ts,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def ctx(stack, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctx]:
    yield from make_ctx(unique, tmp_path, monkeypatch)


def _rejected(table: str, reason: str) -> float:
    return RECORDS_REJECTED.labels(table, "load", reason)._value.get()


@pytest.mark.parametrize("fmt", ["v1", "named"])
def test_poison_messages_go_to_dlq_and_rejects_and_the_rest_loads(ctx: Ctx, fmt: str) -> None:
    run_id = new_run(ctx.conn, topic=ctx.topic)
    good = [Rec(f"cc1:{i}", {"i": i}, run_id, extracted_at=ts(i)) for i in range(200)]
    poison = [
        Rec(None, {"id": None}, run_id, extracted_at=ts(300)),                      # no id (null key)
        Rec("", {"id": ""}, run_id, extracted_at=ts(301)),                          # no id (empty key)
        Rec("cc1:badjson", b'{"id": 1, "broken": ', run_id, extracted_at=ts(302)),  # not JSON
        Rec("cc1:nul", b'{"id": 2, "s": "a\\u0000b"}', run_id, extracted_at=ts(303)),  # jsonb refuses \\u0000
        Rec("cc1:" + "k" * 300, {"id": 3}, run_id, extracted_at=ts(304)),           # key longer than source_id
        Rec("cc1:latin1", b'{"name": "Jos\xe9"}', run_id, extracted_at=ts(305)),    # not UTF-8
        Rec("cc1:nulbyte", b'{"name": "a\x00b"}', run_id, extracted_at=ts(306)),    # raw NUL byte
    ]
    recs = good[:100] + poison + good[100:]
    before = {r: _rejected(ctx.table, r) for r in ("NoRecordId", "InvalidJson", "KeyTooLong", "InvalidText")}
    ends = publish(ctx.settings, ctx.table, recs, fmt=fmt)
    finish_run(ctx.conn, run_id, ctx.topic, ends, published=len(recs))

    stats = load_once(ctx.settings, ctx.group, [ctx.table], batch_size=1000)
    assert stats.rejected == len(poison)

    # the good records are all there, untouched by their poisonous neighbours
    state = ctx.state()
    assert state == {f"cc1:{i}": ({"i": i}, False) for i in range(200)}

    rejects = ctx.conn.execute(
        "SELECT error_class, error_message, record_key, run_id, payload, kafka_partition, kafka_offset "
        "FROM etl.dw_etl_rejects WHERE topic = %s ORDER BY kafka_offset", (ctx.topic,)).fetchall()
    classes = sorted(r[0] for r in rejects)
    assert classes == sorted(["NoRecordId", "NoRecordId", "InvalidJson", "InvalidJson", "KeyTooLong",
                              "InvalidText", "InvalidText"])
    assert all(r[3] == run_id for r in rejects)
    msgs = {r[2]: r[1] for r in rejects}
    assert "record has no id" in msgs[None]
    assert "not valid JSON" in msgs["cc1:badjson"]
    assert "Unicode escape" in msgs["cc1:nul"]
    assert "at most 255" in msgs["cc1:" + "k" * 300]
    assert "UTF-8" in msgs["cc1:latin1"] and "NUL" in msgs["cc1:nulbyte"]

    # the DLQ topic holds every reject with the error and its origin in the headers
    dl = dlq_messages(ctx.settings, dlq_topic(ctx.table, ctx.settings), expect=len(poison))
    assert len(dl) == len(poison)
    origins = set()
    for m in dl:
        h = dict(m.headers())
        assert h["ts-error"] and h["ts-error-class"] and h["ts-src-topic"] == ctx.topic.encode()
        assert h["ts-run-id"] == str(run_id).encode()  # the original headers travel along
        origins.add((int(h["ts-src-partition"]), int(h["ts-src-offset"])))
    assert origins == {(r[5], r[6]) for r in rejects}

    for reason, n in (("NoRecordId", 2), ("InvalidJson", 2), ("KeyTooLong", 1), ("InvalidText", 2)):
        assert _rejected(ctx.table, reason) - before[reason] == n

    # the run: all records accounted for, marked partial because some were rejected
    assert run_progress.run_loaded(ctx.conn, run_id)
    row = run_row(ctx.conn, run_id)
    assert (row["records_loaded"], row["records_rejected"]) == (200, len(poison))
    assert row["run_status"] == "partial" and "rejected by the loader" in row["error_message"]

    # replaying the same batch (a fresh group re-reads everything) keeps the rejects table exact
    load_once(ctx.settings, ctx.group + "-again", [ctx.table], batch_size=1000)
    n = ctx.conn.execute("SELECT count(*) FROM etl.dw_etl_rejects WHERE topic = %s", (ctx.topic,)).fetchone()[0]
    assert n == len(poison)


def test_row_refused_for_another_reason_is_isolated(ctx: Ctx) -> None:
    """A constraint violation nobody predicted: bisection finds the one row, the batch loads."""
    ctx.conn.execute(f'ALTER TABLE bronze."{ctx.table}" ADD CONSTRAINT no_boom CHECK (data->>\'x\' <> \'boom\')')
    recs = [Rec(f"cc1:{i}", {"x": "boom" if i == 137 else "ok", "i": i}, extracted_at=ts(i)) for i in range(400)]
    recs += [Rec("cc1:5", {"x": "ok", "i": 5, "v": 2}, extracted_at=ts(1000)), Rec("cc1:6", None, extracted_at=ts(1001))]
    publish(ctx.settings, ctx.table, recs)
    stats = load_once(ctx.settings, ctx.group, [ctx.table], batch_size=5000)
    assert stats.rejected == 1
    state = ctx.state()
    assert "cc1:137" not in state and len(state) == 399
    assert state["cc1:5"] == ({"x": "ok", "i": 5, "v": 2}, False)   # duplicates still resolved right
    assert state["cc1:6"] == ({"x": "ok", "i": 6}, True)            # tombstone keeps the data before it
    cls, msg = ctx.conn.execute("SELECT error_class, error_message FROM etl.dw_etl_rejects WHERE topic = %s",
                                (ctx.topic,)).fetchone()
    assert cls == "DbCheckViolation" and "no_boom" in msg


def test_topic_of_a_missing_table_is_dead_lettered_and_the_rest_keeps_loading(ctx: Ctx) -> None:
    missing = f"{ctx.table}_gone"
    publish(ctx.settings, missing, [Rec(f"cc1:{i}", {"i": i}, extracted_at=ts(i)) for i in range(10)])
    publish(ctx.settings, ctx.table, [Rec(f"cc1:{i}", {"i": i}, extracted_at=ts(i)) for i in range(20)])
    stats = load_once(ctx.settings, ctx.group, [ctx.table, missing])
    assert stats.rejected == 10 and len(ctx.state()) == 20
    rows = ctx.conn.execute("SELECT DISTINCT error_class, error_message FROM etl.dw_etl_rejects WHERE topic = %s",
                            (f"{ctx.prefix}.bronze.{missing}",)).fetchall()
    assert len(rows) == 1 and rows[0][0] == "UnknownTable"
    assert f"bronze.{missing} does not exist" in rows[0][1] and "trialsync jobs sync" in rows[0][1]
    assert len(dlq_messages(ctx.settings, dlq_topic(missing, ctx.settings), expect=10)) == 10
