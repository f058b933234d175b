"""Callout timeouts that hold, and the circuit breakers around them.

A TCP listener that accepts connections and never answers stands in for
the L2 front (the REST front, `companion rest`), then for the store, then for
both (Envoy's ibex_redis / ibex_store cluster is pointed at it); then the REST
front itself hangs, because Redis behind it is frozen (SIGSTOP). Every request
must still finish, and take no longer than a generous bound over its
configured timeouts (a correctness bound, not a benchmark): with the directive
via the store when only L2 hangs, with 503 directive_unavailable (failure_mode
closed) when the store cannot answer. After 5 consecutive failures on a worker
the tier's breaker opens and later requests skip it.

Envoy runs one worker in these tests: the breakers are per worker, and Envoy
may close a connection after a local reply (503), so a client could not stay
on one worker by keeping its connection. With one worker, five failures are
five failures of the one breaker.

Then the REST front is killed for real (SIGKILL): the L2 breaker opens, and
once it is started again the breaker's probe closes it and Redis answers
again. Last, a probe whose request goes away (the client disconnects while
the probe hangs) must not keep its breaker open for good.
"""

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from chaos_helpers import HangingServer
from helpers import CHAT, agent_with, assert_chat_injected, chat_body, error_code, json_headers, new_agent, tier
from stack import wait_until
from stack.contract import redis_key
from stack.rawhttp import connect, request_bytes

REDIS_TIMEOUT_MS = 200
STORE_TIMEOUT_MS = 600
FILTER_CONFIG = {
    "redis": {"timeout_ms": REDIS_TIMEOUT_MS},
    "store": {"timeout_ms": STORE_TIMEOUT_MS},
    "failure_mode": "closed",
    "debug_headers": True,
}
THRESHOLD = 5          # consecutive failures that open a breaker (src/worker.rs)
BREAKER_DEADLINE = 30  # s: a 3 s cool-off, one probe, and a wide margin for a loaded machine
DEADLINE = 30          # s: for anything else polled (a deadline, never a wait for success)


def bound(*timeouts_ms):
    """Generous upper bound of a request that waits out these timeouts: 4 × their sum + 1 s."""
    return 4 * sum(timeouts_ms) / 1000 + 1.0


@pytest.fixture()
def hanging():
    with HangingServer() as server:
        yield server


@pytest.fixture()
def client(stack):
    """A keep-alive client of the gateway; returns (response, seconds taken)."""
    with requests.Session() as session:
        def send(agent, body=None):
            started = time.monotonic()
            response = session.post(stack.gateway_url + CHAT, data=body or chat_body(), timeout=30,
                                    headers=json_headers(agent))
            return response, time.monotonic() - started
        yield send


@pytest.fixture()
def restore(stack):
    """Afterwards: every part running, Envoy with the module's settings, pointing at the stack."""
    yield
    for name in (stack.l2_part, "store", "subscriber"):
        stack.start(name)
    stack.restart_envoy(filter_config=FILTER_CONFIG, cluster_ports={}, concurrency=2)


def test_hanging_l2_front_costs_its_timeout_then_is_skipped(stack, upstream, hanging, client, restore):
    stack.restart_envoy(filter_config=FILTER_CONFIG, concurrency=1, cluster_ports={"ibex_redis": hanging.port})
    limit = bound(REDIS_TIMEOUT_MS)
    took_all = []
    for attempt in range(1, THRESHOLD + 1):
        directive = f"Through the store, attempt {attempt}."
        agent = agent_with(stack, directive)  # cold: L1 misses, L2 is asked
        body = chat_body()
        response, took = client(agent, body)
        assert response.status_code == 200, response.text
        took_all.append(round(took, 3))
        assert took <= limit, f"request {attempt} took {took:.2f} s with a {REDIS_TIMEOUT_MS} ms Redis timeout"
        received = upstream.last()
        assert_chat_injected(body, received.body, directive)
        assert tier(received) == "store"
        assert stack.envoy.counter("l2_error") == attempt
    assert hanging.accepted >= 1, "the callouts went to the hanging server"
    assert stack.envoy.counter("l2_breaker_open") == 1

    # The breaker is open: the next request does not ask Redis at all.
    agent = agent_with(stack, "Redis skipped.")
    response, took = client(agent)
    assert response.status_code == 200
    assert tier(upstream.last()) == "store"
    assert stack.envoy.counter("l2_skipped") == 1
    assert stack.envoy.counter("l2_error") == THRESHOLD
    print(f"\nthe L2 front hangs: {took_all} s while failing, {took:.3f} s once skipped")


# The first bytes of an answer of each dialect, whose rest never comes.
STALLED = {
    "upstash": b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"result":"',
    "webdis": b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n$5\r\n",
}


def test_a_callout_that_fails_after_its_headers_is_a_tier_error_not_a_crash(stack, upstream, client, restore):
    """The L2 front answers headers, then the body never comes and the callout times
    out: Envoy reports the failure with no response headers, and reading them anyway
    made the SDK panic (the VM crashed, the request hung). It is an L2 error now,
    answered by the store."""
    with HangingServer(answer=STALLED[stack.l2_dialect]) as front:
        stack.restart_envoy(filter_config=FILTER_CONFIG, concurrency=1, cluster_ports={"ibex_redis": front.port})
        for attempt in range(1, 4):
            directive = f"Through the store after a stalled Redis answer, {attempt}."
            agent = agent_with(stack, directive)
            body = chat_body()
            response, _ = client(agent, body)
            assert response.status_code == 200, response.text
            assert_chat_injected(body, upstream.last().body, directive)
            assert tier(upstream.last()) == "store"
            assert stack.envoy.counter("l2_error") == attempt
        assert front.accepted >= 1
    assert "panicked" not in Path(stack.envoy.server_log_path).read_text(errors="replace")


def test_hanging_store_fails_closed_within_its_timeout_then_is_skipped(stack, upstream, hanging, client, restore):
    stack.restart_envoy(filter_config=FILTER_CONFIG, concurrency=1, cluster_ports={"ibex_store": hanging.port})
    limit = bound(REDIS_TIMEOUT_MS, STORE_TIMEOUT_MS)
    upstream.clear()
    took_all = []
    for attempt in range(1, THRESHOLD + 1):
        agent = agent_with(stack, "Unknowable while the store hangs.")  # Redis has no key for it
        response, took = client(agent)
        assert response.status_code == 503, response.text
        assert error_code(response) == "directive_unavailable"
        took_all.append(round(took, 3))
        assert took <= limit, f"request {attempt} took {took:.2f} s with a {STORE_TIMEOUT_MS} ms store timeout"
        assert stack.envoy.counter("l3_error") == attempt
    assert stack.envoy.counter("l2_miss") == THRESHOLD
    assert stack.envoy.counter("l3_breaker_open") == 1

    response, took = client(agent_with(stack, "Store skipped."))
    print(f"\nstore hangs: {took_all} s while failing, {took:.3f} s once skipped")
    assert response.status_code == 503
    assert stack.envoy.counter("l3_skipped") == 1
    assert stack.envoy.counter("l3_error") == THRESHOLD
    assert upstream.received() == [], "nothing reached the upstream without its directive"


def test_both_hanging_fail_closed_within_both_timeouts_then_are_skipped(stack, upstream, hanging, client, restore):
    stack.restart_envoy(filter_config=FILTER_CONFIG, concurrency=1,
                        cluster_ports={"ibex_redis": hanging.port, "ibex_store": hanging.port})
    limit = bound(REDIS_TIMEOUT_MS, STORE_TIMEOUT_MS)
    upstream.clear()
    took_all = []
    for attempt in range(1, THRESHOLD + 1):
        response, took = client(agent_with(stack, "Unknowable while both hang."))
        took_all.append(round(took, 3))
        assert response.status_code == 503, response.text
        assert error_code(response) == "directive_unavailable"
        assert took <= limit, f"request {attempt} took {took:.2f} s (timeouts {REDIS_TIMEOUT_MS} + {STORE_TIMEOUT_MS} ms)"
        assert stack.envoy.counter("l2_error") == attempt
        assert stack.envoy.counter("l3_error") == attempt
    assert stack.envoy.counter("l2_breaker_open") == 1
    assert stack.envoy.counter("l3_breaker_open") == 1

    response, took = client(agent_with(stack, "Both skipped."))
    print(f"\nboth hang: {took_all} s while failing, {took:.3f} s once skipped")
    assert response.status_code == 503
    assert error_code(response) == "directive_unavailable"
    assert stack.envoy.counter("l2_skipped") == 1
    assert stack.envoy.counter("l3_skipped") == 1
    assert (stack.envoy.counter("l2_error"), stack.envoy.counter("l3_error")) == (THRESHOLD, THRESHOLD)
    assert upstream.received() == []


def test_waiters_finish_in_time_when_the_request_that_asked_went_away(stack, upstream, hanging, restore):
    """Requests that joined another request's fill (coalescing) while both tiers
    hang still get their 503 in bounded time when the request whose callout
    they wait for is abandoned by its client (the filter re-asks on a 200 ms tick)."""
    stack.restart_envoy(filter_config=FILTER_CONFIG, concurrency=1,
                        cluster_ports={"ibex_redis": hanging.port, "ibex_store": hanging.port})
    upstream.clear()
    agent = agent_with(stack, "Wanted by many.")
    body = chat_body()
    raw = request_bytes(CHAT, body, agent=agent)
    abandoned = []
    for _ in range(4):
        sock = connect(stack.envoy.data_port)
        sock.sendall(raw)
        abandoned.append(sock)
    wait_until(lambda: stack.envoy.counter("l1_miss") >= 4, timeout=DEADLINE,
               what="the first requests to start their fills")

    results = []

    def waiter():
        started = time.monotonic()
        response = requests.post(stack.gateway_url + CHAT, data=body, timeout=30, headers=json_headers(agent))
        results.append((response.status_code, error_code(response), time.monotonic() - started))

    threads = [threading.Thread(target=waiter) for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_until(lambda: stack.envoy.counter("l1_miss") >= 12, timeout=DEADLINE, what="every waiter to reach the filter")
    for sock in abandoned:
        sock.close()
    for thread in threads:
        thread.join(timeout=60)
    limit = bound(REDIS_TIMEOUT_MS, STORE_TIMEOUT_MS, 200)
    assert len(results) == 8
    assert [(status, code) for status, code, _ in results] == [(503, "directive_unavailable")] * 8
    print(f"\nwaiters of an abandoned fill: {sorted(round(t, 3) for _, _, t in results)} s")
    assert max(took for _, _, took in results) <= limit, results
    assert stack.envoy.counter("coalesced") >= 1
    assert upstream.received() == []


def test_the_rest_front_hanging_on_a_frozen_redis_costs_the_timeout_then_is_skipped(stack, upstream, client,
                                                                                     restore):
    """Redis is frozen (SIGSTOP) behind the running REST front: the front accepts the
    filter's calls and waits on Redis, so L2 hangs for real. Each L1 miss costs at most
    redis.timeout_ms, the store answers, and after five the breaker skips L2. Once Redis
    runs again (SIGCONT) the front answers by itself and the breaker's probe closes it.
    The subscriber, whose link would time out too, is stopped meanwhile and started
    again afterwards (its initial flush awaited)."""
    if stack.l2_part != "rest":
        pytest.skip("the REST front's own wait on Redis")
    stack.restart_envoy(filter_config=FILTER_CONFIG, concurrency=1, cluster_ports={})
    agents = {agent_with(stack, f"Redis frozen, attempt {n}."): f"Redis frozen, attempt {n}."
              for n in range(1, THRESHOLD + 2)}  # in Postgres before Redis freezes
    stack.stop("subscriber")
    limit = bound(REDIS_TIMEOUT_MS)
    took_all = []
    redis_pid = stack.redis.pid
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        for attempt, (agent, directive) in enumerate(agents.items(), start=1):
            body = chat_body()
            response, took = client(agent, body)
            assert response.status_code == 200, response.text
            took_all.append(round(took, 3))
            received = upstream.last()
            assert_chat_injected(body, received.body, directive)
            assert tier(received) == "store"
            if attempt <= THRESHOLD:
                assert took <= limit, f"request {attempt} took {took:.2f} s with a {REDIS_TIMEOUT_MS} ms Redis timeout"
                assert stack.envoy.counter("l2_error") == attempt
        assert stack.envoy.counter("l2_breaker_open") == 1
        assert stack.envoy.counter("l2_skipped") == 1
        assert stack.envoy.counter("l2_error") == THRESHOLD
        assert stack.rest.running() and stack.rest.live(), "the front serves HTTP while Redis is frozen"
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    print(f"\nRedis frozen behind the REST front: {took_all} s")
    wait_until(stack.rest.ready, timeout=DEADLINE, what="the REST front to reach Redis again")
    stack.start("subscriber")

    def probe_closed_the_breaker():
        response, _ = client(new_agent())
        assert response.status_code == 200
        return stack.envoy.counter("l2_breaker_close") >= 1

    wait_until(probe_closed_the_breaker, timeout=BREAKER_DEADLINE, interval=0.2,
               what="the L2 breaker to close after Redis runs again")
    agent = new_agent()
    stack.redis.command_call("SET", redis_key(agent), "Redis runs again.", "EX", 60)
    response, _ = client(agent)
    assert response.status_code == 200
    assert tier(upstream.last()) == "redis"


def test_l2_breaker_opens_when_the_l2_front_dies_and_closes_when_it_is_back(stack, upstream, client, restore):
    stack.restart_envoy(filter_config=FILTER_CONFIG, concurrency=1, cluster_ports={})
    stack.l2.kill()
    for attempt in range(1, THRESHOLD + 1):
        directive = f"The L2 front is dead, attempt {attempt}."
        response, _ = client(agent_with(stack, directive))
        assert response.status_code == 200
        assert tier(upstream.last()) == "store"
    assert stack.envoy.counter("l2_error") == THRESHOLD
    assert stack.envoy.counter("l2_breaker_open") == 1
    assert stack.envoy.counter("l2_breaker_close") == 0

    stack.start(stack.l2_part)
    back = time.monotonic()

    def probe_closed_the_breaker():
        # One cold agent per poll: its L1 miss is what lets the probe through after the cool-off.
        response, _ = client(agent_with(stack, "Probe."))
        assert response.status_code == 200
        return stack.envoy.counter("l2_breaker_close") >= 1

    wait_until(probe_closed_the_breaker, timeout=BREAKER_DEADLINE, interval=0.2,
               what="the L2 breaker to close after the L2 front is back")
    closed_after = time.monotonic() - back

    # Redis answers again: an agent known only to Redis is served from it, then from L1.
    agent = new_agent()
    stack.redis.command_call("SET", redis_key(agent), "Straight from Redis.", "EX", 60)
    for expected_tier in ("redis", "local"):
        body = chat_body()
        response, _ = client(agent, body)
        assert response.status_code == 200
        received = upstream.last()
        assert tier(received) == expected_tier
        assert_chat_injected(body, received.body, "Straight from Redis.")
    print(f"\nL2 breaker closed {closed_after:.2f} s after the L2 front was back; counters {stack.envoy.counters()}")


# -- a probe whose request goes away ------------------------------------------------
#
# After the cool-off a breaker lets one probe through and skips its tier until the
# probe reports. When the probe's request goes away first (client disconnect), its
# fill is dropped and Envoy cancels the callout: no answer ever reports. Before
# 57c2f9d that left the breaker open for good on that worker (L3: every uncached
# agent 503 although the store was back; L2: every L1 miss to the store); now a
# lost probe expires after the cool-off. These tests abandon the probe for real.

class StuckBreaker(AssertionError):
    """The breaker never let a probe through again although its tier is back."""


SLOW_MS = 3000  # the hanging tier's timeout: the probe is abandoned long before it


def abandon_the_probe(stack, decided, skipped, agent_for):
    """Send one request per poll, each on a new connection, until one is the breaker's
    probe, and close that connection while the probe hangs at the tier.

    `decided` is the counter that moves in the same callback as the breaker's decision
    (l1_miss for L2, l2_miss for L3); a request is the probe when `skipped` did not move
    with it and no answer comes back (a skipped request is answered at once)."""

    def attempt():
        before = stack.envoy.counters()
        with connect(stack.envoy.data_port) as sock:
            sock.sendall(request_bytes(CHAT, chat_body(), agent=agent_for()))
            wait_until(lambda: stack.envoy.counter(decided) > before[decided], timeout=DEADLINE,
                       what=f"{decided} to count the request")
            if stack.envoy.counter(skipped) > before[skipped]:
                sock.recv(65536)  # skipped: answered at once
                return False
            sock.settimeout(0.5)
            try:
                return not sock.recv(65536)  # an answer: not the probe (the tier hangs for SLOW_MS)
            except socket.timeout:
                return True  # the probe hangs at the tier; closing the connection abandons it

    wait_until(attempt, timeout=BREAKER_DEADLINE, interval=0.05, what="the breaker's probe")


def wait_for_close(stack, send, closed):
    try:
        wait_until(lambda: send() and stack.envoy.counter(closed) >= 1, timeout=BREAKER_DEADLINE, interval=0.2,
                   what=f"{closed} after the tier is back")
    except AssertionError as exc:
        raise StuckBreaker(f"{exc}; counters {stack.envoy.counters()}") from None


def test_l3_breaker_recovers_when_its_probe_request_is_abandoned(stack, upstream, client, restore):
    stack.restart_envoy(filter_config={**FILTER_CONFIG, "store": {"timeout_ms": SLOW_MS}}, concurrency=1,
                        cluster_ports={})
    stack.store.kill()
    for _ in range(THRESHOLD):
        response, _ = client(new_agent())  # store refused: 503 at once
        assert response.status_code == 503
    assert stack.envoy.counter("l3_breaker_open") == 1
    with HangingServer(port=stack.ports["store"]):  # the store's port accepts, never answers
        abandon_the_probe(stack, "l2_miss", "l3_skipped", new_agent)
    assert stack.envoy.counter("l3_error") == THRESHOLD, "the probe was abandoned, it did not fail"
    stack.start("store")
    agent = new_agent()  # no directive: the store answers "none", which is a success

    def send():
        response, _ = client(agent)
        return response.status_code in (200, 503)

    wait_for_close(stack, send, "l3_breaker_close")
    response, _ = client(new_agent())
    assert response.status_code == 200


def test_l2_breaker_recovers_when_its_probe_request_is_abandoned(stack, upstream, client, restore):
    stack.restart_envoy(filter_config={**FILTER_CONFIG, "redis": {"timeout_ms": SLOW_MS}}, concurrency=1,
                        cluster_ports={})
    stack.l2.kill()
    for _ in range(THRESHOLD):
        response, _ = client(new_agent())  # the L2 front refused: the store answers
        assert response.status_code == 200
    assert stack.envoy.counter("l2_breaker_open") == 1
    with HangingServer(port=stack.ports[stack.l2_part]):
        abandon_the_probe(stack, "l1_miss", "l2_skipped", new_agent)
    assert stack.envoy.counter("l2_error") == THRESHOLD, "the probe was abandoned, it did not fail"
    stack.start(stack.l2_part)

    def send():
        response, _ = client(new_agent())  # every request an L1 miss, so a probe once allowed
        return response.status_code == 200

    wait_for_close(stack, send, "l2_breaker_close")
