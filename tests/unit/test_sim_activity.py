"""The realistic change model (simulator/activity.py): seeded, concentrated on active studies, and
the CC model's meanings still hold after the activity it simulates."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from simulator.activity import ACTIVE_STUDY_STATUSES, realistic
from simulator.data import CLOCK_START_MS, DataModel
from simulator.model import ENTITIES
from simulator.spec import definitions
from simulator.state import MutationError, SimState


def _state(seed: int = 42, scale: float = 0.01) -> SimState:
    return SimState(DataModel(seed, scale, definitions(), ENTITIES))


def _all(m: DataModel, name: str) -> list[dict]:
    e = m.entity(name)
    live = np.arange(e.n_total) if e.alive is None else np.nonzero(e.alive)[0]
    return m.build(e, live)


def test_same_seed_same_days_other_seed_other_days() -> None:
    a, b, c = _state(), _state(), _state(seed=7)
    ra, rb, rc = (realistic(s, days=3) for s in (a, b, c))
    assert ra == rb and ra["counts"] != rc["counts"]
    assert _all(a.model, "patient_visits") == _all(b.model, "patient_visits")
    assert ra["days"] == 3 and ra["clock"] == "2025-12-04T00:00:00.000Z" and a.clock_ms == CLOCK_START_MS + 3 * 86_400_000


def test_changes_fall_on_active_studies_and_recent_records_only() -> None:
    st = _state()
    m = st.model
    before = {n: m.entity(n).modified.copy() for n in ("studies", "subjects", "patient_visits", "appointments",
                                                       "monitor_queries", "study_milestones")}
    res = realistic(st, days=5)
    assert res["changed"] > 0
    for kind in ("patient_visits", "subjects", "subject_statuses", "appointments"):
        assert sum(res["counts"].get(kind, {}).values()) > 0, kind
    studies = {s["id"]: s["status"] for s in _all(m, "studies")}
    active = {sid for sid, status in studies.items() if status in ACTIVE_STUDY_STATUSES}
    assert set(res["studies"]) == active
    subjects = {s["id"]: s for s in _all(m, "subjects")}
    visits = {v["id"]: v for v in _all(m, "patient_visits")}
    ids = res["entities"]
    for sid in ids["subjects"]["modified"] + ids["subjects"]["inserted"]:
        assert subjects[sid]["study"]["id"] in active
    for vid in ids["patient_visits"]["modified"] + ids["patient_visits"]["inserted"]:
        v = visits[vid]
        assert v["study"]["id"] in active
        assert v["targetDueDate"] >= "2025-10-01"  # old visits stay still
    for name, old in before.items():
        e = m.entity(name)
        changed = np.nonzero(e.modified[:len(old)] != old)[0]
        assert ((e.modified[changed] >= CLOCK_START_MS) & (e.modified[changed] < st.clock_ms)).all(), name
    # closed studies and their records stay still
    e = m.entity("studies")
    assert (e.modified[:len(before["studies"])] == before["studies"]).all()  # parents untouched by default


def test_the_cc_model_still_holds_after_the_activity() -> None:
    st = _state()
    realistic(st, days=20)
    m = st.model
    subjects = {s["id"]: s for s in _all(m, "subjects")}
    history: dict[int, list[dict]] = defaultdict(list)
    for ev in _all(m, "subject_statuses"):
        history[ev["subject"]["id"]].append(ev)
    for sid, events in history.items():
        current = [e for e in events if e["isCurrentStatus"]]
        assert len(current) == 1, sid
        assert max(events, key=lambda e: e["eventDate"]) == current[0]
        assert current[0]["status"] == subjects[sid]["status"]
        enrolled = sorted(e["eventDate"] for e in events if e["status"] in ("RunIn", "Randomized"))
        assert subjects[sid]["enrollmentDate"] == (enrolled[0] if enrolled else None)
    appts = {a["id"]: a for a in _all(m, "appointments")}
    for v in _all(m, "patient_visits"):
        listed = [appts[a["id"]] for a in v["appointments"] if a["id"] in appts]
        assert [a["status"] for a in v["appointments"]] == [appts[a["id"]]["status"] for a in v["appointments"]]
        done = [a for a in listed if a["status"] == "Completed"]
        assert len(done) == (1 if v["status"] == "Completed" else 0), v["id"]
        for a in listed:
            assert a["visit"]["id"] == v["visitId"] and a["study"]["id"] == v["study"]["id"]
    for q in _all(m, "monitor_queries"):
        assert (q["closedOn"] is None) == q["status"]["isConsideredOpen"]


def test_touch_parents_moves_the_ancestors_of_what_changed() -> None:
    st = _state()
    studies = st.model.entity("studies").modified.copy()
    res = realistic(st, days=2, touch_parents=True)
    moved = np.nonzero(st.model.entity("studies").modified[:len(studies)] != studies)[0]
    assert len(moved) and set((st.model.entity("studies").d.id_base + moved).tolist()) <= set(res["studies"])


def test_fraction_runs_days_until_that_share_changed_and_arguments_are_checked() -> None:
    st = _state()
    res = realistic(st, fraction=0.005)
    assert res["share"] >= 0.005 and res["days"] >= 1
    for bad in ({"days": 0}, {"fraction": 0.9}, {"days": 1.5}):
        with pytest.raises(MutationError):
            realistic(st, **bad)  # type: ignore[arg-type]
