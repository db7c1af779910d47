-- TrialSync control schema: job catalog, runs, credentials, watermarks, rejects, and the staging
-- table factory. Schemas separate duties: etl (control), bronze (raw staging), silver (model),
-- gold (serving).

CREATE SCHEMA IF NOT EXISTS etl;
CREATE SCHEMA IF NOT EXISTS bronze;
CREATE SCHEMA IF NOT EXISTS silver;
CREATE SCHEMA IF NOT EXISTS gold;

-- Where each Clinical Conductor instance lives. The API key is never stored in plain text: the row
-- names the environment variable (or secret-store entry) that holds it.
CREATE TABLE IF NOT EXISTS etl.dw_api_credentials (
    id               serial PRIMARY KEY,
    instance_name    varchar(255) NOT NULL UNIQUE,
    instance_id      varchar(64)  NOT NULL UNIQUE CHECK (instance_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    base_url         varchar(500) NOT NULL CHECK (base_url ~ '^https?://'),
    api_key_env      varchar(128) NOT NULL CHECK (api_key_env ~ '^[A-Z_][A-Z0-9_]*$'),
    api_key_header   varchar(64)  NOT NULL DEFAULT 'X-ApiKey',
    rate_limit_rps   numeric      NOT NULL DEFAULT 0 CHECK (rate_limit_rps >= 0),
    is_active        boolean      NOT NULL DEFAULT true,
    created_at       timestamptz  NOT NULL DEFAULT now(),
    updated_at       timestamptz  NOT NULL DEFAULT now()
);
COMMENT ON COLUMN etl.dw_api_credentials.api_key_env IS
    'name of the environment variable holding the API key; the key itself is never stored';

CREATE TABLE IF NOT EXISTS etl.dw_etl_jobs (
    id                      integer PRIMARY KEY,
    name                    varchar(255) NOT NULL,
    source_endpoint         varchar(500) NOT NULL,
    target_table            varchar(255) NOT NULL CHECK (target_table ~ '^[a-z_][a-z0-9_]{0,62}$'),
    is_active               boolean NOT NULL DEFAULT true,
    is_valid                boolean NOT NULL DEFAULT true,
    invalid_reason          text,
    requires_parameters     boolean NOT NULL DEFAULT false,
    parameter_source_table  varchar(255) CHECK (parameter_source_table ~ '^[a-z_][a-z0-9_]{0,62}$'),
    parameter_source_column varchar(255),
    parameters              jsonb NOT NULL DEFAULT '{}'::jsonb,
    primary_key             text[] NOT NULL DEFAULT ARRAY['id'],
    source_instance_id      integer REFERENCES etl.dw_api_credentials(id),
    source_type             varchar(32) NOT NULL DEFAULT 'cc_api',
    source_options          jsonb NOT NULL DEFAULT '{}'::jsonb,
    category                varchar(64) NOT NULL,
    depends_on              integer[] NOT NULL DEFAULT '{}',
    schedule                varchar(100),
    priority                integer NOT NULL DEFAULT 5,
    timeout_seconds         integer CHECK (timeout_seconds > 0),
    incremental             boolean NOT NULL DEFAULT false,
    timestamp_field         varchar(64) NOT NULL DEFAULT 'modifiedDate',
    page_size               integer NOT NULL DEFAULT 1000 CHECK (page_size BETWEEN 1 AND 1000),
    fix_reasons             text[] NOT NULL DEFAULT '{}',
    last_run_id             bigint,
    last_run_at             timestamptz,
    last_run_status         varchar(50),
    last_run_records        bigint,
    last_success_at         timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dw_etl_jobs_category_idx ON etl.dw_etl_jobs (category);

CREATE TABLE IF NOT EXISTS etl.dw_etl_runs (
    id                 bigserial PRIMARY KEY,
    job_id             integer NOT NULL REFERENCES etl.dw_etl_jobs(id),
    run_status         varchar(50) NOT NULL DEFAULT 'running'
                       CHECK (run_status IN ('pending', 'running', 'success', 'partial', 'failed', 'skipped', 'cancelled')),
    mode               varchar(20) NOT NULL DEFAULT 'full' CHECK (mode IN ('full', 'incremental', 'retry', 'replay')),
    trigger            varchar(32) NOT NULL DEFAULT 'cli',
    parent_run_id      bigint REFERENCES etl.dw_etl_runs(id),
    orchestration_id   uuid,
    attempt            integer NOT NULL DEFAULT 1,
    records_extracted  bigint NOT NULL DEFAULT 0,
    records_published  bigint NOT NULL DEFAULT 0,
    records_loaded     bigint NOT NULL DEFAULT 0,
    records_rejected   bigint NOT NULL DEFAULT 0,
    api_calls          bigint NOT NULL DEFAULT 0,
    parents_total      integer,
    parents_done       integer,
    parents_failed     integer,
    error_class        varchar(100),
    error_message      text,
    run_context        jsonb NOT NULL DEFAULT '{}'::jsonb,
    watermark_from     timestamptz,
    watermark_to       timestamptz,
    started_at         timestamptz NOT NULL DEFAULT now(),
    heartbeat_at       timestamptz NOT NULL DEFAULT now(),
    completed_at       timestamptz,
    load_completed_at  timestamptz,
    duration_seconds   numeric(12, 3),
    host               varchar(255),
    pid                integer
);
CREATE INDEX IF NOT EXISTS dw_etl_runs_job_started_idx ON etl.dw_etl_runs (job_id, started_at DESC);
CREATE INDEX IF NOT EXISTS dw_etl_runs_open_idx ON etl.dw_etl_runs (run_status) WHERE run_status IN ('running', 'pending');
CREATE INDEX IF NOT EXISTS dw_etl_runs_orchestration_idx ON etl.dw_etl_runs (orchestration_id) WHERE orchestration_id IS NOT NULL;

-- Incremental state mirrored from the compacted watermark topic: per job, and per parent value for
-- parameterized jobs ('' = the whole job).
CREATE TABLE IF NOT EXISTS etl.dw_etl_watermarks (
    job_id       integer NOT NULL REFERENCES etl.dw_etl_jobs(id),
    parent_key   text NOT NULL DEFAULT '',
    field        varchar(64) NOT NULL,
    value        timestamptz NOT NULL,
    run_id       bigint,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, parent_key)
);

-- Every record that could not be loaded, with the reason and where it came from (the dead-letter
-- topic holds the same, for replay).
CREATE TABLE IF NOT EXISTS etl.dw_etl_rejects (
    id             bigserial PRIMARY KEY,
    table_name     varchar(255),
    topic          varchar(255),
    kafka_partition integer,
    kafka_offset   bigint,
    record_key     text,
    job_id         integer,
    run_id         bigint,
    stage          varchar(32) NOT NULL DEFAULT 'load' CHECK (stage IN ('extract', 'load', 'transform')),
    error_class    varchar(100) NOT NULL,
    error_message  text NOT NULL,
    payload        text,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dw_etl_rejects_run_idx ON etl.dw_etl_rejects (run_id);
CREATE INDEX IF NOT EXISTS dw_etl_rejects_table_idx ON etl.dw_etl_rejects (table_name, created_at DESC);
CREATE UNIQUE INDEX IF NOT EXISTS dw_etl_rejects_source_uq ON etl.dw_etl_rejects (topic, kafka_partition, kafka_offset)
    WHERE topic IS NOT NULL AND kafka_offset IS NOT NULL;

-- The staging-table factory: one Bronze table per target_table, all with the seed's column pattern
-- plus what exact loading needs (unique source_id, soft delete, Kafka lineage). The name is
-- validated here as well as in Python, and only ever quoted with format('%I').
CREATE OR REPLACE FUNCTION etl.create_staging_table(t text) RETURNS boolean
LANGUAGE plpgsql AS $fn$
BEGIN
    IF t IS NULL OR t !~ '^[a-z_][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'staging table name % is not a safe identifier', quote_literal(coalesce(t, 'NULL'))
            USING ERRCODE = 'invalid_name';
    END IF;
    IF to_regclass(format('bronze.%I', t)) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format($ddl$
        CREATE TABLE bronze.%1$I (
            id                  bigserial PRIMARY KEY,
            data                jsonb NOT NULL,
            source_id           varchar(255) NOT NULL,
            source_instance_id  varchar(64),
            etl_job_id          integer,
            etl_run_id          bigint,
            source_modified_at  timestamptz,
            is_deleted          boolean NOT NULL DEFAULT false,
            deleted_at          timestamptz,
            kafka_partition     integer,
            kafka_offset        bigint,
            loaded_at           timestamptz NOT NULL DEFAULT now(),
            created_at          timestamptz NOT NULL DEFAULT now(),
            updated_at          timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT %2$I UNIQUE (source_id)
        )$ddl$, t, left(t, 50) || '_source_id_key');
    EXECUTE format('CREATE INDEX %I ON bronze.%I (updated_at)', left(t, 50) || '_updated_idx', t);
    EXECUTE format('COMMENT ON TABLE bronze.%I IS %L', t,
                   'Bronze staging: one row per source record (source_id = <instance>:<entity key>), latest content in data');
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trialsync_etl') THEN
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON bronze.%I TO trialsync_etl', t);
        EXECUTE format('GRANT USAGE ON SEQUENCE %s TO trialsync_etl', pg_get_serial_sequence(format('bronze.%I', t), 'id'));
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'trialsync_analytics') THEN
        EXECUTE format('GRANT SELECT ON bronze.%I TO trialsync_analytics', t);
    END IF;
    RETURN true;
END
$fn$;
