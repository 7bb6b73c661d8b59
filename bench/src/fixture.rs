//! Routing tables and alerts for the route resolution figures: shared by the criterion
//! micro-benchmark (`benches/routing.rs`, through `#[path]`) and `herald-bench`.
//!
//! Every webhook has its own NotificationCondition of four requirements, as a platform team
//! would write them; `team In [team-T]` singles out about ten webhooks per alert (webhooks
//! are spread over `n / 10` teams), the three others hold for every generated alert.
#![allow(dead_code)]

use herald::alert::{Alert, AlertStatus};
use herald::object::ObjectKey;
use herald::routing::{ConditionInput, Table, WebhookInput};
use serde_json::json;

/// The cluster namespace of the generated tables.
pub const CLUSTER_NAMESPACE: &str = "monitoring";

/// Where the webhooks of a generated table live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// All in the cluster namespace: every alert is a candidate for every webhook (the table's
    /// worst case: its indexes by namespace and event type cannot narrow anything).
    ClusterWide,
    /// Ten webhooks per tenant namespace; an alert carries its tenant's `namespace` label.
    Tenants,
}

impl Layout {
    /// A short name for tables and benchmark ids.
    pub fn name(self) -> &'static str {
        match self {
            Layout::ClusterWide => "cluster-wide",
            Layout::Tenants => "tenants",
        }
    }
}

/// Webhooks sharing one team (and so one alert), which is also the tenant size.
pub const PER_TEAM: usize = 10;

/// The number of teams (and tenants) in a table of `webhooks` webhooks.
pub fn teams(webhooks: usize) -> usize {
    webhooks.div_ceil(PER_TEAM).max(1)
}

/// The namespace of webhook `i`.
pub fn namespace_of(layout: Layout, i: usize) -> String {
    match layout {
        Layout::ClusterWide => CLUSTER_NAMESPACE.to_string(),
        Layout::Tenants => format!("tenant-{}", i / PER_TEAM),
    }
}

/// The team webhook `i` wants alerts of: ten webhooks per team (in the `Tenants` layout,
/// a tenant's ten webhooks are its team's).
pub fn team_of(i: usize) -> usize {
    i / PER_TEAM
}

/// The spec of webhook `i`'s condition (JSON, as a manifest would hold it).
pub fn condition_spec(team: usize) -> serde_json::Value {
    json!({
        "matchExpressions": [
            {"key": "team", "operator": "In", "values": [format!("team-{team}")]},
            {"key": "severity", "operator": "In", "values": ["critical", "warning"]},
            {"key": "env", "operator": "NotIn", "values": ["test", "dev"]},
            {"key": "cluster", "operator": "Exists"},
        ]
    })
}

/// A routing table of `webhooks` webhooks and as many conditions.
pub fn table(webhooks: usize, layout: Layout) -> Table {
    let mut table = Table::new([CLUSTER_NAMESPACE.to_string()]);
    for i in 0..webhooks {
        let namespace = namespace_of(layout, i);
        let name = format!("wh-{i}");
        let condition = format!("cond-{i}");
        table.apply_condition(ConditionInput {
            key: ObjectKey::new(namespace.as_str(), condition.as_str()),
            spec: serde_json::from_value(condition_spec(team_of(i))).expect("condition spec"),
        });
        table.apply_webhook(WebhookInput {
            key: ObjectKey::new(namespace.as_str(), name.as_str()),
            labels: [("team".to_string(), format!("team-{}", team_of(i)))]
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>()
                .into(),
            spec: serde_json::from_value::<herald::crd::WebhookSpec>(json!({
                "url": format!("http://127.0.0.1:9/{name}"),
                "conditions": [condition],
            }))
            .expect("webhook spec")
            .into(),
            credentials: Ok(()),
        });
    }
    table
}

/// Alert `k` for a table of `webhooks` webhooks: realistic labels, a team chosen round-robin
/// (so it matches the ten webhooks of that team).
pub fn alert(layout: Layout, webhooks: usize, k: usize) -> Alert {
    let team = k % teams(webhooks);
    let namespace = match layout {
        Layout::ClusterWide => format!("app-{}", k % 7),
        Layout::Tenants => format!("tenant-{team}"),
    };
    let labels = [
        (
            "alertname",
            ["KubePodCrashLooping", "HighCPU", "NodeDown", "TargetDown"][k % 4].to_string(),
        ),
        (
            "severity",
            if k.is_multiple_of(3) {
                "critical"
            } else {
                "warning"
            }
            .to_string(),
        ),
        ("team", format!("team-{team}")),
        ("namespace", namespace),
        ("env", "prod".to_string()),
        ("cluster", "prod-eu-1".to_string()),
        ("pod", format!("api-{}-7d9f8b6c5-x{k:04}", k % 13)),
        ("container", "api".to_string()),
        (
            "instance",
            format!("10.0.{}.{}:8080", k % 250, (k / 250) % 250),
        ),
        ("job", "kube-state-metrics".to_string()),
        ("prometheus", "monitoring/k8s".to_string()),
        (
            "service",
            "kube-prometheus-stack-kube-state-metrics".to_string(),
        ),
    ];
    Alert {
        status: AlertStatus::Firing,
        labels: labels
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        ..Alert::default()
    }
}

/// `count` distinct alerts for a table of `webhooks` webhooks.
pub fn alerts(layout: Layout, webhooks: usize, count: usize) -> Vec<Alert> {
    (0..count).map(|k| alert(layout, webhooks, k)).collect()
}
