"""Change over time over real HTTP: the clock, modify/insert/delete, incremental filters that see
exactly the changes, and determinism across processes."""

from __future__ import annotations

import hashlib

import pytest

from simulator.testing import SimulatorError, SimulatorProcess

pytestmark = pytest.mark.integration

SUBJECTS_T = "/api/v1/studies/{studyId}/subjects/odata"


def _all(sim, path: str, params: dict | None = None) -> list[dict]:
    out, skip = [], 0
    while True:
        body = sim.get(path, params={**(params or {}), "$top": 1000, "$skip": skip}).json()
        items = body["Items"] if isinstance(body, dict) else body
        out.extend(items)
        if len(items) < 1000:
            return out
        skip += 1000


@pytest.fixture
def sim():
    with SimulatorProcess(scale=0.002, seed=11, api_key="change-key") as s:
        yield s


def test_filter_returns_exactly_the_modified_and_inserted_records(sim):
    watermark = max(r["modifiedDate"] for r in _all(sim, "/api/v1/appointments/odata"))
    sim.advance_clock(3600)
    res = sim.mutate("appointments", modify=0.1, insert=0.02)
    changed = set(res["modified"]) | set(res["inserted"])
    assert res["counts"]["modified"] > 0 and res["counts"]["inserted"] > 0
    got = _all(sim, "/api/v1/appointments/odata", {"$filter": f"modifiedDate gt {watermark}"})
    assert {r["id"] for r in got} == changed
    assert all(r["modifiedDate"] > watermark for r in got)
    # a second mutation is strictly newer than the first
    wm2 = max(r["modifiedDate"] for r in got)
    res2 = sim.mutate("appointments", modify_count=3)
    got2 = _all(sim, "/api/v1/appointments/odata", {"$filter": f"modifiedDate gt {wm2}"})
    assert {r["id"] for r in got2} == set(res2["modified"])


def test_modify_changes_content_and_bumps_the_study_timestamp(sim):
    before = {r["id"]: r for r in sim.get("/api/v1/studies").json()}
    res = sim.mutate("studies", modify_ids=[min(before)])
    after = {r["id"]: r for r in sim.get("/api/v1/studies").json()}
    sid = res["modified"][0]
    assert after[sid]["status"] != before[sid]["status"]
    assert after[sid]["lastUpdatedOn"] > before[sid]["lastUpdatedOn"]
    assert after[sid]["lastUpdatedOn"].startswith("2025-12-01T")
    assert {k: v for k, v in after.items() if k != sid} == {k: v for k, v in before.items() if k != sid}


def test_deleted_records_disappear_and_their_parent_path_404s(sim):
    truth = sim.expected(SUBJECTS_T)
    study = truth[0]["params"]["studyId"]
    sim.mutate("studies", delete_ids=[study])
    assert sim.get(f"/api/v1/studies/{study}/subjects/odata").status_code == 404
    assert sim.get(f"/api/v1/studies/{study}").status_code == 404
    assert study not in {r["id"] for r in sim.get("/api/v1/studies").json()}
    after = sim.expected(SUBJECTS_T)
    assert {r["params"]["studyId"] for r in after} == {r["params"]["studyId"] for r in truth} - {study}
    res = sim.mutate("patient_visits", delete=0.05)
    ids = {r["id"] for r in _all(sim, "/api/v1/patient-visits/odata")}
    assert not ids & set(res["deleted"])
    assert len(ids) == sim.counts()["/api/v1/patient-visits/odata"]["records"]


def test_inserted_children_appear_under_their_parent(sim):
    row = sim.expected(SUBJECTS_T)[0]["params"]
    res = sim.mutate("subjects", insert_count=2, parent_id=row["studyId"])
    items = sim.get(f"/api/v1/studies/{row['studyId']}/subjects/odata", params={"$count": "true"}).json()
    ids = [r["id"] for r in items["Items"]]
    assert set(res["inserted"]) <= set(ids) and items["Count"] == len(ids)
    assert all(r["study"]["id"] == row["studyId"] for r in items["Items"])
    truth = {r["record"]["id"] for r in sim.expected(SUBJECTS_T)}
    assert set(res["inserted"]) <= truth


def test_records_without_ids_mutate_by_fraction(sim):
    res = sim.mutate("subject_statuses", modify=0.2)
    assert res["counts"]["modified"] > 0 and "subject" in res["modified"][0]
    with pytest.raises(SimulatorError, match="no id field"):
        sim.mutate("subject_statuses", delete_ids=[1])
    with pytest.raises(SimulatorError, match="cannot take inserts"):
        sim.mutate("visit_element_rels", insert_count=1)
    with pytest.raises(SimulatorError, match="unknown entity"):
        sim.mutate("nope", modify=0.1)


def _fingerprint(sim) -> str:
    h = hashlib.sha256()
    for path, params in (("/api/v1/patient-visits/odata", {"$top": 1000, "$skip": 1000}),
                         ("/api/v1/studies/odata", {"$top": 50}),
                         ("/api/v1/subject-statuses/odata", {"$top": 200, "$count": "true"}),
                         ("/api/v1/system/lookup-lists", None)):
        # paging links are absolute: the only bytes that may differ are the server's own address
        h.update(sim.get(path, params=params).content.replace(sim.base_url.encode(), b"BASE"))
    return h.hexdigest()


def test_same_seed_same_bytes_different_seed_different_bytes():
    with SimulatorProcess(scale=0.002, seed=5, api_key="a") as a, \
            SimulatorProcess(scale=0.002, seed=5, api_key="b") as b, \
            SimulatorProcess(scale=0.002, seed=6, api_key="c") as c:
        assert _fingerprint(a) == _fingerprint(b)
        assert _fingerprint(a) != _fingerprint(c)
        # the same admin calls keep them identical
        for s in (a, b):
            s.advance_clock(60)
            s.mutate("patient_visits", modify=0.01, insert=0.01, delete=0.01)
        assert _fingerprint(a) == _fingerprint(b)
        assert a.expected("/api/v1/patient-visits/odata") == b.expected("/api/v1/patient-visits/odata")
