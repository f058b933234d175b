"""Directive text is never logged, by any part, at any level (SPEC §7).

Envoy runs with -l debug, the companion with RUST_LOG=debug and Webdis at
full verbosity; the directive then goes through every path (store, write
back, Redis, L1, invalidation, failure replies) and no log line may hold it.

The logs are read only once every part has stopped, so that each has written
out all it had (Envoy buffers its log file; the harness also has it flushed
every 100 ms): Envoy's log must hold its server's last line, `exiting`.
"""

import re
import uuid

from helpers import CHAT, MESSAGES, RESPONSES, agent_with, chat_body, new_agent, send
from stack import wait_until
from stack.contract import redis_key

LOG_LEVELS = {"envoy": "debug", "companion": "debug", "webdis": 8}
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

    stack.stop()  # every part writes out its last lines before the logs are read
    logs = stack.log_files()
    assert any(path.name == "envoy.log" for path in logs)
    assert any(path.name == "webdis-server.log" for path in logs)
    for path in logs:
        text = path.read_text(errors="replace")
        assert CANARY not in text, f"directive text logged in {path}"
    # the debug logs did record the requests (the levels took effect)
    envoy_log = next(path for path in logs if path.name == "envoy.log").read_text()
    assert "[debug]" in envoy_log
    assert SHUTDOWN.search(envoy_log), "Envoy's log was read before Envoy wrote its end"
    webdis_log = next(path for path in logs if path.name == "webdis-server.log").read_text()
    assert "/PING" in webdis_log
