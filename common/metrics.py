"""Prometheus metrics: every family TrialSync exports, defined once, plus the per-process server
that serves ``/metrics``, ``/healthz`` and ``/readyz``.

Labels never carry ids of records, parameter values or secrets: API endpoints are labelled by
their *template* (``/api/v1/studies/{studyId}/subjects/odata``), tables by name, jobs by id.

Processes that fork workers (``trialsync load --workers N``) set PROMETHEUS_MULTIPROC_DIR before
forking; the server then aggregates all workers' samples (prometheus_client multiprocess mode).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DURATION = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
_BATCH = (1, 10, 100, 500, 1000, 2000, 5000, 10000, 20000, 50000)
_FLUSH = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# -- jobs and runs (extractor, orchestrator, scheduler) ------------------------------------------
JOB_RUNS_STARTED = Counter("trialsync_job_runs_started_total", "Job runs started", ["job_id"])
JOB_RUNS = Counter("trialsync_job_runs_total", "Job runs finished, by final status", ["job_id", "status"])
JOB_DURATION = Histogram("trialsync_job_run_duration_seconds", "Wall time of a job run", ["job_id"], buckets=_DURATION)
JOB_TIMEOUT = Gauge("trialsync_job_timeout_seconds", "Configured timeout of a job", ["job_id"], multiprocess_mode="max")
JOB_LAST_SUCCESS = Gauge("trialsync_job_last_success_timestamp_seconds", "Unix time of the job's last successful run",
                         ["job_id"], multiprocess_mode="max")
RUNS_IN_PROGRESS = Gauge("trialsync_job_runs_in_progress", "Job runs currently running", multiprocess_mode="livesum")

# -- records by table --------------------------------------------------------------------------
RECORDS_EXTRACTED = Counter("trialsync_records_extracted_total", "Records read from the source API", ["table"])
RECORDS_PUBLISHED = Counter("trialsync_records_published_total", "Records acknowledged by the broker", ["table"])
RECORDS_LOADED = Counter("trialsync_records_loaded_total", "Records written to staging, by outcome",
                         ["table", "outcome"])  # outcome: inserted | updated | unchanged | deleted
RECORDS_REJECTED = Counter("trialsync_records_rejected_total", "Records sent to the dead-letter queue",
                           ["table", "stage", "reason"])

# -- Clinical Conductor API client ---------------------------------------------------------------
API_REQUESTS = Counter("trialsync_api_requests_total", "HTTP requests to the source API",
                       ["endpoint", "status_class"])  # status_class: 2xx 4xx 5xx error
API_LATENCY = Histogram("trialsync_api_request_duration_seconds", "Latency of source API requests", ["endpoint"],
                        buckets=_LATENCY)
API_RETRIES = Counter("trialsync_api_retries_total", "Retried source API requests", ["endpoint", "reason"])
#: a change found under a parent the fan-out policy did not mark changed (its own timestamp did not
#: move): under the `changed` policy such changes wait for the sweep, and the job's guard falls
#: back to asking every parent (docs/extraction.md)
INCREMENTAL_FALLBACK = Counter("trialsync_incremental_fallback_total",
                               "Runs whose records carried no timestamp field, so incremental runs read everything",
                               ["job_id"])
FANOUT_UNANNOUNCED = Counter("trialsync_fanout_unannounced_changes_total",
                             "Child changes found under parents not marked changed (changed fan-out policy)", ["job_id"])
FANOUT_GUARD = Gauge("trialsync_fanout_guard_active",
                     "1 while a fan-out job asks every parent because its changed-parent assumption failed",
                     ["job_id"], multiprocess_mode="mostrecent")
CALLS_BUDGET_LEFT = Gauge("trialsync_fanout_parents_left",
                          "Parents a budgeted run left for the next night, by why they were due",
                          ["job_id", "reason"], multiprocess_mode="mostrecent")
API_RATE_LIMITED = Counter("trialsync_api_rate_limited_total", "HTTP 429 answers from the source API", ["endpoint"])

# -- loader --------------------------------------------------------------------------------------
CONSUMER_LAG = Gauge("trialsync_consumer_lag_messages", "Messages behind the partition's high watermark",
                     ["group", "topic", "partition"], multiprocess_mode="livemax")
BATCH_SIZE = Histogram("trialsync_loader_batch_size", "Records per flushed micro-batch", ["table"], buckets=_BATCH)
FLUSH_DURATION = Histogram("trialsync_loader_flush_duration_seconds", "COPY + upsert + commit time of one batch",
                           ["table"], buckets=_FLUSH)
LOAD_LAG = Histogram("trialsync_loader_end_to_end_seconds", "Publish -> row visible", ["table"], buckets=_FLUSH)
DB_POOL = Gauge("trialsync_db_pool_connections", "Database pool connections", ["pool", "state"],
                multiprocess_mode="livesum")  # state: in_use | idle
BACKOFF = Counter("trialsync_backoff_total", "Pauses caused by an unavailable dependency", ["service", "dependency"])

# -- transform and quality -----------------------------------------------------------------------
TRANSFORM_DURATION = Histogram("trialsync_transform_duration_seconds", "Procedure run time", ["procedure"],
                               buckets=_FLUSH + (30, 60, 300, 900))
TRANSFORM_ROWS = Counter("trialsync_transform_rows_total", "Rows changed by a procedure", ["procedure", "action"])
TRANSFORM_RUNS = Counter("trialsync_transform_runs_total", "Procedure runs by status", ["procedure", "status"])
QUALITY_STATUS = Gauge("trialsync_quality_check_passing", "1 when the last run of the check passed, else 0",
                       ["check", "severity"], multiprocess_mode="liveall")
QUALITY_FAILED_ROWS = Gauge("trialsync_quality_check_failed_rows", "Rows failing the check at its last run",
                            ["check", "severity"], multiprocess_mode="liveall")

# -- scheduler and alerts ------------------------------------------------------------------------
SCHEDULER_FIRES = Counter("trialsync_scheduler_fires_total", "Scheduled job firings", ["job_id", "outcome"])
SCHEDULER_NEXT_FIRE = Gauge("trialsync_scheduler_next_fire_timestamp_seconds", "Next fire time of a schedule",
                            ["job_id"], multiprocess_mode="max")
ALERTS_SENT = Counter("trialsync_alerts_sent_total", "Alerts delivered", ["channel", "kind"])

# -- simulator -----------------------------------------------------------------------------------
SIM_REQUESTS = Counter("trialsync_sim_requests_total", "Requests served by the CC simulator", ["route", "status"])
SIM_RECORDS = Counter("trialsync_sim_records_served_total", "Records served by the CC simulator", ["route"])
SIM_FAULTS = Counter("trialsync_sim_faults_injected_total", "Faults injected by the CC simulator", ["kind"])

ReadinessCheck = Callable[[], tuple[bool, str]]


def status_class(status: int | None) -> str:
    if status is None:
        return "error"
    return f"{status // 100}xx"


def registry_for_scrape() -> CollectorRegistry:
    """The registry to expose: the multiprocess aggregate when workers were forked, else the default."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return reg
    return REGISTRY


class MetricsServer:
    """``/metrics``, ``/healthz`` (process alive) and ``/readyz`` (dependencies) on one port."""

    def __init__(self, port: int, service: str, checks: dict[str, ReadinessCheck] | None = None,
                 host: str = "127.0.0.1"):
        self.service = service
        self.checks = dict(checks or {})
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body = generate_latest(registry_for_scrape())
                    self._send(200, body, CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b'{"status":"ok","service":"' + outer.service.encode() + b'"}', "application/json")
                elif path == "/readyz":
                    ok, body = outer.readiness()
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b'{"error":"not found"}', "application/json")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name=f"metrics-{service}", daemon=True)

    def readiness(self) -> tuple[bool, bytes]:
        return self.evaluate(self.service, self.checks)

    @staticmethod
    def evaluate(service: str, checks: dict[str, ReadinessCheck]) -> tuple[bool, bytes]:
        """Run every check; ready only when all pass. Also used by servers with their own HTTP stack."""
        import orjson

        results = {}
        ok = True
        for name, check in checks.items():
            try:
                good, detail = check()
            except Exception as e:  # noqa: BLE001 - a failing check is a not-ready answer, not a crash
                good, detail = False, f"{type(e).__name__}: {e}"
            results[name] = {"ok": good, "detail": detail}
            ok = ok and good
        return ok, orjson.dumps({"ready": ok, "service": service, "checks": results})

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start_metrics_server(service: str, port: int | None = None, checks: dict[str, ReadinessCheck] | None = None,
                         standard_checks: bool = True, any_port_if_taken: bool = False) -> MetricsServer | None:
    """Start the per-process server if ENABLE_METRICS, on METRICS_HOST:METRICS_PORT unless given.

    ``/readyz`` runs the standard checks of the service type (``common.health.service_checks``:
    database and broker; for extractors also the Clinical Conductor API) plus ``checks``, which
    add to them or replace one of the same name.

    The interface is METRICS_HOST, 127.0.0.1 by default: /metrics and /readyz describe the
    deployment (tables, jobs, dependency errors) and should not face a network unless the operator
    says so (compose sets 0.0.0.0 inside its private network). A service whose port is taken fails
    (OSError: Prometheus scrapes a fixed port); a one-shot command (``any_port_if_taken``: an
    extract started beside a running loader) takes a free port instead of going without /metrics,
    and logs which.
    """
    from common.config import get_settings
    from common.logging import get_logger

    s = get_settings()
    if not s.enable_metrics:
        return None
    merged: dict[str, ReadinessCheck] = {}
    if standard_checks:
        from common.health import service_checks

        merged.update(service_checks(service, s))
    merged.update(checks or {})
    wanted = s.metrics_port if port is None else port
    log = get_logger("metrics")
    try:
        server = MetricsServer(wanted, service, merged, host=s.metrics_host)
    except OSError as e:
        if not any_port_if_taken or wanted == 0:
            raise
        server = MetricsServer(0, service, merged, host=s.metrics_host)
        log.warning("metrics_port_in_use", service=service, port=wanted, serving_port=server.port,
                    error=str(e), hint=f"/metrics of this {service} is on port {server.port}")
    log.info("metrics_server_started", service=service, host=s.metrics_host, port=server.port)
    return server.start()
