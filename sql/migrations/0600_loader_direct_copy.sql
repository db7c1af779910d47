-- The loader's direct-COPY path (consumers/staging_writer.py): a batch of new keys is COPYed
-- straight into its staging table, every payload field landing in a column -- including the
-- message timestamp, kept as lineage in kafka_timestamp_ms (the upsert path fills it too).

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
                                   ('kafka_timestamp_ms', 'bigint')) AS v(name, typ)
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
    'adds the loader fence/lineage columns to a Bronze staging table (idempotent); the loader calls it for tables created after migration 0200';
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
