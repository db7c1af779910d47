"""The job catalog: 90 jobs, 72 runnable, every documented fix, and refusal of bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from schemas.jobs import EXPORT_FILE, CatalogError, JobCatalog, OverridesFile, load_overrides, parse_export

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def catalog() -> JobCatalog:
    return JobCatalog.load()


def test_counts(catalog: JobCatalog) -> None:
    assert len(catalog) == 90
    assert len(catalog.runnable) == 72


def test_invalid_endpoints_disabled(catalog: JobCatalog) -> None:
    for jid in (4, 5, 6, 7, 12, 14, 15, 16, 17, 18, 19, 20, 21, 22):
        j = catalog.get(jid)
        assert not j.is_valid and not j.is_active and "404" in (j.invalid_reason or "")
    for jid in (30, 31):
        assert "501" in (catalog.get(jid).invalid_reason or "")


def test_endpoint_corrections(catalog: JobCatalog) -> None:
    assert catalog.get(23).endpoint == "/api/v1/studies/{studyId}/monitor-queries/odata"
    assert catalog.get(174).endpoint == "/api/v1/studies/{studyId}/arms"
    j175 = catalog.get(175)
    assert j175.endpoint == "/api/v1/studies/{studyId}/visits/{visitId}/elements/odata"
    assert j175.parameters == {"studyId": "study.id", "visitId": "id"}
    assert j175.parameter_source_table == "dim_visits_staging"
    assert catalog.parents(j175) == [11]


@pytest.mark.parametrize("jid", [27, 142, 143, 145, 146, 160])
def test_parameter_config_completed(catalog: JobCatalog, jid: int) -> None:
    j = catalog.get(jid)
    assert j.requires_parameters
    assert j.parameter_source_table
    assert set(j.placeholders) <= set(j.parameters)
    assert j.fix_reasons


def test_nested_parameters_of_160(catalog: JobCatalog) -> None:
    j = catalog.get(160)
    assert j.parameters == {"studyId": "study.id", "subjectId": "id"}
    assert j.render_endpoint({"studyId": 7, "subjectId": "a/b"}) == "/api/v1/studies/7/subjects/a%2Fb/patient-visits"


def test_legacy_id_column_means_entity_id(catalog: JobCatalog) -> None:
    # the export says `id` (the staging serial) for job 11; it must read the entity id from data
    assert catalog.get(11).parameters == {"studyId": "id"}


def test_every_job_has_category(catalog: JobCatalog) -> None:
    assert {j.category for j in catalog} >= {"core", "study", "patient", "patient-visit", "system", "finance"}


def test_dag_levels(catalog: JobCatalog) -> None:
    levels = catalog.topological_order([j.id for j in catalog.runnable])
    pos = {j: i for i, lv in enumerate(levels) for j in lv}
    for j in catalog.runnable:
        for p in catalog.parents(j):
            if p in pos:
                assert pos[p] < pos[j.id]
    assert pos[10] > pos[2] and pos[160] > pos[10] and pos[24] > pos[9]


def test_staging_migration_matches_catalog(catalog: JobCatalog) -> None:
    sql = (REPO / "sql/migrations/0003_staging_tables.sql").read_text()
    tables = re.findall(r"create_staging_table\('([a-z0-9_]+)'\)", sql)
    assert sorted(tables) == catalog.target_tables


def test_export_copy_is_verbatim_shape() -> None:
    rows = parse_export(EXPORT_FILE.read_text())
    assert len(rows) == 90


# -- bad input --------------------------------------------------------------------------------

def _export_lines() -> list[str]:
    return EXPORT_FILE.read_text().splitlines()


def test_malformed_row_refused() -> None:
    lines = _export_lines()
    lines[3] = "4|Users|/api/v1/users/odata|dim_users_staging|Disabled"
    with pytest.raises(CatalogError, match=r"line 4: expected 11"):
        JobCatalog.load(export_text="\n".join(lines))


def test_duplicate_job_id_refused() -> None:
    lines = _export_lines()
    lines.append(lines[0])
    with pytest.raises(CatalogError, match="duplicate job id 1"):
        JobCatalog.load(export_text="\n".join(lines))


def test_unsafe_target_table_refused() -> None:
    lines = _export_lines()
    lines[0] = '1|Sites|/api/v1/sites|dim_sites"; DROP TABLE x; --|Active|No|-|-|-|success|40'
    with pytest.raises(CatalogError, match="not a safe identifier"):
        JobCatalog.load(export_text="\n".join(lines))


def test_unknown_job_id_message(catalog: JobCatalog) -> None:
    with pytest.raises(CatalogError, match="unknown job id 999"):
        catalog.get(999)


def test_ambiguous_name_message(catalog: JobCatalog) -> None:
    with pytest.raises(CatalogError, match="ambiguous"):
        catalog.resolve("patientvisitelements")


def test_cycle_is_named(catalog: JobCatalog) -> None:
    ov = OverridesFile(jobs={"2": {"depends_on": [10]}})
    with pytest.raises(CatalogError, match=r"dependency cycle: .*2 \(Studies\).*10 \(Subjects\)"):
        catalog.with_overrides(ov).validate_dag()


def test_unknown_dependency_is_named(catalog: JobCatalog) -> None:
    with pytest.raises(CatalogError, match="unknown job id 4242"):
        catalog.with_overrides(OverridesFile(jobs={"2": {"depends_on": [4242]}}))


def test_bad_cron_is_quoted(tmp_path: Path) -> None:
    f = tmp_path / "jobs.yaml"
    f.write_text('jobs:\n  2:\n    schedule: "61 2 * * *"\n')
    with pytest.raises(CatalogError, match=r"'61 2 \* \* \*'"):
        load_overrides(f)


def test_unknown_override_key_refused(tmp_path: Path) -> None:
    f = tmp_path / "jobs.yaml"
    f.write_text("jobs:\n  2:\n    shedule: daily\n")
    with pytest.raises(CatalogError, match="shedule"):
        load_overrides(f)


def test_cannot_enable_invalid_endpoint(catalog: JobCatalog) -> None:
    with pytest.raises(CatalogError, match="invalid"):
        catalog.with_overrides(OverridesFile(jobs={"14": {"enabled": True}}))


def test_repo_overrides_file_is_valid() -> None:
    cat = JobCatalog.load(overrides_path=REPO / "config/jobs.yaml")
    assert cat.get(2).schedule == "0 2 * * *"


def test_fanout_incremental_override_only_for_parameterized_jobs(catalog: JobCatalog) -> None:
    cat = catalog.with_overrides(OverridesFile(jobs={"24": {"fanout_incremental": "changed"}}))
    assert cat.get(24).fanout_incremental == "changed" and cat.get(166).fanout_incremental is None
    with pytest.raises(CatalogError, match="not parameterized"):
        catalog.with_overrides(OverridesFile(jobs={"9": {"fanout_incremental": "changed"}}))
    with pytest.raises(ValueError, match="all"):
        OverridesFile(jobs={"24": {"fanout_incremental": "some"}})


def test_paging_is_declared_per_job_not_guessed(catalog: JobCatalog, tmp_path: Path) -> None:
    """Every OData-controller endpoint declares `paging: odata` in the fixes file; the rest page
    `none`; an operator can override it (an instance whose endpoint pages differently)."""
    odata = {j.id for j in catalog if j.paging == "odata"}
    assert {2, 3, 9, 10, 23, 24, 25, 161, 166, 175} <= odata
    assert {1, 144, 147, 160, 165, 174} & odata == set()
    for j in catalog:
        assert j.supports_incremental == (j.paging == "odata" and j.incremental is not False)
        assert j.paging_description
    f = tmp_path / "jobs.yaml"
    f.write_text("jobs:\n  147: {paging: odata}\n  9: {paging: none}\n")
    over = JobCatalog.load(overrides_path=f)
    assert over.get(147).paging == "odata" and over.get(9).paging == "none" and not over.get(9).supports_incremental
    f.write_text("jobs:\n  9: {paging: cursor}\n")
    with pytest.raises(CatalogError, match="paging"):
        JobCatalog.load(overrides_path=f)


def test_jobs_show_tells_how_the_job_pages() -> None:
    from typer.testing import CliRunner

    from common.cli import app

    shown = CliRunner().invoke(app, ["jobs", "show", "9"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert re.search(r"paging\s+.*odata", shown.output) and "$top/$skip with $count" in shown.output
    plain = CliRunner().invoke(app, ["jobs", "show", "165"], env={"COLUMNS": "200"})
    assert re.search(r"paging\s+.*none", plain.output) and "one request" in plain.output
