"""One real child process serving on loopback ports: started with its output
in a log file, polled until ready, stopped with SIGTERM then SIGKILL.

`PortProcess` is the base of every process of the stack (and of the
benchmarks' sink Envoy). Subclasses say what to run (`command()`) and,
optionally, what to prepare first (`prepare()`), which other ports they
listen on (`other_ports()`), and how to tell they are ready: by default a GET
of `health_path` answers 200 and every listen port accepts TCP; `ready()`
can be replaced for servers that speak no HTTP.
"""

import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

from stack.ports import LOOPBACK, http_status, port_is_free, tcp_open, wait_until

_PR_SET_PDEATHSIG = 1


class StartError(RuntimeError):
    """A process exited or never became ready; the message ends with its log tail."""


def die_with_parent():
    """In the child, before exec: get SIGTERM when the harness dies.

    A harness killed with SIGKILL (or a crashed pytest) then leaves no
    process behind. Also puts the child in its own session so a Ctrl-C in the
    terminal reaches only the harness, which stops children in order.
    """
    os.setsid()
    # `make run` blocks SIGINT/SIGTERM in itself; children must get them.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def tail(path, lines=40):
    """Last `lines` lines of a text file, or a note that it does not exist."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class PortProcess:
    """Base class of every process of the stack: one child serving on 127.0.0.1:`port`.

    `directory` holds its files (config, data) and, unless `log_dir` is given,
    its logs. `name` names it in logs, pid files and errors. `url` is
    `http://127.0.0.1:port`. `start()` returns self once ready; `stop()` is
    safe to call any number of times; as a context manager it starts and
    stops.
    """

    name = "process"
    ready_timeout = 30.0
    stop_timeout = 10.0
    stop_signal = signal.SIGTERM
    health_path = None  # GET path that answers 200 once the process serves; None: no HTTP check

    def __init__(self, directory, port, *, name=None, env=None, pid_dir=None, log_dir=None):
        self.port = port
        self.dir = Path(directory).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = Path(log_dir).resolve() if log_dir else self.dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if name:
            self.name = name
        self.extra_env = dict(env or {})
        self.pid_dir = Path(pid_dir) if pid_dir else None
        self.proc = None
        self._log_handle = None

    # -- what subclasses provide -------------------------------------------

    def command(self):
        """The argv to run."""
        raise NotImplementedError

    def prepare(self):
        """Work done before the process starts (config files, data dirs)."""

    def other_ports(self):
        """Loopback ports it listens on besides `port` (admin, control, ...)."""
        return []

    def health_url(self):
        """URL whose GET answers 200 once the process serves, or None."""
        return self.url + self.health_path if self.health_path else None

    def ready(self):
        """True when the process serves requests (polled after start): its health
        URL answers 200, when it has one, and every listen port accepts TCP."""
        url = self.health_url()
        if url is not None and http_status(url) != 200:
            return False
        return all(tcp_open(port) for port in self.listen_ports())

    def after_ready(self):
        """Work done once the process is ready (migrations, for example)."""

    # -- common behaviour ---------------------------------------------------

    @property
    def url(self):
        """Base URL of the process's main port (HTTP; Redis and Postgres give their own)."""
        return f"http://{LOOPBACK}:{self.port}"

    def listen_ports(self):
        """Every loopback port this process listens on (checked free at start)."""
        return [self.port, *self.other_ports()]

    @property
    def log_path(self):
        """The file that receives the process's stdout and stderr."""
        return self.log_dir / f"{self.name}.log"

    def log_paths(self):
        """Every log file this process writes (the privacy test reads them all)."""
        return [self.log_path]

    @property
    def pid(self):
        """Pid of the running child, or None."""
        return self.proc.pid if self.proc else None

    def environment(self):
        """The child's environment: ours plus the extra variables."""
        env = dict(os.environ)
        env.update(self.extra_env)
        return env

    def running(self):
        """True while the child has not exited (does not reap it)."""
        return self.proc is not None and self.proc.returncode is None and not self._exited()

    def _exited(self):
        """True when the child has exited; leaves it unreaped so its pid stays ours."""
        try:
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def _wait_exited(self, timeout):
        """Poll until the child has exited, without reaping it; True if it did."""
        deadline = time.monotonic() + timeout
        while not self._exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def start(self):
        """Start the process and wait until it is ready; return self."""
        if self.running():
            return self
        self.check_ports_free()
        self.prepare()
        argv = [str(part) for part in self.command()]
        self._log_handle = open(self.log_path, "ab")
        self._log_handle.write(f"--- start: {argv[0]}\n".encode())
        self._log_handle.flush()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            env=self.environment(),
            preexec_fn=die_with_parent,
        )
        self._write_pid_file()
        try:
            wait_until(self._ready_or_dead, timeout=self.ready_timeout, what=f"{self.name} to be ready")
        except Exception as exc:
            self.stop()
            raise StartError(f"{self.name} did not become ready: {exc}\n--- {self.log_path}:\n{tail(self.log_path)}") from exc
        self.after_ready()
        return self

    def check_ports_free(self):
        """Fail with a message naming the port when something already holds it."""
        for port in self.listen_ports():
            if not port_is_free(port):
                raise StartError(f"{self.name}: port {LOOPBACK}:{port} is already in use; stop whatever holds it or pick another port")

    def _ready_or_dead(self):
        """Readiness poll that fails fast when the child exited."""
        if not self.running():
            raise StartError(f"{self.name} exited\n--- {self.log_path}:\n{tail(self.log_path)}")
        return self.ready()

    def signal_targets(self):
        """Pids that get the stop signal (the child itself by default)."""
        return [self.proc.pid]

    def stop(self):
        """Stop the process: stop signal, wait, SIGKILL as a fallback.

        The child is reaped only after every process left in its session got
        SIGKILL, so the group id cannot belong to anyone else by then.
        """
        if self.proc is None:
            return
        if self.proc.returncode is None:
            if not self._exited():
                for pid in self.signal_targets():
                    try:
                        os.kill(pid, self.stop_signal)
                    except ProcessLookupError:
                        pass
                self._wait_exited(self.stop_timeout)
            self._kill_group()
            self.proc.wait(timeout=self.stop_timeout)
        self.proc = None
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None
        self._remove_pid_file()

    def kill(self):
        """SIGKILL the process and its session at once (a crash, for failure tests)."""
        if self.proc is not None and self.proc.returncode is None:
            self._kill_group()
        self.stop()

    def _kill_group(self):
        """SIGKILL every process in the child's session (the child included)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _write_pid_file(self):
        """Record the pid under pid_dir, when the caller keeps pid files."""
        if self.pid_dir:
            self.pid_dir.mkdir(parents=True, exist_ok=True)
            (self.pid_dir / f"{self.name}.pid").write_text(f"{self.proc.pid}\n")

    def _remove_pid_file(self):
        if self.pid_dir:
            try:
                (self.pid_dir / f"{self.name}.pid").unlink()
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} pid={self.pid}>"


def wait_for_pid_exit(pid, timeout):
    """Poll until a pid that is not our child has gone; True if it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False
