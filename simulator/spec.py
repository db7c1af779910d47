"""The endpoint registry: every endpoint the job catalog calls, mapped to an entity and a response
shape taken from the CC spec.

* ``simulator/data/cc_spec.json`` is the subset of ``cc_openapi.json`` the simulator needs (the
  GET responses of the catalog's paths and every definition they reach), extracted by
  :func:`extract_subset` (``trialsync simulator extract-spec``) -- the product never reads
  ``/work/shared`` at run time.
* Routes come from ``schemas.jobs.JobCatalog`` after its fixes: the 72 runnable jobs, the two
  valid-but-disabled ones (143, 146), and the 16 invalid endpoints, which answer 404 or 501 like
  the real API.
* Paths are matched case-insensitively on their literal segments; a placeholder segment must be
  an integer (the spec's ``int32`` ids).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from schemas.jobs import JobCatalog

SPEC_FILE = Path(__file__).parent / "data" / "cc_spec.json"
BASE_PATH = "/CCSWEB"

Kind = Literal["odata", "list", "object", "invalid"]
Shape = Literal["page", "array", "object"]

#: Endpoint template -> (entity, kind). ``list`` = a plain (non-OData) array of all records.
ROUTE_TABLE: dict[str, tuple[str, Kind]] = {
    "/api/v1/sites": ("sites", "list"),
    "/api/v1/studies/odata": ("studies", "odata"),
    "/api/v1/patients/odata": ("patients", "odata"),
    "/api/v1/elements/odata": ("elements", "odata"),
    "/api/v1/patient-visits/odata": ("patient_visits", "odata"),
    "/api/v1/studies/{studyId}/subjects/odata": ("subjects", "odata"),
    "/api/v1/studies/{studyId}/visits/odata": ("study_visits", "odata"),
    "/api/v1/studies/{studyId}/documents/odata": ("study_documents", "odata"),
    "/api/v1/studies/{studyId}/monitor-queries/odata": ("monitor_queries", "odata"),
    "/api/v1/patient-visits/{patientVisitId}/elements/odata": ("patient_visit_elements", "odata"),
    "/api/v1/appointments/odata": ("appointments", "odata"),
    "/api/v1/staff/odata": ("staff", "odata"),
    "/api/v1/studies/{studyId}/actions/odata": ("study_actions", "odata"),
    "/api/v1/studies/{studyId}/milestones/odata": ("study_milestones", "odata"),
    "/api/v1/studies/{studyId}/notes/odata": ("study_notes", "odata"),
    "/api/v1/providers/odata": ("providers", "odata"),
    "/api/v1/rooms/odata": ("rooms", "odata"),
    "/api/v1/schedules/odata": ("schedules", "odata"),
    "/api/v1/sponsors/odata": ("sponsors", "odata"),
    "/api/v1/system/allergies/odata": ("sys_allergies", "odata"),
    "/api/v1/system/conditions/odata": ("sys_conditions", "odata"),
    "/api/v1/system/medications/odata": ("sys_medications", "odata"),
    "/api/v1/system/procedures/odata": ("sys_procedures", "odata"),
    "/api/v1/system/immunizations/odata": ("sys_immunizations", "odata"),
    "/api/v1/system/devices/odata": ("sys_devices", "odata"),
    "/api/v1/system/social-history/odata": ("sys_social_history", "odata"),
    "/api/v1/subject-statuses/odata": ("subject_statuses", "odata"),
    "/api/v1/system/document-types": ("document_types", "list"),
    "/api/v1/system/action-categories": ("action_categories", "list"),
    "/api/v1/system/study-categories": ("study_categories", "list"),
    "/api/v1/system/study-subcategories": ("study_subcategories", "list"),
    "/api/v1/system/study-statuses/odata": ("study_statuses", "odata"),
    "/api/v1/system/lookup-lists": ("lookup_lists", "list"),
    "/api/v1/system/patient-customfields": ("patient_customfields", "list"),
    "/api/v1/system/study-customfields": ("study_customfields", "list"),
    "/api/v1/system/organizations": ("organizations", "list"),
    "/api/v1/sponsor-divisions": ("sponsor_divisions", "list"),
    "/api/v1/sponsor-teams": ("sponsor_teams", "list"),
    "/api/v1/monitors": ("monitors", "list"),
    "/api/v1/room-groups": ("room_groups", "list"),
    "/api/v1/studies/{studyId}/arms": ("study_arms", "list"),
    "/api/v1/studies/{studyId}/protocol-versions": ("protocol_versions", "list"),
    "/api/v1/studies/{studyId}/roles": ("study_roles", "list"),
    "/api/v1/studies/{studyId}/personnel": ("study_personnel", "list"),
    "/api/v1/studies/{studyId}/warnings": ("study_warnings", "list"),
    "/api/v1/studies/{studyId}/integration-info": ("study_integration_info", "object"),
    "/api/v1/patients/{patientId}/devices": ("patient_devices", "list"),
    "/api/v1/patients/{patientId}/allergies": ("patient_allergies", "list"),
    "/api/v1/patients/{patientId}/providers": ("patient_providers", "list"),
    "/api/v1/patients/{patientId}/conditions": ("patient_conditions", "list"),
    "/api/v1/patients/{patientId}/procedures": ("patient_procedures", "list"),
    "/api/v1/patients/{patientId}/medications": ("patient_medications", "list"),
    "/api/v1/patients/{patientId}/immunizations": ("patient_immunizations", "list"),
    "/api/v1/patients/{patientId}/family-history": ("patient_family_history", "list"),
    "/api/v1/patients/{patientId}/social-history": ("patient_social_history", "list"),
    "/api/v1/patients/{patientId}/touches/campaign": ("campaign_touches", "list"),
    "/api/v1/patients/{patientId}/touches/referral": ("referral_touches", "list"),
    "/api/v1/instance/details": ("instance_details", "object"),
    "/api/v1/instance/topology": ("instance_topology", "object"),
    "/api/v1/studies/{studyId}/subjects/{subjectId}/patient-visits": ("patient_visits", "list"),
    "/api/v1/patient-visits/{patientVisitId}/stipends/odata": ("stipends", "odata"),
    "/api/v1/studies": ("studies", "list"),
    "/api/v1/studies/{studyId}": ("studies", "object"),
    "/api/v1/action-unit-completions/odata": ("action_unit_completions", "odata"),
    "/api/v1/invoices/odata": ("invoices", "odata"),
    "/api/v1/prospects/odata": ("prospects", "odata"),
    "/api/v1/remittances/odata": ("remittances", "odata"),
    "/api/v1/remittance-notes/odata": ("remittance_notes", "odata"),
    "/api/v1/site-payments/odata": ("site_payments", "odata"),
    "/api/v1/study-types": ("study_types", "list"),
    "/api/v1/studies/{studyId}/visits/{visitId}/elements/odata": ("visit_element_rels", "odata"),
    "/api/v1/patient-payments/odata": ("patient_payments", "odata"),
    # lists across parents that return the model of a per-parent endpoint (the spec's own paths):
    # the cheaper sources of jobs 10 and 11 (docs/extraction.md, "Sources"); /monitor-queries/odata
    # is in the spec too, but answers 501 on the real API (job 30), so it stays invalid here
    "/api/v1/subjects/odata": ("subjects", "odata"),
    "/api/v1/visits/odata": ("study_visits", "odata"),
}

#: Which entity a placeholder's id belongs to.
PLACEHOLDER_ENTITY = {
    "studyId": "studies", "subjectId": "subjects", "visitId": "study_visits", "patientId": "patients",
    "patientVisitId": "patient_visits",
}

_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Route:
    """One served endpoint template."""

    template: str
    kind: Kind
    entity: str | None
    placeholders: tuple[str, ...]
    spec_shape: Shape  # what cc_openapi.json says the 200 body is
    status: int = 200  # for invalid endpoints: 404 or 501
    reason: str = ""
    jobs: tuple[int, ...] = ()
    in_spec: bool = True

    @property
    def is_odata(self) -> bool:
        return self.kind == "odata"

    @property
    def self_object(self) -> bool:
        """``/studies/{studyId}``: the record *is* the placeholder's entity."""
        return bool(self.placeholders) and PLACEHOLDER_ENTITY.get(self.placeholders[-1]) == self.entity


@cache
def load_spec() -> dict[str, Any]:
    return json.loads(SPEC_FILE.read_text(encoding="utf-8"))


def definitions() -> dict[str, Any]:
    return load_spec()["definitions"]


def _norm(path: str) -> str:
    return _PLACEHOLDER_RE.sub("{}", path).lower().rstrip("/")


def spec_shape(template: str, kind: Kind) -> tuple[Shape, bool]:
    """The response shape the spec declares for a template (PageResult vs array), and whether the
    spec has the path at all (endpoints missing from the spec get the PageResult of OData)."""
    if kind == "object":
        return "object", True
    paths = load_spec()["paths"]
    by_norm = {_norm(p): p for p in paths}
    p = by_norm.get(_norm(template))
    if p is None:
        return ("page" if kind == "odata" else "array"), False
    schema = paths[p]["get"]["responses"]["200"]["schema"]
    if schema.get("type") == "array":
        return "array", True
    return ("page" if schema.get("$ref", "").rsplit("/", 1)[-1].startswith("PageResultOf") else "object"), True


def build_routes(catalog: JobCatalog | None = None) -> list[Route]:
    """Every route: catalog endpoints (runnable + valid-but-disabled) and the invalid ones."""
    catalog = catalog or JobCatalog.load()
    jobs_by_endpoint: dict[str, list[int]] = {}
    for j in catalog:
        if j.source_type == "cc_api":
            jobs_by_endpoint.setdefault(j.endpoint, []).append(j.id)
    routes: dict[str, Route] = {}
    for j in catalog:
        if j.source_type != "cc_api":
            continue
        placeholders = tuple(_PLACEHOLDER_RE.findall(j.endpoint))
        jobs = tuple(sorted(jobs_by_endpoint[j.endpoint]))
        if not j.is_valid:
            status = 501 if "501" in (j.invalid_reason or "") else 404
            routes[j.endpoint] = Route(j.endpoint, "invalid", None, placeholders, "object", status=status,
                                       reason=j.invalid_reason or "", jobs=jobs)
            continue
        if j.endpoint not in ROUTE_TABLE:
            raise KeyError(f"job {j.id} calls {j.endpoint}, which the simulator does not serve: add it to ROUTE_TABLE")
    for template, (entity, kind) in ROUTE_TABLE.items():
        placeholders = tuple(_PLACEHOLDER_RE.findall(template))
        shape, in_spec = spec_shape(template, kind)
        routes[template] = Route(template, kind, entity, placeholders, shape,
                                 jobs=tuple(sorted(jobs_by_endpoint.get(template, []))), in_spec=in_spec)
    return list(routes.values())


class Router:
    """Matches a concrete path (after the base path) to its route and placeholder values."""

    def __init__(self, routes: list[Route]):
        self.routes = routes
        self.by_template = {r.template: r for r in routes}
        self._static: dict[str, Route] = {}
        self._dynamic: dict[str, Route] = {}
        for r in routes:
            key = _norm(r.template)
            (self._dynamic if r.placeholders else self._static)[key] = r

    def match(self, path: str) -> tuple[Route, tuple[int, ...]] | None:
        p = path.rstrip("/").lower()
        r = self._static.get(p)
        if r is not None:
            return r, ()
        segs = p.split("/")
        values: list[int] = []
        for k, s in enumerate(segs):
            if s.isdigit():
                values.append(int(s))
                segs[k] = "{}"
        if not values:
            return None
        r = self._dynamic.get("/".join(segs))
        if r is None or len(r.placeholders) != len(values):
            return None
        return r, tuple(values)


def extract_subset(full_spec: dict[str, Any], templates: list[str]) -> dict[str, Any]:
    """The part of the full spec the simulator needs: GET 200 schemas of these paths (matched with
    any placeholder names) plus every definition reachable from them or from the entity catalogue."""
    from simulator.model import ENTITIES

    wanted = {_norm(t) for t in templates}
    paths: dict[str, Any] = {}
    roots: set[str] = {e.definition for e in ENTITIES if e.definition}
    roots |= {"StudyPreviewModel", "SubjectPreviewModel", "SitePreviewModel", "PatientDemographicsViewModel",
              "PatientPreviewModel", "VisitPreviewModel", "ElementPreviewModel", "VisitElementPreviewModel",
              "SponsorPreviewModel", "SponsorDivisionPreviewModel", "SponsorTeamPreviewModel",
              "OrganizationPreviewModel", "StaffPreviewModel", "ProtocolVersionPreviewModel",
              "StudyArmPreviewModel", "InvoiceStudyViewModel", "DeviceViewModel", "PatientAllergyViewModel",
              "ProviderViewModel", "ConditionPreviewViewModel", "MedicationViewModel", "SchedulePreviewModel",
              "DocumentTypePreviewModel", "ActionCategoryPreviewModel"}
    for p, item in full_spec["paths"].items():
        if _norm(p) in wanted and "get" in item:
            schema = item["get"]["responses"]["200"]["schema"]
            paths[p] = {"get": {"summary": item["get"].get("summary", ""),
                                "responses": {"200": {"schema": schema}}}}
            roots |= set(re.findall(r"#/definitions/([^\"']+)", json.dumps(schema)))
    defs = full_spec["definitions"]
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        n = todo.pop()
        if n in seen or n not in defs:
            continue
        seen.add(n)
        todo.extend(re.findall(r"#/definitions/([^\"']+)", json.dumps(defs[n])))
    return {"source": "Clinical Conductor API (cc_openapi.json), subset used by the TrialSync simulator",
            "basePath": full_spec.get("basePath", BASE_PATH),
            "securityDefinitions": full_spec.get("securityDefinitions", {}),
            "paths": dict(sorted(paths.items())),
            "definitions": {n: defs[n] for n in sorted(seen)}}
