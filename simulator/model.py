"""The entity catalogue: which CC entities exist, how many at scale 1.0, who their parents are,
and the hooks that make records referentially consistent.

Volumes at scale 1.0 are MISSION.md's production numbers (Dec 2025) where given, else the
export's ``last_records``, else plausible small counts. Relations:

* studies -> subjects -> patient visits -> patient-visit elements / stipends; subjects -> statuses;
* studies -> study visits -> visit/element relationships (elements of the same study);
* studies -> elements, arms, protocol versions, documents, actions, milestones, notes, monitor
  queries, personnel, warnings (pairs of the study's visits and elements), roles, integration info;
* patients -> 11 patient sub-lists; subjects point at a patient and a site; appointments at a
  subject's study, patient, site and one of the study's visits.

Timestamps: ``lastUpdatedOn``/``createdOn`` for studies, ``modifiedOn``/``createdOn`` for staff and
providers, ``modifiedDate``/``createdDate`` (or the spec's ``createdOn``) everywhere else -- the
catalog's ``timestamp_field`` per job.
"""

from __future__ import annotations

import numpy as np

from simulator import clinical
from simulator.data import DataModel, Entity, EntityDef, mix_np, unit, uuids
from simulator.values import STATUSES

FIRST = ("James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard "
         "Susan Joseph Jessica Thomas Sarah Charles Karen Daniel Nancy Matthew Lisa Anthony Betty Mark "
         "Sandra Steven Ashley Andrew Emily Paul Donna Joshua Michelle Kevin Amanda Brian Melissa").split()
LAST = ("Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez "
        "Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris Sanchez Clark "
        "Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill Flores").split()
THERAPY = ("ONC", "CAR", "NEU", "DER", "END", "IMM", "NEP", "PSY", "RHE", "VAC")
ROLES = ((1, "Principal Investigator", True), (2, "Sub-Investigator", False), (3, "Study Coordinator", True),
         (4, "Regulatory Coordinator", False), (5, "Research Nurse", False), (6, "Pharmacist", False),
         (7, "Data Manager", False), (8, "Recruiter", False))
LOOKUP_LISTS = (
    "AdverseEventSeverity", "AllergyReaction", "BloodType", "CampaignMedia", "ContactType", "Country",
    "DeviceType", "DocumentCategory", "DroppedReason", "EducationLevel", "EmploymentStatus", "Ethnicity",
    "EyeColor", "FinanceType", "Gender", "HairColor", "ImmunizationType", "InsuranceType", "Language",
    "LeadSource", "MaritalStatus", "MedicationRoute", "MedicationSchedule", "MilestoneCategory",
    "MonitorQueryReason", "NoteType", "OpportunityLevel", "PaymentMethod", "PhoneType", "PlaceOfService",
    "ProcedureType", "ProviderType", "Race", "ReferralType", "Relation", "Religion", "RoomType",
    "ScreenFailReason", "SiteType", "SmokingStatus", "SocialHistoryCategory", "StaffProfession",
    "StudyCategory", "StudyGroup", "StudyPhase", "StudyTag1", "StudyTag2", "StudyTag3", "StudyTag4",
    "Suffix", "Therapy", "Title", "TravelMethod", "UnitOfMeasure",
)


def _pick_names(h: np.ndarray) -> tuple[list[str], list[str]]:
    f = (h % np.uint64(len(FIRST))).tolist()
    last = ((h >> np.uint64(20)) % np.uint64(len(LAST))).tolist()
    return [FIRST[i] for i in f], [LAST[i] for i in last]


# -- hooks: scalars (cheap, used for previews too) --------------------------------------------
def study_scalars(m: DataModel, e: Entity, idx, h, parent):
    ids = (e.d.id_base + idx).tolist()
    th = (h % np.uint64(len(THERAPY))).tolist()
    names = [f"{THERAPY[t]}-{i}" for t, i in zip(th, ids, strict=True)]
    return {"name": names, "protocolNumber": [f"PRT-{i:06d}" for i in ids],
            "identifier": [f"S{i}" for i in ids]}


def person_scalars(m: DataModel, e: Entity, idx, h, parent):
    first, last = _pick_names(h)
    cols = {"firstName": first, "lastName": last}
    assert e.d.definition is not None  # people are records of a spec definition
    props = m.definitions[e.d.definition]["properties"]
    if "displayName" in props:
        cols["displayName"] = [f"{a} {b}" for a, b in zip(first, last, strict=True)]
    if "email" in props:
        cols["email"] = [f"{a.lower()}.{b.lower()}{i}@example.org"
                         for a, b, i in zip(first, last, idx.tolist(), strict=True)]
    if "login" in props:
        cols["login"] = [f"{a[0].lower()}{b.lower()}{i}" for a, b, i in zip(first, last, idx.tolist(), strict=True)]
    if "providerName" in props:
        cols["providerName"] = [f"Dr. {a} {b}" for a, b in zip(first, last, strict=True)]
    if "mrn" in props:
        cols["mrn"] = [f"MRN{i:08d}" for i in (e.d.id_base + idx).tolist()]
    return cols


def named_scalars(prefix: str, field: str = "name"):
    """``name`` = '<prefix> <id>' so names are unique and readable."""
    def hook(m: DataModel, e: Entity, idx, h, parent):
        return {field: [f"{prefix} {i}" for i in (e.d.id_base + idx).tolist()]}
    return hook


def study_status_scalars(m: DataModel, e: Entity, idx, h, parent):
    """The configured study statuses: the vocabulary studies use first, then extra ones."""
    ids = (e.d.id_base + idx).tolist()
    return {"name": [STATUSES[i - 1] if 0 < i <= len(STATUSES) else f"Status {i}" for i in ids]}


DAY_MS = 86_400_000


def subject_scalars(m: DataModel, e: Entity, idx, h, parent):
    """The current status is the last event of the subject's status history and only subjects that
    reached RunIn/Randomized carry ``enrollmentDate`` (simulator.clinical)."""
    ids = (e.d.id_base + idx).tolist()
    return {"screeningNumber": [f"SCR-{i}" for i in ids], **clinical.subject_fields(m, idx)}


def subject_status_scalars(m: DataModel, e: Entity, idx, h, parent):
    return clinical.subject_status_fields(m, e, idx, parent)


def patient_visit_scalars(m: DataModel, e: Entity, idx, h, parent):
    """The protocol schedule (screening visit, then every study-specific interval from enrollment,
    min <= target <= max), the status and the visit's appointments (simulator.clinical)."""
    return clinical.visit_fields(m, e, idx, parent)


def visit_element_scalars(m: DataModel, e: Entity, idx, h, parent):
    return clinical.element_fields(m, e, idx, parent)


def role_scalars(m: DataModel, e: Entity, idx, h, parent):
    pos = m.position(e, idx, parent)
    start = (mix_np(m.hash(m.entity("studies"), parent)) % np.uint64(len(ROLES))).astype(np.int64)
    roles = ((start + pos) % len(ROLES)).tolist()
    return {"id": [ROLES[r][0] for r in roles], "name": [ROLES[r][1] for r in roles],
            "isCoordinator": [ROLES[r][2] for r in roles]}


def instance_scalars(m: DataModel, e: Entity, idx, h, parent):
    uid = uuids(h)
    return {"instanceUID": uid, "customerUID": uuids(mix_np(h))}


def topology_scalars(m: DataModel, e: Entity, idx, h, parent):
    return {"pubSubId": [f"cc-pubsub-{u[:8]}" for u in uuids(h)]}


# -- hooks: references -------------------------------------------------------------------------
def _study_of_subject(m: DataModel, subj: np.ndarray) -> np.ndarray:
    return m.parent_of(m.entity("subjects"), subj)


def _subject_patient(m: DataModel, subj: np.ndarray) -> np.ndarray:
    return m.pick("patients", m.hash(m.entity("subjects"), subj), 31)


def _subject_site(m: DataModel, subj: np.ndarray) -> np.ndarray:
    return m.pick("sites", m.hash(m.entity("subjects"), subj), 32)


def study_refs(m: DataModel, e: Entity, idx, h, parent):
    return {
        "sponsor": m.previews("sponsors", m.pick("sponsors", h, 1), "SponsorPreviewModel"),
        "sponsorDivision": m.previews("sponsor_divisions", m.pick("sponsor_divisions", h, 2),
                                      "SponsorDivisionPreviewModel"),
        "sponsorTeam": m.previews("sponsor_teams", m.pick("sponsor_teams", h, 3), "SponsorTeamPreviewModel"),
        "managingSite": m.previews("sites", m.pick("sites", h, 4), "SitePreviewModel"),
        "organization": m.previews("organizations", m.pick("organizations", h, 5), "OrganizationPreviewModel"),
    }


def subject_refs(m: DataModel, e: Entity, idx, h, parent):
    return {
        "study": m.previews("studies", parent, "StudyPreviewModel"),
        "site": m.previews("sites", _subject_site(m, idx), "SitePreviewModel"),
        "patient": m.previews("patients", _subject_patient(m, idx), "PatientDemographicsViewModel"),
        "arm": m.previews("study_arms", m.child_pick("study_arms", parent, h, 6), "StudyArmPreviewModel"),
        "protocolVersion": m.previews("protocol_versions", m.child_pick("protocol_versions", parent, h, 7),
                                      "ProtocolVersionPreviewModel"),
    }


def subject_status_refs(m: DataModel, e: Entity, idx, h, parent):
    study = _study_of_subject(m, parent)
    return {
        "study": m.previews("studies", study, "StudyPreviewModel"),
        "site": m.previews("sites", _subject_site(m, parent), "SitePreviewModel"),
        "subject": m.previews("subjects", parent, "SubjectPreviewModel"),
    }


def study_child_refs(field: str = "study", preview: str = "StudyPreviewModel"):
    def hook(m: DataModel, e: Entity, idx, h, parent):
        return {field: m.previews("studies", parent, preview)}
    return hook


def study_visit_refs(m: DataModel, e: Entity, idx, h, parent):
    arm = m.previews("study_arms", m.child_pick("study_arms", parent, h, 8), "StudyArmPreviewModel")
    return {
        "study": m.previews("studies", parent, "StudyPreviewModel"),
        "protocolVersion": m.previews("protocol_versions", m.child_pick("protocol_versions", parent, h, 9),
                                      "ProtocolVersionPreviewModel"),
        "arms": [[a] if a is not None else [] for a in arm],
    }


def _visit_of_patient_visit(m: DataModel, pv: np.ndarray, subj: np.ndarray, pos: np.ndarray) -> np.ndarray:
    study = _study_of_subject(m, subj)
    nv = m.child_count("study_visits", study)
    return m.child_at("study_visits", study, np.where(nv > 0, pos % np.maximum(nv, 1), -1))


def patient_visit_refs(m: DataModel, e: Entity, idx, h, parent):
    study = _study_of_subject(m, parent)
    pos = m.position(e, idx, parent)
    visit = _visit_of_patient_visit(m, idx, parent, pos)
    vprev = m.previews("study_visits", visit, "VisitPreviewModel")
    return {
        "visitId": [v["id"] if v else None for v in vprev],
        "visitName": [v["name"] if v else None for v in vprev],
        "study": m.previews("studies", study, "StudyPreviewModel"),
        "subject": m.previews("subjects", parent, "SubjectPreviewModel"),
    }


def _element_for(m: DataModel, study: np.ndarray, j: np.ndarray, h: np.ndarray) -> np.ndarray:
    """The study's element number j (mod its element count), else any element."""
    ne = m.child_count("elements", study)
    own = m.child_at("elements", study, np.where(ne > 0, j % np.maximum(ne, 1), -1))
    return np.where(own >= 0, own, m.pick("elements", h, 11))


def patient_visit_element_refs(m: DataModel, e: Entity, idx, h, parent):
    pvs = m.entity("patient_visits")
    subj = m.parent_of(pvs, parent)
    study = _study_of_subject(m, subj)
    el = _element_for(m, study, m.position(e, idx, parent), h)
    prev = m.previews("elements", el, "ElementPreviewModel")
    return {"elementId": [p["id"] if p else None for p in prev], "name": [p["name"] if p else None for p in prev]}


def stipend_scalars(m: DataModel, e: Entity, idx, h, parent):
    """A stipend pays its (completed) patient visit after it happened."""
    return clinical.payment_fields(m, e, idx, parent)


def patient_payment_scalars(m: DataModel, e: Entity, idx, h, parent):
    """A patient payment pays a completed patient visit of the subject it names."""
    return clinical.payment_fields(m, e, idx, None)


def payment_refs(m: DataModel, e: Entity, idx, h, parent):
    return {"paymentBy": m.previews("staff", m.pick("staff", h, 19), "StaffPreviewModel")}


def appointment_scalars(m: DataModel, e: Entity, idx, h, parent):
    return clinical.appointment_fields(m, e, idx, parent)


def appointment_refs(m: DataModel, e: Entity, idx, h, parent):
    """An appointment belongs to a patient visit (its parent): that visit's subject's study, site and
    patient, and the study visit (protocol visit definition) the patient visit is an instance of."""
    pvs = m.entity("patient_visits")
    subj = m.parent_of(pvs, parent)
    study = _study_of_subject(m, subj)
    pos = m.position(pvs, parent, subj)
    visit = _visit_of_patient_visit(m, parent, subj, pos)
    return {
        "study": m.previews("studies", study, "StudyPreviewModel"),
        "site": m.previews("sites", _subject_site(m, subj), "SitePreviewModel"),
        "patient": m.previews("patients", _subject_patient(m, subj), "PatientPreviewModel"),
        "visit": m.previews("study_visits", visit, "VisitPreviewModel"),
    }


def element_refs(m: DataModel, e: Entity, idx, h, parent):
    """An element is done in a room of the network (RoomAssignment type Room, a real room id)."""
    rooms = m.previews("rooms", m.pick("rooms", h, 21), "RoomPreviewModel")
    return {"study": m.previews("studies", parent, "StudyPreviewModel"),
            "roomAssignment": [{"name": r["name"], "type": "Room", "id": r["id"]} if r else None for r in rooms]}


def query_refs(m: DataModel, e: Entity, idx, h, parent):
    return {"study": m.previews("studies", parent, "StudyPreviewModel"), **clinical.query_fields(m, e, idx, parent)}


def milestone_scalars(m: DataModel, e: Entity, idx, h, parent):
    return clinical.milestone_fields(m, e, idx, parent)


def _rel_element(m: DataModel, visit: np.ndarray, pos: np.ndarray) -> np.ndarray:
    visits = m.entity("study_visits")
    study = m.parent_of(visits, visit)
    ne = m.child_count("elements", study)
    start = (m.hash(visits, visit) % np.maximum(ne, 1).astype(np.uint64)).astype(np.int64)
    return m.child_at("elements", study, np.where(ne > 0, (start + pos) % np.maximum(ne, 1), -1))


def visit_element_rel_refs(m: DataModel, e: Entity, idx, h, parent):
    pos = m.position(e, idx, parent)
    el = _rel_element(m, parent, pos)
    eprev = m.previews("elements", el, "VisitElementPreviewModel")
    req = (m.sub(h, 17) % np.uint64(4) != 0).tolist()
    elements = []
    for p, s, r in zip(eprev, (pos + 1).tolist(), req, strict=True):
        d = dict(p) if p else {}
        d["sequence"] = s
        d["isRequired"] = r
        elements.append(d)
    return {"visit": m.previews("study_visits", parent, "VisitPreviewModel"), "element": elements}


def warning_refs(m: DataModel, e: Entity, idx, h, parent):
    pos = m.position(e, idx, parent)
    nv = m.child_count("study_visits", parent)
    ne = m.child_count("elements", parent)
    safe_nv, safe_ne = np.maximum(nv, 1), np.maximum(ne, 1)
    visit = m.child_at("study_visits", parent, pos % safe_nv)
    elem = m.child_at("elements", parent, (pos // safe_nv) % safe_ne)
    typ = ["Visit" if t else "Element" for t in (pos % 2 == 0).tolist()]
    return {"type": typ, "visit": m.previews("study_visits", visit, "VisitPreviewModel"),
            "element": m.previews("elements", elem, "ElementPreviewModel")}


def personnel_refs(m: DataModel, e: Entity, idx, h, parent):
    pos = m.position(e, idx, parent)
    start = (mix_np(m.hash(m.entity("studies"), parent)) % np.uint64(len(ROLES))).astype(np.int64)
    roles = ((start + pos) % len(ROLES)).tolist()
    staff = m.entity("staff")
    s1 = m.pick("staff", h, 18)
    sp = m.build(staff, np.unique(s1), refs=False)
    by_idx = dict(zip(np.unique(s1).tolist(), sp, strict=True))
    staff_lists = []
    # Priority follows the record's position under its study, never its place in the batch being
    # built: the API (one study's list) and /_sim/expected (all studies at once) must agree.
    for si, p in zip(s1.tolist(), np.asarray(pos).tolist(), strict=True):
        s = by_idx[si]
        staff_lists.append([{"Id": s["id"], "UID": s["uid"], "LastName": s["lastName"], "FirstName": s["firstName"],
                             "MiddleName": "", "FullName": s["displayName"], "Priority": 1 + (int(p) % 2),
                             "Username": s["login"]}])
    return {"Role": [{"Id": ROLES[r][0], "RoleName": ROLES[r][1], "Coordinator": ROLES[r][2]} for r in roles],
            "Staff": staff_lists}


def pick_refs(**fields: tuple[str, str]):
    """Nested previews of hash-picked records: field=(entity, preview definition)."""
    def hook(m: DataModel, e: Entity, idx, h, parent):
        return {f: m.previews(ent, m.pick(ent, h, 40 + k), prev) for k, (f, (ent, prev)) in enumerate(fields.items())}
    return hook


def patient_child_refs(**fields: tuple[str, str]):
    def hook(m: DataModel, e: Entity, idx, h, parent):
        out = {f: m.previews(ent, m.pick(ent, h, 60 + k), prev) for k, (f, (ent, prev)) in enumerate(fields.items())}
        return out
    return hook


# -- derived per-parent counts -----------------------------------------------------------------
def _subjects_per_study(m: DataModel) -> np.ndarray:
    counts = m.entity("subjects").counts
    assert counts is not None  # subjects are children of studies
    return counts


def _studies_with_subjects(m: DataModel) -> np.ndarray:
    return (_subjects_per_study(m) > 0).astype(np.float64)


def study_visit_counts(m: DataModel, e: Entity) -> np.ndarray:
    studies = m.entity("studies")
    h = mix_np(m.hash(studies, np.arange(studies.n_base, dtype=np.int64)) ^ np.uint64(e.key))
    with_subjects = _subjects_per_study(m) > 0
    busy = 4 + (h % np.uint64(12)).astype(np.int64)
    idle = np.where(h % np.uint64(10) == 0, (h >> np.uint64(8)) % np.uint64(6), 0).astype(np.int64)
    return np.where(with_subjects, busy, idle)


def visit_element_rel_counts(m: DataModel, e: Entity) -> np.ndarray:
    visits = m.entity("study_visits")
    vi = np.arange(visits.n_base, dtype=np.int64)
    study = m.parent_of(visits, vi)
    ne = m.child_count("elements", study)
    k = 1 + (mix_np(m.hash(visits, vi) ^ np.uint64(e.key)) % np.uint64(5)).astype(np.int64)
    return np.minimum(k, ne)


def warning_counts(m: DataModel, e: Entity) -> np.ndarray:
    studies = m.entity("studies")
    si = np.arange(studies.n_base, dtype=np.int64)
    pairs = m.child_count("study_visits", si) * m.child_count("elements", si)
    k = (mix_np(m.hash(studies, si) ^ np.uint64(e.key)) % np.uint64(4)).astype(np.int64)
    return np.minimum(k, pairs)


def per_study(max_n: int, busy_share: float):
    """0..max_n children for a share of studies (roles, personnel: small fixed-size lists)."""
    def counts(m: DataModel, e: Entity) -> np.ndarray:
        studies = m.entity("studies")
        h = mix_np(m.hash(studies, np.arange(studies.n_base, dtype=np.int64)) ^ np.uint64(e.key))
        busy = unit(h) < busy_share
        return np.where(busy, 1 + ((h >> np.uint64(8)) % np.uint64(max_n)).astype(np.int64), 0)
    return counts


def one_per_study(m: DataModel, e: Entity) -> np.ndarray:
    return np.ones(m.entity("studies").n_base, dtype=np.int64)


def _mk(name: str, definition: str | None, count: int = 0, **kw) -> EntityDef:
    return EntityDef(name=name, definition=definition, count=count, **kw)


def _patient_child(name: str, definition: str, count: int, id_base: int, **kw) -> EntityDef:
    return _mk(name, definition, count, parent="patients", zero_frac=0.5, id_base=id_base, **kw)


ENTITIES: list[EntityDef] = [
    # -- organisation and reference lists ------------------------------------------------------
    _mk("sites", "SiteModel", 40, id_base=1, created_field="createdOn", scalars=named_scalars("Site"),
        mutable="primaryPhone"),
    _mk("organizations", "OrganizationPreviewModel", 1, id_field="Id", id_base=1, min_count=1,
        scalars=named_scalars("Organization", "Name"), mutable="Name"),
    _mk("sponsors", "SponsorViewModel", 274, id_base=101, scalars=named_scalars("Sponsor"), fixed={"sponsorDivisions": []},
        mutable="comment"),
    _mk("sponsor_divisions", "SponsorDivisionViewModel", 274, id_base=501, scalars=named_scalars("Division"),
        refs=pick_refs(sponsor=("sponsors", "SponsorPreviewModel")), fixed={"teams": []}, mutable="comment"),
    _mk("sponsor_teams", "SponsorTeamViewModel", 273, id_base=901, scalars=named_scalars("Team"),
        refs=pick_refs(sponsor=("sponsors", "SponsorPreviewModel"),
                       sponsorDivision=("sponsor_divisions", "SponsorDivisionPreviewModel")), mutable="comment"),
    _mk("staff", "StaffViewModel", 884, id_base=2001, ts_field="modifiedOn", created_field="createdOn",
        scalars=person_scalars, mutable="isStatusActive"),
    _mk("providers", "ProviderModel", 149, id_base=3001, ts_field="modifiedOn", created_field="createdOn",
        scalars=person_scalars, mutable="primaryPhone"),
    _mk("monitors", "MonitorPreviewModel", 34, id_base=4001, scalars=person_scalars, mutable="lastName"),
    _mk("rooms", "RoomViewModel", 58, id_base=101, scalars=named_scalars("Room"),
        refs=pick_refs(site=("sites", "SitePreviewModel"), defaultSchedule=("schedules", "SchedulePreviewModel")),
        mutable="status"),
    _mk("room_groups", "RoomGroupViewModel", 6, id_base=201, scalars=named_scalars("Room group"),
        refs=pick_refs(site=("sites", "SitePreviewModel")), mutable="description"),
    _mk("schedules", "ScheduleViewModel", 10, id_base=1, scalars=named_scalars("Schedule"), mutable="comment"),
    _mk("sys_allergies", "SysAllergyViewModel", 936, id_base=1, mutable="description"),
    _mk("sys_conditions", "SysConditionsViewModel", 404, id_base=1, mutable="description"),
    _mk("sys_medications", "SysMedicationViewModel", 2295, id_base=1, mutable="description"),
    _mk("sys_procedures", "SysProcedureModel", 671, id_base=1, mutable="description"),
    _mk("sys_immunizations", "SysImmunizationModel", 78, id_base=1, mutable="description"),
    _mk("sys_devices", "SysDeviceModel", 3294, id_base=1, mutable="description"),
    _mk("sys_social_history", "SysSocialHistoryViewModel", 120, id_base=1, mutable="description"),
    _mk("document_types", "DocumentTypePreviewModel", 20, id_base=1, scalars=named_scalars("Document type"),
        mutable="category"),
    _mk("action_categories", "ActionCategoryPreviewModel", 10, id_base=1, scalars=named_scalars("Action category"),
        mutable="type"),
    _mk("study_categories", "StudyCategoryViewModel", 106, id_base=1, scalars=named_scalars("Category"),
        mutable="description"),
    _mk("study_subcategories", "StudySubcategoryViewModel", 8, id_base=1, scalars=named_scalars("Subcategory"),
        mutable="description"),
    _mk("study_statuses", "StudyStatusTypeViewModel", 15, id_base=1, min_count=15, scalars=study_status_scalars,
        mutable="description"),
    _mk("study_types", "StudyTypeViewModel", 12, id_base=1, mutable="TypeDescription",
        scalars=lambda m, e, idx, h, p: {"Id": (e.d.id_base + idx).tolist(), "TypeId": (e.d.id_base + idx).tolist(),
                                         "TypeName": [f"Study type {i}" for i in (e.d.id_base + idx).tolist()]}),
    _mk("lookup_lists", None, 54, strings=LOOKUP_LISTS, id_field=None, created_field=None),
    _mk("patient_customfields", "CustomFieldDefinition", 9, id_base=1, scalars=named_scalars("Patient field"),
        mutable="description"),
    _mk("study_customfields", "CustomFieldDefinition", 6, id_base=101, scalars=named_scalars("Study field"),
        mutable="description"),
    _mk("instance_details", "InstanceDetails", singleton=True, id_field=None, scalars=instance_scalars,
        mutable="webVersion", key_fields=("instanceUID",), insertable=False),
    _mk("instance_topology", "ClinicalConductorTopologyViewModel", singleton=True, id_field=None,
        scalars=topology_scalars, mutable="ccs", key_fields=("pubSubId",), insertable=False),
    # -- studies and their children ------------------------------------------------------------
    _mk("studies", "StudyViewModel", 157_270, id_base=10_001, ts_field="lastUpdatedOn", created_field="createdOn",
        scalars=study_scalars, refs=study_refs, mutable="status"),
    _mk("subjects", "SubjectViewModel", 88_773, parent="studies", zero_frac=0.85, id_base=300_001,
        scalars=subject_scalars, refs=subject_refs, mutable="status", timestamps=clinical.subject_timestamps),
    _mk("subject_statuses", "SubjectStatusModel", 119_749, parent="subjects", zero_frac=0.3, id_field=None,
        derived=clinical.subject_status_counts, scalars=subject_status_scalars, refs=subject_status_refs,
        mutable="comment", key_fields=("subject", "eventDate", "status")),
    _mk("study_visits", "VisitViewModel", parent="studies", derived=study_visit_counts, id_base=500_001,
        scalars=named_scalars("Visit"), refs=study_visit_refs, mutable="description"),
    _mk("elements", "ElementViewModel", 15_836, parent="studies", zero_frac=0.9, parent_mask=_studies_with_subjects,
        id_base=20_001, scalars=named_scalars("Element"), refs=element_refs, mutable="description"),
    _mk("visit_element_rels", "VisitElementRelationshipViewModel", parent="study_visits",
        derived=visit_element_rel_counts, id_field=None, refs=visit_element_rel_refs, mutable="element.isRequired",
        insertable=False, key_fields=("visit", "element")),
    _mk("study_arms", "StudyArmPreviewModel", 455, parent="studies", zero_frac=0.5, parent_mask=_studies_with_subjects,
        id_field="Id", id_base=700_001, scalars=named_scalars("Arm", "Name"), mutable="Name"),
    _mk("protocol_versions", "ProtocolVersionViewModel", 5_000, parent="studies", zero_frac=0.6, id_base=710_001,
        scalars=named_scalars("Protocol version"), refs=study_child_refs(), mutable="status"),
    _mk("study_documents", "StudyDocumentViewModel", 30_000, parent="studies", zero_frac=0.8, id_base=720_001,
        refs=pick_refs(type=("document_types", "DocumentTypePreviewModel")), mutable="description"),
    _mk("monitor_queries", "MonitorQueryPreviewModel", 20_000, parent="studies", zero_frac=0.9, id_base=760_001,
        created_field="createdOn", refs=query_refs, mutable="query", timestamps=clinical.query_timestamps),
    _mk("study_actions", "ActionViewModel", 40_000, parent="studies", zero_frac=0.8, id_base=780_001,
        scalars=named_scalars("Action"),
        refs=pick_refs(category=("action_categories", "ActionCategoryPreviewModel"),
                       assignedTo=("staff", "StaffPreviewModel")), mutable="status"),
    _mk("study_milestones", "StudyMilestoneViewModel", 30_000, parent="studies", zero_frac=0.8, id_base=830_001,
        scalars=milestone_scalars, refs=pick_refs(assignedTo=("staff", "StaffPreviewModel")),
        mutable="status", timestamps=clinical.milestone_timestamps),
    _mk("study_notes", "StudyNoteViewModel", 25_000, parent="studies", zero_frac=0.85, id_base=870_001,
        refs=pick_refs(staff=("staff", "StaffPreviewModel"), lastUpdatedStaff=("staff", "StaffPreviewModel")),
        mutable="note"),
    _mk("study_personnel", "RoleStaff", parent="studies", derived=per_study(4, 0.2), id_field=None,
        refs=personnel_refs, mutable="Staff", insertable=False, key_fields=("Role",)),
    _mk("study_roles", "StudyRoleViewModel", parent="studies", derived=per_study(5, 0.1), id_field=None,
        scalars=role_scalars, mutable="restrictReassignment", insertable=False, key_fields=("id",)),
    _mk("study_warnings", "StudyWarningModel", parent="studies", derived=warning_counts, id_field=None,
        refs=warning_refs, mutable="description", insertable=False, key_fields=("type", "visit", "element")),
    _mk("study_integration_info", "StudyIntegrationInfoViewModel", parent="studies", derived=one_per_study,
        id_field=None, mutable="integrationSystem", insertable=False),
    # -- patients and their lists --------------------------------------------------------------
    _mk("patients", "PatientViewModel", 152_836, id_base=100_001, scalars=person_scalars,
        refs=pick_refs(primarySite=("sites", "SitePreviewModel")), fixed={"activeStudies": []}, mutable="status"),
    _patient_child("patient_devices", "PatientMedicalDeviceViewModel", 99, 1_001,
                   refs=patient_child_refs(device=("sys_devices", "DeviceViewModel")), mutable="comment"),
    _patient_child("patient_allergies", "PatientAllergiesViewModel", 674, 2_001,
                   refs=patient_child_refs(allergy=("sys_allergies", "PatientAllergyViewModel")), mutable="reaction"),
    _patient_child("patient_providers", "PatientProviderViewModel", 300, 4_001,
                   refs=patient_child_refs(provider=("providers", "ProviderViewModel")), mutable="comment"),
    _patient_child("patient_conditions", "PatientConditionViewModel", 2_000, 6_001,
                   refs=patient_child_refs(condition=("sys_conditions", "ConditionPreviewViewModel")),
                   mutable="comment"),
    _patient_child("patient_procedures", "PatientProcedureViewModel", 800, 10_001, mutable="comment"),
    _patient_child("patient_medications", "PatientMedicationViewModel", 899, 12_001,
                   refs=patient_child_refs(medication=("sys_medications", "MedicationViewModel")), mutable="dosage"),
    _patient_child("patient_immunizations", "PatientImmunizationViewModel", 400, 14_001, mutable="comment"),
    _patient_child("patient_family_history", "PatientFamilyHistoryViewModel", 500, 16_001, mutable="comment"),
    _patient_child("patient_social_history", "PatientLifeStylesHistoryViewModel", 600, 18_001, mutable="comment"),
    _patient_child("campaign_touches", "CampaignTouchViewModel", 554, 20_001,
                   refs=patient_child_refs(study=("studies", "StudyPreviewModel")), mutable="comment"),
    _patient_child("referral_touches", "ReferralTouchViewModel", 14, 22_001,
                   refs=patient_child_refs(study=("studies", "StudyPreviewModel")), mutable="comment"),
    # -- visits ---------------------------------------------------------------------------------
    _mk("patient_visits", "PatientVisitPreview", 2_297_271, parent="subjects", id_base=1_000_001,
        derived=clinical.patient_visit_counts, scalars=patient_visit_scalars, refs=patient_visit_refs,
        mutable="status", timestamps=clinical.visit_timestamps),
    _mk("patient_visit_elements", "PatientVisitElementPreview", 2_090_584, parent="patient_visits", zero_frac=0.5,
        id_base=5_000_001, scalars=visit_element_scalars, refs=patient_visit_element_refs, mutable="completedOn",
        timestamps=clinical.element_timestamps),
    _mk("stipends", "PatientPaymentViewModel", 50_000, parent="patient_visits", zero_frac=0.9, id_base=9_000_001,
        derived=clinical.stipend_counts, scalars=stipend_scalars, refs=payment_refs, mutable="amount",
        timestamps=clinical.payment_timestamps),
    # appointments hang under the patient visit they belong to (the visit embeds their previews);
    # the uniform model modifies their comment, so those previews never go stale
    _mk("appointments", "AppointmentViewModel", 860_893, parent="patient_visits", id_base=2_000_001,
        derived=clinical.appointment_counts, scalars=appointment_scalars, refs=appointment_refs, mutable="comment",
        timestamps=clinical.appointment_timestamps),
    # -- finance and recruitment -----------------------------------------------------------------
    _mk("action_unit_completions", "ActionUnitCompletionViewModel", 20_000, id_base=1_001,
        refs=pick_refs(reportedBy=("staff", "StaffPreviewModel")), mutable="unitQuantity"),
    _mk("invoices", "InvoiceDetailViewModel", 5_000, id_base=40_001,
        refs=pick_refs(study=("studies", "InvoiceStudyViewModel")), fixed={"lineItems": []}, mutable="invoiceAmount"),
    _mk("prospects", "RecruitmentProspectViewModel", 10_000, id_base=60_001, scalars=person_scalars,
        mutable="comments"),
    _mk("remittances", "ARRemittanceViewModel", 2_000, id_base=80_001, mutable="description"),
    _mk("remittance_notes", "NoteViewModel", 3_000, id_base=85_001,
        refs=pick_refs(staff=("staff", "StaffPreviewModel")), mutable="note"),
    _mk("site_payments", "SitePaymentViewModel", 4_000, id_base=90_001, created_field="createdOn",
        refs=pick_refs(site=("sites", "SitePreviewModel"), approvedBy=("staff", "StaffPreviewModel")),
        mutable="comment"),
    _mk("patient_payments", "PatientPaymentViewModel", 60_000, id_base=95_001, scalars=patient_payment_scalars,
        refs=payment_refs, mutable="amount", timestamps=clinical.payment_timestamps),
]
