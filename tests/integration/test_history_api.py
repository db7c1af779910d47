"""The job-history API over real HTTP (uvicorn) against a real, migrated PostgreSQL database
holding realistic run history written through the real schema."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import requests

from tests.integration.http_helpers import serve_asgi

pytestmark = pytest.mark.integration

TOKEN = "s3cr3t-" + uuid.uuid4().hex
T0 = datetime(2025, 12, 1, 2, 0, tzinfo=UTC)


def _seed(conn: psycopg.Connection, job_ids: list[int]) -> dict[str, Any]:
    """Runs as the extractor/loader/orchestrator write them: a week of nightly runs for three jobs,
    with a failure, its retry, a partial parameterized run with rejects, and a run in progress."""
    a, b, c = job_ids
    ids: dict[str, Any] = {"runs": []}

    def run(job: int, status: str, day: int, **kw: Any) -> int:
        started = T0 + timedelta(days=day, minutes=job % 50)
        dur = kw.pop("duration", 42.5)
        done = status not in ("running", "pending")
        row = conn.execute(
            """INSERT INTO etl.dw_etl_runs (job_id, run_status, mode, trigger, parent_run_id, attempt,
                   records_extracted, records_published, records_loaded, records_rejected, api_calls,
                   parents_total, parents_done, parents_failed, error_class, error_message, run_context,
                   watermark_from, watermark_to, started_at, heartbeat_at, completed_at, load_completed_at,
                   duration_seconds, host, pid)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s,
                       %s, %s, %s, 'etl-1', 4242) RETURNING id""",
            (job, status, kw.get("mode", "incremental" if day else "full"), kw.get("trigger", "schedule"),
             kw.get("parent"), kw.get("attempt", 1), kw.get("extracted", 1000), kw.get("published", 1000),
             kw.get("loaded", 1000 if status == "success" else 0), kw.get("rejected", 0), kw.get("calls", 2),
             kw.get("parents_total"), kw.get("parents_done"), kw.get("parents_failed"), kw.get("error_class"),
             kw.get("error_message"), kw.get("context", '{"orchestration": "nightly"}'),
             started - timedelta(days=1) if day else None, started if day else None, started,
             started + timedelta(seconds=dur), started + timedelta(seconds=dur) if done else None,
             started + timedelta(seconds=dur + 1) if status == "success" else None, dur if done else None),
        ).fetchone()
        rid = int(row[0])  # type: ignore[index]
        ids["runs"].append((rid, job, status, started))
        return rid

    for day in range(7):
        run(a, "success", day, extracted=1000 + day, loaded=1000 + day)
    ids["failed"] = run(b, "failed", 5, extracted=0, published=0, error_class="ApiAuthError",
                        error_message="HTTP 401 from /api/v1/sites/odata: check CC_API_KEY")
    ids["retry"] = run(b, "success", 5, parent=ids["failed"], attempt=2, trigger="retry", mode="retry")
    ids["partial"] = run(c, "partial", 6, extracted=500, published=500, loaded=497, rejected=3, parents_total=10,
                         parents_done=9, parents_failed=1, error_class="PartialFailure",
                         error_message="1 of 10 parents failed: HTTP 500 after 3 retries")
    ids["running"] = run(c, "running", 7)
    for i in range(3):
        conn.execute(
            """INSERT INTO etl.dw_etl_rejects (table_name, topic, kafka_partition, kafka_offset, record_key, job_id,
                   run_id, stage, error_class, error_message, payload)
               VALUES ('dim_subjects_staging', 'trialsync.bronze.dim_subjects_staging', %s, %s, %s, %s, %s, 'load',
                       %s, %s, %s)""",
            (i % 3, 100 + i, None if i == 0 else f"cc1:{i}", c, ids["partial"],
             "MissingKey" if i == 0 else "InvalidJson", "record has no id" if i == 0 else "value is not JSON",
             "{" + "x" * 3000 if i == 2 else '{"name": "no id"}'))
    if conn.execute("SELECT to_regclass('etl.dw_transform_runs')").fetchone()[0]:  # type: ignore[index]
        ids["transform"] = _seed_transform(conn, ids)
    conn.execute("UPDATE etl.dw_etl_jobs SET last_run_id = %s, last_run_status = 'success', last_run_at = %s, "
                 "last_success_at = %s WHERE id = %s", (ids["runs"][6][0], ids["runs"][6][3], ids["runs"][6][3], a))
    return ids


def _seed_transform(conn: psycopg.Connection, ids: dict[str, Any]) -> dict[str, Any]:
    """Transform runs and quality results as the transform consumer writes them (migrations 03xx)."""
    batch = uuid.uuid4()
    out: dict[str, Any] = {"batch": batch}
    rows = [("silver.load_dim_studies", "success", [ids["runs"][0][0]], None),
            ("silver.load_fact_enrollment", "failed", [ids["runs"][0][0], ids["partial"]],
             "duplicate key value violates unique constraint")]
    for i, (proc, status, trig, err) in enumerate(rows):
        started = T0 + timedelta(days=6, hours=1, minutes=i)
        out[proc] = conn.execute(
            """INSERT INTO etl.dw_transform_runs (batch_id, procedure_name, trigger, trigger_run_ids, status,
                   rows_inserted, rows_updated, rows_closed, started_at, finished_at, duration_seconds,
                   error_class, error_message)
               VALUES (%s, %s, 'control', %s, %s, 10, 2, 1, %s, %s, 1.5, %s, %s) RETURNING id""",
            (batch, proc, trig, status, started, started + timedelta(seconds=1.5),
             "UniqueViolation" if err else None, err)).fetchone()[0]  # type: ignore[index]
    for name, sev, status, failed in (("dim_studies_one_current", "error", "pass", 0),
                                      ("fact_enrollment_orphans", "error", "fail", 4),
                                      ("patients_required_fields", "warning", "fail", 2)):
        conn.execute(
            """INSERT INTO etl.dw_quality_results (check_name, target_table, severity, status, failed_rows,
                   sample_keys, batch_id, transform_run_id, checked_at)
               VALUES (%s, 'silver.dim_studies', %s, %s, %s, %s, %s, %s, %s)""",
            (name, sev, status, failed, [f"k{i}" for i in range(failed)], batch, out["silver.load_dim_studies"],
             T0 + timedelta(days=6, hours=2)))
    return out


@pytest.fixture(scope="module")
def history_db(stack: dict[str, str]) -> Iterator[tuple[Any, dict[str, Any]]]:
    """A database of its own on the session server: migrated, catalog synced, history seeded."""
    from common.catalog import load_catalog, sync
    from common.config import load_settings
    from common.db import connect, migrate

    name = f"hist_{uuid.uuid4().hex[:8]}"
    base = stack["dsn"]
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = base.rsplit("/", 1)[0] + "/" + name
    settings = load_settings(database_url=dsn, api_token=TOKEN)
    try:
        migrate(settings)
        catalog = load_catalog(settings)
        sync(catalog, settings)
        jobs = sorted(j.id for j in catalog.runnable)[:3]
        with connect(settings) as conn, conn.transaction():
            ids = _seed(conn, jobs)
        ids["jobs"] = jobs
        ids["catalog"] = catalog
        yield settings, ids
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def api_url(history_db: tuple[Any, dict[str, Any]]) -> Iterator[str]:
    from orchestrator.history_api import HistoryApi

    settings, _ = history_db
    api = HistoryApi(settings)
    try:
        with serve_asgi(api.app) as url:
            yield url
    finally:
        api.close()


@pytest.fixture
def get(api_url: str):
    def _get(path: str, token: str | None = TOKEN, **params: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(api_url + path, params=params, headers=headers, timeout=30)

    return _get


def test_jobs_list_filters_and_paginates(get, history_db) -> None:
    _, ids = history_db
    catalog = ids["catalog"]
    r = get("/api/v1/jobs", limit=10)
    assert r.status_code == 200
    body = r.json()
    assert body["total"] == len(catalog) and len(body["items"]) == 10 and body["next_offset"] == 10
    seen = []
    offset: int | None = 0
    while offset is not None:
        page = get("/api/v1/jobs", limit=40, offset=offset).json()
        seen += [j["id"] for j in page["items"]]
        offset = page["next_offset"]
    assert seen == sorted(j.id for j in catalog)
    active = get("/api/v1/jobs", active="true", limit=1000).json()
    assert active["total"] == len(catalog.runnable)
    assert all(j["is_active"] and j["is_valid"] for j in active["items"])
    inactive = get("/api/v1/jobs", active="false", limit=1000).json()
    assert inactive["total"] == len(catalog) - len(catalog.runnable)
    cat = catalog.get(ids["jobs"][0]).category
    by_cat = get("/api/v1/jobs", category=cat, limit=1000).json()
    assert by_cat["total"] == len(catalog.by_category(cat))
    assert get("/api/v1/jobs", category="no-such-category").json()["total"] == 0


def test_job_detail_has_recent_runs(get, history_db) -> None:
    _, ids = history_db
    a = ids["jobs"][0]
    body = get(f"/api/v1/jobs/{a}").json()
    assert body["id"] == a and body["last_run_status"] == "success" and body["last_success_at"]
    assert len(body["recent_runs"]) == 7
    starts = [r["started_at"] for r in body["recent_runs"]]
    assert starts == sorted(starts, reverse=True)
    r = get("/api/v1/jobs/999999")
    assert r.status_code == 404 and "no job with id 999999" in r.json()["error"]
    assert get("/api/v1/jobs/abc").status_code == 400


def test_runs_filter_by_job_status_and_time(get, history_db, api_url: str) -> None:
    _, ids = history_db
    a, b, c = ids["jobs"]
    assert get("/api/v1/runs").json()["total"] == len(ids["runs"])
    assert get("/api/v1/runs", job_id=a).json()["total"] == 7
    failed = get("/api/v1/runs", status="failed").json()
    assert [r["id"] for r in failed["items"]] == [ids["failed"]]
    assert failed["items"][0]["job_id"] == b and failed["items"][0]["error_class"] == "ApiAuthError"
    # time window [day 2, day 5): job a's runs of days 2, 3, 4
    since, until = (T0 + timedelta(days=2)).isoformat(), (T0 + timedelta(days=5)).isoformat()
    window = get("/api/v1/runs", job_id=a, since=since, until=until).json()
    expected = sorted((rid for rid, job, _, st in ids["runs"]
                       if job == a and T0 + timedelta(days=2) <= st < T0 + timedelta(days=5)), reverse=True)
    assert [r["id"] for r in window["items"]] == expected and len(expected) == 3
    # 'Z' suffix and an unencoded '+' (arrives as a space) both parse
    z = get("/api/v1/runs", job_id=a, since="2025-12-03T02:00:00Z").json()["total"]
    plus = requests.get(f"{api_url}/api/v1/runs?job_id={a}&since=2025-12-03T02:00:00+00:00",
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()["total"]
    assert z == plus == 5
    assert get("/api/v1/runs", status="running").json()["items"][0]["id"] == ids["running"]
    items = get("/api/v1/runs", job_id=c).json()["items"]
    assert {i["job_name"] for i in items} == {ids["catalog"].get(c).name}


def test_runs_paginate_without_gaps_or_repeats(get, history_db) -> None:
    _, ids = history_db
    seen: list[int] = []
    offset: int | None = 0
    while offset is not None:
        page = get("/api/v1/runs", limit=3, offset=offset).json()
        assert len(page["items"]) <= 3
        seen += [r["id"] for r in page["items"]]
        offset = page["next_offset"]
    assert sorted(seen) == sorted(r[0] for r in ids["runs"]) and len(seen) == len(set(seen))


def test_bad_parameters_are_400_with_a_message(get) -> None:
    for params, needle in (({"status": "exploded"}, "status must be one of"), ({"limit": 0}, "limit"),
                           ({"limit": 5000}, "limit"), ({"job_id": "x"}, "job_id must be an integer"),
                           ({"since": "yesterday"}, "ISO 8601"), ({"offset": -1}, "offset")):
        r = get("/api/v1/runs", **params)
        assert r.status_code == 400, params
        assert needle in r.json()["error"], (params, r.json())


def test_run_detail_has_error_retries_and_rejects(get, history_db) -> None:
    _, ids = history_db
    failed = get(f"/api/v1/runs/{ids['failed']}").json()
    assert failed["run_status"] == "failed"
    assert failed["error"] == {"class": "ApiAuthError", "message": "HTTP 401 from /api/v1/sites/odata: check CC_API_KEY"}
    assert [r["id"] for r in failed["retries"]] == [ids["retry"]]
    assert failed["retries"][0]["run_status"] == "success" and failed["retries"][0]["attempt"] == 2
    assert failed["rejects"]["total"] == 0
    partial = get(f"/api/v1/runs/{ids['partial']}").json()
    assert (partial["parents_total"], partial["parents_done"], partial["parents_failed"]) == (10, 9, 1)
    rj = partial["rejects"]
    assert rj["total"] == 3 and len(rj["first"]) == 3 and rj["more"] is None
    assert {(e["error_class"], e["count"]) for e in rj["by_error"]} == {("InvalidJson", 2), ("MissingKey", 1)}
    first = rj["first"][0]
    assert first["error_message"] == "record has no id" and first["record_key"] is None
    assert first["topic"] == "trialsync.bronze.dim_subjects_staging" and first["kafka_offset"] == 100
    big = rj["first"][2]
    assert big["payload_truncated"] is True and len(big["payload"]) == 2000
    assert partial["run_context"] == {"orchestration": "nightly"}
    assert get("/api/v1/runs/987654321").status_code == 404


def test_rejects_endpoint_paginates(get, history_db) -> None:
    _, ids = history_db
    p1 = get(f"/api/v1/runs/{ids['partial']}/rejects", limit=2).json()
    p2 = get(f"/api/v1/runs/{ids['partial']}/rejects", limit=2, offset=p1["next_offset"]).json()
    assert p1["total"] == 3 and [r["kafka_offset"] for r in p1["items"] + p2["items"]] == [100, 101, 102]
    assert p2["next_offset"] is None
    assert get("/api/v1/runs/987654321/rejects").status_code == 404


def test_transform_runs_and_quality_results_filter(get, history_db) -> None:
    _, ids = history_db
    if "transform" not in ids:
        pytest.skip("the transform package's migrations (dw_transform_runs, dw_quality_results) are not merged")
    t = ids["transform"]
    all_runs = get("/api/v1/transform-runs").json()
    assert all_runs["total"] == 2
    failed = get("/api/v1/transform-runs", status="failed").json()["items"]
    assert [r["id"] for r in failed] == [t["silver.load_fact_enrollment"]]
    assert failed[0]["error_message"] == "duplicate key value violates unique constraint"
    by_run = get("/api/v1/transform-runs", run_id=ids["partial"]).json()["items"]
    assert [r["procedure_name"] for r in by_run] == ["silver.load_fact_enrollment"]
    assert get("/api/v1/transform-runs", procedure="silver.load_dim_studies").json()["total"] == 1
    assert get("/api/v1/transform-runs", since=(T0 + timedelta(days=7)).isoformat()).json()["total"] == 0
    q = get("/api/v1/quality-results", passed="false").json()["items"]
    assert {r["check_name"] for r in q} == {"fact_enrollment_orphans", "patients_required_fields"}
    err = get("/api/v1/quality-results", passed="false", severity="error").json()["items"]
    assert [(r["check_name"], r["failed_rows"], r["sample_keys"]) for r in err] == [
        ("fact_enrollment_orphans", 4, ["k0", "k1", "k2", "k3"])]
    assert get("/api/v1/quality-results", status="pass").json()["total"] == 1
    assert get("/api/v1/quality-results", check="dim_studies_one_current").json()["total"] == 1


def test_transform_and_quality_endpoints_answer(get) -> None:
    for path in ("/api/v1/transform-runs", "/api/v1/quality-results"):
        r = get(path)
        assert r.status_code == 200, r.text
        assert set(r.json()) == {"items", "total", "limit", "offset", "next_offset"}


def test_bearer_token_is_required_and_never_echoed(get, api_url: str) -> None:
    for token in (None, "wrong", TOKEN[:-1], TOKEN + "x"):
        r = get("/api/v1/jobs", token=token)
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert "Authorization: Bearer <API_TOKEN>" in r.json()["error"]
        assert TOKEN not in r.text and TOKEN not in str(r.headers)
    r = requests.get(api_url + "/api/v1/jobs", headers={"Authorization": f"Basic {TOKEN}"}, timeout=10)
    assert r.status_code == 401
    assert get("/api/v1/jobs").status_code == 200
    # health, readiness and the contract are open (they reveal no data)
    for path in ("/healthz", "/openapi.json"):
        assert requests.get(api_url + path, timeout=10).status_code == 200
    spec = requests.get(api_url + "/openapi.json", timeout=10)
    assert TOKEN not in spec.text
    assert spec.json()["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_read_only(api_url: str) -> None:
    r = requests.post(api_url + "/api/v1/runs", json={}, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "GET"


def test_without_token_the_api_is_open(history_db) -> None:
    from common.config import load_settings
    from orchestrator.history_api import HistoryApi

    settings, _ = history_db
    open_settings = load_settings(database_url=settings.database_url.get_secret_value())
    api = HistoryApi(open_settings)
    try:
        with serve_asgi(api.app) as url:
            assert requests.get(url + "/api/v1/jobs", timeout=10).status_code == 200
            assert "securitySchemes" not in requests.get(url + "/openapi.json", timeout=10).json()["components"]
    finally:
        api.close()


def test_api_reports_its_db_pool_and_readiness(get, api_url: str) -> None:
    get("/api/v1/jobs")
    text = requests.get(api_url + "/metrics", timeout=10).text
    assert 'trialsync_db_pool_connections{pool="api",state="idle"}' in text
    ready = requests.get(api_url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["checks"]["database"]["ok"] is True


def test_database_down_is_503_not_a_crash(history_db) -> None:
    from common.config import load_settings
    from common.stack import free_port
    from orchestrator.history_api import HistoryApi

    dead = load_settings(database_url=f"postgresql://nobody:pw-{TOKEN}@127.0.0.1:{free_port()}/none")
    api = HistoryApi(dead)
    try:
        with serve_asgi(api.app) as url:
            r = requests.get(url + "/api/v1/runs", timeout=60)
            assert r.status_code == 503 and "database unavailable" in r.json()["error"]
            assert TOKEN not in r.text
            ready = requests.get(url + "/readyz", timeout=30)
            assert ready.status_code == 503 and ready.json()["checks"]["database"]["ok"] is False
            assert TOKEN not in ready.text
    finally:
        api.close()


# -- schemathesis: the app against its own OpenAPI document ------------------------------------------
# The contract is the document the server serves (asserted equal below); hypothesis generates
# requests from it and schemathesis checks every answer (status codes, content types, response
# schemas, no 5xx, auth enforced, unsupported methods refused).

import hypothesis  # noqa: E402
import schemathesis  # noqa: E402

from orchestrator.history_api import openapi_document  # noqa: E402

schema = schemathesis.openapi.from_dict(openapi_document(auth=True))


@schema.auth()
class _Bearer:
    """Authenticate generated requests the way schemathesis expects, so its negative cases that
    drop or mangle the Authorization header are judged correctly."""

    def get(self, case, ctx) -> str:
        return TOKEN

    def set(self, case, data: str, ctx) -> None:
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"


def test_served_contract_is_the_tested_one(api_url: str) -> None:
    assert requests.get(api_url + "/openapi.json", timeout=10).json() == openapi_document(auth=True)


@schema.parametrize()
@hypothesis.settings(max_examples=40, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_openapi_contract(case, api_url: str) -> None:
    case.call_and_validate(base_url=api_url)
