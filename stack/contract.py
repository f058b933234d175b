"""Names the filter, the companion and their configs agree on, as the Python
side (harness, tests, benchmarks) uses them. Spelled once here.

The values are those of envoy/local.yaml and the companion's defaults: a
test that configures another header or prefix says so itself.
"""

import hashlib
import re

AGENT_HEADER = "x-agent-id"
"""Request header naming the agent (filter `agent.header`)."""

TIER_HEADER = "x-ibex-directive"
"""Debug header the filter adds upstream (`debug_headers`): local, redis, store, stale or none."""

KEY_PREFIX = "directive:"
"""Redis key prefix of directives (filter `redis.key_prefix`, companion `--key-prefix`)."""

SLOTS = 16384
"""Redis Cluster hash slots (wire/src/slot.rs SLOTS)."""

FLUSH_MARKER_SUFFIX = "__flush__"
"""After a prefix, the start of every flush marker (wire/src/slot.rs FLUSH_MARKER_SUFFIX)."""

FLUSH_MARKER_PATTERN = KEY_PREFIX + FLUSH_MARKER_SUFFIX + "*"
"""SCAN/KEYS pattern of every directive flush marker (one per slot)."""

AGENT_KEY_FLUSH_MARKER_PATTERN = "agent_key:" + FLUSH_MARKER_SUFFIX + "*"
"""SCAN/KEYS pattern of every gateway key entry's flush marker (one per slot)."""


def crc16(data):
    """CRC16-XMODEM, as Redis Cluster hashes keys (wire/src/slot.rs crc16)."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key):
    """The hash slot of `key` (str or bytes), hash tags included, as CLUSTER KEYSLOT answers."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    return crc16(data) % SLOTS


def _tag_inverse():
    """wire/src/slot.rs INVERSE: per slot bit, the tag bits (4 per character of `@A-O`,
    over the base `@@@@`) whose CRC columns XOR to exactly that bit."""
    base = crc16(b"@@@@")
    basis = {}
    for i in range(16):
        tag = bytearray(b"@@@@")
        tag[i // 4] |= 1 << (i % 4)
        value, combo = (crc16(bytes(tag)) ^ base) % SLOTS, 1 << i
        for b in range(13, -1, -1):
            if value & (1 << b):
                if b not in basis:
                    basis[b] = (value, combo)
                    break
                value ^= basis[b][0]
                combo ^= basis[b][1]
    inverse = []
    for j in range(14):
        value, combo = 1 << j, 0
        for b in range(13, -1, -1):
            if value & (1 << b) and b in basis:
                value ^= basis[b][0]
                combo ^= basis[b][1]
        inverse.append(combo)
    return inverse


_INVERSE = _tag_inverse()


def slot_tag(slot):
    """The 4-character hash tag of `slot` (wire/src/slot.rs slot_tag)."""
    target = (slot ^ crc16(b"@@@@")) % SLOTS
    bits = 0
    for j, combo in enumerate(_INVERSE):
        if target & (1 << j):
            bits ^= combo
    return "".join(chr(0x40 | ((bits >> (4 * k)) & 0xF)) for k in range(4))


def flush_marker_key(slot, prefix=KEY_PREFIX):
    """The flush marker of `slot`: `{prefix}__flush__{<tag>}`, a key in that slot."""
    return f"{prefix}{FLUSH_MARKER_SUFFIX}{{{slot_tag(slot)}}}"


def flush_marker_for(key, prefix=KEY_PREFIX):
    """The flush marker that guards the write-back of `key`: its slot's. The subscriber
    sets every slot's for a while after a flush; no write-back of `key` while it exists."""
    return flush_marker_key(key_slot(key), prefix)

TOMBSTONE = "\x00"
"""Redis value the subscriber leaves for an updated agent: no fill from before may write back."""

CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
"""A UUID in its one canonical spelling (agent and version ids as the filter writes them)."""

VERSIONED_PREFIX = "\x00v"
"""Start of a directive's Redis value that names its version (wire/src/lib.rs VERSIONED_PREFIX):
NUL, `v`, the version id (canonical UUID, 36 characters), then the text. The filter writes
every directive back so; a value without the prefix (older filters, other writers) is the
text alone, of version `unknown` in the audit trail."""


def directive_value(text, version_id):
    """The Redis value of `text` at version `version_id`, as the filter writes it back."""
    return VERSIONED_PREFIX + version_id + text


def read_directive_value(value):
    """(version id or None, text) of a directive's Redis value; None for a missing key or a
    tombstone (anything else that starts with NUL), as the filter reads it."""
    if value is None:
        return None
    if value.startswith(VERSIONED_PREFIX):
        rest = value[len(VERSIONED_PREFIX):]
        version, text = rest[:36], rest[36:]
        return (version, text) if CANONICAL_UUID.fullmatch(version) else None
    if value.startswith(TOMBSTONE):
        return None
    return None, value


def stored_text(value):
    """The directive text a Redis value holds, versioned or not; None for a missing key or a
    tombstone."""
    read = read_directive_value(value)
    return None if read is None else read[1]

UPDATES_CHANNEL = "ibex:directive:updates:"
"""Prefix of the pub/sub channel of one agent's updates (the agent id follows)."""

FLUSH_CHANNEL = "ibex:directive:flush"
"""Pub/sub channel of a flush of every cache."""

INVALIDATE_PATH = "/ibex/v1/invalidate"
"""Control listener path: POST it to flush L1, POST it + `/{agent}` to tombstone one agent."""


SET_IF_ABSENT_SCRIPT = ("if redis.call('EXISTS',KEYS[1],KEYS[2])==0 then redis.call('SET',KEYS[1],ARGV[2],'EX',"
                        "ARGV[1]) return 1 end return 0")
"""The filter's conditional write-back through EVAL (wire/src/lib.rs SET_IF_ABSENT_SCRIPT):
KEYS[1] the entry, KEYS[2] the flush marker, ARGV[1] the TTL, ARGV[2] the text."""

GET_WITH_PTTL_SCRIPT = ("local v=redis.call('GET',KEYS[1]) if not v then return false end return "
                        "{v,redis.call('PTTL',KEYS[1])}")
"""The filter's read of a gateway key's entry through EVAL (wire/src/lib.rs GET_WITH_PTTL_SCRIPT)."""

GET_SCRIPT = "return redis.call('GET',KEYS[1])"
"""The filter's directive read through EVAL in the upstash dialect (wire/src/lib.rs GET_SCRIPT):
a script runs on the key's leader, where a plain GET of managed Upstash may hit a replica."""

FILTER_SCRIPTS = (SET_IF_ABSENT_SCRIPT, GET_WITH_PTTL_SCRIPT, GET_SCRIPT)
"""Every script the filter sends through EVAL: the only ones the REST front runs by default."""

REST_TOKEN_ENV = "IBEX_REDIS_REST_TOKEN"
"""Environment variable of the REST front's filter token (`companion rest --token`, .run/env):
Envoy's `redis.token`, which runs only PING, GET and EVAL of FILTER_SCRIPTS on the filter's keys."""

REST_ADMIN_TOKEN_ENV = "IBEX_REDIS_REST_ADMIN_TOKEN"
"""Environment variable of the REST front's admin token (`companion rest --admin-token`, .run/env):
the operators' and SDKs' (GET, SET with EX, DEL, PING, EVAL of FILTER_SCRIPTS, on any key);
it must differ from the filter token."""


def redis_key(agent):
    """The Redis key of an agent's directive."""
    return KEY_PREFIX + agent


def updates_channel(agent):
    """The pub/sub channel of an agent's updates."""
    return UPDATES_CHANNEL + agent


# -- gateway API keys (agent.source "api_key", SPEC §3.1) ----------------------

KEY_HEADER = "authorization"
"""Default header of the gateway key (filter `agent.api_key.header`): `Bearer <key>`."""

AGENT_KEY_PREFIX = "agent_key:"
"""Redis key prefix of key-to-agent entries: `agent_key:{sha256hex}` (fixed, not configurable)."""

KEY_UPDATES_CHANNEL = "ibex:agent_key:updates:"
"""Prefix of the pub/sub channel `revoke-key` publishes (the key's SHA-256 follows)."""

INVALIDATE_KEY_PATH = INVALIDATE_PATH + "/key"
"""Control listener path: POST it + `/{sha256hex}` to drop one key's L1 entry."""

STORE_KEYS_PATH = "/v1/keys"
"""Store path: GET it + `/{sha256hex}` for the agent of an active key."""


def key_sha256(key):
    """The SHA-256 of a gateway key's exact bytes, in lower-case hex: the only form
    anything stores, caches, publishes or logs."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


def agent_key_redis_key(sha256_hex):
    """The Redis key of a gateway key's entry."""
    return AGENT_KEY_PREFIX + sha256_hex


def key_updates_channel(sha256_hex):
    """The pub/sub channel of a gateway key's updates."""
    return KEY_UPDATES_CHANNEL + sha256_hex
