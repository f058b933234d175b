"""Chaos: under steady load over 50 agents with directives, each part of the
stack is killed with SIGKILL and later started again, one at a time. L2 goes
through the REST front (`companion rest`): the front itself is killed, and so
is Redis behind it (the front stays up, answers 503 meanwhile, and reconnects
by itself).

For every part the test records every client answer and everything the echo
upstream received, and asserts that
  - no request reached the upstream without its agent's directive
    (failure_mode closed), and every client answer echoes it back;
  - clients saw nothing but 200 while L1 held fresh or stale entries (every
    agent is warm; ttl 1 s, stale_if_error 300 s, so entries expire during
    the outage and are served stale where the outage calls for it);
  - the outage degrades the way it should (every agent answered by the tier
    that is left: the store, or stale);
  - within 30 s of the part being back, the tiers are normal again: remote
    tier errors, skips and stale answers stop, the part that was down
    answers again, with no other process restarted;
  - Envoy's and the companion's memory stay bounded.

Every wait polls a state with a deadline; the durations depend on nothing
but those deadlines. A summary per part (tier shares per phase, counter
movement, time to recover) is printed and written to chaos-summary.json in
the module's stack directory.
"""

import json
import time
from collections import Counter

import pytest

from chaos_helpers import LOAD_AGENT_HEADER, Load, UpstreamLog, counter_delta, fractions, tier_counts
from conftest import _STACK_DIRS, default_l2
from helpers import new_agent, strict_json, tier
from stack import Stack, wait_until
from stack.procfs import rss_kb

FILTER_CONFIG = {
    "cache": {"ttl_seconds": 1, "stale_if_error_seconds": 300},
    "failure_mode": "closed",
    "debug_headers": True,
}
AGENTS = 50
LOAD_THREADS = 3
# Deadlines, not waits: each poll ends as soon as its condition holds. Generous,
# so that a loaded 2-core machine does not fail a recovery that merely took longer.
RECOVERY_DEADLINE = 30.0   # normal tiers again after the part is back
OUTAGE_DEADLINE = 30.0     # the outage must show its effect before this
WARM_DEADLINE = 60.0       # warming the agents, a baseline of refresh rounds
MEMORY_GROWTH_KB = 50 * 1024
# Counters that must stand still once the stack is normal again.
TROUBLE = ("l2_error", "l3_error", "l2_skipped", "l3_skipped", "l2_write_error", "stale_served",
           "rejected.directive_unavailable", "failed_open")
# The breaker the outage of a part opens.
BREAKER = {"rest": "l2_breaker_open", "webdis": "l2_breaker_open", "redis": "l2_breaker_open", "store": "l3_breaker_open",
           "postgres": "l3_breaker_open"}
# A recovery interval must span at least this many L1 misses (both workers' remote tiers asked).
INTERVAL_MISSES = 20

SUMMARY = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The module's stack, with an upstream that keeps enough requests between drains."""
    directory = tmp_path_factory.mktemp("test_chaos")
    _STACK_DIRS[__name__] = directory
    running = Stack(directory, filter_config=FILTER_CONFIG, patient=True, l2=default_l2())
    running.upstream.keep = 50_000
    with running:
        yield running
    (directory / "chaos-summary.json").write_text(json.dumps(SUMMARY, indent=2, sort_keys=True))


@pytest.fixture(scope="module")
def fleet(stack):
    """50 agents with distinct directives in Postgres, and the RSS of Envoy when
    first seen, by pid (a restarted Envoy starts its own baseline)."""
    directives = {}
    for index in range(AGENTS):
        agent = new_agent()
        directives[agent] = f"Chaos directive {index} of agent {agent}: stay on topic."
        stack.set_directive(agent, directives[agent], publish=False)
    return {"directives": directives, "envoy_rss_kb": {stack.envoy.pid: rss_kb(stack.envoy.pid)}}


@pytest.fixture()
def everything_back(stack):
    yield
    for name in stack.parts:
        stack.start(name)


def snapshot_pids(stack):
    return {name: stack.part(name).pid for name in stack.parts}


def companion_rss(stack):
    return {name: rss_kb(stack.part(name).pid) for name in ("store", "subscriber")}


def warm(stack, directives):
    """One request per agent; all must be answered with the directive."""
    with Load(stack.gateway_url, list(directives), threads=1, max_requests=len(directives)) as load:
        wait_until(lambda: load.count() >= len(directives), timeout=WARM_DEADLINE, what="warming every agent")
    assert [a.status for a in load.answers] == [200] * len(directives)


def agents_seen(received, tiers):
    """Agents for which the upstream saw a request answered by one of `tiers`."""
    return {r.header(LOAD_AGENT_HEADER) for r in received if tier(r) in tiers}


def degraded(part, directives, log, load, since):
    """The outage of `part` shows: every agent has been answered, at least once
    since the kill, by the tier that is left (or, Envoy down, clients get no answer)."""
    if part == "envoy":
        return (lambda: any(a.status == 0 for a in load.since(since))), "requests left unanswered"
    expected = {
        "rest": ("store",),         # L2 unreachable: the store answers every miss
        "webdis": ("store",),
        "redis": ("store",),        # the front is up, Redis behind it is not: the same
        "store": ("stale",),        # L3 gone: once L1 and Redis entries expire, stale
        "postgres": ("stale",),
        "subscriber": ("redis", "store"),   # nothing changes: entries expire and refill
    }[part]

    def check():
        log.drain_now()
        return agents_seen(log.since(since), expected) >= set(directives)

    return check, f"every agent answered by {'/'.join(expected)}"


def answering(part, delta):
    """The tier that was down answers again over the interval."""
    if part in ("rest", "webdis", "redis"):
        return delta.get("l2_hit", 0) + delta.get("l2_miss", 0) > 0
    if part in ("store", "postgres"):
        return delta.get("l3_hit", 0) > 0
    if part == "envoy":  # a new Envoy, L1 empty: the remote tiers refill it
        return delta.get("l2_hit", 0) + delta.get("l3_hit", 0) > 0
    return True


class Recovery:
    """Polled until the last INTERVAL_MISSES L1 misses or more (a sliding window
    ending now) passed with no trouble: no trouble counter moved, no stale
    answer, only 200s, and the part that was down answering again."""

    def __init__(self, stack, part, load, log):
        self.stack, self.part, self.load, self.log = stack, part, load, log
        self.history = [(time.time(), stack.envoy.counters())]
        self.window = None

    def __call__(self):
        counters = self.stack.envoy.counters()
        now = time.time()
        self.history.append((now, counters))
        misses = counters.get("l1_miss", 0)
        full = [(at, c) for at, c in self.history[:-1] if misses - c.get("l1_miss", 0) >= INTERVAL_MISSES]
        if not full:
            return False
        since, before = full[-1]  # the shortest window with enough misses
        delta = counter_delta(before, counters)
        self.log.drain_now()
        received = [r for r in self.log.since(since) if r.received_at < now]
        answers = [a for a in self.load.since(since) if a.done_at <= now]
        tiers = tier_counts(received)
        ok = (not any(delta.get(name, 0) for name in TROUBLE)
              and tiers.get("stale", 0) == 0
              and all(a.status == 200 for a in answers)
              and answering(self.part, delta))
        self.window = {"from": since, "to": now, "tiers": dict(tiers),
                       "trouble": {k: delta[k] for k in TROUBLE if k in delta}}
        return ok


def misses_after(stack, count):
    """A condition: `count` more L1 misses than now (whole refresh rounds of the agents)."""
    start = stack.envoy.counter("l1_miss")
    return lambda: stack.envoy.counter("l1_miss") - start >= count


def subscriber_delivers(stack, deadline):
    """A published update (of an agent outside the load) goes all the way through again."""
    agent = new_agent()
    before = stack.subscriber.settled_invalidations()
    stack.companion.set_directive(agent, "Probe of the invalidation path.", publish=True)
    wait_until(lambda: stack.subscriber.settled_invalidations() > before, timeout=deadline,
               what="a published update to reach Envoy through the subscriber")


PARTS = ["rest", "redis", "store", "postgres", "subscriber", "envoy"]


def latency_ms(answers):
    """p50, p99 and max client latency in ms of `answers` that got an HTTP answer."""
    times = sorted(1000 * (a.done_at - a.sent_at) for a in answers if a.status)
    if not times:
        return {}
    pick = lambda q: round(times[min(len(times) - 1, int(q * len(times)))], 1)  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "max": round(times[-1], 1)}


@pytest.mark.parametrize("part", PARTS)
def test_kill_and_restart_under_load(stack, fleet, everything_back, part):
    """SIGKILL one part under load, start it again, and check every answer."""
    if part == "rest":
        part = stack.l2_part  # the L2 front (Webdis under IBEX_TEST_L2=webdis)
    directives = fleet["directives"]
    warm(stack, directives)
    pids = snapshot_pids(stack)
    envoy_rss_start = fleet["envoy_rss_kb"].setdefault(stack.envoy.pid, rss_kb(stack.envoy.pid))
    companion_before = companion_rss(stack)
    summary = SUMMARY.setdefault(part, {})

    with UpstreamLog(stack.upstream) as log, Load(stack.gateway_url, list(directives), threads=LOAD_THREADS) as load:
        begun = time.time()
        wait_until(misses_after(stack, 2 * AGENTS), timeout=WARM_DEADLINE, what="a baseline of two L1 refresh rounds")
        counters_at_kill = stack.envoy.counters()
        killed_at = time.time()
        stack.part(part).kill()
        assert not stack.part(part).running()

        check, expected = degraded(part, directives, log, load, killed_at)
        wait_until(check, timeout=OUTAGE_DEADLINE, interval=0.1,
                   what=f"{expected} while {part} is down")
        if part == "redis" and stack.l2_part == "rest":  # the REST front stays up and says Redis is gone
            assert stack.rest.running() and stack.rest.live()
            assert stack.rest.readyz() == 503
        breaker = BREAKER.get(part)
        if breaker:
            # Keep the part down until a probe failed and re-opened a breaker: three
            # openings over at most two workers include at least one re-opening.
            wait_until(lambda: stack.envoy.counter(breaker) - counters_at_kill.get(breaker, 0) >= 3,
                       timeout=OUTAGE_DEADLINE, interval=0.1, what=f"{breaker} to move three times")
        # A killed Envoy's counters died with it: the new one counts from zero.
        counters_before_restart = counters_at_kill if part == "envoy" else stack.envoy.counters()
        restart_at = time.time()
        stack.start(part)
        back_at = time.time()

        recovery = Recovery(stack, part, load, log)
        try:
            wait_until(recovery, timeout=RECOVERY_DEADLINE, interval=0.1,
                       what=f"normal tiers within {RECOVERY_DEADLINE} s of {part} being back")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last window: {recovery.window}") from None
        normal_at = time.time()
        counters_at_normal = stack.envoy.counters()
        normal_from = recovery.window["from"]
        if part == "redis":
            wait_until(lambda: stack.subscriber.metric("ibex_subscribe_connected") == 1,
                       timeout=max(0.1, back_at + RECOVERY_DEADLINE - time.time()),
                       what="the subscriber to reconnect to Redis")
        if part in ("redis", "subscriber", "envoy"):
            subscriber_delivers(stack, deadline=max(0.1, back_at + RECOVERY_DEADLINE - time.time()))
        wait_until(misses_after(stack, 2 * AGENTS), timeout=WARM_DEADLINE, what="two L1 refresh rounds after recovery")
        load.stop()
        ended = time.time()
    counters_end = stack.envoy.counters()
    answers = load.answers
    received = log.items
    answered = [a for a in answers if a.status == 200]

    def phase(start, end):
        items = [r for r in received if start <= r.received_at < end]
        sent = [a for a in answers if start <= a.sent_at < end]
        return {"requests": len(items), "tiers": fractions(tier_counts(items)), "latency_ms": latency_ms(sent),
                "client": dict(Counter(str(a.status) if a.status else "no answer" for a in sent))}

    after_rss = rss_kb(stack.envoy.pid)
    envoy_growth = after_rss - fleet["envoy_rss_kb"].setdefault(stack.envoy.pid, after_rss)
    companion_after = companion_rss(stack)
    summary.update({
        "requests": len(answers),
        "requests_per_second": round(len(answers) / (ended - begun), 1),
        "baseline": phase(begun, killed_at),
        "outage": phase(killed_at, back_at),
        "outage_seconds": round(restart_at - killed_at, 2),
        "restart_seconds": round(back_at - restart_at, 2),
        "recovering": phase(back_at, normal_at),
        "seconds_to_normal": round(normal_at - back_at, 2),
        "normal_window_from_seconds": round(normal_from - back_at, 2),
        "after": phase(normal_at, ended),
        "counters_after": counter_delta(counters_at_normal, counters_end),
        "counters_outage": counter_delta(counters_at_kill, counters_before_restart),
        "counters_recovery": counter_delta({} if part == "envoy" else counters_before_restart, counters_end),
        "envoy_rss_kb": {"start": envoy_rss_start, "end": after_rss, "growth_since_first_seen": envoy_growth},
        "companion_rss_kb": {"before": companion_before, "after": companion_after},
    })
    print(f"\nchaos {part}: {json.dumps(summary, sort_keys=True)}")

    # -- nothing else restarted, memory bounded
    after = snapshot_pids(stack)
    assert {k: v for k, v in after.items() if k != part} == {k: v for k, v in pids.items() if k != part}
    assert envoy_growth < MEMORY_GROWTH_KB, f"Envoy RSS grew by {envoy_growth} kB over the run"
    for name, before_kb in companion_before.items():
        if name != part:
            growth = companion_after[name] - before_kb
            assert growth < MEMORY_GROWTH_KB, f"{name} RSS grew by {growth} kB during the {part} outage"

    # -- every client answer: 200 with the directive echoed back. Only while Envoy
    # itself is down may a request get no HTTP answer at all (never a 5xx).
    problems = [(a.agent, a.status, a.error or a.body[:200]) for a in answers
                if a.status != 200 and not (part == "envoy" and a.status == 0 and a.sent_at < back_at)]
    assert problems == [], f"{len(problems)} of {len(answers)} requests not 200, e.g. {problems[:5]}"
    wrong = [a.agent for a in answered if a.echoed_directive() != f"system: {directives[a.agent]}"]
    assert wrong == [], f"{len(wrong)} answers did not echo their directive"

    # -- every upstream request carried its agent's directive; nothing else reached it
    if part == "envoy":  # a request in flight when Envoy died may have reached the upstream
        assert len(answered) <= len(received) <= len(answers)
    else:
        assert len(received) == len(answers), "the upstream saw exactly the requests that were answered"
    missing = []
    for item in received:
        agent = item.header(LOAD_AGENT_HEADER)
        first = strict_json(item.body)["messages"][0]
        if first != {"role": "system", "content": directives[agent]}:
            missing.append((agent, tier(item)))
    assert missing == [], f"{len(missing)} requests reached the upstream without their directive: {missing[:5]}"

    # -- after recovery the tiers stay normal: no stale answers, no trouble, and L1
    # caches again: each agent misses about once per ttl (a bound that only grows
    # when the machine is slow; the shares themselves depend on the request rate
    # and are reported, not compared)
    after_tiers = summary["after"]["tiers"]
    assert after_tiers.get("stale", 0) == 0
    assert set(after_tiers) <= {"local", "redis", "store"}
    after_delta = counter_delta(counters_at_normal, counters_end)
    assert {k: after_delta[k] for k in TROUBLE if k in after_delta} == {}
    ttl = FILTER_CONFIG["cache"]["ttl_seconds"]
    rounds = (ended - normal_at) / ttl + 2
    assert after_delta.get("l1_miss", 0) <= LOAD_THREADS * AGENTS * rounds, (after_delta, ended - normal_at)
