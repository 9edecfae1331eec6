//! `.mesh` DNS: building the name table (per config version) and answering one A query
//! (per packet, the part of dp's DNS path that does not touch the socket), at 10 / 1k /
//! 100k Kuma-style names. Design goal: answer time independent of the table size.

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use dns::{Reply, Table, Transport};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

/// `svc-<i>_ns-<i % 50>_svc_80.mesh` -> 240.0.0.0/4 VIP, as benches/dns_bench.py serves.
fn records(n: usize) -> Vec<(String, Vec<IpAddr>)> {
    (0..n)
        .map(|i| {
            let vip = Ipv4Addr::from(0xF000_0001 + i as u32);
            (format!("svc-{i}_ns-{}_svc_80.mesh", i % 50), vec![IpAddr::V4(vip)])
        })
        .collect()
}

fn table(records: Vec<(String, Vec<IpAddr>)>) -> Table {
    Table::new(&["mesh".to_string()], records, Duration::from_secs(30))
}

/// A recursion-desired A query for `name`, without EDNS (what dnsperf sends by default).
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn answers(reply: &Reply) -> Option<(u8, u16)> {
    match reply {
        Reply::Local(r) => Some((r[3] & 0x0f, u16::from_be_bytes([r[6], r[7]]))),
        _ => None,
    }
}

fn build(c: &mut Criterion) {
    let mut g = c.benchmark_group("dns_table_new");
    g.sample_size(10); // 100k names take tens of ms per build
    for n in [10usize, 1_000, 100_000] {
        let recs = records(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_batched(|| recs.clone(), |r| table(black_box(r)), BatchSize::LargeInput)
        });
    }
    g.finish();
}

fn answer(c: &mut Criterion) {
    let mut g = c.benchmark_group("dns_answer");
    for n in [10usize, 1_000, 100_000] {
        let t = table(records(n));
        // Names spread over the table, so that large tables do not stay in cache.
        let hits: Vec<Vec<u8>> = (0..64)
            .map(|k| (k * 7919) % n)
            .map(|i| query(i as u16, &format!("svc-{i}_ns-{}_svc_80.mesh", i % 50)))
            .collect();
        let miss = query(7, "nobody_ns-1_svc_80.mesh");
        assert_eq!(answers(&dns::answer(&t, &hits[1], Transport::Udp)), Some((0, 1)), "hit: NOERROR, one A");
        assert_eq!(answers(&dns::answer(&t, &miss, Transport::Udp)), Some((3, 0)), "miss: NXDOMAIN");
        let mut k = 0usize;
        g.bench_with_input(BenchmarkId::new("hit", n), &n, |b, _| {
            b.iter(|| {
                k = (k + 1) % hits.len();
                dns::answer(&t, black_box(&hits[k]), Transport::Udp)
            })
        });
        g.bench_with_input(BenchmarkId::new("miss", n), &n, |b, _| {
            b.iter(|| dns::answer(&t, black_box(&miss), Transport::Udp))
        });
    }
    g.finish();
}

criterion_group!(benches, build, answer);
criterion_main!(benches);
