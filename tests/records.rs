//! Delivery records, replay and the durable store, through the `herald` binary.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use cli::{Running, herald};
use herald_testkit::{cli, sink};
use serde_json::{Value, json};
use sink::{Reply, Sink};

const WAIT: Duration = Duration::from_secs(20);

fn config(dir: &Path, hooks: &[(&str, &Sink)]) {
    let mut yaml = String::new();
    for (name, sink) in hooks {
        yaml.push_str(&format!(
            "---\napiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: {name}}}\nspec: {{url: '{}'}}\n",
            sink.url()
        ));
    }
    std::fs::write(dir.join("hooks.yaml"), yaml).expect("write");
}

fn payload(name: &str) -> Value {
    json!({"version": "4", "status": "firing", "alerts": [{"status": "firing", "labels": {"alertname": name}}]})
}

fn deliveries(admin: &str, args: &[&str]) -> String {
    let mut all = vec!["deliveries", "--server", admin];
    all.extend_from_slice(args);
    let out = herald(&all);
    assert!(
        out.status.success(),
        "herald deliveries: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn records(admin: &str, query: &str) -> Vec<Value> {
    let body: Value = reqwest::get(format!("{admin}/api/v1/deliveries?{query}"))
        .await
        .expect("admin")
        .json()
        .await
        .expect("json");
    body["deliveries"].as_array().cloned().unwrap_or_default()
}

async fn wait_records(admin: &str, query: &str, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let found = records(admin, query).await;
        if found.len() >= n {
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} records for {query}",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn records_list_outcomes_replay_and_survive_a_restart() {
    let (good, bad) = (Sink::http().await, Sink::http().await);
    bad.respond_with(vec![Reply::status(400)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    config(dir.path(), &[("good", &good), ("bad", &bad)]);
    let data_arg = data.path().to_str().expect("path").to_string();
    let running = Running::start(dir.path(), &["--data-dir", &data_arg]).await;
    for name in ["One", "Two"] {
        assert_eq!(running.post_alerts(&payload(name)).await.0, 200);
    }
    good.wait_for(2, WAIT).await;
    bad.wait_for(2, WAIT).await;
    let admin = running.admin_url();
    let all = wait_records(&admin, "", 4).await;
    assert_eq!(all.len(), 4);

    let listing = deliveries(&admin, &[]);
    assert_eq!(listing.matches("Succeeded").count(), 2, "{listing}");
    assert_eq!(listing.matches("Failed").count(), 2, "{listing}");
    let failed = deliveries(&admin, &["--failed"]);
    assert!(
        failed.contains("default/bad") && !failed.contains("default/good"),
        "{failed}"
    );
    assert!(failed.contains(" 400 "), "{failed}");
    let only_good = deliveries(&admin, &["--webhook", "default/good"]);
    assert_eq!(only_good.matches("default/good").count(), 2, "{only_good}");

    // Replay a dead letter: a new attempt with the same Idempotency-Key.
    let dead = records(&admin, "outcome=Failed").await;
    let id = dead[0]["id"].as_str().expect("id").to_string();
    bad.respond_with(vec![Reply::status(200)]);
    let out = herald(&["deliveries", "--server", &admin, "replay", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = bad.wait_for(3, WAIT).await;
    assert_eq!(
        got[2].header("idempotency-key").as_deref(),
        Some(id.as_str())
    );
    let replayed = wait_records(&admin, "outcome=Succeeded&webhook=default/bad", 1).await;
    assert_eq!(replayed[0]["id"], id);

    // A success without --record-bodies has no content to replay.
    let ok = records(&admin, "outcome=Succeeded&webhook=default/good").await;
    let out = herald(&[
        "deliveries",
        "--server",
        &admin,
        "replay",
        ok[0]["id"].as_str().expect("id"),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("without its content"));
    // An unknown id: refused by the admin listener with 404, named in the error.
    let unknown = herald(&["deliveries", "--server", &admin, "replay", "nope"]);
    assert!(!unknown.status.success());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains("replay refused (404 Not Found): no delivery record nope"),
        "{stderr}"
    );

    // Records survive a restart with --data-dir.
    let before = records(&admin, "").await;
    assert!(running.terminate().success());
    let running = Running::start(dir.path(), &["--data-dir", &data_arg]).await;
    let after = records(&running.admin_url(), "").await;
    let ids = |r: &[Value]| r.iter().map(|v| v["id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&after), ids(&before));
}

#[tokio::test]
async fn nothing_accepted_is_lost_when_herald_is_killed_with_deliveries_pending() {
    const N: usize = 20;
    let sink = Sink::http().await;
    // The endpoint is down: every attempt fails and is retried.
    sink.respond_with(vec![Reply::status(503)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = tempfile::tempdir().expect("tempdir");
    config(dir.path(), &[("hook", &sink)]);
    let data_arg = data.path().to_str().expect("path").to_string();
    let running = Running::start(dir.path(), &["--data-dir", &data_arg]).await;
    for i in 0..N {
        let (status, body) = running.post_alerts(&payload(&format!("A{i}"))).await;
        assert_eq!(status, 200, "{body}");
    }
    // At least one attempt reached the dead endpoint before the kill.
    sink.wait_for(1, WAIT).await;
    running.kill9();

    sink.respond_with(vec![Reply::status(200)]);
    let before_restart = sink.count();
    let _running = Running::start(dir.path(), &["--data-dir", &data_arg]).await;
    let deadline = std::time::Instant::now() + WAIT;
    let delivered = loop {
        let ok: HashMap<String, String> = sink
            .received()
            .iter()
            .skip(before_restart)
            .map(|r| {
                let name = r.json()["alerts"][0]["labels"]["alertname"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                (name, idempotency_key(r))
            })
            .collect();
        if ok.len() == N {
            break ok;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {N} delivered after the restart",
            ok.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Every alert arrived, and each one tried before the kill kept the key of that attempt.
    let received = sink.received();
    let mut before_kill: HashMap<String, String> = HashMap::new();
    for r in &received[..before_restart] {
        let name = r.json()["alerts"][0]["labels"]["alertname"]
            .as_str()
            .unwrap_or("")
            .to_string();
        before_kill.insert(name, idempotency_key(r));
    }
    assert!(!before_kill.is_empty());
    for (name, key) in &before_kill {
        assert_eq!(
            delivered.get(name),
            Some(key),
            "{name} changed its Idempotency-Key across the restart"
        );
    }
    assert_eq!(delivered.len(), N);
    eprintln!(
        "pending at kill: {N}; requests before kill: {before_restart}; delivered after restart: {}; total requests {}",
        delivered.len(),
        sink.count()
    );
}

/// The Idempotency-Key of a delivery; fails the test when it is missing or empty.
fn idempotency_key(request: &sink::Received) -> String {
    let key = request.header("idempotency-key").unwrap_or_default();
    assert!(!key.is_empty(), "a delivery without an Idempotency-Key");
    key
}
