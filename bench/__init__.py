"""The benchmarks of `make bench` (SPEC §8): `python bench/run.py` is the entry
point; bench/README.md explains the method.

    run.py         command line, and the run itself: its directory, CPU pinning,
                   the stack, the phases in order, the outputs
    workload.py    what is sent: the directive, agent populations, variants, bodies
    measure.py     how it is measured: wrk, CPU and memory from /proc, percentiles
    variants.py    the wrk phase: warm-up, interleaved rounds, aggregation, perf
    phases.py      populate, sanity, stampede, invalidation, memory
    native.py      criterion micro-benchmarks, callgrind of the splice
    report.py      targets, the CPU ladder and the markdown of latest.md
    benchstack.py  the harness's Stack plus the sink Envoy and benchmark listeners
"""
