"""The echo upstream (stack/echo_upstream.py) as a managed process, with
helpers to read what it received."""

import base64
import json
import urllib.request
from pathlib import Path

from stack import paths
from stack.process import PortProcess

ECHO_SCRIPT = Path(__file__).resolve().parent / "echo_upstream.py"


class Received:
    """One request the echo upstream recorded."""

    def __init__(self, entry):
        self.method = entry["method"]
        self.path = entry["path"]
        self.header_pairs = entry["headers"]
        self.body = base64.b64decode(entry["body_base64"])
        self.text = entry["body_text"]
        self.received_at = entry.get("received_at")

    def header(self, name, default=None):
        """Value of header `name` (case-insensitive; the first one when repeated)."""
        for key, value in self.header_pairs:
            if key.lower() == name.lower():
                return value
        return default

    @property
    def headers(self):
        """Headers as a dict with lower-case names."""
        return {key.lower(): value for key, value in self.header_pairs}

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Received {self.method} {self.path} {len(self.body)} bytes>"


class EchoUpstream(PortProcess):
    """The stand-in LLM API on 127.0.0.1:`port`.

    `keep` (default: the server's 100) is how many requests it remembers; set
    it (also as an attribute, before start) for tests that drain in bulk.
    """

    name = "upstream"
    health_path = "/_demo/received"

    def __init__(self, directory, port, keep=None, **kwargs):
        super().__init__(directory, port, **kwargs)
        self.keep = keep

    def command(self):
        argv = [paths.python(), ECHO_SCRIPT, "--host", "127.0.0.1", "--port", self.port]
        if self.keep is not None:
            argv += ["--keep", self.keep]
        return argv

    def received(self):
        """Every recorded request, oldest first, as Received objects."""
        with urllib.request.urlopen(self.url + "/_demo/received", timeout=5) as response:
            return [Received(entry) for entry in json.load(response)["requests"]]

    def drain(self):
        """Every recorded request, oldest first, forgotten by the server in the same step."""
        with urllib.request.urlopen(self.url + "/_demo/received?drain=1", timeout=30) as response:
            return [Received(entry) for entry in json.load(response)["requests"]]

    def last(self):
        """The newest recorded request, or None."""
        items = self.received()
        return items[-1] if items else None

    def fail_next(self, status=503, count=1):
        """Answer the next `count` requests with `status` (an error an SDK retries); they are still recorded."""
        request = urllib.request.Request(f"{self.url}/_demo/fail?status={int(status)}&count={int(count)}",
                                         data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=5):
            pass

    def clear(self):
        """Forget every recorded request and any failure armed by fail_next."""
        request = urllib.request.Request(self.url + "/_demo/received", method="DELETE")
        with urllib.request.urlopen(request, timeout=5):
            pass
