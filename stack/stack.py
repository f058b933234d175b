"""The whole stack as one context manager.

    with Stack(tmp_dir) as stack:
        stack.set_directive(agent, "Be brief.")
        requests.post(stack.gateway_url + "/v1/chat/completions", ...)
        stack.upstream.received()

Parts start in dependency order (Postgres, migrations, Redis, the L2 front,
store, echo upstream, Envoy, subscriber) on free loopback ports unless ports
are given, and stop in reverse order, also when a test fails. The L2 front is
the REST front (`companion rest`, dialect "upstash") unless `l2="webdis"`.
"""

import secrets
from pathlib import Path

from stack.companion import PATIENT_STORE_ENV, Companion, RestFront, Store, Subscriber
from stack.envoy import DEBUG_FILTER_CONFIG, PATIENT_FILTER_CONFIG, REMOVE, Envoy, merge, redis_front_config
from stack.ports import free_port, wait_until
from stack.postgres import Postgres
from stack.redis import Redis, Webdis
from stack.redis_cluster import RedisCluster, free_cluster_ports
from stack.upstream import EchoUpstream

ORDER = ("postgres", "redis", "rest", "webdis", "store", "upstream", "envoy", "subscriber")
L2_FRONTS = ("rest", "webdis")
"""The HTTP fronts of Redis Envoy's ibex_redis cluster can point at: the REST front
(`companion rest`, dialect "upstash", the default) and Webdis (dialect "webdis").
A stack runs one of them (`l2`); `parts` naming both still starts only that one."""
REDIS_KINDS = ("single", "cluster")
"""What `redis` a stack runs: one redis-server ("single", the default) or a real
three-master Redis Cluster ("cluster", stack/redis_cluster.py), which the REST front,
the subscriber and the companion's CLI then use with --redis-cluster; Webdis cannot
front a cluster, so a cluster stack's L2 front is the REST front."""
PORT_NAMES = ("postgres", "redis", "rest", "webdis", "store", "subscriber", "upstream", "data", "control", "admin")


def allocate_ports(given=None, names=PORT_NAMES):
    """A port for each of `names`: the given ones, free distinct ports for the rest."""
    ports = dict(given or {})
    taken = set(ports.values())
    for name in names:
        if name not in ports:
            port = free_port()
            while port in taken:
                port = free_port()
            ports[name] = port
            taken.add(port)
    return ports


class Stack:
    """Every real process of ibex-directive, wired together.

    directory        where each part keeps its files (one subdirectory each)
    ports            {part: port} overrides (see PORT_NAMES); the rest are free ports
    filter_config    merged into the data listener's filter JSON
    control_config   merged into the control listener's filter JSON
    envoy_env        extra environment of Envoy (IBEX_DIRECTIVE_CACHE_TTL)
    parts            the parts to run (default: all of ORDER)
    pg_dir           Postgres directory (kept data), default directory/postgres
    fast_pg          throw-away Postgres without fsync
    pid_dir          where pid files go (make run), default none
    log_dir          where every log goes, default each part's own directory
    l2               the L2 front: "rest" (default: `companion rest`, filter dialect "upstash",
                     with the stack's `rest_token`) or "webdis" (dialect "webdis"); the part's
                     name is `l2_part`, so `stack.stop(stack.l2_part)` stops whichever runs
    rest_token       the REST front's filter token (Envoy's `redis.token`: PING, GET and the
                     filter's EVAL scripts on the filter's keys only); default a new random one
                     (make run passes its own); never logged
    rest_admin_token the REST front's admin token (the operators' and SDKs': GET, SET with EX,
                     DEL and the filter's scripts on any key); default a new random one, which
                     must differ from rest_token (make run passes its own); Envoy never gets
                     it; never logged
    redis            "single" (default: one redis-server) or "cluster" (a real three-master
                     Redis Cluster, REDIS_KINDS; needs l2="rest")
    log_levels       {"envoy": "info", "companion": "info", "webdis": 3} (the REST front logs at
                     the companion's level)
    patient          callout timeouts that hold on a loaded machine (PATIENT_FILTER_CONFIG
                     under every filter_config, PATIENT_STORE_ENV for the store): test
                     stacks; without it the committed configuration's timeouts apply
    debug_headers    the upstream gets `x-ibex-directive` (DEBUG_FILTER_CONFIG under every
                     filter_config): test stacks that read the tier; off in the committed configs
    control_token    the control listener's bearer token, which the subscriber presents;
                     default a new random one for this stack (make run passes its own)
    http_filters_before  Envoy HTTP filters put before the wasm filter on the data listener
                     (test_jwt: jwt_authn); default none
    envoy_template   the Envoy config the harness rewrites for the stack (stack/envoy.py);
                     default envoy/local.yaml (test_api_key and `make run` also run the
                     examples in envoy/examples/)
    cluster_ports    {cluster: port}: Envoy's clusters pointed elsewhere than the stack's parts
                     (the bench's fleet phase: llm_upstream at its sink), as restart_envoy takes it
    store_redis      the store gets the stack's Redis (IBEX_STORE_REDIS_URL): lookups of one
                     agent share a query across Envoys while Redis shows no invalidation
                     since it was sent (a fleet's cold start: stack/fleet.py); default off
    """

    PORT_NAMES = PORT_NAMES

    def __init__(self, directory, *, ports=None, filter_config=None, control_config=None, envoy_env=None,
                 parts=ORDER, pg_dir=None, fast_pg=True, pid_dir=None, log_dir=None, concurrency=2,
                 log_levels=None, patient=False, debug_headers=False, control_token=None,
                 http_filters_before=None, envoy_template=None, l2="rest", rest_token=None,
                 rest_admin_token=None, store_redis=False, cluster_ports=None, redis="single"):
        self.dir = Path(directory).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ports = allocate_ports(ports, self.PORT_NAMES)
        self.pid_dir = pid_dir
        self.log_dir = log_dir
        if l2 not in L2_FRONTS:
            raise ValueError(f"unknown L2 front {l2!r}; fronts are {', '.join(L2_FRONTS)}")
        self.parts = [name for name in ORDER if name in parts and (name not in L2_FRONTS or name == l2)]
        levels = {"envoy": "info", "companion": "info", "webdis": 3, **(log_levels or {})}
        common = {"pid_dir": pid_dir, "log_dir": log_dir}
        p = self.ports
        self.postgres = Postgres(Path(pg_dir) if pg_dir else self.dir / "postgres", p["postgres"], fast=fast_pg,
                                 **common)
        if redis not in REDIS_KINDS:
            raise ValueError(f"unknown Redis {redis!r}; kinds are {', '.join(REDIS_KINDS)}")
        if redis == "cluster" and l2 != "rest":
            raise ValueError("Webdis cannot front a Redis Cluster: a cluster stack's L2 front is the REST front")
        self.redis_kind = redis
        # The companion's parts learn the cluster from IBEX_REDIS_CLUSTER (its --redis-cluster).
        redis_env = {"IBEX_REDIS_CLUSTER": "true"} if redis == "cluster" else {}
        if redis == "cluster":
            self.redis = RedisCluster(self.dir / "redis", free_cluster_ports(3, taken=set(p.values())), **common)
        else:
            self.redis = Redis(self.dir / "redis", p["redis"], **common)
        self.rest_token = rest_token or secrets.token_urlsafe(32)
        self.rest = RestFront(self.dir / "rest", p["rest"], self.redis.url, self.rest_token,
                              admin_token=rest_admin_token, log_level=levels["companion"], env=redis_env,
                              **common)
        self.rest_admin_token = self.rest.admin_token  # the front's SET/DEL token; Envoy keeps rest_token
        self.webdis = Webdis(self.dir / "webdis", p["webdis"], p["redis"], verbosity=levels["webdis"], **common)
        self.store = Store(self.dir / "store", p["store"], self.postgres.url, log_level=levels["companion"],
                           redis_url=self.redis.url if store_redis else None,
                           env=PATIENT_STORE_ENV if patient else None, **common)
        self.upstream = EchoUpstream(self.dir / "upstream", p["upstream"], **common)
        self.envoy_settings = {
            "filter_config": filter_config or {},
            "control_config": control_config or {},
            "env": envoy_env or {},
            "concurrency": concurrency,
            "log_level": levels["envoy"],
            "cluster_ports": dict(cluster_ports or {}),
            "http_filters_before": list(http_filters_before or []),
            "template": envoy_template,
            "l2": l2,
        }
        self.filter_defaults = merge(PATIENT_FILTER_CONFIG if patient else {},
                                     DEBUG_FILTER_CONFIG if debug_headers else {})
        self.control_token = control_token or secrets.token_urlsafe(32)
        self.envoy = self._make_envoy(**self.envoy_settings)
        self.subscriber = Subscriber(self.dir / "subscriber", p["subscriber"], self.redis.url,
                                     [self.envoy.control_url], control_token=self.control_token,
                                     log_level=levels["companion"], env=redis_env, **common)
        self.companion = Companion(self.postgres.url, self.redis.url, directory=log_dir or self.dir,
                                   env={"RUST_LOG": levels["companion"], **redis_env})

    # -- lifecycle --------------------------------------------------------------

    def _make_envoy(self, filter_config, control_config, env, concurrency, log_level, cluster_ports=None,
                    http_filters_before=None, template=None, l2="rest", member=0):
        """An Envoy wired to this stack's ports with the given settings (not started):
        cluster ibex_redis at the L2 front `l2`, the filter speaking its dialect.
        `member` > 0: another Envoy of a fleet (stack/fleet.py), part `envoy-<member>`,
        on the ports `data-<member>`, `control-<member>`, `admin-<member>`."""
        p = self.ports
        suffix = f"-{member}" if member else ""
        return Envoy(self.dir / f"envoy{suffix}", data_port=p["data" + suffix], control_port=p["control" + suffix],
                     admin_port=p["admin" + suffix], upstream_port=p["upstream"], redis_front_port=p[l2],
                     name=f"envoy{suffix}" if member else None,
                     redis_front=redis_front_config(l2, self.rest_token), store_port=p["store"],
                     filter_config=filter_config, filter_defaults=self.filter_defaults,
                     control_config=control_config, control_token=self.control_token,
                     env=env, concurrency=concurrency, log_level=log_level, pid_dir=self.pid_dir,
                     log_dir=self.log_dir, cluster_ports=cluster_ports,
                     http_filters_before=http_filters_before, template=template)

    @property
    def l2_part(self):
        """The name of the part Envoy's L2 callouts go to: "rest" or "webdis"."""
        return self.envoy_settings["l2"]

    @property
    def l2(self):
        """The L2 front's process (RestFront or Webdis)."""
        return self.part(self.l2_part)

    @property
    def l2_dialect(self):
        """The filter's `redis.dialect` for the L2 front: "upstash" or "webdis"."""
        return redis_front_config(self.l2_part, self.rest_token)["redis"]["dialect"]

    def part(self, name):
        """The process object of part `name`."""
        if name not in ORDER:
            raise KeyError(f"unknown part {name!r}; parts are {', '.join(ORDER)}")
        return getattr(self, name)

    def start(self, name=None):
        """Start one part (by name) or, without a name, every part in order."""
        if name is not None:
            self.part(name).start()
            if name == "subscriber" and self.envoy.running():
                # its first act is a full flush; let it land before anyone relies on a cache
                wait_until(lambda: self.subscriber.settled_invalidations() >= 1,
                           what="the subscriber's initial flush to reach Envoy")
            return self
        try:
            for part in self.parts:
                self.start(part)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, name=None):
        """Stop one part (by name) or, without a name, every part in reverse order."""
        if name is not None:
            self.part(name).stop()
            return
        errors = []
        for part in reversed(ORDER):
            try:
                self.part(part).stop()
            except Exception as exc:  # noqa: BLE001 - stop the others first
                errors.append(f"{part}: {exc!r}")
        if errors:
            raise RuntimeError("stopping the stack: " + "; ".join(errors))

    def restart_envoy(self, *, filter_config=None, control_config=None, env=None, log_level=None,
                      cluster_ports=None, concurrency=None, http_filters_before=None, template=None, l2=None):
        """Replace Envoy by one with other settings (same ports); returns the new Envoy.

        Settings not given keep their current value; `filter_config` replaces
        the previous one, over the stack's own defaults (`patient`). The subscriber keeps
        pointing at the same control port. `cluster_ports` ({cluster: port},
        e.g. {"ibex_redis": port}) points clusters away from the stack's own
        parts; `{}` points them back. `concurrency` sets Envoy's worker count.
        `http_filters_before` replaces the filters put before ours (`[]`: none).
        `template` runs another Envoy config (e.g. envoy/examples/api_key.yaml);
        `REMOVE` (stack/envoy.py) goes back to envoy/local.yaml. `l2` ("rest" or
        "webdis") points ibex_redis at that front with its dialect (the caller starts
        the part: `stack.start("webdis")`); `l2_part` follows.
        """
        settings = dict(self.envoy_settings)
        for key, value in (("filter_config", filter_config), ("control_config", control_config),
                           ("env", env), ("log_level", log_level), ("cluster_ports", cluster_ports),
                           ("concurrency", concurrency), ("http_filters_before", http_filters_before),
                           ("template", template), ("l2", l2)):
            if value is REMOVE and key == "template":
                settings[key] = None
            elif value is not None:
                settings[key] = value
        self.envoy.stop()
        self.envoy_settings = settings
        self.envoy = self._make_envoy(**settings)
        return self.envoy.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- conveniences ------------------------------------------------------------

    @property
    def gateway_url(self):
        return self.envoy.url

    @property
    def access_log_path(self):
        """The data listener's JSON access log (the audit trail): `access.log` in Envoy's log
        directory (make run: .run/logs/access.log). Kept over `restart_envoy`: every Envoy
        of the stack appends to it."""
        return self.envoy.access_log_path

    def access_log(self):
        """Its complete lines so far, parsed (tests/helpers.py `access_log_lines` polls)."""
        return self.envoy.access_log()

    def control_headers(self):
        """Headers that authorise a request to the control listener (its bearer token)."""
        return {"authorization": f"Bearer {self.control_token}"}

    def set_directive(self, agent_id, content, publish=True):
        """Set an agent's directive through the real companion CLI (Postgres, then PUBLISH).

        With a running subscriber and Envoy, returns once the published update
        went all the way through (Redis key deleted, Envoy invalidated), so an
        invalidation never lands in the middle of the caller's next requests.
        """
        return self._published(lambda: self.companion.set_directive(agent_id, content, publish=publish), publish)

    def clear_directive(self, agent_id, publish=True):
        """Remove an agent's directive through the real companion CLI (waits like set_directive)."""
        return self._published(lambda: self.companion.clear_directive(agent_id, publish=publish), publish)

    def flush(self):
        """Publish a flush of every cache (waits like set_directive)."""
        return self._published(self.companion.flush, True)

    def issue_key(self, agent_id, label=None):
        """A new gateway key for `agent_id` through the real companion CLI (`issue-key`).

        Returns the key itself: keep it in the test, never in a log. Nothing is
        published (no cache can hold a key that did not exist)."""
        return self.companion.issue_key(agent_id, label=label)

    def revoke_key(self, key_sha256=None, key=None, publish=True):
        """Revoke a gateway key through the real companion CLI, by its SHA-256 or by the
        key itself (sent on stdin); returns the SHA-256. Waits like set_directive: with
        a running subscriber and Envoy, returns once the subscriber dropped the key's
        Redis entry and every Envoy acknowledged the key's invalidation."""
        return self._published(lambda: self.companion.revoke_key(key_sha256=key_sha256, key=key, publish=publish),
                               publish)

    def _published(self, action, publish):
        """Run a companion command; when it publishes, wait for the subscriber to settle it."""
        if not (publish and self.subscriber.running() and self.envoy.running()):
            return action()
        before = self.subscriber.settled_invalidations()
        output = action()
        wait_until(lambda: self.subscriber.settled_invalidations() > before,
                   what="the subscriber to deliver the published update")
        return output

    def redis_cli(self, *args):
        """The real redis-cli against the stack's Redis (raw output, stripped)."""
        return self.redis.redis_cli(*args)

    def log_files(self):
        """Every log file the stack's processes wrote."""
        files = set()
        for name in ORDER:
            files.update(path for path in self.part(name).log_paths() if path.exists())
        files.update(self.dir.rglob("*.log"))
        return sorted(files)
