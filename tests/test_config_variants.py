"""Filter settings that change behaviour: each test restarts Envoy (same
ports, same backends) with its own filter configuration or environment."""

import pytest

from helpers import CHAT, agent_with, assert_chat_injected, chat_body, error_code, send, tier
from stack import REMOVE, wait_until
from stack.contract import redis_key as key
from stack.envoy import DATA_LISTENER, filter_json, listener


@pytest.fixture()
def restart(stack):
    """restart(filter_config=..., env=...) -> a fresh Envoy with those settings.

    The module's stack gets its default Envoy back afterwards.
    """
    def _restart(filter_config=None, env=None):
        stack.restart_envoy(filter_config=filter_config or {}, env=env or {})
        stack.upstream.clear()
        return stack.envoy

    yield _restart
    stack.restart_envoy(filter_config={}, env={})


@pytest.mark.parametrize("missing", ["pass", REMOVE], ids=["pass", "filter_default"])
def test_missing_agent_header_passes_untouched_when_configured(stack, restart, missing):
    """agent.missing "pass" (also the filter's default; the committed configs reject:
    test_injection.py) forwards a request without an agent untouched."""
    restart({"agent": {"missing": missing}})
    body = chat_body()
    response = send(stack, CHAT, body)
    assert response.status_code == 200
    assert stack.upstream.last().body == body
    assert stack.envoy.counter("rejected.missing_agent_id") == 0


def test_custom_agent_header(stack, restart):
    restart({"agent": {"header": "x-team-agent"}})
    agent = agent_with(stack, "Custom header agent.")
    body = chat_body()
    response = send(stack, CHAT, body, headers={"x-team-agent": agent})
    assert response.status_code == 200
    assert_chat_injected(body, stack.upstream.last().body, "Custom header agent.")


def test_developer_role(stack, restart):
    restart({"inject": {"role": "developer"}})
    agent = agent_with(stack, "Developer role directive.")
    body = chat_body()
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    assert_chat_injected(body, stack.upstream.last().body, "Developer role directive.", role="developer")


def test_expired_l1_entry_is_served_from_redis(stack, restart):
    """With a 1 s TTL the L1 entry expires while Redis (set by the test with a
    long TTL) still holds the key: the first request that L1 no longer
    answers must be answered by Redis, never by the store.

    Waiting polls requests until one is not answered locally; what is asserted
    (which tier answered, that the store saw nothing) does not depend on when.
    """
    restart({"cache": {"ttl_seconds": 1}})
    directive = "Short-lived in L1."
    agent = agent_with(stack, directive)
    stack.redis.command_call("SET", key(agent), directive, "EX", 600)
    lookups = stack.store.lookups()
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    assert tier(stack.upstream.last()) == "redis"  # L1 now holds it for 1 s

    def next_tier():
        stack.upstream.clear()
        assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
        answered_by = tier(stack.upstream.last())
        return None if answered_by == "local" else answered_by

    answered_by = wait_until(next_tier, timeout=30, interval=0.05, what="the 1 s L1 entry to expire")
    assert answered_by == "redis"
    assert stack.store.lookups() == lookups
    assert_chat_injected(chat_body(), stack.upstream.last().body, directive)


def write_back_ttl(stack, directive):
    """The TTL of the Redis write-back after one request of a new agent with `directive`."""
    agent = agent_with(stack, directive)
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    return wait_until(lambda: stack.redis.ttl(key(agent)) > 0 and stack.redis.ttl(key(agent)),
                      what="the L2 write-back")


def test_cache_ttl_from_environment(stack, restart):
    """IBEX_DIRECTIVE_CACHE_TTL reaches the VM and sets the TTL of L2 writes
    when the JSON config has no cache.ttl_seconds."""
    envoy = restart({"cache": {"ttl_seconds": REMOVE}}, env={"IBEX_DIRECTIVE_CACHE_TTL": "1234"})
    assert "ttl_seconds" not in filter_json(listener(envoy.render(), DATA_LISTENER)).get("cache", {})
    assert 60 < write_back_ttl(stack, "TTL from the environment.") <= 1234


def test_json_ttl_wins_over_environment(stack, restart):
    restart({"cache": {"ttl_seconds": 77}}, env={"IBEX_DIRECTIVE_CACHE_TTL": "1234"})
    assert 0 < write_back_ttl(stack, "TTL from JSON.") <= 77


def test_smaller_body_limit(stack, restart):
    restart({"inject": {"max_body_bytes": 1000}})
    agent = agent_with(stack, "Small bodies only.")
    response = send(stack, CHAT, b'{"model":"m","messages":[{"role":"user","content":"' + b"x" * 2000 + b'"}]}',
                    agent=agent)
    assert response.status_code == 413
    assert error_code(response) == "body_too_large"
    assert stack.upstream.received() == []
