-- Quality checks run their check_sql read-only under trialsync_analytics (consumers/quality.py), and
-- the star's checks (0803) read transform bookkeeping: the study-days a change left to recompute
-- (fact_study_performance_reconcile_facts), the procedures' watermarks (etl.transform_watermark()),
-- the data clock behind gold.as_of_date(), the registry and past results. None holds a secret;
-- the pseudonymisation key and the API credentials stay unreadable.
GRANT SELECT ON etl.dw_transform_dirty_study_days, etl.dw_transform_watermarks, etl.dw_data_clock,
    etl.dw_transform_procedures, etl.dw_transform_runs, etl.dw_quality_checks, etl.dw_quality_results
    TO trialsync_analytics;
