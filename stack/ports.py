"""Loopback ports, readiness probes and polling with deadlines.

Nothing in the stack waits by sleeping a fixed time: every wait is a poll of
a real condition (a TCP connect, an HTTP status, a command's answer) that
gives up at a deadline with an error saying what it waited for.
"""

import socket
import time
import urllib.error
import urllib.request

LOOPBACK = "127.0.0.1"


class WaitTimeout(AssertionError):
    """A polled condition did not become true before its deadline."""


def free_port(host=LOOPBACK):
    """Return a TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port, host=LOOPBACK):
    """True when a listener could bind `host:port` (nothing holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def tcp_open(port, host=LOOPBACK, timeout=0.2):
    """True when something accepts TCP connections on `host:port`."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_status(url, timeout=1.0):
    """Status of a GET on `url`, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def wait_until(condition, timeout=30.0, interval=0.02, what=None):
    """Poll `condition()` until it returns a truthy value, and return that value.

    Raises WaitTimeout naming `what` when `timeout` seconds pass first. The
    pause between polls only paces the loop; correctness never depends on it.
    Exceptions raised by `condition` count as "not yet"; the last one is
    reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - reported at the deadline
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what or condition}{detail}")
        time.sleep(interval)
