//! Alertmanager's protocols in: payloads written by other projects (Alertmanager's `amtool`,
//! notification-manager's test data in tests/fixtures/upstream) are read the way Alertmanager
//! reads them, and `format: alertmanager` passes on every field of Alertmanager's webhook
//! message (`notify/webhook.Message`, `template.Data`).

use std::net::SocketAddr;
use std::time::Duration;

use herald::alert::PayloadLimits;
use herald::dispatch::Dispatcher;
use herald::receiver::{ReceiverConfig, ServerLimits};
use herald_testkit::{alertmanager, core, sink};
use serde_json::{Value, json};
use sink::Sink;

use crate::core::{apply, post_json as post};

const WAIT: Duration = Duration::from_secs(10);
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

async fn start(dispatcher: Dispatcher, config: ReceiverConfig) -> SocketAddr {
    core::serve_receiver(dispatcher, config, ServerLimits::default()).await
}

/// Posts an API v2 alert array.
async fn post_v2(addr: SocketAddr, alerts: Value) -> (u16, Value) {
    post(addr, "/api/v2/alerts", alerts.to_string()).await
}

/// A core with one webhook, `am`, in `format: alertmanager` (and `extra` spec lines), and its
/// receiver.
async fn one_webhook(sink: &Sink, extra: &str, config: ReceiverConfig) -> SocketAddr {
    let (dispatcher, _) = core::core();
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: am}}\nspec: {{url: '{}', format: alertmanager{extra}}}",
            sink.url()
        ),
        &[],
    )
    .expect("ready");
    start(dispatcher, config).await
}

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/upstream/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn parse_time(text: &str) -> k8s_openapi::jiff::Timestamp {
    text.parse()
        .unwrap_or_else(|e| panic!("{text:?} is not RFC 3339: {e}"))
}

#[tokio::test]
async fn amtool_alert_add_is_firing_with_a_real_start_and_goes_to_a_webhook_without_resolved() {
    let sink = Sink::http().await;
    let addr = one_webhook(&sink, ", sendResolved: false", ReceiverConfig::default()).await;
    let before = k8s_openapi::jiff::Timestamp::now();
    // amtool posts both times as Go's zero time.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("amtool")
            .args([
                "alert",
                "add",
                "foo",
                "node=bar",
                &format!("--alertmanager.url=http://{addr}"),
            ])
            .output()
    })
    .await
    .expect("join")
    .expect("amtool (Debian's prometheus-alertmanager) runs");
    assert!(
        out.status.success(),
        "amtool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = sink.wait_for(1, WAIT).await;
    let alert = &got[0].json()["alerts"][0];
    assert_eq!(alert["status"], "firing", "{alert}");
    assert_eq!(alert["labels"], json!({"alertname": "foo", "node": "bar"}));
    assert!(
        parse_time(alert["startsAt"].as_str().expect("startsAt"))
            >= before - Duration::from_secs(1),
        "a zero start is read as now: {alert}"
    );
    assert_eq!(
        alert["endsAt"], ZERO_TIME,
        "a firing alert's end, as Alertmanager writes it"
    );
}

#[tokio::test]
async fn missing_times_are_never_written_as_empty_strings() {
    let sink = Sink::http().await;
    let addr = one_webhook(&sink, "", ReceiverConfig::default()).await;
    let (status, body) = post_v2(
        addr,
        json!([{"labels": {"alertname": "NoTimes"}},
               {"labels": {"alertname": "OnlyEnd"}, "endsAt": "2026-01-01T00:00:00Z"}]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let got = sink.wait_for(1, WAIT).await;
    let alerts = got[0].json()["alerts"].clone();
    for alert in alerts.as_array().expect("alerts") {
        for field in ["startsAt", "endsAt"] {
            // What Go's time.Time (template.Data) can read: RFC 3339, never "".
            parse_time(alert[field].as_str().expect("a string"));
        }
    }
    assert_eq!(alerts[0]["status"], "firing");
    assert_eq!(alerts[0]["endsAt"], ZERO_TIME);
    // A start left out is the end, as Alertmanager's API v2 sets it.
    assert_eq!(alerts[1]["status"], "resolved");
    assert_eq!(alerts[1]["startsAt"], "2026-01-01T00:00:00Z");
    assert_eq!(alerts[1]["endsAt"], "2026-01-01T00:00:00Z");
}

#[tokio::test]
async fn a_513000_character_annotation_is_taken_by_default_and_a_limit_refuses_only_its_alert() {
    // The size Alertmanager's own tests use (notify/pagerduty/pagerduty_test.go).
    let long = "a".repeat(513_000);
    let payload = json!({"version": "4", "status": "firing", "receiver": "herald",
        "alerts": [{"status": "firing", "labels": {"alertname": "Long"},
                    "annotations": {"description": long}, "startsAt": "2026-11-25T10:00:00Z"},
                   {"status": "firing", "labels": {"alertname": "Short"},
                    "startsAt": "2026-11-25T10:00:00Z"}]})
    .to_string();

    let sink = Sink::http().await;
    let addr = one_webhook(&sink, "", ReceiverConfig::default()).await;
    let (status, body) = post(addr, "/api/v1/alerts", payload.clone()).await;
    assert_eq!((status, &body["accepted"]), (200, &json!(2)), "{body}");
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].json()["alerts"][0]["annotations"]["description"]
            .as_str()
            .map(str::len),
        Some(513_000)
    );

    // A tighter limit refuses the one alert, names it, and takes the other.
    let sink = Sink::http().await;
    let config = ReceiverConfig {
        payload: PayloadLimits {
            max_value_bytes: 64 * 1024,
            ..PayloadLimits::default()
        },
        ..ReceiverConfig::default()
    };
    let addr = one_webhook(&sink, "", config).await;
    let (status, body) = post(addr, "/api/v1/alerts", payload).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["accepted"], 1);
    assert_eq!(
        body["refused"][0]["path"],
        "alerts[0].annotations.description"
    );
    assert!(
        body["refused"][0]["error"]
            .as_str()
            .expect("error")
            .contains("513000 bytes; at most 65536"),
        "{body}"
    );
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].json()["alerts"][0]["labels"]["alertname"], "Short");
}

#[tokio::test]
async fn truncated_alerts_and_every_message_field_pass_through_format_alertmanager() {
    let sink = Sink::http().await;
    let addr = one_webhook(&sink, "", ReceiverConfig::default()).await;
    let payload = json!({
        "version": "4",
        "groupKey": "{}/{severity=\"critical\"}:{alertname=\"DiskFull\"}",
        "truncatedAlerts": 3,
        "status": "firing",
        "receiver": "team-storage",
        "groupLabels": {"alertname": "DiskFull"},
        "commonLabels": {"alertname": "DiskFull", "severity": "critical"},
        "commonAnnotations": {},
        "routeLabels": {"team": "storage"},
        "externalURL": "http://alertmanager:9093",
        "notification_reason": "new_alerts",
        "alerts": [{"status": "firing", "labels": {"alertname": "DiskFull", "severity": "critical"},
                    "annotations": {}, "startsAt": "2026-11-25T10:00:00Z",
                    "endsAt": ZERO_TIME, "generatorURL": "http://prometheus/graph",
                    "fingerprint": "1a2b3c4d5e6f7a8b"}]
    });
    let (status, body) = post(addr, "/api/v1/alerts", payload.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let got = sink.wait_for(1, WAIT).await;
    let sent = got[0].json();
    assert_eq!(
        sent, payload,
        "every field of Alertmanager's message, as it came"
    );
}

#[tokio::test]
async fn notification_manager_fixtures_are_forwarded_as_they_came() {
    for name in [
        "notification-manager/alert.json",
        "notification-manager/alert1.json",
        "notification-manager/alerts-without-namespace.json",
    ] {
        let sink = Sink::http().await;
        let addr = one_webhook(&sink, "", ReceiverConfig::default()).await;
        let text = fixture(name);
        let original: Value = serde_json::from_str(&text).expect("fixture JSON");
        let (status, body) = post(addr, "/api/v1/alerts", text).await;
        assert_eq!(status, 200, "{name}: {body}");
        let got = sink.wait_for(1, WAIT).await;
        let sent = got[0].json();
        for field in ["receiver", "status", "groupLabels", "externalURL"] {
            assert_eq!(sent[field], original[field], "{name}: {field}");
        }
        let alerts = original["alerts"].as_array().expect("alerts");
        assert_eq!(sent["alerts"].as_array().map(Vec::len), Some(alerts.len()));
        for (sent, original) in sent["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .zip(alerts)
        {
            // Alertmanager drops empty-valued labels; these fixtures have none.
            for field in [
                "status",
                "labels",
                "annotations",
                "startsAt",
                "endsAt",
                "fingerprint",
            ] {
                assert_eq!(sent[field], original[field], "{name}: {field}");
            }
        }
    }
}

#[tokio::test]
async fn empty_valued_labels_are_removed_before_routing() {
    let sink = Sink::http().await;
    let (dispatcher, _) = core::core();
    dispatcher.apply_condition(herald::routing::ConditionInput {
        key: herald::object::ObjectKey::new("monitoring", "no-team"),
        spec: serde_saphyr::from_str("matchExpressions:\n  - {key: team, operator: DoesNotExist}")
            .expect("condition YAML"),
    });
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: am}}\nspec: {{url: '{}', format: alertmanager, conditions: [no-team]}}",
            sink.url()
        ),
        &[],
    )
    .expect("ready");
    let addr = start(dispatcher, ReceiverConfig::default()).await;
    let (status, body) = post_v2(addr, json!([{"labels": {"alertname": "A", "team": ""}}])).await;
    assert_eq!((status, &body["deliveries"]), (200, &json!(1)), "{body}");
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].json()["alerts"][0]["labels"],
        json!({"alertname": "A"})
    );
}

#[tokio::test]
async fn an_alert_without_labels_is_refused_alone_and_null_annotations_are_accepted() {
    let sink = Sink::http().await;
    let addr = one_webhook(&sink, "", ReceiverConfig::default()).await;
    let (status, body) = post_v2(
        addr,
        json!([{"labels": {}, "annotations": {"summary": "no labels"}},
               {"labels": {"only": ""}},
               {"labels": {"alertname": "Kept"}, "annotations": null}]),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["accepted"], 1);
    let refused: Vec<_> = body["refused"]
        .as_array()
        .expect("refused")
        .iter()
        .map(|r| (r["path"].clone(), r["error"].clone()))
        .collect();
    assert_eq!(
        refused,
        [
            (
                json!("[0].labels"),
                json!("at least one label pair required")
            ),
            (
                json!("[1].labels"),
                json!("at least one label pair required")
            ),
        ]
    );
    let got = sink.wait_for(1, WAIT).await;
    let alert = &got[0].json()["alerts"][0];
    assert_eq!(alert["labels"], json!({"alertname": "Kept"}));
    assert_eq!(alert["annotations"], json!({}));
}

#[tokio::test]
async fn each_endpoint_points_to_the_other_for_the_other_shape() {
    let sink = Sink::http().await;
    let addr = one_webhook(&sink, "", ReceiverConfig::default()).await;
    let (status, body) = post(
        addr,
        "/api/v1/alerts",
        json!([{"labels": {"alertname": "A"}}]).to_string(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .expect("error")
            .contains("POST it to /api/v2/alerts"),
        "{body}"
    );
    let (status, body) = post_v2(addr, json!({"alerts": [{"labels": {"alertname": "A"}}]})).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .expect("error")
            .contains("POST it to /api/v1/alerts"),
        "{body}"
    );
}

#[tokio::test]
async fn a_real_alertmanager_s_truncated_alerts_and_group_key_reach_the_webhook() {
    let sink = Sink::http().await;
    let addr = one_webhook(&sink, "", ReceiverConfig::default()).await;
    let am = alertmanager::Alertmanager::start_with(
        &format!("http://{addr}/api/v1/alerts"),
        "        max_alerts: 1",
    )
    .await;
    let alerts: Vec<Value> = (0..3)
        .map(|i| json!({"labels": {"alertname": "Truncated", "instance": format!("i{i}"), "empty": ""}}))
        .collect();
    am.push_alerts(&json!(alerts)).await;
    let got = sink.wait_for(1, Duration::from_secs(30)).await;
    let sent = got[0].json();
    assert_eq!(sent["truncatedAlerts"], 2, "{sent}");
    assert_eq!(sent["receiver"], "herald");
    assert_eq!(sent["externalURL"], am.base());
    let group_key = sent["groupKey"].as_str().expect("groupKey");
    assert!(
        group_key.contains("alertname=\"Truncated\""),
        "Alertmanager's own key: {group_key}"
    );
    assert_eq!(sent["alerts"].as_array().map(Vec::len), Some(1));
    let alert = &sent["alerts"][0];
    assert_eq!(alert["endsAt"], ZERO_TIME);
    assert!(alert["labels"].get("empty").is_none(), "{alert}");
}
