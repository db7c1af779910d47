"""Every fault type occurs as configured, by count and by probability, reproducibly; the rate
limit answers 429 with Retry-After; the ground truth is never faulted."""

from __future__ import annotations

import http.client
import json
import time

import pytest
import requests

from simulator.testing import SimulatorProcess

pytestmark = pytest.mark.integration

PV = "/api/v1/patient-visits/odata"
PV_T = "/api/v1/patient-visits/odata"


@pytest.fixture(scope="module")
def sim():
    with SimulatorProcess(scale=0.002, seed=7, api_key="fault-key") as s:
        yield s


@pytest.fixture(autouse=True)
def _clean(sim):
    sim.clear_faults()
    sim.reset_stats()
    yield
    sim.clear_faults()


def _raw_get(sim, path: str) -> tuple[int, bytes]:
    """GET with http.client so a broken body is seen as such (no retries, no decoding)."""
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=30)
    try:
        conn.request("GET", "/CCSWEB" + path, headers=sim.headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("status", [429, 500, 502, 503])
def test_status_faults_fire_exactly_count_times(sim, status):
    sim.set_faults(f"{status}@{PV_T},count=2,retry_after=3")
    got = [sim.get(PV, params={"$top": 5}) for _ in range(4)]
    assert [r.status_code for r in got] == [status, status, 200, 200]
    if status in (429, 503):
        assert got[0].headers["Retry-After"] == "3"
    assert got[0].json()["error"] == "injected_fault"
    assert sim.stats()["requests"][PV_T] == {str(status): 2, "200": 2}
    assert sim.faults_status()["injected"][str(status)] == 2


def test_pattern_matches_templates_and_concrete_paths_only(sim):
    sim.set_faults("500@/api/v1/studies/*/subjects/odata")
    row = sim.expected("/api/v1/studies/{studyId}/subjects/odata")[0]["params"]
    assert sim.get(f"/api/v1/studies/{row['studyId']}/subjects/odata").status_code == 500
    assert sim.get(PV).status_code == 200
    sim.set_faults(f"503@/api/v1/studies/{row['studyId']}/subjects/odata")
    assert sim.get(f"/api/v1/studies/{row['studyId']}/subjects/odata").status_code == 503


def test_connection_reset(sim):
    sim.set_faults(f"reset@{PV_T},count=1")
    with pytest.raises(requests.ConnectionError):
        requests.get(sim.base_url + PV, headers=sim.headers, timeout=10)
    assert sim.get(PV).status_code == 200
    assert sim.stats()["requests"][PV_T] == {"200": 1, "reset": 1}


def test_truncated_body(sim):
    sim.set_faults(f"truncate@{PV_T},count=1")
    with pytest.raises(http.client.IncompleteRead):
        _raw_get(sim, PV + "?$top=200")
    status, body = _raw_get(sim, PV + "?$top=200")
    assert status == 200 and len(json.loads(body)["Items"]) == 200


def test_malformed_json(sim):
    sim.set_faults(f"malformed@{PV_T},count=1")
    status, body = _raw_get(sim, PV + "?$top=20")
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(body)
    assert json.loads(_raw_get(sim, PV + "?$top=20")[1])["Items"]


def test_record_without_id_and_duplicate_record(sim):
    sim.set_faults(f"no_id@{PV_T},count=1")
    items = sim.get(PV, params={"$top": 50}).json()["Items"]
    assert len(items) == 50 and sum("id" not in r for r in items) == 1
    sim.set_faults(f"duplicate@{PV_T},count=1")
    items = sim.get(PV, params={"$top": 50}).json()["Items"]
    ids = [r["id"] for r in items]
    assert len(ids) == 51 and len(set(ids)) == 50
    clean = [r["id"] for r in sim.get(PV, params={"$top": 50}).json()["Items"]]
    assert sorted(set(ids)) == clean  # nothing lost, one record twice


def test_record_fault_on_empty_page_does_not_use_up_the_count(sim):
    sim.set_faults(f"duplicate@{PV_T},count=1")
    assert sim.get(PV, params={"$top": 5, "$skip": 10**7}).json()["Items"] == []
    ids = [r["id"] for r in sim.get(PV, params={"$top": 5}).json()["Items"]]
    assert len(ids) == 6


def test_latency_fixed_and_jittered_and_slow_drip(sim):
    sim.set_faults(f"latency@{PV_T},ms=300,count=1")
    t = time.monotonic()
    assert sim.get(PV, params={"$top": 1}).status_code == 200
    assert time.monotonic() - t >= 0.3
    sim.set_faults(f"latency@{PV_T},ms=100,jitter_ms=200,count=1")
    t = time.monotonic()
    sim.get(PV, params={"$top": 1})
    assert time.monotonic() - t >= 0.1
    sim.set_faults(f"drip@{PV_T},ms=600,chunks=6,count=1")
    t = time.monotonic()
    r = sim.get(PV, params={"$top": 100})
    assert time.monotonic() - t >= 0.5
    assert len(r.json()["Items"]) == 100  # slow, but complete
    assert sim.faults_status()["injected"]["drip"] == 1


def test_probability_faults_are_reproducible_from_the_seed(sim):
    def pattern() -> list[int]:
        sim.set_faults(f"500@{PV_T},p=0.3")
        return [sim.get(PV, params={"$top": 1}).status_code for _ in range(40)]

    first, second = pattern(), pattern()
    assert first == second
    assert 0 < first.count(500) < 40


def test_after_skips_the_first_matching_requests(sim):
    sim.set_faults(f"502@{PV_T},after=2,count=1")
    assert [sim.get(PV, params={"$top": 1}).status_code for _ in range(4)] == [200, 200, 502, 200]


def test_ground_truth_is_never_faulted(sim):
    sim.set_faults("500;reset;malformed")
    rows = sim.expected(PV_T)
    assert len(rows) == sim.counts()[PV_T]["records"]


def test_bad_fault_spec_is_rejected_with_a_clear_message(sim):
    with pytest.raises(Exception, match="unknown fault kind"):
        sim.set_faults("418@*")


def test_faults_from_the_command_line():
    with SimulatorProcess(scale=0.002, faults=f"503@{PV_T},count=1", api_key="k") as s:
        assert s.get(PV).status_code == 503
        assert s.get(PV).status_code == 200


def test_rate_limit_answers_429_with_retry_after():
    with SimulatorProcess(scale=0.002, rate_limit=5, api_key="rl-key") as s:
        codes = [s.get("/api/v1/sites") for _ in range(30)]
        limited = [r for r in codes if r.status_code == 429]
        assert limited, [r.status_code for r in codes]
        assert int(limited[0].headers["Retry-After"]) >= 1
        assert codes[0].status_code == 200
        assert s.requests_to("/api/v1/sites", 429) == len(limited)
