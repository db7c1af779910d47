-- Orchestration (issue 7): one row per dependency-aware run of a set of jobs, the scheduler's fire
-- log (exactly-once per scheduled time across replicas), and the alert streak state.
--
-- Read with orchestrator/runner.py, orchestrator/scheduler.py and orchestrator/alerts.py.

-- -- orchestrations --------------------------------------------------------------------------------
-- `trialsync run`, the scheduler, `retry` and the demo each create one row; every extraction run
-- they start carries its id in etl.dw_etl_runs.orchestration_id (and skipped jobs get a
-- 'skipped' run row with the reason), so "what did last night's run do" is one query.
CREATE TABLE IF NOT EXISTS etl.dw_orchestrations (
    id              uuid PRIMARY KEY,
    trigger         varchar(32)  NOT NULL DEFAULT 'cli',
    selection       jsonb        NOT NULL DEFAULT '{}'::jsonb,
    mode            varchar(20)  NOT NULL DEFAULT 'incremental',
    status          varchar(20)  NOT NULL DEFAULT 'running'
                    CHECK (status IN ('running', 'success', 'partial', 'failed', 'cancelled')),
    jobs_total      integer      NOT NULL DEFAULT 0,
    jobs_succeeded  integer      NOT NULL DEFAULT 0,
    jobs_partial    integer      NOT NULL DEFAULT 0,
    jobs_failed     integer      NOT NULL DEFAULT 0,
    jobs_skipped    integer      NOT NULL DEFAULT 0,
    records_extracted bigint     NOT NULL DEFAULT 0,
    records_loaded  bigint       NOT NULL DEFAULT 0,
    started_at      timestamptz  NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    duration_seconds numeric(12, 3),
    host            varchar(255),
    pid             integer,
    error_message   text
);
CREATE INDEX IF NOT EXISTS dw_orchestrations_started_idx ON etl.dw_orchestrations (started_at DESC);

-- -- schedules ----------------------------------------------------------------------------------------
-- When a job's schedule last changed: the reference point of the catch-up policy for a schedule
-- that never fired (a missed fire time is only caught up if it lies after the schedule was set).
ALTER TABLE etl.dw_etl_jobs ADD COLUMN IF NOT EXISTS schedule_updated_at timestamptz;

CREATE OR REPLACE FUNCTION etl.touch_schedule_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.schedule IS DISTINCT FROM OLD.schedule THEN
        NEW.schedule_updated_at := CASE WHEN NEW.schedule IS NULL THEN NULL ELSE now() END;
    END IF;
    RETURN NEW;
END
$fn$;

DROP TRIGGER IF EXISTS dw_etl_jobs_schedule_touch ON etl.dw_etl_jobs;
CREATE TRIGGER dw_etl_jobs_schedule_touch BEFORE INSERT OR UPDATE OF schedule ON etl.dw_etl_jobs
    FOR EACH ROW EXECUTE FUNCTION etl.touch_schedule_updated_at();
UPDATE etl.dw_etl_jobs SET schedule_updated_at = now() WHERE schedule IS NOT NULL AND schedule_updated_at IS NULL;

-- The scheduler's fire log: one row per replica and fire (scheduled time), with what became of it.
-- Exactly-once per scheduled time across replicas comes from the per-job advisory lock plus
-- "reuse": a replica that gets a job's lock after another replica ran it for the same scheduled
-- time (a run that started at or after scheduled_for) reuses that run instead of extracting again
-- (outcome 'reused'). The latest scheduled_for per job is also the reference of the catch-up policy.
CREATE TABLE IF NOT EXISTS etl.dw_scheduler_fires (
    id                bigserial PRIMARY KEY,
    job_id            integer      NOT NULL REFERENCES etl.dw_etl_jobs(id),
    scheduled_for     timestamptz  NOT NULL,
    fired_at          timestamptz  NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    kind              varchar(16)  NOT NULL DEFAULT 'on_time' CHECK (kind IN ('on_time', 'catch_up', 'missed')),
    outcome           varchar(20)  NOT NULL DEFAULT 'running'
                      CHECK (outcome IN ('running', 'success', 'partial', 'failed', 'skipped', 'reused', 'cancelled',
                                         'missed', 'error')),
    run_id            bigint,
    orchestration_id  uuid,
    host              varchar(255),
    pid               integer,
    detail            text
);
CREATE INDEX IF NOT EXISTS dw_scheduler_fires_job_idx ON etl.dw_scheduler_fires (job_id, scheduled_for DESC);

-- -- alerts -------------------------------------------------------------------------------------------
-- Streak state per alert subject (a job, a transform procedure, a quality check): one failure alert
-- when a streak starts, nothing while it lasts, one recovery message when it ends. Updated under a
-- row lock so two processes evaluating at once never both send.
CREATE TABLE IF NOT EXISTS etl.dw_alert_state (
    alert_key          varchar(200) PRIMARY KEY,
    kind               varchar(20)  NOT NULL CHECK (kind IN ('job', 'transform', 'quality')),
    subject            varchar(255) NOT NULL,
    state              varchar(10)  NOT NULL CHECK (state IN ('ok', 'failing')),
    streak_started_at  timestamptz,
    failures           integer      NOT NULL DEFAULT 0,
    last_event         varchar(100),
    last_error         text,
    alerted_at         timestamptz,
    -- a message not yet delivered to every channel (SMTP down...): retried at the next evaluation
    pending_kind       varchar(10)  CHECK (pending_kind IN ('failure', 'recovery')),
    pending_channels   text[]       NOT NULL DEFAULT '{}',
    recovered_at       timestamptz,
    updated_at         timestamptz  NOT NULL DEFAULT now()
);

-- Every delivery attempt, per channel (audit trail; never holds a secret: no webhook URL, no password).
CREATE TABLE IF NOT EXISTS etl.dw_alerts_sent (
    id          bigserial PRIMARY KEY,
    alert_key   varchar(200) NOT NULL,
    kind        varchar(10)  NOT NULL CHECK (kind IN ('failure', 'recovery')),
    channel     varchar(10)  NOT NULL CHECK (channel IN ('email', 'slack')),
    ok          boolean      NOT NULL,
    title       text         NOT NULL,
    error       text,
    sent_at     timestamptz  NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dw_alerts_sent_key_idx ON etl.dw_alerts_sent (alert_key, sent_at DESC);

GRANT SELECT, INSERT, UPDATE, DELETE ON etl.dw_orchestrations, etl.dw_scheduler_fires, etl.dw_alert_state,
    etl.dw_alerts_sent TO trialsync_etl;
GRANT USAGE, SELECT, UPDATE ON SEQUENCE etl.dw_scheduler_fires_id_seq, etl.dw_alerts_sent_id_seq TO trialsync_etl;
GRANT SELECT ON etl.dw_orchestrations, etl.dw_scheduler_fires, etl.dw_alert_state, etl.dw_alerts_sent
    TO trialsync_analytics;
