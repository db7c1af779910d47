"""The simulator's ground truth (`/_sim/expected`) is what its API serves, content included.

Every exactness check (the fault suite's reconciliation, the demo test) compares Bronze with the
ground truth; if a record's content depended on how it was generated (one parent's page vs. all
parents at once), a correct pipeline would be reported stale. Found by the fault suite: study
personnel's ``Staff[].Priority`` followed the record's place in the generated batch.
"""

from __future__ import annotations

from typing import Any

import pytest

from schemas.jobs import JobCatalog
from simulator.reconcile import canonical

pytestmark = pytest.mark.integration

RUNNABLE = JobCatalog.load().runnable


def _items(body: Any) -> list[Any]:
    if isinstance(body, list):
        return body
    if isinstance(body, dict) and "Items" in body:
        return body["Items"]
    if isinstance(body, dict) and "value" in body:
        return body["value"]
    return [body]


def _served(sim: Any, job: Any, params: dict[str, Any]) -> list[Any]:
    """Every record the API serves for one parameter set (all pages)."""
    path = job.render_endpoint(params)
    if job.paging != "odata":
        r = sim.get(path)
        assert r.status_code == 200, (path, r.text)
        return _items(r.json())
    out: list[Any] = []
    while True:
        r = sim.get(path, params={"$top": "1000", "$skip": str(len(out))})
        assert r.status_code == 200, (path, r.text)
        page = _items(r.json())
        out += page
        if len(page) < 1000:
            return out


@pytest.mark.parametrize("job", RUNNABLE, ids=lambda j: f"job{j.id}")
def test_api_serves_exactly_the_ground_truth(cc_simulator: Any, job: Any) -> None:
    sim = cc_simulator
    truth = sim.expected(job=job.id)
    by_params: dict[str, list[bytes]] = {}
    order: list[dict[str, Any]] = []
    for item in truth:
        k = canonical(item.get("params") or {}).decode()
        if k not in by_params:
            order.append(item.get("params") or {})
        by_params.setdefault(k, []).append(canonical(item["record"]))
    if not job.requires_parameters:
        order = [{}]
    elif len(order) > 3:  # first, middle and last parent with children
        order = [order[0], order[len(order) // 2], order[-1]]
    for params in order:
        want = sorted(by_params.get(canonical(params).decode(), []))
        got = sorted(canonical(r) for r in _served(sim, job, params))
        assert got == want, f"job {job.id} {job.render_endpoint(params)}: API and /_sim/expected differ"
