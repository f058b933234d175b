"""L2 front, Redis and store failures: the directive still arrives when it can
be known, and the failure mode decides when it cannot.

The L2 front is the stack's (`stack.l2_part`): the REST front here, Webdis in
test_webdis.py, which runs these same tests on a Webdis stack.
"""

import pytest

from helpers import CHAT, agent_with, assert_chat_injected, chat_body, error_code, new_agent, send, tier
from stack import wait_until
from stack.contract import redis_key


@pytest.fixture()
def parts_back(stack):
    """Whatever a test stops is running again afterwards, and Envoy has its default settings."""
    yield
    for name in ("redis", stack.l2_part, "store"):
        stack.start(name)
    wait_until(stack.l2.ready, what=f"{stack.l2_part} to reach Redis again")
    stack.restart_envoy(filter_config={}, env={})


def test_l2_front_down_still_injects_via_the_store(stack, upstream, parts_back):
    agent = agent_with(stack, "Survive a Redis outage.")
    stack.stop(stack.l2_part)
    body = chat_body()
    response = send(stack, CHAT, body, agent=agent)
    assert response.status_code == 200
    received = upstream.last()
    assert_chat_injected(body, received.body, "Survive a Redis outage.")
    assert tier(received) == "store"
    assert stack.envoy.counter("l2_error") >= 1


def test_l2_front_and_store_down_fail_closed(stack, upstream, parts_back):
    stack.restart_envoy(filter_config={"failure_mode": "closed"})
    agent = agent_with(stack, "Unknowable right now.")  # cold: no tier holds it
    stack.stop(stack.l2_part)
    stack.stop("store")
    response = send(stack, CHAT, chat_body(), agent=agent)
    assert response.status_code == 503
    assert error_code(response) == "directive_unavailable"
    assert "Unknowable" not in response.text
    assert upstream.received() == []
    assert stack.envoy.counter("rejected.directive_unavailable") == 1


def test_l2_front_and_store_down_fail_open(stack, upstream, parts_back):
    stack.restart_envoy(filter_config={"failure_mode": "open"})
    stack.upstream.clear()
    agent = agent_with(stack, "Skipped when failing open.")
    stack.stop(stack.l2_part)
    stack.stop("store")
    body = chat_body()
    response = send(stack, CHAT, body, agent=agent)
    assert response.status_code == 200
    received = upstream.last()
    assert received.body == body
    assert tier(received) == "none"
    assert stack.envoy.counter("failed_open") == 1


def test_store_back_after_outage(stack, upstream, parts_back):
    """After both come back, a cold agent resolves normally again."""
    stack.stop(stack.l2_part)
    stack.stop("store")
    stack.start(stack.l2_part)
    stack.start("store")
    agent = agent_with(stack, "Back in business.")
    body = chat_body()
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    assert_chat_injected(body, upstream.last().body, "Back in business.")


def test_redis_down_behind_its_front_still_injects_and_l2_comes_back_by_itself(stack, upstream, parts_back):
    """Redis is killed, its HTTP front stays up: the filter's L2 callouts fail (the
    REST front answers 503, and its /readyz says so; Webdis answers an error), the
    store answers. Once Redis is back the front reconnects by itself: an agent that
    only Redis holds is served from L2 again, with no part restarted but Redis."""
    front = stack.l2
    front_pid = front.pid
    agent = agent_with(stack, "Redis is down, the store is not.")
    stack.part("redis").kill()
    assert front.running()
    if stack.l2_part == "rest":
        wait_until(lambda: front.readyz() == 503, what="the REST front's /readyz to report Redis gone")
        assert front.live(), "the REST front's /healthz must answer while Redis is down"
    errors = stack.envoy.counter("l2_error")
    body = chat_body()
    response = send(stack, CHAT, body, agent=agent)
    assert response.status_code == 200, response.text
    received = upstream.last()
    assert_chat_injected(body, received.body, "Redis is down, the store is not.")
    assert tier(received) == "store"
    assert stack.envoy.counter("l2_error") == errors + 1

    settled = stack.subscriber.settled_invalidations()
    stack.start("redis")
    wait_until(front.ready, what=f"{stack.l2_part} to reach the restarted Redis by itself")
    assert front.pid == front_pid, "the front was not restarted"
    # the subscriber's reconnect flush sweeps directive keys, then tells Envoy: let it pass first
    wait_until(lambda: stack.subscriber.settled_invalidations() > settled,
               what="the subscriber's reconnect flush to reach Envoy")
    only_in_redis = new_agent()
    stack.redis.command_call("SET", redis_key(only_in_redis), "Straight from Redis again.", "EX", 60)

    def served_from_redis():
        upstream.clear()
        assert send(stack, CHAT, chat_body(), agent=only_in_redis).status_code == 200
        return tier(upstream.last()) == "redis"

    wait_until(served_from_redis, timeout=30, interval=0.1, what="an L2 hit through the front after Redis is back")
    assert_chat_injected(chat_body(), upstream.last().body, "Straight from Redis again.")


def test_expired_entry_is_served_stale_while_redis_and_store_fail(stack, upstream, parts_back):
    """cache.stale_if_error_seconds: an expired L1 entry still answers while
    both remote tiers fail. Waiting polls until L1 stops answering "local";
    the tier that answers then must be "stale" (the 300 s window cannot pass
    within the wait's deadline)."""
    stack.restart_envoy(filter_config={"cache": {"ttl_seconds": 1, "stale_if_error_seconds": 300}})
    agent = agent_with(stack, "Stale but safe.")
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    assert tier(upstream.last()) == "store"
    stack.stop(stack.l2_part)
    stack.stop("store")

    def next_tier():
        upstream.clear()
        assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
        answered_by = tier(upstream.last())
        return None if answered_by == "local" else answered_by

    assert wait_until(next_tier, timeout=30, interval=0.05, what="the 1 s L1 entry to expire") == "stale"
    assert_chat_injected(chat_body(), upstream.last().body, "Stale but safe.")
    assert stack.envoy.counter("stale_served") >= 1
