"""source_id construction from a job's primary key."""

from __future__ import annotations

import pytest

from producers.keys import key_builder, parent_key


def test_plain_id() -> None:
    k = key_builder(("id",), "cc1")
    assert k({"id": 42}, None) == "cc1:42"
    assert k({"id": "a-b"}, None) == "cc1:a-b"
    assert k({"id": True}, None) == "cc1:true"


@pytest.mark.parametrize("rec", [{}, {"id": None}, {"id": ""}, {"id": {"x": 1}}, {"id": [1]}, "str", 5, None])
def test_missing_or_unusable_id_gives_null_key(rec: object) -> None:
    assert key_builder(("id",), "cc1")(rec, None) is None


def test_dotted_path() -> None:
    k = key_builder(("subject.id",), "cc9")
    assert k({"subject": {"id": 7}}, None) == "cc9:7"
    assert k({"subject": None}, None) is None
    assert k({"subject": {"uid": 7}}, None) is None
    assert k({}, None) is None


def test_composite_with_param_and_nested() -> None:
    k = key_builder(("$param.studyId", "type", "visit.id", "element.id"), "cc1")
    rec = {"type": "missing", "visit": {"id": 3}, "element": {"id": 9}}
    assert k(rec, {"studyId": "12"}) == "cc1:12|missing|3|9"
    assert k({**rec, "element": {}}, {"studyId": "12"}) is None
    assert k(rec, None) is None


def test_value_key_for_string_records() -> None:
    k = key_builder(("$value",), "cc1")
    assert k("Gender", None) == "cc1:Gender"
    assert k({"a": 1}, None) is None
    assert k("", None) is None


def test_param_only_key() -> None:
    k = key_builder(("$param.studyId",), "cc1")
    assert k({"anything": 1}, {"studyId": "5"}) == "cc1:5"


def test_parent_key_is_canonical() -> None:
    assert parent_key(None) == ""
    assert parent_key({}) == ""
    assert parent_key({"visitId": "2", "studyId": "1"}) == parent_key({"studyId": "1", "visitId": "2"})
    assert parent_key({"studyId": "1"}) == '{"studyId":"1"}'


def test_catalog_keys_compile() -> None:
    from schemas.jobs import JobCatalog

    for job in JobCatalog.load():
        key_builder(job.primary_key, "cc1")


def test_stream_plan_builds_streams_on_access_and_pickles() -> None:
    import pickle
    from datetime import UTC, datetime

    from producers.planner import StreamPlan, endpoint_renderer
    from schemas.jobs import JobCatalog

    job = JobCatalog.load().get(175)
    wm = {parent_key({"studyId": "1", "visitId": "2"}): datetime(2025, 1, 1, tzinfo=UTC)}
    plan = StreamPlan(job, [("1", "2"), ("1", "a b")], ["studyId", "visitId"], wm, 60)
    assert len(plan) == 2
    s0, s1 = plan[0], plan[1]
    assert s0.path == "/api/v1/studies/1/visits/2/elements/odata" and s0.params == {"studyId": "1", "visitId": "2"}
    assert s0.filter_expr == "modifiedDate gt 2024-12-31T23:59:00.000Z" and s1.filter_expr is None
    assert s1.path == job.render_endpoint({"studyId": "1", "visitId": "a b"}) == endpoint_renderer(job)(s1.params)
    assert [s.idx for s in plan[:5]] == [0, 1]
    clone = pickle.loads(pickle.dumps(plan))
    assert clone[1].path == s1.path and clone[0].filter_expr == s0.filter_expr
    plain = StreamPlan(JobCatalog.load().get(9), None, [])
    assert len(plain) == 1 and plain[0].path == "/api/v1/patient-visits/odata" and plain[0].params is None
