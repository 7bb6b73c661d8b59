//! The load generator: batches of 10 alerts with realistic labels, posted as Alertmanager's
//! webhook payload (to Herald and the forwarder) or as an Alertmanager API v2 array (to
//! Alertmanager itself), at a fixed rate or as fast as the system takes them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::sink::{SinkStats, now_ns};

/// Alerts per POST.
pub const BATCH: usize = 10;

/// How batches are encoded and where they go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingest {
    /// `POST /api/v1/alerts` with Alertmanager's webhook payload (Herald, the forwarder).
    AlertmanagerWebhook,
    /// `POST /api/v2/alerts` with a JSON array (Alertmanager).
    AlertmanagerApiV2,
}

impl Ingest {
    fn path(self) -> &'static str {
        match self {
            Ingest::AlertmanagerWebhook => "/api/v1/alerts",
            Ingest::AlertmanagerApiV2 => "/api/v2/alerts",
        }
    }
}

/// How hard to push.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// An open loop at this many alerts per second (whatever the answers).
    Fixed { alerts_per_second: f64 },
    /// Closed loops of `concurrency` senders, as fast as answers come, but never more than
    /// `max_outstanding` alert deliveries accepted and not yet seen at the sinks (the same
    /// bound as Herald's `--max-pending`, applied to every system alike).
    Saturate {
        concurrency: usize,
        max_outstanding: u64,
    },
}

/// The load to send.
#[derive(Clone, Debug)]
pub struct Load {
    pub ingest: Ingest,
    /// Where to send: batch `k` goes to `addrs[k % len]` (the replicas of one system).
    pub addrs: Vec<String>,
    pub mode: Mode,
    pub duration: Duration,
    /// Teams the alerts are spread over (webhooks / 10); alert `j` of batch `k` is of team
    /// `(k * BATCH + j) % teams`, so a batch's alerts go to distinct webhooks.
    pub teams: usize,
    /// Alert deliveries each alert causes (webhooks matching one team).
    pub fanout: u64,
    /// Sink phase stamped into every alert.
    pub phase: u32,
}

/// What the load generator saw.
#[derive(Clone, Debug, Default)]
pub struct LoadOutcome {
    pub elapsed: Duration,
    pub batches_sent: u64,
    pub batches_accepted: u64,
    pub batches_rejected: u64,
    pub errors: u64,
    /// Fixed rate only: ticks skipped because too many requests were in flight.
    pub behind: u64,
}

impl LoadOutcome {
    pub fn accepted_alerts(&self) -> u64 {
        self.batches_accepted * BATCH as u64
    }
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
    behind: AtomicU64,
    seq: AtomicU64,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector)
}

const ALERT_NAMES: [&str; 6] = [
    "KubePodCrashLooping",
    "HighCPU",
    "NodeDown",
    "TargetDown",
    "KubeDeploymentReplicasMismatch",
    "PrometheusRuleFailures",
];

/// One alert of batch `k`: ~12 labels and 4 annotations, as kube-prometheus rules produce.
fn alert_labels(k: u64, j: usize, teams: usize) -> Value {
    let n = k * BATCH as u64 + j as u64;
    let team = (n % teams as u64) as usize;
    json!({
        "alertname": ALERT_NAMES[(k % ALERT_NAMES.len() as u64) as usize],
        "severity": if n.is_multiple_of(3) { "critical" } else { "warning" },
        "team": format!("team-{team}"),
        "namespace": format!("app-{}", n % 7),
        "env": "prod",
        "cluster": "prod-eu-1",
        "pod": format!("api-{}-7d9f8b6c5-{n:x}", team),
        "container": "api",
        "instance": format!("10.0.{}.{}:8080", n % 250, (n / 250) % 250),
        "job": "kube-state-metrics",
        "prometheus": "monitoring/k8s",
        "service": "kube-prometheus-stack-kube-state-metrics",
    })
}

fn annotations(labels: &Value, stamp: &str) -> Value {
    json!({
        "summary": format!("Pod {} is crash looping", labels["pod"].as_str().unwrap_or("")),
        "description": "Pod is restarting 2.5 times / 10 minutes; check its logs and recent deploys.",
        "runbook_url": "https://runbooks.example.com/kubernetes/kubepodcrashlooping",
        "bench_sent_ns": stamp,
    })
}

/// The body of batch `k`, stamped now.
pub fn body(ingest: Ingest, k: u64, teams: usize, phase: u32) -> Bytes {
    let stamp = format!("{phase}.{}", now_ns());
    let starts_at = k8s_openapi::jiff::Timestamp::now().to_string();
    let alerts: Vec<Value> = (0..BATCH)
        .map(|j| {
            let labels = alert_labels(k, j, teams);
            let annotations = annotations(&labels, &stamp);
            match ingest {
                Ingest::AlertmanagerWebhook => json!({
                    "status": "firing",
                    "labels": labels,
                    "annotations": annotations,
                    "startsAt": starts_at,
                    "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://prometheus.monitoring:9090/graph?g0.expr=rate%28kube_pod_container_status_restarts_total%5B10m%5D%29+%3E+0",
                    "fingerprint": format!("{:016x}", k * BATCH as u64 + j as u64),
                }),
                Ingest::AlertmanagerApiV2 => json!({
                    "labels": labels,
                    "annotations": annotations,
                    "startsAt": starts_at,
                    "generatorURL": "http://prometheus.monitoring:9090/graph?g0.expr=rate%28kube_pod_container_status_restarts_total%5B10m%5D%29+%3E+0",
                }),
            }
        })
        .collect();
    let value = match ingest {
        Ingest::AlertmanagerWebhook => json!({
            "version": "4",
            "groupKey": format!("{{}}:{{alertname=\"{}\"}}", ALERT_NAMES[(k % ALERT_NAMES.len() as u64) as usize]),
            "truncatedAlerts": 0,
            "status": "firing",
            "receiver": "herald",
            "groupLabels": {"alertname": ALERT_NAMES[(k % ALERT_NAMES.len() as u64) as usize]},
            "commonLabels": {"env": "prod", "cluster": "prod-eu-1"},
            "commonAnnotations": {},
            "externalURL": "http://alertmanager.monitoring:9093",
            "alerts": alerts,
        }),
        Ingest::AlertmanagerApiV2 => Value::Array(alerts),
    };
    Bytes::from(serde_json::to_vec(&value).expect("payload"))
}

async fn post(client: &HttpClient, load: &Load, counters: &Counters) -> Option<u16> {
    // Distinct across phases too: Alertmanager would merge an alert it has seen before.
    let k = (u64::from(load.phase) << 32) + counters.seq.fetch_add(1, Ordering::Relaxed);
    let addr = &load.addrs[(k % load.addrs.len().max(1) as u64) as usize];
    let request = hyper::Request::post(format!("http://{addr}{}", load.ingest.path()))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body(load.ingest, k, load.teams, load.phase)))
        .expect("request");
    counters.sent.fetch_add(1, Ordering::Relaxed);
    let answer = tokio::time::timeout(Duration::from_secs(30), async {
        let response = client.request(request).await.ok()?;
        let status = response.status().as_u16();
        response.into_body().collect().await.ok()?;
        Some(status)
    })
    .await
    .ok()
    .flatten();
    match answer {
        Some(200) => counters.accepted.fetch_add(1, Ordering::Relaxed),
        Some(503) | Some(429) => counters.rejected.fetch_add(1, Ordering::Relaxed),
        _ => counters.errors.fetch_add(1, Ordering::Relaxed),
    };
    answer
}

/// Sends `load` and returns once its duration is over and every request has its answer.
pub async fn run(load: Load, sinks: Arc<SinkStats>) -> LoadOutcome {
    let client = client();
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let end = started + load.duration;
    match load.mode {
        Mode::Fixed { alerts_per_second } => {
            let period = Duration::from_secs_f64(BATCH as f64 / alerts_per_second);
            let in_flight = Arc::new(tokio::sync::Semaphore::new(512));
            let mut tasks = tokio::task::JoinSet::new();
            let mut next = tokio::time::Instant::now();
            while Instant::now() < end {
                tokio::time::sleep_until(next).await;
                next += period;
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    counters.behind.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let (client, load, counters) = (client.clone(), load.clone(), counters.clone());
                tasks.spawn(async move {
                    post(&client, &load, &counters).await;
                    drop(permit);
                });
                // Reap finished tasks so the set stays small.
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
        Mode::Saturate {
            concurrency,
            max_outstanding,
        } => {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..concurrency {
                let (client, load, counters, sinks) = (
                    client.clone(),
                    load.clone(),
                    counters.clone(),
                    sinks.clone(),
                );
                tasks.spawn(async move {
                    while Instant::now() < end {
                        let accepted =
                            counters.accepted.load(Ordering::Relaxed) * BATCH as u64 * load.fanout;
                        let seen = sinks.alerts.load(Ordering::Relaxed);
                        if accepted.saturating_sub(seen) >= max_outstanding {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            continue;
                        }
                        match post(&client, &load, &counters).await {
                            Some(200) => {}
                            // Full or failing: back off a little instead of spinning.
                            _ => tokio::time::sleep(Duration::from_millis(5)).await,
                        }
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        }
    }
    LoadOutcome {
        elapsed: started.elapsed(),
        batches_sent: counters.sent.load(Ordering::Relaxed),
        batches_accepted: counters.accepted.load(Ordering::Relaxed),
        batches_rejected: counters.rejected.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        behind: counters.behind.load(Ordering::Relaxed),
    }
}
