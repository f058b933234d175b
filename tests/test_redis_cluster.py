"""L2 on a real Redis Cluster (issue 15 item 4): three masters on loopback, created
by `redis-cli --cluster create`, behind the REST front (`companion rest
--redis-cluster`), with the subscriber and the companion's CLI on the cluster too.

A cluster runs a command (or a script) only when all its keys lie in one hash slot,
else it answers CROSSSLOT. The filter's write-back names its entry and the flush
marker of the entry's slot (`directive:__flush__{<tag>}`, ibex-wire), the subscriber
sets a marker in every slot, pipelined per master, and sweeps every master with SCAN,
one DEL per key. This module runs the core cases of test_invalidation.py and
test_invalidation_race.py against that stack (per-agent invalidation, flush, the
write-back races the tombstone and the markers guard, a restart of the whole
cluster), checks the slot arithmetic against the real CLUSTER KEYSLOT, and after
every test that no node answered CROSSSLOT or had to redirect a command (INFO
errorstats), whatever the scenario sent.
"""

import uuid

import pytest

from helpers import CHAT, agent_with, chat_body, send, tier
from stack import wait_until
from stack.contract import (AGENT_KEY_FLUSH_MARKER_PATTERN, FLUSH_MARKER_PATTERN, GET_SCRIPT, SET_IF_ABSENT_SCRIPT,
                            SLOTS, agent_key_redis_key, flush_marker_for, flush_marker_key, key_slot, redis_key,
                            stored_text)
from stack.redis import RespError
# The core cases, run here on the cluster stack (pytest collects them in this module).
from test_invalidation import (redis_and_subscriber_back, test_clear_directive_reaches_every_worker,  # noqa: F401
                               test_control_invalidate_one_agent, test_flush_channel_re_resolves_every_agent,
                               test_flush_marker_keeps_write_backs_out_of_redis,
                               test_foreign_writer_new_version_then_publish,
                               test_redis_restart_subscriber_reconnects_and_flushes,
                               test_set_directive_reaches_every_worker,
                               test_subscriber_down_during_an_update_flushes_when_it_starts)
from test_invalidation_race import FILTER_CONFIG  # noqa: F401 - store lookups may be held at the gate
from test_invalidation_race import (gate, test_admin_updates_racing_fills_leave_no_old_directive,  # noqa: F401
                                    test_fill_overtaken_by_a_flush_is_stale_at_once_and_kept_out_of_redis,
                                    test_fill_overtaken_by_an_update_writes_neither_l1_nor_redis,
                                    test_request_after_an_invalidation_does_not_join_a_fill_from_before_it)

REDIS = "cluster"
L2 = "rest"  # Webdis cannot front a cluster

CLUSTER_ERRORS = ("CROSSSLOT", "MOVED", "ASK")
"""Error replies no node may ever count: a command over keys of two slots, or one sent to
a node that does not serve its slot."""


@pytest.fixture(autouse=True)
def no_cross_slot_or_redirection(stack):
    """After each test (the nodes' counters restart with them, so each test is checked
    on its own): no node answered CROSSSLOT or redirected a command."""
    yield
    if stack.redis.running():
        seen = {port: {name: n for name, n in errors.items() if name in CLUSTER_ERRORS}
                for port, errors in stack.redis.errorstats().items()}
        assert not any(seen.values()), f"INFO errorstats: {seen}"


def agents_on_every_master(stack, per_master=2):
    """New agent ids whose Redis keys lie on each master: {node port: [agent, …]}."""
    found = {node.port: [] for node in stack.redis.nodes}
    while any(len(agents) < per_master for agents in found.values()):
        agent = str(uuid.uuid4())
        port = stack.redis.node_for_slot(key_slot(redis_key(agent))).port
        if len(found[port]) < per_master:
            found[port].append(agent)
    return found


def test_the_cluster_has_three_masters_sharing_every_slot(stack):
    served = 0
    for start, end, master, *replicas in stack.redis.nodes[0].command_call("CLUSTER", "SLOTS"):
        assert replicas == []
        served += end - start + 1
    assert served == SLOTS
    assert {node.cluster_info()["cluster_state"] for node in stack.redis.nodes} == {"ok"}
    assert len({node.port for node in stack.redis.nodes}) == 3


def test_slots_are_computed_as_the_cluster_computes_them(stack):
    """stack/contract.py (a port of wire/src/slot.rs, pinned to the same values by the
    wire crate's tests) against the real CLUSTER KEYSLOT: agent keys, gateway key
    entries, markers of both prefixes, and hash tags."""
    agent = "6f1c1a3e-5b7d-4c2a-9e0f-123456789abc"
    assert flush_marker_for(redis_key(agent)) == "directive:__flush__{DHJ@}"  # as ibex-wire names it
    keys = [redis_key(agent), agent_key_redis_key("ab" * 32), "{user1000}.following", "foo{}{bar}", "foo{{bar}}zap",
            "a{b", "123456789"]
    keys += [redis_key(str(uuid.uuid4())) for _ in range(20)]
    keys += [flush_marker_key(slot) for slot in (0, 1, 5460, 5461, 10922, 10923, 13881, 16383)]
    keys += [flush_marker_key(slot, "agent_key:") for slot in (0, 8191, 16383)]
    node = stack.redis.nodes[0]
    for k in keys:
        assert int(node.command_call("CLUSTER", "KEYSLOT", k)) == key_slot(k), k
    # every write-back names two keys of one slot
    for k in keys[:27]:
        assert int(node.command_call("CLUSTER", "KEYSLOT", flush_marker_for(k))) == key_slot(k), k


def test_a_flush_sets_every_slots_marker_on_its_master_and_sweeps_every_master(stack, upstream):
    by_master = agents_on_every_master(stack)
    for agents in by_master.values():
        for agent in agents:
            stack.redis.command_call("SET", redis_key(agent), "Cached before the flush.", "EX", 300)
    stack.flush()
    for node in stack.redis.nodes:
        for agent in by_master[node.port]:
            assert node.get(redis_key(agent)) is None, "the sweep missed a master"
    for pattern, prefix in ((FLUSH_MARKER_PATTERN, "directive:"), (AGENT_KEY_FLUSH_MARKER_PATTERN, "agent_key:")):
        slots = []
        for node in stack.redis.nodes:
            # (and the single marker filters from before per-slot markers check)
            markers = [m for m in node.keys(pattern) if m != prefix + "__flush__"]
            served = sum(end - start + 1 for start, end, master, *_ in node.command_call("CLUSTER", "SLOTS")
                         if int(master[1]) == node.port)
            assert len(markers) == served, f"node {node.port}: one marker per slot it serves"
            slots += [key_slot(m) for m in markers]
        assert sorted(slots) == list(range(SLOTS)), prefix
        assert 0 < stack.redis.ttl(flush_marker_key(SLOTS - 1, prefix)) <= 10
        assert 0 < stack.redis.ttl(prefix + "__flush__") <= 10


def test_write_backs_land_on_every_master(stack, upstream):
    """The filter's conditional EVAL goes to the master of its key's slot, through the
    REST front, whichever master that is."""
    stack.redis.delete_matching(FLUSH_MARKER_PATTERN)  # an earlier flush's markers hold write-backs back
    on = {}
    while len(on) < len(stack.redis.nodes):
        directive = f"Written back, agent {len(on)}."
        agent = agent_with(stack, directive)
        owner = stack.redis.node_for_slot(key_slot(redis_key(agent)))
        if owner.port in on:
            continue
        on[owner.port] = agent
        assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
        assert tier(stack.upstream.last()) == "store"
        wait_until(lambda: stored_text(owner.get(redis_key(agent))) == directive, what="the L2 write-back")
        assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
        assert tier(stack.upstream.last()) == "local"
    evals = {node.port: node.command_calls("eval") for node in stack.redis.nodes}
    assert all(n > 0 for n in evals.values()), f"some master ran no EVAL at all: {evals}"


def test_the_rest_front_routes_pipelines_and_multi_key_deletes_across_slots(stack):
    """Operators' commands through the front on a cluster: a pipeline whose keys lie on
    every master, and one DEL of keys of several slots (split by slot)."""
    admin = stack.rest_admin_token
    keys = [redis_key(agents[0]) for agents in agents_on_every_master(stack, per_master=1).values()]
    assert len({stack.redis.node_for_slot(key_slot(k)).port for k in keys}) == 3
    commands = [["SET", k, f"v{i}", "EX", 60] for i, k in enumerate(keys)] + [["GET", k] for k in keys]
    status, answers = stack.rest.pipeline(*commands, token=admin)
    assert status == 200
    assert answers == [{"result": "OK"}] * 3 + [{"result": f"v{i}"} for i in range(3)]
    assert stack.rest.call("DEL", *keys, token=admin) == (200, {"result": 3})
    assert all(stack.redis.get(k) is None for k in keys)
    # an error reply (a script given no key) stays an answer on a cluster too, not a 503
    status, answer = stack.rest.call("EVAL", GET_SCRIPT, 0, token=admin)
    assert status == 400 and answer["error"].startswith("ERR"), answer


# Last in this module (pytest runs a module's own tests in order, after the imported ones).
def test_no_node_answered_crossslot_or_redirected_a_command(stack):
    """After everything since the last restart of the cluster (fills, write-backs,
    tombstones, flushes, races; every test is also checked on its own), no master
    answered CROSSSLOT, and none had to redirect a command (MOVED/ASK): every command
    went to the master of its keys' one slot. And the check means something: the
    scenario ran write-backs on every master, and a two-slot script is counted."""
    stats = stack.redis.errorstats()
    for port, errors in stats.items():
        assert not set(errors) & set(CLUSTER_ERRORS), f"node {port}: {errors}"
    assert all(node.command_calls("eval") > 0 for node in stack.redis.nodes), "a master ran no write-back"
    # the single marker of old: two slots, refused by the cluster and counted
    node = stack.redis.nodes[0]
    while True:
        entry = redis_key(str(uuid.uuid4()))
        slot = key_slot(entry)
        if slot != key_slot("directive:__flush__") and stack.redis.node_for_slot(slot) is node:
            break
    with pytest.raises(RespError, match="CROSSSLOT"):
        node.command_call("EVAL", SET_IF_ABSENT_SCRIPT, 2, entry, "directive:__flush__", 60, "x")
    assert node.errorstats().get("CROSSSLOT") == 1
    node.command_call("CONFIG", "RESETSTAT")  # that one was this test's own
