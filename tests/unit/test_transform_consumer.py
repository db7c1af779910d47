"""Control-message handling without services: classification, offset bookkeeping, coalescing,
load waiting and retry backoff (fakes for the runner, the broker and the loader's bookkeeping)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import pytest

from common.config import ConfigError, load_settings
from consumers.transform_plan import Procedure, TransformPlan
from consumers.transform_runner import BatchResult, ProcedureResult
from consumers.transform_settings import load_transform_settings
from consumers.transformer import OffsetTracker, Transformer
from schemas.messages import RunFinished, RunStarted


class FakeRunner:
    def __init__(self) -> None:
        self.plan = TransformPlan([
            Procedure("silver.load_dim_studies", "silver.dim_studies", "dimension", 30, ("dim_studies_staging",)),
            Procedure("silver.load_dim_subjects", "silver.dim_subjects", "dimension", 31, ("dim_subjects_staging",)),
            Procedure("silver.load_fact_enrollment", "silver.fact_enrollment", "fact", 50, ("dim_subjects_staging",),
                      ("silver.load_dim_studies", "silver.load_dim_subjects")),
        ])
        self.batches: list[tuple[list[str], list[int], list[str]]] = []

    def run_batch(self, procs, *, trigger, run_ids, tables, **kw) -> BatchResult:
        names = [p.name for p in procs]
        self.batches.append((names, list(run_ids), list(tables)))
        return BatchResult(uuid.uuid4(), [ProcedureResult(n, "", "success") for n in names])

    def due_retries(self):
        return []

    def close(self) -> None:
        pass


def transformer(loaded: dict[int, bool], **ts) -> tuple[Transformer, FakeRunner]:
    runner = FakeRunner()

    def runs_loaded(conn, run_ids: Sequence[int]) -> dict[int, bool]:
        return {r: loaded[r] for r in run_ids if r in loaded}

    t = Transformer(load_settings(enable_metrics=False),
                    load_transform_settings(coalesce_seconds=ts.pop("coalesce_seconds", 0.0), **ts),
                    runner=runner, runs_loaded=runs_loaded)  # type: ignore[arg-type]
    t._conn = lambda: None  # type: ignore[method-assign]
    return t, runner


def fin(run_id: int, table: str, records: int = 5) -> bytes:
    return RunFinished(run_id=run_id, job_id=1, target_table=table, topic="t", instance_id="cc1", status="success",
                       records_published=records).to_bytes()


def test_offset_tracker_commits_only_past_handled_prefix() -> None:
    tr = OffsetTracker()
    for off in (5, 6, 7):
        tr.add(0, off)
    tr.add(1, 0)
    tr.done(0, 6)
    tr.done(1, 0)
    assert tr.committable() == {1: 1}  # partition 0 still waits for offset 5
    tr.done(0, 5)
    assert tr.committable() == {0: 7, 1: 1}
    tr.committed(0, 7)
    tr.committed(1, 1)
    assert tr.committable() == {} and tr.pending() == 1
    tr.done(0, 7)
    assert tr.committable() == {0: 8}
    tr.drop([0])
    assert tr.committable() == {}


def test_messages_without_work_are_handled_immediately() -> None:
    t, runner = transformer({})
    t.handle_message(0, 0, None)
    t.handle_message(0, 1, b"not json")
    t.handle_message(0, 2, RunStarted(run_id=1, job_id=2, target_table="dim_studies_staging", topic="t",
                                      instance_id="cc1").to_bytes())
    t.handle_message(0, 3, fin(1, "dim_rooms_staging"))
    t.handle_message(0, 4, fin(1, "dim_studies_staging", records=0))
    assert t.skipped == 5 and not t.pending.runs
    assert t.tracker.committable() == {0: 5}


def test_pending_runs_wait_for_the_loader_then_share_one_batch() -> None:
    loaded = {1: True, 2: False, 3: True}
    t, runner = transformer(loaded)
    t.handle_message(0, 0, fin(1, "dim_studies_staging"))
    t.handle_message(1, 0, fin(2, "dim_subjects_staging"))
    t.handle_message(0, 1, fin(3, "dim_subjects_staging"))
    t.refresh_loaded()
    assert t.batch_due()
    batch = t.run_ready()
    assert batch is not None
    # runs 1 and 3 are loaded: one batch, each procedure once, dims before facts
    assert runner.batches == [(["silver.load_dim_studies", "silver.load_dim_subjects", "silver.load_fact_enrollment"],
                               [1, 3], ["dim_studies_staging", "dim_subjects_staging"])]
    assert t.tracker.committable() == {0: 2}  # partition 1 waits for run 2
    loaded[2] = True
    t.refresh_loaded()
    t.run_ready()
    assert runner.batches[-1] == (["silver.load_dim_subjects", "silver.load_fact_enrollment"], [2],
                                  ["dim_subjects_staging"])
    assert t.tracker.committable() == {0: 2, 1: 1}


def test_coalescing_window_delays_the_batch() -> None:
    t, runner = transformer({1: True, 2: True}, coalesce_seconds=0.3)
    t.handle_message(0, 0, fin(1, "dim_studies_staging"))
    t.refresh_loaded()
    assert not t.batch_due()
    t.handle_message(0, 1, fin(2, "dim_subjects_staging"))  # arrives inside the window
    t.refresh_loaded()
    time.sleep(0.35)
    assert t.batch_due()
    t.run_ready()
    assert len(runner.batches) == 1 and runner.batches[0][1] == [1, 2]


def test_a_run_never_loaded_is_transformed_after_the_wait_timeout() -> None:
    t, runner = transformer({7: False}, load_wait_timeout_seconds=0.1)
    t.handle_message(0, 0, fin(7, "dim_studies_staging"))
    t.refresh_loaded()
    assert not t.pending.ready()
    time.sleep(0.15)
    t.refresh_loaded()
    assert t.pending.ready()[0].forced
    t.run_ready()
    assert runner.batches and t.tracker.committable() == {0: 1}


def test_retry_backoff_and_settings_validation() -> None:
    ts = load_transform_settings(retry_base_seconds=30, retry_max_seconds=600)
    assert [ts.retry_delay(a) for a in (1, 2, 3, 5, 9)] == [30, 60, 120, 480, 600]
    with pytest.raises(ConfigError, match="TRANSFORM_COALESCE_SECONDS"):
        load_transform_settings(coalesce_seconds=-1)
