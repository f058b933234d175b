"""Directive text is never logged, by any part, at any level (SPEC §7); nor
is the control token; and the provider learns neither the agent nor the tier.

Envoy runs with -l debug, the companion (store, subscriber and the REST front
of Redis) with RUST_LOG=debug; the directive then goes through every path
(store, write back through the REST front, Redis, L1, invalidation, failure
replies) and no log line may hold it, or, but for Envoy's own debug log (it
prints its configuration), the control token the subscriber presented for
the invalidation or the REST front's token Envoy presented on every L2 call.
The stack runs the committed debug_headers (off). Webdis at full verbosity
gets the same check in test_webdis.py.

The same holds for gateway API keys (agent.source "api_key", on a stack of its own):
no log holds a key, only its SHA-256, but for Envoy's own dump of the client's
request headers at debug level.

The logs are read only once every part has stopped, so that each has written
out all it had (Envoy buffers its log file; the harness also has it flushed
every 100 ms): Envoy's log must hold its server's last line, `exiting`.

Envoy's access log (the audit trail, README) is one of those logs: it must hold a
line for every request sent here, the injected ones with the directive's version id,
and never the text.
"""

import re
import uuid

import requests

from helpers import (CHAT, MESSAGES, RESPONSES, agent_with, audit_fields, bearer, chat_body, new_agent, new_request_id,
                     send)
from stack import Stack, wait_until
from stack.contract import (AGENT_HEADER, AGENT_KEY_FLUSH_MARKER_PATTERN, FLUSH_MARKER_PATTERN, INVALIDATE_KEY_PATH,
                            TIER_HEADER, TOMBSTONE, agent_key_redis_key, key_sha256, read_directive_value, redis_key)
from stack.envoy import ACCESS_LOG_NAME
from stack.envoy import merge

LOG_LEVELS = {"envoy": "debug", "companion": "debug", "webdis": 8}
# Each L2 front's own log file, and what it holds once it logged requests at debug level.
L2_LOGS = {"rest": ("rest.log", "DEBUG"), "webdis": ("webdis-server.log", "/PING")}
DEBUG_HEADERS = False  # as committed
SHUTDOWN = re.compile(r"\[info\]\[main\] .* exiting$", re.MULTILINE)  # Envoy's server, at its very end

CANARY = "CANARY" + uuid.uuid4().hex.upper()
DIRECTIVE = f"Privacy check {CANARY}: never print me.\nSecond line with \"quotes\"."


def test_directive_text_is_in_no_log(stack, upstream):
    directive_goes_everywhere_and_no_log_holds_it(stack, upstream)


def directive_goes_everywhere_and_no_log_holds_it(stack, upstream):
    """The directive through every path, then every log of the stopped stack read
    (test_webdis.py runs it on a Webdis stack)."""
    agent = new_agent()
    version = stack.set_directive(agent, DIRECTIVE, publish=False).strip()
    sent = []  # request ids, each in the access log once

    def through(path, body, who=agent, method="POST"):
        request_id = new_request_id()
        sent.append(request_id)
        return send(stack, path, body, agent=who, headers={"x-request-id": request_id}, method=method).status_code

    # L3 → write back → L1
    assert through(CHAT, chat_body()) == 200
    wait_until(lambda: read_directive_value(stack.redis.get(redis_key(agent))) == (version, DIRECTIVE),
               what="the L2 write-back")
    assert through(CHAT, chat_body()) == 200
    assert through(RESPONSES, b'{"model":"m","input":"x"}') == 200
    assert through(MESSAGES, b'{"model":"m","max_tokens":5,"messages":[]}') == 200
    # the directive did reach the model, so the logs had their chance
    assert CANARY in upstream.last().text
    # the provider learns neither the agent nor the tier that answered
    assert upstream.received(), "the upstream saw nothing"
    for received in upstream.received():
        assert received.header(AGENT_HEADER) is None, "the agent header reached the upstream"
        assert received.header(TIER_HEADER) is None, "the debug header reached the upstream"
    # L2 only: another agent whose entry only Redis holds (as an older filter wrote it)
    other = new_agent()
    stack.redis.command_call("SET", redis_key(other), DIRECTIVE, "EX", 300)
    assert through(CHAT, chat_body(), who=other) == 200
    # update and invalidation through the subscriber
    stack.set_directive(agent, DIRECTIVE + " v2")
    wait_until(lambda: stack.redis.get(redis_key(agent)) in (None, TOMBSTONE), what="the subscriber's delete")
    # local replies
    through(CHAT, b"{broken")
    through(CHAT, chat_body(), who="nope")
    stack.store.directive(agent)

    # the subscriber's invalidations went through, so it did present the token
    assert stack.subscriber.metric("ibex_subscribe_invalidations_sent_total") >= 1
    assert stack.subscriber.metric("ibex_subscribe_invalidation_failures_total") == 0
    tokens = {"control": stack.control_token, "REST front": stack.rest_token,
              "REST front admin": stack.rest_admin_token}
    l2_log_name, l2_marker = L2_LOGS[stack.l2_part]

    stack.stop()  # every part writes out its last lines before the logs are read
    logs = stack.log_files()
    assert any(path.name == "envoy.log" for path in logs)
    assert any(path.name == l2_log_name for path in logs), [path.name for path in logs]
    for path in logs:
        text = path.read_text(errors="replace")
        assert CANARY not in text, f"directive text logged in {path}"
        # Envoy's own debug log prints its whole configuration, and request headers:
        # secrets in either show there (README, Threat model), whatever the filter does.
        if not path.name.startswith("envoy"):
            for what, token in tokens.items():
                assert token not in text, f"the {what} token logged in {path}"
    # the debug logs did record the requests (the levels took effect)
    envoy_log = next(path for path in logs if path.name == "envoy.log").read_text()
    assert "[debug]" in envoy_log
    assert SHUTDOWN.search(envoy_log), "Envoy's log was read before Envoy wrote its end"
    l2_log = next(path for path in logs if path.name == l2_log_name).read_text(errors="replace")
    assert l2_marker in l2_log, f"{l2_log_name} shows nothing at debug level"
    # the access log was among the logs searched, and it recorded every request
    assert stack.access_log_path in logs, [str(path) for path in logs]
    assert stack.access_log_path.name == ACCESS_LOG_NAME
    lines = stack.access_log()
    logged = {line["request_id"]: line for line in lines}
    assert set(sent) <= set(logged), "a request is missing from the access log"
    injected = [audit_fields(logged[rid]) for rid in sent if audit_fields(logged[rid])[3] == "injected"]
    assert len(injected) == 5, [logged[rid] for rid in sent]
    assert {fields[1] for fields in injected} == {version, "unknown"}


# -- gateway API keys (agent.source "api_key") ------------------------------------

API_KEY_CONFIG = {"agent": {"source": "api_key", "api_key": {"header": "authorization"}}}
ENVOY_ENTRY = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:.]+\]\[\d+\]\[(\w+)\]\[([\w.]+)\] (.*)$")


def envoy_entries(text):
    """Envoy's log as [(level, component, whole entry)]: an entry is its first line
    plus the lines that follow it without a timestamp (header dumps)."""
    entries = []
    for line in text.splitlines():
        match = ENVOY_ENTRY.match(line)
        if match:
            entries.append([match.group(1), match.group(2), line])
        elif entries:
            entries[-1][2] += "\n" + line
    return [tuple(entry) for entry in entries]


def test_api_key_text_is_in_no_log(tmp_path):
    """A gateway key goes through every path (issue-key, L3, write back, L2, L1, an
    unknown and malformed keys, x-api-key, revoke-key by hash and on stdin, the
    subscriber's invalidation) and no log holds it; its SHA-256 may show.

    Envoy's own debug log prints the request headers as the client sent them (README,
    Threat model: never run Envoy at debug in production), so there, and only there,
    the key may show: in Envoy's `request headers complete` dumps. Never in a line of
    the filter, nor in the headers the router sends upstream (`router decoding headers`)."""
    with Stack(tmp_path / "stack", filter_config=API_KEY_CONFIG, log_levels=LOG_LEVELS, patient=True,
               debug_headers=DEBUG_HEADERS) as stack:
        # The subscriber's first flush leaves markers that hold back write-backs for 10 s.
        for pattern in (FLUSH_MARKER_PATTERN, AGENT_KEY_FLUSH_MARKER_PATTERN):
            stack.redis.delete_matching(pattern)
        agent = agent_with(stack, DIRECTIVE)
        key = stack.issue_key(agent, label="privacy")
        stdin_key = stack.issue_key(agent)
        header_key = stack.issue_key(agent)
        unknown = "ibex_unknown" + uuid.uuid4().hex
        keys = [key, stdin_key, header_key, unknown]
        digest = key_sha256(key)

        # L3 → write back → L1, then L2 after the key's L1 entry is invalidated
        assert send(stack, CHAT, chat_body(), headers=bearer(key)).status_code == 200
        wait_until(lambda: stack.redis.get(agent_key_redis_key(digest)) is not None, what="the key's L2 write-back")
        assert send(stack, CHAT, chat_body(), headers=bearer(key)).status_code == 200
        assert requests.post(f"{stack.envoy.control_url}{INVALIDATE_KEY_PATH}/{digest}",
                             headers=stack.control_headers(), timeout=10).status_code == 204
        assert send(stack, CHAT, chat_body(), headers=bearer(key)).status_code == 200
        assert stack.envoy.counter("key_l2_hit") == 1
        assert CANARY in stack.upstream.last().text  # the key did resolve to its agent
        assert send(stack, "/v1/models", None, headers=bearer(key), method="GET").status_code == 200
        # unknown (store, then L1 negative) and malformed keys, every refusal
        for _ in range(2):
            assert send(stack, CHAT, chat_body(), headers=bearer(unknown)).status_code == 401
        for value in (f"Basic {key}", key, f"Bearer {key} junk", f"Bearer {key}\xe9", "Bearer " + key * 11):
            assert send(stack, CHAT, chat_body(), headers={"authorization": value}).status_code == 401
        # the key in x-api-key
        stack.restart_envoy(filter_config=merge(API_KEY_CONFIG, {"agent": {"api_key": {"header": "x-api-key"}}}))
        assert send(stack, CHAT, chat_body(), headers={"x-api-key": header_key}).status_code == 200
        assert send(stack, CHAT, chat_body(), headers={"x-api-key": f"{header_key} x"}).status_code == 401
        stack.restart_envoy(filter_config=API_KEY_CONFIG)
        # revocations through the subscriber, by hash and by the key on stdin
        assert send(stack, CHAT, chat_body(), headers=bearer(stdin_key)).status_code == 200
        stack.revoke_key(key_sha256=digest)
        stack.revoke_key(key=stdin_key)
        for revoked in (key, stdin_key):
            assert send(stack, CHAT, chat_body(), headers=bearer(revoked)).status_code == 401
        stack.store.key(digest)
        stack.companion.list_keys(agent)
        assert stack.subscriber.metric("ibex_subscribe_invalidations_sent_total") >= 2
        assert stack.subscriber.metric("ibex_subscribe_invalidation_failures_total") == 0
        for received in stack.upstream.received():
            for name, value in received.header_pairs:
                assert not any(k in value for k in keys), f"a gateway key reached the upstream in {name}"

        stack.stop()  # every part writes out its last lines before the logs are read
        logs = stack.log_files()

    names = {path.name for path in logs}
    assert {"envoy.log", L2_LOGS[stack.l2_part][0], "companion-cli.log"} <= names, names
    for path in logs:
        text = path.read_text(errors="replace")
        assert CANARY not in text, f"directive text logged in {path}"
        if path.name != "envoy.log":
            for k in keys:
                assert k not in text, f"a gateway key logged in {path}"
            continue
        assert "[debug]" in text and SHUTDOWN.search(text)
        dumps = 0
        for level, component, entry in envoy_entries(text):
            if not any(k in entry for k in keys):
                continue
            first_line = entry.split("\n", 1)[0]
            assert component == "http" and "request headers complete" in first_line, (
                f"a gateway key in Envoy's log outside its dump of the client's headers: {first_line}")
            dumps += 1
        assert dumps, "Envoy's debug log did not dump request headers: the check above proved nothing"
        assert "router decoding headers" in text, "Envoy's debug log did not dump the upstream's headers"
    # the debug logs did record the key's paths, by hash
    store_log = "\n".join(path.read_text() for path in logs if path.parent.name == "store")
    assert digest in store_log, "the store's debug log has no key lookup"
    assert f"key_sha256={digest}" in (tmp_path / "stack" / "companion-cli.log").read_text()
