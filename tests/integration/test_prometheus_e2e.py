"""The Grafana dashboard and the alert rules against a real Prometheus scraping a real small run.

Debian's Prometheus (skipped, never failed, where it cannot be installed) scrapes every TrialSync
service of a private embedded stack -- loader, transformer, scheduler, history API and the CC
simulator, each on its own metrics port with the ``service`` label compose gives it -- while the
scheduler catches up three scheduled jobs (with their parents) against a simulator that answers
some 429s and 500s and fails Studies for good. The run also meets what a night brings: a record
without an id (dead-lettered), records published again unchanged, a PostgreSQL outage during a
load (back-off), an alert delivered to a webhook.

Then, through Prometheus's HTTP API:

* every query of every Grafana panel returns series at some point during or after the run;
* every metric a panel names is exported by some scraped process;
* every alert rule of deploy/prometheus/alerts.yml loads and evaluates without error (``for:``
  durations shortened to seconds in a copy, so a test can wait for them);
* the loader-down alert fires after the loader is killed and resolves after it is restarted.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
import yaml

from common.stack import free_port
from tests.integration.orch_support import webhook_server
from tests.integration.stack_support import PrivateStack
from tests.loader_support import REPO, TRIALSYNC, Rec, publish, ts

pytestmark = [pytest.mark.integration, pytest.mark.heavy]  # ~2 min: a real run, an outage, alert timing

SCHEDULED = ("1", "8", "10")  # Sites, Elements, Subjects (child of Studies, which fails: skipped)
FAULTS = ("429@/api/v1/sites,count=2,retry_after=0;500@/api/v1/elements/odata,count=1;"
          "500@/api/v1/studies/odata")


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "prometheus"], capture_output=True,
                       timeout=600)
        found = shutil.which("prometheus")
    if found is None:
        pytest.skip("Prometheus is not installed and cannot be (apt-get install prometheus)")
    return found


def panel_queries() -> list[tuple[str, str]]:
    dash = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "trialsync.json").read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            expr = (t["expr"].replace("$__rate_interval", "1m").replace('"$job_id"', '".*"')
                    .replace('"$table"', '".*"'))
            out.append((f'{panel["title"]} [{t.get("refId", "?")}]', expr))
    return out


def fast_rules(dest: Path) -> Path:
    """alerts.yml with every ``for:`` cut to 2 s, so firing and resolving take seconds."""
    doc = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    for g in doc["groups"]:
        g["interval"] = "1s"
        for r in g["rules"]:
            if "for" in r:
                r["for"] = "2s"
    dest.write_text(yaml.safe_dump(doc))
    return dest


class Services:
    """The TrialSync services of the run, each a real process with its own metrics port."""

    def __init__(self, ps: PrivateStack, env: dict[str, str], logs: Path):
        self.ps, self.env, self.logs = ps, env, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}

    def start(self, name: str, *args: str, port: int | None = None) -> None:
        self.ports[name] = port or self.ports.get(name) or free_port()
        env = {**self.env, "METRICS_PORT": str(self.ports[name]), "ENABLE_METRICS": "true"}
        with open(self.logs / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen([TRIALSYNC, *args], env=env, cwd=REPO, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self, name: str) -> None:
        p = self.procs[name]
        p.send_signal(signal.SIGKILL)
        p.wait(30)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def _ready(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _wait(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    from simulator.testing import SimulatorProcess

    prom_bin = prometheus_binary()
    tmp_path.chmod(0o755)
    with SimulatorProcess(scale=0.002, seed=5, api_key="prom-e2e-key") as sim, \
            webhook_server() as hook, PrivateStack(storage="memory") as ps:
        ps.cli("stack", "up")
        ps.cli("db", "migrate")
        ps.cli("jobs", "sync")
        env = {**ps.env, "CC_API_BASE_URL": sim.base_url, "CC_API_KEY": sim.api_key,
               "CC_API_KEY_HEADER": sim.key_header, "SLACK_WEBHOOK_URL": hook.url, "ETL_MAX_RETRIES": "0",
               "ETL_RETRY_DELAY_SECONDS": "0.2", "KAFKA_SESSION_TIMEOUT_MS": "6000", "LOADER_FLUSH_MS": "100",
               "SCHEDULER_REFRESH_SECONDS": "2", "SCHEDULER_COALESCE_SECONDS": "1", "API_TOKEN": "prom-e2e-token"}
        # schedules that were due a few minutes ago: the scheduler catches them up once at start
        for job in SCHEDULED:
            ps.cli("schedule", "--job", job, "--cron", "* * * * *")
        with psycopg.connect(ps.dsn(), autocommit=True) as c:
            c.execute("UPDATE etl.dw_etl_jobs SET schedule_updated_at = now() - interval '3 minutes' "
                      "WHERE schedule IS NOT NULL")
        sim.set_faults(FAULTS)
        svc = Services(ps, env, tmp_path)
        svc.start("loader", "load")
        svc.start("transform", "transform")
        svc.start("api", "api", "--port", str(free_port()))
        prom_port = free_port()
        targets = {name: svc.ports[name] for name in ("loader", "transform", "api")}
        targets["scheduler"] = free_port()
        targets["simulator"] = int(sim.base_url.split(":")[2].split("/")[0])
        cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
               "rule_files": [str(fast_rules(tmp_path / "alerts.yml"))],
               "scrape_configs": [{"job_name": "trialsync", "scrape_timeout": "900ms", "static_configs": [
                   {"targets": [f"127.0.0.1:{port}"], "labels": {"service": name}} for name, port in targets.items()]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        with open(tmp_path / "prometheus.log", "ab") as plog:
            prom = subprocess.Popen([prom_bin, f"--config.file={tmp_path / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                     f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=plog,
                                    stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{prom_port}"
        try:
            _wait(lambda: _ready(base + "/-/ready"), 60, "Prometheus to be ready")
            svc.start("scheduler", "scheduler", port=targets["scheduler"])
            yield {"ps": ps, "sim": sim, "hook": hook, "svc": svc, "base": base, "env": env, "tmp": tmp_path}
        finally:
            prom.terminate()
            try:
                prom.wait(20)
            except subprocess.TimeoutExpired:
                prom.kill()
            svc.stop_all()


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    r = requests.get(base + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r.get("status") == "success", f"{expr}: {r}"
    return r["data"]["result"]


def _fires_done(ps: PrivateStack) -> bool:
    with psycopg.connect(ps.dsn(), autocommit=True) as c:
        return c.execute("SELECT count(*) FROM etl.dw_orchestrations WHERE trigger = 'scheduler' "
                         "AND completed_at IS NOT NULL").fetchone()[0] >= 1


def test_every_panel_and_alert_against_a_real_prometheus(world: dict[str, Any]) -> None:
    ps, svc, base, hook = world["ps"], world["svc"], world["base"], world["hook"]
    queries = panel_queries()
    assert len(queries) >= 40
    seen: dict[str, bool] = {name: False for name, _ in queries}

    def sweep() -> None:
        for name, expr in queries:
            if not seen[name] and _query(base, expr):
                seen[name] = True

    # during the run
    deadline = time.monotonic() + 180
    while not _fires_done(ps):
        assert time.monotonic() < deadline, (world["tmp"] / "scheduler.log").read_text()[-3000:]
        sweep()
        time.sleep(1)

    # what a night also brings: a record without an id, records published again unchanged, and a
    # database outage while the loader has records to write
    s = ps.settings()
    publish(s, "dim_sites_staging", [Rec(None, {"name": "no id"}, extracted_at=ts(1))])
    again = [Rec(f"e2e:{i}", {"id": i}, extracted_at=ts(i)) for i in range(20)]
    publish(s, "dim_sites_staging", again)
    time.sleep(2)
    publish(s, "dim_sites_staging", again)
    from common import stack as stack_mod
    from common.config import Settings

    st_settings = Settings(trialsync_state_dir=ps.dir)
    stack_mod.write_state(stack_mod.stop_postgres(st_settings), st_settings)
    publish(s, "dim_sites_staging", [Rec(f"e2e:{i}", {"id": i, "v": 2}, extracted_at=ts(100 + i)) for i in range(20)])
    time.sleep(4)
    stack_mod.write_state(stack_mod.start_postgres(st_settings), st_settings)

    # after the run: every panel has shown data
    deadline = time.monotonic() + 90
    while not all(seen.values()) and time.monotonic() < deadline:
        sweep()
        time.sleep(1)
    missing = [name for name, ok in seen.items() if not ok]
    assert not missing, f"panels that never returned series: {missing}"
    assert hook.posts, "the scheduler's alert evaluation delivered to the webhook"

    # every metric a panel names is exported by a scraped process
    exported = set(requests.get(base + "/api/v1/label/__name__/values", timeout=10).json()["data"])
    named = {m for _, expr in queries for m in re.findall(r"\b(trialsync_[a-z0-9_]+)", expr)}
    assert named - exported == set(), f"panels name metrics no process exports: {sorted(named - exported)}"

    # every alert rule loads and evaluates
    rules = [r for g in requests.get(base + "/api/v1/rules", timeout=10).json()["data"]["groups"] for r in g["rules"]]
    doc = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert {r["name"] for r in rules} == {r["alert"] for g in doc["groups"] for r in g["rules"]}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    for r in rules:
        _query(base, r["query"])
    firing = {a["labels"]["alertname"] for a in requests.get(base + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
              if a["state"] == "firing"}
    assert "TrialSyncJobFailed" in firing, firing  # Studies failed for good

    # the loader dies: its down alert fires; it comes back: the alert resolves
    def loader_down(state: str) -> bool:
        alerts = requests.get(base + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        return any(a["labels"]["alertname"] == "TrialSyncServiceDown" and a["labels"].get("service") == "loader"
                   and a["state"] == state for a in alerts)

    assert not loader_down("firing")
    svc.kill("loader")
    _wait(lambda: loader_down("firing"), 30, "TrialSyncServiceDown{service=loader} to fire")
    svc.start("loader", "load")
    _wait(lambda: not loader_down("firing") and not loader_down("pending"), 60, "the loader-down alert to resolve")
