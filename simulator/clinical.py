"""The clinical course behind the simulated records: subject status histories, the visit schedule,
appointments, element completions, stipends, monitor queries and milestones that agree with each
other the way they do in Clinical Conductor.

Why: analytics computed from the warehouse (enrollment funnel, visit compliance, query aging,
milestone slippage) are only meaningful when the source data means what the CC model says:

* a subject's **status history** (``SubjectStatusModel``) is a path through the CC statuses --
  Prescreened -> Screened -> [RunIn] -> Randomized -> FollowUp -> Completed, leaving early as
  NonQualified, ScreenFailed, RunInFailed or Dropped -- whose last event is the current status
  (``isCurrentStatus``, and the subject's own ``status``); only subjects that reached RunIn or
  Randomized carry ``enrollmentDate`` (the date of that event);
* **patient visits** follow the subject: visit 1 is the screening visit, the later ones are due
  every study-specific interval from enrollment, each with a ±3- or ±7-day window
  (``minDueDate``/``maxDueDate``); a visit is ``Completed`` only when it took place while the
  subject was on study, and then it has a ``Completed`` **appointment** whose ``plannedStart`` is
  the visit's date (mostly inside the window, some late, a few early; 5 % of due visits are
  missed); upcoming visits of on-study subjects have a ``Pending`` appointment; the visit embeds
  previews of its appointments (``PatientVisitPreview.appointments``);
* elements of a completed visit carry ``completedOn`` on the visit's day; stipends and patient
  payments pay completed visits after they happened;
* monitor queries are open (``New``/``Answered``/``Reissued``, ``isConsideredOpen``) or closed with a
  ``closedOn`` after their ``createdOn``; milestones are completed (``completedOn`` near their
  ``projectedDate``, some late) or still pending.

Base data lies before the simulated clock's start; everything is a pure function of the seed and
the scale (numpy, vectorised, cached per model in ``DataModel.cache``). Volumes stay MISSION.md's
production numbers: the per-parent *layout* follows the course (subjects that never screened have
no visits, appointments hang under the visits they belong to), the totals do not change. Records
inserted through the admin API get plain defaults here; :mod:`simulator.activity` (the realistic
change model) sets their fields explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.data import CLOCK_START_MS, DataModel, Entity, allocate, fmt_ts, unit

DAY = 86_400_000
HOUR = 3_600_000
MINUTE = 60_000

# -- subject statuses (SubjectStatusModel.status) ---------------------------------------------------
STATUS_NAMES = ("Prescreened", "Screened", "RunIn", "Randomized", "FollowUp", "Completed",
                "NonQualified", "ScreenFailed", "RunInFailed", "Dropped")
PRE, SCR, RUNIN, RAND, FUP, COMP, NQ, SF, RIF, DROP = range(10)
CODE = {name: i for i, name in enumerate(STATUS_NAMES)}
#: the progression; a subject's history is a prefix of it (RunIn only in studies with a run-in)
LADDER = np.array([PRE, SCR, RUNIN, RAND, FUP, COMP])
#: leaving the study from a stage, and how likely the last event of a history is that exit
EXIT_OF = np.array([NQ, SF, RIF, DROP, DROP, -1, -1, -1, -1, -1])
P_EXIT = np.array([0.5, 0.35, 0.2, 0.12, 0.12, 0, 0, 0, 0, 0])
#: days before entering a status (base, span)
GAP_DAYS = np.array([[0, 0], [7, 14], [14, 14], [14, 14], [90, 180], [30, 60], [3, 27], [3, 27], [3, 27], [7, 60]])
ON_STUDY = (RUNIN, RAND, FUP)
TERMINAL = (COMP, NQ, SF, RIF, DROP)
#: the next status of a subject still in progress, and the exit from it (simulator.activity)
NEXT_OF = {PRE: SCR, SCR: RAND, RUNIN: RAND, RAND: FUP, FUP: COMP}

# -- visits, appointments ------------------------------------------------------------------------
VISIT_INTERVAL_DAYS = np.array([14, 28, 28, 42, 56])
MISSED_SHARE = 0.05
APPT_STATUS = ("none", "Completed", "Pending", "NoShow", "Cancelled")
A_NONE, A_DONE, A_PENDING, A_NOSHOW, A_CANCELLED = range(5)
#: booked ahead: on-study visits due within this many days of the clock get a Pending appointment
BOOKING_HORIZON_DAYS = 21
LAST_BASE_MS = CLOCK_START_MS - 2 * HOUR
#: base records were last modified at least an hour before the clock starts (as simulator.data does)
BASE_END = CLOCK_START_MS - HOUR


def _h(m: DataModel, e: Entity, idx: np.ndarray, salt: int) -> np.ndarray:
    return m.sub(m.hash(e, idx), salt)


def _u(m: DataModel, e: Entity, idx: np.ndarray, salt: int) -> np.ndarray:
    return unit(_h(m, e, idx, salt))


def day_floor(ms: np.ndarray) -> np.ndarray:
    return (ms // DAY) * DAY


# == per-study protocol traits ====================================================================
def study_phases(m: DataModel, study: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(has a run-in phase, has a follow-up phase) per study index."""
    hs = m.hash(m.entity("studies"), study)
    return unit(m.sub(hs, 111)) < 0.25, unit(m.sub(hs, 112)) < 0.5


def study_schedule(m: DataModel, study: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(visit interval, window half-width) in days per study index: every 14..56 days, ±3 or ±7 days."""
    hs = m.sub(m.hash(m.entity("studies"), study), 140)
    interval = VISIT_INTERVAL_DAYS[(hs % np.uint64(len(VISIT_INTERVAL_DAYS))).astype(np.int64)]
    return interval, np.where(interval <= 14, 3, 7).astype(np.int64)


def visit_outcome(m: DataModel, v: Entity, idx: np.ndarray, pos: np.ndarray,
                  window: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(missed, day offset from the target, time of day ms) of patient visits: 5 % of treatment visits
    are missed; the others take place mostly inside the window, some late, a few early; screening
    and baseline visits on their day. A pure function of the visit, so a visit that comes due later
    (simulator.activity) happens on the day its hash says."""
    hv = m.hash(v, idx)
    missed = (pos > 1) & (unit(m.sub(hv, 141)) < MISSED_SHARE)
    r, u = unit(m.sub(hv, 142)), unit(m.sub(hv, 143))
    off = np.where(r < 0.85, np.floor(u * (2 * window + 1)).astype(np.int64) - window,
                   np.where(r < 0.95, window + 1 + np.floor(u * 10).astype(np.int64),
                            -window - 1 - np.floor(u * 4).astype(np.int64)))
    off = np.where(pos <= 1, 0, off)  # screening and baseline (enrollment) visits happen on their day
    return missed, off, 8 * HOUR + (m.sub(hv, 144) % np.uint64(8 * HOUR)).astype(np.int64)


# == subjects ======================================================================================
@dataclass
class SubjectPlan:
    """Status history of every base subject, flat in the layout of the subject_statuses entity."""

    k: np.ndarray  # events per subject
    offsets: np.ndarray  # subject i's events are [offsets[i], offsets[i+1])
    codes: np.ndarray  # status code per event
    times: np.ndarray  # eventDate (epoch ms) per event
    current: np.ndarray  # status code of the last event per subject
    screened_at: np.ndarray  # first Screened-or-later event, -1 if never
    enrolled_at: np.ndarray  # first RunIn/Randomized event, -1 if never
    exit_at: np.ndarray  # the terminal event, -1 while still in progress
    last_at: np.ndarray


def subject_plan(m: DataModel, subjects: Entity | None = None) -> SubjectPlan:
    plan = m.cache.get("subjects")
    if plan is None:
        s = subjects or m.entity("subjects")
        plan = m.cache.get("subjects")  # the entity's own initialisation may have built it
        if plan is None:
            plan = _build_subject_plan(m, s)
            m.cache["subjects"] = plan
    return plan


def _status_counts(m: DataModel, s: Entity) -> np.ndarray:
    """Events per subject: at least one each (every subject has a current status); the rest of the
    production total is spread with a heavy tail, so some subjects come far down the funnel."""
    d = m.defs["subject_statuses"]
    total = m.scaled(d.count, d.min_count)
    n = s.n_base
    idx = np.arange(n, dtype=np.int64)
    w = 1.0 + 9.0 * _u(m, s, idx, 102) ** 3
    w[_u(m, s, idx, 101) < d.zero_frac] = 0.0
    if w.sum() == 0:
        w = np.ones(n)
    if total >= n:
        return 1 + allocate(total - n, w)
    return allocate(total, np.ones(n))


def _build_subject_plan(m: DataModel, s: Entity) -> SubjectPlan:
    n = s.n_base
    idx = np.arange(n, dtype=np.int64)
    k = _status_counts(m, s)
    kmax = int(k.max()) if n else 0
    study = m.parent_of(s, idx) if n else idx
    runin, fup = study_phases(m, study)
    pre = _u(m, s, idx, 103) < 0.35  # subjects entered as prescreening leads (else at screening)
    include = np.stack([pre, np.ones(n, bool), runin, np.ones(n, bool), fup, np.ones(n, bool)], axis=1)
    cum = np.cumsum(include, axis=1)
    ladder_len = cum[:, -1] if n else np.zeros(0, dtype=np.int64)
    codes = np.full((n, max(kmax, 1)), -1, dtype=np.int64)
    over = k > ladder_len
    for j in range(kmax):
        li = np.argmax(cum > j, axis=1)  # the j-th stage of the subject's own ladder
        li = np.where(over & (j >= ladder_len - 1) & (j < k - 1), 4, li)  # long histories: more follow-up
        li = np.where(over & (j == k - 1), 5, li)
        codes[:, j] = np.where(j < k, LADDER[li], -1)
    # the last event may be an exit from the stage before it
    has_prev = k >= 2
    last = np.maximum(k - 1, 0)
    prev = np.where(has_prev, codes[idx, np.maximum(k - 2, 0)], PRE)
    leaves = has_prev & (_u(m, s, idx, 104) < P_EXIT[prev]) & (EXIT_OF[prev] >= 0)
    codes[idx[leaves], last[leaves]] = EXIT_OF[prev[leaves]]
    # event times: gaps by the status entered, squeezed into the time before the clock's start
    gaps = np.zeros((n, max(kmax, 1)), dtype=np.float64)
    for j in range(1, kmax):
        c = np.maximum(codes[:, j], 0)
        u = unit(m.sub(m.hash(s, idx), 120 + j))
        gaps[:, j] = np.where(codes[:, j] >= 0, GAP_DAYS[c, 0] + GAP_DAYS[c, 1] * u, 0.0) * DAY
    off = np.cumsum(gaps, axis=1)
    start = s.created + np.minimum(9 * HOUR, np.maximum(LAST_BASE_MS - s.created, MINUTE))
    span = off[idx, last] if n else np.zeros(0)
    room = np.maximum(LAST_BASE_MS - start, 0).astype(np.float64)
    factor = np.where(span > room, room / np.maximum(span, 1.0), 1.0)
    times = (start[:, None] + (off * factor[:, None]).astype(np.int64)
             + np.arange(max(kmax, 1), dtype=np.int64)[None, :] * MINUTE)
    valid = codes >= 0
    offsets = np.concatenate(([0], np.cumsum(k))).astype(np.int64)
    flat_codes, flat_times = codes[valid], times[valid]
    current = np.where(k > 0, codes[idx, last], PRE)
    screened = valid & (codes != PRE) & (codes != NQ)
    enrolled = valid & ((codes == RUNIN) | (codes == RAND))
    terminal = valid & np.isin(codes, TERMINAL)

    def first(mask: np.ndarray) -> np.ndarray:
        any_ = mask.any(axis=1)
        j = np.argmax(mask, axis=1)
        return np.where(any_, times[idx, j], -1)

    return SubjectPlan(k=k, offsets=offsets, codes=flat_codes, times=flat_times, current=current,
                       screened_at=first(screened), enrolled_at=first(enrolled), exit_at=first(terminal),
                       last_at=np.where(k > 0, times[idx, last], s.created))


def subject_timestamps(m: DataModel, e: Entity) -> None:
    """A subject was last modified no earlier than its last status event."""
    plan = subject_plan(m, e)
    e.modified = np.maximum(e.modified, plan.last_at + MINUTE)


def subject_status_counts(m: DataModel, e: Entity) -> np.ndarray:
    return subject_plan(m).k


def subject_fields(m: DataModel, idx: np.ndarray) -> dict[str, list]:
    """``status`` and ``enrollmentDate`` of subjects (base: from the plan; inserted: a new lead)."""
    plan = subject_plan(m)
    s = m.entity("subjects")
    base = idx < s.n_base
    bi = np.where(base, idx, 0)
    status = [STATUS_NAMES[c] if b else "Prescreened" for c, b in zip(plan.current[bi].tolist(), base.tolist(),
                                                                     strict=True)]
    enrolled = np.where(base, plan.enrolled_at[bi], -1)
    dates = fmt_ts(np.maximum(enrolled, 0))
    return {"status": status, "enrollmentDate": [d if t >= 0 else None for d, t in zip(dates, enrolled.tolist(),
                                                                                       strict=True)]}


def subject_status_fields(m: DataModel, e: Entity, idx: np.ndarray, parent: np.ndarray) -> dict[str, list]:
    """status / eventDate / isCurrentStatus: the plan for base events; inserted events (uniform
    model) follow the old positional pattern and are current."""
    plan = subject_plan(m)
    base = idx < e.n_base
    bi = np.where(base, idx, 0)
    pos = m.position(e, idx, parent)
    subjects = m.entity("subjects")
    fallback = subjects.created[parent] + pos * 14 * DAY + 9 * HOUR
    times = np.where(base, plan.times[bi] if len(plan.times) else 0, fallback)
    codes = np.where(base, plan.codes[bi] if len(plan.codes) else 0, PRE)
    fallback_names = ("Prescreened", "Screened", "Randomized", "Dropped")
    names = [STATUS_NAMES[c] if b else fallback_names[min(p, 3)]
             for c, b, p in zip(codes.tolist(), base.tolist(), pos.tolist(), strict=True)]
    last = np.where(base, idx == plan.offsets[np.minimum(parent + 1, len(plan.offsets) - 1)] - 1, True)
    return {"status": names, "eventDate": fmt_ts(times), "isCurrentStatus": last.tolist()}


# == patient visits ================================================================================
@dataclass
class VisitPlan:
    subject: np.ndarray  # parent subject index per base visit
    pos: np.ndarray  # position in the subject's schedule (0 = screening visit)
    target: np.ndarray  # targetDueDate (midnight UTC, epoch ms)
    window: np.ndarray  # days either side of the target
    done: np.ndarray  # took place (status Completed, with a Completed appointment)
    on_study: np.ndarray  # expected: the subject was on study (screening for visit 1) at the target
    actual: np.ndarray  # the completed appointment's plannedStart (valid where done)
    kind: np.ndarray  # the visit's last appointment: A_DONE / A_PENDING / A_NOSHOW / A_CANCELLED / A_NONE
    n_cancel: np.ndarray  # cancelled appointments before the last one
    created: np.ndarray


def visit_plan(m: DataModel, visits: Entity | None = None) -> VisitPlan:
    plan = m.cache.get("visits")
    if plan is None:
        v = visits or m.entity("patient_visits")
        plan = m.cache.get("visits")
        if plan is None:
            plan = _build_visit_plan(m, v)
            m.cache["visits"] = plan
    return plan


def patient_visit_counts(m: DataModel, e: Entity) -> np.ndarray:
    """Visits per subject: the protocol schedule is created when a subject is screened (prescreening
    leads have none); visits of subjects that never enrolled simply never take place."""
    sp = subject_plan(m)
    s = m.entity("subjects")
    idx = np.arange(s.n_base, dtype=np.int64)
    total = m.scaled(e.d.count, e.d.min_count)
    w = np.where(sp.screened_at >= 0, 1.0 + 9.0 * _u(m, s, idx, 130) ** 3, 0.0)
    w = np.where(sp.enrolled_at >= 0, 4.0 * w, w)  # the treatment phase has most of the visits
    if w.sum() == 0:
        w = np.ones(s.n_base)
    return allocate(total, w)


def _build_visit_plan(m: DataModel, v: Entity) -> VisitPlan:
    n = v.n_base
    idx = np.arange(n, dtype=np.int64)
    s = m.entity("subjects")
    sp = subject_plan(m)
    subj = m.parent_of(v, idx) if n else idx
    assert v.offsets is not None and v.counts is not None  # patient visits are children of subjects
    pos = idx - v.offsets[subj] if n else idx
    study = m.parent_of(s, subj) if n else subj
    interval, window = study_schedule(m, study)
    # a long schedule is denser, never longer than about five years (protocols end; the calendar does too)
    k = v.counts[subj] if n else subj
    interval = np.maximum(14, np.minimum(interval, 1825 // np.maximum(k - 1, 1)))
    screened_at, enrolled_at, exit_at = sp.screened_at[subj], sp.enrolled_at[subj], sp.exit_at[subj]
    screened, enrolled = screened_at >= 0, enrolled_at >= 0
    anchor = np.where(screened, screened_at, s.created[subj] + DAY)
    target = np.where(pos == 0, anchor,
                      np.where(enrolled, enrolled_at + (pos - 1) * interval * DAY, anchor + pos * interval * DAY))
    target = day_floor(target)
    closed = target + (window + 1) * DAY <= CLOCK_START_MS
    on_study = np.where(pos == 0, screened, enrolled & ((exit_at < 0) | (target < exit_at)))
    hv = m.hash(v, idx)
    missed, off, tod = visit_outcome(m, v, idx, pos, window)
    done = on_study & closed & ~missed
    actual = target + off * DAY + tod
    actual = np.clip(actual, s.created[subj] + MINUTE, LAST_BASE_MS)
    # appointments: one Completed per visit that took place (the production total is the budget)
    budget = m.scaled(m.defs["appointments"].count, m.defs["appointments"].min_count)
    if int(done.sum()) > budget:  # tiny scales: keep the budget's worth, the rest count as missed
        order = np.argsort(m.sub(hv, 145)[done], kind="stable")
        keep = np.zeros(int(done.sum()), dtype=bool)
        keep[order[:budget]] = True
        d = np.nonzero(done)[0]
        done[d[~keep]] = False
    kind = np.where(done, A_DONE, A_NONE)
    extra = budget - int(done.sum())
    # then: booked upcoming visits, no-shows of missed ones, cancellations after a subject left
    ahead = (pos > 0) & enrolled & (exit_at < 0) & ~closed
    booked = ahead & (target <= CLOCK_START_MS + BOOKING_HORIZON_DAYS * DAY)
    noshow = on_study & closed & ~done & (unit(m.sub(hv, 146)) < 0.8)
    after_exit = (pos > 0) & enrolled & (exit_at >= 0) & (target >= exit_at) & (target < exit_at + 60 * DAY)
    # then appointments booked further ahead, the nearest visits first
    later = np.nonzero(ahead & ~booked)[0]
    later = later[np.argsort(target[later], kind="stable")]
    for cand_all, code in ((np.nonzero(booked)[0], A_PENDING), (np.nonzero(noshow)[0], A_NOSHOW),
                           (np.nonzero(after_exit)[0], A_CANCELLED), (later, A_PENDING)):
        cand = cand_all[kind[cand_all] == A_NONE][:max(extra, 0)]
        kind[cand] = code
        extra -= len(cand)
    # whatever is left: rescheduled appointments (cancelled) before visits that took place
    n_cancel = np.zeros(n, dtype=np.int64)
    if extra > 0:
        w = np.where(done, 1.0 + 3.0 * unit(m.sub(hv, 147)) ** 4, 0.0)
        if w.sum() == 0:
            w = (kind != A_NONE).astype(np.float64)
        if w.sum() == 0 and n:  # nothing took place at all (tiny scales): plain cancelled bookings
            first = np.arange(min(extra, n))
            kind[first] = A_CANCELLED
            extra -= len(first)
            w = np.ones(n)
        if extra > 0 and n:
            n_cancel = allocate(extra, w)
    created = np.minimum(s.created[subj] + MINUTE + pos, LAST_BASE_MS)
    return VisitPlan(subject=subj, pos=pos, target=target, window=window, done=done, on_study=on_study,
                     actual=actual, kind=kind, n_cancel=n_cancel, created=created)


def visit_timestamps(m: DataModel, e: Entity) -> None:
    """Created with the subject's schedule; a visit that took place was modified after its appointment."""
    vp = visit_plan(m, e)
    e.created = vp.created.copy()
    after = vp.actual + 2 * HOUR + (m.sub(m.hash(e, np.arange(e.n_base, dtype=np.int64)), 148)
                                     % np.uint64(22 * HOUR)).astype(np.int64)
    e.modified = np.where(vp.done, np.minimum(np.maximum(after, vp.created), BASE_END), vp.created)


def visit_fields(m: DataModel, e: Entity, idx: np.ndarray, parent: np.ndarray) -> dict[str, list]:
    """Schedule, status and embedded appointment previews of patient visits."""
    vp = visit_plan(m)
    base = idx < e.n_base
    bi = np.where(base, idx, 0)
    pos = m.position(e, idx, parent)
    subjects = m.entity("subjects")
    fallback = day_floor(subjects.created[parent] + (pos * 28 + 28) * DAY)
    target = np.where(base, vp.target[bi], fallback)
    window = np.where(base, vp.window[bi], 7)
    status = np.where(base & vp.done[bi], "Completed", "Pending").tolist()
    appts = appointment_previews(m, idx, base)
    return {"sequence": (pos + 1).tolist(), "targetDueDate": fmt_ts(target),
            "minDueDate": fmt_ts(target - window * DAY), "maxDueDate": fmt_ts(target + window * DAY),
            "status": status, "appointments": appts}


# == appointments ==================================================================================
@dataclass
class AppointmentPlan:
    visit: np.ndarray  # parent patient visit per base appointment
    status: np.ndarray  # index into APPT_STATUS
    start: np.ndarray  # plannedStart
    end: np.ndarray  # plannedEnd


def appointment_counts(m: DataModel, e: Entity) -> np.ndarray:
    vp = visit_plan(m)
    return vp.n_cancel + (vp.kind != A_NONE)


def appointment_plan(m: DataModel, appts: Entity | None = None) -> AppointmentPlan:
    plan = m.cache.get("appointments")
    if plan is None:
        a = appts or m.entity("appointments")
        plan = m.cache.get("appointments")
        if plan is None:
            plan = _build_appointment_plan(m, a)
            m.cache["appointments"] = plan
    return plan


def _build_appointment_plan(m: DataModel, a: Entity) -> AppointmentPlan:
    vp = visit_plan(m)
    n = a.n_base
    idx = np.arange(n, dtype=np.int64)
    v = m.parent_of(a, idx) if n else idx
    assert a.offsets is not None  # appointments are children of patient visits
    pos = idx - a.offsets[v] if n else idx
    nc = vp.n_cancel[v]
    final = pos >= nc
    status = np.where(final, vp.kind[v], A_CANCELLED)
    ha = m.hash(a, idx)
    booked_at = vp.target[v] + 9 * HOUR + (m.sub(ha, 150) % np.uint64(7 * HOUR)).astype(np.int64)
    start = np.where(final & (status == A_DONE), vp.actual[v],
                     np.where(final, booked_at, vp.actual[v] - (nc - pos) * 2 * DAY))
    dur = (1 + (m.sub(ha, 151) % np.uint64(4)).astype(np.int64)) * 30 * MINUTE
    return AppointmentPlan(visit=v, status=status, start=start, end=start + dur)


def appointment_timestamps(m: DataModel, e: Entity) -> None:
    ap = appointment_plan(m, e)
    vp = visit_plan(m)
    h = m.hash(e, np.arange(e.n_base, dtype=np.int64))
    lead = (7 + (m.sub(h, 152) % np.uint64(14)).astype(np.int64)) * DAY
    floor = vp.created[ap.visit] if e.n_base else ap.start
    created = np.clip(ap.start - lead, floor, LAST_BASE_MS - (m.sub(h, 153) % np.uint64(5 * DAY)).astype(np.int64))
    created = np.maximum(created, floor)
    after = ap.end + HOUR + (m.sub(h, 154) % np.uint64(24 * HOUR)).astype(np.int64)
    modified = np.select([ap.status == A_DONE, ap.status == A_NOSHOW, ap.status == A_CANCELLED],
                         [after, ap.end + DAY, created + (m.sub(h, 155) % np.uint64(3 * DAY)).astype(np.int64)],
                         created)
    e.created = created
    e.modified = np.clip(modified, created, BASE_END)


def appointment_fields(m: DataModel, e: Entity, idx: np.ndarray, parent: np.ndarray) -> dict[str, list]:
    ap = appointment_plan(m)
    base = idx < e.n_base
    bi = np.where(base, idx, 0)
    fallback = e.created[idx] + 7 * DAY
    start = np.where(base, ap.start[bi], fallback)
    end = np.where(base, ap.end[bi], fallback + HOUR)
    status = [APPT_STATUS[c] if b else "Pending" for c, b in zip(ap.status[bi].tolist(), base.tolist(), strict=True)]
    return {"status": status, "plannedStart": fmt_ts(start), "plannedEnd": fmt_ts(end)}


def appointment_previews(m: DataModel, vidx: np.ndarray, base: np.ndarray) -> list[list[dict]]:
    """``AppointmentPreview`` items of base visits (their base appointments, deleted ones included:
    a visit's own record changes only when the visit does); inserted visits list none."""
    a = m.entity("appointments")
    ap = appointment_plan(m)
    bv = np.where(base, vidx, 0)
    assert a.offsets is not None  # appointments are children of patient visits
    lo = np.where(base, a.offsets[bv], 0)
    n = np.where(base, a.offsets[bv + 1] - lo, 0)
    if n.sum() == 0:
        return [[] for _ in range(len(vidx))]
    rows = np.concatenate([np.arange(l0, l0 + k, dtype=np.int64) for l0, k in zip(lo.tolist(), n.tolist(), strict=True)])
    starts, ends = fmt_ts(ap.start[rows]), fmt_ts(ap.end[rows])
    items = [{"id": int(a.d.id_base + i), "status": APPT_STATUS[int(c)], "scheduledStart": s0, "scheduledEnd": e0}
             for i, c, s0, e0 in zip(rows.tolist(), ap.status[rows].tolist(), starts, ends, strict=True)]
    out: list[list[dict]] = []
    at = 0
    for k in n.tolist():
        out.append(items[at:at + k])
        at += k
    return out


# == elements, stipends, payments ==================================================================
def element_completed(m: DataModel, e: Entity, idx: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """completedOn (epoch ms) of patient-visit elements, -1 where not completed."""
    vp = visit_plan(m)
    pv = m.entity("patient_visits")
    base = (idx < e.n_base) & (parent < pv.n_base)
    bp = np.where(base, parent, 0)
    pos = m.position(e, idx, parent)
    done = base & vp.done[bp] & (unit(m.sub(m.hash(e, idx), 160)) < 0.97)
    return np.where(done, np.minimum(vp.actual[bp] + (pos + 1) * 15 * MINUTE, LAST_BASE_MS), -1)


def element_timestamps(m: DataModel, e: Entity) -> None:
    idx = np.arange(e.n_base, dtype=np.int64)
    parent = m.parent_of(e, idx) if e.n_base else idx
    vp = visit_plan(m)
    done = element_completed(m, e, idx, parent)
    e.created = vp.created[parent] if e.n_base else e.created
    e.modified = np.where(done >= 0, np.minimum(done + HOUR, BASE_END), e.created)
    e.modified = np.maximum(e.modified, e.created)


def element_fields(m: DataModel, e: Entity, idx: np.ndarray, parent: np.ndarray) -> dict[str, list]:
    done = element_completed(m, e, idx, parent)
    dates = fmt_ts(np.maximum(done, 0))
    return {"sequence": (m.position(e, idx, parent) + 1).tolist(),
            "completedOn": [d if t >= 0 else None for d, t in zip(dates, done.tolist(), strict=True)]}


def stipend_counts(m: DataModel, e: Entity) -> np.ndarray:
    """Stipends pay visits that took place."""
    vp = visit_plan(m)
    pv = m.entity("patient_visits")
    idx = np.arange(pv.n_base, dtype=np.int64)
    w = np.where(vp.done, 1.0 + 9.0 * _u(m, pv, idx, 170) ** 3, 0.0)
    w[_u(m, pv, idx, 171) < e.d.zero_frac] = 0.0
    if w.sum() == 0:
        w = vp.done.astype(np.float64) if vp.done.any() else np.ones(pv.n_base)
    return allocate(m.scaled(e.d.count, e.d.min_count), w)


def paid_visit(m: DataModel, e: Entity, idx: np.ndarray, parent: np.ndarray | None) -> np.ndarray:
    """The patient visit a payment pays: the parent (stipends) or a completed visit (patient payments)."""
    if parent is not None:
        return parent
    vp = visit_plan(m)
    done = m.cache.get("done_visits")
    if done is None:
        done = np.nonzero(vp.done)[0]
        m.cache["done_visits"] = done
    if len(done) == 0:
        return m.pick("patient_visits", m.hash(e, idx), 12)
    return done[(m.sub(m.hash(e, idx), 12) % np.uint64(len(done))).astype(np.int64)]


def payment_time(m: DataModel, e: Entity, idx: np.ndarray, visit: np.ndarray) -> np.ndarray:
    vp = visit_plan(m)
    pv = m.entity("patient_visits")
    base = visit < pv.n_base
    bv = np.where(base, visit, 0)
    delay = (1 + (m.sub(m.hash(e, idx), 172) % np.uint64(14)).astype(np.int64)) * DAY
    t = np.where(base, vp.actual[bv] + delay, e.created[np.minimum(idx, len(e.created) - 1)])
    return np.minimum(t, LAST_BASE_MS)


def payment_timestamps(m: DataModel, e: Entity) -> None:
    idx = np.arange(e.n_base, dtype=np.int64)
    parent = m.parent_of(e, idx) if e.parent is not None and e.n_base else None
    t = payment_time(m, e, idx, paid_visit(m, e, idx, parent))
    e.created = t.copy()
    e.modified = t.copy()


def payment_fields(m: DataModel, e: Entity, idx: np.ndarray, parent: np.ndarray | None) -> dict[str, list]:
    pv = m.entity("patient_visits")
    visit = paid_visit(m, e, idx, parent)
    subj = m.parent_of(pv, visit)
    sp = subject_plan(m)
    s = m.entity("subjects")
    base_s = subj < s.n_base
    status = [STATUS_NAMES[c] if b else "Prescreened"
              for c, b in zip(sp.current[np.where(base_s, subj, 0)].tolist(), base_s.tolist(), strict=True)]
    h = m.hash(e, idx)
    amount = (5 * (5 + (m.sub(h, 173) % np.uint64(26)).astype(np.int64))).astype(np.float64)
    kinds = ("Visit", "Visit", "Visit", "Travel", "Caregiver") if parent is not None else \
        ("Visit", "Travel", "Manual", "Caregiver")
    kind = [kinds[i] for i in (m.sub(h, 174) % np.uint64(len(kinds))).astype(np.int64).tolist()]
    paid = payment_time(m, e, idx, visit)
    return {"patientVisitId": (pv.d.id_base + visit).tolist(), "patientStudyId": (s.d.id_base + subj).tolist(),
            "patientStudyStatus": status, "amount": amount.tolist(), "stipendType": kind,
            "paymentOn": fmt_ts(paid)}


# == monitor queries ===============================================================================
QUERY_OPEN = ("New", "Answered", "Reissued")
QUERY_CLOSED = ("Resolved", "Waived", "Cancelled")


def query_state(m: DataModel, e: Entity, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is open, closedOn ms or -1): recent queries are mostly open, a few old ones are still open."""
    created = e.created[idx]
    age = CLOCK_START_MS - created
    h = m.hash(e, idx)
    p_open = np.where(age < 120 * DAY, 0.6, 0.08)
    is_open = (unit(m.sub(h, 180)) < p_open) | (idx >= e.n_base)
    closed_at = np.minimum(created + (1 + np.floor(unit(m.sub(h, 181)) * 60).astype(np.int64)) * DAY + 3 * HOUR,
                           LAST_BASE_MS)
    closed_at = np.maximum(closed_at, created + MINUTE)
    return is_open, np.where(is_open, -1, closed_at)


def query_timestamps(m: DataModel, e: Entity) -> None:
    _, closed = query_state(m, e, np.arange(e.n_base, dtype=np.int64))
    e.modified = np.minimum(np.maximum(e.modified, closed), BASE_END)


def query_status(open_: bool, h: int) -> dict:
    names = QUERY_OPEN if open_ else QUERY_CLOSED
    name = names[h % len(names)]
    return {"queryStatus": name, "displayName": name, "sortOrder": (QUERY_OPEN + QUERY_CLOSED).index(name) + 1,
            "isConsideredOpen": open_, "canSetByPortalUser": False}


def query_fields(m: DataModel, e: Entity, idx: np.ndarray, parent: np.ndarray) -> dict[str, list]:
    is_open, closed = query_state(m, e, idx)
    hs = (m.sub(m.hash(e, idx), 182) % np.uint64(1000)).tolist()
    dates = fmt_ts(np.maximum(closed, 0))
    h = m.hash(e, idx)
    return {"status": [query_status(o, x) for o, x in zip(is_open.tolist(), hs, strict=True)],
            "closedOn": [d if t >= 0 else None for d, t in zip(dates, closed.tolist(), strict=True)],
            "assignedToMonitor": m.previews("monitors", m.pick("monitors", h, 183), "MonitorPreviewModel"),
            "requestedByStaff": m.previews("staff", m.pick("staff", h, 184), "StaffPreviewModel")}


# == study milestones ==============================================================================
def milestone_state(m: DataModel, e: Entity, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(projectedDate ms, completedOn ms or -1). Due milestones are mostly done, some late."""
    created = e.created[idx]
    h = m.hash(e, idx)
    projected = day_floor(created + (30 + np.floor(unit(m.sub(h, 190)) * 690).astype(np.int64)) * DAY)
    r, u = unit(m.sub(h, 191)), unit(m.sub(h, 192))
    slip = np.where(r < 0.6, np.floor(u * 16).astype(np.int64) - 10,
                    np.where(r < 0.9, 6 + np.floor(u * 55).astype(np.int64), 61 + np.floor(u * 120).astype(np.int64)))
    done_at = projected + slip * DAY + 10 * HOUR
    done = (idx < e.n_base) & (unit(m.sub(h, 193)) < 0.9) & (done_at <= LAST_BASE_MS)
    return projected, np.where(done, np.maximum(done_at, created + MINUTE), -1)


def milestone_timestamps(m: DataModel, e: Entity) -> None:
    _, done = milestone_state(m, e, np.arange(e.n_base, dtype=np.int64))
    e.modified = np.minimum(np.maximum(e.modified, done), BASE_END)


def milestone_fields(m: DataModel, e: Entity, idx: np.ndarray, parent: np.ndarray) -> dict[str, list]:
    projected, done = milestone_state(m, e, idx)
    status = np.where(done >= 0, "Completed",
                      np.where(projected - 60 * DAY > np.maximum(e.created[idx], CLOCK_START_MS),
                               "Not Started", "In Progress")).tolist()
    dates = fmt_ts(np.maximum(done, 0))
    return {"name": [f"Milestone {i}" for i in (e.d.id_base + idx).tolist()], "projectedDate": fmt_ts(projected),
            "assignedOn": fmt_ts(e.created[idx]), "status": status,
            "completedOn": [d if t >= 0 else None for d, t in zip(dates, done.tolist(), strict=True)]}


__all__ = ["CODE", "DAY", "STATUS_NAMES", "SubjectPlan", "VisitPlan", "subject_plan", "visit_plan"]

