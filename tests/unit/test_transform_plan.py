"""The procedure dependency graph: which procedures a finished table triggers, each once, in order."""

from __future__ import annotations

import pytest

from consumers.transform_plan import Procedure, TransformPlan, UnknownProcedure


def registry() -> TransformPlan:
    """The same shape as migration 0304's registry."""
    dims = ("silver.load_dim_subjects", "silver.load_dim_studies", "silver.load_dim_sites", "silver.load_dim_patients")
    return TransformPlan([
        Procedure("silver.load_dim_date", "silver.dim_date", "dimension", 10),
        Procedure("silver.load_dim_sites", "silver.dim_sites", "dimension", 20, ("dim_sites_staging",)),
        Procedure("silver.load_dim_staff", "silver.dim_staff", "dimension", 22, ("dim_staff_staging",)),
        Procedure("silver.load_dim_patients", "silver.dim_patients", "dimension", 23, ("dim_patients_staging",)),
        Procedure("silver.load_dim_studies", "silver.dim_studies", "dimension", 30, ("dim_studies_staging",)),
        Procedure("silver.load_dim_subjects", "silver.dim_subjects", "dimension", 31, ("dim_subjects_staging",)),
        Procedure("silver.load_fact_enrollment", "silver.fact_enrollment", "fact", 50,
                  ("dim_subjects_staging", "dim_subject_statuses_staging"), dims),
        Procedure("silver.load_fact_visit_timelines", "silver.fact_visit_timelines", "fact", 51,
                  ("dim_patient_visits_staging",), dims),
        Procedure("silver.load_fact_element_completions", "silver.fact_element_completions", "fact", 52,
                  ("dim_patient_visit_elements_staging", "dim_visit_elements_staging"),
                  ("silver.load_fact_visit_timelines",)),
        Procedure("silver.load_fact_study_performance", "silver.fact_study_performance", "fact", 60, (),
                  ("silver.load_fact_enrollment", "silver.load_fact_visit_timelines",
                   "silver.load_fact_element_completions", "silver.load_dim_studies")),
        Procedure("gold.refresh_mv_study_performance_metrics", "gold.mv_study_performance_metrics", "gold", 90, (),
                  ("silver.load_fact_study_performance", "silver.load_dim_studies")),
        Procedure("silver.load_old_thing", "silver.old_thing", "dimension", 5, ("dim_rooms_staging",), (), False),
    ])


def names(procs) -> list[str]:
    return [p.short_name for p in procs]


def test_a_staff_change_runs_only_dim_staff() -> None:
    assert names(registry().for_tables(["dim_staff_staging"])) == ["load_dim_staff"]


def test_elements_trigger_their_fact_and_the_aggregates_after_it() -> None:
    assert names(registry().for_tables(["dim_visit_elements_staging"])) == [
        "load_fact_element_completions", "load_fact_study_performance", "refresh_mv_study_performance_metrics"]


def test_several_tables_trigger_each_procedure_once_dims_before_facts_before_gold() -> None:
    got = names(registry().for_tables(["dim_patient_visits_staging", "dim_subjects_staging", "dim_studies_staging",
                                       "dim_subject_statuses_staging"]))
    assert got == ["load_dim_studies", "load_dim_subjects", "load_fact_enrollment", "load_fact_visit_timelines",
                   "load_fact_element_completions", "load_fact_study_performance",
                   "refresh_mv_study_performance_metrics"]
    assert len(got) == len(set(got))


def test_a_site_change_reaches_the_facts_that_resolve_site_keys() -> None:
    got = names(registry().for_tables(["dim_sites_staging"]))
    assert got[0] == "load_dim_sites" and "load_fact_enrollment" in got and got[-1] == "refresh_mv_study_performance_metrics"


def test_known_tables_and_inactive_procedures() -> None:
    plan = registry()
    assert "dim_rooms_staging" not in plan.known_tables  # the inactive procedure does not count
    assert plan.for_tables(["dim_rooms_staging", "nothing_staging"]) == []
    assert "dim_subject_statuses_staging" in plan.known_tables


def test_ancestors_and_resolve() -> None:
    plan = registry()
    assert plan.ancestors("gold.refresh_mv_study_performance_metrics") >= {
        "silver.load_dim_studies", "silver.load_fact_visit_timelines", "silver.load_dim_sites"}
    assert plan.resolve("load_dim_studies").name == "silver.load_dim_studies"
    assert plan.resolve("dim_studies").name == "silver.load_dim_studies"
    assert plan.resolve("gold.mv_study_performance_metrics").short_name == "refresh_mv_study_performance_metrics"
    with pytest.raises(UnknownProcedure, match="unknown procedure 'nope': use one of load_dim_date"):
        plan.resolve("nope")


def test_call_sql_quotes_both_parts() -> None:
    p = registry().get("silver.load_dim_studies")
    assert p.call_sql().as_string(None) == 'CALL "silver"."load_dim_studies"()'


def test_bad_registries_are_refused() -> None:
    with pytest.raises(ValueError, match="not schema.name"):
        Procedure("public.x; DROP TABLE y", "silver.t", "fact", 1)
    with pytest.raises(ValueError, match="does not run before it"):
        TransformPlan([Procedure("silver.a", "silver.a", "fact", 10, (), ("silver.b",)),
                       Procedure("silver.b", "silver.b", "fact", 20)])
    with pytest.raises(ValueError, match="unknown procedure"):
        TransformPlan([Procedure("silver.a", "silver.a", "fact", 10, (), ("silver.zzz",))])
