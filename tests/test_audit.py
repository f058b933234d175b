"""The audit trail (SPEC §7, issue 16): which directive version each request got.

For every request the data role sees, the filter records, once, when the request's
fate is decided, the agent, the directive's version id, the tier that answered and
the outcome as Envoy filter state (`wasm.ibex.*`); the committed configs print them
in a JSON access log line per request (envoy/local.yaml; the harness writes it to
the stack's own directory, stack/envoy.py). Every test here sends requests with an
`x-request-id` of its own, finds exactly one line per request in that log and checks
the agent, the version the companion's `set-directive` printed, the tier (also
against the debug header the upstream got) and the outcome; a version id maps back
to its text through `ibex-companion history --show-content`.

Clients are the official OpenAI SDK wherever a client can send the request (a broken
body is sent raw). The L2 hit comes from an L1 invalidation through the control
endpoint, which leaves Redis as it was. The traceparent of a request is shown on its
L3 and L2 callouts by the trace id the store and the REST front log at debug level.
"""

import json
import re
import uuid
from datetime import datetime

import openai
import pytest
import requests

from helpers import (ACCESS_LOG_FIELDS, CHAT, access_log_for, access_log_lines, audit_fields, audit_line, chat_body,
                     new_agent, new_request_id, send, tier)
from stack import wait_until
from stack.contract import (AGENT_HEADER, CANONICAL_UUID, INVALIDATE_PATH,
                            read_directive_value, redis_key)

# The store and the REST front log the trace id of a lookup at debug level.
LOG_LEVELS = {"companion": "debug"}

API_KEY = "sk-test-not-a-real-key"
VERSION_HEADER = "x-ibex-directive-version"
REQUEST_ID = "x-request-id"


# ---------------------------------------------------------------- clients and checks


def openai_client(stack, agent):
    """The OpenAI SDK on the gateway, naming `agent` (none when None), no retries, no proxies."""
    headers = {AGENT_HEADER: agent} if agent is not None else {}
    return openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key=API_KEY, max_retries=0,
                         default_headers=headers, http_client=openai.DefaultHttpxClient(trust_env=False))


def chat(stack, agent, request_id, headers=None):
    """A chat completion through the SDK with `x-request-id: request_id`; the HTTP response
    (httpx), whatever its status. A 200 is also parsed by the SDK."""
    client = openai_client(stack, agent)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": "Which rules apply?"}],
            extra_headers={REQUEST_ID: request_id, **(headers or {})})
    except openai.APIStatusError as error:
        return error.response
    assert raw.parse().choices, "the SDK did not parse the answer"
    return raw.http_response


def set_version(stack, agent, text, publish=False):
    """Set the agent's directive through the companion CLI; the version id it prints."""
    version = stack.set_directive(agent, text, publish=publish).strip()
    assert CANONICAL_UUID.fullmatch(version), f"set-directive printed {version!r}, not a version id"
    return version


def history(stack, agent):
    """`ibex-companion history --agent-id A --show-content`: {version id: (active, text)}."""
    lines = stack.companion.run("history", "--agent-id", agent, "--show-content").splitlines()
    assert lines[0].split("\t") == ["version_id", "created_at", "active", "bytes", "content"], lines[0]
    rows = {}
    for line in lines[1:]:
        version, _created, active, _size, content = line.split("\t")
        rows[version] = (active == "yes", json.loads(content))
    return rows


def logged(stack, request_id, agent, version, tier_name, outcome, status, path=CHAT, method="POST"):
    """The one access log line of `request_id`, checked field by field; returned."""
    line = audit_line(stack, request_id)
    assert set(line) == set(ACCESS_LOG_FIELDS), line
    assert audit_fields(line) == (agent, version, tier_name, outcome), line
    assert (line["method"], line["path"], line["status"]) == (method, path, status), line
    assert isinstance(line["duration_ms"], int) and line["duration_ms"] >= 0, line
    datetime.fromisoformat(line["time"])
    return line


def new_traceparent():
    """A W3C traceparent (version 00, sampled) of a new trace."""
    return f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"


def control(stack, path):
    return requests.post(stack.envoy.control_url + path, headers=stack.control_headers(), timeout=10)


@pytest.fixture()
def restore_envoy(stack):
    """Envoy back on the module's configuration (and every part running) after the test."""
    yield
    for part in ("store", stack.l2_part):
        if not stack.part(part).running():
            stack.start(part)
    stack.restart_envoy(filter_config={}, cluster_ports={})


# ---------------------------------------------------------------- tiers and versions


def test_each_tier_logs_one_line_with_the_version_it_served(stack, upstream):
    """L3 (first fill), L1 (hit), L2 (after L1 alone was invalidated): one line each, the
    version set-directive printed, from every tier; the upstream got that version's text."""
    agent = new_agent()
    text = "Audit: answer from the approved sources only."
    version = set_version(stack, agent, text)

    first = new_request_id()
    response = chat(stack, agent, first)
    assert response.status_code == 200
    assert tier(upstream.last()) == "store"
    assert VERSION_HEADER not in response.headers  # audit.response_header is off by default
    logged(stack, first, agent, version, "store", "injected", 200)
    # the fill wrote the version back with the text
    wait_until(lambda: read_directive_value(stack.redis.get(redis_key(agent))) == (version, text),
               what="the versioned L2 write-back")

    second = new_request_id()
    assert chat(stack, agent, second).status_code == 200
    assert tier(upstream.last()) == "local"
    logged(stack, second, agent, version, "local", "injected", 200)

    assert control(stack, f"{INVALIDATE_PATH}/{agent}").status_code == 204  # L1 only; Redis keeps its value
    third = new_request_id()
    assert chat(stack, agent, third).status_code == 200
    assert tier(upstream.last()) == "redis"
    assert text in upstream.last().text
    logged(stack, third, agent, version, "redis", "injected", 200)

    # the logged id names the text the requests got
    assert history(stack, agent) == {version: (True, text)}


def test_the_next_request_after_set_directive_logs_the_new_version(stack, upstream):
    agent = new_agent()
    old = set_version(stack, agent, "First rules.")
    before = new_request_id()
    assert chat(stack, agent, before).status_code == 200
    logged(stack, before, agent, old, "store", "injected", 200)

    new = set_version(stack, agent, "Second rules.", publish=True)  # waits for the invalidation
    assert new != old
    after = new_request_id()
    assert chat(stack, agent, after).status_code == 200
    assert "Second rules." in upstream.last().text
    logged(stack, after, agent, new, "store", "injected", 200)
    again = new_request_id()
    assert chat(stack, agent, again).status_code == 200
    logged(stack, again, agent, new, "local", "injected", 200)
    assert history(stack, agent) == {new: (True, "Second rules."), old: (False, "First rules.")}


def test_a_redis_value_from_before_versions_logs_unknown(stack, upstream):
    """A Redis value without the version prefix (an older filter, another writer) serves
    its text; its version is `unknown`."""
    agent = new_agent()
    set_version(stack, agent, "What the store would say.")  # L2 answers first: the store is not asked
    assert stack.redis_cli("SET", redis_key(agent), "Plain text from an older writer.", "EX", "300") == "OK"
    lookups = stack.store.lookups()
    request_id = new_request_id()
    assert chat(stack, agent, request_id).status_code == 200
    assert tier(upstream.last()) == "redis"
    assert "Plain text from an older writer." in upstream.last().text
    logged(stack, request_id, agent, "unknown", "redis", "injected", 200)
    assert stack.store.lookups() == lookups
    local = new_request_id()
    assert chat(stack, agent, local).status_code == 200
    logged(stack, local, agent, "unknown", "local", "injected", 200)


# ---------------------------------------------------------------- outcomes


def test_an_agent_without_a_directive_logs_no_directive(stack, upstream):
    agent = new_agent()
    first, second = new_request_id(), new_request_id()
    assert chat(stack, agent, first).status_code == 200
    assert tier(upstream.last()) == "store"
    assert chat(stack, agent, second).status_code == 200
    assert tier(upstream.last()) == "local"
    logged(stack, first, agent, "none", "store", "no_directive", 200)
    logged(stack, second, agent, "none", "local", "no_directive", 200)


def test_requests_without_a_lookup_log_passed(stack, upstream, restore_envoy):
    """A pass path (GET /v1/models, inject.pass_paths), a bodiless request and, with
    agent.missing "pass", a request without an agent go on untouched, without a lookup."""
    agent = new_agent()
    lookups = stack.store.lookups()
    models = new_request_id()
    raw = openai_client(stack, agent).models.with_raw_response.list(extra_headers={REQUEST_ID: models})
    assert raw.http_response.status_code == 200
    assert upstream.last().path == "/v1/models"
    bodiless = new_request_id()
    assert send(stack, CHAT, None, agent=agent, headers={REQUEST_ID: bodiless}, method="GET").status_code == 200
    assert stack.store.lookups() == lookups
    logged(stack, models, "-", "none", "none", "passed", 200, path="/v1/models", method="GET")
    logged(stack, bodiless, "-", "none", "none", "passed", 200, method="GET")

    stack.restart_envoy(filter_config={"agent": {"missing": "pass"}})
    agentless = new_request_id()
    assert chat(stack, None, agentless).status_code == 200
    logged(stack, agentless, "-", "none", "none", "passed", 200)


def test_refusals_log_their_code(stack, upstream):
    """Each refusal: one line, `refused:<code>`, the status the client got."""
    agent = new_agent()
    set_version(stack, agent, "Never reached.")
    cases = []
    # the SDK without an agent (the committed agent.missing "reject")
    rid = new_request_id()
    assert chat(stack, None, rid).status_code == 401
    cases.append((rid, "-", "none", "refused:missing_agent_id", 401))
    # an agent header that is no UUID
    rid = new_request_id()
    assert chat(stack, "not-a-uuid", rid).status_code == 400
    cases.append((rid, "-", "none", "refused:invalid_agent_id", 400))
    # a body that is no JSON (no SDK sends one): found out when the directive goes in, so
    # after the store answered; no directive went out, so no version
    rid = new_request_id()
    assert send(stack, CHAT, b"{broken", agent=agent, headers={REQUEST_ID: rid}).status_code == 400
    cases.append((rid, agent, "store", "refused:invalid_body", 400))
    assert not upstream.received()
    for rid, who, tier_name, outcome, status in cases:
        logged(stack, rid, who, "none", tier_name, outcome, status)


def test_a_request_envoy_refuses_before_the_filter_has_a_line_without_audit_fields(stack, upstream):
    """An escaped slash is refused by Envoy's path normalisation before the filter runs:
    the line is there, the filter's fields are null (README, Audit trail)."""
    request_id = new_request_id()
    response = send(stack, "/v1/chat%2Fcompletions", chat_body(), agent=new_agent(), headers={REQUEST_ID: request_id})
    assert response.status_code == 400
    line = audit_line(stack, request_id)
    assert audit_fields(line) == (None, None, None, None), line
    assert line["status"] == 400


def test_stale_unavailable_and_failed_open_while_redis_and_the_store_are_down(stack, restore_envoy):
    """With the REST front and the store stopped: an expired L1 entry is served `stale`
    (its version still logged); a cold agent is `refused:directive_unavailable` (503,
    failure_mode closed) or `failed_open` (failure_mode open)."""
    stack.restart_envoy(filter_config={"cache": {"ttl_seconds": 1}})
    agent = new_agent()
    version = set_version(stack, agent, "Stale but governed.")
    warm = new_request_id()
    assert chat(stack, agent, warm).status_code == 200
    logged(stack, warm, agent, version, "store", "injected", 200)
    stack.stop("store")
    stack.stop(stack.l2_part)

    # until the 1 s entry expires the requests are L1 hits; then stale
    sent = []

    def served_stale():
        rid = new_request_id()
        stack.upstream.clear()
        assert chat(stack, agent, rid).status_code == 200
        sent.append(rid)
        return tier(stack.upstream.last()) == "stale"

    wait_until(served_stale, timeout=20, interval=0.1, what="an expired entry served stale")
    for rid in sent[:-1]:
        logged(stack, rid, agent, version, "local", "injected", 200)
    logged(stack, sent[-1], agent, version, "stale", "injected", 200)

    cold = new_agent()
    closed = new_request_id()
    assert chat(stack, cold, closed).status_code == 503
    logged(stack, closed, cold, "none", "none", "refused:directive_unavailable", 503)

    stack.restart_envoy(filter_config={"failure_mode": "open"})
    stack.upstream.clear()
    opened = new_request_id()
    assert chat(stack, cold, opened).status_code == 200
    assert tier(stack.upstream.last()) == "none"
    logged(stack, opened, cold, "none", "none", "failed_open", 200)


# ---------------------------------------------------------------- audit.response_header


def test_response_header_names_the_logged_version(stack, upstream, restore_envoy):
    stack.restart_envoy(filter_config={"audit": {"response_header": True}})
    agent = new_agent()
    version = set_version(stack, agent, "Header rules.")
    for expected_tier in ("store", "local"):
        rid = new_request_id()
        response = chat(stack, agent, rid)
        assert response.status_code == 200
        line = logged(stack, rid, agent, version, expected_tier, "injected", 200)
        assert response.headers[VERSION_HEADER] == audit_fields(line)[1] == version
    # no directive: the client learns that too
    rid = new_request_id()
    response = chat(stack, new_agent(), rid)
    assert response.status_code == 200
    assert response.headers.get(VERSION_HEADER) == audit_fields(audit_line(stack, rid))[1] == "none"
    # an older writer's value
    other = new_agent()
    stack.redis_cli("SET", redis_key(other), "Unversioned.", "EX", "300")
    rid = new_request_id()
    response = chat(stack, other, rid)
    assert response.headers.get(VERSION_HEADER) == audit_fields(audit_line(stack, rid))[1] == "unknown"
    # a refusal (Envoy runs the local reply through the filter's response callback too)
    rid = new_request_id()
    response = send(stack, CHAT, b"{broken", agent=agent, headers={REQUEST_ID: rid})
    assert response.status_code == 400
    line = logged(stack, rid, agent, "none", "local", "refused:invalid_body", 400)
    assert response.headers.get(VERSION_HEADER) == audit_fields(line)[1] == "none"
    # the upstream never sees it
    assert all(received.header(VERSION_HEADER) is None for received in upstream.received())


# ---------------------------------------------------------------- traceparent on the callouts


def trace_ids_logged(part, message):
    """The `trace_id` field of every `message` line of a companion part's log (the
    store's "lookup", the REST front's "rest request"), in order; `-` for a request
    without a valid traceparent."""
    found = []
    for line in part.log_path.read_text(errors="replace").splitlines():
        if message in line:
            match = re.search(r'trace_id="?([0-9a-f]{32}|-)"?', line)
            if match:
                found.append(match.group(1))
    return found


def test_traceparent_reaches_the_store_and_the_l2_front_on_a_fill(stack, upstream):
    """The store and the REST front log the trace id of the traceparent the filter's
    callouts carried (the companion logs nothing else of it); Webdis logs no headers,
    so on Webdis only the store is checked."""
    trace = new_traceparent()
    trace_id = trace.split("-")[1]
    agent = new_agent()
    version = set_version(stack, agent, "Traced rules.")
    rid = new_request_id()
    assert chat(stack, agent, rid, headers={"traceparent": trace}).status_code == 200
    logged(stack, rid, agent, version, "store", "injected", 200)
    wait_until(lambda: trace_id in trace_ids_logged(stack.store, "lookup"),
               what="the store's lookup line with the request's trace id")
    if stack.l2_part == "rest":
        # the L2 read before the fill, and the write-back after it (sent later, by the
        # worker's root context, still under the request's trace)
        wait_until(lambda: trace_ids_logged(stack.rest, "rest request").count(trace_id) >= 2,
                   what="the REST front's read and write-back lines with the request's trace id")

    # untraced and malformed traceparents: the callouts carry none
    for sent in (None, trace.upper(), trace + "x", "00-" + "0" * 32 + "-00f067aa0ba902b7-01"):
        before = len(trace_ids_logged(stack.store, "lookup"))
        other = new_agent()
        set_version(stack, other, "Untraced rules.")
        extra = {"traceparent": sent} if sent else {}
        assert chat(stack, other, new_request_id(), headers=extra).status_code == 200
        wait_until(lambda: len(trace_ids_logged(stack.store, "lookup")) > before, what="the store's lookup line")
        assert trace_ids_logged(stack.store, "lookup")[before:] == ["-"], sent


# ---------------------------------------------------------------- the log as a whole


def test_every_line_is_one_json_object_with_every_field(stack, upstream):
    """Whatever the earlier tests sent: each line parses and has exactly the fields."""
    rid = new_request_id()
    assert chat(stack, new_agent(), rid).status_code == 200
    access_log_for(stack, rid)
    lines = access_log_lines(stack)
    assert all(set(line) == set(ACCESS_LOG_FIELDS) for line in lines), lines
    assert len({line["request_id"] for line in lines}) == len(lines), "a request logged twice"
