-- The loader's content hash (consumers/staging_writer.py): content_hash = the first 128 bits of
-- SHA-256 of the record's value bytes as published (the extractor sends it in the ts-load-v1
-- header; for records without it the loader computes the same in SQL). A re-load compares hashes
-- against the stored ones before touching a row, so an unchanged record costs an index probe
-- instead of a JSON parse, a row lock and WAL. NULL (rows loaded before this migration) means
-- "unknown": such a row is compared by its data once and gets its hash then.

CREATE OR REPLACE FUNCTION etl.add_loader_columns(t text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    added boolean := false;
    c record;
BEGIN
    IF t IS NULL OR t !~ '^[a-z_][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'staging table name % is not a safe identifier', quote_literal(coalesce(t, 'NULL'))
            USING ERRCODE = 'invalid_name';
    END IF;
    IF to_regclass(format('bronze.%I', t)) IS NULL THEN
        RETURN false;
    END IF;
    FOR c IN SELECT * FROM (VALUES ('extracted_at', 'timestamptz'), ('source_params', 'jsonb'),
                                   ('kafka_timestamp_ms', 'bigint'), ('content_hash', 'uuid')) AS v(name, typ)
    LOOP
        IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                       WHERE table_schema = 'bronze' AND table_name = t AND column_name = c.name) THEN
            EXECUTE format('ALTER TABLE bronze.%I ADD COLUMN IF NOT EXISTS %I %s', t, c.name, c.typ);
            added := true;
        END IF;
    END LOOP;
    RETURN added;
END
$fn$;
COMMENT ON FUNCTION etl.add_loader_columns(text) IS
    'adds the loader fence/lineage/content-hash columns to a Bronze staging table (idempotent); the loader calls it for tables created after migration 0200';
GRANT EXECUTE ON FUNCTION etl.add_loader_columns(text) TO trialsync_etl;

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
