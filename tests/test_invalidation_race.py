"""Fills racing invalidations (SPEC §4, README "No resurrection").

A fill (an L2 or L3 read) that started before an invalidation must not write
its old answer into L1 (the entry's CAS version) or Redis (the conditional
EVAL against the subscriber's tombstone or flush marker) afterwards.

"Before" is made certain with the gate inside Postgres (tests/pg_gate.py): a
lookup held there answers the text of its snapshot even when the directive
changed meanwhile. Holding the gate's lock makes one overtaken fill
deterministic; a delay per lookup makes overtaken fills frequent in the race.
Neither decides a result: every wait is a poll of real state
(pg_stat_activity, Envoy, subscriber and Redis counters).

Also checked: a request that arrives after an invalidation never joins a
fill that started before it, and the outcome of an L2 write-back (sent by the
worker's root context) is counted even when its request ended long before.
"""

import json
import re
import threading
from contextlib import contextmanager

import pytest
import requests

from helpers import (CHAT, agent_with, chat_body, connections_by_worker, json_headers, requests_on_every_worker, send,
                     tier)
from pg_gate import HOLDING_FILTER_CONFIG, install_gate, psql_session, psql_until
from stack import wait_until
from stack.contract import INVALIDATE_PATH, TOMBSTONE, flush_marker_for, redis_key, stored_text, updates_channel
from stack.postgres import quote_literal
from stack.rawhttp import connect, read_response, request_bytes

# Store lookups may be held as long as a test needs; the filter's callouts wait
# for them (and a Redis write-back may wait for Redis, see the write-back test).
FILTER_CONFIG = {**HOLDING_FILTER_CONFIG, "redis": {"timeout_ms": 10000}}

OLD = "Old text, read before the update."
NEW = "New text, committed and published."


@pytest.fixture(scope="module")
def gate(stack):
    """The gate, and the store running as the SELECT-only role it applies to."""
    return install_gate(stack)


# -- requests ---------------------------------------------------------------------------


def directive_in(answer_text):
    """The directive the echo upstream reports as its first message, or None."""
    lines = json.loads(answer_text)["choices"][0]["message"]["content"].splitlines()
    prefix = "[1] system: "
    return lines[1][len(prefix):] if len(lines) > 1 and lines[1].startswith(prefix) else None


class Pending:
    """A chat request sent on a connection of its own (on `worker` when given);
    its answer is read later."""

    def __init__(self, stack, agent, worker=None, limit=200):
        for _ in range(limit):
            before = connections_by_worker(stack)
            sock = connect(stack.envoy.data_port, timeout=60)
            [took] = wait_until(lambda: [w for w, n in connections_by_worker(stack).items()
                                         if n > before.get(w, 0)] or None, what="Envoy to accept the connection")
            if worker is None or took == worker:
                break
            sock.close()
        else:
            raise AssertionError(f"{limit} connections never reached worker {worker}")
        self.sock, self.worker = sock, took
        sock.sendall(request_bytes(CHAT, chat_body(), agent=agent, headers={"connection": "close"}))

    def directive(self):
        """The directive the model got, from the echo's answer (None: none)."""
        try:
            status, _, text = read_response(self.sock)
        finally:
            self.sock.close()
        assert status == 200, text
        return directive_in(text)


def injected(stack, agent):
    """(directive, tier) of one more request for `agent`."""
    stack.upstream.clear()
    assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
    received = stack.upstream.last()
    first = received.json()["messages"][0]
    return (first["content"] if first["role"] == "system" else None), tier(received)


def control_invalidate(stack, agent):
    """Tombstone the agent's L1 entry through the control endpoint (forces a fill)."""
    response = requests.post(f"{stack.envoy.control_url}{INVALIDATE_PATH}/{agent}", headers=stack.control_headers(),
                             timeout=10)
    assert response.status_code == 204


def update(stack, agent, how, content=NEW):
    """Commit `content` and invalidate: a published update, or a flush after an unpublished one."""
    if how == "update":
        stack.set_directive(agent, content)
    else:
        stack.set_directive(agent, content, publish=False)
        stack.flush()


# -- one overtaken fill, deterministic ------------------------------------------------------


@contextmanager
def fill_held(stack, gate, agent):
    """A request for `agent` (a Pending) whose fill waits at the closed gate; the gate opens on exit."""
    gate.add(agent)
    with gate.closed():
        first = Pending(stack, agent)
        wait_until(lambda: gate.waiting() == 1, what="the fill's store lookup to wait at the gate")
        yield first


def test_fill_overtaken_by_an_update_writes_neither_l1_nor_redis(stack, upstream, gate):
    agent = agent_with(stack, OLD)
    counters = stack.envoy.counters()
    with fill_held(stack, gate, agent) as first:
        stack.set_directive(agent, NEW)  # committed, Redis tombstoned, L1 tombstoned
    # its request started before the update, so the old text is its answer ...
    assert first.directive() == OLD
    # ... but the fill's L1 write failed its CAS check, so it queued no write-back
    assert stack.envoy.counter("fill_discarded") == counters["fill_discarded"] + 1
    assert stack.redis.get(redis_key(agent)) == TOMBSTONE
    assert injected(stack, agent) == (NEW, "store")
    assert injected(stack, agent) == (NEW, "local")
    # the only write-back is the new text's, refused by the tombstone
    wait_until(lambda: stack.envoy.counter("l2_write_skipped") > counters["l2_write_skipped"],
               what="the new text's write-back to meet the tombstone")
    assert stack.envoy.counter("l2_write") == counters["l2_write"] + 1
    assert stack.redis.get(redis_key(agent)) == TOMBSTONE


def test_fill_overtaken_by_a_flush_is_stale_at_once_and_kept_out_of_redis(stack, upstream, gate):
    """A flush changes no agent's CAS version: the overtaken fill's L1 write lands,
    but under the generation before the flush (stale at once), and its Redis
    write-back meets the flush marker."""
    agent = agent_with(stack, OLD)
    counters = stack.envoy.counters()
    with fill_held(stack, gate, agent) as first:
        update(stack, agent, "flush")
    assert first.directive() == OLD
    assert stack.envoy.counter("fill_discarded") == counters["fill_discarded"]  # its L1 write landed
    wait_until(lambda: stack.envoy.counter("l2_write_skipped") > counters["l2_write_skipped"],
               what="the old text's write-back to meet the flush marker")
    assert stack.envoy.counter("l2_write") == counters["l2_write"] + 1
    assert stack.redis.get(redis_key(agent)) is None
    assert injected(stack, agent) == (NEW, "store")
    assert injected(stack, agent) == (NEW, "local")


@pytest.mark.parametrize("how", ["update", "flush"])
def test_request_after_an_invalidation_does_not_join_a_fill_from_before_it(stack, upstream, gate, how):
    """The second request lands on the worker whose fill, started before the
    invalidation, is still in flight: it must start a fill of its own."""
    agent = agent_with(stack, OLD)
    with fill_held(stack, gate, agent) as first:
        update(stack, agent, how)  # settled: Postgres, Redis and L1 all say the old text is gone
        coalesced = stack.envoy.counter("coalesced")
        second = Pending(stack, agent, worker=first.worker)
        wait_until(lambda: stack.envoy.counter("coalesced") > coalesced or gate.waiting() == 2,
                   what="the second request to join the fill in flight or to start its own")
        assert stack.envoy.counter("coalesced") == coalesced, "it joined the fill from before the invalidation"
    assert first.directive() == OLD  # started before the update
    assert second.directive() == NEW  # started after it was settled


@pytest.fixture()
def front_waits_for_redis(stack):
    """The REST front waits for Redis as long as the module's filter waits for it (its
    own default, 1 s, would answer 503 first); Webdis has no deadline of its own."""
    if stack.l2_part != "rest":
        yield
        return
    name = "IBEX_REST_REDIS_TIMEOUT_MS"
    stack.rest.stop()
    stack.rest.extra_env[name] = str(FILTER_CONFIG["redis"]["timeout_ms"])
    stack.rest.start()
    try:
        yield
    finally:
        stack.rest.stop()
        del stack.rest.extra_env[name]
        stack.rest.start()


def test_write_back_outcome_is_counted_after_its_request_ended(stack, upstream, gate, front_waits_for_redis):
    """Redis holds the write-back's EVAL until the request is long over; its
    answer (refused: the flush marker exists) must still be counted. Redis stops
    running writes (CLIENT PAUSE WRITE, which holds every EVAL) only once the fill's
    L2 read is done and its store lookup waits at the gate. A new Envoy: no write-back
    of an earlier test may still be on its way."""
    stack.restart_envoy()  # no write-back of an earlier test still in flight to move the counters
    agent = agent_with(stack, "Written back after the request ended.")
    marker = flush_marker_for(redis_key(agent))
    stack.redis.command_call("SET", marker, TOMBSTONE, "EX", 300)  # the EVAL will refuse to write
    counters = stack.envoy.counters()
    try:
        with fill_held(stack, gate, agent) as request:
            stack.redis.command_call("CLIENT", "PAUSE", 300000, "WRITE")  # the EVAL to come waits
        assert request.directive() == "Written back after the request ended."
        assert tier(stack.upstream.last()) == "store"
        # the request is over; the write-back goes out and waits in Redis
        wait_until(lambda: stack.envoy.counter("l2_write") > counters["l2_write"], what="the write-back to go out")
        assert stack.envoy.counter("l2_write_skipped") == counters["l2_write_skipped"]
    finally:
        stack.redis.command_call("CLIENT", "UNPAUSE")
    wait_until(lambda: stack.envoy.counter("l2_write_skipped") > counters["l2_write_skipped"],
               what="the filter to count the refused write-back")
    stack.redis.command_call("DEL", marker)
    assert stack.envoy.counter("l2_write_error") == counters["l2_write_error"]
    assert stack.envoy.counter("l2_error") == counters["l2_error"], "the L2 read was held too"
    assert stack.redis.get(redis_key(agent)) is None


# -- many updates racing fills -----------------------------------------------------------

CLIENTS = 4
LOOKUP_DELAY_MS = 5  # the race agent's store lookups, after their snapshot: fills span updates
REQUESTS_AFTER_LAST_UPDATE = 20  # client requests that race a round's last update before the check
VERSION = re.compile(r"^Race directive, version (\d+)\.$")


def version(k):
    return f"Race directive, version {k}."


def version_of(text):
    """The version number in a directive text (None for anything else)."""
    match = VERSION.match(text) if isinstance(text, str) else None
    return int(match.group(1)) if match else None


class Traffic:
    """CLIENTS threads requesting the agent on fresh connections until stopped.

    `settled` is the last update the main thread saw settled; each request and
    each Redis read records the value it had when it began.
    """

    def __init__(self, stack, agent):
        self.stack, self.agent = stack, agent
        self.url = stack.gateway_url + CHAT
        self.headers = json_headers(agent, {"connection": "close"})
        self.body = chat_body()
        self.settled = 0
        self.lock = threading.Lock()
        self.served = []  # (settled when the request began, version it carried)
        self.redis_reads = []  # (settled when the read began, value)
        self.errors = []
        self.stopping = threading.Event()
        self.threads = []

    def client(self):
        while not self.stopping.is_set():
            try:
                began = self.settled
                response = requests.post(self.url, data=self.body, headers=self.headers, timeout=60)
                assert response.status_code == 200, response.text
                served = (began, version_of(directive_in(response.text)))
                read_began = self.settled
                value = self.stack.redis.get(redis_key(self.agent))
                with self.lock:
                    self.served.append(served)
                    self.redis_reads.append((read_began, value))
            except Exception as exc:  # noqa: BLE001 - reported by the test
                with self.lock:
                    self.errors.append(repr(exc))
                return

    def served_since(self, settled):
        with self.lock:
            return sum(1 for began, _ in self.served if began >= settled)

    def __enter__(self):
        self.stopping.clear()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(CLIENTS)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in self.threads), "a client did not stop"
        return False


class Sql:
    """One psql session kept open: an update costs a round trip, not a process."""

    def __init__(self, stack):
        self.proc = psql_session(stack)
        self.done = 0

    def run(self, statement):
        self.done += 1
        self.proc.stdin.write(f"{statement};\n\\echo done-{self.done}\n")
        self.proc.stdin.flush()
        psql_until(self.proc, f"done-{self.done}")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def sql_update(agent, content):
    """A writer that is not ours: a new version row, made the active one."""
    return ("WITH v AS (INSERT INTO ibex_core.directive_versions (directive_id, content) "
            f"SELECT id, {quote_literal(content)} FROM ibex_core.directives "
            f"WHERE agent_id = {quote_literal(agent)} AND is_active RETURNING id, directive_id) "
            "UPDATE ibex_core.directives d SET active_version_id = v.id, updated_at = now() "
            "FROM v WHERE d.id = v.directive_id")


def admin_writer(stack):
    """set-directive (companion CLI): commits, publishes, returns once settled."""

    def apply(agent, k):
        stack.set_directive(agent, version(k))

    return apply


def foreign_writer(stack, sql):
    """SQL through one open session, PUBLISH straight to Redis, then wait for the
    subscriber to settle it: a few milliseconds per update."""

    def apply(agent, k):
        sql.run(sql_update(agent, version(k)))
        before = stack.subscriber.settled_invalidations()
        assert stack.redis.command_call("PUBLISH", updates_channel(agent), "") == 1
        wait_until(lambda: stack.subscriber.settled_invalidations() > before, interval=0.001,
                   what="the subscriber to settle the update")

    return apply


def redis_value_ok(value, settled_before):
    """A Redis read that began once update `settled_before` was settled may see
    the tombstone, nothing, or a version at least that new."""
    if value in (None, TOMBSTONE):
        return True
    number = version_of(stored_text(value))
    return number is not None and number >= settled_before


def race(stack, gate, apply_update, rounds, updates_per_round, record_property):
    """Rounds of updates while the clients run. The last update of a round
    always overtakes a fill: with the gate closed, the agent's L1 entry is
    tombstoned so the clients' next requests start fills, and the update is
    made and settled while their lookups wait at the gate with the previous
    version in their snapshot. Then the clients race the settled update a
    while, stop, and nothing may serve or hold an older version any more.

    Throughout: a client request that began after update k was settled
    carries version k or newer, and so does any Redis read (or it sees the
    tombstone or nothing)."""
    agent = agent_with(stack, version(0))
    gate.add(agent, delay_ms=LOOKUP_DELAY_MS)
    key = redis_key(agent)
    counters = stack.envoy.counters()
    k = 0
    traffic = Traffic(stack, agent)
    for _ in range(rounds):
        with traffic:
            for _ in range(updates_per_round - 1):
                k += 1
                apply_update(agent, k)
                traffic.settled = k
                assert redis_value_ok(stack.redis.get(key), k)
            with gate.closed():
                control_invalidate(stack, agent)
                wait_until(lambda: gate.waiting() >= 1 or traffic.errors, what="a fill to wait at the gate")
                k += 1
                apply_update(agent, k)
                traffic.settled = k
            wait_until(lambda: traffic.served_since(k) >= REQUESTS_AFTER_LAST_UPDATE or traffic.errors,
                       what="client requests after the round's last update")
        assert traffic.errors == []
        # no client runs now, so nothing is in flight: what the caches hold is final
        for worker, response in requests_on_every_worker(stack, CHAT, chat_body(), agent, at_least=10,
                                                         per_worker=3):
            assert response.status_code == 200
            assert directive_in(response.text) == version(k), f"worker {worker} served an old directive"
            value = stack.redis.get(key)
            assert stored_text(value) in (None, version(k)), f"Redis holds {value!r} after version {k}"
    assert all(seen is not None for _, seen in traffic.served), "a request went up without a directive"
    old_served = [(began, seen) for began, seen in traffic.served if seen < began]
    assert old_served == [], "requests that began after an update was settled carried an older version"
    stale_reads = [(began, value) for began, value in traffic.redis_reads if not redis_value_ok(value, began)]
    assert stale_reads == [], "Redis held a version older than one already settled"

    after = stack.envoy.counters()
    report = {"updates": k, "client_requests": len(traffic.served)}
    for name in ("l1_miss", "coalesced", "l3_hit", "fill_discarded", "l2_write", "l2_write_skipped"):
        report[name] = after[name] - counters[name]
    for name, value in report.items():
        record_property(name, value)
    print(f"race report: {report}")


def test_admin_updates_racing_fills_leave_no_old_directive(stack, gate, record_property):
    race(stack, gate, admin_writer(stack), rounds=4, updates_per_round=25, record_property=record_property)


def test_foreign_updates_racing_fills_leave_no_old_directive(stack, gate, record_property):
    sql = Sql(stack)
    try:
        race(stack, gate, foreign_writer(stack, sql), rounds=6, updates_per_round=40,
             record_property=record_property)
    finally:
        sql.close()
