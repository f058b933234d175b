"""Cache coherence: a directive change reaches the next requests, through the
control endpoint and through PUBLISH → companion subscriber → Redis DEL +
control POST. `stack.set_directive` returns once the subscriber has settled
the published update, so the request right after it must see the change."""

import requests

from helpers import CHAT, agent_with, assert_chat_injected, chat_body, new_agent, send, tier
from stack import wait_until

CONTROL_TOKEN = "test-control-token"
CONTROL_CONFIG = {"control": {"token": CONTROL_TOKEN}}


def key(agent):
    return f"directive:{agent}"


def cached(stack, agent, directive):
    """Request once so the directive sits in L1 and L2; check the next one is local."""
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    wait_until(lambda: stack.redis.get(key(agent)) == directive, what="the L2 write-back")
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    assert tier(stack.upstream.last()) == "local"


def injected_text(stack, agent):
    """The directive the upstream got for one request of `agent`, or None."""
    stack.upstream.clear()
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    first = stack.upstream.last().json()["messages"][0]
    return first["content"] if first["role"] == "system" else None


def control(stack, path, token=CONTROL_TOKEN):
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return requests.post(stack.envoy.control_url + path, headers=headers, timeout=10)


def test_control_invalidate_one_agent(stack, upstream):
    stack.restart_envoy(control_config=CONTROL_CONFIG)
    agent = agent_with(stack, "Version one.")
    cached(stack, agent, "Version one.")
    # change Postgres without publishing, drop L2 by hand, then invalidate L1 ourselves
    stack.set_directive(agent, "Version two.", publish=False)
    stack.redis.command_call("DEL", key(agent))
    assert injected_text(stack, agent) == "Version one."  # nothing told the cache yet
    response = control(stack, f"/ibex/v1/invalidate/{agent}")
    assert response.status_code == 204
    body = chat_body()
    stack.upstream.clear()
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    assert tier(stack.upstream.last()) == "store"
    assert_chat_injected(body, stack.upstream.last().body, "Version two.")
    assert stack.envoy.counter("invalidations") >= 1


def test_control_invalidate_all(stack, upstream):
    stack.restart_envoy(control_config=CONTROL_CONFIG)
    agents = [new_agent(), new_agent()]
    for agent in agents:
        stack.set_directive(agent, "Old text.", publish=False)
        cached(stack, agent, "Old text.")
        stack.set_directive(agent, "New text.", publish=False)
        stack.redis.command_call("DEL", key(agent))
    assert control(stack, "/ibex/v1/invalidate").status_code == 204
    for agent in agents:
        assert injected_text(stack, agent) == "New text."


def test_control_requires_the_token(stack, upstream):
    stack.restart_envoy(control_config=CONTROL_CONFIG)
    agent = new_agent()
    assert control(stack, f"/ibex/v1/invalidate/{agent}", token=None).status_code in (401, 403)
    assert control(stack, f"/ibex/v1/invalidate/{agent}", token="wrong").status_code in (401, 403)


def test_control_listener_does_not_proxy(stack, upstream):
    stack.restart_envoy(control_config={})
    response = requests.post(stack.envoy.control_url + CHAT, data=chat_body(), timeout=10)
    assert response.status_code == 404
    stack.restart_envoy(control_config=CONTROL_CONFIG)
    assert control(stack, CHAT).status_code == 404
    assert upstream.received() == []


def test_published_update_reaches_the_next_requests(stack, upstream):
    """set-directive publishes; the subscriber deletes the Redis key and POSTs
    the control listener; requests then carry the new text."""
    stack.restart_envoy(control_config={})
    agent = agent_with(stack, "Before the update.")
    cached(stack, agent, "Before the update.")
    stack.set_directive(agent, "After the update.")
    assert injected_text(stack, agent) == "After the update."


def test_published_clear_removes_the_directive(stack, upstream):
    agent = agent_with(stack, "Soon gone.")
    cached(stack, agent, "Soon gone.")
    stack.clear_directive(agent)
    body = chat_body()
    stack.upstream.clear()
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    assert stack.upstream.last().body == body
    assert tier(stack.upstream.last()) == "store"


def test_flush_invalidates_everything(stack, upstream):
    agent = agent_with(stack, "Flushed soon.")
    cached(stack, agent, "Flushed soon.")
    stack.set_directive(agent, "After the flush.", publish=False)
    stack.flush()
    assert injected_text(stack, agent) == "After the flush."


def test_flush_marker_keeps_write_backs_out_of_redis(stack, upstream):
    """After a full flush the subscriber leaves a marker for a while; a fill
    that read Postgres meanwhile must not write Redis (it could carry text
    from before the flush). The marker outlives the test's two requests."""
    stack.flush()
    assert stack.redis.get("directive:__flush__") is not None
    agent = agent_with(stack, "Not written back during a flush window.")
    skipped = stack.envoy.counter("l2_write_skipped")
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    assert tier(stack.upstream.last()) == "store"
    wait_until(lambda: stack.envoy.counter("l2_write_skipped") > skipped, what="the refused write-back")
    assert stack.redis.get(key(agent)) is None
    # L1 still has it: the next request needs no network
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    assert tier(stack.upstream.last()) == "local"
