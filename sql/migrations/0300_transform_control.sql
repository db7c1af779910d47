-- Transform control (issue 6): the procedure registry, run history, per-source watermarks, the
-- pseudonymisation secret, and the helper functions every Silver procedure uses.
--
-- Read with docs/transform.md. Procedures live in `silver` (dimensions, facts, the two load_all_*
-- entry points) and `gold` (materialized-view refresh); their bookkeeping lives in `etl`.

-- -- registry ------------------------------------------------------------------------------------
-- One row per procedure: what it builds, what feeds it, what must run before it. The transform
-- consumer (consumers/transform_plan.py) reads this table to decide which procedures a finished
-- Bronze table triggers and in which order; load_all_new_dimensions()/load_all_new_facts() follow
-- the same run_order. Names are checked here and quoted again in Python.
CREATE TABLE IF NOT EXISTS etl.dw_transform_procedures (
    procedure_name  varchar(127) PRIMARY KEY
                    CHECK (procedure_name ~ '^(silver|gold)\.[a-z_][a-z0-9_]{0,62}$'),
    target_table    varchar(127) NOT NULL CHECK (target_table ~ '^(silver|gold)\.[a-z_][a-z0-9_]{0,62}$'),
    layer           varchar(16)  NOT NULL CHECK (layer IN ('dimension', 'fact', 'gold')),
    run_order       integer      NOT NULL,
    -- Bronze staging tables whose end-of-run control messages trigger this procedure
    source_tables   text[]       NOT NULL DEFAULT '{}',
    -- procedures that must run before this one in the same batch (and whose change re-triggers it)
    depends_on      text[]       NOT NULL DEFAULT '{}',
    is_active       boolean      NOT NULL DEFAULT true,
    description     text         NOT NULL DEFAULT ''
);

-- -- run history ---------------------------------------------------------------------------------
-- One row per procedure execution. A batch (batch_id) is the set of procedures one coalesced group
-- of control messages (or one `transform --now`) ran; trigger_run_ids are the extraction runs
-- (etl.dw_etl_runs.id) whose data the batch transformed.
CREATE TABLE IF NOT EXISTS etl.dw_transform_runs (
    id                bigserial PRIMARY KEY,
    batch_id          uuid         NOT NULL,
    procedure_name    varchar(127) NOT NULL,
    target_table      varchar(127),
    trigger           varchar(16)  NOT NULL DEFAULT 'manual'
                      CHECK (trigger IN ('control', 'manual', 'retry', 'bench')),
    trigger_run_ids   bigint[]     NOT NULL DEFAULT '{}',
    trigger_tables    text[]       NOT NULL DEFAULT '{}',
    attempt           integer      NOT NULL DEFAULT 1,
    status            varchar(16)  NOT NULL DEFAULT 'running'
                      CHECK (status IN ('running', 'success', 'failed', 'skipped')),
    rows_inserted     bigint,
    rows_updated      bigint,
    rows_closed       bigint,
    rows_deleted      bigint,
    started_at        timestamptz  NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    duration_seconds  numeric(12, 3),
    error_class       varchar(100),
    error_message     text,
    next_retry_at     timestamptz,
    host              varchar(255),
    pid               integer,
    -- backend pid of the connection running the procedure: a 'running' row whose backend is gone
    -- was abandoned by a dead transformer (see ProcedureRunner.mark_abandoned)
    db_pid            integer
);
CREATE INDEX IF NOT EXISTS dw_transform_runs_proc_idx ON etl.dw_transform_runs (procedure_name, started_at DESC);
CREATE INDEX IF NOT EXISTS dw_transform_runs_batch_idx ON etl.dw_transform_runs (batch_id);
CREATE INDEX IF NOT EXISTS dw_transform_runs_open_idx ON etl.dw_transform_runs (status)
    WHERE status IN ('running', 'failed');

-- -- watermarks ----------------------------------------------------------------------------------
-- Incremental state: per procedure and per source table, the `updated_at` (Bronze) or
-- `etl_updated_at` (Silver) value from which the next run must read again. It is written in the
-- same transaction as the procedure's data, so it moves only when the data did.
CREATE TABLE IF NOT EXISTS etl.dw_transform_watermarks (
    procedure_name  varchar(127) NOT NULL,
    source_table    varchar(127) NOT NULL,
    watermark       timestamptz  NOT NULL,
    rows_read       bigint       NOT NULL DEFAULT 0,
    updated_at      timestamptz  NOT NULL DEFAULT now(),
    PRIMARY KEY (procedure_name, source_table)
);

-- -- pseudonymisation ----------------------------------------------------------------------------
-- Silver never stores a patient's CC id: patients are identified by a keyed hash of their source_id
-- (see etl.pseudonymize). The key is generated once per warehouse, never leaves the etl schema and
-- is not readable by trialsync_analytics.
CREATE TABLE IF NOT EXISTS etl.dw_pseudonym_secret (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    secret      text    NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO etl.dw_pseudonym_secret (secret)
SELECT replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '')
ON CONFLICT DO NOTHING;
REVOKE ALL ON etl.dw_pseudonym_secret FROM trialsync_analytics;

-- -- parsing helpers -----------------------------------------------------------------------------
-- Bronze is raw JSON from an API we do not control: a malformed value must become NULL (and be
-- caught by a quality check), never abort the whole transform. pg_input_is_valid (PG 16) tests a
-- cast without an exception block. The helpers are PL/pgSQL on purpose: a SQL-language function
-- that uses its argument twice is not inlined, and a non-inlined SQL function costs several
-- microseconds per call -- seconds per million Bronze values (measured in bench/transform_bench.py).

-- ISO-8601 text -> timestamptz. Values without an offset are UTC (CC serialises UTC).
CREATE OR REPLACE FUNCTION etl.to_ts(s text) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF s IS NULL OR s = '' THEN
        RETURN NULL;
    END IF;
    IF right(s, 1) IN ('Z', 'z') OR s ~ '[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?\s*[+-]\d{2}(:?\d{2})?$' THEN
        IF pg_input_is_valid(s, 'timestamptz') THEN
            RETURN s::timestamptz;   -- explicit offset: independent of the session's TimeZone
        END IF;
        RETURN NULL;
    END IF;
    IF pg_input_is_valid(s, 'timestamp') THEN
        RETURN s::timestamp AT TIME ZONE 'UTC';
    END IF;
    RETURN NULL;
END
$$;

-- The UTC calendar date of an ISO-8601 value. Fast path for CC's own form (2025-12-01T20:30:52.000Z):
-- its first ten characters are the UTC date.
CREATE OR REPLACE FUNCTION etl.to_date(s text) RETURNS date
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF s IS NULL OR s = '' THEN
        RETURN NULL;
    END IF;
    IF substr(s, 11, 1) = 'T' AND right(s, 1) = 'Z' AND substr(s, 5, 1) = '-'
       AND pg_input_is_valid(s, 'timestamptz') THEN
        RETURN left(s, 10)::date;
    END IF;
    RETURN (etl.to_ts(s) AT TIME ZONE 'UTC')::date;
END
$$;

CREATE OR REPLACE FUNCTION etl.to_int(s text) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF pg_input_is_valid(s, 'bigint') THEN
        RETURN s::bigint;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION etl.to_num(s text) RETURNS numeric
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF pg_input_is_valid(s, 'numeric') THEN
        RETURN s::numeric;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION etl.to_bool(s text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE lower(s) WHEN 'true' THEN true WHEN 'false' THEN false END
$$;

-- yyyymmdd integer key of dim_date (NULL for NULL).
CREATE OR REPLACE FUNCTION etl.date_key(d date) RETURNS integer
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN extract(year FROM d)::int * 10000 + extract(month FROM d)::int * 100 + extract(day FROM d)::int;
END
$$;

-- The source_id of a record another record refers to: same CC instance, the referenced entity id.
-- ('cc1:42', '7') -> 'cc1:7'. source_id is '<instance>:<key>' and instance ids contain no ':'.
CREATE OR REPLACE FUNCTION etl.ref_id(owner_source_id text, ref text) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    IF ref IS NULL OR ref = '' THEN
        RETURN NULL;
    END IF;
    RETURN split_part(owner_source_id, ':', 1) || ':' || ref;
END
$$;

-- Stable pseudonym of a patient: keyed SHA-256 of its source_id. Deterministic (joins from subjects
-- and visits find the same patient), not reversible without etl.dw_pseudonym_secret.
CREATE OR REPLACE FUNCTION etl.pseudonymize(source_id text) RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    k text;
BEGIN
    IF source_id IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT secret INTO k FROM etl.dw_pseudonym_secret;
    RETURN encode(sha256(convert_to(k || '|' || source_id, 'UTF8')), 'hex');
END
$$;

-- -- incremental state helpers -------------------------------------------------------------------

-- Serialise runs of one procedure across processes (a consumer and a `transform --now`, two
-- consumer instances): two concurrent SCD2 merges of the same table could both open a version.
CREATE OR REPLACE FUNCTION etl.transform_lock(procedure_name text) RETURNS void
LANGUAGE sql VOLATILE AS $$
    SELECT pg_advisory_xact_lock(hashtextextended('trialsync.transform:' || procedure_name, 0))
$$;

-- The watermark hazard: the loader stamps updated_at = now(), its *transaction start*. A loader
-- transaction that started before our read but commits after it writes rows whose updated_at lies
-- below anything we could observe -- a naive "max(updated_at) seen" watermark would skip them
-- forever. The safe horizon is therefore the start of the oldest transaction still open in this
-- database (every row not yet visible carries an updated_at at or after it), capped by the clock
-- and lowered by a small margin for a transaction that had begun but not yet published its start
-- time. Procedures read `updated_at >= watermark` and store this horizon as the next watermark;
-- rows between the horizon and the read are simply read twice (procedures are idempotent).
--
-- Sessions whose activity this role may not see (pg_stat_activity hides xact_start of other roles
-- unless the role has pg_read_all_stats) are handled conservatively: the horizon falls back to
-- clock - trialsync.watermark_hidden_overlap (default 10 minutes).
CREATE OR REPLACE FUNCTION etl.transform_horizon() RETURNS timestamptz
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_clock   timestamptz;
    v_oldest  timestamptz;
    v_hidden  boolean;
    v_margin  interval := coalesce(nullif(current_setting('trialsync.watermark_margin', true), '')::interval,
                                   interval '2 seconds');
    v_overlap interval := coalesce(nullif(current_setting('trialsync.watermark_hidden_overlap', true), '')::interval,
                                   interval '10 minutes');
BEGIN
    v_clock := clock_timestamp();
    -- pg_stat_activity is cached for the rest of the transaction after the first read; a procedure
    -- called after another in the same transaction must see the sessions of *now*.
    PERFORM pg_stat_clear_snapshot();
    -- rows this role may not inspect show NULL for backend_type, state and xact_start
    SELECT min(a.xact_start) FILTER (WHERE a.backend_type = 'client backend'),
           bool_or(a.backend_type IS NULL)
      INTO v_oldest, v_hidden
      FROM pg_stat_activity a
     WHERE a.pid <> pg_backend_pid()
       AND a.datname = current_database()
       AND (a.backend_type = 'client backend' OR a.backend_type IS NULL);
    IF coalesce(v_hidden, false) THEN
        v_oldest := least(v_oldest, v_clock - v_overlap);
    END IF;
    RETURN least(v_clock, v_oldest) - v_margin;
END
$$;

CREATE OR REPLACE FUNCTION etl.transform_watermark(p_procedure text, p_source text) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT w.watermark FROM etl.dw_transform_watermarks w
                      WHERE w.procedure_name = p_procedure AND w.source_table = p_source),
                    '-infinity'::timestamptz)
$$;

-- Advance (never move back) a watermark; called by a procedure at its end, same transaction.
CREATE OR REPLACE FUNCTION etl.set_transform_watermark(p_procedure text, p_source text, p_horizon timestamptz,
                                                       p_rows bigint DEFAULT 0) RETURNS void
LANGUAGE sql VOLATILE AS $$
    INSERT INTO etl.dw_transform_watermarks AS w (procedure_name, source_table, watermark, rows_read, updated_at)
    VALUES (p_procedure, p_source, p_horizon, coalesce(p_rows, 0), now())
    ON CONFLICT (procedure_name, source_table) DO UPDATE
        SET watermark = greatest(w.watermark, excluded.watermark),
            rows_read = excluded.rows_read,
            updated_at = excluded.updated_at
$$;

-- When each Silver table last changed (any row inserted, updated, closed or deleted), written by its
-- procedure in the same transaction as the change. The gold refresh reads it to skip a refresh when
-- nothing it depends on changed -- crash-safe, unlike a flag kept in the consumer's memory.
CREATE TABLE IF NOT EXISTS etl.dw_transform_changes (
    table_name  varchar(127) PRIMARY KEY,
    changed_at  timestamptz  NOT NULL,
    rows        bigint       NOT NULL DEFAULT 0
);

CREATE OR REPLACE FUNCTION etl.note_change(p_table text, p_rows bigint) RETURNS void
LANGUAGE sql VOLATILE AS $$
    INSERT INTO etl.dw_transform_changes AS c (table_name, changed_at, rows)
    SELECT p_table, now(), p_rows WHERE coalesce(p_rows, 0) > 0
    ON CONFLICT (table_name) DO UPDATE SET changed_at = excluded.changed_at, rows = excluded.rows
$$;

-- Forget the incremental state of one procedure (or all): the next run re-reads all of Bronze.
-- Safe at any time because every procedure is idempotent.
CREATE OR REPLACE FUNCTION etl.reset_transform_watermarks(p_procedure text DEFAULT NULL) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    WITH d AS (DELETE FROM etl.dw_transform_watermarks
                WHERE p_procedure IS NULL OR procedure_name = p_procedure RETURNING 1)
    SELECT count(*) FROM d
$$;

-- -- status views --------------------------------------------------------------------------------

-- Latest run of every registered procedure, and its last success/failure: what
-- `trialsync transform --status` and `trialsync status` show.
CREATE OR REPLACE VIEW etl.v_transform_status AS
SELECT p.procedure_name,
       p.target_table,
       p.layer,
       p.run_order,
       l.status            AS last_status,
       l.started_at        AS last_started_at,
       l.finished_at       AS last_finished_at,
       l.duration_seconds  AS last_duration_seconds,
       l.rows_inserted, l.rows_updated, l.rows_closed, l.rows_deleted,
       l.error_class, l.error_message, l.attempt, l.next_retry_at,
       s.last_success_at,
       f.last_failure_at,
       (f.last_failure_at IS NOT NULL AND (s.last_success_at IS NULL OR f.last_failure_at > s.last_success_at))
                           AS is_failing
  FROM etl.dw_transform_procedures p
  LEFT JOIN LATERAL (SELECT * FROM etl.dw_transform_runs r
                      WHERE r.procedure_name = p.procedure_name AND r.status <> 'skipped'
                      ORDER BY r.started_at DESC, r.id DESC LIMIT 1) l ON true
  LEFT JOIN LATERAL (SELECT max(r.finished_at) AS last_success_at FROM etl.dw_transform_runs r
                      WHERE r.procedure_name = p.procedure_name AND r.status = 'success') s ON true
  LEFT JOIN LATERAL (SELECT max(r.finished_at) AS last_failure_at FROM etl.dw_transform_runs r
                      WHERE r.procedure_name = p.procedure_name AND r.status = 'failed') f ON true;

GRANT SELECT ON etl.dw_transform_procedures, etl.dw_transform_runs, etl.dw_transform_watermarks,
                etl.v_transform_status TO trialsync_analytics;

-- The horizon needs every session's xact_start; pg_stat_activity shows it for other roles' sessions
-- only to members of pg_read_all_stats. Grant it where the migrating role may; elsewhere the
-- horizon falls back to the conservative overlap above (documented in docs/transform.md).
DO $$
BEGIN
    GRANT pg_read_all_stats TO trialsync_etl;
EXCEPTION WHEN insufficient_privilege OR invalid_grant_operation THEN
    RAISE NOTICE 'could not grant pg_read_all_stats to trialsync_etl; transform watermarks use the hidden-session overlap';
END
$$;
