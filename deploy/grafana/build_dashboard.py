"""Build ``deploy/grafana/dashboards/trialsync.json`` -- the TrialSync Grafana dashboard.

Why a generator: a hand-edited 2,000-line dashboard JSON drifts (duplicate panel ids, broken grid
positions, a query naming a metric that no longer exists). Panels are declared here in a few lines
each; ``tests/unit/test_dashboard.py`` checks that the committed JSON equals this script's output
and that every query names only metrics that ``common/metrics.py`` exports.

Run after editing:  ``.venv/bin/python deploy/grafana/build_dashboard.py``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "trialsync.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
UID = "trialsync-overview"

#: filters applied by the dashboard's variables
JOB = 'job_id=~"$job_id"'
TABLE = 'table=~"$table"'


class Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping into new rows."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def row(self, title: str, description: str = "") -> None:
        if self.x:
            self.y += self.row_h
        self.x, self.row_h = 0, 0
        self.panels.append({"id": self._id(), "type": "row", "title": title, "description": description,
                            "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def add(self, panel: dict[str, Any], w: int, h: int = 8) -> None:
        if self.x + w > 24:
            self.y += self.row_h
            self.x, self.row_h = 0, 0
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _id(self) -> int:
        i = self.next_id
        self.next_id += 1
        return i


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, fmt: str = "time_series"
           ) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "format": fmt}
    if instant:
        t["instant"] = True
        t["range"] = False
    return t


def timeseries(title: str, description: str, targets: list[dict[str, Any]], unit: str = "short",
               stack: bool = False, min0: bool = True, overrides: list[dict[str, Any]] | None = None,
               ) -> dict[str, Any]:
    custom: dict[str, Any] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                              "showPoints": "never", "spanNulls": False}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    defaults: dict[str, Any] = {"unit": unit, "custom": custom}
    if min0:
        defaults["min"] = 0
    return {"type": "timeseries", "title": title, "description": description, "datasource": DS,
            "targets": targets, "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def stat(title: str, description: str, targets: list[dict[str, Any]], unit: str = "short",
         steps: tuple[tuple[float | None, str], ...] = ((None, "green"),), decimals: int | None = None,
         ) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "thresholds": thresholds(*steps), "color": {"mode": "thresholds"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {"type": "stat", "title": title, "description": description, "datasource": DS, "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "background", "graphMode": "area", "textMode": "auto", "justifyMode": "auto"}}


def bargauge(title: str, description: str, targets: list[dict[str, Any]], unit: str = "short",
             steps: tuple[tuple[float | None, str], ...] = ((None, "green"),), max_: float | None = None,
             ) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "min": 0, "thresholds": thresholds(*steps),
                                "color": {"mode": "thresholds"}}
    if max_ is not None:
        defaults["max"] = max_
    return {"type": "bargauge", "title": title, "description": description, "datasource": DS, "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True,
                        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}}


def table(title: str, description: str, targets: list[dict[str, Any]], rename: dict[str, str],
          unit_overrides: dict[str, str] | None = None) -> dict[str, Any]:
    overrides = [{"matcher": {"id": "byName", "options": col},
                  "properties": [{"id": "unit", "value": unit}]}
                 for col, unit in (unit_overrides or {}).items()]
    return {"type": "table", "title": title, "description": description, "datasource": DS, "targets": targets,
            "fieldConfig": {"defaults": {"custom": {"align": "auto"}}, "overrides": overrides},
            "options": {"showHeader": True, "cellHeight": "sm"},
            "transformations": [
                {"id": "merge", "options": {}},
                {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": rename}},
            ]}


def build() -> dict[str, Any]:
    L = Layout()  # noqa: N806 - reads like a layout DSL

    # -- run overview ----------------------------------------------------------------------------
    L.row("Run overview", "Did last night's jobs run, and which failed?")
    L.add(stat("Run success rate (24 h)",
               "Share of job runs finished in the last 24 h with status success. Partial and failed runs "
               "lower it; skipped runs (a parent failed) count as not successful.",
               [target(f'sum(increase(trialsync_job_runs_total{{status="success",{JOB}}}[24h])) '
                       f'/ sum(increase(trialsync_job_runs_total{{{JOB}}}[24h]))')],
               unit="percentunit", decimals=1, steps=((None, "red"), (0.9, "orange"), (0.99, "green"))), w=4)
    L.add(stat("Runs finished (24 h)", "Job runs that finished in the last 24 h, any status.",
               [target(f"sum(increase(trialsync_job_runs_total{{{JOB}}}[24h]))")], decimals=0), w=4)
    L.add(stat("Failed runs (24 h)", "Runs with status failed in the last 24 h. Any value above 0 fires "
               "TrialSyncJobFailed; see the table on the right for which jobs.",
               [target(f'sum(increase(trialsync_job_runs_total{{status="failed",{JOB}}}[24h])) or vector(0)')],
               decimals=0, steps=((None, "green"), (1, "red"))), w=4)
    L.add(stat("Runs in progress", "Job runs currently running in extractor processes.",
               [target("sum(trialsync_job_runs_in_progress)")], decimals=0), w=4)
    L.add(table("Failures by job (24 h)", "Jobs with failed or partial runs in the last 24 h. Open "
                "`trialsync history --job <id>` or the history API (/api/v1/runs?job_id=<id>&status=failed) "
                "for the error.",
                [target(f'sum by (job_id, status) (increase(trialsync_job_runs_total{{status=~"failed|partial",'
                        f'{JOB}}}[24h])) > 0', instant=True, fmt="table")],
                rename={"job_id": "job", "status": "status", "Value": "runs"}), w=8)
    L.add(timeseries("Runs by status", "Finished job runs per hour by final status.",
                     [target(f"sum by (status) (increase(trialsync_job_runs_total{{{JOB}}}[1h]))", "{{status}}")],
                     stack=True), w=12)
    L.add(timeseries("Runs started per hour", "Job runs started per hour, by job.",
                     [target(f"sum by (job_id) (increase(trialsync_job_runs_started_total{{{JOB}}}[1h]))",
                             "job {{job_id}}")], stack=True), w=12)

    # -- throughput ------------------------------------------------------------------------------
    L.row("Throughput", "Records per second through each stage, by staging table.")
    for name, metric, desc in (
        ("Extracted", "trialsync_records_extracted_total", "Records read from the Clinical Conductor API."),
        ("Published", "trialsync_records_published_total", "Records acknowledged by the broker."),
    ):
        L.add(timeseries(f"{name} records/s by table", desc,
                         [target(f"sum by (table) (rate({metric}{{{TABLE}}}[$__rate_interval]))", "{{table}}")],
                         unit="ops", stack=True), w=6)
    L.add(timeseries("Loaded records/s by table", "Records written to Bronze staging (inserted, updated, deleted); "
                     "'unchanged' upserts are skipped rows and shown separately.",
                     [target(f'sum by (table) (rate(trialsync_records_loaded_total{{outcome!="unchanged",{TABLE}}}'
                             f'[$__rate_interval]))', "{{table}}"),
                      target(f'sum(rate(trialsync_records_loaded_total{{outcome="unchanged",{TABLE}}}'
                             f'[$__rate_interval]))', "unchanged (all tables)", ref="B")],
                     unit="ops", stack=False), w=6)
    L.add(timeseries("Rejected records/s by table", "Records sent to the dead-letter topic and etl.dw_etl_rejects, "
                     "by table, stage and reason. Inspect with /api/v1/runs/<run id>/rejects.",
                     [target(f"sum by (table, stage, reason) (rate(trialsync_records_rejected_total{{{TABLE}}}"
                             f"[$__rate_interval]))", "{{table}} {{stage}} {{reason}}")], unit="ops"), w=6)
    L.add(timeseries("Load outcome", "Upsert outcome of loaded records: inserted / updated / unchanged / deleted.",
                     [target(f"sum by (outcome) (rate(trialsync_records_loaded_total{{{TABLE}}}[$__rate_interval]))",
                             "{{outcome}}")], unit="ops", stack=True), w=12)
    L.add(timeseries("Extracted vs loaded (all tables)", "Sum over tables: a persistent gap means the loader "
                     "falls behind (see consumer lag).",
                     [target(f"sum(rate(trialsync_records_extracted_total{{{TABLE}}}[$__rate_interval]))", "extracted"),
                      target(f"sum(rate(trialsync_records_published_total{{{TABLE}}}[$__rate_interval]))", "published",
                             ref="B"),
                      target(f"sum(rate(trialsync_records_loaded_total{{{TABLE}}}[$__rate_interval]))", "loaded",
                             ref="C")], unit="ops"), w=12)

    # -- source API ------------------------------------------------------------------------------
    L.row("Clinical Conductor API", "Latency, errors, retries and rate limiting, by endpoint template.")
    L.add(timeseries("API latency p50 / p95", "Request latency quantiles over all endpoints, from the client's "
                     "histogram.",
                     [target("histogram_quantile(0.5, sum by (le) (rate(trialsync_api_request_duration_seconds_bucket"
                             "[$__rate_interval])))", "p50"),
                      target("histogram_quantile(0.95, sum by (le) (rate(trialsync_api_request_duration_seconds_bucket"
                             "[$__rate_interval])))", "p95", ref="B")], unit="s"), w=8)
    L.add(timeseries("API latency p95 by endpoint", "Slowest endpoint templates (p95).",
                     [target("topk(10, histogram_quantile(0.95, sum by (le, endpoint) "
                             "(rate(trialsync_api_request_duration_seconds_bucket[$__rate_interval]))))",
                             "{{endpoint}}")], unit="s"), w=8)
    L.add(timeseries("API requests/s by status class", "2xx success, 4xx client errors (401 = bad key, "
                     "404 = invalid endpoint, 429 = rate limited), 5xx server errors, 'error' = no answer.",
                     [target("sum by (status_class) (rate(trialsync_api_requests_total[$__rate_interval]))",
                             "{{status_class}}")], unit="reqps", stack=True), w=8)
    L.add(timeseries("429s and retries", "HTTP 429 answers and retried requests per second. Steady 429s mean "
                     "CC_RATE_LIMIT_RPS is above what the instance allows.",
                     [target("sum(rate(trialsync_api_rate_limited_total[$__rate_interval]))", "429 rate limited"),
                      target("sum by (reason) (rate(trialsync_api_retries_total[$__rate_interval]))",
                             "retry: {{reason}}", ref="B")], unit="reqps"), w=12)
    L.add(stat("API error ratio (15 m)", "Share of API requests answered 5xx or not answered at all in the last "
               "15 minutes. Above 5 % fires TrialSyncApiErrorRate.",
               [target('sum(rate(trialsync_api_requests_total{status_class=~"5xx|error"}[15m])) '
                       '/ sum(rate(trialsync_api_requests_total[15m]))')],
               unit="percentunit", decimals=2, steps=((None, "green"), (0.01, "orange"), (0.05, "red"))), w=6)
    L.add(stat("429s (24 h)", "HTTP 429 answers in the last 24 h.",
               [target("sum(increase(trialsync_api_rate_limited_total[24h])) or vector(0)")], decimals=0,
               steps=((None, "green"), (1, "orange"))), w=6)

    L.add(timeseries("Fan-out: unannounced child changes", "Child records that changed under a parent the "
                     "`changed` fan-out policy did not mark changed (the parent's own timestamp did not move), found "
                     "by the sweep. Any fires TrialSyncFanoutAssumptionBroken; the job then asks every parent until "
                     "one complete run finds none (guard, 1 = holding).",
                     [target(f"sum by (job_id) (increase(trialsync_fanout_unannounced_changes_total{{{JOB}}}[1d]))",
                             "job {{job_id}} changes/day"),
                      target(f"max by (job_id) (trialsync_fanout_guard_active{{{JOB}}})", "job {{job_id}} guard",
                             ref="B")]), w=12)
    L.add(stat("Incremental runs that read everything (24 h)", "Runs whose records carried none of the job's "
               "timestamp field: no watermark can be kept, so every incremental run reads everything. Set the "
               "job's timestamp_field in config/jobs.yaml (the run's warning names the field).",
               [target(f"sum(increase(trialsync_incremental_fallback_total{{{JOB}}}[24h])) or vector(0)")],
               decimals=0, steps=((None, "green"), (1, "orange"))), w=24, h=4)
    L.add(timeseries("Fan-out: parents left by the call budget", "Parents a budgeted night left for the next "
                     "one, by why they were due (changed, swept, unfinished first pass, rest). Persistent "
                     "'changed' means the budget cannot keep up: raise ETL_NIGHT_WINDOW_HOURS or CC_RATE_LIMIT_RPS.",
                     [target(f"sum by (job_id, reason) (trialsync_fanout_parents_left{{{JOB}}})",
                             "job {{job_id}} {{reason}}")]), w=12)

    # -- loading ---------------------------------------------------------------------------------
    L.row("Loading", "Consumer lag, micro-batches and the database pool.")
    L.add(timeseries("Consumer lag by topic", "Messages behind the high watermark, summed over partitions, per "
                     "consumer group and topic. Growing lag fires TrialSyncConsumerLagGrowing: add loader processes "
                     "(up to the partition count) or raise LOADER_BATCH_SIZE.",
                     [target("sum by (group, topic) (trialsync_consumer_lag_messages)", "{{group}} {{topic}}")]),
          w=12)
    L.add(timeseries("Publish → row visible (p95)", "End-to-end latency from the extractor's publish to the row "
                     "being committed in staging, p95 by table.",
                     [target(f"histogram_quantile(0.95, sum by (le, table) "
                             f"(rate(trialsync_loader_end_to_end_seconds_bucket{{{TABLE}}}[$__rate_interval])))",
                             "{{table}}")], unit="s"), w=12)
    L.add(timeseries("Batch size p50 / p95", "Records per flushed micro-batch. Small batches under load mean "
                     "LOADER_FLUSH_MS is too short.",
                     [target(f"histogram_quantile(0.5, sum by (le) (rate(trialsync_loader_batch_size_bucket{{{TABLE}}}"
                             f"[$__rate_interval])))", "p50"),
                      target(f"histogram_quantile(0.95, sum by (le) (rate(trialsync_loader_batch_size_bucket{{{TABLE}}}"
                             f"[$__rate_interval])))", "p95", ref="B")]), w=8)
    L.add(timeseries("Flush duration p95 by table", "COPY + upsert + commit time of one batch.",
                     [target(f"histogram_quantile(0.95, sum by (le, table) (rate("
                             f"trialsync_loader_flush_duration_seconds_bucket{{{TABLE}}}[$__rate_interval])))",
                             "{{table}}")], unit="s"), w=8)
    L.add(timeseries("DB pool connections", "In-use and idle connections per pool. In-use at the pool size for "
                     "long means DATABASE_POOL_SIZE is too small or queries are slow.",
                     [target("sum by (pool, state) (trialsync_db_pool_connections)", "{{pool}} {{state}}")]), w=8)
    L.add(timeseries("Back-off pauses", "Pauses because a dependency (database, broker, API) was unavailable.",
                     [target("sum by (service, dependency) (increase(trialsync_backoff_total[$__rate_interval]))",
                             "{{service}} → {{dependency}}")]), w=24, h=6)

    # -- jobs: duration and freshness ------------------------------------------------------------
    L.row("Jobs: duration and freshness", "How long jobs take against their timeout, and how old each table's data is.")
    L.add(timeseries("Job duration p95 vs timeout", "p95 run duration per job (solid) and its configured timeout "
                     "(dashed). A job nearing its timeout will soon be stopped and marked failed: raise "
                     "timeout_seconds in config/jobs.yaml or make it incremental.",
                     [target(f"histogram_quantile(0.95, sum by (le, job_id) (rate("
                             f"trialsync_job_run_duration_seconds_bucket{{{JOB}}}[6h])))", "job {{job_id}} p95"),
                      target(f"max by (job_id) (trialsync_job_timeout_seconds{{{JOB}}})", "job {{job_id}} timeout",
                             ref="B")],
                     unit="s",
                     overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"},
                                 "properties": [{"id": "custom.lineStyle",
                                                 "value": {"fill": "dash", "dash": [10, 10]}}]}]), w=12)
    L.add(bargauge("Duration / timeout (worst runs, 6 h)", "Longest run in the last 6 h (bucket upper bound) as "
                   "a share of the job's timeout. Red above 80 %.",
                   [target(f"topk(15, histogram_quantile(0.99, sum by (le, job_id) (rate("
                           f"trialsync_job_run_duration_seconds_bucket{{{JOB}}}[6h]))) / on (job_id) "
                           f"max by (job_id) (trialsync_job_timeout_seconds{{{JOB}}}))", "job {{job_id}}",
                           instant=True)],
                   unit="percentunit", max_=1, steps=((None, "green"), (0.6, "orange"), (0.8, "red"))), w=12)
    L.add(bargauge("Freshness per job", "Time since each job's last successful run. Above 26 h fires "
                   "TrialSyncDataStale (the nightly run was missed or failed).",
                   [target(f"sort_desc(time() - max by (job_id) (trialsync_job_last_success_timestamp_seconds{{{JOB}}}))",
                           "job {{job_id}}", instant=True)],
                   unit="s", max_=2 * 26 * 3600, steps=((None, "green"), (20 * 3600, "orange"), (26 * 3600, "red"))),
          w=12, h=12)
    L.add(table("Job run details", "Per job: last success, time since, in-progress runs and runs by status "
                "over 24 h.",
                [target(f"max by (job_id) (trialsync_job_last_success_timestamp_seconds{{{JOB}}}) * 1000",
                        instant=True, fmt="table"),
                 target(f"time() - max by (job_id) (trialsync_job_last_success_timestamp_seconds{{{JOB}}})",
                        ref="B", instant=True, fmt="table"),
                 target(f'sum by (job_id) (increase(trialsync_job_runs_total{{status="success",{JOB}}}[24h]))',
                        ref="C", instant=True, fmt="table"),
                 target(f'sum by (job_id) (increase(trialsync_job_runs_total{{status!="success",{JOB}}}[24h]))',
                        ref="D", instant=True, fmt="table")],
                rename={"job_id": "job", "Value #A": "last success", "Value #B": "age",
                        "Value #C": "ok runs 24h", "Value #D": "not-ok runs 24h"},
                unit_overrides={"last success": "dateTimeAsIso", "age": "s"}), w=12, h=12)

    # -- transform and quality -------------------------------------------------------------------
    L.row("Transform and data quality", "Silver/Gold procedures and the quality checks after them.")
    L.add(timeseries("Transform duration p95 by procedure", "Stored-procedure run time.",
                     [target("histogram_quantile(0.95, sum by (le, procedure) "
                             "(rate(trialsync_transform_duration_seconds_bucket[$__rate_interval])))",
                             "{{procedure}}")], unit="s"), w=8)
    L.add(timeseries("Transform rows by procedure", "Rows inserted / updated / closed (SCD2) per procedure.",
                     [target("sum by (procedure, action) (increase(trialsync_transform_rows_total[$__rate_interval]))",
                             "{{procedure}} {{action}}")], stack=True), w=8)
    L.add(timeseries("Transform runs by status", "Procedure runs per hour by status; failures fire "
                     "TrialSyncTransformFailed.",
                     [target("sum by (status) (increase(trialsync_transform_runs_total[1h]))", "{{status}}")],
                     stack=True), w=8)
    L.add(stat("Quality checks failing", "Checks whose last run failed, by severity 'error'. Any error-severity "
               "failure fires TrialSyncQualityCheckFailing.",
               [target('count(trialsync_quality_check_passing{severity="error"} == 0) or vector(0)')],
               decimals=0, steps=((None, "green"), (1, "red"))), w=6)
    L.add(table("Quality checks", "Every check's last result: 1 = passing, 0 = failing, and the failing row count.",
                [target("max by (check, severity) (trialsync_quality_check_passing)", instant=True, fmt="table"),
                 target("max by (check, severity) (trialsync_quality_check_failed_rows)", ref="B", instant=True,
                        fmt="table")],
                rename={"check": "check", "severity": "severity", "Value #A": "passing", "Value #B": "failed rows"}),
          w=18)

    # -- scheduler, alerts, simulator ------------------------------------------------------------
    L.row("Scheduler and alerts", "Schedules, firings and alerts sent by TrialSync itself.")
    L.add(table("Next scheduled runs", "Next fire time of each scheduled job.",
                [target(f"max by (job_id) (trialsync_scheduler_next_fire_timestamp_seconds{{{JOB}}}) * 1000",
                        instant=True, fmt="table")],
                rename={"job_id": "job", "Value": "next fire"}, unit_overrides={"next fire": "dateTimeAsIso"}), w=8)
    L.add(timeseries("Scheduler firings", "Scheduled firings by outcome (started / skipped because already "
                     "running / missed).",
                     [target(f"sum by (outcome) (increase(trialsync_scheduler_fires_total{{{JOB}}}[1h]))",
                             "{{outcome}}")], stack=True), w=8)
    L.add(timeseries("Alerts sent", "Alerts delivered by TrialSync (email, Slack), by kind.",
                     [target("sum by (channel, kind) (increase(trialsync_alerts_sent_total[1h]))",
                             "{{channel}} {{kind}}")], stack=True), w=8)
    L.add(timeseries("Services up", "1 when Prometheus can scrape the service's /metrics. 0 for 2 minutes fires "
                     "TrialSyncServiceDown.",
                     [target('up{job="trialsync"}', "{{service}} {{instance}}")], min0=True), w=12, h=6)
    L.add(timeseries("Simulator (dev only)", "Requests served and faults injected by the CC simulator.",
                     [target("sum by (status) (rate(trialsync_sim_requests_total[$__rate_interval]))", "{{status}}"),
                      target("sum by (kind) (rate(trialsync_sim_faults_injected_total[$__rate_interval]))",
                             "fault {{kind}}", ref="B")], unit="reqps"), w=12, h=6)

    return {
        "uid": UID,
        "title": "TrialSync",
        "description": "TrialSync ETL: runs, throughput, source API, loading, freshness, transforms, quality. "
                       "Generated by deploy/grafana/build_dashboard.py -- edit that, not this file.",
        "tags": ["trialsync", "etl"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-24h", "to": "now"},
        "timepicker": {},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {"text": "Prometheus", "value": "prometheus"}, "hide": 0, "refresh": 1},
            {"name": "job_id", "label": "Job", "type": "query", "datasource": DS,
             "query": {"query": "label_values(trialsync_job_runs_started_total, job_id)", "refId": "job_id"},
             "definition": "label_values(trialsync_job_runs_started_total, job_id)",
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 3,
             "current": {"text": "All", "value": "$__all"}},
            {"name": "table", "label": "Table", "type": "query", "datasource": DS,
             "query": {"query": "label_values(trialsync_records_extracted_total, table)", "refId": "table"},
             "definition": "label_values(trialsync_records_extracted_total, table)",
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "panels": L.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT} ({len(build()['panels'])} panels)", file=sys.stderr)
