"""A real three-master Redis Cluster on loopback (Redis 7 from Debian's packages).

Three `redis-server --cluster-enabled yes` nodes, joined once by
`redis-cli --cluster create … --cluster-replicas 0 --cluster-yes` and polled
until every node says `cluster_state:ok` and knows all three masters and all
16384 slots. `RedisCluster` offers what the tests use of `stack.redis.Redis`
(`url`, `command_call`, `get`, `ttl`, `redis_cli`, `command_calls`,
`delete_matching`, start/stop), routing each command to the master of its key's
slot (computed as Redis does, stack/contract.py key_slot, checked against
CLUSTER KEYSLOT by tests/test_redis_cluster.py), so a test reads and writes
the cluster as a cluster client would. `url` is the comma-separated seed list
the companion takes with `--redis-cluster`.

Webdis cannot talk to a cluster; a cluster stack's L2 front is the REST front.
"""

import random
import socket
import subprocess

from stack.contract import key_slot
from stack.ports import LOOPBACK, port_is_free, wait_until
from stack.redis import Redis, RespError, _read_reply, encode_command

CLUSTER_BUS_OFFSET = 10000
"""Redis Cluster's bus listens on the node's port plus this."""

KEYLESS = {"PING", "PUBLISH", "INFO", "CLUSTER", "FLUSHALL", "DBSIZE", "SCAN", "KEYS", "CONFIG"}
"""Commands sent to any node (or, for the node-wide ones, used per node by the helpers)."""


def free_cluster_ports(count, taken=()):
    """`count` free loopback ports whose cluster bus ports (+10000) are free too."""
    ports = []
    while len(ports) < count:
        port = random.randint(20000, 55000 - CLUSTER_BUS_OFFSET)
        if port in ports or port in taken or port + CLUSTER_BUS_OFFSET in ports:
            continue
        if port_is_free(port) and port_is_free(port + CLUSTER_BUS_OFFSET):
            ports.append(port)
    return ports


class ClusterNode(Redis):
    """One master: redis-server with cluster mode on, its nodes.conf in its directory."""

    name = "redis-node"

    def command(self):
        return [
            *super().command(),
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.dir / "nodes.conf"),
            "--cluster-node-timeout", "5000",
        ]

    def other_ports(self):
        return [self.port + CLUSTER_BUS_OFFSET]

    @property
    def seed_url(self):
        """This node as a cluster seed (no database number: a cluster has only 0)."""
        return f"redis://127.0.0.1:{self.port}"

    def cluster_info(self):
        """CLUSTER INFO as a dict."""
        text = self.command_call("CLUSTER", "INFO")
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def errorstats(self):
        """INFO errorstats as {error prefix: count}, e.g. {"CROSSSLOT": 1}."""
        stats = {}
        for line in self.command_call("INFO", "errorstats").splitlines():
            if line.startswith("errorstat_"):
                name, _, fields = line[len("errorstat_"):].partition(":")
                stats[name] = int(dict(f.split("=", 1) for f in fields.split(","))["count"])
        return stats


class RedisCluster:
    """Three masters on `ports`, joined into one cluster on first start."""

    name = "redis"

    def __init__(self, directory, ports, *, pid_dir=None, log_dir=None):
        self.dir = directory
        self.nodes = [ClusterNode(directory / f"node-{i}", port, name=f"redis-node-{i}", pid_dir=pid_dir,
                                  log_dir=log_dir)
                      for i, port in enumerate(ports)]
        self._created = False

    # -- lifecycle ----------------------------------------------------------------

    @property
    def port(self):
        """The first node's port (a seed)."""
        return self.nodes[0].port

    @property
    def url(self):
        """The companion's --redis-url with --redis-cluster: every node, comma-separated."""
        return ",".join(node.seed_url for node in self.nodes)

    def start(self):
        for node in self.nodes:
            node.start()
        if not self._created and not all((node.dir / "nodes.conf").exists()
                                         and node.cluster_info().get("cluster_known_nodes") == str(len(self.nodes))
                                         for node in self.nodes):
            self._create()
        self._created = True
        wait_until(self.healthy, timeout=60, what="the Redis Cluster to reach cluster_state:ok on every node")
        return self

    def _create(self):
        result = subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"{LOOPBACK}:{node.port}" for node in self.nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {result.stdout}{result.stderr}")

    def healthy(self):
        """Every node: state ok, all slots assigned, every master known."""
        try:
            for node in self.nodes:
                info = node.cluster_info()
                if (info.get("cluster_state") != "ok" or info.get("cluster_slots_assigned") != "16384"
                        or info.get("cluster_known_nodes") != str(len(self.nodes))):
                    return False
            return True
        except (OSError, RespError):
            return False

    def stop(self):
        for node in reversed(self.nodes):
            node.stop()

    def running(self):
        return all(node.running() for node in self.nodes)

    def log_paths(self):
        return [path for node in self.nodes for path in node.log_paths()]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- commands -------------------------------------------------------------------

    def node_for_slot(self, slot):
        """The node that serves `slot`, from CLUSTER SLOTS of the first node."""
        for start, end, master, *_ in self.nodes[0].command_call("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                port = int(master[1])
                return next(node for node in self.nodes if node.port == port)
        raise RuntimeError(f"no node serves slot {slot}")

    def _key_of(self, args):
        name = str(args[0]).upper()
        if name in KEYLESS:
            return None
        if name in ("EVAL", "EVALSHA"):
            return args[3] if int(args[2]) > 0 else None
        return args[1] if len(args) > 1 else None

    def command_call(self, *args):
        """One command, sent to the master of its (first) key's slot; keyless ones to
        the first node. A MOVED answer is followed once."""
        key = self._key_of(args)
        node = self.nodes[0] if key is None else self.node_for_slot(key_slot(key))
        try:
            return node.command_call(*args)
        except RespError as error:
            if not str(error).startswith("MOVED "):
                raise
            host, _, port = str(error).split()[2].rpartition(":")
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(encode_command(*args))
                with sock.makefile("rb") as stream:
                    return _read_reply(stream)

    def get(self, key):
        """GET `key` on its master: its value, or None."""
        return self.command_call("GET", key)

    def ttl(self, key):
        """TTL of `key` on its master."""
        return self.command_call("TTL", key)

    def redis_cli(self, *args):
        """The real redis-cli in cluster mode (-c: follows redirections) from the first node."""
        result = subprocess.run(
            ["redis-cli", "-c", "-h", LOOPBACK, "-p", str(self.port), "--raw", *map(str, args)],
            capture_output=True, text=True, timeout=10,
        )
        if result.returncode != 0:
            raise RespError(result.stderr.strip() or result.stdout.strip())
        return result.stdout.strip()

    def command_calls(self, command):
        """How many times `command` ran on all masters together."""
        return sum(node.command_calls(command) for node in self.nodes)

    def keys(self, pattern):
        """Every key matching `pattern`, over all masters (SCAN per node)."""
        return [key for node in self.nodes for key in node.keys(pattern)]

    def delete_matching(self, pattern):
        """Delete every key matching `pattern` on every master; returns how many."""
        return sum(node.delete_matching(pattern) for node in self.nodes)

    def errorstats(self):
        """{node port: INFO errorstats} of every master."""
        return {node.port: node.errorstats() for node in self.nodes}
