"""The phases of `make bench` besides the wrk variants: populate the tiers,
check every listener forwards what it should, the cold-agent stampede, the
invalidation delay and the shared-data memory per agent.

Functions take the run (`bench`, a bench/run.py Bench) and return what goes
into the results."""

import http.client
import json
import os
import socket
import subprocess
import time

from bench.measure import counter_delta, envoy_memory, filter_counters, log, median, percentile, rss_bytes
from bench.workload import API_KEY_HEADER, CHAT_PATH, DIRECTIVE, ESCAPED, POP, WEBDIS_CLUSTER, agent_id
from stack import paths
from stack.contract import AGENT_HEADER, directive_value, redis_key, updates_channel
from stack.ports import wait_until
from stack.postgres import quote_literal
from stack.process import die_with_parent
from stack.rawhttp import connect, read_response, request_bytes
from stack.redis import encode_command

BENCH_VERSION_ID = "0b6c7a4e-1f2d-4c3b-8a9e-5d6f7a8b9c0d"
"""The version id of every directive the benchmark puts into Redis (a store answer's, to
the filter)."""

# The memory phase's agents in Redis: half as many again as it caches, plus a
# few seconds' worth at the rates seen, so that its whole-second wrk runs never
# run out (quick mode caches only 5 000 at over 4 000 requests/s).
MEM_HEADROOM = 20_000


def mem_population(args):
    return args.mem_agents * 3 // 2 + MEM_HEADROOM


STORE_METRICS = ("ibex_store_lookups_total", "ibex_store_db_queries_total", "ibex_store_coalesced_total")


def post(url, path, body, agent=None, timeout=10, key=None):
    """One POST on a connection of its own: (status, body). `key`: an API key, sent as
    `authorization: Bearer <key>`."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"content-type": "application/json"}
    if agent:
        headers[AGENT_HEADER] = agent
    if key:
        headers[API_KEY_HEADER] = f"Bearer {key}"
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


# --------------------------------------------------------------------------- populate

def populate(bench):
    """Agents in Redis (redis-cli --pipe) and in Postgres (one set-based batch), and
    the API key when a selected variant sends one; returns what was written."""
    populated = {"redis_keys": populate_redis(bench.stack, bench.args)}
    populated["postgres_agents"] = populate_postgres(bench.stack, bench.args)
    if bench.uses_api_key:
        bench.api_key_file = issue_api_key(bench.stack, bench.dir / "api-key")
        populated["api_keys"] = 1
    log(f"populated {populated}")
    return populated


def issue_api_key(stack, key_file):
    """The API key agent ("key" population): its directive in Postgres (set-directive
    --no-publish: Redis gets it from populate_redis, as the L1 agent does), then a key
    from `ibex-companion issue-key`, written to `key_file` (mode 0600) for wrk and the
    sanity check. The key is read from the CLI's stdout only: it goes to no log."""
    agent = agent_id("key", 0)
    stack.companion.set_directive(agent, DIRECTIVE, publish=False)
    result = subprocess.run([str(paths.companion_path()), "issue-key", "--agent-id", agent, "--label", "make bench"],
                            capture_output=True, text=True, env=stack.companion.environment(), timeout=60)
    lines = result.stdout.splitlines()
    if result.returncode != 0 or len(lines) != 1 or not lines[0].startswith("ibex_") or len(lines[0]) < 20:
        # stdout is never quoted: it may hold the key
        raise RuntimeError(f"ibex-companion issue-key failed ({result.returncode}, {len(lines)} stdout lines): "
                           f"{result.stderr.strip()[-500:]}")
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(lines[0] + "\n")
    hashes = [w for w in result.stderr.split() if w.startswith("key_sha256=")]
    log(f"issued an API key for {agent} ({hashes[-1] if hashes else 'no key_sha256 on stderr'})")
    return key_file


def api_key(bench):
    """The API key `issue_api_key` wrote."""
    return bench.api_key_file.read_text().strip()


def populate_redis(stack, args):
    """The L1 agents (filled from Redis during warm-up), the L2 and memory populations,
    and the agent without directive (""); returns the directive keys written."""
    redis_sets = [("l1", 1), ("key", 1), ("l1_10k", 10000), ("l2", args.l2_agents), ("mem", mem_population(args))]
    proc = subprocess.Popen(["redis-cli", "-h", "127.0.0.1", "-p", str(stack.redis.port), "--pipe"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent)
    # Versioned, as the filter writes back a store answer today, so L1 holds the same
    # entries (kind 5, with the version id) as in production.
    value = directive_value(DIRECTIVE, BENCH_VERSION_ID).encode()
    total = 0
    for population, count in redis_sets:
        chunk = []
        for n in range(count):
            chunk.append(encode_command("SET", redis_key(agent_id(population, n)), value, "EX", 7200))
            if len(chunk) == 5000:
                proc.stdin.write(b"".join(chunk))
                chunk = []
        proc.stdin.write(b"".join(chunk))
        total += count
    proc.stdin.write(encode_command("SET", redis_key(agent_id("none", 0)), "", "EX", 7200))  # "" = no directive
    proc.stdin.close()
    out = proc.stdout.read().decode()
    if proc.wait(timeout=300) != 0 or "errors: 0" not in out:
        raise RuntimeError(f"redis-cli --pipe: {out}")
    return total


def populate_postgres(stack, args):
    """The L3 and stampede populations, set-based in one transaction; returns the
    directives with an active version."""
    batches = [("l3", args.l3_agents), ("stampede", 20)]
    sql = ["BEGIN;"]
    content = quote_literal(DIRECTIVE)
    for population, count in batches:
        prefix = POP[population]
        agent = f"format('{prefix}-0000-4000-8000-%s', lpad(to_hex(n), 12, '0'))::uuid"
        directive = f"format('{prefix}-0000-4000-9000-%s', lpad(to_hex(n), 12, '0'))::uuid"
        series = f"generate_series(0, {count - 1}) AS n"
        sql += [
            f"INSERT INTO ibex_core.agents (id, org_id) SELECT {agent}, "
            f"'0b000000-0000-4000-8000-000000000001'::uuid FROM {series};",
            f"INSERT INTO ibex_core.directives (id, agent_id, is_active) SELECT {directive}, {agent}, true "
            f"FROM {series};",
            f"INSERT INTO ibex_core.directive_versions (directive_id, content) SELECT {directive}, {content} "
            f"FROM {series};",
        ]
    sql += ["UPDATE ibex_core.directives d SET active_version_id = v.id FROM ibex_core.directive_versions v "
            "WHERE v.directive_id = d.id AND d.active_version_id IS NULL;", "COMMIT;",
            "ANALYZE ibex_core.agents; ANALYZE ibex_core.directives; ANALYZE ibex_core.directive_versions;"]
    stack.postgres.psql("\n".join(sql))
    count = stack.postgres.psql("SELECT count(*) FROM ibex_core.directives WHERE active_version_id IS NOT NULL")
    return int(count.strip())


# --------------------------------------------------------------------------- sanity

def sanity(bench):
    """Before measuring: bare forwards the body byte for byte, lua and ibex with
    exactly the directive message inserted (through the echo upstream), and every
    variant's listener reaches the sink."""
    s = bench.stack
    body = bench.bodies["1k"].read_bytes()
    expected_first = {"role": "system", "content": DIRECTIVE}
    inserted = json.dumps(expected_first, separators=(",", ":")).encode() + b","
    for listener_name, agent, injected in (("bare", agent_id("l1", 0), False),
                                           ("lua", agent_id("l1", 0), True),
                                           ("ibex", agent_id("l1", 0), True),
                                           ("ibex", agent_id("l3", 10**9), None),
                                           ("floor", agent_id("l1", 0), False),
                                           ("ibex_noaudit", agent_id("l1", 0), True),
                                           ("ibex_auditfields", agent_id("l1", 0), True),
                                           # a probe that rewrites the body appends spaces (valid JSON, not the same bytes)
                                           *((probe, agent_id("l1", 0), None if "rewrite" in bench.probes[probe] else False)
                                             for probe in bench.probes)):
        if listener_name not in s.envoy.bench_ports:
            continue  # not in this stack (bench/instructions.py runs a few at a time)
        s.upstream.clear()
        status, _ = post(s.url_of(listener_name), "/_echo" + CHAT_PATH, body, agent)
        got = s.upstream.last()
        if status != 200 or got is None:
            raise RuntimeError(f"sanity: {listener_name} answered {status}")
        first = got.json()["messages"][0]
        if injected is True and first != expected_first:
            raise RuntimeError(f"sanity: {listener_name} forwarded {first!r} first")
        if injected is False and got.body != body:
            raise RuntimeError(f"sanity: {listener_name} changed the body")
        if injected and got.body.replace(inserted, b"", 1) != body:
            raise RuntimeError(f"sanity: {listener_name} changed more than the inserted message")
    for listener_name in ("bare", "lua", "ibex", "noop", "floor", *bench.probes):
        if listener_name not in s.envoy.bench_ports:
            continue
        status, data = post(s.url_of(listener_name), CHAT_PATH, body, agent_id("l1", 0))
        if status != 200 or b"chatcmpl-bench" not in data:
            raise RuntimeError(f"sanity: {listener_name} → sink answered {status} {data[:200]!r}")
    if bench.uses_api_key:
        sanity_api_key(bench, body, expected_first, inserted)
    sanity_l2_fronts(bench, body, expected_first, inserted)


def sanity_l2_fronts(bench, body, expected_first, inserted):
    """An L2 hit on the ibex listener goes through the REST front (cluster ibex_redis),
    one on ibex_webdis (when run) through Webdis (its own cluster), and each injects
    exactly the directive Redis holds."""
    s = bench.stack
    fronts = [("ibex", "ibex_redis", 10**9)] if "ibex" in s.envoy.bench_ports else []
    if bench.uses_webdis:
        fronts.append(("ibex_webdis", WEBDIS_CLUSTER, 10**9 + 1))
    clusters = [cluster for _, cluster, _ in fronts]
    pattern = r"^cluster\.(" + "|".join(clusters) + r")\.upstream_rq_total$"
    for listener_name, cluster, n in fronts:
        agent = agent_id("l2", n)  # beyond the populated range: no run uses it
        s.redis.command_call("SET", redis_key(agent), DIRECTIVE, "EX", 7200)
        before = s.envoy.stats(pattern)
        s.upstream.clear()
        status, _ = post(s.url_of(listener_name), "/_echo" + CHAT_PATH, body, agent)
        got = s.upstream.last()
        if status != 200 or got is None or got.json()["messages"][0] != expected_first \
                or got.body.replace(inserted, b"", 1) != body:
            raise RuntimeError(f"sanity: {listener_name} did not inject the directive of an L2 agent ({status})")
        moved = {name.split(".")[1]: value - before.get(name, 0) for name, value in s.envoy.stats(pattern).items()}
        if moved.get(cluster, 0) < 1 or any(moved.get(other, 0) for other in clusters if other != cluster):
            raise RuntimeError(f"sanity: {listener_name}'s L2 read did not go (only) to {cluster}: {moved}")


def sanity_api_key(bench, body, expected_first, inserted):
    """The api_key listener: a request carrying the key (and no agent id) reaches the
    upstream with exactly the key agent's directive inserted and without the key; one
    carrying only an agent id, or a key that was never issued, is refused (so the agent
    really comes from the key). The first request resolves the key through the store."""
    s = bench.stack
    url = s.url_of("ibex_key")
    key = api_key(bench)
    s.upstream.clear()
    status, data = post(url, "/_echo" + CHAT_PATH, body, key=key)
    got = s.upstream.last()
    if status != 200 or got is None:
        raise RuntimeError(f"sanity: ibex_key with the API key answered {status} {data[:200]!r}")
    if got.json()["messages"][0] != expected_first or got.body.replace(inserted, b"", 1) != body:
        raise RuntimeError(f"sanity: ibex_key forwarded {got.json()['messages'][0]!r} first, or changed more "
                           "than the inserted message")
    leaked = [name for name, value in got.header_pairs if key in value]
    if leaked:
        raise RuntimeError(f"sanity: ibex_key forwarded the API key upstream (header {leaked[0]})")
    for what, kwargs in (("an agent id and no key", {"agent": agent_id("key", 0)}),
                         ("a key never issued", {"key": "ibex_" + "A" * 43})):
        status, data = post(url, CHAT_PATH, body, **kwargs)
        if status == 200:
            raise RuntimeError(f"sanity: ibex_key accepted a request with {what}: is agent.source api_key?")
    status, data = post(url, CHAT_PATH, body, key=key)
    if status != 200 or b"chatcmpl-bench" not in data:
        raise RuntimeError(f"sanity: ibex_key → sink answered {status} {data[:200]!r}")


# --------------------------------------------------------------------------- stampede

def stampede_trial(stack, agent, body, n):
    """n connections opened first, then one request each for `agent`, back to back;
    what the store, Redis and the filter counted meanwhile."""
    request = request_bytes(CHAT_PATH, body, agent=agent, host="bench")
    socks = [connect(stack.bench_ports["ibex"], timeout=30) for _ in range(n)]
    before_store = {m: stack.store.metric(m) for m in STORE_METRICS}
    before_redis = stack.redis.command_calls("get")
    before = filter_counters(stack)
    t0 = time.monotonic()
    for sock in socks:  # every connection is open: fire all requests back to back
        sock.sendall(request)
    statuses = []
    for sock in socks:
        statuses.append(read_response(sock).status)
        sock.close()
    elapsed = time.monotonic() - t0
    store = {m: int(stack.store.metric(m) - before_store[m]) for m in STORE_METRICS}
    return {
        "agent": agent,
        "requests": n,
        "ok": statuses.count(200),
        "statuses": {str(k): statuses.count(k) for k in sorted(set(statuses))},
        "store_lookups": store["ibex_store_lookups_total"],
        "store_db_queries": store["ibex_store_db_queries_total"],
        "store_coalesced": store["ibex_store_coalesced_total"],
        "redis_gets": stack.redis.command_calls("get") - before_redis,
        "filter_counters": counter_delta(before, filter_counters(stack)),
        "elapsed_ms": round(elapsed * 1000, 1),
    }


def stampede(bench):
    """--stampede concurrent requests for one cold agent, --stampede-trials times."""
    n = bench.args.stampede
    body = bench.bodies["1k"].read_bytes()
    trials = []
    for trial in range(bench.args.stampede_trials):
        trials.append(stampede_trial(bench.stack, agent_id("stampede", trial), body, n))
        log(f"stampede trial {trial}: {trials[-1]}")
    return {
        "concurrent_requests": n,
        "trials": trials,
        "store_calls_median": median([t["store_lookups"] for t in trials]),
        "store_calls_max": max(t["store_lookups"] for t in trials),
        "db_queries_median": median([t["store_db_queries"] for t in trials]),
    }


# --------------------------------------------------------------------------- invalidation

class Poller:
    """Requests for one agent on one keep-alive connection to the stack's data listener."""

    BODY = b'{"model":"m","messages":[{"role":"user","content":"ping"}]}'

    def __init__(self, stack, agent, port=None):
        """`port`: another data listener than the stack's (the fleet phase: each Envoy's)."""
        self.conn = http.client.HTTPConnection("127.0.0.1", port or stack.ports["data"], timeout=5)
        self.headers = {"content-type": "application/json", AGENT_HEADER: agent}

    def version(self):
        """The directive version the next response names (x-ibex-directive-version, with
        audit.response_header on): the version whose text was injected."""
        self.conn.request("POST", CHAT_PATH, body=self.BODY, headers=self.headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"invalidation poll answered {response.status}: {data[:200]!r}")
        return response.getheader(VERSION_HEADER)

    def sees(self, marker):
        """True when the next response carries `marker` (the directive it got)."""
        self.conn.request("POST", CHAT_PATH, body=self.BODY, headers=self.headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"invalidation poll answered {response.status}: {data[:200]!r}")
        return marker.encode() in data

    def close(self):
        self.conn.close()


def invalidation(bench):
    """--updates times: the directive written to Postgres only (the old text still
    served), then PUBLISH, then polling until a response carries the new text."""
    s = bench.stack
    agent = agent_id("inval", 0)
    s.set_directive(agent, DIRECTIVE + " [rev-initial]")
    poller = Poller(s, agent)
    wait_until(lambda: poller.sees("[rev-initial]"), timeout=10, what="the initial directive")
    redis = socket.create_connection(("127.0.0.1", s.redis.port), timeout=5)
    stream = redis.makefile("rb")
    samples, polls, failures, early = [], [], 0, 0
    for i in range(bench.args.updates):
        marker = f"[rev-{i}-{os.getpid()}]"
        s.companion.set_directive(agent, DIRECTIVE + " " + marker, publish=False)  # Postgres only
        if poller.sees(marker):  # the cache was not in the way (an expired entry): no sample
            early += 1
            continue
        t0 = time.monotonic()
        redis.sendall(encode_command("PUBLISH", updates_channel(agent), ""))
        stream.readline()
        count = 0
        while True:
            count += 1
            if poller.sees(marker):
                samples.append((time.monotonic() - t0) * 1000)
                polls.append(count)
                break
            if time.monotonic() - t0 > 5:
                failures += 1
                log(f"invalidation {i}: new text not seen after 5 s")
                break
        # the response that saw the new text filled L1 again: the next update starts from a hit
    redis.close()
    poller.close()
    return {
        "updates": bench.args.updates, "measured": len(samples), "timeouts": failures,
        "visible_before_publish": early,
        "p50": round(percentile(samples, 50), 2), "p90": round(percentile(samples, 90), 2),
        "p99": round(percentile(samples, 99), 2), "max": round(max(samples), 2),
        "min": round(min(samples), 2), "polls_median": median(polls),
    }


# --------------------------------------------------------------------------- fleet

FLEET_POLL_TIMEOUT = 5.0
VERSION_HEADER = "x-ibex-directive-version"


def fleet_poller(conn, port, agent):
    """In a process of its own (one per Envoy, so no poller waits for another's turn on
    the harness's interpreter): on ("check", version) answer whether the Envoy on `port`
    already serves that directive version; on ("go", version) poll until it does and
    answer the monotonic time it did (None after FLEET_POLL_TIMEOUT); ("stop",) ends it."""
    poller = Poller(None, agent, port=port)
    try:
        while True:
            message = conn.recv()
            if message[0] == "stop":
                return
            kind, version = message
            try:
                if kind == "check":
                    conn.send(poller.version() == version)
                    continue
                deadline = time.monotonic() + FLEET_POLL_TIMEOUT
                while True:
                    if poller.version() == version:
                        conn.send(time.monotonic())
                        break
                    if time.monotonic() > deadline:
                        conn.send(None)
                        break
            except Exception as exc:  # noqa: BLE001 - reported with the results
                conn.send(("error", repr(exc)))
    finally:
        poller.close()
        conn.close()


def fleet(bench):
    """A fleet of its own (stack/fleet.py): --fleet-size Envoys (3), each with its subscriber,
    over one Redis, REST front, store and Postgres, the committed timeouts, their
    upstream a sink Envoy (the echo upstream, one Python process, would be the polls'
    bottleneck three times over). --fleet-updates times: a new directive version written
    to Postgres only, each Envoy checked to still serve the old one, then PUBLISH, then
    every Envoy polled at once (a process and a keep-alive connection each) until its
    response names the new version (x-ibex-directive-version, audit.response_header:
    the version whose text it injected). Per Envoy and for the fleet (the last Envoy to
    serve it: "on every Envoy of a fleet"), the time from PUBLISH (CLOCK_MONOTONIC, the
    same in every process)."""
    import multiprocessing

    from bench.benchstack import SinkEnvoy
    from stack.fleet import Fleet
    from stack.stack import allocate_ports

    n, size = bench.args.fleet_updates, bench.args.fleet_size
    ports = allocate_ports(names=("sink", "sink_admin"))
    sink = SinkEnvoy(bench.dir / "fleet-sink", ports["sink"], ports["sink_admin"]).start()
    try:
        return fleet_run(bench, n, Fleet(
            bench.dir / "fleet", size=size, concurrency=bench.args.workers,
            cluster_ports={"llm_upstream": sink.port},
            filter_config={"cache": {"ttl_seconds": 3600}, "audit": {"response_header": True}},
            log_levels={"envoy": "warning", "companion": "warn"}), multiprocessing.get_context("fork"))
    finally:
        sink.stop()


def fleet_run(bench, n, fleet_stack, context):
    """The fleet phase's updates on `fleet_stack` (started and stopped here)."""
    with fleet_stack as f:
        agent = agent_id("inval", 1)
        version = f.set_directive(agent, DIRECTIVE + " [rev-initial]").strip()
        for envoy in f.envoys:
            poller = Poller(None, agent, port=envoy.data_port)
            wait_until(lambda: poller.version() == version, timeout=10, what="the initial directive")
            poller.close()
        links, workers = [], []
        for envoy in f.envoys:
            ours, theirs = context.Pipe()
            worker = context.Process(target=fleet_poller, args=(theirs, envoy.data_port, agent), daemon=True)
            worker.start()
            theirs.close()
            links.append(ours)
            workers.append(worker)
        redis = socket.create_connection(("127.0.0.1", f.redis.port), timeout=5)
        stream = redis.makefile("rb")
        per_envoy = [[] for _ in f.envoys]
        fleet_ms, timeouts, early, errors = [], 0, 0, []
        try:
            for i in range(n):
                marker = f"[fleet-{i}-{os.getpid()}]"
                version = f.companion.set_directive(agent, DIRECTIVE + " " + marker, publish=False).strip()
                for link in links:  # Postgres only so far: each Envoy still serves the old version
                    link.send(("check", version))
                checks = [link.recv() for link in links]
                if any(check is not False for check in checks):  # a cache was not in the way: no sample
                    early += 1
                    errors += [check[1] for check in checks if isinstance(check, tuple)]
                    continue
                t0 = time.monotonic()
                redis.sendall(encode_command("PUBLISH", updates_channel(agent), ""))
                for link in links:
                    link.send(("go", version))
                stream.readline()
                seen = [link.recv() for link in links]
                if not all(isinstance(t, float) for t in seen):
                    timeouts += 1
                    errors += [t[1] for t in seen if isinstance(t, tuple)]
                    log(f"fleet update {i}: not seen on every Envoy within {FLEET_POLL_TIMEOUT} s: {seen}")
                    continue
                ms = [(t - t0) * 1000 for t in seen]
                for index, value in enumerate(ms):
                    per_envoy[index].append(value)
                fleet_ms.append(max(ms))
        finally:
            for link in links:
                try:
                    link.send(("stop",))
                except OSError:
                    pass
            for worker in workers:
                worker.join(timeout=10)
                if worker.is_alive():
                    worker.kill()
            redis.close()
        queries = f.store.metric("ibex_store_db_queries_total")

    def stats(samples):
        if not samples:
            return {"p50": None, "p90": None, "p99": None, "max": None}
        return {"p50": round(percentile(samples, 50), 2), "p90": round(percentile(samples, 90), 2),
                "p99": round(percentile(samples, 99), 2), "max": round(max(samples), 2)}

    return {
        "envoys": len(per_envoy), "envoy_workers": bench.args.workers, "updates": n, "measured": len(fleet_ms),
        "timeouts": timeouts, "visible_before_publish": early, "errors": errors[:5],
        "all": stats(fleet_ms),
        "per_envoy": [{"envoy": i, **stats(samples)} for i, samples in enumerate(per_envoy)],
        "store_db_queries": int(queries),
    }


# --------------------------------------------------------------------------- memory

KEY_LEN = 22                   # the filter's shared-data key: the agent's UUID in base64url
ENTRY_HEADER = 18 + 16         # the encoded entry's bytes before the escaped directive:
                               # header and version id


def fill_l1(bench, target, before):
    """wrk runs of new agents that Redis holds until `target` of them were filled
    into L1 (counted by l2_hit since `before`)."""
    s, a = bench.stack, bench.args
    filled = 0
    for _ in range(20):
        if filled >= target:
            break
        rps = bench.last_rps.get(("l2-1k", "load"), 3000)
        duration = max(1, min(30, int((target - filled) / max(rps, 500) * 1.05) + 1))
        base = bench.ids_used["mem"]
        w = bench.wrk.run(s.url_of("ibex"), "tiny", "fresh", "mem", base, 1, a.connections, duration)
        bench.ids_used["mem"] = base + w["requests"] + a.connections + 16
        if bench.ids_used["mem"] > mem_population(a):
            raise RuntimeError("memory phase ran past the agents it populated")
        filled = filter_counters(s)["l2_hit"] - before["l2_hit"]


def memory(bench):
    """Shared data cost per agent, in a fresh Envoy (restarted, same config) so that
    nothing the other phases cached changes the hash table's growth."""
    s = bench.stack
    s.restart_envoy()
    pid = s.envoy.pid
    post(s.url_of("ibex"), CHAT_PATH, bench.bodies["tiny"].read_bytes(), agent_id("l1", 0))
    time.sleep(1)  # settle: the first request's allocations (VM, buffers) are not the agents'
    before_mem, before_rss, before = envoy_memory(s.envoy.admin_url), rss_bytes(pid), filter_counters(s)
    fill_l1(bench, bench.args.mem_agents, before)
    time.sleep(1)  # wrk's connections close; their buffers go back
    after_mem, after_rss, after = envoy_memory(s.envoy.admin_url), rss_bytes(pid), filter_counters(s)
    agents = after["l2_hit"] - before["l2_hit"]
    value_len = ENTRY_HEADER + len(ESCAPED.encode())
    return {
        "agents_cached": agents,
        "other_fills": {k: after[k] - before[k] for k in ("l3_hit", "l3_none", "l2_miss", "l2_error")},
        "allocated_before": before_mem["allocated"], "allocated_after": after_mem["allocated"],
        "heap_size_before": before_mem["heap_size"], "heap_size_after": after_mem["heap_size"],
        "rss_before": before_rss, "rss_after": after_rss,
        "allocated_bytes_per_agent": round((after_mem["allocated"] - before_mem["allocated"]) / agents, 1),
        "rss_bytes_per_agent": round((after_rss - before_rss) / agents, 1),
        "directive_bytes": len(DIRECTIVE.encode()),
        "escaped_directive_bytes": len(ESCAPED.encode()),
        "logical_bytes_per_agent": KEY_LEN + value_len,
        "target_bytes_per_agent": len(ESCAPED.encode()) + 64,
        "model": shared_data_model(KEY_LEN, value_len),
    }


def shared_data_model(key_len, value_len):
    """Expected heap bytes of one shared-data entry in Envoy 1.40 (libc++, tcmalloc):
    proxy-wasm-cpp-host keeps std::unordered_map<std::string, std::pair<std::string,
    uint32_t>> per vm_id. A libc++ node is next + hash + key string (24) + value
    string (24) + cas (4, padded to 8) = 72 B (tcmalloc class 80); strings longer than
    22 bytes live on the heap (size + 1 rounded up to 16, then to a tcmalloc class);
    the bucket array adds 8 B per bucket, 1-2 buckets per entry."""
    def heap(n):
        if n <= 22:
            return 0
        size = (n + 1 + 15) // 16 * 16
        step = 16 if size <= 256 else 32 if size <= 512 else 64
        return (size + step - 1) // step * step
    node = 80
    return {"node": node, "key_heap": heap(key_len), "value_heap": heap(value_len), "buckets": "8-16",
            "total_low": node + heap(key_len) + heap(value_len) + 8,
            "total_high": node + heap(key_len) + heap(value_len) + 16}
