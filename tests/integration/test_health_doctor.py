"""`trialsync doctor` against real parts: the session database and broker, an unmigrated database,
an unreachable broker and a real HTTP endpoint standing in for the API (200 / 401)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.http_helpers import fixed_status_server

pytestmark = pytest.mark.integration

KEY = "doctor-key-" + "q" * 16


def _by_check(findings) -> dict[str, object]:
    return {f"{f.area}/{f.check}": f for f in findings}


def test_healthy_setup_has_no_failures(settings) -> None:
    from orchestrator.doctor import run_doctor

    with fixed_status_server(200, b'{"value": []}') as (base, seen):
        s = settings.model_copy(update={"cc_api_base_url": base, "cc_api_key": __import__("pydantic").SecretStr(KEY)})
        d = run_doctor(s)
    checks = _by_check(d.findings)
    assert not d.failed, [f for f in d.findings if f.status == "fail"]
    for name in ("config/settings", "config/job catalog", "database/connect", "database/migrations",
                 "database/catalog synced", "broker/metadata", "api/reachable", "api/key accepted"):
        assert checks[name].status == "ok", (name, checks[name])
    assert checks["broker/system topics"].status in ("ok", "warn")
    assert "PostgreSQL 16" in checks["database/connect"].detail
    assert seen[0]["x-apikey"] == KEY
    assert all(KEY not in f.detail + f.fix for f in d.findings)


def test_rejected_key_names_the_setting(settings) -> None:
    from pydantic import SecretStr

    from orchestrator.doctor import run_doctor

    with fixed_status_server(401) as (base, _):
        d = run_doctor(settings.model_copy(update={"cc_api_base_url": base, "cc_api_key": SecretStr(KEY)}))
        d_nokey = run_doctor(settings.model_copy(update={"cc_api_base_url": base, "cc_api_key": None}))
    f = _by_check(d.findings)["api/key accepted"]
    assert d.failed and f.status == "fail" and "HTTP 401" in f.detail
    assert "CC_API_KEY" in f.fix and "CC_API_KEY_HEADER" in f.fix
    assert KEY not in f.detail + f.fix
    assert "set CC_API_KEY" in _by_check(d_nokey.findings)["api/key accepted"].fix


def test_unmigrated_database_and_unsynced_catalog(fresh_db: str) -> None:
    from common.config import load_settings
    from common.db import migrate
    from orchestrator.doctor import run_doctor

    s = load_settings()
    f = _by_check(run_doctor(s).findings)
    assert f["database/connect"].status == "ok"
    assert f["database/migrations"].status == "fail" and f["database/migrations"].fix == "run `trialsync db migrate`"
    assert "pending" in f["database/migrations"].detail
    assert f["database/catalog synced"].status == "fail"
    migrate(s)
    f = _by_check(run_doctor(s).findings)
    assert f["database/migrations"].status == "ok"
    assert f["database/catalog synced"].status == "fail" and f["database/catalog synced"].fix == "run `trialsync jobs sync`"
    assert "missing from etl.dw_etl_jobs" in f["database/catalog synced"].detail


def test_unreachable_database_and_broker(settings) -> None:
    from pydantic import SecretStr

    from common.stack import free_port
    from orchestrator.doctor import run_doctor

    pw = "pw-" + "z" * 12
    s = settings.model_copy(update={"database_url": SecretStr(f"postgresql://u:{pw}@127.0.0.1:{free_port()}/x"),
                                    "kafka_bootstrap_servers": f"127.0.0.1:{free_port()}", "cc_api_base_url": None})
    d = run_doctor(s)
    f = _by_check(d.findings)
    assert f["database/connect"].status == "fail" and "DATABASE_URL" in f["database/connect"].fix
    assert f["database/migrations"].status == "skip"
    assert f["broker/metadata"].status == "fail" and "KAFKA_BOOTSTRAP_SERVERS" in f["broker/metadata"].fix
    assert f["api/reachable"].status == "fail" and "CC_API_BASE_URL" in f["api/reachable"].fix
    assert all(pw not in x.detail + x.fix for x in d.findings)


def test_cli_exit_codes_and_json(stack: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CC_API_BASE_URL", "CC_API_KEY")}
    with fixed_status_server(200) as (base, _):
        ok = subprocess.run([sys.executable, "-m", "common.cli", "doctor", "--json"], capture_output=True, text=True,
                            env={**env, "CC_API_BASE_URL": base, "CC_API_KEY": KEY}, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    with fixed_status_server(401) as (base, _):
        bad = subprocess.run([sys.executable, "-m", "common.cli", "doctor"], capture_output=True, text=True,
                             env={**env, "CC_API_BASE_URL": base, "CC_API_KEY": KEY, "COLUMNS": "200"}, timeout=120)
    assert bad.returncode == 1
    assert "key accepted" in bad.stdout and "CC_API_KEY" in bad.stdout and KEY not in bad.stdout + bad.stderr
    assert "problem(s)" in bad.stdout


def test_against_the_simulator_key_accepted_and_rejected(settings) -> None:
    """The real CC stand-in: the probe endpoint exists, the right key passes, a wrong one is a 401
    naming the setting (the simulator accepts X-ApiKey and CCAPIKey)."""
    from pydantic import SecretStr

    from common.health import api_check
    from orchestrator.doctor import run_doctor
    from simulator.testing import SimulatorProcess

    with SimulatorProcess(scale=0.002, api_key=KEY) as sim:
        base = sim.base_url
        good = settings.model_copy(update={"cc_api_base_url": base, "cc_api_key": SecretStr(KEY),
                                           "cc_api_key_header": "CCAPIKey"})
        f = _by_check(run_doctor(good).findings)
        assert f["api/reachable"].status == "ok" and f["api/key accepted"].status == "ok", f
        assert api_check(good)()[0] is True
        bad = good.model_copy(update={"cc_api_key": SecretStr("wrong-" + KEY)})
        f = _by_check(run_doctor(bad).findings)
        assert f["api/key accepted"].status == "fail" and "CC_API_KEY" in f["api/key accepted"].fix
        ok, detail = api_check(bad)()
        assert ok is False and "CC_API_KEY" in detail and KEY not in detail
