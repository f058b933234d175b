"""The echo upstream (the one stand-in of the stack) speaks well-formed
OpenAI and Anthropic shapes, records what it got, and logs no bodies."""

import json

import pytest
import requests

from stack import EchoUpstream, free_port


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    with EchoUpstream(tmp_path_factory.mktemp("echo"), free_port()) as server:
        yield server


def sse_events(response):
    """[(event name or None, data text)] of an SSE body."""
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data.append(line[len("data: "):])
        events.append((name, "\n".join(data)))
    return events


def test_chat_completion_lists_messages_in_order(echo):
    body = {"model": "m", "messages": [{"role": "system", "content": "SYS"},
                                       {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    answer = requests.post(echo.url + "/v1/chat/completions", json=body, timeout=5).json()
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "m"
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    lines = choice["message"]["content"].splitlines()
    assert lines[1:] == ["[1] system: SYS", "[2] user: hi"]
    assert set(answer["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_chat_completion_stream(echo):
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]}
    response = requests.post(echo.url + "/openai/v1/chat/completions", json=body, timeout=5)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text.endswith("[1] user: hi")
    assert chunks[-1]["usage"]["total_tokens"] > 0
    assert [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] == "stop"]


def test_responses_echo_instructions_and_input(echo):
    body = {"model": "m", "instructions": "BE BRIEF", "input": "hello"}
    answer = requests.post(echo.url + "/v1/responses", json=body, timeout=5).json()
    assert answer["object"] == "response" and answer["status"] == "completed"
    assert answer["instructions"] == "BE BRIEF"
    text = answer["output"][0]["content"][0]["text"]
    assert "instructions: BE BRIEF" in text and "[1] user: hello" in text


def test_responses_stream(echo):
    body = {"model": "m", "input": [{"role": "user", "content": "x"}], "stream": True}
    events = sse_events(requests.post(echo.url + "/v1/responses", json=body, timeout=5))
    assert events[0][0] == "response.created"
    assert events[-1][0] == "response.completed"
    assert json.loads(events[-1][1])["response"]["status"] == "completed"


@pytest.mark.parametrize("system", ["SYS TEXT", [{"type": "text", "text": "SYS TEXT"}]])
def test_anthropic_message_echoes_system(echo, system):
    body = {"model": "claude", "max_tokens": 10, "system": system, "messages": [{"role": "user", "content": "yo"}]}
    answer = requests.post(echo.url + "/v1/messages", json=body, timeout=5).json()
    assert answer["type"] == "message" and answer["role"] == "assistant"
    assert answer["stop_reason"] == "end_turn"
    text = answer["content"][0]["text"]
    assert "system: SYS TEXT" in text and "[1] user: yo" in text


def test_anthropic_stream(echo):
    body = {"model": "claude", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "yo"}]}
    events = sse_events(requests.post(echo.url + "/v1/messages", json=body, timeout=5))
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert "content_block_delta" in names


def test_unknown_path_is_echoed(echo):
    answer = requests.put(echo.url + "/whatever?x=1", data=b"abc", timeout=5)
    assert answer.status_code == 200
    assert answer.json()["echo"]["path"] == "/whatever?x=1"


def test_records_raw_bytes_and_clears(echo):
    echo.clear()
    raw = b'{"model":"m",  "messages":[{"role":"user","content":"\\u00e9"}]}'
    requests.post(echo.url + "/v1/chat/completions", data=raw, headers={"x-agent-id": "a"}, timeout=5)
    requests.post(echo.url + "/bin", data=b"\xff\xfe", timeout=5)
    first, second = echo.received()
    assert first.body == raw and first.text == raw.decode()
    assert first.header("X-Agent-Id") == "a"
    assert second.body == b"\xff\xfe" and second.text is None
    echo.clear()
    assert echo.received() == []


def test_fails_the_next_requests_when_asked(echo):
    """fail_next: the next requests are recorded, then answered with the status
    and a retry-after an SDK honours; clear() disarms what is left."""
    echo.clear()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    echo.fail_next(429, count=2)
    answers = [requests.post(echo.url + "/v1/chat/completions", json=body, timeout=5) for _ in range(3)]
    assert [a.status_code for a in answers] == [429, 429, 200]
    assert answers[0].json()["error"]["code"] == "echo_fault"
    assert answers[0].headers["retry-after-ms"] == "10"
    assert len(echo.received()) == 3
    echo.fail_next(503)
    echo.clear()
    assert requests.post(echo.url + "/v1/chat/completions", json=body, timeout=5).status_code == 200


def test_keeps_the_last_hundred(echo):
    echo.clear()
    session = requests.Session()
    for index in range(105):
        session.post(echo.url + f"/n/{index}", data=b"", timeout=5)
    received = echo.received()
    assert len(received) == 100
    assert received[0].path == "/n/5" and received[-1].path == "/n/104"


def test_log_has_no_bodies(echo):
    secret = "ECHO-LOG-CANARY-8d1f"
    requests.post(echo.url + "/v1/chat/completions",
                  json={"model": "m", "messages": [{"role": "system", "content": secret}]}, timeout=5)
    log = echo.log_path.read_text()
    assert "POST /v1/chat/completions 200" in log
    assert secret not in log
