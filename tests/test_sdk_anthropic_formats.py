"""Anthropic's official SDK through the gateway, beyond messages.create
(test_sdks.py): message batches (every request's `params` gets the directive, in
one body), count_tokens (the count includes the directive), the Vertex AI client
(`AnthropicVertex`: `:rawPredict`, `:streamRawPredict`), and `inject.cache_control`
(the directive's block becomes a cache breakpoint).

Each test checks the bytes the echo upstream received are exactly the bytes the
SDK put on the wire (an httpx request hook) plus the insertions of SPEC §5
(helpers.assert_injected, an independent oracle), and that the SDK parsed the
echo's answer: the echo model lists the system prompt it received, so the
directive shows first.

The cache_control tests restart Envoy once with `inject.cache_control: true` and
come last in the module (the module's default Envoy is back after them).
"""

import json

import anthropic
import pytest

from helpers import (
    BATCHES,
    CHAT,
    COUNT_TOKENS,
    MESSAGES,
    TRICKY_DIRECTIVE,
    VERTEX_ANTHROPIC,
    VERTEX_ANTHROPIC_STREAM,
    Wire,
    agent_with,
    assert_chat_injected,
    assert_injected,
    chat_body,
    only_request,
    send,
)
from stack.contract import AGENT_HEADER

API_KEY = "sk-ant-test-not-a-real-key"
CACHED = {"type": "ephemeral"}


def http_client(wire):
    """The SDK's default HTTP client, ignoring HTTP(S)_PROXY and friends."""
    return anthropic.DefaultHttpxClient(trust_env=False, event_hooks={"request": [wire.hook]})


def anthropic_client(stack, agent, wire):
    return anthropic.Anthropic(base_url=stack.gateway_url, api_key=API_KEY, max_retries=0,
                               default_headers={AGENT_HEADER: agent}, http_client=http_client(wire))


def vertex_client(stack, agent, wire):
    # AnthropicVertex appends /projects/{p}/locations/{r}/publishers/anthropic/models/{m}:rawPredict
    return anthropic.AnthropicVertex(project_id="p", region="us-east5", access_token="vertex-test-not-a-real-token",
                                     base_url=stack.gateway_url + "/v1", max_retries=0,
                                     default_headers={AGENT_HEADER: agent}, http_client=http_client(wire))


@pytest.fixture()
def wire():
    return Wire()


def words(*texts):
    return sum(len(text.split()) for text in texts)


def echo_text(system, *user):
    lines = ["echo: anthropic messages request"]
    if system is not None:
        lines.append(f"system: {system}")
    lines += [f"[{i}] user: {text}" for i, text in enumerate(user, start=1)]
    return "\n".join(lines)


BLOCKS = [{"type": "text", "text": "Long cached preamble.", "cache_control": CACHED},
          {"type": "text", "text": "Second block."}]


def batch_requests():
    """Three requests: no system, a string system, blocks (one already a breakpoint)."""
    return [
        {"custom_id": "no-system", "params": {"model": "claude-demo", "max_tokens": 32,
                                              "messages": [{"role": "user", "content": "one"}]}},
        {"custom_id": "string-system", "params": {"model": "claude-demo", "max_tokens": 32, "system": "Be kind.",
                                                  "messages": [{"role": "user", "content": "two"}]}},
        {"custom_id": "block-system", "params": {"model": "claude-demo", "max_tokens": 32, "system": BLOCKS,
                                                 "messages": [{"role": "user", "content": "three"}]}},
    ]


def test_batch_create_directs_every_request(stack, upstream, wire):
    directive = "Batch policy: " + TRICKY_DIRECTIVE
    agent = agent_with(stack, directive)
    client = anthropic_client(stack, agent, wire)
    batch = client.messages.batches.create(requests=batch_requests())

    received = only_request(upstream)
    assert received.path == BATCHES
    got = assert_injected("anthropic_batches", wire.body, received.body, directive)
    systems = [request["params"]["system"] for request in got["requests"]]
    assert systems == [directive, directive + "\n\nBe kind.", [{"type": "text", "text": directive}, *BLOCKS]]
    assert [r["custom_id"] for r in got["requests"]] == ["no-system", "string-system", "block-system"]

    assert isinstance(batch, anthropic.types.messages.MessageBatch)
    assert batch.processing_status == "in_progress"
    assert batch.request_counts.processing == 3

    # The SDK reads the results back (GET the batch, then its results_url, JSONL):
    # bodiless requests through the gateway, forwarded as they are.
    upstream.clear()
    results = list(client.messages.batches.results(batch.id))
    gets = upstream.received()
    assert [(r.method, r.path) for r in gets] == [("GET", f"{BATCHES}/{batch.id}"),
                                                  ("GET", f"{BATCHES}/{batch.id}/results")]
    assert all(r.body == b"" for r in gets)
    assert [r.custom_id for r in results] == ["no-system", "string-system", "block-system"]
    assert all(r.result.type == "succeeded" for r in results)
    assert [r.result.message.content[0].text for r in results] == [
        echo_text(directive, "one"),
        echo_text(directive + "\n\nBe kind.", "two"),
        echo_text(f"{directive}\nLong cached preamble.\nSecond block.", "three"),
    ]


@pytest.mark.parametrize("system", [None, "You count too.", BLOCKS], ids=["absent", "string", "blocks"])
def test_count_tokens_counts_the_directive(stack, upstream, wire, system):
    directive = "Counted directive words."
    agent = agent_with(stack, directive)
    client = anthropic_client(stack, agent, wire)
    extra = {} if system is None else {"system": system}
    counted = client.messages.count_tokens(model="claude-demo", messages=[{"role": "user", "content": "hi there"}],
                                           **extra)

    received = only_request(upstream)
    assert received.path == COUNT_TOKENS
    got = assert_injected("anthropic_messages", wire.body, received.body, directive)
    if system is None:
        assert got["system"] == directive
        system_texts = []
    elif isinstance(system, str):
        assert got["system"] == directive + "\n\n" + system
        system_texts = [system]
    else:
        assert got["system"] == [{"type": "text", "text": directive}, *system]
        system_texts = [block["text"] for block in system]
    assert isinstance(counted, anthropic.types.MessageTokensCount)
    assert counted.input_tokens == words(directive, *system_texts, "hi there")


def test_vertex_raw_predict_through_the_sdk(stack, upstream, wire):
    directive = "Vertex Claude directive."
    agent = agent_with(stack, directive)
    client = vertex_client(stack, agent, wire)
    message = client.messages.create(model="claude-sonnet-4@20250514", max_tokens=32, system="Be kind.",
                                     messages=[{"role": "user", "content": "hi"}])

    received = only_request(upstream)
    assert received.path == VERTEX_ANTHROPIC
    sent = json.loads(wire.body)
    assert "model" not in sent and sent["anthropic_version"]  # Vertex's body: the model is in the path
    got = assert_injected("anthropic_messages", wire.body, received.body, directive)
    assert got["system"] == directive + "\n\nBe kind."
    assert received.header("authorization") == "Bearer vertex-test-not-a-real-token"
    assert received.header(AGENT_HEADER) is None
    assert message.content[0].text == echo_text(directive + "\n\nBe kind.", "hi")


def test_vertex_stream_raw_predict_through_the_sdk(stack, upstream, wire):
    directive = "Vertex Claude streams."
    agent = agent_with(stack, directive)
    client = vertex_client(stack, agent, wire)
    with client.messages.stream(model="claude-sonnet-4@20250514", max_tokens=32, system=BLOCKS,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)

    received = only_request(upstream)
    assert received.path == VERTEX_ANTHROPIC_STREAM
    got = assert_injected("anthropic_messages", wire.body, received.body, directive)
    assert got["stream"] is True
    assert got["system"] == [{"type": "text", "text": directive}, *BLOCKS]
    assert text == echo_text(f"{directive}\nLong cached preamble.\nSecond block.", "hi")


RAW = {
    "vertex_raw_predict": (VERTEX_ANTHROPIC, b'{"anthropic_version":"vertex-2023-10-16", "messages":[{"role":"user",'
                                             b'"content":"hi"}],"max_tokens":8}'),
    "vertex_system_null": (VERTEX_ANTHROPIC, b'{"system":null,"messages":[]}'),
    "batch_params_empty_and_spaced": (BATCHES, b'{ "requests" : [ { "params" : { } } , {"custom_id":"x",'
                                               b'"params":{"system":[ ],"messages":[]}} ] }'),
    "batch_without_requests_inside": (BATCHES, b'{"requests":[ ]}'),
    "count_tokens_system_string": (COUNT_TOKENS, b'{"model":"c","system":"S \\u00e9","messages":[]}'),
}
RAW_FORMATS = {BATCHES: "anthropic_batches"}


@pytest.mark.parametrize("path,body", RAW.values(), ids=RAW.keys())
def test_raw_anthropic_bodies_are_spliced(stack, upstream, path, body):
    directive = "Raw Anthropic."
    agent = agent_with(stack, directive)
    response = send(stack, path, body, agent=agent)
    assert response.status_code == 200, response.text
    received = only_request(upstream)
    assert received.path == path
    format_name = RAW_FORMATS.get(path, "anthropic_messages")
    if body == b'{"requests":[ ]}':
        # a batch of no requests has nothing to direct: forwarded as it is
        assert received.body == body
        return
    assert_injected(format_name, body, received.body, directive)


# ---------------------------------------------------------------- inject.cache_control: true

@pytest.fixture(scope="module")
def cache_control(stack):
    """Envoy restarted with inject.cache_control on, for the tests below; the
    module's default Envoy is back after them."""
    stack.restart_envoy(filter_config={"inject": {"cache_control": True}})
    yield
    stack.restart_envoy(filter_config={})


def cached_block(text):
    return {"type": "text", "text": text, "cache_control": CACHED}


@pytest.mark.parametrize("system", ["Be kind.", None], ids=["string", "absent"])
def test_cache_control_turns_the_directive_into_a_cached_block(stack, cache_control, upstream, wire, system):
    """A string `system` becomes blocks: the cached directive, then the client's
    string as a block of its own, its bytes verbatim; an absent one, one block."""
    directive = "Cache this directive. " + TRICKY_DIRECTIVE
    agent = agent_with(stack, directive)
    client = anthropic_client(stack, agent, wire)
    extra = {} if system is None else {"system": system}
    message = client.messages.create(model="claude-demo", max_tokens=32,
                                     messages=[{"role": "user", "content": "hi"}], **extra)

    received = only_request(upstream)
    got = assert_injected("anthropic_messages", wire.body, received.body, directive, cache_control=True)
    expected = [cached_block(directive)] + ([] if system is None else [{"type": "text", "text": system}])
    assert got["system"] == expected
    shown = directive if system is None else f"{directive}\n{system}"
    assert message.content[0].text == echo_text(shown, "hi")


def test_cache_control_blocks_keep_the_clients_breakpoints(stack, cache_control, upstream, wire):
    directive = "Cached first block."
    agent = agent_with(stack, directive)
    client = anthropic_client(stack, agent, wire)
    message = client.messages.create(model="claude-demo", max_tokens=32, system=BLOCKS,
                                     messages=[{"role": "user", "content": "hi"}])

    received = only_request(upstream)
    got = assert_injected("anthropic_messages", wire.body, received.body, directive, cache_control=True)
    assert got["system"] == [cached_block(directive), *BLOCKS]
    assert message.content[0].text == echo_text(f"{directive}\nLong cached preamble.\nSecond block.", "hi")


def test_cache_control_with_four_breakpoints_leaves_the_directive_uncached(stack, cache_control, upstream, wire):
    """Anthropic allows four breakpoints per request: a body that has four gets the
    directive exactly as with the option off."""
    directive = "No fifth breakpoint."
    agent = agent_with(stack, directive)
    client = anthropic_client(stack, agent, wire)
    system = [{"type": "text", "text": f"block {i}", "cache_control": CACHED} for i in range(3)]
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": CACHED}]}]
    client.messages.create(model="claude-demo", max_tokens=32, system=system, messages=messages)

    received = only_request(upstream)
    got = assert_injected("anthropic_messages", wire.body, received.body, directive, cache_control=True)
    assert got["system"] == [{"type": "text", "text": directive}, *system]
    assert received.body.count(b'"cache_control"') == 4


def test_cache_control_with_a_ttl_leaves_the_directive_uncached(stack, cache_control, upstream, wire):
    """A 5-minute breakpoint may not precede a 1-hour one: with any `ttl` in the
    request the directive goes in uncached."""
    directive = "No breakpoint before a TTL."
    agent = agent_with(stack, directive)
    client = anthropic_client(stack, agent, wire)
    system = [{"type": "text", "text": "Hour-long.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    client.messages.create(model="claude-demo", max_tokens=32, system=system,
                           messages=[{"role": "user", "content": "hi"}])

    got = assert_injected("anthropic_messages", wire.body, only_request(upstream).body, directive,
                          cache_control=True)
    assert got["system"] == [{"type": "text", "text": directive}, *system]


def test_cache_control_in_every_batch_request(stack, cache_control, upstream, wire):
    directive = "Cached in every request."
    agent = agent_with(stack, directive)
    client = anthropic_client(stack, agent, wire)
    client.messages.batches.create(requests=batch_requests())

    got = assert_injected("anthropic_batches", wire.body, only_request(upstream).body, directive,
                          cache_control=True)
    assert [request["params"]["system"] for request in got["requests"]] == [
        [cached_block(directive)],
        [cached_block(directive), {"type": "text", "text": "Be kind."}],
        [cached_block(directive), *BLOCKS],
    ]


def test_cache_control_on_count_tokens_and_vertex(stack, cache_control, upstream, wire):
    directive = "Counted and cached."
    agent = agent_with(stack, directive)
    anthropic_client(stack, agent, wire).messages.count_tokens(
        model="claude-demo", system="S", messages=[{"role": "user", "content": "hi"}])
    got = assert_injected("anthropic_messages", wire.body, only_request(upstream).body, directive,
                          cache_control=True)
    assert got["system"] == [cached_block(directive), {"type": "text", "text": "S"}]

    upstream.clear()
    vertex_client(stack, agent, wire).messages.create(model="claude-sonnet-4@20250514", max_tokens=8,
                                                      messages=[{"role": "user", "content": "hi"}])
    got = assert_injected("anthropic_messages", wire.body, only_request(upstream).body, directive,
                          cache_control=True)
    assert got["system"] == [cached_block(directive)]


CACHED_RAW = {
    "blank_string_stays_one_block": (MESSAGES, b'{"system":"  ","messages":[]}'),
    "null_system": (MESSAGES, b'{"system":null,"messages":[]}'),
    "string_with_escapes_kept_verbatim": (MESSAGES, b'{"system":"caf\\u00e9 \\"q\\"","messages":[]}'),
    "ttl_in_a_message_block": (MESSAGES, b'{"system":"S","messages":[{"role":"user","content":[{"type":"text",'
                                         b'"text":"x","cache_control":{"type":"ephemeral","TTL":"5m"}}]}]}'),
}


@pytest.mark.parametrize("path,body", CACHED_RAW.values(), ids=CACHED_RAW.keys())
def test_cache_control_raw_bodies(stack, cache_control, upstream, path, body):
    directive = "Raw cached."
    agent = agent_with(stack, directive)
    response = send(stack, path, body, agent=agent)
    assert response.status_code == 200, response.text
    assert_injected("anthropic_messages", body, only_request(upstream).body, directive, cache_control=True)


def test_cache_control_leaves_other_formats_alone(stack, cache_control, upstream):
    directive = "Chat is not Anthropic."
    agent = agent_with(stack, directive)
    body = chat_body()
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    assert_chat_injected(body, only_request(upstream).body, directive)
