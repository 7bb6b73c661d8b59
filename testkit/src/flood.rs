//! What the flood tests share: ten webhooks `w0` … `w9`, each passing only the alerts labelled
//! `target: wN`; alerts numbered by a `seq` label; and an endpoint on loopback that records
//! which alerts arrived, when, and under which Idempotency-Key, and can answer slowly or fail.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

/// Webhooks in every flood: `w0` … `w9`, each getting the alerts labelled `target: wN`.
pub const WEBHOOKS: usize = 10;

/// One delivery as the endpoint accepted it.
#[derive(Clone, Debug)]
pub struct Arrival {
    /// The `seq` label of each alert it carried.
    pub seqs: Vec<usize>,
    /// Its Idempotency-Key.
    pub key: String,
    pub at: Instant,
}

#[derive(Default)]
struct SinkState {
    arrivals: Mutex<Vec<Arrival>>,
    delay: Mutex<Duration>,
    /// Answer 503 to everything while set.
    failing: AtomicBool,
}

/// An HTTP endpoint on loopback that records every delivery it accepts and answers 200 after
/// a delay, or 503 while it is failing.
pub struct CountingSink {
    state: Arc<SinkState>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

async fn record(State(state): State<Arc<SinkState>>, request: Request) -> StatusCode {
    let key = request
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let Ok(body) = axum::body::to_bytes(request.into_body(), usize::MAX).await else {
        return StatusCode::BAD_REQUEST;
    };
    let delay = *state.delay.lock().expect("delay");
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if state.failing.load(Ordering::Acquire) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let seqs = body["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["labels"]["seq"].as_str()?.parse().ok())
        .collect();
    let at = Instant::now();
    state
        .arrivals
        .lock()
        .expect("arrivals")
        .push(Arrival { seqs, key, at });
    StatusCode::OK
}

impl CountingSink {
    /// Listens on `port` of 127.0.0.1 (0: any free port).
    pub async fn start(port: u16, delay: Duration) -> CountingSink {
        let state = Arc::new(SinkState::default());
        *state.delay.lock().expect("delay") = delay;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("sink: bind");
        let addr = listener.local_addr().expect("sink: addr");
        let app = axum::Router::new()
            .fallback(record)
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        CountingSink { state, addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Answers 503 to everything while `failing`.
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::Release);
    }

    /// Answers each request after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().expect("delay") = delay;
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        self.state.arrivals.lock().expect("arrivals").clone()
    }

    /// Every `seq` that arrived.
    pub fn seqs(&self) -> BTreeSet<usize> {
        self.arrivals()
            .iter()
            .flat_map(|a| a.seqs.iter().copied())
            .collect()
    }

    /// Waits (bounded) until every seq in `expected` has arrived; fails naming the missing ones.
    pub async fn wait_for_all(&self, expected: &BTreeSet<usize>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let arrived = self.seqs();
            let missing: Vec<&usize> = expected.difference(&arrived).collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} deliveries answered 200 never arrived, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(10)]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deliveries that arrived more than once (same Idempotency-Key), counted once for each
    /// extra time.
    pub fn duplicates(&self) -> usize {
        let mut seen = BTreeMap::<String, usize>::new();
        for arrival in self.arrivals() {
            *seen.entry(arrival.key).or_default() += 1;
        }
        seen.values().map(|n| n - 1).sum()
    }
}

impl Drop for CountingSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The ten webhooks, `w{i}` at `urls[i]`, each with a condition that passes only `target: w{i}`.
pub fn write_config(dir: &Path, urls: &[String]) {
    let mut yaml = String::new();
    for (i, url) in urls.iter().enumerate() {
        yaml.push_str(&format!(
            "---\napiVersion: herald.dev/v1alpha1\nkind: NotificationCondition\nmetadata: {{name: only-w{i}}}\nspec:\n  matchExpressions:\n    - {{key: target, operator: In, values: [w{i}]}}\n---\napiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: w{i}}}\nspec:\n  url: '{url}'\n  conditions: [only-w{i}]\n"
        ));
    }
    std::fs::write(dir.join("herald.yaml"), yaml).expect("write config");
}

/// An Alertmanager payload with alert number `seq`, for webhook `w{seq % 10}`.
pub fn payload(seq: usize) -> Value {
    json!({"version": "4", "status": "firing", "receiver": "herald",
           "alerts": [{"status": "firing",
                       "labels": {"alertname": "Flood", "target": format!("w{}", seq % WEBHOOKS),
                                  "seq": seq.to_string()}}]})
}
