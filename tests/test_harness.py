"""The harness itself: parts stop completely, busy ports are named, and a
kept Postgres directory is reused (what `make run` relies on)."""

import os
import socket

import pytest

from stack import Postgres, Redis, Stack, StartError, free_port, port_is_free


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


def test_stack_stop_leaves_no_process_and_frees_ports(tmp_path):
    parts = ("postgres", "redis", "webdis", "store", "upstream")
    with Stack(tmp_path, parts=parts) as stack:
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
