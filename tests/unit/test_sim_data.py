"""The lazy data model: determinism, volumes, shapes, referential consistency, catalog keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from schemas.jobs import JobCatalog
from simulator.data import DataModel, allocate, fmt_ts, mix64, mix_np
from simulator.model import ENTITIES
from simulator.spec import definitions


def _model(seed=42, scale=0.002):
    return DataModel(seed, scale, definitions(), ENTITIES)


def _all(m, name):
    e = m.entity(name)
    return m.build(e, np.arange(e.n_total))


def test_hash_python_and_numpy_agree():
    xs = np.array([0, 1, 2**40 + 7, 2**64 - 1], dtype=np.uint64)
    assert mix_np(xs).tolist() == [mix64(int(x)) for x in xs]


def test_allocate_is_exact_and_respects_zero_weights():
    w = np.array([0.0, 1.0, 3.0, 0.0, 2.0])
    c = allocate(17, w)
    assert c.sum() == 17 and c[0] == 0 and c[3] == 0


def test_same_seed_same_records_other_seed_other_records():
    a, b, c = _model(1), _model(1), _model(2)
    for name in ("studies", "patient_visits", "subject_statuses", "study_personnel"):
        assert json.dumps(_all(a, name)[:50]) == json.dumps(_all(b, name)[:50])
    assert json.dumps(_all(a, "patients")[:20]) != json.dumps(_all(c, "patients")[:20])


def test_production_volumes_at_scale_one():
    m = DataModel(42, 1.0, definitions(), ENTITIES)
    want = {"patient_visits": 2_297_271, "patient_visit_elements": 2_090_584, "appointments": 860_893,
            "studies": 157_270, "patients": 152_836, "subject_statuses": 119_749, "subjects": 88_773}
    assert {k: m.entity(k).n_base for k in want} == want
    e = m.entity("patient_visits")
    assert (e.counts == 0).sum() > 0 and e.counts.max() > 2 * e.counts.mean()  # children per parent vary


def test_timestamps_are_iso_utc_with_z_and_modified_after_created():
    m = _model()
    for name in ("studies", "staff", "providers", "subjects", "appointments"):
        e = m.entity(name)
        assert (e.modified >= e.created).all()
        for r in m.build(e, np.arange(min(20, e.n_total))):
            assert r[e.d.ts_field].endswith("Z") and r[e.d.ts_field][10] == "T"
    assert fmt_ts(np.array([0])) == ["1970-01-01T00:00:00.000Z"]


def test_timestamp_field_per_job_matches_the_catalog():
    from simulator.spec import ROUTE_TABLE

    m = _model()
    for job in JobCatalog.load().runnable:
        entity, _ = ROUTE_TABLE[job.endpoint]
        e = m.entity(entity)
        if e.d.strings is None:
            assert e.d.ts_field == job.timestamp_field, job.id


def test_records_follow_spec_field_names_and_types():
    m = _model()
    defs = definitions()
    types = {"integer": int, "number": (int, float), "boolean": bool, "string": str, "array": list}
    for d in ENTITIES:
        if d.definition is None:
            continue
        props = defs[d.definition]["properties"]
        for rec in m.build(m.entity(d.name), np.arange(min(10, m.entity(d.name).n_total))):
            for k, v in rec.items():
                if k in props and v is not None and "type" in props[k]:
                    assert isinstance(v, types[props[k]["type"]]), (d.name, k, v)
                elif k not in props:
                    assert k in (d.ts_field, d.created_field, "id"), (d.name, k)


def test_referential_consistency():
    m = _model()
    study_ids = {r["id"] for r in _all(m, "studies")}
    patient_ids = {r["id"] for r in _all(m, "patients")}
    subjects = {r["id"]: r for r in _all(m, "subjects")}
    assert all(s["study"]["id"] in study_ids and s["patient"]["id"] in patient_ids for s in subjects.values())
    visits = {r["id"]: r for r in _all(m, "study_visits")}
    for pv in _all(m, "patient_visits"):
        subj = subjects[pv["subject"]["id"]]
        assert pv["study"]["id"] == subj["study"]["id"] == visits[pv["visitId"]]["study"]["id"]
    elements = {r["id"]: r for r in _all(m, "elements")}
    e = m.entity("visit_element_rels")
    for rel in _all(m, "visit_element_rels"):
        assert elements[rel["element"]["id"]]["study"]["id"] == visits[rel["visit"]["id"]]["study"]["id"]
    assert e.n_base > 0


@pytest.mark.parametrize("job_id", [127, 141, 144, 145, 174, 175, 136, 158, 159])
def test_catalog_keys_exist_and_are_unique_per_parent(job_id):
    from simulator.spec import ROUTE_TABLE

    m = _model()
    job = JobCatalog.load().get(job_id)
    entity = m.entity(ROUTE_TABLE[job.endpoint][0])
    idx = np.arange(entity.n_total)
    parents = m.parent_of(entity, idx).tolist() if entity.parent is not None else [0] * len(idx)
    keys = set()
    for p, rec in zip(parents, m.build(entity, idx), strict=True):
        key = [p]
        for path in job.primary_key:
            if path.startswith("$param"):
                continue
            v = rec
            for part in path.split("."):
                v = v[part]
            assert v is not None, (job_id, path)
            key.append(v)
        keys.add(tuple(key))
    assert len(keys) == len(idx), job_id


@pytest.mark.slow
def test_scale_one_model_stays_under_two_gib():
    """The whole scale-1.0 model (≈6 M records), warmed and paged, in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import resource, numpy as np\n"
        "from simulator.data import DataModel\nfrom simulator.model import ENTITIES\n"
        "from simulator.spec import definitions\nfrom simulator.odata import QueryEngine, parse_query\n"
        "m = DataModel(42, 1.0, definitions(), ENTITIES); m.warm()\n"
        "e = m.entity('patient_visits'); eng = QueryEngine(m)\n"
        "q = parse_query({'$filter': 'modifiedDate gt 2023-01-01T00:00:00Z', '$orderby': 'modifiedDate', '$top': '1000'}, e)\n"
        "total, idx = eng.run(e, None, q); m.build(e, idx)\n"
        "print(e.n_base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    n, maxrss_kib = map(int, out.stdout.split())
    assert n == 2_297_271
    assert maxrss_kib < 2 * 1024 * 1024, f"peak RSS {maxrss_kib / 1024:.0f} MiB"


def test_values_are_plausible_where_the_warehouse_checks_them():
    """The transform's quality checks (sql/migrations/0304) hold on simulated data: visit windows
    contain their target date, enrolment follows screening, study statuses are configured ones."""
    m = _model()
    for v in _all(m, "patient_visits"):
        assert v["minDueDate"] <= v["targetDueDate"] <= v["maxDueDate"], v
    screened = {s["subject"]["id"] if "subject" in s else None: s["eventDate"]
                for s in _all(m, "subject_statuses") if s["status"] == "Screened"}
    subjects = _all(m, "subjects")
    # only subjects that reached enrollment carry enrollmentDate (simulator/clinical.py)
    checked = [s for s in subjects if s["id"] in screened and s["enrollmentDate"]]
    assert checked and all(screened[s["id"]] < s["enrollmentDate"] for s in checked)
    configured = {s["name"] for s in _all(m, "study_statuses")}
    assert len(configured) == 15 and {s["status"] for s in _all(m, "studies")} <= configured
    assert "On Hold" in configured
