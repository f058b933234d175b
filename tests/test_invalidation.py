"""Cache coherence (SPEC §4): a directive change reaches the next requests,
whichever Envoy worker takes them.

Changes arrive through the control endpoint, through the admin subcommands
(`ibex-companion set-directive` / `clear-directive` / `flush`, which publish),
and through a writer that is not ours (SQL, then `redis-cli PUBLISH`). The
companion subscriber turns each message into a Redis tombstone and a control
POST; after every (re)connect to Redis it flushes everything, because messages
published while it was away are lost. Each test waits for the subscriber (or
Envoy) to report that it processed the change, never for a fixed time.

Races between fills and invalidations: test_invalidation_race.py.
"""

import pytest
import requests

from helpers import (CHAT, agent_with, assert_chat_injected, chat_body, new_agent, requests_on_every_worker, send,
                     tier)
from stack import wait_until
from stack.contract import (FLUSH_CHANNEL, FLUSH_MARKER_PATTERN, INVALIDATE_PATH, SLOTS, TOMBSTONE, flush_marker_for,
                            stored_text, updates_channel)
from stack.contract import redis_key as key
from stack.postgres import quote_literal

def cached(stack, agent, directive):
    """Request once so the directive sits in L1 and L2; check the next one is local."""
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    wait_until(lambda: stored_text(stack.redis.get(key(agent))) == directive, what="the L2 write-back")
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    assert tier(stack.upstream.last()) == "local"


def injected_text(stack, agent):
    """The directive the upstream got for one request of `agent`, or None."""
    stack.upstream.clear()
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    first = stack.upstream.last().json()["messages"][0]
    return first["content"] if first["role"] == "system" else None


def every_worker_carries(stack, agent, directive):
    """Requests on fresh connections until both workers took some: each one carries
    `directive` (None: no directive, the body arrives byte for byte as sent).
    Returns the tiers that answered."""
    body = chat_body()
    tiers = []
    for worker, response in requests_on_every_worker(stack, CHAT, body, agent):
        assert response.status_code == 200, (worker, response.text)
        received = stack.upstream.last()
        if directive is None:
            assert received.body == body, f"worker {worker} forwarded a changed body"
        else:
            assert_chat_injected(body, received.body, directive)
        tiers.append(tier(received))
    return tiers


def control(stack, path, token=None, authorization=None):
    """POST to the control listener, with the stack's bearer token unless told otherwise
    (`token`: another one, "" none; `authorization`: the header as it is)."""
    if token is None:
        token = stack.control_token
    if authorization is None and token:
        authorization = f"Bearer {token}"
    headers = {"authorization": authorization} if authorization else {}
    return requests.post(stack.envoy.control_url + path, headers=headers, timeout=10)


# -- a writer that is not ours: SQL, then PUBLISH ------------------------------


def sql_set_directive(stack, agent, content):
    """Like any other writer: a new directive_versions row, made the active one."""
    stack.postgres.psql(
        "WITH v AS (INSERT INTO ibex_core.directive_versions (directive_id, content) "
        f"SELECT id, {quote_literal(content)} FROM ibex_core.directives "
        f"WHERE agent_id = {quote_literal(agent)} AND is_active RETURNING id, directive_id) "
        "UPDATE ibex_core.directives d SET active_version_id = v.id, updated_at = now() "
        "FROM v WHERE d.id = v.directive_id"
    )


def sql_deactivate(stack, agent):
    stack.postgres.psql(
        f"UPDATE ibex_core.directives SET is_active = false, updated_at = now() "
        f"WHERE agent_id = {quote_literal(agent)} AND is_active"
    )


def subscriber_sent(stack):
    return stack.subscriber.metric("ibex_subscribe_invalidations_sent_total")


def subscriber_failed(stack):
    return stack.subscriber.metric("ibex_subscribe_invalidation_failures_total")


def publish(stack, channel):
    """PUBLISH with the real redis-cli; returns how many subscribers got it."""
    return int(stack.redis_cli("PUBLISH", channel, ""))


def publish_and_wait(stack, channel):
    """PUBLISH, then wait until the subscriber's POST to Envoy was acknowledged
    (its Redis step comes first, so both are done)."""
    sent, failed = subscriber_sent(stack), subscriber_failed(stack)
    assert publish(stack, channel) == 1, "the subscriber is not subscribed"
    wait_until(lambda: subscriber_sent(stack) > sent, what="the subscriber to deliver the invalidation")
    assert subscriber_failed(stack) == failed


# -- the control endpoint --------------------------------------------------------


def test_control_invalidate_one_agent(stack, upstream):
    agent = agent_with(stack, "Version one.")
    cached(stack, agent, "Version one.")
    # change Postgres without publishing, drop L2 by hand, then invalidate L1 ourselves
    stack.set_directive(agent, "Version two.", publish=False)
    stack.redis.command_call("DEL", key(agent))
    assert injected_text(stack, agent) == "Version one."  # nothing told the cache yet
    invalidations = stack.envoy.counter("invalidations")
    assert control(stack, f"{INVALIDATE_PATH}/{agent}").status_code == 204
    assert stack.envoy.counter("invalidations") == invalidations + 1
    body = chat_body()
    stack.upstream.clear()
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    assert tier(stack.upstream.last()) == "store"
    assert_chat_injected(body, stack.upstream.last().body, "Version two.")


def test_control_invalidate_all(stack, upstream):
    agents = [new_agent(), new_agent()]
    for agent in agents:
        stack.set_directive(agent, "Old text.", publish=False)
        cached(stack, agent, "Old text.")
        stack.set_directive(agent, "New text.", publish=False)
        stack.redis.command_call("DEL", key(agent))
    assert control(stack, INVALIDATE_PATH).status_code == 204
    for agent in agents:
        assert injected_text(stack, agent) == "New text."


def test_control_without_the_token_is_refused_and_invalidates_nothing(stack, upstream):
    """Every stack's control listener wants its token (the subscriber presents it)."""
    token = stack.control_token
    agent = agent_with(stack, "Still cached.")
    cached(stack, agent, "Still cached.")
    stack.set_directive(agent, "Not visible until invalidated.", publish=False)
    stack.redis.command_call("DEL", key(agent))  # an invalidated L1 would now ask the store
    lookups = stack.store.lookups()
    invalidations = stack.envoy.counter("invalidations")
    refused = [
        {"token": ""},
        {"token": "wrong"},
        {"token": token + "x"},
        {"token": token[:-1]},
        {"authorization": token},  # no "Bearer "
        {"authorization": f"Basic {token}"},
    ]
    for path in (f"{INVALIDATE_PATH}/{agent}", INVALIDATE_PATH):
        for credentials in refused:
            response = control(stack, path, **credentials)
            assert response.status_code == 401, (path, list(credentials))
            assert token not in response.text
    # nothing was invalidated: the entry is still served from L1, no store lookup
    assert injected_text(stack, agent) == "Still cached."
    assert tier(stack.upstream.last()) == "local"
    assert stack.store.lookups() == lookups
    assert stack.envoy.counter("invalidations") == invalidations
    # the refusals were about the token: with it, the same call invalidates
    assert control(stack, f"{INVALIDATE_PATH}/{agent}").status_code == 204
    assert injected_text(stack, agent) == "Not visible until invalidated."
    assert tier(stack.upstream.last()) == "store"


def test_control_listener_does_not_proxy(stack, upstream):
    """Without the token every path is refused (401), with it an unknown one is 404."""
    response = requests.post(stack.envoy.control_url + CHAT, data=chat_body(), timeout=10)
    assert response.status_code == 401
    response = requests.post(stack.envoy.control_url + CHAT, data=chat_body(), headers=stack.control_headers(),
                             timeout=10)
    assert response.status_code == 404
    assert upstream.received() == []


# -- the admin subcommands (publish, then the subscriber) --------------------------


def test_set_directive_reaches_every_worker(stack, upstream):
    """set-directive publishes; once the subscriber settled it, every request,
    whichever worker takes it, carries the new text."""
    agent = agent_with(stack, "Before the update.")
    cached(stack, agent, "Before the update.")
    stack.set_directive(agent, "After the update.")
    assert stack.redis.get(key(agent)) == TOMBSTONE
    tiers = every_worker_carries(stack, agent, "After the update.")
    assert tiers[0] == "store"  # the old L1 entry was not served


def test_clear_directive_reaches_every_worker(stack, upstream):
    """clear-directive publishes; every request then goes up byte for byte, without
    the directive."""
    agent = agent_with(stack, "Soon gone.")
    cached(stack, agent, "Soon gone.")
    stack.clear_directive(agent)
    tiers = every_worker_carries(stack, agent, None)
    assert tiers[0] == "store"


def test_flush_marker_keeps_write_backs_out_of_redis(stack, upstream):
    """After a full flush the subscriber leaves a marker for a while; a fill
    that read Postgres meanwhile must not write Redis (it could carry text
    from before the flush). The marker outlives the test's two requests."""
    stack.flush()
    # one marker in every hash slot, and the single one filters from before them check
    assert len(stack.redis.keys(FLUSH_MARKER_PATTERN)) == SLOTS + 1
    agent = agent_with(stack, "Not written back during a flush window.")
    assert stack.redis.get(flush_marker_for(key(agent))) is not None
    skipped = stack.envoy.counter("l2_write_skipped")
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    assert tier(stack.upstream.last()) == "store"
    wait_until(lambda: stack.envoy.counter("l2_write_skipped") > skipped, what="the refused write-back")
    assert stack.redis.get(key(agent)) is None
    # L1 still has it: the next request needs no network
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    assert tier(stack.upstream.last()) == "local"


# -- a writer that is not ours ------------------------------------------------------


def test_foreign_writer_new_version_then_publish(stack, upstream):
    """SQL inserts a version and activates it, redis-cli publishes: same effect
    as set-directive."""
    agent = agent_with(stack, "Written by us.")
    cached(stack, agent, "Written by us.")
    sql_set_directive(stack, agent, "Written by someone else.")
    assert injected_text(stack, agent) == "Written by us."  # not published yet: L1 still serves it
    publish_and_wait(stack, updates_channel(agent))
    assert stack.redis.get(key(agent)) == TOMBSTONE
    every_worker_carries(stack, agent, "Written by someone else.")


def test_foreign_writer_deactivation_then_publish(stack, upstream):
    """SQL sets is_active = false, redis-cli publishes: requests go up untouched."""
    agent = agent_with(stack, "Deactivated by someone else.")
    cached(stack, agent, "Deactivated by someone else.")
    sql_deactivate(stack, agent)
    publish_and_wait(stack, updates_channel(agent))
    every_worker_carries(stack, agent, None)


def test_flush_channel_re_resolves_every_agent(stack, upstream):
    """Several agents changed in Postgres without any publish; one PUBLISH on the
    flush channel and each of them resolves again."""
    changes = [("Alpha, old.", "Alpha, new."), ("Bravo, old.", "Bravo, new."),
               ("Charlie, old.", "Charlie, new."), ("Delta, old.", None)]
    agents = {}
    for old, new in changes:
        agent = agent_with(stack, old)
        cached(stack, agent, old)
        if new is None:
            sql_deactivate(stack, agent)
        else:
            sql_set_directive(stack, agent, new)
        assert injected_text(stack, agent) == old  # nothing published: still cached
        agents[agent] = new
    publish_and_wait(stack, FLUSH_CHANNEL)
    for agent, new in agents.items():
        assert stack.redis.get(key(agent)) is None  # the flush swept L2
        tiers = every_worker_carries(stack, agent, new)
        assert tiers[0] == "store"


# -- the subscriber losing messages ---------------------------------------------------


@pytest.fixture()
def redis_and_subscriber_back(stack):
    """Whatever a test stops runs again afterwards."""
    yield
    for name in ("redis", stack.l2_part, "subscriber"):
        if not stack.part(name).running():
            stack.start(name)
    wait_until(stack.l2.ready, what=f"{stack.l2_part} to reach Redis again")


def test_redis_restart_subscriber_reconnects_and_flushes(stack, upstream, redis_and_subscriber_back):
    """Redis restarts under a running subscriber: it reconnects, flushes every
    cache (it may have missed messages), and honours updates published after."""
    agent = agent_with(stack, "Before the Redis restart.")
    cached(stack, agent, "Before the Redis restart.")
    # changed without a publish: only the subscriber's reconnect flush can tell the caches
    stack.set_directive(agent, "Changed without a publish.", publish=False)
    reconnects = stack.subscriber.metric("ibex_subscribe_reconnects_total")
    flushes = stack.subscriber.metric("ibex_subscribe_full_flushes_total")
    invalidations = stack.envoy.counter("invalidations")
    stack.stop("redis")
    stack.start("redis")
    wait_until(lambda: stack.subscriber.metric("ibex_subscribe_reconnects_total") > reconnects,
               what="the subscriber to reconnect to Redis")
    assert stack.subscriber.metric("ibex_subscribe_connected") == 1
    wait_until(lambda: stack.envoy.counter("invalidations") > invalidations,
               what="the subscriber's reconnect flush to reach Envoy")
    assert stack.subscriber.metric("ibex_subscribe_full_flushes_total") > flushes
    # the L2 front reconnects to Redis by itself; no restart needed
    assert stack.l2.running()
    wait_until(stack.l2.ready, what=f"{stack.l2_part} to reach the restarted Redis")
    assert injected_text(stack, agent) == "Changed without a publish."
    assert tier(stack.upstream.last()) == "store"
    # updates published after the reconnect are honoured
    stack.set_directive(agent, "Published after the reconnect.")
    assert stack.redis.get(key(agent)) == TOMBSTONE
    every_worker_carries(stack, agent, "Published after the reconnect.")


def test_subscriber_down_during_an_update_flushes_when_it_starts(stack, upstream, redis_and_subscriber_back):
    """An update published while no subscriber listens is lost; the subscriber's
    full flush when it starts drops the stale entries of every cache."""
    agent = agent_with(stack, "Before the lost update.")
    cached(stack, agent, "Before the lost update.")
    stack.stop("subscriber")
    sql_set_directive(stack, agent, "After the lost update.")
    assert publish(stack, updates_channel(agent)) == 0  # nobody listens: the message is gone
    assert injected_text(stack, agent) == "Before the lost update."
    assert tier(stack.upstream.last()) == "local"
    assert stored_text(stack.redis.get(key(agent))) == "Before the lost update."
    stack.start("subscriber")  # returns once its initial flush reached Envoy
    assert stack.redis.get(key(agent)) is None
    tiers = every_worker_carries(stack, agent, "After the lost update.")
    assert tiers[0] == "store"
