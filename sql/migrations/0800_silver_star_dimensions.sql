-- The rest of the star, dimensions (issue 19): the protocol schedule (dim_study_visits, dim_elements),
-- the study arms and staff assignments over time (Type 2), rooms and monitors (Type 1).
--
-- Same conventions as 0301 (read it first): values parsed once per row (fenced subqueries), one
-- snapshot of the changed Bronze rows per run (updated_at >= the procedure's watermark), set-based
-- merges that change nothing when nothing changed (row_hash), the watermark advanced to the safe
-- horizon in the same transaction, soft deletes (Type 1: flag; Type 2: a deleted current version),
-- related entities referenced by durable source_id. Why each table is Type 1 or Type 2:
-- docs/transform.md ("The model").

-- Parent parameters of the study-level jobs (source_params, the loader's ts-params column; added by
-- 0200 to every Bronze table -- repeated here so these migrations do not depend on its order).
ALTER TABLE bronze.dim_visits_staging ADD COLUMN IF NOT EXISTS source_params jsonb;
ALTER TABLE bronze.dim_study_arms_staging ADD COLUMN IF NOT EXISTS source_params jsonb;
ALTER TABLE bronze.dim_study_visit_arms_staging ADD COLUMN IF NOT EXISTS source_params jsonb;
ALTER TABLE bronze.dim_study_personnel_staging ADD COLUMN IF NOT EXISTS source_params jsonb;

-- The study id of a record fetched per study: its own preview when it has one, else the parent
-- parameter, else the first part of a '<instance>:<studyId>|<key>' source id.
CREATE OR REPLACE FUNCTION etl.study_ref(p_source_id text, p_data jsonb, p_params jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN etl.ref_id(p_source_id, coalesce(p_data->'study'->>'id', p_data->'study'->>'Id', p_params->>'studyId',
                                            nullif(split_part(split_part(p_source_id, ':', 2), '|', 1), '')));
END
$$;

-- -- dim_study_visits (Type 1): the protocol's visit definitions ----------------------------------
CREATE TABLE IF NOT EXISTS silver.dim_study_visits (
    study_visit_key     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id           varchar(255) NOT NULL UNIQUE,
    instance_id         varchar(64)  NOT NULL,
    visit_id            bigint,
    visit_uid           varchar(64),
    study_source_id     varchar(255),
    visit_name          text,
    visit_type          text,
    protocol_version    text,
    arm_names           text[],
    budget              numeric(14, 2),
    cost                numeric(14, 2),
    patient_stipend     numeric(14, 2),
    caregiver_stipend   numeric(14, 2),
    is_active           boolean,
    auto_repeat         boolean,
    source_modified_at  timestamptz,
    row_hash            uuid         NOT NULL,
    is_deleted          boolean      NOT NULL DEFAULT false,
    deleted_at          timestamptz,
    etl_inserted_at     timestamptz  NOT NULL DEFAULT now(),
    etl_updated_at      timestamptz  NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dim_study_visits_study_idx ON silver.dim_study_visits (study_source_id);
COMMENT ON TABLE silver.dim_study_visits IS
    'The protocol schedule: one row per study visit definition (VisitViewModel, job 11), Type 1. A patient '
    'visit (fact_visit_timelines) and an appointment (fact_appointments) are instances of one.';

CREATE OR REPLACE PROCEDURE silver.load_dim_study_visits(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_dim_study_visits';
    v_to   timestamptz;
    v_from timestamptz;
    v_read bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.dim_visits_staging');

    DROP TABLE IF EXISTS pg_temp._src_dim_study_visits;
    CREATE TEMP TABLE _src_dim_study_visits ON COMMIT DROP AS
    SELECT x.*, md5(row(x.visit_id, x.visit_uid, x.study_source_id, x.visit_name, x.visit_type, x.protocol_version,
                        x.arm_names, x.budget, x.cost, x.patient_stipend, x.caregiver_stipend, x.is_active,
                        x.auto_repeat)::text)::uuid AS row_hash
      FROM (SELECT b.source_id, split_part(b.source_id, ':', 1) AS instance_id,
                   etl.to_int(b.data->>'id') AS visit_id, b.data->>'uid' AS visit_uid,
                   etl.study_ref(b.source_id, b.data, b.source_params) AS study_source_id,
                   b.data->>'name' AS visit_name, b.data->>'type' AS visit_type,
                   coalesce(b.data->'protocolVersion'->>'name', b.data->'protocolVersion'->>'Name') AS protocol_version,
                   (SELECT array_agg(coalesce(a->>'Name', a->>'name') ORDER BY coalesce(a->>'Name', a->>'name'))
                      FROM jsonb_array_elements(CASE WHEN jsonb_typeof(b.data->'arms') = 'array'
                                                     THEN b.data->'arms' ELSE '[]'::jsonb END) a) AS arm_names,
                   round(etl.to_num(b.data->>'budget'), 2) AS budget, round(etl.to_num(b.data->>'cost'), 2) AS cost,
                   round(etl.to_num(b.data->>'patientStipend'), 2) AS patient_stipend,
                   round(etl.to_num(b.data->>'caregiverStipend'), 2) AS caregiver_stipend,
                   etl.to_bool(b.data->>'isActive') AS is_active, etl.to_bool(b.data->>'autoRepeat') AS auto_repeat,
                   etl.to_ts(coalesce(b.data->>'modifiedDate', b.data->>'modifiedOn')) AS source_modified_at,
                   b.is_deleted, CASE WHEN b.is_deleted THEN coalesce(b.deleted_at, b.updated_at) END AS deleted_at
              FROM bronze.dim_visits_staging b
             WHERE b.updated_at >= v_from
            OFFSET 0) x;
    GET DIAGNOSTICS v_read = ROW_COUNT;

    WITH up AS (
        INSERT INTO silver.dim_study_visits AS d
               (source_id, instance_id, visit_id, visit_uid, study_source_id, visit_name, visit_type, protocol_version,
                arm_names, budget, cost, patient_stipend, caregiver_stipend, is_active, auto_repeat, source_modified_at,
                row_hash, is_deleted, deleted_at)
        SELECT source_id, instance_id, visit_id, visit_uid, study_source_id, visit_name, visit_type, protocol_version,
               arm_names, budget, cost, patient_stipend, caregiver_stipend, is_active, auto_repeat, source_modified_at,
               row_hash, is_deleted, deleted_at
          FROM _src_dim_study_visits
        ON CONFLICT (source_id) DO UPDATE
           SET visit_id = excluded.visit_id, visit_uid = excluded.visit_uid, study_source_id = excluded.study_source_id,
               visit_name = excluded.visit_name, visit_type = excluded.visit_type,
               protocol_version = excluded.protocol_version, arm_names = excluded.arm_names, budget = excluded.budget,
               cost = excluded.cost, patient_stipend = excluded.patient_stipend,
               caregiver_stipend = excluded.caregiver_stipend, is_active = excluded.is_active,
               auto_repeat = excluded.auto_repeat, source_modified_at = excluded.source_modified_at,
               row_hash = excluded.row_hash, is_deleted = excluded.is_deleted, deleted_at = excluded.deleted_at,
               etl_updated_at = now()
         WHERE d.row_hash IS DISTINCT FROM excluded.row_hash
            OR d.is_deleted IS DISTINCT FROM excluded.is_deleted
            OR d.source_modified_at IS DISTINCT FROM excluded.source_modified_at
        RETURNING (xmax = 0) AS was_inserted, is_deleted)
    SELECT count(*) FILTER (WHERE was_inserted), count(*) FILTER (WHERE NOT was_inserted AND NOT is_deleted),
           count(*) FILTER (WHERE NOT was_inserted AND is_deleted)
      INTO inserted, updated, closed
      FROM up;
    deleted := 0;
    PERFORM etl.note_change('silver.dim_study_visits', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_visits_staging', v_to, v_read);
END
$$;

-- -- dim_elements (Type 1): the procedures a study's visits are made of ---------------------------
CREATE TABLE IF NOT EXISTS silver.dim_elements (
    element_key            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id              varchar(255) NOT NULL UNIQUE,
    instance_id            varchar(64)  NOT NULL,
    element_id             bigint,
    element_uid            varchar(64),
    study_source_id        varchar(255),
    element_name           text,
    element_type           text,
    category               text,
    place_of_service       text,
    cpt_code               text,
    standard_minutes       integer,
    budget                 numeric(14, 2),
    cost                   numeric(14, 2),
    room_assignment_type   text,
    room_source_id         varchar(255),
    source_modified_at     timestamptz,
    row_hash               uuid         NOT NULL,
    is_deleted             boolean      NOT NULL DEFAULT false,
    deleted_at             timestamptz,
    etl_inserted_at        timestamptz  NOT NULL DEFAULT now(),
    etl_updated_at         timestamptz  NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dim_elements_study_idx ON silver.dim_elements (study_source_id);
COMMENT ON TABLE silver.dim_elements IS
    'Study elements (procedures: ElementViewModel, job 8), Type 1: standard duration, budget/cost, CPT code and '
    'room assignment (room_source_id when the assignment is one room).';

CREATE OR REPLACE PROCEDURE silver.load_dim_elements(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_dim_elements';
    v_to   timestamptz;
    v_from timestamptz;
    v_read bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.dim_elements_staging');

    DROP TABLE IF EXISTS pg_temp._src_dim_elements;
    CREATE TEMP TABLE _src_dim_elements ON COMMIT DROP AS
    SELECT x.*, md5(row(x.element_id, x.element_uid, x.study_source_id, x.element_name, x.element_type, x.category,
                        x.place_of_service, x.cpt_code, x.standard_minutes, x.budget, x.cost, x.room_assignment_type,
                        x.room_source_id)::text)::uuid AS row_hash
      FROM (SELECT b.source_id, split_part(b.source_id, ':', 1) AS instance_id,
                   etl.to_int(b.data->>'id') AS element_id, b.data->>'uid' AS element_uid,
                   etl.study_ref(b.source_id, b.data, NULL) AS study_source_id,
                   b.data->>'name' AS element_name, b.data->>'type' AS element_type,
                   b.data->>'initialCategory' AS category, b.data->>'placeOfService' AS place_of_service,
                   b.data->>'cpt' AS cpt_code, etl.to_int(b.data->>'standardTimeMinutes')::int AS standard_minutes,
                   round(etl.to_num(b.data->>'budget'), 2) AS budget, round(etl.to_num(b.data->>'cost'), 2) AS cost,
                   b.data->'roomAssignment'->>'type' AS room_assignment_type,
                   CASE WHEN b.data->'roomAssignment'->>'type' = 'Room'
                        THEN etl.ref_id(b.source_id, b.data->'roomAssignment'->>'id') END AS room_source_id,
                   etl.to_ts(coalesce(b.data->>'modifiedDate', b.data->>'modifiedOn')) AS source_modified_at,
                   b.is_deleted, CASE WHEN b.is_deleted THEN coalesce(b.deleted_at, b.updated_at) END AS deleted_at
              FROM bronze.dim_elements_staging b
             WHERE b.updated_at >= v_from
            OFFSET 0) x;
    GET DIAGNOSTICS v_read = ROW_COUNT;

    WITH up AS (
        INSERT INTO silver.dim_elements AS d
               (source_id, instance_id, element_id, element_uid, study_source_id, element_name, element_type, category,
                place_of_service, cpt_code, standard_minutes, budget, cost, room_assignment_type, room_source_id,
                source_modified_at, row_hash, is_deleted, deleted_at)
        SELECT source_id, instance_id, element_id, element_uid, study_source_id, element_name, element_type, category,
               place_of_service, cpt_code, standard_minutes, budget, cost, room_assignment_type, room_source_id,
               source_modified_at, row_hash, is_deleted, deleted_at
          FROM _src_dim_elements
        ON CONFLICT (source_id) DO UPDATE
           SET element_id = excluded.element_id, element_uid = excluded.element_uid,
               study_source_id = excluded.study_source_id, element_name = excluded.element_name,
               element_type = excluded.element_type, category = excluded.category,
               place_of_service = excluded.place_of_service, cpt_code = excluded.cpt_code,
               standard_minutes = excluded.standard_minutes, budget = excluded.budget, cost = excluded.cost,
               room_assignment_type = excluded.room_assignment_type, room_source_id = excluded.room_source_id,
               source_modified_at = excluded.source_modified_at, row_hash = excluded.row_hash,
               is_deleted = excluded.is_deleted, deleted_at = excluded.deleted_at, etl_updated_at = now()
         WHERE d.row_hash IS DISTINCT FROM excluded.row_hash
            OR d.is_deleted IS DISTINCT FROM excluded.is_deleted
            OR d.source_modified_at IS DISTINCT FROM excluded.source_modified_at
        RETURNING (xmax = 0) AS was_inserted, is_deleted)
    SELECT count(*) FILTER (WHERE was_inserted), count(*) FILTER (WHERE NOT was_inserted AND NOT is_deleted),
           count(*) FILTER (WHERE NOT was_inserted AND is_deleted)
      INTO inserted, updated, closed
      FROM up;
    deleted := 0;
    PERFORM etl.note_change('silver.dim_elements', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_elements_staging', v_to, v_read);
END
$$;

-- -- dim_rooms (Type 1) --------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS silver.dim_rooms (
    room_key            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id           varchar(255) NOT NULL UNIQUE,
    instance_id         varchar(64)  NOT NULL,
    room_id             bigint,
    room_name           text,
    site_source_id      varchar(255),
    room_status         text,
    is_active           boolean,
    is_treatment_room   boolean,
    is_conference_room  boolean,
    source_modified_at  timestamptz,
    row_hash            uuid         NOT NULL,
    is_deleted          boolean      NOT NULL DEFAULT false,
    deleted_at          timestamptz,
    etl_inserted_at     timestamptz  NOT NULL DEFAULT now(),
    etl_updated_at      timestamptz  NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dim_rooms_site_idx ON silver.dim_rooms (site_source_id);
COMMENT ON TABLE silver.dim_rooms IS
    'Rooms of a site (RoomViewModel, job 33), Type 1: a room is capacity today; gold.v_site_capacity counts the '
    'active, non-conference rooms of a site.';

CREATE OR REPLACE PROCEDURE silver.load_dim_rooms(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_dim_rooms';
    v_to   timestamptz;
    v_from timestamptz;
    v_read bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.dim_rooms_staging');

    DROP TABLE IF EXISTS pg_temp._src_dim_rooms;
    CREATE TEMP TABLE _src_dim_rooms ON COMMIT DROP AS
    SELECT x.*, md5(row(x.room_id, x.room_name, x.site_source_id, x.room_status, x.is_active, x.is_treatment_room,
                        x.is_conference_room)::text)::uuid AS row_hash
      FROM (SELECT b.source_id, split_part(b.source_id, ':', 1) AS instance_id,
                   etl.to_int(b.data->>'id') AS room_id, b.data->>'name' AS room_name,
                   etl.ref_id(b.source_id, b.data->'site'->>'id') AS site_source_id,
                   b.data->>'status' AS room_status, etl.to_bool(b.data->>'active') AS is_active,
                   etl.to_bool(b.data->>'isTreatmentRoom') AS is_treatment_room,
                   etl.to_bool(b.data->>'isConferenceRoom') AS is_conference_room,
                   etl.to_ts(coalesce(b.data->>'modifiedDate', b.data->>'modifiedOn')) AS source_modified_at,
                   b.is_deleted, CASE WHEN b.is_deleted THEN coalesce(b.deleted_at, b.updated_at) END AS deleted_at
              FROM bronze.dim_rooms_staging b
             WHERE b.updated_at >= v_from
            OFFSET 0) x;
    GET DIAGNOSTICS v_read = ROW_COUNT;

    WITH up AS (
        INSERT INTO silver.dim_rooms AS d
               (source_id, instance_id, room_id, room_name, site_source_id, room_status, is_active, is_treatment_room,
                is_conference_room, source_modified_at, row_hash, is_deleted, deleted_at)
        SELECT source_id, instance_id, room_id, room_name, site_source_id, room_status, is_active, is_treatment_room,
               is_conference_room, source_modified_at, row_hash, is_deleted, deleted_at
          FROM _src_dim_rooms
        ON CONFLICT (source_id) DO UPDATE
           SET room_id = excluded.room_id, room_name = excluded.room_name, site_source_id = excluded.site_source_id,
               room_status = excluded.room_status, is_active = excluded.is_active,
               is_treatment_room = excluded.is_treatment_room, is_conference_room = excluded.is_conference_room,
               source_modified_at = excluded.source_modified_at, row_hash = excluded.row_hash,
               is_deleted = excluded.is_deleted, deleted_at = excluded.deleted_at, etl_updated_at = now()
         WHERE d.row_hash IS DISTINCT FROM excluded.row_hash
            OR d.is_deleted IS DISTINCT FROM excluded.is_deleted
            OR d.source_modified_at IS DISTINCT FROM excluded.source_modified_at
        RETURNING (xmax = 0) AS was_inserted, is_deleted)
    SELECT count(*) FILTER (WHERE was_inserted), count(*) FILTER (WHERE NOT was_inserted AND NOT is_deleted),
           count(*) FILTER (WHERE NOT was_inserted AND is_deleted)
      INTO inserted, updated, closed
      FROM up;
    deleted := 0;
    PERFORM etl.note_change('silver.dim_rooms', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_rooms_staging', v_to, v_read);
END
$$;

-- -- dim_monitors (Type 1) -----------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS silver.dim_monitors (
    monitor_key         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id           varchar(255) NOT NULL UNIQUE,
    instance_id         varchar(64)  NOT NULL,
    monitor_id          bigint,
    display_name        text,
    source_modified_at  timestamptz,
    row_hash            uuid         NOT NULL,
    is_deleted          boolean      NOT NULL DEFAULT false,
    deleted_at          timestamptz,
    etl_inserted_at     timestamptz  NOT NULL DEFAULT now(),
    etl_updated_at      timestamptz  NOT NULL DEFAULT now()
);
COMMENT ON TABLE silver.dim_monitors IS
    'Sponsor/CRO monitors (MonitorPreviewModel, job 139), Type 1: who a monitor query is assigned to.';

CREATE OR REPLACE PROCEDURE silver.load_dim_monitors(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_dim_monitors';
    v_to   timestamptz;
    v_from timestamptz;
    v_read bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.dim_monitors_staging');

    DROP TABLE IF EXISTS pg_temp._src_dim_monitors;
    CREATE TEMP TABLE _src_dim_monitors ON COMMIT DROP AS
    SELECT x.*, md5(row(x.monitor_id, x.display_name)::text)::uuid AS row_hash
      FROM (SELECT b.source_id, split_part(b.source_id, ':', 1) AS instance_id,
                   etl.to_int(b.data->>'id') AS monitor_id,
                   coalesce(b.data->>'displayName',
                            nullif(concat_ws(' ', b.data->>'firstName', b.data->>'lastName'), '')) AS display_name,
                   etl.to_ts(coalesce(b.data->>'modifiedDate', b.data->>'modifiedOn')) AS source_modified_at,
                   b.is_deleted, CASE WHEN b.is_deleted THEN coalesce(b.deleted_at, b.updated_at) END AS deleted_at
              FROM bronze.dim_monitors_staging b
             WHERE b.updated_at >= v_from
            OFFSET 0) x;
    GET DIAGNOSTICS v_read = ROW_COUNT;

    WITH up AS (
        INSERT INTO silver.dim_monitors AS d
               (source_id, instance_id, monitor_id, display_name, source_modified_at, row_hash, is_deleted, deleted_at)
        SELECT source_id, instance_id, monitor_id, display_name, source_modified_at, row_hash, is_deleted, deleted_at
          FROM _src_dim_monitors
        ON CONFLICT (source_id) DO UPDATE
           SET monitor_id = excluded.monitor_id, display_name = excluded.display_name,
               source_modified_at = excluded.source_modified_at, row_hash = excluded.row_hash,
               is_deleted = excluded.is_deleted, deleted_at = excluded.deleted_at, etl_updated_at = now()
         WHERE d.row_hash IS DISTINCT FROM excluded.row_hash
            OR d.is_deleted IS DISTINCT FROM excluded.is_deleted
            OR d.source_modified_at IS DISTINCT FROM excluded.source_modified_at
        RETURNING (xmax = 0) AS was_inserted, is_deleted)
    SELECT count(*) FILTER (WHERE was_inserted), count(*) FILTER (WHERE NOT was_inserted AND NOT is_deleted),
           count(*) FILTER (WHERE NOT was_inserted AND is_deleted)
      INTO inserted, updated, closed
      FROM up;
    deleted := 0;
    PERFORM etl.note_change('silver.dim_monitors', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_monitors_staging', v_to, v_read);
END
$$;

-- -- dim_study_arms (Type 2) ---------------------------------------------------------------------
-- Jobs 141 (/studies/{studyId}/arms) and 174 (the same endpoint, corrected) land in two Bronze
-- tables with the same source_id ('<instance>:<studyId>|<armId>'); per source_id the most recently
-- loaded row wins, tombstone included (as fact_element_completions does for jobs 24/166).
CREATE TABLE IF NOT EXISTS silver.dim_study_arms (
    study_arm_key         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id             varchar(255) NOT NULL,
    instance_id           varchar(64)  NOT NULL,
    arm_id                bigint,
    arm_uid               varchar(64),
    study_source_id       varchar(255),
    arm_name              text,
    created_on            timestamptz,
    source_modified_at    timestamptz,
    row_hash              uuid         NOT NULL,
    effective_start_date  timestamptz  NOT NULL,
    effective_end_date    timestamptz  NOT NULL DEFAULT '9999-12-31 00:00:00+00',
    is_current            boolean      NOT NULL DEFAULT true,
    is_deleted            boolean      NOT NULL DEFAULT false,
    etl_inserted_at       timestamptz  NOT NULL DEFAULT now(),
    etl_updated_at        timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT dim_study_arms_one_current EXCLUDE USING btree (source_id WITH =) WHERE (is_current)
        DEFERRABLE INITIALLY IMMEDIATE
);
CREATE INDEX IF NOT EXISTS dim_study_arms_source_idx ON silver.dim_study_arms (source_id, effective_start_date);
CREATE INDEX IF NOT EXISTS dim_study_arms_study_idx ON silver.dim_study_arms (study_source_id) WHERE is_current;
COMMENT ON TABLE silver.dim_study_arms IS
    'Treatment arms of a study (StudyArmPreviewModel, jobs 141 and 174), Type 2: an arm renamed or withdrawn '
    'mid-study keeps its earlier version, so subjects randomised under the old arm design stay explainable.';

-- The SCD2 merge shared by the Type-2 dimensions added here: close the current version of every key
-- whose tracked attributes (row_hash) or deletion changed, open a version for every key without a
-- current one, and refresh the bookkeeping column of unchanged keys. p_src is a temp table with
-- source_id, row_hash, source_modified_at, created_on, bronze_updated_at, is_deleted, deleted_at and
-- the target's attribute columns (p_cols). Version times as in 0301: a version starts at the
-- source's own change time when it advanced, else at the time the change reached Bronze; the first
-- at createdOn. Identifiers are checked and quoted with format('%I').
CREATE OR REPLACE FUNCTION etl.scd2_merge(p_target text, p_src text, p_cols text[],
                                          OUT inserted bigint, OUT updated bigint, OUT closed bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_cols text;
    v_scols text;
BEGIN
    IF p_target !~ '^silver\.[a-z_][a-z0-9_]{0,62}$' OR p_src !~ '^[a-z_][a-z0-9_]{0,62}$'
       OR EXISTS (SELECT 1 FROM unnest(p_cols) c WHERE c !~ '^[a-z_][a-z0-9_]{0,62}$') THEN
        RAISE EXCEPTION 'etl.scd2_merge: unsafe identifier in %, %', p_target, p_src USING ERRCODE = 'invalid_name';
    END IF;
    SELECT string_agg(format('%I', c), ', '), string_agg(format('s.%I', c), ', ') INTO v_cols, v_scols
      FROM unnest(p_cols) c;
    EXECUTE format($q$
        WITH c AS (
            UPDATE silver.%1$I d
               SET effective_end_date = CASE
                       WHEN s.is_deleted AND NOT d.is_deleted THEN greatest(s.deleted_at, d.effective_start_date)
                       WHEN s.source_modified_at > d.effective_start_date
                            AND s.source_modified_at > coalesce(d.source_modified_at, '-infinity') THEN s.source_modified_at
                       ELSE greatest(s.bronze_updated_at, d.effective_start_date) END,
                   is_current = false, etl_updated_at = now()
              FROM pg_temp.%2$I s
             WHERE d.source_id = s.source_id AND d.is_current
               AND (d.row_hash <> s.row_hash OR d.is_deleted <> s.is_deleted)
            RETURNING 1)
        SELECT count(*) FROM c$q$, split_part(p_target, '.', 2), p_src) INTO closed;
    EXECUTE format($q$
        WITH prev AS (
            SELECT d.source_id, max(d.effective_end_date) AS last_end
              FROM silver.%1$I d WHERE d.source_id IN (SELECT source_id FROM pg_temp.%2$I) GROUP BY d.source_id),
        ins AS (
            INSERT INTO silver.%1$I (source_id, instance_id, %3$s, created_on, source_modified_at, row_hash,
                                     effective_start_date, is_deleted)
            SELECT s.source_id, s.instance_id, %4$s, s.created_on, s.source_modified_at, s.row_hash,
                   CASE WHEN p.last_end IS NOT NULL THEN p.last_end
                        WHEN s.is_deleted THEN coalesce(least(s.created_on, s.source_modified_at), s.deleted_at)
                        ELSE coalesce(least(s.created_on, s.source_modified_at), s.bronze_updated_at) END,
                   s.is_deleted
              FROM pg_temp.%2$I s LEFT JOIN prev p ON p.source_id = s.source_id
             WHERE NOT EXISTS (SELECT 1 FROM silver.%1$I d WHERE d.source_id = s.source_id AND d.is_current)
            RETURNING 1)
        SELECT count(*) FROM ins$q$, split_part(p_target, '.', 2), p_src, v_cols, v_scols) INTO inserted;
    EXECUTE format($q$
        WITH u AS (
            UPDATE silver.%1$I d SET source_modified_at = s.source_modified_at, etl_updated_at = now()
              FROM pg_temp.%2$I s
             WHERE d.source_id = s.source_id AND d.is_current AND d.is_deleted = s.is_deleted AND d.row_hash = s.row_hash
               AND d.source_modified_at IS DISTINCT FROM s.source_modified_at
            RETURNING 1)
        SELECT count(*) FROM u$q$, split_part(p_target, '.', 2), p_src) INTO updated;
END
$fn$;

CREATE OR REPLACE PROCEDURE silver.load_dim_study_arms(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_dim_study_arms';
    v_to     timestamptz;
    v_from_a timestamptz;
    v_from_b timestamptz;
    v_read   bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from_a := etl.transform_watermark(c_proc, 'bronze.dim_study_arms_staging');
    v_from_b := etl.transform_watermark(c_proc, 'bronze.dim_study_visit_arms_staging');

    DROP TABLE IF EXISTS pg_temp._src_dim_study_arms;
    CREATE TEMP TABLE _src_dim_study_arms ON COMMIT DROP AS
    WITH k AS (
        SELECT source_id FROM bronze.dim_study_arms_staging WHERE updated_at >= v_from_a
        UNION
        SELECT source_id FROM bronze.dim_study_visit_arms_staging WHERE updated_at >= v_from_b),
    raw AS (
        SELECT b.source_id, b.data, b.source_params, b.is_deleted, b.deleted_at, b.updated_at
          FROM bronze.dim_study_arms_staging b JOIN k USING (source_id)
        UNION ALL
        SELECT b.source_id, b.data, b.source_params, b.is_deleted, b.deleted_at, b.updated_at
          FROM bronze.dim_study_visit_arms_staging b JOIN k USING (source_id)),
    latest AS (
        SELECT DISTINCT ON (r.source_id) r.* FROM raw r ORDER BY r.source_id, r.updated_at DESC, r.is_deleted DESC)
    SELECT x.*, md5(row(x.arm_id, x.arm_uid, x.study_source_id, x.arm_name)::text)::uuid AS row_hash
      FROM (SELECT l.source_id, split_part(l.source_id, ':', 1) AS instance_id,
                   etl.to_int(coalesce(l.data->>'Id', l.data->>'id')) AS arm_id,
                   coalesce(l.data->>'Uid', l.data->>'uid') AS arm_uid,
                   etl.study_ref(l.source_id, l.data, l.source_params) AS study_source_id,
                   coalesce(l.data->>'Name', l.data->>'name') AS arm_name,
                   etl.to_ts(coalesce(l.data->>'createdDate', l.data->>'createdOn')) AS created_on,
                   etl.to_ts(coalesce(l.data->>'modifiedDate', l.data->>'modifiedOn')) AS source_modified_at,
                   l.updated_at AS bronze_updated_at, l.is_deleted, coalesce(l.deleted_at, l.updated_at) AS deleted_at
              FROM latest l
            OFFSET 0) x;
    GET DIAGNOSTICS v_read = ROW_COUNT;

    SELECT m.inserted, m.updated, m.closed INTO inserted, updated, closed
      FROM etl.scd2_merge('silver.dim_study_arms', '_src_dim_study_arms',
                          ARRAY['arm_id', 'arm_uid', 'study_source_id', 'arm_name']) m;
    deleted := 0;
    PERFORM etl.note_change('silver.dim_study_arms', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_study_arms_staging', v_to, v_read);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_study_visit_arms_staging', v_to, v_read);
END
$$;

-- -- dim_study_staff_assignments (Type 2) --------------------------------------------------------
-- One row per study role (job 144 RoleStaff: Role + the staff holding it; key '<studyId>|<roleId>'),
-- one version per holder: who was the principal investigator or coordinator of a study on a given
-- day is a question audits and payments ask.
CREATE TABLE IF NOT EXISTS silver.dim_study_staff_assignments (
    assignment_key        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id             varchar(255) NOT NULL,
    instance_id           varchar(64)  NOT NULL,
    study_source_id       varchar(255),
    role_id               bigint,
    role_name             text,
    is_coordinator        boolean,
    staff_source_id       varchar(255),           -- the primary holder (lowest Priority, then id)
    staff_source_ids      text[],                 -- every holder, sorted
    staff_count           integer,
    created_on            timestamptz,
    source_modified_at    timestamptz,
    row_hash              uuid         NOT NULL,
    effective_start_date  timestamptz  NOT NULL,
    effective_end_date    timestamptz  NOT NULL DEFAULT '9999-12-31 00:00:00+00',
    is_current            boolean      NOT NULL DEFAULT true,
    is_deleted            boolean      NOT NULL DEFAULT false,
    etl_inserted_at       timestamptz  NOT NULL DEFAULT now(),
    etl_updated_at        timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT dim_study_staff_assignments_one_current EXCLUDE USING btree (source_id WITH =) WHERE (is_current)
        DEFERRABLE INITIALLY IMMEDIATE
);
CREATE INDEX IF NOT EXISTS dim_study_staff_assignments_source_idx
    ON silver.dim_study_staff_assignments (source_id, effective_start_date);
CREATE INDEX IF NOT EXISTS dim_study_staff_assignments_study_idx
    ON silver.dim_study_staff_assignments (study_source_id) WHERE is_current;
COMMENT ON TABLE silver.dim_study_staff_assignments IS
    'Who holds each role of a study (RoleStaff, job 144), Type 2: one version per holder, so "who was the '
    'study coordinator on 2025-03-01" has an answer. Staff names come from dim_staff (staff_source_id).';

CREATE OR REPLACE PROCEDURE silver.load_dim_study_staff_assignments(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_dim_study_staff_assignments';
    v_to   timestamptz;
    v_from timestamptz;
    v_read bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.dim_study_personnel_staging');

    DROP TABLE IF EXISTS pg_temp._src_dim_study_staff_assignments;
    CREATE TEMP TABLE _src_dim_study_staff_assignments ON COMMIT DROP AS
    SELECT x.*, md5(row(x.study_source_id, x.role_id, x.role_name, x.is_coordinator, x.staff_source_id,
                        x.staff_source_ids, x.staff_count)::text)::uuid AS row_hash
      FROM (SELECT b.source_id, split_part(b.source_id, ':', 1) AS instance_id,
                   etl.study_ref(b.source_id, b.data, b.source_params) AS study_source_id,
                   etl.to_int(coalesce(b.data->'Role'->>'Id', b.data->'role'->>'id')) AS role_id,
                   coalesce(b.data->'Role'->>'RoleName', b.data->'role'->>'roleName') AS role_name,
                   etl.to_bool(coalesce(b.data->'Role'->>'Coordinator', b.data->'role'->>'coordinator')) AS is_coordinator,
                   st.staff_source_id, st.staff_source_ids, coalesce(st.staff_count, 0) AS staff_count,
                   etl.to_ts(coalesce(b.data->>'createdDate', b.data->>'createdOn')) AS created_on,
                   etl.to_ts(coalesce(b.data->>'modifiedDate', b.data->>'modifiedOn')) AS source_modified_at,
                   b.updated_at AS bronze_updated_at, b.is_deleted, coalesce(b.deleted_at, b.updated_at) AS deleted_at
              FROM bronze.dim_study_personnel_staging b
              LEFT JOIN LATERAL (
                   SELECT (array_agg(etl.ref_id(b.source_id, coalesce(s->>'Id', s->>'id'))
                                     ORDER BY etl.to_int(coalesce(s->>'Priority', s->>'priority')) NULLS LAST,
                                              etl.to_int(coalesce(s->>'Id', s->>'id'))))[1] AS staff_source_id,
                          array_agg(etl.ref_id(b.source_id, coalesce(s->>'Id', s->>'id'))
                                    ORDER BY etl.ref_id(b.source_id, coalesce(s->>'Id', s->>'id'))) AS staff_source_ids,
                          count(*)::int AS staff_count
                     FROM jsonb_array_elements(CASE WHEN jsonb_typeof(coalesce(b.data->'Staff', b.data->'staff')) = 'array'
                                                    THEN coalesce(b.data->'Staff', b.data->'staff') ELSE '[]'::jsonb END) s
                    WHERE coalesce(s->>'Id', s->>'id') IS NOT NULL) st ON true
             WHERE b.updated_at >= v_from
            OFFSET 0) x;
    GET DIAGNOSTICS v_read = ROW_COUNT;

    SELECT m.inserted, m.updated, m.closed INTO inserted, updated, closed
      FROM etl.scd2_merge('silver.dim_study_staff_assignments', '_src_dim_study_staff_assignments',
                          ARRAY['study_source_id', 'role_id', 'role_name', 'is_coordinator', 'staff_source_id',
                                'staff_source_ids', 'staff_count']) m;
    deleted := 0;
    PERFORM etl.note_change('silver.dim_study_staff_assignments', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_study_personnel_staging', v_to, v_read);
END
$$;

GRANT SELECT ON silver.dim_study_visits, silver.dim_elements, silver.dim_rooms, silver.dim_monitors,
                silver.dim_study_arms, silver.dim_study_staff_assignments TO trialsync_analytics;
