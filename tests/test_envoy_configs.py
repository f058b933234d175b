"""Every committed Envoy config loads in Envoy 1.40 (`envoy --mode validate`).

Validate mode builds the whole config, wasm VM and filter configuration
included, so this also proves the filter accepts the committed JSON. It runs
from the repository root, where the configs' relative wasm path points.
"""

import os
import secrets
import stat
import subprocess

import pytest
import yaml

from stack import paths
from helpers import ACCESS_LOG_FIELDS
from stack.envoy import (
    CONTROL_LISTENER,
    DATA_LISTENER,
    file_access_logs,
    filter_json,
    http_connection_manager,
    listener,
    load_template,
    redis_front_config,
    render_config,
    wasm_plugin,
)

CONFIGS = sorted(paths.ENVOY_DIR.glob("*.yaml"))
DEPLOY_CONFIGS = [paths.REPO / "deploy" / "kubernetes" / "base" / "envoy.yaml"]
"""Envoy configs of deploy/: the same contract and defaults (tests/test_deploy.py runs them
through `envoy --mode validate` as their containers render them)."""
EVERY_CONFIG = CONFIGS + sorted((paths.ENVOY_DIR / "examples").glob("*.yaml")) + DEPLOY_CONFIGS
ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%PATH(NQ)%",
    "status": "%RESPONSE_CODE%",
    "duration_ms": "%DURATION%",
    "audit": "%FILTER_STATE(wasm.ibex.audit:PLAIN)%",
}
"""The audit trail's access log line (README, Audit trail): the filter's filter state
printed PLAIN (the bare string; TYPED and no format print a BytesValue), the path without
its query string (a client may put a credential there)."""
TOKEN_PLACEHOLDER = "${IBEX_CONTROL_TOKEN}"
REST_TOKEN_PLACEHOLDER = "${IBEX_REDIS_REST_TOKEN}"
COMPOSE_ENTRYPOINT = paths.ENVOY_DIR / "compose-entrypoint.sh"
GOOD_REST_TOKEN = "r" * 40


def validate(config_path):
    """Run envoy --mode validate on a file; return the CompletedProcess."""
    return subprocess.run(
        [str(paths.envoy_path()), "--mode", "validate", "-c", str(config_path), "-l", "warning"],
        cwd=paths.REPO, capture_output=True, text=True, timeout=120,
    )


def test_there_are_configs():
    names = {path.name for path in CONFIGS}
    assert {"local.yaml", "compose.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_committed_config_validates(config):
    paths.require_file(paths.wasm_path(), "build the filter first (make build)")
    result = validate(config)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "OK" in result.stdout + result.stderr


@pytest.mark.parametrize("config", CONFIGS + DEPLOY_CONFIGS, ids=lambda p: str(p.relative_to(paths.REPO)))
def test_config_keeps_the_contract(config):
    """Names the filter and the harness rely on are present in every config."""
    data = load_template(config)
    clusters = {c["name"] for c in data["static_resources"]["clusters"]}
    assert {"ibex_redis", "ibex_store", "llm_upstream"} <= clusters
    data_listener = listener(data, DATA_LISTENER)
    control_listener = listener(data, CONTROL_LISTENER)
    assert filter_json(control_listener)["role"] == "control"
    assert filter_json(data_listener).get("role", "data") == "data"
    assert data_listener["per_connection_buffer_limit_bytes"] >= 2 * 1024 * 1024
    for item in (data_listener, control_listener):
        plugin = wasm_plugin(item)
        # Never forward without the filter, and recover by itself (README, Failure behaviour).
        assert plugin["failure_policy"] == "FAIL_RELOAD"
        assert plugin["reload_config"]["backoff"]["base_interval"]
        assert plugin["root_id"] == "ibex_directive"
        assert plugin["vm_config"]["vm_id"] == "ibex_directive"
        assert plugin["vm_config"]["runtime"] == "envoy.wasm.runtime.v8"
        assert "IBEX_DIRECTIVE_CACHE_TTL" in plugin["vm_config"]["environment_variables"]["host_env_keys"]


@pytest.mark.parametrize("config", CONFIGS + DEPLOY_CONFIGS, ids=lambda p: str(p.relative_to(paths.REPO)))
def test_config_has_safe_defaults(config):
    """What a copied config must not get wrong (README, Threat model)."""
    data = load_template(config)
    assert data["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    data_listener = listener(data, DATA_LISTENER)
    control_listener = listener(data, CONTROL_LISTENER)
    assert control_listener["address"]["socket_address"]["address"] == "127.0.0.1"
    for item in data["static_resources"]["listeners"]:
        hcm = http_connection_manager(item)
        # the filter matches the path the upstream routes
        assert hcm["normalize_path"] is True, item["name"]
        assert hcm["merge_slashes"] is True, item["name"]
        assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST", item["name"]
    data_json = filter_json(data_listener)
    assert data_json["agent"]["missing"] == "reject"
    assert data_json.get("debug_headers", False) is False
    # the provider does not learn the agent: the router drops its header
    removed = http_connection_manager(data_listener)["route_config"]["request_headers_to_remove"]
    assert data_json["agent"].get("header", "x-agent-id") in removed
    # whoever starts Envoy puts the tokens in (stack/envoy.py, envoy/compose-entrypoint.sh)
    assert filter_json(control_listener)["control"]["token"] == TOKEN_PLACEHOLDER
    # L2 is the REST front (SPEC §2): the Upstash dialect, with its token
    assert data_json["redis"]["dialect"] == "upstash"
    assert data_json["redis"]["token"] == REST_TOKEN_PLACEHOLDER


def config_id(path):
    if path.is_relative_to(paths.ENVOY_DIR):
        return str(path.relative_to(paths.ENVOY_DIR))
    return str(path.relative_to(paths.REPO))


@pytest.mark.parametrize("config", EVERY_CONFIG, ids=config_id)
def test_config_writes_the_audit_trail(config):
    """Every committed config, the examples too, logs one JSON line per request on the data
    listener with the audit fields (SPEC §7), to stdout (the harness and make run point it at a
    file); the control listener logs nothing."""
    data = load_template(config)
    hcm = http_connection_manager(listener(data, DATA_LISTENER))
    [log] = hcm["access_log"]
    assert log["name"] == "envoy.access_loggers.file"
    assert log["typed_config"]["path"] == "/dev/stdout"
    assert log["typed_config"]["log_format"] == {"json_format": ACCESS_LOG_FORMAT}
    assert log.get("filter") is None, "every request is logged"
    assert "access_log" not in http_connection_manager(listener(data, CONTROL_LISTENER))
    assert ACCESS_LOG_FIELDS == tuple(ACCESS_LOG_FORMAT)


@pytest.mark.parametrize("front", ["rest", "webdis"])
def test_rendered_test_config_validates(tmp_path, front):
    """The config the harness writes for a test stack (ports, overrides) loads too."""
    paths.require_file(paths.wasm_path(), "build the filter first (make build)")
    rendered = render_config(
        load_template(), admin_port=1, data_port=2, control_port=3, upstream_port=4, redis_front_port=5,
        store_port=6, wasm=paths.wasm_path(), redis_front=redis_front_config(front, secrets.token_urlsafe(32)),
        filter_config={"cache": {"ttl_seconds": 1}, "agent": {"missing": "reject"}, "failure_mode": "open"},
        access_log_path=tmp_path / "access.log",
    )
    assert [log["path"] for log in file_access_logs(listener(rendered, DATA_LISTENER))] == [
        str(tmp_path / "access.log")]
    data_json = filter_json(listener(rendered, DATA_LISTENER))
    assert data_json["redis"]["dialect"] == {"rest": "upstash", "webdis": "webdis"}[front]
    assert ("token" in data_json["redis"]) == (front == "rest")
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump(rendered))
    result = validate(path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.parametrize("bad,field", [
    ({"cache": {"ttl_seconds": "sixty"}}, "cache.ttl_seconds"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"agent": {"missing": "maybe"}}, "agent.missing"),
    ({"failure_mode": "sideways"}, "failure_mode"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_invalid_filter_config_is_rejected(tmp_path, bad, field):
    """An unknown or wrongly-typed field makes Envoy refuse the config (SPEC §3),
    and Envoy's log says which field (the filter logs it when on_configure fails)."""
    paths.require_file(paths.wasm_path(), "build the filter first (make build)")
    rendered = render_config(
        load_template(), admin_port=1, data_port=2, control_port=3, upstream_port=4, redis_front_port=5,
        store_port=6, wasm=paths.wasm_path(), redis_front=redis_front_config("rest", secrets.token_urlsafe(32)),
        filter_config=bad,
    )
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(rendered))
    result = validate(path)
    log = result.stdout + result.stderr
    assert result.returncode != 0, f"Envoy accepted the invalid filter config {bad}"
    assert f"invalid ibex_directive configuration: field `{field}`" in log, log[-2000:]


def test_docker_compose_matches_its_envoy_config():
    """docker-compose.yml cannot run here (no Docker engine); at least its
    wiring agrees with envoy/compose.yaml: every cluster host is a service on
    the port it serves, the config and the wasm are mounted where Envoy looks."""
    compose = yaml.safe_load((paths.REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    envoy_config = load_template(paths.ENVOY_DIR / "compose.yaml")
    expected_ports = {"rest": 8080, "store": 8081, "upstream": 18000}
    for cluster in envoy_config["static_resources"]["clusters"]:
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        assert address["address"] in services, f"cluster {cluster['name']} points at unknown service {address}"
        assert expected_ports[address["address"]] == address["port_value"]
    envoy = services["envoy"]
    # sh compose-entrypoint.sh TEMPLATE OUTPUT envoy -c OUTPUT …: the template is the
    # mounted compose.yaml, Envoy runs on what the script wrote
    command = envoy["command"]
    script_mount = next(v for v in envoy["volumes"] if v.startswith("./envoy/compose-entrypoint.sh:"))
    assert command[:2] == ["sh", script_mount.split(":")[1]]
    config_mount = next(v for v in envoy["volumes"] if v.startswith("./envoy/compose.yaml:"))
    assert command[2] == config_mount.split(":")[1]
    assert command[4] == "envoy" and command[command.index("-c") + 1] == command[3]
    # the token reaches Envoy and the subscriber from the environment, and compose
    # refuses to start without one
    for name in ("envoy", "subscriber"):
        assert services[name]["environment"]["IBEX_CONTROL_TOKEN"].startswith("${IBEX_CONTROL_TOKEN:?"), name
    assert [n for n, s in services.items() if "IBEX_CONTROL_TOKEN" in (s.get("environment") or {})] == \
        ["envoy", "subscriber"]
    # the REST front's token reaches the front and Envoy only, the same way
    for name in ("rest", "envoy"):
        assert services[name]["environment"]["IBEX_REDIS_REST_TOKEN"].startswith("${IBEX_REDIS_REST_TOKEN:?"), name
    assert [n for n, s in services.items() if "IBEX_REDIS_REST_TOKEN" in (s.get("environment") or {})] == \
        ["rest", "envoy"]
    # the front's admin token (the operators') is optional, passed through from compose's
    # environment when set (a key without a value: left out when unset, where an empty
    # value would stop the front), and reaches the front only, never Envoy
    assert services["rest"]["environment"]["IBEX_REDIS_REST_ADMIN_TOKEN"] is None
    assert [n for n, s in services.items()
            if any(k.startswith("IBEX_REDIS_REST_ADMIN_TOKEN") for k in (s.get("environment") or {}))] == ["rest"]
    # the L2 front is the REST front, on the port the ibex_redis cluster names, in front of the redis service
    rest = services["rest"]["command"]
    assert rest[0] == "rest" and rest[rest.index("--listen") + 1] == f"0.0.0.0:{expected_ports['rest']}"
    assert rest[rest.index("--redis-url") + 1].startswith("redis://redis:")
    assert "DATABASE_URL" not in services["rest"]["environment"]
    assert "rest" in envoy["depends_on"] and "webdis" not in services
    # admin stays on the container's loopback: not published, checked from inside
    admin_port = envoy_config["admin"]["address"]["socket_address"]["port_value"]
    assert all(not port.endswith(f":{admin_port}") for port in envoy["ports"])
    assert f"/dev/tcp/127.0.0.1/{admin_port}" in " ".join(envoy["healthcheck"]["test"])
    assert services["subscriber"]["depends_on"]["envoy"]["condition"] == "service_healthy"
    wasm = wasm_plugin_path(envoy_config)
    wasm_dir_mount = next(v for v in envoy["volumes"] if v.startswith("./target/wasm32-wasip1/release:"))
    assert envoy["working_dir"] + "/" + wasm.rsplit("/", 1)[0] == wasm_dir_mount.split(":")[1]
    assert "store" in services["store"]["command"] and "0.0.0.0:8081" in services["store"]["command"]
    assert services["subscriber"]["network_mode"] == "service:envoy"
    control_port = listener(envoy_config, CONTROL_LISTENER)["address"]["socket_address"]["port_value"]
    assert f"http://127.0.0.1:{control_port}" in services["subscriber"]["command"]
    assert services["upstream"]["volumes"][0].startswith("./stack/echo_upstream.py:")
    for mount in envoy["volumes"] + services["upstream"]["volumes"]:
        assert (paths.REPO / mount.split(":")[0]).resolve().is_relative_to(paths.REPO)


def wasm_plugin_path(config):
    """The wasm filename of the data listener's filter."""
    return wasm_plugin(listener(config, DATA_LISTENER))["vm_config"]["code"]["local"]["filename"]


def run_compose_entrypoint(tmp_path, token, *command, rest_token=GOOD_REST_TOKEN):
    """envoy/compose-entrypoint.sh on envoy/compose.yaml, as the envoy service runs it."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("IBEX_CONTROL_TOKEN", "IBEX_REDIS_REST_TOKEN")}
    if token is not None:
        env["IBEX_CONTROL_TOKEN"] = token
    if rest_token is not None:
        env["IBEX_REDIS_REST_TOKEN"] = rest_token
    output = tmp_path / "ibex" / "envoy.yaml"
    result = subprocess.run(["sh", str(COMPOSE_ENTRYPOINT), str(paths.ENVOY_DIR / "compose.yaml"), str(output),
                             *command], cwd=paths.REPO, env=env, capture_output=True, text=True, timeout=30)
    return result, output


def test_compose_entrypoint_renders_the_token(tmp_path):
    """The envoy service's entrypoint writes compose.yaml with both tokens (0600),
    which loads in Envoy, and runs its command without the tokens in the environment."""
    paths.require_file(paths.wasm_path(), "build the filter first (make build)")
    token = secrets.token_hex(32)
    rest_token = secrets.token_urlsafe(33)
    result, output = run_compose_entrypoint(
        tmp_path, token, "sh", "-c", 'echo "left:${IBEX_CONTROL_TOKEN:-none}:${IBEX_REDIS_REST_TOKEN:-none}"',
        rest_token=rest_token)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "left:none:none\n"
    assert token not in result.stdout + result.stderr and rest_token not in result.stdout + result.stderr
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    rendered = load_template(output)
    assert filter_json(listener(rendered, CONTROL_LISTENER))["control"]["token"] == token
    assert filter_json(listener(rendered, DATA_LISTENER))["redis"]["token"] == rest_token
    assert TOKEN_PLACEHOLDER not in output.read_text() and REST_TOKEN_PLACEHOLDER not in output.read_text()
    # nothing else changed
    template = load_template(paths.ENVOY_DIR / "compose.yaml")
    for name in (CONTROL_LISTENER, DATA_LISTENER):
        wasm_plugin(listener(template, name))["configuration"]["value"] = wasm_plugin(listener(rendered, name))[
            "configuration"]["value"]
    assert rendered == template
    data_text = wasm_plugin(listener(load_template(paths.ENVOY_DIR / "compose.yaml"), DATA_LISTENER))[
        "configuration"]["value"]
    assert wasm_plugin(listener(rendered, DATA_LISTENER))["configuration"]["value"] == \
        data_text.replace(REST_TOKEN_PLACEHOLDER, rest_token)
    check = validate(output)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]


@pytest.mark.parametrize("token", [None, "", "short", "x" * 31, "a" * 40 + " b", "a" * 40 + "&", "a" * 40 + "|",
                                   "a" * 40 + "\\", "a" * 40 + '"'],
                         ids=["unset", "empty", "short", "31", "space", "ampersand", "pipe", "backslash", "quote"])
def test_compose_entrypoint_refuses_a_missing_or_unusable_token(tmp_path, token):
    result, output = run_compose_entrypoint(tmp_path, token, "true")
    assert result.returncode == 64, result.stderr
    assert "IBEX_CONTROL_TOKEN" in result.stderr
    if token:
        assert token not in result.stderr
    assert not output.exists()
    # the REST front's token, with a good control token
    result, output = run_compose_entrypoint(tmp_path, secrets.token_hex(32), "true", rest_token=token)
    assert result.returncode == 64, result.stderr
    assert "IBEX_REDIS_REST_TOKEN" in result.stderr
    if token:
        assert token not in result.stderr
    assert not output.exists()
