"""Redis 7 and Webdis (its HTTP front) from Debian's packages."""

import json
import socket
import subprocess
import urllib.error
import urllib.request

from stack.process import PortProcess


class RespError(RuntimeError):
    """Redis answered a command with an error reply."""


def encode_command(*args):
    """One Redis command in RESP (array of bulk strings)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(f"${len(data)}\r\n".encode() + data + b"\r\n")
    return b"".join(parts)


def _read_reply(stream):
    """Read one RESP reply from a file-like socket stream.

    Bulk strings come back as str when UTF-8 (bytes otherwise), nil as None.
    """
    line = stream.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        length = int(rest)
        if length < 0:
            return None
        data = stream.read(length + 2)[:-2]
        try:
            return data.decode()
        except UnicodeDecodeError:
            return data
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(stream) for _ in range(count)]
    raise ConnectionError(f"unexpected RESP reply {line!r}")


class Redis(PortProcess):
    """redis-server on 127.0.0.1:`port`, nothing persisted."""

    name = "redis"

    @property
    def url(self):
        """REDIS_URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self):
        return [
            "redis-server",
            "--port", self.port,
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.dir,
            "--daemonize", "no",
            "--logfile", "",
        ]

    def ready(self):
        return self.redis_cli("PING") == "PONG"

    def redis_cli(self, *args):
        """Run the real redis-cli against this server; return its stripped raw output."""
        result = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "--raw", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if result.returncode != 0:
            raise RespError(result.stderr.strip() or result.stdout.strip())
        return result.stdout.strip()

    def command_call(self, *args):
        """Send one command over RESP; return the decoded reply (None for nil).

        Unlike redis-cli's text this tells nil from the empty string.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(encode_command(*args))
            with sock.makefile("rb") as stream:
                return _read_reply(stream)

    def pipeline(self, commands):
        """Send `commands` (tuples of arguments) in one write; return their replies in order
        (an error reply is returned as a RespError, not raised)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(b"".join(encode_command(*c) for c in commands))
            with sock.makefile("rb") as stream:
                replies = []
                for _ in commands:
                    try:
                        replies.append(_read_reply(stream))
                    except RespError as error:
                        replies.append(error)
                return replies

    def keys(self, pattern):
        """Every key matching `pattern` (SCAN, never KEYS)."""
        found, cursor = [], "0"
        while True:
            cursor, batch = self.command_call("SCAN", cursor, "MATCH", pattern, "COUNT", 10000)
            found.extend(batch)
            if cursor == "0":
                return found

    def delete_matching(self, pattern):
        """Delete every key matching `pattern`, one DEL per key (keys of one node of a
        cluster may lie in different slots); returns how many there were."""
        keys = self.keys(pattern)
        for start in range(0, len(keys), 5000):
            self.pipeline([("DEL", key) for key in keys[start:start + 5000]])
        return len(keys)

    def get(self, key):
        """GET `key`: its value, or None when the key does not exist."""
        return self.command_call("GET", key)

    def ttl(self, key):
        """TTL of `key` in seconds (-1 no expiry, -2 no key)."""
        return self.command_call("TTL", key)

    def command_calls(self, command):
        """How many times `command` ran since start (INFO commandstats `calls`)."""
        info = self.command_call("INFO", "commandstats")
        prefix = f"cmdstat_{command.lower()}:"
        for line in info.splitlines():
            if line.startswith(prefix):
                fields = dict(item.split("=", 1) for item in line[len(prefix):].split(","))
                return int(fields["calls"])
        return 0


class Webdis(PortProcess):
    """Webdis on 127.0.0.1:`port` in front of `redis_port`.

    Its JSON config is generated into the directory: no daemon, two threads,
    a log file next to it, and no ACL (GET, SET, SETEX, DEL, ... all allowed).
    `verbosity` goes from 0 (errors) to 8 (everything).
    """

    name = "webdis"

    def __init__(self, directory, port, redis_port, verbosity=3, **kwargs):
        super().__init__(directory, port, **kwargs)
        self.redis_port = redis_port
        self.verbosity = verbosity

    @property
    def config_path(self):
        return self.dir / "webdis.json"

    @property
    def webdis_log_path(self):
        """Webdis's own log file (its stdout goes to `log_path`)."""
        return self.log_dir / "webdis-server.log"

    def prepare(self):
        config = {
            "redis_host": "127.0.0.1",
            "redis_port": self.redis_port,
            "redis_auth": None,
            "http_host": "127.0.0.1",
            "http_port": self.port,
            "threads": 2,
            "pool_size": 8,
            "daemonize": False,
            "websockets": False,
            "database": 0,
            "verbosity": self.verbosity,
            "logfile": str(self.webdis_log_path),
        }
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")

    def command(self):
        return ["webdis", self.config_path]

    def ready(self):
        """Webdis answers PING through to Redis."""
        try:
            with urllib.request.urlopen(f"{self.url}/PING", timeout=1) as response:
                return response.status == 200 and json.load(response).get("PING") == [True, "PONG"]
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def log_paths(self):
        return [self.log_path, self.webdis_log_path]
