"""The wrk phase: every variant warmed up, then measured in interleaved rounds
(A B C … A B C …), each round a load run and a latency run per variant;
medians over the quietest rounds, paired per round with the baseline. Also
`perf`: the gateway's CPU per request split by object.

Functions take the run (`bench`, a bench/run.py Bench): its args, stack,
wrk, and the fresh-agent bookkeeping (`ids_used`, `last_rps`)."""

import re
import shutil
import signal
import subprocess
import time

from bench.measure import TICKS, CpuWindow, counter_delta, filter_counters, log, median
from bench.workload import CHAT_PATH, EXPECTED_TIER, VARIANTS, selected_variants
from stack.process import die_with_parent

PERF_VARIANTS = ("bare-1k", "wasm-noop-1k", "wasm-floor-1k", "wasm-pass-1k", "l1-none-1k", "l1-1k", "l1-64k")
IBEX_LISTENERS = ("ibex", "ibex_key", "ibex_webdis", "ibex_noaudit", "ibex_auditfields")  # the listeners with our filter (its counters are read)
# Key lookups of an L1 hit: every request counted by key_l1_hit, and none of these
# (a key answered by Redis or the store, missed, unknown, refused).
KEY_NOT_L1 = ("key_l1_miss", "key_l2_hit", "key_l2_miss", "key_l3_hit", "key_l3_none", "rejected.invalid_api_key")
# Directive side of an L1 hit with injection: none of these may count either.
DIRECTIVE_NOT_L1 = ("l1_miss", "l2_hit", "l2_miss", "l2_error", "l3_hit", "l3_none", "l3_error", "stale_served",
                    "failed_open")


def fresh_range(bench, variant, population, kind, duration):
    """(first agent id, 1) of a run that asks a new agent every request; refuses
    a run that may need more agents than were populated."""
    a = bench.args
    base = bench.ids_used[population]
    limit = a.l2_agents if population == "l2" else a.l3_agents
    guess = {"l2": 20000, "l3": 10000}[population] if kind == "load" else 5000
    need = int(bench.last_rps.get((variant, kind), guess) * duration * 1.5)
    if base + need > limit:
        raise RuntimeError(f"{variant}: only {limit - base} fresh {population} agents left, a {duration} s "
                           f"run may need {need}; raise --{population}-agents")
    return base, 1


def run_variant(bench, variant, kind, duration, round_no):
    """One wrk run of `variant` (`kind` "load": --connections, "latency": one
    connection) with the gateway's CPU, the sink's, other work on the machine
    and, for the ibex listener, the filter counters that moved."""
    listener_name, body, mode, population, _, path, _ = VARIANTS[variant]
    stack = bench.stack
    connections = bench.args.connections if kind == "load" else 1
    if mode == "fresh":
        base, count = fresh_range(bench, variant, population, kind, duration)
    else:
        base, count = 0, 10000 if mode == "cycle" else 1
    before = filter_counters(stack) if listener_name in IBEX_LISTENERS else None
    with CpuWindow(stack.envoy.pid, stack.sink.pid) as cpu:
        w = bench.wrk.run(stack.url_of(listener_name), body, mode, population, base, count, connections,
                          duration, path=path, key_file=bench.api_key_file if mode == "key" else None)
    if mode == "fresh":
        # ids of requests still in flight at the end were used too
        bench.ids_used[population] = base + w["requests"] + connections + 16
    requests = max(1, w["requests"])
    rps = w["requests"] / (w["duration_us"] / 1e6)
    bench.last_rps[(variant, kind)] = rps
    errors = {k: v for k, v in w["errors"].items() if v}
    run = {
        "variant": variant, "kind": kind, "round": round_no, "connections": connections,
        "duration_s": round(w["duration_us"] / 1e6, 3), "requests": w["requests"], "rps": round(rps, 1),
        "latency_us": w["latency_us"], "errors": errors,
        "envoy_cpu_us_per_request": round(cpu.ns["gateway"] / 1e3 / requests, 2),
        "envoy_cpu_ticks_us_per_request": round(cpu.ticks["gateway"] * 1e6 / TICKS / requests, 2),
        "envoy_cpu_utilisation": round(cpu.ns["gateway"] / 1e9 / cpu.wall, 3),
        # CPUs' worth of work by other processes on the machine during the run
        "foreign_cpus": round(cpu.foreign_cpus, 2),
        "sink_cpu_us_per_request": round(cpu.ns["sink"] / 1e3 / requests, 2),
    }
    if before is not None:
        delta = counter_delta(before, filter_counters(stack))
        run["counters"] = delta
        if path == CHAT_PATH:
            run["tier_share"] = round(delta.get(EXPECTED_TIER[population], 0) / requests, 4)
        if mode == "key":
            run["key_tier_share"] = round(delta.get("key_l1_hit", 0) / requests, 4)
            if round_no > 0:  # a measured run (warm-up is round 0 and may fill)
                check_key_l1(variant, kind, run)
    if errors:
        log(f"  {variant}/{kind}: wrk errors {errors}")
    return run


def key_l1_failures(run):
    """Why a run of an API key variant was not an L1 hit for both the key and the
    directive, with injection, for every request ([] when it was)."""
    delta, requests = run["counters"], run["requests"]
    out = [f"{name} {delta[name]}" for name in KEY_NOT_L1 + DIRECTIVE_NOT_L1 if delta.get(name, 0)]
    # the counters also count requests still in flight when wrk stopped: at least, not exactly
    for name in ("key_l1_hit", "l1_hit", "injected"):
        if delta.get(name, 0) < requests:
            out.append(f"{name} {delta.get(name, 0)} < {requests} requests")
    if run["errors"]:
        out.append(f"wrk errors {run['errors']}")
    return out


def check_key_l1(variant, kind, run):
    """Fail loudly when a measured run of an API key variant was not what it claims."""
    failures = key_l1_failures(run)
    if failures:
        raise RuntimeError(f"{variant}/{kind} round {run['round']}: not an L1 hit of the key and the directive "
                           f"with injection for every request: {', '.join(failures)} (counters {run['counters']})")


def warm(bench, variant):
    """Warm-up: the caches (`warm_caches`), then more short load runs until two in a row
    cost the gateway the same CPU per request within 5 % (at most 4 more): V8 compiles
    a module's functions lazily and tiers hot ones up in the background, so a floor
    measured before that settles reads higher than it is."""
    run = warm_caches(bench, variant)
    if VARIANTS[variant].mode == "fresh":
        return  # L2 and L3 are no floors, and each run spends agents that only one may use
    previous = run["envoy_cpu_us_per_request"]
    for _ in range(4):
        run = run_variant(bench, variant, "load", bench.args.warm, 0)
        cpu = run["envoy_cpu_us_per_request"]
        if previous and abs(cpu - previous) <= 0.05 * previous:
            return
        previous = cpu
    log(f"  {variant}: CPU per request still moving after the warm-up ({previous:.1f} → {cpu:.1f} µs)")


def warm_caches(bench, variant):
    """A short load run; the L1 variants repeat until a run has no L1 miss (and,
    cycling over many agents, went through all of them). Returns the last run."""
    v = VARIANTS[variant]
    # a wrk run starts its cycle at the first agent: it must last long enough to reach the last
    duration = max(bench.args.warm, 4) if v.mode == "cycle" else bench.args.warm
    for _ in range(10):
        run = run_variant(bench, variant, "load", duration, 0)
        if v.listener not in IBEX_LISTENERS or v.mode == "fresh" or v.path != CHAT_PATH:
            return run
        if v.mode == "key":  # the key's entry and the directive both in L1
            if not key_l1_failures(run):
                return run
            continue
        if run["counters"].get("l1_miss", 0) == 0 and (v.mode != "cycle" or run["requests"] >= 10000):
            return run
    raise RuntimeError(f"{variant}: L1 still misses after warm-up"
                       + (f" ({', '.join(key_l1_failures(run))})" if v.mode == "key" else ""))


def log_run(run):
    log(f"round {run['round']} {run['variant']:18} {run['kind']:7} {run['rps']:9.0f} rps  p50 "
        f"{run['latency_us']['p50']:6} µs  p99 {run['latency_us']['p99']:6} µs  "
        f"cpu {run['envoy_cpu_us_per_request']:7.1f} µs/req  util {run['envoy_cpu_utilisation']:.2f}  "
        f"foreign {run['foreign_cpus']:.2f}"
        + (f"  tier {run['tier_share']}" if "tier_share" in run else "")
        + (f"  key tier {run['key_tier_share']}" if "key_tier_share" in run else ""))


def variants(bench):
    """Warm every selected variant, run rounds until enough were quiet, aggregate.
    Sets bench.order; fills bench.results["runs"], ["rounds"] and ["variants"]."""
    a = bench.args
    order = selected_variants(a.only, a.probes)
    bench.order = order
    for variant in order:
        log(f"warm-up {variant}")
        warm(bench, variant)
    runs = bench.results["runs"]
    noise = {}  # round → median CPUs' worth of other work during its runs
    round_no = 0
    while True:
        quiet = [n for n, f in noise.items() if f <= a.quiet]
        if len(noise) >= a.rounds and (len(quiet) >= a.rounds or len(noise) >= a.rounds + a.extra_rounds):
            break
        round_no += 1
        for variant in order:
            for kind, duration in (("load", a.duration), ("latency", a.latency_duration)):
                runs.append(run_variant(bench, variant, kind, duration, round_no))
                log_run(runs[-1])
        noise[round_no] = median([r["foreign_cpus"] for r in runs if r["round"] == round_no])
        log(f"round {round_no}: median other work {noise[round_no]:.2f} CPUs")
    # every variant is compared within the same rounds: the `rounds` quietest ones
    used = sorted(sorted(noise, key=lambda n: (noise[n], n))[:a.rounds])
    bench.results["rounds"] = {"run": len(noise), "used": used,
                               "noise_cpus": {str(n): round(f, 2) for n, f in noise.items()}}
    bench.results["variants"] = aggregate(runs, order, used)


def paired(mine, base, field):
    """{round: mine - base} of `field(run)` over the rounds both have a run in."""
    by_round = {r["round"]: field(r) for r in base}
    return [field(r) - by_round[r["round"]] for r in mine if r["round"] in by_round]


def aggregate(all_runs, order, used_rounds):
    """{variant: medians over `used_rounds`, ratios and differences paired per round with its baseline}."""
    runs = [r for r in all_runs if r["round"] in used_rounds]

    def pick(variant, kind):
        return [r for r in runs if r["variant"] == variant and r["kind"] == kind]

    out = {}
    for variant in order:
        spec = VARIANTS[variant]
        base = spec.baseline or variant
        load, lat = pick(variant, "load"), pick(variant, "latency")
        base_load, base_lat = pick(base, "load"), pick(base, "latency")
        v = {
            "what": spec.what, "listener": spec.listener, "path": spec.path, "body": spec.body,
            "agents": spec.mode, "baseline": base,
            "rps": round(median([r["rps"] for r in load]), 1),
            "p50_us": median([r["latency_us"]["p50"] for r in lat]),
            "p99_us": median([r["latency_us"]["p99"] for r in lat]),
            "loaded_p50_us": median([r["latency_us"]["p50"] for r in load]),
            "loaded_p99_us": median([r["latency_us"]["p99"] for r in load]),
            "cpu_us_per_request": median([r["envoy_cpu_us_per_request"] for r in load]),
            "envoy_cpu_utilisation": median([r["envoy_cpu_utilisation"] for r in load]),
            "foreign_cpus": median([r["foreign_cpus"] for r in load + lat]),
            "sink_cpu_us_per_request": median([r["sink_cpu_us_per_request"] for r in load]),
            "rounds": len(load),
            "errors": sum(sum(r["errors"].values()) for r in load + lat),
        }
        shares = [r["tier_share"] for r in load + lat if "tier_share" in r]
        if shares:
            v["tier_share_min"] = min(shares)
        key_shares = [r["key_tier_share"] for r in load + lat if "key_tier_share" in r]
        if key_shares:  # API key variants: share of requests whose key was an L1 hit
            v["key_tier_share_min"] = min(key_shares)
        rps = {r["round"]: r["rps"] for r in base_load}
        ratios = [r["rps"] / rps[r["round"]] for r in load if r["round"] in rps]
        dcpu = paired(load, base_load, lambda r: r["envoy_cpu_us_per_request"])

        def latency(runs_, baseline, q):
            return median(paired(runs_, baseline, lambda r: r["latency_us"][q]))

        v.update({
            "throughput_ratio": round(median(ratios), 3) if ratios else None,
            "added_p50_us": latency(lat, base_lat, "p50"), "added_p99_us": latency(lat, base_lat, "p99"),
            "loaded_added_p50_us": latency(load, base_load, "p50"),
            "loaded_added_p99_us": latency(load, base_load, "p99"),
            "added_cpu_us_per_request": round(median(dcpu), 2) if dcpu else None,
            # per round, to see how steady a variant (the floors above all) was in this run
            "added_cpu_by_round": [round(x, 2) for x in dcpu],
        })
        base_cpu = median([r["envoy_cpu_us_per_request"] for r in base_load])
        # what the throughput ratio would be where the gateway's CPU is the only bottleneck
        v["cpu_capacity_ratio"] = round(base_cpu / v["cpu_us_per_request"], 3) if base_cpu else None
        out[variant] = v
    return out


# --------------------------------------------------------------------------- perf

def perf_shares(data):
    """{object: share of samples} of a perf.data file, by DSO (JIT code named `[JIT] wasm`)."""
    report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "dso", "-q"],
                            capture_output=True, text=True, timeout=120).stdout
    shares = {}
    for line in report.splitlines():
        m = re.match(r"^\s*([\d.]+)%\s+(.+?)\s*$", line)
        if m:
            name = re.sub(r"^\[JIT\] tid \d+$", "[JIT] wasm", m.group(2))
            shares[name] = shares.get(name, 0) + float(m.group(1)) / 100
    return shares


def perf(bench):
    """`perf record -e cpu-clock` on the gateway Envoy during one load run of some
    variants; CPU per request split by object (Envoy binary, wasm code JIT-compiled
    by V8 in anonymous memory, kernel, libc). Sets bench.results["perf"]."""
    if shutil.which("perf") is None:
        bench.notes.append("perf missing: no Envoy CPU profile")
        return
    out = {}
    pid = bench.stack.envoy.pid
    for variant in (v for v in PERF_VARIANTS if v in bench.order):
        data = bench.dir / f"perf.{variant}.data"
        rec = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4999", "-p", str(pid),
                                "-o", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=die_with_parent)
        time.sleep(0.3)  # perf attaches; a run that starts earlier only loses samples
        run = run_variant(bench, variant, "load", bench.args.duration, 0)
        rec.send_signal(signal.SIGINT)
        try:
            _, err = rec.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            rec.kill()
            raise
        if rec.returncode not in (0, -signal.SIGINT, 130) or not data.exists():
            bench.notes.append(f"perf record failed on the gateway: {err.decode()[-300:]}")
            return
        cpu = run["envoy_cpu_us_per_request"]
        out[variant] = {"cpu_us_per_request": cpu, "rps": run["rps"],
                        "by_object_us": {k: round(v * cpu, 1) for k, v in
                                         sorted(perf_shares(data).items(), key=lambda kv: -kv[1]) if v >= 0.005}}
        data.unlink(missing_ok=True)
    bench.results["perf"] = out
