//! Criterion benchmarks of the filter's hot path, natively:
//! `inject::splice` per format and body size, and the L1 entry encode/decode.
//!
//! Measurement time is short on purpose (`make bench` must fit in 15 minutes on two
//! cores); the numbers are stable to a few percent on an idle machine.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ibex_directive::entry::{Entry, Kind};
use ibex_directive::inject::splice;
use ibex_directive_micro::{body, ESCAPED_DIRECTIVE, FORMATS, OPTIONS, SIZES};

fn bench_splice(c: &mut Criterion) {
    let mut group = c.benchmark_group("splice");
    for &(name, format) in FORMATS {
        for &(size_name, size) in SIZES {
            let b = body(format, size);
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_with_input(BenchmarkId::new(name, size_name), &b, |bench, b| {
                bench.iter(|| {
                    splice(
                        format,
                        std::hint::black_box(b),
                        &OPTIONS,
                        std::hint::black_box(ESCAPED_DIRECTIVE),
                    )
                })
            });
        }
    }
    group.finish();
}

fn bench_entry(c: &mut Criterion) {
    let entry = Entry {
        kind: Kind::Present,
        fresh_until_ms: 1_900_000_000_000,
        generation: 7,
        escaped: ibex_wire::Redacted::new(ESCAPED_DIRECTIVE),
        // A store answer's version, as every entry filled today carries one.
        version: ibex_directive::audit::Version::parse_canonical(
            "0b6c7a4e-1f2d-4c3b-8a9e-5d6f7a8b9c0d",
        )
        .unwrap_or_default(),
    };
    let raw = entry.encode();
    let mut group = c.benchmark_group("entry");
    group.bench_function("encode", |b| {
        b.iter(|| std::hint::black_box(&entry).encode())
    });
    group.bench_function("decode", |b| {
        b.iter(|| Entry::decode(std::hint::black_box(&raw)))
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1200))
        .sample_size(20)
        .without_plots()
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_splice, bench_entry
}
criterion_main!(benches);
