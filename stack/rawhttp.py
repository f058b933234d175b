"""HTTP/1.1 on a raw socket, for what an HTTP client library would not do:
exact request bytes (hostile framing, an announced body that never comes),
many connections opened first and written back to back, a request whose
connection is dropped mid-flight.

    data = request_bytes(CHAT, body, agent=agent)
    status, headers, body = exchange(port, data)        # one connection, one answer
    answer = read_response(sock)                        # or on a socket of your own

Used by the end-to-end tests and by the benchmarks' stampede.
"""

import collections
import socket

from stack.contract import AGENT_HEADER
from stack.ports import LOOPBACK

Response = collections.namedtuple("Response", "status headers body")
Response.__doc__ = """One HTTP answer: status (int), headers ({lower-case name: value}), body (bytes)."""

_NO_BODY = (204, 304)


def request_bytes(path, body=b"", *, agent=None, headers=None, method="POST", host="gateway",
                  content_type="application/json"):
    """One HTTP/1.1 request as bytes: request line, host, content-type, the agent
    header when `agent` is given, `headers` ({name: value}, in order), then
    content-length of `body` unless `headers` frame the body themselves
    (content-length or transfer-encoding: `body` is then sent as it is)."""
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
    if content_type:
        lines.append(f"content-type: {content_type}")
    if agent is not None:
        lines.append(f"{AGENT_HEADER}: {agent}")
    extra = dict(headers or {})
    lines += [f"{name}: {value}" for name, value in extra.items()]
    if not {name.lower() for name in extra} & {"content-length", "transfer-encoding"}:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Reader:
    """Buffered reads from a socket; `closed` once the peer closed."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()
        self.closed = False

    def fill(self):
        chunk = self.sock.recv(65536)
        if chunk:
            self.buffer += chunk
        else:
            self.closed = True
        return bool(chunk)

    def until(self, marker):
        """Bytes up to and without `marker` (consumed); everything left when the peer closes first."""
        while True:
            at = self.buffer.find(marker)
            if at >= 0:
                data = bytes(self.buffer[:at])
                del self.buffer[:at + len(marker)]
                return data
            if not self.fill():
                data = bytes(self.buffer)
                self.buffer.clear()
                return data

    def exactly(self, count):
        """`count` bytes, or fewer when the peer closes first."""
        while len(self.buffer) < count and self.fill():
            pass
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def rest(self):
        """Everything until the peer closes."""
        while self.fill():
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


def _chunked_body(reader):
    parts = []
    while True:
        size_line = reader.until(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        except ValueError:
            return b"".join(parts)
        if size == 0:
            while reader.until(b"\r\n") and not reader.closed:  # trailers up to the empty line
                pass
            return b"".join(parts)
        parts.append(reader.exactly(size))
        reader.until(b"\r\n")
        if reader.closed:
            return b"".join(parts)


def read_response(sock, method="POST"):
    """Read one response from `sock`: the head, then the body by content-length,
    chunked framing, or up to the peer's close. Status 0 when the peer closed
    before sending a status line."""
    reader = _Reader(sock)
    head = reader.until(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        return Response(0, {}, head)
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if method == "HEAD" or status in _NO_BODY or 100 <= status < 200:
        body = b""
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        body = _chunked_body(reader)
    elif "content-length" in headers:
        body = reader.exactly(int(headers["content-length"]))
    else:
        body = reader.rest()
    return Response(status, headers, body)


def connect(port, timeout=10.0):
    """A TCP connection to 127.0.0.1:`port`."""
    return socket.create_connection((LOOPBACK, port), timeout=timeout)


def exchange(port, data, timeout=10.0):
    """Send raw bytes on a new connection and read the answer (a Response).

    `timeout` is a deadline on a dead connection, never a wait for success.
    The server may answer and close before it took every byte; that is no error.
    """
    with connect(port, timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_response(sock, method=data.split(b" ", 1)[0].decode("latin-1"))
