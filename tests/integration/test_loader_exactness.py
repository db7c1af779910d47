"""The loader writes exactly the final state: duplicates, updates, tombstones, fence, accounting."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Message

from consumers import run_progress
from consumers.loader import BatchSink
from tests.loader_support import (
    Ctx,
    Rec,
    expected_state,
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


def _workload(run_id: int, n_keys: int = 400, n_msgs: int = 3000, seed: int = 7) -> list[Rec]:
    """Inserts, repeated identical records, updates, tombstones and un-deletes, in random order."""
    rnd = random.Random(seed)
    recs = []
    for i in range(n_msgs):
        k = rnd.randrange(n_keys)
        if rnd.random() < 0.12:
            recs.append(Rec(f"cc1:{k}", None, run_id, extracted_at=ts(i)))
        else:
            version = rnd.randrange(3)  # few versions -> many "unchanged" re-deliveries
            recs.append(Rec(f"cc1:{k}", {"id": k, "version": version, "name": f"patient {k}", "q": 'a"b\\c\tz'},
                            run_id, extracted_at=ts(i)))
    return recs


@pytest.mark.parametrize("fmt", ["v1", "named", "mixed"])
def test_exact_final_state_and_run_accounting(ctx: Ctx, fmt: str) -> None:
    """Headers as this version publishes them (ts-load-v1), as earlier versions did (named), and a
    topic holding both."""
    run_id = new_run(ctx.conn, topic=ctx.topic)
    recs = _workload(run_id)
    ends = publish(ctx.settings, ctx.table, recs, fmt=fmt)
    assert len(ends) == 3  # spread over every partition
    finish_run(ctx.conn, run_id, ctx.topic, ends, published=len(recs))
    assert run_progress.run_loaded(ctx.conn, run_id) is False

    stats = load_once(ctx.settings, ctx.group, [ctx.table], batch_size=700)
    assert stats.records == len(recs) and stats.rejected == 0

    assert ctx.state() == expected_state(recs)
    assert run_progress.run_loaded(ctx.conn, run_id) is True
    row = run_row(ctx.conn, run_id)
    assert row["records_loaded"] == len(recs) and row["records_rejected"] == 0
    assert row["load_completed_at"] is not None and row["run_status"] == "success"
    # lineage from the headers
    bad = ctx.conn.execute(f'SELECT count(*) FROM bronze."{ctx.table}" '
                           "WHERE etl_run_id IS DISTINCT FROM %s OR etl_job_id <> 9 OR source_instance_id <> 'cc1' "
                           "OR extracted_at IS NULL OR kafka_offset IS NULL", (run_id,)).fetchone()[0]
    assert bad == 0
    # deleted rows keep their last data and say when they were deleted
    deleted = ctx.conn.execute(f'SELECT count(*), count(deleted_at), count(data) FROM bronze."{ctx.table}" '
                               "WHERE is_deleted").fetchone()
    assert deleted[0] > 0 and deleted[0] == deleted[1] == deleted[2]

    # loading the same topic again with a fresh group changes nothing and does not double the counts
    before = ctx.conn.execute(f'SELECT max(updated_at) FROM bronze."{ctx.table}"').fetchone()[0]
    again = load_once(ctx.settings, ctx.group + "-again", [ctx.table], batch_size=5000)
    assert again.inserted == again.updated == again.deleted == 0
    assert ctx.conn.execute(f'SELECT max(updated_at) FROM bronze."{ctx.table}"').fetchone()[0] == before
    assert ctx.state() == expected_state(recs)
    assert run_row(ctx.conn, run_id)["records_loaded"] == len(recs)


def test_later_record_undeletes_and_unknown_tombstone_is_noop(ctx: Ctx) -> None:
    recs = [
        Rec("cc1:ghost", None, extracted_at=ts(1)),  # never existed: nothing to delete
        Rec("cc1:a", {"v": 1}, extracted_at=ts(2)),
        Rec("cc1:a", None, extracted_at=ts(3)),
    ]
    publish(ctx.settings, ctx.table, recs)
    load_once(ctx.settings, ctx.group, [ctx.table])
    assert ctx.state() == {"cc1:a": ({"v": 1}, True)}
    publish(ctx.settings, ctx.table, [Rec("cc1:a", {"v": 2}, extracted_at=ts(4))])
    load_once(ctx.settings, ctx.group, [ctx.table])
    assert ctx.state() == {"cc1:a": ({"v": 2}, False)}
    assert ctx.conn.execute(f'SELECT deleted_at FROM bronze."{ctx.table}"').fetchone()[0] is None


def _msg(topic: str, partition: int, offset: int, key: str, value: bytes | None, ext: str) -> Message:
    return Message(topic=topic, partition=partition, offset=offset, key=key.encode(), value=value,
                   headers=[("ts-extracted-at", ext.encode()), ("ts-run-id", b"1")], timestamp=(1, 1))


def test_stale_write_fence(ctx: Ctx) -> None:
    """A late batch from a member that lost its partitions cannot overwrite newer content."""
    sink = BatchSink(ctx.settings, ctx.group, account=False)
    t = ctx.topic
    try:
        # the new owner wrote the newer version (extracted later) ...
        sink.write({(t, 0): [_msg(t, 0, 10, "cc1:k", b'{"v": "new"}', "2025-12-02T00:00:00Z")]})
        # ... then the old owner's batch with older content commits late (even at a higher offset,
        # as after a broker restart) -- and its stale tombstone too
        sink.write({(t, 0): [_msg(t, 0, 5, "cc1:k", b'{"v": "old"}', "2025-12-01T00:00:00Z")]})
        sink.write({(t, 1): [_msg(t, 1, 99, "cc1:k", None, "2025-12-01T12:00:00Z")]})
        assert ctx.state() == {"cc1:k": ({"v": "new"}, False)}
        # same extraction time: the offset breaks the tie
        sink.write({(t, 0): [_msg(t, 0, 11, "cc1:k", b'{"v": "tie"}', "2025-12-02T00:00:00Z")]})
        assert ctx.state() == {"cc1:k": ({"v": "tie"}, False)}
        # within one batch the latest extraction wins, not the last offset
        sink.write({(t, 2): [_msg(t, 2, 1, "cc1:m", b'{"v": 2}', "2025-12-03T00:00:00Z"),
                             _msg(t, 2, 2, "cc1:m", b'{"v": 1}', "2025-12-02T00:00:00Z")]})
        assert ctx.state()["cc1:m"] == ({"v": 2}, False)
    finally:
        sink.close()


def test_run_loaded_exactly_when_all_end_offsets_are_passed(ctx: Ctx) -> None:
    run_id = new_run(ctx.conn, topic=ctx.topic)
    recs = [Rec(f"cc1:{i}", {"i": i}, run_id, extracted_at=ts(i)) for i in range(60)]
    ends = publish(ctx.settings, ctx.table, recs)
    finish_run(ctx.conn, run_id, ctx.topic, ends, published=len(recs))
    # write the run's records partition by partition through the loader's own sink
    from confluent_kafka import Consumer, TopicPartition

    from common.kafka import consumer_config

    c = Consumer(consumer_config(ctx.group + "-reader", ctx.settings))
    by_part: dict[int, list] = {}
    try:
        c.assign([TopicPartition(ctx.topic, p, 0) for p in ends])
        while sum(len(v) for v in by_part.values()) < len(recs):
            for m in c.consume(100, 1.0):
                if m.error() is None:
                    by_part.setdefault(m.partition(), []).append(m)
    finally:
        c.close()
    sink = BatchSink(ctx.settings, ctx.group, account=True)
    try:
        parts = sorted(by_part)
        for i, p in enumerate(parts):
            msgs = by_part[p]
            # all but the run's last record in this partition: not loaded yet
            sink.write({(ctx.topic, p): msgs[:-1]})
            assert run_progress.run_loaded(ctx.conn, run_id) is False
            sink.write({(ctx.topic, p): msgs[-1:]})
            assert run_progress.run_loaded(ctx.conn, run_id) is (i == len(parts) - 1)
    finally:
        sink.close()
    st = run_progress.load_status(ctx.conn, [run_id])[run_id]
    assert st.loaded and st.records_loaded == len(recs)
    assert run_progress.wait_for_load([run_id], timeout=5, settings=ctx.settings) is True


def test_zero_record_run_is_loaded_immediately_and_wait_times_out_clearly(ctx: Ctx) -> None:
    empty = new_run(ctx.conn, topic=ctx.topic)
    finish_run(ctx.conn, empty, ctx.topic, {}, published=0)
    assert run_progress.run_loaded(ctx.conn, empty) is True
    assert run_row(ctx.conn, empty)["load_completed_at"] is not None

    waiting = new_run(ctx.conn, topic=ctx.topic)
    ends = publish(ctx.settings, ctx.table, [Rec("cc1:x", {"x": 1}, waiting, extracted_at=ts(1))])
    finish_run(ctx.conn, waiting, ctx.topic, ends, published=1)
    assert run_progress.wait_for_load([empty, waiting], timeout=1.0, poll=0.2, settings=ctx.settings) is False
    with pytest.raises(run_progress.LoadTimeout, match=rf"run {waiting} on {ctx.topic}: 0 of 1 records"):
        run_progress.wait_for_load([waiting], timeout=0.5, poll=0.2, settings=ctx.settings, raise_on_timeout=True)
    with pytest.raises(KeyError):
        run_progress.run_loaded(ctx.conn, 987654321)
    load_once(ctx.settings, ctx.group, [ctx.table])
    assert run_progress.wait_for_load([empty, waiting], timeout=10, settings=ctx.settings) is True


def test_two_jobs_feeding_one_table_keep_separate_counts(ctx: Ctx) -> None:
    """Jobs 2 and 164 both load dim_studies_staging: counts per run id from the headers."""
    r1 = new_run(ctx.conn, job_id=2, topic=ctx.topic)
    r2 = new_run(ctx.conn, job_id=164, topic=ctx.topic)
    recs = []
    for i in range(500):
        recs.append(Rec(f"cc1:s{i}", {"i": i, "src": 2}, r1, job_id=2, extracted_at=ts(2 * i)))
        if i % 2 == 0:
            recs.append(Rec(f"cc1:t{i}", {"i": i, "src": 164}, r2, job_id=164, extracted_at=ts(2 * i + 1)))
    publish(ctx.settings, ctx.table, recs)
    load_once(ctx.settings, ctx.group, [ctx.table], batch_size=128)
    assert run_row(ctx.conn, r1)["records_loaded"] == 500
    assert run_row(ctx.conn, r2)["records_loaded"] == 250
    jobs = dict(ctx.conn.execute(f'SELECT etl_job_id, count(*) FROM bronze."{ctx.table}" GROUP BY 1').fetchall())
    assert jobs == {2: 500, 164: 250}


@pytest.mark.parametrize("fmt", ["v1", "named"])
def test_values_that_need_copy_escaping(ctx: Ctx, fmt: str) -> None:
    """Raw tabs/newlines (pretty-printed JSON), backslashes, non-ASCII, odd keys: stored exactly --
    with ts-load-v1 headers the database refuses the unchecked payload and the batch is loaded
    checked."""
    pretty = b'{\n\t"name": "Jos\xc3\xa9 \\"Pepe\\" O\'Neil",\r\n  "path": "C:\\\\temp\\\\x",\n  "n": 1\n}'
    recs = [
        Rec("cc1:pretty", pretty, extracted_at=ts(1)),
        Rec("cc1:tab\tkey", {"a": 1}, extracted_at=ts(2)),
        Rec("cc1:back\\slash", {"b": "\\N"}, extracted_at=ts(3)),
        Rec("cc1:emoji", {"e": "\U0001f9ea", "z": "\u00e9"}, extracted_at=ts(4),
            headers={"ts-params": b'{\n "studyId": 7\n}'}),
    ]
    publish(ctx.settings, ctx.table, recs, fmt=fmt)
    load_once(ctx.settings, ctx.group, [ctx.table])
    assert ctx.state() == expected_state(recs)
    assert ctx.state()["cc1:pretty"][0] == {"name": 'José "Pepe" O\'Neil', "path": "C:\\temp\\x", "n": 1}
    params = ctx.conn.execute(f'SELECT source_params FROM bronze."{ctx.table}" WHERE source_id = %s',
                              ("cc1:emoji",)).fetchone()[0]
    assert params == {"studyId": 7}


def test_malformed_headers_become_null_not_lost_records(ctx: Ctx) -> None:
    bad = {"ts-run-id": b"abc", "ts-job-id": b"99999999999", "ts-extracted-at": b"yesterday-ish",
           "ts-modified-at": b"2025-13-45T99:00:00Z", "ts-params": b"{not json"}
    recs = [Rec(f"cc1:{i}", {"i": i}, 7, extracted_at=ts(i)) for i in range(50)]
    recs.insert(20, Rec("cc1:odd", {"odd": True}, headers=bad))
    publish(ctx.settings, ctx.table, recs)
    stats = load_once(ctx.settings, ctx.group, [ctx.table])
    assert stats.rejected == 0
    assert ctx.state() == expected_state(recs)
    row = ctx.conn.execute(f'SELECT etl_run_id, etl_job_id, source_modified_at, source_params, extracted_at '
                           f'FROM bronze."{ctx.table}" WHERE source_id = %s', ("cc1:odd",)).fetchone()
    assert row[:4] == (None, None, None, None)
    assert row[4] is not None  # fell back to the message timestamp
    assert ctx.conn.execute(f'SELECT count(*) FROM bronze."{ctx.table}" WHERE etl_run_id = 7').fetchone()[0] == 50
