"""What runs natively, outside the stack: the criterion micro-benchmarks of the
filter's pure core (bench/micro), the no-op wasm filter's build, and the
callgrind profile of the splice."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from bench.measure import run_checked

BENCH = Path(__file__).resolve().parent
MICRO = BENCH / "micro"
NOOP = BENCH / "noop-wasm"
NOOP_WASM = NOOP / "target" / "wasm32-wasip1" / "release" / "bench_noop_wasm.wasm"
FLOOR = BENCH / "floor-wasm"
FLOOR_WASM = FLOOR / "target" / "wasm32-wasip1" / "release" / "bench_floor_wasm.wasm"
PROBE = BENCH / "probe-wasm"
PROBE_WASM = PROBE / "target" / "wasm32-wasip1" / "release" / "bench_probe_wasm.wasm"
SIZES = {"1KB": 1024, "64KB": 65536}


def build_noop():
    """bench/noop-wasm, the proxy-wasm filter that does nothing (bench_noop listener)."""
    run_checked(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1", "--manifest-path",
                 str(NOOP / "Cargo.toml")], "building bench/noop-wasm")
    return NOOP_WASM


def build_floor():
    """bench/floor-wasm, the filter without the SDK that does nothing (bench_floor listener)."""
    run_checked(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1", "--manifest-path",
                 str(FLOOR / "Cargo.toml")], "building bench/floor-wasm")
    return FLOOR_WASM


def build_probe():
    """bench/probe-wasm, the host-call probe (probe_* listeners)."""
    run_checked(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1", "--manifest-path",
                 str(PROBE / "Cargo.toml")], "building bench/probe-wasm")
    return PROBE_WASM


def micro(log_dir):
    """`cargo bench` of bench/micro; {benchmark id: median and CI in ns, MB/s for sized ones}."""
    argv = ["cargo", "bench", "--quiet", "--manifest-path", str(MICRO / "Cargo.toml"), "--bench", "core"]
    result = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ), timeout=900)
    (log_dir / "micro.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"cargo bench failed: {result.stderr[-2000:]}")
    out = {}
    root = MICRO / "target" / "criterion"
    for est in sorted(root.glob("**/new/estimates.json")):
        bench_id = str(est.parent.parent.relative_to(root))
        data = json.loads(est.read_text())["median"]
        out[bench_id] = {"median_ns": round(data["point_estimate"], 1),
                         "ci_low_ns": round(data["confidence_interval"]["lower_bound"], 1),
                         "ci_high_ns": round(data["confidence_interval"]["upper_bound"], 1)}
        size = SIZES.get(est.parent.parent.name)
        if size:
            out[bench_id]["mb_per_s"] = round(size / data["point_estimate"] * 1e9 / 1e6, 1)
    return out


def profile(log_dir, notes):
    """Callgrind of the splice per format and size (only the splice loop is
    collected): instructions per splice and per byte, top functions. None, with
    a note, when valgrind is missing."""
    if shutil.which("valgrind") is None:
        notes.append("valgrind missing: no callgrind profile")
        return None
    run_checked(["cargo", "build", "--quiet", "--profile", "bench", "--manifest-path", str(MICRO / "Cargo.toml"),
                 "--bin", "profile"], "building the profile driver", timeout=600)
    exe = MICRO / "target" / "release" / "profile"
    out = {}
    for fmt in ("openai_chat", "openai_responses", "anthropic_messages"):
        for size in SIZES:
            iters = 200 if size == "64KB" else 5000
            cg = log_dir / f"callgrind.{fmt}.{size}.out"
            run_checked(["valgrind", "--tool=callgrind", f"--callgrind-out-file={cg}",
                         "--toggle-collect=ibex_directive_micro::run_splices*", str(exe), fmt, size, str(iters)],
                        "callgrind", timeout=600)
            report = subprocess.run(["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100",
                                     str(cg)], capture_output=True, text=True, timeout=120).stdout
            total, functions = parse_callgrind(report)
            out[f"{fmt}/{size}"] = {
                "instructions_per_splice": round(total / iters),
                "instructions_per_byte": round(total / iters / SIZES[size], 2),
                "top_functions": [{"function": f, "share": round(ir / total, 3)} for f, ir in functions[:6]],
            }
    return out


def parse_callgrind(report):
    """(total Ir, [(function, Ir)]) from callgrind_annotate's output."""
    total = 0
    functions = {}
    for line in report.splitlines():
        m = re.match(r"^\s*([\d,]+)\s+(?:\([\s\d.%]+\)\s+)?PROGRAM TOTALS", line)
        if m:
            total = int(m.group(1).replace(",", ""))
            continue
        # "Ir (share)  file:function [object]"; code inlined from other files is listed
        # under its file with the function it was inlined into: sum per function
        m = re.match(r"^\s*([\d,]+)\s+(?:\([\s\d.%]+\)\s+)?(\S.*?):(\S.*)$", line)
        if m and total:
            name = re.sub(r"\s*\[.*\]$", "", m.group(3).strip())
            functions[name] = functions.get(name, 0) + int(m.group(1).replace(",", ""))
    return total, sorted(functions.items(), key=lambda item: -item[1])
