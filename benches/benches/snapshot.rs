//! Configuration cost: decoding an xDS file and building the routing snapshot for 1k
//! and 10k services (one filter chain and one STATIC cluster each, Kuma's shape).

use benches::targets::Routes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use proxy::resources::Resources;
use proxy::snapshot::DnsAnswers;
use proxy::stats::Registry;

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(10);
    for n in [1_000usize, 10_000] {
        let routes = Routes::services(n, "127.0.0.1:18080".parse().expect("address"));
        let bytes = serde_json::to_vec(&routes.dp_file()).expect("json");
        g.bench_with_input(BenchmarkId::new("decode_file", n), &n, |b, _| {
            b.iter(|| Resources::from_file_bytes(&bytes, "v").expect("valid file"))
        });
        let resources = Resources::from_file_bytes(&bytes, "v").expect("valid file");
        g.bench_with_input(BenchmarkId::new("build", n), &n, |b, _| {
            b.iter(|| {
                let mut notes = vec![];
                proxy::snapshot::build(&resources, &DnsAnswers::new(), &Registry::default(), &mut notes)
                    .expect("valid snapshot")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, build);
criterion_main!(benches);
