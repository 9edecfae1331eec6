//! Copy strategies of an in-process loopback proxy: tokio's copy_bidirectional, dp's
//! copy, and splice(2). 64 MiB through the proxy per iteration, 1 and 16 connections.

use benches::copyproxy::{Strategy, measure};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::time::Duration;

const BYTES: u64 = 64 << 20;

fn copies(c: &mut Criterion) {
    let mut g = c.benchmark_group("copy");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(BYTES));
    for conns in [1usize, 16] {
        for s in Strategy::ALL {
            g.bench_with_input(BenchmarkId::new(s.name(), conns), &conns, |b, &conns| {
                b.iter(|| {
                    let r = measure(s, conns, BYTES / conns as u64, Duration::from_secs(30), None).expect("copy");
                    assert_eq!(r.bytes, BYTES, "every byte arrives");
                    r
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, copies);
criterion_main!(benches);
