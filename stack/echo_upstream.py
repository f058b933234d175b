"""Echo upstream: a stand-in LLM API that answers with what it received.

The only stand-in of the stack: it plays the model behind Envoy so a person
(`make run`) or a test can see the directive that the filter injected.

- POST .../chat/completions  OpenAI chat.completion (SSE chunks with "stream": true)
- POST .../responses         OpenAI Responses object (SSE events with "stream": true)
- POST .../messages          Anthropic message (SSE events with "stream": true)
- anything else              200 JSON describing the request
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
import sys
import threading
import time
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

    def start_stream(self):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
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
        self.start_stream()
        for payload in payloads:
            self.write_chunk(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")
        self.write_chunk(b"data: [DONE]\n\n")
        self.end_stream()

    def stream_named_events(self, events):
        """Anthropic / Responses style: `event: name` + `data: {...}` pairs."""
        self.start_stream()
        for name, payload in events:
            line = f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"
            self.write_chunk(line.encode())
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
        if self.command == "POST" and path.endswith(("/chat/completions", "/responses", "/messages")):
            return self.handle_model(path, body)
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

    def handle_model(self, path, body):
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return self.send_json(400, openai_error("request body is not valid JSON", "invalid_json"))
        if not isinstance(request, dict):
            return self.send_json(400, openai_error("request body must be a JSON object", "invalid_json"))
        stream = request.get("stream") is True
        if path.endswith("/chat/completions"):
            text = chat_echo_text(request)
            if stream:
                return self.stream_data_only(chat_chunks(request, text))
            return self.send_json(200, chat_completion(request, text))
        if path.endswith("/responses"):
            text = responses_echo_text(request)
            if stream:
                return self.stream_named_events(response_events(request, text))
            return self.send_json(200, response_object(request, text))
        text = messages_echo_text(request)
        if stream:
            return self.stream_named_events(anthropic_events(request, text))
        return self.send_json(200, anthropic_message(request, text))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = handle_any


class EchoServer(ThreadingHTTPServer):
    # Connections Envoy opens at once wait in the listen backlog: the standard
    # library's 5 would drop the rest (Envoy's 0.25 s connect timeout, then 503)
    # when many requests are released together (tests/test_coalescing.py).
    request_queue_size = 1024


def make_server(host, port, quiet=False, keep=KEEP):
    """A ready-to-serve echo server bound to host:port, remembering `keep` requests."""
    handler = type("Handler", (EchoHandler,), {"recorder": Recorder(keep), "faults": Faults()})
    server = EchoServer((host, port), handler)
    server.daemon_threads = True
    server.quiet = quiet
    return server


def main(argv=None):
    parser = argparse.ArgumentParser(description="Echo LLM upstream (OpenAI and Anthropic shapes)")
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
