//! Route resolution cost per alert: `herald::routing::Table::resolve` with 10, 1,000 and
//! 10,000 Webhooks (each with its own NotificationCondition), in two layouts:
//!
//! - `cluster-wide`: every webhook in the cluster namespace, so every one is a candidate for
//!   every alert (the worst case);
//! - `tenants`: ten webhooks per tenant namespace, alerts labelled with their tenant.
//!
//! Each alert matches about ten webhooks. Run with `cargo bench --bench routing`; see
//! docs/benchmarks.md. The tables come from `bench/src/fixture.rs`, shared with `herald-bench`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use herald::routing::Subject;

#[path = "../bench/src/fixture.rs"]
mod fixture;

use fixture::Layout;

const SIZES: [usize; 3] = [10, 1_000, 10_000];
const ALERTS: usize = 256;

fn resolve(c: &mut Criterion) {
    for layout in [Layout::ClusterWide, Layout::Tenants] {
        let mut group = c.benchmark_group(format!("resolve/{}", layout.name()));
        group.throughput(Throughput::Elements(1));
        group.warm_up_time(Duration::from_secs(1));
        group.measurement_time(Duration::from_secs(3));
        for webhooks in SIZES {
            let table = fixture::table(webhooks, layout);
            let alerts = fixture::alerts(layout, webhooks, ALERTS);
            // The fixture is what it says: about ten webhooks per alert.
            let matched = table.resolve(Subject::alert(&alerts[0])).len();
            assert_eq!(matched, webhooks.min(fixture::PER_TEAM), "fixture");
            let mut next = 0usize;
            group.bench_with_input(BenchmarkId::from_parameter(webhooks), &table, |b, table| {
                b.iter(|| {
                    next = (next + 1) % ALERTS;
                    black_box(table.resolve(Subject::alert(black_box(&alerts[next]))))
                })
            });
        }
        group.finish();
    }
}

fn apply(c: &mut Criterion) {
    // Loading cost: building a whole table, per webhook (what a controller's initial sync
    // or a standalone reload pays in the routing layer).
    let mut group = c.benchmark_group("apply/cluster-wide");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    for webhooks in [1_000usize, 10_000] {
        group.throughput(Throughput::Elements(webhooks as u64));
        group.bench_with_input(BenchmarkId::from_parameter(webhooks), &webhooks, |b, &n| {
            b.iter(|| black_box(fixture::table(n, Layout::ClusterWide)))
        });
    }
    group.finish();
}

criterion_group!(benches, resolve, apply);
criterion_main!(benches);
