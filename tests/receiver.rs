//! The receiver's replies, through real HTTP requests.

use std::net::SocketAddr;
use std::time::Duration;

use herald::delivery::EngineConfig;
use herald::dispatch::Dispatcher;
use herald::receiver::{ReceiverConfig, ServerLimits};
use herald::secret::Sensitive;
use herald_testkit::{core, sink};
use serde_json::{Value, json};
use sink::Sink;

use crate::core::{apply, fast_retry};

/// Serves a receiver on a free loopback port for the rest of the test.
async fn start(dispatcher: Dispatcher, config: ReceiverConfig) -> SocketAddr {
    core::serve_receiver(dispatcher, config, ServerLimits::default()).await
}

fn v1_payload(alerts: Value) -> Value {
    json!({"version": "4", "status": "firing", "receiver": "herald", "groupLabels": {},
           "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am", "alerts": alerts})
}

async fn post(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body, headers)
}

#[tokio::test]
async fn v1_and_v2_payloads_are_accepted_and_delivered() {
    let sink = Sink::http().await;
    let (dispatcher, _) = core::core();
    apply(
        &dispatcher,
        &format!("metadata: {{name: all}}\nspec: {{url: '{}'}}", sink.url()),
        &[],
    )
    .expect("ready");
    let addr = start(dispatcher, ReceiverConfig::default()).await;

    let alerts = json!([{"status": "firing", "labels": {"alertname": "A"}, "annotations": {},
                         "startsAt": "2026-11-25T10:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
                         "generatorURL": "", "fingerprint": "f1"},
                        {"status": "resolved", "labels": {"alertname": "B"}}]);
    let (status, body, _) = post(
        addr,
        "/api/v1/alerts",
        "application/json",
        v1_payload(alerts).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 2);
    assert_eq!(body["deliveries"], 1);

    let v2 = json!([{"labels": {"alertname": "C"}, "annotations": {"summary": "s"}}]);
    let (status, body, _) = post(
        addr,
        "/api/v2/alerts",
        "application/json; charset=utf-8",
        v2.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 1);

    let got = sink.wait_for(2, Duration::from_secs(10)).await;
    let names: Vec<Value> = got
        .iter()
        .flat_map(|r| r.json()["alerts"].as_array().cloned().unwrap_or_default())
        .map(|a| a["labels"]["alertname"].clone())
        .collect();
    assert_eq!(names, [json!("A"), json!("B"), json!("C")]);
    assert_eq!(got[0].json()["externalURL"], "http://am");
}

#[tokio::test]
async fn malformed_payloads_get_400_with_the_json_path() {
    let (dispatcher, _) = core::core();
    let addr = start(dispatcher, ReceiverConfig::default()).await;
    let (status, body, _) = post(
        addr,
        "/api/v1/alerts",
        "application/json",
        r#"{"alerts": [{"labels": {"a": 1}}]}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["path"], "alerts[0].labels.a");
    assert!(
        body["error"]
            .as_str()
            .expect("error")
            .contains("invalid type"),
        "{body}"
    );

    let (status, body, _) = post(addr, "/api/v1/alerts", "application/json", "{not json").await;
    assert_eq!(status, 400);
    assert!(body["error"].is_string());

    let (status, body, _) = post(
        addr,
        "/api/v1/alerts",
        "application/json",
        r#"{"version": "4"}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().expect("error").contains("alerts"),
        "{body}"
    );

    let (status, _, _) = post(
        addr,
        "/api/v2/alerts",
        "application/json",
        r#"{"labels": {}}"#,
    )
    .await;
    assert_eq!(status, 400, "v2 wants an array");

    let (status, _, _) = post(
        addr,
        "/api/v1/alerts",
        "application/json",
        vec![0xff, 0xfe, b'{'],
    )
    .await;
    assert_eq!(status, 400, "invalid UTF-8");
}

#[tokio::test]
async fn oversized_bodies_get_413_and_non_json_gets_415() {
    let (dispatcher, _) = core::core();
    let addr = start(
        dispatcher,
        ReceiverConfig {
            body_limit: 1024,
            ..ReceiverConfig::default()
        },
    )
    .await;
    let big = v1_payload(json!([{"labels": {"alertname": "x".repeat(2000)}}])).to_string();
    let (status, body, _) = post(addr, "/api/v1/alerts", "application/json", big).await;
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].as_str().expect("error").contains("1024"));

    let (status, _, _) = post(addr, "/api/v1/alerts", "text/plain", "{}").await;
    assert_eq!(status, 415);
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/api/v1/alerts"))
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 415, "no content type");
}

#[tokio::test]
async fn receiver_authentication_requires_the_bearer_token() {
    let (dispatcher, _) = core::core();
    let addr = start(
        dispatcher,
        ReceiverConfig {
            token: Some(Sensitive::new("let-me-in".to_string())),
            ..ReceiverConfig::default()
        },
    )
    .await;
    let payload = v1_payload(json!([])).to_string();
    let client = reqwest::Client::new();
    for auth in [None, Some("Bearer wrong"), Some("Basic bGV0LW1lLWlu")] {
        let mut request = client
            .post(format!("http://{addr}/api/v1/alerts"))
            .header("content-type", "application/json")
            .body(payload.clone());
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status().as_u16(), 401, "{auth:?}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    let response = client
        .post(format!("http://{addr}/api/v1/alerts"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer let-me-in")
        .body(payload)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn full_herald_answers_503_with_retry_after_and_loses_nothing_it_accepted() {
    let sink = Sink::http().await;
    // An endpoint that answers only when released keeps deliveries pending; the global limit
    // is 4, of which one webhook may hold half.
    sink.respond_with(vec![sink::Reply::status(200).held()]);
    let dispatcher = Dispatcher::new(
        ["monitoring".to_string()],
        EngineConfig {
            max_pending: 4,
            retry: fast_retry(),
            ..EngineConfig::default()
        },
    )
    .with_policy(herald::delivery::TargetPolicy::allowing_loopback());
    apply(
        &dispatcher,
        &format!("metadata: {{name: slow}}\nspec: {{url: '{}'}}", sink.url()),
        &[],
    )
    .expect("ready");
    // No waiting for room: a full Herald refuses at once.
    let config = ReceiverConfig {
        overload_wait: Duration::ZERO,
        ..ReceiverConfig::default()
    };
    let addr = start(dispatcher, config).await;
    let payload = v1_payload(json!([{"labels": {"alertname": "A"}}])).to_string();
    let mut accepted = 0;
    let mut refused = 0;
    for _ in 0..5 {
        let (status, _, headers) =
            post(addr, "/api/v1/alerts", "application/json", payload.clone()).await;
        match status {
            200 => accepted += 1,
            503 => {
                refused += 1;
                assert_eq!(headers["retry-after"], "10");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(accepted, 2);
    assert_eq!(refused, 3);
    // Everything that got a 200 arrives.
    sink.release();
    sink.wait_for(accepted, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_full_herald_holds_a_batch_until_room_frees_and_refuses_one_that_can_never_fit() {
    let sink = Sink::http().await;
    // Each delivery takes 400 ms; one may be pending.
    sink.respond_with(vec![
        sink::Reply::status(200).delay(Duration::from_millis(400)),
    ]);
    let dispatcher = Dispatcher::new(
        ["monitoring".to_string()],
        EngineConfig {
            max_pending: 1,
            retry: fast_retry(),
            ..EngineConfig::default()
        },
    )
    .with_policy(herald::delivery::TargetPolicy::allowing_loopback());
    for name in ["first", "second"] {
        let condition =
            format!("matchExpressions:\n  - {{key: to, operator: In, values: [{name}, both]}}");
        dispatcher.apply_condition(herald::routing::ConditionInput {
            key: herald::object::ObjectKey::new("monitoring", format!("only-{name}")),
            spec: serde_saphyr::from_str(&condition).expect("condition YAML"),
        });
        apply(
            &dispatcher,
            &format!(
                "metadata: {{name: {name}}}\nspec: {{url: '{}/{name}', conditions: [only-{name}]}}",
                sink.url()
            ),
            &[],
        )
        .expect("ready");
    }
    // Far longer than anything here takes: a refusal that came only after waiting it out
    // would show.
    let wait = Duration::from_secs(60);
    let addr = start(
        dispatcher,
        ReceiverConfig {
            overload_wait: wait,
            ..ReceiverConfig::default()
        },
    )
    .await;
    let to = |target: &str| {
        v1_payload(json!([{"labels": {"alertname": "A", "to": target}}])).to_string()
    };

    let (status, body, _) = post(addr, "/api/v1/alerts", "application/json", to("first")).await;
    assert_eq!((status, &body["deliveries"]), (200, &json!(1)), "{body}");
    // Herald is full: the next batch waits for the first delivery to finish, then gets in.
    // The endpoint answers the first no sooner than 400 ms after it arrived.
    let (status, body, _) = post(addr, "/api/v1/alerts", "application/json", to("second")).await;
    let accepted = std::time::Instant::now();
    assert_eq!((status, &body["deliveries"]), (200, &json!(1)), "{body}");
    let first_arrived = sink.wait_for(1, Duration::from_secs(10)).await[0].at;
    assert!(
        accepted >= first_arrived + Duration::from_millis(400),
        "accepted {:?} after the first delivery arrived, before it could have been answered",
        accepted - first_arrived
    );
    // Two deliveries can never fit under a limit of one: refused without waiting.
    let started = std::time::Instant::now();
    let (status, body, headers) =
        post(addr, "/api/v1/alerts", "application/json", to("both")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["retry-after"], "10");
    assert!(
        started.elapsed() < wait,
        "refused only after waiting {:?} for room",
        started.elapsed()
    );

    let received = sink.wait_for(2, Duration::from_secs(10)).await;
    let mut paths: Vec<String> = received.iter().map(|r| r.path.clone()).collect();
    paths.sort();
    assert_eq!(paths, ["/hook/first", "/hook/second"]);
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let (dispatcher, _) = core::core();
    let addr = start(dispatcher.clone(), ReceiverConfig::default()).await;
    let client = reqwest::Client::new();
    let get = |path: &'static str| {
        let client = client.clone();
        async move {
            client
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .expect("request")
        }
    };
    assert_eq!(get("/healthz").await.status().as_u16(), 200);
    assert_eq!(get("/readyz").await.status().as_u16(), 503);
    dispatcher.set_ready(true);
    assert_eq!(get("/readyz").await.status().as_u16(), 200);

    post(addr, "/api/v1/alerts", "text/plain", "x").await;
    post(
        addr,
        "/api/v1/alerts",
        "application/json",
        v1_payload(json!([{"labels": {"alertname": "A"}}])).to_string(),
    )
    .await;
    let text = get("/metrics").await.text().await.expect("text");
    assert!(
        text.contains(r#"herald_receiver_rejected_total{reason="unsupported_media_type"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"herald_alerts_received_total{endpoint="/api/v1/alerts"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"herald_webhooks{ready="true"} 0"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_rotated_receiver_token_file_takes_effect_without_a_restart() {
    let (dispatcher, _) = core::core();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("token");
    std::fs::write(&file, "first\n").expect("write");
    let addr = start(
        dispatcher,
        ReceiverConfig {
            token_file: Some(file.clone()),
            ..ReceiverConfig::default()
        },
    )
    .await;
    let client = reqwest::Client::new();
    let post = |token: &'static str| {
        let client = client.clone();
        async move {
            client
                .post(format!("http://{addr}/api/v1/alerts"))
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {token}"))
                .body(v1_payload(json!([])).to_string())
                .send()
                .await
                .expect("request")
                .status()
                .as_u16()
        }
    };
    assert_eq!(post("first").await, 200);
    assert_eq!(post("second").await, 401);
    rewrite(&file, "second", 1);
    assert_eq!(post("second").await, 200);
    assert_eq!(post("first").await, 401);
    // A file emptied mid-rotation is read (Herald says so) and keeps the last good token.
    let log = capture_log();
    rewrite(&file, "", 2);
    assert_eq!(post("second").await, 200);
    let warning = format!(
        "receiver token file is empty; keeping the last token file={}",
        file.display()
    );
    let logged = String::from_utf8_lossy(&log.lock().expect("log")).into_owned();
    assert!(logged.contains(&warning), "{logged}");
    assert_eq!(post("first").await, 401);
}

/// Writes `text` to `file` with a modification time of its own (`step` seconds after the
/// epoch), so a reader that goes by the time sees every write, however quick.
fn rewrite(file: &std::path::Path, text: &str, step: u64) {
    std::fs::write(file, text).expect("write");
    std::fs::File::options()
        .write(true)
        .open(file)
        .and_then(|f| f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(step)))
        .expect("set the modification time");
}

/// Everything Herald logs from now on in this test binary (the first caller installs the
/// subscriber), without colours.
fn capture_log() -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    use std::sync::{Arc, Mutex, OnceLock};
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || LogWriter(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        log
    })
    .clone()
}

/// Appends what is logged to a shared buffer.
struct LogWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
