//! An in-process Herald core for integration tests: fast retries, and every delivery report
//! collected so tests can wait for outcomes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald::crd::Webhook;
use herald::delivery::{DeliveryObserver, DeliveryReport, EngineConfig, RetryPolicy};
use herald::dispatch::Dispatcher;
use herald::object::{NotReady, ObjectKey};
use herald::receiver::{ReceiverConfig, ServerLimits, router, serve_with_limits};
use herald::secret::SecretData;

/// Every delivery report, in arrival order.
#[derive(Default)]
pub struct Reports(Mutex<Vec<DeliveryReport>>);

impl DeliveryObserver for Reports {
    fn report(&self, report: &DeliveryReport) {
        self.0.lock().expect("reports lock").push(report.clone());
    }
}

impl Reports {
    /// Snapshot of the reports so far.
    pub fn all(&self) -> Vec<DeliveryReport> {
        self.0.lock().expect("reports lock").clone()
    }

    /// Waits (bounded) until a report for `webhook` exists and returns the first one.
    pub async fn wait_for(&self, webhook: &str, timeout: Duration) -> DeliveryReport {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self
                .all()
                .into_iter()
                .find(|r| r.webhook.to_string() == webhook)
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no delivery report for {webhook} within {timeout:?}; reports: {:?}",
                self.all()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Retries fast enough for tests.
pub fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        max_elapsed: Duration::from_secs(20),
        max_attempts: 5,
    }
}

/// A core whose cluster namespace is `monitoring`, with a report collector attached.
pub fn core() -> (Dispatcher, Arc<Reports>) {
    let dispatcher = Dispatcher::new(
        ["monitoring".to_string()],
        EngineConfig {
            retry: fast_retry(),
            ..EngineConfig::default()
        },
    )
    .with_policy(herald::delivery::TargetPolicy::allowing_loopback());
    let reports = Arc::new(Reports::default());
    dispatcher.engine().observe(reports.clone());
    (dispatcher, reports)
}

/// Secret data from string pairs.
pub fn secret(pairs: &[(&str, &str)]) -> SecretData {
    SecretData::from_pairs(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
    )
}

/// Applies a Webhook manifest (YAML) with the given Secrets of its namespace.
pub fn apply(
    dispatcher: &Dispatcher,
    yaml: &str,
    secrets: &[(&str, SecretData)],
) -> Result<(), NotReady> {
    let wh: Webhook = serde_saphyr::from_str(yaml).expect("webhook YAML");
    let key = ObjectKey::new(
        wh.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "monitoring".into()),
        wh.metadata.name.clone().expect("name"),
    );
    dispatcher.apply_webhook(
        key,
        wh.metadata.labels.clone().unwrap_or_default(),
        wh.spec,
        |name| secrets.iter().find(|(n, _)| *n == name).map(|(_, d)| d),
    )
}

/// An Alertmanager-style batch of alerts from label lists.
pub fn batch(alerts: &[&[(&str, &str)]]) -> herald::alert::AlertBatch {
    herald::alert::AlertBatch {
        alerts: alerts
            .iter()
            .map(|labels| {
                let mut alert = herald::alert::Alert {
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    starts_at: "2026-11-25T10:00:00Z".into(),
                    ..Default::default()
                };
                alert.ensure_fingerprint();
                alert
            })
            .collect(),
        ..Default::default()
    }
}

/// Serves a core's receiver on a free loopback port for the rest of the test.
pub async fn serve_receiver(
    dispatcher: Dispatcher,
    config: ReceiverConfig,
    limits: ServerLimits,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve_with_limits(
        listener,
        router(dispatcher, config),
        limits,
        std::future::pending(),
    ));
    addr
}

/// Posts a JSON body to a receiver; returns the status and the parsed JSON reply (Null when
/// not JSON).
pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, serde_json::Value) {
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("client")
        .post(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}
