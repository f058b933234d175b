"""Helpers of the chaos and timeout tests: steady client load that records
every answer, a drain of everything the echo upstream received, and a TCP
server that accepts connections and never answers (process memory:
stack/procfs.py).

Nothing here waits by sleeping for a state: the load and the drain pace
themselves with Event.wait (they stop at once when told), and every wait
for a condition is stack.wait_until with a deadline.
"""

import json
import selectors
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

import requests

from helpers import CHAT, chat_body, json_headers, tier

LOAD_AGENT_HEADER = "x-load-agent"
"""The agent of a load request, as the upstream sees it: Envoy removes the
agent header before the upstream (envoy/local.yaml), so the load repeats the
agent in a header of its own."""


@dataclass
class Answer:
    """One request of the load and what the client got back."""

    agent: str
    sent_at: float
    done_at: float
    status: int = 0  # 0: no HTTP answer (see error)
    body: str = ""
    error: str = ""

    def echoed_directive(self):
        """The first message the echo model says it received, as `role: content`."""
        content = json.loads(self.body)["choices"][0]["message"]["content"]
        lines = content.split("\n")
        return lines[1].split("] ", 1)[1] if len(lines) > 1 else None


class Load:
    """A few client threads sending chat requests round robin over `agents`.

    Bounded: stops after `max_requests` in total or `max_seconds`, whichever
    comes first, or when stop() is called. Every answer is kept.
    """

    def __init__(self, url, agents, threads=3, max_requests=60_000, max_seconds=120.0, timeout=10.0):
        self.url = url + CHAT
        self.agents = list(agents)
        self.threads = threads
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.timeout = timeout
        self.answers = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = []
        self._sent = 0
        self.body = chat_body("chaos")

    def _next_agent(self):
        with self._lock:
            if self._sent >= self.max_requests:
                return None
            agent = self.agents[self._sent % len(self.agents)]
            self._sent += 1
            return agent

    def _run(self, deadline):
        with requests.Session() as session:
            while not self._stop.is_set() and time.monotonic() < deadline:
                agent = self._next_agent()
                if agent is None:
                    return
                answer = Answer(agent, time.time(), 0.0)
                try:
                    response = session.post(self.url, data=self.body, timeout=self.timeout,
                                            headers=json_headers(agent, {LOAD_AGENT_HEADER: agent}))
                    answer.status = response.status_code
                    answer.body = response.text
                except requests.RequestException as exc:
                    answer.error = repr(exc)
                answer.done_at = time.time()
                self.answers.append(answer)  # list.append is atomic

    def start(self):
        deadline = time.monotonic() + self.max_seconds
        self._workers = [threading.Thread(target=self._run, args=(deadline,), daemon=True)
                         for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def stop(self):
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=self.timeout + 5)
        assert not any(worker.is_alive() for worker in self._workers), "load threads did not stop"

    def count(self):
        return len(self.answers)

    def since(self, start):
        """Answers to requests sent at or after `start` (time.time())."""
        return [a for a in list(self.answers) if a.sent_at >= start]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


class UpstreamLog:
    """Everything the echo upstream received, drained from it every `interval`
    seconds by a thread (the upstream forgets what it hands over, atomically,
    so nothing is lost or read twice)."""

    def __init__(self, upstream, interval=0.2):
        self.upstream = upstream
        self.interval = interval
        self.items = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def drain_now(self):
        with self._lock:
            new = self.upstream.drain()
            self.items.extend(new)
            return len(new)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.drain_now()

    def start(self):
        """Forget what the upstream received so far, then drain from now on."""
        self.upstream.drain()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        self.drain_now()

    def since(self, start):
        """Requests received at or after `start` (time.time(), same clock as the upstream)."""
        with self._lock:
            return [r for r in self.items if r.received_at >= start]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def tier_counts(received):
    """{tier: count} of the debug header over `received`."""
    return Counter(tier(r) for r in received)


def fractions(counts):
    """{tier: share rounded to 3 places} of a tier Counter."""
    total = sum(counts.values())
    return {k: round(v / total, 3) for k, v in sorted(counts.items(), key=str)} if total else {}


def counter_delta(before, after):
    """{counter: change} of the counters that moved between two snapshots."""
    return {name: after.get(name, 0) - before.get(name, 0) for name in set(before) | set(after)
            if after.get(name, 0) != before.get(name, 0)}


class HangingServer:
    """A TCP listener on loopback that accepts every connection, reads and
    discards what arrives, and never answers: a callout target that hangs.

    Runs in a thread of the test process; close() drops every connection.
    `port` 0 picks a free port; a given port stands in for a part that was
    killed (a server that hangs where the part was). With `answer`, the first
    bytes of each connection are answered with it once, then the connection
    hangs: e.g. response headers whose body never comes.
    """

    def __init__(self, port=0, answer=b""):
        self._answer = answer
        self._answered = set()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self.accepted = 0
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.1):
                sock = key.fileobj
                if sock is self._listener:
                    try:
                        conn, _ = self._listener.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    self._selector.register(conn, selectors.EVENT_READ)
                    self.accepted += 1
                    continue
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionError:
                    data = b""
                if data == b"":  # the peer gave up: forget the socket
                    self._selector.unregister(sock)
                    self._answered.discard(sock)
                    sock.close()
                elif self._answer and sock not in self._answered:
                    self._answered.add(sock)
                    sock.sendall(self._answer)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
