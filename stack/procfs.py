"""What /proc says about a process: its parent, children, memory, CPU and
command line. Linux only, like the rest of the harness."""

import os
from pathlib import Path


def stat_fields(pid):
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards):
    [0] state, [1] ppid, ... [11] utime, [12] stime (clock ticks).

    The command name (field 2) may hold spaces and parentheses; the fields
    after its last ')' are fixed. Raises OSError when the process is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def parent_pid(pid):
    """Parent pid of `pid`, or None when it is gone."""
    try:
        return int(stat_fields(pid)[1])
    except (OSError, ValueError, IndexError):
        return None


def pids():
    """Every pid on the machine right now."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def child_pids(pid):
    """Pids whose parent is `pid` right now."""
    return [child for child in pids() if parent_pid(child) == pid]


def descendants(root):
    """`root` and every process below it right now."""
    parents = {pid: parent_pid(pid) for pid in pids()}
    found = []
    for pid in parents:
        chain = pid
        for _ in range(64):  # deeper than any process tree of ours
            if chain == root:
                found.append(pid)
                break
            chain = parents.get(chain)
            if chain in (None, 0):
                break
    return found


def cpu_ticks(pid):
    """User plus system CPU time of `pid` so far, in clock ticks (0 when it is gone)."""
    try:
        fields = stat_fields(pid)
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0


def rss_kb(pid):
    """Resident set size of `pid` in kB (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cmdline(pid):
    """The command line of `pid`, or '' when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
