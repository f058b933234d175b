"""How the benchmarks measure: wrk runs, CPU time of processes and of the
whole machine from /proc, memory, percentiles, and a log line per step."""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.workload import CHAT_PATH, FILTER_COUNTERS, KEY_COUNTER_PREFIX, POP
from stack.process import die_with_parent
from stack.procfs import cpu_ticks, descendants, rss_kb

BENCH = Path(__file__).resolve().parent
WRK_SCRIPT = BENCH / "wrk" / "post.lua"
TICKS = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(values, p):
    """Nearest-rank percentile of `values` (p in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run_checked(argv, what, timeout=900):
    """Run a build or tool; its stdout, or RuntimeError with its stderr's tail."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed: {result.stderr[-2000:]}")
    return result.stdout


# --------------------------------------------------------------------------- CPU and memory

def proc_cpu(pid):
    """CPU used so far by process `pid`: (ns from every thread's schedstat, utime+stime ticks)."""
    ns = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            ns += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return ns, cpu_ticks(pid)


def our_processes():
    """Pids of this harness and every process below it (the stack, wrk, …)."""
    return descendants(os.getpid())


def cpu_snapshot():
    """(ticks all CPUs were busy, ticks used by us: live processes of our tree plus reaped
    children) — their difference over a run is the CPU that other work on the machine used."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    # user + nice + system + steal; irq and softirq time (loopback networking) is
    # charged to no process, so it is left out rather than called foreign
    busy = fields[0] + fields[1] + fields[2] + fields[7]
    ours = sum(cpu_ticks(pid) for pid in our_processes())
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours += int((reaped.ru_utime + reaped.ru_stime) * TICKS)
    return busy, ours


class CpuWindow:
    """CPU used over the `with` block: by the gateway Envoy and the sink (ns and
    ticks), and by other work on the machine (CPUs' worth, `foreign_cpus`)."""

    def __init__(self, gateway_pid, sink_pid):
        self.pids = {"gateway": gateway_pid, "sink": sink_pid}

    def __enter__(self):
        self._machine = cpu_snapshot()
        self._start = {name: proc_cpu(pid) for name, pid in self.pids.items()}
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.wall = time.monotonic() - self._t0
        end = {name: proc_cpu(pid) for name, pid in self.pids.items()}
        machine = cpu_snapshot()
        self.ns = {name: end[name][0] - self._start[name][0] for name in self.pids}
        self.ticks = {name: end[name][1] - self._start[name][1] for name in self.pids}
        other = (machine[0] - self._machine[0]) - (machine[1] - self._machine[1])
        self.foreign_cpus = max(0.0, other / TICKS / self.wall)
        return False


def rss_bytes(pid):
    return rss_kb(pid) * 1024


def envoy_memory(admin_url):
    """Envoy's admin /memory ({"allocated": …, "heap_size": …, …}) as ints."""
    with urllib.request.urlopen(admin_url + "/memory", timeout=5) as response:
        data = json.load(response)
    return {key: int(value) for key, value in data.items()}


def filter_counters(stack):
    """The filter counters the benchmarks follow (FILTER_COUNTERS, 0 when the filter has
    none of that name, and every `key_*` one it has), summed over workers."""
    counters = stack.envoy.counters()
    names = list(FILTER_COUNTERS) + sorted(n for n in counters
                                          if n.startswith(KEY_COUNTER_PREFIX) and n not in FILTER_COUNTERS)
    return {name: int(counters.get(name, 0)) for name in names}


def counter_delta(before, after):
    """{counter: change} of the counters that moved."""
    return {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}


def machine_note():
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


# --------------------------------------------------------------------------- wrk

class Wrk:
    """wrk runs (one thread, POST bodies from files, agent ids from bench/wrk/post.lua)."""

    def __init__(self, bodies):
        self.bodies = bodies

    def run(self, url, body, mode, population, base, count, connections, duration, path=CHAT_PATH,
            key_file=None):
        """One bounded run; wrk's summary ({"requests", "duration_us", "latency_us", "errors"}).
        Mode "key" sends `authorization: Bearer <the key in key_file>` instead of an agent id."""
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s", str(WRK_SCRIPT),
                url + "/", "--", path, str(self.bodies[body]), mode, POP[population], str(base), str(count)]
        if mode == "key":
            if key_file is None:
                raise ValueError("wrk mode key needs the key file")
            argv.append(str(key_file))
        result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                                preexec_fn=die_with_parent)
        for line in result.stdout.splitlines():
            if line.startswith("WRKJSON "):
                return json.loads(line[len("WRKJSON "):])
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr.strip()} {result.stdout[-500:]}")
