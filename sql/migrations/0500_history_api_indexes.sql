-- Indexes for the job-history API (orchestrator/history_api.py) and `trialsync history`:
-- newest-first run lists without a job filter, and a run's rejects page by page. Without the
-- first, every /api/v1/runs page sorts the whole run history (measured: 200 ms at 100k runs).
CREATE INDEX IF NOT EXISTS dw_etl_runs_started_id_idx ON etl.dw_etl_runs (started_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS dw_etl_runs_parent_idx ON etl.dw_etl_runs (parent_run_id) WHERE parent_run_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS dw_etl_rejects_run_id_idx ON etl.dw_etl_rejects (run_id, id);
