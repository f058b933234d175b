"""A cold agent under concurrent load costs at most one store lookup per
Envoy worker (SPEC §8): concurrent misses wait for the lookup in flight, and
later ones find L1 filled. Holds for every interleaving, so the bound is
asserted exactly, however the requests happen to be scheduled."""

from concurrent.futures import ThreadPoolExecutor

import requests

from helpers import CHAT, agent_with, chat_body, strict_json

CONCURRENCY = 2  # Envoy --concurrency of the test stacks
REQUESTS = 64


def test_cold_agent_concurrent_requests_share_lookups(stack, upstream):
    directive = "One lookup per worker."
    agent = agent_with(stack, directive)
    lookups = stack.store.lookups()
    body = chat_body()

    def one(_):
        with requests.Session() as session:
            response = session.post(stack.gateway_url + CHAT, data=body, timeout=30,
                                    headers={"content-type": "application/json", "x-agent-id": agent})
            return response.status_code

    with ThreadPoolExecutor(max_workers=REQUESTS) as pool:
        statuses = list(pool.map(one, range(REQUESTS)))
    assert statuses == [200] * REQUESTS
    received = upstream.received()
    assert len(received) == REQUESTS
    assert all(strict_json(r.body)["messages"][0] == {"role": "system", "content": directive} for r in received)
    assert stack.store.lookups() - lookups <= CONCURRENCY
