"""The scheduler fires at the right times: APScheduler driven by a fake clock, the catch-up policy,
coalescing of fires into one orchestration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import apscheduler.schedulers.base as aps_base
import pytest
from apscheduler.schedulers.base import BaseScheduler

from orchestrator.scheduler import (
    BatchOutcome,
    Fire,
    FireExecutor,
    ScheduleBook,
    SchedulerService,
    crontab_day_of_week,
    fire_times_between,
    split_missed,
)
from orchestrator.settings import load_orchestrator_settings


class FakeNow:
    def __init__(self, t: datetime):
        self.t = t

    def __call__(self) -> datetime:
        return self.t


def fake_datetime(now: FakeNow) -> type:
    class FakeDT(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return now.t.astimezone(tz) if tz is not None else now.t

    return FakeDT


class ManualScheduler(BaseScheduler):
    """APScheduler without its timer thread: the test calls _process_jobs() at fake times."""

    def wakeup(self) -> None:
        return

    def shutdown(self, wait: bool = True) -> None:
        super().shutdown(wait)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeNow:
    now = FakeNow(datetime(2026, 1, 5, 0, 0, 30, tzinfo=UTC))
    monkeypatch.setattr(aps_base, "datetime", fake_datetime(now))
    return now


def make_book(clock: FakeNow, grace: int = 3600) -> tuple[ScheduleBook, list[tuple[int, datetime, str, datetime]],
                                                          list[tuple[int, list[datetime]]]]:
    fires: list[tuple[int, datetime, str, datetime]] = []
    missed: list[tuple[int, list[datetime]]] = []
    ex = FireExecutor(lambda j, t, k: fires.append((j, t, k, clock.t)), lambda j, ts: missed.append((j, ts)),
                      grace, now=clock)
    sched = ManualScheduler(timezone="UTC", executors={"fire": ex})
    sched.start()
    return ScheduleBook(sched, "UTC"), fires, missed


def advance(book: ScheduleBook, clock: FakeNow, until: datetime, step: float = 20.0) -> None:
    while clock.t < until:
        clock.t = min(until, clock.t + timedelta(seconds=step))
        book.scheduler._process_jobs()


def test_fires_exactly_at_cron_times(clock: FakeNow) -> None:
    book, fires, missed = make_book(clock)
    book.sync({2: "0 2 * * *", 9: "*/15 * * * *", 3: "30 1 * * 1"})  # 2026-01-05 is a Monday
    advance(book, clock, datetime(2026, 1, 5, 6, 0, 30, tzinfo=UTC))
    by_job: dict[int, list[datetime]] = {}
    for job_id, scheduled, kind, seen_at in fires:
        assert kind == "on_time"
        assert timedelta(0) <= seen_at - scheduled < timedelta(seconds=21)  # fired on the first tick after
        by_job.setdefault(job_id, []).append(scheduled)
    assert by_job[2] == [datetime(2026, 1, 5, 2, 0, tzinfo=UTC)]
    assert by_job[3] == [datetime(2026, 1, 5, 1, 30, tzinfo=UTC)]
    day = datetime(2026, 1, 5, tzinfo=UTC)
    assert by_job[9] == [day + timedelta(minutes=15 * i) for i in range(1, 25)]
    assert missed == []
    assert book.next_fire_times()[2] == datetime(2026, 1, 6, 2, 0, tzinfo=UTC)


def test_timezone_is_respected(clock: FakeNow) -> None:
    fires: list[tuple[int, datetime]] = []
    ex = FireExecutor(lambda j, t, k: fires.append((j, t)), lambda j, ts: None, 3600, now=clock)
    sched = ManualScheduler(timezone="America/New_York", executors={"fire": ex})
    sched.start()
    book = ScheduleBook(sched, "America/New_York")
    book.sync({2: "0 2 * * *"})
    advance(book, clock, datetime(2026, 1, 5, 8, 0, tzinfo=UTC), step=60)
    assert [t.astimezone(UTC) for _, t in fires] == [datetime(2026, 1, 5, 7, 0, tzinfo=UTC)]  # 02:00 EST


def test_late_wakeup_within_grace_coalesces_into_one_catch_up(clock: FakeNow) -> None:
    book, fires, missed = make_book(clock, grace=3600)
    book.sync({9: "*/15 * * * *"})
    clock.t = datetime(2026, 1, 5, 0, 50, tzinfo=UTC)  # slept through 00:15, 00:30, 00:45
    book.scheduler._process_jobs()
    assert [(j, t, k) for j, t, k, _ in fires] == [(9, datetime(2026, 1, 5, 0, 45, tzinfo=UTC), "catch_up")]
    assert missed == []


def test_misses_older_than_grace_are_skipped(clock: FakeNow) -> None:
    book, fires, missed = make_book(clock, grace=3600)
    book.sync({9: "*/15 * * * *"})
    clock.t = datetime(2026, 1, 5, 3, 5, tzinfo=UTC)  # 12 fire times passed; those before 02:05 are too old
    book.scheduler._process_jobs()
    assert [(t, k) for _, t, k, _ in fires] == [(datetime(2026, 1, 5, 3, 0, tzinfo=UTC), "catch_up")]
    (job, old), = missed
    assert job == 9
    assert old[0] == datetime(2026, 1, 5, 0, 15, tzinfo=UTC) and old[-1] == datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
    assert len(old) == 8


def test_schedule_changes_and_removal(clock: FakeNow) -> None:
    book, fires, _ = make_book(clock)
    assert book.sync({2: "0 2 * * *"})["added"] == [2]
    assert book.sync({2: "0 3 * * *"})["changed"] == [2]
    assert book.sync({2: "0 3 * * *"}) == {"added": [], "changed": [], "removed": []}
    advance(book, clock, datetime(2026, 1, 5, 3, 1, tzinfo=UTC), step=60)
    assert [t.hour for _, t, _, _ in fires] == [3]
    assert book.sync({})["removed"] == [2]
    advance(book, clock, datetime(2026, 1, 6, 3, 1, tzinfo=UTC), step=600)
    assert len(fires) == 1


@pytest.mark.parametrize("field,expected", [
    ("*", "*"), ("1", "mon"), ("0", "sun"), ("7", "sun"), ("1-5", "mon,tue,wed,thu,fri"),
    ("0,6", "sun,sat"), ("*/2", "sun,tue,thu,sat"), ("mon-wed", "mon,tue,wed"), ("5-7", "sun,fri,sat"),
])
def test_crontab_day_of_week_uses_cron_numbering(field: str, expected: str) -> None:
    assert crontab_day_of_week(field) == expected


def test_weekly_schedule_fires_on_the_crontab_day() -> None:
    monday = datetime(2026, 1, 5, tzinfo=UTC)
    assert fire_times_between("30 1 * * 1", monday - timedelta(days=1), monday + timedelta(days=8)) == [
        monday + timedelta(hours=1, minutes=30), monday + timedelta(days=7, hours=1, minutes=30)]


def test_fire_times_between_and_split() -> None:
    a = datetime(2026, 1, 5, 0, 0, tzinfo=UTC)
    times = fire_times_between("0 * * * *", a, a + timedelta(hours=5))
    assert times == [a + timedelta(hours=h) for h in range(1, 6)]  # start excluded, end included
    fire, old = split_missed(times, a + timedelta(hours=5, minutes=10), 3600)
    assert fire == a + timedelta(hours=5) and old == times[:-1]
    assert split_missed([], a, 10) == (None, [])


def service(clock: FakeNow, **orch: Any) -> tuple[SchedulerService, list[list[Fire]], list[Fire]]:
    batches: list[list[Fire]] = []
    recorded: list[Fire] = []

    def run_batch(fires: list[Fire]) -> BatchOutcome:
        batches.append(list(fires))
        return BatchOutcome(fires, "oid", {f.job_id: ("success", 1, None) for f in fires})

    o = load_orchestrator_settings(scheduler_misfire_grace_seconds=3600, scheduler_coalesce_seconds=0, **orch)
    svc = SchedulerService(orch=o, scheduler_factory=ManualScheduler, run_batch=run_batch, now=clock,
                           evaluate_alerts=False)

    def record(fire: Fire, outcome: str = "running", detail: str | None = None) -> int:
        recorded.append(Fire(fire.job_id, fire.scheduled_for, outcome))
        return len(recorded)

    svc.record_fire = record  # type: ignore[method-assign]
    svc.finish_fire = lambda *a, **k: None  # type: ignore[method-assign]
    return svc, batches, recorded


def test_catch_up_at_start_follows_the_policy(clock: FakeNow) -> None:
    svc, _, recorded = service(clock)
    clock.t = datetime(2026, 1, 5, 12, 0, 10, tzinfo=UTC)
    schedules = {1: "0 * * * *", 2: "0 2 * * *", 3: "0 * * * *", 4: "0 13 * * *"}
    refs = {1: datetime(2026, 1, 5, 9, 0, tzinfo=UTC),    # 10:00, 11:00 old; 12:00 due
            2: datetime(2026, 1, 4, 2, 0, tzinfo=UTC),    # today's 02:00 is 10 h old: skipped
            3: datetime(2026, 1, 5, 12, 0, tzinfo=UTC),   # fired already at 12:00: nothing
            4: datetime(2026, 1, 5, 11, 0, tzinfo=UTC)}   # next fire is in the future: nothing
    svc.catch_up(schedules, refs, clock.t)
    queued = []
    while not svc.queue.empty():
        queued.append(svc.queue.get())
    assert [(f.job_id, f.scheduled_for, f.kind) for f in queued] == [(1, datetime(2026, 1, 5, 12, 0, tzinfo=UTC),
                                                                      "catch_up")]
    assert sorted((f.job_id, f.kind) for f in recorded) == [(1, "missed"), (2, "missed")]


def test_never_fired_schedule_does_not_catch_up_before_it_was_set(clock: FakeNow) -> None:
    svc, _, _ = service(clock)
    clock.t = datetime(2026, 1, 5, 12, 0, 10, tzinfo=UTC)
    svc.catch_up({1: "0 * * * *"}, {1: datetime(2026, 1, 5, 12, 0, 5, tzinfo=UTC)}, clock.t)
    assert svc.queue.empty()


def test_dispatch_merges_fires_and_keeps_latest_per_job(clock: FakeNow) -> None:
    svc, batches, recorded = service(clock)
    t1 = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
    t2 = datetime(2026, 1, 5, 2, 15, tzinfo=UTC)
    out = svc.dispatch([Fire(2, t1, "on_time"), Fire(3, t1, "on_time"), Fire(2, t2, "catch_up")])
    assert len(batches) == 1
    assert sorted((f.job_id, f.scheduled_for) for f in batches[0]) == [(2, t2), (3, t1)]
    assert out.outcomes[2][0] == "success"
    assert len(recorded) == 2


def test_fires_are_ignored_once_stopping(clock: FakeNow) -> None:
    svc, _, _ = service(clock)
    svc.stopping.set()
    svc.on_fire(2, clock.t, "on_time")
    assert svc.queue.empty()


def test_bad_timezone_is_a_clear_config_error() -> None:
    from common.config import ConfigError

    with pytest.raises(ConfigError, match=r"SCHEDULER_TIMEZONE='Mars/Olympus'.*IANA time zone"):
        load_orchestrator_settings(scheduler_timezone="Mars/Olympus")
