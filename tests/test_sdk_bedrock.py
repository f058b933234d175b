"""AWS's official SDK (`boto3`, `bedrock-runtime`) through the gateway: Converse
and ConverseStream, with `endpoint_url` = the gateway and dummy credentials.

botocore signs each request (SigV4) over the body it sent; the gateway then
changes the body, so a real Bedrock would refuse the signature: in production
Envoy's AWS request-signing filter goes after this filter and signs what is
forwarded (issue 12, envoy/examples). The echo upstream verifies nothing, so
here the client's own signature simply arrives with the directive-bearing body.

The agent header is added by a `before-sign` event handler (boto3 has no default
headers); the bytes botocore put on the wire are captured by a `before-send`
handler. Every test checks the upstream received those bytes plus the
`bedrock_converse` insertions only, and that botocore parsed the echo's answer:
Converse JSON, and for ConverseStream the AWS event-stream binary framing
(prelude, headers, payload, CRC32s), which the echo upstream writes and
botocore's event-stream parser reads, CRCs checked.
"""

import boto3
import pytest
from botocore.config import Config

from helpers import (
    CONVERSE,
    CONVERSE_STREAM,
    TRICKY_DIRECTIVE,
    agent_with,
    assert_injected,
    only_request,
    send,
)
from stack.contract import AGENT_HEADER

MODEL_ID = "anthropic.claude-3-5-sonnet-20240620-v1:0"


class BotoWire:
    """The requests botocore sent, as prepared for the wire (AWSPreparedRequest)."""

    def __init__(self):
        self.requests = []

    def capture(self, request, **_):
        self.requests.append(request)

    @property
    def body(self):
        assert self.requests, "botocore sent nothing"
        body = self.requests[-1].body
        return body if isinstance(body, bytes) else body.encode("utf-8")


def bedrock_client(stack, agent, wire):
    client = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url=stack.gateway_url,
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="bedrock-test-not-a-real-secret",
        config=Config(retries={"mode": "standard", "max_attempts": 1}, proxies={}),
    )

    def add_agent(request, **_):
        request.headers[AGENT_HEADER] = agent

    client.meta.events.register("before-sign.bedrock-runtime.*", add_agent)
    client.meta.events.register("before-send.bedrock-runtime.*", wire.capture)
    return client


@pytest.fixture()
def wire():
    return BotoWire()


def words(*texts):
    return sum(len(text.split()) for text in texts)


def assert_signed_by_the_client(wire, received):
    """The client's SigV4 headers reach the upstream as botocore wrote them."""
    signature = wire.requests[-1].headers["Authorization"]
    signature = signature.decode() if isinstance(signature, bytes) else signature
    assert received.header("authorization") == signature
    assert received.header("authorization").startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert received.header("x-amz-date")
    assert received.header(AGENT_HEADER) is None, "the agent header reached the provider"


def test_converse_gets_a_system_block(stack, upstream, wire):
    agent = agent_with(stack, TRICKY_DIRECTIVE)
    client = bedrock_client(stack, agent, wire)
    answer = client.converse(modelId=MODEL_ID, messages=[{"role": "user", "content": [{"text": "hello"}]}])

    received = only_request(upstream)
    # botocore escapes the model id's `:`; the filter matched the decoded path
    assert received.path == CONVERSE
    got = assert_injected("bedrock_converse", wire.body, received.body, TRICKY_DIRECTIVE)
    assert got["system"] == [{"text": TRICKY_DIRECTIVE}]
    assert_signed_by_the_client(wire, received)

    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert answer["stopReason"] == "end_turn"
    assert answer["output"]["message"]["role"] == "assistant"
    assert answer["output"]["message"]["content"] == [
        {"text": f"echo: bedrock converse request\nsystem: {TRICKY_DIRECTIVE}\n[1] user: hello"}]
    assert answer["usage"]["inputTokens"] == words(TRICKY_DIRECTIVE, "hello")


def test_converse_system_gets_a_first_block(stack, upstream, wire):
    directive = "Bedrock policy first."
    agent = agent_with(stack, directive)
    client = bedrock_client(stack, agent, wire)
    answer = client.converse(
        modelId="amazon.nova-pro-v1:0",
        system=[{"text": "Be kind."}, {"text": "Be brief."}],
        messages=[{"role": "user", "content": [{"text": "hi"}]},
                  {"role": "assistant", "content": [{"text": "hello"}]},
                  {"role": "user", "content": [{"text": "again"}]}],
        inferenceConfig={"maxTokens": 64, "temperature": 0.5},
    )

    received = only_request(upstream)
    assert received.path == "/model/amazon.nova-pro-v1%3A0/converse"
    got = assert_injected("bedrock_converse", wire.body, received.body, directive)
    assert got["system"] == [{"text": directive}, {"text": "Be kind."}, {"text": "Be brief."}]
    assert got["inferenceConfig"] == {"maxTokens": 64, "temperature": 0.5}
    assert answer["output"]["message"]["content"][0]["text"] == "\n".join([
        "echo: bedrock converse request", f"system: {directive}\nBe kind.\nBe brief.",
        "[1] user: hi", "[2] assistant: hello", "[3] user: again"])


def test_converse_stream_events_parse(stack, upstream, wire):
    directive = "Stream through the event stream."
    agent = agent_with(stack, directive)
    client = bedrock_client(stack, agent, wire)
    answer = client.converse_stream(modelId=MODEL_ID, system=[{"text": "S"}],
                                    messages=[{"role": "user", "content": [{"text": "hi"}]}])
    assert answer["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/vnd.amazon.eventstream"
    events = list(answer["stream"])

    received = only_request(upstream)
    assert received.path == CONVERSE_STREAM
    got = assert_injected("bedrock_converse", wire.body, received.body, directive)
    assert got["system"] == [{"text": directive}, {"text": "S"}]
    assert_signed_by_the_client(wire, received)

    names = [next(iter(event)) for event in events]
    assert names[0] == "messageStart" and names[-2:] == ["messageStop", "metadata"]
    assert events[0]["messageStart"] == {"role": "assistant"}
    deltas = [event["contentBlockDelta"] for event in events if "contentBlockDelta" in event]
    assert len(deltas) > 1
    assert "".join(delta["delta"]["text"] for delta in deltas) == \
        f"echo: bedrock converse request\nsystem: {directive}\nS\n[1] user: hi"
    assert events[-2]["messageStop"] == {"stopReason": "end_turn"}
    assert events[-1]["metadata"]["usage"]["inputTokens"] == words(directive, "S", "hi")


RAW = {
    "system_absent_odd_spacing": (CONVERSE, b'{ "messages" : [ {"role":"user","content":[{"text":"caf\\u00e9"}]} ] ,'
                                            b'"inferenceConfig":{"temperature":1.0E0}}'),
    "system_empty": (CONVERSE, b'{"system":[ ],"messages":[]}'),
    "system_null": (CONVERSE_STREAM, b'{"system":null,"messages":[]}'),
    "harmless_additional_fields": (CONVERSE, b'{"messages":[],"additionalModelRequestFields":{"top_k":200}}'),
    "plain_model_id": ("/model/meta.llama3-70b-instruct-v1/converse", b'{"messages":[]}'),
}


@pytest.mark.parametrize("path,body", RAW.values(), ids=RAW.keys())
def test_raw_converse_bodies_are_spliced(stack, upstream, path, body):
    directive = "Raw Bedrock."
    agent = agent_with(stack, directive)
    response = send(stack, path, body, agent=agent)
    assert response.status_code == 200, response.text
    received = only_request(upstream)
    assert received.path == path
    got = assert_injected("bedrock_converse", body, received.body, directive)
    assert got["system"][0] == {"text": directive}


def test_arn_model_id_is_refused_by_envoy_and_never_forwarded(stack, upstream, wire):
    """An inference-profile ARN as the model id: botocore escapes its `/` as `%2F`,
    and the committed Envoy config (`path_with_escaped_slashes_action:
    REJECT_REQUEST`, envoy/local.yaml) answers 400 before any filter runs. Refused,
    so never forwarded without the directive; but such a model id cannot be used
    through this config (the filter's ARN patterns, `/model/{arn}/{id}/converse`,
    are only reached by a config that keeps or unescapes `%2F`)."""
    agent = agent_with(stack, "ARN directive.")
    client = bedrock_client(stack, agent, wire)
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-sonnet-20240620-v1:0"
    requests_seen = stack.envoy.counter("requests")
    with pytest.raises(client.exceptions.ClientError) as raised:
        client.converse(modelId=arn, messages=[{"role": "user", "content": [{"text": "hello"}]}])
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "%2Fus.anthropic." in wire.requests[-1].url
    assert upstream.received() == []
    assert stack.envoy.counter("requests") == requests_seen, "Envoy refused it before the filter"
