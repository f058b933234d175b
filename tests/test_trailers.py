"""Request trailers (SPEC §5): a body that ends in trailers never reaches the
upstream unspliced.

Over HTTP/2 (h2c, prior knowledge, which the data listener's `codec_type: AUTO`
accepts from any client) a client can send HEADERS, DATA without END_STREAM,
then trailers: the filter never sees the end of the body in a body callback and
cannot rewrite the body from the trailers callback, so it refuses (400
`invalid_body`) whenever a directive is due. Requests that carry no directive
keep their trailers. Over HTTP/1.1, Envoy's codec drops chunked trailers unless
`enable_trailers` is set (the committed configs do not set it), so the body ends
normally and is injected.
"""

import json
import socket

import h2.config
import h2.connection
import h2.events

from helpers import CHAT, agent_with, assert_chat_injected, chat_body, new_agent, send
from stack.contract import AGENT_HEADER
from stack.ports import LOOPBACK
from stack.rawhttp import exchange, request_bytes

DIRECTIVE = "Trailers must not smuggle an unspliced body."


def h2c_post(port, path, body, agent, trailers=None):
    """One POST over h2c with prior knowledge: HEADERS, DATA, then `trailers` (a
    list of (name, value)) as a final HEADERS frame when given. Returns (status,
    body bytes)."""
    sock = socket.create_connection((LOOPBACK, port), timeout=30)
    try:
        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "gateway"),
                   ("content-type", "application/json")]
        if agent is not None:
            headers.append((AGENT_HEADER, agent))
        conn.send_headers(stream, headers)
        conn.send_data(stream, body, end_stream=trailers is None)
        if trailers is not None:
            conn.send_headers(stream, trailers, end_stream=True)
        sock.sendall(conn.data_to_send())
        status, answer, done = None, bytearray(), False
        while not done:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    answer += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)) and event.stream_id == stream:
                    done = True
            sock.sendall(conn.data_to_send())
        return status, bytes(answer)
    finally:
        sock.close()


def test_h2c_without_trailers_is_injected(stack, upstream):
    """The h2 client itself works: the same request without trailers is injected."""
    agent = agent_with(stack, DIRECTIVE)
    body = chat_body()
    status, _ = h2c_post(stack.envoy.data_port, CHAT, body, agent)
    assert status == 200
    assert_chat_injected(body, upstream.last().body, DIRECTIVE)


def test_h2c_trailers_on_a_cold_agent_are_refused(stack, upstream):
    agent = agent_with(stack, DIRECTIVE)
    status, answer = h2c_post(stack.envoy.data_port, CHAT, chat_body(), agent, trailers=[("x-checksum", "abc")])
    assert status == 400
    assert json.loads(answer)["error"]["code"] == "invalid_body"
    assert DIRECTIVE not in answer.decode()
    assert upstream.received() == []


def test_h2c_trailers_on_a_warm_agent_are_refused(stack, upstream):
    """L1 hit: headers go on at once and only the body is held; the upstream may
    see the headers, never a complete request."""
    agent = agent_with(stack, DIRECTIVE)
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    upstream.clear()
    before = stack.envoy.counter("rejected.invalid_body")
    status, answer = h2c_post(stack.envoy.data_port, CHAT, chat_body(), agent, trailers=[("x-checksum", "abc")])
    assert status == 400
    assert json.loads(answer)["error"]["code"] == "invalid_body"
    assert upstream.received() == [], "nothing complete reached the upstream"
    assert stack.envoy.counter("rejected.invalid_body") == before + 1


def test_h2c_trailers_of_an_agent_without_directive_pass_untouched(stack, upstream):
    agent = new_agent()
    body = chat_body()
    status, _ = h2c_post(stack.envoy.data_port, CHAT, body, agent, trailers=[("x-checksum", "abc")])
    assert status == 200
    assert upstream.last().body == body


def test_http1_chunked_trailers_are_dropped_by_envoy_and_the_body_is_injected(stack, upstream):
    agent = agent_with(stack, DIRECTIVE)
    body = chat_body()
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\nx-checksum: abc\r\n\r\n"
    request = request_bytes(CHAT, chunked, agent=agent, headers={"transfer-encoding": "chunked"})
    status, _, _ = exchange(stack.envoy.data_port, request)
    assert status == 200
    received = upstream.received()
    assert len(received) == 1
    assert_chat_injected(body, received[0].body, DIRECTIVE)
