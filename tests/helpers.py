"""Small helpers shared by the end-to-end tests: requests through the gateway
and byte-exact checks of what the upstream received."""

import json
import uuid

import requests

from stack import wait_until
from stack.contract import AGENT_HEADER, TIER_HEADER

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"

# A directive with everything JSON escaping must get right.
TRICKY_DIRECTIVE = (
    'You are "Ibex". Answer briefly.\n'
    "Back\\slash, tab\t, unicode: Grüße, 日本語, emoji 🦌, line sep \u2028, </script>."
)


def new_agent():
    """A fresh agent id, so no test sees another test's cache entries."""
    return str(uuid.uuid4())


def agent_with(stack, directive):
    """A brand-new agent whose directive is `directive`, in Postgres only.

    No cache has ever seen a new agent, so the update is not published: a
    publish would only make the subscriber touch Redis (delete, tombstone)
    for this agent while the test runs. Tests of invalidation publish.
    """
    agent = new_agent()
    stack.set_directive(agent, directive, publish=False)
    return agent


def chat_body(text="hello"):
    """A chat completions body as raw bytes, with odd spacing and escapes that
    must survive byte for byte."""
    return (
        '{"model": "demo",  "messages" : [ {"role":"user","content":"'
        + text
        + ' \\u00e9\\n caf\u00e9"}, {"role": "assistant", "content": "ok"},'
        '{"role":"user","content":"again"} ],\n "temperature": 0.25, "metadata": {"k": [1, 2.50, null]}}'
    ).encode("utf-8")


def json_headers(agent=None, headers=None):
    """Headers of a JSON request for `agent` (none when None), plus `headers`."""
    all_headers = {"content-type": "application/json"}
    if agent is not None:
        all_headers[AGENT_HEADER] = agent
    all_headers.update(headers or {})
    return all_headers


def send(stack, path, body, agent=None, headers=None, method="POST"):
    """Send raw body bytes through the gateway; return the requests.Response."""
    return requests.request(method, stack.gateway_url + path, data=body, headers=json_headers(agent, headers),
                            timeout=30)


def tier(received):
    """The debug header (TIER_HEADER) of a request the upstream received: the tier that answered."""
    return received.header(TIER_HEADER)


def error_code(response):
    """`error.code` of an OpenAI-style local reply."""
    return response.json()["error"]["code"]


def strict_json(data):
    """Parse JSON, refusing duplicated keys (the filter must never create one)."""

    def no_duplicates(pairs):
        keys = [key for key, _ in pairs]
        assert len(keys) == len(set(keys)), f"duplicated key in {keys}"
        return dict(pairs)

    return json.loads(data, object_pairs_hook=no_duplicates)


def assert_single_insertion(original, received):
    """`received` must be `original` with one contiguous run of bytes inserted:
    every original byte kept, in order, nothing changed around the insertion.
    Returns the inserted bytes."""
    assert len(received) > len(original), "nothing was inserted"
    prefix = 0
    limit = len(original)
    while prefix < limit and received[prefix] == original[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and received[-1 - suffix] == original[-1 - suffix]:
        suffix += 1
    assert prefix + suffix == len(original), (
        f"received body is not the original with one insertion: original bytes changed "
        f"after offset {prefix}: original={original[prefix:prefix + 80]!r} received={received[prefix:prefix + 80]!r}"
    )
    return received[prefix:len(received) - suffix]


def assert_chat_injected(original, received_body, directive, role="system"):
    """The directive is the new first message and every other byte is unchanged."""
    assert_single_insertion(original, received_body)
    sent = strict_json(original)
    got = strict_json(received_body)
    assert got["messages"][0] == {"role": role, "content": directive}
    assert got["messages"][1:] == sent["messages"]
    assert {k: v for k, v in got.items() if k != "messages"} == {k: v for k, v in sent.items() if k != "messages"}


def connections_by_worker(stack):
    """{worker index: connections that Envoy worker accepted on the data listener so far}.

    From Envoy's per-worker listener stats (`listener.<addr>.worker_<n>.downstream_cx_total`).
    """
    pattern = rf"^listener\.127\.0\.0\.1_{stack.envoy.data_port}\.worker_[0-9]+\.downstream_cx_total$"
    return {int(name.rsplit(".worker_", 1)[1].split(".", 1)[0]): value
            for name, value in stack.envoy.stats(pattern).items()}


def _worker_that_grew(before, stack):
    """[worker] whose accepted-connection count is above `before`, or None yet."""
    grown = [worker for worker, total in connections_by_worker(stack).items() if total > before.get(worker, 0)]
    assert len(grown) <= 1, f"connections appeared on several workers at once: {grown}"
    return grown or None


def requests_on_every_worker(stack, path, body, agent, at_least=10, per_worker=2, limit=200, headers=None,
                             method="POST"):
    """Send the request on a fresh connection (`Connection: close`), one at a time,
    until at least `at_least` went out and every Envoy worker took `per_worker`.

    Yields (worker index, requests.Response) after each request, before the
    next one goes out, so the caller can look at what the upstream received.
    The kernel spreads connections over the workers; `limit` bounds the tries.
    `headers` go with every request (test_api_key: the gateway key; `agent` None).
    """
    served = {}
    sent = 0
    while sent < at_least or len(served) < stack.envoy.concurrency or min(served.values()) < per_worker:
        assert sent < limit, f"{limit} connections did not reach every worker: {served}"
        before = connections_by_worker(stack)
        response = send(stack, path, body, agent=agent, headers={**(headers or {}), "connection": "close"},
                        method=method)
        [worker] = wait_until(lambda: _worker_that_grew(before, stack), what="Envoy to count the connection")
        served[worker] = served.get(worker, 0) + 1
        sent += 1
        yield worker, response


def bearer(key):
    """The `authorization` header of a gateway (or provider) key."""
    return {"authorization": f"Bearer {key}"}


def agent_with_key(stack, directive, label=None):
    """A brand-new agent whose directive is `directive` (Postgres only, like agent_with)
    and a gateway key issued for it: (agent, key)."""
    agent = agent_with(stack, directive)
    return agent, stack.issue_key(agent, label=label)
