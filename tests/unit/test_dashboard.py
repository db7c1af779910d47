"""The Grafana dashboard: generated from deploy/grafana/build_dashboard.py, provisioned, and every
panel's PromQL names only metrics (and labels) that common/metrics.py exports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tests.unit.promql_names import analyse, exported_series, problems

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "trialsync.json"


def _builder():
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(d: dict) -> list[dict]:
    return [p for p in d["panels"] if p["type"] != "row"]


def test_committed_json_is_the_generators_output() -> None:
    assert DASHBOARD.read_text(encoding="utf-8") == _builder().render(), (
        "deploy/grafana/dashboards/trialsync.json is stale: run .venv/bin/python deploy/grafana/build_dashboard.py")


def test_every_query_names_only_exported_metrics_and_labels(dashboard: dict) -> None:
    exported = exported_series()
    errors, n = [], 0
    for p in _panels(dashboard):
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            n += 1
            errors += problems(t["expr"], f"panel {p['title']!r} {t['refId']}", exported)
    assert not errors, "\n".join(errors)
    assert n >= 40


def test_variable_queries_name_exported_metrics(dashboard: dict) -> None:
    exported = exported_series()
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            expr = var["definition"].removeprefix("label_values(").rsplit(",", 1)
            assert expr[0] in exported, var["name"]
            assert expr[1].strip(" )") in exported[expr[0]], var["name"]


def test_the_checker_catches_unknown_names_and_labels() -> None:
    exported = exported_series()
    assert problems("rate(trialsync_records_loaded_total[5m])", "ok", exported) == []
    assert problems("rate(trialsync_records_loaded[5m])", "x", exported)  # missing _total
    assert problems("rate(trialsync_job_run_duration_seconds[5m])", "x", exported)  # histogram w/o suffix
    assert problems('sum by (tabel) (trialsync_records_loaded_total)', "x", exported)
    assert problems('trialsync_records_loaded_total{outcom="inserted"}', "x", exported)
    assert analyse('histogram_quantile(0.95, sum by (le) (rate(a_bucket{x="y"}[5m])))').names == {"a_bucket"}


def test_every_family_is_on_the_dashboard(dashboard: dict) -> None:
    """A family nobody can see is a family nobody watches (simulator families included)."""
    used: set[str] = set()
    for p in _panels(dashboard):
        for t in p["targets"]:
            used |= analyse(t["expr"]).names
    families = {n.removesuffix("_bucket").removesuffix("_total") for n in used}
    exported = {n.removesuffix("_bucket").removesuffix("_total").removesuffix("_count").removesuffix("_sum")
                .removesuffix("_created") for n in exported_series()}
    missing = exported - families - {"trialsync_sim_records_served"}
    assert not missing, f"families without a panel: {sorted(missing)}"


def test_required_panels_exist(dashboard: dict) -> None:
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for needle in ("success rate", "failures by job", "records/s by table", "latency p50 / p95", "429",
                   "consumer lag", "duration p95 vs timeout", "freshness", "quality checks", "db pool",
                   "transform duration"):
        assert needle in titles, needle
    exprs = " ".join(t["expr"] for p in _panels(dashboard) for t in p["targets"])
    assert "time() - max by (job_id) (trialsync_job_last_success_timestamp_seconds" in exprs
    assert "trialsync_job_timeout_seconds" in exprs


def test_layout_is_valid(dashboard: dict) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        assert p.get("description"), f"panel {p['title']!r} needs a description (docs/monitoring.md)"
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36


def test_panels_use_the_provisioned_datasource(dashboard: dict) -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (prom,) = ds["datasources"]
    var = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert var["current"]["value"] == prom["uid"] and prom["type"] == var["query"] == "prometheus"
    assert prom["url"] == "http://prometheus:9090"
    for p in _panels(dashboard):
        assert p["datasource"]["uid"] == "${datasource}"


def test_dashboard_provider_points_where_compose_mounts_the_json() -> None:
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "trialsync.yaml").read_text())
    path = prov["providers"][0]["options"]["path"]
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
