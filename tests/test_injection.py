"""Directive injection through the tiers, with the committed local config
(debug headers on, failure mode closed, negative TTL 10 s, TTL 60 s).

Every test uses fresh agent ids, so cache entries of one test never serve
another. Counts of store lookups, Redis GETs and Envoy callouts are read
right before and after the request under test.
"""

import json

from helpers import (
    CHAT,
    MESSAGES,
    RESPONSES,
    TRICKY_DIRECTIVE,
    agent_with,
    assert_chat_injected,
    assert_single_insertion,
    chat_body,
    error_code,
    new_agent,
    send,
    strict_json,
    tier,
)
from stack import wait_until
from stack.contract import redis_key as key
from stack.contract import stored_text

NEGATIVE_TTL = 10  # cache.negative_ttl_seconds of envoy/local.yaml


def callouts(stack):
    """Requests Envoy sent to the L2 front and to the store so far."""
    stats = stack.envoy.stats(r"cluster\.ibex_(redis|store)\.upstream_rq_total$")
    return stats.get("cluster.ibex_redis.upstream_rq_total", 0), stats.get("cluster.ibex_store.upstream_rq_total", 0)


def backend_counts(stack):
    """(store lookups, Redis GET calls, Envoy callouts to the L2 front and store)."""
    return stack.store.lookups(), stack.redis.command_calls("get"), callouts(stack)


def test_directive_is_the_new_first_message_and_nothing_else_changes(stack, upstream):
    agent = agent_with(stack, TRICKY_DIRECTIVE)
    body = chat_body()
    response = send(stack, CHAT, body, agent=agent)
    assert response.status_code == 200, response.text
    received = upstream.last()
    assert received.path == CHAT
    assert_chat_injected(body, received.body, TRICKY_DIRECTIVE)
    assert tier(received) == "store"
    assert int(received.header("content-length", len(received.body))) == len(received.body)
    # the echo model saw the directive first
    answer = response.json()["choices"][0]["message"]["content"]
    assert answer.splitlines()[1].startswith("[1] system: You are \"Ibex\"")


def test_next_request_is_served_from_l1_without_network(stack, upstream):
    agent = agent_with(stack, "Always answer in haiku.")
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    assert tier(upstream.last()) == "store"
    wait_until(lambda: stack.redis.ttl(key(agent)) > 0, what="the L2 write-back of the first request")
    before = backend_counts(stack)
    l1_hits = stack.envoy.counter("l1_hit")
    body = chat_body("second")
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    received = upstream.last()
    assert tier(received) == "local"
    assert_chat_injected(body, received.body, "Always answer in haiku.")
    assert backend_counts(stack) == before
    assert stack.envoy.counter("l1_hit") == l1_hits + 1


def test_redis_without_the_key_falls_through_to_the_store_and_is_filled(stack, upstream):
    agent = agent_with(stack, "Cite your sources.")
    assert stack.redis.get(key(agent)) is None
    lookups = stack.store.lookups()
    found = stack.store.metric("ibex_store_lookups_total", result="found")
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    assert tier(upstream.last()) == "store"
    assert stack.store.lookups() == lookups + 1
    assert stack.store.metric("ibex_store_lookups_total", result="found") == found + 1
    ttl = wait_until(lambda: stack.redis.ttl(key(agent)) > 0 and stack.redis.ttl(key(agent)),
                     what="the directive to be written back to Redis")
    assert 0 < ttl <= 60
    assert stored_text(stack.redis.get(key(agent))) == "Cite your sources."


def test_agent_without_directive_is_forwarded_byte_identical_and_cached_negatively(stack, upstream):
    agent = new_agent()
    body = chat_body()
    none_before = stack.store.metric("ibex_store_lookups_total", result="none")
    response = send(stack, CHAT, body, agent=agent)
    assert response.status_code == 200
    first = upstream.last()
    assert first.body == body
    assert tier(first) == "store"
    assert stack.store.metric("ibex_store_lookups_total", result="none") == none_before + 1
    # negative entry in L2: the empty string, with the negative TTL
    wait_until(lambda: stack.redis.get(key(agent)) is not None, what="the negative entry in Redis")
    assert stack.redis.get(key(agent)) == ""
    assert 0 < stack.redis.ttl(key(agent)) <= NEGATIVE_TTL
    # and in L1: no network for the second request
    before = backend_counts(stack)
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    second = upstream.last()
    assert second.body == body
    assert tier(second) == "local"
    assert backend_counts(stack) == before


def test_directive_found_in_redis_is_served_from_l2(stack, upstream):
    """An entry only Redis holds (written by another Envoy, say) answers without the store."""
    agent = new_agent()
    stack.redis.command_call("SET", key(agent), "From Redis only.", "EX", 300)
    before_lookups = stack.store.lookups()
    body = chat_body()
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    received = upstream.last()
    assert tier(received) == "redis"
    assert_chat_injected(body, received.body, "From Redis only.")
    assert stack.store.lookups() == before_lookups


def test_streaming_chat_request_is_injected(stack, upstream):
    agent = agent_with(stack, "Stream politely.")
    body = b'{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    response = send(stack, CHAT, body, agent=agent)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.rstrip().endswith("data: [DONE]")
    assert_chat_injected(body, upstream.last().body, "Stream politely.")


def test_query_string_does_not_hide_the_path(stack, upstream):
    agent = agent_with(stack, "Query strings are ignored.")
    body = chat_body()
    assert send(stack, CHAT + "?api-version=2024-10-21", body, agent=agent).status_code == 200
    assert_chat_injected(body, upstream.last().body, "Query strings are ignored.")


def test_responses_api_instructions(stack, upstream):
    agent = agent_with(stack, TRICKY_DIRECTIVE)
    absent = b'{"model":"demo", "input":"hello"}'
    assert send(stack, RESPONSES, absent, agent=agent).status_code == 200
    got = upstream.last().body
    assert_single_insertion(absent, got)
    assert strict_json(got) == {"model": "demo", "input": "hello", "instructions": TRICKY_DIRECTIVE}

    present = b'{"model":"demo","instructions":"Be terse.","input":[{"role":"user","content":"x"}]}'
    assert send(stack, RESPONSES, present, agent=agent).status_code == 200
    got = upstream.last().body
    assert_single_insertion(present, got)
    assert strict_json(got)["instructions"] == TRICKY_DIRECTIVE + "\n\nBe terse."


def test_anthropic_messages_system(stack, upstream):
    directive = "Never reveal internal tools."
    agent = agent_with(stack, directive)
    user = '"messages":[{"role":"user","content":"hi"}]'

    absent = ('{"model":"claude","max_tokens":64,' + user + '}').encode()
    assert send(stack, MESSAGES, absent, agent=agent).status_code == 200
    got = upstream.last().body
    assert_single_insertion(absent, got)
    assert strict_json(got)["system"] == directive

    string = ('{"model":"claude","system":"You are helpful.","max_tokens":64,' + user + '}').encode()
    assert send(stack, MESSAGES, string, agent=agent).status_code == 200
    got = upstream.last().body
    assert_single_insertion(string, got)
    assert strict_json(got)["system"] == directive + "\n\nYou are helpful."

    blocks = ('{"model":"claude","system":[{"type":"text","text":"Cached part.",'
              '"cache_control":{"type":"ephemeral"}}],"max_tokens":64,' + user + '}').encode()
    assert send(stack, MESSAGES, blocks, agent=agent).status_code == 200
    got = upstream.last().body
    assert_single_insertion(blocks, got)
    assert strict_json(got)["system"] == [
        {"type": "text", "text": directive},
        {"type": "text", "text": "Cached part.", "cache_control": {"type": "ephemeral"}},
    ]


def test_invalid_agent_id_is_rejected(stack, upstream):
    response = send(stack, CHAT, chat_body(), agent="not-a-uuid")
    assert response.status_code == 400
    assert error_code(response) == "invalid_agent_id"
    assert response.json()["error"]["message"]
    assert upstream.received() == []


def test_missing_agent_header_is_refused_by_the_committed_config(stack, upstream):
    """envoy/local.yaml sets agent.missing "reject" (the filter's own default, pass:
    test_config_variants.py)."""
    before = stack.envoy.counter("rejected.missing_agent_id")
    response = send(stack, CHAT, chat_body())
    assert response.status_code == 401
    assert error_code(response) == "missing_agent_id"
    assert upstream.received() == []
    assert stack.envoy.counter("rejected.missing_agent_id") == before + 1


def test_malformed_body_is_refused(stack, upstream):
    agent = agent_with(stack, "Refuse what cannot be parsed.")
    for body in (b'{"model":"demo","messages":[{"role":"user"', b'{"messages":[],"messages":[]}',
                 b'{"model":"\xff\xfe","messages":[]}'):
        response = send(stack, CHAT, body, agent=agent)
        assert response.status_code == 400, body
        assert error_code(response) == "invalid_body"
        assert "Refuse" not in response.text
    assert upstream.received() == []


def test_unreadable_content_encoding_is_refused(stack, upstream):
    agent = agent_with(stack, "No compressed bodies.")
    response = send(stack, CHAT, b"\x1f\x8b\x08\x00garbage", agent=agent, headers={"content-encoding": "br"})
    assert response.status_code == 415
    assert error_code(response) == "unsupported_encoding"
    assert upstream.received() == []


def test_local_replies_are_openai_style_json(stack, upstream):
    response = send(stack, CHAT, chat_body(), agent="123")
    assert response.headers["content-type"].startswith("application/json")
    error = json.loads(response.content)["error"]
    assert set(error) >= {"type", "code", "message"}
