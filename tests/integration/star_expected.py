"""An independent recompute of the star's new tables and Gold views from Bronze, in Python.

Why a second implementation: the SQL procedures are incremental, set-based and full of watermarks;
this is the definitions of docs/transform.md written the plain way (read every live Bronze row,
compute, aggregate), so a test can compare the two on simulator data after a full load, after a
change and after a replay. It shares nothing with the SQL (patients are compared by source id: the
pseudonym is one-to-one with it).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import psycopg

INSTANCE = "cc1"
STAGE = {"Prescreened": 1, "NonQualified": 1, "Screened": 2, "ScreenFailed": 2, "RunIn": 3, "RunInFailed": 3,
         "Dropped": 3, "Randomized": 4, "FollowUp": 4, "Completed": 5}
TERMINAL = ("Completed", "NonQualified", "ScreenFailed", "RunInFailed", "Dropped")
ON_STUDY = ("RunIn", "Randomized", "FollowUp")


def ref(v: Any) -> str | None:
    return None if v in (None, "") else f"{INSTANCE}:{v}"


def ts(v: str | None) -> datetime | None:
    return datetime.fromisoformat(v.replace("Z", "+00:00")) if v else None


def day(v: str | None) -> date | None:
    t = ts(v)
    return t.date() if t else None


def live(conn: psycopg.Connection, *tables: str) -> dict[str, tuple[dict, dict | None]]:
    """source_id -> (data, source_params) of the live rows; with several tables the most recently
    loaded row per source_id wins (a tombstone on a tie)."""
    best: dict[str, tuple[datetime, bool, dict, dict | None]] = {}
    for t in tables:
        for sid, data, params, deleted, updated in conn.execute(
                f"SELECT source_id, data, source_params, is_deleted, updated_at FROM bronze.{t}"):  # noqa: S608
            cur = best.get(sid)
            if cur is None or (updated, deleted) > (cur[0], cur[1]):
                best[sid] = (updated, deleted, data, params)
    return {sid: (v[2], v[3]) for sid, v in best.items() if not v[1]}


class Star:
    """The expected content of the new Silver tables and the Gold views, from Bronze."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        self.as_of: date = conn.execute("SELECT gold.as_of_date()").fetchone()[0]  # type: ignore[index]
        self.subjects = live(conn, "dim_subjects_staging")
        self.enrollment = self._enrollment()
        self.visits = self._visits()
        self.appointments = self._appointments()
        self.queries = self._queries()
        self.milestones = self._milestones()
        self.payments = self._payments()
        self.rooms = live(conn, "dim_rooms_staging")

    # -- Silver ---------------------------------------------------------------------------------------
    def _enrollment(self) -> dict[str, dict[str, Any]]:
        events: dict[str, list[dict]] = defaultdict(list)
        for d, _ in live(self.conn, "dim_subject_statuses_staging").values():
            events[ref(d["subject"].get("id", d["subject"].get("Id")))].append(d)  # type: ignore[index]
        out = {}
        for sid, (d, p) in self.subjects.items():
            ev = sorted(events.get(sid, []), key=lambda e: e["eventDate"])
            stage = max([STAGE.get(e["status"], 0) for e in ev] + [STAGE.get(d.get("status"), 0)])
            cur = [e for e in ev if e.get("isCurrentStatus")]
            current = (cur[-1] if cur else ev[-1])["status"] if ev else d.get("status")

            def first(pred, ev=ev):
                dates = [day(e["eventDate"]) for e in ev if pred(e)]
                return min(dates) if dates else None

            enrollment = first(lambda e: STAGE.get(e["status"], 0) >= 3) or day(d.get("enrollmentDate"))
            exits = [e for e in ev if e["status"] in TERMINAL]
            out[sid] = {
                "study": ref((d.get("study") or {}).get("id") or (p or {}).get("studyId")),
                "site": ref((d.get("site") or {}).get("id")),
                "current_status": current, "funnel_stage": stage,
                "screening_date": first(lambda e: STAGE.get(e["status"], 0) >= 2),
                "enrollment_date": enrollment if stage >= 3 else None,
                "randomization_date": first(lambda e: STAGE.get(e["status"], 0) >= 4 and e["status"] != "Dropped"),
                "exit_date": day(exits[0]["eventDate"]) if exits else None,
                "is_screened": stage >= 2, "is_enrolled": stage >= 3, "is_randomized": stage >= 4,
                "is_completed": stage >= 5, "is_active": current in ON_STUDY,
                "is_screen_failed": any(e["status"] == "ScreenFailed" for e in ev) or current == "ScreenFailed",
                "is_dropped": any(e["status"] == "Dropped" for e in ev) or current == "Dropped",
                "is_non_qualified": any(e["status"] == "NonQualified" for e in ev) or current == "NonQualified",
                "is_run_in_failed": any(e["status"] == "RunInFailed" for e in ev) or current == "RunInFailed",
            }
        return out

    def _visits(self) -> dict[str, dict[str, Any]]:
        appts = live(self.conn, "dim_appointments_staging")
        all_appts = {sid for (sid,) in self.conn.execute("SELECT source_id FROM bronze.dim_appointments_staging")}
        out = {}
        for sid, (d, p) in live(self.conn, "dim_patient_visits_staging").items():
            done = []
            listed = []
            for a in d.get("appointments") or []:
                aid = ref(a.get("id"))
                listed.append(aid)
                if aid in appts:
                    status, start = appts[aid][0].get("status"), ts(appts[aid][0].get("plannedStart"))
                elif aid in all_appts:  # deleted
                    continue
                else:  # not loaded: the visit's own preview
                    status, start = a.get("status"), ts(a.get("scheduledStart"))
                if status == "Completed":
                    done.append((start, aid))
            completed = d.get("status") == "Completed"
            best = max((x for x in done if x[0] is not None), default=None, key=lambda x: x[0])
            actual = best[0].date() if (completed and best) else None
            mn, mx, tg = day(d.get("minDueDate")), day(d.get("maxDueDate")), day(d.get("targetDueDate"))
            timing = None
            if actual is not None:
                timing = "early" if actual < (mn or tg) else "late" if actual > (mx or tg) else "on_time"
            subj = ref((d.get("subject") or {}).get("Id") or (d.get("subject") or {}).get("id")
                       or (p or {}).get("subjectId"))
            e = self.enrollment.get(subj)  # type: ignore[arg-type]
            expected = completed or bool(
                e and e["enrollment_date"] and tg and e["enrollment_date"] <= tg
                and (e["exit_date"] is None or e["exit_date"] > tg))
            subj_row = self.subjects.get(subj)  # type: ignore[arg-type]
            out[sid] = {"subject": subj, "study": ref((d.get("study") or {}).get("id") or (p or {}).get("studyId")),
                        "site": ref(((subj_row or ({}, None))[0].get("site") or {}).get("id")),
                        "target": tg, "max_due": mx, "is_completed": completed, "actual_date": actual,
                        "completion_timing": timing, "is_expected": expected,
                        "completed_appointment": (best[1] if completed and best else None), "listed": listed}
        return out

    def _appointments(self) -> dict[str, dict[str, Any]]:
        by_appt: dict[str, list[str]] = defaultdict(list)
        for vid, v in self.visits.items():
            for a in v["listed"]:
                by_appt[a].append(vid)
        out = {}
        for sid, (d, _) in live(self.conn, "dim_appointments_staging").items():
            visits = sorted(by_appt.get(sid, []))
            study, patient = ref((d.get("study") or {}).get("id")), ref((d.get("patient") or {}).get("id"))
            subj = self.visits[visits[0]]["subject"] if visits else None
            start, end = ts(d.get("plannedStart")), ts(d.get("plannedEnd"))
            out[sid] = {"status": d.get("status"), "study": study, "site": ref((d.get("site") or {}).get("id")),
                        "patient": patient, "subject": subj, "patient_visit": visits[0] if visits else None,
                        "study_visit": ref((d.get("visit") or {}).get("id")),
                        "planned_date": start.date() if start else None,
                        "minutes": int((end - start).total_seconds() // 60) if start and end else None}
        # not listed by any visit: the subject of the same patient in the same study (the pseudonym of a
        # patient is one-to-one with its source id, so comparing source ids is comparing patient_ref)
        by_study_patient: dict[tuple, list[str]] = defaultdict(list)
        for sid, (d, p) in self.subjects.items():
            by_study_patient[(ref((d.get("study") or {}).get("id") or (p or {}).get("studyId")),
                              ref((d.get("patient") or {}).get("id")))].append(sid)
        for a in out.values():
            if a["subject"] is None:
                cands = by_study_patient.get((a["study"], a["patient"]), [])
                a["subject"] = min(cands) if cands else None
        return out

    def _queries(self) -> dict[str, dict[str, Any]]:
        out = {}
        for sid, (d, p) in live(self.conn, "dim_queries_staging").items():
            st = d.get("status") or {}
            closed = ts(d.get("closedOn"))
            is_open = st.get("isConsideredOpen")
            if is_open is None:
                is_open = closed is None and st.get("queryStatus") not in ("Resolved", "Waived", "Cancelled")
            created = ts(d.get("createdOn"))
            out[sid] = {"study": ref((d.get("study") or {}).get("id") or (p or {}).get("studyId")),
                        "monitor": ref((d.get("assignedToMonitor") or {}).get("id")), "is_open": bool(is_open),
                        "created": created.date() if created else None,
                        "days_to_close": (closed.date() - created.date()) .days if closed and created else None}
        return out

    def _milestones(self) -> dict[str, dict[str, Any]]:
        out = {}
        for sid, (d, p) in live(self.conn, "fact_study_milestones_staging").items():
            projected = day(d.get("projectedDate") or (d.get("scheduling") or {}).get("dueDate"))
            done = day(d.get("completedOn"))
            out[sid] = {"study": ref((p or {}).get("studyId")), "projected": projected, "completed": done,
                        "is_completed": done is not None or d.get("status") == "Completed",
                        "slip": (done - projected).days if done and projected else None}
        return out

    def _payments(self) -> dict[str, dict[str, Any]]:
        out = {}
        kinds = {sid: "visit_stipend" for sid in live(self.conn, "dim_patient_visit_stipends_staging")}
        for sid, (d, _) in live(self.conn, "dim_patient_visit_stipends_staging",
                                "dim_patient_payments_staging").items():
            subj = ref(d.get("patientStudyId"))
            srow = self.subjects.get(subj)  # type: ignore[arg-type]
            paid = ts(d.get("paymentOn"))
            out[sid] = {"source": kinds.get(sid, "patient_payment"), "subject": subj,
                        "study": ref(((srow or ({}, None))[0].get("study") or {}).get("id")) if srow else None,
                        "amount": Decimal(str(d.get("amount"))).quantize(Decimal("0.01")),
                        "paid_date": paid.date() if paid else None, "visit": ref(d.get("patientVisitId"))}
        return out

    # -- Gold ---------------------------------------------------------------------------------------
    def funnel(self) -> dict[tuple, dict[str, int]]:
        out: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for e in self.enrollment.values():
            g = out[(e["study"], e["site"])]
            g["subjects"] += 1
            g["prescreened"] += e["funnel_stage"] >= 1
            for k in ("screened", "enrolled", "randomized", "completed", "screen_failed", "dropped", "non_qualified",
                      "run_in_failed", "active"):
                g[k] += e[f"is_{k}"]
            if e["is_enrolled"] and e["enrollment_date"] and 0 <= (self.as_of - e["enrollment_date"]).days < 30:
                g["enrolled_last_30_days"] += 1
        return {k: dict(v) for k, v in out.items()}

    def compliance(self) -> dict[tuple, dict[str, int]]:
        out: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for v in self.visits.values():
            if v["target"] is None or not (v["is_expected"] or v["is_completed"]):
                continue
            g = out[(v["study"], v["site"], v["target"].replace(day=1))]
            g["visits_expected"] += 1
            g["visits_completed"] += v["is_completed"]
            if v["completion_timing"]:
                g[f"visits_{v['completion_timing']}"] += 1
            if not v["is_completed"]:
                g["visits_missed" if v["max_due"] < self.as_of else "visits_open"] += 1
        return {k: dict(v) for k, v in out.items()}

    def capacity(self) -> dict[tuple, dict[str, Any]]:
        rooms: dict[str, int] = defaultdict(int)
        for d, _ in self.rooms.values():
            if d.get("active", True) is not False and not d.get("isConferenceRoom"):
                rooms[ref((d.get("site") or {}).get("id"))] += 1  # type: ignore[index]
        out: dict[tuple, dict[str, Any]] = defaultdict(lambda: {"appointments": 0, "booked_minutes": 0})
        for a in self.appointments.values():
            if a["status"] == "Cancelled" or a["planned_date"] is None:
                continue
            g = out[(a["site"], a["planned_date"])]
            g["appointments"] += 1
            g["booked_minutes"] += a["minutes"] or 0
            g["rooms"] = rooms.get(a["site"], 0)  # type: ignore[arg-type]
        return dict(out)

    def query_aging(self) -> dict[tuple, dict[str, int]]:
        out: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for q in self.queries.values():
            g = out[(q["study"], q["monitor"])]
            g["queries"] += 1
            if q["is_open"]:
                age = (self.as_of - q["created"]).days
                g["open_queries"] += 1
                g["open_0_7_days" if age <= 7 else "open_8_30_days" if age <= 30 else
                  "open_31_90_days" if age <= 90 else "open_over_90_days"] += 1
            else:
                g["closed_queries"] += 1
        return {k: dict(v) for k, v in out.items()}

    def slippage(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for m in self.milestones.values():
            g = out[m["study"]]  # type: ignore[index]
            g["milestones"] += 1
            if m["is_completed"]:
                g["completed"] += 1
                g["completed_on_time" if m["slip"] is not None and m["slip"] <= 0 else
                  "completed_late" if m["slip"] is not None else "completed_undated"] += 1
            elif m["projected"] is not None and m["projected"] < self.as_of:
                g["overdue"] += 1
            else:
                g["upcoming"] += 1
        return {k: dict(v) for k, v in out.items()}

    def payments_monthly(self) -> dict[tuple, dict[str, Any]]:
        out: dict[tuple, dict[str, Any]] = defaultdict(lambda: defaultdict(int))
        for p in self.payments.values():
            g = out[(p["study"], p["paid_date"].replace(day=1) if p["paid_date"] else None)]
            g["payments"] += 1
            g["total_amount"] += p["amount"]
            g["visit_stipends" if p["source"] == "visit_stipend" else "patient_payments"] += 1
        return {k: dict(v) for k, v in out.items()}
