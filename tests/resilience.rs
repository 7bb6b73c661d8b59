//! Resilience: endpoints that are down, hang or fail beside healthy ones, floods of alerts,
//! graceful stops with deliveries pending, and secrets that must never show up in logs,
//! metrics or delivery records. Figures (latencies, peak RSS, counts) are printed with
//! `eprintln!`; run with `--nocapture` to see them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cli::Running;
use futures::StreamExt as _;
use herald::delivery::{EngineConfig, RetryPolicy};
use herald::dispatch::Dispatcher;
use herald::outgoing::ReportOutcome;
use herald::receiver::{ReceiverConfig, ServerLimits};
use herald_testkit::{cli, core, process, sink};
use serde_json::{Value, json};
use sink::{Reply, Sink};

use crate::core::{Reports, apply, fast_retry};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

fn payload(labels: Value) -> Value {
    json!({"version": "4", "status": "firing", "receiver": "herald",
           "alerts": [{"status": "firing", "labels": labels}]})
}

/// The labels of every alert a sink received, one entry per alert per request.
fn alert_labels(received: &[sink::Received]) -> Vec<BTreeMap<String, String>> {
    received
        .iter()
        .flat_map(|r| r.json()["alerts"].as_array().cloned().unwrap_or_default())
        .map(|a| serde_json::from_value(a["labels"].clone()).expect("labels are strings"))
        .collect()
}

/// Polls until `check` holds, for at most `timeout`; panics with `what` otherwise.
async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of a metric line such as `herald_circuit_open{namespace="x",webhook="y"}`, if present.
fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
}

fn write_config(dir: &Path, yaml: &str) {
    std::fs::write(dir.join("herald.yaml"), yaml).expect("write config");
}

fn webhook_yaml(name: &str, url: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: {name}}}\nspec:\n  url: '{url}'\n{extra}"
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------------------------------------
// An endpoint that is down, then up
// ---------------------------------------------------------------------------------------------

/// How the endpoint is down.
#[derive(Clone, Copy, Debug)]
enum Down {
    /// It answers 503.
    Answers503,
    /// Nothing listens on its port.
    ClosedPort,
}

/// A minimal endpoint on a fixed port that records every request, for the closed-port case
/// (the shared sink binds port 0).
/// Requests as (Idempotency-Key, JSON body).
type Requests = Arc<Mutex<Vec<(Option<String>, Value)>>>;

struct PortSink {
    received: Requests,
    task: tokio::task::JoinHandle<()>,
}

impl PortSink {
    async fn start(port: u16) -> PortSink {
        let received: Requests = Arc::default();
        let state = received.clone();
        let app = axum::Router::new().fallback(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    let key = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    state.lock().expect("lock").push((key, json));
                    "{}"
                }
            },
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the endpoint's port again");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        PortSink { received, task }
    }

    fn keys(&self) -> Vec<String> {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|(k, _)| k.clone())
            .collect()
    }
}

impl Drop for PortSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_core(dispatcher: Dispatcher) -> SocketAddr {
    dispatcher.set_ready(true);
    core::serve_receiver(
        dispatcher,
        ReceiverConfig::default(),
        ServerLimits::default(),
    )
    .await
}

async fn down_then_up(down: Down) {
    const BATCHES: usize = 12;
    // Retry for as long as the outage lasts (the shared fast policy gives up after 5 attempts).
    let dispatcher = Dispatcher::new(
        ["monitoring".to_string()],
        EngineConfig {
            retry: RetryPolicy {
                max_attempts: 1000,
                max_elapsed: Duration::from_secs(60),
                ..fast_retry()
            },
            ..EngineConfig::default()
        },
    )
    .with_policy(herald::delivery::TargetPolicy::allowing_loopback());
    let reports = Arc::new(Reports::default());
    dispatcher.engine().observe(reports.clone());

    let sink = Sink::http().await;
    let port = process::free_port();
    let url = match down {
        Down::Answers503 => {
            sink.respond_with(vec![Reply::status(503)]);
            sink.url()
        }
        Down::ClosedPort => format!("http://127.0.0.1:{port}/hook"),
    };
    apply(
        &dispatcher,
        &format!("metadata: {{name: flaky}}\nspec: {{url: '{url}'}}"),
        &[],
    )
    .expect("ready");
    let addr = serve_core(dispatcher).await;
    let metrics = || async move {
        client()
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    };
    let circuit = r#"herald_circuit_open{namespace="monitoring",webhook="flaky"}"#;

    // While it is down, alerts keep coming and are all accepted.
    let down_since = Instant::now();
    let mut peak_circuit = 0.0f64;
    for i in 0..BATCHES {
        let response = client()
            .post(format!("http://{addr}/api/v1/alerts"))
            .json(&payload(json!({"alertname": format!("Outage{i}")})))
            .send()
            .await
            .expect("post");
        assert_eq!(response.status().as_u16(), 200, "batch {i}");
        if let Some(v) = metric(&metrics().await, circuit) {
            peak_circuit = peak_circuit.max(v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The breaker opens after five failed attempts in a row.
    let deadline = Instant::now() + Duration::from_secs(10);
    while peak_circuit < 1.0 {
        assert!(
            Instant::now() < deadline,
            "herald_circuit_open never went to 1 while the endpoint was down"
        );
        if let Some(v) = metric(&metrics().await, circuit) {
            peak_circuit = peak_circuit.max(v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let attempts_while_down = match down {
        Down::Answers503 => format!("{} attempts answered 503", sink.count()),
        Down::ClosedPort => "every attempt refused".to_string(),
    };
    let failed_while_down = reports
        .all()
        .iter()
        .filter(|r| r.outcome != ReportOutcome::Succeeded)
        .count();
    assert_eq!(
        failed_while_down, 0,
        "no delivery gave up during the outage"
    );
    let outage = down_since.elapsed();

    // Up again.
    let port_sink = match down {
        Down::Answers503 => {
            sink.respond_with(vec![Reply::status(200)]);
            None
        }
        Down::ClosedPort => Some(PortSink::start(port).await),
    };
    let recovered_at = Instant::now();
    eventually(
        Duration::from_secs(30),
        "every accepted batch was delivered after the endpoint recovered",
        || async {
            reports
                .all()
                .iter()
                .filter(|r| r.outcome == ReportOutcome::Succeeded)
                .count()
                >= BATCHES
        },
    )
    .await;
    let recovery = recovered_at.elapsed();
    let all = reports.all();
    assert!(
        all.iter().all(|r| r.outcome == ReportOutcome::Succeeded),
        "{all:?}"
    );
    assert_eq!(all.len(), BATCHES, "one report per batch: {all:?}");
    // Every success reached the endpoint under its Idempotency-Key, and every alert arrived.
    let (arrived_keys, arrived_names): (BTreeSet<String>, BTreeSet<String>) = match &port_sink {
        None => {
            let received = sink.received();
            let keys = received
                .iter()
                .filter_map(|r| r.header("idempotency-key"))
                .collect();
            let names = alert_labels(&received)
                .into_iter()
                .filter_map(|l| l.get("alertname").cloned())
                .collect();
            (keys, names)
        }
        Some(port_sink) => {
            let received = port_sink.received.lock().expect("lock").clone();
            let names = received
                .iter()
                .flat_map(|(_, body)| body["alerts"].as_array().cloned().unwrap_or_default())
                .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_string))
                .collect();
            (port_sink.keys().into_iter().collect(), names)
        }
    };
    for report in &all {
        assert!(
            arrived_keys.contains(&report.delivery_id.to_string()),
            "delivery {} reported as succeeded never arrived",
            report.delivery_id
        );
    }
    for i in 0..BATCHES {
        assert!(
            arrived_names.contains(&format!("Outage{i}")),
            "alert Outage{i} never arrived: {arrived_names:?}"
        );
    }
    // And the breaker closed again.
    eventually(
        Duration::from_secs(10),
        "herald_circuit_open went back to 0 (or away) after recovery",
        || async { metric(&metrics().await, circuit).is_none_or(|v| v == 0.0) },
    )
    .await;
    let text = metrics().await;
    let retried = metric(
        &text,
        r#"herald_deliveries_total{namespace="monitoring",webhook="flaky",outcome="retried"}"#,
    )
    .unwrap_or(0.0);
    eprintln!(
        "{down:?}: outage {outage:?} ({attempts_while_down}), {retried} retries counted in \
         all, circuit peaked at {peak_circuit}; all {BATCHES} batches delivered {recovery:?} \
         after recovery"
    );
}

#[tokio::test]
async fn an_endpoint_answering_503_for_seconds_gets_everything_once_it_recovers() {
    down_then_up(Down::Answers503).await;
}

#[tokio::test]
async fn an_endpoint_whose_port_is_closed_for_seconds_gets_everything_once_it_recovers() {
    down_then_up(Down::ClosedPort).await;
}

// ---------------------------------------------------------------------------------------------
// A hanging and a failing webhook beside a healthy one, under load
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_hanging_and_a_failing_webhook_do_not_hold_up_a_healthy_one_under_load() {
    const BATCHES: usize = 500;
    let (hanging, failing, healthy) = (Sink::http().await, Sink::http().await, Sink::http().await);
    hanging.respond_with(vec![Reply::status(200).delay(Duration::from_secs(60))]);
    failing.respond_with(vec![Reply::status(500)]);
    let dir = tempfile::tempdir().expect("tempdir");
    write_config(
        dir.path(),
        &[
            webhook_yaml("hanging", &hanging.url(), "  timeoutSeconds: 30\n"),
            webhook_yaml("failing", &failing.url(), ""),
            webhook_yaml("healthy", &healthy.url(), ""),
        ]
        .concat(),
    );
    let running = Running::start(dir.path(), &[]).await;
    let url = running.url("/api/v1/alerts");
    let client = client();

    // 500 batches over about 5 s: one every 10 ms, each posted without waiting for the last.
    let posted: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let mut posts = Vec::new();
    let started = Instant::now();
    for seq in 0..BATCHES {
        ticker.tick().await;
        let (client, url, posted) = (client.clone(), url.clone(), posted.clone());
        posts.push(tokio::spawn(async move {
            let body = payload(json!({"alertname": "Load", "seq": seq.to_string()}));
            posted.lock().expect("lock").insert(seq, Instant::now());
            let response = client.post(url).json(&body).send().await.expect("post");
            response.status().as_u16()
        }));
    }
    let mut statuses = BTreeMap::<u16, usize>::new();
    for post in posts {
        *statuses.entry(post.await.expect("post task")).or_default() += 1;
    }
    let posting = started.elapsed();
    assert_eq!(statuses.get(&200), Some(&BATCHES), "{statuses:?}");

    let received = healthy.wait_for(BATCHES, Duration::from_secs(60)).await;
    let posted = posted.lock().expect("lock").clone();
    let mut latencies = Vec::new();
    let mut seen = BTreeSet::new();
    for request in &received {
        for alert in request.json()["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let seq: usize = alert["labels"]["seq"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("seq label");
            if seen.insert(seq) {
                latencies.push(request.at.saturating_duration_since(posted[&seq]));
            }
        }
    }
    assert_eq!(
        seen.len(),
        BATCHES,
        "every batch reached the healthy webhook"
    );
    latencies.sort();
    eprintln!(
        "healthy webhook beside a hanging and a failing one: {BATCHES} batches posted in \
         {posting:?}; end-to-end latency p50 {:?}, p99 {:?}, max {:?}; {} requests to the \
         healthy sink, {} to the failing one, {} to the hanging one",
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or_default(),
        received.len(),
        failing.count(),
        hanging.count(),
    );
}

// ---------------------------------------------------------------------------------------------
// A flood in front of a slow endpoint
// ---------------------------------------------------------------------------------------------

/// The PID of the `herald run` process serving `config` (its tempdir path is unique).
fn herald_pid(config: &Path) -> u32 {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("run --config {}", config.display())])
        .output()
        .expect("pgrep");
    let text = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert_eq!(pids.len(), 1, "one herald process for {config:?}: {text}");
    pids[0]
}

/// A `Vm*` figure from /proc/PID/status, in KiB.
fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[tokio::test]
async fn a_flood_gets_503_with_retry_after_and_everything_accepted_is_delivered() {
    const POSTS: usize = 5000;
    const IN_FLIGHT: usize = 64;
    let sink = Sink::http().await;
    sink.respond_with(vec![Reply::status(200).delay(Duration::from_millis(200))]);
    let dir = tempfile::tempdir().expect("tempdir");
    write_config(dir.path(), &webhook_yaml("slow", &sink.url(), ""));
    let running = Running::start(
        dir.path(),
        // A short wait for room: some batches get in while others wait, the rest get a 503.
        &[
            "--max-pending",
            "200",
            "--backlog-limit",
            "1000",
            "--overload-wait",
            "50ms",
        ],
    )
    .await;
    let pid = herald_pid(dir.path());
    let rss_before = vm_kib(pid, "VmRSS:");
    let url = running.url("/api/v1/alerts");
    let client = client();

    let started = Instant::now();
    // (post, Ok((status, Retry-After)) or Err(transport error)).
    type Outcome = (usize, Result<(u16, Option<String>), String>);
    let results: Vec<Outcome> = futures::stream::iter(0..POSTS)
        .map(|seq| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let body = payload(json!({"alertname": "Flood", "seq": seq.to_string()}));
                let result = match client.post(url).json(&body).send().await {
                    Ok(response) => Ok((
                        response.status().as_u16(),
                        response
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string),
                    )),
                    Err(e) => Err(e.to_string()),
                };
                (seq, result)
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let blast = started.elapsed();
    // The blast is over: let the endpoint catch up.
    sink.respond_with(vec![Reply::status(200)]);

    let mut accepted = BTreeSet::new();
    let mut statuses = BTreeMap::<u16, usize>::new();
    let mut errors = Vec::new();
    for (seq, result) in results {
        match result {
            Ok((status, retry_after)) => {
                *statuses.entry(status).or_default() += 1;
                match status {
                    200 => {
                        accepted.insert(seq);
                    }
                    503 => assert!(
                        retry_after
                            .as_deref()
                            .is_some_and(|v| v.parse::<u64>().is_ok()),
                        "a 503 without a Retry-After in seconds: {retry_after:?}"
                    ),
                    other => panic!("unexpected status {other} for post {seq}"),
                }
            }
            Err(e) => errors.push(e),
        }
    }
    assert!(errors.is_empty(), "requests failed outright: {errors:?}");
    assert!(statuses.get(&503).is_some_and(|n| *n > 0), "{statuses:?}");
    assert!(!accepted.is_empty(), "{statuses:?}");

    let drain = Instant::now();
    eventually(
        Duration::from_secs(60),
        "every alert that got a 200 reached the endpoint",
        || async {
            let arrived: BTreeSet<usize> = alert_labels(&sink.received())
                .iter()
                .filter_map(|l| l.get("seq")?.parse().ok())
                .collect();
            accepted.is_subset(&arrived)
        },
    )
    .await;
    let drained = drain.elapsed();
    let arrived: BTreeSet<usize> = alert_labels(&sink.received())
        .iter()
        .filter_map(|l| l.get("seq")?.parse().ok())
        .collect();
    assert!(
        arrived.is_subset(&accepted),
        "alerts that got a 503 were delivered anyway: {:?}",
        arrived.difference(&accepted).collect::<Vec<_>>()
    );
    let peak = vm_kib(pid, "VmHWM:");
    let rss_after = vm_kib(pid, "VmRSS:");
    eprintln!(
        "flood: {POSTS} posts ({IN_FLIGHT} in flight) in {blast:?}: statuses {statuses:?}; \
         {} accepted alerts all delivered {drained:?} after the blast; herald RSS {} MiB \
         before, {} MiB after, peak (VmHWM) {} MiB",
        accepted.len(),
        rss_before / 1024,
        rss_after / 1024,
        peak / 1024
    );
    assert!(
        peak < 512 * 1024,
        "herald's peak RSS {} MiB: a leak?",
        peak / 1024
    );
    drop(running);
}

// ---------------------------------------------------------------------------------------------
// Graceful stop with deliveries pending
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_graceful_stop_keeps_pending_deliveries_and_a_restart_sends_them_with_their_keys() {
    let sink = Sink::http().await;
    sink.respond_with(vec![Reply::status(503)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    let hooks = ["one", "two", "three"];
    write_config(
        dir.path(),
        &hooks
            .iter()
            .map(|h| webhook_yaml(h, &sink.url_for(&format!("/{h}")), ""))
            .collect::<String>(),
    );
    let data_arg = data.path().to_str().expect("utf-8").to_string();
    let running = Running::start(dir.path(), &["--data-dir", &data_arg]).await;
    // Two batches: each webhook's worker retries the first; the second waits in its queue.
    for name in ["First", "Second"] {
        let (status, body) = running
            .post_alerts(&payload(json!({"alertname": name})))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["deliveries"], 3, "{body}");
    }
    // Wait until every webhook has been tried (and refused) at least twice.
    eventually(
        Duration::from_secs(20),
        "every webhook was attempted while the endpoint answered 503",
        || async {
            let received = sink.received();
            hooks.iter().all(|h| {
                received
                    .iter()
                    .filter(|r| r.path == format!("/{h}"))
                    .count()
                    >= 2
            })
        },
    )
    .await;
    let key_of = |r: &sink::Received| {
        let name = alert_labels(std::slice::from_ref(r))[0]["alertname"].clone();
        (r.path.clone(), name)
    };
    // The key each (webhook, alert) was tried with before the stop.
    let mut before: HashMap<(String, String), String> = HashMap::new();
    for r in sink.received() {
        let key = r.header("idempotency-key").expect("Idempotency-Key");
        let previous = before.insert(key_of(&r), key.clone());
        assert!(
            previous.is_none_or(|p| p == key),
            "one delivery, two keys, before the stop"
        );
    }
    let stop = Instant::now();
    let status = running.terminate();
    let stopped_in = stop.elapsed();
    assert!(status.success(), "herald exited with {status} on SIGTERM");
    let attempts_before = sink.count();

    // Restart on the same data dir with the endpoint healthy.
    sink.respond_with(vec![Reply::status(200)]);
    let running = Running::start(dir.path(), &["--data-dir", &data_arg]).await;
    let expected = hooks.len() * 2;
    eventually(
        Duration::from_secs(20),
        "all six deliveries arrived after the restart",
        || async {
            let after: BTreeSet<_> = sink.received()[attempts_before..]
                .iter()
                .map(key_of)
                .collect();
            after.len() >= expected
        },
    )
    .await;
    // A moment more, to catch duplicates sent under new keys.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = &sink.received()[attempts_before..];
    let mut keys_after: HashMap<(String, String), BTreeSet<String>> = HashMap::new();
    for r in after {
        keys_after
            .entry(key_of(r))
            .or_default()
            .insert(r.header("idempotency-key").expect("Idempotency-Key"));
    }
    assert_eq!(keys_after.len(), expected, "{keys_after:?}");
    for (delivery, keys) in &keys_after {
        assert_eq!(
            keys.len(),
            1,
            "{delivery:?} arrived under several keys: {keys:?}"
        );
        if let Some(original) = before.get(delivery) {
            assert!(
                keys.contains(original),
                "{delivery:?} was tried as {original} and delivered as {keys:?}"
            );
        }
    }
    let distinct: BTreeSet<_> = keys_after.values().flatten().collect();
    assert_eq!(distinct.len(), expected, "every delivery has its own key");
    eprintln!(
        "graceful stop: SIGTERM to exit {stopped_in:?}; {attempts_before} attempts before, \
         {} requests after the restart; {} deliveries had been tried before the stop and kept \
         their key",
        after.len(),
        before.len()
    );
    assert!(running.terminate().success());
}

// ---------------------------------------------------------------------------------------------
// Secrets never leak
// ---------------------------------------------------------------------------------------------

const BEARER_TOKEN: &str = "tok-7Qz9-BEARER-SECRET-v4lue";
const BASIC_PASSWORD: &str = "pw-3Kx8-BASIC-SECRET-v4lue";
const HEADER_SECRET: &str = "hdr-5Mw2-HEADER-SECRET-v4lue";

fn secrets_config(dir: &Path, unauthorized: &Sink, failing: &Sink, ok: &Sink) {
    let secrets = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: bearer-auth}}\nstringData: {{token: {BEARER_TOKEN}}}\n\
         ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: basic-auth}}\nstringData: {{username: herald, password: {BASIC_PASSWORD}}}\n\
         ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: api-headers}}\nstringData: {{X-Api-Key: {HEADER_SECRET}}}\n"
    );
    let hooks = [
        webhook_yaml(
            "bearer",
            &unauthorized.url(),
            "  auth: {type: Bearer, secretRef: {name: bearer-auth}}\n  headersSecretRef: {name: api-headers}\n",
        ),
        webhook_yaml(
            "basic",
            &failing.url(),
            "  auth: {type: Basic, secretRef: {name: basic-auth}}\n",
        ),
        webhook_yaml(
            "headers",
            &ok.url(),
            "  headersSecretRef: {name: api-headers}\n  auth: {type: Bearer, secretRef: {name: bearer-auth}}\n",
        ),
    ]
    .concat();
    write_config(dir, &format!("{secrets}{hooks}"));
}

/// Every place Herald writes text a user might read or ship: the log, metrics, delivery records
/// (list, filtered, one by one) and `herald deliveries`.
async fn everything_herald_shows(running: &Running) -> Vec<(String, String)> {
    let admin = running.admin_url();
    let mut shown = vec![
        ("log".to_string(), running.log()),
        (
            "/metrics".to_string(),
            client()
                .get(running.url("/metrics"))
                .send()
                .await
                .expect("metrics")
                .text()
                .await
                .expect("text"),
        ),
    ];
    for query in ["", "outcome=Failed", "outcome=Succeeded", "limit=1000"] {
        let text = client()
            .get(format!("{admin}/api/v1/deliveries?{query}"))
            .send()
            .await
            .expect("admin")
            .text()
            .await
            .expect("text");
        shown.push((format!("/api/v1/deliveries?{query}"), text));
    }
    let list: Value = serde_json::from_str(&shown[2].1).expect("records JSON");
    for record in list["deliveries"].as_array().cloned().unwrap_or_default() {
        let id = record["id"].as_str().expect("id");
        let text = client()
            .get(format!("{admin}/api/v1/deliveries/{id}"))
            .send()
            .await
            .expect("admin")
            .text()
            .await
            .expect("text");
        shown.push((format!("/api/v1/deliveries/{id}"), text));
    }
    let cli = cli::herald(&["deliveries", "--server", &admin]);
    shown.push((
        "herald deliveries".to_string(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&cli.stdout),
            String::from_utf8_lossy(&cli.stderr)
        ),
    ));
    shown
}

fn forbidden() -> Vec<(String, String)> {
    use base64::Engine as _;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("herald:{BASIC_PASSWORD}"));
    vec![
        ("the bearer token".into(), BEARER_TOKEN.into()),
        ("the basic password".into(), BASIC_PASSWORD.into()),
        ("the basic credentials in base64".into(), basic),
        ("the header Secret value".into(), HEADER_SECRET.into()),
    ]
}

async fn assert_no_secret_shown(running: &Running) -> usize {
    let shown = everything_herald_shows(running).await;
    for (place, text) in &shown {
        for (what, value) in forbidden() {
            assert!(
                !text.contains(&value),
                "{what} appears in {place}:\n{}",
                text.lines()
                    .filter(|l| l.contains(&value))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    shown.iter().map(|(_, t)| t.len()).sum()
}

async fn wait_records(running: &Running, n: usize) {
    let admin = running.admin_url();
    eventually(
        Duration::from_secs(30),
        "every delivery finished and was recorded",
        || {
            let admin = admin.clone();
            async move {
                let body: Value = client()
                    .get(format!("{admin}/api/v1/deliveries?limit=1000"))
                    .send()
                    .await
                    .expect("admin")
                    .json()
                    .await
                    .expect("json");
                body["deliveries"].as_array().map_or(0, Vec::len) >= n
            }
        },
    )
    .await;
}

#[tokio::test]
async fn secret_values_never_appear_in_logs_metrics_or_delivery_records() {
    let (unauthorized, failing, ok) = (Sink::http().await, Sink::http().await, Sink::http().await);
    unauthorized.respond_with(vec![
        Reply::status(401).body(json!({"error": "invalid credentials"})),
    ]);
    failing.respond_with(vec![
        Reply::status(500).body(json!({"error": "database down"})),
    ]);
    let dir = tempfile::tempdir().expect("tempdir");
    secrets_config(dir.path(), &unauthorized, &failing, &ok);
    let running = Running::start(
        dir.path(),
        &["--retry-max-attempts", "3", "--record-bodies"],
    )
    .await;
    for i in 0..3 {
        let (status, body) = running
            .post_alerts(&payload(
                json!({"alertname": format!("Leak{i}"), "severity": "critical"}),
            ))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    // The credentials did go where they belong.
    let got = unauthorized.wait_for(3, Duration::from_secs(20)).await;
    assert_eq!(
        got[0].header("authorization"),
        Some(format!("Bearer {BEARER_TOKEN}"))
    );
    assert_eq!(got[0].header("x-api-key").as_deref(), Some(HEADER_SECRET));
    let got = failing.wait_for(9, Duration::from_secs(20)).await;
    assert!(
        got[0]
            .header("authorization")
            .is_some_and(|a| a.starts_with("Basic ")),
        "{got:?}"
    );
    let got = ok.wait_for(3, Duration::from_secs(20)).await;
    assert_eq!(got[0].header("x-api-key").as_deref(), Some(HEADER_SECRET));
    // Nine deliveries: three refused (401), three failed after retries (500), three delivered.
    wait_records(&running, 9).await;
    let failed_log = running
        .wait_log("delivery failed", Duration::from_secs(5))
        .await;
    assert!(
        failed_log.contains("401") && failed_log.contains("500"),
        "{failed_log}"
    );
    let bytes = assert_no_secret_shown(&running).await;
    eprintln!("secrets: {bytes} bytes of log, metrics and records searched, no secret found");
}

#[tokio::test]
async fn secret_values_echoed_back_by_an_endpoint_are_not_logged_or_recorded() {
    // Some endpoints quote what they were sent in their error body ("invalid token tok-...").
    // Herald records a snippet of failed responses: it must not carry the credential along.
    let (unauthorized, failing, ok) = (Sink::http().await, Sink::http().await, Sink::http().await);
    unauthorized.respond_with(vec![Reply::status(401).body(
        json!({"error": format!("token {BEARER_TOKEN} is not valid for key {HEADER_SECRET}")}),
    )]);
    use base64::Engine as _;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("herald:{BASIC_PASSWORD}"));
    failing.respond_with(vec![Reply::status(500).body(
        json!({"error": format!("upstream refused Basic {basic} (password {BASIC_PASSWORD})")}),
    )]);
    let dir = tempfile::tempdir().expect("tempdir");
    secrets_config(dir.path(), &unauthorized, &failing, &ok);
    let running = Running::start(dir.path(), &["--retry-max-attempts", "2"]).await;
    let (status, body) = running
        .post_alerts(&payload(json!({"alertname": "Echo"})))
        .await;
    assert_eq!(status, 200, "{body}");
    unauthorized.wait_for(1, Duration::from_secs(20)).await;
    failing.wait_for(2, Duration::from_secs(20)).await;
    wait_records(&running, 3).await;
    assert_no_secret_shown(&running).await;
}

// ---------------------------------------------------------------------------------------------
// A hostile endpoint
// ---------------------------------------------------------------------------------------------

/// An endpoint that answers every request `500` with a body of `size` bytes, streamed.
async fn endless_error_endpoint(size: usize) -> (String, tokio::task::JoinHandle<()>) {
    static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];
    let app = axum::Router::new().fallback(move || async move {
        let chunks = size / CHUNK.len();
        let body = axum::body::Body::from_stream(futures::stream::iter(
            (0..chunks).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from_static(&CHUNK))),
        ));
        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, body)
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, task)
}

#[tokio::test]
async fn a_huge_error_body_from_an_endpoint_does_not_grow_herald_memory() {
    const BODY: usize = 128 << 20;
    let (url, endpoint) = endless_error_endpoint(BODY).await;
    let dir = tempfile::tempdir().expect("tempdir");
    write_config(dir.path(), &webhook_yaml("hostile", &url, ""));
    let running = Running::start(dir.path(), &["--retry-max-attempts", "2"]).await;
    let pid = herald_pid(dir.path());
    let before = vm_kib(pid, "VmHWM:");
    let (status, body) = running
        .post_alerts(&payload(json!({"alertname": "BigError"})))
        .await;
    assert_eq!(status, 200, "{body}");
    running
        .wait_log("delivery failed", Duration::from_secs(60))
        .await;
    let after = vm_kib(pid, "VmHWM:");
    eprintln!(
        "a {} MiB error body, twice: herald peak RSS {} MiB before, {} MiB after",
        BODY >> 20,
        before / 1024,
        after / 1024
    );
    endpoint.abort();
    assert!(
        after < before + 64 * 1024,
        "reading a {} MiB error body raised herald's peak RSS from {} to {} MiB",
        BODY >> 20,
        before / 1024,
        after / 1024
    );
}
