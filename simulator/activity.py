"""The realistic change model: days of activity at a site network, where a real one changes.

The uniform model (``POST /_sim/mutate`` with an entity and ``modify``/``insert``/``delete``
fractions) changes records anywhere -- a closed study from 2019 as likely as today's visit. At a
real site activity concentrates: it happens in **active studies** (status Active or Enrolling) and
to their subjects, visits, appointments, elements, payments, queries and milestones, while closed
studies and old visits stay still. This module simulates that, day by day, following the CC model
of simulator/clinical.py:

* **visits come due**: an on-study subject's pending visit takes place on the day its hash says
  (mostly inside its window, some late or early, 5 % missed): the visit turns ``Completed``, its
  ``Pending`` appointment turns ``Completed`` (or a completed one is added), its elements get
  ``completedOn``, often a stipend is paid, sometimes a patient payment; a missed visit's booked
  appointment becomes ``NoShow`` when its window closes;
* **appointments are booked** two weeks ahead for upcoming visits (the visit lists them);
* **statuses change** along the CC path (Prescreened -> Screened -> [RunIn] -> Randomized ->
  [FollowUp] -> Completed, or an exit): a new ``SubjectStatusModel`` event becomes current, the
  previous one stops being current, the subject's ``status`` follows (``enrollmentDate`` when it
  enrolls); an enrolling subject gets its baseline visit (completed that day) and, if it has none
  ahead, its next visits -- **new visits**; a subject who leaves has its booked appointments cancelled;
* **a few new subjects** per active study (a screened one with its screening visit, sometimes a new
  patient record);
* monitor **queries** are opened and closed, due **milestones** completed, now and then a study
  role is **reassigned** to other staff.

Every change is stamped inside its day; the clock ends ``days`` days later. Deterministic: call
number ``seq`` draws from a generator seeded by (seed, "realistic", seq), so the same seed and the
same sequence of admin calls give the same data (a restarted simulator replays them). With
``fraction`` the model simulates as many days as it takes to change that share of all live records.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulator import clinical as c
from simulator.clinical import DAY, HOUR, MINUTE
from simulator.data import Entity, fmt_ts, key_of
from simulator.state import MutationError, SimState

ACTIVE_STUDY_STATUSES = ("Active", "Enrolling")
#: per subject and day: (chance of a status change, chance that the change is the exit)
HAZARD = {c.PRE: (1 / 10, 0.4), c.SCR: (1 / 14, 0.3), c.RUNIN: (1 / 14, 0.2), c.RAND: (1 / 120, 0.15),
          c.FUP: (1 / 90, 0.1)}
#: per active study and day, for studies with subjects / still without any
NEW_SUBJECT_PER_STUDY_DAY = (0.03, 0.004)
NEW_QUERY_PER_STUDY_DAY = (0.03, 0.003)
#: a lead (Prescreened/Screened) whose last change is older than this stays where it is
STALE_LEAD_DAYS = 365
CLOSE_QUERY_PER_DAY = 1 / 20
MILESTONE_DONE_PER_DAY = 0.15
REASSIGN_PER_STUDY_DAY = 0.003
STIPEND_SHARE, PAYMENT_SHARE = 0.4, 0.1
BOOK_AHEAD_DAYS = 14
MAX_DAYS_FOR_FRACTION = 730


def _ts(ms: int) -> str:
    return fmt_ts(np.array([ms], dtype=np.int64))[0]


@dataclass
class _Visit:
    idx: int
    subject: int
    pos: int
    target: int  # ms, midnight
    window: int  # days
    done: bool
    happen_at: int  # ms the visit takes place, -1 when it will be missed
    appts: list[int] = field(default_factory=list)  # live appointment indices, in order


@dataclass
class _Subject:
    idx: int
    study: int
    code: int
    enrolled: bool
    changed_at: int  # ms of the subject's last change
    current_event: int | None = None  # the status event that is current (found lazily)
    visits: list[int] = field(default_factory=list)


class _Site:
    """The live state the day loop needs, read from the overlay once, then kept up to date."""

    def __init__(self, state: SimState, rng: np.random.Generator):
        self.state = state
        self.m = state.model
        self.rng = rng
        self.modified: dict[str, set[int]] = defaultdict(set)
        self.inserted: dict[str, list[int]] = defaultdict(list)
        self.today_changed: dict[str, set[int]] = defaultdict(set)
        m = self.m
        self.E = {n: m.entity(n) for n in ("studies", "subjects", "subject_statuses", "patient_visits",
                                           "appointments", "patient_visit_elements", "stipends", "patient_payments",
                                           "patients", "monitor_queries", "study_milestones", "study_personnel",
                                           "staff")}
        studies = self.E["studies"]
        live = self._live(studies)
        recs = m.build(studies, live, refs=False)
        self.studies = [int(i) for i, r in zip(live.tolist(), recs, strict=True)
                        if r.get("status") in ACTIVE_STUDY_STATUSES]
        self.subjects: dict[int, _Subject] = {}
        self.enrolling: set[int] = set()
        self.visits: dict[int, _Visit] = {}
        self.appt_status: dict[int, str] = {}
        subj_e = self.E["subjects"]
        sidx = np.array([s for st in self.studies for s in self._children(subj_e, st)], dtype=np.int64)
        if len(sidx):
            for i, r in zip(sidx.tolist(), m.build(subj_e, sidx, refs=False), strict=True):
                st = int(m.parent_of(subj_e, np.array([i]))[0])
                code = c.CODE.get(r.get("status"), c.PRE)
                self.subjects[i] = _Subject(i, st, code, bool(r.get("enrollmentDate")), _ms(r["modifiedDate"]))
            self._load_visits(list(self.subjects))
        self.enrolling = {s.study for s in self.subjects.values()}  # active studies with subjects
        self.queries: dict[int, bool] = {}  # query idx -> open
        self.milestones: dict[int, int] = {}  # pending milestone idx -> projected ms
        q_e, ms_e = self.E["monitor_queries"], self.E["study_milestones"]
        qidx = np.array([q for st in self.studies for q in self._children(q_e, st)], dtype=np.int64)
        for i, r in zip(qidx.tolist(), m.build(q_e, qidx), strict=True):
            if (r.get("status") or {}).get("isConsideredOpen"):
                self.queries[i] = True
        midx = np.array([x for st in self.studies for x in self._children(ms_e, st)], dtype=np.int64)
        for i, r in zip(midx.tolist(), m.build(ms_e, midx, refs=False), strict=True):
            if r.get("status") != "Completed" and r.get("projectedDate"):
                self.milestones[i] = _ms(r["projectedDate"])

    # -- reading the overlay ------------------------------------------------------------------
    def _live(self, e: Entity) -> np.ndarray:
        return self.state._live(e)

    def _children(self, e: Entity, parent: int) -> list[int]:
        lo = hi = 0
        if e.counts is not None and e.offsets is not None and parent < len(e.counts):
            lo, hi = int(e.offsets[parent]), int(e.offsets[parent + 1])
        out = list(range(lo, hi)) + list(e.ins_by_parent.get(parent, ()))
        return [i for i in out if e.is_alive(i)]

    def _load_visits(self, subjects: list[int]) -> None:
        m, pv = self.m, self.E["patient_visits"]
        vidx = np.array([v for s in subjects for v in self._children(pv, s)], dtype=np.int64)
        if not len(vidx):
            return
        recs = m.build(pv, vidx, refs=False)
        subj = m.parent_of(pv, vidx)
        pos = m.position(pv, vidx, subj)
        study = m.parent_of(self.E["subjects"], subj)
        _, window = c.study_schedule(m, study)
        targets = np.array([_ms(r["targetDueDate"]) for r in recs], dtype=np.int64)
        missed, off, tod = c.visit_outcome(m, pv, vidx, pos, window)
        happen = np.where(missed, -1, targets + off * DAY + tod)
        appt_e = self.E["appointments"]
        for k, (i, r) in enumerate(zip(vidx.tolist(), recs, strict=True)):
            v = _Visit(i, int(subj[k]), int(pos[k]), int(targets[k]), int(window[k]), r.get("status") == "Completed",
                       int(happen[k]), self._children(appt_e, i))
            self.visits[i] = v
            self.subjects[v.subject].visits.append(i)
        aidx = np.array([a for v in vidx.tolist() for a in self.visits[v].appts], dtype=np.int64)
        for a, r in zip(aidx.tolist(), self.m.build(appt_e, aidx, refs=False), strict=True):
            self.appt_status[a] = r["status"]

    # -- writing ----------------------------------------------------------------------------------
    def _set(self, name: str, idx: int, values: dict[str, Any], t: int) -> None:
        self.state.set_fields(self.E[name], idx, values, t)
        self.modified[name].add(idx)  # (a record inserted by this call counts as inserted only)
        self.today_changed[name].add(idx)

    def _insert(self, name: str, parent: int | None, t: int, values: dict[str, Any]) -> int:
        e = self.E[name]
        parents = None if parent is None else np.array([parent], dtype=np.int64)
        i = int(self.state.insert_at(e, parents, np.array([t], dtype=np.int64))[0])
        if values:
            e.overrides.setdefault(i, {}).update(values)
        self.inserted[name].append(i)
        self.today_changed[name].add(i)
        return i

    def _t(self, day: int) -> int:
        """A moment of the working day (07:00-19:00 UTC)."""
        return day + int(self.rng.integers(7 * HOUR, 19 * HOUR))

    # -- the day ----------------------------------------------------------------------------------
    def run_day(self, day: int, first: bool) -> None:
        self.today_changed = defaultdict(set)
        self._statuses(day)
        self._visits_due(day, first)
        self._bookings(day, first)
        self._new_subjects(day)
        self._queries(day)
        self._milestones(day)
        self._reassign(day)

    def _statuses(self, day: int) -> None:
        for s in list(self.subjects.values()):
            hz = HAZARD.get(s.code)
            if hz is None or (s.code in (c.PRE, c.SCR) and s.changed_at < day - STALE_LEAD_DAYS * DAY):
                continue
            if self.rng.random() >= hz[0]:
                continue
            runin, fup = c.study_phases(self.m, np.array([s.study]))
            if self.rng.random() < hz[1]:
                new = int(c.EXIT_OF[s.code])
            elif s.code == c.SCR:
                new = c.RUNIN if runin[0] else c.RAND
            elif s.code == c.RAND:
                new = c.FUP if fup[0] else c.COMP
            else:
                new = c.NEXT_OF[s.code]
            self._change_status(s, new, self._t(day))

    def _current_event(self, s: _Subject) -> int | None:
        if s.current_event is None:
            ev = self.E["subject_statuses"]
            kids = self._children(ev, s.idx)
            if kids:
                recs = self.m.build(ev, np.array(kids, dtype=np.int64), refs=False)
                cur = [i for i, r in zip(kids, recs, strict=True) if r.get("isCurrentStatus")]
                s.current_event = cur[-1] if cur else None
        return s.current_event

    def _change_status(self, s: _Subject, new: int, t: int) -> None:
        name = c.STATUS_NAMES[new]
        prev = self._current_event(s)
        if prev is not None:
            self._set("subject_statuses", prev, {"isCurrentStatus": False}, t)
        s.current_event = self._insert("subject_statuses", s.idx, t,
                                       {"status": name, "eventDate": _ts(t), "isCurrentStatus": True})
        values: dict[str, Any] = {"status": name}
        enrolls = new in (c.RUNIN, c.RAND) and not s.enrolled
        if enrolls:
            values["enrollmentDate"] = _ts(t)
            s.enrolled = True
        self._set("subjects", s.idx, values, t)
        s.code, s.changed_at = new, t
        if enrolls:
            self._enroll_visits(s, t)
        if new in c.TERMINAL:
            for vi in s.visits:
                v = self.visits[vi]
                pending = [a for a in v.appts if self.appt_status.get(a) == "Pending"]
                for a in pending:
                    self._set("appointments", a, {"status": "Cancelled"}, t)
                    self.appt_status[a] = "Cancelled"
                if pending:
                    self._set("patient_visits", vi, {"appointments": self._previews(v)}, t)

    def _enroll_visits(self, s: _Subject, t: int) -> None:
        """Baseline visit on the enrollment day; the next visits if the schedule has none ahead."""
        interval, window = c.study_schedule(self.m, np.array([s.study]))
        day = (t // DAY) * DAY
        base = self._new_visit(s, day, int(window[0]), t)
        self._complete(self.visits[base], t)
        if not any(self.visits[v].target > day and not self.visits[v].done for v in s.visits if v != base):
            for k in (1, 2, 3):
                self._new_visit(s, day + k * int(interval[0]) * DAY, int(window[0]), t)

    def _new_visit(self, s: _Subject, target: int, window: int, t: int) -> int:
        i = self._insert("patient_visits", s.idx, t, {
            "targetDueDate": _ts(target), "minDueDate": _ts(target - window * DAY),
            "maxDueDate": _ts(target + window * DAY), "status": "Pending", "appointments": []})
        pv = self.E["patient_visits"]
        pos = int(self.m.position(pv, np.array([i]), np.array([s.idx]))[0])
        missed, off, tod = c.visit_outcome(self.m, pv, np.array([i]), np.array([pos]), np.array([window]))
        happen = -1 if missed[0] else target + int(off[0]) * DAY + int(tod[0])
        self.visits[i] = _Visit(i, s.idx, pos, target, window, False, happen)
        s.visits.append(i)
        return i

    def _previews(self, v: _Visit) -> list[dict[str, Any]]:
        if not v.appts:
            return []
        recs = self.m.build(self.E["appointments"], np.array(v.appts, dtype=np.int64), refs=False)
        return [{"id": r["id"], "status": r["status"], "scheduledStart": r["plannedStart"],
                 "scheduledEnd": r["plannedEnd"]} for r in recs]

    def _complete(self, v: _Visit, t: int) -> None:
        dur = int(self.rng.integers(1, 5)) * 30 * MINUTE
        fields = {"status": "Completed", "plannedStart": _ts(t), "plannedEnd": _ts(t + dur)}
        pending = [a for a in v.appts if self.appt_status.get(a) == "Pending"]
        if pending:
            a = pending[0]
            self._set("appointments", a, fields, t + dur)
        else:
            a = self._insert("appointments", v.idx, t + dur, fields)
            v.appts.append(a)
        self.appt_status[a] = "Completed"
        v.done = True
        self._set("patient_visits", v.idx, {"status": "Completed", "appointments": self._previews(v)}, t + dur + HOUR)
        el = self.E["patient_visit_elements"]
        kids = self._children(el, v.idx)
        if not kids:  # a new visit: its procedures are recorded as they are done
            kids = [self._insert("patient_visit_elements", v.idx, t + dur, {}) for _ in range(int(self.rng.integers(1, 4)))]
        for k, i in enumerate(kids):
            if self.rng.random() < 0.97:
                self._set("patient_visit_elements", i, {"completedOn": _ts(t + (k + 1) * 15 * MINUTE)}, t + dur)
        subj_e, pv = self.E["subjects"], self.E["patient_visits"]
        s = self.subjects[v.subject]
        pay = {"patientVisitId": int(pv.d.id_base + v.idx), "patientStudyId": int(subj_e.d.id_base + s.idx),
               "patientStudyStatus": c.STATUS_NAMES[s.code], "paymentOn": _ts(t + dur + HOUR)}
        if self.rng.random() < STIPEND_SHARE:
            self._insert("stipends", v.idx, t + dur + HOUR, {**pay, "stipendType": "Visit",
                                                              "amount": float(5 * int(self.rng.integers(5, 31)))})
        if self.rng.random() < PAYMENT_SHARE:
            self._insert("patient_payments", None, t + dur + HOUR, {**pay, "stipendType": "Travel",
                                                                     "amount": float(5 * int(self.rng.integers(3, 13)))})

    def _visits_due(self, day: int, first: bool) -> None:
        end = day + DAY
        for v in list(self.visits.values()):
            s = self.subjects[v.subject]
            if v.done or s.code not in c.ON_STUDY or v.pos == 0:
                continue
            closes = v.target + (v.window + 1) * DAY
            if v.happen_at >= 0 and (day <= v.happen_at < end or (first and v.happen_at < day and closes > day)):
                self._complete(v, max(v.happen_at, day + 7 * HOUR) if v.happen_at < day else v.happen_at)
            elif v.happen_at < 0 and day <= closes < end:
                booked = [a for a in v.appts if self.appt_status.get(a) == "Pending"]
                for a in booked:
                    self._set("appointments", a, {"status": "NoShow"}, self._t(day))
                    self.appt_status[a] = "NoShow"
                if booked:
                    self._set("patient_visits", v.idx, {"appointments": self._previews(v)}, self._t(day))

    def _bookings(self, day: int, first: bool) -> None:
        lo = day + (0 if first else (BOOK_AHEAD_DAYS - 1) * DAY)
        hi = day + BOOK_AHEAD_DAYS * DAY
        for v in list(self.visits.values()):
            s = self.subjects[v.subject]
            if v.done or s.code not in c.ON_STUDY or not lo <= v.target < hi:
                continue
            if any(self.appt_status.get(a) in ("Pending", "Completed") for a in v.appts):
                continue
            t = self._t(day)
            start = v.target + 9 * HOUR + int(self.rng.integers(0, 7)) * HOUR
            a = self._insert("appointments", v.idx, t, {"status": "Pending", "plannedStart": _ts(start),
                                                        "plannedEnd": _ts(start + HOUR)})
            v.appts.append(a)
            self.appt_status[a] = "Pending"
            self._set("patient_visits", v.idx, {"appointments": self._previews(v)}, t)

    def _new_subjects(self, day: int) -> None:
        for st in self.studies:
            if self.rng.random() >= NEW_SUBJECT_PER_STUDY_DAY[0 if st in self.enrolling else 1]:
                continue
            if self.m.child_count("study_visits", np.array([st]))[0] == 0:  # no protocol schedule yet
                continue
            t = self._t(day)
            code = c.SCR if self.rng.random() < 0.65 else c.PRE
            values: dict[str, Any] = {"status": c.STATUS_NAMES[code], "enrollmentDate": None}
            if self.rng.random() < 0.5:  # a patient new to the site
                p = self._insert("patients", None, t - HOUR, {"status": "Active"})
                values["patient"] = self.m.previews("patients", np.array([p]), "PatientDemographicsViewModel")[0]
            i = self._insert("subjects", st, t, values)
            s = _Subject(i, st, code, False, t)
            self.enrolling.add(st)
            self.subjects[i] = s
            s.current_event = self._insert("subject_statuses", i, t, {"status": c.STATUS_NAMES[code],
                                                                        "eventDate": _ts(t), "isCurrentStatus": True})
            if code == c.SCR:  # the screening visit, done today
                _, window = c.study_schedule(self.m, np.array([st]))
                v = self._new_visit(s, (t // DAY) * DAY, int(window[0]), t)
                self._complete(self.visits[v], t)

    def _queries(self, day: int) -> None:
        for q in [q for q, is_open in self.queries.items() if is_open]:
            if self.rng.random() < CLOSE_QUERY_PER_DAY:
                t = self._t(day)
                self._set("monitor_queries", q, {"status": c.query_status(False, int(self.rng.integers(0, 3))),
                                                 "closedOn": _ts(t)}, t)
                self.queries[q] = False
        for st in self.studies:
            if self.rng.random() < NEW_QUERY_PER_STUDY_DAY[0 if st in self.enrolling else 1]:
                q = self._insert("monitor_queries", st, self._t(day), {"status": c.query_status(True, 0),
                                                                      "closedOn": None})
                self.queries[q] = True

    def _milestones(self, day: int) -> None:
        for ms, projected in list(self.milestones.items()):
            if projected <= day + DAY and self.rng.random() < MILESTONE_DONE_PER_DAY:
                t = self._t(day)
                self._set("study_milestones", ms, {"status": "Completed", "completedOn": _ts(t)}, t)
                del self.milestones[ms]

    def _reassign(self, day: int) -> None:
        pe, staff = self.E["study_personnel"], self.E["staff"]
        for st in self.studies:
            if self.rng.random() >= REASSIGN_PER_STUDY_DAY:
                continue
            roles = self._children(pe, st)
            live_staff = self._live(staff)
            if not roles or not len(live_staff):
                continue
            r = roles[int(self.rng.integers(0, len(roles)))]
            who = self.m.build(staff, np.array([live_staff[int(self.rng.integers(0, len(live_staff)))]]),
                               refs=False)[0]
            item = {"Id": who["id"], "UID": who.get("uid"), "LastName": who.get("lastName"),
                    "FirstName": who.get("firstName"), "MiddleName": "", "FullName": who.get("displayName"),
                    "Priority": 1, "Username": who.get("login")}
            self._set("study_personnel", r, {"Staff": [item]}, self._t(day))

    # -- bookkeeping ------------------------------------------------------------------------------
    def touch_today(self, stamp: int) -> None:
        for name, idx in self.today_changed.items():
            e = self.E[name]
            if e.parent is not None and idx:
                self.state.touch_ancestors(e, np.array(sorted(idx), dtype=np.int64), stamp)

    @property
    def changed(self) -> int:
        return sum(len(v) for v in self.modified.values()) + sum(len(v) for v in self.inserted.values())

    def summary(self) -> dict[str, Any]:
        counts, entities = {}, {}
        for name in sorted(set(self.modified) | set(self.inserted)):
            ins = self.inserted.get(name, [])
            mod = sorted(self.modified.get(name, set()) - set(ins))
            counts[name] = {"modified": len(mod), "inserted": len(ins), "deleted": 0}
            e = self.E[name]
            if e.d.id_field:
                entities[name] = {"modified": [int(e.d.id_base + i) for i in mod],
                                  "inserted": [int(e.d.id_base + i) for i in ins]}
        return {"counts": counts, "entities": entities,
                "studies": [int(self.E["studies"].d.id_base + s) for s in self.studies]}


def _ms(iso: str) -> int:
    return int(np.datetime64(iso.rstrip("Z"), "ms").astype(np.int64))


def simulate(state: SimState, *, seq: int, days: int | None, fraction: float | None,
             touch_parents: bool) -> dict[str, Any]:
    """Run the realistic model from the current clock; return what changed (see module docstring)."""
    m = state.model
    rng = np.random.default_rng(key_of(m.seed, "realistic", seq))
    t0 = state.clock_ms
    live_total = sum(m.entity(n).n_live for n in m.defs)
    target = fraction * live_total if fraction else None
    max_days = days or (MAX_DAYS_FOR_FRACTION if fraction else 1)
    site = _Site(state, rng)
    n = 0
    while n < max_days:
        day = t0 + n * DAY
        site.run_day(day, first=n == 0)
        n += 1
        if touch_parents:
            site.touch_today(day + DAY - 1)
        if target is not None and site.changed >= target:
            break
    state.clock_ms = t0 + n * DAY
    out = site.summary()
    changed = site.changed
    return {"model": "realistic", "seq": seq, "clock": state.clock_iso, "days": n, "changed": changed,
            "live": int(live_total), "share": round(changed / live_total, 6) if live_total else 0.0,
            "touch_parents": touch_parents, **out}


def realistic(state: SimState, *, days: int | None = None, fraction: float | None = None,
              touch_parents: bool = False) -> dict[str, Any]:
    """Days of site activity concentrated on active studies, applied to ``state`` (logged there)."""
    if days is not None and (not isinstance(days, int) or days < 1 or days > 3650):
        raise MutationError("days must be a whole number of days, 1..3650")
    if fraction is not None and not 0.0 < float(fraction) <= 0.5:
        raise MutationError(f"fraction is a share of the live records: 0 < fraction <= 0.5, got {fraction}")
    state.seq += 1
    out = simulate(state, seq=state.seq, days=days, fraction=fraction, touch_parents=touch_parents)
    state.log.append({"op": "realistic", "seq": state.seq, "days": out["days"], "changed": out["changed"]})
    return out
