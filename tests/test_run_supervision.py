"""`make run` supervises its parts (stack/run.py) as compose's `restart: unless-stopped`
would: a part killed with SIGKILL is logged with its exit status and started again
on its port, the gateway meanwhile answers as README's failure table says, and once
the part is back the gateway uses it again; SIGINT stops everything.

`python -m stack.run` runs here as `make run` runs it, in a temporary directory
(IBEX_RUN_DIR) on free ports (IBEX_RUN_FREE_PORTS=1), never in a developer's .run/.
Only what is deterministic is asserted meanwhile: an agent whose directive sits in
Envoy's L1 is served with it whichever part is down (an agent with nothing cached may
or may not find the part already back). Which part served afterwards is known from
where the agent's directive is: in Postgres only (the store), or in Redis only
(written through the REST front with its admin token: Redis and the front).
"""

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from stack import wait_until
from stack.companion import Companion
from stack.contract import AGENT_HEADER, directive_value, redis_key
from stack.ports import http_status
from stack.process import die_with_parent, wait_for_pid_exit
from stack.run import DEMO_AGENT_ID, DEMO_DIRECTIVE

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
BODY = b'{"model":"demo","messages":[{"role":"user","content":"hello"}]}'
BACK = 60.0  # a part comes back within this (its backoff, then its own readiness)


class Run:
    """The running `python -m stack.run`: its directory, the URLs of .run/env, its output."""

    def __init__(self, directory):
        self.dir = directory
        self.pid_dir = directory / "pids"
        self.output = directory / "make-run.out"
        env = dict(os.environ, IBEX_RUN_DIR=str(directory), IBEX_RUN_FREE_PORTS="1")
        for name in ("IBEX_PORT", "IBEX_L2", "IBEX_ENVOY_CONFIG", "IBEX_DIRECTIVE_CACHE_TTL"):
            env.pop(name, None)
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "stack.run"], cwd=ROOT, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=die_with_parent)
        wait_until(self.up, timeout=180, what="make run to be up")
        self.env = read_env(directory / "env")
        self.companion = Companion(self.env["DATABASE_URL"], self.env["REDIS_URL"], directory=directory)

    def up(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"make run exited ({self.proc.returncode}):\n{self.text()[-3000:]}")
        return "ibex-directive is up" in self.text()

    def text(self):
        return self.output.read_text(errors="replace")

    def pid(self, part):
        """The pid in the part's pid file, or None while it has none."""
        try:
            return int((self.pid_dir / f"{part}.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def pids(self):
        return {path.stem: int(path.read_text().strip()) for path in self.pid_dir.glob("*.pid")}

    def postmaster_pid(self):
        return int((self.dir / "pg" / "data" / "postmaster.pid").read_text().splitlines()[0])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def read_env(path):
    """{name: value} of the `export NAME='value'` lines `make run` wrote."""
    values = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            values[name] = value.strip("'")
    return values


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    running = Run(tmp_path_factory.mktemp("make-run"))
    try:
        yield running
    finally:
        running.stop()


def injected(run, agent):
    """(status, the system message the upstream got or None) of one request of `agent`."""
    response = requests.post(run.env["IBEX_GATEWAY_URL"] + CHAT, data=BODY, timeout=30,
                             headers={"content-type": "application/json", AGENT_HEADER: agent})
    if response.status_code != 200:
        return response.status_code, None
    lines = response.json()["choices"][0]["message"]["content"].split("\n")
    first = lines[1] if len(lines) > 1 else ""
    return 200, first[len("[1] system: "):] if first.startswith("[1] system: ") else None


def served(run, agent, text):
    return injected(run, agent) == (200, text)


def kill(run, part):
    """SIGKILL the part's process (Postgres: the postmaster itself); its pid."""
    pid = run.postmaster_pid() if part == "postgres" else run.pid(part)
    assert pid, f"no pid of {part}"
    os.kill(pid, signal.SIGKILL)
    return pid


def back(run, part, old_pid):
    """Wait until `make run` logged the part's return under a new pid; the new pid."""
    def returned():
        pid = run.pid(part)
        return pid if pid and pid != old_pid and f"{part} is back (pid {pid}" in run.text() else None
    return wait_until(returned, timeout=BACK, what=f"{part} to be started again")


def warm(run):
    """The demo agent's directive in every L1 the next requests may hit (L1 is shared by
    Envoy's workers): served now, so served from L1 for its TTL, whatever is down."""
    wait_until(lambda: served(run, DEMO_AGENT_ID, DEMO_DIRECTIVE), timeout=BACK, what="the demo directive")


def postgres_only_agent(run, text):
    agent = str(uuid.uuid4())
    run.companion.set_directive(agent, text, publish=False)
    return agent


def served_from_redis(run):
    """An agent whose directive only Redis holds (written through the REST front with the
    operators' token) is served with it: the gateway reads Redis through the front. A new
    agent each try (a miss is cached as "no directive"), written again each try (the
    subscriber's flush after Redis came back may sweep it)."""
    def attempt():
        agent = str(uuid.uuid4())
        text = f"only in Redis, {agent}"
        command = ["SET", redis_key(agent), directive_value(text, str(uuid.uuid4())), "EX", "60"]
        response = requests.post(run.env["IBEX_REDIS_REST_URL"], data=json.dumps(command), timeout=10,
                                 headers={"authorization": f"Bearer {run.env['IBEX_REDIS_REST_ADMIN_TOKEN']}"})
        return response.status_code == 200 and served(run, agent, text)
    wait_until(attempt, timeout=BACK, what="a directive only Redis holds to be served")


def test_demo_stack_serves_the_demo_directive(run):
    assert served(run, DEMO_AGENT_ID, DEMO_DIRECTIVE)


def test_store_killed_is_started_again_with_backoff(run):
    warm(run)
    first = kill(run, "store")
    # README: store down → 200 with the last known directive while L1 holds an entry
    assert served(run, DEMO_AGENT_ID, DEMO_DIRECTIVE)
    pid = back(run, "store", first)
    assert "store exited (killed by SIGKILL); starting it again in 0.5 s" in run.text()
    assert http_status(run.env["IBEX_STORE_URL"] + "/readyz") == 200
    agent = postgres_only_agent(run, "from the store again")
    wait_until(lambda: served(run, agent, "from the store again"), timeout=BACK, what="the store to serve again")
    # a second death soon after the first waits twice as long
    back(run, "store", kill(run, "store"))
    assert "store exited (killed by SIGKILL); starting it again in 1 s" in run.text()
    assert pid != run.pid("store")


def test_redis_killed_is_started_again(run):
    warm(run)
    old = kill(run, "redis")
    # README: Redis down (REST front up) → 200 with the directive (L1, else the store)
    assert served(run, DEMO_AGENT_ID, DEMO_DIRECTIVE)
    back(run, "redis", old)
    assert "redis exited (killed by SIGKILL)" in run.text()
    wait_until(lambda: http_status(run.env["IBEX_REDIS_REST_URL"] + "/readyz") == 200, timeout=BACK,
               what="the REST front to reach Redis again")
    served_from_redis(run)


def test_rest_front_killed_is_started_again(run):
    warm(run)
    old = kill(run, "rest")
    # README: REST front down → 200 with the directive (L1, else the store)
    assert served(run, DEMO_AGENT_ID, DEMO_DIRECTIVE)
    back(run, "rest", old)
    assert "rest exited (killed by SIGKILL)" in run.text()
    assert http_status(run.env["IBEX_REDIS_REST_URL"] + "/readyz") == 200
    served_from_redis(run)


def test_postgres_killed_is_started_again_on_its_data(run):
    warm(run)
    old = run.pid("postgres")  # runuser, in front of the postmaster
    kill(run, "postgres")
    # README: Postgres down → as for the store
    assert served(run, DEMO_AGENT_ID, DEMO_DIRECTIVE)
    back(run, "postgres", old)
    assert "postgres exited (" in run.text()
    # same data directory: what was in Postgres before is still there
    agent = postgres_only_agent(run, "after Postgres came back")
    wait_until(lambda: served(run, agent, "after Postgres came back"), timeout=BACK,
               what="the store to reach Postgres again")
    answer = requests.get(f"{run.env['IBEX_STORE_URL']}/v1/agents/{DEMO_AGENT_ID}/directive", timeout=10)
    assert answer.json()["content"] == DEMO_DIRECTIVE


def test_subscriber_killed_is_started_again(run):
    agent = postgres_only_agent(run, "before the subscriber died")
    wait_until(lambda: served(run, agent, "before the subscriber died"), timeout=BACK, what="the agent cached")
    back(run, "subscriber", kill(run, "subscriber"))
    wait_until(lambda: http_status(run.env["IBEX_SUBSCRIBER_URL"] + "/readyz") == 200, timeout=BACK,
               what="the subscriber subscribed again")
    run.companion.set_directive(agent, "published after it came back")  # Postgres, then PUBLISH
    wait_until(lambda: served(run, agent, "published after it came back"), timeout=BACK,
               what="the update to reach Envoy through the new subscriber")


def test_envoy_killed_is_started_again(run):
    old = kill(run, "envoy")
    back(run, "envoy", old)
    assert "envoy exited (killed by SIGKILL)" in run.text()
    warm(run)


def test_sigint_stops_everything(run):
    pids = run.pids()
    pids["postmaster"] = run.postmaster_pid()
    run.proc.send_signal(signal.SIGINT)
    assert run.proc.wait(timeout=90) == 0
    assert "everything stopped" in run.text()
    alive = {name: pid for name, pid in pids.items() if not wait_for_pid_exit(pid, timeout=10)}
    assert not alive, f"still running after make run stopped: {alive}"
