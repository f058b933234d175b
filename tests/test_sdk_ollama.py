"""Ollama's official Python client (`ollama`, github.com/ollama/ollama-python)
through the gateway: `/api/generate` (format `ollama_generate`: `system`) and
`/api/chat` (format `openai_chat`: a new first message), blocking and streamed
(NDJSON), and raw bodies the client does not write (Ollama streams unless told
not to).

Each test checks the bytes the echo upstream received are exactly the bytes the
client put on the wire (an httpx request hook) plus the insertions of SPEC §5
(helpers.assert_injected), and that the client parsed the echo's Ollama answer.
"""

import json

import ollama
import pytest

from helpers import (
    OLLAMA_CHAT,
    OLLAMA_GENERATE,
    TRICKY_DIRECTIVE,
    Wire,
    agent_with,
    assert_injected,
    only_request,
    send,
)
from stack.contract import AGENT_HEADER

MODEL = "llama3.2"


def ollama_client(stack, agent, wire):
    return ollama.Client(host=stack.gateway_url, headers={AGENT_HEADER: agent}, trust_env=False,
                         event_hooks={"request": [wire.hook]})


@pytest.fixture()
def wire():
    return Wire()


def generate_text(system, prompt):
    return f"echo: ollama generate request\nsystem: {system}\nprompt: {prompt}"


def words(*texts):
    return sum(len(text.split()) for text in texts)


@pytest.mark.parametrize("system", [None, "You are a pirate."], ids=["absent", "string"])
def test_generate(stack, upstream, wire, system):
    agent = agent_with(stack, TRICKY_DIRECTIVE)
    extra = {} if system is None else {"system": system}
    response = ollama_client(stack, agent, wire).generate(model=MODEL, prompt="hello", **extra)

    received = only_request(upstream)
    assert received.path == OLLAMA_GENERATE
    got = assert_injected("ollama_generate", wire.body, received.body, TRICKY_DIRECTIVE)
    expected = TRICKY_DIRECTIVE if system is None else TRICKY_DIRECTIVE + "\n\n" + system
    assert got["system"] == expected
    assert got["stream"] is False
    assert received.header(AGENT_HEADER) is None

    assert isinstance(response, ollama.GenerateResponse)
    assert response.done and response.done_reason == "stop"
    assert response.response == generate_text(expected, "hello")
    assert response.prompt_eval_count == words(expected, "hello")


def test_generate_stream(stack, upstream, wire):
    directive = "Ollama streams NDJSON."
    agent = agent_with(stack, directive)
    parts = list(ollama_client(stack, agent, wire).generate(model=MODEL, prompt="hi", system="S", stream=True))

    got = assert_injected("ollama_generate", wire.body, only_request(upstream).body, directive)
    assert got["stream"] is True
    assert len(parts) > 2 and all(isinstance(part, ollama.GenerateResponse) for part in parts)
    assert [part.done for part in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(part.response for part in parts) == generate_text(directive + "\n\nS", "hi")


def test_chat(stack, upstream, wire):
    directive = "Ollama chat directive."
    agent = agent_with(stack, directive)
    response = ollama_client(stack, agent, wire).chat(
        model=MODEL, messages=[{"role": "system", "content": "Client system."}, {"role": "user", "content": "hi"}])

    received = only_request(upstream)
    assert received.path == OLLAMA_CHAT
    got = assert_injected("openai_chat", wire.body, received.body, directive)
    assert got["messages"][0] == {"role": "system", "content": directive}

    assert isinstance(response, ollama.ChatResponse)
    assert response.message.role == "assistant"
    assert response.message.content == "\n".join(["echo: received 3 message(s)", f"[1] system: {directive}",
                                                  "[2] system: Client system.", "[3] user: hi"])


def test_chat_stream(stack, upstream, wire):
    directive = "Ollama chat streams."
    agent = agent_with(stack, directive)
    parts = list(ollama_client(stack, agent, wire).chat(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                        stream=True))

    assert_injected("openai_chat", wire.body, only_request(upstream).body, directive)
    assert parts[-1].done
    assert "".join(part.message.content for part in parts) == "\n".join(
        ["echo: received 2 message(s)", f"[1] system: {directive}", "[2] user: hi"])


RAW = {
    # no "stream": Ollama's default is to stream
    "generate_default_stream_spaced": (OLLAMA_GENERATE, b'{ "model" : "m", "prompt" : "caf\\u00e9" }'),
    "generate_system_null": (OLLAMA_GENERATE, b'{"model":"m","prompt":"p","system":null,"stream":false}'),
    "generate_harmless_defaults": (OLLAMA_GENERATE, b'{"model":"m","prompt":"p","suffix":"","template":"",'
                                                    b'"raw":false,"stream":false}'),
    "generate_options": (OLLAMA_GENERATE, b'{"model":"m","prompt":"p","options":{"temperature":0.1,'
                                          b'"num_ctx":8192},"keep_alive":"5m","stream":false}'),
    "chat_default_stream": (OLLAMA_CHAT, b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'),
}
RAW_FORMATS = {OLLAMA_GENERATE: "ollama_generate", OLLAMA_CHAT: "openai_chat"}


@pytest.mark.parametrize("path,body", RAW.values(), ids=RAW.keys())
def test_raw_ollama_bodies_are_spliced(stack, upstream, path, body):
    directive = "Raw Ollama."
    agent = agent_with(stack, directive)
    response = send(stack, path, body, agent=agent)
    assert response.status_code == 200, response.text
    assert_injected(RAW_FORMATS[path], body, only_request(upstream).body, directive)
    objects = [json.loads(line) for line in response.text.splitlines() if line.strip()]
    assert objects[-1]["done"] is True
    streamed = json.loads(body).get("stream") is not False
    assert (len(objects) > 1) == streamed
    assert response.headers["content-type"] == ("application/x-ndjson" if streamed else "application/json")
