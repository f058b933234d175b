"""Google's official Gen AI SDK (`google-genai`) through the gateway: the Gemini
API's generateContent, streamGenerateContent (SSE) and countTokens, the same
SDK on Vertex AI paths (`vertexai=True`), and raw Vertex and Gemini bodies.

The client is pointed at the gateway (`http_options.base_url`, a dummy API key or
a dummy OAuth token, proxy variables ignored, no retries: the SDK's default) and
names its agent with a default header. Every test checks:

- the bytes the echo upstream received are exactly the bytes the SDK put on the
  wire (captured by an httpx request hook) plus the `gemini` insertions
  (helpers.assert_injected: an independent oracle of SPEC §5);
- the SDK parsed the echo's Gemini answer (JSON, or SSE for
  `:streamGenerateContent?alt=sse`) into its typed objects, and the echo model,
  which lists what it received, shows the directive first.
"""

import google.oauth2.credentials
import pytest
from google import genai
from google.genai import types

from helpers import (
    GEMINI_PATHS,
    TRICKY_DIRECTIVE,
    VERTEX_GEMINI,
    VERTEX_GEMINI_COUNT,
    Wire,
    agent_with,
    assert_injected,
    only_request,
    send,
)
from stack.contract import AGENT_HEADER

API_KEY = "gemini-test-not-a-real-key"
MODEL = "gemini-2.5-flash"


def gemini_client(stack, agent, wire, vertex=False):
    options = types.HttpOptions(
        base_url=stack.gateway_url,
        api_version="v1" if vertex else "v1beta",
        headers={AGENT_HEADER: agent},
        client_args={"trust_env": False, "event_hooks": {"request": [wire.hook]}},
    )
    if vertex:
        credentials = google.oauth2.credentials.Credentials(token="vertex-test-not-a-real-token")
        return genai.Client(vertexai=True, project="p", location="us-central1", credentials=credentials,
                            http_options=options)
    return genai.Client(api_key=API_KEY, http_options=options)


@pytest.fixture()
def wire():
    return Wire()


def words(*texts):
    """The echo upstream's token count: words."""
    return sum(len(text.split()) for text in texts)


def assert_agent_header_stayed_here(received):
    assert received.header(AGENT_HEADER) is None, "the agent header reached the provider"


def test_generate_content_gets_a_system_instruction(stack, upstream, wire):
    agent = agent_with(stack, TRICKY_DIRECTIVE)
    client = gemini_client(stack, agent, wire)  # kept: a collected Client closes its HTTP client
    response = client.models.generate_content(model=MODEL, contents="hello")

    received = only_request(upstream)
    assert received.path == GEMINI_PATHS["generate"]
    assert b"systemInstruction" not in wire.body
    got = assert_injected("gemini", wire.body, received.body, TRICKY_DIRECTIVE)
    assert got["systemInstruction"] == {"parts": [{"text": TRICKY_DIRECTIVE}]}
    assert received.header("x-goog-api-key") == API_KEY
    assert_agent_header_stayed_here(received)

    assert isinstance(response, types.GenerateContentResponse)
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    assert response.text == f"echo: gemini request\nsystem: {TRICKY_DIRECTIVE}\n[1] user: hello"
    assert response.usage_metadata.prompt_token_count == words(TRICKY_DIRECTIVE, "hello")


def test_generate_content_system_instruction_gets_a_first_part(stack, upstream, wire):
    directive = "Policy: " + TRICKY_DIRECTIVE
    agent = agent_with(stack, directive)
    config = types.GenerateContentConfig(system_instruction="Answer in French.", temperature=0.25,
                                         max_output_tokens=64)
    client = gemini_client(stack, agent, wire)
    response = client.models.generate_content(model=MODEL, contents=["first", "second"], config=config)

    received = only_request(upstream)
    got = assert_injected("gemini", wire.body, received.body, directive)
    # the SDK writes {"parts": [...], "role": "user"}; the directive is the new first part
    assert got["systemInstruction"]["parts"] == [{"text": directive}, {"text": "Answer in French."}]
    assert got["generationConfig"] == {"temperature": 0.25, "maxOutputTokens": 64}
    assert response.text == "\n".join(["echo: gemini request", f"system: {directive}\nAnswer in French.",
                                       "[1] user: first\nsecond"])


def test_generate_content_stream_over_sse(stack, upstream, wire):
    directive = "Stream it, Gemini style."
    agent = agent_with(stack, directive)
    client = gemini_client(stack, agent, wire)
    chunks = list(client.models.generate_content_stream(model=MODEL, contents="hi",
                                                        config={"system_instruction": "Be kind."}))

    received = only_request(upstream)
    assert received.path == GEMINI_PATHS["stream"]
    got = assert_injected("gemini", wire.body, received.body, directive)
    assert got["systemInstruction"]["parts"][0] == {"text": directive}

    assert len(chunks) > 1, "the echo streamed several pieces"
    assert all(isinstance(chunk, types.GenerateContentResponse) for chunk in chunks)
    assert "".join(chunk.text for chunk in chunks) == \
        f"echo: gemini request\nsystem: {directive}\nBe kind.\n[1] user: hi"
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP
    assert chunks[-1].usage_metadata.prompt_token_count == words(directive, "Be kind.", "hi")


def test_count_tokens_counts_the_directive(stack, upstream, wire):
    """The Gemini API's countTokens has no system instruction outside a
    generateContentRequest: the directive is counted as a leading user turn, so the
    count includes the tokens generation will be sent."""
    directive = "Count me in."
    agent = agent_with(stack, directive)
    client = gemini_client(stack, agent, wire)
    counted = client.models.count_tokens(model=MODEL, contents="how many tokens")

    received = only_request(upstream)
    assert received.path == GEMINI_PATHS["count"]
    got = assert_injected("gemini_count_tokens", wire.body, received.body, directive)
    assert got["contents"][0] == {"role": "user", "parts": [{"text": directive}]}
    assert got["contents"][1:] == [{"parts": [{"text": "how many tokens"}], "role": "user"}]

    assert isinstance(counted, types.CountTokensResponse)
    assert counted.total_tokens == words(directive, "how many tokens")


# ---------------------------------------------------------------- Vertex AI

def test_vertex_generate_content_through_the_sdk(stack, upstream, wire):
    directive = "Vertex directive."
    agent = agent_with(stack, directive)
    client = gemini_client(stack, agent, wire, vertex=True)
    response = client.models.generate_content(model="gemini-2.5-pro", contents="hi",
                                              config={"system_instruction": "Be kind."})

    received = only_request(upstream)
    assert received.path == VERTEX_GEMINI
    got = assert_injected("gemini", wire.body, received.body, directive)
    assert got["systemInstruction"]["parts"] == [{"text": directive}, {"text": "Be kind."}]
    assert received.header("authorization") == "Bearer vertex-test-not-a-real-token"
    assert response.text == f"echo: gemini request\nsystem: {directive}\nBe kind.\n[1] user: hi"


def test_vertex_count_tokens_takes_the_system_instruction(stack, upstream, wire):
    """Vertex's countTokens takes a systemInstruction (format `gemini` on its
    publisher path), the Gemini API's does not (`gemini_count_tokens`)."""
    directive = "Vertex counts this too."
    agent = agent_with(stack, directive)
    client = gemini_client(stack, agent, wire, vertex=True)
    counted = client.models.count_tokens(model="gemini-2.5-pro", contents="hi there",
                                         config={"system_instruction": "Short."})

    received = only_request(upstream)
    assert received.path == VERTEX_GEMINI_COUNT
    got = assert_injected("gemini", wire.body, received.body, directive)
    assert got["systemInstruction"]["parts"][0] == {"text": directive}
    assert got["contents"] == [{"parts": [{"text": "hi there"}], "role": "user"}]
    assert counted.total_tokens == words(directive, "Short.", "hi there")


# ---------------------------------------------------------------- raw bodies

RAW = {
    # odd spacing, the snake_case spelling Google's parser also accepts
    "vertex_snake_case": (VERTEX_GEMINI,
                          b'{ "contents" : [ {"role":"user","parts":[{"text":"caf\\u00e9 \xc3\xa9"}]} ],\n'
                          b'  "system_instruction" : { "parts" : [ {"text":"S"} ] }, "x": 1e400 }'),
    "system_instruction_without_parts": (GEMINI_PATHS["generate"],
                                         b'{"systemInstruction":{"role":"user"},"contents":[]}'),
    "system_instruction_empty_parts": (GEMINI_PATHS["generate"],
                                       b'{"systemInstruction":{"parts":[ ]},"contents":[]}'),
    "system_instruction_null": (GEMINI_PATHS["generate"], b'{"systemInstruction":null,"contents":[]}'),
    "parts_null": (GEMINI_PATHS["generate"], b'{"systemInstruction":{"parts":null},"contents":[]}'),
    "empty_object": (VERTEX_GEMINI.replace(":generateContent", ":streamGenerateContent"), b"{}"),
    "tuned_model": ("/v1beta/tunedModels/my-model-123:generateContent",
                    b'{"contents":[{"parts":[{"text":"hi"}]}]}'),
}


@pytest.mark.parametrize("path,body", RAW.values(), ids=RAW.keys())
def test_raw_gemini_bodies_are_spliced(stack, upstream, path, body):
    directive = "Raw Gemini."
    agent = agent_with(stack, directive)
    response = send(stack, path, body, agent=agent)
    assert response.status_code == 200, response.text
    received = only_request(upstream)
    assert received.path == path
    got = assert_injected("gemini", body, received.body, directive)
    system = got.get("systemInstruction", got.get("system_instruction"))
    assert system["parts"][0] == {"text": directive}


COUNT_RAW = {
    "generate_content_request": b'{"generateContentRequest":{"model":"models/gemini-2.5-flash",'
                                b'"contents":[{"parts":[{"text":"hi"}]}],'
                                b'"systemInstruction":{"parts":[{"text":"S"}]}}}',
    "generate_content_request_snake": b'{"generate_content_request":{"model":"m","contents":[]}}',
    "top_level_system_instruction": b'{"contents":[],"systemInstruction":{"parts":[{"text":"S"}]}}',
    "contents_only": b'{"contents":[ ]}',
}


@pytest.mark.parametrize("body", COUNT_RAW.values(), ids=COUNT_RAW.keys())
def test_raw_gemini_count_tokens_bodies_are_spliced(stack, upstream, body):
    directive = "Raw count."
    agent = agent_with(stack, directive)
    response = send(stack, GEMINI_PATHS["count"], body, agent=agent)
    assert response.status_code == 200, response.text
    assert "totalTokens" in response.json()
    assert_injected("gemini_count_tokens", body, only_request(upstream).body, directive)
