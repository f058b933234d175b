"""A fleet, run for real (SPEC §9): three Envoys, each with its own subscriber, over
one Redis (and its REST front), one store and one Postgres (stack/fleet.py).

- a directive update (a Postgres write, then PUBLISH, as any writer does) and a
  flush reach every Envoy: each is polled until it serves the new text (a generous
  deadline; speed is `make bench`'s fleet phase);
- a cold start of the whole fleet costs Postgres one directive query per agent:
  the store, which shares an agent's query with lookups that come in while it runs or
  shortly after once Redis shows no invalidation since (companion/src/store/guard.rs),
  and Redis, through the filters' write-backs (an Envoy restarted afterwards costs
  Postgres nothing), absorb the rest;
- an Envoy killed with SIGKILL changes nothing for the other two: they keep
  answering with the directive and keep getting invalidations.

Each Envoy is asked on its own data port; which Envoy answered is known from the
port, and what it injected from the echo upstream's answer (it lists the messages
it received), so no test reads the shared upstream's record while others write it.
"""

import http.client
import json

import pytest

from conftest import default_l2
from helpers import CHAT, new_agent
from stack import wait_until
from stack.contract import (AGENT_HEADER, FLUSH_CHANNEL, FLUSH_MARKER_PATTERN, redis_key, stored_text,
                            updates_channel)
from stack.fleet import Fleet
from stack.postgres import quote_literal
from stack.rawhttp import connect, read_response, request_bytes

SIZE = 3
COLD_AGENTS = 50
DEADLINE = 30.0
BODY = b'{"model":"demo","messages":[{"role":"user","content":"hello"}]}'


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with Fleet(tmp_path_factory.mktemp("fleet"), size=SIZE, patient=True, debug_headers=True,
               l2=default_l2()) as running:
        yield running


def injected(port, agent):
    """The system message the upstream got for one request of `agent` through the Envoy
    on `port` (from the echo's answer: `[1] system: <text>`), or None without one."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", CHAT, body=BODY, headers={"content-type": "application/json", AGENT_HEADER: agent})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    assert response.status == 200, (port, response.status, data[:300])
    return system_text(data)


def system_text(data):
    """The first message's text in an echo chat answer when it is a system message."""
    lines = json.loads(data)["choices"][0]["message"]["content"].split("\n")
    first = lines[1] if len(lines) > 1 else ""
    return first[len("[1] system: "):] if first.startswith("[1] system: ") else None


def serves_everywhere(fleet, agent, text, envoys=None):
    """Poll every Envoy (or `envoys`) until each serves `text` for `agent`."""
    for envoy in envoys or fleet.envoys:
        wait_until(lambda: injected(envoy.data_port, agent) == text, timeout=DEADLINE,
                   what=f"{envoy.name} to serve the new directive")


def sql_set_directive(fleet, agent, content):
    """A writer that is not ours: a new directive_versions row made the active one."""
    fleet.postgres.psql(
        "WITH v AS (INSERT INTO ibex_core.directive_versions (directive_id, content) "
        f"SELECT id, {quote_literal(content)} FROM ibex_core.directives "
        f"WHERE agent_id = {quote_literal(agent)} AND is_active RETURNING id, directive_id) "
        "UPDATE ibex_core.directives d SET active_version_id = v.id, updated_at = now() "
        "FROM v WHERE d.id = v.directive_id")


def cached_everywhere(fleet, agent, text):
    """`agent` has `text` (in Postgres only) and every Envoy has served it, so each holds
    it in L1: a later change reaches an Envoy only through an invalidation."""
    fleet.set_directive(agent, text, publish=False)
    serves_everywhere(fleet, agent, text)


def test_update_reaches_every_envoy(fleet):
    agent = new_agent()
    cached_everywhere(fleet, agent, "fleet directive, first version")
    sql_set_directive(fleet, agent, "fleet directive, second version")
    for envoy in fleet.envoys:  # nothing told them yet: each still serves its cached text
        assert injected(envoy.data_port, agent) == "fleet directive, first version", envoy.name
    fleet.redis_cli("PUBLISH", updates_channel(agent), "")
    serves_everywhere(fleet, agent, "fleet directive, second version")


def test_flush_reaches_every_envoy(fleet):
    agents = [new_agent(), new_agent()]
    for agent in agents:
        cached_everywhere(fleet, agent, f"before the flush, {agent}")
        sql_set_directive(fleet, agent, f"after the flush, {agent}")
    fleet.redis_cli("PUBLISH", FLUSH_CHANNEL, "")
    for agent in agents:
        serves_everywhere(fleet, agent, f"after the flush, {agent}")


def seed_postgres(fleet, agents):
    """Every agent with its own directive, in Postgres only, in one transaction."""
    sql = ["BEGIN;"]
    for agent in agents:
        sql.append(f"INSERT INTO ibex_core.agents (id, org_id) VALUES ({quote_literal(agent)}, "
                   "'00000000-0000-4000-8000-000000000001');")
        sql.append("WITH d AS (INSERT INTO ibex_core.directives (agent_id, is_active) "
                   f"VALUES ({quote_literal(agent)}, true) RETURNING id) "
                   "INSERT INTO ibex_core.directive_versions (directive_id, content) "
                   f"SELECT id, {quote_literal(cold_text(agent))} FROM d;")
    # a statement of its own: one statement's CTEs cannot update the rows it inserts
    sql.append("UPDATE ibex_core.directives d SET active_version_id = v.id FROM ibex_core.directive_versions v "
               "WHERE v.directive_id = d.id AND d.active_version_id IS NULL;")
    sql.append("COMMIT;")
    fleet.postgres.psql("\n".join(sql))


def cold_text(agent):
    return f"cold fleet directive of {agent}"


def test_cold_fleet_costs_postgres_one_query_per_agent(fleet):
    """COLD_AGENTS agents only in Postgres, no Envoy has seen them: two requests for
    every agent on every Envoy (on connections opened first, so the kernel spreads
    them over the workers), fired back to back. Postgres sees exactly one directive
    query per agent (the store's own count of statements sent, exact), and every
    request got its agent's directive."""
    agents = [new_agent() for _ in range(COLD_AGENTS)]
    seed_postgres(fleet, agents)
    # A flush (test_flush's, and each subscriber's when it connects) leaves a marker in
    # every hash slot for 10 s during which no fill may write Redis, not the filters'
    # write-backs and so not the store's sharing either (a fill may have read text from
    # before the flush). These agents are new to every cache: drop the markers, as
    # tests/conftest.py does before every test of a single stack.
    fleet.redis.delete_matching(FLUSH_MARKER_PATTERN)
    before = fleet.store.metric("ibex_store_db_queries_total")
    lookups_before = fleet.store.lookups()
    sockets = []
    for agent in agents:
        request = request_bytes(CHAT, BODY, agent=agent)
        for envoy in fleet.envoys:
            for _ in range(2):
                sockets.append((agent, envoy, connect(envoy.data_port, timeout=60), request))
    for _, _, sock, request in sockets:
        sock.sendall(request)
    wrong = []
    for agent, envoy, sock, _ in sockets:
        response = read_response(sock)
        sock.close()
        if response.status != 200 or system_text(response.body) != cold_text(agent):
            wrong.append((envoy.name, agent, response.status, response.body[:200]))
    assert not wrong, f"{len(wrong)} of {len(sockets)} requests without their directive: {wrong[:3]}"
    queries = fleet.store.metric("ibex_store_db_queries_total") - before
    lookups = fleet.store.lookups() - lookups_before
    assert queries == COLD_AGENTS, (f"Postgres saw {queries:.0f} directive queries for {COLD_AGENTS} cold agents "
                                    f"({lookups:.0f} store lookups from {SIZE} Envoys)")
    # Redis absorbs the rest: once the write-backs landed, an Envoy with an empty L1 (restarted)
    # costs Postgres nothing for these agents
    for agent in agents:
        wait_until(lambda: stored_text(fleet.redis.get(redis_key(agent))) == cold_text(agent),
                   what="every agent's write-back in Redis")
    late = fleet.envoys[-1]
    late.stop()
    late.start()
    before = fleet.store.metric("ibex_store_db_queries_total")
    for agent in agents:
        assert injected(late.data_port, agent) == cold_text(agent)
    assert fleet.store.metric("ibex_store_db_queries_total") == before
    assert late.counter("l2_hit") == COLD_AGENTS


def test_a_killed_envoy_changes_nothing_for_the_others(fleet):
    agent, fresh = new_agent(), new_agent()
    cached_everywhere(fleet, agent, "before the crash")
    fleet.set_directive(fresh, "a new agent after the crash", publish=False)
    victim, survivors = fleet.envoys[-1], fleet.envoys[:-1]
    live_subscribers = fleet.subscribers[:-1]
    failures = [s.metric("ibex_subscribe_invalidation_failures_total") for s in live_subscribers]
    victim.kill()  # SIGKILL of its whole session: a crash
    assert not victim.running()
    for envoy in survivors:
        assert injected(envoy.data_port, agent) == "before the crash", envoy.name
        assert injected(envoy.data_port, fresh) == "a new agent after the crash", envoy.name
    sql_set_directive(fleet, agent, "after the crash")
    fleet.redis_cli("PUBLISH", updates_channel(agent), "")
    serves_everywhere(fleet, agent, "after the crash", envoys=survivors)
    # the victim's subscriber keeps running (and logs its failed POSTs); the others never failed one
    assert fleet.subscribers[-1].running()
    assert [s.metric("ibex_subscribe_invalidation_failures_total") for s in live_subscribers] == failures
