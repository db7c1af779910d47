-- A fire whose scheduler process died before it finished (kill -9, OOM, a node lost) is marked
-- 'abandoned' by the next scheduler that starts on the same host. The catch-up reference ignores
-- abandoned and cancelled fires (orchestrator/scheduler.py), so that start runs the interrupted
-- fire again (within SCHEDULER_MISFIRE_GRACE_SECONDS) instead of treating it as done.
-- `pid` is now the scheduler's OS process id (it held the database backend's, useless for that).

DO $$
DECLARE
    c text;
BEGIN
    FOR c IN SELECT conname FROM pg_constraint
              WHERE conrelid = 'etl.dw_scheduler_fires'::regclass AND contype = 'c'
                AND pg_get_constraintdef(oid) LIKE '%outcome%'
    LOOP
        EXECUTE format('ALTER TABLE etl.dw_scheduler_fires DROP CONSTRAINT %I', c);
    END LOOP;
END
$$;

ALTER TABLE etl.dw_scheduler_fires ADD CONSTRAINT dw_scheduler_fires_outcome_check
    CHECK (outcome IN ('running', 'success', 'partial', 'failed', 'skipped', 'reused', 'cancelled', 'missed',
                       'error', 'abandoned'));

COMMENT ON COLUMN etl.dw_scheduler_fires.pid IS
    'OS process id of the scheduler that recorded the fire (with host: tells a dead replica''s fires apart)';
