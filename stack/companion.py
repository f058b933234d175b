"""The companion binary (`companion/`): its store, subscribe and rest servers
and its admin subcommands.

Flags follow `ibex-companion --help`; DATABASE_URL and REDIS_URL are passed
through the environment, which the companion's CLI reads.
"""

import json
import os
import re
import secrets
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from stack import paths
from stack.contract import REST_ADMIN_TOKEN_ENV, REST_TOKEN_ENV
from stack.ports import http_status
from stack.process import PortProcess

PATIENT_STORE_ENV = {
    "IBEX_STORE_ACQUIRE_TIMEOUT_MS": "2000",
    "IBEX_STORE_STATEMENT_TIMEOUT_MS": "3000",
    "IBEX_STORE_LOOKUP_TIMEOUT_MS": "4000",
}
"""The store's own deadlines in test stacks (`Stack(patient=True)`), below the
filter's store timeout there (stack/envoy.py PATIENT_FILTER_CONFIG), as the
defaults (250, 400, 450 ms) are below its default 500 ms."""

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text):
    """Parse Prometheus text exposition into [(name, {label: value}, float)]."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            labels = dict(_LABEL.findall(match.group(3) or ""))
            samples.append((match.group(1), labels, float(match.group(4))))
    return samples


class Companion:
    """Runs the companion's one-shot subcommands (migrate, set/clear a directive)."""

    def __init__(self, database_url, redis_url=None, directory=None, env=None):
        self.database_url = database_url
        self.redis_url = redis_url
        self.dir = Path(directory) if directory else None
        self.extra_env = dict(env or {})

    def environment(self):
        """Our environment plus DATABASE_URL, REDIS_URL and RUST_LOG for the CLI."""
        env = dict(os.environ)
        env["DATABASE_URL"] = self.database_url
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        env.setdefault("RUST_LOG", "info")
        env.update(self.extra_env)
        return env

    def run(self, *args, stdin_text=None, log_stdout=True):
        """Run `ibex-companion ARGS`; raise with its output when it fails.

        Output is appended to companion-cli.log in the directory (when given)
        so the privacy test can read it too; with `log_stdout=False` stdout is
        left out of it (`issue-key` prints the new key there, which is the
        caller's and no log's). `stdin_text` is written to its stdin.
        """
        argv = [str(paths.companion_path()), *map(str, args)]
        result = subprocess.run(argv, capture_output=True, text=True, env=self.environment(), timeout=60,
                                input=stdin_text)
        if self.dir:
            stdout = result.stdout if log_stdout else "(stdout not logged)\n"
            with open(self.dir / "companion-cli.log", "a") as log:
                log.write(f"--- {args[0]} exit={result.returncode}\n{stdout}{result.stderr}")
        if result.returncode != 0:
            raise RuntimeError(f"ibex-companion {args[0]} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def migrate(self):
        """Apply the schema migrations (idempotent)."""
        return self.run("migrate")

    def set_directive(self, agent_id, content, publish=True):
        """Make `content` the active directive of `agent_id` and publish the update
        (unless publish=False). Creates the agent when missing.

        The text goes through a file, never argv, so it shows in no process list.
        """
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=True) as handle:
            handle.write(content)
            handle.flush()
            args = ["set-directive", "--agent-id", agent_id, "--content-file", handle.name]
            return self.run(*args, *([] if publish else ["--no-publish"]))

    def clear_directive(self, agent_id, publish=True):
        """Deactivate the directive of `agent_id` and publish the update (unless publish=False)."""
        return self.run("clear-directive", "--agent-id", agent_id, *([] if publish else ["--no-publish"]))

    def flush(self):
        """Publish a flush: every cache drops every directive."""
        return self.run("flush")

    # -- gateway API keys (agent.source "api_key") ------------------------------

    def issue_key(self, agent_id, label=None):
        """A new gateway key for `agent_id` (created when missing), as `issue-key` printed it.

        The key is returned, never logged (companion-cli.log gets its stderr,
        which names only the key's SHA-256)."""
        args = ["issue-key", "--agent-id", agent_id, *(["--label", label] if label is not None else [])]
        key = self.run(*args, log_stdout=False).strip()
        if not key:
            raise RuntimeError("ibex-companion issue-key printed no key")
        return key

    def revoke_key(self, key_sha256=None, key=None, publish=True):
        """Revoke a key by its SHA-256 (`--key-sha256`) or by the key itself, which
        goes through stdin (`--key-stdin`), never argv. Returns the SHA-256 it printed."""
        if (key_sha256 is None) == (key is None):
            raise ValueError("give exactly one of key_sha256 and key")
        args = ["revoke-key", *(["--key-sha256", key_sha256] if key is None else ["--key-stdin"])]
        if not publish:
            args.append("--no-publish")
        return self.run(*args, stdin_text=None if key is None else key + "\n").strip()

    def list_keys(self, agent_id):
        """`list-keys`: [{key_sha256, created_at, revoked_at (None when active), label}]."""
        lines = self.run("list-keys", "--agent-id", agent_id).splitlines()
        columns = lines[0].split("\t")
        rows = [dict(zip(columns, line.split("\t"))) for line in lines[1:] if line]
        for row in rows:
            if row.get("revoked_at") == "-":
                row["revoked_at"] = None
        return rows


class _CompanionServer(PortProcess):
    """A long-running companion subcommand with an HTTP health endpoint."""

    health_path = "/healthz"

    def __init__(self, directory, port, log_level="info", **kwargs):
        super().__init__(directory, port, **kwargs)
        self.extra_env.setdefault("RUST_LOG", log_level)

    def metrics_text(self):
        """The raw /metrics page."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            return response.read().decode()

    def metric(self, name, **labels):
        """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
        total = 0.0
        for sample, sample_labels, value in parse_prometheus(self.metrics_text()):
            if sample == name and all(sample_labels.get(k) == v for k, v in labels.items()):
                total += value
        return total


class Store(_CompanionServer):
    """`ibex-companion store`: the directive HTTP API over Postgres (L3)."""

    name = "store"
    health_path = "/readyz"

    def __init__(self, directory, port, database_url, redis_url=None, **kwargs):
        super().__init__(directory, port, **kwargs)
        self.database_url = database_url
        self.redis_url = redis_url
        self.extra_env.setdefault("DATABASE_URL", database_url)

    def environment(self):
        """`redis_url`, when given, as IBEX_STORE_REDIS_URL: the store then shares an
        agent's query with lookups that arrive while it runs or shortly after, once
        Redis shows no invalidation since (companion/src/store/flight.rs); never one
        inherited from the harness."""
        env = super().environment()
        env.pop("IBEX_STORE_REDIS_URL", None)
        if self.redis_url:
            env["IBEX_STORE_REDIS_URL"] = self.redis_url
        return env

    def command(self):
        return [paths.companion_path(), "store", "--listen", f"127.0.0.1:{self.port}", "--database-url", self.database_url]

    def lookups(self):
        """Total store lookups, all results together."""
        return self.metric("ibex_store_lookups_total")

    def directive(self, agent_id):
        """GET /v1/agents/{agent_id}/directive as (status, body text)."""
        try:
            with urllib.request.urlopen(f"{self.url}/v1/agents/{agent_id}/directive", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def key_lookups(self, result=None):
        """Gateway key lookups the store answered (`found`, `none` or `error`; all when None)."""
        labels = {} if result is None else {"result": result}
        return self.metric("ibex_store_key_lookups_total", **labels)

    def key(self, key_sha256):
        """GET /v1/keys/{key_sha256} as (status, body text)."""
        try:
            with urllib.request.urlopen(f"{self.url}/v1/keys/{key_sha256}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()


class Subscriber(_CompanionServer):
    """`ibex-companion subscribe`: Redis pub/sub → DEL the L2 key → POST each control URL.

    Ready once /readyz is 200, which the subscriber answers only while it is
    subscribed: an update published after start() is never missed.
    `control_token` (the control listeners' bearer token) reaches it as
    IBEX_CONTROL_TOKEN, never on its command line, which any local user can read.
    """

    name = "subscriber"
    health_path = "/readyz"

    def __init__(self, directory, port, redis_url, control_urls, control_token=None, **kwargs):
        super().__init__(directory, port, **kwargs)
        self.redis_url = redis_url
        self.control_urls = list(control_urls)
        self.control_token = control_token
        self.extra_env.setdefault("REDIS_URL", redis_url)

    def environment(self):
        env = super().environment()
        env.pop("IBEX_CONTROL_TOKEN", None)  # never one inherited from the harness
        if self.control_token:
            env["IBEX_CONTROL_TOKEN"] = self.control_token
        return env

    def command(self):
        return [
            paths.companion_path(), "subscribe",
            "--redis-url", self.redis_url,
            "--control-urls", ",".join(self.control_urls),
            "--listen", f"127.0.0.1:{self.port}",
        ]

    def settled_invalidations(self):
        """Control POSTs finished so far, acknowledged or given up on.

        The subscriber deletes the Redis key before it POSTs, so when this
        count grows, a published update has fully gone through.
        """
        return (self.metric("ibex_subscribe_invalidations_sent_total")
                + self.metric("ibex_subscribe_invalidation_failures_total"))


class RestFront(_CompanionServer):
    """`ibex-companion rest`: the Upstash-compatible REST front of Redis (L2 over HTTP
    keep-alive, bearer token), on 127.0.0.1:`port` in front of `redis_url`.

    Ready once `/readyz` answers 200, which the front does only while Redis answers
    PING (`/healthz` answers as soon as it listens, Redis or not).

    Two tokens, as `companion rest` takes them: `token` is the filter's (Envoy's
    `redis.token`: PING, GET and EVAL of the filter's scripts on `directive:…` and
    `agent_key:…` keys, nothing else), `admin_token` the operators' (GET, SET with EX,
    DEL, PING and the filter's scripts on any key), a new random one unless given; it
    must differ from `token`. They reach the front as IBEX_REDIS_REST_TOKEN and
    IBEX_REDIS_REST_ADMIN_TOKEN, never on its command line, which any local user can
    read; nothing here logs them. `call(*command)` and `pipeline(*commands)` speak the
    REST API as a client would (`{"result": …}` / `{"error": …}`), with the filter's
    token unless given `token=` (`token=front.admin_token` for what only operators run).
    """

    name = "rest"
    health_path = "/readyz"
    TOKEN_ENV = REST_TOKEN_ENV
    ADMIN_TOKEN_ENV = REST_ADMIN_TOKEN_ENV

    def __init__(self, directory, port, redis_url, token, admin_token=None, **kwargs):
        super().__init__(directory, port, **kwargs)
        self.redis_url = redis_url
        self.token = token
        self.admin_token = admin_token or secrets.token_urlsafe(32)
        if self.admin_token == self.token:
            raise ValueError("the REST front's admin token must differ from its filter token")

    def environment(self):
        env = super().environment()
        for name in (self.TOKEN_ENV, self.ADMIN_TOKEN_ENV):  # never one inherited from the harness
            env.pop(name, None)
            env.pop(name + "_FILE", None)
        env[self.TOKEN_ENV] = self.token
        env[self.ADMIN_TOKEN_ENV] = self.admin_token
        return env

    def command(self):
        return [paths.companion_path(), "rest", "--listen", f"127.0.0.1:{self.port}", "--redis-url", self.redis_url]

    def live(self):
        """`/healthz` answers 200: the front serves HTTP (whether Redis answers or not)."""
        return http_status(self.url + "/healthz") == 200

    def readyz(self):
        """Status of `/readyz`: 200 while Redis answers PING, 503 when not, None when nothing answers."""
        return http_status(self.url + "/readyz")

    def auth_headers(self, token=None):
        return {"authorization": f"Bearer {self.token if token is None else token}"}

    def post(self, path, body, headers=None, token=None):
        """POST raw `body` (bytes) to `path` with the bearer token (or `token`); (status, parsed JSON or text)."""
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={"content-type": "application/json",
                                                  **self.auth_headers(token), **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, data = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, data = err.code, err.read()
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data.decode(errors="replace")

    def call(self, *command, base64=False, token=None):
        """One command (`POST /` with a JSON array) with the filter's token (or `token`);
        (status, answer). With `base64`, the front encodes every string of the result
        (`Upstash-Encoding: base64`)."""
        headers = {"upstash-encoding": "base64"} if base64 else None
        return self.post("/", json.dumps([str(part) for part in command]).encode(), headers=headers, token=token)

    def pipeline(self, *commands, token=None):
        """`POST /pipeline` of several commands with the filter's token (or `token`);
        (status, [answer, …])."""
        return self.post("/pipeline", json.dumps([[str(p) for p in c] for c in commands]).encode(), token=token)
