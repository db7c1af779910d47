-- The CC job export's last_status / last_records describe runs of the legacy system the export came
-- from, not this installation. Until now `jobs sync` wrote them into last_run_status /
-- last_run_records, so `jobs show`, the history API and ad-hoc SQL showed e.g. job 9 "failed / 0"
-- after a successful TrialSync run. They move to export_last_status / export_last_records; the
-- last_run_* columns only ever describe TrialSync runs (NULL until the job first runs here).

ALTER TABLE etl.dw_etl_jobs
    ADD COLUMN IF NOT EXISTS export_last_status  varchar(50),
    ADD COLUMN IF NOT EXISTS export_last_records bigint;

COMMENT ON COLUMN etl.dw_etl_jobs.export_last_status IS
    'last status in the CC job export (the legacy system''s run, before TrialSync); not a TrialSync run';
COMMENT ON COLUMN etl.dw_etl_jobs.export_last_records IS
    'records of the legacy system''s last run, from the CC job export; not a TrialSync run';
COMMENT ON COLUMN etl.dw_etl_jobs.last_run_status IS
    'status of this installation''s latest run of the job (NULL: never run here)';
COMMENT ON COLUMN etl.dw_etl_jobs.last_run_records IS
    'records published by this installation''s latest finished run (NULL: never run here, or running)';

-- jobs that never ran here: what they show is the export's; move it
UPDATE etl.dw_etl_jobs
   SET export_last_status = last_run_status, export_last_records = last_run_records,
       last_run_status = NULL, last_run_records = NULL
 WHERE last_run_id IS NULL AND (last_run_status IS NOT NULL OR last_run_records IS NOT NULL);

-- jobs that ran: the record count is the latest run's, never a left-over export value
UPDATE etl.dw_etl_jobs j
   SET last_run_records = CASE WHEN r.run_status IN ('success', 'partial', 'failed') THEN r.records_published END
  FROM etl.dw_etl_runs r
 WHERE r.id = j.last_run_id
   AND j.last_run_records IS DISTINCT FROM
       (CASE WHEN r.run_status IN ('success', 'partial', 'failed') THEN r.records_published END);
