"""`--instructions`: what each variant costs the gateway in instructions, counted.

Timing on a shared 2-vCPU VM moves by tens of percent between rounds (the host's
other tenants; no hardware counters in the guest), so a ratio of a few percent
cannot be judged from wrk alone. Instructions can: the gateway Envoy runs under
valgrind's callgrind (V8's JIT code included, `--smc-check=all-non-file`), each
variant's listener gets the same requests one after the other on one keep-alive
connection, and callgrind's counters are zeroed before and dumped after each
batch. The user-space instructions per request (kernel time is not counted, and a
cache miss costs what an add does) are the same from one run to the next within
about a percent, whatever else the machine does.

Envoy's timers (stats flush, each plugin's root tick) run during a batch too: an
idle window measured the same way before every pass over the variants gives their
rate, which is subtracted per second of each batch. Batches of one run agree within
about half a percent; the same variant in two runs within about 1.5 % (the timers'
share is what moves), so compare variants within one run, as ratios.
"""

import glob
import os
import socket
import subprocess
import time

from bench.measure import log
from bench.workload import PROBES, VARIANTS, agent_id
from stack.contract import AGENT_HEADER as AGENT_HEADER_NAME

# Variants whose requests are all alike (one agent, fixed body): counted here.
COUNTED = ("bare-1k", "lua-static-1k", "wasm-noop-1k", "wasm-floor-1k", "wasm-pass-1k", "l1-none-1k",
           "l1-1k", "l1-no-audit-1k", "l1-audit-fields-1k", "bare-64k", "lua-static-64k", "l1-64k", *PROBES)
WARM = 400        # requests before counting: the L1 fill, V8's tier-up to optimised code
REQUESTS = 1000   # requests counted per batch
BATCHES = 2       # batches per variant, interleaved with the other variants'
IDLE_S = 5.0


def valgrind_argv(out_dir):
    """The argv prefix the gateway Envoy runs under."""
    return ["valgrind", "--tool=callgrind", "--smc-check=all-non-file", "--dump-instr=no",
            "--compress-strings=no", "--compress-pos=no",
            f"--callgrind-out-file={out_dir}/callgrind.out.%p", "--log-file=" + f"{out_dir}/valgrind.log"]


def available():
    try:
        return subprocess.run(["valgrind", "--version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Client:
    """One keep-alive HTTP/1.1 connection sending one prebuilt request again and again."""

    def __init__(self, port, request):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.request = request
        self.pending = b""

    def send(self):
        self.sock.sendall(self.request)
        head = self._read_until(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        self._read_exactly(length)
        return status

    def _read_until(self, marker):
        while marker not in self.pending:
            self._more()
        head, _, self.pending = self.pending.partition(marker)
        return head

    def _read_exactly(self, n):
        while len(self.pending) < n:
            self._more()
        data, self.pending = self.pending[:n], self.pending[n:]
        return data

    def _more(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("gateway closed the connection")
        self.pending += chunk

    def close(self):
        self.sock.close()


def request_of(variant, port, body):
    headers = [f"POST {variant.path} HTTP/1.1", f"host: 127.0.0.1:{port}", "content-type: application/json",
               f"{AGENT_HEADER_NAME}: {agent_id(variant.population, 0)}", f"content-length: {len(body)}"]
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


class Callgrind:
    """callgrind_control on the gateway's valgrind process."""

    def __init__(self, pid, out_dir):
        self.pid = pid
        self.out_dir = out_dir

    def _control(self, flag):
        subprocess.run(["callgrind_control", flag, str(self.pid)], check=True, capture_output=True, timeout=120)

    def zero(self):
        self._control("-z")

    def dump(self, label=None):
        """Instructions since the last zero (callgrind writes one file per dump; kept as
        `<label>.callgrind` for callgrind_annotate when labelled)."""
        before = set(glob.glob(f"{self.out_dir}/callgrind.out.{self.pid}*"))
        self._control("-d")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            new = set(glob.glob(f"{self.out_dir}/callgrind.out.{self.pid}*")) - before
            for path in new:
                total = _totals(path)
                if total is not None:
                    if label:
                        os.replace(path, f"{self.out_dir}/{label}.callgrind")
                    else:
                        os.unlink(path)
                    return total
            time.sleep(0.05)  # polling for a file valgrind writes: no event to wait on
        raise RuntimeError("callgrind wrote no dump")


def _totals(path):
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith("totals:") or line.startswith("summary:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def gateway_pid(bench):
    """The valgrind process (taskset and valgrind exec into one pid)."""
    return bench.stack.envoy.proc.pid


# Wasm listeners per stack: each VM instance reserves gigabytes of address space
# (V8's guard regions), one per worker and one on the main thread, and valgrind's
# address space holds about ten.
WASM_PER_GROUP = 2


def groups(selected):
    """The selected variants in stacks of a few wasm listeners each, each group with the
    baselines its variants pair with."""
    wasm, plain = [], []
    for name in selected:
        (plain if VARIANTS[name].listener in ("bare", "lua") else wasm).append(name)
    listeners = []
    for name in wasm:
        if VARIANTS[name].listener not in listeners:
            listeners.append(VARIANTS[name].listener)
    chunks = [listeners[i:i + WASM_PER_GROUP] for i in range(0, len(listeners), WASM_PER_GROUP)] or [[]]
    out = []
    for n, chunk in enumerate(chunks):
        group = [v for v in wasm if VARIANTS[v].listener in chunk]
        bases = {VARIANTS[v].baseline for v in group if VARIANTS[v].baseline}
        # the plain variants ride with the first group; every group counts its own bare
        extra = plain if n == 0 else [v for v in plain if v in bases]
        out.append([v for v in selected if v in group or v in extra or v in bases])
    return out


def check_vms(stack):
    """Every wasm VM started: a VM valgrind could not give memory fails open in Envoy,
    and its listener would be counted as a filter that does nothing."""
    text = stack.envoy.server_log_path.read_text(errors="replace")
    if "Failed to create new Wasm instance" in text or "Wasm VM failed" in text:
        raise RuntimeError("a wasm VM failed to start under valgrind (too many VMs in one stack?)")


def merge(into, result):
    """One result of several groups (bare counted in each: the first group's is kept)."""
    if into is None:
        return result
    for name, r in result["variants"].items():
        into["variants"].setdefault(name, r)
    into["idle_per_s"] = max(into["idle_per_s"], result["idle_per_s"])
    return into


def count(bench, out_dir):
    """{variant: {"per_request": instructions, "batches": [...], "x_bare": ratio}} and the idle rate."""
    out_dir = str(out_dir)
    cg = Callgrind(gateway_pid(bench), out_dir)
    wanted = [v for v in COUNTED if v in bench.order]
    clients = {}
    for name in wanted:
        variant = VARIANTS[name]
        port = bench.stack.envoy.bench_ports[variant.listener]
        body = bench.bodies[variant.body].read_bytes()
        clients[name] = Client(port, request_of(variant, port, body))
        log(f"instructions: warm-up {name}")
        for _ in range(WARM):
            status = clients[name].send()
            if status != 200:
                raise RuntimeError(f"instructions: {name} answered {status}")
    results = {name: {"batches": []} for name in wanted}
    idle_rates = []
    for batch in range(BATCHES):
        # Envoy's timers run at a rate of their own, which moves a little (GC, stats
        # flushes): an idle window before every pass over the variants.
        cg.zero()
        time.sleep(IDLE_S)  # the idle window itself: nothing to wait for
        idle_rate = cg.dump() / IDLE_S
        idle_rates.append(idle_rate)
        log(f"instructions: idle {idle_rate:,.0f}/s")
        for name in wanted:
            cg.zero()
            t0 = time.monotonic()
            for _ in range(REQUESTS):
                clients[name].send()
            elapsed = time.monotonic() - t0
            total = cg.dump(f"{name}-{batch + 1}")
            per = (total - idle_rate * elapsed) / REQUESTS
            results[name]["batches"].append(round(per))
            log(f"instructions: batch {batch + 1} {name} {per:,.0f} per request ({elapsed:.1f} s)")
    for c in clients.values():
        c.close()
    for name, r in results.items():
        # batches agree within about half a percent: their mean
        r["per_request"] = round(sum(r["batches"]) / len(r["batches"]))
        r["spread"] = (max(r["batches"]) - min(r["batches"])) / max(r["per_request"], 1)
    for name, r in results.items():
        base = VARIANTS[name].baseline or name
        if base in results:
            r["added"] = r["per_request"] - results[base]["per_request"]
            r["x_bare"] = results[base]["per_request"] / r["per_request"]
    return {"idle_per_s": round(max(idle_rates)), "requests": REQUESTS, "batches": BATCHES, "variants": results}
