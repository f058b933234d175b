"""A gate inside Postgres that holds the store's lookups of chosen agents.

The store connects as a SELECT-only role (as production should) and a
row-security policy on ibex_core.directives calls a function that, for the
agents listed in ibex_test.held_agents, sleeps for the agent's delay and
then takes an advisory lock the test can hold. Both happen while the query
runs, i.e. after its snapshot was taken: a lookup held there answers the
text of its snapshot even when the directive changed meanwhile.

While the gate is closed, every fill of a listed agent waits at its store
lookup, so whatever a test does meanwhile happens, for certain, while those
requests are in flight. Nothing here decides a result by time: waits poll
pg_stat_activity.

    gate = install_gate(stack, STORE_ENV)   # once per stack (restarts the store)
    gate.add(agent)
    with gate.closed():
        ...                                 # lookups of `agent` wait here
        wait_until(lambda: gate.waiting() == 1, ...)
"""

import subprocess
from contextlib import contextmanager

from stack import paths

READER = "ibex_store_reader"
LOCK_ID = 4242

GATE_SQL = f"""
CREATE ROLE {READER} LOGIN;
GRANT USAGE ON SCHEMA ibex_core TO {READER};
GRANT SELECT ON ALL TABLES IN SCHEMA ibex_core TO {READER};
CREATE SCHEMA ibex_test;
CREATE TABLE ibex_test.held_agents (agent_id uuid PRIMARY KEY, delay_ms integer NOT NULL);
GRANT USAGE ON SCHEMA ibex_test TO {READER};
GRANT SELECT ON ibex_test.held_agents TO {READER};
-- Evaluated per row while the query runs, i.e. after its snapshot was taken.
CREATE FUNCTION ibex_test.hold(agent uuid) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  delay integer;
BEGIN
  SELECT delay_ms INTO delay FROM ibex_test.held_agents WHERE agent_id = agent;
  IF FOUND THEN
    IF delay > 0 THEN
      PERFORM pg_sleep(delay / 1000.0);
    END IF;
    PERFORM pg_advisory_xact_lock_shared({LOCK_ID});
  END IF;
  RETURN true;
END $$;
ALTER TABLE ibex_core.directives ENABLE ROW LEVEL SECURITY;
CREATE POLICY hold ON ibex_core.directives FOR SELECT TO {READER} USING (ibex_test.hold(agent_id));
"""

# Store lookups may be held as long as a test needs: the store's own deadlines
# must outlast the gate (the filter's store.timeout_ms too, set by the module).
HOLDING_STORE_ENV = {"IBEX_STORE_STATEMENT_TIMEOUT_MS": "30000", "IBEX_STORE_LOOKUP_TIMEOUT_MS": "30000"}
HOLDING_FILTER_CONFIG = {"store": {"timeout_ms": 30000}}


def psql_session(stack):
    """A psql session of our own, fed through stdin."""
    return subprocess.Popen(
        [str(paths.PG_BIN / "psql"), "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
         "-p", str(stack.postgres.port), "-U", "postgres", "-d", "ibex"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def psql_until(proc, marker):
    """Read the session's output up to the line `marker`."""
    for line in proc.stdout:
        if line.strip() == marker:
            return
    raise AssertionError(f"psql ended before {marker!r}: exit {proc.wait()}")


class Gate:
    """Holds the store's lookups of listed agents inside Postgres while closed."""

    def __init__(self, stack):
        self.stack = stack

    def add(self, agent, delay_ms=0):
        self.stack.postgres.psql(f"INSERT INTO ibex_test.held_agents VALUES ('{agent}', {int(delay_ms)})")

    def waiting(self):
        """Store queries waiting at the closed gate right now."""
        return int(self.stack.postgres.psql(
            "SELECT count(*) FROM pg_stat_activity "
            f"WHERE usename = '{READER}' AND wait_event_type = 'Lock' AND wait_event = 'advisory'"))

    @contextmanager
    def closed(self):
        """Hold the advisory lock in a session of our own; release it on exit."""
        holder = psql_session(self.stack)
        try:
            holder.stdin.write(f"BEGIN;\nSELECT pg_advisory_xact_lock({LOCK_ID});\n\\echo gate-closed\n")
            holder.stdin.flush()
            psql_until(holder, "gate-closed")
            yield self
        finally:
            holder.stdin.write("COMMIT;\n")
            holder.stdin.close()
            holder.wait(timeout=30)


def install_gate(stack, store_env=HOLDING_STORE_ENV):
    """Create the gate and restart the store as the SELECT-only role it applies
    to (a superuser would bypass row security), with `store_env`; returns the Gate."""
    stack.postgres.psql(GATE_SQL)
    stack.stop("store")
    url = f"postgres://{READER}@127.0.0.1:{stack.postgres.port}/ibex"
    stack.store.database_url = url
    stack.store.extra_env.update(DATABASE_URL=url, **store_env)
    stack.start("store")
    return Gate(stack)
