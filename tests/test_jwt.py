"""agent.source "jwt" over real Envoy with a real jwt_authn filter (SPEC §3.1).

jwt_authn sits before the wasm filter on the data listener, verifies RS256 tokens
against a local JWKS (issuer and audience checked) and writes the verified payload
into the dynamic metadata (`payload_in_metadata`); the filter reads the agent from a
claim of it. Tokens are minted here with PyJWT. The agent header is `x-caller-agent`,
which the route does not remove (local.yaml only removes x-agent-id): when it does
not reach the upstream, it is the filter that removed it.
"""

import json
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from helpers import CHAT, agent_with, assert_chat_injected, chat_body, error_code, send
from stack import Stack
from stack.stack import ORDER

ISSUER = "https://idp.ibex.test"
AUDIENCE = "ibex-gateway"
PROVIDER = "ibex_idp"
KID = "test-key-1"
CLIENT_HEADER = "x-caller-agent"

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks():
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key()))
    jwk.update(kid=KID, alg="RS256", use="sig")
    return json.dumps({"keys": [jwk]})


def jwt_authn(provider=PROVIDER):
    """The jwt_authn filter: every path requires a token of `provider`."""
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {
                provider: {
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "local_jwks": {"inline_string": jwks()},
                    "payload_in_metadata": provider,
                    "forward": False,
                }
            },
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": provider}}],
        },
    }


def filter_config(claim="agent_id"):
    return {"agent": {"source": "jwt", "header": CLIENT_HEADER, "jwt": {"provider": PROVIDER, "claim": claim}}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """This module's stack: jwt_authn before the filter, the filter on source jwt."""
    with Stack(tmp_path_factory.mktemp("test_jwt"), filter_config=filter_config(), parts=ORDER, patient=True,
               debug_headers=True, http_filters_before=[jwt_authn()]) as running:
        yield running


def token(claims=None, *, key=KEY, expires_in=300, **overrides):
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "caller-1", "iat": now, "exp": now + expires_in}
    payload.update(claims or {})
    payload.update(overrides)
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": KID})


def bearer(tok):
    return {"authorization": f"Bearer {tok}"}


def test_a_valid_tokens_agent_gets_its_directive(stack, upstream):
    agent = agent_with(stack, "Answer as agent A.")
    body = chat_body()
    response = send(stack, CHAT, body, headers=bearer(token({"agent_id": agent})))
    assert response.status_code == 200, response.text
    assert_chat_injected(body, upstream.last().body, "Answer as agent A.")


def test_a_client_agent_header_changes_nothing_and_never_reaches_the_upstream(stack, upstream):
    agent = agent_with(stack, "Directive of the token's agent.")
    other = agent_with(stack, "Directive of the agent the client names.")
    body = chat_body()
    headers = {**bearer(token({"agent_id": agent})), CLIENT_HEADER: other}
    response = send(stack, CHAT, body, headers=headers)
    assert response.status_code == 200, response.text
    received = upstream.last()
    assert_chat_injected(body, received.body, "Directive of the token's agent.")
    assert received.header(CLIENT_HEADER) is None
    assert received.header("authorization") is None, "forward: false keeps the token from the provider"
    # Nor on a request that is only forwarded (no body).
    response = send(stack, "/v1/models", None, headers=headers, method="GET")
    assert response.status_code == 200, response.text
    assert upstream.last().header(CLIENT_HEADER) is None
    # A header naming a garbage agent is not consulted either.
    response = send(stack, CHAT, body, headers={**headers, CLIENT_HEADER: "not-a-uuid"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("case", ["expired", "wrongly signed", "wrong issuer", "wrong audience", "none"])
def test_invalid_or_missing_tokens_are_refused_by_jwt_authn(stack, upstream, case):
    agent = agent_with(stack, "Never delivered.")
    tokens = {
        "expired": token({"agent_id": agent}, expires_in=-600),
        "wrongly signed": token({"agent_id": agent}, key=OTHER_KEY),
        "wrong issuer": token({"agent_id": agent}, iss="https://evil.test"),
        "wrong audience": token({"agent_id": agent}, aud="someone-else"),
        "none": None,
    }
    headers = {CLIENT_HEADER: agent}
    if tokens[case]:
        headers.update(bearer(tokens[case]))
    response = send(stack, CHAT, chat_body(), headers=headers)
    # jwt_authn answers 403 for a token of another audience, 401 for everything else.
    assert response.status_code == (403 if case == "wrong audience" else 401), response.text
    assert upstream.received() == []


def test_a_valid_token_without_the_claim_is_missing_agent_id(stack, upstream):
    agent = agent_with(stack, "Never delivered.")
    response = send(stack, CHAT, chat_body(), headers={**bearer(token()), CLIENT_HEADER: agent})
    assert response.status_code == 401, response.text
    assert error_code(response) == "missing_agent_id"
    # Bodiless too: a request we cannot attribute is refused whatever its path.
    response = send(stack, "/v1/models", None, headers=bearer(token()), method="GET")
    assert response.status_code == 401
    assert error_code(response) == "missing_agent_id"
    assert upstream.received() == []


@pytest.mark.parametrize("claim", ["agent-7", 42, {"id": "x"}, ["6f1c1a3e-5b7d-4c2a-9e0f-123456789abc"], True])
def test_a_claim_that_is_no_uuid_string_is_invalid_agent_id(stack, upstream, claim):
    response = send(stack, CHAT, chat_body(), headers=bearer(token({"agent_id": claim})))
    assert response.status_code == 400, response.text
    assert error_code(response) == "invalid_agent_id"
    assert upstream.received() == []


def test_a_dotted_claim_path(stack, upstream):
    stack.restart_envoy(filter_config=filter_config("ibex.agent"))
    try:
        agent = agent_with(stack, "Nested claim.")
        body = chat_body()
        response = send(stack, CHAT, body, headers=bearer(token({"ibex": {"agent": agent}, "agent_id": str(uuid.uuid4())})))
        assert response.status_code == 200, response.text
        assert_chat_injected(body, upstream.last().body, "Nested claim.")
        response = send(stack, CHAT, body, headers=bearer(token({"agent_id": agent})))
        assert response.status_code == 401
        assert error_code(response) == "missing_agent_id"
    finally:
        stack.restart_envoy(filter_config=filter_config())
