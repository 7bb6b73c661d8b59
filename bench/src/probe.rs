//! In-process probes behind the figures, for profiling (`herald-bench probe ...`, hidden):
//! where the memory per webhook goes, and a fixed amount of route resolution to run under
//! `valgrind --tool=callgrind`.

use std::time::Instant;

use anyhow::Result;
use herald::delivery::{EngineConfig, Target, TargetPolicy};
use herald::dispatch::Dispatcher;
use herald::object::ObjectKey;
use herald::routing::Subject;

use crate::fixture::{self, Layout};

/// What to probe.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Probe {
    /// Memory per webhook: the routing table alone, delivery targets alone, the whole core.
    Memory {
        #[arg(long, default_value_t = 10_000)]
        webhooks: usize,
    },
    /// Builds a table and resolves `alerts` alerts (run it under callgrind).
    Resolve {
        #[arg(long, default_value_t = 10_000)]
        webhooks: usize,
        #[arg(long, default_value = "cluster-wide")]
        layout: String,
        #[arg(long, default_value_t = 200)]
        alerts: usize,
    },
}

fn rss_kib() -> u64 {
    herald_testkit::process::memory_kib(std::process::id())
        .map(|(rss, _)| rss)
        .unwrap_or(0)
}

fn spec(i: usize) -> herald::crd::WebhookSpec {
    serde_json::from_value(serde_json::json!({
        "url": format!("http://127.0.0.1:9/wh-{i}"),
        "conditions": [format!("cond-{i}")],
    }))
    .expect("spec")
}

pub async fn run(probe: Probe) -> Result<()> {
    match probe {
        Probe::Memory { webhooks } => {
            let base = rss_kib();
            let table = fixture::table(webhooks, Layout::ClusterWide);
            let after_table = rss_kib();
            println!(
                "routing table, {webhooks} webhooks + conditions: {:.1} KiB per webhook",
                (after_table - base) as f64 / webhooks as f64
            );
            drop(table);

            let base = rss_kib();
            let policy = TargetPolicy::allowing_loopback();
            let started = Instant::now();
            let targets: Vec<Target> = (0..webhooks)
                .map(|i| {
                    Target::build(
                        ObjectKey::new("default", format!("wh-{i}")),
                        &spec(i),
                        &policy,
                        |_| None,
                    )
                    .expect("target")
                })
                .collect();
            let after_targets = rss_kib();
            println!(
                "delivery targets (one reqwest::Client each): {:.1} KiB and {:.0} µs to build per webhook",
                (after_targets.saturating_sub(base)) as f64 / webhooks as f64,
                started.elapsed().as_secs_f64() * 1e6 / webhooks as f64
            );
            drop(targets);

            let base = rss_kib();
            let dispatcher = Dispatcher::new(["default".to_string()], EngineConfig::default())
                .with_policy(TargetPolicy::allowing_loopback());
            for i in 0..webhooks {
                dispatcher.apply_condition(herald::routing::ConditionInput {
                    key: ObjectKey::new("default", format!("cond-{i}")),
                    spec: serde_json::from_value(fixture::condition_spec(fixture::team_of(i)))?,
                });
                let _ = dispatcher.apply_webhook(
                    ObjectKey::new("default", format!("wh-{i}")),
                    Default::default(),
                    spec(i),
                    |_| None,
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            println!(
                "whole core (table + targets + workers + metrics): {:.1} KiB per webhook, {:.1} MiB for {webhooks}",
                (rss_kib().saturating_sub(base)) as f64 / webhooks as f64,
                (rss_kib().saturating_sub(base)) as f64 / 1024.0
            );
        }
        Probe::Resolve {
            webhooks,
            layout,
            alerts,
        } => {
            let layout = if layout == "tenants" {
                Layout::Tenants
            } else {
                Layout::ClusterWide
            };
            let table = fixture::table(webhooks, layout);
            let alerts = fixture::alerts(layout, webhooks, alerts);
            let started = Instant::now();
            let matched: usize = alerts
                .iter()
                .map(|a| table.resolve(Subject::alert(a)).len())
                .sum();
            println!(
                "{} alerts, {matched} matches, {:.1} µs per alert",
                alerts.len(),
                started.elapsed().as_secs_f64() * 1e6 / alerts.len() as f64
            );
        }
    }
    Ok(())
}
