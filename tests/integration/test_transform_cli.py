"""`trialsync transform --now / --status` against the real database, through the real CLI entry point."""

from __future__ import annotations

import json

import pytest

from common.cli import main
from tests.integration.transform_support import (
    fixture_tx,  # noqa: F401 - pytest fixture
    fixture_tx_dsn,  # noqa: F401 - pytest fixture
    load,
    rows,
    scalar,
    seed_small,
    visit,
)

pytestmark = pytest.mark.integration


def test_now_runs_every_procedure_and_status_reports_it(tx, capsys) -> None:
    seed_small(tx, studies=2, subjects_per_study=2)
    assert main(["transform", "--now", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {p["status"] for p in out["procedures"]} == {"success"}
    assert len(out["procedures"]) == scalar(tx, "SELECT count(*) FROM etl.dw_transform_procedures WHERE is_active")
    assert out["quality"] and {q["status"] for q in out["quality"]} == {"pass"}
    assert scalar(tx, "SELECT count(*) FROM silver.fact_enrollment") == 4
    assert {r["trigger"] for r in rows(tx, "SELECT trigger FROM etl.dw_transform_runs")} == {"manual"}

    assert main(["transform", "--status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {p["last_status"] for p in status["procedures"]} == {"success"} and status["failing_checks"] == []


def test_now_one_procedure_full_and_failures_exit_nonzero(tx, capsys) -> None:
    seed_small(tx, studies=1, subjects_per_study=1)
    assert main(["transform", "--now", "-p", "load_dim_studies", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["procedure"] for p in out["procedures"]] == ["silver.load_dim_studies"]
    assert out["procedures"][0]["inserted"] == 1
    # --full forgets the watermark: the re-read changes nothing
    assert main(["transform", "--now", "-p", "dim_studies", "--full", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["procedures"][0]["inserted"] == 0
    # a source value outside the calendar fails an error-severity check: exit 1, visible in --status
    load(tx, "dim_patient_visits_staging", [visit(1001, 1, 1, target="1850-01-01", min_due=None, max_due=None)],
         params={"studyId": 1, "subjectId": 1})
    assert main(["transform", "--now", "-p", "load_fact_visit_timelines", "--json"]) == 1
    capsys.readouterr()
    assert main(["transform", "--status"]) == 1
    text = capsys.readouterr().out
    assert "fact_visit_timelines_date_keys" in text and "QualityCheckFailed" in text


def test_bad_usage_is_one_line(tx, capsys) -> None:
    assert main(["transform", "--now", "-p", "load_everything"]) == 2
    assert "unknown procedure 'load_everything'" in capsys.readouterr().err
    assert main(["transform", "--full"]) == 2
    assert "need --now" in capsys.readouterr().err
