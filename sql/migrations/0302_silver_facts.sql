-- Silver facts (issue 6): fact_enrollment (one row per subject enrollment), fact_visit_timelines
-- (one row per patient visit: due window vs actual), fact_element_completions (one row per completed
-- visit element), fact_study_performance (study x day), each with its load procedure.
--
-- Keys: every fact carries the surrogate keys of the *current* version of its dimensions plus the
-- durable source ids it was resolved from. When a study or subject opens a new version, the next
-- run re-points the facts that reference it (history stays in the dimension; facts answer "as is"),
-- so Silver is a function of Bronze and the dimension history, never of when a fact happened to be
-- loaded. A fact whose dimension has not arrived yet gets a NULL key; every later run re-resolves
-- exactly those rows whose dimension now exists (late-arriving dimensions), so the NULL heals
-- without a Bronze change.
-- Soft-deleted or vanished source records delete their fact row. Date keys reference dim_date
-- (yyyymmdd); an unknown date is NULL.
--
-- fact_study_performance is rebuilt incrementally from a queue of (study, day) pairs that the other
-- fact procedures fill with the old and new days of every fact row they change
-- (etl.dw_transform_dirty_study_days), so a change recomputes only the days it touched.

-- Parent parameters of parameterized jobs (the ts-params header: {"patientVisitId": 7, ...}) are kept
-- by the loader in bronze.<table>.source_params (migration 0200 adds the column to every Bronze
-- table). Child records often do not repeat their parent's id -- a patient visit element names no
-- patient visit -- so the facts read it from there. Added here too (IF NOT EXISTS, same type) so
-- the transform migrations do not depend on the loader's being applied first.
ALTER TABLE bronze.dim_subjects_staging ADD COLUMN IF NOT EXISTS source_params jsonb;
ALTER TABLE bronze.dim_patient_visits_staging ADD COLUMN IF NOT EXISTS source_params jsonb;
ALTER TABLE bronze.dim_patient_visit_elements_staging ADD COLUMN IF NOT EXISTS source_params jsonb;
ALTER TABLE bronze.dim_visit_elements_staging ADD COLUMN IF NOT EXISTS source_params jsonb;

-- A plain heap, no unique key: queueing is an append (a full build queues every day of every study),
-- duplicates are folded when fact_study_performance takes the queue.
CREATE TABLE IF NOT EXISTS etl.dw_transform_dirty_study_days (
    study_source_id  varchar(255) NOT NULL,
    date_key         integer      NOT NULL,
    queued_at        timestamptz  NOT NULL DEFAULT now()
);

-- -- fact_enrollment -----------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS silver.fact_enrollment (
    enrollment_key                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id                        varchar(255) NOT NULL UNIQUE,   -- the subject's source_id
    subject_key                      bigint,
    study_key                        bigint,
    site_key                         bigint,
    patient_key                      bigint,
    study_source_id                  varchar(255),
    site_source_id                   varchar(255),
    patient_ref                      char(64),
    subject_status                   text,
    screening_date                   date,
    enrollment_date                  date,
    randomization_date               date,
    screen_failure_date              date,
    dropped_date                     date,
    completion_date                  date,
    screening_date_key               integer,
    enrollment_date_key              integer,
    randomization_date_key           integer,
    screen_failure_date_key          integer,
    dropped_date_key                 integer,
    completion_date_key              integer,
    is_screened                      boolean NOT NULL,
    is_enrolled                      boolean NOT NULL,
    is_randomized                    boolean NOT NULL,
    is_screen_failed                 boolean NOT NULL,
    is_dropped                       boolean NOT NULL,
    is_completed                     boolean NOT NULL,
    days_screening_to_enrollment     integer,
    days_screening_to_randomization  integer,
    status_event_count               integer NOT NULL DEFAULT 0,
    enrollment_count                 smallint NOT NULL DEFAULT 1,
    etl_inserted_at                  timestamptz NOT NULL DEFAULT now(),
    etl_updated_at                   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS fact_enrollment_study_idx ON silver.fact_enrollment (study_source_id);
CREATE INDEX IF NOT EXISTS fact_enrollment_unresolved_idx ON silver.fact_enrollment (enrollment_key)
    WHERE subject_key IS NULL OR study_key IS NULL OR site_key IS NULL OR patient_key IS NULL;
COMMENT ON TABLE silver.fact_enrollment IS
    'One row per subject enrollment (a patient in a study): status milestones from the subject and its '
    'status history (dim_subject_statuses_staging). Flags: is_screened = any status beyond '
    'Prescreened/NonQualified or a Screened event; is_enrolled = enrollmentDate set or status Randomized/'
    'RunIn/FollowUp/Completed; is_randomized = a Randomized event or status; is_screen_failed = status or '
    'event ScreenFailed; is_dropped / is_completed = current status.';

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

    -- subjects to (re)compute: changed subjects, subjects with changed status events, facts whose
    -- study or subject opened a new version, and rows whose missing dimension key can now be resolved
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
               etl.to_date(b.data->>'enrollmentDate') AS enrollment_date
          FROM bronze.dim_subjects_staging b
          JOIN _k_fact_enrollment k ON k.source_id = b.source_id
         WHERE NOT b.is_deleted),
    ev AS (
        SELECT etl.ref_id(st.source_id, coalesce(st.data->'subject'->>'Id', st.data->'subject'->>'id')) AS subject_source_id,
               st.data->>'status' AS status, etl.to_date(st.data->>'eventDate') AS event_date
          FROM bronze.dim_subject_statuses_staging st
         WHERE NOT st.is_deleted),
    evs AS (
        SELECT ev.subject_source_id,
               min(ev.event_date) FILTER (WHERE ev.status = 'Screened')     AS screening_date,
               min(ev.event_date) FILTER (WHERE ev.status = 'Randomized')   AS randomization_date,
               min(ev.event_date) FILTER (WHERE ev.status = 'ScreenFailed') AS screen_failure_date,
               max(ev.event_date) FILTER (WHERE ev.status = 'Dropped')      AS dropped_date,
               max(ev.event_date) FILTER (WHERE ev.status = 'Completed')    AS completion_date,
               count(*)::int AS status_event_count
          FROM ev
          JOIN _k_fact_enrollment k ON k.source_id = ev.subject_source_id
         GROUP BY ev.subject_source_id)
    SELECT s.source_id, ds.subject_key, st.study_key, si.site_key, pa.patient_key,
           s.study_source_id, s.site_source_id, s.patient_ref, s.subject_status,
           e.screening_date, s.enrollment_date, e.randomization_date, e.screen_failure_date, e.dropped_date,
           e.completion_date,
           etl.date_key(e.screening_date) AS screening_date_key, etl.date_key(s.enrollment_date) AS enrollment_date_key,
           etl.date_key(e.randomization_date) AS randomization_date_key,
           etl.date_key(e.screen_failure_date) AS screen_failure_date_key,
           etl.date_key(e.dropped_date) AS dropped_date_key, etl.date_key(e.completion_date) AS completion_date_key,
           (e.screening_date IS NOT NULL
               OR coalesce(s.subject_status NOT IN ('Prescreened', 'NonQualified'), false)) AS is_screened,
           (s.enrollment_date IS NOT NULL
               OR coalesce(s.subject_status IN ('Randomized', 'RunIn', 'FollowUp', 'Completed'), false)) AS is_enrolled,
           (e.randomization_date IS NOT NULL OR coalesce(s.subject_status = 'Randomized', false)) AS is_randomized,
           (e.screen_failure_date IS NOT NULL OR coalesce(s.subject_status = 'ScreenFailed', false)) AS is_screen_failed,
           coalesce(s.subject_status = 'Dropped', false) AS is_dropped,
           coalesce(s.subject_status = 'Completed', false) AS is_completed,
           (s.enrollment_date - e.screening_date) AS days_screening_to_enrollment,
           (e.randomization_date - e.screening_date) AS days_screening_to_randomization,
           coalesce(e.status_event_count, 0) AS status_event_count
      FROM subj s
      LEFT JOIN evs e ON e.subject_source_id = s.source_id
      LEFT JOIN silver.dim_subjects ds ON ds.source_id = s.source_id AND ds.is_current
      LEFT JOIN silver.dim_studies st ON st.source_id = s.study_source_id AND st.is_current
      LEFT JOIN silver.dim_sites si ON si.source_id = s.site_source_id
      LEFT JOIN silver.dim_patients pa ON pa.patient_ref = s.patient_ref;

    -- facts whose subject was deleted (or never existed): remove, and queue their days
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
                patient_ref, subject_status, screening_date, enrollment_date, randomization_date,
                screen_failure_date, dropped_date, completion_date, screening_date_key, enrollment_date_key,
                randomization_date_key, screen_failure_date_key, dropped_date_key, completion_date_key,
                is_screened, is_enrolled, is_randomized, is_screen_failed, is_dropped, is_completed,
                days_screening_to_enrollment, days_screening_to_randomization, status_event_count)
        SELECT source_id, subject_key, study_key, site_key, patient_key, study_source_id, site_source_id,
               patient_ref, subject_status, screening_date, enrollment_date, randomization_date,
               screen_failure_date, dropped_date, completion_date, screening_date_key, enrollment_date_key,
               randomization_date_key, screen_failure_date_key, dropped_date_key, completion_date_key,
               is_screened, is_enrolled, is_randomized, is_screen_failed, is_dropped, is_completed,
               days_screening_to_enrollment, days_screening_to_randomization, status_event_count
          FROM _n_fact_enrollment
        ON CONFLICT (source_id) DO UPDATE
           SET subject_key = excluded.subject_key, study_key = excluded.study_key, site_key = excluded.site_key,
               patient_key = excluded.patient_key, study_source_id = excluded.study_source_id,
               site_source_id = excluded.site_source_id, patient_ref = excluded.patient_ref,
               subject_status = excluded.subject_status, screening_date = excluded.screening_date,
               enrollment_date = excluded.enrollment_date, randomization_date = excluded.randomization_date,
               screen_failure_date = excluded.screen_failure_date, dropped_date = excluded.dropped_date,
               completion_date = excluded.completion_date, screening_date_key = excluded.screening_date_key,
               enrollment_date_key = excluded.enrollment_date_key,
               randomization_date_key = excluded.randomization_date_key,
               screen_failure_date_key = excluded.screen_failure_date_key,
               dropped_date_key = excluded.dropped_date_key, completion_date_key = excluded.completion_date_key,
               is_screened = excluded.is_screened, is_enrolled = excluded.is_enrolled,
               is_randomized = excluded.is_randomized, is_screen_failed = excluded.is_screen_failed,
               is_dropped = excluded.is_dropped, is_completed = excluded.is_completed,
               days_screening_to_enrollment = excluded.days_screening_to_enrollment,
               days_screening_to_randomization = excluded.days_screening_to_randomization,
               status_event_count = excluded.status_event_count, etl_updated_at = now()
         WHERE (f.subject_key, f.study_key, f.site_key, f.patient_key, f.study_source_id, f.site_source_id,
                f.patient_ref, f.subject_status, f.screening_date, f.enrollment_date, f.randomization_date,
                f.screen_failure_date, f.dropped_date, f.completion_date, f.is_screened, f.is_enrolled,
                f.is_randomized, f.is_screen_failed, f.is_dropped, f.is_completed, f.status_event_count)
               IS DISTINCT FROM
               (excluded.subject_key, excluded.study_key, excluded.site_key, excluded.patient_key,
                excluded.study_source_id, excluded.site_source_id, excluded.patient_ref, excluded.subject_status,
                excluded.screening_date, excluded.enrollment_date, excluded.randomization_date,
                excluded.screen_failure_date, excluded.dropped_date, excluded.completion_date,
                excluded.is_screened, excluded.is_enrolled, excluded.is_randomized, excluded.is_screen_failed,
                excluded.is_dropped, excluded.is_completed, excluded.status_event_count)
        RETURNING f.source_id, (xmax = 0) AS was_inserted, f.study_source_id, f.screening_date_key,
                  f.enrollment_date_key, f.randomization_date_key, f.screen_failure_date_key, f.dropped_date_key,
                  f.completion_date_key),
    old AS (  -- same snapshot as `up`: the values before this statement
        SELECT o.source_id, o.study_source_id, o.screening_date_key, o.enrollment_date_key,
               o.randomization_date_key, o.screen_failure_date_key, o.dropped_date_key, o.completion_date_key
          FROM silver.fact_enrollment o JOIN up ON up.source_id = o.source_id),
    moved AS (  -- rows whose study or days changed (a re-pointed key alone moves no day)
        SELECT u.*, o.source_id IS NULL AS is_new
          FROM up u LEFT JOIN old o ON o.source_id = u.source_id
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

-- -- fact_visit_timelines ------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS silver.fact_visit_timelines (
    visit_timeline_key      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id               varchar(255) NOT NULL UNIQUE,     -- the patient visit's source_id
    patient_visit_id        bigint,
    visit_id                bigint,                           -- the study's visit definition
    visit_name              text,
    cycle_name              text,
    visit_sequence          integer,
    visit_status            text,
    is_mandatory            boolean,
    subject_key             bigint,
    study_key               bigint,
    site_key                bigint,
    patient_key             bigint,
    subject_source_id       varchar(255),
    study_source_id         varchar(255),
    target_due_date         date,
    min_due_date            date,
    max_due_date            date,
    actual_date             date,
    target_due_date_key     integer,
    min_due_date_key        integer,
    max_due_date_key        integer,
    actual_date_key         integer,
    window_days             integer,                          -- max_due - min_due
    days_from_target        integer,                          -- actual - target (negative = early)
    is_completed            boolean NOT NULL,
    is_within_window        boolean,                          -- NULL while not completed
    appointment_count       integer NOT NULL DEFAULT 0,
    visit_count             smallint NOT NULL DEFAULT 1,
    etl_inserted_at         timestamptz NOT NULL DEFAULT now(),
    etl_updated_at          timestamptz NOT NULL DEFAULT now()
);
-- (study, day) lookups of load_fact_study_performance: due day and actual day
CREATE INDEX IF NOT EXISTS fact_visit_timelines_study_due_idx ON silver.fact_visit_timelines (study_source_id, target_due_date_key);
CREATE INDEX IF NOT EXISTS fact_visit_timelines_study_actual_idx ON silver.fact_visit_timelines (study_source_id, actual_date_key);
CREATE INDEX IF NOT EXISTS fact_visit_timelines_subject_idx ON silver.fact_visit_timelines (subject_source_id);
CREATE INDEX IF NOT EXISTS fact_visit_timelines_updated_idx ON silver.fact_visit_timelines (etl_updated_at);
CREATE INDEX IF NOT EXISTS fact_visit_timelines_unresolved_idx ON silver.fact_visit_timelines (visit_timeline_key)
    WHERE subject_key IS NULL OR study_key IS NULL OR site_key IS NULL OR patient_key IS NULL;
COMMENT ON TABLE silver.fact_visit_timelines IS
    'One row per patient visit: protocol due window (min/target/max) against the actual visit date. '
    'actual_date = the visit''s own completion/visit date when the source has one, else the first '
    'appointment''s scheduled start for a completed visit.';

CREATE OR REPLACE PROCEDURE silver.load_fact_visit_timelines(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_fact_visit_timelines';
    v_to   timestamptz;
    v_from timestamptz;
    v_from_dst timestamptz;
    v_from_dsj timestamptz;
    v_read bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.dim_patient_visits_staging');
    v_from_dst := etl.transform_watermark(c_proc, 'silver.dim_studies');
    v_from_dsj := etl.transform_watermark(c_proc, 'silver.dim_subjects');

    -- jobs 9 (/patient-visits/odata) and 160 (per subject) both land in one Bronze table, one row per
    -- visit; plus visits whose study or subject opened a new version, and unresolved keys now resolvable
    DROP TABLE IF EXISTS pg_temp._k_fact_visit_timelines;
    CREATE TEMP TABLE _k_fact_visit_timelines ON COMMIT DROP AS
    SELECT b.source_id FROM bronze.dim_patient_visits_staging b WHERE b.updated_at >= v_from
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
               coalesce(etl.to_date(coalesce(b.data->>'visitDate', b.data->>'actualDate', b.data->>'completedDate',
                                             b.data->>'completionDate', b.data->>'completedOn')),
                        CASE WHEN b.data->>'status' = 'Completed' AND jsonb_typeof(b.data->'appointments') = 'array'
                             THEN (SELECT min(etl.to_date(a->>'scheduledStart'))
                                     FROM jsonb_array_elements(b.data->'appointments') a) END) AS actual_date,
               CASE WHEN jsonb_typeof(b.data->'appointments') = 'array'
                    THEN jsonb_array_length(b.data->'appointments') ELSE 0 END AS appointment_count
          FROM bronze.dim_patient_visits_staging b
          JOIN _k_fact_visit_timelines k ON k.source_id = b.source_id
         WHERE NOT b.is_deleted)
    SELECT v.source_id, v.patient_visit_id, v.visit_id, v.visit_name, v.cycle_name, v.visit_sequence,
           v.visit_status, v.is_mandatory,
           ds.subject_key, st.study_key, si.site_key, pa.patient_key,
           v.subject_source_id, coalesce(v.study_ref, ds.study_source_id) AS study_source_id,
           v.target_due_date, v.min_due_date, v.max_due_date, v.actual_date,
           etl.date_key(v.target_due_date) AS target_due_date_key, etl.date_key(v.min_due_date) AS min_due_date_key,
           etl.date_key(v.max_due_date) AS max_due_date_key, etl.date_key(v.actual_date) AS actual_date_key,
           (v.max_due_date - v.min_due_date) AS window_days,
           (v.actual_date - v.target_due_date) AS days_from_target,
           coalesce(v.visit_status = 'Completed', false) AS is_completed,
           CASE WHEN v.visit_status = 'Completed' AND v.actual_date IS NOT NULL
                THEN v.actual_date BETWEEN coalesce(v.min_due_date, v.target_due_date)
                                       AND coalesce(v.max_due_date, v.target_due_date) END AS is_within_window,
           v.appointment_count
      FROM v
      LEFT JOIN silver.dim_subjects ds ON ds.source_id = v.subject_source_id AND ds.is_current
      LEFT JOIN silver.dim_studies st ON st.source_id = coalesce(v.study_ref, ds.study_source_id) AND st.is_current
      LEFT JOIN silver.dim_sites si ON si.source_id = ds.site_source_id
      LEFT JOIN silver.dim_patients pa ON pa.patient_ref = ds.patient_ref;

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
                target_due_date, min_due_date, max_due_date, actual_date, target_due_date_key, min_due_date_key,
                max_due_date_key, actual_date_key, window_days, days_from_target, is_completed, is_within_window,
                appointment_count)
        SELECT source_id, patient_visit_id, visit_id, visit_name, cycle_name, visit_sequence, visit_status,
               is_mandatory, subject_key, study_key, site_key, patient_key, subject_source_id, study_source_id,
               target_due_date, min_due_date, max_due_date, actual_date, target_due_date_key, min_due_date_key,
               max_due_date_key, actual_date_key, window_days, days_from_target, is_completed, is_within_window,
               appointment_count
          FROM _n_fact_visit_timelines
        ON CONFLICT (source_id) DO UPDATE
           SET patient_visit_id = excluded.patient_visit_id, visit_id = excluded.visit_id,
               visit_name = excluded.visit_name, cycle_name = excluded.cycle_name,
               visit_sequence = excluded.visit_sequence, visit_status = excluded.visit_status,
               is_mandatory = excluded.is_mandatory, subject_key = excluded.subject_key,
               study_key = excluded.study_key, site_key = excluded.site_key, patient_key = excluded.patient_key,
               subject_source_id = excluded.subject_source_id, study_source_id = excluded.study_source_id,
               target_due_date = excluded.target_due_date, min_due_date = excluded.min_due_date,
               max_due_date = excluded.max_due_date, actual_date = excluded.actual_date,
               target_due_date_key = excluded.target_due_date_key, min_due_date_key = excluded.min_due_date_key,
               max_due_date_key = excluded.max_due_date_key, actual_date_key = excluded.actual_date_key,
               window_days = excluded.window_days, days_from_target = excluded.days_from_target,
               is_completed = excluded.is_completed, is_within_window = excluded.is_within_window,
               appointment_count = excluded.appointment_count, etl_updated_at = now()
         WHERE (f.patient_visit_id, f.visit_id, f.visit_name, f.cycle_name, f.visit_sequence, f.visit_status,
                f.is_mandatory, f.subject_key, f.study_key, f.site_key, f.patient_key, f.subject_source_id,
                f.study_source_id, f.target_due_date, f.min_due_date, f.max_due_date, f.actual_date,
                f.is_completed, f.is_within_window, f.appointment_count)
               IS DISTINCT FROM
               (excluded.patient_visit_id, excluded.visit_id, excluded.visit_name, excluded.cycle_name,
                excluded.visit_sequence, excluded.visit_status, excluded.is_mandatory, excluded.subject_key,
                excluded.study_key, excluded.site_key, excluded.patient_key, excluded.subject_source_id,
                excluded.study_source_id, excluded.target_due_date, excluded.min_due_date, excluded.max_due_date,
                excluded.actual_date, excluded.is_completed, excluded.is_within_window, excluded.appointment_count)
        RETURNING f.source_id, (xmax = 0) AS was_inserted, f.study_source_id, f.target_due_date_key,
                  f.actual_date_key, f.is_completed, f.is_within_window),
    old AS (
        SELECT o.source_id, o.study_source_id, o.target_due_date_key, o.actual_date_key, o.is_completed,
               o.is_within_window
          FROM silver.fact_visit_timelines o JOIN up ON up.source_id = o.source_id),
    moved AS (  -- rows whose study, days or day counts changed (a re-pointed key alone moves nothing)
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
    PERFORM etl.set_transform_watermark(c_proc, 'silver.dim_studies', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'silver.dim_subjects', v_to, v_read);
END
$$;

-- -- fact_element_completions --------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS silver.fact_element_completions (
    element_completion_key   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id                varchar(255) NOT NULL UNIQUE,    -- the patient visit element's source_id
    patient_visit_element_id bigint,
    element_id               bigint,                          -- the element definition (procedure)
    element_name             text,
    element_sequence         integer,
    patient_visit_source_id  varchar(255),
    subject_key              bigint,
    study_key                bigint,
    site_key                 bigint,
    patient_key              bigint,
    subject_source_id        varchar(255),
    study_source_id          varchar(255),
    completed_at             timestamptz NOT NULL,
    completed_date_key       integer NOT NULL,
    is_required              boolean,
    is_repeated              boolean,
    duration_minutes         integer,
    days_from_visit_target   integer,                         -- completion date - the visit's target date
    completion_count         smallint NOT NULL DEFAULT 1,
    etl_inserted_at          timestamptz NOT NULL DEFAULT now(),
    etl_updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS fact_element_completions_study_idx ON silver.fact_element_completions (study_source_id, completed_date_key);
CREATE INDEX IF NOT EXISTS fact_element_completions_visit_idx ON silver.fact_element_completions (patient_visit_source_id);
COMMENT ON TABLE silver.fact_element_completions IS
    'One row per completed patient-visit element (completedOn set). Jobs 24 and 166 read the same endpoint '
    'into two Bronze tables; per source_id the most recently loaded row wins. Visit, subject and study '
    'keys come from the element''s patient visit (fact_visit_timelines).';

CREATE OR REPLACE PROCEDURE silver.load_fact_element_completions(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_fact_element_completions';
    v_to      timestamptz;
    v_from_a  timestamptz;
    v_from_b  timestamptz;
    v_from_v  timestamptz;
    v_read    bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from_a := etl.transform_watermark(c_proc, 'bronze.dim_patient_visit_elements_staging');
    v_from_b := etl.transform_watermark(c_proc, 'bronze.dim_visit_elements_staging');
    v_from_v := etl.transform_watermark(c_proc, 'silver.fact_visit_timelines');

    -- elements to (re)compute: changed in either Bronze table, or whose patient visit fact changed
    -- (new keys, new target date) since the last run
    DROP TABLE IF EXISTS pg_temp._k_fact_element_completions;
    CREATE TEMP TABLE _k_fact_element_completions ON COMMIT DROP AS
    SELECT b.source_id FROM bronze.dim_patient_visit_elements_staging b WHERE b.updated_at >= v_from_a
    UNION
    SELECT b.source_id FROM bronze.dim_visit_elements_staging b WHERE b.updated_at >= v_from_b
    UNION
    SELECT e.source_id
      FROM silver.fact_visit_timelines v
      JOIN silver.fact_element_completions e ON e.patient_visit_source_id = v.source_id
     WHERE v.etl_updated_at >= v_from_v;
    GET DIAGNOSTICS v_read = ROW_COUNT;
    ANALYZE pg_temp._k_fact_element_completions;

    DROP TABLE IF EXISTS pg_temp._n_fact_element_completions;
    CREATE TEMP TABLE _n_fact_element_completions ON COMMIT DROP AS
    WITH raw AS (
        SELECT b.source_id, b.data, b.source_params, b.is_deleted, b.updated_at
          FROM bronze.dim_patient_visit_elements_staging b JOIN _k_fact_element_completions k ON k.source_id = b.source_id
        UNION ALL
        SELECT b.source_id, b.data, b.source_params, b.is_deleted, b.updated_at
          FROM bronze.dim_visit_elements_staging b JOIN _k_fact_element_completions k ON k.source_id = b.source_id),
    latest AS (
        SELECT DISTINCT ON (r.source_id) r.*
          FROM raw r
         ORDER BY r.source_id, r.updated_at DESC, r.is_deleted DESC),
    e AS MATERIALIZED (
        SELECT l.source_id,
               etl.to_int(l.data->>'id') AS patient_visit_element_id, etl.to_int(l.data->>'elementId') AS element_id,
               l.data->>'name' AS element_name, etl.to_int(l.data->>'sequence')::int AS element_sequence,
               etl.ref_id(l.source_id, coalesce(l.data->>'patientVisitId', l.data->'patientVisit'->>'id',
                                                l.data->'patientVisit'->>'Id',
                                                l.source_params->>'patientVisitId')) AS patient_visit_source_id,
               etl.to_ts(l.data->>'completedOn') AS completed_at,
               etl.to_bool(l.data->>'required') AS is_required,
               etl.to_bool(l.data->>'isRepeatedElement') AS is_repeated,
               etl.to_int(l.data->>'durationMinutes')::int AS duration_minutes
          FROM latest l
         WHERE NOT l.is_deleted)
    SELECT e.source_id, e.patient_visit_element_id, e.element_id, e.element_name, e.element_sequence,
           e.patient_visit_source_id, v.subject_key, v.study_key, v.site_key, v.patient_key,
           v.subject_source_id, v.study_source_id, e.completed_at,
           etl.date_key((e.completed_at AT TIME ZONE 'UTC')::date) AS completed_date_key,
           e.is_required, e.is_repeated, e.duration_minutes,
           ((e.completed_at AT TIME ZONE 'UTC')::date - v.target_due_date) AS days_from_visit_target
      FROM e
      LEFT JOIN silver.fact_visit_timelines v ON v.source_id = e.patient_visit_source_id
     WHERE e.completed_at IS NOT NULL;

    WITH del AS (
        DELETE FROM silver.fact_element_completions f
         USING _k_fact_element_completions k
         WHERE f.source_id = k.source_id
           AND NOT EXISTS (SELECT 1 FROM _n_fact_element_completions n WHERE n.source_id = f.source_id)
        RETURNING f.study_source_id, f.completed_date_key),
    q AS (
        INSERT INTO etl.dw_transform_dirty_study_days (study_source_id, date_key)
        SELECT del.study_source_id, del.completed_date_key FROM del
         WHERE del.study_source_id IS NOT NULL)
    SELECT count(*) INTO deleted FROM del;

    WITH up AS (
        INSERT INTO silver.fact_element_completions AS f
               (source_id, patient_visit_element_id, element_id, element_name, element_sequence,
                patient_visit_source_id, subject_key, study_key, site_key, patient_key, subject_source_id,
                study_source_id, completed_at, completed_date_key, is_required, is_repeated, duration_minutes,
                days_from_visit_target)
        SELECT source_id, patient_visit_element_id, element_id, element_name, element_sequence,
               patient_visit_source_id, subject_key, study_key, site_key, patient_key, subject_source_id,
               study_source_id, completed_at, completed_date_key, is_required, is_repeated, duration_minutes,
               days_from_visit_target
          FROM _n_fact_element_completions
        ON CONFLICT (source_id) DO UPDATE
           SET patient_visit_element_id = excluded.patient_visit_element_id, element_id = excluded.element_id,
               element_name = excluded.element_name, element_sequence = excluded.element_sequence,
               patient_visit_source_id = excluded.patient_visit_source_id, subject_key = excluded.subject_key,
               study_key = excluded.study_key, site_key = excluded.site_key, patient_key = excluded.patient_key,
               subject_source_id = excluded.subject_source_id, study_source_id = excluded.study_source_id,
               completed_at = excluded.completed_at, completed_date_key = excluded.completed_date_key,
               is_required = excluded.is_required, is_repeated = excluded.is_repeated,
               duration_minutes = excluded.duration_minutes,
               days_from_visit_target = excluded.days_from_visit_target, etl_updated_at = now()
         WHERE (f.patient_visit_element_id, f.element_id, f.element_name, f.element_sequence,
                f.patient_visit_source_id, f.subject_key, f.study_key, f.site_key, f.patient_key,
                f.subject_source_id, f.study_source_id, f.completed_at, f.is_required, f.is_repeated,
                f.duration_minutes, f.days_from_visit_target)
               IS DISTINCT FROM
               (excluded.patient_visit_element_id, excluded.element_id, excluded.element_name,
                excluded.element_sequence, excluded.patient_visit_source_id, excluded.subject_key,
                excluded.study_key, excluded.site_key, excluded.patient_key, excluded.subject_source_id,
                excluded.study_source_id, excluded.completed_at, excluded.is_required, excluded.is_repeated,
                excluded.duration_minutes, excluded.days_from_visit_target)
        RETURNING f.source_id, (xmax = 0) AS was_inserted, f.study_source_id, f.completed_date_key),
    old AS (
        SELECT o.source_id, o.study_source_id, o.completed_date_key
          FROM silver.fact_element_completions o JOIN up ON up.source_id = o.source_id),
    moved AS (  -- rows whose study or day changed (a re-pointed key alone moves nothing)
        SELECT u.* FROM up u LEFT JOIN old o ON o.source_id = u.source_id
         WHERE o.source_id IS NULL
            OR (o.study_source_id, o.completed_date_key) IS DISTINCT FROM (u.study_source_id, u.completed_date_key)),
    q AS (
        INSERT INTO etl.dw_transform_dirty_study_days (study_source_id, date_key)
        SELECT z.study_source_id, z.completed_date_key
          FROM (SELECT study_source_id, completed_date_key FROM moved
                UNION ALL
                SELECT o.study_source_id, o.completed_date_key FROM old o JOIN moved m ON m.source_id = o.source_id) z
         WHERE z.study_source_id IS NOT NULL)
    SELECT count(*) FILTER (WHERE was_inserted), count(*) FILTER (WHERE NOT was_inserted)
      INTO inserted, updated
      FROM up;
    closed := 0;
    PERFORM etl.note_change('silver.fact_element_completions', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_patient_visit_elements_staging', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_visit_elements_staging', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'silver.fact_visit_timelines', v_to, v_read);
END
$$;

-- -- fact_study_performance (study x day) --------------------------------------------------------
CREATE TABLE IF NOT EXISTS silver.fact_study_performance (
    study_source_id             varchar(255) NOT NULL,
    date_key                    integer      NOT NULL,
    study_key                   bigint,
    subjects_screened           integer NOT NULL DEFAULT 0,
    subjects_enrolled           integer NOT NULL DEFAULT 0,
    subjects_randomized         integer NOT NULL DEFAULT 0,
    subjects_screen_failed      integer NOT NULL DEFAULT 0,
    subjects_dropped            integer NOT NULL DEFAULT 0,
    subjects_completed          integer NOT NULL DEFAULT 0,
    visits_due                  integer NOT NULL DEFAULT 0,
    visits_completed            integer NOT NULL DEFAULT 0,
    visits_completed_in_window  integer NOT NULL DEFAULT 0,
    elements_completed          integer NOT NULL DEFAULT 0,
    etl_inserted_at             timestamptz NOT NULL DEFAULT now(),
    etl_updated_at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (study_source_id, date_key)
);
CREATE INDEX IF NOT EXISTS fact_study_performance_unresolved_idx ON silver.fact_study_performance (study_source_id)
    WHERE study_key IS NULL;
COMMENT ON TABLE silver.fact_study_performance IS
    'Daily activity per study (sparse: a row exists only for a day with activity; a missing day means 0). '
    'Counts by the day the event happened: screenings, enrollments, randomizations, screen failures, '
    'drop-outs, completions (fact_enrollment), visits due and done (fact_visit_timelines; a completed visit '
    'without an actual date counts on its due day), elements completed (fact_element_completions).';

CREATE OR REPLACE PROCEDURE silver.load_fact_study_performance(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_fact_study_performance';
    v_to       timestamptz;
    v_from_dst timestamptz;
    v_moved    bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from_dst := etl.transform_watermark(c_proc, 'silver.dim_studies');

    -- a study that opened a new version: its days point at it (no day is recomputed for that)
    WITH r AS (
        UPDATE silver.fact_study_performance p
           SET study_key = d.study_key, etl_updated_at = now()
          FROM silver.dim_studies d
         WHERE d.source_id = p.study_source_id AND d.is_current AND d.etl_inserted_at >= v_from_dst
           AND p.study_key IS DISTINCT FROM d.study_key
        RETURNING 1)
    SELECT count(*) INTO v_moved FROM r;

    -- take the queued days committed so far (later ones stay queued for the next run) plus days whose
    -- study has arrived since they were computed
    DROP TABLE IF EXISTS pg_temp._d_fact_study_performance;
    CREATE TEMP TABLE _d_fact_study_performance (
        study_source_id varchar(255) NOT NULL, date_key integer NOT NULL
    ) ON COMMIT DROP;
    WITH q AS (DELETE FROM etl.dw_transform_dirty_study_days RETURNING study_source_id, date_key)
    INSERT INTO _d_fact_study_performance
    SELECT study_source_id, date_key FROM q
    UNION
    SELECT p.study_source_id, p.date_key FROM silver.fact_study_performance p
     WHERE p.study_key IS NULL
       AND EXISTS (SELECT 1 FROM silver.dim_studies d WHERE d.source_id = p.study_source_id AND d.is_current);
    ANALYZE pg_temp._d_fact_study_performance;

    DROP TABLE IF EXISTS pg_temp._n_fact_study_performance;
    CREATE TEMP TABLE _n_fact_study_performance ON COMMIT DROP AS
    -- every event of a queued (study, day), by exact (study, day) lookups: a small queue reads only its
    -- days (index probes), a full rebuild hash-joins whole tables
    WITH ev AS (
        SELECT d.study_source_id, d.date_key, x.measure
          FROM silver.fact_enrollment f
          CROSS JOIN LATERAL (VALUES (f.screening_date_key, 'screened'), (f.enrollment_date_key, 'enrolled'),
                                     (f.randomization_date_key, 'randomized'),
                                     (f.screen_failure_date_key, 'screen_failed'),
                                     (f.dropped_date_key, 'dropped'), (f.completion_date_key, 'completed'))
                AS x(date_key, measure)
          JOIN _d_fact_study_performance d ON d.study_source_id = f.study_source_id AND d.date_key = x.date_key
        UNION ALL
        -- due on the day; and a completed visit whose source gives no actual date counts on its due day
        SELECT d.study_source_id, d.date_key, x.measure
          FROM _d_fact_study_performance d
          JOIN silver.fact_visit_timelines v
            ON v.study_source_id = d.study_source_id AND v.target_due_date_key = d.date_key
          CROSS JOIN LATERAL (VALUES ('visit_due'), ('visit_completed')) AS x(measure)
         WHERE x.measure = 'visit_due' OR (v.is_completed AND v.actual_date_key IS NULL)
        UNION ALL
        SELECT d.study_source_id, d.date_key, CASE WHEN x.in_window THEN 'visit_in_window' ELSE 'visit_completed' END
          FROM _d_fact_study_performance d
          JOIN silver.fact_visit_timelines v
            ON v.study_source_id = d.study_source_id AND v.actual_date_key = d.date_key AND v.is_completed
          CROSS JOIN LATERAL (VALUES (false), (true)) AS x(in_window)
         WHERE NOT x.in_window OR v.is_within_window

        UNION ALL
        SELECT d.study_source_id, d.date_key, 'element_completed'
          FROM _d_fact_study_performance d
          JOIN silver.fact_element_completions e
            ON e.study_source_id = d.study_source_id AND e.completed_date_key = d.date_key)
    SELECT d.study_source_id, d.date_key, st.study_key,
           count(*) FILTER (WHERE d.measure = 'screened')::int          AS subjects_screened,
           count(*) FILTER (WHERE d.measure = 'enrolled')::int          AS subjects_enrolled,
           count(*) FILTER (WHERE d.measure = 'randomized')::int        AS subjects_randomized,
           count(*) FILTER (WHERE d.measure = 'screen_failed')::int     AS subjects_screen_failed,
           count(*) FILTER (WHERE d.measure = 'dropped')::int           AS subjects_dropped,
           count(*) FILTER (WHERE d.measure = 'completed')::int         AS subjects_completed,
           count(*) FILTER (WHERE d.measure = 'visit_due')::int         AS visits_due,
           count(*) FILTER (WHERE d.measure = 'visit_completed')::int   AS visits_completed,
           count(*) FILTER (WHERE d.measure = 'visit_in_window')::int   AS visits_completed_in_window,
           count(*) FILTER (WHERE d.measure = 'element_completed')::int AS elements_completed
      FROM ev d
      LEFT JOIN silver.dim_studies st ON st.source_id = d.study_source_id AND st.is_current
     GROUP BY d.study_source_id, d.date_key, st.study_key;

    WITH del AS (
        DELETE FROM silver.fact_study_performance p
         USING _d_fact_study_performance d
         WHERE p.study_source_id = d.study_source_id AND p.date_key = d.date_key
           AND NOT EXISTS (SELECT 1 FROM _n_fact_study_performance n
                            WHERE n.study_source_id = p.study_source_id AND n.date_key = p.date_key)
        RETURNING 1)
    SELECT count(*) INTO deleted FROM del;

    WITH up AS (
        INSERT INTO silver.fact_study_performance AS p
               (study_source_id, date_key, study_key, subjects_screened, subjects_enrolled, subjects_randomized,
                subjects_screen_failed, subjects_dropped, subjects_completed, visits_due, visits_completed,
                visits_completed_in_window, elements_completed)
        SELECT study_source_id, date_key, study_key, subjects_screened, subjects_enrolled, subjects_randomized,
               subjects_screen_failed, subjects_dropped, subjects_completed, visits_due, visits_completed,
               visits_completed_in_window, elements_completed
          FROM _n_fact_study_performance
        ON CONFLICT (study_source_id, date_key) DO UPDATE
           SET study_key = excluded.study_key, subjects_screened = excluded.subjects_screened,
               subjects_enrolled = excluded.subjects_enrolled, subjects_randomized = excluded.subjects_randomized,
               subjects_screen_failed = excluded.subjects_screen_failed,
               subjects_dropped = excluded.subjects_dropped, subjects_completed = excluded.subjects_completed,
               visits_due = excluded.visits_due, visits_completed = excluded.visits_completed,
               visits_completed_in_window = excluded.visits_completed_in_window,
               elements_completed = excluded.elements_completed, etl_updated_at = now()
         WHERE (p.study_key, p.subjects_screened, p.subjects_enrolled, p.subjects_randomized,
                p.subjects_screen_failed, p.subjects_dropped, p.subjects_completed, p.visits_due,
                p.visits_completed, p.visits_completed_in_window, p.elements_completed)
               IS DISTINCT FROM
               (excluded.study_key, excluded.subjects_screened, excluded.subjects_enrolled,
                excluded.subjects_randomized, excluded.subjects_screen_failed, excluded.subjects_dropped,
                excluded.subjects_completed, excluded.visits_due, excluded.visits_completed,
                excluded.visits_completed_in_window, excluded.elements_completed)
        RETURNING (xmax = 0) AS was_inserted)
    SELECT count(*) FILTER (WHERE was_inserted), count(*) FILTER (WHERE NOT was_inserted)
      INTO inserted, updated
      FROM up;
    updated := updated + v_moved;
    closed := 0;
    PERFORM etl.note_change('silver.fact_study_performance', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'silver.dim_studies', v_to, v_moved);
END
$$;
