-- Loader bookkeeping (issue 5): committed positions per consumer group, the stale-write fence
-- columns on every Bronze staging table, and an index for runs waiting to be marked loaded.

-- Where each loader group stands, written in the SAME transaction as the batch it describes, so
-- "the group has committed past offset X" can be evaluated in SQL without asking the broker
-- (tansu's ListOffsets is unreliable) and survives a lost offset commit. next_offset = offset of
-- the next message to read; updated_at = commit time of the batch that set it (compared with
-- dw_etl_runs.started_at so a position left over from before an embedded-broker restart, whose
-- topics restart at offset 0, never marks a newer run as loaded).
CREATE TABLE IF NOT EXISTS etl.loader_positions (
    group_id        varchar(255) NOT NULL,
    topic           varchar(255) NOT NULL,
    kafka_partition integer      NOT NULL,
    next_offset     bigint       NOT NULL,
    updated_at      timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, kafka_partition, group_id)
);
COMMENT ON TABLE etl.loader_positions IS
    'loader consumer-group positions (next offset to read), committed with each batch; see consumers/loader.py';

-- Per run, per partition: how far the loader has got with that run's records and how many it
-- loaded or rejected. Written in the batch transaction; max_offset doubles as the guard that keeps
-- counts exact when a batch is replayed after a crash (messages at or below it were counted) and,
-- being keyed by run id, it is immune to offsets restarting at 0 after an embedded-broker
-- restart. A run is loaded when, for every partition of its end_offsets, max_offset >= end offset
-- (the record at the end offset is the run's own last record there).
CREATE TABLE IF NOT EXISTS etl.loader_run_partitions (
    run_id           bigint       NOT NULL,
    topic            varchar(255) NOT NULL,
    kafka_partition  integer      NOT NULL,
    max_offset       bigint       NOT NULL,
    records_loaded   bigint       NOT NULL DEFAULT 0,
    records_rejected bigint       NOT NULL DEFAULT 0,
    updated_at       timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, topic, kafka_partition)
);
COMMENT ON TABLE etl.loader_run_partitions IS
    'loader progress per run and partition (max offset seen, records loaded/rejected); see consumers/run_progress.py';

-- The fence columns. extracted_at = ts-extracted-at header of the message whose content the row
-- holds (fallback: the message timestamp); an incoming message overwrites a row only when its
-- (extracted_at, kafka_offset) is not older, so a consumer that lost its partitions cannot write
-- stale content over what the new owner wrote. source_params = ts-params (parent parameters of a
-- parameterized job).
CREATE OR REPLACE FUNCTION etl.add_loader_columns(t text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    added boolean := false;
BEGIN
    IF t IS NULL OR t !~ '^[a-z_][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'staging table name % is not a safe identifier', quote_literal(coalesce(t, 'NULL'))
            USING ERRCODE = 'invalid_name';
    END IF;
    IF to_regclass(format('bronze.%I', t)) IS NULL THEN
        RETURN false;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = 'bronze' AND table_name = t AND column_name = 'extracted_at') THEN
        EXECUTE format('ALTER TABLE bronze.%I ADD COLUMN IF NOT EXISTS extracted_at timestamptz', t);
        added := true;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = 'bronze' AND table_name = t AND column_name = 'source_params') THEN
        EXECUTE format('ALTER TABLE bronze.%I ADD COLUMN IF NOT EXISTS source_params jsonb', t);
        added := true;
    END IF;
    RETURN added;
END
$fn$;
COMMENT ON FUNCTION etl.add_loader_columns(text) IS
    'adds the loader fence/lineage columns to a Bronze staging table (idempotent); the loader calls it for tables created after migration 0200';

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT c.table_name FROM information_schema.columns c
             WHERE c.table_schema = 'bronze' AND c.column_name = 'source_id'
               AND c.table_name ~ '^[a-z_][a-z0-9_]{0,62}$'
    LOOP
        PERFORM etl.add_loader_columns(r.table_name);
    END LOOP;
END
$$;

-- Runs whose load is not yet marked complete, found by topic.
CREATE INDEX IF NOT EXISTS dw_etl_runs_load_pending_idx ON etl.dw_etl_runs ((run_context ->> 'topic'))
    WHERE load_completed_at IS NULL;

GRANT SELECT, INSERT, UPDATE, DELETE ON etl.loader_positions TO trialsync_etl;
GRANT SELECT ON etl.loader_positions TO trialsync_analytics;
GRANT SELECT, INSERT, UPDATE, DELETE ON etl.loader_run_partitions TO trialsync_etl;
GRANT SELECT ON etl.loader_run_partitions TO trialsync_analytics;
GRANT EXECUTE ON FUNCTION etl.add_loader_columns(text) TO trialsync_etl;
