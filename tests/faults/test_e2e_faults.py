"""Faults DURING a full run of all 72 jobs, then exact reconciliation of every staging table with the
simulator's ground truth (key by key, content by content): missing = duplicated = stale = extra = 0.

Real parts only: a private embedded stack (PostgreSQL 16 + tansu) per module, the CC simulator over
HTTP, `trialsync run --all` and `trialsync load` as subprocesses. The scenarios live in
``tests/faults/scenarios.py`` and are shared with ``python -m bench.faults`` (every scenario on its
own run, any scale, JSON + Markdown). Here, to fit CI's time budget, the three faults that heal
inside the run (loader kill -9, extraction worker kill -9, PostgreSQL restart) share one run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.lab import Lab
from tests.faults.scenarios import (
    Outcome,
    api_storm,
    broker_restart,
    combined_kills,
    orchestrator_kill,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow, pytest.mark.heavy]
SCALE = 0.002
FANOUT = ("--job", "24", "--with-deps")  # patient visits, then their elements (a fan-out)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(scale=SCALE, seed=7) as lab:
        yield lab


def _exact(o: Outcome) -> None:
    print(f"\n{o.scenario}: faults={o.faults} heal={o.heal} expected={o.expected} missing={o.missing} "
          f"duplicated={o.duplicated} stale={o.stale} extra={o.extra} ({o.seconds} s)")
    assert o.expected > 10_000, "the ground truth is suspiciously small: the reconciliation proves little"
    assert (o.missing, o.duplicated, o.stale, o.extra) == (0, 0, 0, 0), (o.problems, o.steps)
    assert o.loaded == o.expected
    assert o.checks.get("runs_left_running") == 0, "a run row was left 'running'"


def test_loader_worker_and_database_faults_heal_inside_the_run(lab: Lab) -> None:
    o = combined_kills(lab)
    assert len(o.faults) == 3, o.faults
    # no operator action beyond restarting the loader: the run itself ends in success
    assert (o.run_exit, o.run_status) == (0, "success"), o.steps
    assert o.checks["killed_run_final_status"][0] in ("failed", "success"), o.checks  # success: it had just finished
    _exact(o)


def test_orchestrator_killed_then_rerun_is_exact(lab: Lab) -> None:
    o = orchestrator_kill(lab)
    assert o.run_exit == -9
    assert o.checks["orphan_workers_after_1s"] == [], "extraction workers outlived their orchestrator"
    assert o.heal and o.heal[-1].endswith("exit 0 (success)"), o.heal
    _exact(o)


def test_broker_restart_with_memory_storage_loses_records_and_a_full_reextract_heals(lab: Lab) -> None:
    # CI: patient visits and their elements (a fan-out of ~4,600 calls), to fit the time budget;
    # the 72-job variant runs in `python -m bench.faults` (~4 min at scale 0.002)
    o = broker_restart(lab, selection=FANOUT)
    assert o.before_heal is not None
    # what the memory broker lost: records published but not yet loaded, and their children
    if o.before_heal["missing"] == 0:
        # the fan-out finished before the restart (timing on a fast or idle machine): the heal is
        # still checked, the loss cannot be shown this time
        _exact_core(o)
        pytest.skip(f"the restart came after the fan-out had finished; nothing to lose ({o.steps})")
    assert o.run_exit == 1 and o.run_status in ("partial", "failed"), o.steps
    assert o.heal[1].startswith("trialsync run --job 24 --with-deps --full") and o.heal[1].endswith("exit 0 (success)"), \
        o.heal
    _exact_core(o)


def test_api_fault_storm_ends_success_or_partial_and_heals_exactly(lab: Lab) -> None:
    o = api_storm(lab, storm_requests=3000)
    # transient faults are retried away; the three records without id make the run partial
    assert (o.run_exit, o.run_status) == (1, "partial"), o.steps
    injected = o.checks["faults_injected"]
    for kind in ("500", "502", "429", "malformed", "no_id"):
        assert injected.get(kind, 0) > 0, f"no {kind} fault was injected: {injected}"
    # the three records served without their id: dead-lettered with the reason, counted, run partial
    letters = o.checks["dead_letters"]
    assert sum(n for *_, n in letters) == 3, letters
    assert all("no id" in msg or "no key" in msg for _, _, msg, _ in letters), letters
    assert o.checks["partial_runs_with_rejects"] >= 1
    _exact(o)


@pytest.fixture(scope="module")
def durable_lab() -> Iterator[Lab]:
    from common.embedded_s3 import s3rver_command

    if s3rver_command() is None:
        pytest.skip("the durable broker needs s3rver (npm; `make install` with Node.js)")
    with Lab(scale=SCALE, seed=7, durable_broker=True) as lab:
        yield lab


def test_broker_restart_with_durable_storage_loses_nothing(durable_lab: Lab) -> None:
    o = broker_restart(durable_lab, selection=FANOUT)
    assert (o.run_exit, o.run_status) == (0, "success"), o.steps
    assert not o.heal, "a durable broker needs no re-extract"
    _exact_core(o)


def _exact_core(o: Outcome) -> None:
    print(f"\n{o.scenario}: faults={o.faults} expected={o.expected} missing={o.missing} duplicated={o.duplicated} "
          f"stale={o.stale} extra={o.extra} ({o.seconds} s)")
    assert o.expected > 1000
    assert (o.missing, o.duplicated, o.stale, o.extra) == (0, 0, 0, 0), (o.problems, o.steps)
    assert o.checks.get("runs_left_running") == 0
