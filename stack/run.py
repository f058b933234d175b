"""`make run`: the whole stack in the foreground on fixed local ports.

Starts PostgreSQL (its cluster under .run/pg, kept between runs), Redis, the
REST front of Redis (`ibex-companion rest`, the L2 front; `IBEX_L2=webdis`
runs Webdis instead), the companion store and subscriber, the echo upstream
and Envoy with the filter; applies migrations; gives a demo agent a directive;
writes .run/env; prints a curl to try; stops everything on Ctrl-C or SIGTERM.

Envoy runs envoy/local.yaml (agent.source "header"), or the config named by
IBEX_ENVOY_CONFIG, e.g. one of envoy/examples/ (api_key.yaml, jwt.yaml,
header.yaml); the hint it prints fits that config's agent source. Its access
log, the audit trail (one JSON line per request: agent, directive version, tier,
outcome), goes to .run/logs/access.log (the committed configs say /dev/stdout;
the harness points the data listener's file access log at its log directory).

The control listener's bearer token is .run/control-token (mode 0600), made
on the first run and kept: Envoy's config and the subscriber get it, nothing
prints it. The REST front has two tokens, made and kept the same way: the
filter's in .run/rest-token (the front and Envoy's config get it; it runs only
what the filter sends: PING, GET and the filter's EVAL scripts on directive:/
agent_key: keys) and the operators' in .run/rest-admin-token (the front only;
GET, SET with EX, DEL on any key). .run/env (mode 0600) exports them as
IBEX_REDIS_REST_TOKEN and IBEX_REDIS_REST_ADMIN_TOKEN; clients of the front (an
Upstash SDK, curl) use the admin token.

It supervises its parts the way compose's `restart: unless-stopped` would: a part
that exits (killed, crashed) is logged with its exit status and started again on
the same port (Postgres on the same data directory), after 0.5 s, then twice as long
after each quick death, up to 30 s (a part that stayed up 30 s starts again from
0.5 s); the others stay up. Ctrl-C or SIGTERM stops everything and exits 0. So
README's failure table can be tried on the demo stack: kill a part, watch the gateway
answer as the table says, and the part come back by itself.

IBEX_RUN_DIR puts everything under another directory than .run/ (tests run it in
a temporary one), and IBEX_RUN_FREE_PORTS=1 runs every part on a free port instead
of the fixed ones (.run/env names them).

Run it through `make run`, which installs and builds what is missing first.
"""

import json
import os
import re
import secrets
import signal
import sys
import time
from pathlib import Path

from stack import paths
from stack.contract import AGENT_HEADER
from stack.envoy import DATA_LISTENER, filter_json, listener, load_template
from stack.ports import port_is_free
from stack.process import StartError, wait_for_pid_exit
from stack.procfs import cmdline
from stack.stack import L2_FRONTS, Stack, allocate_ports

RUN_DIR = Path(os.environ.get("IBEX_RUN_DIR") or paths.REPO / ".run").resolve()
PID_DIR = RUN_DIR / "pids"
LOG_DIR = RUN_DIR / "logs"
ENV_FILE = RUN_DIR / "env"
TOKEN_FILE = RUN_DIR / "control-token"
REST_TOKEN_FILE = RUN_DIR / "rest-token"
REST_ADMIN_TOKEN_FILE = RUN_DIR / "rest-admin-token"
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9._~+/=-]{32,}")

DEMO_AGENT_ID = "00000000-0000-4000-8000-00000000d0d0"
DEMO_DIRECTIVE = (
    "You are the ibex-directive demo agent. Answer in plain English, keep it short, "
    "and say so when you do not know something."
)

# part -> (port, what it is), IBEX_PORT overrides the gateway.
FIXED_PORTS = {
    "data": (10000, "gateway (Envoy data listener, IBEX_PORT)"),
    "admin": (9901, "Envoy admin"),
    "control": (19000, "Envoy control listener"),
    "upstream": (18000, "echo upstream"),
    "store": (18081, "companion store"),
    "subscriber": (18082, "companion subscriber health"),
    "rest": (18080, "REST front of Redis (companion rest)"),
    "webdis": (17379, "Webdis (IBEX_L2=webdis)"),
    "redis": (16379, "Redis"),
    "postgres": (15432, "PostgreSQL"),
}

RESTART_FIRST = 0.5
"""Seconds before a part that died is started again, the first time."""
RESTART_MAX = 30.0
"""The longest wait before a restart: each quick death doubles it up to this."""
STABLE_AFTER = 30.0
"""A part that stayed up this long counts as well again: its next restart waits RESTART_FIRST."""

# Substrings of /proc/<pid>/cmdline that identify each part's process.
PROCESS_MARKERS = {
    "postgres": "runuser",
    "redis": "redis-server",
    "rest": "ibex-companion",
    "webdis": "webdis",
    "store": "ibex-companion",
    "subscriber": "ibex-companion",
    "upstream": "echo_upstream.py",
    "envoy": "envoy",
    "run": "stack.run",
}


EXAMPLES_DIR = paths.ENVOY_DIR / "examples"
DEMO_PROVIDER_KEY = "sk-demo-provider-key"
"""What Envoy puts in `authorization` for the upstream with envoy/examples/api_key.yaml
when IBEX_PROVIDER_API_KEY is not set: the echo upstream shows it in place of the
client's gateway key."""
COMPANION_CLI = "target/release/ibex-companion"
CHAT_BODY = """'{"model":"demo","messages":[{"role":"user","content":"hello"}]}'"""


def say(message):
    print(f"[make run] {message}", flush=True)


def choose_l2():
    """The L2 front: IBEX_L2 ("rest", the default, or "webdis")."""
    l2 = os.environ.get("IBEX_L2") or "rest"
    if l2 not in L2_FRONTS:
        sys.exit(f"[make run] IBEX_L2={l2}: the L2 front is one of {', '.join(L2_FRONTS)}")
    return l2


def choose_ports(l2):
    """The fixed ports of the parts that run (one L2 front), with the gateway from IBEX_PORT when set."""
    ports = {name: port for name, (port, _) in FIXED_PORTS.items() if name not in L2_FRONTS or name == l2}
    if os.environ.get("IBEX_RUN_FREE_PORTS") == "1":
        return allocate_ports(names=list(ports))
    if os.environ.get("IBEX_PORT"):
        ports["data"] = int(os.environ["IBEX_PORT"])
    return ports


def envoy_template():
    """The Envoy config to run: IBEX_ENVOY_CONFIG (relative to here or to the
    repository), else envoy/local.yaml."""
    given = os.environ.get("IBEX_ENVOY_CONFIG")
    if not given:
        return paths.LOCAL_ENVOY_CONFIG
    for candidate in (Path(given), paths.REPO / given):
        if candidate.is_file():
            return candidate.resolve()
    sys.exit(f"[make run] IBEX_ENVOY_CONFIG={given}: no such file (try one of {relative(EXAMPLES_DIR)}/*.yaml)")


def relative(path):
    """`path` relative to the repository when it is inside it."""
    try:
        return Path(path).resolve().relative_to(paths.REPO)
    except ValueError:
        return Path(path)


def agent_source(template):
    """The data listener's agent.source in `template` ("header" when not set)."""
    return filter_json(listener(load_template(template), DATA_LISTENER)).get("agent", {}).get("source", "header")


def busy_ports(ports):
    """[(port, description)] of the ports something already listens on."""
    return [(port, FIXED_PORTS[name][1]) for name, port in ports.items() if not port_is_free(port)]


def clean_stale_pid_files():
    """Remove pid files of a crashed run; stop its processes if any survived.

    A live `run` pid means another `make run` is active: refuse to start.
    A pid is only signalled when its command line still matches the part, so a
    reused pid never hits someone else's process.
    """
    if not PID_DIR.is_dir():
        return
    run_pid_file = PID_DIR / "run.pid"
    if run_pid_file.exists():
        pid = int(run_pid_file.read_text().strip() or 0)
        if pid and pid != os.getpid() and PROCESS_MARKERS["run"] in cmdline(pid):
            sys.exit(f"[make run] another `make run` is active (pid {pid}); stop it first")
    for pid_file in PID_DIR.glob("*.pid"):
        name = pid_file.stem
        try:
            pid = int(pid_file.read_text().strip())
        except ValueError:
            pid = 0
        marker = PROCESS_MARKERS.get(name)
        if pid and name != "run" and marker and marker in cmdline(pid):
            say(f"stopping {name} (pid {pid}) left over from a previous run")
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            if not wait_for_pid_exit(pid, timeout=10):
                sys.exit(f"[make run] {name} (pid {pid}) from a previous run does not stop; kill it by hand")
        pid_file.unlink()


def kept_token(path, what, unlike=None):
    """The token in `path`, made (random, mode 0600) when missing or unusable
    (or equal to `unlike`, a token it must differ from).

    A file someone else could read is narrowed to 0600 before it is used.
    """
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if TOKEN_SHAPE.fullmatch(token) and token != unlike:
        os.chmod(path, 0o600)
        return token
    token = secrets.token_urlsafe(32)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    say(f"made a {what} in {relative(path)}")
    return token


def control_token():
    """The control listener's token (TOKEN_FILE)."""
    return kept_token(TOKEN_FILE, "control token")


def rest_token():
    """The REST front's filter token (REST_TOKEN_FILE): Envoy's redis.token."""
    return kept_token(REST_TOKEN_FILE, "REST front token")


def rest_admin_token(filter_token):
    """The REST front's admin token (REST_ADMIN_TOKEN_FILE), never the filter's."""
    return kept_token(REST_ADMIN_TOKEN_FILE, "REST front admin token", unlike=filter_token)


def ensure_demo_agent(stack):
    """Give the demo agent its directive unless the store already returns it."""
    status, body = stack.store.directive(DEMO_AGENT_ID)
    if status == 200 and json.loads(body).get("content") == DEMO_DIRECTIVE:
        say(f"demo agent {DEMO_AGENT_ID} already has its directive")
        return
    stack.set_directive(DEMO_AGENT_ID, DEMO_DIRECTIVE)
    say(f"demo agent {DEMO_AGENT_ID} got its directive")


def write_env_file(stack):
    """.run/env (mode 0600: it holds the REST front's tokens): shell exports of every
    URL of the running stack."""
    values = {
        "IBEX_GATEWAY_URL": stack.envoy.url,
        "ENVOY_ADMIN_URL": stack.envoy.admin_url,
        "IBEX_CONTROL_URL": stack.envoy.control_url,
        "IBEX_CONTROL_TOKEN_FILE": TOKEN_FILE,
        "IBEX_STORE_URL": stack.store.url,
        "IBEX_SUBSCRIBER_URL": stack.subscriber.url,
        "IBEX_UPSTREAM_URL": stack.upstream.url,
        "DATABASE_URL": stack.postgres.url,
        "REDIS_URL": stack.redis.url,
        "IBEX_DEMO_AGENT_ID": DEMO_AGENT_ID,
    }
    if stack.l2_part == "rest":
        # The tokens themselves, not also their files: `ibex-companion rest` refuses
        # both a token and a token file, and a shell that sourced this may start one.
        values.update({"IBEX_REDIS_REST_URL": stack.rest.url, "IBEX_REDIS_REST_TOKEN": stack.rest_token,
                       "IBEX_REDIS_REST_ADMIN_TOKEN": stack.rest_admin_token})
    else:
        values["IBEX_WEBDIS_URL"] = stack.webdis.url
    lines = ["# written by `make run`; source it: . .run/env"]
    lines += [f"export {key}='{value}'" for key, value in values.items()]
    ENV_FILE.unlink(missing_ok=True)
    fd = os.open(ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def try_it(source, template):
    """How to send a first request with the config's agent source, and where the others are."""
    chat = "curl -s $IBEX_GATEWAY_URL/v1/chat/completions -H 'content-type: application/json'"
    received = "curl -s $IBEX_UPSTREAM_URL/_demo/received   # what the model got, byte for byte"
    others = f"""
Other agent sources (SPEC 3.1): run an example config instead of envoy/local.yaml,
  IBEX_ENVOY_CONFIG={relative(EXAMPLES_DIR / "api_key.yaml")} make run   gateway keys (ibex-companion issue-key)
  IBEX_ENVOY_CONFIG={relative(EXAMPLES_DIR / "jwt.yaml")} make run       JWTs of your identity provider
                                                             (its issuer and JWKS in a copy first)
"""
    default = (f"Without IBEX_ENVOY_CONFIG, make run runs {relative(paths.LOCAL_ENVOY_CONFIG)}: "
               f"the agent in {AGENT_HEADER}.\n")
    if source == "api_key":
        provider = "from your environment" if os.environ.get("IBEX_PROVIDER_API_KEY") else DEMO_PROVIDER_KEY
        return f"""Try it (agent.source "api_key", {relative(template)}):

  . .run/env
  KEY=$({COMPANION_CLI} issue-key --agent-id $IBEX_DEMO_AGENT_ID --label demo)   # shown once, SHA-256 kept
  {chat} -H "authorization: Bearer $KEY" -d {CHAT_BODY}
  {received}
  {COMPANION_CLI} list-keys --agent-id $IBEX_DEMO_AGENT_ID
  echo "$KEY" | {COMPANION_CLI} revoke-key --key-stdin   # the next request with $KEY gets 401 invalid_api_key

The upstream gets neither the gateway key nor an agent header: Envoy puts the provider's
key in their place (IBEX_PROVIDER_API_KEY: {provider}).
A request without a key gets 401 missing_agent_id, an unknown or revoked key 401 invalid_api_key.
The OpenAI SDKs send their api_key this way: api_key=$KEY, base_url=$IBEX_GATEWAY_URL/v1.
{default}"""
    if source == "jwt":
        return f"""Try it (agent.source "jwt", {relative(template)}):

  . .run/env
  {chat} -H "authorization: Bearer $TOKEN" -d {CHAT_BODY}
  {received}

$TOKEN is a JWT that Envoy's jwt_authn verifies against the JWKS, issuer and audience in
{relative(template)}, with the agent's id in its agent_id claim (here $IBEX_DEMO_AGENT_ID).
The committed example's key pair has no private half: copy it, put your identity
provider's issuer and JWKS in it, and run the copy. A token without the claim gets 401
missing_agent_id; no valid token, 401 from jwt_authn.
{default}"""
    return f"""Try it:

  . .run/env
  {chat} -H "{AGENT_HEADER}: $IBEX_DEMO_AGENT_ID" -d {CHAT_BODY}
  {received}
  tail -n 1 {relative(LOG_DIR)}/access.log   # its audit line: agent, directive_version, tier, outcome

A request without {AGENT_HEADER} gets 401 missing_agent_id (agent.missing "reject").
{others}"""


def l2_front_line(stack):
    """The banner's line about the L2 front."""
    if stack.l2_part == "rest":
        return (f"  redis front    {stack.rest.url}   (REST front, the Upstash REST API; filter token in "
                f"{relative(REST_TOKEN_FILE)}, admin token in "
                f"{relative(REST_ADMIN_TOKEN_FILE)})")
    return f"  redis front    {stack.webdis.url}   (Webdis, IBEX_L2=webdis)"


def l2_hint(stack):
    """How to read L2 through its front."""
    key = "directive:$IBEX_DEMO_AGENT_ID"
    if stack.l2_part == "webdis":
        return f"""L2 is Webdis (IBEX_L2=webdis; the filter's redis.dialect "webdis"):
  curl -s $IBEX_WEBDIS_URL/GET/{key}
Without IBEX_L2, make run runs the REST front (companion rest) instead.
"""
    auth = '-H "authorization: Bearer $IBEX_REDIS_REST_ADMIN_TOKEN"'
    return f"""L2 is the REST front of Redis (ibex-companion rest, the Upstash REST API; the filter's
redis.dialect "upstash"). Envoy has the filter token ($IBEX_REDIS_REST_TOKEN: PING, GET and the
filter's scripts on directive:/agent_key: keys, no SET or DEL); any Upstash client speaks to it
with the admin token:

  . .run/env
  curl -s $IBEX_REDIS_REST_URL {auth} -d '["SET","hello","world","EX","60"]'
  curl -s $IBEX_REDIS_REST_URL/get/hello {auth}
  curl -s $IBEX_REDIS_REST_URL/get/{key} {auth}   # null until a fill wrote it back
  python: upstash_redis.Redis(url=os.environ["IBEX_REDIS_REST_URL"], token=os.environ["IBEX_REDIS_REST_ADMIN_TOKEN"])

A request without a token gets 401, a command outside the front's list (FLUSHALL, KEYS…) 403,
and so does a SET, a DEL or another key with the filter token.
IBEX_L2=webdis make run runs Webdis in its place.
"""


def banner(stack, seconds, template):
    """What a person needs to use the running stack."""
    return f"""
ibex-directive is up in {seconds:.1f}s (Ctrl-C stops everything)

  gateway        {stack.envoy.url}
  envoy admin    {stack.envoy.admin_url}
  control        {stack.envoy.control_url}   (bearer token in {relative(TOKEN_FILE)})
  store          {stack.store.url}
  echo upstream  {stack.upstream.url}   (GET /_demo/received shows what the model got)
  postgres       {stack.postgres.url}
  redis          {stack.redis.url}
{l2_front_line(stack)}
  envoy config   {relative(template)}
  logs           {LOG_DIR}/
  access log     {stack.access_log_path}   (the audit trail: one JSON line per request)
  environment    {ENV_FILE}

{try_it(agent_source(template), template)}
{l2_hint(stack)}"""


def exit_status(process):
    """How a part's child ended ("exit status 1", "killed by SIGKILL"), without reaping it."""
    try:
        info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        info = None
    if info is None:
        return "exit status unknown"
    if info.si_code == os.CLD_EXITED:
        return f"exit status {info.si_status}"
    try:
        return f"killed by {signal.Signals(info.si_status).name}"
    except ValueError:
        return f"killed by signal {info.si_status}"


class Supervisor:
    """Starts again every part of `stack` that exits, with backoff, as compose's
    `restart: unless-stopped` would; the others keep running.

    A part that died is stopped (reaped, what was left of its session killed, its pid
    file removed), and started again on the same port after its backoff: RESTART_FIRST,
    doubled after each death up to RESTART_MAX, and back to RESTART_FIRST once the part
    has stayed up STABLE_AFTER. A restart that fails is logged and tried again the
    same way. Each death and each return is logged with the part's name."""

    def __init__(self, stack, clock=time.monotonic):
        self.stack = stack
        self.clock = clock
        now = clock()
        self.backoff = {name: RESTART_FIRST for name in stack.parts}
        self.up_since = {name: now for name in stack.parts}
        self.due = {}  # part -> when it is started again
        self.restarts = {name: 0 for name in stack.parts}

    def next_due(self):
        """Seconds until the next restart is due (None: none waiting)."""
        return max(0.0, min(self.due.values()) - self.clock()) if self.due else None

    def check(self):
        """Notice parts that exited; start again those whose backoff has passed."""
        for name in self.stack.parts:
            if name in self.due:
                if self.clock() >= self.due[name]:
                    self.restart(name)
                continue
            process = self.stack.part(name)
            if not process.running():
                status = exit_status(process) if process.proc is not None else "not running"
                try:
                    process.stop()
                except Exception as exc:  # noqa: BLE001 - the part is started again whatever is left
                    say(f"cleaning up after {name}: {exc!r}")
                self.schedule(name, f"{name} exited ({status})")

    def schedule(self, name, what):
        now = self.clock()
        if now - self.up_since[name] >= STABLE_AFTER:
            self.backoff[name] = RESTART_FIRST
        delay = self.backoff[name]
        self.backoff[name] = min(delay * 2, RESTART_MAX)
        self.due[name] = now + delay
        say(f"{what}; starting it again in {delay:g} s (its log: {relative(self.stack.part(name).log_path)})")

    def restart(self, name):
        del self.due[name]
        self.restarts[name] += 1
        try:
            self.stack.start(name)
        except Exception as exc:  # noqa: BLE001 - StartError, WaitTimeout, OSError…: try again later
            self.up_since[name] = self.clock()
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.schedule(name, f"{name} did not start again: {first}")
            return
        self.up_since[name] = self.clock()
        say(f"{name} is back (pid {self.stack.part(name).pid}, port {self.stack.part(name).port})")


def supervise(stack):
    """Keep every part running until SIGINT/SIGTERM; return the signal's name."""
    supervisor = Supervisor(stack)
    while True:
        due = supervisor.next_due()
        wait = 0.25 if due is None else min(0.25, max(due, 0.01))
        received = signal.sigtimedwait([signal.SIGINT, signal.SIGTERM], wait)
        if received is not None:
            return signal.Signals(received.si_signo).name
        supervisor.check()


def main():
    RUN_DIR.mkdir(exist_ok=True)
    clean_stale_pid_files()
    l2 = choose_l2()
    ports = choose_ports(l2)
    busy = busy_ports(ports)
    if busy:
        for port, what in busy:
            print(f"[make run] port 127.0.0.1:{port} ({what}) is already in use", file=sys.stderr)
        sys.exit("[make run] free those ports (or set IBEX_PORT for the gateway) and retry")

    # Signals are taken synchronously (sigtimedwait) so startup is never cut halfway.
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT, signal.SIGTERM])
    PID_DIR.mkdir(parents=True, exist_ok=True)
    (PID_DIR / "run.pid").write_text(f"{os.getpid()}\n")
    envoy_env = {}
    if os.environ.get("IBEX_DIRECTIVE_CACHE_TTL"):
        envoy_env["IBEX_DIRECTIVE_CACHE_TTL"] = os.environ["IBEX_DIRECTIVE_CACHE_TTL"]
    # examples/api_key.yaml sends the upstream this instead of the client's gateway key
    envoy_env["IBEX_PROVIDER_API_KEY"] = os.environ.get("IBEX_PROVIDER_API_KEY") or DEMO_PROVIDER_KEY
    template = envoy_template()
    filter_token = rest_token()
    stack = Stack(RUN_DIR, ports=ports, pg_dir=RUN_DIR / "pg", fast_pg=False, pid_dir=PID_DIR, log_dir=LOG_DIR,
                  envoy_env=envoy_env, concurrency=2, control_token=control_token(), envoy_template=template,
                  l2=l2, rest_token=filter_token, rest_admin_token=rest_admin_token(filter_token))
    started = time.monotonic()
    code = 0
    try:
        for name in stack.parts:
            say(f"starting {name}")
            stack.start(name)
        ensure_demo_agent(stack)
        write_env_file(stack)
        print(banner(stack, time.monotonic() - started, template), flush=True)
        reason = supervise(stack)
        say(f"stopping: {reason}")
    except (StartError, RuntimeError, FileNotFoundError) as exc:
        print(f"[make run] {exc}", file=sys.stderr)
        code = 1
    finally:
        stack.stop()
        for leftover in (PID_DIR / "run.pid", ENV_FILE):
            leftover.unlink(missing_ok=True)
        say("everything stopped")
    sys.exit(code)


if __name__ == "__main__":
    main()
