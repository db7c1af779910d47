-- Least privilege (seed 004): the ETL writer role owns the work, the analytics role reads.
-- Both are NOLOGIN group roles; grant them to real login users, e.g.
--   CREATE ROLE loader LOGIN PASSWORD '...' IN ROLE trialsync_etl;
-- Roles are cluster-wide, so creation tolerates a concurrent creator (another database, a
-- concurrent migrate).

DO $$
BEGIN
    BEGIN
        CREATE ROLE trialsync_etl NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    BEGIN
        CREATE ROLE trialsync_analytics NOLOGIN;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
END
$$;

GRANT USAGE ON SCHEMA etl, bronze, silver, gold TO trialsync_etl;
GRANT CREATE ON SCHEMA bronze, silver, gold TO trialsync_etl;
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA etl, bronze, silver, gold TO trialsync_etl;
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA etl, bronze, silver, gold TO trialsync_etl;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA etl TO trialsync_etl;

-- analytics: read the model and the raw layer, read run history, write nothing
GRANT USAGE ON SCHEMA bronze, silver, gold, etl TO trialsync_analytics;
GRANT SELECT ON ALL TABLES IN SCHEMA bronze, silver, gold TO trialsync_analytics;
GRANT SELECT ON etl.dw_etl_jobs, etl.dw_etl_runs TO trialsync_analytics;
REVOKE ALL ON etl.dw_api_credentials FROM trialsync_analytics;

-- objects created later by the migrating role inherit the same grants
ALTER DEFAULT PRIVILEGES IN SCHEMA etl, bronze, silver, gold
    GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON TABLES TO trialsync_etl;
ALTER DEFAULT PRIVILEGES IN SCHEMA etl, bronze, silver, gold
    GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO trialsync_etl;
ALTER DEFAULT PRIVILEGES IN SCHEMA etl, silver, gold
    GRANT EXECUTE ON FUNCTIONS TO trialsync_etl;
ALTER DEFAULT PRIVILEGES IN SCHEMA bronze, silver, gold
    GRANT SELECT ON TABLES TO trialsync_analytics;
