-- Gateway API keys (SPEC §3.1): a key resolves to the agent it was issued for.
--
-- Only the SHA-256 of a key is stored, never the key. A revoked key keeps its
-- row (revoked_at set) so `list-keys` can show it and a revocation cannot be
-- undone by re-issuing the same hash. Applied by `ibex-companion migrate`;
-- never edit this file once released, add a new numbered migration instead.

CREATE TABLE ibex_core.agent_api_keys (
    key_sha256 bytea       PRIMARY KEY
                           CONSTRAINT agent_api_keys_key_sha256_len CHECK (length(key_sha256) = 32),
    agent_id   uuid        NOT NULL REFERENCES ibex_core.agents (id),
    label      text,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

-- list-keys and FK checks on agent delete.
CREATE INDEX agent_api_keys_agent_id_idx ON ibex_core.agent_api_keys (agent_id);

-- A read-only role that can already read the directive tables (the store's,
-- e.g. `GRANT SELECT ON ALL TABLES IN SCHEMA ibex_core`, which covers only the
-- tables that existed when it ran) gets the same SELECT on this table, so the
-- store keeps working after the upgrade. Nothing but SELECT is granted.
DO $$
DECLARE
    grantee_oid oid;
BEGIN
    FOR grantee_oid IN
        SELECT DISTINCT a.grantee
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = 'ibex_core.agents'::regclass
          AND a.privilege_type = 'SELECT'
          AND a.grantee <> c.relowner
    LOOP
        IF grantee_oid = 0 THEN
            GRANT SELECT ON ibex_core.agent_api_keys TO PUBLIC;
        ELSE
            EXECUTE format('GRANT SELECT ON ibex_core.agent_api_keys TO %I',
                           (SELECT rolname FROM pg_roles WHERE oid = grantee_oid));
        END IF;
    END LOOP;
END
$$;
