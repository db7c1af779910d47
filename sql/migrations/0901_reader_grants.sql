-- The history API and analysts log in as trialsync_reader (member of trialsync_analytics). Under
-- that role `GET /api/v1/runs/<id>` answered a plain-text 500 ("permission denied for table
-- dw_etl_rejects"): grant what the run history needs to read. Still not readable by analysts: the
-- API credentials and the pseudonymisation key (and transform scratch tables).

GRANT SELECT ON etl.dw_etl_rejects, etl.dw_etl_watermarks, etl.schema_migrations TO trialsync_analytics;

-- Quality checks run their check_sql under the read-only role (consumers/quality.py), and the
-- patients reconciliation compares against etl.pseudonymize(source_id), whose key the role may not
-- read. The function now runs with its owner's rights (fixed search_path, the key stays
-- unreadable); analysts, who already read Bronze's raw records, gain nothing they could not join.
ALTER FUNCTION etl.pseudonymize(text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION etl.pseudonymize(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION etl.pseudonymize(text) TO trialsync_etl, trialsync_analytics;
