//! Chat robots out: each format against a loopback server that answers like the platform
//! (success, rate limiting, refusals with HTTP 200 and an error code), bodies checked against
//! each platform's documented message schema, signing, size limits, mentions, keywords and
//! Slack's escaping.

use std::time::Duration;

use base64::Engine as _;
use herald::crd::WebhookType;
use herald::delivery::{EngineConfig, RetryPolicy};
use herald::dispatch::Dispatcher;
use herald::outgoing::ReportOutcome;
use herald_testkit::{cli, core, sink};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sink::{Reply, Sink};

use crate::core::apply;

const WAIT: Duration = Duration::from_secs(20);

/// One alert to every webhook (the default namespace's webhooks take any alert).
fn send(dispatcher: &Dispatcher, labels: &[(&str, &str)], annotations: &[(&str, &str)]) {
    let mut batch = core::batch(&[labels]);
    batch.alerts[0].annotations = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    dispatcher
        .dispatch(batch, WebhookType::Alarms)
        .expect("accepted");
}

/// A webhook named `name` in `format` (and `extra` spec fields) pointing at the sink.
fn robot(dispatcher: &Dispatcher, name: &str, format: &str, sink: &Sink, extra: &str) {
    apply(
        dispatcher,
        &format!(
            "metadata: {{name: {name}}}\nspec: {{url: '{}', format: {format}{extra}}}",
            sink.url_for("/robot/send?access_token=abc")
        ),
        &[(
            "robot-secret",
            core::secret(&[("secret", "SEC0123456789abcdef")]),
        )],
    )
    .expect("ready");
}

struct Platform {
    format: &'static str,
    taken: Reply,
    rate_limited: Reply,
    refused: Reply,
    /// What the failure report must say.
    refusal_words: &'static str,
}

/// A JSON answer with HTTP 200, as the robots give every answer.
fn answer(body: Value) -> Reply {
    Reply::status(200).body(body)
}

fn platforms() -> Vec<Platform> {
    vec![
        Platform {
            format: "dingtalk",
            taken: answer(json!({"errcode": 0, "errmsg": "ok"})),
            rate_limited: answer(
                json!({"errcode": 130101, "errmsg": "send too fast, exceed 20 times per minute"}),
            ),
            refused: answer(json!({"errcode": 310000, "errmsg": "keywords not in content"})),
            refusal_words: "DingTalk refused the message: errcode 310000: keywords not in content",
        },
        Platform {
            format: "wecom",
            taken: answer(json!({"errcode": 0, "errmsg": "ok"})),
            rate_limited: answer(json!({"errcode": 45009, "errmsg": "api freq out of limit"})),
            refused: answer(json!({"errcode": 93000, "errmsg": "invalid webhook url"})),
            refusal_words: "WeCom refused the message: errcode 93000: invalid webhook url",
        },
        Platform {
            format: "feishu",
            taken: answer(
                json!({"StatusCode": 0, "StatusMessage": "success", "code": 0, "msg": "success", "data": {}}),
            ),
            rate_limited: answer(json!({"code": 11232, "msg": "frequency limited", "data": {}})),
            refused: answer(
                json!({"code": 19021, "msg": "sign match fail or timestamp is not within one hour from current time", "data": {}}),
            ),
            refusal_words: "Feishu refused the message: code 19021",
        },
        Platform {
            format: "slack",
            taken: Reply::status(200).text("ok"),
            rate_limited: Reply::status(429).retry_after(0).text("rate_limited"),
            refused: Reply::status(400).text("invalid_payload"),
            refusal_words: "Slack refused the message: HTTP 400: invalid_payload",
        },
    ]
}

#[tokio::test]
async fn each_platform_answer_is_read_rate_limits_retried_and_refusals_final() {
    for platform in platforms() {
        let format = platform.format;
        // A platform's block (10 minutes for DingTalk) is waited out in full, up to the time a
        // delivery is retried at all: 3 s here.
        let dispatcher = Dispatcher::new(
            ["monitoring".to_string()],
            EngineConfig {
                retry: RetryPolicy {
                    max_elapsed: Duration::from_secs(3),
                    ..core::fast_retry()
                },
                ..EngineConfig::default()
            },
        )
        .with_policy(herald::delivery::TargetPolicy::allowing_loopback());
        let reports = std::sync::Arc::new(core::Reports::default());
        dispatcher.engine().observe(reports.clone());
        let limited = Sink::http().await;
        limited.respond_with(vec![platform.rate_limited.clone(), platform.taken.clone()]);
        robot(&dispatcher, "limited", format, &limited, "");
        let refused = Sink::http().await;
        refused.respond_with(vec![platform.refused.clone()]);
        robot(&dispatcher, "refused", format, &refused, "");
        send(&dispatcher, &[("alertname", "DiskFull")], &[]);

        let report = reports.wait_for("monitoring/limited", WAIT).await;
        assert_eq!(
            report.outcome,
            ReportOutcome::Succeeded,
            "{format}: {report:?}"
        );
        assert_eq!(report.attempts, 2, "{format}: rate limited, then taken");
        let got = limited.received();
        assert_eq!(got.len(), 2, "{format}");
        if format != "slack" {
            // Slack's own Retry-After here is 0; the others' block is 3 s (capped).
            assert!(
                got[1].at.duration_since(got[0].at) >= Duration::from_millis(2900),
                "{format}: retried after the block, not before"
            );
        }

        let report = reports.wait_for("monitoring/refused", WAIT).await;
        assert_eq!(
            report.outcome,
            ReportOutcome::Failed,
            "{format}: {report:?}"
        );
        assert_eq!(report.attempts, 1, "{format}: a refusal is final");
        assert!(
            report.message.contains(platform.refusal_words),
            "{format}: {}",
            report.message
        );
        refused
            .assert_no_more_within(Duration::from_millis(300))
            .await;
        assert_eq!(refused.count(), 1, "{format}");
    }
}

#[tokio::test]
async fn a_robot_refusing_the_test_message_makes_herald_test_fail() {
    let sink = Sink::http().await;
    sink.respond_with(vec![answer(
        json!({"errcode": 310000, "errmsg": "keywords not in content"}),
    )]);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("webhook.yaml"),
        format!(
            "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: ding, namespace: monitoring}}\nspec: {{url: '{}', format: dingtalk}}\n",
            sink.url()
        ),
    )
    .expect("write");
    let config = dir.path().to_str().expect("path").to_string();
    let out = tokio::task::spawn_blocking(move || {
        cli::herald(&["test", "ding", "-n", "monitoring", "--config", &config])
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "herald test exits non-zero: {stdout}"
    );
    assert!(
        stdout.contains("errcode 310000"),
        "the reason is shown: {stdout}"
    );
}

/// The keys of a JSON object.
fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    keys
}

fn string<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is a string: {value}"))
}

/// The four robots (`ding`, `wecom`, `feishu`, `slack`), each with its own sink answering
/// "taken", and `extra` spec fields per robot.
async fn four_robots(dispatcher: &Dispatcher, extra: [&str; 4]) -> [Sink; 4] {
    let sinks = [
        Sink::http().await,
        Sink::http().await,
        Sink::http().await,
        Sink::http().await,
    ];
    for ((name, format), (sink, extra)) in FOUR.iter().zip(sinks.iter().zip(extra)) {
        robot(dispatcher, name, format, sink, extra);
    }
    sinks[3].respond_with(vec![Reply::status(200).text("ok")]);
    sinks
}

const FOUR: [(&str, &str); 4] = [
    ("ding", "dingtalk"),
    ("wecom", "wecom"),
    ("feishu", "feishu"),
    ("slack", "slack"),
];

/// Waits for each of the four robots' deliveries to succeed.
async fn four_succeeded(reports: &core::Reports) {
    for (name, _) in FOUR {
        let report = reports.wait_for(&format!("monitoring/{name}"), WAIT).await;
        assert_eq!(
            report.outcome,
            ReportOutcome::Succeeded,
            "{name}: {report:?}"
        );
    }
}

#[tokio::test]
async fn bodies_follow_each_platforms_schema_with_keyword_mentions_and_signature() {
    let (dispatcher, reports) = core::core();
    let chat = ", chat: {keyword: HeraldAlert, mentionAll: true, mentionUsers: [u1], mentionMobiles: ['13800000000']}";
    let signed = format!("{chat}, signing: {{secretRef: {{name: robot-secret, key: secret}}}}");
    let sinks = four_robots(&dispatcher, [&signed, chat, &signed, chat]).await;
    let before = k8s_openapi::jiff::Timestamp::now();
    send(
        &dispatcher,
        &[("alertname", "DiskFull"), ("severity", "critical")],
        &[("summary", "<!channel> disk & <b>full</b>")],
    );
    for sink in &sinks {
        sink.wait_for(1, WAIT).await;
    }
    let secret = "SEC0123456789abcdef";
    let hmac = |key: &[u8], message: &[u8]| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("key");
        mac.update(message);
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    };

    // DingTalk: {msgtype: markdown, markdown: {title, text}, at: {atMobiles, atUserIds,
    // isAtAll}}, signed in the query.
    let ding = &sinks[0].received()[0];
    let body = ding.json();
    assert_eq!(keys(&body), ["at", "markdown", "msgtype"]);
    assert_eq!(body["msgtype"], "markdown");
    assert_eq!(keys(&body["markdown"]), ["text", "title"]);
    let text = string(&body["markdown"]["text"], "markdown.text");
    assert!(text.starts_with("HeraldAlert\n"), "{text}");
    assert!(
        text.contains("@13800000000") && text.contains("@u1"),
        "{text}"
    );
    assert_eq!(
        body["at"],
        json!({"atMobiles": ["13800000000"], "atUserIds": ["u1"], "isAtAll": true})
    );
    let query: Vec<(String, String)> =
        url::form_urlencoded::parse(ding.query.as_deref().expect("query").as_bytes())
            .into_owned()
            .collect();
    let get = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {name} in {query:?}"))
    };
    assert_eq!(get("access_token"), "abc");
    let timestamp = get("timestamp");
    let millis: i64 = timestamp.parse().expect("milliseconds");
    assert!(millis >= before.as_millisecond() - 1000, "{millis}");
    assert_eq!(
        get("sign"),
        hmac(
            secret.as_bytes(),
            format!("{timestamp}\n{secret}").as_bytes()
        )
    );

    // WeCom: {msgtype: markdown, markdown: {content}} with <@id>.
    let body = sinks[1].received()[0].json();
    assert_eq!(keys(&body), ["markdown", "msgtype"]);
    assert_eq!(keys(&body["markdown"]), ["content"]);
    let content = string(&body["markdown"]["content"], "markdown.content");
    assert!(content.starts_with("HeraldAlert\n**"), "{content}");
    assert!(
        content.contains("<@u1>") && !content.contains("<@all>"),
        "{content}"
    );

    // Feishu: {msg_type: text, content: {text}, timestamp, sign} with <at user_id>.
    let body = sinks[2].received()[0].json();
    assert_eq!(keys(&body), ["content", "msg_type", "sign", "timestamp"]);
    assert_eq!(body["msg_type"], "text");
    let text = string(&body["content"]["text"], "content.text");
    assert!(text.starts_with("HeraldAlert\n"), "{text}");
    assert!(text.contains(r#"<at user_id="u1"></at>"#), "{text}");
    assert!(text.contains(r#"<at user_id="all">"#), "{text}");
    let timestamp = string(&body["timestamp"], "timestamp");
    let seconds: i64 = timestamp.parse().expect("seconds");
    assert!(seconds >= before.as_second() - 1, "{seconds}");
    assert_eq!(
        body["sign"],
        hmac(format!("{timestamp}\n{secret}").as_bytes(), b"")
    );

    // Slack: {text, blocks: [header plain_text, section mrkdwn]}, alert text escaped, the
    // mentions not.
    let body = sinks[3].received()[0].json();
    assert_eq!(keys(&body), ["blocks", "text"]);
    assert_eq!(body["blocks"][0]["type"], "header");
    assert_eq!(body["blocks"][0]["text"]["type"], "plain_text");
    assert_eq!(body["blocks"][1]["type"], "section");
    assert_eq!(body["blocks"][1]["text"]["type"], "mrkdwn");
    let text = string(&body["text"], "text");
    assert!(
        text.contains("&lt;!channel&gt; disk &amp; &lt;b&gt;full&lt;/b&gt;"),
        "{text}"
    );
    assert!(!text.contains("<!channel>"), "{text}");
    assert!(text.contains("<!here>") && text.contains("<@u1>"), "{text}");

    four_succeeded(&reports).await;
}

#[tokio::test]
async fn test_messages_carry_the_keyword() {
    let (dispatcher, _) = core::core();
    let sink = Sink::http().await;
    robot(
        &dispatcher,
        "ding",
        "dingtalk",
        &sink,
        ", chat: {keyword: HeraldAlert}",
    );
    let key = herald::object::ObjectKey::new("monitoring", "ding");
    let report = dispatcher.send_test(&key).await.expect("sent");
    assert_eq!(report.outcome, ReportOutcome::Succeeded, "{report:?}");
    let body = sink.received()[0].json();
    assert!(
        string(&body["markdown"]["text"], "text").contains("HeraldAlert"),
        "{body}"
    );
}

#[tokio::test]
async fn long_messages_are_cut_to_each_platforms_limit_in_its_unit_with_a_note() {
    let (dispatcher, reports) = core::core();
    let zh = ", language: zh-CN";
    let sinks = four_robots(&dispatcher, [zh; 4]).await;
    // Chinese text: 3 bytes a character.
    let long = "磁盘空间不足".repeat(5000);
    send(
        &dispatcher,
        &[("alertname", &"很长的告警名称".repeat(40))],
        &[("summary", &long)],
    );
    for sink in &sinks {
        sink.wait_for(1, WAIT).await;
    }
    let note = "已截断";
    let ding = sinks[0].received()[0].json();
    let text = string(&ding["markdown"]["text"], "text");
    assert!(
        text.len() <= 20_000 && text.contains(note),
        "{}",
        text.len()
    );
    let wecom = sinks[1].received()[0].json();
    let content = string(&wecom["markdown"]["content"], "content");
    assert!(
        content.len() <= 4096 && content.contains(note),
        "{}",
        content.len()
    );
    let feishu = &sinks[2].received()[0];
    assert!(feishu.body.len() <= 20 * 1024, "{}", feishu.body.len());
    assert!(string(&feishu.json()["content"]["text"], "text").contains(note));
    let slack = sinks[3].received()[0].json();
    let header = string(&slack["blocks"][0]["text"]["text"], "header");
    assert!(
        header.chars().count() <= 150 && header.contains(note),
        "{header}"
    );
    let section = string(&slack["blocks"][1]["text"]["text"], "section");
    assert!(section.chars().count() <= 3000 && section.contains(note));
    four_succeeded(&reports).await;
}
