"""The simulator process's metric families move when it serves requests, records and faults
(scraped over real HTTP from a real `trialsync simulator serve`)."""

from __future__ import annotations

import pytest
import requests

from simulator.testing import SimulatorProcess
from tests.integration.metrics_helpers import scrape, total

pytestmark = pytest.mark.integration


def test_simulator_families_move() -> None:
    with SimulatorProcess(scale=0.002, seed=7) as sim:
        metrics_url = sim.base_url.rsplit("/CCSWEB", 1)[0] + "/metrics"
        before = scrape(metrics_url)
        h = {sim.key_header: sim.api_key}
        r = requests.get(f"{sim.base_url}/api/v1/sites", headers=h, timeout=30)
        assert r.status_code == 200
        n = len(r.json()) if isinstance(r.json(), list) else len(r.json().get("Items", r.json().get("value", [])))
        assert requests.get(f"{sim.base_url}/api/v1/sites", timeout=30).status_code == 401
        sim.set_faults("500@/api/v1/sites,count=1")
        assert requests.get(f"{sim.base_url}/api/v1/sites", headers=h, timeout=30).status_code == 500
        after = scrape(metrics_url)
    assert total(after, "trialsync_sim_requests_total", status="200") - \
        total(before, "trialsync_sim_requests_total", status="200") >= 1
    assert total(after, "trialsync_sim_requests_total", status="401") > total(before, "trialsync_sim_requests_total",
                                                                               status="401")
    assert total(after, "trialsync_sim_records_served_total") - total(before, "trialsync_sim_records_served_total") \
        >= n > 0
    assert total(after, "trialsync_sim_faults_injected_total") > total(before, "trialsync_sim_faults_injected_total")
    for (name, labels), _ in after.items():
        if name.startswith("trialsync_sim_"):
            assert sim.api_key not in str(labels)
