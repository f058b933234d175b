"""inject.max_body_bytes (1 MiB in envoy/local.yaml): larger bodies get 413
from their content-length, before Envoy reads them; bodies up to the limit
are buffered and injected."""

import json

from helpers import CHAT, agent_with, assert_chat_injected, error_code, send
from stack.rawhttp import exchange, request_bytes

LIMIT = 1048576


def upstream_requests(stack):
    return stack.envoy.stats(r"cluster\.llm_upstream\.upstream_rq_total$").get("cluster.llm_upstream.upstream_rq_total", 0)


def test_content_length_over_the_limit_is_refused_before_the_body(stack, upstream):
    agent = agent_with(stack, "Big bodies are refused.")
    forwarded = upstream_requests(stack)
    # announce 2 MiB but send only a few bytes: the answer must come anyway
    request = request_bytes(CHAT, b'{"model":', agent=agent, headers={"content-length": 2 * LIMIT})
    status, headers, body = exchange(stack.envoy.data_port, request)
    assert status == 413
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "body_too_large"
    assert upstream_requests(stack) == forwarded
    assert upstream.received() == []
    assert stack.envoy.counter("rejected.body_too_large") >= 1


def test_chunked_body_over_the_limit_is_refused(stack, upstream):
    agent = agent_with(stack, "Big chunked bodies are refused.")
    forwarded = upstream_requests(stack)
    payload = b'{"model":"m","messages":[{"role":"user","content":"' + b"y" * (LIMIT + 10) + b'"}]}'
    chunked = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n"
                       for part in (payload[i:i + 65536] for i in range(0, len(payload), 65536))) + b"0\r\n\r\n"
    request = request_bytes(CHAT, chunked, agent=agent, headers={"transfer-encoding": "chunked"})
    status, _, body = exchange(stack.envoy.data_port, request)
    assert status == 413
    assert b"body_too_large" in body
    assert upstream_requests(stack) == forwarded


def test_body_just_under_the_limit_is_injected(stack, upstream):
    agent = agent_with(stack, "Large but allowed.")
    prefix = b'{"model":"m","messages":[{"role":"user","content":"'
    suffix = b'"}]}'
    body = prefix + b"z" * (LIMIT - len(prefix) - len(suffix)) + suffix
    assert len(body) == LIMIT
    response = send(stack, CHAT, body, agent=agent)
    assert response.status_code == 200
    assert_chat_injected(body, upstream.last().body, "Large but allowed.")


def test_body_too_large_reply_has_no_directive(stack, upstream):
    agent = agent_with(stack, "SECRET-IN-413")
    response = send(stack, CHAT, b"x" * (LIMIT + 1), agent=agent)
    assert response.status_code == 413
    assert error_code(response) == "body_too_large"
    assert "SECRET-IN-413" not in response.text
