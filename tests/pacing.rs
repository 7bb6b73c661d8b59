//! Pacing per destination URL, merged messages (digests) while paced, and batching windows:
//! an alert storm to a DingTalk-like robot that enforces its 20 messages a minute ends in few
//! merged messages, none lost and none refused for pace.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use herald::crd::WebhookType;
use herald::dispatch::Dispatcher;
use herald::outgoing::ReportOutcome;
use herald_testkit::{core, sink};
use serde_json::{Value, json};
use sink::Sink;

use crate::core::apply;

/// One message the robot got: when, and how many alerts its title counts.
#[derive(Clone, Debug)]
struct Message {
    at: Instant,
    alerts: usize,
    refused: bool,
}

/// A DingTalk-like robot: at most `limit` messages in any minute; past it, errcode 130101 as
/// DingTalk answers.
#[derive(Default)]
struct Robot {
    limit: usize,
    messages: Mutex<Vec<Message>>,
}

/// The alerts a DingTalk markdown title counts (`[FIRING:n]`, `[RESOLVED:n]`).
fn counted(title: &str) -> usize {
    ["FIRING:", "RESOLVED:"]
        .iter()
        .filter_map(|tag| {
            let at = title.find(tag)? + tag.len();
            title[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse::<usize>()
                .ok()
        })
        .sum()
}

async fn robot_send(State(robot): State<Arc<Robot>>, Json(body): Json<Value>) -> Json<Value> {
    let now = Instant::now();
    let title = body["markdown"]["title"].as_str().unwrap_or("");
    let mut messages = robot.messages.lock().expect("lock");
    let in_last_minute = messages
        .iter()
        .filter(|m| !m.refused && now.duration_since(m.at) < Duration::from_secs(60))
        .count();
    let refused = in_last_minute >= robot.limit;
    messages.push(Message {
        at: now,
        alerts: counted(title),
        refused,
    });
    Json(if refused {
        json!({"errcode": 130101, "errmsg": "send too fast, exceed 20 times per minute"})
    } else {
        json!({"errcode": 0, "errmsg": "ok"})
    })
}

async fn start_robot(limit: usize) -> (Arc<Robot>, String) {
    let robot = Arc::new(Robot {
        limit,
        ..Robot::default()
    });
    let app = axum::Router::new()
        .route("/robot/send", axum::routing::post(robot_send))
        .with_state(robot.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (
        robot,
        format!("http://{addr}/robot/send?access_token=storm"),
    )
}

fn alert(dispatcher: &Dispatcher, i: usize) {
    let name = format!("Storm{i:04}");
    let severity = if i.is_multiple_of(10) {
        "critical"
    } else {
        "warning"
    };
    let batch = core::batch(&[&[("alertname", &name), ("severity", severity)]]);
    dispatcher
        .dispatch(batch, WebhookType::Alarms)
        .expect("accepted");
}

/// Sends `count` alerts, one a batch, evenly over `over`; then waits until every delivery is
/// reported. Returns the robot's messages and the reports' outcomes.
async fn storm(spec: &str, count: usize, over: Duration) -> (Vec<Message>, Vec<ReportOutcome>) {
    let (robot, url) = start_robot(20).await;
    let (dispatcher, reports) = core::core();
    apply(
        &dispatcher,
        &format!("metadata: {{name: ding}}\nspec: {{url: '{url}', format: dingtalk{spec}}}"),
        &[],
    )
    .expect("ready");
    let started = Instant::now();
    let gap = over / count as u32;
    for i in 0..count {
        alert(&dispatcher, i);
        tokio::time::sleep_until((started + gap * (i as u32 + 1)).into()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(150);
    while reports.all().len() < count {
        assert!(
            Instant::now() < deadline,
            "{} of {count} deliveries reported",
            reports.all().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let messages = robot.messages.lock().expect("lock").clone();
    let outcomes = reports.all().iter().map(|r| r.outcome).collect();
    println!(
        "storm: {count} alerts over {over:?}{spec}: {} messages in {:.1} s, largest {} alerts, {} refused",
        messages.len(),
        started.elapsed().as_secs_f64(),
        messages.iter().map(|m| m.alerts).max().unwrap_or(0),
        messages.iter().filter(|m| m.refused).count()
    );
    (messages, outcomes)
}

#[tokio::test]
async fn an_alert_storm_to_a_dingtalk_robot_ends_in_few_merged_messages_none_lost() {
    let count = 400;
    let (messages, outcomes) = storm("", count, Duration::from_secs(30)).await;
    assert!(
        outcomes.iter().all(|o| *o == ReportOutcome::Succeeded),
        "every delivery succeeded: {outcomes:?}"
    );
    assert!(
        messages.iter().all(|m| !m.refused),
        "none refused for pace: {messages:?}"
    );
    assert_eq!(
        messages.iter().map(|m| m.alerts).sum::<usize>(),
        count,
        "every alert in some message: {messages:?}"
    );
    assert!(
        messages.len() <= 25,
        "{} messages for {count} alerts",
        messages.len()
    );
    assert!(messages.iter().any(|m| m.alerts > 100), "{messages:?}");
}

#[tokio::test]
async fn a_batching_window_sends_one_message_per_window() {
    let count = 200;
    let (messages, outcomes) = storm(
        ", batching: {maxWait: 10s, maxAlerts: 1000}",
        count,
        Duration::from_secs(12),
    )
    .await;
    assert!(outcomes.iter().all(|o| *o == ReportOutcome::Succeeded));
    assert_eq!(messages.iter().map(|m| m.alerts).sum::<usize>(), count);
    assert!(messages.len() <= 3, "{messages:?}");
}

#[tokio::test]
async fn webhooks_to_one_url_share_its_pace_and_max_alerts_closes_a_batch() {
    let sink = Sink::http().await;
    let (dispatcher, reports) = core::core();
    for name in ["a", "b"] {
        apply(
            &dispatcher,
            &format!(
                "metadata: {{name: {name}}}\nspec: {{url: '{}', pace: {{perMinute: 2}}}}",
                sink.url()
            ),
            &[],
        )
        .expect("ready");
    }
    // Two webhooks, one URL, two a minute: the first alert goes to each at once (two
    // messages), and everything after waits for the minute to pass.
    alert(&dispatcher, 0);
    sink.wait_for(2, Duration::from_secs(10)).await;
    for i in 1..5 {
        alert(&dispatcher, i);
    }
    sink.assert_no_more_within(Duration::from_secs(2)).await;
    assert_eq!(sink.count(), 2);
    assert_eq!(reports.all().len(), 2);

    // maxAlerts closes a batch before its window ends.
    let batched = Sink::http().await;
    let (dispatcher, reports) = core::core();
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: c}}\nspec: {{url: '{}', batching: {{maxWait: 1h, maxAlerts: 3}}}}",
            batched.url()
        ),
        &[],
    )
    .expect("ready");
    for i in 0..3 {
        alert(&dispatcher, i);
    }
    let got = batched.wait_for(1, Duration::from_secs(10)).await;
    let alerts = got[0].json()["alerts"].as_array().map(Vec::len);
    assert_eq!(alerts, Some(3), "one message with the three alerts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while reports.all().len() < 3 {
        assert!(Instant::now() < deadline, "{:?}", reports.all());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        reports
            .all()
            .iter()
            .all(|r| r.outcome == ReportOutcome::Succeeded && r.message.contains("merged message"))
    );
}
