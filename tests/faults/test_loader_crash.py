"""kill -9 a loader at random points during a large load, restart: exact state, exact counts.
SIGTERM: the loader finishes its batch, commits, leaves the group and exits 0."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers import run_progress
from tests.loader_support import (
    Ctx,
    LoaderProcess,
    Rec,
    expected_state,
    finish_run,
    group_committed,
    loaders,
    make_ctx,
    new_run,
    publish,
    run_row,
    ts,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture
def ctx(stack, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctx]:
    yield from make_ctx(unique, tmp_path, monkeypatch)


def _recs(run_id: int, n: int, keys: int, seed: int) -> list[Rec]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        k = rnd.randrange(keys)
        value = None if rnd.random() < 0.04 else {"k": k, "rev": i, "pad": "x" * 200}
        out.append(Rec(f"cc1:{k}", value, run_id, extracted_at=ts(i)))
    return out


def test_kill9_at_random_points_then_restart_gives_the_exact_state(ctx: Ctx) -> None:
    run_id = new_run(ctx.conn, topic=ctx.topic)
    recs = _recs(run_id, 80_000, keys=20_000, seed=11)
    ends = publish(ctx.settings, ctx.table, recs)
    finish_run(ctx.conn, run_id, ctx.topic, ends, published=len(recs))
    rnd = random.Random()
    kills = 0
    # small batches, so a kill lands between, inside and right after database commits
    args = ("--tables", ctx.table, "--group", ctx.group, "--batch-size", "500", "--flush-ms", "50")
    for i in range(3):
        before = ctx.count()
        p = LoaderProcess(ctx.env(), ctx.tmp / f"run{i}.log", *args)
        with loaders(p):
            wait_until(lambda b=before, p=p: ctx.count() > b or not p.alive(), 90, what="the loader to write")
            time.sleep(rnd.uniform(0.0, 1.5))
            if p.alive():
                p.kill9()
                kills += 1
    assert kills >= 2, "the load finished before the loader could be killed: make it bigger"

    final = LoaderProcess(ctx.env(), ctx.tmp / "final.log", "--tables", ctx.table, "--group", ctx.group, "--once")
    with loaders(final):
        assert final.wait(300) == 0, final.log_text()[-3000:]
    assert ctx.state() == expected_state(recs)
    # nothing missing, nothing twice: every record of the run counted exactly once
    assert run_progress.run_loaded(ctx.conn, run_id)
    row = run_row(ctx.conn, run_id)
    assert (row["records_loaded"], row["records_rejected"]) == (len(recs), 0)
    assert group_committed(ctx.settings, ctx.group, ctx.topic) == {p: o + 1 for p, o in ends.items()}


def test_sigterm_finishes_commits_and_leaves(ctx: Ctx) -> None:
    run_id = new_run(ctx.conn, topic=ctx.topic)
    recs = _recs(run_id, 40_000, keys=10_000, seed=5)
    ends = publish(ctx.settings, ctx.table, recs)
    finish_run(ctx.conn, run_id, ctx.topic, ends, published=len(recs))
    p = LoaderProcess(ctx.env(), ctx.tmp / "term.log", "--tables", ctx.table, "--group", ctx.group,
                      "--batch-size", "1000", "--flush-ms", "50")
    with loaders(p):
        wait_until(lambda: ctx.count() > 0, 90, what="the loader to write")
        assert p.stop(timeout=60) == 0
    stopped = p.events("loader_stopped")
    assert stopped, p.log_text()[-2000:]
    # what it wrote is committed in the group: the broker's offsets match the database positions
    committed = group_committed(ctx.settings, ctx.group, ctx.topic)
    positions = dict(ctx.conn.execute(
        "SELECT kafka_partition, next_offset FROM etl.loader_positions WHERE group_id = %s AND topic = %s",
        (ctx.group, ctx.topic)).fetchall())
    assert positions and all(committed[part] == off for part, off in positions.items())
    # and a restart carries on from there to the exact state, counting nothing twice
    again = LoaderProcess(ctx.env(), ctx.tmp / "again.log", "--tables", ctx.table, "--group", ctx.group, "--once")
    with loaders(again):
        assert again.wait(300) == 0
    assert ctx.state() == expected_state(recs)
    assert run_row(ctx.conn, run_id)["records_loaded"] == len(recs)
