"""Small helpers shared by the end-to-end tests: requests through the gateway
and byte-exact checks of what the upstream received."""

import json
import re
import uuid
from json.decoder import scanstring

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


# ---------------------------------------------------------------- the audit trail (access log)

AUDIT_FIELDS = ("agent_id", "directive_version", "tier", "outcome")
"""What the filter records per request: one filter-state string, wasm.ibex.audit, with these
four separated by a space, which the committed configs log as `audit`."""
ACCESS_LOG_FIELDS = ("time", "request_id", "method", "path", "status", "duration_ms", "audit")
"""Every field of a line of the committed configs' access log."""


def new_request_id():
    """A request id no other request has (sent as `x-request-id`, which Envoy keeps and logs)."""
    return "audit-" + uuid.uuid4().hex


def access_log_lines(stack, at_least=1, timeout=15):
    """The data listener's access log, parsed, once it has at least `at_least` complete lines.

    Envoy writes its access log out every --file-flush-interval-msec (stack/envoy.py
    FILE_FLUSH_MS), so lines show up a little after their requests ended: this polls."""
    def enough():
        lines = stack.access_log()
        return lines if len(lines) >= at_least else None

    return wait_until(enough, timeout=timeout, what=f"{at_least} lines in {stack.access_log_path}")


def access_log_for(stack, *request_ids, timeout=15):
    """{request id: [its access log lines]} once every one of `request_ids` has a line.

    Envoy logs a request once, when its stream ends, so a second line of the same
    request would have been written with the first; the caller checks there is one."""
    wanted = set(request_ids)

    def found():
        lines = {rid: [] for rid in request_ids}
        for line in stack.access_log():
            if line.get("request_id") in wanted:
                lines[line["request_id"]].append(line)
        return lines if all(lines.values()) else None

    return wait_until(found, timeout=timeout, what=f"access log lines of {sorted(wanted)} in {stack.access_log_path}")


def audit_line(stack, request_id, timeout=15):
    """The one access log line of the request sent with `x-request-id: request_id`."""
    lines = access_log_for(stack, request_id, timeout=timeout)[request_id]
    assert len(lines) == 1, f"{len(lines)} access log lines for request {request_id}: {lines}"
    return lines[0]


def audit_fields(line):
    """(agent_id, directive_version, tier, outcome) of an access log line (all None
    when the filter recorded nothing)."""
    audit = line["audit"]
    if audit is None:
        return (None,) * len(AUDIT_FIELDS)
    fields = tuple(audit.split(" "))
    assert len(fields) == len(AUDIT_FIELDS), f"audit {audit!r} is not four fields"
    return fields


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


# ---------------------------------------------------------------- byte-exact oracles per format
#
# An independent reference of SPEC §5 / src/inject.rs: for a body the client sent,
# the exact insertions (offset into the original, bytes, and how many original
# bytes they replace: only a `null` the directive replaces) the filter must make.
# The upstream must have received exactly `splice(original, insertions)`: every
# original byte, in order, and nothing else. Offsets come from value_span, a
# position-aware reading of the raw JSON (not a regex on the SDK's spelling).

GEMINI_PATHS = {
    "generate": "/v1beta/models/gemini-2.5-flash:generateContent",
    "stream": "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
    "count": "/v1beta/models/gemini-2.5-flash:countTokens",
}
VERTEX_GEMINI = "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent"
VERTEX_GEMINI_COUNT = "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:countTokens"
VERTEX_ANTHROPIC = "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:rawPredict"
VERTEX_ANTHROPIC_STREAM = VERTEX_ANTHROPIC.replace(":rawPredict", ":streamRawPredict")
CONVERSE = "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
CONVERSE_STREAM = CONVERSE + "-stream"
COMPLETIONS = "/v1/completions"
BATCHES = "/v1/messages/batches"
COUNT_TOKENS = "/v1/messages/count_tokens"
OLLAMA_GENERATE = "/api/generate"
OLLAMA_CHAT = "/api/chat"
AZURE_CHAT = "/openai/deployments/my-gpt/chat/completions?api-version=2024-10-21"

CACHE_CONTROL = b',"cache_control":{"type":"ephemeral"}'


def escaped(directive):
    """The directive as the filter splices it: the inside of a JSON string literal,
    escaped once (`"`, `\\`, controls; everything else kept as UTF-8), src/escape.rs."""
    return json.dumps(directive, ensure_ascii=False)[1:-1].encode("utf-8")


_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")


def _ws(text, at):
    return _WS.match(text, at).end()


def _span(text, at, path):
    """(start, end) character offsets of the value at `path` from the value at `at`."""
    at = _ws(text, at)
    if not path:
        _, end = _DECODER.raw_decode(text, at)
        return at, end
    step, rest = path[0], path[1:]
    opener, closer = ("{", "}") if isinstance(step, str) else ("[", "]")
    if text[at] != opener:
        return None
    at = _ws(text, at + 1)
    index = 0
    while text[at] != closer:
        if isinstance(step, str):
            key, at = scanstring(text, at + 1)
            at = _ws(text, _ws(text, at) + 1)  # past the colon
            if key == step:
                return _span(text, at, rest)
        elif index == step:
            return _span(text, at, rest)
        _, at = _DECODER.raw_decode(text, at)
        at = _ws(text, at)
        if text[at] == ",":
            at = _ws(text, at + 1)
        index += 1
    return None


def value_span(body, *path):
    """(start, end) byte offsets in the raw JSON `body` of the value at `path` (object
    keys, as decoded, and array indexes; the first of duplicated keys), or None
    when something on the way is absent or of another kind."""
    text = body.decode("utf-8")
    found = _span(text, 0, path)
    if found is None:
        return None
    return tuple(len(text[:at].encode("utf-8")) for at in found)


def _value(body, span):
    return body[span[0]:span[1]]


def _empty(body, span):
    """The array or object at `span` has nothing inside."""
    return body[span[0] + 1:span[1] - 1].strip() == b""


def first_member(body, span, member):
    """Insertion of `member` as the new first member of the object at `span`."""
    return (span[0] + 1, member if _empty(body, span) else member + b",", 0)


def first_element(body, span, element):
    """Insertion of `element` as the new first element of the array at `span`."""
    return (span[0] + 1, element if _empty(body, span) else element + b",", 0)


def string_prefix(span, d):
    """`D\\n\\n` right after the opening quote of the string at `span`."""
    return (span[0] + 1, d + b"\\n\\n", 0)


def replace_null(span, value):
    return (span[0], value, span[1] - span[0])


def splice(original, insertions):
    """`original` with `insertions` ((offset, bytes, replaced) in any order; equal
    offsets keep their order) made."""
    out, at = [], 0
    for offset, piece, replaced in sorted(insertions, key=lambda edit: edit[0]):
        assert offset >= at, f"overlapping edits at {offset}"
        out += [original[at:offset], piece]
        at = offset + replaced
    out.append(original[at:])
    return b"".join(out)


def assert_spliced(original, received, insertions):
    """`received` is exactly `original` with `insertions`, and valid JSON without
    duplicated keys. On a mismatch, shows where the bytes part."""
    expected = splice(original, insertions)
    if received != expected:
        at = next((i for i, (a, b) in enumerate(zip(expected, received)) if a != b), min(len(expected), len(received)))
        raise AssertionError(
            f"the upstream did not receive the original bytes plus the insertions only: they part at byte {at} "
            f"({len(received)} received, {len(expected)} expected)\n"
            f"  expected …{expected[max(0, at - 60):at + 100]!r}\n  received …{received[max(0, at - 60):at + 100]!r}")
    strict_json(received)


def chat_insertions(body, d, role="system"):
    """openai_chat: a new first element of `messages`."""
    message = b'{"role":"' + role.encode() + b'","content":"' + d + b'"}'
    return [first_element(body, value_span(body, "messages"), message)]


def completions_insertions(body, d):
    """openai_completions: `D\\n\\n` before each prompt string."""
    prompt = value_span(body, "prompt")
    if _value(body, prompt).startswith(b'"'):
        return [string_prefix(prompt, d)]
    count = len(json.loads(_value(body, prompt)))
    return [string_prefix(value_span(body, "prompt", i), d) for i in range(count)]


def breakpoints(body, span):
    """(members named cache_control, members named ttl) at any depth in the value at
    `span`, keys case-folded, duplicates counted: what src/inject.rs counts."""
    counts = [0, 0]

    def pairs(items):
        for key, _ in items:
            folded = key.casefold()
            counts[0] += folded == "cache_control"
            counts[1] += folded == "ttl"
        return dict(items)

    json.loads(_value(body, span), object_pairs_hook=pairs)
    return tuple(counts)


def anthropic_insertions(body, d, request=(), cache_control=False):
    """anthropic_messages: `system` of the request at `request` (a path; the top level
    by default), with inject.cache_control as given."""
    top = value_span(body, *request)
    cc, ttl = breakpoints(body, top)
    cached = cache_control and cc < 4 and ttl == 0
    block = b'{"type":"text","text":"' + d + b'"' + (CACHE_CONTROL if cached else b"") + b"}"
    system = value_span(body, *request, "system")
    if system is None:
        return [first_member(body, top, b'"system":' + (b"[" + block + b"]" if cached else b'"' + d + b'"'))]
    value = _value(body, system)
    if value == b"null":
        return [replace_null(system, b"[" + block + b"]" if cached else b'"' + d + b'"')]
    if value.startswith(b"["):
        return [first_element(body, system, block)]
    assert value.startswith(b'"'), value
    if not cached:
        return [string_prefix(system, d)]
    if json.loads(value).strip() == "":
        return [(system[0], b'[{"type":"text","text":', 0), string_prefix(system, d),
                (system[1], CACHE_CONTROL + b"}]", 0)]
    return [(system[0], b"[" + block + b',{"type":"text","text":', 0), (system[1], b"}]", 0)]


def batches_insertions(body, d, cache_control=False):
    """anthropic_batches: every `requests[i].params` as anthropic_messages."""
    count = len(json.loads(_value(body, value_span(body, "requests"))))
    return [edit for i in range(count)
            for edit in anthropic_insertions(body, d, ("requests", i, "params"), cache_control)]


def _gemini_system_path(body, request):
    found = [request + (name,) for name in ("systemInstruction", "system_instruction")
             if value_span(body, *request, name) is not None]
    assert len(found) <= 1, "both spellings: the filter refuses this body"
    return found[0] if found else None


def gemini_insertions(body, d, request=()):
    """gemini: `systemInstruction` (or `system_instruction`) of the request at `request`."""
    part = b'{"text":"' + d + b'"}'
    path = _gemini_system_path(body, request)
    if path is None:
        return [first_member(body, value_span(body, *request), b'"systemInstruction":{"parts":[' + part + b"]}")]
    system = value_span(body, *path)
    if _value(body, system) == b"null":
        return [replace_null(system, b'{"parts":[' + part + b"]}")]
    parts = value_span(body, *path, "parts")
    if parts is None:
        return [first_member(body, system, b'"parts":[' + part + b"]")]
    if _value(body, parts) == b"null":
        return [replace_null(parts, b"[" + part + b"]")]
    return [first_element(body, parts, part)]


def gemini_count_tokens_insertions(body, d):
    """gemini_count_tokens (Gemini API countTokens): inside `generateContentRequest`;
    else the `systemInstruction` there is; else a new first user turn of `contents`."""
    for name in ("generateContentRequest", "generate_content_request"):
        inner = value_span(body, name)
        if inner is not None and _value(body, inner) != b"null":
            return gemini_insertions(body, d, (name,))
    if _gemini_system_path(body, ()) is not None:
        return gemini_insertions(body, d)
    turn = b'{"role":"user","parts":[{"text":"' + d + b'"}]}'
    return [first_element(body, value_span(body, "contents"), turn)]


def bedrock_insertions(body, d):
    """bedrock_converse: `system`, a new first `{"text":D}`."""
    block = b'{"text":"' + d + b'"}'
    system = value_span(body, "system")
    if system is None:
        return [first_member(body, value_span(body), b'"system":[' + block + b"]")]
    if _value(body, system) == b"null":
        return [replace_null(system, b"[" + block + b"]")]
    return [first_element(body, system, block)]


def ollama_generate_insertions(body, d):
    """ollama_generate: `system`, set or prefixed."""
    system = value_span(body, "system")
    if system is None:
        return [first_member(body, value_span(body), b'"system":"' + d + b'"')]
    if _value(body, system) == b"null":
        return [replace_null(system, b'"' + d + b'"')]
    return [string_prefix(system, d)]


INSERTIONS = {
    "openai_chat": chat_insertions,
    "openai_completions": completions_insertions,
    "anthropic_messages": anthropic_insertions,
    "anthropic_batches": batches_insertions,
    "gemini": gemini_insertions,
    "gemini_count_tokens": gemini_count_tokens_insertions,
    "bedrock_converse": bedrock_insertions,
    "ollama_generate": ollama_generate_insertions,
}


def assert_injected(format_name, original, received, directive, **options):
    """The upstream received `original` with exactly the insertions `format_name` makes
    for `directive` (options: cache_control for the Anthropic formats, role for chat).
    Returns the received body, parsed."""
    insertions = INSERTIONS[format_name](original, escaped(directive), **options)
    assert_spliced(original, received, insertions)
    return strict_json(received)


class Wire:
    """The requests an httpx-based SDK sent, as they left its HTTP client (an httpx
    `request` event hook: `event_hooks={"request": [wire.hook]}`)."""

    def __init__(self):
        self.requests = []

    def hook(self, request):
        request.read()
        self.requests.append(request)

    @property
    def last(self):
        assert self.requests, "the SDK sent nothing"
        return self.requests[-1]

    @property
    def body(self):
        return self.last.content


def only_request(upstream):
    """The one request the upstream received."""
    received = upstream.received()
    assert len(received) == 1, received
    return received[0]

