"""The echo upstream (the one stand-in of the stack) speaks well-formed
OpenAI, Anthropic, Gemini, Bedrock and Ollama shapes, records what it got, and
logs no bodies."""

import json
import struct
import zlib

import pytest
import requests
from botocore.eventstream import EventStreamBuffer

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


# ---------------------------------------------------------------- the other providers' shapes

def test_legacy_completion_has_a_choice_per_prompt(echo):
    one = requests.post(echo.url + "/v1/completions", json={"model": "m", "prompt": "hi there"}, timeout=5).json()
    assert one["object"] == "text_completion"
    assert [c["text"] for c in one["choices"]] == ["echo: completion prompt: hi there"]
    assert one["usage"]["prompt_tokens"] == 2
    many = requests.post(echo.url + "/v1/completions", json={"prompt": ["a", "b c"]}, timeout=5).json()
    assert [(c["index"], c["text"]) for c in many["choices"]] == [
        (0, "echo: completion prompt: a"), (1, "echo: completion prompt: b c")]


def test_anthropic_count_tokens_counts_words(echo):
    body = {"model": "c", "system": [{"type": "text", "text": "one two"}],
            "messages": [{"role": "user", "content": "three four five"}]}
    assert requests.post(echo.url + "/v1/messages/count_tokens", json=body, timeout=5).json() == {"input_tokens": 5}


def test_vertex_anthropic_raw_predict_is_a_message(echo):
    path = "/v1/projects/p/locations/l/publishers/anthropic/models/claude@1:rawPredict"
    answer = requests.post(echo.url + path, json={"system": "S", "messages": []}, timeout=5).json()
    assert answer["type"] == "message" and "system: S" in answer["content"][0]["text"]
    events = sse_events(requests.post(echo.url + path.replace(":rawPredict", ":streamRawPredict"),
                                      json={"stream": True, "messages": []}, timeout=5))
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"


def test_message_batch_is_created_retrieved_and_answered(echo):
    body = {"requests": [{"custom_id": "a", "params": {"system": "S", "messages": [{"role": "user", "content": "x"}]}},
                         {"custom_id": "b", "params": {"messages": []}}]}
    created = requests.post(echo.url + "/v1/messages/batches", json=body, timeout=5).json()
    assert created["type"] == "message_batch" and created["processing_status"] == "in_progress"
    assert created["request_counts"]["processing"] == 2 and created["results_url"] is None

    ended = requests.get(f"{echo.url}/v1/messages/batches/{created['id']}", timeout=5).json()
    assert ended["processing_status"] == "ended" and ended["request_counts"]["succeeded"] == 2
    # on the Host the request named, so a client behind a gateway fetches it there
    assert ended["results_url"] == f"{echo.url}/v1/messages/batches/{created['id']}/results"
    lines = requests.get(ended["results_url"], timeout=5).text.splitlines()
    results = [json.loads(line) for line in lines]
    assert [r["custom_id"] for r in results] == ["a", "b"]
    assert results[0]["result"]["type"] == "succeeded"
    assert results[0]["result"]["message"]["content"][0]["text"] == \
        "echo: anthropic messages request\nsystem: S\n[1] user: x"

    # a batch not created here is echoed like any other request
    other = requests.get(echo.url + "/v1/messages/batches/msgbatch_nope", timeout=5)
    assert other.status_code == 200 and other.json()["echo"]["path"] == "/v1/messages/batches/msgbatch_nope"


GEMINI_BODY = {"systemInstruction": {"parts": [{"text": "Be kind."}]},
               "contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


@pytest.mark.parametrize("path", ["/v1beta/models/gemini-x:generateContent",
                                  "/v1/projects/p/locations/l/publishers/google/models/gemini-x:generateContent"])
def test_gemini_generate_content(echo, path):
    answer = requests.post(echo.url + path, json=GEMINI_BODY, timeout=5).json()
    candidate = answer["candidates"][0]
    assert candidate["finishReason"] == "STOP" and candidate["content"]["role"] == "model"
    assert candidate["content"]["parts"][0]["text"] == "echo: gemini request\nsystem: Be kind.\n[1] user: hi"
    assert answer["modelVersion"] == "gemini-x"
    assert answer["usageMetadata"]["promptTokenCount"] == 3


def test_gemini_stream_is_sse_with_alt_sse_else_a_json_array(echo):
    path = echo.url + "/v1beta/models/gemini-x:streamGenerateContent"
    response = requests.post(path + "?alt=sse", json=GEMINI_BODY, timeout=5)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("\r\n\r\n")
    chunks = [json.loads(block[len("data: "):]) for block in response.text.split("\r\n\r\n") if block]
    assert len(chunks) > 1
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks).endswith("[1] user: hi")
    assert [c["candidates"][0].get("finishReason") for c in chunks][-1] == "STOP"
    assert "usageMetadata" in chunks[-1] and "usageMetadata" not in chunks[0]
    array = requests.post(path, json=GEMINI_BODY, timeout=5).json()
    assert isinstance(array, list) and len(array) == len(chunks)


def test_gemini_count_tokens(echo):
    path = echo.url + "/v1beta/models/gemini-x:countTokens"
    assert requests.post(path, json=GEMINI_BODY, timeout=5).json() == {"totalTokens": 3}
    inner = {"generateContentRequest": {"model": "m", **GEMINI_BODY}}
    assert requests.post(path, json=inner, timeout=5).json() == {"totalTokens": 3}


def test_bedrock_converse(echo):
    body = {"system": [{"text": "S"}], "messages": [{"role": "user", "content": [{"text": "hi there"}]}]}
    answer = requests.post(echo.url + "/model/m%3A0/converse", json=body, timeout=5).json()
    assert answer["stopReason"] == "end_turn"
    assert answer["output"]["message"]["content"] == [
        {"text": "echo: bedrock converse request\nsystem: S\n[1] user: hi there"}]
    assert answer["usage"]["inputTokens"] == 3


def decode_event_stream(data):
    """An independent reading of AWS event-stream messages, CRCs checked."""
    messages = []
    while data:
        total, headers_length, prelude_crc = struct.unpack(">III", data[:12])
        assert zlib.crc32(data[:8]) == prelude_crc
        message, data = data[:total], data[total:]
        assert zlib.crc32(message[:-4]) == struct.unpack(">I", message[-4:])[0]
        raw, headers = message[12:12 + headers_length], {}
        while raw:
            name_length = raw[0]
            name = raw[1:1 + name_length].decode()
            assert raw[1 + name_length] == 7  # string
            (value_length,) = struct.unpack(">H", raw[2 + name_length:4 + name_length])
            headers[name] = raw[4 + name_length:4 + name_length + value_length].decode()
            raw = raw[4 + name_length + value_length:]
        messages.append((headers, json.loads(message[12 + headers_length:-4])))
    return messages


def test_bedrock_converse_stream_is_an_aws_event_stream(echo):
    body = {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}
    response = requests.post(echo.url + "/model/m/converse-stream", json=body, timeout=5)
    assert response.headers["content-type"] == "application/vnd.amazon.eventstream"
    messages = decode_event_stream(response.content)
    assert all(h[":message-type"] == "event" and h[":content-type"] == "application/json" for h, _ in messages)
    names = [h[":event-type"] for h, _ in messages]
    assert names[0] == "messageStart" and names[-2:] == ["messageStop", "metadata"]
    text = "".join(p["delta"]["text"] for h, p in messages if h[":event-type"] == "contentBlockDelta")
    assert text == "echo: bedrock converse request\n[1] user: hi"

    parser = EventStreamBuffer()  # botocore's own parser agrees, CRCs included
    parser.add_data(response.content)
    assert [m.headers[":event-type"] for m in parser] == names


@pytest.mark.parametrize("path,body,text", [
    ("/api/generate", {"model": "m", "prompt": "hi", "system": "S"},
     "echo: ollama generate request\nsystem: S\nprompt: hi"),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
     "echo: received 1 message(s)\n[1] user: hi"),
], ids=["generate", "chat"])
def test_ollama_streams_ndjson_unless_told_not_to(echo, path, body, text):
    def piece(obj):
        return obj["message"]["content"] if "message" in obj else obj["response"]

    streamed = requests.post(echo.url + path, json=body, timeout=5)
    assert streamed.headers["content-type"] == "application/x-ndjson"
    objects = [json.loads(line) for line in streamed.text.splitlines()]
    assert [o["done"] for o in objects] == [False] * (len(objects) - 1) + [True]
    assert "".join(map(piece, objects)) == text
    whole = requests.post(echo.url + path, json={**body, "stream": False}, timeout=5).json()
    assert whole["done"] is True and whole["done_reason"] == "stop" and piece(whole) == text
