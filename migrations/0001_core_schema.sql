-- Core schema for per-agent directives (SPEC §4).
--
-- Applied by `ibex-companion migrate`, which records it in
-- ibex_core.schema_migrations; never edit this file once released, add a new
-- numbered migration instead.

CREATE SCHEMA IF NOT EXISTS ibex_core;

CREATE TABLE ibex_core.agents (
    id         uuid        PRIMARY KEY,
    org_id     uuid        NOT NULL,
    name       text,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- directive_versions references directives and directives.active_version_id
-- references directive_versions: create directives first, then the versions,
-- then close the cycle with ALTER TABLE.
CREATE TABLE ibex_core.directives (
    id                uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    agent_id          uuid        NOT NULL REFERENCES ibex_core.agents (id),
    is_active         boolean     NOT NULL DEFAULT true,
    active_version_id uuid,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ibex_core.directive_versions (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    directive_id uuid        NOT NULL REFERENCES ibex_core.directives (id),
    content      text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE ibex_core.directives
    ADD CONSTRAINT directives_active_version_id_fkey
    FOREIGN KEY (active_version_id) REFERENCES ibex_core.directive_versions (id);

-- At most one active directive per agent. Being a partial index on
-- (agent_id) WHERE is_active, it is also the index the store's resolution
-- query (agent_id = $1 AND is_active = true) uses.
CREATE UNIQUE INDEX directives_one_active_per_agent
    ON ibex_core.directives (agent_id)
    WHERE is_active;

-- Foreign keys are not indexed automatically; these keep history lookups and
-- FK checks on delete from scanning whole tables.
CREATE INDEX directives_agent_id_idx ON ibex_core.directives (agent_id);
CREATE INDEX directive_versions_directive_id_idx
    ON ibex_core.directive_versions (directive_id);
