//! The alert path against a real Alertmanager (and Prometheus): alerts go into Alertmanager's
//! API (or come from a Prometheus rule), Alertmanager notifies `herald run` through its
//! `webhook_configs`, and Herald delivers to loopback sinks with auth, language and filters.
//!
//! Needs Debian's `prometheus-alertmanager` and `prometheus` packages.

use std::path::Path;
use std::time::{Duration, SystemTime};

use alertmanager::{Alertmanager, Prometheus};
use cli::Running;
use herald_testkit::{alertmanager, cli, sink};
use serde_json::{Value, json};
use sink::{Received, Sink};

/// Upper bound for anything to travel Alertmanager -> Herald -> sink (Alertmanager itself
/// waits `group_wait`/`group_interval`, 1 s each here).
const WAIT: Duration = Duration::from_secs(30);
/// Longer than Alertmanager's `group_interval`: a duplicate would show up within it.
const QUIET: Duration = Duration::from_secs(2);

const BEARER: &str = "Bearer am-ops-token-123";
/// `alice:s3cret`.
const BASIC: &str = "Basic YWxpY2U6czNjcmV0";

fn write(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).expect("write manifest");
}

/// `ops`: en, Bearer, only `severity In [critical]`; `oncall-cn`: zh-CN, Basic, only DiskFull.
fn manifests(dir: &Path, ops: &Sink, oncall: &Sink) {
    write(
        dir,
        "webhooks.yaml",
        &format!(
            r#"
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {{name: ops, namespace: default}}
spec:
  type: Alarms
  url: {ops}
  language: en
  auth: {{type: Bearer, secretRef: {{name: ops-auth}}}}
  conditions: [critical-only]
  sendResolved: true
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {{name: oncall-cn, namespace: default}}
spec:
  type: Alarms
  url: {oncall}
  language: zh-CN
  auth: {{type: Basic, secretRef: {{name: oncall-basic}}}}
  eventTypes: [DiskFull]
  sendResolved: true
"#,
            ops = ops.url(),
            oncall = oncall.url(),
        ),
    );
    write(
        dir,
        "conditions.yaml",
        r#"
apiVersion: herald.dev/v1alpha1
kind: NotificationCondition
metadata: {name: critical-only, namespace: default}
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
metadata: {name: ops-auth, namespace: default}
stringData: {token: am-ops-token-123}
---
apiVersion: v1
kind: Secret
metadata: {name: oncall-basic, namespace: default}
data: {username: YWxpY2U=, password: czNjcmV0}
"#,
    );
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The two alerts in Alertmanager's API v2 shape; resolved when `ends_at` is given.
fn alerts(starts_at: &str, ends_at: Option<&str>) -> Value {
    let mut alerts = json!([
        {"labels": {"alertname": "HighCPU", "severity": "critical", "namespace": "default",
                    "instance": "node-1:9100"},
         "annotations": {"summary": "CPU above 90% for 5 minutes"},
         "startsAt": starts_at, "generatorURL": "http://prometheus.test/graph?g0.expr=cpu"},
        {"labels": {"alertname": "DiskFull", "severity": "warning", "node": "node-2"},
         "annotations": {"summary": "Disk /var is 95% full"},
         "startsAt": starts_at, "generatorURL": "http://prometheus.test/graph?g0.expr=disk"},
    ]);
    if let Some(ends_at) = ends_at {
        for alert in alerts.as_array_mut().expect("array") {
            alert["endsAt"] = json!(ends_at);
        }
    }
    alerts
}

fn alertnames(body: &Value) -> Vec<&str> {
    body["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .map(|a| a["labels"]["alertname"].as_str().unwrap_or(""))
        .collect()
}

/// Fingerprint Alertmanager computed for `alertname`, from its `/api/v2/alerts` listing.
fn fingerprint_of<'a>(listed: &'a [Value], alertname: &str) -> &'a str {
    listed
        .iter()
        .find(|a| a["labels"]["alertname"] == alertname)
        .and_then(|a| a["fingerprint"].as_str())
        .unwrap_or_else(|| panic!("alertmanager does not list {alertname}: {listed:?}"))
}

/// What one notification delivered by Herald must say.
struct Expected<'a> {
    authorization: &'a str,
    webhook: &'a str,
    language: &'a str,
    status: &'a str,
    alertname: &'a str,
    /// As Alertmanager computed it.
    fingerprint: &'a str,
}

const OPS: Expected = Expected {
    authorization: BEARER,
    webhook: "ops",
    language: "en",
    status: "firing",
    alertname: "HighCPU",
    fingerprint: "",
};

const ONCALL: Expected = Expected {
    authorization: BASIC,
    webhook: "oncall-cn",
    language: "zh-CN",
    status: "firing",
    alertname: "DiskFull",
    fingerprint: "",
};

/// The common checks of one notification Herald delivered from Alertmanager; returns the body.
fn check_delivery(got: &Received, want: &Expected, am: &Alertmanager) -> Value {
    let Expected {
        authorization,
        webhook,
        language,
        status,
        alertname,
        fingerprint,
    } = *want;
    assert_eq!(got.method, "POST");
    assert_eq!(got.path, "/hook");
    assert_eq!(
        got.header("authorization").as_deref(),
        Some(authorization),
        "{got:?}"
    );
    assert_eq!(
        got.header("content-type").as_deref(),
        Some("application/json")
    );
    assert!(
        got.header("idempotency-key").is_some_and(|k| !k.is_empty()),
        "{got:?}"
    );
    let body = got.json();
    assert_eq!(body["version"], "1", "{body}");
    assert_eq!(body["type"], "Alarms", "{body}");
    assert_eq!(body["test"], false, "{body}");
    assert_eq!(
        body["webhook"],
        json!({"namespace": "default", "name": webhook})
    );
    assert_eq!(body["language"], language, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(alertnames(&body), [alertname], "{body}");
    let alert = &body["alerts"][0];
    assert_eq!(alert["status"], status, "{body}");
    assert_eq!(
        alert["fingerprint"], fingerprint,
        "Alertmanager's fingerprint is passed through: {body}"
    );
    // What only Alertmanager's notification carries: its grouping and its URL.
    assert_eq!(
        body["groupLabels"],
        json!({"alertname": alertname}),
        "{body}"
    );
    assert_eq!(body["externalURL"], am.base(), "{body}");
    body
}

#[tokio::test]
async fn alertmanager_notifies_herald_which_delivers_firing_and_resolved() {
    let (ops, oncall) = (Sink::http().await, Sink::http().await);
    let dir = tempfile::tempdir().expect("tempdir");
    manifests(dir.path(), &ops, &oncall);
    let herald = Running::start(dir.path(), &[]).await;
    let am = Alertmanager::start(&herald.url("/api/v1/alerts")).await;

    // Fire: a critical HighCPU and a warning DiskFull, the way Prometheus posts them.
    let starts_at = rfc3339(SystemTime::now() - Duration::from_secs(60));
    am.push_alerts(&alerts(&starts_at, None)).await;

    // Alertmanager's own view: both alerts active, routed to the herald receiver.
    let listed = am
        .wait_alerts(WAIT, |listed| {
            ["HighCPU", "DiskFull"].iter().all(|name| {
                listed.iter().any(|a| {
                    a["labels"]["alertname"] == *name
                        && a["status"]["state"] == "active"
                        && a["receivers"][0]["name"] == "herald"
                })
            })
        })
        .await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    let high_cpu = fingerprint_of(&listed, "HighCPU").to_string();
    let disk_full = fingerprint_of(&listed, "DiskFull").to_string();

    let got = ops.wait_for(1, WAIT).await;
    let body = check_delivery(
        &got[0],
        &Expected {
            fingerprint: &high_cpu,
            ..OPS
        },
        &am,
    );
    assert_eq!(body["title"], "[FIRING:1] HighCPU", "{body}");
    let message = body["message"].as_str().expect("message");
    assert!(message.contains("HighCPU is firing"), "{message}");
    assert!(message.contains("Severity: critical"), "{message}");
    assert!(
        message.contains("Summary: CPU above 90% for 5 minutes"),
        "{message}"
    );
    assert_eq!(
        body["alerts"][0]["generatorURL"],
        "http://prometheus.test/graph?g0.expr=cpu"
    );

    let got = oncall.wait_for(1, WAIT).await;
    let body = check_delivery(
        &got[0],
        &Expected {
            fingerprint: &disk_full,
            ..ONCALL
        },
        &am,
    );
    let title = body["title"].as_str().expect("title");
    assert!(title.contains("告警中"), "{title}");
    assert_eq!(title, "【告警中】1 条告警：DiskFull");
    let message = body["message"].as_str().expect("message");
    assert!(message.contains("状态：告警中"), "{message}");
    assert!(message.contains("级别：警告"), "{message}");
    assert!(message.contains("节点：node-2"), "{message}");

    // Exactly one notification each: no duplicate from Alertmanager's group_interval
    // re-flushes, and neither alert leaks to the other webhook.
    tokio::join!(
        ops.assert_no_more_within(QUIET),
        oncall.assert_no_more_within(QUIET)
    );
    let (ops_firing_key, oncall_firing_key) = (
        ops.received()[0].header("idempotency-key"),
        oncall.received()[0].header("idempotency-key"),
    );

    // Resolve: the same alerts with endsAt in the past.
    let ends_at = rfc3339(SystemTime::now() - Duration::from_secs(1));
    am.push_alerts(&alerts(&starts_at, Some(&ends_at))).await;

    let got = ops.wait_for(2, WAIT).await;
    let body = check_delivery(
        &got[1],
        &Expected {
            status: "resolved",
            fingerprint: &high_cpu,
            ..OPS
        },
        &am,
    );
    assert_eq!(body["title"], "[RESOLVED:1] HighCPU", "{body}");
    assert_eq!(body["alerts"][0]["endsAt"], ends_at, "{body}");
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("HighCPU is resolved"),
        "{body}"
    );
    assert_ne!(got[1].header("idempotency-key"), ops_firing_key);

    let got = oncall.wait_for(2, WAIT).await;
    let body = check_delivery(
        &got[1],
        &Expected {
            status: "resolved",
            fingerprint: &disk_full,
            ..ONCALL
        },
        &am,
    );
    let title = body["title"].as_str().expect("title");
    assert!(title.contains("已恢复"), "{title}");
    assert_eq!(title, "【已恢复】1 条告警：DiskFull");
    let message = body["message"].as_str().expect("message");
    assert!(message.contains("状态：已恢复"), "{message}");
    assert!(message.contains("结束时间："), "{message}");
    assert_ne!(got[1].header("idempotency-key"), oncall_firing_key);

    // Alertmanager no longer lists them, and nothing more is delivered.
    am.wait_alerts(WAIT, |listed| listed.is_empty()).await;
    tokio::join!(
        ops.assert_no_more_within(QUIET),
        oncall.assert_no_more_within(QUIET)
    );
    assert_eq!((ops.count(), oncall.count()), (2, 2));

    let log = herald.log();
    assert!(
        !log.contains("am-ops-token-123") && !log.contains("s3cret"),
        "secrets in the log:\n{log}"
    );
    assert!(herald.terminate().success());
}

#[tokio::test]
async fn prometheus_rule_fires_through_alertmanager_and_herald() {
    let (ops, oncall) = (Sink::http().await, Sink::http().await);
    let dir = tempfile::tempdir().expect("tempdir");
    manifests(dir.path(), &ops, &oncall);
    let herald = Running::start(dir.path(), &[]).await;
    let am = Alertmanager::start(&herald.url("/api/v1/alerts")).await;
    let prometheus = Prometheus::start(
        r#"groups:
  - name: herald-test
    rules:
      - alert: AlwaysFiring
        expr: vector(1) > 0
        labels: {severity: critical}
        annotations: {summary: "a rule that always fires"}
"#,
        &am,
    )
    .await;

    let got = ops.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].header("authorization").as_deref(),
        Some(BEARER),
        "{:?}",
        got[0]
    );
    let body = got[0].json();
    assert_eq!(alertnames(&body), ["AlwaysFiring"], "{body}");
    assert_eq!(body["status"], "firing", "{body}");
    assert_eq!(body["title"], "[FIRING:1] AlwaysFiring", "{body}");
    let alert = &body["alerts"][0];
    assert_eq!(alert["labels"]["severity"], "critical", "{body}");
    assert_eq!(
        alert["annotations"]["summary"], "a rule that always fires",
        "{body}"
    );
    assert!(
        alert["generatorURL"]
            .as_str()
            .is_some_and(|u| u.starts_with(&prometheus.url("/graph"))),
        "generatorURL points at the Prometheus that evaluated the rule: {body}"
    );
    assert_eq!(body["externalURL"], am.base(), "{body}");

    // AlwaysFiring is not a DiskFull: the zh-CN webhook gets nothing, and Prometheus's
    // resends do not turn into duplicate notifications.
    tokio::join!(
        oncall.assert_none_within(QUIET),
        ops.assert_no_more_within(QUIET)
    );
    drop(prometheus);
    assert!(herald.terminate().success());
}
