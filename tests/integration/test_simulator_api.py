"""The simulator over real HTTP: every job endpoint, auth, OData paging/filters, shapes, metrics."""

from __future__ import annotations

import re

import pytest
import requests

from schemas.jobs import JobCatalog

pytestmark = pytest.mark.integration

CATALOG = JobCatalog.load()
RUNNABLE = CATALOG.runnable
INVALID = [j for j in CATALOG if not j.is_valid]


def _items(body: object) -> list:
    """Records of any response shape (PageResult, OData, array, object)."""
    if isinstance(body, list):
        return body
    if isinstance(body, dict) and "Items" in body:
        return body["Items"]
    if isinstance(body, dict) and "value" in body:
        return body["value"]
    return [body]


def _first_params(sim, job) -> dict:
    """A real parameter set for a parameterized job: one whose endpoint returns records if any."""
    truth = sim.expected(job.endpoint)
    if truth:
        return truth[0]["params"]
    return sim.parents(job.endpoint)[0]


def test_catalog_has_72_runnable_and_16_invalid_jobs():
    assert len(RUNNABLE) == 72
    assert len(INVALID) == 16


@pytest.mark.parametrize("job", RUNNABLE, ids=lambda j: f"job{j.id}")
def test_every_runnable_job_endpoint_answers_200(cc_simulator, job):
    sim = cc_simulator
    params = _first_params(sim, job) if job.requires_parameters else {}
    path = job.render_endpoint(params)
    r = sim.get(path, params={"$top": "5"} if job.paging == "odata" else None)
    assert r.status_code == 200, (path, r.text)
    records = _items(r.json())
    if job.requires_parameters and sim.expected(job.endpoint):
        assert records, f"{path} returned no records although the ground truth has some"
    for rec in records:
        if isinstance(rec, dict):
            if job.timestamp_field:
                assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec[job.timestamp_field]), rec
            for key in job.primary_key:
                if key.startswith("$"):
                    continue
                value = rec
                for part in key.split("."):
                    value = value[part]
                assert value is not None, (job.id, key)


@pytest.mark.parametrize("job", INVALID, ids=lambda j: f"job{j.id}")
def test_invalid_job_endpoints_answer_404_or_501(cc_simulator, job):
    path = job.render_endpoint({p: 10001 for p in job.placeholders})
    r = cc_simulator.get(path)
    expected = 501 if job.id in (30, 31) else 404
    assert r.status_code == expected
    assert r.json()["status"] == expected


def test_auth_missing_wrong_and_both_header_names(cc_simulator):
    sim = cc_simulator
    url = f"{sim.base_url}/api/v1/sites"
    r = requests.get(url, timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert "test-key" not in r.text
    assert requests.get(url, headers={"X-ApiKey": "wrong"}, timeout=10).status_code == 401
    assert requests.get(url, headers={"X-ApiKey": "test-key"}, timeout=10).status_code == 200
    assert requests.get(url, headers={"CCAPIKey": "test-key"}, timeout=10).status_code == 200


def test_unknown_parent_404_and_parent_without_children_200_empty(cc_simulator):
    sim = cc_simulator
    r = sim.get("/api/v1/studies/999999999/subjects/odata")
    assert r.status_code == 404 and "does not exist" in r.json()["message"]
    with_subjects = {row["params"]["studyId"] for row in sim.expected("/api/v1/studies/{studyId}/subjects/odata")}
    empty = next(p["studyId"] for p in sim.parents("/api/v1/studies/{studyId}/subjects/odata")
                 if p["studyId"] not in with_subjects)
    r = sim.get(f"/api/v1/studies/{empty}/subjects/odata", params={"$count": "true"})
    assert r.status_code == 200
    assert r.json()["Items"] == [] and r.json()["Count"] == 0
    # a subject that exists but belongs to another study
    row = sim.expected("/api/v1/studies/{studyId}/subjects/{subjectId}/patient-visits")[0]["params"]
    r = sim.get(f"/api/v1/studies/{empty}/subjects/{row['subjectId']}/patient-visits")
    assert r.status_code == 404 and "does not belong" in r.json()["message"]
    assert sim.get(f"/api/v1/studies/{row['studyId']}/subjects/{row['subjectId']}/patient-visits").status_code == 200


def test_paging_returns_every_id_once_and_matches_count_and_ground_truth(cc_simulator):
    sim = cc_simulator
    seen: list[int] = []
    skip, total = 0, None
    while True:
        body = sim.get("/api/v1/patient-visits/odata", params={"$top": 1000, "$skip": skip, "$count": "true"}).json()
        total = body["Count"]
        seen.extend(r["id"] for r in body["Items"])
        if len(body["Items"]) < 1000:
            break
        skip += 1000
    assert len(seen) == len(set(seen)) == total
    truth = {row["record"]["id"] for row in sim.expected("/api/v1/patient-visits/odata")}
    assert set(seen) == truth
    assert total == sim.counts()["/api/v1/patient-visits/odata"]["records"]


def test_next_page_link_walks_the_whole_collection(cc_simulator):
    sim = cc_simulator
    url = f"{sim.base_url}/api/v1/appointments/odata?$top=400"
    ids: list[int] = []
    while url:
        body = requests.get(url, headers=sim.headers, timeout=30).json()
        ids.extend(r["id"] for r in body["Items"])
        url = body["NextPageLink"]
    truth = [row["record"]["id"] for row in sim.expected("/api/v1/appointments/odata")]
    assert ids == truth


def test_default_top_is_50_and_top_above_1000_is_rejected(cc_simulator):
    sim = cc_simulator
    assert len(sim.get("/api/v1/patient-visits/odata").json()["Items"]) == 50
    r = sim.get("/api/v1/patient-visits/odata", params={"$top": "1001"})
    assert r.status_code == 400 and "1000" in r.json()["message"]
    assert len(sim.get("/api/v1/patient-visits/odata", params={"$top": "1000"}).json()["Items"]) == 1000
    assert sim.get("/api/v1/patient-visits/odata", params={"$skip": "-1"}).status_code == 400


@pytest.mark.parametrize("literal", ["2022-06-01T00:00:00Z", "2022-06-01T00:00:00.000Z",
                                     "2022-06-01T02:00:00+02:00", "datetime'2022-06-01T00:00:00'",
                                     "2022-06-01T00:00:00.0000000Z"])
def test_filter_literal_forms_agree(cc_simulator, literal):
    sim = cc_simulator
    body = sim.get("/api/v1/appointments/odata",
                   params={"$filter": f"modifiedDate gt {literal}", "$count": "true", "$top": 1000}).json()
    truth = [r["record"] for r in sim.expected("/api/v1/appointments/odata")]
    want = sorted(r["id"] for r in truth if r["modifiedDate"] > "2022-06-01T00:00:00.000Z")
    assert body["Count"] == len(want)
    assert [r["id"] for r in body["Items"]] == want[:1000]  # default order: by id


def test_filter_combinations_and_orderby(cc_simulator):
    sim = cc_simulator
    truth = [r["record"] for r in sim.expected("/api/v1/patient-visits/odata")]
    lo, hi = "2021-01-01T00:00:00.000Z", "2023-01-01T00:00:00.000Z"
    ids = [r["id"] for r in truth]
    mid = ids[len(ids) // 2]
    flt = f"modifiedDate ge {lo} and modifiedDate lt {hi} and id gt {mid} and createdDate le 2024-01-01T00:00:00Z"
    want = [r for r in truth if lo <= r["modifiedDate"] < hi and r["id"] > mid
            and r["createdDate"] <= "2024-01-01T00:00:00.000Z"]
    want.sort(key=lambda r: (r["modifiedDate"], r["id"]))
    got: list[dict] = []
    skip = 0
    while True:
        page = sim.get("/api/v1/patient-visits/odata", params={"$filter": flt, "$orderby": "modifiedDate",
                                                                "$top": 300, "$skip": skip}).json()["Items"]
        got.extend(page)
        if len(page) < 300:
            break
        skip += 300
    assert [r["id"] for r in got] == [r["id"] for r in want]
    desc = sim.get("/api/v1/patient-visits/odata", params={"$orderby": "modifiedDate desc", "$top": 5}).json()["Items"]
    assert [r["id"] for r in desc] == [r["id"] for r in sorted(truth, key=lambda r: (r["modifiedDate"], -r["id"]),
                                                                 reverse=True)[:5]]
    bad = sim.get("/api/v1/studies/odata", params={"$filter": "modifiedDate gt 2024-01-01T00:00:00Z"})
    assert bad.status_code == 400 and "lastUpdatedOn" in bad.json()["message"]
    ok = sim.get("/api/v1/studies/odata", params={"$filter": "lastUpdatedOn gt 2024-01-01T00:00:00Z"})
    assert ok.status_code == 200 and all(r["lastUpdatedOn"] > "2024-01-01" for r in ok.json())


def test_spec_shapes_page_result_and_arrays(cc_simulator):
    sim = cc_simulator
    assert isinstance(sim.get("/api/v1/studies/odata").json(), list)  # the spec says array
    assert isinstance(sim.get("/api/v1/patients/odata").json(), list)
    page = sim.get("/api/v1/appointments/odata", params={"$top": 3}).json()
    assert set(page) == {"Items", "Count", "NextPageLink"} and page["Count"] is None
    assert isinstance(sim.get("/api/v1/system/lookup-lists").json()[0], str)
    study = sim.get("/api/v1/studies/odata", params={"$top": 1}).json()[0]
    detail = sim.get(f"/api/v1/studies/{study['id']}").json()
    assert detail == study


def test_nested_references_are_consistent(cc_simulator):
    sim = cc_simulator
    for row in sim.expected("/api/v1/studies/{studyId}/subjects/odata"):
        assert row["record"]["study"]["id"] == row["params"]["studyId"]
    subjects = {r["record"]["id"]: r["record"] for r in sim.expected("/api/v1/studies/{studyId}/subjects/odata")}
    for row in sim.expected("/api/v1/studies/{studyId}/subjects/{subjectId}/patient-visits")[:500]:
        rec, p = row["record"], row["params"]
        assert rec["subject"]["id"] == p["subjectId"] and rec["study"]["id"] == p["studyId"]
        assert subjects[p["subjectId"]]["study"]["id"] == p["studyId"]
    for row in sim.expected("/api/v1/studies/{studyId}/visits/{visitId}/elements/odata"):
        assert row["record"]["visit"]["id"] == row["params"]["visitId"]


def test_metrics_use_route_templates(cc_simulator):
    sim = cc_simulator
    sim.get("/api/v1/studies/10001/subjects/odata")
    text = requests.get(f"http://127.0.0.1:{sim.port}/metrics", timeout=10).text
    assert 'trialsync_sim_requests_total{route="/api/v1/studies/{studyId}/subjects/odata",status="200"}' in text
    assert "studies/10001" not in text
    assert sim.requests_to("/api/v1/studies/{studyId}/subjects/odata") >= 1


def test_every_runnable_job_endpoint_answers_200_at_demo_scale():
    """The issue's scale (0.01): one call per job endpoint with a parent that has records."""
    import json

    from simulator.testing import SimulatorProcess

    with SimulatorProcess(scale=0.01, seed=3, api_key="demo-key") as sim:
        for job in RUNNABLE:
            params = {}
            if job.requires_parameters:
                with requests.get(f"{sim.admin_url}/expected", params={"endpoint": job.endpoint}, stream=True,
                                  timeout=60) as r:
                    line = next(r.iter_lines(), None)
                params = json.loads(line)["params"] if line else sim.parents(job.endpoint)[0]
            path = job.render_endpoint(params)
            r = sim.get(path, params={"$top": "5"} if job.paging == "odata" else None)
            assert r.status_code == 200, (job.id, path, r.text[:200])
        assert sim.stats()["total_requests"] == len(RUNNABLE)
