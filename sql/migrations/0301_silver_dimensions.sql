-- Silver dimensions (issue 6): dim_date (generated), Type-1 dim_sites / dim_sponsors / dim_staff /
-- dim_patients, Type-2 dim_studies / dim_subjects, and one load procedure per table.
--
-- Conventions (docs/transform.md):
-- * values are parsed out of the JSON once per row: subqueries that compute them are fenced
--   (OFFSET 0 / MATERIALIZED) so the planner does not copy a parse into every expression using it;
-- * every procedure is CALL-able with no arguments and returns (inserted, updated, closed, deleted);
-- * it reads only Bronze rows with updated_at >= its watermark (etl.transform_watermark), captures
--   them once into a temp table (one snapshot), merges set-based, and advances the watermark to the
--   safe horizon (etl.transform_horizon) in the same transaction;
-- * it is idempotent: a second run with no new Bronze rows changes nothing, and an unchanged
--   source record never updates a row or opens a new SCD2 version (row_hash comparison);
-- * related entities are referenced by their durable source_id (e.g. dim_studies.sponsor_source_id),
--   so dimensions load in any order; gold views join them.
-- * Soft deletes (bronze.is_deleted): a Type-1 row is kept and flagged is_deleted (facts may still
--   point at it). For an SCD2 key the deletion is a change like any other: the live version is
--   closed at the deletion time and a new current version with is_deleted = true opens, so facts
--   keep resolving to the entity while current-state views (is_current AND NOT is_deleted) drop it.
--   A record that reappears closes the deleted version and opens a live one.
-- * PHI minimisation: no names, contact details, SSN, MRN, exact birth dates or free-text notes of
--   patients reach Silver. Patients are keyed by a pseudonym (etl.pseudonymize).

-- -- dim_date ------------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS silver.dim_date (
    date_key            integer PRIMARY KEY,           -- yyyymmdd
    full_date           date     NOT NULL UNIQUE,
    year                smallint NOT NULL,
    quarter             smallint NOT NULL,
    month               smallint NOT NULL,
    month_name          varchar(9) NOT NULL,
    month_abbr          char(3)  NOT NULL,
    day_of_month        smallint NOT NULL,
    day_of_week         smallint NOT NULL,             -- ISO: 1 = Monday .. 7 = Sunday
    day_name            varchar(9) NOT NULL,
    day_of_year         smallint NOT NULL,
    iso_year            smallint NOT NULL,
    iso_week            smallint NOT NULL,
    year_month          char(7)  NOT NULL,             -- 2025-12
    year_quarter        char(7)  NOT NULL,             -- 2025-Q4
    is_weekend          boolean  NOT NULL,
    first_day_of_month  date     NOT NULL,
    last_day_of_month   date     NOT NULL
);
COMMENT ON TABLE silver.dim_date IS 'Calendar 2000-01-01..2040-12-31 (extend with CALL silver.load_dim_date(p_from => .., p_to => ..)); date_key = yyyymmdd';

CREATE OR REPLACE PROCEDURE silver.load_dim_date(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL,
    p_from date DEFAULT '2000-01-01', p_to date DEFAULT '2040-12-31')
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM etl.transform_lock('silver.load_dim_date');
    updated := 0; closed := 0; deleted := 0;
    IF (SELECT count(*) FROM silver.dim_date WHERE full_date BETWEEN p_from AND p_to) = p_to - p_from + 1 THEN
        inserted := 0;  -- the calendar is complete: nothing to generate
        RETURN;
    END IF;
    WITH ins AS (
        INSERT INTO silver.dim_date
        SELECT etl.date_key(d), d,
               extract(year FROM d), extract(quarter FROM d), extract(month FROM d),
               trim(to_char(d, 'FMMonth')), to_char(d, 'Mon'),
               extract(day FROM d), extract(isodow FROM d), trim(to_char(d, 'FMDay')),
               extract(doy FROM d), extract(isoyear FROM d), extract(week FROM d),
               to_char(d, 'YYYY-MM'), to_char(d, 'YYYY') || '-Q' || extract(quarter FROM d),
               extract(isodow FROM d) IN (6, 7),
               date_trunc('month', d)::date, (date_trunc('month', d) + interval '1 month - 1 day')::date
          FROM generate_series(p_from, p_to, interval '1 day') AS g(ts), LATERAL (SELECT g.ts::date AS d) x
        ON CONFLICT (date_key) DO NOTHING
        RETURNING 1)
    SELECT count(*) INTO inserted FROM ins;
END
$$;

CALL silver.load_dim_date();

-- -- dim_sites (Type 1) --------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS silver.dim_sites (
    site_key            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id           varchar(255) NOT NULL UNIQUE,
    instance_id         varchar(64)  NOT NULL,
    site_id             bigint,
    site_uid            varchar(64),
    site_name           text,
    alternate_name      text,
    is_active           boolean,
    city                text,
    state               text,
    country             text,
    time_zone           text,
    organization        text,
    created_on          timestamptz,
    source_modified_at  timestamptz,
    row_hash            uuid         NOT NULL,
    is_deleted          boolean      NOT NULL DEFAULT false,
    deleted_at          timestamptz,
    etl_inserted_at     timestamptz  NOT NULL DEFAULT now(),
    etl_updated_at      timestamptz  NOT NULL DEFAULT now()
);
COMMENT ON TABLE silver.dim_sites IS 'Research sites (Type 1: overwritten in place). Street address, phones and e-mails are not copied.';

CREATE OR REPLACE PROCEDURE silver.load_dim_sites(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_dim_sites';
    v_to   timestamptz;
    v_from timestamptz;
    v_read bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.dim_sites_staging');

    DROP TABLE IF EXISTS pg_temp._src_dim_sites;
    CREATE TEMP TABLE _src_dim_sites ON COMMIT DROP AS
    SELECT x.*, md5(row(x.site_id, x.site_uid, x.site_name, x.alternate_name, x.is_active, x.city, x.state,
                        x.country, x.time_zone, x.organization, x.created_on)::text)::uuid AS row_hash
      FROM (SELECT b.source_id, split_part(b.source_id, ':', 1) AS instance_id,
                   etl.to_int(b.data->>'id') AS site_id, b.data->>'uid' AS site_uid,
                   b.data->>'name' AS site_name, b.data->>'alternateName' AS alternate_name,
                   etl.to_bool(b.data->>'active') AS is_active,
                   b.data->>'city' AS city, b.data->>'state' AS state, b.data->>'country' AS country,
                   b.data->>'timeZone' AS time_zone, b.data->>'organization' AS organization,
                   etl.to_ts(coalesce(b.data->>'createdOn', b.data->>'createdDate')) AS created_on,
                   etl.to_ts(coalesce(b.data->>'modifiedDate', b.data->>'modifiedOn')) AS source_modified_at,
                   b.is_deleted, CASE WHEN b.is_deleted THEN coalesce(b.deleted_at, b.updated_at) END AS deleted_at
              FROM bronze.dim_sites_staging b
             WHERE b.updated_at >= v_from
            OFFSET 0) x;  -- fence: parse each value once, not once per use
    GET DIAGNOSTICS v_read = ROW_COUNT;

    WITH up AS (
        INSERT INTO silver.dim_sites AS d
               (source_id, instance_id, site_id, site_uid, site_name, alternate_name, is_active, city, state,
                country, time_zone, organization, created_on, source_modified_at, row_hash, is_deleted, deleted_at)
        SELECT source_id, instance_id, site_id, site_uid, site_name, alternate_name, is_active, city, state,
               country, time_zone, organization, created_on, source_modified_at, row_hash, is_deleted, deleted_at
          FROM _src_dim_sites
        ON CONFLICT (source_id) DO UPDATE
           SET site_id = excluded.site_id, site_uid = excluded.site_uid, site_name = excluded.site_name,
               alternate_name = excluded.alternate_name, is_active = excluded.is_active, city = excluded.city,
               state = excluded.state, country = excluded.country, time_zone = excluded.time_zone,
               organization = excluded.organization, created_on = excluded.created_on,
               source_modified_at = excluded.source_modified_at, row_hash = excluded.row_hash,
               is_deleted = excluded.is_deleted, deleted_at = excluded.deleted_at, etl_updated_at = now()
         WHERE d.row_hash IS DISTINCT FROM excluded.row_hash
            OR d.is_deleted IS DISTINCT FROM excluded.is_deleted
            OR d.source_modified_at IS DISTINCT FROM excluded.source_modified_at
        RETURNING (xmax = 0) AS was_inserted, is_deleted)
    SELECT count(*) FILTER (WHERE was_inserted),
           count(*) FILTER (WHERE NOT was_inserted AND NOT is_deleted),
           count(*) FILTER (WHERE NOT was_inserted AND is_deleted)
      INTO inserted, updated, closed
      FROM up;
    deleted := 0;
    PERFORM etl.note_change('silver.dim_sites', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_sites_staging', v_to, v_read);
END
$$;

-- -- dim_sponsors (Type 1) -----------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS silver.dim_sponsors (
    sponsor_key         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id           varchar(255) NOT NULL UNIQUE,
    instance_id         varchar(64)  NOT NULL,
    sponsor_id          bigint,
    sponsor_name        text,
    url                 text,
    division_count      integer,
    source_modified_at  timestamptz,
    row_hash            uuid         NOT NULL,
    is_deleted          boolean      NOT NULL DEFAULT false,
    deleted_at          timestamptz,
    etl_inserted_at     timestamptz  NOT NULL DEFAULT now(),
    etl_updated_at      timestamptz  NOT NULL DEFAULT now()
);
COMMENT ON TABLE silver.dim_sponsors IS 'Study sponsors (Type 1). Phone, fax and e-mail are not copied.';

CREATE OR REPLACE PROCEDURE silver.load_dim_sponsors(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_dim_sponsors';
    v_to   timestamptz;
    v_from timestamptz;
    v_read bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.dim_sponsors_staging');

    DROP TABLE IF EXISTS pg_temp._src_dim_sponsors;
    CREATE TEMP TABLE _src_dim_sponsors ON COMMIT DROP AS
    SELECT x.*, md5(row(x.sponsor_id, x.sponsor_name, x.url, x.division_count)::text)::uuid AS row_hash
      FROM (SELECT b.source_id, split_part(b.source_id, ':', 1) AS instance_id,
                   etl.to_int(b.data->>'id') AS sponsor_id, b.data->>'name' AS sponsor_name, b.data->>'url' AS url,
                   CASE WHEN jsonb_typeof(b.data->'sponsorDivisions') = 'array'
                        THEN jsonb_array_length(b.data->'sponsorDivisions') END AS division_count,
                   etl.to_ts(coalesce(b.data->>'modifiedDate', b.data->>'modifiedOn')) AS source_modified_at,
                   b.is_deleted, CASE WHEN b.is_deleted THEN coalesce(b.deleted_at, b.updated_at) END AS deleted_at
              FROM bronze.dim_sponsors_staging b
             WHERE b.updated_at >= v_from
            OFFSET 0) x;  -- fence: parse each value once, not once per use
    GET DIAGNOSTICS v_read = ROW_COUNT;

    WITH up AS (
        INSERT INTO silver.dim_sponsors AS d
               (source_id, instance_id, sponsor_id, sponsor_name, url, division_count, source_modified_at,
                row_hash, is_deleted, deleted_at)
        SELECT source_id, instance_id, sponsor_id, sponsor_name, url, division_count, source_modified_at,
               row_hash, is_deleted, deleted_at
          FROM _src_dim_sponsors
        ON CONFLICT (source_id) DO UPDATE
           SET sponsor_id = excluded.sponsor_id, sponsor_name = excluded.sponsor_name, url = excluded.url,
               division_count = excluded.division_count, source_modified_at = excluded.source_modified_at,
               row_hash = excluded.row_hash, is_deleted = excluded.is_deleted, deleted_at = excluded.deleted_at,
               etl_updated_at = now()
         WHERE d.row_hash IS DISTINCT FROM excluded.row_hash
            OR d.is_deleted IS DISTINCT FROM excluded.is_deleted
            OR d.source_modified_at IS DISTINCT FROM excluded.source_modified_at
        RETURNING (xmax = 0) AS was_inserted, is_deleted)
    SELECT count(*) FILTER (WHERE was_inserted),
           count(*) FILTER (WHERE NOT was_inserted AND NOT is_deleted),
           count(*) FILTER (WHERE NOT was_inserted AND is_deleted)
      INTO inserted, updated, closed
      FROM up;
    deleted := 0;
    PERFORM etl.note_change('silver.dim_sponsors', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_sponsors_staging', v_to, v_read);
END
$$;

-- -- dim_staff (Type 1) --------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS silver.dim_staff (
    staff_key           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id           varchar(255) NOT NULL UNIQUE,
    instance_id         varchar(64)  NOT NULL,
    staff_id            bigint,
    staff_uid           varchar(64),
    display_name        text,
    profession          text,
    is_active           boolean,
    is_external         boolean,
    role_names          text[],
    site_count          integer,
    is_investigator     boolean,
    source_modified_at  timestamptz,
    row_hash            uuid         NOT NULL,
    is_deleted          boolean      NOT NULL DEFAULT false,
    deleted_at          timestamptz,
    etl_inserted_at     timestamptz  NOT NULL DEFAULT now(),
    etl_updated_at      timestamptz  NOT NULL DEFAULT now()
);
COMMENT ON TABLE silver.dim_staff IS 'Site staff (Type 1). Login and e-mail are not copied.';

CREATE OR REPLACE PROCEDURE silver.load_dim_staff(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_dim_staff';
    v_to   timestamptz;
    v_from timestamptz;
    v_read bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.dim_staff_staging');

    DROP TABLE IF EXISTS pg_temp._src_dim_staff;
    CREATE TEMP TABLE _src_dim_staff ON COMMIT DROP AS
    SELECT x.*, md5(row(x.staff_id, x.staff_uid, x.display_name, x.profession, x.is_active, x.is_external,
                        x.role_names, x.site_count, x.is_investigator)::text)::uuid AS row_hash
      FROM (SELECT b.source_id, split_part(b.source_id, ':', 1) AS instance_id,
                   etl.to_int(b.data->>'id') AS staff_id, b.data->>'uid' AS staff_uid,
                   b.data->>'displayName' AS display_name, b.data->>'profession' AS profession,
                   etl.to_bool(b.data->>'isStatusActive') AS is_active,
                   etl.to_bool(b.data->>'isStaffExternal') AS is_external,
                   r.role_names, r.site_count, r.is_investigator,
                   etl.to_ts(coalesce(b.data->>'modifiedOn', b.data->>'modifiedDate')) AS source_modified_at,
                   b.is_deleted, CASE WHEN b.is_deleted THEN coalesce(b.deleted_at, b.updated_at) END AS deleted_at
              FROM bronze.dim_staff_staging b
              LEFT JOIN LATERAL (
                   SELECT array_agg(DISTINCT e->>'roleName' ORDER BY e->>'roleName')
                              FILTER (WHERE e->>'roleName' IS NOT NULL) AS role_names,
                          count(DISTINCT e->>'siteId')::int AS site_count,
                          coalesce(bool_or(etl.to_bool(e->>'principalInvestigator'))
                                   OR bool_or(etl.to_bool(e->>'subInvestigator')), false) AS is_investigator
                     FROM jsonb_array_elements(CASE WHEN jsonb_typeof(b.data->'staffRoles') = 'array'
                                                    THEN b.data->'staffRoles' ELSE '[]'::jsonb END) e) r ON true
             WHERE b.updated_at >= v_from
            OFFSET 0) x;  -- fence: parse each value once, not once per use
    GET DIAGNOSTICS v_read = ROW_COUNT;

    WITH up AS (
        INSERT INTO silver.dim_staff AS d
               (source_id, instance_id, staff_id, staff_uid, display_name, profession, is_active, is_external,
                role_names, site_count, is_investigator, source_modified_at, row_hash, is_deleted, deleted_at)
        SELECT source_id, instance_id, staff_id, staff_uid, display_name, profession, is_active, is_external,
               role_names, site_count, is_investigator, source_modified_at, row_hash, is_deleted, deleted_at
          FROM _src_dim_staff
        ON CONFLICT (source_id) DO UPDATE
           SET staff_id = excluded.staff_id, staff_uid = excluded.staff_uid, display_name = excluded.display_name,
               profession = excluded.profession, is_active = excluded.is_active, is_external = excluded.is_external,
               role_names = excluded.role_names, site_count = excluded.site_count,
               is_investigator = excluded.is_investigator, source_modified_at = excluded.source_modified_at,
               row_hash = excluded.row_hash, is_deleted = excluded.is_deleted, deleted_at = excluded.deleted_at,
               etl_updated_at = now()
         WHERE d.row_hash IS DISTINCT FROM excluded.row_hash
            OR d.is_deleted IS DISTINCT FROM excluded.is_deleted
            OR d.source_modified_at IS DISTINCT FROM excluded.source_modified_at
        RETURNING (xmax = 0) AS was_inserted, is_deleted)
    SELECT count(*) FILTER (WHERE was_inserted),
           count(*) FILTER (WHERE NOT was_inserted AND NOT is_deleted),
           count(*) FILTER (WHERE NOT was_inserted AND is_deleted)
      INTO inserted, updated, closed
      FROM up;
    deleted := 0;
    PERFORM etl.note_change('silver.dim_staff', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_staff_staging', v_to, v_read);
END
$$;

-- -- dim_patients (Type 1, pseudonymous) ---------------------------------------------------------
CREATE TABLE IF NOT EXISTS silver.dim_patients (
    patient_key             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    patient_ref             char(64)     NOT NULL UNIQUE,   -- etl.pseudonymize(source_id)
    instance_id             varchar(64)  NOT NULL,
    birth_year              smallint,                       -- NULL when top-coded (age 90+)
    is_age_top_coded        boolean      NOT NULL DEFAULT false,
    gender_code             text,
    race                    text,
    ethnicity               text,
    patient_status          text,
    is_deceased             boolean,
    primary_site_source_id  varchar(255),
    state                   text,
    country                 text,
    source_modified_at      timestamptz,
    row_hash                uuid         NOT NULL,
    is_deleted              boolean      NOT NULL DEFAULT false,
    deleted_at              timestamptz,
    etl_inserted_at         timestamptz  NOT NULL DEFAULT now(),
    etl_updated_at          timestamptz  NOT NULL DEFAULT now()
);
COMMENT ON TABLE silver.dim_patients IS
    'Patients, pseudonymised (Type 1): keyed by patient_ref = keyed SHA-256 of the CC source id. Names, '
    'contact details, SSN, MRN, insurance, exact dates of birth/death and free text are NOT copied; '
    'birth year is top-coded for ages 90+ (HIPAA Safe Harbor).';

CREATE OR REPLACE PROCEDURE silver.load_dim_patients(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_dim_patients';
    v_to   timestamptz;
    v_from timestamptz;
    v_read bigint;
    v_oldest_year int := extract(year FROM now())::int - 89;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.dim_patients_staging');

    DROP TABLE IF EXISTS pg_temp._src_dim_patients;
    CREATE TEMP TABLE _src_dim_patients ON COMMIT DROP AS
    SELECT x.*, md5(row(x.birth_year, x.is_age_top_coded, x.gender_code, x.race, x.ethnicity, x.patient_status,
                        x.is_deceased, x.primary_site_source_id, x.state, x.country)::text)::uuid AS row_hash
      FROM (SELECT etl.pseudonymize(b.source_id) AS patient_ref, split_part(b.source_id, ':', 1) AS instance_id,
                   CASE WHEN y.birth_year >= v_oldest_year THEN y.birth_year END::smallint AS birth_year,
                   coalesce(y.birth_year < v_oldest_year, false) AS is_age_top_coded,
                   b.data->>'genderCode' AS gender_code, b.data->>'race' AS race, b.data->>'ethnicity' AS ethnicity,
                   b.data->>'status' AS patient_status,
                   (nullif(b.data->>'dateOfDeath', '') IS NOT NULL OR b.data->>'status' = 'Deceased') AS is_deceased,
                   etl.ref_id(b.source_id, b.data->'primarySite'->>'id') AS primary_site_source_id,
                   b.data->>'state' AS state, b.data->>'country' AS country,
                   etl.to_ts(coalesce(b.data->>'modifiedDate', b.data->>'modifiedOn')) AS source_modified_at,
                   b.is_deleted, CASE WHEN b.is_deleted THEN coalesce(b.deleted_at, b.updated_at) END AS deleted_at
              FROM bronze.dim_patients_staging b
              CROSS JOIN LATERAL (SELECT extract(year FROM etl.to_date(b.data->>'dateOfBirth'))::int AS birth_year) y
             WHERE b.updated_at >= v_from
            OFFSET 0) x;  -- fence: parse each value once, not once per use
    GET DIAGNOSTICS v_read = ROW_COUNT;

    WITH up AS (
        INSERT INTO silver.dim_patients AS d
               (patient_ref, instance_id, birth_year, is_age_top_coded, gender_code, race, ethnicity, patient_status,
                is_deceased, primary_site_source_id, state, country, source_modified_at, row_hash, is_deleted,
                deleted_at)
        SELECT patient_ref, instance_id, birth_year, is_age_top_coded, gender_code, race, ethnicity, patient_status,
               is_deceased, primary_site_source_id, state, country, source_modified_at, row_hash, is_deleted,
               deleted_at
          FROM _src_dim_patients
        ON CONFLICT (patient_ref) DO UPDATE
           SET birth_year = excluded.birth_year, is_age_top_coded = excluded.is_age_top_coded,
               gender_code = excluded.gender_code, race = excluded.race, ethnicity = excluded.ethnicity,
               patient_status = excluded.patient_status, is_deceased = excluded.is_deceased,
               primary_site_source_id = excluded.primary_site_source_id, state = excluded.state,
               country = excluded.country, source_modified_at = excluded.source_modified_at,
               row_hash = excluded.row_hash, is_deleted = excluded.is_deleted, deleted_at = excluded.deleted_at,
               etl_updated_at = now()
         WHERE d.row_hash IS DISTINCT FROM excluded.row_hash
            OR d.is_deleted IS DISTINCT FROM excluded.is_deleted
            OR d.source_modified_at IS DISTINCT FROM excluded.source_modified_at
        RETURNING (xmax = 0) AS was_inserted, is_deleted)
    SELECT count(*) FILTER (WHERE was_inserted),
           count(*) FILTER (WHERE NOT was_inserted AND NOT is_deleted),
           count(*) FILTER (WHERE NOT was_inserted AND is_deleted)
      INTO inserted, updated, closed
      FROM up;
    deleted := 0;
    PERFORM etl.note_change('silver.dim_patients', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_patients_staging', v_to, v_read);
END
$$;

-- -- dim_studies (Type 2) ------------------------------------------------------------------------
-- Versions are half-open intervals [effective_start_date, effective_end_date); the open version
-- ends at 9999-12-31. A version starts at the source's own change time (lastUpdatedOn) when the
-- source advanced it past the previous version's, else at the time the change reached Bronze; the
-- first version of a study starts at its createdOn. Changes between two transform runs collapse into one
-- version (Silver sees Bronze's latest state).
CREATE TABLE IF NOT EXISTS silver.dim_studies (
    study_key                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id                varchar(255) NOT NULL,
    instance_id              varchar(64)  NOT NULL,
    study_id                 bigint,
    study_uid                varchar(64),
    study_name               text,
    title                    text,
    protocol_number          text,
    nct_number               text,
    identifier               text,
    phase                    text,
    study_status             text,
    category                 text,
    subcategory              text,
    sponsor_source_id        varchar(255),
    managing_site_source_id  varchar(255),
    launch_year              integer,
    created_on               timestamptz,
    source_modified_at       timestamptz,
    row_hash                 uuid         NOT NULL,
    effective_start_date     timestamptz  NOT NULL,
    effective_end_date       timestamptz  NOT NULL DEFAULT '9999-12-31 00:00:00+00',
    is_current               boolean      NOT NULL DEFAULT true,
    is_deleted               boolean      NOT NULL DEFAULT false,
    etl_inserted_at          timestamptz  NOT NULL DEFAULT now(),
    etl_updated_at           timestamptz  NOT NULL DEFAULT now(),
    -- one current version per study; deferrable so a repair script (or a test planting a problem)
    -- can stage changes inside one transaction. The quality check dim_studies_current_unique watches
    -- the same rule.
    CONSTRAINT dim_studies_one_current EXCLUDE USING btree (source_id WITH =) WHERE (is_current)
        DEFERRABLE INITIALLY IMMEDIATE
);
CREATE INDEX IF NOT EXISTS dim_studies_source_idx ON silver.dim_studies (source_id, effective_start_date);
-- versions opened since a fact procedure's last run: its facts are re-pointed to them
CREATE INDEX IF NOT EXISTS dim_studies_inserted_idx ON silver.dim_studies (etl_inserted_at) WHERE is_current;
COMMENT ON TABLE silver.dim_studies IS 'Studies, Type-2 history: one row per version; is_current marks the open one.';

CREATE OR REPLACE PROCEDURE silver.load_dim_studies(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_dim_studies';
    v_to   timestamptz;
    v_from timestamptz;
    v_read bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.dim_studies_staging');

    -- jobs 2 (/studies/odata) and 164 (/studies) both land here: same source_id, one row per study.
    DROP TABLE IF EXISTS pg_temp._src_dim_studies;
    CREATE TEMP TABLE _src_dim_studies ON COMMIT DROP AS
    SELECT x.*, md5(row(x.study_id, x.study_uid, x.study_name, x.title, x.protocol_number, x.nct_number,
                        x.identifier, x.phase, x.study_status, x.category, x.subcategory, x.sponsor_source_id,
                        x.managing_site_source_id, x.launch_year, x.created_on)::text)::uuid AS row_hash
      FROM (SELECT b.source_id, split_part(b.source_id, ':', 1) AS instance_id,
                   etl.to_int(b.data->>'id') AS study_id, b.data->>'uid' AS study_uid,
                   b.data->>'name' AS study_name, b.data->>'title' AS title,
                   b.data->>'protocolNumber' AS protocol_number, b.data->>'nctNumber' AS nct_number,
                   b.data->>'identifier' AS identifier, b.data->>'phase' AS phase,
                   b.data->>'status' AS study_status, b.data->>'category' AS category,
                   b.data->>'subcategory' AS subcategory,
                   etl.ref_id(b.source_id, b.data->'sponsor'->>'id') AS sponsor_source_id,
                   etl.ref_id(b.source_id, b.data->'managingSite'->>'id') AS managing_site_source_id,
                   etl.to_int(b.data->>'launchYear')::int AS launch_year,
                   etl.to_ts(coalesce(b.data->>'createdOn', b.data->>'createdDate')) AS created_on,
                   etl.to_ts(coalesce(b.data->>'lastUpdatedOn', b.data->>'modifiedDate')) AS source_modified_at,
                   b.updated_at AS bronze_updated_at,
                   b.is_deleted, coalesce(b.deleted_at, b.updated_at) AS deleted_at
              FROM bronze.dim_studies_staging b
             WHERE b.updated_at >= v_from
            OFFSET 0) x;  -- fence: parse each value once, not once per use
    GET DIAGNOSTICS v_read = ROW_COUNT;

    -- 1. close the current version of every study whose tracked attributes changed or that was deleted
    WITH c AS (
        UPDATE silver.dim_studies d
           SET effective_end_date = CASE
                   WHEN s.is_deleted AND NOT d.is_deleted THEN greatest(s.deleted_at, d.effective_start_date)
                   WHEN s.source_modified_at > d.effective_start_date
                        AND s.source_modified_at > coalesce(d.source_modified_at, '-infinity') THEN s.source_modified_at
                   ELSE greatest(s.bronze_updated_at, d.effective_start_date) END,
               is_current = false,
               etl_updated_at = now()
          FROM _src_dim_studies s
         WHERE d.source_id = s.source_id AND d.is_current
           AND (d.row_hash <> s.row_hash OR d.is_deleted <> s.is_deleted)
        RETURNING 1)
    SELECT count(*) INTO closed FROM c;

    -- 2. open a version for every live study without a current one (new, just closed, or reappeared)
    WITH prev AS (
        SELECT d.source_id, max(d.effective_end_date) AS last_end
          FROM silver.dim_studies d
         WHERE d.source_id IN (SELECT source_id FROM _src_dim_studies)
         GROUP BY d.source_id),
    ins AS (
        INSERT INTO silver.dim_studies
               (source_id, instance_id, study_id, study_uid, study_name, title, protocol_number, nct_number,
                identifier, phase, study_status, category, subcategory, sponsor_source_id, managing_site_source_id,
                launch_year, created_on, source_modified_at, row_hash, effective_start_date, is_deleted)
        SELECT s.source_id, s.instance_id, s.study_id, s.study_uid, s.study_name, s.title, s.protocol_number,
               s.nct_number, s.identifier, s.phase, s.study_status, s.category, s.subcategory, s.sponsor_source_id,
               s.managing_site_source_id, s.launch_year, s.created_on, s.source_modified_at, s.row_hash,
               CASE WHEN p.last_end IS NOT NULL THEN p.last_end
                    WHEN s.is_deleted THEN coalesce(least(s.created_on, s.source_modified_at), s.deleted_at)
                    ELSE coalesce(least(s.created_on, s.source_modified_at), s.bronze_updated_at) END,
               s.is_deleted
          FROM _src_dim_studies s
          LEFT JOIN prev p ON p.source_id = s.source_id
         WHERE NOT EXISTS (SELECT 1 FROM silver.dim_studies d WHERE d.source_id = s.source_id AND d.is_current)
        RETURNING 1)
    SELECT count(*) INTO inserted FROM ins;

    -- 3. same attributes, newer source timestamp: keep the version, refresh its bookkeeping column
    WITH u AS (
        UPDATE silver.dim_studies d
           SET source_modified_at = s.source_modified_at, etl_updated_at = now()
          FROM _src_dim_studies s
         WHERE d.source_id = s.source_id AND d.is_current AND d.is_deleted = s.is_deleted AND d.row_hash = s.row_hash
           AND d.source_modified_at IS DISTINCT FROM s.source_modified_at
        RETURNING 1)
    SELECT count(*) INTO updated FROM u;
    deleted := 0;
    PERFORM etl.note_change('silver.dim_studies', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_studies_staging', v_to, v_read);
END
$$;

-- -- dim_subjects (Type 2) -----------------------------------------------------------------------
-- (source_params: the loader's parent-parameter column, see 0302)
ALTER TABLE bronze.dim_subjects_staging ADD COLUMN IF NOT EXISTS source_params jsonb;

CREATE TABLE IF NOT EXISTS silver.dim_subjects (
    subject_key              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id                varchar(255) NOT NULL,
    instance_id              varchar(64)  NOT NULL,
    subject_id               bigint,
    subject_uid              varchar(64),
    study_source_id          varchar(255),
    site_source_id           varchar(255),
    patient_ref              char(64),                   -- pseudonymous link to dim_patients
    subject_status           text,
    arm_name                 text,
    protocol_version         text,
    gender_code              text,
    race                     text,
    ethnicity                text,
    enrollment_date          date,
    treatment_status         text,
    treatment_start_date     date,
    source_modified_at       timestamptz,
    row_hash                 uuid         NOT NULL,
    effective_start_date     timestamptz  NOT NULL,
    effective_end_date       timestamptz  NOT NULL DEFAULT '9999-12-31 00:00:00+00',
    is_current               boolean      NOT NULL DEFAULT true,
    is_deleted               boolean      NOT NULL DEFAULT false,
    etl_inserted_at          timestamptz  NOT NULL DEFAULT now(),
    etl_updated_at           timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT dim_subjects_one_current EXCLUDE USING btree (source_id WITH =) WHERE (is_current)
        DEFERRABLE INITIALLY IMMEDIATE
);
CREATE INDEX IF NOT EXISTS dim_subjects_source_idx ON silver.dim_subjects (source_id, effective_start_date);
CREATE INDEX IF NOT EXISTS dim_subjects_inserted_idx ON silver.dim_subjects (etl_inserted_at) WHERE is_current;
CREATE INDEX IF NOT EXISTS dim_subjects_study_idx ON silver.dim_subjects (study_source_id) WHERE is_current;
COMMENT ON TABLE silver.dim_subjects IS
    'Study subjects (a patient''s participation in one study), Type-2 history. Patient names and dates '
    'of birth are not copied; patient_ref is the pseudonymous link to dim_patients.';

CREATE OR REPLACE PROCEDURE silver.load_dim_subjects(
    INOUT inserted bigint DEFAULT NULL, INOUT updated bigint DEFAULT NULL,
    INOUT closed bigint DEFAULT NULL, INOUT deleted bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    c_proc CONSTANT text := 'silver.load_dim_subjects';
    v_to   timestamptz;
    v_from timestamptz;
    v_read bigint;
BEGIN
    PERFORM etl.transform_lock(c_proc);
    v_to := etl.transform_horizon();
    v_from := etl.transform_watermark(c_proc, 'bronze.dim_subjects_staging');

    DROP TABLE IF EXISTS pg_temp._src_dim_subjects;
    CREATE TEMP TABLE _src_dim_subjects ON COMMIT DROP AS
    SELECT x.*, md5(row(x.subject_id, x.subject_uid, x.study_source_id, x.site_source_id, x.patient_ref,
                        x.subject_status, x.arm_name, x.protocol_version, x.gender_code, x.race, x.ethnicity,
                        x.enrollment_date, x.treatment_status, x.treatment_start_date)::text)::uuid AS row_hash
      FROM (SELECT b.source_id, split_part(b.source_id, ':', 1) AS instance_id,
                   etl.to_int(b.data->>'id') AS subject_id, b.data->>'uid' AS subject_uid,
                   etl.ref_id(b.source_id, coalesce(b.data->'study'->>'id', b.data->'study'->>'Id',
                                                    b.source_params->>'studyId')) AS study_source_id,
                   etl.ref_id(b.source_id, coalesce(b.data->'site'->>'id', b.data->'site'->>'Id')) AS site_source_id,
                   etl.pseudonymize(etl.ref_id(b.source_id, coalesce(b.data->'patient'->>'id', b.data->'patient'->>'Id')))
                       AS patient_ref,
                   b.data->>'status' AS subject_status,
                   coalesce(b.data->'arm'->>'Name', b.data->'arm'->>'name') AS arm_name,
                   coalesce(b.data->'protocolVersion'->>'name', b.data->'protocolVersion'->>'Name') AS protocol_version,
                   b.data->>'genderCode' AS gender_code, b.data->>'race' AS race, b.data->>'ethnicity' AS ethnicity,
                   etl.to_date(b.data->>'enrollmentDate') AS enrollment_date,
                   b.data->>'treatmentStatus' AS treatment_status,
                   etl.to_date(b.data->>'treatmentStart') AS treatment_start_date,
                   etl.to_ts(coalesce(b.data->>'modifiedDate', b.data->>'lastUpdatedOn')) AS source_modified_at,
                   etl.to_ts(coalesce(b.data->>'createdDate', b.data->>'createdOn')) AS created_on,
                   b.updated_at AS bronze_updated_at,
                   b.is_deleted, coalesce(b.deleted_at, b.updated_at) AS deleted_at
              FROM bronze.dim_subjects_staging b
             WHERE b.updated_at >= v_from
            OFFSET 0) x;  -- fence: parse each value once, not once per use
    GET DIAGNOSTICS v_read = ROW_COUNT;

    WITH c AS (
        UPDATE silver.dim_subjects d
           SET effective_end_date = CASE
                   WHEN s.is_deleted AND NOT d.is_deleted THEN greatest(s.deleted_at, d.effective_start_date)
                   WHEN s.source_modified_at > d.effective_start_date
                        AND s.source_modified_at > coalesce(d.source_modified_at, '-infinity') THEN s.source_modified_at
                   ELSE greatest(s.bronze_updated_at, d.effective_start_date) END,
               is_current = false,
               etl_updated_at = now()
          FROM _src_dim_subjects s
         WHERE d.source_id = s.source_id AND d.is_current
           AND (d.row_hash <> s.row_hash OR d.is_deleted <> s.is_deleted)
        RETURNING 1)
    SELECT count(*) INTO closed FROM c;

    WITH prev AS (
        SELECT d.source_id, max(d.effective_end_date) AS last_end
          FROM silver.dim_subjects d
         WHERE d.source_id IN (SELECT source_id FROM _src_dim_subjects)
         GROUP BY d.source_id),
    ins AS (
        INSERT INTO silver.dim_subjects
               (source_id, instance_id, subject_id, subject_uid, study_source_id, site_source_id, patient_ref,
                subject_status, arm_name, protocol_version, gender_code, race, ethnicity, enrollment_date,
                treatment_status, treatment_start_date, source_modified_at, row_hash, effective_start_date, is_deleted)
        SELECT s.source_id, s.instance_id, s.subject_id, s.subject_uid, s.study_source_id, s.site_source_id,
               s.patient_ref, s.subject_status, s.arm_name, s.protocol_version, s.gender_code, s.race, s.ethnicity,
               s.enrollment_date, s.treatment_status, s.treatment_start_date, s.source_modified_at, s.row_hash,
               CASE WHEN p.last_end IS NOT NULL THEN p.last_end
                    WHEN s.is_deleted THEN coalesce(least(s.created_on, s.source_modified_at), s.deleted_at)
                    ELSE coalesce(least(s.created_on, s.source_modified_at), s.bronze_updated_at) END,
               s.is_deleted
          FROM _src_dim_subjects s
          LEFT JOIN prev p ON p.source_id = s.source_id
         WHERE NOT EXISTS (SELECT 1 FROM silver.dim_subjects d WHERE d.source_id = s.source_id AND d.is_current)
        RETURNING 1)
    SELECT count(*) INTO inserted FROM ins;

    WITH u AS (
        UPDATE silver.dim_subjects d
           SET source_modified_at = s.source_modified_at, etl_updated_at = now()
          FROM _src_dim_subjects s
         WHERE d.source_id = s.source_id AND d.is_current AND d.is_deleted = s.is_deleted AND d.row_hash = s.row_hash
           AND d.source_modified_at IS DISTINCT FROM s.source_modified_at
        RETURNING 1)
    SELECT count(*) INTO updated FROM u;
    deleted := 0;
    PERFORM etl.note_change('silver.dim_subjects', inserted + updated + closed + deleted);
    PERFORM etl.set_transform_watermark(c_proc, 'bronze.dim_subjects_staging', v_to, v_read);
END
$$;
