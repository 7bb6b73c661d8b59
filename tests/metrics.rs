//! Metrics as Prometheus sees them: Debian's Prometheus scrapes a running Herald, and promtool
//! accepts the exposition.

use std::time::Duration;

use alertmanager::Prometheus;
use cli::Running;
use herald_testkit::{alertmanager, cli, sink};
use serde_json::json;
use sink::{Reply, Sink};

#[tokio::test]
async fn prometheus_scrapes_the_delivered_counts_and_promtool_accepts_the_metrics() {
    let (ok, bad) = (Sink::http().await, Sink::http().await);
    bad.respond_with(vec![Reply::status(400)]);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("hooks.yaml"),
        format!(
            "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: ok}}\nspec: {{url: '{}'}}\n---\napiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: bad}}\nspec: {{url: '{}'}}\n",
            ok.url(),
            bad.url()
        ),
    )
    .expect("write");
    let herald = Running::start(dir.path(), &[]).await;
    for i in 0..3 {
        let payload =
            json!({"alerts": [{"status": "firing", "labels": {"alertname": format!("A{i}")}}]});
        assert_eq!(herald.post_alerts(&payload).await.0, 200);
    }
    ok.wait_for(3, Duration::from_secs(10)).await;
    bad.wait_for(3, Duration::from_secs(10)).await;

    let prometheus = Prometheus::scraping(herald.addr).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let succeeded = prometheus
            .query(
                r#"herald_deliveries_total{namespace="default",webhook="ok",outcome="succeeded"}"#,
            )
            .await;
        let failed = prometheus
            .query(r#"herald_deliveries_total{namespace="default",webhook="bad",outcome="failed"}"#)
            .await;
        let value = |r: &[serde_json::Value]| {
            r.first()
                .and_then(|v| v["value"][1].as_str().map(str::to_string))
        };
        if value(&succeeded).as_deref() == Some("3") && value(&failed).as_deref() == Some("3") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus never saw the counts: {succeeded:?} {failed:?}\n{}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let received = prometheus
        .query(r#"herald_alerts_received_total{endpoint="/api/v1/alerts"}"#)
        .await;
    assert_eq!(received[0]["value"][1], "3");

    // promtool lints the exposition (Prometheus' own checker).
    let text = reqwest::get(herald.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for secret_free in ["127.0.0.1", "http://"] {
        assert!(
            !text.contains(secret_free),
            "a URL reached the metrics: {text}"
        );
    }
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
