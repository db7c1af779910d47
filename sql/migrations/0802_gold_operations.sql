-- Gold for a site-network operations lead (issue 19): enrollment funnel and velocity per study and
-- site, visit compliance per study, site and month, site capacity, query aging, milestone slippage,
-- stipends and payments per study and month. Each object's comment is its definition.
--
-- "Today" in Gold is the data's own clock, gold.as_of_date(): the newest source change the warehouse
-- has seen (extraction watermarks, study/subject changes, payments, queries), capped by the wall clock,
-- moved forward by gold.advance_data_clock() after every facts batch. Against a live CC that is
-- today; against the simulator it is the simulated clock, so ages and "missed" mean the same thing
-- in a demo as in production. Override per session: SET trialsync.as_of_date = '2025-12-01'.

CREATE TABLE IF NOT EXISTS etl.dw_data_clock (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    as_of       timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT ON etl.dw_data_clock TO trialsync_analytics;

CREATE OR REPLACE FUNCTION gold.as_of_date() RETURNS date
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('trialsync.as_of_date', true), '')::date,
                    (SELECT (c.as_of AT TIME ZONE 'UTC')::date FROM etl.dw_data_clock c),
                    current_date)
$$;
COMMENT ON FUNCTION gold.as_of_date() IS
    'The date Gold measures ages, overdue and missed against: trialsync.as_of_date if set, else the data clock '
    '(etl.dw_data_clock: newest source change seen, capped by now()), else today.';
GRANT EXECUTE ON FUNCTION gold.as_of_date() TO trialsync_analytics;

CREATE OR REPLACE PROCEDURE gold.advance_data_clock(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    v_new timestamptz;
    v_old timestamptz;
BEGIN
    PERFORM etl.transform_lock('gold.advance_data_clock');
    inserted := 0; updated := 0; closed := 0; deleted := 0;
    SELECT greatest((SELECT max(w.value) FROM etl.dw_etl_watermarks w WHERE w.parent_key = ''),
                    (SELECT max(source_modified_at) FROM silver.dim_studies),
                    (SELECT max(source_modified_at) FROM silver.dim_subjects),
                    (SELECT max(paid_at) FROM silver.fact_patient_payments),
                    (SELECT max(created_at) FROM silver.fact_monitor_queries))
      INTO v_new;
    v_new := least(v_new, now());
    SELECT as_of INTO v_old FROM etl.dw_data_clock;
    IF v_new IS NULL OR (v_old IS NOT NULL AND v_new <= v_old) THEN
        RETURN;
    END IF;
    INSERT INTO etl.dw_data_clock AS c (singleton, as_of) VALUES (true, v_new)
    ON CONFLICT (singleton) DO UPDATE SET as_of = excluded.as_of, updated_at = now();
    updated := 1;
    -- a new day changes what is missed, overdue and how old an open query is
    IF v_old IS NULL OR (v_new AT TIME ZONE 'UTC')::date <> (v_old AT TIME ZONE 'UTC')::date THEN
        PERFORM etl.note_change('etl.dw_data_clock', 1);
    END IF;
END
$$;

-- -- the study summary: active = on study now ----------------------------------------------------
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
               count(*)                                   AS total_subjects,
               count(*) FILTER (WHERE f.is_screened)      AS screened,
               count(*) FILTER (WHERE f.is_enrolled)      AS enrolled,
               count(*) FILTER (WHERE f.is_randomized)    AS randomized,
               count(*) FILTER (WHERE f.is_screen_failed) AS screen_failed,
               count(*) FILTER (WHERE f.is_dropped)       AS dropped,
               count(*) FILTER (WHERE f.is_completed)     AS completed,
               count(*) FILTER (WHERE f.is_active)        AS active,
               min(f.enrollment_date)                     AS first_enrollment_date,
               max(f.enrollment_date)                     AS last_enrollment_date
          FROM silver.fact_enrollment f
         GROUP BY f.study_source_id) e ON e.study_source_id = s.source_id
 WHERE s.is_current AND NOT s.is_deleted;
COMMENT ON VIEW gold.v_study_enrollment_summary IS
    'Per live study: subjects by funnel stage from the status history (silver.fact_enrollment: each stage counted '
    'once per subject, screened >= enrolled >= randomized), active_subjects = current status RunIn, Randomized or '
    'FollowUp, first/last enrollment date, screen-failure rate (screen_failed/screened) and drop-out rate '
    '(dropped/enrolled).';

-- -- enrollment funnel and velocity per study and site -------------------------------------------
CREATE OR REPLACE VIEW gold.v_enrollment_funnel AS
WITH d AS (SELECT gold.as_of_date() AS as_of)
SELECT st.study_key,
       f.study_source_id,
       st.study_name,
       st.study_status,
       si.site_key,
       f.site_source_id,
       si.site_name,
       count(*)                                               AS subjects,
       count(*) FILTER (WHERE f.is_prescreened)               AS prescreened,
       count(*) FILTER (WHERE f.is_screened)                  AS screened,
       count(*) FILTER (WHERE f.is_enrolled)                  AS enrolled,
       count(*) FILTER (WHERE f.is_randomized)                AS randomized,
       count(*) FILTER (WHERE f.is_completed)                 AS completed,
       count(*) FILTER (WHERE f.is_active)                    AS active,
       count(*) FILTER (WHERE f.is_non_qualified)             AS non_qualified,
       count(*) FILTER (WHERE f.is_screen_failed)             AS screen_failed,
       count(*) FILTER (WHERE f.is_run_in_failed)             AS run_in_failed,
       count(*) FILTER (WHERE f.is_dropped)                   AS dropped,
       round(count(*) FILTER (WHERE f.is_screened)::numeric
             / nullif(count(*) FILTER (WHERE f.is_prescreened), 0), 4) AS prescreen_to_screen_rate,
       round(count(*) FILTER (WHERE f.is_enrolled)::numeric
             / nullif(count(*) FILTER (WHERE f.is_screened), 0), 4)    AS screen_to_enroll_rate,
       round(count(*) FILTER (WHERE f.is_screen_failed)::numeric
             / nullif(count(*) FILTER (WHERE f.is_screened), 0), 4)    AS screen_failure_rate,
       min(f.enrollment_date)                                 AS first_enrollment_date,
       max(f.enrollment_date)                                 AS last_enrollment_date,
       count(*) FILTER (WHERE f.enrollment_date > d.as_of - 30 AND f.enrollment_date <= d.as_of) AS enrolled_last_30_days,
       count(*) FILTER (WHERE f.enrollment_date > d.as_of - 90 AND f.enrollment_date <= d.as_of) AS enrolled_last_90_days,
       round(count(*) FILTER (WHERE f.is_enrolled AND f.enrollment_date IS NOT NULL)::numeric * 30
             / nullif(max(f.enrollment_date) - min(f.enrollment_date) + 1, 0), 4) AS enrollments_per_30_days,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY f.days_screening_to_enrollment)
           FILTER (WHERE f.days_screening_to_enrollment IS NOT NULL) AS median_days_screening_to_enrollment,
       d.as_of
  FROM silver.fact_enrollment f
  CROSS JOIN d
  LEFT JOIN silver.dim_studies st ON st.source_id = f.study_source_id AND st.is_current
  LEFT JOIN silver.dim_sites si ON si.source_id = f.site_source_id
 GROUP BY st.study_key, f.study_source_id, st.study_name, st.study_status, si.site_key, f.site_source_id,
          si.site_name, d.as_of;
COMMENT ON VIEW gold.v_enrollment_funnel IS
    'Enrollment funnel and velocity per study and site (every enrollment fact). Stages from '
    'the subject status history, each counted once per subject (silver.fact_enrollment.funnel_stage): '
    'prescreened >= screened >= enrolled (RunIn/Randomized reached) >= randomized >= completed; active = current '
    'status RunIn, Randomized or FollowUp; exits: non_qualified, screen_failed, run_in_failed, dropped. Rates: '
    'screened/prescreened, enrolled/screened, screen_failed/screened. Velocity: enrollments in the 30 and 90 days '
    'up to as_of (gold.as_of_date()), enrollments per 30 days between the first and last enrollment, median days '
    'from screening to enrollment.';

-- -- visit compliance per study, site and month (materialized) ------------------------------------
CREATE MATERIALIZED VIEW IF NOT EXISTS gold.mv_visit_compliance AS
WITH d AS (SELECT gold.as_of_date() AS as_of),
v AS (
    SELECT f.study_source_id, f.site_source_id,
           date_trunc('month', f.target_due_date)::date AS due_month,
           f.is_completed, f.completion_timing, f.is_expected,
           (f.is_expected AND NOT f.is_completed AND f.max_due_date < d.as_of) AS is_missed,
           (f.is_expected AND NOT f.is_completed AND f.max_due_date >= d.as_of) AS is_open,
           f.days_from_target, d.as_of
      FROM silver.fact_visit_timelines f CROSS JOIN d
     WHERE f.target_due_date IS NOT NULL AND (f.is_expected OR f.is_completed))
SELECT v.study_source_id,
       st.study_key,
       st.study_name,
       v.site_source_id,
       si.site_key,
       si.site_name,
       v.due_month,
       count(*)                                                       AS visits_expected,
       count(*) FILTER (WHERE v.is_completed)                         AS visits_completed,
       count(*) FILTER (WHERE v.completion_timing = 'on_time')        AS visits_on_time,
       count(*) FILTER (WHERE v.completion_timing = 'late')           AS visits_late,
       count(*) FILTER (WHERE v.completion_timing = 'early')          AS visits_early,
       count(*) FILTER (WHERE v.is_completed AND v.completion_timing IS NULL) AS visits_completed_undated,
       count(*) FILTER (WHERE v.is_missed)                            AS visits_missed,
       count(*) FILTER (WHERE v.is_open)                              AS visits_open,
       round(count(*) FILTER (WHERE v.completion_timing = 'on_time')::numeric
             / nullif(count(*) FILTER (WHERE v.is_completed OR v.is_missed), 0), 4) AS compliance_rate,
       round(count(*) FILTER (WHERE v.completion_timing = 'on_time')::numeric
             / nullif(count(*) FILTER (WHERE v.is_completed), 0), 4)               AS on_time_rate,
       round(count(*) FILTER (WHERE v.is_missed)::numeric
             / nullif(count(*) FILTER (WHERE v.is_completed OR v.is_missed), 0), 4) AS missed_rate,
       round(avg(v.days_from_target) FILTER (WHERE v.is_completed), 2)             AS avg_days_from_target,
       max(v.as_of)                                                   AS as_of
  FROM v
  LEFT JOIN silver.dim_studies st ON st.source_id = v.study_source_id AND st.is_current
  LEFT JOIN silver.dim_sites si ON si.source_id = v.site_source_id
 GROUP BY v.study_source_id, st.study_key, st.study_name, v.site_source_id, si.site_key, si.site_name, v.due_month;
CREATE UNIQUE INDEX IF NOT EXISTS mv_visit_compliance_uq
    ON gold.mv_visit_compliance (study_source_id, site_source_id, due_month) NULLS NOT DISTINCT;
COMMENT ON MATERIALIZED VIEW gold.mv_visit_compliance IS
    'Visit compliance per study, site and month of the target due date, over expected visits (due while the subject '
    'was on study, or done: silver.fact_visit_timelines.is_expected). A completed visit''s date is its completed '
    'appointment''s plannedStart: on_time inside [minDueDate, maxDueDate], late after, early before, undated '
    'without one; missed = expected, not completed, window closed before as_of (gold.as_of_date()); open = window '
    'not closed yet. compliance_rate = on_time / (completed + missed); on_time_rate = on_time / completed; '
    'missed_rate = missed / (completed + missed). Refreshed concurrently after each facts batch that changed '
    'visits, studies, sites or the data clock.';

CREATE OR REPLACE PROCEDURE gold.refresh_mv_visit_compliance(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c_proc CONSTANT text := 'gold.refresh_mv_visit_compliance';
    v_to   timestamptz;
    v_from timestamptz;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    inserted := 0; updated := 0; closed := 0; deleted := 0;
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'etl.dw_transform_changes');
    IF v_from > '-infinity' AND NOT EXISTS (
           SELECT 1 FROM etl.dw_transform_changes c
            WHERE c.table_name IN ('silver.fact_visit_timelines', 'silver.dim_studies', 'silver.dim_sites',
                                   'etl.dw_data_clock')
              AND c.changed_at >= v_from) THEN
        RETURN;
    END IF;
    REFRESH MATERIALIZED VIEW CONCURRENTLY gold.mv_visit_compliance;
    SELECT count(*) INTO updated FROM gold.mv_visit_compliance;
    PERFORM etl.set_transform_watermark(c_proc, 'etl.dw_transform_changes', v_to, updated);
END
$$;
REVOKE EXECUTE ON PROCEDURE gold.refresh_mv_visit_compliance(bigint, bigint, bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON PROCEDURE gold.refresh_mv_visit_compliance(bigint, bigint, bigint, bigint) TO trialsync_etl;

-- -- site capacity ---------------------------------------------------------------------------------
CREATE OR REPLACE VIEW gold.v_site_capacity AS
WITH rooms AS (
    SELECT r.site_source_id, count(*) AS rooms
      FROM silver.dim_rooms r
     WHERE NOT r.is_deleted AND coalesce(r.is_active, true) AND NOT coalesce(r.is_conference_room, false)
     GROUP BY r.site_source_id)
SELECT si.site_key,
       a.site_source_id,
       si.site_name,
       a.planned_date,
       count(*)                                               AS appointments,
       count(*) FILTER (WHERE a.is_completed)                 AS appointments_completed,
       count(*) FILTER (WHERE a.is_pending)                   AS appointments_pending,
       count(*) FILTER (WHERE a.is_no_show)                   AS appointments_no_show,
       coalesce(sum(a.duration_minutes), 0)                   AS booked_minutes,
       coalesce(r.rooms, 0)                                   AS rooms,
       coalesce(r.rooms, 0) * 480                             AS capacity_minutes,
       round(count(*)::numeric / nullif(r.rooms, 0), 2)       AS appointments_per_room,
       round(coalesce(sum(a.duration_minutes), 0)::numeric / nullif(r.rooms * 480, 0), 4) AS utilisation
  FROM silver.fact_appointments a
  LEFT JOIN silver.dim_sites si ON si.source_id = a.site_source_id
  LEFT JOIN rooms r ON r.site_source_id = a.site_source_id
 WHERE NOT a.is_cancelled AND a.planned_date IS NOT NULL
 GROUP BY si.site_key, a.site_source_id, si.site_name, a.planned_date, r.rooms;
COMMENT ON VIEW gold.v_site_capacity IS
    'Site capacity per site and day: appointments planned that day (every status but Cancelled; completed, '
    'pending and no-show apart), booked minutes (plannedEnd - plannedStart), rooms = the site''s active rooms that '
    'are not conference rooms (silver.dim_rooms), capacity = rooms x 480 minutes (an 8-hour day), '
    'appointments_per_room = appointments / rooms, utilisation = booked minutes / capacity.';

-- -- query aging per study and monitor -------------------------------------------------------------
CREATE OR REPLACE VIEW gold.v_query_aging AS
WITH d AS (SELECT gold.as_of_date() AS as_of)
SELECT st.study_key,
       q.study_source_id,
       st.study_name,
       mo.monitor_key,
       q.monitor_source_id,
       mo.display_name                                                        AS monitor_name,
       count(*)                                                               AS queries,
       count(*) FILTER (WHERE q.is_open)                                      AS open_queries,
       count(*) FILTER (WHERE q.is_open AND d.as_of - q.created_date <= 7)    AS open_0_7_days,
       count(*) FILTER (WHERE q.is_open AND d.as_of - q.created_date BETWEEN 8 AND 30)  AS open_8_30_days,
       count(*) FILTER (WHERE q.is_open AND d.as_of - q.created_date BETWEEN 31 AND 90) AS open_31_90_days,
       count(*) FILTER (WHERE q.is_open AND d.as_of - q.created_date > 90)    AS open_over_90_days,
       max(d.as_of - q.created_date) FILTER (WHERE q.is_open)                 AS oldest_open_days,
       count(*) FILTER (WHERE NOT q.is_open)                                  AS closed_queries,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY q.days_to_close)
           FILTER (WHERE NOT q.is_open AND q.days_to_close IS NOT NULL)       AS median_days_to_close,
       d.as_of
  FROM silver.fact_monitor_queries q
  CROSS JOIN d
  LEFT JOIN silver.dim_studies st ON st.source_id = q.study_source_id AND st.is_current
  LEFT JOIN silver.dim_monitors mo ON mo.source_id = q.monitor_source_id
 GROUP BY st.study_key, q.study_source_id, st.study_name, mo.monitor_key, q.monitor_source_id, mo.display_name, d.as_of;
COMMENT ON VIEW gold.v_query_aging IS
    'Monitor queries per study and assigned monitor: open queries by age (as_of - created date, as_of = '
    'gold.as_of_date()) in buckets 0-7, 8-30, 31-90 and over 90 days, the oldest open one, closed queries and the '
    'median days from creation to closing. Open = considered open by its status (silver.fact_monitor_queries).';

-- -- milestone slippage per study --------------------------------------------------------------------
CREATE OR REPLACE VIEW gold.v_milestone_slippage AS
WITH d AS (SELECT gold.as_of_date() AS as_of)
SELECT st.study_key,
       m.study_source_id,
       st.study_name,
       st.study_status,
       count(*)                                                                   AS milestones,
       count(*) FILTER (WHERE m.is_completed)                                     AS completed,
       count(*) FILTER (WHERE m.is_completed AND m.slip_days <= 0)                AS completed_on_time,
       count(*) FILTER (WHERE m.is_completed AND m.slip_days > 0)                 AS completed_late,
       count(*) FILTER (WHERE m.is_completed AND m.slip_days IS NULL)             AS completed_undated,
       count(*) FILTER (WHERE NOT m.is_completed AND m.projected_date < d.as_of)  AS overdue,
       count(*) FILTER (WHERE NOT m.is_completed AND (m.projected_date >= d.as_of OR m.projected_date IS NULL))
                                                                                  AS upcoming,
       round(avg(m.slip_days) FILTER (WHERE m.is_completed), 2)                   AS avg_slip_days,
       max(m.slip_days) FILTER (WHERE m.is_completed)                             AS max_slip_days,
       max(d.as_of - m.projected_date) FILTER (WHERE NOT m.is_completed AND m.projected_date < d.as_of)
                                                                                  AS max_overdue_days,
       round(count(*) FILTER (WHERE m.is_completed AND m.slip_days <= 0)::numeric
             / nullif(count(*) FILTER (WHERE m.is_completed AND m.slip_days IS NOT NULL), 0), 4) AS on_time_rate,
       d.as_of
  FROM silver.fact_study_milestones m
  CROSS JOIN d
  LEFT JOIN silver.dim_studies st ON st.source_id = m.study_source_id AND st.is_current
 GROUP BY st.study_key, m.study_source_id, st.study_name, st.study_status, d.as_of;
COMMENT ON VIEW gold.v_milestone_slippage IS
    'Study milestones, projected vs completed, per study: completed on time (completed on or before the projected '
    'date), late (after: slip_days = completed - projected), overdue (not completed, projected before as_of = '
    'gold.as_of_date()), upcoming (not completed, projected on or after as_of), average and maximum slip of the '
    'completed ones, the longest overdue, on_time_rate = on time / completed with a projected date.';

-- -- stipends and payments per study and month -----------------------------------------------------
CREATE OR REPLACE VIEW gold.v_payments_monthly AS
SELECT st.study_key,
       p.study_source_id,
       st.study_name,
       date_trunc('month', p.paid_date)::date                                 AS paid_month,
       count(*)                                                               AS payments,
       coalesce(sum(p.amount), 0)                                             AS total_amount,
       count(*) FILTER (WHERE p.payment_source = 'visit_stipend')             AS visit_stipends,
       coalesce(sum(p.amount) FILTER (WHERE p.payment_source = 'visit_stipend'), 0)   AS visit_stipend_amount,
       count(*) FILTER (WHERE p.payment_source = 'patient_payment')           AS patient_payments,
       coalesce(sum(p.amount) FILTER (WHERE p.payment_source = 'patient_payment'), 0) AS patient_payment_amount,
       count(DISTINCT p.subject_source_id)                                    AS subjects_paid,
       count(DISTINCT p.patient_visit_source_id)                              AS visits_paid,
       round(avg(p.amount), 2)                                                AS avg_amount
  FROM silver.fact_patient_payments p
  LEFT JOIN silver.dim_studies st ON st.source_id = p.study_source_id AND st.is_current
 GROUP BY st.study_key, p.study_source_id, st.study_name, date_trunc('month', p.paid_date)::date;
COMMENT ON VIEW gold.v_payments_monthly IS
    'Payments to study subjects per study and month of payment (paymentOn): visit stipends (job 161) and patient '
    'payments (job 176) counted and summed apart and together, distinct subjects and visits paid, average amount.';

COMMENT ON MATERIALIZED VIEW gold.mv_study_performance_metrics IS
    'Per live study: lifetime activity totals from silver.fact_study_performance (stage events on their day, from '
    'the status history), visit on-time rate = visits completed inside their window (by the completed '
    'appointment''s date) / visits completed, and enrollment velocity (enrollments per 30 days between the first '
    'and last day with one). Refreshed concurrently after each facts load.';

GRANT SELECT ON gold.v_enrollment_funnel, gold.mv_visit_compliance, gold.v_site_capacity, gold.v_query_aging,
                gold.v_milestone_slippage, gold.v_payments_monthly TO trialsync_analytics;
