"""Redis front and store failures: the directive still arrives when it can be
known, and the failure mode decides when it cannot."""

import pytest

from helpers import CHAT, agent_with, assert_chat_injected, chat_body, error_code, send, tier
from stack import wait_until


@pytest.fixture()
def parts_back(stack):
    """Whatever a test stops is running again afterwards, and Envoy has its default settings."""
    yield
    for name in ("webdis", "store"):
        stack.start(name)
    stack.restart_envoy(filter_config={}, env={})


def test_webdis_down_still_injects_via_the_store(stack, upstream, parts_back):
    agent = agent_with(stack, "Survive a Redis outage.")
    stack.stop("webdis")
    body = chat_body()
    response = send(stack, CHAT, body, agent=agent)
    assert response.status_code == 200
    received = upstream.last()
    assert_chat_injected(body, received.body, "Survive a Redis outage.")
    assert tier(received) == "store"
    assert stack.envoy.counter("l2_error") >= 1


def test_webdis_and_store_down_fail_closed(stack, upstream, parts_back):
    stack.restart_envoy(filter_config={"failure_mode": "closed"})
    agent = agent_with(stack, "Unknowable right now.")  # cold: no tier holds it
    stack.stop("webdis")
    stack.stop("store")
    response = send(stack, CHAT, chat_body(), agent=agent)
    assert response.status_code == 503
    assert error_code(response) == "directive_unavailable"
    assert "Unknowable" not in response.text
    assert upstream.received() == []
    assert stack.envoy.counter("rejected.directive_unavailable") == 1


def test_webdis_and_store_down_fail_open(stack, upstream, parts_back):
    stack.restart_envoy(filter_config={"failure_mode": "open"})
    stack.upstream.clear()
    agent = agent_with(stack, "Skipped when failing open.")
    stack.stop("webdis")
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
    stack.stop("webdis")
    stack.stop("store")
    stack.start("webdis")
    stack.start("store")
    agent = agent_with(stack, "Back in business.")
    body = chat_body()
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    assert_chat_injected(body, upstream.last().body, "Back in business.")


def test_expired_entry_is_served_stale_while_redis_and_store_fail(stack, upstream, parts_back):
    """cache.stale_if_error_seconds: an expired L1 entry still answers while
    both remote tiers fail. Waiting polls until L1 stops answering "local";
    the tier that answers then must be "stale" (the 300 s window cannot pass
    within the wait's deadline)."""
    stack.restart_envoy(filter_config={"cache": {"ttl_seconds": 1, "stale_if_error_seconds": 300}})
    agent = agent_with(stack, "Stale but safe.")
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    assert tier(upstream.last()) == "store"
    stack.stop("webdis")
    stack.stop("store")

    def next_tier():
        upstream.clear()
        assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
        answered_by = tier(upstream.last())
        return None if answered_by == "local" else answered_by

    assert wait_until(next_tier, timeout=30, interval=0.05, what="the 1 s L1 entry to expire") == "stale"
    assert_chat_injected(chat_body(), upstream.last().body, "Stale but safe.")
    assert stack.envoy.counter("stale_served") >= 1
