"""OpenAI's official SDK through the gateway, beyond chat and responses
(test_sdks.py): legacy completions (`prompt` a string or a list of strings, each
gets the directive) and the `AzureOpenAI` client (deployment paths
`/openai/deployments/{d}/…?api-version=…`, matched by the default patterns).

Each test checks the bytes the echo upstream received are exactly the bytes the
SDK put on the wire (an httpx request hook) plus the insertions of SPEC §5
(helpers.assert_injected, an independent oracle), and that the SDK parsed the
echo's answer, which shows the directive where the model read it.
"""

import openai
import pytest

from helpers import (
    AZURE_CHAT,
    COMPLETIONS,
    TRICKY_DIRECTIVE,
    Wire,
    agent_with,
    assert_injected,
    only_request,
    send,
)
from stack.contract import AGENT_HEADER

API_KEY = "sk-test-not-a-real-key"
API_VERSION = "2024-10-21"


def http_client(wire):
    return openai.DefaultHttpxClient(trust_env=False, event_hooks={"request": [wire.hook]})


def openai_client(stack, agent, wire):
    return openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key=API_KEY, max_retries=0,
                         default_headers={AGENT_HEADER: agent}, http_client=http_client(wire))


def azure_client(stack, agent, wire):
    return openai.AzureOpenAI(azure_endpoint=stack.gateway_url, api_version=API_VERSION, api_key=API_KEY,
                              max_retries=0, default_headers={AGENT_HEADER: agent}, http_client=http_client(wire))


@pytest.fixture()
def wire():
    return Wire()


def test_completions_prompt_string(stack, upstream, wire):
    agent = agent_with(stack, TRICKY_DIRECTIVE)
    completion = openai_client(stack, agent, wire).completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Once upon a time", max_tokens=16, temperature=0)

    received = only_request(upstream)
    assert received.path == COMPLETIONS
    got = assert_injected("openai_completions", wire.body, received.body, TRICKY_DIRECTIVE)
    assert got["prompt"] == TRICKY_DIRECTIVE + "\n\nOnce upon a time"
    assert received.header("authorization") == f"Bearer {API_KEY}"
    assert received.header(AGENT_HEADER) is None

    assert isinstance(completion, openai.types.Completion)
    assert [choice.text for choice in completion.choices] == [
        f"echo: completion prompt: {TRICKY_DIRECTIVE}\n\nOnce upon a time"]
    assert completion.choices[0].finish_reason == "stop"


def test_completions_prompt_list_of_strings_each_directed(stack, upstream, wire):
    directive = "Each prompt is directed."
    agent = agent_with(stack, directive)
    prompts = ["first", "", "third \"quoted\" é"]
    completion = openai_client(stack, agent, wire).completions.create(model="m", prompt=prompts)

    got = assert_injected("openai_completions", wire.body, only_request(upstream).body, directive)
    assert got["prompt"] == [directive + "\n\n" + prompt for prompt in prompts]
    assert [choice.text for choice in completion.choices] == [
        f"echo: completion prompt: {directive}\n\n{prompt}" for prompt in prompts]
    assert [choice.index for choice in completion.choices] == [0, 1, 2]


def test_azure_chat_completion_on_a_deployment_path(stack, upstream, wire):
    directive = "Azure directive. " + TRICKY_DIRECTIVE
    agent = agent_with(stack, directive)
    completion = azure_client(stack, agent, wire).chat.completions.create(
        model="my-gpt", messages=[{"role": "user", "content": "hello"}])

    received = only_request(upstream)
    assert received.path == AZURE_CHAT
    got = assert_injected("openai_chat", wire.body, received.body, directive)
    assert got["messages"][0] == {"role": "system", "content": directive}
    assert received.header("api-key") == API_KEY
    assert received.header(AGENT_HEADER) is None

    assert isinstance(completion, openai.types.chat.ChatCompletion)
    assert completion.choices[0].message.content == "\n".join(
        ["echo: received 2 message(s)", f"[1] system: {directive}", "[2] user: hello"])


def test_azure_chat_completion_stream(stack, upstream, wire):
    directive = "Azure streams."
    agent = agent_with(stack, directive)
    stream = azure_client(stack, agent, wire).chat.completions.create(
        model="my-gpt", stream=True, messages=[{"role": "user", "content": "hi"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    received = only_request(upstream)
    assert received.path == AZURE_CHAT
    assert_injected("openai_chat", wire.body, received.body, directive)
    assert text == "\n".join(["echo: received 2 message(s)", f"[1] system: {directive}", "[2] user: hi"])


def test_azure_legacy_completions_on_a_deployment_path(stack, upstream, wire):
    directive = "Azure completions."
    agent = agent_with(stack, directive)
    completion = azure_client(stack, agent, wire).completions.create(model="my-instruct", prompt="hi")

    received = only_request(upstream)
    assert received.path == f"/openai/deployments/my-instruct/completions?api-version={API_VERSION}"
    assert_injected("openai_completions", wire.body, received.body, directive)
    assert completion.choices[0].text == f"echo: completion prompt: {directive}\n\nhi"


RAW = {
    "prompt_string_spaced": b'{ "prompt" : "caf\\u00e9 \xc3\xa9" , "model":"m", "n":1e0 }',
    "prompt_one_element": b'{"prompt":[ "only" ]}',
    "prompt_embeds_null": b'{"prompt":"p","prompt_embeds":null}',
}


@pytest.mark.parametrize("body", RAW.values(), ids=RAW.keys())
def test_raw_completions_bodies_are_spliced(stack, upstream, body):
    directive = "Raw completions."
    agent = agent_with(stack, directive)
    response = send(stack, COMPLETIONS, body, agent=agent)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "text_completion"
    assert_injected("openai_completions", body, only_request(upstream).body, directive)
