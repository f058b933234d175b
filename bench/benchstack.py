"""The stack of `make bench`: the project's harness (stack/) plus what the
benchmarks need on top, composed here so stack/ stays untouched.

- `SinkEnvoy`: a second, plain Envoy whose only listener answers every request
  with a fixed 200 JSON body (`direct_response`) once it has read the whole
  request (buffer filter). It is the "LLM upstream" of every benchmark variant:
  fast, identical for all of them, and outside the measured gateway process.
- `BenchEnvoy`: the stack's Envoy (envoy/local.yaml rendered by stack/envoy.py,
  with its `ibex_data` and `ibex_control` listeners) plus one listener per
  benchmark variant, all routing to the sink:
    bench_bare  no HTTP filter but the router
    bench_lua   Envoy's Lua filter prepending a fixed system message
    bench_ibex  the ibex_directive wasm filter (same vm_id as ibex_data, so the
                control listener's invalidations and the shared data are common)
    bench_noop  a proxy-wasm filter that does nothing (bench/noop-wasm, its own
                vm_id): what any wasm filter made with the Rust SDK costs before
                doing any work
    bench_ibex_noaudit  bench_ibex with `audit.filter_state` "off" (same vm_id)
    bench_ibex_auditfields  bench_ibex with `audit.filter_state` "fields" (same vm_id)
    bench_floor the same without the SDK, exporting only what Envoy needs
                (bench/floor-wasm): Envoy's own floor of a wasm filter
    bench_ibex_key  (only with api_key=True) bench_ibex with `agent.source`
                "api_key": the agent is the one a gateway API key names
    bench_ibex_webdis  (only with webdis=True) bench_ibex with L2 through Webdis
                (dialect "webdis", cluster ibex_redis_webdis: a copy of ibex_redis
                pointed at Webdis) instead of the REST front; the stack runs both
  A path under /_echo/ goes to the echo upstream instead (prefix stripped), so a
  sanity check can see the exact body each variant forwards.
- `BenchStack`: `Stack` that starts the sink first and builds a `BenchEnvoy`; its
  L2 front is the REST front, and with `webdis=True` Webdis runs beside it on the
  same Redis.

CPU pinning: every process inherits the harness's CPU affinity; the gateway
Envoy alone is started under `taskset` on its own CPU(s) (see bench/README.md).
"""

import copy

from stack.envoy import (DATA_LISTENER, HCM, WASM_FILTER, Envoy, EnvoyProcess, filter_json,
                         http_connection_manager, listener, merge, redis_front_config, set_cluster_port,
                         set_filter_json, set_port)
from stack.stack import ORDER, PORT_NAMES, Stack

from bench.workload import API_KEY_FILTER_CONFIG, PROBES, VARIANTS, WEBDIS_CLUSTER

ROUTER = "envoy.filters.http.router"
SINK_BODY = '{"id":"chatcmpl-bench","object":"chat.completion","model":"bench","choices":[]}'
BIG_LIMITS = {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                              "max_requests": 100000, "max_retries": 3}]}


def static_cluster(name, port):
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "circuit_breakers": copy.deepcopy(BIG_LIMITS),
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }


class SinkEnvoy(EnvoyProcess):
    """Plain Envoy answering 200 with a small JSON body after reading the request."""

    name = "sink"

    def __init__(self, directory, port, admin_port, concurrency=1, **kwargs):
        super().__init__(directory, port, admin_port=admin_port, concurrency=concurrency, log_level="warning",
                         **kwargs)

    def render(self):
        return {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.admin_port}}},
            "static_resources": {"listeners": [{
                "name": "sink",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": self.port}},
                "per_connection_buffer_limit_bytes": 4194304,
                "filter_chains": [{"filters": [{"name": HCM, "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                             "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "sink",
                    "codec_type": "AUTO",
                    "route_config": {"name": "sink", "virtual_hosts": [{
                        "name": "sink", "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "direct_response": {
                            "status": 200, "body": {"inline_string": SINK_BODY}}}],
                        "response_headers_to_add": [{"header": {"key": "content-type",
                                                                "value": "application/json"}}],
                    }]},
                    "http_filters": [
                        # read the whole request before answering, like a real model API
                        {"name": "envoy.filters.http.buffer", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                            "max_request_bytes": 4194304}},
                        {"name": ROUTER, "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                    ],
                }}]}],
            }]},
        }


class BenchEnvoy(Envoy):
    """The stack's Envoy plus the benchmark listeners (see the module doc).

    Made from the Envoy the stack builds (`from_stack_envoy`), so whatever settings
    the harness passes to its Envoy keep working here.
    """

    @classmethod
    def from_stack_envoy(cls, envoy, **bench):
        envoy.__class__ = cls
        envoy.init_bench(**bench)
        return envoy

    def init_bench(self, *, bench_ports, sink_port, lua_code, ibex_overrides, noop_wasm, cpus=None,
                   webdis_port=None, probe_wasm=None, probes=None, floor_wasm=None, under=None):
        self.noop_wasm = noop_wasm
        # argv prefix the gateway runs under (bench/instructions.py: valgrind)
        self.under = list(under or ())
        if self.under:
            self.ready_timeout = 600.0
        self.floor_wasm = floor_wasm
        self.probe_wasm = probe_wasm
        self.probes = dict(probes or {})
        self.webdis_port = webdis_port
        self.bench_ports = dict(bench_ports)
        self.sink_port = sink_port
        self.lua_code = lua_code
        self.ibex_overrides = ibex_overrides
        self.cpus = cpus

    def other_ports(self):
        return super().other_ports() + list(self.bench_ports.values())

    def url_of(self, variant_listener):
        return f"http://127.0.0.1:{self.bench_ports[variant_listener]}"

    def render(self):
        config = super().render()
        data = listener(config, DATA_LISTENER)
        clusters = config["static_resources"]["clusters"]
        clusters.append(static_cluster("bench_sink", self.sink_port))
        if "ibex_webdis" in self.bench_ports:
            # the same cluster settings as the REST front's, pointed at Webdis
            webdis = copy.deepcopy(next(c for c in clusters if c["name"] == "ibex_redis"))
            webdis["name"] = webdis["load_assignment"]["cluster_name"] = WEBDIS_CLUSTER
            clusters.append(webdis)
            set_cluster_port(config, WEBDIS_CLUSTER, self.webdis_port)
        for name, port in self.bench_ports.items():
            config["static_resources"]["listeners"].append(self._bench_listener(data, name, port))
        return config

    def _bench_listener(self, data, name, port):
        item = copy.deepcopy(data)
        item["name"] = f"bench_{name}"
        set_port(item, port)
        hcm = http_connection_manager(item)
        hcm["stat_prefix"] = f"bench_{name}"
        # No access log: every variant would pay for a line per request (gigabytes
        # at wrk's rates), which is not what any of them measures.
        hcm.pop("access_log", None)
        hcm["route_config"] = {"name": f"bench_{name}", "virtual_hosts": [{
            "name": "bench", "domains": ["*"],
            "routes": [
                {"match": {"prefix": "/_echo/"},
                 "route": {"cluster": "llm_upstream", "prefix_rewrite": "/", "timeout": "30s"}},
                {"match": {"prefix": "/"}, "route": {"cluster": "bench_sink", "timeout": "30s"}},
            ]}]}
        filters = hcm["http_filters"]
        router = [f for f in filters if f["name"] == ROUTER]
        if name == "bare":
            filters[:] = router
        elif name == "lua":
            filters[:] = [{"name": "envoy.filters.http.lua", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": self.lua_code}}}] + router
        elif name in ("ibex", "ibex_key", "ibex_webdis", "ibex_noaudit", "ibex_auditfields"):
            if not any(f["name"] == WASM_FILTER for f in filters):
                raise KeyError("the data listener of envoy/local.yaml has no wasm filter")
            config = merge(filter_json(item), self.ibex_overrides)
            if name == "ibex_key":
                config = merge(config, API_KEY_FILTER_CONFIG)
            if name == "ibex_noaudit":
                config = merge(config, {"audit": {"filter_state": "off"}})
            if name == "ibex_auditfields":
                config = merge(config, {"audit": {"filter_state": "fields"}})
            if name == "ibex_webdis":
                config = merge(merge(config, redis_front_config("webdis")),
                               {"redis": {"cluster": WEBDIS_CLUSTER, "authority": WEBDIS_CLUSTER}})
            set_filter_json(item, config)
        elif name in ("noop", "floor") or name in self.probes:
            wasm = copy.deepcopy(next(f for f in filters if f["name"] == WASM_FILTER))
            plugin = wasm["typed_config"]["config"]
            plugin.pop("configuration", None)
            code = self.floor_wasm if name == "floor" else self.noop_wasm
            if name in self.probes:
                code = self.probe_wasm
                plugin["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                           "value": self.probes[name]}
            plugin.update(name=f"bench_{name}", root_id=f"bench_{name}")
            plugin["vm_config"] = {"vm_id": f"bench_{name}", "runtime": plugin["vm_config"]["runtime"],
                                   "code": {"local": {"filename": str(code)}}}
            filters[:] = [wasm] + router
        else:
            raise KeyError(f"unknown bench listener {name}")
        return item

    def command(self):
        argv = [*self.under, *super().command()]
        return ["taskset", "-c", self.cpus, *argv] if self.cpus else argv


class BenchStack(Stack):
    """`Stack` with the sink Envoy and the benchmark listeners.

    gateway_cpus  CPU list for the gateway Envoy (taskset syntax), None = unpinned
    api_key       add the bench_ibex_key listener (agent.source "api_key"); off unless a
                  selected variant needs it, so the others do not depend on that source
    webdis        run Webdis beside the REST front and add the bench_ibex_webdis listener
                  (L2 through Webdis); off unless a selected variant needs it
    """

    BENCH_LISTENERS = ("bare", "lua", "ibex", "noop", "floor", "ibex_noaudit", "ibex_auditfields")
    OPTIONAL_LISTENERS = ("ibex_key", "ibex_webdis")
    PORT_NAMES = (PORT_NAMES + BENCH_LISTENERS + OPTIONAL_LISTENERS + ("sink", "sink_admin")
                  + tuple(VARIANTS[v].listener for v in PROBES))

    def __init__(self, directory, *, lua_code, ibex_overrides, noop_wasm, gateway_cpus=None, api_key=False,
                 webdis=False, probe_wasm=None, probes=None, floor_wasm=None, gateway_under=None, listeners=None, **kwargs):
        self._bench = {"lua_code": lua_code, "ibex_overrides": ibex_overrides, "noop_wasm": noop_wasm,
                       "cpus": gateway_cpus, "probe_wasm": probe_wasm, "probes": probes, "floor_wasm": floor_wasm,
                       "under": gateway_under}
        self.listeners = (self.BENCH_LISTENERS + (("ibex_key",) if api_key else ())
                          + (("ibex_webdis",) if webdis else ()) + tuple(probes or ()))
        if listeners is not None:
            # only these (under valgrind every wasm VM reserves gigabytes of address
            # space, and valgrind's runs out past a handful)
            self.listeners = tuple(name for name in self.listeners if name in listeners)
        super().__init__(directory, **kwargs)
        if webdis:  # the second L2 front, on the same Redis, started in order with the others
            self.parts = [name for name in ORDER if name in self.parts or name == "webdis"]
        self.sink = SinkEnvoy(self.dir / "sink", self.ports["sink"], self.ports["sink_admin"],
                              log_dir=kwargs.get("log_dir"))

    @property
    def bench_ports(self):
        """{listener name: port} of the benchmark listeners."""
        return {name: self.ports[name] for name in self.listeners}

    def _make_envoy(self, **settings):
        return BenchEnvoy.from_stack_envoy(super()._make_envoy(**settings), bench_ports=self.bench_ports,
                                           sink_port=self.ports["sink"], webdis_port=self.ports["webdis"],
                                           **self._bench)

    def start(self, name=None):
        if name is None:
            try:
                self.sink.start()
                return super().start()
            except BaseException:
                self.sink.stop()
                raise
        return super().start(name)

    def stop(self, name=None):
        if name is not None:
            return super().stop(name)
        try:
            super().stop()
        finally:
            self.sink.stop()

    def url_of(self, variant_listener):
        return self.envoy.url_of(variant_listener)
