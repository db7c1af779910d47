-- The rest of the star, facts (issue 19), and definitions from the CC model:
--
-- * fact_enrollment is recomputed from the subject status history (SubjectStatusModel): each funnel
--   stage counted once per subject, "active" = a current on-study status (RunIn, Randomized, FollowUp);
-- * fact_visit_timelines takes the visit's actual date from its completed appointment
--   (PatientVisitPreview.appointments -> AppointmentViewModel.plannedStart/status) and says whether
--   the visit was expected (the subject on study at its target date);
-- * new facts: fact_appointments (scheduling and capacity), fact_monitor_queries (open/closed, age),
--   fact_study_milestones (projected vs completed), fact_patient_payments (visit stipends and patient
--   payments).
--
-- Conventions as in 0302 (keys, re-pointing to current versions, late-arriving dimensions healing,
-- soft deletes, the dirty-day queue of fact_study_performance). The two redefined procedures replace
-- 0302's (same signatures); their watermarks are reset so the next run recomputes every row.

-- -- fact_enrollment: the funnel from the status history ----------------------------------------
ALTER TABLE silver.fact_enrollment
    ADD COLUMN IF NOT EXISTS current_status     text,
    ADD COLUMN IF NOT EXISTS status_source      text,      -- 'history' | 'subject' (no history loaded)
    ADD COLUMN IF NOT EXISTS funnel_stage       smallint,  -- 1 prescreened .. 5 completed, 0 unknown
    ADD COLUMN IF NOT EXISTS prescreening_date  date,
    ADD COLUMN IF NOT EXISTS exit_date          date,
    ADD COLUMN IF NOT EXISTS exit_status        text,
    ADD COLUMN IF NOT EXISTS is_prescreened     boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS is_active          boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS is_non_qualified   boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS is_run_in_failed   boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS fact_enrollment_updated_idx ON silver.fact_enrollment (etl_updated_at);
COMMENT ON TABLE silver.fact_enrollment IS
    'One row per subject enrollment (a patient in a study), from the subject status history '
    '(SubjectStatusModel, job 127). Stage rank of a status: Prescreened/NonQualified 1, Screened/ScreenFailed 2, '
    'RunIn/RunInFailed/Dropped 3 (enrolled), Randomized/FollowUp 4, Completed 5; funnel_stage = the highest rank '
    'of the history and the current status, so each stage counts once per subject and no stage exceeds the one '
    'before it: is_prescreened = stage >= 1, is_screened >= 2, is_enrolled >= 3, is_randomized >= 4, '
    'is_completed = 5. Stage dates = the first event of that rank or higher (enrollment_date falls back to the '
    'subject''s enrollmentDate only when the history has no enrollment event). current_status = the history''s '
    'isCurrentStatus event (latest), else the subject''s status; is_active = current_status RunIn, Randomized '
    'or FollowUp (on study). is_screen_failed / is_dropped / is_non_qualified / is_run_in_failed: that exit '
    'happened; exit_date/exit_status: the first terminal event (Completed, NonQualified, ScreenFailed, RunInFailed, Dropped).';

CREATE OR REPLACE FUNCTION etl.subject_stage(p_status text) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (CASE p_status WHEN 'Prescreened' THEN 1 WHEN 'NonQualified' THEN 1 WHEN 'Screened' THEN 2
                          WHEN 'ScreenFailed' THEN 2 WHEN 'RunIn' THEN 3 WHEN 'RunInFailed' THEN 3 WHEN 'Dropped' THEN 3
                          WHEN 'Randomized' THEN 4 WHEN 'FollowUp' THEN 4 WHEN 'Completed' THEN 5 ELSE 0 END)::smallint
$$;
COMMENT ON FUNCTION etl.subject_stage(text) IS 'funnel rank of a CC subject status (see silver.fact_enrollment)';

CREATE OR REPLACE PROCEDURE silver.load_fact_enrollment(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_fact_enrollment';
    v_to        timestamptz;
    v_from_subj timestamptz;
    v_from_stat timestamptz;
    v_from_dst  timestamptz;
    v_from_dsj  timestamptz;
    v_read      bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from_subj := etl.transform_watermark(c_proc, 'bronze.dim_subjects_staging');
    v_from_stat := etl.transform_watermark(c_proc, 'bronze.dim_subject_statuses_staging');
    v_from_dst := etl.transform_watermark(c_proc, 'silver.dim_studies');
    v_from_dsj := etl.transform_watermark(c_proc, 'silver.dim_subjects');

    DROP TABLE IF EXISTS pg_temp._k_fact_enrollment;
    CREATE TEMP TABLE _k_fact_enrollment ON COMMIT DROP AS
    SELECT b.source_id FROM bronze.dim_subjects_staging b WHERE b.updated_at >= v_from_subj
    UNION
    SELECT f.source_id FROM silver.dim_studies d
      JOIN silver.fact_enrollment f ON f.study_source_id = d.source_id
     WHERE d.is_current AND d.etl_inserted_at >= v_from_dst AND f.study_key IS DISTINCT FROM d.study_key
    UNION
    SELECT f.source_id FROM silver.dim_subjects d
      JOIN silver.fact_enrollment f ON f.source_id = d.source_id
     WHERE d.is_current AND d.etl_inserted_at >= v_from_dsj AND f.subject_key IS DISTINCT FROM d.subject_key
    UNION
    SELECT etl.ref_id(st.source_id, coalesce(st.data->'subject'->>'Id', st.data->'subject'->>'id'))
      FROM bronze.dim_subject_statuses_staging st
     WHERE st.updated_at >= v_from_stat
       AND coalesce(st.data->'subject'->>'Id', st.data->'subject'->>'id') IS NOT NULL
    UNION
    SELECT f.source_id FROM silver.fact_enrollment f
     WHERE (f.subject_key IS NULL OR f.study_key IS NULL OR f.site_key IS NULL OR f.patient_key IS NULL)
       AND ((f.subject_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_subjects d WHERE d.source_id = f.source_id AND d.is_current))
         OR (f.study_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_studies d WHERE d.source_id = f.study_source_id AND d.is_current))
         OR (f.site_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_sites d WHERE d.source_id = f.site_source_id))
         OR (f.patient_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_patients d WHERE d.patient_ref = f.patient_ref)));
    GET DIAGNOSTICS v_read = ROW_COUNT;
    ANALYZE pg_temp._k_fact_enrollment;

    DROP TABLE IF EXISTS pg_temp._n_fact_enrollment;
    CREATE TEMP TABLE _n_fact_enrollment ON COMMIT DROP AS
    WITH subj AS MATERIALIZED (
        SELECT b.source_id, b.data->>'status' AS subject_status,
               etl.ref_id(b.source_id, coalesce(b.data->'study'->>'id', b.data->'study'->>'Id',
                                                b.source_params->>'studyId')) AS study_source_id,
               etl.ref_id(b.source_id, coalesce(b.data->'site'->>'id', b.data->'site'->>'Id')) AS site_source_id,
               etl.pseudonymize(etl.ref_id(b.source_id, coalesce(b.data->'patient'->>'id', b.data->'patient'->>'Id')))
                   AS patient_ref,
               etl.to_date(b.data->>'enrollmentDate') AS subject_enrollment_date
          FROM bronze.dim_subjects_staging b
          JOIN _k_fact_enrollment k ON k.source_id = b.source_id
         WHERE NOT b.is_deleted),
    ev AS MATERIALIZED (
        SELECT x.subject_source_id, x.status, etl.subject_stage(x.status) AS stage, x.event_ts,
               (x.event_ts AT TIME ZONE 'UTC')::date AS event_date, x.is_current
          FROM (SELECT etl.ref_id(st.source_id, coalesce(st.data->'subject'->>'Id', st.data->'subject'->>'id'))
                           AS subject_source_id,
                       st.data->>'status' AS status, etl.to_ts(st.data->>'eventDate') AS event_ts,
                       coalesce(etl.to_bool(st.data->>'isCurrentStatus'), false) AS is_current
                  FROM bronze.dim_subject_statuses_staging st
                 WHERE NOT st.is_deleted
                OFFSET 0) x
          JOIN _k_fact_enrollment k ON k.source_id = x.subject_source_id),
    evs AS (
        SELECT ev.subject_source_id,
               max(ev.stage) AS history_stage,
               (array_agg(ev.status ORDER BY ev.is_current DESC, ev.event_ts DESC NULLS LAST))[1] AS history_status,
               min(ev.event_date) FILTER (WHERE ev.stage >= 1) AS prescreening_date,
               min(ev.event_date) FILTER (WHERE ev.stage >= 2) AS screening_date,
               min(ev.event_date) FILTER (WHERE ev.stage >= 3) AS enrollment_date,
               min(ev.event_date) FILTER (WHERE ev.stage >= 4 AND ev.status <> 'Dropped') AS randomization_date,
               min(ev.event_date) FILTER (WHERE ev.status = 'ScreenFailed') AS screen_failure_date,
               min(ev.event_date) FILTER (WHERE ev.status = 'Dropped') AS dropped_date,
               min(ev.event_date) FILTER (WHERE ev.status = 'Completed') AS completion_date,
               bool_or(ev.status = 'NonQualified') AS any_non_qualified,
               bool_or(ev.status = 'RunInFailed') AS any_run_in_failed,
               (array_agg(ev.event_date ORDER BY ev.event_ts) FILTER (
                    WHERE ev.status IN ('Completed', 'NonQualified', 'ScreenFailed', 'RunInFailed', 'Dropped')))[1] AS exit_date,
               (array_agg(ev.status ORDER BY ev.event_ts) FILTER (
                    WHERE ev.status IN ('Completed', 'NonQualified', 'ScreenFailed', 'RunInFailed', 'Dropped')))[1] AS exit_status,
               count(*)::int AS status_event_count
          FROM ev
         GROUP BY ev.subject_source_id),
    j AS (
        SELECT s.*, e.*,
               coalesce(e.history_status, s.subject_status) AS cur_status,
               CASE WHEN e.history_status IS NOT NULL THEN 'history' ELSE 'subject' END AS src,
               greatest(coalesce(e.history_stage, 0), etl.subject_stage(s.subject_status)) AS stage
          FROM subj s LEFT JOIN evs e ON e.subject_source_id = s.source_id),
    jj AS (
        SELECT j.*, CASE WHEN j.stage >= 3 THEN coalesce(j.enrollment_date, j.subject_enrollment_date) END AS enr_date
          FROM j)
    SELECT j.source_id, ds.subject_key, st.study_key, si.site_key, pa.patient_key,
           j.study_source_id, j.site_source_id, j.patient_ref, j.subject_status,
           j.cur_status AS current_status, j.src AS status_source, j.stage::smallint AS funnel_stage,
           j.prescreening_date, j.screening_date, j.enr_date AS enrollment_date,
           j.randomization_date, j.screen_failure_date, j.dropped_date, j.completion_date,
           j.exit_date, j.exit_status,
           etl.date_key(j.screening_date) AS screening_date_key, etl.date_key(j.enr_date) AS enrollment_date_key,
           etl.date_key(j.randomization_date) AS randomization_date_key,
           etl.date_key(j.screen_failure_date) AS screen_failure_date_key,
           etl.date_key(j.dropped_date) AS dropped_date_key, etl.date_key(j.completion_date) AS completion_date_key,
           (j.stage >= 1) AS is_prescreened, (j.stage >= 2) AS is_screened, (j.stage >= 3) AS is_enrolled,
           (j.stage >= 4) AS is_randomized, (j.stage >= 5) AS is_completed,
           (j.screen_failure_date IS NOT NULL OR j.cur_status = 'ScreenFailed') AS is_screen_failed,
           (j.dropped_date IS NOT NULL OR j.cur_status = 'Dropped') AS is_dropped,
           (coalesce(j.any_non_qualified, false) OR j.cur_status = 'NonQualified') AS is_non_qualified,
           (coalesce(j.any_run_in_failed, false) OR j.cur_status = 'RunInFailed') AS is_run_in_failed,
           coalesce(j.cur_status IN ('RunIn', 'Randomized', 'FollowUp'), false) AS is_active,
           coalesce(j.status_event_count, 0) AS status_event_count
      FROM jj j
      LEFT JOIN silver.dim_subjects ds ON ds.source_id = j.source_id AND ds.is_current
      LEFT JOIN silver.dim_studies st ON st.source_id = j.study_source_id AND st.is_current
      LEFT JOIN silver.dim_sites si ON si.source_id = j.site_source_id
      LEFT JOIN silver.dim_patients pa ON pa.patient_ref = j.patient_ref;

    WITH del AS (
        DELETE FROM silver.fact_enrollment f
         USING _k_fact_enrollment k
         WHERE f.source_id = k.source_id
           AND NOT EXISTS (SELECT 1 FROM _n_fact_enrollment n WHERE n.source_id = f.source_id)
        RETURNING f.study_source_id, f.screening_date_key, f.enrollment_date_key, f.randomization_date_key,
                  f.screen_failure_date_key, f.dropped_date_key, f.completion_date_key),
    q AS (
        INSERT INTO etl.dw_transform_dirty_study_days (study_source_id, date_key)
        SELECT del.study_source_id, x.k
          FROM del CROSS JOIN LATERAL unnest(ARRAY[del.screening_date_key, del.enrollment_date_key,
                del.randomization_date_key, del.screen_failure_date_key, del.dropped_date_key,
                del.completion_date_key]) AS x(k)
         WHERE del.study_source_id IS NOT NULL AND x.k IS NOT NULL)
    SELECT count(*) INTO deleted FROM del;

    WITH up AS (
        INSERT INTO silver.fact_enrollment AS f
               (source_id, subject_key, study_key, site_key, patient_key, study_source_id, site_source_id,
                patient_ref, subject_status, current_status, status_source, funnel_stage, prescreening_date,
                screening_date, enrollment_date, randomization_date, screen_failure_date, dropped_date,
                completion_date, exit_date, exit_status, screening_date_key, enrollment_date_key,
                randomization_date_key, screen_failure_date_key, dropped_date_key, completion_date_key,
                is_prescreened, is_screened, is_enrolled, is_randomized, is_screen_failed, is_dropped, is_completed,
                is_non_qualified, is_run_in_failed, is_active,
                days_screening_to_enrollment, days_screening_to_randomization, status_event_count)
        SELECT source_id, subject_key, study_key, site_key, patient_key, study_source_id, site_source_id,
               patient_ref, subject_status, current_status, status_source, funnel_stage, prescreening_date,
               screening_date, enrollment_date, randomization_date, screen_failure_date, dropped_date,
               completion_date, exit_date, exit_status, screening_date_key, enrollment_date_key,
               randomization_date_key, screen_failure_date_key, dropped_date_key, completion_date_key,
               is_prescreened, is_screened, is_enrolled, is_randomized, is_screen_failed, is_dropped, is_completed,
               is_non_qualified, is_run_in_failed, is_active,
               enrollment_date - screening_date, randomization_date - screening_date, status_event_count
          FROM _n_fact_enrollment
        ON CONFLICT (source_id) DO UPDATE
           SET subject_key = excluded.subject_key, study_key = excluded.study_key, site_key = excluded.site_key,
               patient_key = excluded.patient_key, study_source_id = excluded.study_source_id,
               site_source_id = excluded.site_source_id, patient_ref = excluded.patient_ref,
               subject_status = excluded.subject_status, current_status = excluded.current_status,
               status_source = excluded.status_source, funnel_stage = excluded.funnel_stage,
               prescreening_date = excluded.prescreening_date, screening_date = excluded.screening_date,
               enrollment_date = excluded.enrollment_date, randomization_date = excluded.randomization_date,
               screen_failure_date = excluded.screen_failure_date, dropped_date = excluded.dropped_date,
               completion_date = excluded.completion_date, exit_date = excluded.exit_date,
               exit_status = excluded.exit_status, screening_date_key = excluded.screening_date_key,
               enrollment_date_key = excluded.enrollment_date_key,
               randomization_date_key = excluded.randomization_date_key,
               screen_failure_date_key = excluded.screen_failure_date_key,
               dropped_date_key = excluded.dropped_date_key, completion_date_key = excluded.completion_date_key,
               is_prescreened = excluded.is_prescreened, is_screened = excluded.is_screened,
               is_enrolled = excluded.is_enrolled, is_randomized = excluded.is_randomized,
               is_screen_failed = excluded.is_screen_failed, is_dropped = excluded.is_dropped,
               is_completed = excluded.is_completed, is_non_qualified = excluded.is_non_qualified,
               is_run_in_failed = excluded.is_run_in_failed, is_active = excluded.is_active,
               days_screening_to_enrollment = excluded.days_screening_to_enrollment,
               days_screening_to_randomization = excluded.days_screening_to_randomization,
               status_event_count = excluded.status_event_count, etl_updated_at = now()
         WHERE (f.subject_key, f.study_key, f.site_key, f.patient_key, f.study_source_id, f.site_source_id,
                f.patient_ref, f.subject_status, f.current_status, f.status_source, f.funnel_stage,
                f.prescreening_date, f.screening_date, f.enrollment_date, f.randomization_date,
                f.screen_failure_date, f.dropped_date, f.completion_date, f.exit_date, f.exit_status,
                f.is_prescreened, f.is_screened, f.is_enrolled, f.is_randomized, f.is_screen_failed, f.is_dropped,
                f.is_completed, f.is_non_qualified, f.is_run_in_failed, f.is_active, f.status_event_count)
               IS DISTINCT FROM
               (excluded.subject_key, excluded.study_key, excluded.site_key, excluded.patient_key,
                excluded.study_source_id, excluded.site_source_id, excluded.patient_ref, excluded.subject_status,
                excluded.current_status, excluded.status_source, excluded.funnel_stage, excluded.prescreening_date,
                excluded.screening_date, excluded.enrollment_date, excluded.randomization_date,
                excluded.screen_failure_date, excluded.dropped_date, excluded.completion_date, excluded.exit_date,
                excluded.exit_status, excluded.is_prescreened, excluded.is_screened, excluded.is_enrolled,
                excluded.is_randomized, excluded.is_screen_failed, excluded.is_dropped, excluded.is_completed,
                excluded.is_non_qualified, excluded.is_run_in_failed, excluded.is_active, excluded.status_event_count)
        RETURNING f.source_id, (xmax = 0) AS was_inserted, f.study_source_id, f.screening_date_key,
                  f.enrollment_date_key, f.randomization_date_key, f.screen_failure_date_key, f.dropped_date_key,
                  f.completion_date_key),
    old AS (
        SELECT o.source_id, o.study_source_id, o.screening_date_key, o.enrollment_date_key,
               o.randomization_date_key, o.screen_failure_date_key, o.dropped_date_key, o.completion_date_key
          FROM silver.fact_enrollment o JOIN up ON up.source_id = o.source_id),
    moved AS (
        SELECT u.* FROM up u LEFT JOIN old o ON o.source_id = u.source_id
         WHERE o.source_id IS NULL
            OR (o.study_source_id, o.screening_date_key, o.enrollment_date_key, o.randomization_date_key,
                o.screen_failure_date_key, o.dropped_date_key, o.completion_date_key)
               IS DISTINCT FROM
               (u.study_source_id, u.screening_date_key, u.enrollment_date_key, u.randomization_date_key,
                u.screen_failure_date_key, u.dropped_date_key, u.completion_date_key)),
    q AS (
        INSERT INTO etl.dw_transform_dirty_study_days (study_source_id, date_key)
        SELECT z.study_source_id, x.k
          FROM (SELECT study_source_id, screening_date_key, enrollment_date_key, randomization_date_key,
                       screen_failure_date_key, dropped_date_key, completion_date_key FROM moved
                UNION ALL
                SELECT o.study_source_id, o.screening_date_key, o.enrollment_date_key, o.randomization_date_key,
                       o.screen_failure_date_key, o.dropped_date_key, o.completion_date_key
                  FROM old o JOIN moved m ON m.source_id = o.source_id) z
         CROSS JOIN LATERAL unnest(ARRAY[z.screening_date_key, z.enrollment_date_key, z.randomization_date_key,
                z.screen_failure_date_key, z.dropped_date_key, z.completion_date_key]) AS x(k)
         WHERE z.study_source_id IS NOT NULL AND x.k IS NOT NULL)
    SELECT count(*) FILTER (WHERE was_inserted), count(*) FILTER (WHERE NOT was_inserted)
      INTO inserted, updated
      FROM up;
    closed := 0;
    PERFORM etl.note_change('silver.fact_enrollment', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_subjects_staging', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_subject_statuses_staging', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'silver.dim_studies', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'silver.dim_subjects', v_to, v_read);
END
$$;

-- -- fact_visit_timelines: the actual date from the completed appointment -------------------------
-- Which appointments each patient visit lists (PatientVisitPreview.appointments), kept by
-- load_fact_visit_timelines for the visits it reads: the way from an appointment to its visit.
CREATE TABLE IF NOT EXISTS silver.bridge_visit_appointments (
    appointment_source_id    varchar(255) NOT NULL,
    patient_visit_source_id  varchar(255) NOT NULL,
    listed_status            text,
    etl_updated_at           timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (appointment_source_id, patient_visit_source_id)
);
CREATE INDEX IF NOT EXISTS bridge_visit_appointments_visit_idx ON silver.bridge_visit_appointments (patient_visit_source_id);
CREATE INDEX IF NOT EXISTS bridge_visit_appointments_updated_idx ON silver.bridge_visit_appointments (etl_updated_at);
COMMENT ON TABLE silver.bridge_visit_appointments IS
    'Patient visit -> the appointments it lists (PatientVisitPreview.appointments); the link from an appointment '
    '(AppointmentViewModel has no patient visit id) to its visit.';

ALTER TABLE silver.fact_visit_timelines
    ADD COLUMN IF NOT EXISTS site_source_id                  varchar(255),
    ADD COLUMN IF NOT EXISTS completed_appointment_source_id varchar(255),
    ADD COLUMN IF NOT EXISTS completion_timing               text,      -- on_time | late | early
    ADD COLUMN IF NOT EXISTS is_expected                     boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS fact_visit_timelines_max_due_idx ON silver.fact_visit_timelines (study_source_id, max_due_date);
COMMENT ON TABLE silver.fact_visit_timelines IS
    'One row per patient visit: protocol window (min/target/max due) against the visit''s completed appointment. '
    'actual_date = plannedStart of the appointment the visit lists that has status Completed (the appointment '
    'record of job 25; the visit''s own preview when that record is not loaded), else the visit''s own '
    'completion date when the source has one. completion_timing of a completed visit: on_time inside '
    '[min_due, max_due], late after, early before (is_within_window = on_time). is_expected = the visit was due '
    'while the subject was on study (enrollment_date <= target_due_date and no exit on or before it, from '
    'fact_enrollment) or it took place; gold.mv_visit_compliance counts an expected visit not completed once '
    'its window has closed as missed.';

CREATE OR REPLACE PROCEDURE silver.load_fact_visit_timelines(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_fact_visit_timelines';
    v_to       timestamptz;
    v_from     timestamptz;
    v_from_ap  timestamptz;
    v_from_fe  timestamptz;
    v_from_dst timestamptz;
    v_from_dsj timestamptz;
    v_read     bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.dim_patient_visits_staging');
    v_from_ap := etl.transform_watermark(c_proc, 'bronze.dim_appointments_staging');
    v_from_fe := etl.transform_watermark(c_proc, 'silver.fact_enrollment');
    v_from_dst := etl.transform_watermark(c_proc, 'silver.dim_studies');
    v_from_dsj := etl.transform_watermark(c_proc, 'silver.dim_subjects');

    -- visits to (re)compute: changed visits (jobs 9 and 160), visits listing a changed appointment,
    -- visits of subjects whose enrollment changed (is_expected), re-pointing and unresolved keys
    DROP TABLE IF EXISTS pg_temp._k_fact_visit_timelines;
    CREATE TEMP TABLE _k_fact_visit_timelines ON COMMIT DROP AS
    SELECT b.source_id FROM bronze.dim_patient_visits_staging b WHERE b.updated_at >= v_from
    UNION
    SELECT br.patient_visit_source_id FROM bronze.dim_appointments_staging a
      JOIN silver.bridge_visit_appointments br ON br.appointment_source_id = a.source_id
     WHERE a.updated_at >= v_from_ap
    UNION
    SELECT f.source_id FROM silver.fact_enrollment e
      JOIN silver.fact_visit_timelines f ON f.subject_source_id = e.source_id
     WHERE e.etl_updated_at >= v_from_fe
    UNION
    SELECT f.source_id FROM silver.dim_studies d
      JOIN silver.fact_visit_timelines f ON f.study_source_id = d.source_id
     WHERE d.is_current AND d.etl_inserted_at >= v_from_dst AND f.study_key IS DISTINCT FROM d.study_key
    UNION
    SELECT f.source_id FROM silver.dim_subjects d
      JOIN silver.fact_visit_timelines f ON f.subject_source_id = d.source_id
     WHERE d.is_current AND d.etl_inserted_at >= v_from_dsj AND f.subject_key IS DISTINCT FROM d.subject_key
    UNION
    SELECT f.source_id FROM silver.fact_visit_timelines f
     WHERE (f.subject_key IS NULL OR f.study_key IS NULL OR f.site_key IS NULL OR f.patient_key IS NULL)
       AND ((f.study_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_studies d
                                              WHERE d.source_id = f.study_source_id AND d.is_current))
         OR EXISTS (SELECT 1 FROM silver.dim_subjects s
                     WHERE s.source_id = f.subject_source_id AND s.is_current
                       AND (f.subject_key IS NULL
                         OR (f.site_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_sites t WHERE t.source_id = s.site_source_id))
                         OR (f.patient_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_patients p WHERE p.patient_ref = s.patient_ref)))));
    GET DIAGNOSTICS v_read = ROW_COUNT;
    ANALYZE pg_temp._k_fact_visit_timelines;

    -- the appointments each of these visits lists, with the appointment record's own status/start
    DROP TABLE IF EXISTS pg_temp._a_fact_visit_timelines;
    CREATE TEMP TABLE _a_fact_visit_timelines ON COMMIT DROP AS
    SELECT l.patient_visit_source_id, l.appointment_source_id, l.listed_status,
           coalesce(CASE WHEN a.source_id IS NOT NULL AND NOT a.is_deleted THEN a.data->>'status' END,
                    CASE WHEN a.source_id IS NULL THEN l.listed_status END) AS status,
           coalesce(CASE WHEN a.source_id IS NOT NULL AND NOT a.is_deleted THEN etl.to_ts(a.data->>'plannedStart') END,
                    CASE WHEN a.source_id IS NULL THEN l.listed_start END) AS planned_start
      FROM (SELECT b.source_id AS patient_visit_source_id,
                   etl.ref_id(b.source_id, coalesce(x->>'id', x->>'Id')) AS appointment_source_id,
                   x->>'status' AS listed_status, etl.to_ts(x->>'scheduledStart') AS listed_start
              FROM bronze.dim_patient_visits_staging b
              JOIN _k_fact_visit_timelines k ON k.source_id = b.source_id
             CROSS JOIN LATERAL jsonb_array_elements(CASE WHEN jsonb_typeof(b.data->'appointments') = 'array'
                                                          THEN b.data->'appointments' ELSE '[]'::jsonb END) x
             WHERE NOT b.is_deleted AND coalesce(x->>'id', x->>'Id') IS NOT NULL) l
      LEFT JOIN bronze.dim_appointments_staging a ON a.source_id = l.appointment_source_id;

    DROP TABLE IF EXISTS pg_temp._n_fact_visit_timelines;
    CREATE TEMP TABLE _n_fact_visit_timelines ON COMMIT DROP AS
    WITH v AS MATERIALIZED (
        SELECT b.source_id,
               etl.to_int(b.data->>'id') AS patient_visit_id, etl.to_int(b.data->>'visitId') AS visit_id,
               b.data->>'visitName' AS visit_name, b.data->>'cycleName' AS cycle_name,
               etl.to_int(b.data->>'sequence')::int AS visit_sequence, b.data->>'status' AS visit_status,
               etl.to_bool(b.data->>'mandatory') AS is_mandatory,
               etl.ref_id(b.source_id, coalesce(b.data->'subject'->>'Id', b.data->'subject'->>'id',
                                                b.source_params->>'subjectId')) AS subject_source_id,
               etl.ref_id(b.source_id, coalesce(b.data->'study'->>'id', b.data->'study'->>'Id',
                                                b.source_params->>'studyId')) AS study_ref,
               etl.to_date(b.data->>'targetDueDate') AS target_due_date,
               etl.to_date(b.data->>'minDueDate') AS min_due_date,
               etl.to_date(b.data->>'maxDueDate') AS max_due_date,
               etl.to_date(coalesce(b.data->>'visitDate', b.data->>'actualDate', b.data->>'completedDate',
                                    b.data->>'completionDate', b.data->>'completedOn')) AS own_date,
               CASE WHEN jsonb_typeof(b.data->'appointments') = 'array'
                    THEN jsonb_array_length(b.data->'appointments') ELSE 0 END AS appointment_count
          FROM bronze.dim_patient_visits_staging b
          JOIN _k_fact_visit_timelines k ON k.source_id = b.source_id
         WHERE NOT b.is_deleted),
    done AS (
        SELECT DISTINCT ON (a.patient_visit_source_id) a.patient_visit_source_id, a.appointment_source_id,
               (a.planned_start AT TIME ZONE 'UTC')::date AS appointment_date
          FROM _a_fact_visit_timelines a
         WHERE a.status = 'Completed'
         ORDER BY a.patient_visit_source_id, a.planned_start DESC NULLS LAST, a.appointment_source_id),
    w AS (
        SELECT v.*, d.appointment_source_id AS completed_appointment_source_id,
               CASE WHEN v.visit_status = 'Completed' THEN coalesce(d.appointment_date, v.own_date) END AS actual_date
          FROM v LEFT JOIN done d ON d.patient_visit_source_id = v.source_id)
    SELECT w.source_id, w.patient_visit_id, w.visit_id, w.visit_name, w.cycle_name, w.visit_sequence,
           w.visit_status, w.is_mandatory,
           ds.subject_key, st.study_key, si.site_key, pa.patient_key,
           w.subject_source_id, coalesce(w.study_ref, ds.study_source_id) AS study_source_id, ds.site_source_id,
           w.target_due_date, w.min_due_date, w.max_due_date, w.actual_date,
           etl.date_key(w.target_due_date) AS target_due_date_key, etl.date_key(w.min_due_date) AS min_due_date_key,
           etl.date_key(w.max_due_date) AS max_due_date_key, etl.date_key(w.actual_date) AS actual_date_key,
           (w.max_due_date - w.min_due_date) AS window_days,
           (w.actual_date - w.target_due_date) AS days_from_target,
           coalesce(w.visit_status = 'Completed', false) AS is_completed,
           CASE WHEN w.actual_date IS NULL THEN NULL
                WHEN w.actual_date < coalesce(w.min_due_date, w.target_due_date) THEN 'early'
                WHEN w.actual_date > coalesce(w.max_due_date, w.target_due_date) THEN 'late'
                ELSE 'on_time' END AS completion_timing,
           CASE WHEN w.actual_date IS NOT NULL
                THEN w.actual_date BETWEEN coalesce(w.min_due_date, w.target_due_date)
                                       AND coalesce(w.max_due_date, w.target_due_date) END AS is_within_window,
           (coalesce(w.visit_status = 'Completed', false)
             OR (e.enrollment_date IS NOT NULL AND e.enrollment_date <= w.target_due_date
                 AND (e.exit_date IS NULL OR e.exit_date > w.target_due_date))) AS is_expected,
           w.completed_appointment_source_id, w.appointment_count
      FROM w
      LEFT JOIN silver.dim_subjects ds ON ds.source_id = w.subject_source_id AND ds.is_current
      LEFT JOIN silver.fact_enrollment e ON e.source_id = w.subject_source_id
      LEFT JOIN silver.dim_studies st ON st.source_id = coalesce(w.study_ref, ds.study_source_id) AND st.is_current
      LEFT JOIN silver.dim_sites si ON si.source_id = ds.site_source_id
      LEFT JOIN silver.dim_patients pa ON pa.patient_ref = ds.patient_ref;

    -- the bridge follows the visits read: their listed appointments, nothing else
    WITH gone AS (
        DELETE FROM silver.bridge_visit_appointments br
         USING _k_fact_visit_timelines k
         WHERE br.patient_visit_source_id = k.source_id
           AND NOT EXISTS (SELECT 1 FROM _a_fact_visit_timelines a
                            WHERE a.patient_visit_source_id = br.patient_visit_source_id
                              AND a.appointment_source_id = br.appointment_source_id)
        RETURNING 1)
    INSERT INTO silver.bridge_visit_appointments AS br (appointment_source_id, patient_visit_source_id, listed_status)
    SELECT DISTINCT ON (a.appointment_source_id, a.patient_visit_source_id)
           a.appointment_source_id, a.patient_visit_source_id, a.listed_status
      FROM _a_fact_visit_timelines a
    ON CONFLICT (appointment_source_id, patient_visit_source_id) DO UPDATE
       SET listed_status = excluded.listed_status, etl_updated_at = now()
     WHERE br.listed_status IS DISTINCT FROM excluded.listed_status;

    WITH del AS (
        DELETE FROM silver.fact_visit_timelines f
         USING _k_fact_visit_timelines k
         WHERE f.source_id = k.source_id
           AND NOT EXISTS (SELECT 1 FROM _n_fact_visit_timelines n WHERE n.source_id = f.source_id)
        RETURNING f.study_source_id, f.target_due_date_key, f.actual_date_key),
    q AS (
        INSERT INTO etl.dw_transform_dirty_study_days (study_source_id, date_key)
        SELECT del.study_source_id, x.k
          FROM del CROSS JOIN LATERAL unnest(ARRAY[del.target_due_date_key, del.actual_date_key]) AS x(k)
         WHERE del.study_source_id IS NOT NULL AND x.k IS NOT NULL)
    SELECT count(*) INTO deleted FROM del;

    WITH up AS (
        INSERT INTO silver.fact_visit_timelines AS f
               (source_id, patient_visit_id, visit_id, visit_name, cycle_name, visit_sequence, visit_status,
                is_mandatory, subject_key, study_key, site_key, patient_key, subject_source_id, study_source_id,
                site_source_id, target_due_date, min_due_date, max_due_date, actual_date, target_due_date_key,
                min_due_date_key, max_due_date_key, actual_date_key, window_days, days_from_target, is_completed,
                completion_timing, is_within_window, is_expected, completed_appointment_source_id, appointment_count)
        SELECT source_id, patient_visit_id, visit_id, visit_name, cycle_name, visit_sequence, visit_status,
               is_mandatory, subject_key, study_key, site_key, patient_key, subject_source_id, study_source_id,
               site_source_id, target_due_date, min_due_date, max_due_date, actual_date, target_due_date_key,
               min_due_date_key, max_due_date_key, actual_date_key, window_days, days_from_target, is_completed,
               completion_timing, is_within_window, is_expected, completed_appointment_source_id, appointment_count
          FROM _n_fact_visit_timelines
        ON CONFLICT (source_id) DO UPDATE
           SET patient_visit_id = excluded.patient_visit_id, visit_id = excluded.visit_id,
               visit_name = excluded.visit_name, cycle_name = excluded.cycle_name,
               visit_sequence = excluded.visit_sequence, visit_status = excluded.visit_status,
               is_mandatory = excluded.is_mandatory, subject_key = excluded.subject_key,
               study_key = excluded.study_key, site_key = excluded.site_key, patient_key = excluded.patient_key,
               subject_source_id = excluded.subject_source_id, study_source_id = excluded.study_source_id,
               site_source_id = excluded.site_source_id,
               target_due_date = excluded.target_due_date, min_due_date = excluded.min_due_date,
               max_due_date = excluded.max_due_date, actual_date = excluded.actual_date,
               target_due_date_key = excluded.target_due_date_key, min_due_date_key = excluded.min_due_date_key,
               max_due_date_key = excluded.max_due_date_key, actual_date_key = excluded.actual_date_key,
               window_days = excluded.window_days, days_from_target = excluded.days_from_target,
               is_completed = excluded.is_completed, completion_timing = excluded.completion_timing,
               is_within_window = excluded.is_within_window, is_expected = excluded.is_expected,
               completed_appointment_source_id = excluded.completed_appointment_source_id,
               appointment_count = excluded.appointment_count, etl_updated_at = now()
         WHERE (f.patient_visit_id, f.visit_id, f.visit_name, f.cycle_name, f.visit_sequence, f.visit_status,
                f.is_mandatory, f.subject_key, f.study_key, f.site_key, f.patient_key, f.subject_source_id,
                f.study_source_id, f.site_source_id, f.target_due_date, f.min_due_date, f.max_due_date,
                f.actual_date, f.is_completed, f.completion_timing, f.is_within_window, f.is_expected,
                f.completed_appointment_source_id, f.appointment_count)
               IS DISTINCT FROM
               (excluded.patient_visit_id, excluded.visit_id, excluded.visit_name, excluded.cycle_name,
                excluded.visit_sequence, excluded.visit_status, excluded.is_mandatory, excluded.subject_key,
                excluded.study_key, excluded.site_key, excluded.patient_key, excluded.subject_source_id,
                excluded.study_source_id, excluded.site_source_id, excluded.target_due_date, excluded.min_due_date,
                excluded.max_due_date, excluded.actual_date, excluded.is_completed, excluded.completion_timing,
                excluded.is_within_window, excluded.is_expected, excluded.completed_appointment_source_id,
                excluded.appointment_count)
        RETURNING f.source_id, (xmax = 0) AS was_inserted, f.study_source_id, f.target_due_date_key,
                  f.actual_date_key, f.is_completed, f.is_within_window),
    old AS (
        SELECT o.source_id, o.study_source_id, o.target_due_date_key, o.actual_date_key, o.is_completed,
               o.is_within_window
          FROM silver.fact_visit_timelines o JOIN up ON up.source_id = o.source_id),
    moved AS (
        SELECT u.* FROM up u LEFT JOIN old o ON o.source_id = u.source_id
         WHERE o.source_id IS NULL
            OR (o.study_source_id, o.target_due_date_key, o.actual_date_key, o.is_completed, o.is_within_window)
               IS DISTINCT FROM
               (u.study_source_id, u.target_due_date_key, u.actual_date_key, u.is_completed, u.is_within_window)),
    q AS (
        INSERT INTO etl.dw_transform_dirty_study_days (study_source_id, date_key)
        SELECT z.study_source_id, x.k
          FROM (SELECT study_source_id, target_due_date_key, actual_date_key FROM moved
                UNION ALL
                SELECT o.study_source_id, o.target_due_date_key, o.actual_date_key
                  FROM old o JOIN moved m ON m.source_id = o.source_id) z
         CROSS JOIN LATERAL unnest(ARRAY[z.target_due_date_key, z.actual_date_key]) AS x(k)
         WHERE z.study_source_id IS NOT NULL AND x.k IS NOT NULL)
    SELECT count(*) FILTER (WHERE was_inserted), count(*) FILTER (WHERE NOT was_inserted)
      INTO inserted, updated
      FROM up;
    closed := 0;
    PERFORM etl.note_change('silver.fact_visit_timelines', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_patient_visits_staging', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_appointments_staging', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'silver.fact_enrollment', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'silver.dim_studies', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'silver.dim_subjects', v_to, v_read);
END
$$;

-- -- fact_appointments ---------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS silver.fact_appointments (
    appointment_key          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id                varchar(255) NOT NULL UNIQUE,
    appointment_id           bigint,
    appointment_status       text,
    planned_start            timestamptz,
    planned_end              timestamptz,
    duration_minutes         integer,
    planned_date             date,
    planned_date_key         integer,
    is_completed             boolean NOT NULL,
    is_pending               boolean NOT NULL,
    is_cancelled             boolean NOT NULL,
    is_no_show               boolean NOT NULL,
    study_source_id          varchar(255),
    site_source_id           varchar(255),
    patient_ref              char(64),
    subject_source_id        varchar(255),
    study_visit_source_id    varchar(255),
    patient_visit_source_id  varchar(255),
    study_key                bigint,
    site_key                 bigint,
    patient_key              bigint,
    subject_key              bigint,
    study_visit_key          bigint,
    appointment_count        smallint NOT NULL DEFAULT 1,
    etl_inserted_at          timestamptz NOT NULL DEFAULT now(),
    etl_updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS fact_appointments_site_day_idx ON silver.fact_appointments (site_source_id, planned_date);
CREATE INDEX IF NOT EXISTS fact_appointments_study_idx ON silver.fact_appointments (study_source_id);
CREATE INDEX IF NOT EXISTS fact_appointments_visit_idx ON silver.fact_appointments (patient_visit_source_id);
COMMENT ON TABLE silver.fact_appointments IS
    'One row per appointment (AppointmentViewModel, job 25): planned start/end and duration, status flags, the '
    'site, study, patient and study visit it is for; patient_visit_source_id = the patient visit that lists it '
    '(silver.bridge_visit_appointments), subject = that visit''s subject, else the subject of the same patient '
    'in the same study. Soft-deleted appointments are removed.';

CREATE OR REPLACE PROCEDURE silver.load_fact_appointments(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_fact_appointments';
    v_to       timestamptz;
    v_from     timestamptz;
    v_from_br  timestamptz;
    v_from_dst timestamptz;
    v_from_dsj timestamptz;
    v_read     bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.dim_appointments_staging');
    v_from_br := etl.transform_watermark(c_proc, 'silver.bridge_visit_appointments');
    v_from_dst := etl.transform_watermark(c_proc, 'silver.dim_studies');
    v_from_dsj := etl.transform_watermark(c_proc, 'silver.dim_subjects');

    DROP TABLE IF EXISTS pg_temp._k_fact_appointments;
    CREATE TEMP TABLE _k_fact_appointments ON COMMIT DROP AS
    SELECT b.source_id FROM bronze.dim_appointments_staging b WHERE b.updated_at >= v_from
    UNION
    SELECT br.appointment_source_id FROM silver.bridge_visit_appointments br WHERE br.etl_updated_at >= v_from_br
    UNION
    SELECT f.source_id FROM silver.dim_studies d JOIN silver.fact_appointments f ON f.study_source_id = d.source_id
     WHERE d.is_current AND d.etl_inserted_at >= v_from_dst AND f.study_key IS DISTINCT FROM d.study_key
    UNION
    SELECT f.source_id FROM silver.dim_subjects d JOIN silver.fact_appointments f ON f.subject_source_id = d.source_id
     WHERE d.is_current AND d.etl_inserted_at >= v_from_dsj AND f.subject_key IS DISTINCT FROM d.subject_key
    UNION
    SELECT f.source_id FROM silver.fact_appointments f
     WHERE (f.study_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_studies d WHERE d.source_id = f.study_source_id AND d.is_current))
        OR (f.site_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_sites d WHERE d.source_id = f.site_source_id))
        OR (f.patient_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_patients d WHERE d.patient_ref = f.patient_ref))
        OR (f.study_visit_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_study_visits d WHERE d.source_id = f.study_visit_source_id))
        OR (f.subject_key IS NULL AND (f.subject_source_id IS NULL OR EXISTS (
                SELECT 1 FROM silver.dim_subjects d WHERE d.source_id = f.subject_source_id AND d.is_current)));
    GET DIAGNOSTICS v_read = ROW_COUNT;
    ANALYZE pg_temp._k_fact_appointments;

    DROP TABLE IF EXISTS pg_temp._n_fact_appointments;
    CREATE TEMP TABLE _n_fact_appointments ON COMMIT DROP AS
    WITH a AS MATERIALIZED (
        SELECT b.source_id, etl.to_int(b.data->>'id') AS appointment_id, b.data->>'status' AS appointment_status,
               etl.to_ts(b.data->>'plannedStart') AS planned_start, etl.to_ts(b.data->>'plannedEnd') AS planned_end,
               etl.ref_id(b.source_id, coalesce(b.data->'study'->>'id', b.data->'study'->>'Id')) AS study_source_id,
               etl.ref_id(b.source_id, coalesce(b.data->'site'->>'id', b.data->'site'->>'Id')) AS site_source_id,
               etl.pseudonymize(etl.ref_id(b.source_id, coalesce(b.data->'patient'->>'id', b.data->'patient'->>'Id')))
                   AS patient_ref,
               etl.ref_id(b.source_id, coalesce(b.data->'visit'->>'id', b.data->'visit'->>'Id')) AS study_visit_source_id
          FROM bronze.dim_appointments_staging b
          JOIN _k_fact_appointments k ON k.source_id = b.source_id
         WHERE NOT b.is_deleted),
    pv AS (
        SELECT DISTINCT ON (br.appointment_source_id) br.appointment_source_id, br.patient_visit_source_id,
               v.subject_source_id
          FROM silver.bridge_visit_appointments br
          JOIN a ON a.source_id = br.appointment_source_id
          LEFT JOIN silver.fact_visit_timelines v ON v.source_id = br.patient_visit_source_id
         ORDER BY br.appointment_source_id, br.patient_visit_source_id),
    s AS (
        SELECT a.*, pv.patient_visit_source_id,
               coalesce(pv.subject_source_id,
                        (SELECT min(d.source_id) FROM silver.dim_subjects d
                          WHERE d.is_current AND NOT d.is_deleted AND d.study_source_id = a.study_source_id
                            AND d.patient_ref = a.patient_ref)) AS subject_source_id
          FROM a LEFT JOIN pv ON pv.appointment_source_id = a.source_id)
    SELECT s.source_id, s.appointment_id, s.appointment_status, s.planned_start, s.planned_end,
           (extract(epoch FROM s.planned_end - s.planned_start) / 60)::int AS duration_minutes,
           (s.planned_start AT TIME ZONE 'UTC')::date AS planned_date,
           etl.date_key((s.planned_start AT TIME ZONE 'UTC')::date) AS planned_date_key,
           coalesce(s.appointment_status = 'Completed', false) AS is_completed,
           coalesce(s.appointment_status IN ('Pending', 'Started', 'Unknown'), false) AS is_pending,
           coalesce(s.appointment_status = 'Cancelled', false) AS is_cancelled,
           coalesce(s.appointment_status = 'NoShow', false) AS is_no_show,
           s.study_source_id, s.site_source_id, s.patient_ref, s.subject_source_id, s.study_visit_source_id,
           s.patient_visit_source_id,
           st.study_key, si.site_key, pa.patient_key, sj.subject_key, sv.study_visit_key
      FROM s
      LEFT JOIN silver.dim_studies st ON st.source_id = s.study_source_id AND st.is_current
      LEFT JOIN silver.dim_sites si ON si.source_id = s.site_source_id
      LEFT JOIN silver.dim_patients pa ON pa.patient_ref = s.patient_ref
      LEFT JOIN silver.dim_subjects sj ON sj.source_id = s.subject_source_id AND sj.is_current
      LEFT JOIN silver.dim_study_visits sv ON sv.source_id = s.study_visit_source_id;

    WITH del AS (
        DELETE FROM silver.fact_appointments f USING _k_fact_appointments k
         WHERE f.source_id = k.source_id
           AND NOT EXISTS (SELECT 1 FROM _n_fact_appointments n WHERE n.source_id = f.source_id)
        RETURNING 1)
    SELECT count(*) INTO deleted FROM del;

    WITH up AS (
        INSERT INTO silver.fact_appointments AS f
               (source_id, appointment_id, appointment_status, planned_start, planned_end, duration_minutes,
                planned_date, planned_date_key, is_completed, is_pending, is_cancelled, is_no_show, study_source_id,
                site_source_id, patient_ref, subject_source_id, study_visit_source_id, patient_visit_source_id,
                study_key, site_key, patient_key, subject_key, study_visit_key)
        SELECT source_id, appointment_id, appointment_status, planned_start, planned_end, duration_minutes,
               planned_date, planned_date_key, is_completed, is_pending, is_cancelled, is_no_show, study_source_id,
               site_source_id, patient_ref, subject_source_id, study_visit_source_id, patient_visit_source_id,
               study_key, site_key, patient_key, subject_key, study_visit_key
          FROM _n_fact_appointments
        ON CONFLICT (source_id) DO UPDATE
           SET appointment_id = excluded.appointment_id, appointment_status = excluded.appointment_status,
               planned_start = excluded.planned_start, planned_end = excluded.planned_end,
               duration_minutes = excluded.duration_minutes, planned_date = excluded.planned_date,
               planned_date_key = excluded.planned_date_key, is_completed = excluded.is_completed,
               is_pending = excluded.is_pending, is_cancelled = excluded.is_cancelled,
               is_no_show = excluded.is_no_show, study_source_id = excluded.study_source_id,
               site_source_id = excluded.site_source_id, patient_ref = excluded.patient_ref,
               subject_source_id = excluded.subject_source_id, study_visit_source_id = excluded.study_visit_source_id,
               patient_visit_source_id = excluded.patient_visit_source_id, study_key = excluded.study_key,
               site_key = excluded.site_key, patient_key = excluded.patient_key, subject_key = excluded.subject_key,
               study_visit_key = excluded.study_visit_key, etl_updated_at = now()
         WHERE (f.appointment_id, f.appointment_status, f.planned_start, f.planned_end, f.study_source_id,
                f.site_source_id, f.patient_ref, f.subject_source_id, f.study_visit_source_id,
                f.patient_visit_source_id, f.study_key, f.site_key, f.patient_key, f.subject_key, f.study_visit_key)
               IS DISTINCT FROM
               (excluded.appointment_id, excluded.appointment_status, excluded.planned_start, excluded.planned_end,
                excluded.study_source_id, excluded.site_source_id, excluded.patient_ref, excluded.subject_source_id,
                excluded.study_visit_source_id, excluded.patient_visit_source_id, excluded.study_key,
                excluded.site_key, excluded.patient_key, excluded.subject_key, excluded.study_visit_key)
        RETURNING (xmax = 0) AS was_inserted)
    SELECT count(*) FILTER (WHERE was_inserted), count(*) FILTER (WHERE NOT was_inserted) INTO inserted, updated FROM up;
    closed := 0;
    PERFORM etl.note_change('silver.fact_appointments', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_appointments_staging', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'silver.bridge_visit_appointments', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'silver.dim_studies', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'silver.dim_subjects', v_to, v_read);
END
$$;

-- -- fact_monitor_queries ------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS silver.fact_monitor_queries (
    query_key                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id                      varchar(255) NOT NULL UNIQUE,
    query_id                       bigint,
    study_source_id                varchar(255),
    monitor_source_id              varchar(255),
    requested_by_staff_source_id   varchar(255),
    query_status                   text,
    reason                         text,
    is_open                        boolean NOT NULL,
    created_at                     timestamptz,
    closed_at                      timestamptz,
    created_date                   date,
    closed_date                    date,
    created_date_key               integer,
    closed_date_key                integer,
    days_to_close                  integer,
    response_count                 integer,
    study_key                      bigint,
    monitor_key                    bigint,
    staff_key                      bigint,
    query_count                    smallint NOT NULL DEFAULT 1,
    etl_inserted_at                timestamptz NOT NULL DEFAULT now(),
    etl_updated_at                 timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS fact_monitor_queries_study_idx ON silver.fact_monitor_queries (study_source_id);
COMMENT ON TABLE silver.fact_monitor_queries IS
    'One row per monitor query (MonitorQueryPreviewModel, job 23). is_open = the status says it is considered '
    'open (isConsideredOpen), else no closedOn and a status other than Resolved/Waived/Cancelled; '
    'days_to_close = closed_date - created_date of a closed query. Age of an open query is relative to today: '
    'gold.v_query_aging.';

CREATE OR REPLACE PROCEDURE silver.load_fact_monitor_queries(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_fact_monitor_queries';
    v_to       timestamptz;
    v_from     timestamptz;
    v_from_dst timestamptz;
    v_read     bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.dim_queries_staging');
    v_from_dst := etl.transform_watermark(c_proc, 'silver.dim_studies');

    DROP TABLE IF EXISTS pg_temp._k_fact_monitor_queries;
    CREATE TEMP TABLE _k_fact_monitor_queries ON COMMIT DROP AS
    SELECT b.source_id FROM bronze.dim_queries_staging b WHERE b.updated_at >= v_from
    UNION
    SELECT f.source_id FROM silver.dim_studies d JOIN silver.fact_monitor_queries f ON f.study_source_id = d.source_id
     WHERE d.is_current AND d.etl_inserted_at >= v_from_dst AND f.study_key IS DISTINCT FROM d.study_key
    UNION
    SELECT f.source_id FROM silver.fact_monitor_queries f
     WHERE (f.study_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_studies d WHERE d.source_id = f.study_source_id AND d.is_current))
        OR (f.monitor_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_monitors d WHERE d.source_id = f.monitor_source_id))
        OR (f.staff_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_staff d WHERE d.source_id = f.requested_by_staff_source_id));
    GET DIAGNOSTICS v_read = ROW_COUNT;

    DROP TABLE IF EXISTS pg_temp._n_fact_monitor_queries;
    CREATE TEMP TABLE _n_fact_monitor_queries ON COMMIT DROP AS
    WITH q AS MATERIALIZED (
        SELECT b.source_id, etl.to_int(b.data->>'id') AS query_id,
               etl.study_ref(b.source_id, b.data, b.source_params) AS study_source_id,
               etl.ref_id(b.source_id, b.data->'assignedToMonitor'->>'id') AS monitor_source_id,
               etl.ref_id(b.source_id, b.data->'requestedByStaff'->>'id') AS requested_by_staff_source_id,
               coalesce(b.data->'status'->>'queryStatus', b.data->'status'->>'displayName') AS query_status,
               etl.to_bool(b.data->'status'->>'isConsideredOpen') AS considered_open,
               b.data->'reason'->>'name' AS reason,
               etl.to_ts(b.data->>'createdOn') AS created_at, etl.to_ts(b.data->>'closedOn') AS closed_at,
               etl.to_int(b.data->>'responseCount')::int AS response_count
          FROM bronze.dim_queries_staging b
          JOIN _k_fact_monitor_queries k ON k.source_id = b.source_id
         WHERE NOT b.is_deleted)
    SELECT q.source_id, q.query_id, q.study_source_id, q.monitor_source_id, q.requested_by_staff_source_id,
           q.query_status, q.reason,
           coalesce(q.considered_open,
                    q.closed_at IS NULL AND coalesce(q.query_status NOT IN ('Resolved', 'Waived', 'Cancelled'), true)) AS is_open,
           q.created_at, q.closed_at, (q.created_at AT TIME ZONE 'UTC')::date AS created_date,
           (q.closed_at AT TIME ZONE 'UTC')::date AS closed_date,
           etl.date_key((q.created_at AT TIME ZONE 'UTC')::date) AS created_date_key,
           etl.date_key((q.closed_at AT TIME ZONE 'UTC')::date) AS closed_date_key,
           (q.closed_at AT TIME ZONE 'UTC')::date - (q.created_at AT TIME ZONE 'UTC')::date AS days_to_close,
           q.response_count, st.study_key, mo.monitor_key, sf.staff_key
      FROM q
      LEFT JOIN silver.dim_studies st ON st.source_id = q.study_source_id AND st.is_current
      LEFT JOIN silver.dim_monitors mo ON mo.source_id = q.monitor_source_id
      LEFT JOIN silver.dim_staff sf ON sf.source_id = q.requested_by_staff_source_id;

    WITH del AS (
        DELETE FROM silver.fact_monitor_queries f USING _k_fact_monitor_queries k
         WHERE f.source_id = k.source_id
           AND NOT EXISTS (SELECT 1 FROM _n_fact_monitor_queries n WHERE n.source_id = f.source_id)
        RETURNING 1)
    SELECT count(*) INTO deleted FROM del;

    WITH up AS (
        INSERT INTO silver.fact_monitor_queries AS f
               (source_id, query_id, study_source_id, monitor_source_id, requested_by_staff_source_id, query_status,
                reason, is_open, created_at, closed_at, created_date, closed_date, created_date_key, closed_date_key,
                days_to_close, response_count, study_key, monitor_key, staff_key)
        SELECT source_id, query_id, study_source_id, monitor_source_id, requested_by_staff_source_id, query_status,
               reason, is_open, created_at, closed_at, created_date, closed_date, created_date_key, closed_date_key,
               days_to_close, response_count, study_key, monitor_key, staff_key
          FROM _n_fact_monitor_queries
        ON CONFLICT (source_id) DO UPDATE
           SET query_id = excluded.query_id, study_source_id = excluded.study_source_id,
               monitor_source_id = excluded.monitor_source_id,
               requested_by_staff_source_id = excluded.requested_by_staff_source_id,
               query_status = excluded.query_status, reason = excluded.reason, is_open = excluded.is_open,
               created_at = excluded.created_at, closed_at = excluded.closed_at, created_date = excluded.created_date,
               closed_date = excluded.closed_date, created_date_key = excluded.created_date_key,
               closed_date_key = excluded.closed_date_key, days_to_close = excluded.days_to_close,
               response_count = excluded.response_count, study_key = excluded.study_key,
               monitor_key = excluded.monitor_key, staff_key = excluded.staff_key, etl_updated_at = now()
         WHERE (f.query_id, f.study_source_id, f.monitor_source_id, f.requested_by_staff_source_id, f.query_status,
                f.reason, f.is_open, f.created_at, f.closed_at, f.response_count, f.study_key, f.monitor_key,
                f.staff_key)
               IS DISTINCT FROM
               (excluded.query_id, excluded.study_source_id, excluded.monitor_source_id,
                excluded.requested_by_staff_source_id, excluded.query_status, excluded.reason, excluded.is_open,
                excluded.created_at, excluded.closed_at, excluded.response_count, excluded.study_key,
                excluded.monitor_key, excluded.staff_key)
        RETURNING (xmax = 0) AS was_inserted)
    SELECT count(*) FILTER (WHERE was_inserted), count(*) FILTER (WHERE NOT was_inserted) INTO inserted, updated FROM up;
    closed := 0;
    PERFORM etl.note_change('silver.fact_monitor_queries', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_queries_staging', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'silver.dim_studies', v_to, v_read);
END
$$;

-- -- fact_study_milestones -----------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS silver.fact_study_milestones (
    milestone_key              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id                  varchar(255) NOT NULL UNIQUE,
    milestone_id               bigint,
    study_source_id            varchar(255),
    assigned_staff_source_id   varchar(255),
    milestone_name             text,
    category                   text,
    importance                 text,
    milestone_status           text,
    projected_date             date,
    completed_date             date,
    assigned_date              date,
    projected_date_key         integer,
    completed_date_key         integer,
    is_completed               boolean NOT NULL,
    slip_days                  integer,            -- completed - projected (negative = early)
    study_key                  bigint,
    staff_key                  bigint,
    milestone_count            smallint NOT NULL DEFAULT 1,
    etl_inserted_at            timestamptz NOT NULL DEFAULT now(),
    etl_updated_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS fact_study_milestones_study_idx ON silver.fact_study_milestones (study_source_id);
COMMENT ON TABLE silver.fact_study_milestones IS
    'One row per study milestone (StudyMilestoneViewModel, job 28): projected vs completed. is_completed = a '
    'completedOn date (or status Completed); slip_days = completed_date - projected_date. Overdue (projected in '
    'the past, not completed) is relative to today: gold.v_milestone_slippage.';

CREATE OR REPLACE PROCEDURE silver.load_fact_study_milestones(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_fact_study_milestones';
    v_to       timestamptz;
    v_from     timestamptz;
    v_from_dst timestamptz;
    v_read     bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.fact_study_milestones_staging');
    v_from_dst := etl.transform_watermark(c_proc, 'silver.dim_studies');

    DROP TABLE IF EXISTS pg_temp._k_fact_study_milestones;
    CREATE TEMP TABLE _k_fact_study_milestones ON COMMIT DROP AS
    SELECT b.source_id FROM bronze.fact_study_milestones_staging b WHERE b.updated_at >= v_from
    UNION
    SELECT f.source_id FROM silver.dim_studies d JOIN silver.fact_study_milestones f ON f.study_source_id = d.source_id
     WHERE d.is_current AND d.etl_inserted_at >= v_from_dst AND f.study_key IS DISTINCT FROM d.study_key
    UNION
    SELECT f.source_id FROM silver.fact_study_milestones f
     WHERE (f.study_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_studies d WHERE d.source_id = f.study_source_id AND d.is_current))
        OR (f.staff_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_staff d WHERE d.source_id = f.assigned_staff_source_id));
    GET DIAGNOSTICS v_read = ROW_COUNT;

    DROP TABLE IF EXISTS pg_temp._n_fact_study_milestones;
    CREATE TEMP TABLE _n_fact_study_milestones ON COMMIT DROP AS
    WITH m AS MATERIALIZED (
        SELECT b.source_id, etl.to_int(b.data->>'id') AS milestone_id,
               etl.study_ref(b.source_id, b.data, b.source_params) AS study_source_id,
               etl.ref_id(b.source_id, b.data->'assignedTo'->>'id') AS assigned_staff_source_id,
               b.data->>'name' AS milestone_name, b.data->>'category' AS category, b.data->>'importance' AS importance,
               b.data->>'status' AS milestone_status,
               etl.to_date(coalesce(b.data->>'projectedDate', b.data->'scheduling'->>'dueDate')) AS projected_date,
               etl.to_date(b.data->>'completedOn') AS completed_date, etl.to_date(b.data->>'assignedOn') AS assigned_date
          FROM bronze.fact_study_milestones_staging b
          JOIN _k_fact_study_milestones k ON k.source_id = b.source_id
         WHERE NOT b.is_deleted)
    SELECT m.*, etl.date_key(m.projected_date) AS projected_date_key, etl.date_key(m.completed_date) AS completed_date_key,
           (m.completed_date IS NOT NULL OR coalesce(m.milestone_status = 'Completed', false)) AS is_completed,
           (m.completed_date - m.projected_date) AS slip_days, st.study_key, sf.staff_key
      FROM m
      LEFT JOIN silver.dim_studies st ON st.source_id = m.study_source_id AND st.is_current
      LEFT JOIN silver.dim_staff sf ON sf.source_id = m.assigned_staff_source_id;

    WITH del AS (
        DELETE FROM silver.fact_study_milestones f USING _k_fact_study_milestones k
         WHERE f.source_id = k.source_id
           AND NOT EXISTS (SELECT 1 FROM _n_fact_study_milestones n WHERE n.source_id = f.source_id)
        RETURNING 1)
    SELECT count(*) INTO deleted FROM del;

    WITH up AS (
        INSERT INTO silver.fact_study_milestones AS f
               (source_id, milestone_id, study_source_id, assigned_staff_source_id, milestone_name, category,
                importance, milestone_status, projected_date, completed_date, assigned_date, projected_date_key,
                completed_date_key, is_completed, slip_days, study_key, staff_key)
        SELECT source_id, milestone_id, study_source_id, assigned_staff_source_id, milestone_name, category,
               importance, milestone_status, projected_date, completed_date, assigned_date, projected_date_key,
               completed_date_key, is_completed, slip_days, study_key, staff_key
          FROM _n_fact_study_milestones
        ON CONFLICT (source_id) DO UPDATE
           SET milestone_id = excluded.milestone_id, study_source_id = excluded.study_source_id,
               assigned_staff_source_id = excluded.assigned_staff_source_id, milestone_name = excluded.milestone_name,
               category = excluded.category, importance = excluded.importance,
               milestone_status = excluded.milestone_status, projected_date = excluded.projected_date,
               completed_date = excluded.completed_date, assigned_date = excluded.assigned_date,
               projected_date_key = excluded.projected_date_key, completed_date_key = excluded.completed_date_key,
               is_completed = excluded.is_completed, slip_days = excluded.slip_days, study_key = excluded.study_key,
               staff_key = excluded.staff_key, etl_updated_at = now()
         WHERE (f.milestone_id, f.study_source_id, f.assigned_staff_source_id, f.milestone_name, f.category,
                f.importance, f.milestone_status, f.projected_date, f.completed_date, f.assigned_date, f.is_completed,
                f.study_key, f.staff_key)
               IS DISTINCT FROM
               (excluded.milestone_id, excluded.study_source_id, excluded.assigned_staff_source_id,
                excluded.milestone_name, excluded.category, excluded.importance, excluded.milestone_status,
                excluded.projected_date, excluded.completed_date, excluded.assigned_date, excluded.is_completed,
                excluded.study_key, excluded.staff_key)
        RETURNING (xmax = 0) AS was_inserted)
    SELECT count(*) FILTER (WHERE was_inserted), count(*) FILTER (WHERE NOT was_inserted) INTO inserted, updated FROM up;
    closed := 0;
    PERFORM etl.note_change('silver.fact_study_milestones', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.fact_study_milestones_staging', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'silver.dim_studies', v_to, v_read);
END
$$;

-- -- fact_patient_payments -----------------------------------------------------------------------
-- Jobs 161 (per patient visit: its stipends) and 176 (patient payments) both return
-- PatientPaymentViewModel records; one row per payment source_id (a payment served by both: the most
-- recently loaded row wins, tombstone included).
ALTER TABLE bronze.dim_patient_visit_stipends_staging ADD COLUMN IF NOT EXISTS source_params jsonb;

CREATE TABLE IF NOT EXISTS silver.fact_patient_payments (
    payment_key               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id                 varchar(255) NOT NULL UNIQUE,
    payment_id                bigint,
    payment_source            text NOT NULL,          -- visit_stipend (job 161) | patient_payment (job 176)
    stipend_type              text,
    payment_method            text,
    subject_status_at_payment text,
    amount                    numeric(14, 2),
    paid_at                   timestamptz,
    paid_date                 date,
    paid_date_key             integer,
    patient_visit_source_id   varchar(255),
    subject_source_id         varchar(255),
    study_source_id           varchar(255),
    site_source_id            varchar(255),
    patient_ref               char(64),
    subject_key               bigint,
    study_key                 bigint,
    site_key                  bigint,
    patient_key               bigint,
    payment_count             smallint NOT NULL DEFAULT 1,
    etl_inserted_at           timestamptz NOT NULL DEFAULT now(),
    etl_updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS fact_patient_payments_study_idx ON silver.fact_patient_payments (study_source_id, paid_date);
CREATE INDEX IF NOT EXISTS fact_patient_payments_subject_idx ON silver.fact_patient_payments (subject_source_id);
COMMENT ON TABLE silver.fact_patient_payments IS
    'One row per payment to a study subject (PatientPaymentViewModel): visit stipends (job 161) and patient '
    'payments (job 176). subject = patientStudyId; study, site and patient = that subject''s (current version); '
    'paid_at = paymentOn.';

CREATE OR REPLACE PROCEDURE silver.load_fact_patient_payments(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_fact_patient_payments';
    v_to       timestamptz;
    v_from_a   timestamptz;
    v_from_b   timestamptz;
    v_from_dst timestamptz;
    v_from_dsj timestamptz;
    v_read     bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from_a := etl.transform_watermark(c_proc, 'bronze.dim_patient_visit_stipends_staging');
    v_from_b := etl.transform_watermark(c_proc, 'bronze.dim_patient_payments_staging');
    v_from_dst := etl.transform_watermark(c_proc, 'silver.dim_studies');
    v_from_dsj := etl.transform_watermark(c_proc, 'silver.dim_subjects');

    DROP TABLE IF EXISTS pg_temp._k_fact_patient_payments;
    CREATE TEMP TABLE _k_fact_patient_payments ON COMMIT DROP AS
    SELECT b.source_id FROM bronze.dim_patient_visit_stipends_staging b WHERE b.updated_at >= v_from_a
    UNION
    SELECT b.source_id FROM bronze.dim_patient_payments_staging b WHERE b.updated_at >= v_from_b
    UNION
    SELECT f.source_id FROM silver.dim_studies d JOIN silver.fact_patient_payments f ON f.study_source_id = d.source_id
     WHERE d.is_current AND d.etl_inserted_at >= v_from_dst AND f.study_key IS DISTINCT FROM d.study_key
    UNION
    -- a subject's new version re-points its payments and may move them to another study or site
    SELECT f.source_id FROM silver.dim_subjects d JOIN silver.fact_patient_payments f ON f.subject_source_id = d.source_id
     WHERE d.is_current AND d.etl_inserted_at >= v_from_dsj
    UNION
    SELECT f.source_id FROM silver.fact_patient_payments f
     WHERE (f.subject_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_subjects d WHERE d.source_id = f.subject_source_id AND d.is_current))
        OR (f.study_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_studies d WHERE d.source_id = f.study_source_id AND d.is_current))
        OR (f.site_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_sites d WHERE d.source_id = f.site_source_id))
        OR (f.patient_key IS NULL AND EXISTS (SELECT 1 FROM silver.dim_patients d WHERE d.patient_ref = f.patient_ref));
    GET DIAGNOSTICS v_read = ROW_COUNT;
    ANALYZE pg_temp._k_fact_patient_payments;

    DROP TABLE IF EXISTS pg_temp._n_fact_patient_payments;
    CREATE TEMP TABLE _n_fact_patient_payments ON COMMIT DROP AS
    WITH raw AS (
        SELECT b.source_id, b.data, b.is_deleted, b.updated_at, 'visit_stipend' AS payment_source
          FROM bronze.dim_patient_visit_stipends_staging b JOIN _k_fact_patient_payments k ON k.source_id = b.source_id
        UNION ALL
        SELECT b.source_id, b.data, b.is_deleted, b.updated_at, 'patient_payment'
          FROM bronze.dim_patient_payments_staging b JOIN _k_fact_patient_payments k ON k.source_id = b.source_id),
    latest AS (
        SELECT DISTINCT ON (r.source_id) r.* FROM raw r ORDER BY r.source_id, r.updated_at DESC, r.is_deleted DESC),
    p AS MATERIALIZED (
        SELECT l.source_id, l.payment_source, etl.to_int(l.data->>'id') AS payment_id,
               l.data->>'stipendType' AS stipend_type, l.data->>'paymentMethod' AS payment_method,
               l.data->>'patientStudyStatus' AS subject_status_at_payment,
               round(etl.to_num(l.data->>'amount'), 2) AS amount, etl.to_ts(l.data->>'paymentOn') AS paid_at,
               etl.ref_id(l.source_id, l.data->>'patientVisitId') AS patient_visit_source_id,
               etl.ref_id(l.source_id, l.data->>'patientStudyId') AS subject_source_id
          FROM latest l
         WHERE NOT l.is_deleted)
    SELECT p.*, (p.paid_at AT TIME ZONE 'UTC')::date AS paid_date,
           etl.date_key((p.paid_at AT TIME ZONE 'UTC')::date) AS paid_date_key,
           ds.study_source_id, ds.site_source_id, ds.patient_ref,
           ds.subject_key, st.study_key, si.site_key, pa.patient_key
      FROM p
      LEFT JOIN silver.dim_subjects ds ON ds.source_id = p.subject_source_id AND ds.is_current
      LEFT JOIN silver.dim_studies st ON st.source_id = ds.study_source_id AND st.is_current
      LEFT JOIN silver.dim_sites si ON si.source_id = ds.site_source_id
      LEFT JOIN silver.dim_patients pa ON pa.patient_ref = ds.patient_ref;

    WITH del AS (
        DELETE FROM silver.fact_patient_payments f USING _k_fact_patient_payments k
         WHERE f.source_id = k.source_id
           AND NOT EXISTS (SELECT 1 FROM _n_fact_patient_payments n WHERE n.source_id = f.source_id)
        RETURNING 1)
    SELECT count(*) INTO deleted FROM del;

    WITH up AS (
        INSERT INTO silver.fact_patient_payments AS f
               (source_id, payment_id, payment_source, stipend_type, payment_method, subject_status_at_payment, amount,
                paid_at, paid_date, paid_date_key, patient_visit_source_id, subject_source_id, study_source_id,
                site_source_id, patient_ref, subject_key, study_key, site_key, patient_key)
        SELECT source_id, payment_id, payment_source, stipend_type, payment_method, subject_status_at_payment, amount,
               paid_at, paid_date, paid_date_key, patient_visit_source_id, subject_source_id, study_source_id,
               site_source_id, patient_ref, subject_key, study_key, site_key, patient_key
          FROM _n_fact_patient_payments
        ON CONFLICT (source_id) DO UPDATE
           SET payment_id = excluded.payment_id, payment_source = excluded.payment_source,
               stipend_type = excluded.stipend_type, payment_method = excluded.payment_method,
               subject_status_at_payment = excluded.subject_status_at_payment, amount = excluded.amount,
               paid_at = excluded.paid_at, paid_date = excluded.paid_date, paid_date_key = excluded.paid_date_key,
               patient_visit_source_id = excluded.patient_visit_source_id,
               subject_source_id = excluded.subject_source_id, study_source_id = excluded.study_source_id,
               site_source_id = excluded.site_source_id, patient_ref = excluded.patient_ref,
               subject_key = excluded.subject_key, study_key = excluded.study_key, site_key = excluded.site_key,
               patient_key = excluded.patient_key, etl_updated_at = now()
         WHERE (f.payment_id, f.payment_source, f.stipend_type, f.payment_method, f.subject_status_at_payment,
                f.amount, f.paid_at, f.patient_visit_source_id, f.subject_source_id, f.study_source_id,
                f.site_source_id, f.patient_ref, f.subject_key, f.study_key, f.site_key, f.patient_key)
               IS DISTINCT FROM
               (excluded.payment_id, excluded.payment_source, excluded.stipend_type, excluded.payment_method,
                excluded.subject_status_at_payment, excluded.amount, excluded.paid_at,
                excluded.patient_visit_source_id, excluded.subject_source_id, excluded.study_source_id,
                excluded.site_source_id, excluded.patient_ref, excluded.subject_key, excluded.study_key,
                excluded.site_key, excluded.patient_key)
        RETURNING (xmax = 0) AS was_inserted)
    SELECT count(*) FILTER (WHERE was_inserted), count(*) FILTER (WHERE NOT was_inserted) INTO inserted, updated FROM up;
    closed := 0;
    PERFORM etl.note_change('silver.fact_patient_payments', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_patient_visit_stipends_staging', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_patient_payments_staging', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'silver.dim_studies', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'silver.dim_subjects', v_to, v_read);
END
$$;

-- the redefined facts recompute every row at their next run
SELECT etl.reset_transform_watermarks('silver.load_fact_enrollment');
SELECT etl.reset_transform_watermarks('silver.load_fact_visit_timelines');

GRANT SELECT ON silver.fact_appointments, silver.fact_monitor_queries, silver.fact_study_milestones,
                silver.fact_patient_payments, silver.bridge_visit_appointments TO trialsync_analytics;
