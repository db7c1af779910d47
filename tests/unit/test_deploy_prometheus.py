"""Prometheus config and alert rules: parse, name only exported metrics, cover what the issue asks
and pass promtool (check config/rules, unit tests in alerts_test.yml) where promtool is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.unit.promql_names import exported_series, problems

PROM = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")


def _rules() -> list[dict]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_alert_expressions_name_only_exported_metrics() -> None:
    exported = exported_series()
    errors = []
    for r in _rules():
        errors += problems(r["expr"], r["alert"], exported)
    assert not errors, "\n".join(errors)


def test_required_alerts_exist_with_runbooks() -> None:
    rules = {r["alert"]: r for r in _rules()}
    for name in ("TrialSyncJobFailed", "TrialSyncDataStale", "TrialSyncConsumerLagGrowing", "TrialSyncApiErrorRate",
                 "TrialSyncQualityCheckFailing", "TrialSyncServiceDown"):
        assert name in rules, name
    assert "26 * 3600" in rules["TrialSyncDataStale"]["expr"]
    monitoring = (PROM.parents[1] / "docs" / "monitoring.md").read_text()
    for name, r in rules.items():
        assert r["labels"]["severity"] in ("critical", "warning", "info"), name
        assert {"summary", "description", "runbook"} <= set(r["annotations"]), name
        assert f"### {name}" in monitoring, f"docs/monitoring.md does not explain {name}"


def test_every_alert_has_a_unit_test() -> None:
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    tested = {a["alertname"] for t in tests["tests"] for a in t["alert_rule_test"] if a.get("exp_alerts")}
    silent = {a["alertname"] for t in tests["tests"] for a in t["alert_rule_test"] if not a.get("exp_alerts")}
    names = {r["alert"] for r in _rules()}
    assert names <= tested, f"alerts never shown firing: {names - tested}"
    assert names - {"TrialSyncServiceMissing"} <= silent, f"alerts never shown silent: {names - silent}"


def test_scrape_config_finds_every_service() -> None:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "trialsync")
    names = {n for sd in job["dns_sd_configs"] for n in sd["names"]}
    assert {"loader", "transform", "scheduler", "api"} <= names
    assert cfg["rule_files"] == ["alerts.yml"]
    compose = yaml.safe_load((PROM.parents[1] / "compose.yaml").read_text())
    assert names <= set(compose["services"]), "every scraped name must be a compose service"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
@pytest.mark.parametrize("args", [["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                                  ["test", "rules", "alerts_test.yml"]])
def test_promtool(args: list[str]) -> None:
    proc = subprocess.run([PROMTOOL, *args], cwd=PROM, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_every_long_running_compose_service_is_scraped_on_its_metrics_port() -> None:
    """Each TrialSync service compose runs (not the one-shot migrate) is a scrape target on the port
    its /metrics listens on: METRICS_PORT for the services, the API port for the simulator."""
    compose = yaml.safe_load((PROM.parents[1] / "compose.yaml").read_text())
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "trialsync")
    scraped = {n: sd["port"] for sd in job["dns_sd_configs"] for n in sd["names"]}
    for name, svc in compose["services"].items():
        if svc.get("image") != "trialsync:local" or name == "migrate":
            continue
        cmd = svc.get("command") or []
        expected = int(cmd[cmd.index("--port") + 1]) if cmd[:1] == ["simulator"] else int(svc["environment"]["METRICS_PORT"])
        assert scraped.get(name) == expected, f"compose service {name} is not scraped on port {expected}"
