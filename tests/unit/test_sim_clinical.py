"""The simulated records mean what the CC model says (simulator/clinical.py): status histories end in
the subject's current status, only enrolled subjects carry enrollmentDate, completed visits have a
completed appointment, payments pay completed visits, queries and milestones are open or closed
consistently."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from simulator.clinical import STATUS_NAMES
from simulator.data import DataModel
from simulator.model import ENTITIES
from simulator.spec import definitions

ORDER = {name: i for i, name in enumerate(("Prescreened", "Screened", "RunIn", "Randomized", "FollowUp", "Completed"))}
EXITS = {"NonQualified": "Prescreened", "ScreenFailed": "Screened", "RunInFailed": "RunIn", "Dropped": "Randomized"}


@pytest.fixture(scope="module")
def m() -> DataModel:
    return DataModel(42, 0.002, definitions(), ENTITIES)


def _all(m: DataModel, name: str) -> list[dict]:
    e = m.entity(name)
    return m.build(e, np.arange(e.n_total))


def test_status_history_is_a_path_ending_in_the_current_status(m: DataModel) -> None:
    subjects = {s["id"]: s for s in _all(m, "subjects")}
    history: dict[int, list[dict]] = defaultdict(list)
    for ev in _all(m, "subject_statuses"):
        history[ev["subject"]["id"]].append(ev)
    assert set(history) == set(subjects)  # every subject has a status history
    reached_enrollment = 0
    for sid, events in history.items():
        events.sort(key=lambda e: e["eventDate"])
        assert [e["isCurrentStatus"] for e in events] == [False] * (len(events) - 1) + [True]
        assert events[-1]["status"] == subjects[sid]["status"]
        ranks = [ORDER.get(e["status"], ORDER.get(EXITS.get(e["status"], ""), -1)) for e in events]
        assert all(r >= 0 for r in ranks) and ranks == sorted(ranks), [e["status"] for e in events]
        assert all(e["status"] not in EXITS for e in events[:-1])  # an exit ends the history
        enrolled = [e["eventDate"] for e in events if e["status"] in ("RunIn", "Randomized")]
        assert subjects[sid]["enrollmentDate"] == (enrolled[0] if enrolled else None)
        reached_enrollment += bool(enrolled)
    assert 0 < reached_enrollment < len(subjects)
    assert {s["status"] for s in subjects.values()} <= set(STATUS_NAMES)


def test_completed_visits_have_their_completed_appointment(m: DataModel) -> None:
    subjects = {s["id"]: s for s in _all(m, "subjects")}
    appts = {a["id"]: a for a in _all(m, "appointments")}
    visits = _all(m, "patient_visits")
    completed = 0
    for v in visits:
        assert v["minDueDate"] <= v["targetDueDate"] <= v["maxDueDate"]
        listed = [appts[a["id"]] for a in v["appointments"]]
        assert [a["status"] for a in v["appointments"]] == [a["status"] for a in listed]
        done = [a for a in listed if a["status"] == "Completed"]
        subj = subjects[v["subject"]["id"]]
        for a in listed:
            assert a["visit"]["id"] == v["visitId"] and a["study"]["id"] == v["study"]["id"] == subj["study"]["id"]
            assert a["patient"]["id"] == subj["patient"]["id"] and a["site"]["id"] == subj["site"]["id"]
            assert a["plannedStart"] < a["plannedEnd"]
        if v["status"] == "Completed":
            completed += 1
            assert len(done) == 1
            if v["sequence"] > 1:  # treatment visits: only while the subject was enrolled
                assert subj["enrollmentDate"] and done[0]["plannedStart"][:10] >= subj["enrollmentDate"][:10]
        else:
            assert done == []
    assert 0 < completed < len(visits)
    # the appointments that belong to no visit's list: none (every appointment hangs under its visit)
    assert {a["id"] for v in visits for a in v["appointments"]} == set(appts)


def test_elements_and_payments_follow_the_visit(m: DataModel) -> None:
    visits = {v["id"]: v for v in _all(m, "patient_visits")}
    appts = {a["id"]: a for a in _all(m, "appointments")}

    def done_at(v: dict) -> str:
        return next(appts[a["id"]]["plannedStart"] for a in v["appointments"] if a["status"] == "Completed")

    pve = m.entity("patient_visit_elements")
    parents = m.parent_of(pve, np.arange(pve.n_total))
    n_done = 0
    for p, el in zip(parents.tolist(), _all(m, "patient_visit_elements"), strict=True):
        v = visits[m.entity("patient_visits").d.id_base + p]
        if el["completedOn"]:  # (a few elements of a visit that took place stay undone)
            n_done += 1
            assert v["status"] == "Completed" and el["completedOn"] >= done_at(v)
    assert n_done > 0
    for name in ("stipends", "patient_payments"):
        rows = _all(m, name)
        assert rows
        for pay in rows:
            v = visits[pay["patientVisitId"]]
            assert v["status"] == "Completed" and v["subject"]["id"] == pay["patientStudyId"]
            assert pay["paymentOn"] > done_at(v) and pay["amount"] > 0


def test_queries_and_milestones_are_open_or_closed_consistently(m: DataModel) -> None:
    monitors = {r["id"] for r in _all(m, "monitors")}
    queries = _all(m, "monitor_queries")
    assert {q["status"]["isConsideredOpen"] for q in queries} == {True, False}
    for q in queries:
        assert q["assignedToMonitor"]["id"] in monitors
        if q["status"]["isConsideredOpen"]:
            assert q["closedOn"] is None and q["status"]["queryStatus"] in ("New", "Answered", "Reissued")
        else:
            assert q["closedOn"] > q["createdOn"] and q["status"]["queryStatus"] in ("Resolved", "Waived", "Cancelled")
            assert q["modifiedDate"] >= q["closedOn"]
    milestones = _all(m, "study_milestones")
    assert {ms["status"] for ms in milestones} >= {"Completed"}
    for ms in milestones:
        assert (ms["status"] == "Completed") == (ms["completedOn"] is not None)
        if ms["completedOn"]:
            assert ms["modifiedDate"] >= ms["completedOn"]


def test_base_data_ends_an_hour_before_the_clock(m: DataModel) -> None:
    """Every base record was created before it was last modified, and last modified at least an hour
    before the clock starts -- an incremental read's overlap window meets no base record."""
    from simulator.data import CLOCK_START_MS

    for name in m.defs:
        e = m.entity(name)
        assert (e.created <= e.modified).all(), name
        assert (e.modified <= CLOCK_START_MS - 3_600_000).all(), name
