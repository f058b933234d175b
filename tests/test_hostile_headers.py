"""Header values that are not UTF-8 (SPEC §6: a request the filter cannot handle
with certainty is refused, never forwarded without its directive).

HTTP lets a client put any byte but NUL, CR and LF in a header value. The
proxy-wasm SDK's string accessors panic on such a value, and a panic takes the
worker's filter down for every request on it, so the filter reads header values
as bytes: an unrelated odd header changes nothing, an odd agent header is no
UUID (400), an odd path is no route (404 with a body)."""

import json

from helpers import CHAT, agent_with, assert_chat_injected, chat_body
from stack.rawhttp import exchange, request_bytes

DIRECTIVE = "Odd header bytes change nothing."


def post(stack, path, agent, headers):
    """Raw HTTP/1.1 POST with header values written byte for byte (latin-1)."""
    body = chat_body()
    status, _, answer = exchange(stack.envoy.data_port, request_bytes(path, body, agent=agent, headers=headers))
    return status, answer, body


def test_an_unrelated_header_that_is_not_utf8_changes_nothing(stack, upstream):
    agent = agent_with(stack, DIRECTIVE)
    for attempt in range(3):  # and the worker keeps serving: the VM did not trap
        status, answer, body = post(stack, CHAT, agent, {"x-junk": "caf\xe9 \xff\xfe"})
        assert status == 200, answer
        assert_chat_injected(body, upstream.last().body, DIRECTIVE)


def test_an_agent_header_that_is_not_utf8_is_refused(stack, upstream):
    body = chat_body()
    raw = request_bytes(CHAT, body, headers={"x-agent-id": "6f1c1a3e-5b7d-4c2a-9e0f-123456789ab\xe9"})
    status, _, answer = exchange(stack.envoy.data_port, raw)
    assert status == 400
    assert json.loads(answer)["error"]["code"] == "invalid_agent_id"
    assert upstream.received() == []
