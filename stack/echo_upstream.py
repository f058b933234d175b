"""Echo upstream: a stand-in LLM API that answers with what it received.

The only stand-in of the stack: it plays the model behind Envoy so a person
(`make run`) or a test can see the directive that the filter injected.

- POST .../chat/completions  OpenAI chat.completion (SSE chunks with "stream": true);
                             Azure's /openai/deployments/{d}/chat/completions too
- POST .../completions       OpenAI legacy text_completion, one choice per prompt
- POST .../responses         OpenAI Responses object (SSE events with "stream": true)
- POST .../messages          Anthropic message (SSE events with "stream": true); also
                             Vertex .../publishers/anthropic/models/{m}:rawPredict and
                             :streamRawPredict
- POST .../messages/count_tokens  Anthropic {"input_tokens": N}
- POST .../messages/batches  Anthropic message_batch (in_progress); GET
                             .../messages/batches/{id} answers it ended, with a
                             results_url on the Host the request named (the gateway),
                             and GET .../results the JSONL results: one echo message
                             per request, in order (a batch not created here is
                             echoed like any other request)
- POST .../{model}:generateContent        Gemini GenerateContentResponse (Gemini API
                             and Vertex); :streamGenerateContent the same in pieces,
                             SSE with ?alt=sse, else a JSON array; :countTokens
                             {"totalTokens": N}
- POST /model/{id}/converse  Bedrock Converse answer; /converse-stream the same as
                             AWS event-stream messages (application/vnd.amazon.eventstream:
                             prelude, headers, payload, CRC32s), which botocore parses
- POST /api/generate, /api/chat  Ollama answers: NDJSON unless "stream": false
- anything else              200 JSON describing the request

Token counts are words (whitespace-separated), of every text the request holds
(system and messages), so a count shows whether the directive was in the request.
- GET /_demo/received        the last 100 requests (--keep N), newest last
- GET /_demo/received?drain=1  the same, forgotten in the same step (no request
                             lost between reading and clearing)
- DELETE /_demo/received     forget them, and any failure armed below
- POST /_demo/fail?status=503&count=1  the next `count` requests (not /_demo/)
                             are recorded, then answered with `status` and an
                             OpenAI-style error (`retry-after-ms: 10`): a
                             failure an SDK retries

The assistant text lists the messages received, in order, role and content,
so the injected system message shows first. Request bodies are never
logged: the log has one line per request, method, path and status.

Python standard library only. Run: python3 stack/echo_upstream.py --port 18000
"""

import argparse
import base64
import collections
import json
import struct
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEEP = 100
DEMO_PATH = "/_demo/received"
FAIL_PATH = "/_demo/fail"


class Recorder:
    """The last KEEP requests received, thread-safe."""

    def __init__(self, keep=KEEP):
        self._items = collections.deque(maxlen=keep)
        self._lock = threading.Lock()

    def add(self, method, path, headers, body):
        """Remember one request (headers as a list of [name, value] pairs)."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        entry = {
            "method": method,
            "path": path,
            "headers": [[name, value] for name, value in headers.items()],
            "body_base64": base64.b64encode(body).decode("ascii"),
            "body_text": text,
            "received_at": time.time(),
        }
        with self._lock:
            self._items.append(entry)

    def all(self):
        with self._lock:
            return list(self._items)

    def clear(self):
        with self._lock:
            self._items.clear()

    def drain(self):
        """Every kept request, forgotten at once (atomically with the read)."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            return items


class Faults:
    """Statuses to answer the next requests with, oldest first, thread-safe."""

    def __init__(self):
        self._statuses = collections.deque()
        self._lock = threading.Lock()

    def arm(self, status, count):
        with self._lock:
            self._statuses.extend([status] * count)

    def clear(self):
        with self._lock:
            self._statuses.clear()

    def take(self):
        """The status the next request gets instead of its answer, or None."""
        with self._lock:
            return self._statuses.popleft() if self._statuses else None


# -- rendering what was received --------------------------------------------


def content_text(content):
    """Plain text of a message content: a string, or a list of parts/blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if text is None and "content" in part:
                    text = content_text(part.get("content"))
                pieces.append(text if isinstance(text, str) else json.dumps(part, ensure_ascii=False))
            else:
                pieces.append(str(part))
        return "\n".join(pieces)
    return json.dumps(content, ensure_ascii=False)


def describe_messages(messages):
    """One line per message: `[n] role: content`."""
    if not isinstance(messages, list):
        return ["(no messages)"]
    lines = []
    for index, message in enumerate(messages, start=1):
        if isinstance(message, dict):
            role = message.get("role", message.get("type", "?"))
            lines.append(f"[{index}] {role}: {content_text(message.get('content'))}")
        else:
            lines.append(f"[{index}] {content_text(message)}")
    return lines


def chat_echo_text(request):
    messages = request.get("messages")
    count = len(messages) if isinstance(messages, list) else 0
    return "\n".join([f"echo: received {count} message(s)", *describe_messages(messages)])


def responses_echo_text(request):
    lines = ["echo: responses request"]
    if "instructions" in request:
        lines.append(f"instructions: {content_text(request.get('instructions'))}")
    source = request.get("input")
    if isinstance(source, str):
        lines.append(f"[1] user: {source}")
    else:
        lines.extend(describe_messages(source))
    return "\n".join(lines)


def messages_echo_text(request):
    lines = ["echo: anthropic messages request"]
    if "system" in request:
        lines.append(f"system: {content_text(request.get('system'))}")
    lines.extend(describe_messages(request.get("messages")))
    return "\n".join(lines)


def count_tokens(text):
    """A rough token count (words), enough for a plausible usage block."""
    return max(1, len(text.split()))


def pieces(text, size=24):
    """Split text into small deltas for streaming."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


# -- response bodies ---------------------------------------------------------


class Ids:
    """Monotonic ids for response objects."""

    def __init__(self):
        self._next = 0
        self._lock = threading.Lock()

    def next(self, prefix):
        with self._lock:
            self._next += 1
            return f"{prefix}{self._next:06d}"


IDS = Ids()


def chat_completion(request, text):
    prompt = count_tokens(json.dumps(request.get("messages", []), ensure_ascii=False))
    completion = count_tokens(text)
    return {
        "id": IDS.next("chatcmpl-echo"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "echo"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        "system_fingerprint": "echo",
    }


def chat_chunks(request, text):
    """chat.completion.chunk events: role, content deltas, finish, optional usage."""
    base = {"id": IDS.next("chatcmpl-echo"), "object": "chat.completion.chunk", "created": int(time.time()),
            "model": request.get("model", "echo"), "system_fingerprint": "echo"}

    def chunk(delta, finish=None):
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": ""})
    for piece in pieces(text):
        yield chunk({"content": piece})
    yield chunk({}, "stop")
    options = request.get("stream_options") or {}
    if isinstance(options, dict) and options.get("include_usage"):
        completion = count_tokens(text)
        prompt = count_tokens(json.dumps(request.get("messages", []), ensure_ascii=False))
        yield {**base, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                "total_tokens": prompt + completion}}


def response_object(request, text, status="completed"):
    completion = count_tokens(text)
    prompt = count_tokens(json.dumps([request.get("instructions"), request.get("input")], ensure_ascii=False))
    return {
        "id": IDS.next("resp_echo"),
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": request.get("model", "echo"),
        "instructions": request.get("instructions"),
        "output": [
            {
                "type": "message",
                "id": IDS.next("msg_echo"),
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion},
    }


def response_events(request, text):
    """(event, data) pairs of a streamed Responses API answer."""
    final = response_object(request, text)
    item = final["output"][0]
    sequence = iter(range(1_000_000))
    yield "response.created", {"type": "response.created", "sequence_number": next(sequence),
                               "response": {**final, "status": "in_progress", "output": []}}
    yield "response.output_item.added", {"type": "response.output_item.added", "sequence_number": next(sequence),
                                         "output_index": 0, "item": {**item, "status": "in_progress", "content": []}}
    for piece in pieces(text):
        yield "response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": next(sequence),
                                             "item_id": item["id"], "output_index": 0, "content_index": 0,
                                             "delta": piece}
    yield "response.output_text.done", {"type": "response.output_text.done", "sequence_number": next(sequence),
                                        "item_id": item["id"], "output_index": 0, "content_index": 0, "text": text}
    yield "response.output_item.done", {"type": "response.output_item.done", "sequence_number": next(sequence),
                                        "output_index": 0, "item": item}
    yield "response.completed", {"type": "response.completed", "sequence_number": next(sequence), "response": final}


def anthropic_message(request, text):
    return {
        "id": IDS.next("msg_echo"),
        "type": "message",
        "role": "assistant",
        "model": request.get("model", "echo"),
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": count_tokens(json.dumps(request.get("messages", []), ensure_ascii=False)),
                  "output_tokens": count_tokens(text)},
    }


def anthropic_events(request, text):
    """(event, data) pairs of a streamed Anthropic message."""
    final = anthropic_message(request, text)
    yield "message_start", {"type": "message_start",
                            "message": {**final, "content": [], "stop_reason": None,
                                        "usage": {**final["usage"], "output_tokens": 0}}}
    yield "content_block_start", {"type": "content_block_start", "index": 0,
                                  "content_block": {"type": "text", "text": ""}}
    for piece in pieces(text):
        yield "content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta", "text": piece}}
    yield "content_block_stop", {"type": "content_block_stop", "index": 0}
    yield "message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                            "usage": {"output_tokens": final["usage"]["output_tokens"]}}
    yield "message_stop", {"type": "message_stop"}


def openai_error(message, code="invalid_request_error"):
    return {"error": {"type": "invalid_request_error", "code": code, "message": message}}


def iso_time(at=None):
    """RFC 3339 UTC time, as the providers write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if at is None else at))


def word_count(*texts):
    """Words in every text given (non-strings count nothing): the echo's token count."""
    return sum(len(text.split()) for text in texts if isinstance(text, str))


# -- Anthropic count_tokens and batches -----------------------------------------


def anthropic_input_tokens(request):
    """Words of an Anthropic request's system and messages."""
    messages = request.get("messages")
    contents = [m.get("content") for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    return word_count(content_text(request.get("system")), *map(content_text, contents))


class Batches:
    """Message batches created here, newest KEEP kept: the batch and its results."""

    def __init__(self, keep=KEEP):
        self._items = collections.OrderedDict()
        self._keep = keep
        self._lock = threading.Lock()

    def create(self, request):
        """A new batch for the body of POST .../messages/batches; every request's
        result is an echo message of its params, made now."""
        requests = request.get("requests")
        if not isinstance(requests, list):
            requests = []
        results = []
        for item in requests:
            item = item if isinstance(item, dict) else {}
            params = item.get("params") if isinstance(item.get("params"), dict) else {}
            results.append({"custom_id": item.get("custom_id"),
                            "result": {"type": "succeeded",
                                       "message": anthropic_message(params, messages_echo_text(params))}})
        now = time.time()
        batch = {
            "id": IDS.next("msgbatch_echo"),
            "type": "message_batch",
            "processing_status": "in_progress",
            "request_counts": {"processing": len(results), "succeeded": 0, "errored": 0, "canceled": 0,
                               "expired": 0},
            "created_at": iso_time(now),
            "expires_at": iso_time(now + 86400),
            "ended_at": None,
            "cancel_initiated_at": None,
            "archived_at": None,
            "results_url": None,
        }
        with self._lock:
            self._items[batch["id"]] = (batch, results)
            while len(self._items) > self._keep:
                self._items.popitem(last=False)
        return batch

    def ended(self, batch_id, results_url):
        """The batch as it is once processed (every request succeeded), or None."""
        with self._lock:
            found = self._items.get(batch_id)
        if found is None:
            return None
        batch, results = found
        return {**batch, "processing_status": "ended", "ended_at": iso_time(),
                "request_counts": {**batch["request_counts"], "processing": 0, "succeeded": len(results)},
                "results_url": results_url}

    def results(self, batch_id):
        """The batch's JSONL results, one line per request in order, or None."""
        with self._lock:
            found = self._items.get(batch_id)
        if found is None:
            return None
        return b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in found[1])


def batch_route(path):
    """(batch id, "batch" or "results") of GET .../messages/batches/{id}[/results], or None."""
    head, found, tail = path.partition("/messages/batches/")
    if not found or not tail:
        return None
    batch_id, _, rest = tail.partition("/")
    if not batch_id or rest not in ("", "results"):
        return None
    return batch_id, rest or "batch"


# -- OpenAI legacy completions ---------------------------------------------------


def completion_object(request):
    """A text_completion with one choice per prompt (a string is one prompt)."""
    prompt = request.get("prompt")
    prompts = prompt if isinstance(prompt, list) else [prompt]
    choices = []
    for index, one in enumerate(prompts):
        shown = one if isinstance(one, str) else json.dumps(one, ensure_ascii=False)
        choices.append({"text": f"echo: completion prompt: {shown}", "index": index, "logprobs": None,
                        "finish_reason": "stop"})
    prompt_tokens = word_count(*[one for one in prompts if isinstance(one, str)])
    completion_tokens = word_count(*[choice["text"] for choice in choices])
    return {
        "id": IDS.next("cmpl-echo"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": request.get("model", "echo"),
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "system_fingerprint": "echo",
    }


# -- Gemini (Gemini API and Vertex) ----------------------------------------------


def gemini_parts_text(content):
    """The text parts of a Gemini Content ({"role":…,"parts":[{"text":…}]}), one per line."""
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list):
        return ""
    return "\n".join(part["text"] for part in parts if isinstance(part, dict) and isinstance(part.get("text"), str))


def gemini_system(request):
    """The system instruction, in either spelling Google's parser accepts."""
    return request.get("systemInstruction", request.get("system_instruction"))


def gemini_echo_text(request):
    lines = ["echo: gemini request"]
    system = gemini_system(request)
    if system is not None:
        lines.append(f"system: {gemini_parts_text(system)}")
    contents = request.get("contents")
    if not isinstance(contents, list):
        lines.append("(no contents)")
        contents = []
    for index, content in enumerate(contents, start=1):
        role = content.get("role", "user") if isinstance(content, dict) else "?"
        lines.append(f"[{index}] {role}: {gemini_parts_text(content)}")
    return "\n".join(lines)


def gemini_prompt_tokens(request):
    """Words of the system instruction and contents; for countTokens, of its
    generateContentRequest when it has one."""
    inner = request.get("generateContentRequest", request.get("generate_content_request"))
    if isinstance(inner, dict):
        request = inner
    contents = request.get("contents")
    contents = contents if isinstance(contents, list) else []
    return word_count(gemini_parts_text(gemini_system(request)), *map(gemini_parts_text, contents))


def gemini_model(path):
    """The model named by the last segment of .../models/{model}:verb."""
    return path.rsplit("/", 1)[-1].split(":", 1)[0] or "echo"


def gemini_response(request, text, model, response_id=None, finish=True):
    """A GenerateContentResponse holding `text`; with `finish`, its finishReason and usage."""
    candidate = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
    answer = {"candidates": [candidate], "modelVersion": model, "responseId": response_id or IDS.next("echo-")}
    if finish:
        candidate["finishReason"] = "STOP"
        prompt = gemini_prompt_tokens(request)
        output = word_count(gemini_echo_text(request))
        answer["usageMetadata"] = {"promptTokenCount": prompt, "candidatesTokenCount": output,
                                   "totalTokenCount": prompt + output}
    return answer


def gemini_chunks(request, text, model):
    """The streamed pieces of a Gemini answer; the last one finishes it."""
    response_id = IDS.next("echo-")
    chunks = pieces(text)
    for index, piece in enumerate(chunks):
        yield gemini_response(request, piece, model, response_id, finish=index == len(chunks) - 1)


# -- Bedrock Converse ----------------------------------------------------------------


def bedrock_system_text(request):
    """The text blocks of a Converse `system`, one per line."""
    system = request.get("system")
    if not isinstance(system, list):
        return content_text(system)
    texts = [block.get("text") for block in system if isinstance(block, dict)]
    return "\n".join(text for text in texts if isinstance(text, str))


def converse_echo_text(request):
    lines = ["echo: bedrock converse request"]
    if "system" in request:
        lines.append(f"system: {bedrock_system_text(request)}")
    lines.extend(describe_messages(request.get("messages")))
    return "\n".join(lines)


def converse_usage(request, text):
    messages = request.get("messages")
    contents = [m.get("content") for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    prompt = word_count(bedrock_system_text(request), *map(content_text, contents))
    output = word_count(text)
    return {"inputTokens": prompt, "outputTokens": output, "totalTokens": prompt + output}


def converse_answer(request, text):
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
        "stopReason": "end_turn",
        "usage": converse_usage(request, text),
        "metrics": {"latencyMs": 1},
    }


def converse_events(request, text):
    """(event type, payload) of a ConverseStream answer, in order."""
    yield "messageStart", {"role": "assistant"}
    for piece in pieces(text):
        yield "contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": piece}}
    yield "contentBlockStop", {"contentBlockIndex": 0}
    yield "messageStop", {"stopReason": "end_turn"}
    yield "metadata", {"usage": converse_usage(request, text), "metrics": {"latencyMs": 1}}


def event_stream_message(headers, payload):
    """One AWS event-stream message (application/vnd.amazon.eventstream).

    Prelude: total length and headers length (big-endian u32 each), then the
    CRC32 of those 8 bytes; the headers, each a 1-byte name length, the name, the
    value type 7 (string), a u16 value length and the value; the payload; and the
    CRC32 of everything before it."""
    encoded = b""
    for name, value in headers.items():
        name, value = name.encode("utf-8"), value.encode("utf-8")
        encoded += bytes([len(name)]) + name + b"\x07" + struct.pack(">H", len(value)) + value
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def converse_event_message(event_type, payload):
    headers = {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}
    return event_stream_message(headers, json.dumps(payload, ensure_ascii=False).encode("utf-8"))


# -- Ollama ----------------------------------------------------------------------------


def ollama_generate_text(request):
    lines = ["echo: ollama generate request"]
    if "system" in request:
        lines.append(f"system: {content_text(request.get('system'))}")
    lines.append(f"prompt: {content_text(request.get('prompt'))}")
    return "\n".join(lines)


def ollama_prompt_tokens(request, chat):
    """Words of the system prompt and prompt (/api/generate) or of the messages (/api/chat)."""
    if not chat:
        return word_count(request.get("system"), request.get("prompt"))
    messages = request.get("messages")
    contents = [m.get("content") for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    return word_count(*map(content_text, contents))


def ollama_final(request, text, chat):
    """The counters of Ollama's last (done) object."""
    return {"done": True, "done_reason": "stop", "total_duration": 1000, "load_duration": 10,
            "prompt_eval_count": ollama_prompt_tokens(request, chat), "prompt_eval_duration": 100,
            "eval_count": word_count(text), "eval_duration": 100}


def ollama_objects(request, text, chat):
    """Ollama's answer objects: one when "stream" is false, else the pieces then the
    done object (Ollama streams unless told not to)."""
    base = {"model": request.get("model", "echo"), "created_at": iso_time()}

    def carrying(piece):
        return {"message": {"role": "assistant", "content": piece}} if chat else {"response": piece}

    if request.get("stream") is False:
        extra = {} if chat else {"context": [1, 2, 3]}
        return [{**base, **carrying(text), **ollama_final(request, text, chat), **extra}]
    objects = [{**base, **carrying(piece), "done": False} for piece in pieces(text)]
    return objects + [{**base, **carrying(""), **ollama_final(request, text, chat)}]


# -- which answer a request gets ----------------------------------------------------

# POST path suffix -> answer, tried in order (the first that matches).
SUFFIX_ROUTES = (
    ("/api/chat", "ollama_chat"),
    ("/api/generate", "ollama_generate"),
    ("/chat/completions", "chat"),
    ("/completions", "completions"),
    ("/responses", "responses"),
    ("/messages/count_tokens", "count_tokens"),
    ("/messages/batches", "batches"),
    ("/messages", "messages"),
)
# Verb of the last segment (…/models/{model}:verb) -> answer.
VERB_ROUTES = {
    "generateContent": "gemini",
    "streamGenerateContent": "gemini_stream",
    "countTokens": "gemini_count",
}


def model_route(path):
    """The answer a POST to `path` (no query) gets, or None (echoed as it is)."""
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        verb = last.rsplit(":", 1)[1]
        if verb in ("rawPredict", "streamRawPredict") and "/publishers/anthropic/models/" in path:
            return "messages"
        if verb in VERB_ROUTES:
            return VERB_ROUTES[verb]
    if "/model/" in path:
        if path.endswith("/converse"):
            return "converse"
        if path.endswith("/converse-stream"):
            return "converse_stream"
    for suffix, route in SUFFIX_ROUTES:
        if path.endswith(suffix):
            return route
    return None


# -- HTTP ----------------------------------------------------------------------


class EchoHandler(BaseHTTPRequestHandler):
    """Handles one connection; HTTP/1.1 keep-alive like a real API."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY every
    # keep-alive response would wait for a delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    server_version = "ibex-echo-upstream/1"
    recorder = None  # set by make_server
    faults = None  # set by make_server
    batches = None  # set by make_server

    # Logging: method, path, status only. Never bodies or headers.
    def log_request(self, code="-", size="-"):
        self.log_message("%s %s %s", self.command, self.path.split("?", 1)[0], code)

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            sys.stderr.write("echo-upstream: " + (fmt % args) + "\n")

    def read_body(self):
        """The request body, from content-length or chunked transfer-encoding."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def send_json(self, status, payload, headers=None):
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_bytes(self, status, data, content_type):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def start_stream(self, content_type="text/event-stream"):
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def write_chunk(self, data):
        if data:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def end_stream(self):
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def stream_data_only(self, payloads):
        """OpenAI chat style: `data: {...}` lines, then `data: [DONE]`."""
        payloads = list(payloads)  # built before the status line goes out
        self.start_stream()
        for payload in payloads:
            self.write_chunk(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")
        self.write_chunk(b"data: [DONE]\n\n")
        self.end_stream()

    def stream_named_events(self, events):
        """Anthropic / Responses style: `event: name` + `data: {...}` pairs."""
        events = list(events)  # built before the status line goes out
        self.start_stream()
        for name, payload in events:
            line = f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"
            self.write_chunk(line.encode())
        self.end_stream()

    def stream_data_lines(self, payloads, separator=b"\r\n\r\n"):
        """Gemini style (?alt=sse): `data: {...}` events, no [DONE], CRLF-separated."""
        payloads = list(payloads)  # built before the status line goes out
        self.start_stream()
        for payload in payloads:
            self.write_chunk(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + separator)
        self.end_stream()

    def stream_ndjson(self, objects):
        """Ollama style: one JSON object per line."""
        objects = list(objects)  # built before the status line goes out
        self.start_stream("application/x-ndjson")
        for payload in objects:
            self.write_chunk(json.dumps(payload, ensure_ascii=False).encode() + b"\n")
        self.end_stream()

    def stream_event_messages(self, messages):
        """Bedrock style: AWS event-stream messages, one HTTP chunk each."""
        messages = list(messages)  # built before the status line goes out
        self.start_stream("application/vnd.amazon.eventstream")
        for message in messages:
            self.write_chunk(message)
        self.end_stream()

    # -- dispatch --

    def handle_any(self):
        path = self.path.split("?", 1)[0]
        if path == DEMO_PATH:
            return self.handle_demo()
        if path == FAIL_PATH:
            return self.handle_fail()
        body = self.read_body()
        self.recorder.add(self.command, self.path, self.headers, body)
        status = self.faults.take()
        if status is not None:
            return self.send_json(status, openai_error(f"echo: failing this request with {status} as asked",
                                                       "echo_fault"), headers={"retry-after-ms": "10"})
        route = model_route(path) if self.command == "POST" else None
        if route is not None:
            return self.handle_model(route, path, body)
        batch = batch_route(path) if self.command == "GET" else None
        if batch is not None and self.handle_batch(path, *batch):
            return None
        return self.send_json(200, {"echo": {"method": self.command, "path": self.path,
                                             "body_text": body.decode("utf-8", "replace")}})

    def handle_demo(self):
        if self.command == "GET":
            drain = "drain=1" in self.path.partition("?")[2].split("&")
            items = self.recorder.drain() if drain else self.recorder.all()
            return self.send_json(200, {"requests": items})
        if self.command == "DELETE":
            self.recorder.clear()
            self.faults.clear()
            return self.send_json(200, {"cleared": True})
        return self.send_json(405, openai_error("use GET or DELETE"))

    def handle_fail(self):
        self.read_body()
        if self.command != "POST":
            return self.send_json(405, openai_error("use POST"))
        query = dict(item.partition("=")[::2] for item in self.path.partition("?")[2].split("&") if item)
        try:
            status, count = int(query.get("status", "503")), int(query.get("count", "1"))
        except ValueError:
            return self.send_json(400, openai_error("status and count are integers"))
        self.faults.arm(status, count)
        return self.send_json(200, {"armed": {"status": status, "count": count}})

    def handle_model(self, route, path, body):
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return self.send_json(400, openai_error("request body is not valid JSON", "invalid_json"))
        if not isinstance(request, dict):
            return self.send_json(400, openai_error("request body must be a JSON object", "invalid_json"))
        try:
            return self.answer(route, path, request)
        except (AttributeError, TypeError, KeyError, ValueError) as error:
            # a body of an odd shape: say so rather than drop the connection
            return self.send_json(400, openai_error(f"echo cannot answer this body: {error!r}", "echo_shape"))

    def answer(self, route, path, request):
        """The answer of `route` (model_route) to the JSON object `request`."""
        stream = request.get("stream") is True
        if route == "chat":
            text = chat_echo_text(request)
            if stream:
                return self.stream_data_only(chat_chunks(request, text))
            return self.send_json(200, chat_completion(request, text))
        if route == "responses":
            text = responses_echo_text(request)
            if stream:
                return self.stream_named_events(response_events(request, text))
            return self.send_json(200, response_object(request, text))
        if route == "messages":
            text = messages_echo_text(request)
            if stream:
                return self.stream_named_events(anthropic_events(request, text))
            return self.send_json(200, anthropic_message(request, text))
        if route == "count_tokens":
            return self.send_json(200, {"input_tokens": anthropic_input_tokens(request)})
        if route == "batches":
            return self.send_json(200, self.batches.create(request))
        if route == "completions":
            return self.send_json(200, completion_object(request))
        if route in ("gemini", "gemini_stream"):
            text, model = gemini_echo_text(request), gemini_model(path)
            if route == "gemini":
                return self.send_json(200, gemini_response(request, text, model))
            if "alt=sse" in self.path.partition("?")[2].split("&"):
                return self.stream_data_lines(gemini_chunks(request, text, model))
            return self.send_json(200, list(gemini_chunks(request, text, model)))
        if route == "gemini_count":
            return self.send_json(200, {"totalTokens": gemini_prompt_tokens(request)})
        if route == "converse":
            return self.send_json(200, converse_answer(request, converse_echo_text(request)))
        if route == "converse_stream":
            events = converse_events(request, converse_echo_text(request))
            return self.stream_event_messages(converse_event_message(name, payload) for name, payload in events)
        chat = route == "ollama_chat"
        text = chat_echo_text(request) if chat else ollama_generate_text(request)
        objects = ollama_objects(request, text, chat)
        if request.get("stream") is False:
            return self.send_json(200, objects[0])
        return self.stream_ndjson(objects)

    def handle_batch(self, path, batch_id, what):
        """GET .../messages/batches/{id}: the batch, ended; GET .../results: its JSONL.
        False (answered nothing) for a batch not created here: echoed like any GET."""
        if what == "results":
            data = self.batches.results(batch_id)
            if data is not None:
                self.send_bytes(200, data, "application/binary")
                return True
            return False
        host = self.headers.get("host", f"127.0.0.1:{self.server.server_address[1]}")
        batch = self.batches.ended(batch_id, f"http://{host}{path}/results")
        if batch is None:
            return False
        self.send_json(200, batch)
        return True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = handle_any


class EchoServer(ThreadingHTTPServer):
    # Connections Envoy opens at once wait in the listen backlog: the standard
    # library's 5 would drop the rest (Envoy's 0.25 s connect timeout, then 503)
    # when many requests are released together (tests/test_coalescing.py).
    request_queue_size = 1024


def make_server(host, port, quiet=False, keep=KEEP):
    """A ready-to-serve echo server bound to host:port, remembering `keep` requests."""
    handler = type("Handler", (EchoHandler,), {"recorder": Recorder(keep), "faults": Faults(),
                                              "batches": Batches()})
    server = EchoServer((host, port), handler)
    server.daemon_threads = True
    server.quiet = quiet
    return server


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Echo LLM upstream (OpenAI, Anthropic, Gemini, Bedrock and Ollama shapes)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18000)
    parser.add_argument("--quiet", action="store_true", help="log nothing, not even method and path")
    parser.add_argument("--keep", type=int, default=KEEP, help=f"requests remembered (default {KEEP})")
    args = parser.parse_args(argv)
    server = make_server(args.host, args.port, args.quiet, args.keep)
    sys.stderr.write(f"echo-upstream: listening on http://{args.host}:{args.port}\n")
    sys.stderr.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _stop_on_sigterm(_signum, _frame):
    """SIGTERM ends serve_forever the same way Ctrl-C does."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    main()
