"""Names the filter, the companion and their configs agree on, as the Python
side (harness, tests, benchmarks) uses them. Spelled once here.

The values are those of envoy/local.yaml and the companion's defaults: a
test that configures another header or prefix says so itself.
"""

AGENT_HEADER = "x-agent-id"
"""Request header naming the agent (filter `agent.header`)."""

TIER_HEADER = "x-ibex-directive"
"""Debug header the filter adds upstream (`debug_headers`): local, redis, store, stale or none."""

KEY_PREFIX = "directive:"
"""Redis key prefix of directives (filter `redis.key_prefix`, companion `--key-prefix`)."""

FLUSH_MARKER = KEY_PREFIX + "__flush__"
"""Redis key the subscriber keeps for a while after a flush; no L2 write-back while it exists."""

TOMBSTONE = "\x00"
"""Redis value the subscriber leaves for an updated agent: no fill from before may write back."""

UPDATES_CHANNEL = "ibex:directive:updates:"
"""Prefix of the pub/sub channel of one agent's updates (the agent id follows)."""

FLUSH_CHANNEL = "ibex:directive:flush"
"""Pub/sub channel of a flush of every cache."""

INVALIDATE_PATH = "/ibex/v1/invalidate"
"""Control listener path: POST it to flush L1, POST it + `/{agent}` to tombstone one agent."""


def redis_key(agent):
    """The Redis key of an agent's directive."""
    return KEY_PREFIX + agent


def updates_channel(agent):
    """The pub/sub channel of an agent's updates."""
    return UPDATES_CHANNEL + agent
