"""Fault grammar and decisions, the rate limiter, mutations and routes (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.jobs import JobCatalog
from simulator.data import DataModel
from simulator.faults import FaultInjector, FaultSpecError, parse_faults, rules_from_json
from simulator.model import ENTITIES
from simulator.ratelimit import TokenBucketLimiter
from simulator.spec import Router, build_routes, definitions
from simulator.state import MutationError, SimState


def test_fault_grammar():
    rules = parse_faults("429@/api/v1/patients/*,p=0.1,retry_after=2; reset,count=3;latency,ms=200,jitter_ms=50")
    assert [(r.kind, r.pattern) for r in rules] == [("429", "/api/v1/patients/*"), ("reset", "*"), ("latency", "*")]
    assert rules[0].p == 0.1 and rules[0].retry_after == 2 and rules[1].count == 3 and rules[2].jitter_ms == 50
    assert rules_from_json([{"kind": "500", "pattern": "*/odata", "count": 1}])[0].pattern == "*/odata"
    for bad, msg in (("teapot", "unknown fault kind"), ("500,p=2", "probability"), ("500,foo=1", "unknown fault option"),
                     ("latency", "needs ms"), ("500,count", "key=value"), ("500,p=x", "not a number")):
        with pytest.raises(FaultSpecError, match=msg):
            parse_faults(bad)


def test_fault_decisions_count_after_and_reproducibility():
    inj = FaultInjector(1, parse_faults("503@/a/*,after=1,count=2;latency,ms=10"))
    kinds = [(d.kind if d else None) for d in (inj.decide("/a/{x}", "/a/1") for _ in range(5))]
    assert kinds == [None, "503", "503", None, None]
    assert inj.decide("/b", "/b") is not None  # latency matches everything
    seq = []
    for _ in range(2):
        inj.set(parse_faults("500,p=0.5"))
        seq.append([bool(inj.decide("/x", "/x")) for _ in range(64)])
    assert seq[0] == seq[1] and 10 < sum(seq[0]) < 54


def test_token_bucket():
    lim = TokenBucketLimiter(2.0)
    assert lim.take(b"k", now=0.0) == 0 and lim.take(b"k", now=0.0) == 0
    wait = lim.take(b"k", now=0.0)
    assert wait == pytest.approx(0.5) and TokenBucketLimiter.retry_after(wait) == 1
    assert lim.take(b"other", now=0.0) == 0  # per key
    assert lim.take(b"k", now=0.6) == 0


def test_every_catalog_endpoint_has_a_route_and_invalid_ones_answer_their_status():
    routes = {r.template: r for r in build_routes()}
    for job in JobCatalog.load():
        r = routes[job.endpoint]
        if job.is_valid:
            assert r.kind != "invalid" and r.entity
        else:
            assert r.status == (501 if job.id in (30, 31) else 404)
    router = Router(list(routes.values()))
    route, values = router.match("/api/v1/Studies/12/Visits/34/elements/odata/")
    assert route.template == "/api/v1/studies/{studyId}/visits/{visitId}/elements/odata" and values == (12, 34)
    assert router.match("/api/v1/studies/abc/subjects/odata") is None
    assert router.match("/api/v1/sites")[0].template == "/api/v1/sites"


def test_mutations_are_deterministic_and_consistent():
    def run():
        m = DataModel(9, 0.002, definitions(), ENTITIES)
        st = SimState(m)
        st.advance(10)
        r1 = st.mutate("patients", modify=0.1, insert=0.05, delete=0.05)
        r2 = st.mutate("subject_statuses", modify_count=3)
        return m, st, r1, r2

    (m, st, a1, a2), (_, _, b1, b2) = run(), run()
    assert a1.as_dict() == b1.as_dict() and a2.as_dict() == b2.as_dict()
    e = m.entity("patients")
    assert not set(a1.modified) & set(a1.deleted)
    assert e.n_live == e.n_base + len(a1.inserted) - len(a1.deleted)
    for pid in a1.deleted:
        assert e.index_of_id(pid) == -1
    recs = m.build(e, np.asarray([e.index_of_id(i) for i in a1.modified + a1.inserted]))
    assert all(r["modifiedDate"] >= "2025-12-01T00:00:10.000Z" for r in recs)
    with pytest.raises(MutationError, match="fraction"):
        st.mutate("patients", modify=2)
    with pytest.raises(MutationError, match="no live record"):
        st.mutate("patients", delete_ids=a1.deleted[:1])
    with pytest.raises(MutationError, match="only moves forward"):
        st.advance(-1)


def test_touch_parents_stamps_every_ancestor_of_a_changed_child_and_nothing_else():
    m = DataModel(9, 0.002, definitions(), ENTITIES)
    st = SimState(m)
    pve, pv, subj, study = (m.entity(n) for n in ("patient_visit_elements", "patient_visits", "subjects", "studies"))
    before = {e.name: e.modified.copy() for e in (pv, subj, study)}

    st.mutate("patient_visit_elements", modify_count=1)  # default: parents untouched
    assert all((e.modified == before[e.name]).all() for e in (pv, subj, study))

    r = st.mutate("patient_visit_elements", modify_count=2, touch_parents=True)
    child = np.asarray([pve.index_of_id(i) for i in r.modified])
    stamp = int(pve.modified[child].max())
    chain = {"patient_visits": m.parent_of(pve, child)}
    chain["subjects"] = m.parent_of(pv, chain["patient_visits"])
    chain["studies"] = m.parent_of(subj, chain["subjects"])
    for e in (pv, subj, study):
        touched = np.unique(chain[e.name])
        assert (e.modified[touched] >= stamp).all(), e.name
        untouched = np.setdiff1d(np.arange(e.n_base), touched)
        assert (e.modified[untouched] == before[e.name][untouched]).all(), e.name
    # the API shows it: the touched visit's modifiedDate is the change's time
    rec = m.build(pv, chain["patient_visits"][:1])[0]
    assert rec["modifiedDate"] >= max(c["modifiedDate"] for c in m.build(pve, child))
