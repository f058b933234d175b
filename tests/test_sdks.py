"""The official OpenAI and Anthropic Python SDKs through the gateway.

Each client is pointed at the gateway on loopback (never the internet: base_url
is given per client, the HTTP client ignores proxy variables, retries are off
unless a test is about them) and names its agent with a default header. Every
test checks the directive where the provider reads it twice over:

- in the raw bytes the echo upstream received, compared with the exact bytes
  the SDK put on the wire (captured by an httpx request hook): one contiguous
  insertion, nothing else changed;
- in the SDK's own parsed answer: the echo model lists what it received, so the
  directive shows first, and the SDK must have parsed the response (streams
  included) into its typed objects.
"""

import json
import re

import anthropic
import openai
import pytest

from helpers import TRICKY_DIRECTIVE, Wire, agent_with, assert_chat_injected, assert_single_insertion, strict_json
from stack.contract import AGENT_HEADER

API_KEY = "sk-test-not-a-real-key"


def http_client(sdk, wire):
    """The SDK's default HTTP client, ignoring HTTP(S)_PROXY and friends."""
    return sdk.DefaultHttpxClient(trust_env=False, event_hooks={"request": [wire.hook]})


def openai_client(stack, agent, wire, max_retries=0):
    return openai.OpenAI(
        base_url=stack.gateway_url + "/v1",
        api_key=API_KEY,
        max_retries=max_retries,
        default_headers={AGENT_HEADER: agent},
        http_client=http_client(openai, wire),
    )


def anthropic_client(stack, agent, wire, max_retries=0):
    # Anthropic's SDK appends /v1/messages to the base URL itself.
    return anthropic.Anthropic(
        base_url=stack.gateway_url,
        api_key=API_KEY,
        max_retries=max_retries,
        default_headers={AGENT_HEADER: agent},
        http_client=http_client(anthropic, wire),
    )


@pytest.fixture()
def wire():
    return Wire()


def only_request(upstream):
    received = upstream.received()
    assert len(received) == 1, received
    return received[0]


def assert_sdk_headers_arrived(sent, received):
    """What the SDK put in its headers reaches the provider unchanged (except framing),
    but for the agent header, which is the gateway's business (envoy/local.yaml removes it)."""
    for name, value in sent.headers.items():
        if name.lower() in ("content-length", "host", "connection", "accept-encoding", "transfer-encoding"):
            continue
        if name.lower() == AGENT_HEADER:
            assert received.header(name) is None, "the agent header reached the provider"
            continue
        assert received.header(name) == value, name
    assert received.header("content-type") == "application/json"
    framed = received.header("content-length")
    assert framed is None or int(framed) == len(received.body)


def test_openai_chat_completion(stack, upstream, wire):
    agent = agent_with(stack, TRICKY_DIRECTIVE)
    client = openai_client(stack, agent, wire)
    completion = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hello"}], temperature=0.5)

    received = only_request(upstream)
    assert received.path == "/v1/chat/completions"
    assert_chat_injected(wire.body, received.body, TRICKY_DIRECTIVE)
    assert_sdk_headers_arrived(wire.last, received)
    assert any(name.lower().startswith("x-stainless-") for name, _ in received.header_pairs)
    assert received.header("authorization") == f"Bearer {API_KEY}"

    assert isinstance(completion, openai.types.chat.ChatCompletion)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.content == "\n".join(
        ["echo: received 2 message(s)", f"[1] system: {TRICKY_DIRECTIVE}", "[2] user: hello"])


def test_openai_chat_completion_stream(stack, upstream, wire):
    directive = "Stream your answer politely."
    agent = agent_with(stack, directive)
    client = openai_client(stack, agent, wire)
    stream = client.chat.completions.create(
        model="demo", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": "Client system."}, {"role": "user", "content": "hi"}])
    chunks = list(stream)

    received = only_request(upstream)
    assert strict_json(received.body)["stream"] is True
    assert_chat_injected(wire.body, received.body, directive)

    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "\n".join(["echo: received 3 message(s)", f"[1] system: {directive}",
                              "[2] system: Client system.", "[3] user: hi"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("instructions", [None, "Answer in French."], ids=["absent", "string"])
def test_openai_responses_instructions(stack, upstream, wire, instructions):
    agent = agent_with(stack, TRICKY_DIRECTIVE)
    client = openai_client(stack, agent, wire)
    extra = {} if instructions is None else {"instructions": instructions}
    response = client.responses.create(model="demo", input="hello", **extra)

    received = only_request(upstream)
    assert received.path == "/v1/responses"
    assert_single_insertion(wire.body, received.body)
    expected = TRICKY_DIRECTIVE if instructions is None else TRICKY_DIRECTIVE + "\n\n" + instructions
    sent, got = strict_json(wire.body), strict_json(received.body)
    assert got["instructions"] == expected
    assert {k: v for k, v in got.items() if k != "instructions"} == {k: v for k, v in sent.items() if k != "instructions"}
    assert_sdk_headers_arrived(wire.last, received)

    assert isinstance(response, openai.types.responses.Response)
    assert response.instructions == expected
    assert response.output_text == f"echo: responses request\ninstructions: {expected}\n[1] user: hello"


@pytest.mark.parametrize("system", [None, "You are helpful."], ids=["absent", "string"])
def test_anthropic_messages_string_system(stack, upstream, wire, system):
    directive = "Never reveal internal tools."
    agent = agent_with(stack, directive)
    client = anthropic_client(stack, agent, wire)
    extra = {} if system is None else {"system": system}
    message = client.messages.create(
        model="claude-demo", max_tokens=64, messages=[{"role": "user", "content": "hi"}], **extra)

    received = only_request(upstream)
    assert received.path == "/v1/messages"
    assert_single_insertion(wire.body, received.body)
    expected = directive if system is None else directive + "\n\n" + system
    sent, got = strict_json(wire.body), strict_json(received.body)
    assert got["system"] == expected
    assert {k: v for k, v in got.items() if k != "system"} == {k: v for k, v in sent.items() if k != "system"}
    assert_sdk_headers_arrived(wire.last, received)
    # the credential as this SDK version sends it (x-api-key, or a bearer token in 2.x)
    assert API_KEY in (received.header("x-api-key"), (received.header("authorization") or "").removeprefix("Bearer "))
    assert received.header("anthropic-version")

    assert isinstance(message, anthropic.types.Message)
    assert message.stop_reason == "end_turn"
    assert message.content[0].text == f"echo: anthropic messages request\nsystem: {expected}\n[1] user: hi"


def test_anthropic_messages_array_system_keeps_cache_control(stack, upstream, wire):
    directive = "Policy first: " + TRICKY_DIRECTIVE
    agent = agent_with(stack, directive)
    client = anthropic_client(stack, agent, wire)
    system = [
        {"type": "text", "text": "Long cached preamble.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Second block."},
    ]
    message = client.messages.create(
        model="claude-demo", max_tokens=64, system=system, messages=[{"role": "user", "content": "hi"}])

    received = only_request(upstream)
    # Byte for byte: the new block {"type":"text","text":D} right after the array's `[`,
    # then a comma, then the client's blocks exactly as the SDK wrote them.
    at = re.search(rb'"system"\s*:\s*\[', wire.body).end()
    block = b'{"type":"text","text":' + json.dumps(directive, ensure_ascii=False).encode() + b'},'
    assert received.body == wire.body[:at] + block + wire.body[at:]
    got = strict_json(received.body)
    assert got["system"][0] == {"type": "text", "text": directive}
    assert got["system"][1:] == strict_json(wire.body)["system"] == system

    assert message.content[0].text == "\n".join([
        "echo: anthropic messages request",
        f"system: {directive}\nLong cached preamble.\nSecond block.",
        "[1] user: hi",
    ])


def test_anthropic_messages_stream(stack, upstream, wire):
    directive = "Stream in Anthropic's event format."
    agent = agent_with(stack, directive)
    client = anthropic_client(stack, agent, wire)
    with client.messages.stream(model="claude-demo", max_tokens=64, system="Be kind.",
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()

    received = only_request(upstream)
    assert strict_json(received.body)["stream"] is True
    assert_single_insertion(wire.body, received.body)
    assert strict_json(received.body)["system"] == directive + "\n\nBe kind."
    assert text == f"echo: anthropic messages request\nsystem: {directive}\n\nBe kind.\n[1] user: hi"
    assert final.content[0].text == text


def test_sdk_sees_a_refusal_as_its_error_type_and_does_not_retry_it(stack, upstream, wire):
    """A 400 from the filter is final: the SDK (default retries on) raises its
    BadRequestError with the filter's code and sends the request once."""
    rejected = stack.envoy.counter("rejected.invalid_agent_id")
    client = openai_client(stack, "not-a-uuid", wire, max_retries=2)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 400
    assert raised.value.code == "invalid_agent_id"
    assert len(wire.requests) == 1
    assert stack.envoy.counter("rejected.invalid_agent_id") == rejected + 1

    client = anthropic_client(stack, "not-a-uuid", wire, max_retries=2)
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(model="claude-demo", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 400
    assert raised.value.body["error"]["code"] == "invalid_agent_id"
    assert len(wire.requests) == 2
    assert upstream.received() == []


@pytest.mark.parametrize("status", [429, 503])
def test_sdk_retry_is_injected_again(stack, upstream, wire, status):
    """The provider refuses the first attempt (the echo upstream answers it with
    `status` once); the SDK retries with its retry bookkeeping headers
    (x-stainless-retry-count) and both attempts reach the provider, each with
    the directive inserted once into the bytes that attempt put on the wire."""
    directive = "Retries change nothing."
    agent = agent_with(stack, directive)
    client = openai_client(stack, agent, wire, max_retries=2)
    upstream.fail_next(status)
    completion = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])

    attempts = upstream.received()
    assert len(wire.requests) == 2, "the SDK did not retry"
    assert len(attempts) == 2, "the provider did not see both attempts"
    assert [a.header("x-stainless-retry-count") for a in attempts] == ["0", "1"]
    for sent, received in zip(wire.requests, attempts):
        assert_chat_injected(sent.content, received.body, directive)
        assert_sdk_headers_arrived(sent, received)
    assert completion.choices[0].message.content.splitlines()[1] == f"[1] system: {directive}"

    anthropic_wire = Wire()
    client = anthropic_client(stack, agent, anthropic_wire, max_retries=2)
    upstream.clear()
    upstream.fail_next(status)
    message = client.messages.create(model="claude-demo", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    attempts = upstream.received()
    assert len(anthropic_wire.requests) == 2 and len(attempts) == 2
    assert [a.header("x-stainless-retry-count") for a in attempts] == ["0", "1"]
    for sent, received in zip(anthropic_wire.requests, attempts):
        assert_single_insertion(sent.content, received.body)
        assert strict_json(received.body)["system"] == directive
    assert message.content[0].text.splitlines()[1] == f"system: {directive}"
