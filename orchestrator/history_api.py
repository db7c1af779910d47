"""The job-history HTTP API (seed 001, phase 3): read-only JSON over the control tables.

``trialsync api`` serves it with uvicorn. Endpoints (all ``GET``; lists are paginated with
``limit``/``offset`` and answer ``{"items", "total", "limit", "offset", "next_offset"}``):

* ``/api/v1/jobs`` (``category``, ``active``) and ``/api/v1/jobs/{job_id}`` (with recent runs);
* ``/api/v1/runs`` (``job_id``, ``status``, ``since``, ``until``) and ``/api/v1/runs/{run_id}``
  (the run with its error, retries and the first rejects), ``/api/v1/runs/{run_id}/rejects``;
* ``/api/v1/transform-runs`` (``procedure``, ``status``, ``since``, ``until``);
* ``/api/v1/quality-results`` (``check``, ``severity``, ``passed``, ``since``, ``until``);
* ``/openapi.json`` (the contract; schemathesis tests the app against it), ``/healthz``,
  ``/readyz``, ``/metrics``.

Why read-only and why plain SQL: the API is for operators and dashboards; the tables are the
truth and other processes own writing them. Every value from a request is a bound parameter;
column names are constants (or, for the transform tables, chosen from an allow-list of names
found in ``information_schema``) and pass ``psycopg.sql.Identifier``.

Security: with ``API_TOKEN`` set, ``/api/*`` needs ``Authorization: Bearer <token>``; the
comparison is constant-time (``hmac.compare_digest``) and the token is never echoed or logged.
"""

from __future__ import annotations

import hmac
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

import orjson
import psycopg
from psycopg import sql
from psycopg.abc import Params, QueryNoTemplate
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from common.config import Settings, get_settings
from common.logging import get_logger
from common.metrics import DB_POOL

log = get_logger("api")

API_PREFIX = "/api/v1"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
RUN_STATUSES = ("pending", "running", "success", "partial", "failed", "skipped", "cancelled")
TRANSFORM_STATUSES = ("running", "success", "failed", "skipped")
QUALITY_STATUSES = ("pass", "fail", "error")
PG_INT_MAX = 2_147_483_647
PG_BIGINT_MAX = 9_223_372_036_854_775_807

#: the connection every handler gets: rows as dicts (``endpoint`` sets ``dict_row`` on it)
DictConnection = psycopg.Connection[DictRow]


_OFFSET_SPACE = re.compile(r"(\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?) (\d{2}(?::?\d{2})?)$")


_LEAP_SECOND = re.compile(r"(T\d{2}:\d{2}:)60")


class ApiError(Exception):
    """An expected client error: status code and a one-line message saying what to change."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# -- JSON ----------------------------------------------------------------------------------------

def _default(o: Any) -> Any:
    if isinstance(o, Decimal):
        return float(o)
    raise TypeError(f"cannot serialize {type(o).__name__}")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body, default=_default, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC),
                    status_code=status, media_type="application/json", headers=headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


# -- query parameters ----------------------------------------------------------------------------

def _not_empty(name: str, raw: str) -> None:
    if raw == "":
        raise ApiError(400, f"query parameter {name} is empty: give a value or leave it out")


def _int(req: Request, name: str, default: int | None = None, lo: int = 0, hi: int = PG_BIGINT_MAX) -> int | None:
    raw = req.query_params.get(name)
    if raw is None:
        return default
    _not_empty(name, raw)
    try:
        v = int(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name} must be an integer") from None
    if not lo <= v <= hi:
        raise ApiError(400, f"query parameter {name} must be between {lo} and {hi}")
    return v


def _bool(req: Request, name: str) -> bool | None:
    raw = req.query_params.get(name)
    if raw is None:
        return None
    _not_empty(name, raw)
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise ApiError(400, f"query parameter {name} must be true or false")


def _time(req: Request, name: str) -> datetime | None:
    raw = req.query_params.get(name)
    if raw is None:
        return None
    _not_empty(name, raw)
    # an unencoded '+' of a UTC offset arrives as a space: 2025-12-01T02:00:00 01:00
    raw = _OFFSET_SPACE.sub(r"\1+\2", raw.strip()).upper()
    raw = _LEAP_SECOND.sub(r"\g<1>59", raw)  # RFC 3339 allows :60; Python does not
    try:
        v = datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name} must be an ISO 8601 date-time, e.g. 2025-12-01T02:00:00Z"
                       ) from None
    return v if v.tzinfo else v.replace(tzinfo=UTC)


def _choice(req: Request, name: str, allowed: Iterable[str]) -> str | None:
    raw = req.query_params.get(name)
    if raw is None:
        return None
    _not_empty(name, raw)
    allowed = tuple(allowed)
    if raw not in allowed:
        raise ApiError(400, f"query parameter {name} must be one of {', '.join(allowed)}")
    return raw


def _text(req: Request, name: str, max_len: int = 200) -> str | None:
    raw = req.query_params.get(name)
    if raw is None:
        return None
    _not_empty(name, raw)
    if len(raw) > max_len:
        raise ApiError(400, f"query parameter {name} must be at most {max_len} characters")
    # PostgreSQL text cannot hold NUL; such a value matches nothing, so make it a non-matching char
    return raw.replace("\x00", "\ufffd")


def _page(req: Request) -> tuple[int, int]:
    limit = _int(req, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = _int(req, "offset", 0, 0, 10_000_000)
    assert limit is not None and offset is not None
    return limit, offset


def _path_id(req: Request, name: str, hi: int) -> int:
    raw = req.path_params[name]
    try:
        v = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None
    if not 1 <= v <= hi:
        raise ApiError(404, f"no {name.removesuffix('_id')} with id {v}")
    return v


def _page_body(items: list[dict[str, Any]], total: int, limit: int, offset: int) -> dict[str, Any]:
    nxt = offset + limit if offset + limit < total else None
    return {"items": items, "total": total, "limit": limit, "offset": offset, "next_offset": nxt}


# -- SQL -----------------------------------------------------------------------------------------

JOB_COLUMNS = ("id", "name", "category", "source_endpoint", "target_table", "is_active", "is_valid",
               "invalid_reason", "requires_parameters", "parameter_source_table", "parameters", "primary_key",
               "source_type", "depends_on", "schedule", "priority", "timeout_seconds", "incremental",
               "timestamp_field", "page_size", "fix_reasons", "last_run_id", "last_run_at", "last_run_status",
               "last_run_records", "last_success_at", "updated_at")
RUN_COLUMNS = ("id", "job_id", "run_status", "mode", "trigger", "parent_run_id", "orchestration_id", "attempt",
               "records_extracted", "records_published", "records_loaded", "records_rejected", "api_calls",
               "parents_total", "parents_done", "parents_failed", "error_class", "error_message",
               "watermark_from", "watermark_to", "started_at", "heartbeat_at", "completed_at",
               "load_completed_at", "duration_seconds", "host")
RUN_DETAIL_EXTRA = ("run_context",)
REJECT_COLUMNS = ("id", "table_name", "topic", "kafka_partition", "kafka_offset", "record_key", "job_id", "run_id",
                  "stage", "error_class", "error_message", "payload", "created_at")
#: payloads can be large: the API shows the start of each; the DLQ topic has the whole record
PAYLOAD_PREVIEW = 2000


def _count(conn: DictConnection, query: QueryNoTemplate, params: Params | None = None) -> int:
    """``SELECT count(*) AS n ...``: an aggregate always answers one row."""
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row["n"])


def _cols(names: Iterable[str], alias: str = "") -> sql.Composable:
    if alias:
        return sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(n)) for n in names)
    return sql.SQL(", ").join(sql.Identifier(n) for n in names)


class TableShape:
    """Columns of a table owned by another package (transform runs, quality results), read once.

    Why: the transform package owns those tables and may name a column ``procedure`` or
    ``procedure_name``; the API picks the first present name from an allow-list per role and
    returns whole rows, so it keeps working when columns are added.
    """

    def __init__(self, schema: str, table: str, roles: dict[str, tuple[str, ...]]):
        self.schema, self.table, self.roles = schema, table, roles
        self._cols: dict[str, str] | None = None
        self.arrays: set[str] = set()
        self._lock = threading.Lock()

    def columns(self, conn: psycopg.Connection[Any]) -> dict[str, str] | None:
        """role -> column name, or None when the table does not exist (yet)."""
        with self._lock:
            if self._cols is not None:
                return self._cols
            rows = conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = %s", (self.schema, self.table),
            ).fetchall()
            types = {(r["column_name"] if isinstance(r, dict) else r[0]): (r["data_type"] if isinstance(r, dict)
                                                                           else r[1]) for r in rows}
            if not types:
                return None
            self._cols = {role: next((c for c in names if c in types), "") for role, names in self.roles.items()}
            self.arrays = {c for c, t in types.items() if t == "ARRAY"}
            return self._cols

    @property
    def ident(self) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.table))


TRANSFORM_RUNS = TableShape("etl", "dw_transform_runs", {
    "id": ("id",),
    "procedure": ("procedure", "procedure_name", "proc_name", "name"),
    "status": ("status", "run_status"),
    "time": ("started_at", "created_at", "run_at", "executed_at"),
    "trigger_run": ("trigger_run_ids", "trigger_run_id", "run_id", "etl_run_id"),
})
QUALITY_RESULTS = TableShape("etl", "dw_quality_results", {
    "id": ("id",),
    "check": ("check_name", "check", "name", "check_id"),
    "severity": ("severity",),
    "passed": ("passed", "is_passing", "ok", "success"),
    "status": ("status",),
    "time": ("checked_at", "created_at", "run_at", "started_at", "executed_at"),
    "transform_run": ("transform_run_id", "run_id"),
})


# -- the application -----------------------------------------------------------------------------

class HistoryApi:
    """Holds the pool and answers requests; ``app`` is the Starlette ASGI application."""

    def __init__(self, settings: Settings | None = None, pool: ConnectionPool | None = None,
                 readiness: Callable[[], tuple[bool, bytes]] | None = None):
        self.settings = settings or get_settings()
        self._pool = pool
        self._pool_lock = threading.Lock()
        token = self.settings.api_token.get_secret_value() if self.settings.api_token else ""
        self._token = token.encode() if token else b""
        self._readiness = readiness
        # the query parameters each path accepts come from the contract, so they cannot drift apart
        self._query_params = {path: {p["name"] for p in item["get"]["parameters"] if p["in"] == "query"}
                              for path, item in openapi_document(False)["paths"].items()}
        api_routes = {
            "/jobs": self.list_jobs, "/jobs/{job_id}": self.get_job, "/runs": self.list_runs,
            "/runs/{run_id}": self.get_run, "/runs/{run_id}/rejects": self.list_rejects,
            "/transform-runs": self.list_transform_runs, "/quality-results": self.list_quality_results,
        }
        routes = [
            Route("/openapi.json", self.openapi),
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/metrics", self.metrics),
            *(Route(API_PREFIX + p, self.endpoint(fn, API_PREFIX + p)) for p, fn in api_routes.items()),
        ]
        self.app = Starlette(routes=routes, middleware=[Middleware(BaseHTTPMiddleware, dispatch=self._auth)])
        self.app.add_exception_handler(404, self._not_found)
        self.app.add_exception_handler(405, self._not_allowed)
        # anything that escapes a handler (meta endpoints, middleware) still answers JSON
        self.app.add_exception_handler(Exception, self._internal_error)

    # -- plumbing ----------------------------------------------------------------------------
    @property
    def pool(self) -> ConnectionPool:
        with self._pool_lock:
            if self._pool is None:
                from common.db import make_pool

                # the read-only login (trialsync_reader): the API never needs to write
                self._pool = make_pool(self.settings, min_size=1, max_size=min(10, self.settings.database_pool_size),
                                       name="api", login="reader")
            return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def _update_pool_metrics(self) -> None:
        if self._pool is None:
            return
        st = self._pool.get_stats()
        size, idle = st.get("pool_size", 0), st.get("pool_available", 0)
        DB_POOL.labels(pool="api", state="in_use").set(max(0, size - idle))
        DB_POOL.labels(pool="api", state="idle").set(idle)

    async def _auth(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if self._token and request.url.path.startswith(API_PREFIX + "/"):
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token)
            if not ok:
                return error_response(401, "missing or invalid bearer token: send 'Authorization: Bearer <API_TOKEN>'",
                                      {"WWW-Authenticate": 'Bearer realm="trialsync"'})
        return await call_next(request)

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return error_response(404, f"no such resource: {request.url.path}")

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.error("api_internal_error", path=request.url.path, error_class=type(exc).__name__)
        return error_response(500, f"internal error ({type(exc).__name__}); the API log has the details")

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return error_response(405, "method not allowed: this API is read-only (GET)", {"Allow": "GET"})

    def endpoint(self, fn: Callable[[Request, DictConnection], Any], path: str) -> Callable[[Request], Response]:
        """Wrap a handler: unknown query parameters -> 400 (a typo like ``stauts=failed`` must not
        silently return everything), a pooled connection, ApiError -> 4xx, database down -> 503."""
        allowed = self._query_params[path]

        def handler(request: Request) -> Response:
            unknown = sorted(set(request.query_params.keys()) - allowed)
            if unknown:
                return error_response(400, f"unknown query parameter {unknown[0]!r}: allowed are "
                                           + (", ".join(sorted(allowed)) or "none"))
            try:
                with self.pool.connection(timeout=10) as pooled:
                    # psycopg types a connection's rows when it is made; the next line changes them
                    conn = cast(DictConnection, pooled)
                    conn.row_factory = dict_row
                    conn.read_only = True
                    body = fn(request, conn)
                return json_response(body)
            except ApiError as e:
                return error_response(e.status, e.message)
            except (psycopg.OperationalError, TimeoutError) as e:
                log.warning("api_database_unavailable", error=type(e).__name__)
                return error_response(503, "database unavailable: try again later (see /readyz)")
            except psycopg.errors.InsufficientPrivilege as e:
                first = (str(e).strip().splitlines() or ["permission denied"])[0]
                log.error("api_permission_denied", path=path, error=first)
                return error_response(503, f"the API's database login may not read this ({first}): run "
                                           "`trialsync db migrate` (it grants the read-only role what the API reads)")
            except Exception as e:  # psycopg_pool.PoolTimeout, and bugs: always JSON, never a plain-text 500
                from psycopg_pool import PoolTimeout

                if isinstance(e, PoolTimeout):
                    return error_response(503, "database unavailable: try again later (see /readyz)")
                log.exception("api_internal_error", path=path, error_class=type(e).__name__)
                return error_response(500, f"internal error ({type(e).__name__}); the API log has the details")
            finally:
                self._update_pool_metrics()

        return handler

    # -- meta endpoints ----------------------------------------------------------------------
    def openapi(self, request: Request) -> Response:
        return json_response(openapi_document(bool(self._token)))

    def healthz(self, request: Request) -> Response:
        return json_response({"status": "ok", "service": "api"})

    def readyz(self, request: Request) -> Response:
        if self._readiness is None:
            from common.health import service_checks
            from common.metrics import MetricsServer

            checks = service_checks("api", self.settings)
            self._readiness = lambda: MetricsServer.evaluate("api", checks)
        ok, body = self._readiness()
        return Response(body, status_code=200 if ok else 503, media_type="application/json")

    def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from common.metrics import registry_for_scrape

        self._update_pool_metrics()
        return Response(generate_latest(registry_for_scrape()), media_type=CONTENT_TYPE_LATEST)

    # -- jobs --------------------------------------------------------------------------------
    def list_jobs(self, req: Request, conn: DictConnection) -> dict[str, Any]:
        limit, offset = _page(req)
        where: list[sql.Composable] = []
        params: list[Any] = []
        category = _text(req, "category", 64)
        if category is not None:
            where.append(sql.SQL("category = %s"))
            params.append(category)
        active = _bool(req, "active")
        if active is not None:
            where.append(sql.SQL("(is_active AND is_valid) = %s"))
            params.append(active)
        cond = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL("")
        total = _count(conn, sql.SQL("SELECT count(*) AS n FROM etl.dw_etl_jobs") + cond, params)
        rows = conn.execute(
            sql.SQL("SELECT {} FROM etl.dw_etl_jobs").format(_cols(JOB_COLUMNS)) + cond
            + sql.SQL(" ORDER BY id LIMIT %s OFFSET %s"), [*params, limit, offset]).fetchall()
        return _page_body(rows, total, limit, offset)

    def get_job(self, req: Request, conn: DictConnection) -> dict[str, Any]:
        job_id = _path_id(req, "job_id", PG_INT_MAX)
        row = conn.execute(sql.SQL("SELECT {} FROM etl.dw_etl_jobs WHERE id = %s").format(_cols(JOB_COLUMNS)),
                           (job_id,)).fetchone()
        if row is None:
            raise ApiError(404, f"no job with id {job_id}: list jobs at {API_PREFIX}/jobs")
        row["recent_runs"] = conn.execute(
            sql.SQL("SELECT {} FROM etl.dw_etl_runs WHERE job_id = %s ORDER BY started_at DESC, id DESC LIMIT 10"
                    ).format(_cols(RUN_COLUMNS)), (job_id,)).fetchall()
        return row

    # -- runs --------------------------------------------------------------------------------
    def list_runs(self, req: Request, conn: DictConnection) -> dict[str, Any]:
        limit, offset = _page(req)
        where: list[sql.Composable] = []
        params: list[Any] = []
        job_id = _int(req, "job_id", None, 1, PG_INT_MAX)
        if job_id is not None:
            where.append(sql.SQL("r.job_id = %s"))
            params.append(job_id)
        status = _choice(req, "status", RUN_STATUSES)
        if status is not None:
            where.append(sql.SQL("r.run_status = %s"))
            params.append(status)
        since, until = _time(req, "since"), _time(req, "until")
        if since is not None:
            where.append(sql.SQL("r.started_at >= %s"))
            params.append(since)
        if until is not None:
            where.append(sql.SQL("r.started_at < %s"))
            params.append(until)
        cond = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL("")
        total = _count(conn, sql.SQL("SELECT count(*) AS n FROM etl.dw_etl_runs r") + cond, params)
        rows = conn.execute(
            sql.SQL("SELECT {}, j.name AS job_name, j.target_table FROM etl.dw_etl_runs r "
                    "JOIN etl.dw_etl_jobs j ON j.id = r.job_id").format(_cols(RUN_COLUMNS, "r"))
            + cond + sql.SQL(" ORDER BY r.started_at DESC, r.id DESC LIMIT %s OFFSET %s"),
            [*params, limit, offset]).fetchall()
        return _page_body(rows, total, limit, offset)

    def get_run(self, req: Request, conn: DictConnection) -> dict[str, Any]:
        run_id = _path_id(req, "run_id", PG_BIGINT_MAX)
        row = conn.execute(
            sql.SQL("SELECT {}, j.name AS job_name, j.target_table FROM etl.dw_etl_runs r "
                    "JOIN etl.dw_etl_jobs j ON j.id = r.job_id WHERE r.id = %s"
                    ).format(_cols(RUN_COLUMNS + RUN_DETAIL_EXTRA, "r")), (run_id,)).fetchone()
        if row is None:
            raise ApiError(404, f"no run with id {run_id}: list runs at {API_PREFIX}/runs")
        row["error"] = ({"class": row["error_class"], "message": row["error_message"]}
                        if row["error_class"] or row["error_message"] else None)
        row["retries"] = conn.execute(
            sql.SQL("SELECT {} FROM etl.dw_etl_runs WHERE parent_run_id = %s ORDER BY id").format(_cols(RUN_COLUMNS)),
            (run_id,)).fetchall()
        rejects_total = _count(conn, "SELECT count(*) AS n FROM etl.dw_etl_rejects WHERE run_id = %s", (run_id,))
        by_class = conn.execute(
            "SELECT stage, error_class, count(*) AS count FROM etl.dw_etl_rejects WHERE run_id = %s "
            "GROUP BY stage, error_class ORDER BY count DESC, stage, error_class", (run_id,)).fetchall()
        first = self._rejects(conn, run_id, 20, 0)
        row["rejects"] = {"total": rejects_total, "by_error": by_class, "first": first,
                          "more": f"{API_PREFIX}/runs/{run_id}/rejects" if rejects_total > len(first) else None}
        return row

    def _rejects(self, conn: DictConnection, run_id: int, limit: int, offset: int) -> list[dict[str, Any]]:
        cols = [c for c in REJECT_COLUMNS if c != "payload"]
        return conn.execute(
            sql.SQL("SELECT {}, left(payload, %s) AS payload, length(payload) > %s AS payload_truncated "
                    "FROM etl.dw_etl_rejects WHERE run_id = %s ORDER BY id LIMIT %s OFFSET %s").format(_cols(cols)),
            (PAYLOAD_PREVIEW, PAYLOAD_PREVIEW, run_id, limit, offset)).fetchall()

    def list_rejects(self, req: Request, conn: DictConnection) -> dict[str, Any]:
        run_id = _path_id(req, "run_id", PG_BIGINT_MAX)
        limit, offset = _page(req)
        if conn.execute("SELECT 1 FROM etl.dw_etl_runs WHERE id = %s", (run_id,)).fetchone() is None:
            raise ApiError(404, f"no run with id {run_id}: list runs at {API_PREFIX}/runs")
        total = _count(conn, "SELECT count(*) AS n FROM etl.dw_etl_rejects WHERE run_id = %s", (run_id,))
        return _page_body(self._rejects(conn, run_id, limit, offset), total, limit, offset)

    # -- transform runs and quality results ---------------------------------------------------
    def _list_owned(self, req: Request, conn: DictConnection, shape: TableShape,
                    filters: list[tuple[str, Any]]) -> dict[str, Any]:
        limit, offset = _page(req)
        cols = shape.columns(conn)
        if cols is None:
            # the transform package's migrations are not applied (or not shipped yet): nothing recorded
            return _page_body([], 0, limit, offset)
        where: list[sql.Composable] = []
        params: list[Any] = []
        for role, value in filters:
            if value is None:
                continue
            if role == "passed" and not cols.get("passed") and cols.get("status"):
                # results recorded as status pass/fail/error: passed = (status = 'pass')
                where.append(sql.SQL("({} = 'pass') = %s").format(sql.Identifier(cols["status"])))
                params.append(value)
                continue
            col = cols.get("time" if role in ("since", "until") else role, "")
            if not col:
                raise ApiError(400, f"{shape.table} has no column for filter {role!r}")
            if col in shape.arrays:
                where.append(sql.SQL("%s = ANY({})").format(sql.Identifier(col)))
            else:
                op = ">=" if role == "since" else "<" if role == "until" else "="
                where.append(sql.SQL("{} " + op + " %s").format(sql.Identifier(col)))
            params.append(value)
        cond = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL("")
        order = [sql.Identifier(c) + sql.SQL(" DESC") for c in (cols.get("time"), cols.get("id")) if c]
        order_by = sql.SQL(" ORDER BY ") + sql.SQL(", ").join(order) if order else sql.SQL("")
        total = _count(conn, sql.SQL("SELECT count(*) AS n FROM {}").format(shape.ident) + cond, params)
        rows = conn.execute(sql.SQL("SELECT to_jsonb(t) AS row FROM {} t").format(shape.ident) + cond + order_by
                            + sql.SQL(" LIMIT %s OFFSET %s"), [*params, limit, offset]).fetchall()
        return _page_body([r["row"] for r in rows], total, limit, offset)

    def list_transform_runs(self, req: Request, conn: DictConnection) -> dict[str, Any]:
        return self._list_owned(req, conn, TRANSFORM_RUNS, [
            ("procedure", _text(req, "procedure", 128)),
            ("status", _choice(req, "status", TRANSFORM_STATUSES)),
            ("trigger_run", _int(req, "run_id", None, 1, PG_BIGINT_MAX)),
            ("since", _time(req, "since")), ("until", _time(req, "until"))])

    def list_quality_results(self, req: Request, conn: DictConnection) -> dict[str, Any]:
        return self._list_owned(req, conn, QUALITY_RESULTS, [
            ("check", _text(req, "check", 128)),
            ("severity", _choice(req, "severity", ("error", "warning", "info"))),
            ("status", _choice(req, "status", QUALITY_STATUSES)),
            ("passed", _bool(req, "passed")),
            ("since", _time(req, "since")), ("until", _time(req, "until"))])


# -- OpenAPI -------------------------------------------------------------------------------------

def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


_S = {"type": "string"}
_I = {"type": "integer"}
_N = {"type": "number"}
_B = {"type": "boolean"}
_T = {"type": "string", "format": "date-time"}


def _job_schema() -> dict[str, Any]:
    props = {
        "id": _I, "name": _S, "category": _S, "source_endpoint": _S, "target_table": _S, "is_active": _B,
        "is_valid": _B, "invalid_reason": _nullable(_S), "requires_parameters": _B,
        "parameter_source_table": _nullable(_S), "parameters": {"type": "object", "additionalProperties": _S},
        "primary_key": {"type": "array", "items": _S}, "source_type": _S,
        "depends_on": {"type": "array", "items": _I}, "schedule": _nullable(_S), "priority": _I,
        "timeout_seconds": _nullable(_I), "incremental": _B, "timestamp_field": _S, "page_size": _I,
        "fix_reasons": {"type": "array", "items": _S}, "last_run_id": _nullable(_I), "last_run_at": _nullable(_T),
        "last_run_status": _nullable(_S), "last_run_records": _nullable(_I), "last_success_at": _nullable(_T),
        "updated_at": _T,
    }
    return {"type": "object", "required": list(JOB_COLUMNS), "properties": props}


def _run_schema(detail: bool = False) -> dict[str, Any]:
    props: dict[str, Any] = {
        "id": _I, "job_id": _I, "run_status": {"type": "string", "enum": list(RUN_STATUSES)},
        "mode": _S, "trigger": _S, "parent_run_id": _nullable(_I),
        "orchestration_id": _nullable({"type": "string", "format": "uuid"}), "attempt": _I,
        "records_extracted": _I, "records_published": _I, "records_loaded": _I, "records_rejected": _I,
        "api_calls": _I, "parents_total": _nullable(_I), "parents_done": _nullable(_I),
        "parents_failed": _nullable(_I), "error_class": _nullable(_S), "error_message": _nullable(_S),
        "watermark_from": _nullable(_T), "watermark_to": _nullable(_T), "started_at": _T, "heartbeat_at": _T,
        "completed_at": _nullable(_T), "load_completed_at": _nullable(_T), "duration_seconds": _nullable(_N),
        "host": _nullable(_S),
    }
    required = list(RUN_COLUMNS)
    if detail:
        props |= {
            "job_name": _S, "target_table": _S, "run_context": {"type": "object"},
            "error": _nullable({"type": "object", "required": ["class", "message"],
                                "properties": {"class": _nullable(_S), "message": _nullable(_S)}}),
            "retries": {"type": "array", "items": {"$ref": "#/components/schemas/Run"}},
            "rejects": {"type": "object", "required": ["total", "by_error", "first", "more"], "properties": {
                "total": _I,
                "by_error": {"type": "array", "items": {"type": "object", "required": ["stage", "error_class", "count"],
                                                        "properties": {"stage": _S, "error_class": _S, "count": _I}}},
                "first": {"type": "array", "items": {"$ref": "#/components/schemas/Reject"}},
                "more": _nullable(_S)}},
        }
        required += ["job_name", "target_table", "run_context", "error", "retries", "rejects"]
    return {"type": "object", "required": required, "properties": props}


def _reject_schema() -> dict[str, Any]:
    props = {"id": _I, "table_name": _nullable(_S), "topic": _nullable(_S), "kafka_partition": _nullable(_I),
             "kafka_offset": _nullable(_I), "record_key": _nullable(_S), "job_id": _nullable(_I),
             "run_id": _nullable(_I), "stage": {"type": "string", "enum": ["extract", "load", "transform"]},
             "error_class": _S, "error_message": _S, "payload": _nullable(_S),
             "payload_truncated": _nullable(_B), "created_at": _T}
    return {"type": "object", "required": list(props), "properties": props}


def _page_schema(item_ref: str) -> dict[str, Any]:
    return {"type": "object", "required": ["items", "total", "limit", "offset", "next_offset"], "properties": {
        "items": {"type": "array", "items": {"$ref": item_ref}}, "total": {"type": "integer", "minimum": 0},
        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
        "offset": {"type": "integer", "minimum": 0}, "next_offset": _nullable({"type": "integer", "minimum": 0})}}


def _param(name: str, schema: dict[str, Any], description: str, where: str = "query",
           required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path", "schema": schema,
            "description": description}


_PAGE_PARAMS = [
    _param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
           "page size"),
    _param("offset", {"type": "integer", "minimum": 0, "maximum": 10_000_000, "default": 0},
           "items to skip (use next_offset of the previous page)"),
]
_TIME_PARAMS = [
    _param("since", {"type": "string", "format": "date-time", "minLength": 1}, "only items started at or after (ISO 8601)"),
    _param("until", {"type": "string", "format": "date-time", "minLength": 1}, "only items started before (ISO 8601)"),
]


def _responses(ok_schema: dict[str, Any], auth: bool, not_found: bool = False,
               unavailable: bool = True) -> dict[str, Any]:
    err = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    out: dict[str, Any] = {"200": {"description": "OK", "content": {"application/json": {"schema": ok_schema}}},
                           "400": {**err, "description": "invalid query parameter"}}
    if auth:
        out["401"] = {**err, "description": "missing or invalid bearer token"}
    if not_found:
        out["404"] = {**err, "description": "not found"}
    if unavailable:
        out["503"] = {**err, "description": "database unavailable or table not migrated"}
    return out


def openapi_document(auth: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.0 contract of this API (``auth`` = whether a bearer token is required)."""
    ref = "#/components/schemas/"
    sec: list[dict[str, list[str]]] = [{"bearerAuth": []}] if auth else []

    def op(summary: str, params: list[dict[str, Any]], ok: dict[str, Any], op_id: str, not_found: bool = False
           ) -> dict[str, Any]:
        return {"get": {"summary": summary, "operationId": op_id, "parameters": params, "security": sec,
                        "responses": _responses(ok, auth, not_found)}}

    loose = {"type": "object", "additionalProperties": True}
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "TrialSync job history API", "version": "1.0.0",
                 "description": "Read-only run history of the TrialSync ETL: jobs, runs with errors and rejected "
                                "records, transform runs and data-quality results."},
        "paths": {
            f"{API_PREFIX}/jobs": op("List jobs", [
                _param("category", {"type": "string", "minLength": 1, "maxLength": 64}, "only this category"),
                _param("active", {"type": "boolean"}, "only active and valid (true) or the others (false)"),
                *_PAGE_PARAMS], {"$ref": ref + "JobPage"}, "listJobs"),
            f"{API_PREFIX}/jobs/{{job_id}}": op("One job with its 10 most recent runs", [
                _param("job_id", {"type": "integer", "minimum": 1, "maximum": PG_INT_MAX}, "job id", "path")],
                {"$ref": ref + "JobDetail"}, "getJob", not_found=True),
            f"{API_PREFIX}/runs": op("List runs, newest first", [
                _param("job_id", {"type": "integer", "minimum": 1, "maximum": PG_INT_MAX}, "only this job"),
                _param("status", {"type": "string", "enum": list(RUN_STATUSES)}, "only this status"),
                *_TIME_PARAMS, *_PAGE_PARAMS], {"$ref": ref + "RunPage"}, "listRuns"),
            f"{API_PREFIX}/runs/{{run_id}}": op("One run with its error, retries and first rejected records", [
                _param("run_id", {"type": "integer", "minimum": 1, "maximum": PG_BIGINT_MAX}, "run id", "path")],
                {"$ref": ref + "RunDetail"}, "getRun", not_found=True),
            f"{API_PREFIX}/runs/{{run_id}}/rejects": op("Rejected records of a run", [
                _param("run_id", {"type": "integer", "minimum": 1, "maximum": PG_BIGINT_MAX}, "run id", "path"),
                *_PAGE_PARAMS], {"$ref": ref + "RejectPage"}, "listRejects", not_found=True),
            f"{API_PREFIX}/transform-runs": op("Transform (stored procedure) runs, newest first", [
                _param("procedure", {"type": "string", "minLength": 1, "maxLength": 128}, "only this procedure"),
                _param("status", {"type": "string", "enum": list(TRANSFORM_STATUSES)}, "only this status"),
                _param("run_id", {"type": "integer", "minimum": 1, "maximum": PG_BIGINT_MAX},
                       "only transforms triggered by this ETL run"),
                *_TIME_PARAMS, *_PAGE_PARAMS], {"$ref": ref + "RowPage"}, "listTransformRuns"),
            f"{API_PREFIX}/quality-results": op("Data-quality check results, newest first", [
                _param("check", {"type": "string", "minLength": 1, "maxLength": 128}, "only this check"),
                _param("severity", {"type": "string", "enum": ["error", "warning", "info"]}, "only this severity"),
                _param("status", {"type": "string", "enum": list(QUALITY_STATUSES)},
                       "only this outcome (error = the check itself could not run)"),
                _param("passed", {"type": "boolean"}, "only passing (true) or not passing (false) results"),
                *_TIME_PARAMS, *_PAGE_PARAMS], {"$ref": ref + "RowPage"}, "listQualityResults"),
        },
        "components": {
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": _S}},
                "Job": _job_schema(),
                "JobDetail": {"allOf": [{"$ref": ref + "Job"}, {
                    "type": "object", "required": ["recent_runs"],
                    "properties": {"recent_runs": {"type": "array", "items": {"$ref": ref + "Run"}}}}]},
                "Run": _run_schema(),
                "RunListItem": {"allOf": [{"$ref": ref + "Run"}, {
                    "type": "object", "required": ["job_name", "target_table"],
                    "properties": {"job_name": _S, "target_table": _S}}]},
                "RunDetail": _run_schema(detail=True),
                "Reject": _reject_schema(),
                "Row": loose,
                "JobPage": _page_schema(ref + "Job"),
                "RunPage": _page_schema(ref + "RunListItem"),
                "RejectPage": _page_schema(ref + "Reject"),
                "RowPage": _page_schema(ref + "Row"),
            },
        },
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    return doc


def render_reference(doc: dict[str, Any] | None = None) -> str:
    """Markdown reference of the endpoints and their parameters (docs/history-api.md embeds it)."""
    doc = doc or openapi_document(auth=True)
    out = ["| endpoint | what | parameters | answers |", "|---|---|---|---|"]
    for path, item in doc["paths"].items():
        op = item["get"]
        params = []
        for p in op["parameters"]:
            sch = p["schema"]
            kind = "/".join(sch["enum"]) if "enum" in sch else sch.get("format", sch["type"])
            params.append(f"`{p['name']}` ({kind}{', path' if p['in'] == 'path' else ''})")
        codes = ", ".join(op["responses"])
        out.append(f"| `GET {path}` | {op['summary']} | {'; '.join(params) or '-'} | {codes} |")
    return "\n".join(out)


def create_app(settings: Settings | None = None, pool: ConnectionPool | None = None) -> Starlette:
    return HistoryApi(settings, pool).app


def serve(host: str = "127.0.0.1", port: int = 8000, settings: Settings | None = None) -> None:
    """Run the API with uvicorn until SIGTERM/SIGINT: in-flight requests finish, then exit 0."""
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        # uvicorn re-raises the signal after its graceful shutdown (exit status -15); a service
        # stopped on purpose should exit 0, so only ask it to stop.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            def stop(signum: int, frame: object) -> None:
                self.should_exit = True

            old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    api = HistoryApi(settings)
    log.info("api_starting", host=host, port=port, auth="bearer" if api._token else "none")
    server = Server(uvicorn.Config(api.app, host=host, port=port, log_level="warning", access_log=False,
                                   proxy_headers=True, server_header=False, lifespan="off"))
    try:
        server.run()
    finally:
        api.close()
        log.info("api_stopped")
