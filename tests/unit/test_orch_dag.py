"""Job selection and the run's DAG: cycles and unknown dependencies are named, order is sane."""

from __future__ import annotations

import pytest

from orchestrator.dag import SelectionError, build_plan, select_jobs
from schemas.jobs import CatalogError, JobCatalog
from tests.unit.orch_fakes import job, small_catalog


def test_cycle_is_named() -> None:
    cat = JobCatalog([
        job(1, "A", "a_staging", depends_on=(3,)),
        job(2, "B", "b_staging", depends_on=(1,)),
        job(3, "C", "c_staging", depends_on=(2,)),
        job(4, "D", "d_staging"),
    ])
    with pytest.raises(CatalogError) as e:
        build_plan(cat, [1, 2, 3, 4])
    msg = str(e.value)
    assert msg.startswith("dependency cycle: ")
    for part in ("1 (A)", "2 (B)", "3 (C)"):
        assert part in msg
    assert "4 (D)" not in msg
    with pytest.raises(CatalogError, match="dependency cycle"):
        cat.validate_dag()


def test_unknown_dependency_is_named() -> None:
    cat = JobCatalog([job(1, "A", "a_staging", depends_on=(99,))])
    with pytest.raises(CatalogError, match=r"job 1 \(A\) depends on unknown job 99"):
        build_plan(cat, [1])


def test_cycle_through_parameter_source() -> None:
    # a parameterized job reading a table that a job depending on it fills
    cat = JobCatalog([
        job(1, "A", "a_staging", parent_table="b_staging"),
        job(2, "B", "b_staging", depends_on=(1,)),
    ])
    with pytest.raises(CatalogError, match="dependency cycle"):
        build_plan(cat, [1, 2])


def test_plan_edges_levels_and_external_parents() -> None:
    cat = small_catalog()
    plan = build_plan(cat, [1, 2, 3, 4, 5])
    assert plan.parents[2] == (1,) and plan.parents[3] == (2,) and plan.parents[4] == (1,)
    assert set(plan.children[1]) == {2, 4}
    assert plan.levels[0] == (1, 5)
    only_child = build_plan(cat, [3])
    assert only_child.parents[3] == ()
    assert only_child.external_parents[3] == (2,)


def test_start_order_prefers_priority_then_critical_path() -> None:
    cat = small_catalog()
    plan = build_plan(cat, [1, 2, 3, 4, 5])
    order = plan.start_order()
    assert order[0] == 1  # priority 1
    # among priority-5 jobs, the one with the longest chain below it comes first
    assert order.index(2) < order.index(4) < order.index(5) or order.index(2) < order.index(5)
    cp = plan.critical_path({1: 10, 2: 100, 3: 1, 4: 1, 5: 1})
    assert cp[1] == 10 + 100 + 1


def test_selection_rules() -> None:
    cat = small_catalog()
    assert select_jobs(cat, all_jobs=True) == [1, 2, 3, 4, 5]
    assert select_jobs(cat, category="study") == [4]
    assert select_jobs(cat, job_refs=["3"]) == [3]
    assert select_jobs(cat, job_refs=[3], with_deps=True) == [1, 2, 3]
    assert select_jobs(cat, job_refs=["Visits"], with_deps=True) == [1, 2, 3]
    with pytest.raises(SelectionError, match="choose what to run"):
        select_jobs(cat)
    with pytest.raises(SelectionError, match="choose what to run"):
        select_jobs(cat, all_jobs=True, job_refs=[1])
    with pytest.raises(CatalogError, match="unknown category"):
        select_jobs(cat, category="nope")


def test_disabled_job_is_refused_with_a_hint() -> None:
    base = small_catalog()
    cat = JobCatalog([*(j for j in base if j.id != 1), base.get(1).model_copy(update={"is_active": False})])
    with pytest.raises(SelectionError, match=r"job 1 \(Studies\) is disabled.*enabled: true"):
        select_jobs(cat, job_refs=[1])
    assert 1 not in select_jobs(cat, all_jobs=True)


def test_real_catalog_plan() -> None:
    cat = JobCatalog.load()
    ids = select_jobs(cat, all_jobs=True)
    assert len(ids) == 72
    plan = build_plan(cat, ids)
    assert sum(len(level) for level in plan.levels) == 72
    studies = cat.resolve("Studies").id
    subjects = cat.resolve("Subjects").id
    assert studies in plan.parents[subjects]


def test_cli_refuses_a_cyclic_config_naming_the_cycle(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from common import config
    from common.cli import main

    f = tmp_path / "jobs.yaml"
    f.write_text("jobs:\n  Studies:\n    depends_on: [Subjects]\n", encoding="utf-8")
    monkeypatch.setenv("ETL_JOBS_FILE", str(f))
    config.reset_settings()
    try:
        code = main(["run", "--all", "--dry-run"])
    finally:
        config.reset_settings()
    err = capsys.readouterr().err
    assert code != 0
    assert "dependency cycle:" in err and "2 (Studies)" in err and "10 (Subjects)" in err


def test_cli_refuses_an_unknown_dependency(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from common import config
    from common.cli import main

    f = tmp_path / "jobs.yaml"
    f.write_text("jobs:\n  Studies:\n    depends_on: [9999]\n", encoding="utf-8")
    monkeypatch.setenv("ETL_JOBS_FILE", str(f))
    config.reset_settings()
    try:
        code = main(["run", "--all", "--dry-run"])
    finally:
        config.reset_settings()
    assert code != 0
    assert "9999" in capsys.readouterr().err
