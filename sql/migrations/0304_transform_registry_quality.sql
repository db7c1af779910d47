-- The procedure registry, the two load_all_* entry points, and the data-quality checks (issue 6).

-- -- registry ------------------------------------------------------------------------------------
INSERT INTO etl.dw_transform_procedures (procedure_name, target_table, layer, run_order, source_tables, depends_on, description)
VALUES
    ('silver.load_dim_date', 'silver.dim_date', 'dimension', 10, '{}', '{}',
     'calendar 2000-2040 (generated, runs only on demand)'),
    ('silver.load_dim_sites', 'silver.dim_sites', 'dimension', 20, '{dim_sites_staging}', '{}',
     'Type 1 sites'),
    ('silver.load_dim_sponsors', 'silver.dim_sponsors', 'dimension', 21, '{dim_sponsors_staging}', '{}',
     'Type 1 sponsors'),
    ('silver.load_dim_staff', 'silver.dim_staff', 'dimension', 22, '{dim_staff_staging}', '{}',
     'Type 1 staff'),
    ('silver.load_dim_patients', 'silver.dim_patients', 'dimension', 23, '{dim_patients_staging}', '{}',
     'Type 1 pseudonymous patients'),
    ('silver.load_dim_studies', 'silver.dim_studies', 'dimension', 30, '{dim_studies_staging}', '{}',
     'Type 2 studies (jobs 2 and 164)'),
    ('silver.load_dim_subjects', 'silver.dim_subjects', 'dimension', 31, '{dim_subjects_staging}', '{}',
     'Type 2 subjects'),
    ('silver.load_fact_enrollment', 'silver.fact_enrollment', 'fact', 50,
     '{dim_subjects_staging,dim_subject_statuses_staging}',
     '{silver.load_dim_subjects,silver.load_dim_studies,silver.load_dim_sites,silver.load_dim_patients}',
     'one row per subject enrollment'),
    ('silver.load_fact_visit_timelines', 'silver.fact_visit_timelines', 'fact', 51,
     '{dim_patient_visits_staging}',
     '{silver.load_dim_subjects,silver.load_dim_studies,silver.load_dim_sites,silver.load_dim_patients}',
     'one row per patient visit (jobs 9 and 160)'),
    ('silver.load_fact_element_completions', 'silver.fact_element_completions', 'fact', 52,
     '{dim_patient_visit_elements_staging,dim_visit_elements_staging}',
     '{silver.load_fact_visit_timelines}',
     'one row per completed visit element (jobs 24 and 166)'),
    ('silver.load_fact_study_performance', 'silver.fact_study_performance', 'fact', 60, '{}',
     '{silver.load_fact_enrollment,silver.load_fact_visit_timelines,silver.load_fact_element_completions,silver.load_dim_studies}',
     'study x day activity, recomputed for queued days'),
    ('gold.refresh_mv_study_performance_metrics', 'gold.mv_study_performance_metrics', 'gold', 90, '{}',
     '{silver.load_fact_study_performance,silver.load_dim_studies}',
     'REFRESH MATERIALIZED VIEW CONCURRENTLY')
ON CONFLICT (procedure_name) DO UPDATE
   SET target_table = excluded.target_table, layer = excluded.layer, run_order = excluded.run_order,
       source_tables = excluded.source_tables, depends_on = excluded.depends_on,
       description = excluded.description;

-- -- entry points --------------------------------------------------------------------------------
-- All dimensions (then all facts and the gold refresh) in registry order, in the caller's
-- transaction. The transform consumer instead runs each procedure in its own transaction and
-- records each in etl.dw_transform_runs; these two are for operators and schedulers that want one
-- CALL (psql: CALL silver.load_all_new_dimensions(); CALL silver.load_all_new_facts();).
CREATE OR REPLACE PROCEDURE silver.load_all_new_dimensions(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    i bigint; u bigint; c bigint; d bigint;
BEGIN
    inserted := 0; updated := 0; closed := 0; deleted := 0;
    CALL silver.load_dim_sites(i, u, c, d);     inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_sponsors(i, u, c, d);  inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_staff(i, u, c, d);     inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_patients(i, u, c, d);  inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_studies(i, u, c, d);   inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_subjects(i, u, c, d);  inserted := inserted + i; updated := updated + u; closed := closed + c;
END
$$;

CREATE OR REPLACE PROCEDURE silver.load_all_new_facts(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    i bigint; u bigint; c bigint; d bigint;
BEGIN
    inserted := 0; updated := 0; closed := 0; deleted := 0;
    CALL silver.load_fact_enrollment(i, u, c, d);
    inserted := inserted + i; updated := updated + u; deleted := deleted + d;
    CALL silver.load_fact_visit_timelines(i, u, c, d);
    inserted := inserted + i; updated := updated + u; deleted := deleted + d;
    CALL silver.load_fact_element_completions(i, u, c, d);
    inserted := inserted + i; updated := updated + u; deleted := deleted + d;
    CALL silver.load_fact_study_performance(i, u, c, d);
    inserted := inserted + i; updated := updated + u; deleted := deleted + d;
    CALL gold.refresh_mv_study_performance_metrics(i, u, c, d);
END
$$;

-- -- data quality --------------------------------------------------------------------------------
-- A check is a SELECT returning one text column: the key of every failing row. The runner
-- (consumers/quality.py) counts the rows, keeps up to 10 sample keys, and writes one result per
-- check and batch. Severity `error` fails the transform run that built the table; `warning` is
-- reported (metrics, status, v_quality_latest) without failing it.
CREATE TABLE IF NOT EXISTS etl.dw_quality_checks (
    check_name    varchar(100) PRIMARY KEY CHECK (check_name ~ '^[a-z][a-z0-9_]{0,99}$'),
    target_table  varchar(127) NOT NULL CHECK (target_table ~ '^(silver|gold)\.[a-z_][a-z0-9_]{0,62}$'),
    severity      varchar(10)  NOT NULL CHECK (severity IN ('error', 'warning', 'info')),
    category      varchar(32)  NOT NULL CHECK (category IN ('uniqueness', 'history', 'referential', 'date_key',
                                                            'measure', 'required', 'vocabulary', 'date_sanity',
                                                            'reconciliation')),
    description   text         NOT NULL,
    check_sql     text         NOT NULL,
    -- the consumer runs a check at most this often (0 = after every batch); `transform --now` always
    -- runs it. Reconciliation reads all of Bronze, so it runs hourly by default.
    min_interval_seconds integer NOT NULL DEFAULT 0 CHECK (min_interval_seconds >= 0),
    is_active     boolean      NOT NULL DEFAULT true
);

CREATE TABLE IF NOT EXISTS etl.dw_quality_results (
    id               bigserial PRIMARY KEY,
    check_name       varchar(100) NOT NULL,
    target_table     varchar(127) NOT NULL,
    severity         varchar(10)  NOT NULL,
    status           varchar(10)  NOT NULL CHECK (status IN ('pass', 'fail', 'error')),
    failed_rows      bigint       NOT NULL DEFAULT 0,
    sample_keys      text[]       NOT NULL DEFAULT '{}',
    batch_id         uuid,
    transform_run_id bigint,
    checked_at       timestamptz  NOT NULL DEFAULT now(),
    duration_ms      numeric(12, 3),
    error_message    text
);
CREATE INDEX IF NOT EXISTS dw_quality_results_check_idx ON etl.dw_quality_results (check_name, checked_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS dw_quality_results_batch_idx ON etl.dw_quality_results (batch_id);

-- The latest result of every active check: what alerting (issue 7), `transform --status` and
-- dashboards read. status <> 'pass' means the problem is current.
CREATE OR REPLACE VIEW etl.v_quality_latest AS
SELECT c.check_name, c.target_table, c.severity, c.category, c.description, c.min_interval_seconds,
       r.status, r.failed_rows, r.sample_keys, r.batch_id, r.transform_run_id, r.checked_at, r.duration_ms,
       r.error_message
  FROM etl.dw_quality_checks c
  LEFT JOIN LATERAL (SELECT * FROM etl.dw_quality_results q
                      WHERE q.check_name = c.check_name
                      ORDER BY q.checked_at DESC, q.id DESC LIMIT 1) r ON true
 WHERE c.is_active;

GRANT SELECT ON etl.dw_quality_checks, etl.dw_quality_results, etl.v_quality_latest TO trialsync_analytics;

-- History retention: results and runs older than p_keep go, except the latest per check and per
-- procedure (what the status views and alerting read). The transform consumer calls it hourly.
CREATE OR REPLACE FUNCTION etl.prune_transform_history(p_keep interval DEFAULT interval '90 days')
RETURNS bigint LANGUAGE sql VOLATILE AS $$
    WITH q AS (
        DELETE FROM etl.dw_quality_results r
         WHERE r.checked_at < now() - p_keep
           AND r.id <> (SELECT l.id FROM etl.dw_quality_results l WHERE l.check_name = r.check_name
                         ORDER BY l.checked_at DESC, l.id DESC LIMIT 1)
        RETURNING 1),
    t AS (
        DELETE FROM etl.dw_transform_runs r
         WHERE r.started_at < now() - p_keep AND r.status <> 'running'
           AND r.id <> (SELECT l.id FROM etl.dw_transform_runs l WHERE l.procedure_name = r.procedure_name
                         ORDER BY l.started_at DESC, l.id DESC LIMIT 1)
        RETURNING 1)
    SELECT (SELECT count(*) FROM q) + (SELECT count(*) FROM t)
$$;

INSERT INTO etl.dw_quality_checks (check_name, target_table, severity, category, description, check_sql) VALUES
-- uniqueness and SCD2 history -----------------------------------------------------------------------
('dim_studies_current_unique', 'silver.dim_studies', 'error', 'uniqueness',
 'a study has more than one current version',
 $q$SELECT source_id FROM silver.dim_studies WHERE is_current GROUP BY source_id HAVING count(*) > 1$q$),
('dim_subjects_current_unique', 'silver.dim_subjects', 'error', 'uniqueness',
 'a subject has more than one current version',
 $q$SELECT source_id FROM silver.dim_subjects WHERE is_current GROUP BY source_id HAVING count(*) > 1$q$),
('dim_studies_version_ranges', 'silver.dim_studies', 'error', 'history',
 'study versions with end before start, overlapping versions, or is_current disagreeing with the open end date',
 $q$SELECT source_id || '#' || study_key FROM (
        SELECT source_id, study_key, is_current, effective_start_date AS s, effective_end_date AS e,
               lead(effective_start_date) OVER (PARTITION BY source_id ORDER BY effective_start_date, study_key) AS next_s
          FROM silver.dim_studies) v
     WHERE e < s OR is_current <> (e = '9999-12-31 00:00:00+00') OR next_s < e$q$),
('dim_subjects_version_ranges', 'silver.dim_subjects', 'error', 'history',
 'subject versions with end before start, overlapping versions, or is_current disagreeing with the open end date',
 $q$SELECT source_id || '#' || subject_key FROM (
        SELECT source_id, subject_key, is_current, effective_start_date AS s, effective_end_date AS e,
               lead(effective_start_date) OVER (PARTITION BY source_id ORDER BY effective_start_date, subject_key) AS next_s
          FROM silver.dim_subjects) v
     WHERE e < s OR is_current <> (e = '9999-12-31 00:00:00+00') OR next_s < e$q$),
-- referential integrity ----------------------------------------------------------------------------
('fact_enrollment_orphan_keys', 'silver.fact_enrollment', 'error', 'referential',
 'fact_enrollment rows whose subject/study/site/patient key is set but absent from its dimension',
 $q$SELECT f.source_id FROM silver.fact_enrollment f
     WHERE (f.subject_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_subjects d WHERE d.subject_key = f.subject_key))
        OR (f.study_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_studies d WHERE d.study_key = f.study_key))
        OR (f.site_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_sites d WHERE d.site_key = f.site_key))
        OR (f.patient_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_patients d WHERE d.patient_key = f.patient_key))$q$),
('fact_visit_timelines_orphan_keys', 'silver.fact_visit_timelines', 'error', 'referential',
 'fact_visit_timelines rows whose subject/study/site/patient key is set but absent from its dimension',
 $q$SELECT f.source_id FROM silver.fact_visit_timelines f
     WHERE (f.subject_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_subjects d WHERE d.subject_key = f.subject_key))
        OR (f.study_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_studies d WHERE d.study_key = f.study_key))
        OR (f.site_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_sites d WHERE d.site_key = f.site_key))
        OR (f.patient_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_patients d WHERE d.patient_key = f.patient_key))$q$),
('fact_element_completions_orphan_keys', 'silver.fact_element_completions', 'error', 'referential',
 'fact_element_completions rows whose subject/study/site/patient key is set but absent from its dimension',
 $q$SELECT f.source_id FROM silver.fact_element_completions f
     WHERE (f.subject_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_subjects d WHERE d.subject_key = f.subject_key))
        OR (f.study_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_studies d WHERE d.study_key = f.study_key))
        OR (f.site_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_sites d WHERE d.site_key = f.site_key))
        OR (f.patient_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_patients d WHERE d.patient_key = f.patient_key))$q$),
('fact_study_performance_orphan_keys', 'silver.fact_study_performance', 'error', 'referential',
 'fact_study_performance rows whose study key is set but absent from dim_studies',
 $q$SELECT p.study_source_id || '@' || p.date_key FROM silver.fact_study_performance p
     WHERE p.study_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_studies d WHERE d.study_key = p.study_key)$q$),
('fact_enrollment_unresolved_keys', 'silver.fact_enrollment', 'warning', 'referential',
 'fact_enrollment rows still waiting for their subject, study, site or patient dimension row',
 $q$SELECT source_id FROM silver.fact_enrollment
     WHERE subject_key IS NULL OR study_key IS NULL OR site_key IS NULL OR patient_key IS NULL$q$),
('fact_visit_timelines_unresolved_keys', 'silver.fact_visit_timelines', 'warning', 'referential',
 'patient visits still waiting for their subject, study, site or patient dimension row',
 $q$SELECT source_id FROM silver.fact_visit_timelines
     WHERE subject_key IS NULL OR study_key IS NULL OR site_key IS NULL OR patient_key IS NULL$q$),
('fact_element_completions_unresolved_keys', 'silver.fact_element_completions', 'warning', 'referential',
 'element completions whose patient visit (or its subject/study) is not in the warehouse yet',
 $q$SELECT source_id FROM silver.fact_element_completions WHERE subject_key IS NULL OR study_key IS NULL$q$),
-- date keys ---------------------------------------------------------------------------------------
('fact_enrollment_date_keys', 'silver.fact_enrollment', 'error', 'date_key',
 'fact_enrollment date keys missing from dim_date',
 $q$SELECT DISTINCT f.source_id FROM silver.fact_enrollment f
     CROSS JOIN LATERAL unnest(ARRAY[f.screening_date_key, f.enrollment_date_key, f.randomization_date_key,
                                     f.screen_failure_date_key, f.dropped_date_key, f.completion_date_key]) k
     WHERE k IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_date d WHERE d.date_key = k)$q$),
('fact_visit_timelines_date_keys', 'silver.fact_visit_timelines', 'error', 'date_key',
 'fact_visit_timelines date keys missing from dim_date',
 $q$SELECT DISTINCT f.source_id FROM silver.fact_visit_timelines f
     CROSS JOIN LATERAL unnest(ARRAY[f.target_due_date_key, f.min_due_date_key, f.max_due_date_key, f.actual_date_key]) k
     WHERE k IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_date d WHERE d.date_key = k)$q$),
('fact_element_completions_date_keys', 'silver.fact_element_completions', 'error', 'date_key',
 'fact_element_completions completion date keys missing from dim_date',
 $q$SELECT f.source_id FROM silver.fact_element_completions f
     WHERE NOT EXISTS (SELECT 1 FROM silver.dim_date d WHERE d.date_key = f.completed_date_key)$q$),
('fact_study_performance_date_keys', 'silver.fact_study_performance', 'error', 'date_key',
 'fact_study_performance date keys missing from dim_date',
 $q$SELECT p.study_source_id || '@' || p.date_key FROM silver.fact_study_performance p
     WHERE NOT EXISTS (SELECT 1 FROM silver.dim_date d WHERE d.date_key = p.date_key)$q$),
-- measures ----------------------------------------------------------------------------------------
('fact_study_performance_measures', 'silver.fact_study_performance', 'error', 'measure',
 'negative daily counts, visits completed in window above visits completed, or a row with no activity',
 $q$SELECT study_source_id || '@' || date_key FROM silver.fact_study_performance
     WHERE least(subjects_screened, subjects_enrolled, subjects_randomized, subjects_screen_failed, subjects_dropped,
                 subjects_completed, visits_due, visits_completed, visits_completed_in_window, elements_completed) < 0
        OR visits_completed_in_window > visits_completed
        OR subjects_screened + subjects_enrolled + subjects_randomized + subjects_screen_failed + subjects_dropped
           + subjects_completed + visits_due + visits_completed + elements_completed = 0$q$),
('fact_visit_timelines_window', 'silver.fact_visit_timelines', 'warning', 'measure',
 'visit due windows that are inverted or do not contain the target date',
 $q$SELECT source_id FROM silver.fact_visit_timelines
     WHERE min_due_date > max_due_date
        OR target_due_date NOT BETWEEN coalesce(min_due_date, target_due_date) AND coalesce(max_due_date, target_due_date)$q$),
('fact_enrollment_milestone_order', 'silver.fact_enrollment', 'warning', 'measure',
 'subject milestones out of order (randomized or enrolled before screened, dropped/completed before enrolled)',
 $q$SELECT source_id FROM silver.fact_enrollment
     WHERE randomization_date < screening_date OR enrollment_date < screening_date
        OR dropped_date < enrollment_date OR completion_date < enrollment_date$q$),
('fact_element_completions_duration', 'silver.fact_element_completions', 'warning', 'measure',
 'visit elements with a negative duration',
 $q$SELECT source_id FROM silver.fact_element_completions WHERE duration_minutes < 0$q$),
-- required fields ---------------------------------------------------------------------------------
('dim_studies_required_fields', 'silver.dim_studies', 'error', 'required',
 'current studies without a CC id',
 $q$SELECT source_id FROM silver.dim_studies WHERE is_current AND NOT is_deleted AND study_id IS NULL$q$),
('dim_studies_descriptive_fields', 'silver.dim_studies', 'warning', 'required',
 'current studies without a name or status',
 $q$SELECT source_id FROM silver.dim_studies WHERE is_current AND NOT is_deleted AND (study_name IS NULL OR study_status IS NULL)$q$),
('dim_subjects_required_fields', 'silver.dim_subjects', 'error', 'required',
 'current subjects without a CC id or a study',
 $q$SELECT source_id FROM silver.dim_subjects WHERE is_current AND NOT is_deleted AND (subject_id IS NULL OR study_source_id IS NULL)$q$),
('dim_sites_required_fields', 'silver.dim_sites', 'warning', 'required',
 'sites without a CC id or name',
 $q$SELECT source_id FROM silver.dim_sites WHERE NOT is_deleted AND (site_id IS NULL OR site_name IS NULL)$q$),
('fact_visit_timelines_required_fields', 'silver.fact_visit_timelines', 'error', 'required',
 'patient visits without a CC id or a subject',
 $q$SELECT source_id FROM silver.fact_visit_timelines WHERE patient_visit_id IS NULL OR subject_source_id IS NULL$q$),
('fact_element_completions_required_fields', 'silver.fact_element_completions', 'error', 'required',
 'element completions without a CC id or a patient visit',
 $q$SELECT source_id FROM silver.fact_element_completions
     WHERE patient_visit_element_id IS NULL OR patient_visit_source_id IS NULL$q$),
-- controlled vocabularies ---------------------------------------------------------------------------
('dim_subjects_status_vocabulary', 'silver.dim_subjects', 'warning', 'vocabulary',
 'current subject status outside the CC vocabulary (SubjectViewModel.status)',
 $q$SELECT source_id FROM silver.dim_subjects
     WHERE is_current AND NOT is_deleted AND subject_status NOT IN ('Prescreened', 'Screened', 'Randomized', 'Dropped', 'Completed',
                                                 'ScreenFailed', 'NonQualified', 'RunIn', 'RunInFailed', 'FollowUp')$q$),
('dim_patients_status_vocabulary', 'silver.dim_patients', 'warning', 'vocabulary',
 'patient status outside the CC vocabulary (PatientViewModel.status)',
 $q$SELECT patient_ref FROM silver.dim_patients
     WHERE NOT is_deleted AND patient_status NOT IN ('Active', 'Inactive', 'OnHold', 'Deceased', 'Ineligible')$q$),
('fact_visit_timelines_status_vocabulary', 'silver.fact_visit_timelines', 'warning', 'vocabulary',
 'patient visit status outside the CC vocabulary (PatientVisitPreview.status)',
 $q$SELECT source_id FROM silver.fact_visit_timelines
     WHERE visit_status NOT IN ('Unknown', 'Pending', 'Completed', 'Started')$q$),
('dim_studies_status_vocabulary', 'silver.dim_studies', 'warning', 'vocabulary',
 'current study status not among the instance''s configured study statuses (job 132), when those are loaded',
 $q$SELECT s.source_id FROM silver.dim_studies s
     WHERE s.is_current AND NOT s.is_deleted AND s.study_status IS NOT NULL
       AND EXISTS (SELECT 1 FROM bronze.dim_system_study_statuses_staging v
                    WHERE NOT v.is_deleted AND split_part(v.source_id, ':', 1) = s.instance_id)
       AND NOT EXISTS (SELECT 1 FROM bronze.dim_system_study_statuses_staging v
                        WHERE NOT v.is_deleted AND split_part(v.source_id, ':', 1) = s.instance_id
                          AND s.study_status IN (v.data->>'name', v.data->>'Name', v.data->>'status', v.data #>> '{}'))$q$),
-- dates that make sense -----------------------------------------------------------------------------
('dim_patients_birth_year', 'silver.dim_patients', 'warning', 'date_sanity',
 'birth year in the future or before 1900',
 $q$SELECT patient_ref FROM silver.dim_patients
     WHERE birth_year > extract(year FROM now()) OR birth_year < 1900$q$),
('dim_studies_created_after_update', 'silver.dim_studies', 'warning', 'date_sanity',
 'current studies created after their last update',
 $q$SELECT source_id FROM silver.dim_studies WHERE is_current AND NOT is_deleted AND created_on > source_modified_at$q$),
('fact_enrollment_future_dates', 'silver.fact_enrollment', 'warning', 'date_sanity',
 'subject milestones dated more than a day in the future',
 $q$SELECT source_id FROM silver.fact_enrollment
     WHERE greatest(screening_date, enrollment_date, randomization_date, screen_failure_date, dropped_date,
                    completion_date) > current_date + 1$q$),
('fact_element_completions_future', 'silver.fact_element_completions', 'warning', 'date_sanity',
 'visit elements completed more than a day in the future',
 $q$SELECT source_id FROM silver.fact_element_completions WHERE completed_at > now() + interval '1 day'$q$),
-- reconciliation with Bronze (only rows below the procedure's watermark: rows loaded since are the next
-- run's work, so a concurrent load never raises a false alarm) ------------------------------------
('dim_studies_reconcile_bronze', 'silver.dim_studies', 'error', 'reconciliation',
 'live Bronze studies without a live current version, or live current versions whose Bronze record is gone or deleted',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_dim_studies', 'bronze.dim_studies_staging') AS wm)
    SELECT b.source_id FROM bronze.dim_studies_staging b, w
     WHERE NOT b.is_deleted AND b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.dim_studies d
                        WHERE d.source_id = b.source_id AND d.is_current AND NOT d.is_deleted)
    UNION ALL
    SELECT d.source_id FROM silver.dim_studies d, w
     WHERE d.is_current AND NOT d.is_deleted
       AND NOT EXISTS (SELECT 1 FROM bronze.dim_studies_staging b
                        WHERE b.source_id = d.source_id AND (NOT b.is_deleted OR b.updated_at >= w.wm))$q$),
('dim_subjects_reconcile_bronze', 'silver.dim_subjects', 'error', 'reconciliation',
 'live Bronze subjects without a live current version, or live current versions whose Bronze record is gone or deleted',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_dim_subjects', 'bronze.dim_subjects_staging') AS wm)
    SELECT b.source_id FROM bronze.dim_subjects_staging b, w
     WHERE NOT b.is_deleted AND b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.dim_subjects d
                        WHERE d.source_id = b.source_id AND d.is_current AND NOT d.is_deleted)
    UNION ALL
    SELECT d.source_id FROM silver.dim_subjects d, w
     WHERE d.is_current AND NOT d.is_deleted
       AND NOT EXISTS (SELECT 1 FROM bronze.dim_subjects_staging b
                        WHERE b.source_id = d.source_id AND (NOT b.is_deleted OR b.updated_at >= w.wm))$q$),
('fact_enrollment_reconcile_bronze', 'silver.fact_enrollment', 'error', 'reconciliation',
 'live Bronze subjects without an enrollment fact, or facts whose subject is gone or deleted',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_fact_enrollment', 'bronze.dim_subjects_staging') AS wm)
    SELECT b.source_id FROM bronze.dim_subjects_staging b, w
     WHERE NOT b.is_deleted AND b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.fact_enrollment f WHERE f.source_id = b.source_id)
    UNION ALL
    SELECT f.source_id FROM silver.fact_enrollment f, w
     WHERE NOT EXISTS (SELECT 1 FROM bronze.dim_subjects_staging b
                        WHERE b.source_id = f.source_id AND (NOT b.is_deleted OR b.updated_at >= w.wm))$q$),
('fact_visit_timelines_reconcile_bronze', 'silver.fact_visit_timelines', 'error', 'reconciliation',
 'live Bronze patient visits without a timeline fact, or facts whose visit is gone or deleted',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_fact_visit_timelines', 'bronze.dim_patient_visits_staging') AS wm)
    SELECT b.source_id FROM bronze.dim_patient_visits_staging b, w
     WHERE NOT b.is_deleted AND b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.fact_visit_timelines f WHERE f.source_id = b.source_id)
    UNION ALL
    SELECT f.source_id FROM silver.fact_visit_timelines f, w
     WHERE NOT EXISTS (SELECT 1 FROM bronze.dim_patient_visits_staging b
                        WHERE b.source_id = f.source_id AND (NOT b.is_deleted OR b.updated_at >= w.wm))$q$),
('dim_sites_reconcile_bronze', 'silver.dim_sites', 'error', 'reconciliation',
 'Bronze sites missing from dim_sites or with a different deletion flag',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_dim_sites', 'bronze.dim_sites_staging') AS wm)
    SELECT b.source_id FROM bronze.dim_sites_staging b, w
     WHERE b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.dim_sites d WHERE d.source_id = b.source_id AND d.is_deleted = b.is_deleted)$q$),
('dim_patients_reconcile_bronze', 'silver.dim_patients', 'error', 'reconciliation',
 'Bronze patients missing from dim_patients or with a different deletion flag',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_dim_patients', 'bronze.dim_patients_staging') AS wm)
    SELECT b.id::text FROM bronze.dim_patients_staging b, w
     WHERE b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.dim_patients d
                        WHERE d.patient_ref = etl.pseudonymize(b.source_id) AND d.is_deleted = b.is_deleted)$q$)
ON CONFLICT (check_name) DO UPDATE
   SET target_table = excluded.target_table, severity = excluded.severity, category = excluded.category,
       description = excluded.description, check_sql = excluded.check_sql;

UPDATE etl.dw_quality_checks SET min_interval_seconds = 3600 WHERE category = 'reconciliation';

-- Every statement of these procedures is parameterised by PL/pgSQL variables (watermarks). After five
-- executions in one session -- the transform consumer keeps its session for days -- PostgreSQL may
-- switch to a generic plan that does not know the watermark, i.e. plans an incremental read of a few
-- rows like a full scan. Always plan with the actual values.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT p.oid::regprocedure AS sig
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE p.prokind = 'p'
                AND (n.nspname || '.' || p.proname IN (SELECT procedure_name FROM etl.dw_transform_procedures)
                     OR n.nspname || '.' || p.proname IN ('silver.load_all_new_dimensions', 'silver.load_all_new_facts'))
    LOOP
        EXECUTE format('ALTER PROCEDURE %s SET plan_cache_mode = force_custom_plan', r.sig);
    END LOOP;
END
$$;
