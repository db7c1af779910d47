-- The procedure registry and the entry points for the new tables, and data-quality checks that never
-- pass on empty input (issue 19).

-- -- registry ------------------------------------------------------------------------------------
INSERT INTO etl.dw_transform_procedures (procedure_name, target_table, layer, run_order, source_tables, depends_on, description)
VALUES
    ('silver.load_dim_study_visits', 'silver.dim_study_visits', 'dimension', 24, '{dim_visits_staging}', '{}',
     'Type 1 protocol visit definitions (job 11)'),
    ('silver.load_dim_elements', 'silver.dim_elements', 'dimension', 25, '{dim_elements_staging}', '{}',
     'Type 1 study elements / procedures (job 8)'),
    ('silver.load_dim_rooms', 'silver.dim_rooms', 'dimension', 26, '{dim_rooms_staging}', '{}',
     'Type 1 rooms (job 33)'),
    ('silver.load_dim_monitors', 'silver.dim_monitors', 'dimension', 27, '{dim_monitors_staging}', '{}',
     'Type 1 monitors (job 139)'),
    ('silver.load_dim_study_arms', 'silver.dim_study_arms', 'dimension', 32,
     '{dim_study_arms_staging,dim_study_visit_arms_staging}', '{}', 'Type 2 study arms (jobs 141 and 174)'),
    ('silver.load_dim_study_staff_assignments', 'silver.dim_study_staff_assignments', 'dimension', 33,
     '{dim_study_personnel_staging}', '{}', 'Type 2 study role holders (job 144)'),
    ('silver.load_fact_visit_timelines', 'silver.fact_visit_timelines', 'fact', 51,
     '{dim_patient_visits_staging,dim_appointments_staging}',
     '{silver.load_fact_enrollment,silver.load_dim_subjects,silver.load_dim_studies,silver.load_dim_sites,silver.load_dim_patients}',
     'one row per patient visit (jobs 9 and 160), actual date from its completed appointment (job 25)'),
    ('silver.load_fact_appointments', 'silver.fact_appointments', 'fact', 53, '{dim_appointments_staging}',
     '{silver.load_fact_visit_timelines,silver.load_dim_studies,silver.load_dim_subjects,silver.load_dim_sites,silver.load_dim_patients,silver.load_dim_study_visits}',
     'one row per appointment (job 25)'),
    ('silver.load_fact_monitor_queries', 'silver.fact_monitor_queries', 'fact', 54, '{dim_queries_staging}',
     '{silver.load_dim_studies,silver.load_dim_monitors,silver.load_dim_staff}', 'one row per monitor query (job 23)'),
    ('silver.load_fact_study_milestones', 'silver.fact_study_milestones', 'fact', 55, '{fact_study_milestones_staging}',
     '{silver.load_dim_studies,silver.load_dim_staff}', 'one row per study milestone (job 28)'),
    ('silver.load_fact_patient_payments', 'silver.fact_patient_payments', 'fact', 56,
     '{dim_patient_visit_stipends_staging,dim_patient_payments_staging}',
     '{silver.load_dim_subjects,silver.load_dim_studies,silver.load_dim_sites,silver.load_dim_patients}',
     'one row per payment to a subject (jobs 161 and 176)'),
    ('gold.advance_data_clock', 'gold.v_enrollment_funnel', 'gold', 85, '{}',
     '{silver.load_fact_enrollment,silver.load_fact_patient_payments,silver.load_fact_monitor_queries,silver.load_dim_studies,silver.load_dim_subjects}',
     'the data clock Gold measures ages and missed visits against'),
    ('gold.refresh_mv_visit_compliance', 'gold.mv_visit_compliance', 'gold', 91, '{}',
     '{gold.advance_data_clock,silver.load_fact_visit_timelines,silver.load_dim_studies,silver.load_dim_sites}',
     'REFRESH MATERIALIZED VIEW CONCURRENTLY')
ON CONFLICT (procedure_name) DO UPDATE
   SET target_table = excluded.target_table, layer = excluded.layer, run_order = excluded.run_order,
       source_tables = excluded.source_tables, depends_on = excluded.depends_on,
       description = excluded.description;

-- -- entry points --------------------------------------------------------------------------------
CREATE OR REPLACE PROCEDURE silver.load_all_new_dimensions(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    i bigint; u bigint; c bigint; d bigint;
BEGIN
    inserted := 0; updated := 0; closed := 0; deleted := 0;
    CALL silver.load_dim_sites(i, u, c, d);        inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_sponsors(i, u, c, d);     inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_staff(i, u, c, d);        inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_patients(i, u, c, d);     inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_study_visits(i, u, c, d); inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_elements(i, u, c, d);     inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_rooms(i, u, c, d);        inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_monitors(i, u, c, d);     inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_studies(i, u, c, d);      inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_subjects(i, u, c, d);     inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_study_arms(i, u, c, d);   inserted := inserted + i; updated := updated + u; closed := closed + c;
    CALL silver.load_dim_study_staff_assignments(i, u, c, d);
    inserted := inserted + i; updated := updated + u; closed := closed + c;
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
    CALL silver.load_fact_enrollment(i, u, c, d);          inserted := inserted + i; updated := updated + u; deleted := deleted + d;
    CALL silver.load_fact_visit_timelines(i, u, c, d);     inserted := inserted + i; updated := updated + u; deleted := deleted + d;
    CALL silver.load_fact_element_completions(i, u, c, d); inserted := inserted + i; updated := updated + u; deleted := deleted + d;
    CALL silver.load_fact_appointments(i, u, c, d);        inserted := inserted + i; updated := updated + u; deleted := deleted + d;
    CALL silver.load_fact_monitor_queries(i, u, c, d);     inserted := inserted + i; updated := updated + u; deleted := deleted + d;
    CALL silver.load_fact_study_milestones(i, u, c, d);    inserted := inserted + i; updated := updated + u; deleted := deleted + d;
    CALL silver.load_fact_patient_payments(i, u, c, d);    inserted := inserted + i; updated := updated + u; deleted := deleted + d;
    CALL silver.load_fact_study_performance(i, u, c, d);   inserted := inserted + i; updated := updated + u; deleted := deleted + d;
    CALL gold.advance_data_clock(i, u, c, d);
    CALL gold.refresh_mv_study_performance_metrics(i, u, c, d);
    CALL gold.refresh_mv_visit_compliance(i, u, c, d);
END
$$;

-- Always plan the procedures' statements with their actual watermarks (see 0304).
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

-- -- quality: "nothing to check" -------------------------------------------------------------------
-- A check that examines no rows proves nothing: it is recorded as 'empty' ("nothing to check"), never
-- as 'pass'. scope_sql returns how many rows the check examines (default: the rows of its target
-- table); the runner (consumers/quality.py) evaluates it first, in the same snapshot as the check.
ALTER TABLE etl.dw_quality_checks ADD COLUMN IF NOT EXISTS scope_sql text;
COMMENT ON COLUMN etl.dw_quality_checks.scope_sql IS
    'SELECT returning one number: the rows the check examines; 0 = nothing to check (status empty). '
    'NULL = the rows of target_table.';
ALTER TABLE etl.dw_quality_results ADD COLUMN IF NOT EXISTS checked_rows bigint;

DO $$
DECLARE
    c text;
BEGIN
    FOR c IN SELECT conname FROM pg_constraint
              WHERE conrelid = 'etl.dw_quality_results'::regclass AND contype = 'c'
                AND pg_get_constraintdef(oid) LIKE '%status%'
    LOOP
        EXECUTE format('ALTER TABLE etl.dw_quality_results DROP CONSTRAINT %I', c);
    END LOOP;
    FOR c IN SELECT conname FROM pg_constraint
              WHERE conrelid = 'etl.dw_quality_checks'::regclass AND contype = 'c'
                AND pg_get_constraintdef(oid) LIKE '%category%'
    LOOP
        EXECUTE format('ALTER TABLE etl.dw_quality_checks DROP CONSTRAINT %I', c);
    END LOOP;
END
$$;
ALTER TABLE etl.dw_quality_results ADD CONSTRAINT dw_quality_results_status_check
    CHECK (status IN ('pass', 'fail', 'error', 'empty'));
ALTER TABLE etl.dw_quality_checks ADD CONSTRAINT dw_quality_checks_category_check
    CHECK (category IN ('uniqueness', 'history', 'referential', 'date_key', 'measure', 'required', 'vocabulary',
                        'date_sanity', 'reconciliation', 'consistency'));

-- the latest result per check, now with the rows it examined (new column last: the view keeps its columns)
CREATE OR REPLACE VIEW etl.v_quality_latest AS
SELECT c.check_name, c.target_table, c.severity, c.category, c.description, c.min_interval_seconds,
       r.status, r.failed_rows, r.sample_keys, r.batch_id, r.transform_run_id, r.checked_at, r.duration_ms,
       r.error_message, r.checked_rows
  FROM etl.dw_quality_checks c
  LEFT JOIN LATERAL (SELECT * FROM etl.dw_quality_results q
                      WHERE q.check_name = c.check_name
                      ORDER BY q.checked_at DESC, q.id DESC LIMIT 1) r ON true
 WHERE c.is_active;

-- Reconciliation scopes of the 0304 checks: the Bronze rows below the procedure's watermark plus the
-- Silver rows (a procedure that never ran has examined nothing).
UPDATE etl.dw_quality_checks SET scope_sql = v.scope FROM (VALUES
    ('dim_studies_reconcile_bronze', $s$SELECT (SELECT count(*) FROM bronze.dim_studies_staging
        WHERE updated_at < etl.transform_watermark('silver.load_dim_studies', 'bronze.dim_studies_staging'))
        + (SELECT count(*) FROM silver.dim_studies WHERE is_current)$s$),
    ('dim_subjects_reconcile_bronze', $s$SELECT (SELECT count(*) FROM bronze.dim_subjects_staging
        WHERE updated_at < etl.transform_watermark('silver.load_dim_subjects', 'bronze.dim_subjects_staging'))
        + (SELECT count(*) FROM silver.dim_subjects WHERE is_current)$s$),
    ('fact_enrollment_reconcile_bronze', $s$SELECT (SELECT count(*) FROM bronze.dim_subjects_staging
        WHERE updated_at < etl.transform_watermark('silver.load_fact_enrollment', 'bronze.dim_subjects_staging'))
        + (SELECT count(*) FROM silver.fact_enrollment)$s$),
    ('fact_visit_timelines_reconcile_bronze', $s$SELECT (SELECT count(*) FROM bronze.dim_patient_visits_staging
        WHERE updated_at < etl.transform_watermark('silver.load_fact_visit_timelines', 'bronze.dim_patient_visits_staging'))
        + (SELECT count(*) FROM silver.fact_visit_timelines)$s$),
    ('dim_sites_reconcile_bronze', $s$SELECT (SELECT count(*) FROM bronze.dim_sites_staging
        WHERE updated_at < etl.transform_watermark('silver.load_dim_sites', 'bronze.dim_sites_staging'))
        + (SELECT count(*) FROM silver.dim_sites)$s$),
    ('dim_patients_reconcile_bronze', $s$SELECT (SELECT count(*) FROM bronze.dim_patients_staging
        WHERE updated_at < etl.transform_watermark('silver.load_dim_patients', 'bronze.dim_patients_staging'))
        + (SELECT count(*) FROM silver.dim_patients)$s$)
) AS v(name, scope) WHERE check_name = v.name;

-- element completions: every key, not only subject and study
UPDATE etl.dw_quality_checks
   SET description = 'element completions still waiting for their subject, study, site or patient dimension row',
       check_sql = $q$SELECT source_id FROM silver.fact_element_completions
     WHERE subject_key IS NULL OR study_key IS NULL OR site_key IS NULL OR patient_key IS NULL$q$
 WHERE check_name = 'fact_element_completions_unresolved_keys';

-- -- new checks ------------------------------------------------------------------------------------
-- Reconciliation checks of the new tables follow 0304's rule (only Bronze rows below the procedure's
-- watermark; rows loaded since are the next run's work). Type-1 dims: every Bronze row has its row
-- with the same deletion flag, and no row lacks its Bronze record. Type-2 dims: live Bronze keys have a
-- live current version, live current versions have a live Bronze record. Facts: live Bronze rows have
-- their fact, facts have a live Bronze row.
INSERT INTO etl.dw_quality_checks (check_name, target_table, severity, category, description, check_sql, scope_sql) VALUES
-- SCD2 history: gaps and repeated versions, for all four Type-2 dimensions ------------------------
('dim_studies_version_gaps', 'silver.dim_studies', 'error', 'history',
 'a study version that does not start where the previous one ended (a gap in its history)',
 $q$SELECT source_id || '#' || study_key FROM (
        SELECT source_id, study_key, effective_start_date AS s,
               lag(effective_end_date) OVER (PARTITION BY source_id ORDER BY effective_start_date, study_key) AS prev_e
          FROM silver.dim_studies) v WHERE s > prev_e$q$, NULL),
('dim_subjects_version_gaps', 'silver.dim_subjects', 'error', 'history',
 'a subject version that does not start where the previous one ended (a gap in its history)',
 $q$SELECT source_id || '#' || subject_key FROM (
        SELECT source_id, subject_key, effective_start_date AS s,
               lag(effective_end_date) OVER (PARTITION BY source_id ORDER BY effective_start_date, subject_key) AS prev_e
          FROM silver.dim_subjects) v WHERE s > prev_e$q$, NULL),
('dim_studies_repeated_versions', 'silver.dim_studies', 'error', 'history',
 'two consecutive study versions with the same tracked attributes (row_hash) and deletion flag: a version opened without a change',
 $q$SELECT source_id || '#' || study_key FROM (
        SELECT source_id, study_key, row_hash, is_deleted,
               lag(row_hash) OVER w AS prev_hash, lag(is_deleted) OVER w AS prev_deleted
          FROM silver.dim_studies WINDOW w AS (PARTITION BY source_id ORDER BY effective_start_date, study_key)) v
     WHERE row_hash = prev_hash AND is_deleted = prev_deleted$q$, NULL),
('dim_subjects_repeated_versions', 'silver.dim_subjects', 'error', 'history',
 'two consecutive subject versions with the same tracked attributes (row_hash) and deletion flag',
 $q$SELECT source_id || '#' || subject_key FROM (
        SELECT source_id, subject_key, row_hash, is_deleted,
               lag(row_hash) OVER w AS prev_hash, lag(is_deleted) OVER w AS prev_deleted
          FROM silver.dim_subjects WINDOW w AS (PARTITION BY source_id ORDER BY effective_start_date, subject_key)) v
     WHERE row_hash = prev_hash AND is_deleted = prev_deleted$q$, NULL),
('dim_study_arms_current_unique', 'silver.dim_study_arms', 'error', 'uniqueness',
 'an arm has more than one current version',
 $q$SELECT source_id FROM silver.dim_study_arms WHERE is_current GROUP BY source_id HAVING count(*) > 1$q$, NULL),
('dim_study_arms_version_ranges', 'silver.dim_study_arms', 'error', 'history',
 'arm versions with end before start, overlapping or with a gap, or is_current disagreeing with the open end date',
 $q$SELECT source_id || '#' || study_arm_key FROM (
        SELECT source_id, study_arm_key, is_current, effective_start_date AS s, effective_end_date AS e,
               lead(effective_start_date) OVER (PARTITION BY source_id ORDER BY effective_start_date, study_arm_key) AS next_s
          FROM silver.dim_study_arms) v
     WHERE e < s OR is_current <> (e = '9999-12-31 00:00:00+00') OR next_s <> e$q$, NULL),
('dim_study_arms_repeated_versions', 'silver.dim_study_arms', 'error', 'history',
 'two consecutive arm versions with the same tracked attributes (row_hash) and deletion flag',
 $q$SELECT source_id || '#' || study_arm_key FROM (
        SELECT source_id, study_arm_key, row_hash, is_deleted,
               lag(row_hash) OVER w AS prev_hash, lag(is_deleted) OVER w AS prev_deleted
          FROM silver.dim_study_arms WINDOW w AS (PARTITION BY source_id ORDER BY effective_start_date, study_arm_key)) v
     WHERE row_hash = prev_hash AND is_deleted = prev_deleted$q$, NULL),
('dim_study_staff_assignments_current_unique', 'silver.dim_study_staff_assignments', 'error', 'uniqueness',
 'a study role has more than one current holder version',
 $q$SELECT source_id FROM silver.dim_study_staff_assignments WHERE is_current GROUP BY source_id HAVING count(*) > 1$q$, NULL),
('dim_study_staff_assignments_version_ranges', 'silver.dim_study_staff_assignments', 'error', 'history',
 'assignment versions with end before start, overlapping or with a gap, or is_current disagreeing with the open end date',
 $q$SELECT source_id || '#' || assignment_key FROM (
        SELECT source_id, assignment_key, is_current, effective_start_date AS s, effective_end_date AS e,
               lead(effective_start_date) OVER (PARTITION BY source_id ORDER BY effective_start_date, assignment_key) AS next_s
          FROM silver.dim_study_staff_assignments) v
     WHERE e < s OR is_current <> (e = '9999-12-31 00:00:00+00') OR next_s <> e$q$, NULL),
('dim_study_staff_assignments_repeated_versions', 'silver.dim_study_staff_assignments', 'error', 'history',
 'two consecutive assignment versions with the same holder and attributes (row_hash) and deletion flag',
 $q$SELECT source_id || '#' || assignment_key FROM (
        SELECT source_id, assignment_key, row_hash, is_deleted,
               lag(row_hash) OVER w AS prev_hash, lag(is_deleted) OVER w AS prev_deleted
          FROM silver.dim_study_staff_assignments
        WINDOW w AS (PARTITION BY source_id ORDER BY effective_start_date, assignment_key)) v
     WHERE row_hash = prev_hash AND is_deleted = prev_deleted$q$, NULL),
-- unresolved keys: every key of every fact --------------------------------------------------------
('fact_study_performance_unresolved_keys', 'silver.fact_study_performance', 'warning', 'referential',
 'study days still waiting for their study''s dimension row',
 $q$SELECT study_source_id || '@' || date_key FROM silver.fact_study_performance WHERE study_key IS NULL$q$, NULL),
('fact_appointments_unresolved_keys', 'silver.fact_appointments', 'warning', 'referential',
 'appointments still waiting for their study, site, patient, subject or study-visit dimension row',
 $q$SELECT source_id FROM silver.fact_appointments
     WHERE study_key IS NULL OR site_key IS NULL OR patient_key IS NULL OR subject_key IS NULL OR study_visit_key IS NULL$q$, NULL),
('fact_monitor_queries_unresolved_keys', 'silver.fact_monitor_queries', 'warning', 'referential',
 'monitor queries still waiting for their study, monitor or requesting staff dimension row',
 $q$SELECT source_id FROM silver.fact_monitor_queries WHERE study_key IS NULL OR monitor_key IS NULL OR staff_key IS NULL$q$, NULL),
('fact_study_milestones_unresolved_keys', 'silver.fact_study_milestones', 'warning', 'referential',
 'milestones still waiting for their study or assigned staff dimension row',
 $q$SELECT source_id FROM silver.fact_study_milestones WHERE study_key IS NULL OR staff_key IS NULL$q$, NULL),
('fact_patient_payments_unresolved_keys', 'silver.fact_patient_payments', 'warning', 'referential',
 'payments still waiting for their subject, study, site or patient dimension row',
 $q$SELECT source_id FROM silver.fact_patient_payments
     WHERE subject_key IS NULL OR study_key IS NULL OR site_key IS NULL OR patient_key IS NULL$q$, NULL),
('fact_appointments_orphan_keys', 'silver.fact_appointments', 'error', 'referential',
 'appointments whose key is set but absent from its dimension',
 $q$SELECT f.source_id FROM silver.fact_appointments f
     WHERE (f.study_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_studies d WHERE d.study_key = f.study_key))
        OR (f.subject_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_subjects d WHERE d.subject_key = f.subject_key))
        OR (f.site_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_sites d WHERE d.site_key = f.site_key))
        OR (f.patient_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_patients d WHERE d.patient_key = f.patient_key))
        OR (f.study_visit_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_study_visits d WHERE d.study_visit_key = f.study_visit_key))$q$, NULL),
('fact_patient_payments_orphan_keys', 'silver.fact_patient_payments', 'error', 'referential',
 'payments whose key is set but absent from its dimension',
 $q$SELECT f.source_id FROM silver.fact_patient_payments f
     WHERE (f.study_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_studies d WHERE d.study_key = f.study_key))
        OR (f.subject_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_subjects d WHERE d.subject_key = f.subject_key))
        OR (f.site_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_sites d WHERE d.site_key = f.site_key))
        OR (f.patient_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM silver.dim_patients d WHERE d.patient_key = f.patient_key))$q$, NULL),
-- facts point at the current version of their Type-2 dimensions ----------------------------------------
('facts_point_at_current_versions', 'silver.fact_visit_timelines', 'warning', 'referential',
 'facts whose study or subject key is a closed version although a current one exists (re-pointing lags)',
 $q$SELECT f.source_id FROM silver.fact_visit_timelines f
      JOIN silver.dim_subjects d ON d.subject_key = f.subject_key AND NOT d.is_current
     UNION ALL
    SELECT f.source_id FROM silver.fact_appointments f
      JOIN silver.dim_studies d ON d.study_key = f.study_key AND NOT d.is_current$q$,
 $s$SELECT (SELECT count(*) FROM silver.fact_visit_timelines) + (SELECT count(*) FROM silver.fact_appointments)$s$),
-- reconciliation with Bronze: every Silver table ----------------------------------------------------
('dim_sponsors_reconcile_bronze', 'silver.dim_sponsors', 'error', 'reconciliation',
 'Bronze sponsors missing from dim_sponsors (or with another deletion flag), or sponsors without a Bronze record',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_dim_sponsors', 'bronze.dim_sponsors_staging') AS wm)
    SELECT b.source_id FROM bronze.dim_sponsors_staging b, w
     WHERE b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.dim_sponsors d WHERE d.source_id = b.source_id AND d.is_deleted = b.is_deleted)
    UNION ALL
    SELECT d.source_id FROM silver.dim_sponsors d WHERE NOT EXISTS (SELECT 1 FROM bronze.dim_sponsors_staging b WHERE b.source_id = d.source_id)$q$,
 $s$SELECT (SELECT count(*) FROM bronze.dim_sponsors_staging
    WHERE updated_at < etl.transform_watermark('silver.load_dim_sponsors', 'bronze.dim_sponsors_staging'))
    + (SELECT count(*) FROM silver.dim_sponsors)$s$),
('dim_staff_reconcile_bronze', 'silver.dim_staff', 'error', 'reconciliation',
 'Bronze staff missing from dim_staff (or with another deletion flag), or staff without a Bronze record',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_dim_staff', 'bronze.dim_staff_staging') AS wm)
    SELECT b.source_id FROM bronze.dim_staff_staging b, w
     WHERE b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.dim_staff d WHERE d.source_id = b.source_id AND d.is_deleted = b.is_deleted)
    UNION ALL
    SELECT d.source_id FROM silver.dim_staff d WHERE NOT EXISTS (SELECT 1 FROM bronze.dim_staff_staging b WHERE b.source_id = d.source_id)$q$,
 $s$SELECT (SELECT count(*) FROM bronze.dim_staff_staging
    WHERE updated_at < etl.transform_watermark('silver.load_dim_staff', 'bronze.dim_staff_staging'))
    + (SELECT count(*) FROM silver.dim_staff)$s$),
('dim_study_visits_reconcile_bronze', 'silver.dim_study_visits', 'error', 'reconciliation',
 'Bronze study visits missing from dim_study_visits (or with another deletion flag), or rows without a Bronze record',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_dim_study_visits', 'bronze.dim_visits_staging') AS wm)
    SELECT b.source_id FROM bronze.dim_visits_staging b, w
     WHERE b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.dim_study_visits d WHERE d.source_id = b.source_id AND d.is_deleted = b.is_deleted)
    UNION ALL
    SELECT d.source_id FROM silver.dim_study_visits d WHERE NOT EXISTS (SELECT 1 FROM bronze.dim_visits_staging b WHERE b.source_id = d.source_id)$q$,
 $s$SELECT (SELECT count(*) FROM bronze.dim_visits_staging
    WHERE updated_at < etl.transform_watermark('silver.load_dim_study_visits', 'bronze.dim_visits_staging'))
    + (SELECT count(*) FROM silver.dim_study_visits)$s$),
('dim_elements_reconcile_bronze', 'silver.dim_elements', 'error', 'reconciliation',
 'Bronze elements missing from dim_elements (or with another deletion flag), or rows without a Bronze record',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_dim_elements', 'bronze.dim_elements_staging') AS wm)
    SELECT b.source_id FROM bronze.dim_elements_staging b, w
     WHERE b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.dim_elements d WHERE d.source_id = b.source_id AND d.is_deleted = b.is_deleted)
    UNION ALL
    SELECT d.source_id FROM silver.dim_elements d WHERE NOT EXISTS (SELECT 1 FROM bronze.dim_elements_staging b WHERE b.source_id = d.source_id)$q$,
 $s$SELECT (SELECT count(*) FROM bronze.dim_elements_staging
    WHERE updated_at < etl.transform_watermark('silver.load_dim_elements', 'bronze.dim_elements_staging'))
    + (SELECT count(*) FROM silver.dim_elements)$s$),
('dim_rooms_reconcile_bronze', 'silver.dim_rooms', 'error', 'reconciliation',
 'Bronze rooms missing from dim_rooms (or with another deletion flag), or rows without a Bronze record',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_dim_rooms', 'bronze.dim_rooms_staging') AS wm)
    SELECT b.source_id FROM bronze.dim_rooms_staging b, w
     WHERE b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.dim_rooms d WHERE d.source_id = b.source_id AND d.is_deleted = b.is_deleted)
    UNION ALL
    SELECT d.source_id FROM silver.dim_rooms d WHERE NOT EXISTS (SELECT 1 FROM bronze.dim_rooms_staging b WHERE b.source_id = d.source_id)$q$,
 $s$SELECT (SELECT count(*) FROM bronze.dim_rooms_staging
    WHERE updated_at < etl.transform_watermark('silver.load_dim_rooms', 'bronze.dim_rooms_staging'))
    + (SELECT count(*) FROM silver.dim_rooms)$s$),
('dim_monitors_reconcile_bronze', 'silver.dim_monitors', 'error', 'reconciliation',
 'Bronze monitors missing from dim_monitors (or with another deletion flag), or rows without a Bronze record',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_dim_monitors', 'bronze.dim_monitors_staging') AS wm)
    SELECT b.source_id FROM bronze.dim_monitors_staging b, w
     WHERE b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.dim_monitors d WHERE d.source_id = b.source_id AND d.is_deleted = b.is_deleted)
    UNION ALL
    SELECT d.source_id FROM silver.dim_monitors d WHERE NOT EXISTS (SELECT 1 FROM bronze.dim_monitors_staging b WHERE b.source_id = d.source_id)$q$,
 $s$SELECT (SELECT count(*) FROM bronze.dim_monitors_staging
    WHERE updated_at < etl.transform_watermark('silver.load_dim_monitors', 'bronze.dim_monitors_staging'))
    + (SELECT count(*) FROM silver.dim_monitors)$s$),
('dim_study_arms_reconcile_bronze', 'silver.dim_study_arms', 'error', 'reconciliation',
 'live Bronze arms (jobs 141/174, latest row per key) without a live current version, or live current versions without one',
 $q$WITH w AS (SELECT least(etl.transform_watermark('silver.load_dim_study_arms', 'bronze.dim_study_arms_staging'),
                           etl.transform_watermark('silver.load_dim_study_arms', 'bronze.dim_study_visit_arms_staging')) AS wm),
    latest AS (SELECT DISTINCT ON (source_id) source_id, is_deleted, updated_at
                 FROM (SELECT source_id, is_deleted, updated_at FROM bronze.dim_study_arms_staging
                       UNION ALL SELECT source_id, is_deleted, updated_at FROM bronze.dim_study_visit_arms_staging) u
                ORDER BY source_id, updated_at DESC, is_deleted DESC)
    SELECT l.source_id FROM latest l, w
     WHERE NOT l.is_deleted AND l.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.dim_study_arms d WHERE d.source_id = l.source_id AND d.is_current AND NOT d.is_deleted)
    UNION ALL
    SELECT d.source_id FROM silver.dim_study_arms d, w
     WHERE d.is_current AND NOT d.is_deleted
       AND NOT EXISTS (SELECT 1 FROM latest l WHERE l.source_id = d.source_id AND (NOT l.is_deleted OR l.updated_at >= w.wm))$q$,
 $s$SELECT (SELECT count(*) FROM bronze.dim_study_arms_staging
    WHERE updated_at < etl.transform_watermark('silver.load_dim_study_arms', 'bronze.dim_study_arms_staging'))
    + (SELECT count(*) FROM bronze.dim_study_visit_arms_staging
    WHERE updated_at < etl.transform_watermark('silver.load_dim_study_arms', 'bronze.dim_study_visit_arms_staging'))
    + (SELECT count(*) FROM silver.dim_study_arms WHERE is_current)$s$),
('dim_study_staff_assignments_reconcile_bronze', 'silver.dim_study_staff_assignments', 'error', 'reconciliation',
 'live Bronze study roles without a live current assignment version, or live current versions whose Bronze record is gone or deleted',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_dim_study_staff_assignments', 'bronze.dim_study_personnel_staging') AS wm)
    SELECT b.source_id FROM bronze.dim_study_personnel_staging b, w
     WHERE NOT b.is_deleted AND b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.dim_study_staff_assignments d
                        WHERE d.source_id = b.source_id AND d.is_current AND NOT d.is_deleted)
    UNION ALL
    SELECT d.source_id FROM silver.dim_study_staff_assignments d, w
     WHERE d.is_current AND NOT d.is_deleted
       AND NOT EXISTS (SELECT 1 FROM bronze.dim_study_personnel_staging b
                        WHERE b.source_id = d.source_id AND (NOT b.is_deleted OR b.updated_at >= w.wm))$q$,
 $s$SELECT (SELECT count(*) FROM bronze.dim_study_personnel_staging
    WHERE updated_at < etl.transform_watermark('silver.load_dim_study_staff_assignments', 'bronze.dim_study_personnel_staging'))
    + (SELECT count(*) FROM silver.dim_study_staff_assignments WHERE is_current)$s$),
('fact_element_completions_reconcile_bronze', 'silver.fact_element_completions', 'error', 'reconciliation',
 'live Bronze visit elements (jobs 24/166, latest row per key) with completedOn but no completion fact, or facts without one',
 $q$WITH w AS (SELECT least(etl.transform_watermark('silver.load_fact_element_completions', 'bronze.dim_patient_visit_elements_staging'),
                           etl.transform_watermark('silver.load_fact_element_completions', 'bronze.dim_visit_elements_staging')) AS wm),
    latest AS (SELECT DISTINCT ON (source_id) source_id, is_deleted, updated_at, data->>'completedOn' AS completed_on
                 FROM (SELECT source_id, is_deleted, updated_at, data FROM bronze.dim_patient_visit_elements_staging
                       UNION ALL SELECT source_id, is_deleted, updated_at, data FROM bronze.dim_visit_elements_staging) u
                ORDER BY source_id, updated_at DESC, is_deleted DESC)
    SELECT l.source_id FROM latest l, w
     WHERE NOT l.is_deleted AND l.updated_at < w.wm AND etl.to_ts(l.completed_on) IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM silver.fact_element_completions f WHERE f.source_id = l.source_id)
    UNION ALL
    SELECT f.source_id FROM silver.fact_element_completions f, w
     WHERE NOT EXISTS (SELECT 1 FROM latest l WHERE l.source_id = f.source_id
                         AND ((NOT l.is_deleted AND etl.to_ts(l.completed_on) IS NOT NULL) OR l.updated_at >= w.wm))$q$,
 $s$SELECT (SELECT count(*) FROM bronze.dim_patient_visit_elements_staging
    WHERE updated_at < etl.transform_watermark('silver.load_fact_element_completions', 'bronze.dim_patient_visit_elements_staging'))
    + (SELECT count(*) FROM bronze.dim_visit_elements_staging
    WHERE updated_at < etl.transform_watermark('silver.load_fact_element_completions', 'bronze.dim_visit_elements_staging'))
    + (SELECT count(*) FROM silver.fact_element_completions)$s$),
('fact_appointments_reconcile_bronze', 'silver.fact_appointments', 'error', 'reconciliation',
 'live Bronze appointments without an appointment fact, or facts whose appointment is gone or deleted',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_fact_appointments', 'bronze.dim_appointments_staging') AS wm)
    SELECT b.source_id FROM bronze.dim_appointments_staging b, w
     WHERE NOT b.is_deleted AND b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.fact_appointments f WHERE f.source_id = b.source_id)
    UNION ALL
    SELECT f.source_id FROM silver.fact_appointments f, w
     WHERE NOT EXISTS (SELECT 1 FROM bronze.dim_appointments_staging b
                        WHERE b.source_id = f.source_id AND (NOT b.is_deleted OR b.updated_at >= w.wm))$q$,
 $s$SELECT (SELECT count(*) FROM bronze.dim_appointments_staging
    WHERE updated_at < etl.transform_watermark('silver.load_fact_appointments', 'bronze.dim_appointments_staging'))
    + (SELECT count(*) FROM silver.fact_appointments)$s$),
('fact_monitor_queries_reconcile_bronze', 'silver.fact_monitor_queries', 'error', 'reconciliation',
 'live Bronze monitor queries without a query fact, or facts whose query is gone or deleted',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_fact_monitor_queries', 'bronze.dim_queries_staging') AS wm)
    SELECT b.source_id FROM bronze.dim_queries_staging b, w
     WHERE NOT b.is_deleted AND b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.fact_monitor_queries f WHERE f.source_id = b.source_id)
    UNION ALL
    SELECT f.source_id FROM silver.fact_monitor_queries f, w
     WHERE NOT EXISTS (SELECT 1 FROM bronze.dim_queries_staging b
                        WHERE b.source_id = f.source_id AND (NOT b.is_deleted OR b.updated_at >= w.wm))$q$,
 $s$SELECT (SELECT count(*) FROM bronze.dim_queries_staging
    WHERE updated_at < etl.transform_watermark('silver.load_fact_monitor_queries', 'bronze.dim_queries_staging'))
    + (SELECT count(*) FROM silver.fact_monitor_queries)$s$),
('fact_study_milestones_reconcile_bronze', 'silver.fact_study_milestones', 'error', 'reconciliation',
 'live Bronze milestones without a milestone fact, or facts whose milestone is gone or deleted',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_fact_study_milestones', 'bronze.fact_study_milestones_staging') AS wm)
    SELECT b.source_id FROM bronze.fact_study_milestones_staging b, w
     WHERE NOT b.is_deleted AND b.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.fact_study_milestones f WHERE f.source_id = b.source_id)
    UNION ALL
    SELECT f.source_id FROM silver.fact_study_milestones f, w
     WHERE NOT EXISTS (SELECT 1 FROM bronze.fact_study_milestones_staging b
                        WHERE b.source_id = f.source_id AND (NOT b.is_deleted OR b.updated_at >= w.wm))$q$,
 $s$SELECT (SELECT count(*) FROM bronze.fact_study_milestones_staging
    WHERE updated_at < etl.transform_watermark('silver.load_fact_study_milestones', 'bronze.fact_study_milestones_staging'))
    + (SELECT count(*) FROM silver.fact_study_milestones)$s$),
('fact_patient_payments_reconcile_bronze', 'silver.fact_patient_payments', 'error', 'reconciliation',
 'live Bronze payments (jobs 161/176, latest row per key) without a payment fact, or facts without one',
 $q$WITH w AS (SELECT least(etl.transform_watermark('silver.load_fact_patient_payments', 'bronze.dim_patient_visit_stipends_staging'),
                           etl.transform_watermark('silver.load_fact_patient_payments', 'bronze.dim_patient_payments_staging')) AS wm),
    latest AS (SELECT DISTINCT ON (source_id) source_id, is_deleted, updated_at
                 FROM (SELECT source_id, is_deleted, updated_at FROM bronze.dim_patient_visit_stipends_staging
                       UNION ALL SELECT source_id, is_deleted, updated_at FROM bronze.dim_patient_payments_staging) u
                ORDER BY source_id, updated_at DESC, is_deleted DESC)
    SELECT l.source_id FROM latest l, w
     WHERE NOT l.is_deleted AND l.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.fact_patient_payments f WHERE f.source_id = l.source_id)
    UNION ALL
    SELECT f.source_id FROM silver.fact_patient_payments f, w
     WHERE NOT EXISTS (SELECT 1 FROM latest l WHERE l.source_id = f.source_id AND (NOT l.is_deleted OR l.updated_at >= w.wm))$q$,
 $s$SELECT (SELECT count(*) FROM bronze.dim_patient_visit_stipends_staging
    WHERE updated_at < etl.transform_watermark('silver.load_fact_patient_payments', 'bronze.dim_patient_visit_stipends_staging'))
    + (SELECT count(*) FROM bronze.dim_patient_payments_staging
    WHERE updated_at < etl.transform_watermark('silver.load_fact_patient_payments', 'bronze.dim_patient_payments_staging'))
    + (SELECT count(*) FROM silver.fact_patient_payments)$s$),
('fact_study_performance_reconcile_facts', 'silver.fact_study_performance', 'error', 'reconciliation',
 'study days whose counts differ from a recount of the facts they come from (enrollment milestones, visits, elements), for days the queue holds no work for',
 $q$WITH ev AS (
        SELECT study_source_id, date_key, count(*) FILTER (WHERE m = 'enrolled') AS enrolled,
               count(*) FILTER (WHERE m = 'screened') AS screened, count(*) FILTER (WHERE m = 'due') AS due,
               count(*) FILTER (WHERE m = 'element') AS elements
          FROM (SELECT f.study_source_id, x.k AS date_key, x.m
                  FROM silver.fact_enrollment f
                 CROSS JOIN LATERAL (VALUES (f.enrollment_date_key, 'enrolled'), (f.screening_date_key, 'screened')) x(k, m)
                 WHERE x.k IS NOT NULL
                UNION ALL
                SELECT v.study_source_id, v.target_due_date_key, 'due' FROM silver.fact_visit_timelines v
                 WHERE v.target_due_date_key IS NOT NULL
                UNION ALL
                SELECT e.study_source_id, e.completed_date_key, 'element' FROM silver.fact_element_completions e) z
         WHERE study_source_id IS NOT NULL
         GROUP BY study_source_id, date_key),
    both_ AS (
        SELECT coalesce(p.study_source_id, ev.study_source_id) AS study_source_id,
               coalesce(p.date_key, ev.date_key) AS date_key,
               coalesce(p.subjects_enrolled, 0) <> coalesce(ev.enrolled, 0)
                   OR coalesce(p.subjects_screened, 0) <> coalesce(ev.screened, 0)
                   OR coalesce(p.visits_due, 0) <> coalesce(ev.due, 0)
                   OR coalesce(p.elements_completed, 0) <> coalesce(ev.elements, 0) AS differs
          FROM silver.fact_study_performance p
          FULL JOIN ev ON ev.study_source_id = p.study_source_id AND ev.date_key = p.date_key)
    SELECT b.study_source_id || '@' || b.date_key FROM both_ b
     WHERE b.differs AND NOT EXISTS (SELECT 1 FROM etl.dw_transform_dirty_study_days q
                                      WHERE q.study_source_id = b.study_source_id AND q.date_key = b.date_key)$q$,
 $s$SELECT (SELECT count(*) FROM silver.fact_study_performance) + (SELECT count(*) FROM silver.fact_enrollment)$s$),
('dim_date_calendar_complete', 'silver.dim_date', 'error', 'reconciliation',
 'days missing from the calendar 2000-01-01..2040-12-31 or dated facts outside it',
 $q$SELECT d::date::text FROM generate_series(date '2000-01-01', date '2040-12-31', interval '1 day') g(d)
     WHERE NOT EXISTS (SELECT 1 FROM silver.dim_date x WHERE x.full_date = g.d::date)$q$, NULL),
('bridge_visit_appointments_reconcile_bronze', 'silver.bridge_visit_appointments', 'error', 'reconciliation',
 'appointments listed by a live Bronze patient visit (below the watermark) missing from the bridge, or bridge rows no visit lists',
 $q$WITH w AS (SELECT etl.transform_watermark('silver.load_fact_visit_timelines', 'bronze.dim_patient_visits_staging') AS wm),
    listed AS (SELECT etl.ref_id(b.source_id, coalesce(x->>'id', x->>'Id')) AS appointment_source_id,
                      b.source_id AS patient_visit_source_id, b.updated_at
                 FROM bronze.dim_patient_visits_staging b
                CROSS JOIN LATERAL jsonb_array_elements(CASE WHEN jsonb_typeof(b.data->'appointments') = 'array'
                                                             THEN b.data->'appointments' ELSE '[]'::jsonb END) x
                WHERE NOT b.is_deleted AND coalesce(x->>'id', x->>'Id') IS NOT NULL)
    SELECT l.appointment_source_id FROM listed l, w
     WHERE l.updated_at < w.wm
       AND NOT EXISTS (SELECT 1 FROM silver.bridge_visit_appointments br
                        WHERE br.appointment_source_id = l.appointment_source_id
                          AND br.patient_visit_source_id = l.patient_visit_source_id)
    UNION ALL
    SELECT br.appointment_source_id FROM silver.bridge_visit_appointments br
     WHERE NOT EXISTS (SELECT 1 FROM listed l WHERE l.appointment_source_id = br.appointment_source_id
                          AND l.patient_visit_source_id = br.patient_visit_source_id)
       AND NOT EXISTS (SELECT 1 FROM bronze.dim_patient_visits_staging b, w
                        WHERE b.source_id = br.patient_visit_source_id AND b.updated_at >= w.wm)$q$,
 $s$SELECT (SELECT count(*) FROM bronze.dim_patient_visits_staging
    WHERE updated_at < etl.transform_watermark('silver.load_fact_visit_timelines', 'bronze.dim_patient_visits_staging'))
    + (SELECT count(*) FROM silver.bridge_visit_appointments)$s$),
-- measures and meanings of the new facts ----------------------------------------------------------------
('fact_enrollment_stage_dates_order', 'silver.fact_enrollment', 'warning', 'measure',
 'funnel stage dates out of order (screened before prescreened, enrolled before screened, randomized before enrolled)',
 $q$SELECT source_id FROM silver.fact_enrollment
     WHERE screening_date < prescreening_date OR enrollment_date < screening_date OR randomization_date < enrollment_date$q$, NULL),
('fact_enrollment_status_agrees', 'silver.fact_enrollment', 'warning', 'consistency',
 'subjects whose own current status differs from the current event of their status history',
 $q$SELECT source_id FROM silver.fact_enrollment
     WHERE status_source = 'history' AND subject_status IS DISTINCT FROM current_status$q$,
 $s$SELECT count(*) FROM silver.fact_enrollment WHERE status_source = 'history'$s$),
('fact_visit_timelines_completed_without_appointment', 'silver.fact_visit_timelines', 'warning', 'consistency',
 'completed visits without a completed appointment (their date and compliance are unknown)',
 $q$SELECT source_id FROM silver.fact_visit_timelines WHERE is_completed AND completed_appointment_source_id IS NULL$q$,
 $s$SELECT count(*) FROM silver.fact_visit_timelines WHERE is_completed$s$),
('fact_appointments_times', 'silver.fact_appointments', 'warning', 'measure',
 'appointments that end before they start or last more than a day',
 $q$SELECT source_id FROM silver.fact_appointments WHERE planned_end < planned_start OR duration_minutes > 1440$q$, NULL),
('fact_monitor_queries_dates', 'silver.fact_monitor_queries', 'warning', 'measure',
 'queries closed before they were created, closed without a close date, or open with one',
 $q$SELECT source_id FROM silver.fact_monitor_queries
     WHERE closed_at < created_at OR (NOT is_open AND closed_at IS NULL) OR (is_open AND closed_at IS NOT NULL)$q$, NULL),
('fact_patient_payments_amount', 'silver.fact_patient_payments', 'warning', 'measure',
 'payments with no amount or a negative one',
 $q$SELECT source_id FROM silver.fact_patient_payments WHERE amount IS NULL OR amount < 0$q$, NULL),
-- Gold: at least one consistency check per object -----------------------------------------------------
('gold_enrollment_funnel_monotone', 'gold.v_enrollment_funnel', 'error', 'consistency',
 'funnel rows where a stage exceeds the stage before it (prescreened >= screened >= enrolled >= randomized >= completed) or active exceeds enrolled',
 $q$SELECT coalesce(study_source_id, '?') || '/' || coalesce(site_source_id, '?') FROM gold.v_enrollment_funnel
     WHERE NOT (subjects >= prescreened AND prescreened >= screened AND screened >= enrolled AND enrolled >= randomized
                AND randomized >= completed AND active <= enrolled)$q$, NULL),
('gold_enrollment_funnel_total', 'gold.v_enrollment_funnel', 'error', 'consistency',
 'the funnel''s subjects per study differ from the enrollment facts of the study',
 $q$SELECT coalesce(g.study_source_id, f.study_source_id) FROM
        (SELECT study_source_id, sum(subjects) AS n FROM gold.v_enrollment_funnel GROUP BY study_source_id) g
        FULL JOIN (SELECT study_source_id, count(*) AS n FROM silver.fact_enrollment GROUP BY study_source_id) f
          ON coalesce(f.study_source_id, '') = coalesce(g.study_source_id, '')
     WHERE g.n IS DISTINCT FROM f.n$q$, $s$SELECT count(*) FROM silver.fact_enrollment$s$),
('gold_study_enrollment_summary_monotone', 'gold.v_study_enrollment_summary', 'error', 'consistency',
 'studies whose summary has screened < enrolled, enrolled < randomized, or more active than enrolled subjects',
 $q$SELECT study_source_id FROM gold.v_study_enrollment_summary
     WHERE screened < enrolled OR enrolled < randomized OR active_subjects > enrolled OR total_subjects < screened$q$, NULL),
('gold_subject_status_summary_shares', 'gold.v_subject_status_summary', 'error', 'consistency',
 'studies whose status shares do not add up to 1 or whose subject count differs from their live current subjects',
 $q$SELECT g.study_source_id FROM (SELECT study_source_id, sum(share_of_study) AS share, sum(subject_count) AS n
                                      FROM gold.v_subject_status_summary GROUP BY study_source_id) g
     WHERE abs(g.share - 1) > 0.01
        OR g.n <> (SELECT count(*) FROM silver.dim_subjects d
                    WHERE d.is_current AND NOT d.is_deleted AND d.study_source_id IS NOT DISTINCT FROM g.study_source_id)$q$, NULL),
('gold_study_performance_metrics_totals', 'gold.mv_study_performance_metrics', 'error', 'consistency',
 'studies whose materialized totals differ from the daily fact, or with more visits in window than completed',
 $q$SELECT m.study_source_id FROM gold.mv_study_performance_metrics m
      LEFT JOIN (SELECT study_source_id, sum(visits_due) AS due, sum(subjects_enrolled) AS enrolled
                   FROM silver.fact_study_performance GROUP BY study_source_id) p ON p.study_source_id = m.study_source_id
     WHERE m.visits_completed_in_window > m.visits_completed
        OR m.visits_due <> coalesce(p.due, 0) OR m.subjects_enrolled <> coalesce(p.enrolled, 0)$q$, NULL),
('gold_visit_compliance_consistent', 'gold.mv_visit_compliance', 'error', 'consistency',
 'compliance rows whose outcomes do not add up (on time + late + early + undated = completed; completed + missed + open = expected) or with a rate outside [0, 1]',
 $q$SELECT coalesce(study_source_id, '?') || '/' || coalesce(site_source_id, '?') || '/' || due_month
      FROM gold.mv_visit_compliance
     WHERE visits_on_time + visits_late + visits_early + visits_completed_undated <> visits_completed
        OR visits_completed + visits_missed + visits_open <> visits_expected
        OR compliance_rate NOT BETWEEN 0 AND 1 OR missed_rate NOT BETWEEN 0 AND 1$q$, NULL),
('gold_visit_compliance_total', 'gold.mv_visit_compliance', 'error', 'consistency',
 'completed visits in the compliance view differ from the completed visit facts (the view is stale)',
 $q$SELECT 'completed' WHERE (SELECT coalesce(sum(visits_completed), 0) FROM gold.mv_visit_compliance)
                             <> (SELECT count(*) FROM silver.fact_visit_timelines
                                  WHERE is_completed AND target_due_date IS NOT NULL)$q$,
 $s$SELECT count(*) FROM silver.fact_visit_timelines$s$),
('gold_site_capacity_consistent', 'gold.v_site_capacity', 'error', 'consistency',
 'site days with negative utilisation, more completed/pending/no-show than appointments, or appointments missing from the view',
 $q$SELECT coalesce(site_source_id, '?') || '@' || planned_date FROM gold.v_site_capacity
     WHERE utilisation < 0 OR appointments_completed + appointments_pending + appointments_no_show > appointments
    UNION ALL
    SELECT 'total' WHERE (SELECT coalesce(sum(appointments), 0) FROM gold.v_site_capacity)
                         <> (SELECT count(*) FROM silver.fact_appointments WHERE NOT is_cancelled AND planned_date IS NOT NULL)$q$, NULL),
('gold_query_aging_buckets', 'gold.v_query_aging', 'error', 'consistency',
 'age buckets that do not add up to the open queries, or open + closed not equal to all queries',
 $q$SELECT coalesce(study_source_id, '?') || '/' || coalesce(monitor_source_id, '?') FROM gold.v_query_aging
     WHERE open_0_7_days + open_8_30_days + open_31_90_days + open_over_90_days <> open_queries
        OR open_queries + closed_queries <> queries$q$, NULL),
('gold_milestone_slippage_consistent', 'gold.v_milestone_slippage', 'error', 'consistency',
 'studies whose milestone counts do not add up (on time + late + undated = completed; completed + overdue + upcoming = milestones)',
 $q$SELECT coalesce(study_source_id, '?') FROM gold.v_milestone_slippage
     WHERE completed_on_time + completed_late + completed_undated <> completed OR completed + overdue + upcoming <> milestones$q$, NULL),
('gold_payments_monthly_total', 'gold.v_payments_monthly', 'error', 'consistency',
 'payments per month that do not add up (stipends + patient payments), or a total that differs from the payment facts',
 $q$SELECT coalesce(study_source_id, '?') || '@' || coalesce(paid_month::text, '?') FROM gold.v_payments_monthly
     WHERE visit_stipends + patient_payments <> payments OR visit_stipend_amount + patient_payment_amount <> total_amount
    UNION ALL
    SELECT 'total' WHERE (SELECT coalesce(sum(total_amount), 0) FROM gold.v_payments_monthly)
                         <> (SELECT coalesce(sum(amount), 0) FROM silver.fact_patient_payments)$q$, NULL)
ON CONFLICT (check_name) DO UPDATE
   SET target_table = excluded.target_table, severity = excluded.severity, category = excluded.category,
       description = excluded.description, check_sql = excluded.check_sql, scope_sql = excluded.scope_sql;

-- Reconciliation reads all of Bronze, and the Gold consistency checks aggregate whole facts: in the
-- consumer they run at most hourly (always on `transform --now`; an 'empty' result never holds them back).
UPDATE etl.dw_quality_checks SET min_interval_seconds = 3600
 WHERE (category = 'reconciliation' OR target_table LIKE 'gold.%') AND min_interval_seconds = 0;
