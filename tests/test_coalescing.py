"""A cold agent under concurrent load costs at most one store lookup per
Envoy worker (SPEC §8): concurrent misses join the fill in flight instead of
asking again.

The requests overlap for certain: the agent's store lookup is held inside
Postgres (tests/pg_gate.py) until every request has reached the filter, so
none can be answered before all are in flight. Then each request either owns
its worker's fill (it asked Redis, then the store) or joined one
(`coalesced`), and the store saw one lookup per fill."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from helpers import CHAT, agent_with, chat_body, json_headers, strict_json
from pg_gate import HOLDING_FILTER_CONFIG, install_gate
from stack import wait_until

FILTER_CONFIG = HOLDING_FILTER_CONFIG
CONCURRENCY = 2  # Envoy --concurrency of the test stacks
REQUESTS = 64


@pytest.fixture(scope="module")
def gate(stack):
    return install_gate(stack)


def test_cold_agent_concurrent_requests_share_lookups(stack, upstream, gate):
    directive = "One lookup per worker."
    agent = agent_with(stack, directive)
    gate.add(agent)
    lookups = stack.store.lookups()
    before = stack.envoy.counters()
    body = chat_body()

    def delta(name):
        return stack.envoy.counter(name) - before.get(name, 0)

    def one(_):
        with requests.Session() as session:
            response = session.post(stack.gateway_url + CHAT, data=body, timeout=60, headers=json_headers(agent))
            return response.status_code

    with ThreadPoolExecutor(max_workers=REQUESTS) as pool:
        with gate.closed():
            pending = [pool.submit(one, n) for n in range(REQUESTS)]
            # every request missed L1; the owners of the fills got past Redis to the
            # store, where the gate holds them; every other request joined a fill
            wait_until(lambda: delta("l1_miss") == REQUESTS
                       and delta("l2_miss") + delta("coalesced") == REQUESTS
                       and gate.waiting() >= 1,
                       what="every request in flight: owning a fill held at the gate, or joined to one")
            assert not any(future.done() for future in pending), "a request was answered while the lookup was held"
            fills = delta("l2_miss")
        statuses = [future.result() for future in pending]

    assert statuses == [200] * REQUESTS
    assert 1 <= fills <= CONCURRENCY, f"{fills} fills for one agent over {CONCURRENCY} workers"
    assert delta("coalesced") == REQUESTS - fills
    assert delta("l3_hit") == fills
    assert stack.store.lookups() - lookups == fills
    received = upstream.received()
    assert len(received) == REQUESTS
    assert all(strict_json(r.body)["messages"][0] == {"role": "system", "content": directive} for r in received)
