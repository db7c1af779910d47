-- A night's API call budget (ETL_CALL_BUDGET, or ETL_NIGHT_WINDOW_HOURS x CC_RATE_LIMIT_RPS), one
-- row per orchestration. Runs of fan-out jobs claim calls from it (producers/call_plan.py): changed
-- parents first, then the sweep and unfinished first passes -- but never the calls the jobs still to
-- run need for their own changed parents (`planned`). What a run does not use is given back.
CREATE TABLE IF NOT EXISTS etl.dw_call_budgets (
    orchestration_id  uuid PRIMARY KEY,
    budget            bigint      NOT NULL CHECK (budget >= 0),
    -- calls granted to runs (what they made, once they ended)
    reserved          bigint      NOT NULL DEFAULT 0,
    -- job id -> calls its changed parents are expected to need, until the job claims its share
    planned           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- job id -> {granted, used, left: {changed, swept, unfinished, rest}}
    claims            jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE etl.dw_call_budgets IS
    'API call budget of one orchestration (a night); fan-out runs claim from it, changed parents first';

GRANT SELECT, INSERT, UPDATE, DELETE ON etl.dw_call_budgets TO trialsync_etl;
GRANT SELECT ON etl.dw_call_budgets TO trialsync_analytics;
