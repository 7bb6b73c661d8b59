//! Delivery against real HTTP and HTTPS servers on loopback.

use std::time::Duration;

use herald::crd::WebhookType;
use herald::object::NotReadyReason;
use herald::outgoing::ReportOutcome;
use herald_testkit::{core, sink};
use sink::{Reply, Sink, TestPki};

use crate::core::{apply, batch, core, secret};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn bearer_and_basic_credentials_arrive_with_only_the_matching_alerts() {
    let bearer_sink = Sink::http().await;
    let basic_sink = Sink::http().await;
    let (dispatcher, _) = core();
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: bearer}}\nspec: {{url: '{}', auth: {{type: Bearer, secretRef: {{name: tok}}}}, eventTypes: [HighCPU]}}",
            bearer_sink.url()
        ),
        &[("tok", secret(&[("token", "s3cr3t-token")]))],
    )
    .expect("bearer ready");
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: basic}}\nspec: {{url: '{}', language: zh-CN, auth: {{type: Basic, secretRef: {{name: up}}}}}}",
            basic_sink.url()
        ),
        &[("up", secret(&[("username", "alice"), ("password", "pa:ss")]))],
    )
    .expect("basic ready");

    let summary = dispatcher
        .dispatch(
            batch(&[&[("alertname", "HighCPU")], &[("alertname", "DiskFull")]]),
            WebhookType::Alarms,
        )
        .expect("accepted");
    assert_eq!(summary.queued, 2);

    let got = bearer_sink.wait_for(1, WAIT).await;
    assert_eq!(
        got[0].header("authorization").as_deref(),
        Some("Bearer s3cr3t-token")
    );
    let body = got[0].json();
    assert_eq!(
        body["alerts"].as_array().expect("alerts").len(),
        1,
        "only HighCPU matched"
    );
    assert_eq!(body["alerts"][0]["labels"]["alertname"], "HighCPU");
    assert_eq!(
        body["webhook"],
        serde_json::json!({"namespace": "monitoring", "name": "bearer"})
    );
    assert_eq!(body["version"], "1");
    assert_eq!(body["test"], false);
    assert_eq!(
        got[0].header("content-type").as_deref(),
        Some("application/json")
    );
    assert!(
        got[0]
            .header("user-agent")
            .expect("ua")
            .starts_with("herald/")
    );
    assert!(got[0].header("idempotency-key").is_some());
    // The Host header Herald writes once per webhook: host and port, as the URL has them.
    let url = url::Url::parse(&bearer_sink.url()).expect("sink url");
    assert_eq!(
        got[0].header("host"),
        Some(format!(
            "{}:{}",
            url.host_str().expect("host"),
            url.port().expect("port")
        ))
    );

    let got = basic_sink.wait_for(1, WAIT).await;
    // base64("alice:pa:ss")
    assert_eq!(
        got[0].header("authorization").as_deref(),
        Some("Basic YWxpY2U6cGE6c3M=")
    );
    let body = got[0].json();
    assert_eq!(body["alerts"].as_array().expect("alerts").len(), 2);
    assert_eq!(body["language"], "zh-CN");
    assert!(
        body["title"].as_str().expect("title").contains("告警中"),
        "{}",
        body["title"]
    );
}

#[tokio::test]
async fn self_signed_endpoint_needs_skip_verify_or_its_ca() {
    let pki = TestPki::generate();
    let sink = Sink::https(&pki).await;
    let (dispatcher, reports) = core();
    let url = sink.url();
    apply(
        &dispatcher,
        &format!("metadata: {{name: strict}}\nspec: {{url: '{url}'}}"),
        &[],
    )
    .expect("ready");
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: skip}}\nspec: {{url: '{url}', tls: {{insecureSkipVerify: true}}}}"
        ),
        &[],
    )
    .expect("ready");
    apply(
        &dispatcher,
        &format!("metadata: {{name: with-ca}}\nspec: {{url: '{url}', tls: {{caSecretRef: {{name: ca, key: ca.crt}}}}}}"),
        &[("ca", secret(&[("ca.crt", &pki.ca_pem)]))],
    )
    .expect("ready");

    dispatcher
        .dispatch(batch(&[&[("alertname", "X")]]), WebhookType::Alarms)
        .expect("accepted");

    let strict = reports.wait_for("monitoring/strict", WAIT).await;
    assert_eq!(strict.outcome, ReportOutcome::Failed);
    assert!(
        strict.message.to_lowercase().contains("certificate"),
        "{}",
        strict.message
    );
    assert_eq!(
        reports.wait_for("monitoring/skip", WAIT).await.outcome,
        ReportOutcome::Succeeded
    );
    assert_eq!(
        reports.wait_for("monitoring/with-ca", WAIT).await.outcome,
        ReportOutcome::Succeeded
    );
    // Two succeeded; the strict one never completed a request.
    assert_eq!(sink.count(), 2);
}

#[tokio::test]
async fn retryable_answers_are_retried_with_the_same_idempotency_key() {
    let sink = Sink::http().await;
    sink.respond_with(vec![
        Reply::status(503).retry_after(0),
        Reply::status(429),
        Reply::status(200),
    ]);
    let (dispatcher, reports) = core();
    apply(
        &dispatcher,
        &format!("metadata: {{name: flaky}}\nspec: {{url: '{}'}}", sink.url()),
        &[],
    )
    .expect("ready");
    dispatcher
        .dispatch(batch(&[&[("alertname", "X")]]), WebhookType::Alarms)
        .expect("accepted");
    let report = reports.wait_for("monitoring/flaky", WAIT).await;
    assert_eq!(report.outcome, ReportOutcome::Succeeded);
    assert_eq!(report.attempts, 3);
    let got = sink.received();
    assert_eq!(got.len(), 3);
    let keys: Vec<_> = got
        .iter()
        .map(|r| r.header("idempotency-key").expect("key"))
        .collect();
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    assert_eq!(keys[0], report.delivery_id.to_string());
    let metrics = dispatcher.metrics().encode();
    assert!(
        metrics.contains(
            r#"herald_deliveries_total{namespace="monitoring",webhook="flaky",outcome="retried"} 2"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn client_errors_are_final() {
    let sink = Sink::http().await;
    sink.respond_with(vec![
        Reply::status(400).body(serde_json::json!({"error": "bad"})),
    ]);
    let (dispatcher, reports) = core();
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: strict}}\nspec: {{url: '{}'}}",
            sink.url()
        ),
        &[],
    )
    .expect("ready");
    dispatcher
        .dispatch(batch(&[&[("alertname", "X")]]), WebhookType::Alarms)
        .expect("accepted");
    let report = reports.wait_for("monitoring/strict", WAIT).await;
    assert_eq!(report.outcome, ReportOutcome::Failed);
    assert_eq!(report.http_status, Some(400));
    assert_eq!(report.attempts, 1);
    assert!(report.message.contains("HTTP 400"), "{}", report.message);
    sink.assert_no_more_within(Duration::from_millis(500)).await;
    assert_eq!(sink.count(), 1);
}

#[tokio::test]
async fn retries_stop_after_the_attempt_limit() {
    let sink = Sink::http().await;
    sink.respond_with(vec![Reply::status(500)]);
    let (dispatcher, reports) = core();
    apply(
        &dispatcher,
        &format!("metadata: {{name: down}}\nspec: {{url: '{}'}}", sink.url()),
        &[],
    )
    .expect("ready");
    dispatcher
        .dispatch(batch(&[&[("alertname", "X")]]), WebhookType::Alarms)
        .expect("accepted");
    let report = reports
        .wait_for("monitoring/down", Duration::from_secs(20))
        .await;
    assert_eq!(report.outcome, ReportOutcome::Failed);
    assert_eq!(report.attempts, 5);
    assert_eq!(sink.count(), 5);
    assert!(
        report.message.starts_with("gave up after 5 attempts"),
        "{}",
        report.message
    );
}

#[tokio::test]
async fn unreachable_endpoint_fails_with_a_connection_error() {
    // A port nobody listens on.
    let port = herald_testkit::process::free_port();
    let (dispatcher, reports) = core();
    apply(
        &dispatcher,
        &format!("metadata: {{name: gone}}\nspec: {{url: 'http://127.0.0.1:{port}/x'}}"),
        &[],
    )
    .expect("ready");
    dispatcher
        .dispatch(batch(&[&[("alertname", "X")]]), WebhookType::Alarms)
        .expect("accepted");
    let report = reports
        .wait_for("monitoring/gone", Duration::from_secs(20))
        .await;
    assert_eq!(report.outcome, ReportOutcome::Failed);
    assert_eq!(report.http_status, None);
    assert!(report.message.contains("connection"), "{}", report.message);
    assert!(
        !report.message.contains("127.0.0.1"),
        "no URL in messages: {}",
        report.message
    );
}

#[tokio::test]
async fn a_hanging_endpoint_does_not_hold_up_another_webhook() {
    let hanging = Sink::http().await;
    hanging.respond_with(vec![Reply::status(200).delay(Duration::from_secs(600))]);
    let healthy = Sink::http().await;
    let (dispatcher, reports) = core();
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: hanging}}\nspec: {{url: '{}', timeoutSeconds: 300}}",
            hanging.url()
        ),
        &[],
    )
    .expect("ready");
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: healthy}}\nspec: {{url: '{}'}}",
            healthy.url()
        ),
        &[],
    )
    .expect("ready");
    for i in 0..5 {
        dispatcher
            .dispatch(
                batch(&[&[("alertname", "X"), ("n", &i.to_string())]]),
                WebhookType::Alarms,
            )
            .expect("accepted");
    }
    let got = healthy.wait_for(5, WAIT).await;
    assert_eq!(got.len(), 5);
    // All five arrived while the hanging endpoint still holds its first request: it has
    // no outcome yet, and nothing else was sent there.
    assert_eq!(hanging.count(), 1);
    assert!(
        reports
            .all()
            .iter()
            .all(|r| r.webhook.to_string() != "monitoring/hanging"),
        "the hanging delivery ended before the healthy ones arrived: {:?}",
        reports.all()
    );
}

#[tokio::test]
async fn secret_rotation_switches_the_token() {
    let sink = Sink::http().await;
    let (dispatcher, _) = core();
    let yaml = format!(
        "metadata: {{name: rotating}}\nspec: {{url: '{}', auth: {{type: Bearer, secretRef: {{name: tok}}}}}}",
        sink.url()
    );
    apply(&dispatcher, &yaml, &[("tok", secret(&[("token", "old")]))]).expect("ready");
    dispatcher
        .dispatch(batch(&[&[("alertname", "A")]]), WebhookType::Alarms)
        .expect("accepted");
    sink.wait_for(1, WAIT).await;
    apply(&dispatcher, &yaml, &[("tok", secret(&[("token", "new")]))]).expect("ready");
    dispatcher
        .dispatch(batch(&[&[("alertname", "B")]]), WebhookType::Alarms)
        .expect("accepted");
    let got = sink.wait_for(2, WAIT).await;
    assert_eq!(
        got[0].header("authorization").as_deref(),
        Some("Bearer old")
    );
    assert_eq!(
        got[1].header("authorization").as_deref(),
        Some("Bearer new")
    );
}

#[tokio::test]
async fn missing_secret_makes_the_webhook_not_ready_and_it_gets_nothing() {
    let sink = Sink::http().await;
    let (dispatcher, _) = core();
    let yaml = format!(
        "metadata: {{name: nosecret}}\nspec: {{url: '{}', auth: {{type: Bearer, secretRef: {{name: absent}}}}}}",
        sink.url()
    );
    let err = apply(&dispatcher, &yaml, &[]).expect_err("not ready");
    assert_eq!(err.reason, NotReadyReason::SecretNotFound);
    let summary = dispatcher
        .dispatch(batch(&[&[("alertname", "A")]]), WebhookType::Alarms)
        .expect("accepted");
    assert_eq!(summary.queued, 0);
    sink.assert_none_within(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn signed_requests_carry_standard_webhooks_headers() {
    use base64::Engine as _;
    let sink = Sink::http().await;
    sink.respond_with(vec![Reply::status(500), Reply::status(200)]);
    let (dispatcher, _) = core();
    let key = [42u8; 32];
    let secret_value = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    apply(
        &dispatcher,
        &format!("metadata: {{name: signed}}\nspec: {{url: '{}', signing: {{secretRef: {{name: sig, key: secret}}}}}}", sink.url()),
        &[("sig", secret(&[("secret", &secret_value)]))],
    )
    .expect("ready");
    dispatcher
        .dispatch(batch(&[&[("alertname", "A")]]), WebhookType::Alarms)
        .expect("accepted");
    let got = sink.wait_for(2, WAIT).await;
    for request in &got {
        let id = request.header("webhook-id").expect("webhook-id");
        assert_eq!(Some(&id), request.header("idempotency-key").as_ref());
        let timestamp: i64 = request
            .header("webhook-timestamp")
            .expect("ts")
            .parse()
            .expect("number");
        let expected = herald::delivery::sign(
            std::iter::once(key.as_slice()),
            &id,
            timestamp,
            &request.body,
        );
        assert_eq!(
            request.header("webhook-signature").as_deref(),
            Some(expected.as_str())
        );
    }
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
}

#[tokio::test]
async fn test_messages_report_status_and_disabled_webhooks_get_none() {
    let ok_sink = Sink::http().await;
    let denied_sink = Sink::http().await;
    denied_sink.respond_with(vec![Reply::status(401)]);
    let (dispatcher, _) = core();
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: ok}}\nspec: {{url: '{}', language: zh-CN}}",
            ok_sink.url()
        ),
        &[],
    )
    .expect("ready");
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: denied}}\nspec: {{url: '{}'}}",
            denied_sink.url()
        ),
        &[],
    )
    .expect("ready");
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: off}}\nspec: {{url: '{}', enabled: false}}",
            ok_sink.url()
        ),
        &[],
    )
    .expect_err("disabled is not ready");

    let key = |n: &str| herald::object::ObjectKey::new("monitoring", n);
    let report = dispatcher.send_test(&key("ok")).await.expect("sent");
    assert_eq!(report.outcome, ReportOutcome::Succeeded);
    assert_eq!(report.http_status, Some(200));
    let body = ok_sink.wait_for(1, WAIT).await[0].json();
    assert_eq!(body["test"], true);
    assert_eq!(body["title"], "Herald 测试通知");

    let report = dispatcher.send_test(&key("denied")).await.expect("sent");
    assert_eq!(report.outcome, ReportOutcome::Failed);
    assert_eq!(report.http_status, Some(401));

    let err = dispatcher
        .send_test(&key("off"))
        .await
        .expect_err("disabled");
    assert!(err.to_string().contains("Disabled"), "{err}");
    ok_sink
        .assert_no_more_within(Duration::from_millis(200))
        .await;
    assert_eq!(ok_sink.count(), 1);
}

#[tokio::test]
async fn chat_formats_and_templates_reach_sinks_in_their_documented_shapes() {
    let (dispatcher, reports) = core();
    let mut sinks = Vec::new();
    for format in [
        "herald",
        "alertmanager",
        "slack",
        "dingtalk",
        "feishu",
        "wecom",
    ] {
        let sink = Sink::http().await;
        apply(
            &dispatcher,
            &format!("metadata: {{name: {format}}}\nspec: {{url: '{}', format: {format}, language: zh-CN}}", sink.url()),
            &[],
        )
        .expect("ready");
        sinks.push((format, sink));
    }
    let custom = Sink::http().await;
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: custom}}\nspec:\n  url: '{}'\n  template: '{{\"summary\": {{{{ title | tojson }}}}, \"count\": {{{{ alerts | length }}}}}}'\n",
            custom.url()
        ),
        &[],
    )
    .expect("template compiles");
    let broken_at_runtime = Sink::http().await;
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: broken}}\nspec: {{url: '{}', template: '{{{{ nope.field }}}}'}}",
            broken_at_runtime.url()
        ),
        &[],
    )
    .expect("compiles");
    let err = apply(
        &dispatcher,
        "metadata: {name: invalid}\nspec: {url: 'http://x', template: '{{ unclosed'}",
        &[],
    )
    .expect_err("does not compile");
    assert_eq!(err.reason, NotReadyReason::InvalidTemplate);

    dispatcher
        .dispatch(
            batch(&[&[("alertname", "HighCPU"), ("severity", "critical")]]),
            WebhookType::Alarms,
        )
        .expect("accepted");
    for (format, sink) in &sinks {
        let body = sink.wait_for(1, WAIT).await[0].json();
        let text = body.to_string();
        match *format {
            "herald" => assert_eq!(body["title"], "【告警中】1 条告警：HighCPU"),
            "alertmanager" => {
                assert_eq!(body["version"], "4");
                assert_eq!(body["status"], "firing");
                assert_eq!(body["alerts"][0]["labels"]["alertname"], "HighCPU");
                assert!(body["groupKey"].is_string() && body["commonLabels"].is_object());
            }
            "slack" => {
                assert!(body["text"].as_str().expect("text").contains("HighCPU"));
                assert_eq!(body["blocks"][0]["type"], "header");
                assert_eq!(body["blocks"][1]["text"]["type"], "mrkdwn");
            }
            "dingtalk" | "feishu" | "wecom" => {
                for text in robot_message_schema(format, &body) {
                    assert!(text.contains("HighCPU"), "{format}: {text}");
                }
            }
            other => panic!("{other}"),
        }
        if *format != "alertmanager" {
            assert!(
                text.contains("告警"),
                "{format} is rendered in Chinese: {text}"
            );
        }
    }
    let body = custom.wait_for(1, WAIT).await[0].json();
    assert_eq!(
        body,
        serde_json::json!({"summary": "[FIRING:1] HighCPU", "count": 1})
    );
    let report = reports.wait_for("monitoring/broken", WAIT).await;
    assert_eq!(report.outcome, ReportOutcome::Failed);
    assert!(
        report.message.starts_with("template:"),
        "{}",
        report.message
    );
    assert_eq!(
        broken_at_runtime.count(),
        0,
        "a body that failed to render is never sent"
    );
}

/// The keys of a JSON object; fails the test when `value` is not an object.
fn keys(what: &str, value: &serde_json::Value) -> Vec<String> {
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not an object: {value}"));
    let mut keys: Vec<String> = object.keys().cloned().collect();
    keys.sort();
    keys
}

/// A non-empty string within `max_bytes` (UTF-8); fails the test otherwise.
fn text_within(what: &str, value: &serde_json::Value, max_bytes: usize) -> String {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"));
    assert!(!text.is_empty(), "{what} is empty");
    assert!(
        text.len() <= max_bytes,
        "{what} has {} bytes, over the platform's {max_bytes}",
        text.len()
    );
    text.to_string()
}

/// Checks a chat robot's body against the platform's documented message schema (every key
/// known, each required one there with its type, the size limits) and returns its texts.
///
/// - DingTalk custom robot, markdown message: `{"msgtype": "markdown", "markdown": {"title",
///   "text"}, "at": {"atMobiles", "atUserIds", "isAtAll"}}` (open.dingtalk.com, robot
///   message types); the text within 20,000 bytes.
/// - Feishu custom bot, text message: `{"msg_type": "text", "content": {"text"}}` plus
///   `timestamp` and `sign` when signed (open.feishu.cn, custom bot guide); the body within
///   20 KB.
/// - WeCom group robot, markdown message: `{"msgtype": "markdown", "markdown": {"content"}}`
///   (developer.work.weixin.qq.com, group robot configuration); the content within 4096 bytes.
fn robot_message_schema(platform: &str, body: &serde_json::Value) -> Vec<String> {
    match platform {
        "dingtalk" => {
            let top = keys("dingtalk body", body);
            assert!(
                top == ["markdown", "msgtype"] || top == ["at", "markdown", "msgtype"],
                "dingtalk body keys {top:?}: {body}"
            );
            assert_eq!(body["msgtype"], "markdown");
            assert_eq!(
                keys("dingtalk markdown", &body["markdown"]),
                ["text", "title"]
            );
            if let Some(at) = body.get("at") {
                for key in keys("dingtalk at", at) {
                    match key.as_str() {
                        "isAtAll" => assert!(at[&key].is_boolean(), "{at}"),
                        "atMobiles" | "atUserIds" => assert!(
                            at[&key]
                                .as_array()
                                .is_some_and(|list| list.iter().all(|v| v.is_string())),
                            "{at}"
                        ),
                        other => panic!("dingtalk at has an unknown key {other}: {at}"),
                    }
                }
            }
            vec![
                text_within("dingtalk title", &body["markdown"]["title"], 20_000),
                text_within("dingtalk text", &body["markdown"]["text"], 20_000),
            ]
        }
        "feishu" => {
            let top = keys("feishu body", body);
            assert!(
                top == ["content", "msg_type"]
                    || top == ["content", "msg_type", "sign", "timestamp"],
                "feishu body keys {top:?}: {body}"
            );
            assert_eq!(body["msg_type"], "text");
            assert_eq!(keys("feishu content", &body["content"]), ["text"]);
            assert!(
                body.to_string().len() <= 20 * 1024,
                "feishu body over 20 KB"
            );
            vec![text_within(
                "feishu text",
                &body["content"]["text"],
                20 * 1024,
            )]
        }
        "wecom" => {
            assert_eq!(keys("wecom body", body), ["markdown", "msgtype"]);
            assert_eq!(body["msgtype"], "markdown");
            assert_eq!(keys("wecom markdown", &body["markdown"]), ["content"]);
            vec![text_within(
                "wecom content",
                &body["markdown"]["content"],
                4096,
            )]
        }
        other => panic!("no schema for {other}"),
    }
}
