//! Filter chain selection at 10 / 1k / 100k server names: hit and miss, exact and
//! wildcard. Design goal: O(1) in the number of names.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use proxy::snapshot::chains::{ChainMatcher, Criteria, Offer};
use std::hint::black_box;

fn matcher(n: usize, wildcard: bool) -> ChainMatcher {
    let mut m = ChainMatcher::default();
    for i in 0..n {
        let name = if wildcard { format!("*.s{i}.wild.bench") } else { format!("n{i}.svc.bench") };
        let c = Criteria { server_names: vec![name], transport_protocol: Some("tls".into()), ..Default::default() };
        m.insert(&c, i).expect("distinct criteria");
    }
    m
}

fn offer(sni: &str) -> Offer<'_> {
    Offer {
        port: 10001,
        server_name: Some(sni),
        transport_protocol: "tls",
        alpn: &[],
        source: ([10, 0, 0, 1], 40000).into(),
        destination: [10, 0, 0, 2].into(),
    }
}

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    for n in [10usize, 1_000, 100_000] {
        let exact = matcher(n, false);
        let wild = matcher(n, true);
        // Names spread over the table, so that large tables do not stay in cache.
        let hits: Vec<String> = (0..64).map(|k| format!("n{}.svc.bench", (k * 7919) % n)).collect();
        let wild_hits: Vec<String> = (0..64).map(|k| format!("api.v1.s{}.wild.bench", (k * 7919) % n)).collect();
        let mut k = 0usize;
        g.bench_with_input(BenchmarkId::new("exact_hit", n), &n, |b, _| {
            b.iter(|| {
                k = (k + 1) % hits.len();
                exact.find(black_box(&offer(&hits[k])))
            })
        });
        g.bench_with_input(BenchmarkId::new("exact_miss", n), &n, |b, _| {
            b.iter(|| exact.find(black_box(&offer("nothing.here.svc.bench"))))
        });
        g.bench_with_input(BenchmarkId::new("wildcard_hit", n), &n, |b, _| {
            b.iter(|| {
                k = (k + 1) % wild_hits.len();
                wild.find(black_box(&offer(&wild_hits[k])))
            })
        });
        g.bench_with_input(BenchmarkId::new("wildcard_miss", n), &n, |b, _| {
            b.iter(|| wild.find(black_box(&offer("api.v1.nothing.wild.bench"))))
        });
        assert!(exact.find(&offer(&hits[1])).is_some() && wild.find(&offer(&wild_hits[1])).is_some());
        assert!(exact.find(&offer("x.y")).is_none() && wild.find(&offer("api.v1.nothing.wild.bench")).is_none());
    }
    g.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
