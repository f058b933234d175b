"""Paths (SPEC §5): no spelling of a generation endpoint reaches the upstream
without the directive, through real Envoy.

Each request is sent as exact HTTP/1.1 bytes (an HTTP client library would
normalise some of these paths itself). Whatever Envoy does first (its
configuration may normalise or reject a path before the filter sees it), the
outcome is one of two: refused, and the upstream received nothing; or
forwarded, and the upstream received the body with the directive. Endpoints the
filter does not know are refused (404 `unsupported_path`) unless
`inject.other_paths` is `"pass"`; `/v1/models` (GET) and `/v1/embeddings` pass
untouched.
"""

import json

import pytest

from helpers import agent_with, assert_chat_injected, chat_body, new_agent
from stack.rawhttp import exchange, request_bytes

DIRECTIVE = "Every spelling of the path gets this."

# Each of these reached the upstream without the directive when the filter matched
# a case-sensitive suffix of the raw :path.
ALIASES = [
    "/v1/chat/completions/",
    "/v1//chat/completions",
    "/v1/chat%2Fcompletions",
    "/v1/chat%2fcompletions",
    "/v1/chat/completion%73",
    "/V1/CHAT/COMPLETIONS",
    "/v1/chat/completions;x=1",
    "/v1;a/chat;b/completions",
    "/v1/chat/completions//?stream=false",
    "/v1/Chat/Completions%2F",
    "/v1/chat\\completions",
    "/v1/chat%5Ccompletions",
    # Spellings the filter refuses: a second decoding, a dot segment, a control byte.
    "/v1/chat/completion%2573",
    "/v1/chat/completion%zz",
    "/v1/chat/completions%00",
    "/v1/models/../chat/completions",
    "/v1/models/%2e%2e/chat/completions",
    "/v1/./chat/completions",
]

# Generation endpoints of formats the filter does not inject into yet.
UNKNOWN = [
    # Generation endpoints of formats the filter does not splice (yet): a body there
    # must not reach the model without the directive.
    "/v1/images/generations",
    "/v1/audio/speech",
    "/model/anthropic.claude-3-haiku-20240307-v1:0/invoke",
    "/v1beta/models/gemini-2.0-flash:batchGenerateContent",
    "/v1/threads/thread_abc/runs",
    "/v1/threads/thread_abc/messages",
]


def error_code_of(answer):
    """`error.code` of a raw local reply."""
    return json.loads(answer.body)["error"]["code"]


def post(stack, path, body, agent):
    """POST `body` to `path` as exact bytes; returns the rawhttp Response."""
    return exchange(stack.envoy.data_port, request_bytes(path, body, agent=agent), timeout=30)


@pytest.fixture(scope="module")
def agent(stack):
    return agent_with(stack, DIRECTIVE)


@pytest.mark.parametrize("path", ALIASES)
def test_an_alias_is_injected_or_refused(stack, upstream, agent, path):
    body = chat_body()
    answer = post(stack, path, body, agent)
    received = upstream.received()
    if 200 <= answer.status < 300:
        assert len(received) == 1, received
        assert_chat_injected(body, received[0].body, DIRECTIVE)
    else:
        assert 400 <= answer.status < 500, (answer.status, answer.body[:200])
        assert received == [], f"{path} was refused ({answer.status}) but reached the upstream"
        assert path.encode() not in answer.body, "a refusal never repeats the path"


@pytest.mark.parametrize("path", ["/v1/chat/completion%73", "/V1/CHAT/COMPLETIONS", "/v1/chat/completions;x=1"])
def test_aliases_envoy_forwards_as_they_are_get_the_directive(stack, upstream, agent, path):
    """The spellings ASGI and Java servers route to chat completions, which Envoy
    does not rewrite away, are injected rather than refused."""
    body = chat_body()
    answer = post(stack, path, body, agent)
    assert answer.status == 200, (answer.status, answer.body[:200])
    assert_chat_injected(body, upstream.last().body, DIRECTIVE)


@pytest.mark.parametrize("path", ["/v1/chat/completion%2573", "/v1/chat/completions%00"])
def test_a_path_that_cannot_be_read_for_certain_is_refused(stack, upstream, agent, path):
    answer = post(stack, path, chat_body(), agent)
    assert answer.status in (400, 404), answer
    if answer.status == 404:
        assert error_code_of(answer) == "unsupported_path"
    assert upstream.received() == []


@pytest.mark.parametrize("path", UNKNOWN)
def test_an_unknown_endpoint_is_refused_by_default(stack, upstream, agent, path):
    before = stack.envoy.counter("rejected.unsupported_path")
    answer = post(stack, path, chat_body(), agent)
    assert answer.status == 404, (answer.status, answer.body[:200])
    assert error_code_of(answer) == "unsupported_path"
    assert path.encode() not in answer.body
    assert upstream.received() == []
    assert stack.envoy.counter("rejected.unsupported_path") == before + 1


def test_models_get_and_embeddings_pass_untouched(stack, upstream, agent):
    answer = exchange(stack.envoy.data_port, request_bytes("/v1/models", agent=agent, method="GET"), timeout=30)
    assert answer.status == 200, answer
    [models] = upstream.received()
    assert (models.method, models.path, models.body) == ("GET", "/v1/models", b"")

    upstream.clear()
    body = b'{"model":"text-embedding-3-small","input":["hello", "world"]}'
    answer = post(stack, "/v1/embeddings", body, agent)
    assert answer.status == 200, answer
    [embeddings] = upstream.received()
    assert (embeddings.path, embeddings.body) == ("/v1/embeddings", body)


def test_a_bodiless_request_passes_on_any_path(stack, upstream, agent):
    for path in ["/v1/messages/batches/msgbatch_1", "/v1/threads/thread_abc/messages"]:
        upstream.clear()
        answer = exchange(stack.envoy.data_port, request_bytes(path, agent=agent, method="GET"), timeout=30)
        assert answer.status == 200, (path, answer)
        assert [r.path for r in upstream.received()] == [path]


def test_the_agent_is_checked_before_the_path(stack, upstream):
    answer = post(stack, "/v1/messages/batches", chat_body(), "not-a-uuid")
    assert answer.status == 400
    assert error_code_of(answer) == "invalid_agent_id"
    assert upstream.received() == []


def test_other_paths_pass_forwards_unknown_endpoints_untouched(stack, upstream):
    stack.restart_envoy(filter_config={"inject": {"other_paths": "pass"}})
    try:
        agent = agent_with(stack, DIRECTIVE)
        for path in UNKNOWN:
            upstream.clear()
            body = chat_body()
            answer = post(stack, path, body, agent)
            assert answer.status == 200, (path, answer.status, answer.body[:200])
            [received] = upstream.received()
            assert received.body == body, path
        # A known path is still injected, an unclear one still refused.
        upstream.clear()
        body = chat_body()
        assert post(stack, "/v1/chat/completion%73", body, agent).status == 200
        assert_chat_injected(body, upstream.last().body, DIRECTIVE)
        upstream.clear()
        assert post(stack, "/v1/chat/completion%2573", body, agent).status in (400, 404)
        assert upstream.received() == []
    finally:
        stack.restart_envoy(filter_config={})


def test_an_agent_without_a_directive_is_still_held_to_the_path_policy(stack, upstream):
    """The policy is about the endpoint, not the directive: the same answer whether
    or not the agent has one, so the answer tells a client nothing about it."""
    answer = post(stack, "/v1/images/generations", b'{"model":"m","prompt":"hi"}', new_agent())
    assert answer.status == 404
    assert error_code_of(answer) == "unsupported_path"
    assert upstream.received() == []
