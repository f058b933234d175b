"""Webdis as the L2 front (`redis.dialect: "webdis"`), end to end: the one module
that runs a Webdis stack now that the REST front is the default (issue 13).

- injection through each tier with Webdis in front of Redis: the store (and the
  write-back through Webdis), Redis through Webdis, L1; byte for byte;
- invalidation through the subscriber, with Webdis reading what it left;
- the Webdis rows of README's failure table: the failure tests of
  test_failures.py, imported here, run on this module's Webdis stack (Webdis
  killed, Webdis and the store down, Redis killed behind Webdis, stale entries);
- no log holds the directive, with Webdis at full verbosity;
- Envoy's connections to Webdis are reused (keep-alive), as to the REST front.
"""

import requests

from helpers import (CHAT, TRICKY_DIRECTIVE, agent_with, assert_chat_injected, assert_injected, chat_body, new_agent,
                     send, tier)
from stack import Stack, wait_until
from stack.contract import FLUSH_MARKER_PATTERN, INVALIDATE_PATH, TOMBSTONE, redis_key, stored_text
from test_failures import (  # noqa: F401 - collected here, on this module's Webdis stack
    parts_back,
    test_expired_entry_is_served_stale_while_redis_and_store_fail,
    test_l2_front_and_store_down_fail_closed,
    test_l2_front_and_store_down_fail_open,
    test_l2_front_down_still_injects_via_the_store,
    test_redis_down_behind_its_front_still_injects_and_l2_comes_back_by_itself,
    test_store_back_after_outage,
)
from test_privacy import DEBUG_HEADERS as COMMITTED_DEBUG_HEADERS
from test_privacy import LOG_LEVELS as DEBUG_LOG_LEVELS
from test_privacy import directive_goes_everywhere_and_no_log_holds_it
from test_rest_front import BINARYISH, l2_reads

L2 = "webdis"


def test_the_stack_runs_webdis_and_not_the_rest_front(stack):
    assert stack.l2_part == "webdis" and stack.l2_dialect == "webdis"
    assert stack.webdis.running() and not stack.rest.running()
    assert "rest" not in stack.parts


def test_every_tier_through_webdis(stack, upstream):
    agent = agent_with(stack, TRICKY_DIRECTIVE)
    # L3, then the write-back through Webdis
    body = chat_body()
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    assert tier(upstream.last()) == "store"
    assert_chat_injected(body, upstream.last().body, TRICKY_DIRECTIVE)
    wait_until(lambda: stored_text(stack.redis.get(redis_key(agent))) == TRICKY_DIRECTIVE,
               what="the write-back through Webdis")
    assert 0 < stack.redis.ttl(redis_key(agent)) <= 60
    # L1
    upstream.clear()
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    assert tier(upstream.last()) == "local"
    # L2: L1 dropped through the control endpoint (no Redis tombstone), Webdis reads Redis
    answer = requests.post(f"{stack.envoy.control_url}{INVALIDATE_PATH}/{agent}", headers=stack.control_headers(),
                           timeout=10)
    assert answer.status_code == 204
    upstream.clear()
    body = chat_body("third")
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    assert tier(upstream.last()) == "redis"
    assert_chat_injected(body, upstream.last().body, TRICKY_DIRECTIVE)


def test_an_awkward_64_kb_directive_that_only_redis_holds_comes_through_webdis_byte_for_byte(stack, upstream):
    agent = new_agent()
    stack.redis.command_call("SET", redis_key(agent), BINARYISH.encode(), "EX", 60)
    body = chat_body()
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    assert tier(upstream.last()) == "redis"
    assert_injected("openai_chat", body, upstream.last().body, BINARYISH)


def test_an_update_reaches_the_next_request_through_webdis(stack, upstream):
    agent = agent_with(stack, "Before the update.")
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    wait_until(lambda: stored_text(stack.redis.get(redis_key(agent))) == "Before the update.",
               what="the write-back")
    stack.set_directive(agent, "After the update.")  # returns once the subscriber settled it
    assert stack.redis.get(redis_key(agent)) == TOMBSTONE
    upstream.clear()
    body = chat_body()
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    assert tier(upstream.last()) == "store"  # the tombstone read through Webdis is no directive
    assert_chat_injected(body, upstream.last().body, "After the update.")


def test_envoy_reuses_its_connections_to_webdis_too(stack, upstream):
    """Measured, not assumed: Webdis 0.1.9 (Debian's) keeps Envoy's HTTP/1.1
    connections alive, as the REST front does (test_rest_front.py), so N L2 reads cost
    a connection or two per worker, not N. (Issue 13 assumed Webdis closed after
    every answer; Envoy's upstream_cx_total says otherwise.)"""
    reads = 20
    delta = l2_reads(stack, upstream, reads)
    print(f"\n{reads} L2 reads through Webdis: {delta}")
    assert delta["upstream_rq_total"] >= reads
    assert delta["upstream_cx_total"] <= 2 * stack.envoy.concurrency, delta


def test_directive_text_is_in_no_log_with_webdis_at_full_verbosity(tmp_path):
    """test_privacy.py's check on a Webdis stack of its own: Webdis logs every request
    at verbosity 8, never the directive."""
    with Stack(tmp_path / "stack", log_levels=DEBUG_LOG_LEVELS, patient=True, debug_headers=COMMITTED_DEBUG_HEADERS,
               l2="webdis") as stack:
        # the subscriber's first flush leaves a marker that holds back write-backs for 10 s
        stack.redis.delete_matching(FLUSH_MARKER_PATTERN)
        directive_goes_everywhere_and_no_log_holds_it(stack, stack.upstream)
