"""The REST front of Redis (`ibex-companion rest`, the Upstash REST API) as the L2
front of a running stack (SPEC §4, issue 13).

- A directive that JSON and HTTP framing could get wrong (U+FFFD, a lone CR,
  emoji, 64 KB) goes Postgres → store → filter → Redis (the filter's write-back
  through the front) → filter again (an L2 read through the front), byte for byte,
  through each front: the REST front (dialect "upstash") and Webdis ("webdis").
- The front refuses a missing or wrong token (401), a command outside its list
  (403, whichever token), a malformed body (400) and HEAD (405), each without
  Redis running a command.
- Two tokens: the filter's (`stack.rest_token`, Envoy's `redis.token`) runs only
  PING, GET and the filter's EVAL scripts on `directive:`/`agent_key:` keys; the
  operators' (`stack.rest_admin_token`) runs SET (with EX), DEL and any key too.
- The official Upstash SDK (upstash-redis) is a client of the front like of
  Upstash itself: with the admin token SET/GET/DEL and the filter's EVAL scripts
  round-trip; with the filter token what the filter sends works and a SET, a DEL
  or another key fail; a wrong token fails.
- Envoy's callouts to the front reuse their connections (keep-alive); Webdis
  shows the opposite in test_webdis.py.
"""

import base64
import json
import re
import secrets

import pytest
import requests
from upstash_redis import Redis as UpstashRedis
from upstash_redis.errors import UpstashError

from helpers import CHAT, assert_injected, chat_body, json_headers, new_agent, send, tier
from stack import paths, wait_until
from stack.contract import (FILTER_SCRIPTS, FLUSH_MARKER_PATTERN, GET_SCRIPT, GET_WITH_PTTL_SCRIPT, INVALIDATE_PATH,
                            SET_IF_ABSENT_SCRIPT, agent_key_redis_key, flush_marker_for, redis_key,
                            stored_text)

L2 = "rest"  # also under IBEX_TEST_L2=webdis: this module is about the REST front

# A directive with what a byte-exact path must keep: U+FFFD (what a lossy decoder
# leaves), a lone CR (what line-ending conversions eat), emoji (4-byte UTF-8, a
# surrogate pair in JSON \u escapes), and 64 KB of text (several reads of a socket).
PIECES = "replacement \ufffd here; lone CR\rthere; emoji 🦌🏔️👩‍💻; tab\t, quote \", backslash \\, \u2028. "
BINARYISH = PIECES * (64 * 1024 // len(PIECES.encode()) + 1)
assert "\x00" not in BINARYISH and len(BINARYISH.encode()) >= 64 * 1024


@pytest.fixture(params=["rest", "webdis"])
def front(request, stack):
    """The stack's Envoy on the L2 front of the parameter (Webdis started for it, on
    the stack's Redis); back on the REST front afterwards."""
    name = request.param
    if name != stack.l2_part:
        stack.start(name)
        stack.restart_envoy(l2=name)
    try:
        yield name
    finally:
        if stack.l2_part != "rest":
            stack.restart_envoy(l2="rest")
        stack.stop("webdis")


def invalidate_l1(stack, agent):
    """Drop the agent's L1 entry through the control endpoint, as the subscriber would,
    but without its Redis tombstone: the next request reads L2."""
    answer = requests.post(f"{stack.envoy.control_url}{INVALIDATE_PATH}/{agent}", headers=stack.control_headers(),
                           timeout=10)
    assert answer.status_code == 204, answer.text


def test_an_awkward_64_kb_directive_survives_l2_byte_for_byte(stack, upstream, front):
    agent = new_agent()
    stack.set_directive(agent, BINARYISH, publish=False)
    assert json.loads(stack.store.directive(agent)[1])["content"] == BINARYISH, "the store already changed it"

    body = chat_body()
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    received = upstream.last()
    assert tier(received) == "store"
    assert_injected("openai_chat", body, received.body, BINARYISH)

    # the filter's write-back went through the front: Redis holds the exact bytes
    wait_until(lambda: stack.redis.get(redis_key(agent)) is not None, what=f"the write-back through {front}")
    assert stored_text(stack.redis.get(redis_key(agent))) == BINARYISH
    if front == "rest":  # and the front hands them to any client, base64 or not
        status, answer = stack.rest.call("GET", redis_key(agent), base64=True)
        assert status == 200 and stored_text(base64.b64decode(answer["result"]).decode()) == BINARYISH
        status, answer = stack.rest.call("GET", redis_key(agent))
        assert status == 200 and stored_text(answer["result"]) == BINARYISH

    # an L2 read through the front: L1 dropped, Redis answers
    invalidate_l1(stack, agent)
    upstream.clear()
    body = chat_body("second")
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    received = upstream.last()
    assert tier(received) == "redis"
    assert_injected("openai_chat", body, received.body, BINARYISH)
    # and L1 holds what L2 gave
    upstream.clear()
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    assert tier(upstream.last()) == "local"
    assert_injected("openai_chat", body, upstream.last().body, BINARYISH)


def test_a_value_only_redis_holds_is_read_byte_for_byte(stack, upstream, front):
    """Text the filter did not write (an operator's SET, raw bytes on RESP) reads the same."""
    agent = new_agent()
    stack.redis.command_call("SET", redis_key(agent), BINARYISH.encode(), "EX", 60)
    body = chat_body()
    assert send(stack, CHAT, body, agent=agent).status_code == 200
    assert tier(upstream.last()) == "redis"
    assert_injected("openai_chat", body, upstream.last().body, BINARYISH)


# -- refusals, without touching Redis ---------------------------------------------


def redis_commands(stack):
    """Commands Redis ran so far, by name (INFO commandstats), but for the INFO this
    asks and the subscriber's liveness PINGs."""
    info = stack.redis.command_call("INFO", "commandstats")
    counts = {}
    for line in info.splitlines():
        if line.startswith("cmdstat_"):
            name, fields = line[len("cmdstat_"):].split(":", 1)
            calls = int(dict(item.split("=", 1) for item in fields.split(","))["calls"])
            if name not in ("info", "ping"):
                counts[name] = calls
    return counts


@pytest.fixture()
def canary(stack):
    """A key the refused commands would change, and the Redis command counts before."""
    key = "ibex-test:canary:" + new_agent()
    stack.redis.command_call("SET", key, "still here", "EX", 300)
    return key, redis_commands(stack)


def assert_untouched(stack, canary):
    key, before = canary
    assert redis_commands(stack) == before, "a refused request made Redis run a command"
    assert stack.redis.get(key) == "still here"


# case -> the authorization header made from the filter's and the admin token (None: no header)
WRONG_TOKENS = {
    "missing": lambda token, admin: None,
    "empty": lambda token, admin: "Bearer ",
    "wrong": lambda token, admin: "Bearer not-the-token-at-all-but-long-enough-000",
    "prefix": lambda token, admin: f"Bearer {token[:-1]}",
    "longer": lambda token, admin: f"Bearer {token}x",
    "other_case": lambda token, admin: f"Bearer {token.swapcase()}",
    "no_scheme": lambda token, admin: token,
    "basic_scheme": lambda token, admin: f"Basic {token}",
    "admin_prefix": lambda token, admin: f"Bearer {admin[:-1]}",
    "admin_longer": lambda token, admin: f"Bearer {admin}x",
    "admin_other_case": lambda token, admin: f"Bearer {admin.swapcase()}",
    "admin_no_scheme": lambda token, admin: admin,
    "both_joined": lambda token, admin: f"Bearer {token}{admin}",
    "control_token": None,  # the control listener's token is not the front's
}


@pytest.mark.parametrize("path", ["/", "/pipeline"])
@pytest.mark.parametrize("case", WRONG_TOKENS)
def test_a_missing_or_wrong_token_is_refused_401_without_touching_redis(stack, canary, case, path):
    key, _ = canary
    body = [["GET", key], ["DEL", key]] if path == "/pipeline" else ["DEL", key]
    headers = {"content-type": "application/json"}
    value = (f"Bearer {stack.control_token}" if case == "control_token"
             else WRONG_TOKENS[case](stack.rest_token, stack.rest_admin_token))
    if value is not None:
        headers["authorization"] = value
    answer = requests.post(stack.rest.url + path, data=json.dumps(body), headers=headers, timeout=10)
    assert answer.status_code == 401, answer.text
    assert "error" in answer.json()
    assert stack.rest_token not in answer.text and stack.rest_admin_token not in answer.text
    assert_untouched(stack, canary)


FORBIDDEN = {
    "flushall": ["FLUSHALL"],
    "flushall_lower": ["flushall"],
    "flushdb": ["FLUSHDB"],
    "config_get": ["CONFIG", "GET", "*"],
    "config_set": ["CONFIG", "SET", "maxmemory", "1"],
    "keys": ["KEYS", "*"],
    "debug": ["DEBUG", "SLEEP", "1"],
    "script_flush": ["SCRIPT", "FLUSH"],
    "foreign_script": ["EVAL", "return redis.call('FLUSHALL')", "0"],
    "script_with_a_space_more": ["EVAL", SET_IF_ABSENT_SCRIPT + " ", "2", "k", "m", "60", "v"],
    "evalsha": ["EVALSHA", "0" * 40, "0"],
    "unknown": ["NOSUCHCOMMAND"],
}


def test_a_wrong_token_in_the_query_is_refused_too(stack, canary):
    """Upstash also takes the token as `?_token=…`: a wrong one there is refused like in
    the header, and a right one in the query does not rescue a wrong header."""
    key, _ = canary
    admin = stack.rest_admin_token
    for query, header in (("wrong-" + stack.rest_token, None), (stack.rest_token + "x", None),
                          (stack.rest_token, "Bearer wrong-" + stack.rest_token),
                          (admin + "x", None), (admin, "Bearer wrong-" + admin)):
        headers = {"content-type": "application/json", **({"authorization": header} if header else {})}
        answer = requests.post(stack.rest.url + "/", params={"_token": query}, data=json.dumps(["DEL", key]),
                               headers=headers, timeout=10)
        assert answer.status_code == 401, (answer.status_code, answer.text)
    assert_untouched(stack, canary)


def token_of(stack, role):
    """The stack's REST front token of `role`: "filter" (Envoy's) or "admin" (the operators')."""
    return {"filter": stack.rest_token, "admin": stack.rest_admin_token}[role]


@pytest.mark.parametrize("role", ["filter", "admin"])
@pytest.mark.parametrize("case", FORBIDDEN)
def test_a_command_outside_the_list_is_refused_403_without_touching_redis(stack, canary, case, role):
    status, answer = stack.rest.call(*FORBIDDEN[case], token=token_of(stack, role))
    assert status == 403, answer
    assert "error" in answer
    assert_untouched(stack, canary)


def test_a_pipeline_with_one_forbidden_command_runs_none_of_them(stack, canary):
    """With the admin token, which may run the SET and the DEL: the FLUSHALL alone
    stops the whole pipeline."""
    key, _ = canary
    status, answer = stack.rest.pipeline(["SET", key, "overwritten", "EX", 60], ["DEL", key], ["FLUSHALL"],
                                         token=stack.rest_admin_token)
    assert status == 403, answer
    assert_untouched(stack, canary)


def test_a_filter_token_pipeline_with_one_write_runs_none_of_it(stack, canary):
    """The filter's token: a GET it may run and a DEL it may not, in one pipeline: refused whole."""
    agent = new_agent()
    stack.redis.command_call("SET", redis_key(agent), "kept", "EX", 60)
    before = redis_commands(stack)
    status, answer = stack.rest.pipeline(["GET", redis_key(agent)], ["DEL", redis_key(agent)])
    assert status == 403, answer
    assert_untouched(stack, (canary[0], before))
    assert stack.redis.get(redis_key(agent)) == "kept"


HEAD_PATHS = {
    "set": "/set/{key}/overwritten/EX/60",
    "del": "/del/{key}",
    "get": "/get/{key}",
    "ping": "/ping",
}


@pytest.mark.parametrize("role", ["filter", "admin"])
@pytest.mark.parametrize("path", HEAD_PATHS)
def test_head_is_405_and_runs_nothing(stack, canary, path, role):
    """Upstash would run `HEAD /set/k/v`; the front refuses HEAD whatever the path or token
    (a crawler's or prefetcher's "harmless" request), before Redis sees anything."""
    key, _ = canary
    answer = requests.head(stack.rest.url + HEAD_PATHS[path].format(key=key), timeout=10,
                           headers=stack.rest.auth_headers(token_of(stack, role)))
    assert answer.status_code == 405, (answer.status_code, answer.headers)
    assert "HEAD" not in answer.headers.get("allow", "").upper()
    assert_untouched(stack, canary)


MALFORMED = {
    "not_json": ("/", b"GET directive:x"),
    "truncated": ("/", b'["GET", "directive:x"'),
    "object": ("/", b'{"command": ["GET", "directive:x"]}'),
    "empty_array": ("/", b"[]"),
    "string": ("/", b'"GET"'),
    "nested": ("/", b'[["GET", "directive:x"]]'),
    "invalid_utf8": ("/", b'["GET", "directive:\xff"]'),
    "trailing_garbage": ("/", b'["PING"] ["FLUSHALL"]'),
    "pipeline_not_nested": ("/pipeline", b'["GET", "directive:x"]'),
    "pipeline_empty_command": ("/pipeline", b'[["PING"], []]'),
    "pipeline_truncated": ("/pipeline", b'[["PING"], ["GET"'),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_body_is_refused_400_without_touching_redis(stack, canary, case):
    path, body = MALFORMED[case]
    status, answer = stack.rest.post(path, body)
    assert status == 400, answer
    assert "error" in answer
    assert_untouched(stack, canary)


def test_what_is_allowed_runs(stack):
    """The refusals above refuse because of what they are: the same front runs the
    listed commands (with the admin token, on any key) and its answers are Upstash's shapes."""
    key = "ibex-test:allowed:" + new_agent()
    admin = stack.rest_admin_token
    assert stack.rest.call("PING", token=admin) == (200, {"result": "PONG"})
    assert stack.rest.call("SET", key, "v", "EX", 60, "NX", token=admin) == (200, {"result": "OK"})
    assert stack.rest.call("SET", key, "w", "EX", 60, "NX", token=admin) == (200, {"result": None})
    assert stack.rest.call("GET", key, token=admin) == (200, {"result": "v"})
    assert stack.rest.call("GET", key, base64=True, token=admin) == (200, {"result": base64.b64encode(b"v").decode()})
    status, answer = stack.rest.pipeline(["GET", key], ["DEL", key], ["GET", key], token=admin)
    assert (status, answer) == (200, [{"result": "v"}, {"result": 1}, {"result": None}])
    # SET needs EX whatever the token (every key is written with a TTL)
    status, answer = stack.rest.call("SET", key, "v", token=admin)
    assert status == 400 and "error" in answer
    assert stack.redis.get(key) is None


# what the filter's token may not do (403 each, Redis untouched), besides FORBIDDEN
FILTER_TOKEN_REFUSED = {
    "set": lambda d, other: ["SET", d, "overwritten", "EX", 60],
    "del": lambda d, other: ["DEL", d],
    "get_other_key": lambda d, other: ["GET", other],
    "read_script_on_other_key": lambda d, other: ["EVAL", GET_SCRIPT, 1, other],
    "write_script_on_other_key": lambda d, other: ["EVAL", SET_IF_ABSENT_SCRIPT, 2, other, flush_marker_for(other), 60,
                                                   "x"],
    "write_script_on_the_flush_marker": lambda d, other: ["EVAL", SET_IF_ABSENT_SCRIPT, 2, flush_marker_for(d), d, 60,
                                                          "x"],
    "write_script_past_another_marker": lambda d, other: ["EVAL", SET_IF_ABSENT_SCRIPT, 2, d, "directive:__flush__",
                                                          60, "x"],
}


@pytest.mark.parametrize("case", FILTER_TOKEN_REFUSED)
def test_the_filter_token_runs_only_what_the_filter_sends(stack, canary, case):
    """Envoy's token (the one in its config, so the likelier to leak) cannot SET, DEL,
    reach a key outside `directive:`/`agent_key:` or aim the write script at a flush
    marker: 403, and Redis runs nothing (test_what_is_allowed_runs: the admin token may)."""
    key, _ = canary
    directive_key = redis_key(new_agent())
    stack.redis.command_call("SET", directive_key, "kept", "EX", 60)
    before = redis_commands(stack)
    status, answer = stack.rest.call(*FILTER_TOKEN_REFUSED[case](directive_key, key))
    assert status == 403, answer
    assert "error" in answer and key not in json.dumps(answer) and directive_key not in json.dumps(answer)
    assert redis_commands(stack) == before, "a refused request made Redis run a command"
    assert stack.redis.get(directive_key) == "kept" and stack.redis.get(key) == "still here"


# -- the official Upstash SDK as a client ----------------------------------------------


def sdk(stack, token):
    return UpstashRedis(url=stack.rest.url, token=token)


def test_the_upstash_sdk_round_trips_through_the_front(stack):
    """With the admin token, the operators' and SDKs' (README, make run's banner)."""
    redis = sdk(stack, stack.rest_admin_token)
    key = redis_key(new_agent())
    marker = "ibex-test:marker:" + new_agent()
    value = "Upstash SDK: \ufffd, CR\r, 🦌, \"quoted\"."
    assert redis.ping() == "PONG"
    assert redis.set(key, value, ex=60) is True
    assert redis.get(key) == value
    assert stack.redis.get(key) == value  # what Redis itself holds
    assert redis.set(key, "other", ex=60, nx=True) is False
    assert redis.get(key) == value
    # the filter's read scripts: the value (a directive read), the value and its
    # remaining life in ms (a gateway key's read)
    assert redis.eval(GET_SCRIPT, keys=[key]) == value
    got, pttl = redis.eval(GET_WITH_PTTL_SCRIPT, keys=[key])
    assert got == value and 0 < pttl <= 60_000
    assert redis.delete(key) == 1
    assert redis.get(key) is None
    assert redis.eval(GET_WITH_PTTL_SCRIPT, keys=[key]) is None
    assert redis.eval(GET_SCRIPT, keys=[key]) is None
    # the filter's conditional write-back: once, then never over an existing key
    assert redis.eval(SET_IF_ABSENT_SCRIPT, keys=[key, marker], args=["60", value]) == 1
    assert redis.eval(SET_IF_ABSENT_SCRIPT, keys=[key, marker], args=["60", "second"]) == 0
    assert stack.redis.get(key) == value and 0 < stack.redis.ttl(key) <= 60
    assert redis.delete(key) == 1
    # a pipeline, as the SDK sends it
    pipeline = redis.pipeline()
    pipeline.set(key, value, ex=60)
    pipeline.get(key)
    pipeline.delete(key)
    assert pipeline.exec() == [True, value, 1]


def test_the_upstash_sdk_with_the_filter_token_reads_and_fills_but_never_writes(stack, canary):
    """The SDK given Envoy's token does what the filter does (PING, GET of a `directive:`
    key, the three scripts on the filter's keys) and nothing more: a SET, a DEL and a
    GET of another key raise, and Redis runs none of them."""
    key, _ = canary
    redis = sdk(stack, stack.rest_token)
    agent = new_agent()
    directive_key = redis_key(agent)
    gateway_key = agent_key_redis_key(secrets.token_hex(32))
    stack.redis.delete_matching(FLUSH_MARKER_PATTERN)  # a flush marker would make the write script write nothing
    stack.redis.command_call("SET", directive_key, "Read with the filter's token.", "EX", 60)
    stack.redis.command_call("SET", gateway_key, agent, "EX", 60)

    assert redis.ping() == "PONG"
    assert redis.get(directive_key) == "Read with the filter's token."
    assert redis.eval(GET_SCRIPT, keys=[directive_key]) == "Read with the filter's token."
    got, pttl = redis.eval(GET_WITH_PTTL_SCRIPT, keys=[gateway_key])
    assert got == agent and 0 < pttl <= 60_000
    filled = redis_key(new_agent())
    marker = flush_marker_for(filled)  # the one the filter sends: its slot's
    assert redis.eval(SET_IF_ABSENT_SCRIPT, keys=[filled, marker], args=["60", "Filled."]) == 1
    assert redis.eval(SET_IF_ABSENT_SCRIPT, keys=[filled, marker], args=["60", "Again."]) == 0
    assert stack.redis.get(filled) == "Filled." and 0 < stack.redis.ttl(filled) <= 60

    before = redis_commands(stack)
    with pytest.raises(UpstashError):
        redis.set(directive_key, "overwritten", ex=60)
    with pytest.raises(UpstashError):
        redis.set(key, "overwritten", ex=60)
    with pytest.raises(UpstashError):
        redis.delete(directive_key)
    with pytest.raises(UpstashError):
        redis.delete(key)
    with pytest.raises(UpstashError):
        redis.get(key)
    with pytest.raises(UpstashError):
        redis.eval(GET_SCRIPT, keys=[key])
    assert redis_commands(stack) == before, "a refused request made Redis run a command"
    assert stack.redis.get(directive_key) == "Read with the filter's token."
    assert stack.redis.get(filled) == "Filled."
    assert stack.redis.get(key) == "still here"


def test_the_upstash_sdk_fails_with_a_wrong_token_and_on_a_forbidden_command(stack, canary):
    key, _ = canary
    for wrong in ("wrong-" + stack.rest_token, "wrong-" + stack.rest_admin_token):
        with pytest.raises(UpstashError):
            sdk(stack, wrong).get(key)
        with pytest.raises(UpstashError):
            sdk(stack, wrong).delete(key)
    for token in (stack.rest_admin_token, stack.rest_token):
        with pytest.raises(UpstashError):
            sdk(stack, token).flushall()
        with pytest.raises(UpstashError):
            sdk(stack, token).eval("return redis.call('DEL', KEYS[1])", keys=[key])
    assert_untouched(stack, canary)


def test_the_scripts_are_the_filters():
    """stack/contract.py spells the filter's scripts as wire/src/lib.rs does (the
    front allows exactly those): a drift would make the SDK test above prove nothing."""
    wire = (paths.REPO / "wire" / "src" / "lib.rs").read_text()
    consts = dict(re.findall(r'pub const (\w+): &str = "((?:[^"\\]|\\.)*)";', wire))
    [names] = re.findall(r"pub const FILTER_SCRIPTS: \[&str; \d+\] = \[([^\]]*)\];", wire)
    assert sorted(consts[name.strip()] for name in names.split(",") if name.strip()) == sorted(FILTER_SCRIPTS)


# -- keep-alive -----------------------------------------------------------------------

L2_READS = 50


def l2_reads(stack, upstream, count):
    """`count` L2 hits (agents only Redis holds, one request each, one after the other);
    returns the change of Envoy's ibex_redis connection and request totals."""
    agents = [new_agent() for _ in range(count)]
    for agent in agents:
        stack.redis.command_call("SET", redis_key(agent), f"Kept alive for {agent}.", "EX", 60)
    stats = r"^cluster\.ibex_redis\.upstream_(cx|rq)_total$"
    before = stack.envoy.stats(stats)
    with requests.Session() as session:
        for agent in agents:
            response = session.post(stack.gateway_url + CHAT, data=chat_body(), timeout=30,
                                    headers=json_headers(agent))
            assert response.status_code == 200, response.text
            assert tier(upstream.last()) == "redis"
    after = stack.envoy.stats(stats)
    return {name.split(".")[-1]: after.get(name, 0) - before.get(name, 0) for name in after}


def test_envoy_reuses_its_connections_to_the_rest_front(stack, upstream):
    stack.redis.delete_matching(FLUSH_MARKER_PATTERN)
    delta = l2_reads(stack, upstream, L2_READS)
    print(f"\n{L2_READS} L2 reads through the REST front: {delta}")
    assert delta["upstream_rq_total"] >= L2_READS
    # at most a connection or two per Envoy worker, however many requests
    assert delta["upstream_cx_total"] <= 2 * stack.envoy.concurrency, delta
