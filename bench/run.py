"""`make bench`: SPEC §8 measured side by side, in one run, as ratios.

    .venv/bin/python bench/run.py            # full run (what `make bench` does)
    .venv/bin/python bench/run.py --quick    # short runs and small populations: checks the harness

Phases (bench/README.md explains the method; each lives in its own module):
  micro        criterion benchmarks of the filter's pure core (bench/micro), natively   native.py
  stack        own stack under .bench/<run>/ on free loopback ports: Postgres, Redis,   benchstack.py
               the REST front (and Webdis, for l2-webdis-1k), store, echo upstream,
               subscriber, the gateway Envoy with one listener per variant, and a
               sink Envoy as the fast upstream
  populate     agents in Redis (redis-cli --pipe) and in Postgres (one SQL batch)       phases.py
  sanity       every listener forwards what it should                                   phases.py
  variants     wrk, interleaved rounds (A B C … A B C …), each variant a load run       variants.py
               (fixed concurrency: throughput, CPU) and a latency run (one connection)
  perf         the gateway's CPU per request by object                                  variants.py
  stampede     500 concurrent requests for one cold agent → store calls                 phases.py
  invalidation PUBLISH → first response with the new text, ≥ 200 updates                phases.py
  fleet        a fleet of its own (3 Envoys, a subscriber each, one Redis, store and      phases.py
               Postgres): PUBLISH → the new text on every Envoy, ≥ 200 updates
  memory       Envoy heap before/after caching many agents in L1                        phases.py
  profile      callgrind of the splice (instructions per function)                      native.py

Writes bench/results/latest.md and latest.json (and prints the markdown; report.py).
Every process is stopped at the end, also on errors and Ctrl-C.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import instructions, native, phases, variants  # noqa: E402
from bench.benchstack import BenchStack  # noqa: E402
from bench.measure import Wrk, log, machine_note, our_processes  # noqa: E402
from bench.report import fleet_section, instructions_section, render_markdown, report_data  # noqa: E402
from bench.workload import ESCAPED, VARIANTS, probe_listeners, selected_variants, write_bodies  # noqa: E402

LUA_FILTER = BENCH / "envoy" / "lua_static.lua"
RESULTS = BENCH / "results"
RUNS_KEPT = 3  # .bench/run-*: the logs of the last runs


class Bench:
    """One run of the benchmarks: its directory, CPU pinning, stack, results and
    the bookkeeping the phases share (fresh agent ids used, last rates)."""

    def __init__(self, args):
        self.args = args
        self.t_start = time.monotonic()
        self.phases = {}
        self.notes = []
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.dir = (REPO / ".bench" / f"run-{stamp}").resolve()
        self.results = {"variants": {}, "runs": []}
        self.ids_used = {"l2": 0, "l3": 0, "mem": 0, "stampede": 0}
        self.last_rps = {}
        self.order = []
        self.stack = None
        self.wrk = None
        self.bodies = None
        # a selected variant sends an API key: the api_key listener and the key (phases.populate)
        selected = selected_variants(args.only, args.probes)
        self.uses_api_key = any(VARIANTS[v].mode == "key" for v in selected)
        # a selected variant goes through Webdis: Webdis beside the REST front, and its listener
        self.uses_webdis = any(VARIANTS[v].listener == "ibex_webdis" for v in selected)
        # the host-call probes selected: {listener: probe configuration}
        self.probes = probe_listeners(selected)
        self.api_key_file = None

    def phase(self, name, fn, key=None):
        """Run one phase, timed; its return value goes to results[key] when given."""
        log(f"phase {name} …")
        t0 = time.monotonic()
        try:
            value = fn()
            if key is not None and value is not None:
                self.results[key] = value
            return value
        finally:
            self.phases[name] = round(time.monotonic() - t0, 1)
            log(f"phase {name} done in {self.phases[name]} s")

    def main(self):
        a = self.args
        for old in sorted((REPO / ".bench").glob("run-*"))[:1 - RUNS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.setup_cpus()
        self.machine = machine_note()
        self.machine["loadavg_start"] = os.getloadavg()
        if a.only_fleet:
            return self.fleet_only()
        if not a.skip_micro:
            self.phase("micro", lambda: native.micro(self.dir), "micro")
        self.bodies = write_bodies(self.dir / "bodies")
        noop_wasm = self.phase("build-noop", lambda: (native.build_noop(), native.build_floor()))
        probe_wasm = self.phase("build-probe", native.build_probe) if self.probes else None
        if a.instructions:
            return self.instructions_only(noop_wasm, probe_wasm)
        self.stack = self.make_stack(noop_wasm, probe_wasm)
        try:
            self.phase("stack", self.stack.start)
            self.wrk = Wrk(self.bodies)
            self.phase("populate", lambda: phases.populate(self), "populated")
            self.phase("sanity", lambda: phases.sanity(self))
            self.phase("variants", lambda: variants.variants(self))
            if not a.skip_perf:
                self.phase("perf", lambda: variants.perf(self))
            if not a.variants_only:
                self.unpin()
                self.phase("stampede", lambda: phases.stampede(self), "stampede")
                self.phase("invalidation", lambda: phases.invalidation(self), "invalidation")
                if not a.skip_fleet:
                    self.phase("fleet", lambda: phases.fleet(self), "fleet")
                self.phase("memory", lambda: phases.memory(self), "memory")
        finally:
            self.machine["loadavg_end"] = os.getloadavg()
            log("stopping the stack")
            self.stack.stop()
            # the Postgres cluster is hundreds of MB; keep only logs
            shutil.rmtree(self.dir / "stack" / "postgres" / "data", ignore_errors=True)
        if not a.skip_profile:
            self.phase("profile", lambda: native.profile(self.dir, self.notes), "profile")
        self.write_report()

    def instructions_only(self, noop_wasm, probe_wasm):
        """--instructions: the gateway under callgrind, instructions per request of every
        variant that sends one request again and again (bench/instructions.py), a few
        listeners per stack (valgrind's address space holds a handful of wasm VMs), bare
        in each; prints its section and writes instructions.json under --out."""
        if not instructions.available():
            sys.exit("--instructions needs valgrind (apt-get install valgrind; make bench runs without it)")
        selected = [v for v in selected_variants(self.args.only, self.args.probes) if v in instructions.COUNTED]
        merged = None
        for n, group in enumerate(instructions.groups(selected)):
            self.order = group
            out = self.dir / f"callgrind-{n}"
            out.mkdir()
            listeners = {VARIANTS[v].listener for v in group}
            self.stack = self.make_stack(noop_wasm, probe_wasm, under=instructions.valgrind_argv(out),
                                         listeners=listeners)
            try:
                self.phase(f"stack-{n}", self.stack.start)
                instructions.check_vms(self.stack)
                self.phase(f"populate-{n}", lambda: phases.populate(self), "populated")
                self.phase(f"sanity-{n}", lambda: phases.sanity(self))
                result = self.phase(f"instructions-{n}", lambda: instructions.count(self, out))
            finally:
                log("stopping the stack")
                self.stack.stop()
                shutil.rmtree(self.dir / "stack" / "postgres" / "data", ignore_errors=True)
                # the next group's stack starts in `stack/` again; this one's logs stay
                (self.dir / "stack").rename(self.dir / f"stack-{n}")
            merged = instructions.merge(merged, result)
        out_dir = Path(self.args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(merged, indent=2) + "\n"
        (out_dir / "instructions.json").write_text(text)
        print("\n".join(instructions_section(merged)))

    def fleet_only(self):
        """--only-fleet: the fleet phase alone (its own fleet, unpinned); prints its section
        and its JSON, writes no latest.md/json (a full run's report needs every phase)."""
        self.unpin()
        result = self.phase("fleet", lambda: phases.fleet(self), "fleet")
        (self.dir / "fleet.json").write_text(json.dumps(result, indent=2) + "\n")
        print("\n".join(fleet_section(result, {})))
        print(json.dumps(result, indent=2))

    def make_stack(self, noop_wasm, probe_wasm, under=None, listeners=None):
        """The benchmarks' stack (not started): the committed filter configuration's
        timeouts, plus the ibex listener's overrides."""
        escaped = ESCAPED.replace("\\", "\\\\").replace("'", "\\'")
        overrides = {"cache": {"ttl_seconds": 3600}, "debug_headers": False}
        if under:
            # under valgrind a fill's callouts take a hundred times longer than the defaults allow
            overrides.update(redis={"timeout_ms": 30000}, store={"timeout_ms": 30000})
        return BenchStack(
            self.dir / "stack", lua_code=LUA_FILTER.read_text().replace("@MESSAGE@", escaped),
            ibex_overrides=overrides, noop_wasm=noop_wasm[0],
            floor_wasm=noop_wasm[1],
            probe_wasm=probe_wasm, probes=self.probes, gateway_under=under, listeners=listeners,
            gateway_cpus=self.gateway_cpus, concurrency=self.args.workers, api_key=self.uses_api_key,
            webdis=self.uses_webdis, log_levels={"envoy": "warning", "companion": "warn", "webdis": 0})

    def setup_cpus(self):
        """Gateway Envoy on its own CPU; this harness and all its other children (wrk,
        sink, backends) on the rest. With one CPU nothing is pinned."""
        cpus = sorted(os.sched_getaffinity(0))
        self.all_cpus = cpus
        if self.args.no_pin or len(cpus) < 2:
            self.gateway_cpus = None
            self.pinning = "none"
            return
        gateway, rest = cpus[-1:], cpus[:-1]
        os.sched_setaffinity(0, set(rest))
        self.gateway_cpus = ",".join(map(str, gateway))
        self.pinning = (f"gateway Envoy ({self.args.workers} workers) on CPU {self.gateway_cpus}; wrk, sink Envoy, "
                        f"Redis, its REST front and Webdis, store, Postgres, echo upstream, subscriber and the "
                        f"harness on CPU "
                        f"{','.join(map(str, rest))}")

    def unpin(self):
        """After the load runs: every process (the harness, its children, their threads) on
        every CPU again, so the latency-bound phases (stampede, invalidation) do not queue
        behind each other on one core."""
        if self.gateway_cpus is None:
            return
        everything = set(self.all_cpus)
        for pid in our_processes():
            for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
                try:
                    os.sched_setaffinity(int(task), everything)
                except OSError:
                    pass
        self.notes.append("stampede, invalidation and memory phases ran unpinned (no load generator then)")

    def write_report(self):
        """latest.json and latest.md under --out (and the run's directory); the markdown printed."""
        data = report_data(self)
        md = render_markdown(data)
        out_dir = Path(self.args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data, indent=2) + "\n"
        (out_dir / "latest.json").write_text(text)
        (out_dir / "latest.md").write_text(md)
        (self.dir / "latest.json").write_text(text)
        print(md)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs, small populations (harness check)")
    p.add_argument("--rounds", type=int, default=3, help="rounds the medians are taken over")
    p.add_argument("--extra-rounds", type=int, default=2,
                   help="more rounds allowed while fewer than --rounds were quiet; the quietest are used")
    p.add_argument("--quiet", type=float, default=0.3,
                   help="a round is quiet when other work used at most this many CPUs (median over its runs)")
    p.add_argument("--duration", type=int, default=5, help="seconds per load run")
    p.add_argument("--latency-duration", type=int, default=4, help="seconds per one-connection run")
    p.add_argument("--warm", type=int, default=2, help="seconds per warm-up run")
    p.add_argument("--connections", type=int, default=16, help="connections of the load runs")
    p.add_argument("--workers", type=int, default=2, help="gateway Envoy --concurrency")
    p.add_argument("--l2-agents", type=int, default=600000,
                   help="agents only Redis holds: l2-1k and l2-webdis-1k each use a new one per request")
    p.add_argument("--l3-agents", type=int, default=150000)
    p.add_argument("--mem-agents", type=int, default=100000)
    p.add_argument("--stampede", type=int, default=500)
    p.add_argument("--stampede-trials", type=int, default=3)
    p.add_argument("--updates", type=int, default=200)
    p.add_argument("--fleet-updates", type=int, default=200,
                   help="updates of the fleet phase (3 Envoys of a fleet of their own)")
    p.add_argument("--fleet-size", type=int, default=3, help="Envoys of the fleet phase's fleet")
    p.add_argument("--skip-fleet", action="store_true", help="no fleet phase")
    p.add_argument("--only-fleet", action="store_true",
                   help="only the fleet phase (its own fleet; no bench stack, variants or other phases)")
    p.add_argument("--only", nargs="*", metavar="VARIANT",
                   help="run only these variants (and their baselines): " + ", ".join(VARIANTS))
    p.add_argument("--probes", action="store_true",
                   help="also run the host-call probes (probe-*: wasm-noop plus given host calls, bench/probe-wasm)")
    p.add_argument("--instructions", action="store_true",
                   help="instead of wrk: the gateway under callgrind, user-space instructions per request of each "
                        "fixed-request variant (bench/instructions.py), written to instructions.json")
    p.add_argument("--variants-only", action="store_true",
                   help="after the variants (and perf), skip the stampede, invalidation and memory phases")
    p.add_argument("--no-pin", action="store_true", help="do not pin the gateway Envoy to its own CPU")
    p.add_argument("--skip-micro", action="store_true")
    p.add_argument("--skip-profile", action="store_true")
    p.add_argument("--skip-perf", action="store_true")
    p.add_argument("--note", help="conditions of this run, for the report")
    p.add_argument("--out", default=str(RESULTS), help="where latest.md and latest.json go")
    args = p.parse_args(argv)
    unknown = [v for v in args.only or () if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; variants are {', '.join(VARIANTS)}")
    if args.quick:
        args.rounds, args.duration, args.latency_duration, args.warm = 3, 1, 1, 1
        args.l2_agents, args.l3_agents, args.mem_agents = 60000, 30000, 5000
        args.updates, args.stampede_trials = 20, 1
        args.fleet_updates = 20
        if args.out == str(RESULTS):
            args.out = str(REPO / ".bench" / "quick")
    return args


def main(argv=None):
    args = parse_args(argv)

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    Bench(args).main()


if __name__ == "__main__":
    main()
