"""agent.source "api_key" (SPEC §3.1): the caller presents a gateway key that the
companion issued for its agent; the filter resolves the key's SHA-256 to the agent
through L1 → Redis `agent_key:{sha256}` → store `GET /v1/keys/{sha256}` and injects
that agent's directive, on every worker, until `revoke-key`.

Keys come from the real `ibex-companion issue-key` and go with `revoke-key`; the
subscriber turns the revocation into a Redis tombstone and a control POST. The agent
header is `x-caller-agent`, which the route does not remove (envoy/local.yaml only
removes x-agent-id): when it does not reach the upstream, the filter removed it.
Every check of "what the provider saw" reads what the echo upstream recorded.
One stack for the module; tests that change Envoy's settings put them back.
"""

import json
import secrets
import time

import openai
import pytest
import requests

from helpers import (CHAT, TRICKY_DIRECTIVE, agent_with, agent_with_key, assert_chat_injected, bearer, chat_body,
                     error_code, requests_on_every_worker, send, tier)
from stack import REMOVE, paths, wait_until
from stack.contract import (AGENT_HEADER, INVALIDATE_KEY_PATH, INVALIDATE_PATH, TOMBSTONE, agent_key_redis_key,
                            key_sha256)
from stack.envoy import merge
from stack.rawhttp import exchange, request_bytes

CLIENT_HEADER = "x-caller-agent"
FILTER_CONFIG = {"agent": {"source": "api_key", "header": CLIENT_HEADER, "api_key": {"header": "authorization"}}}
EXAMPLE = paths.ENVOY_DIR / "examples" / "api_key.yaml"
PROVIDER_KEY = "sk-provider-" + secrets.token_hex(8)

KEY_LOOKUPS = ("key_l1_hit", "key_l1_miss", "key_l2_hit", "key_l2_miss", "key_l3_hit", "key_l3_none")
DIRECTIVE_LOOKUPS = ("l1_hit", "l1_miss", "l2_hit", "l2_miss", "l2_error", "l3_hit", "l3_none", "l3_error")


def unknown_key():
    """A key of the issued shape that nobody issued."""
    return "ibex_" + secrets.token_urlsafe(32)


def refused(response, status, code):
    """The response is the filter's local reply `code` with `status`."""
    assert response.status_code == status, response.text
    assert error_code(response) == code, response.text


def deltas(before, names, stack):
    """{counter: growth since `before`} for `names`."""
    now = stack.envoy.counters()
    return {name: now.get(name, 0) - before.get(name, 0) for name in names}


def raw(stack, path, headers, body=b"", method="POST"):
    """One request with exactly these header bytes, on a connection of its own."""
    return exchange(stack.envoy.data_port, request_bytes(path, body, headers=headers, method=method))


def raw_code(answer):
    """`error.code` of a local reply read by stack/rawhttp.py."""
    return json.loads(answer.body)["error"]["code"]


def assert_key_not_forwarded(received, key):
    """The provider saw neither the gateway key, anywhere, nor an agent header."""
    for name, value in received.header_pairs:
        assert key not in value, f"the gateway key reached the upstream in {name}"
    assert key.encode() not in received.body
    assert received.header(CLIENT_HEADER) is None, "the agent header reached the upstream"
    assert received.header(AGENT_HEADER) is None


def openai_client(stack, key, sent=None):
    """The official OpenAI SDK with the gateway key as its api_key, on loopback only."""
    hooks = {"request": [lambda request: sent.append(request.read())]} if sent is not None else {}
    return openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key=key, max_retries=0,
                         http_client=openai.DefaultHttpxClient(trust_env=False, event_hooks=hooks))


def warm(stack, key, directive):
    """Resolve the key and the directive once, wait for the key's Redis write-back,
    and check that the next request is answered from L1."""
    assert send(stack, CHAT, chat_body(), headers=bearer(key)).status_code == 200
    wait_until(lambda: stack.redis.get(agent_key_redis_key(key_sha256(key))) is not None,
               what="the key's L2 write-back")
    body = chat_body()
    assert send(stack, CHAT, body, headers=bearer(key)).status_code == 200
    received = stack.upstream.last()
    assert_chat_injected(body, received.body, directive)
    assert tier(received) == "local"


# -- an issued key ---------------------------------------------------------------

def test_an_issued_keys_requests_carry_its_agents_directive_through_the_openai_sdk(stack, upstream):
    agent, key = agent_with_key(stack, TRICKY_DIRECTIVE, label="sdk test")
    sent = []
    completion = openai_client(stack, key, sent).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hello"}])

    [received] = upstream.received()
    assert received.path == "/v1/chat/completions"
    assert_chat_injected(sent[-1], received.body, TRICKY_DIRECTIVE)
    assert_key_not_forwarded(received, key)
    assert received.header("authorization") is None, "the key header reached the upstream"
    assert completion.choices[0].message.content == "\n".join(
        ["echo: received 2 message(s)", f"[1] system: {TRICKY_DIRECTIVE}", "[2] user: hello"])
    # The store knows the key only by its hash, and names the agent.
    status, body = stack.store.key(key_sha256(key))
    assert status == 200 and agent in body


def test_the_sdk_sees_an_unknown_key_as_an_authentication_error(stack, upstream):
    with pytest.raises(openai.AuthenticationError) as raised:
        openai_client(stack, unknown_key()).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hello"}])
    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"
    assert upstream.received() == []


@pytest.mark.parametrize("spelling", ["Bearer {key}", "bearer {key}", "BEARER   {key}", "Bearer\t{key}",
                                      "  Bearer {key}  ", "Bearer {key}\t"])
def test_the_bearer_scheme_is_case_insensitive_and_spaces_around_are_dropped(stack, upstream, spelling):
    directive = "Any spelling of Bearer."
    agent, key = agent_with_key(stack, directive)
    body = chat_body()
    answer = raw(stack, CHAT, {"authorization": spelling.format(key=key)}, body)
    assert answer.status == 200, answer.body
    [received] = upstream.received()
    assert_chat_injected(body, received.body, directive)
    assert_key_not_forwarded(received, key)


def test_a_key_in_x_api_key_is_the_header_value_itself(stack, upstream):
    stack.restart_envoy(filter_config=merge(FILTER_CONFIG, {"agent": {"api_key": {"header": "x-api-key"}}}))
    try:
        directive = "Keys in x-api-key."
        agent, key = agent_with_key(stack, directive)
        for value in (key, f"  {key}\t"):
            upstream.clear()
            body = chat_body()
            answer = raw(stack, CHAT, {"x-api-key": value}, body)
            assert answer.status == 200, answer.body
            [received] = upstream.received()
            assert_chat_injected(body, received.body, directive)
            assert received.header("x-api-key") is None, "the key header reached the upstream"
            assert_key_not_forwarded(received, key)
        upstream.clear()
        # In x-api-key, "Bearer <key>" is no key (a space in it).
        answer = raw(stack, CHAT, {"x-api-key": f"Bearer {key}"}, chat_body())
        assert (answer.status, raw_code(answer)) == (401, "invalid_api_key")
        # The key in another header than the configured one is no key at all.
        answer = raw(stack, CHAT, bearer(key), chat_body())
        assert (answer.status, raw_code(answer)) == (401, "missing_agent_id")
        assert upstream.received() == []
    finally:
        stack.restart_envoy(filter_config=FILTER_CONFIG)


# -- refusals --------------------------------------------------------------------

def test_an_unknown_key_is_invalid_api_key(stack, upstream):
    key = unknown_key()
    before = stack.envoy.counters()
    response = send(stack, CHAT, chat_body(), headers=bearer(key))
    refused(response, 401, "invalid_api_key")
    assert key not in response.text
    assert upstream.received() == []
    assert deltas(before, ["rejected.invalid_api_key", "key_l3_none"], stack) == {
        "rejected.invalid_api_key": 1, "key_l3_none": 1}


def test_an_unknown_key_is_cached_negatively_per_worker_and_in_redis_not_in_shared_data(stack, upstream):
    key = unknown_key()
    digest = key_sha256(key)
    none_before = stack.store.key_lookups("none")
    refused(send(stack, CHAT, chat_body(), headers=bearer(key)), 401, "invalid_api_key")
    assert stack.store.key_lookups("none") == none_before + 1
    # The store's "no such key" is written back to Redis for the negative TTL...
    wait_until(lambda: stack.redis.get(agent_key_redis_key(digest)) == "", what="the negative write-back")
    assert 0 < stack.redis.ttl(agent_key_redis_key(digest)) <= 10
    before = stack.envoy.counters()
    # ...so within cache.negative_ttl_seconds (10 s) no worker asks the store again:
    # the worker that asked remembers the key in its own memory (a key_l1_hit), the
    # other reads Redis once, then remembers it too.
    for _ in range(4):
        refused(send(stack, CHAT, chat_body(), headers={**bearer(key), "connection": "close"}), 401,
                "invalid_api_key")
    assert stack.store.key_lookups("none") == none_before + 1, "the store was asked again"
    got = deltas(before, KEY_LOOKUPS, stack)
    assert got["key_l1_hit"] + got["key_l2_hit"] == 4 and got["key_l2_hit"] <= 1, got
    assert got["key_l3_hit"] == got["key_l3_none"] == got["key_l2_miss"] == 0, got
    assert upstream.received() == []


def test_a_missing_key_is_missing_agent_id(stack, upstream):
    agent = agent_with(stack, "Never delivered without a key.")
    before = stack.envoy.counter("rejected.missing_agent_id")
    # An agent header is no substitute for the key.
    refused(send(stack, CHAT, chat_body(), headers={CLIENT_HEADER: agent, AGENT_HEADER: agent}), 401,
            "missing_agent_id")
    refused(send(stack, "/v1/models", None, method="GET"), 401, "missing_agent_id")
    assert stack.envoy.counter("rejected.missing_agent_id") == before + 2
    assert upstream.received() == []


MALFORMED = {
    "another scheme": {"authorization": "Basic {key}"},
    "no scheme": {"authorization": "{key}"},
    "scheme only": {"authorization": "Bearer"},
    "empty key": {"authorization": "Bearer   "},
    "two words": {"authorization": "Bearer {key} extra"},
    "two keys joined": {"authorization": "Bearer {key}, Bearer {key}"},
    "two key headers": {"authorization": "Bearer {key}", "Authorization": "Bearer {key}"},
    "not visible ascii": {"authorization": "Bearer {key}\xe9"},
    "over 512 bytes": {"authorization": "Bearer " + "k" * 513},
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_key_header_is_invalid_api_key_without_a_lookup(stack, upstream, case):
    """Even around a valid key: the filter reads one key one way, or refuses."""
    _, key = agent_with_key(stack, "A well-formed key would get this.")
    before = stack.envoy.counters()
    lookups = stack.store.key_lookups()
    headers = {name: value.format(key=key) for name, value in MALFORMED[case].items()}
    answer = raw(stack, CHAT, headers, chat_body())
    assert (answer.status, raw_code(answer)) == (401, "invalid_api_key"), answer.body
    assert key.encode() not in answer.body
    assert upstream.received() == []
    assert stack.store.key_lookups() == lookups
    assert deltas(before, ["rejected.invalid_api_key", "key_l1_hit", "key_l1_miss"], stack) == {
        "rejected.invalid_api_key": 1, "key_l1_hit": 0, "key_l1_miss": 0}


def test_a_key_of_512_bytes_is_looked_up(stack, upstream):
    """The length limit's edge: 512 visible bytes are a key (unknown here), 513 are not (above)."""
    lookups = stack.store.key_lookups("none")
    answer = raw(stack, CHAT, {"authorization": "Bearer " + "k" * 512}, chat_body())
    assert (answer.status, raw_code(answer)) == (401, "invalid_api_key"), answer.body
    assert stack.store.key_lookups("none") == lookups + 1
    assert upstream.received() == []


BODILESS = [("GET", "/v1/models"), ("GET", "/v1/files/file-1/content"), ("DELETE", "/v1/files/file-1"),
            ("HEAD", "/v1/models"), ("GET", "/")]


@pytest.mark.parametrize("method,path", BODILESS, ids=[f"{method} {path}" for method, path in BODILESS])
def test_bodiless_requests_with_an_invalid_key_are_refused(stack, upstream, method, path):
    """No open proxy: a request the filter forwards untouched still needs a valid key."""
    _, key = agent_with_key(stack, "Bodiless requests forward nothing of this.")
    for header in (bearer(unknown_key()), {"authorization": f"Basic {key}"}, {}):
        answer = raw(stack, path, header, method=method, body=b"")
        assert answer.status == 401, (header, answer)
        if method != "HEAD":
            assert raw_code(answer) == ("missing_agent_id" if not header else "invalid_api_key")
    assert upstream.received() == []
    # With the key it goes through, without the key.
    answer = raw(stack, path, bearer(key), method=method, body=b"")
    assert answer.status == 200, answer
    [received] = upstream.received()
    assert (received.method, received.path) == (method, path)
    assert_key_not_forwarded(received, key)
    assert received.header("authorization") is None


# -- what the provider sees ------------------------------------------------------

def test_the_upstream_never_sees_the_gateway_key_nor_a_client_agent_header(stack, upstream):
    agent, key = agent_with_key(stack, "Provider sees no key.")
    other = agent_with(stack, "Directive of the agent the client names.")
    headers = {**bearer(key), CLIENT_HEADER: other, AGENT_HEADER: other}
    assert send(stack, CHAT, chat_body(), headers=headers).status_code == 200
    assert send(stack, "/v1/models", None, headers=headers, method="GET").status_code == 200
    assert send(stack, "/v1/embeddings", b'{"model":"e","input":"x"}', headers=headers).status_code == 200
    received = upstream.received()
    assert [r.path for r in received] == ["/v1/chat/completions", "/v1/models", "/v1/embeddings"]
    for item in received:
        assert_key_not_forwarded(item, key)
        assert item.header("authorization") is None
        assert other not in " ".join(value for _, value in item.header_pairs)


def test_a_client_agent_header_naming_another_agent_changes_nothing(stack, upstream):
    directive = "Directive of the key's agent."
    agent, key = agent_with_key(stack, directive)
    other = agent_with(stack, "Directive of the agent the client names.")
    for named in (other, "not-a-uuid"):
        upstream.clear()
        body = chat_body()
        response = send(stack, CHAT, body, headers={**bearer(key), CLIENT_HEADER: named, AGENT_HEADER: named})
        assert response.status_code == 200, response.text
        assert_chat_injected(body, upstream.last().body, directive)


def test_the_api_key_example_config_gives_the_provider_its_own_key(stack, upstream):
    """envoy/examples/api_key.yaml as committed (the harness only points it at this
    stack): the route puts the provider's key, from Envoy's environment, where the
    client's gateway key was."""
    stack.restart_envoy(template=EXAMPLE, filter_config={}, env={"IBEX_PROVIDER_API_KEY": PROVIDER_KEY})
    try:
        directive = "Example config."
        agent, key = agent_with_key(stack, directive)
        sent = []
        openai_client(stack, key, sent).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hello"}],
            extra_headers={AGENT_HEADER: agent_with(stack, "Not this one.")})
        [received] = upstream.received()
        assert_chat_injected(sent[-1], received.body, directive)
        assert received.header("authorization") == f"Bearer {PROVIDER_KEY}"
        assert_key_not_forwarded(received, key)
        upstream.clear()
        refused(send(stack, CHAT, chat_body(), headers=bearer(unknown_key())), 401, "invalid_api_key")
        refused(send(stack, "/v1/models", None, method="GET"), 401, "missing_agent_id")
        assert upstream.received() == []
    finally:
        stack.restart_envoy(template=REMOVE, filter_config=FILTER_CONFIG, env={})


# -- tiers and counters ----------------------------------------------------------

def test_a_cold_key_is_resolved_by_the_store_and_counted_apart_from_the_directive(stack, upstream):
    agent, key = agent_with_key(stack, "Cold key.")
    found = stack.store.key_lookups("found")
    before = stack.envoy.counters()
    assert send(stack, CHAT, chat_body(), headers=bearer(key)).status_code == 200
    assert tier(upstream.last()) == "store", "x-ibex-directive names the directive's tier"
    # A key shared data has never seen is looked up, then anchored and asked again
    # (an anchor for every made-up key would fill shared data for good): two store
    # lookups, one counted.
    assert stack.store.key_lookups("found") == found + 2
    assert deltas(before, KEY_LOOKUPS + DIRECTIVE_LOOKUPS, stack) == {
        "key_l1_hit": 0, "key_l1_miss": 1, "key_l2_hit": 0, "key_l2_miss": 1, "key_l3_hit": 1, "key_l3_none": 0,
        "l1_hit": 0, "l1_miss": 1, "l2_hit": 0, "l2_miss": 1, "l2_error": 0, "l3_hit": 1, "l3_none": 0, "l3_error": 0}


def test_warm_requests_cost_no_callout(stack, upstream):
    directive = "Warm in L1."
    agent, key = agent_with_key(stack, directive)
    warm(stack, key, directive)
    before = stack.envoy.counters()
    store_lookups, key_lookups = stack.store.lookups(), stack.store.key_lookups()
    redis_gets = stack.redis.command_calls("get")
    upstream.clear()
    for worker, response in requests_on_every_worker(stack, CHAT, chat_body(), None, at_least=4, per_worker=2,
                                                     headers=bearer(key)):
        assert response.status_code == 200, (worker, response.text)
        assert tier(upstream.last()) == "local"
    count = len(upstream.received())
    grown = deltas(before, KEY_LOOKUPS + DIRECTIVE_LOOKUPS + ("injected",), stack)
    assert grown == {name: (count if name in ("key_l1_hit", "l1_hit", "injected") else 0) for name in grown}
    assert (stack.store.lookups(), stack.store.key_lookups()) == (store_lookups, key_lookups)
    assert stack.redis.command_calls("get") == redis_gets, "a lookup reached Redis"


def test_the_control_path_drops_one_keys_l1_entry(stack, upstream):
    directive = "Key invalidated alone."
    agent, key = agent_with_key(stack, directive)
    warm(stack, key, directive)
    before = stack.envoy.counters()
    key_lookups = stack.store.key_lookups()
    answer = requests.post(f"{stack.envoy.control_url}{INVALIDATE_KEY_PATH}/{key_sha256(key)}",
                           headers=stack.control_headers(), timeout=10)
    assert answer.status_code == 204, answer.text
    body = chat_body()
    assert send(stack, CHAT, body, headers=bearer(key)).status_code == 200
    received = upstream.last()
    assert_chat_injected(body, received.body, directive)
    # The key came from Redis (the control path drops L1 only); the directive from L1.
    assert tier(received) == "local"
    assert deltas(before, ("key_l1_hit", "key_l1_miss", "key_l2_hit", "key_l3_hit", "l1_hit", "l1_miss"), stack) == {
        "key_l1_hit": 0, "key_l1_miss": 1, "key_l2_hit": 1, "key_l3_hit": 0, "l1_hit": 1, "l1_miss": 0}
    assert stack.store.key_lookups() == key_lookups


@pytest.mark.parametrize("case", ["upper case", "63 digits", "65 digits", "not hex", "the key itself", "empty"])
def test_the_control_path_refuses_a_malformed_key_hash(stack, case):
    key = unknown_key()
    digest = key_sha256(key)
    target = {"upper case": digest.upper(), "63 digits": digest[:63], "65 digits": digest + "0",
              "not hex": "g" * 64, "the key itself": key, "empty": ""}[case]
    answer = requests.post(f"{stack.envoy.control_url}{INVALIDATE_KEY_PATH}/{target}",
                           headers=stack.control_headers(), timeout=10)
    assert answer.status_code == 400, answer.text
    if target:
        assert target not in answer.text


# -- revocation ------------------------------------------------------------------

def test_a_revoked_key_is_refused_on_the_very_next_request_on_every_worker(stack, upstream):
    directive = "Until revoked."
    agent, key = agent_with_key(stack, directive)
    digest = key_sha256(key)
    warm(stack, key, directive)
    for worker, response in requests_on_every_worker(stack, CHAT, chat_body(), None, at_least=4, per_worker=2,
                                                     headers=bearer(key)):
        assert response.status_code == 200, (worker, response.text)
    fallbacks = stack.subscriber.metric("ibex_subscribe_control_fallbacks_total")
    upstream.clear()

    assert stack.revoke_key(key_sha256=digest) == digest  # returns once Redis and Envoy were told
    # The key's own invalidation did it, not a full flush instead.
    assert stack.subscriber.metric("ibex_subscribe_control_fallbacks_total") == fallbacks
    assert stack.redis.get(agent_key_redis_key(digest)) in (None, TOMBSTONE)
    assert stack.store.key(digest) == (200, f'{{"key_sha256":"{digest}","agent_id":null}}')
    for worker, response in requests_on_every_worker(stack, CHAT, chat_body(), None, at_least=6, per_worker=3,
                                                     headers=bearer(key)):
        refused(response, 401, "invalid_api_key")
    refused(send(stack, "/v1/models", None, headers=bearer(key), method="GET"), 401, "invalid_api_key")
    assert upstream.received() == []
    [row] = stack.companion.list_keys(agent)
    assert row["key_sha256"] == digest and row["revoked_at"]


def test_revoking_one_key_leaves_the_agents_other_keys_working(stack, upstream):
    directive = "Two keys, one agent."
    agent, first = agent_with_key(stack, directive, label="first")
    second = stack.issue_key(agent, label="second")
    for key in (first, second):
        warm(stack, key, directive)
    stack.revoke_key(key=first)  # by the key itself, on stdin
    refused(send(stack, CHAT, chat_body(), headers=bearer(first)), 401, "invalid_api_key")
    body = chat_body()
    assert send(stack, CHAT, body, headers=bearer(second)).status_code == 200
    assert_chat_injected(body, upstream.last().body, directive)
    assert sorted(row["revoked_at"] is None for row in stack.companion.list_keys(agent)) == [False, True]


TTL = 2
"""cache.ttl_seconds of the outage test: a revoked key lives at most TTL in caches
nobody invalidates (every cache entry was filled before the revocation, and an L1
entry filled from Redis lasts no longer than the Redis entry)."""


def test_a_revoked_key_stops_working_within_the_ttl_while_the_subscriber_is_down(stack, upstream):
    stack.restart_envoy(filter_config=merge(FILTER_CONFIG, {"cache": {"ttl_seconds": TTL}}))
    try:
        directive = "Until the caches expire."
        agent, key = agent_with_key(stack, directive)
        digest = key_sha256(key)
        assert send(stack, CHAT, chat_body(), headers=bearer(key)).status_code == 200
        wait_until(lambda: stack.redis.get(agent_key_redis_key(digest)) is not None, what="the key's L2 write-back")
        assert 0 < stack.redis.ttl(agent_key_redis_key(digest)) <= TTL, "the key's Redis entry outlives the TTL"
        stack.stop("subscriber")
        stack.revoke_key(key_sha256=digest)  # published, but nobody listens
        revoked = time.monotonic()
        outcomes = []

        def refused_now():
            body = chat_body()
            response = send(stack, CHAT, body, headers=bearer(key))
            outcomes.append(response.status_code)
            if response.status_code == 200:
                # Accepted while cached: still with its directive.
                assert_chat_injected(body, upstream.last().body, directive)
                return None
            return [response]  # a list: a requests.Response for 401 is falsy

        [response] = wait_until(refused_now, timeout=2 * TTL + 2, interval=0.05,
                                what="the revoked key to be refused once its cache entries expired")
        elapsed = time.monotonic() - revoked
        refused(response, 401, "invalid_api_key")
        assert set(outcomes) <= {200, 401}, outcomes
        # TTL, plus a second for the machine (a slow store answer, a 50 ms poll).
        assert elapsed <= TTL + 1, f"refused only after {elapsed:.1f}s"
        # Refused from then on.
        refused(send(stack, CHAT, chat_body(), headers=bearer(key)), 401, "invalid_api_key")
    finally:
        stack.start("subscriber")
        stack.restart_envoy(filter_config=FILTER_CONFIG)


# -- failures --------------------------------------------------------------------

@pytest.fixture()
def parts_back(stack):
    """Whatever a test stops is running again afterwards, and Envoy has the module's settings."""
    yield
    for name in (stack.l2_part, "store"):
        stack.start(name)
    stack.restart_envoy(filter_config=FILTER_CONFIG, env={})


def test_a_key_that_cannot_be_checked_is_refused_even_failing_open(stack, upstream, parts_back):
    """failure_mode "open" lets a request go without its directive; never without an identity."""
    stack.restart_envoy(filter_config=merge(FILTER_CONFIG, {"failure_mode": "open"}))
    cold_agent, cold_key = agent_with_key(stack, "Cold, unknowable key.")
    directive = "Known key, unknowable directive."
    agent, key = agent_with_key(stack, directive)
    warm(stack, key, directive)
    # The directive's L1 entry goes (a tombstone); the key's stays.
    answer = requests.post(f"{stack.envoy.control_url}{INVALIDATE_PATH}/{agent}", headers=stack.control_headers(),
                           timeout=10)
    assert answer.status_code == 204
    stack.stop(stack.l2_part)
    stack.stop("store")
    upstream.clear()
    before = stack.envoy.counters()

    refused(send(stack, CHAT, chat_body(), headers=bearer(cold_key)), 503, "directive_unavailable")
    refused(send(stack, "/v1/models", None, headers=bearer(cold_key), method="GET"), 503, "directive_unavailable")
    assert upstream.received() == []
    # The cached key is known: its request fails open, without the directive, as with the header source.
    body = chat_body()
    assert send(stack, CHAT, body, headers=bearer(key)).status_code == 200
    received = upstream.last()
    assert received.body == body
    assert tier(received) == "none"
    assert_key_not_forwarded(received, key)
    assert deltas(before, ["rejected.directive_unavailable", "failed_open", "key_l1_hit"], stack) == {
        "rejected.directive_unavailable": 2, "failed_open": 1, "key_l1_hit": 1}
