"""Real upstreams over TLS: the provider examples (envoy/examples/{openai,anthropic,
azure,gemini,bedrock}.yaml) run end to end against a local TLS echo upstream.

Each test runs a committed provider example as it is, but for two things: the
upstream cluster points at the TLS echo upstream (stack/tls_upstream.py) on
loopback, and its certificate is checked against a CA this module generates instead
of the system bundle. The SNI, the name the certificate must carry, the Host
rewrite, the headers the route adds and removes and, for Bedrock, the filter order
and the SigV4 signing are the committed ones. The TLS upstream presents a
certificate of that CA for the providers' names (wildcards where the providers'
are) and records the SNI of every handshake. A certificate of another CA, or of the
right CA for another name, is refused: 503 from Envoy, nothing at the upstream.

Every client uses a gateway key (agent.source "api_key"), sent where that
provider's SDK sends its key; the provider key reaches Envoy through its
environment, as in production. DEBUG_HEADERS is off: the upstream sees exactly
what the committed config sends.
"""

import hashlib
import hmac
import secrets
import subprocess
from dataclasses import dataclass
from urllib.parse import quote

import openai
import pytest
import requests
import yaml

from helpers import agent_with, agent_with_key, assert_chat_injected, assert_single_insertion, chat_body, strict_json
from stack import free_port, paths
from stack.contract import AGENT_HEADER
from stack.envoy import (CONTROL_LISTENER, DATA_LISTENER, WASM_FILTER, filter_json, http_connection_manager,
                         http_filters, listener, load_template, wasm_plugin)
from stack.stack import ORDER
from stack.tls_upstream import TlsEchoUpstream, issue, make_ca

# The plain echo upstream is not needed: every request here goes over TLS.
PARTS = tuple(part for part in ORDER if part != "upstream")
DEBUG_HEADERS = False

EXAMPLES = paths.ENVOY_DIR / "examples"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
TLS_SOCKET = "envoy.transport_sockets.tls"
SIGNING_FILTER = "envoy.filters.http.aws_request_signing"
HEADER_MUTATION = "envoy.filters.http.header_mutation"
ROUTER = "envoy.filters.http.router"

AWS_ACCESS_KEY = "AKIDIBEXTEST" + secrets.token_hex(4).upper()
AWS_SECRET_KEY = secrets.token_urlsafe(30)
AWS_REGION = "us-east-1"
BEDROCK_HOST = f"bedrock-runtime.{AWS_REGION}.amazonaws.com"
# An application inference profile ARN, as boto3 puts it in the path (its `:` and `/` escaped).
BEDROCK_ARN = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123def456"
BEDROCK_ARN_PATH = f"/model/{quote(BEDROCK_ARN, safe='')}/converse"

# The names the real providers' certificates carry (wildcards where theirs are).
CERTIFICATE_NAMES = ["api.openai.com", "api.anthropic.com", "*.openai.azure.com", "*.googleapis.com", BEDROCK_HOST]


@dataclass
class Provider:
    """A provider example and how its clients and its upstream speak."""

    example: str
    host: str
    key_header: str  # where the client sends its gateway key (agent.api_key.header)
    env: dict  # Envoy's environment: the operator's provider credentials
    provider_headers: dict  # what the upstream must get, added by Envoy
    path: str
    removed: tuple = ()  # credential headers a client sends that must not reach the upstream

    def gateway_headers(self, key):
        return {self.key_header: f"Bearer {key}" if self.key_header == "authorization" else key}


PROVIDER_KEY = {name: f"{name}-provider-key-{secrets.token_hex(8)}" for name in
                ("openai", "anthropic", "azure", "gemini")}

PROVIDERS = {
    "openai": Provider(
        "openai.yaml", "api.openai.com", "authorization", {"OPENAI_API_KEY": PROVIDER_KEY["openai"]},
        {"authorization": f"Bearer {PROVIDER_KEY['openai']}"}, "/v1/chat/completions",
        removed=("x-api-key", "api-key", "x-goog-api-key", "openai-organization", "openai-project")),
    "anthropic": Provider(
        "anthropic.yaml", "api.anthropic.com", "x-api-key", {"ANTHROPIC_API_KEY": PROVIDER_KEY["anthropic"]},
        {"x-api-key": PROVIDER_KEY["anthropic"], "anthropic-version": "2023-06-01"}, "/v1/messages",
        removed=("authorization", "api-key", "x-goog-api-key")),
    "azure": Provider(
        "azure.yaml", "my-resource.openai.azure.com", "api-key", {"AZURE_OPENAI_API_KEY": PROVIDER_KEY["azure"]},
        {"api-key": PROVIDER_KEY["azure"]}, "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        removed=("authorization", "x-api-key", "x-goog-api-key")),
    "gemini": Provider(
        "gemini.yaml", "generativelanguage.googleapis.com", "x-goog-api-key",
        {"GEMINI_API_KEY": PROVIDER_KEY["gemini"]}, {"x-goog-api-key": PROVIDER_KEY["gemini"]},
        "/v1beta/models/gemini-2.5-flash:generateContent", removed=("authorization", "x-api-key", "api-key")),
    "bedrock": Provider(
        "bedrock.yaml", BEDROCK_HOST, "authorization",
        {"AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": AWS_SECRET_KEY,
         # the environment's credentials only: no metadata service, no profile
         "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
         "AWS_CONFIG_FILE": "/nonexistent"},
        {}, BEDROCK_ARN_PATH, removed=("x-api-key", "api-key", "x-goog-api-key", "x-amz-security-token")),
}

def body_for(name, text="hello"):
    """A request body in the provider's format, as raw bytes with odd spacing."""
    if name in ("openai", "azure"):
        return chat_body(text)
    if name == "anthropic":
        return ('{"model": "claude-sonnet-4-5", "max_tokens": 64,  "messages": [{"role": "user", '
                f'"content": "{text}"}}]}}').encode()
    if name == "gemini":
        return ('{"contents": [ {"role": "user", "parts": [{"text": "' + text + '"}]} ],'
                ' "generationConfig": {"temperature": 0.5}}').encode()
    return ('{"messages": [ {"role": "user", "content": [{"text": "' + text + '"}]} ],'
            ' "inferenceConfig": {"maxTokens": 64}}').encode()


def assert_injected(name, original, received, directive):
    """The upstream got the original bytes plus the directive, where the format puts it."""
    if name in ("openai", "azure"):
        return assert_chat_injected(original, received, directive)
    assert_single_insertion(original, received)
    got = strict_json(received)
    if name == "anthropic":
        assert got["system"] == directive
    elif name == "gemini":
        assert got["systemInstruction"] == {"parts": [{"text": directive}]}
    else:
        assert got["system"] == [{"text": directive}]


# -- certificates and the TLS upstream ---------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A trusted test CA (its PEM is what Envoy trusts), a foreign CA, and server
    certificates: the providers' names from each, and another name from the trusted one."""
    directory = tmp_path_factory.mktemp("pki")
    trusted, foreign = make_ca("ibex test CA"), make_ca("some other CA")
    return {
        "ca": trusted.write(directory / "ca.pem"),
        "good": issue(trusted, CERTIFICATE_NAMES, directory / "good.pem", directory / "good.key"),
        "foreign": issue(foreign, CERTIFICATE_NAMES, directory / "foreign.pem", directory / "foreign.key"),
        "misnamed": issue(trusted, ["api.example.com"], directory / "misnamed.pem", directory / "misnamed.key"),
    }


def tls_upstream_with(directory, certificate):
    cert, key = certificate
    return TlsEchoUpstream(directory, free_port(), tls_port=free_port(), cert=cert, key=key)


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    with tls_upstream_with(tmp_path_factory.mktemp("tls-upstream"), pki["good"]) as server:
        yield server


@pytest.fixture()
def tls(tls_server):
    """The TLS echo upstream with the trusted certificate, emptied (requests and handshakes)."""
    tls_server.clear()
    return tls_server


def upstream_tls_context(config):
    """The UpstreamTlsContext of the llm_upstream cluster."""
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "llm_upstream")
    assert cluster["transport_socket"]["name"] == TLS_SOCKET
    return cluster["transport_socket"]["typed_config"]


def run_example(stack, provider, ca_file, upstream, directory):
    """Envoy on the committed example, trusting `ca_file` instead of the system bundle,
    its upstream cluster pointed at `upstream`'s TLS port; nothing else changed."""
    config = load_template(EXAMPLES / provider.example)
    validation = upstream_tls_context(config)["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": SYSTEM_BUNDLE}
    validation["trusted_ca"] = {"filename": str(ca_file)}
    path = directory / provider.example
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return stack.restart_envoy(template=path, filter_config={}, env=provider.env,
                               cluster_ports={"llm_upstream": upstream.tls_port})


def assert_no_client_credential(received, key, sent):
    """Neither the gateway key nor any of the `sent` credential values reached the
    provider, in any header, nor an agent header."""
    for name, value in received.header_pairs:
        assert key not in value, f"the gateway key reached the upstream in {name}"
        for sent_name, sent_value in sent.items():
            assert sent_value not in value, f"the client's {sent_name} reached the upstream in {name}"
    assert key.encode() not in received.body
    assert key not in received.path
    assert received.header(AGENT_HEADER) is None, "the agent header reached the upstream"


def client_credentials(provider):
    """Values for the headers the example removes (credentials a client could send
    besides its gateway key): none may reach the provider."""
    return {name: f"client-{name}-{secrets.token_hex(4)}" for name in provider.removed}


# -- the end-to-end test: the OpenAI example through the OpenAI SDK ---------------------


def test_the_openai_example_reaches_a_tls_upstream_with_sni_the_directive_and_the_providers_key(
        stack, tls, pki, tmp_path):
    """openai.yaml, the OpenAI SDK with a gateway key: over TLS (SNI api.openai.com, a
    certificate Envoy verified), the upstream gets the directive, the operator's key
    and Host, and neither the gateway key, the client's other credentials nor x-agent-id."""
    provider = PROVIDERS["openai"]
    run_example(stack, provider, pki["ca"], tls, tmp_path)
    directive = "Answer over TLS."
    agent, key = agent_with_key(stack, directive)
    other_agent = agent_with(stack, "The directive of an agent the client names.")
    sent = []
    client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key=key, max_retries=0,
                           http_client=openai.DefaultHttpxClient(
                               trust_env=False, event_hooks={"request": [lambda r: sent.append(r.read())]}))
    credentials = client_credentials(provider)
    extras = {AGENT_HEADER: other_agent, **credentials}
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], extra_headers=extras)

    # The echo upstream answered over TLS, and the SDK read its answer.
    assert completion.choices[0].message.content.splitlines()[:2] == [
        "echo: received 2 message(s)", f"[1] system: {directive}"]
    [received] = tls.received()
    assert received.path == "/v1/chat/completions"
    assert_chat_injected(sent[-1], received.body, directive)
    # Envoy put the operator's key in and the provider's name in Host.
    assert received.header("authorization") == f"Bearer {PROVIDER_KEY['openai']}"
    assert received.header("host") == "api.openai.com"
    for name in (*provider.removed, AGENT_HEADER):
        assert received.header(name) is None, f"{name} reached the upstream"
    assert_no_client_credential(received, key, credentials)
    # Every handshake asked for the provider's name and completed: Envoy verified a
    # certificate of the test CA for that name (the refusals below show it checks).
    handshakes = tls.handshakes()
    assert handshakes, "no TLS handshake was recorded"
    assert {h["sni"] for h in handshakes} == {"api.openai.com"}
    assert all(h["ok"] and h["version"] in ("TLSv1.2", "TLSv1.3") for h in handshakes), handshakes


# -- every provider example -------------------------------------------------------


@pytest.mark.parametrize("name", PROVIDERS)
def test_each_provider_example_injects_and_swaps_the_key_over_tls(stack, tls, pki, tmp_path, name):
    provider = PROVIDERS[name]
    run_example(stack, provider, pki["ca"], tls, tmp_path)
    directive = f"Directive for {name} over TLS."
    agent, key = agent_with_key(stack, directive)
    body = body_for(name)
    credentials = client_credentials(provider)
    headers = {**credentials, AGENT_HEADER: agent_with(stack, "Not this one."),
               "content-type": "application/json", **provider.gateway_headers(key)}
    path = provider.path
    if name == "gemini":
        path += f"?alt=json&key={key}"  # a key in the query too: Google would read it
    response = requests.post(stack.gateway_url + path, data=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text

    [received] = tls.received()
    assert_injected(name, body, received.body, directive)
    assert received.header("host") == provider.host
    for header, value in provider.provider_headers.items():
        assert received.header(header) == value, header
    for header in provider.removed:
        assert received.header(header) is None, f"{header} reached the upstream"
    assert_no_client_credential(received, key, credentials)
    if name == "gemini":
        assert received.path == provider.path + "?alt=json", "the key query parameter reached the upstream"
    elif name == "bedrock":
        assert received.path == BEDROCK_ARN_PATH, "the escaped ARN did not reach Bedrock as it was sent"
        assert_sigv4_valid(received)
    else:
        assert received.path == provider.path
    assert {h["sni"] for h in tls.handshakes()} == {provider.host}


def test_anthropic_version_of_the_client_is_kept(stack, tls, pki, tmp_path):
    """anthropic-version is added only when the client sent none (the SDKs send theirs)."""
    provider = PROVIDERS["anthropic"]
    run_example(stack, provider, pki["ca"], tls, tmp_path)
    agent, key = agent_with_key(stack, "Versions.")
    response = requests.post(stack.gateway_url + provider.path, data=body_for("anthropic"), timeout=30,
                             headers={"x-api-key": key, "anthropic-version": "2099-01-01"})
    assert response.status_code == 200, response.text
    [received] = tls.received()
    assert received.header("anthropic-version") == "2099-01-01"
    assert received.header("x-api-key") == PROVIDER_KEY["anthropic"]


def test_gemini_embeddings_pass_untouched_and_unknown_endpoints_are_refused(stack, tls, pki, tmp_path):
    """gemini.yaml's inject.pass_paths: embedContent and batchEmbedContents carry no
    prompt and pass byte for byte; a body on an endpoint no pattern knows is refused."""
    provider = PROVIDERS["gemini"]
    run_example(stack, provider, pki["ca"], tls, tmp_path)
    agent, key = agent_with_key(stack, "Not in embeddings.")
    body = b'{"content": {"parts": [{"text": "embed me"}]}}'
    for verb in ("embedContent", "batchEmbedContents"):
        tls.clear()
        response = requests.post(f"{stack.gateway_url}/v1beta/models/gemini-embedding-001:{verb}", data=body,
                                 headers={"x-goog-api-key": key}, timeout=30)
        assert response.status_code == 200, response.text
        [received] = tls.received()
        assert received.body == body
        assert received.header("x-goog-api-key") == PROVIDER_KEY["gemini"]
    tls.clear()
    response = requests.post(f"{stack.gateway_url}/v1beta/models/imagen-4.0-generate-001:predict", data=body,
                             headers={"x-goog-api-key": key}, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "unsupported_path"
    assert tls.received() == []


# -- Bedrock: SigV4 after the filter ------------------------------------------------


def sigv4_signature(method, raw_path, headers, signed_headers, payload_hash, amz_date, scope, secret):
    """AWS SigV4 (AWS4-HMAC-SHA256) for a non-S3 service, from AWS's documented
    canonical request: each path segment URI-encoded once more (the path on the wire
    is encoded once), no query, the signed headers trimmed, the payload hash."""
    canonical_uri = "/".join(quote(segment, safe="-_.~") for segment in raw_path.split("/"))
    canonical_headers = "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in signed_headers)
    canonical_request = "\n".join([method, canonical_uri, "", canonical_headers, ";".join(signed_headers),
                                   payload_hash])
    string_to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                                hashlib.sha256(canonical_request.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def assert_sigv4_valid(received):
    """The request Bedrock got carries a SigV4 signature, by the gateway's credentials,
    of exactly what arrived: the body with the directive in it, the Host it got, the
    path as it got it."""
    authorization = received.header("authorization")
    assert authorization and authorization.startswith("AWS4-HMAC-SHA256 "), authorization
    fields = dict(part.strip().split("=", 1) for part in authorization[len("AWS4-HMAC-SHA256 "):].split(","))
    access_key, scope = fields["Credential"].split("/", 1)
    assert access_key == AWS_ACCESS_KEY
    amz_date = received.header("x-amz-date")
    assert scope == f"{amz_date[:8]}/{AWS_REGION}/bedrock/aws4_request"
    payload_hash = received.header("x-amz-content-sha256")
    assert payload_hash == hashlib.sha256(received.body).hexdigest(), "the signature covers another body"
    signed = fields["SignedHeaders"].split(";")
    assert {"host", "x-amz-date", "x-amz-content-sha256"} <= set(signed)
    headers = {name.lower(): value for name, value in received.header_pairs}
    assert all(name in headers for name in signed), (signed, list(headers))
    raw_path, _, query = received.path.partition("?")
    assert query == ""
    expected = sigv4_signature(received.method, raw_path, headers, signed, payload_hash, amz_date, scope,
                               AWS_SECRET_KEY)
    assert hmac.compare_digest(fields["Signature"], expected), "the SigV4 signature does not verify"


def test_bedrock_plain_model_ids_are_signed_too(stack, tls, pki, tmp_path):
    """A foundation model id (its `:` escaped, no `/`) and ConverseStream."""
    provider = PROVIDERS["bedrock"]
    run_example(stack, provider, pki["ca"], tls, tmp_path)
    directive = "Signed after the splice."
    agent, key = agent_with_key(stack, directive)
    for path in ("/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse",
                 "/model/us.anthropic.claude-sonnet-4-20250514-v1%3A0/converse-stream"):
        tls.clear()
        body = body_for("bedrock")
        response = requests.post(stack.gateway_url + path, data=body, timeout=30,
                                 headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
        assert response.status_code == 200, response.text
        [received] = tls.received()
        assert received.path == path
        assert_injected("bedrock", body, received.body, directive)
        assert_sigv4_valid(received)


def test_bedrock_paths_the_filter_cannot_read_as_bedrock_does_are_refused(stack, tls, pki, tmp_path):
    """With escaped slashes kept (bedrock.yaml), a body on a path that is no Converse
    call the filter can read (two escaped slashes, an escaped dot segment, InvokeModel)
    never reaches Bedrock."""
    run_example(stack, PROVIDERS["bedrock"], pki["ca"], tls, tmp_path)
    agent, key = agent_with_key(stack, "Refusals.")
    for path in ("/model/a%2Fb%2Fc/converse", "/model/%2E%2E%2Fx/converse", "/model/x%2F..%2Fy/converse",
                 "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/invoke"):
        response = requests.post(stack.gateway_url + path, data=body_for("bedrock"), timeout=30,
                                 headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
        assert response.status_code == 404, (path, response.status_code, response.text)
        assert response.json()["error"]["code"] == "unsupported_path", path
    assert tls.received() == []


# -- refusals: the certificate is checked ------------------------------------------


FAILED_CHECK = {"foreign": "fail_verify_error", "misnamed": "fail_verify_san"}


@pytest.mark.parametrize("certificate", FAILED_CHECK)
def test_a_certificate_the_example_does_not_trust_is_refused(stack, pki, tmp_path, certificate):
    """Another CA's certificate for the provider's name, or the trusted CA's for
    another name: Envoy ends the handshake, the client gets 503, the upstream no request."""
    provider = PROVIDERS["openai"]
    with tls_upstream_with(tmp_path / "upstream", pki[certificate]) as impostor:
        run_example(stack, provider, pki["ca"], impostor, tmp_path)
        agent, key = agent_with_key(stack, "Never sent to an impostor.")
        response = requests.post(stack.gateway_url + provider.path, data=chat_body(), timeout=30,
                                 headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
        assert response.status_code == 503, response.text
        assert impostor.received() == []
        # Envoy refused the certificate itself: its chain, or the name on it.
        failures = stack.envoy.stats(r"cluster\.llm_upstream\.ssl\.fail_verify")
        assert failures[f"cluster.llm_upstream.ssl.{FAILED_CHECK[certificate]}"] >= 1, failures
        handshakes = impostor.handshakes()
        assert handshakes, "Envoy never tried the impostor"
        assert all(h["sni"] == "api.openai.com" and not h["ok"] for h in handshakes), handshakes


# -- the committed provider configs ------------------------------------------------


def validate(config_path):
    return subprocess.run([str(paths.envoy_path()), "--mode", "validate", "-c", str(config_path), "-l", "warning"],
                          cwd=paths.REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", PROVIDERS)
def test_provider_example_validates(name):
    paths.require_file(paths.wasm_path(), "build the filter first (make build)")
    result = validate(EXAMPLES / PROVIDERS[name].example)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.parametrize("name", PROVIDERS)
def test_provider_example_keeps_the_safe_settings(name):
    """What every committed config keeps (test_envoy_configs.py), and what a TLS
    upstream needs: SNI, the CA bundle, the provider's name on its certificate and in Host."""
    provider = PROVIDERS[name]
    config = load_template(EXAMPLES / provider.example)
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    data, control = listener(config, DATA_LISTENER), listener(config, CONTROL_LISTENER)
    assert control["address"]["socket_address"]["address"] == "127.0.0.1"
    assert data["per_connection_buffer_limit_bytes"] >= 2 * 1024 * 1024
    for item in (data, control):
        hcm = http_connection_manager(item)
        assert hcm["normalize_path"] is True and hcm["merge_slashes"] is True
        plugin = wasm_plugin(item)
        assert plugin["failure_policy"] == "FAIL_RELOAD"
        assert plugin["vm_config"]["vm_id"] == "ibex_directive"
    escaped = http_connection_manager(data)["path_with_escaped_slashes_action"]
    # Bedrock's ARN model ids arrive with `/` escaped (bedrock.yaml says why it keeps them)
    assert escaped == ("KEEP_UNCHANGED" if name == "bedrock" else "REJECT_REQUEST")
    assert http_connection_manager(control)["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    assert filter_json(control)["control"]["token"] == "${IBEX_CONTROL_TOKEN}"
    settings = filter_json(data)
    assert settings["agent"]["source"] == "api_key"
    assert settings["agent"]["api_key"]["header"] == provider.key_header
    assert settings["failure_mode"] == "closed" and settings["debug_headers"] is False
    assert settings["inject"].get("other_paths", "refuse") == "refuse"
    route_config = http_connection_manager(data)["route_config"]
    assert AGENT_HEADER in route_config["request_headers_to_remove"]
    [route] = route_config["virtual_hosts"][0]["routes"]
    assert route["route"]["cluster"] == "llm_upstream" and route["route"]["auto_host_rewrite"] is True
    added = {item["header"]["key"]: item for item in route.get("request_headers_to_add", [])}
    for header in provider.provider_headers:
        if header == "anthropic-version":
            assert added[header]["append_action"] == "ADD_IF_ABSENT"
            continue
        assert added[header]["append_action"] == "OVERWRITE_IF_EXISTS_OR_ADD"
        assert "%ENVIRONMENT(" in added[header]["header"]["value"]
    assert not set(route.get("request_headers_to_remove", [])) & set(added)

    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "llm_upstream")
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["hostname"] == provider.host
    assert endpoint["endpoint"]["address"]["socket_address"] == {"address": provider.host, "port_value": 443}
    tls_context = upstream_tls_context(config)
    assert tls_context["sni"] == provider.host
    validation = tls_context["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": SYSTEM_BUNDLE}
    assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": provider.host}}]

    names = [f["name"] for f in http_filters(data)]
    if name == "bedrock":
        # SigV4 signs the body: after this filter changed it, just before the router.
        assert names == [WASM_FILTER, HEADER_MUTATION, SIGNING_FILTER, ROUTER]
        signing = http_filters(data)[2]["typed_config"]
        assert signing["service_name"] == "bedrock" and signing["region"] == AWS_REGION
        assert signing["host_rewrite"] == provider.host and signing.get("use_unsigned_payload", False) is False
        assert "request_headers_to_add" not in route and "request_headers_to_remove" not in route
    elif name == "gemini":
        assert names == [WASM_FILTER, HEADER_MUTATION, ROUTER]
    else:
        assert names == [WASM_FILTER, ROUTER]

