-- Gold (issue 6): analytics views over the Silver star. Plain views are always current; the
-- materialized view is refreshed CONCURRENTLY (readers never block) by
-- gold.refresh_mv_study_performance_metrics() after the facts load.

-- Enrollment funnel per study (current version of every live study; studies without subjects show 0).
CREATE OR REPLACE VIEW gold.v_study_enrollment_summary AS
SELECT s.study_key,
       s.source_id                        AS study_source_id,
       s.study_id,
       s.study_name,
       s.protocol_number,
       s.phase,
       s.study_status,
       sp.sponsor_name,
       ms.site_name                       AS managing_site_name,
       coalesce(e.total_subjects, 0)      AS total_subjects,
       coalesce(e.screened, 0)            AS screened,
       coalesce(e.enrolled, 0)            AS enrolled,
       coalesce(e.randomized, 0)          AS randomized,
       coalesce(e.screen_failed, 0)       AS screen_failed,
       coalesce(e.dropped, 0)             AS dropped,
       coalesce(e.completed, 0)           AS completed,
       coalesce(e.active, 0)              AS active_subjects,
       e.first_enrollment_date,
       e.last_enrollment_date,
       round(e.screen_failed::numeric / nullif(e.screened, 0), 4) AS screen_failure_rate,
       round(e.dropped::numeric / nullif(e.enrolled, 0), 4)       AS dropout_rate
  FROM silver.dim_studies s
  LEFT JOIN silver.dim_sponsors sp ON sp.source_id = s.sponsor_source_id
  LEFT JOIN silver.dim_sites ms ON ms.source_id = s.managing_site_source_id
  LEFT JOIN (
        SELECT f.study_source_id,
               count(*)                                        AS total_subjects,
               count(*) FILTER (WHERE f.is_screened)           AS screened,
               count(*) FILTER (WHERE f.is_enrolled)           AS enrolled,
               count(*) FILTER (WHERE f.is_randomized)         AS randomized,
               count(*) FILTER (WHERE f.is_screen_failed)      AS screen_failed,
               count(*) FILTER (WHERE f.is_dropped)            AS dropped,
               count(*) FILTER (WHERE f.is_completed)          AS completed,
               count(*) FILTER (WHERE f.is_enrolled AND NOT f.is_dropped AND NOT f.is_completed
                                  AND NOT f.is_screen_failed) AS active,
               min(f.enrollment_date)                          AS first_enrollment_date,
               max(f.enrollment_date)                          AS last_enrollment_date
          FROM silver.fact_enrollment f
         GROUP BY f.study_source_id) e ON e.study_source_id = s.source_id
 WHERE s.is_current AND NOT s.is_deleted;
COMMENT ON VIEW gold.v_study_enrollment_summary IS
    'Per live study: subjects by funnel stage (see silver.fact_enrollment for the flag definitions), '
    'first/last enrollment date, screen-failure rate (screen_failed/screened) and drop-out rate (dropped/enrolled).';

-- Current subject status distribution per study.
CREATE OR REPLACE VIEW gold.v_subject_status_summary AS
SELECT st.study_key,
       sub.study_source_id,
       st.study_name,
       coalesce(sub.subject_status, 'Unknown')        AS subject_status,
       count(*)                                       AS subject_count,
       round(count(*)::numeric / sum(count(*)) OVER (PARTITION BY sub.study_source_id), 4) AS share_of_study,
       max(sub.effective_start_date)                  AS last_status_change_at
  FROM silver.dim_subjects sub
  LEFT JOIN silver.dim_studies st ON st.source_id = sub.study_source_id AND st.is_current
 WHERE sub.is_current AND NOT sub.is_deleted
 GROUP BY st.study_key, sub.study_source_id, st.study_name, coalesce(sub.subject_status, 'Unknown');
COMMENT ON VIEW gold.v_subject_status_summary IS
    'Per study and current subject status: number of subjects (current SCD2 versions) and their share of the study.';

-- Study performance: lifetime totals from the daily fact plus visit compliance.
CREATE MATERIALIZED VIEW IF NOT EXISTS gold.mv_study_performance_metrics AS
WITH p AS (  -- aggregate the daily fact per study first: the join then touches one row per study
    SELECT study_source_id,
           min(date_key) AS first_key, max(date_key) AS last_key, count(*) AS active_days,
           sum(subjects_screened) AS subjects_screened, sum(subjects_enrolled) AS subjects_enrolled,
           sum(subjects_randomized) AS subjects_randomized, sum(subjects_screen_failed) AS subjects_screen_failed,
           sum(subjects_dropped) AS subjects_dropped, sum(subjects_completed) AS subjects_completed,
           sum(visits_due) AS visits_due, sum(visits_completed) AS visits_completed,
           sum(visits_completed_in_window) AS visits_completed_in_window,
           sum(elements_completed) AS elements_completed,
           min(date_key) FILTER (WHERE subjects_enrolled > 0) AS first_enrollment_key,
           max(date_key) FILTER (WHERE subjects_enrolled > 0) AS last_enrollment_key
      FROM silver.fact_study_performance
     GROUP BY study_source_id)
SELECT s.source_id                                         AS study_source_id,
       s.study_key,
       s.study_id,
       s.study_name,
       s.study_status,
       s.phase,
       to_date(p.first_key::text, 'YYYYMMDD')              AS first_activity_date,
       to_date(p.last_key::text, 'YYYYMMDD')               AS last_activity_date,
       coalesce(p.active_days, 0)                          AS active_days,
       coalesce(p.subjects_screened, 0)::bigint            AS subjects_screened,
       coalesce(p.subjects_enrolled, 0)::bigint            AS subjects_enrolled,
       coalesce(p.subjects_randomized, 0)::bigint          AS subjects_randomized,
       coalesce(p.subjects_screen_failed, 0)::bigint       AS subjects_screen_failed,
       coalesce(p.subjects_dropped, 0)::bigint             AS subjects_dropped,
       coalesce(p.subjects_completed, 0)::bigint           AS subjects_completed,
       coalesce(p.visits_due, 0)::bigint                   AS visits_due,
       coalesce(p.visits_completed, 0)::bigint             AS visits_completed,
       coalesce(p.visits_completed_in_window, 0)::bigint   AS visits_completed_in_window,
       coalesce(p.elements_completed, 0)::bigint           AS elements_completed,
       round(p.visits_completed_in_window::numeric / nullif(p.visits_completed, 0), 4) AS visit_on_time_rate,
       round(p.subjects_enrolled::numeric * 30
             / nullif(to_date(p.last_enrollment_key::text, 'YYYYMMDD')
                      - to_date(p.first_enrollment_key::text, 'YYYYMMDD') + 1, 0), 4) AS enrollments_per_30_days
  FROM silver.dim_studies s
  LEFT JOIN p ON p.study_source_id = s.source_id
 WHERE s.is_current AND NOT s.is_deleted;
CREATE UNIQUE INDEX IF NOT EXISTS mv_study_performance_metrics_uq ON gold.mv_study_performance_metrics (study_source_id);
COMMENT ON MATERIALIZED VIEW gold.mv_study_performance_metrics IS
    'Per live study: lifetime activity totals from silver.fact_study_performance, visit on-time rate '
    '(completed within the protocol window / completed) and enrollment velocity. Refreshed concurrently '
    'after each facts load.';

-- SECURITY DEFINER: only a materialized view's owner may refresh it (PG 16), and the transformer
-- runs as a member of trialsync_etl, not as the migrating owner. Executable by trialsync_etl only.
CREATE OR REPLACE PROCEDURE gold.refresh_mv_study_performance_metrics(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c_proc CONSTANT text := 'gold.refresh_mv_study_performance_metrics';
    v_to   timestamptz;
    v_from timestamptz;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    inserted := 0; updated := 0; closed := 0; deleted := 0;
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'etl.dw_transform_changes');
    -- nothing the view reads changed since the last refresh: skip (a refresh recomputes everything)
    IF v_from > '-infinity' AND NOT EXISTS (
           SELECT 1 FROM etl.dw_transform_changes c
            WHERE c.table_name IN ('silver.fact_study_performance', 'silver.dim_studies')
              AND c.changed_at >= v_from) THEN
        RETURN;
    END IF;
    REFRESH MATERIALIZED VIEW CONCURRENTLY gold.mv_study_performance_metrics;
    -- REFRESH reports no per-row counts; `updated` carries the rows the view now holds
    SELECT count(*) INTO updated FROM gold.mv_study_performance_metrics;
    PERFORM etl.set_transform_watermark(c_proc, 'etl.dw_transform_changes', v_to, updated);
END
$$;
REVOKE EXECUTE ON PROCEDURE gold.refresh_mv_study_performance_metrics(bigint, bigint, bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE gold.refresh_mv_study_performance_metrics(bigint, bigint, bigint, bigint) TO trialsync_etl;
