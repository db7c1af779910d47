"""A real Prometheus (Debian's 2.42, when installed) scrapes a TrialSync metrics endpoint, loads
deploy/prometheus/alerts.yml, and runs every dashboard query without an error."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")


def _query(base: str, expr: str) -> dict:
    r = requests.get(base + "/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body.get("status") == "success", f"{expr}: {body}"
    return body["data"]


@pytest.fixture(scope="module")
def prometheus() -> Iterator[tuple[str, object]]:
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    from common.metrics import MetricsServer
    from common.stack import free_port

    srv = MetricsServer(0, "loader", {}, host="127.0.0.1").start()
    tmp = Path(tempfile.mkdtemp(prefix="trialsync-prom-"))
    port = free_port()
    cfg = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(REPO / "deploy" / "prometheus" / "alerts.yml")],
        "scrape_configs": [{"job_name": "trialsync", "static_configs": [
            {"targets": [f"127.0.0.1:{srv.port}"], "labels": {"service": "loader"}}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(base + "/-/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "prometheus.log").read_text()
            time.sleep(0.2)
        yield base, srv
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait(base: str, expr: str, timeout: float = 30.0) -> list:
    deadline = time.monotonic() + timeout
    while True:
        result = _query(base, expr)["result"]
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_prometheus_scrapes_a_trialsync_process(prometheus) -> None:
    from common.metrics import API_LATENCY, RECORDS_EXTRACTED

    base, _ = prometheus
    RECORDS_EXTRACTED.labels(table="dim_prom_probe_staging").inc(7)
    API_LATENCY.labels(endpoint="/api/v1/studies/odata").observe(0.2)
    up = _wait(base, 'up{job="trialsync",service="loader"} == 1')
    assert up, "Prometheus never scraped the metrics endpoint"
    got = _wait(base, 'trialsync_records_extracted_total{table="dim_prom_probe_staging"}')
    assert got and float(got[0]["value"][1]) == 7.0
    assert _wait(base, 'trialsync_api_request_duration_seconds_count{endpoint="/api/v1/studies/odata"}')


def test_prometheus_loads_every_alert_rule(prometheus) -> None:
    base, _ = prometheus
    deadline = time.monotonic() + 30
    while True:
        groups = requests.get(base + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        evaluated = [r for r in rules if r.get("lastEvaluation", "").startswith("0001") is False]
        if rules and all(r.get("health") == "ok" for r in evaluated) and len(evaluated) == len(rules):
            break
        assert time.monotonic() < deadline, json.dumps(rules, indent=1)[:3000]
        time.sleep(0.5)
    names = {r["name"] for r in rules}
    doc = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert names == {r["alert"] for g in doc["groups"] for r in g["rules"]}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]


def test_every_dashboard_query_runs_in_prometheus(prometheus) -> None:
    base, _ = prometheus
    dash = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "trialsync.json").read_text())
    n = 0
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            expr = (t["expr"].replace("$__rate_interval", "1m").replace('"$job_id"', '".*"')
                    .replace('"$table"', '".*"'))
            _query(base, expr)  # asserts status == success (parses and evaluates)
            n += 1
    assert n >= 40
