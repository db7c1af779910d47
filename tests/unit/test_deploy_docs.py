"""Operator docs stay true: the configuration reference equals what the Settings model generates,
every error message quoted in troubleshooting.md exists in the code, and the docs the issue asks
for are there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PACKAGES = ("common", "schemas", "producers", "consumers", "orchestrator", "simulator")


def test_configuration_reference_is_generated_from_settings() -> None:
    from orchestrator.config_reference import DOC, missing_explanations, render

    assert not missing_explanations(), (
        f"explain these settings in orchestrator/config_reference.py EXPLAIN: {missing_explanations()}")
    text = DOC.read_text(encoding="utf-8")
    assert render() in text, "docs/configuration.md is stale: run .venv/bin/python -m orchestrator.config_reference"


def test_every_setting_is_documented_by_its_variable_name() -> None:
    from common.config import Settings
    from orchestrator.config_reference import env_names

    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    for name, field in Settings.model_fields.items():
        for env in env_names(name, field):
            assert f"`{env}`" in text, env


def _code_strings() -> list[str]:
    """Every string literal in the packages, f-string holes as '…', implicit concatenation merged."""
    out: list[str] = []
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.JoinedStr):
                    out.append("".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values))
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    out.append(node.value)
    out.append((REPO / "compose.yaml").read_text(encoding="utf-8"))
    return out


def test_troubleshooting_quotes_real_messages() -> None:
    strings = _code_strings()
    headings = re.findall(r"^#### (.+)$", (DOCS / "troubleshooting.md").read_text(encoding="utf-8"), re.M)
    assert len(headings) >= 25
    missing = []
    for h in headings:
        for quoted in re.findall(r"`([^`]+)`", h):
            for frag in (f.strip(" ,.") for f in quoted.split("…")):
                if len(frag) >= 6 and not any(frag in s for s in strings):
                    missing.append(f"{frag!r} (heading: {h})")
    assert not missing, "troubleshooting.md quotes messages the code no longer has:\n" + "\n".join(missing)


def test_operator_docs_exist_and_cover_the_topics() -> None:
    want = {
        "deployment.md": ["docker compose up", "Bare metal", "systemd", "/readyz"],
        "configuration.md": ["DATABASE_URL", "config/jobs.yaml"],
        "operations.md": ["Scaling loaders", "Replaying a table", "Rotating the API key", "Backfills"],
        "monitoring.md": ["## Alerts", "## The dashboard, panel by panel"],
        "troubleshooting.md": ["trialsync doctor"],
        "performance.md": ["LOADER_BATCH_SIZE", "KAFKA_PARTITIONS", "ETL_PARALLEL_JOBS"],
        "backup-recovery.md": ["source of truth", "retention", "pg_dump"],
    }
    for doc, needles in want.items():
        text = (DOCS / doc).read_text(encoding="utf-8")
        for n in needles:
            assert n in text, f"{doc} lacks {n!r}"


def test_monitoring_doc_describes_every_panel() -> None:
    import json

    text = (DOCS / "monitoring.md").read_text(encoding="utf-8")
    dash = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "trialsync.json").read_text(encoding="utf-8"))
    missing = [p["title"] for p in dash["panels"] if f"**{p['title']}**" not in text and f"### {p['title']}" not in text]
    assert not missing, f"docs/monitoring.md does not describe panels: {missing}"


def test_monitoring_doc_lists_every_metric_family() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    import common.metrics as m

    text = (DOCS / "monitoring.md").read_text(encoding="utf-8")
    for obj in vars(m).values():
        if isinstance(obj, MetricWrapperBase):
            name = obj._name + ("_total" if obj._type == "counter" else "")  # noqa: SLF001
            short = "…" + name.removeprefix("trialsync_sim") if name.startswith("trialsync_sim_") else name
            assert f"`{name}`" in text or short in text, name


def test_history_api_reference_matches_the_contract() -> None:
    from orchestrator.history_api import render_reference

    text = (DOCS / "history-api.md").read_text(encoding="utf-8")
    assert render_reference() in text, "docs/history-api.md endpoint table is stale: regenerate it from render_reference()"
