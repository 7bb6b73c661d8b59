//! `herald run`, `check`, `route` and `test` as real processes on manifest folders.

use std::path::Path;
use std::time::Duration;

use cli::{Running, herald};
use herald_testkit::{cli, sink};
use serde_json::{Value, json};
use sink::{Reply, Sink};

const WAIT: Duration = Duration::from_secs(10);

fn write(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).expect("write manifest");
}

fn alert(labels: Value) -> Value {
    json!({"status": "firing", "labels": labels, "annotations": {"summary": "something happened"},
           "startsAt": "2026-11-25T10:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
           "generatorURL": "http://prometheus/graph", "fingerprint": ""})
}

fn payload(alerts: Vec<Value>) -> Value {
    json!({"version": "4", "status": "firing", "receiver": "herald", "groupLabels": {},
           "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://alertmanager", "alerts": alerts})
}

fn alertnames(body: &Value) -> Vec<String> {
    body["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .map(|a| a["labels"]["alertname"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Four sinks behind four webhooks: bearer + condition, basic + zh-CN + eventTypes, a tenant, a disabled one.
fn config(dir: &Path, ops: &Sink, oncall: &Sink, tenant: &Sink, disabled: &Sink) {
    write(
        dir,
        "webhooks.yaml",
        &format!(
            r#"
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {{name: ops}}
spec:
  url: {ops}
  auth: {{type: Bearer, secretRef: {{name: ops-auth}}}}
  conditions: [critical-only]
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {{name: oncall-cn}}
spec:
  url: {oncall}
  language: zh-CN
  auth: {{type: Basic, secretRef: {{name: oncall-basic}}}}
  eventTypes: [NodeDown]
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {{name: tenant, namespace: team-a}}
spec:
  url: {tenant}
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {{name: paused}}
spec: {{url: "{disabled}", enabled: false}}
"#,
            ops = ops.url(),
            oncall = oncall.url(),
            tenant = tenant.url(),
            disabled = disabled.url()
        ),
    );
    write(
        dir,
        "conditions.yaml",
        r#"
apiVersion: herald.dev/v1alpha1
kind: NotificationCondition
metadata: {name: critical-only}
spec:
  matchExpressions:
    - {key: severity, operator: In, values: [critical]}
"#,
    );
    write(
        dir,
        "secrets.yaml",
        r#"
apiVersion: v1
kind: Secret
metadata: {name: ops-auth}
stringData: {token: ops-token-123}
---
apiVersion: v1
kind: Secret
metadata: {name: oncall-basic}
data: {username: YWxpY2U=, password: czNjcmV0}
"#,
    );
}

#[tokio::test]
async fn run_delivers_exactly_the_right_alerts_with_auth_and_language() {
    let (ops, oncall, tenant, disabled) = (
        Sink::http().await,
        Sink::http().await,
        Sink::http().await,
        Sink::http().await,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    config(dir.path(), &ops, &oncall, &tenant, &disabled);
    let herald = Running::start(dir.path(), &[]).await;

    let (status, body) = herald
        .post_alerts(&payload(vec![
            alert(json!({"alertname": "HighCPU", "severity": "critical", "namespace": "team-a"})),
            alert(json!({"alertname": "NodeDown", "severity": "warning"})),
            alert(json!({"alertname": "DiskFull", "severity": "critical", "namespace": "team-b"})),
        ]))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 3);

    let got = ops.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].header("authorization").as_deref(),
        Some("Bearer ops-token-123")
    );
    assert_eq!(alertnames(&got[0].json()), ["HighCPU", "DiskFull"]);
    assert_eq!(got[0].json()["language"], "en");
    assert_eq!(got[0].json()["title"], "[FIRING:2] DiskFull, HighCPU");

    let got = oncall.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].header("authorization").as_deref(),
        Some("Basic YWxpY2U6czNjcmV0")
    );
    let body = got[0].json();
    assert_eq!(alertnames(&body), ["NodeDown"]);
    assert_eq!(body["language"], "zh-CN");
    assert_eq!(body["title"], "【告警中】1 条告警：NodeDown");
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("级别：警告")
    );

    let got = tenant.wait_for(1, WAIT).await;
    assert_eq!(
        alertnames(&got[0].json()),
        ["HighCPU"],
        "a tenant sees only its namespace"
    );
    assert_eq!(got[0].header("authorization"), None);

    disabled
        .assert_none_within(Duration::from_millis(500))
        .await;
    ops.assert_no_more_within(Duration::from_millis(100)).await;
    let log = herald.log();
    assert!(
        !log.contains("ops-token-123") && !log.contains("s3cret"),
        "secrets in the log:\n{log}"
    );
    assert!(herald.terminate().success());
}

#[tokio::test]
async fn run_reloads_changes_and_reports_bad_files_without_dropping_good_ones() {
    let (first, second) = (Sink::http().await, Sink::http().await);
    let dir = tempfile::tempdir().expect("tempdir");
    let webhook = |url: String, enabled: bool| {
        format!(
            "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: hook}}\nspec: {{url: '{url}', enabled: {enabled}}}\n"
        )
    };
    write(dir.path(), "hook.yaml", &webhook(first.url(), true));
    let herald = Running::start(dir.path(), &[]).await;
    let one = payload(vec![alert(json!({"alertname": "A"}))]);

    assert_eq!(herald.post_alerts(&one).await.0, 200);
    first.wait_for(1, WAIT).await;

    // A broken file beside it: reported with file and field, the good webhook keeps working.
    write(
        dir.path(),
        "broken.yaml",
        "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {name: broken}\nspec: {url: 'ftp://nope'}\n",
    );
    let log = herald.wait_log("broken.yaml", WAIT).await;
    assert!(
        log.contains("url must be an absolute http or https URL"),
        "{log}"
    );
    assert_eq!(herald.post_alerts(&one).await.0, 200);
    first.wait_for(2, WAIT).await;

    // Point the webhook elsewhere.
    write(dir.path(), "hook.yaml", &webhook(second.url(), true));
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        assert_eq!(herald.post_alerts(&one).await.0, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
        if second.count() > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reload never took effect:\n{}",
            herald.log()
        );
    }

    // Disable it: once the reload lands the receiver routes to nobody, and nothing more arrives.
    write(dir.path(), "hook.yaml", &webhook(second.url(), false));
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, body) = herald.post_alerts(&one).await;
        assert_eq!(status, 200);
        if body["deliveries"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "disable never took effect:\n{}",
            herald.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let what was queued before the reload land, then nothing more may arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (before_first, before_second) = (first.count(), second.count());
    let (status, body) = herald.post_alerts(&one).await;
    assert_eq!((status, body["deliveries"].clone()), (200, json!(0)));
    second
        .assert_no_more_within(Duration::from_millis(300))
        .await;
    assert_eq!(
        (first.count(), second.count()),
        (before_first, before_second)
    );
}

#[tokio::test]
async fn check_validates_like_the_api_server_and_prints_the_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "ok.yaml",
        "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {name: good, namespace: monitoring}\nspec: {url: 'https://x.example/h', conditions: [missing]}\n",
    );
    let out = herald(&["check", dir.path().to_str().expect("path")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("monitoring/good"), "{stdout}");
    assert!(stdout.contains("ConditionNotFound"), "{stdout}");

    write(
        dir.path(),
        "bad.yaml",
        "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {name: bad}\nspec: {url: 'https://x', auth: {type: Bearer}}\n---\napiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {name: worse}\nspec: {url: 'https://x', language: fr}\n",
    );
    let out = herald(&["check", dir.path().to_str().expect("path")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad.yaml (document 1): spec.auth.secretRef: auth.secretRef is required"),
        "{stderr}"
    );
    assert!(
        stderr.contains("bad.yaml (document 2): spec.language: unknown variant `fr`"),
        "{stderr}"
    );
}

#[tokio::test]
async fn route_explains_every_verdict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, c, d) = (
        Sink::http().await,
        Sink::http().await,
        Sink::http().await,
        Sink::http().await,
    );
    config(dir.path(), &a, &b, &c, &d);
    let alerts = dir.path().join("alerts.json");
    std::fs::write(
        &alerts,
        r#"[{"labels": {"alertname": "DiskFull", "severity": "warning", "namespace": "team-a"}}]"#,
    )
    .expect("write");
    let config_dir = tempfile::tempdir().expect("tempdir");
    for f in ["webhooks.yaml", "conditions.yaml", "secrets.yaml"] {
        std::fs::copy(dir.path().join(f), config_dir.path().join(f)).expect("copy");
    }
    let out = herald(&[
        "route",
        "--config",
        config_dir.path().to_str().expect("path"),
        "--alerts",
        alerts.to_str().expect("path"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("x  default/ops: condition critical-only failed on label severity (In)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"x  default/oncall-cn: event type "DiskFull" not in eventTypes"#),
        "{stdout}"
    );
    assert!(stdout.contains("x  default/paused: disabled"), "{stdout}");
    assert!(stdout.contains("-> team-a/tenant"), "{stdout}");
}

#[tokio::test]
async fn test_command_prints_the_outcome_and_fails_on_rejection() {
    let ok = Sink::http().await;
    let denied = Sink::http().await;
    denied.respond_with(vec![Reply::status(401)]);
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "hooks.yaml",
        &format!(
            "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: ok, namespace: ops}}\nspec: {{url: '{}'}}\n---\napiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: denied, namespace: ops}}\nspec: {{url: '{}'}}\n",
            ok.url(),
            denied.url()
        ),
    );
    let config = dir.path().to_str().expect("path").to_string();
    let binary = cli::binary();
    let run = |name: &str| {
        let config = config.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(binary)
                .args(["test", &name, "-n", "ops", "--config", &config])
                .output()
                .expect("run herald test")
        })
    };
    let out = run("ok").await.expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("Succeeded, HTTP status 200"), "{stdout}");
    assert_eq!(ok.received()[0].json()["test"], true);

    let out = run("denied").await.expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("Failed, HTTP status 401"), "{stdout}");

    let out = run("nope").await.expect("join");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("webhook ops/nope not found"));
}

#[tokio::test]
async fn the_readme_example_alert_gets_the_reply_the_readme_shows() {
    let repo = herald_testkit::repo_root();
    // The README's "Run it" section: the reply to the curl command, on the line after it.
    let readme = std::fs::read_to_string(repo.join("README.md")).expect("README.md");
    let lines: Vec<&str> = readme.lines().collect();
    let curl = lines
        .iter()
        .position(|l| l.contains("--data @examples/alerts/critical.json"))
        .expect("the README posts examples/alerts/critical.json");
    let shown: Value = lines
        .get(curl + 1)
        .and_then(|l| l.trim().strip_prefix("# "))
        .and_then(|reply| serde_json::from_str(reply).ok())
        .unwrap_or_else(|| panic!("no JSON reply after the README's curl line {curl}"));

    let herald = Running::start(&repo.join("examples/herald"), &[]).await;
    let alert: Value = serde_json::from_str(
        &std::fs::read_to_string(repo.join("examples/alerts/critical.json"))
            .expect("examples/alerts/critical.json"),
    )
    .expect("critical.json is JSON");
    let (status, reply) = herald.post_alerts(&alert).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply, shown,
        "the README shows {shown}, Herald answers {reply}"
    );
}
