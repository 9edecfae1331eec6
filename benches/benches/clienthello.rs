//! ClientHello parsing: a small hello and a >1400-byte post-quantum one (real captures),
//! whole and as a prefix that needs more bytes.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

fn capture(name: &str) -> Vec<u8> {
    let path = format!("{}/../clienthello/testdata/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("clienthello_parse");
    for name in ["openssl-tls13.bin", "curl.bin", "rustls-pq.bin"] {
        let hello = capture(name);
        assert!(matches!(clienthello::parse(&hello), clienthello::Parsed::Hello(_)), "{name} must parse");
        g.throughput(Throughput::Bytes(hello.len() as u64));
        g.bench_function(format!("{name} ({} B)", hello.len()), |b| b.iter(|| clienthello::parse(black_box(&hello))));
        let half = &hello[..hello.len() / 2];
        g.bench_function(format!("{name} first half (NeedMore)"), |b| b.iter(|| clienthello::parse(black_box(half))));
    }
    g.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
