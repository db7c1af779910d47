"""Alert texts: secrets scrubbed, the next step named; and the demo's printed DSN has no password."""

from __future__ import annotations

from datetime import UTC, datetime

from orchestrator.alerts import Condition, clean, describe_delivery_error, failure_message, recovery_message
from orchestrator.demo import safe_dsn


def test_clean_scrubs_secrets_and_url_credentials() -> None:
    text = "GET https://user:hunter2@cc.example/api?key=S3CR3T-KEY failed (key S3CR3T-KEY)"
    out = clean(text, ["S3CR3T-KEY"])
    assert "S3CR3T-KEY" not in out and "hunter2" not in out
    assert "https://***@cc.example" in out
    assert len(clean("x" * 5000, [])) <= 801


def test_messages() -> None:
    c = Condition("job:2", "job", "job 2 (Studies)", True, "41", "HTTP 500 with key abc123",
                  {"job_id": 2, "run_id": 41, "status": "failed", "at": datetime(2026, 1, 5, 2, 0, tzinfo=UTC),
                   "attempt": 4, "trigger": "scheduler"})
    m = failure_message(c, "[TS]", ["abc123"])
    assert m.title == "[TS] job 2 (Studies) failed" and m.kind == "failure"
    assert "abc123" not in m.body and "trialsync retry --run-id 41" in m.body and "2026-01-05 02:00:00 UTC" in m.body
    ok = Condition("job:2", "job", "job 2 (Studies)", False, "42", None, {"job_id": 2, "run_id": 42, "status": "success"})
    r = recovery_message(ok, 3, datetime(2026, 1, 5, 2, 0, tzinfo=UTC), "[TS]")
    assert r.title == "[TS] recovered: job 2 (Studies) succeeded again" and "after 3 failure(s)" in r.body
    q = Condition("quality:x", "quality", "quality check x", True, "t", None,
                  {"check": "x", "table": "silver.t", "status": "fail", "failed_rows": 5})
    assert "5 row(s) fail it" in failure_message(q, "[TS]", []).body


def test_delivery_errors_never_echo_the_target() -> None:
    import requests

    e = requests.ConnectionError("HTTPSConnectionPool(host='hooks.slack.com', port=443): Max retries exceeded with "
                                 "url: /services/T0/B0/SECRET-TOKEN")
    assert describe_delivery_error(e) == "ConnectionError"


def test_safe_dsn() -> None:
    assert safe_dsn("postgresql://etl:pa%3Ass@db.example:5432/trialsync") == "postgresql://etl@db.example:5432/trialsync"
    assert safe_dsn("postgresql://postgres@127.0.0.1:5/trialsync") == "postgresql://postgres@127.0.0.1:5/trialsync"


def test_demo_remembers_its_data_set(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from orchestrator.demo import _remember_dataset

    assert _remember_dataset(tmp_path, 0.01, 42) is None
    assert _remember_dataset(tmp_path, 0.01, 42) is None
    # the simulated nights belong to the data set: kept while it stays, dropped when it changes
    import json

    f = tmp_path / "demo.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "nights": [{"days": 1}]}))
    assert _remember_dataset(tmp_path, 0.01, 42) is None and json.loads(f.read_text())["nights"] == [{"days": 1}]
    assert _remember_dataset(tmp_path, 0.05, 42) == {"scale": 0.01, "seed": 42}
    assert json.loads(f.read_text())["nights"] == []
