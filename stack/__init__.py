"""Start and stop the real processes of the ibex-directive stack.

Used by the end-to-end tests (tests/), by `make run` (stack/run.py) and by
the benchmarks. Every class here runs a real binary on loopback ports, in a
directory of its own, with readiness polling and a clean stop:

    Postgres, Redis, RestFront, Webdis, Store, Subscriber, EchoUpstream, Envoy

and `Stack` brings them all up in dependency order as a context manager (one
L2 front: the REST front by default, Webdis with `l2="webdis"`).
"""

from stack.process import PortProcess, StartError
from stack.ports import free_port, port_is_free, wait_until
from stack.postgres import Postgres
from stack.redis import Redis, Webdis
from stack.companion import Store, Subscriber, Companion, RestFront
from stack.upstream import EchoUpstream
from stack.envoy import Envoy, REMOVE
from stack.stack import Stack

__all__ = [
    "Companion",
    "EchoUpstream",
    "Envoy",
    "Postgres",
    "PortProcess",
    "REMOVE",
    "Redis",
    "RestFront",
    "Stack",
    "StartError",
    "Store",
    "Subscriber",
    "Webdis",
    "free_port",
    "port_is_free",
    "wait_until",
]
