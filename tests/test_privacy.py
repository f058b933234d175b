"""Directive text is never logged, by any part, at any level (SPEC §7); nor
is the control token; and the provider learns neither the agent nor the tier.

Envoy runs with -l debug, the companion with RUST_LOG=debug and Webdis at
full verbosity; the directive then goes through every path (store, write
back, Redis, L1, invalidation, failure replies) and no log line may hold it,
or, but for Envoy's own debug log (it prints its configuration), the control
token the subscriber presented for the invalidation. The stack runs the
committed debug_headers (off).

The logs are read only once every part has stopped, so that each has written
out all it had (Envoy buffers its log file; the harness also has it flushed
every 100 ms): Envoy's log must hold its server's last line, `exiting`.
"""

import re
import uuid

from helpers import CHAT, MESSAGES, RESPONSES, agent_with, chat_body, new_agent, send
from stack import wait_until
from stack.contract import AGENT_HEADER, TIER_HEADER, redis_key

LOG_LEVELS = {"envoy": "debug", "companion": "debug", "webdis": 8}
DEBUG_HEADERS = False  # as committed
SHUTDOWN = re.compile(r"\[info\]\[main\] .* exiting$", re.MULTILINE)  # Envoy's server, at its very end

CANARY = "CANARY" + uuid.uuid4().hex.upper()
DIRECTIVE = f"Privacy check {CANARY}: never print me.\nSecond line with \"quotes\"."


def test_directive_text_is_in_no_log(stack, upstream):
    agent = agent_with(stack, DIRECTIVE)
    # L3 → write back → L1
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    wait_until(lambda: stack.redis.get(redis_key(agent)) == DIRECTIVE, what="the L2 write-back")
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    assert send(stack, RESPONSES, b'{"model":"m","input":"x"}', agent=agent).status_code == 200
    assert send(stack, MESSAGES, b'{"model":"m","max_tokens":5,"messages":[]}', agent=agent).status_code == 200
    # the directive did reach the model, so the logs had their chance
    assert CANARY in upstream.last().text
    # the provider learns neither the agent nor the tier that answered
    assert upstream.received(), "the upstream saw nothing"
    for received in upstream.received():
        assert received.header(AGENT_HEADER) is None, "the agent header reached the upstream"
        assert received.header(TIER_HEADER) is None, "the debug header reached the upstream"
    # L2 only: another agent whose entry only Redis holds
    other = new_agent()
    stack.redis.command_call("SET", redis_key(other), DIRECTIVE, "EX", 300)
    assert send(stack, CHAT, chat_body(), agent=other).status_code == 200
    # update and invalidation through the subscriber
    stack.set_directive(agent, DIRECTIVE + " v2")
    wait_until(lambda: stack.redis.get(redis_key(agent)) != DIRECTIVE, what="the subscriber's delete")
    # local replies
    send(stack, CHAT, b"{broken", agent=agent)
    send(stack, CHAT, chat_body(), agent="nope")
    stack.store.directive(agent)

    # the subscriber's invalidations went through, so it did present the token
    assert stack.subscriber.metric("ibex_subscribe_invalidations_sent_total") >= 1
    assert stack.subscriber.metric("ibex_subscribe_invalidation_failures_total") == 0
    token = stack.control_token

    stack.stop()  # every part writes out its last lines before the logs are read
    logs = stack.log_files()
    assert any(path.name == "envoy.log" for path in logs)
    assert any(path.name == "webdis-server.log" for path in logs)
    for path in logs:
        text = path.read_text(errors="replace")
        assert CANARY not in text, f"directive text logged in {path}"
        # Envoy's own debug log prints its whole configuration, and request headers:
        # secrets in either show there (README, Threat model), whatever the filter does.
        if not path.name.startswith("envoy"):
            assert token not in text, f"the control token logged in {path}"
    # the debug logs did record the requests (the levels took effect)
    envoy_log = next(path for path in logs if path.name == "envoy.log").read_text()
    assert "[debug]" in envoy_log
    assert SHUTDOWN.search(envoy_log), "Envoy's log was read before Envoy wrote its end"
    webdis_log = next(path for path in logs if path.name == "webdis-server.log").read_text()
    assert "/PING" in webdis_log
