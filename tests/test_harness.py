"""The harness itself: parts stop completely, busy ports are named, a kept
Postgres directory is reused (what `make run` relies on), and a stack runs one
L2 front."""

import os
import socket

import pytest

from stack import Postgres, Redis, Stack, StartError, free_port, port_is_free
from stack.procfs import cmdline


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def session_pids(leader):
    """Pids of every process in the session led by `leader` (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == leader:
                    pids.append(int(entry))
            except ProcessLookupError:
                continue
    return pids


@pytest.mark.parametrize("l2", ["rest", "webdis"])
def test_stack_stop_leaves_no_process_and_frees_ports(tmp_path, l2):
    parts = ("postgres", "redis", l2, "store", "upstream")
    with Stack(tmp_path, parts=parts, l2=l2) as stack:
        assert stack.parts == list(parts) and stack.l2_part == l2
        pids = [pid for name in parts for pid in session_pids(stack.part(name).pid)]
        ports = [stack.ports[name] for name in parts]
        assert len(pids) > len(parts)  # postgres has its backends, for one
        assert stack.store.directive("00000000-0000-4000-8000-000000000000")[0] == 200
    assert [pid for pid in pids if alive(pid)] == []
    assert all(port_is_free(port) for port in ports)


def test_busy_port_is_named(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(StartError, match=f"127.0.0.1:{port}"):
            Redis(tmp_path, port).start()


def test_postgres_directory_is_reused(tmp_path):
    with Postgres(tmp_path / "pg", free_port(), fast=True, migrate=False) as pg:
        pg.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
    initdb_log = (tmp_path / "pg" / "initdb.log").read_text()
    with Postgres(tmp_path / "pg", free_port(), fast=True, migrate=False) as pg:
        assert pg.psql("SELECT x FROM kept").strip() == "42"
    assert (tmp_path / "pg" / "initdb.log").read_text() == initdb_log  # no second initdb


def test_a_stack_runs_one_l2_front_and_its_tokens_are_on_no_command_line(tmp_path):
    """`parts` naming both fronts starts only the stack's (the REST front by default);
    the REST front's two tokens (the filter's and the admin's, different) reach it
    through its environment, never argv, never logged, and it answers only with them:
    the filter's may not SET, the admin's may."""
    with Stack(tmp_path, parts=("redis", "rest", "webdis")) as stack:
        assert stack.parts == ["redis", "rest"] and stack.l2_part == "rest"
        assert stack.rest.running() and not stack.webdis.running()
        assert stack.rest_admin_token and stack.rest_admin_token != stack.rest_token
        for token in (stack.rest_token, stack.rest_admin_token):
            assert token not in cmdline(stack.rest.pid)
            assert stack.rest.call("PING", token=token) == (200, {"result": "PONG"})
            assert stack.rest.post("/", b'["PING"]', token=token + "x")[0] == 401
        assert stack.rest.call("SET", "ibex-test:harness", "v", "EX", 60)[0] == 403
        assert stack.rest.call("SET", "ibex-test:harness", "v", "EX", 60, token=stack.rest_admin_token) == \
            (200, {"result": "OK"})
        assert stack.rest.readyz() == 200 and stack.rest.live()
    logs = [path for path in tmp_path.rglob("*.log")]
    assert any(path.name == "rest.log" for path in logs)
    for token in (stack.rest_token, stack.rest_admin_token):
        assert not any(token in path.read_text(errors="replace") for path in logs)
    with pytest.raises(ValueError, match="must differ"):
        Stack(tmp_path / "same", rest_token="t" * 40, rest_admin_token="t" * 40)
    with pytest.raises(ValueError, match="unknown L2 front"):
        Stack(tmp_path / "other", l2="memcached")
