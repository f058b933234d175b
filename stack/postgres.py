"""PostgreSQL 15 from Debian's packages, as a private cluster on a loopback port.

PostgreSQL refuses to run as root, so when we are root initdb and postgres run
as the `postgres` user through `runuser`, with the data directory owned by it.
"""

import os
import signal
import subprocess
from pathlib import Path

from stack import paths
from stack.companion import Companion
from stack.process import PortProcess, StartError, wait_for_pid_exit
from stack.procfs import child_pids, parent_pid

DATABASE = "ibex"
SUPERUSER = "postgres"


def running_as_root():
    """True when the harness runs with euid 0."""
    return os.geteuid() == 0


def as_postgres(argv):
    """Prefix `argv` so it runs as the postgres user when we are root."""
    if running_as_root():
        return ["runuser", "-u", SUPERUSER, "--", *map(str, argv)]
    return [str(a) for a in argv]


def make_traversable_for_postgres(path):
    """When root: let the postgres user reach `path` (adds o+x to ancestors that lack it).

    pytest's temporary directories are mode 0700; without this the postgres
    user could not reach a data directory below them. Only the search bit is
    added, never read or write.
    """
    if not running_as_root():
        return
    for ancestor in reversed(Path(path).resolve().parents):
        mode = ancestor.stat().st_mode
        if not mode & 0o001:
            os.chmod(ancestor, mode | 0o001)


class Postgres(PortProcess):
    """A PostgreSQL cluster in `directory`/data listening on 127.0.0.1:`port`.

    initdb runs only when the data directory is empty, so a kept directory
    (`.run/pg` of `make run`) starts in about a second. Once ready, the
    project database exists and, with `migrate=True`, `ibex-companion migrate`
    has applied the schema. `fast=True` turns off fsync for throw-away test
    clusters.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: ends sessions, no waiting for clients

    def __init__(self, directory, port, fast=False, migrate=True, **kwargs):
        super().__init__(directory, port, **kwargs)
        self.fast = fast
        self.migrate_on_start = migrate
        self.data_dir = self.dir / "data"

    @property
    def url(self):
        """DATABASE_URL of the project database (superuser, trust auth)."""
        return f"postgres://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"

    def prepare(self):
        """Create the data directory and run initdb when it holds no cluster."""
        make_traversable_for_postgres(self.dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if running_as_root():
            self._chown_postgres(self.data_dir)
        os.chmod(self.data_dir, 0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()

    def _chown_postgres(self, path):
        """Give `path` (recursively) to the postgres user."""
        subprocess.run(["chown", "-R", f"{SUPERUSER}:", str(path)], check=True)

    def _initdb(self):
        argv = [
            paths.PG_BIN / "initdb",
            "-D", self.data_dir,
            "--auth=trust",
            "-U", SUPERUSER,
            "-E", "UTF8",
            "--locale=C.UTF-8",
        ]
        if self.fast:
            argv.append("--no-sync")
        log_path = self.log_dir / "initdb.log"
        with open(log_path, "ab") as log:
            result = subprocess.run(as_postgres(argv), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        if result.returncode != 0:
            raise StartError(f"initdb failed in {self.data_dir}; see {log_path}")

    def command(self):
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": self.port,
            "unix_socket_directories": str(self.data_dir),
            "logging_collector": "off",
            "log_min_messages": "warning",
            "max_connections": 200,
        }
        if self.fast:
            settings.update({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
        argv = [paths.PG_BIN / "postgres", "-D", self.data_dir]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return as_postgres(argv)

    def ready(self):
        """pg_isready answers 0, then the project database exists."""
        probe = subprocess.run(
            [paths.PG_BIN / "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return probe.returncode == 0

    def after_ready(self):
        """Create the project database when missing; apply the migrations."""
        exists = self.psql("SELECT 1 FROM pg_database WHERE datname = %s" % quote_literal(DATABASE), database="postgres")
        if exists.strip() != "1":
            self.psql(f"CREATE DATABASE {DATABASE}", database="postgres")
        if self.migrate_on_start:
            self.migrate()

    def migrate(self):
        """Apply the schema with the real companion (`ibex-companion migrate`, idempotent)."""
        return Companion(self.url, directory=self.log_dir).migrate()

    def psql(self, sql, database=DATABASE):
        """Run SQL with psql as the superuser; return its unaligned, tuples-only output."""
        result = subprocess.run(
            [paths.PG_BIN / "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-tA",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-c", sql],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def postmaster_pid(self):
        """Pid of the postmaster from postmaster.pid (runuser does not pass signals on)."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            return int(first)
        except (OSError, ValueError, IndexError):
            return None

    def kill(self):
        """A crash: SIGKILL the postmaster itself (not the runuser in front of it).

        Backends and auxiliary processes run in sessions of their own; they
        notice the postmaster's death and exit by themselves (PostgreSQL's
        postmaster-death signal). They are awaited, then SIGKILLed if still
        there after a deadline, so that a restart finds no old shared memory
        in use. Falls back to killing our child's session when the
        postmaster is not known.
        """
        if self.proc is None or not self.running():
            return self.stop()
        pid = self.postmaster_pid()
        if not pid or parent_pid(pid) != self.proc.pid:
            return super().kill()
        children = child_pids(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for child in children:
            if not wait_for_pid_exit(child, self.stop_timeout):
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                wait_for_pid_exit(child, self.stop_timeout)
        self.stop()

    def signal_targets(self):
        """The postmaster, when it is our runuser's child; else our child itself."""
        pid = self.postmaster_pid()
        if pid and parent_pid(pid) == self.proc.pid:
            return [pid]
        return [self.proc.pid]


def quote_literal(text):
    """SQL string literal for `text`."""
    return "'" + text.replace("'", "''") + "'"
