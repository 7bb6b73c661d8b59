//! Self-test of the loopback webhook sink in `herald_testkit::sink` (testkit/src/sink.rs).

use std::time::{Duration, Instant};

use herald_testkit::sink;
use serde_json::json;
use sink::{Reply, Sink, TestPki};

const WAIT: Duration = Duration::from_secs(5);

fn client_trusting(pki: &TestPki) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).expect("CA PEM"),
        )
        .timeout(WAIT)
}

#[tokio::test]
async fn http_sink_records_post_with_headers_and_json() {
    let sink = Sink::http().await;
    assert!(sink.url().starts_with("http://127.0.0.1:"));
    assert!(sink.url().ends_with("/hook"));

    let resp = reqwest::Client::new()
        .post(format!("{}?x=1", sink.url()))
        .header("X-Herald-Signature", "sha256=abc")
        .json(&json!({"alert": "HighCPU", "n": 3}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<serde_json::Value>().await.unwrap(), json!({}));

    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(sink.count(), 1);
    let r = &got[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/hook");
    assert_eq!(r.query.as_deref(), Some("x=1"));
    assert_eq!(
        r.header("x-herald-signature").as_deref(),
        Some("sha256=abc")
    );
    assert_eq!(
        r.header("Content-Type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.header("x-missing"), None);
    assert_eq!(r.json(), json!({"alert": "HighCPU", "n": 3}));
    assert!(r.at <= Instant::now());
}

#[tokio::test]
async fn scripted_replies_come_back_in_order_and_last_repeats() {
    let sink = Sink::http().await;
    sink.respond_with(vec![
        Reply::status(503).retry_after(1),
        Reply::status(500).body(json!({"error": "boom"})),
        Reply::status(200),
    ]);
    let client = reqwest::Client::new();
    let mut seen = Vec::new();
    for i in 0..5 {
        let resp = client
            .post(sink.url())
            .json(&json!({"i": i}))
            .send()
            .await
            .expect("send");
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap();
        seen.push((status, retry_after, body));
    }
    assert_eq!(seen[0], (503, Some("1".to_owned()), json!({})));
    assert_eq!(seen[1], (500, None, json!({"error": "boom"})));
    for s in &seen[2..] {
        assert_eq!(*s, (200, None, json!({})));
    }
    let got = sink.received();
    assert_eq!(got.len(), 5);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.json(), json!({"i": i}));
    }
    assert!(got.windows(2).all(|w| w[0].at <= w[1].at));
}

#[tokio::test]
async fn delayed_reply_is_recorded_on_arrival() {
    let sink = Sink::http().await;
    sink.respond_with(vec![Reply::status(200).delay(Duration::from_secs(60))]);
    let url = sink.url();
    let result = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap()
        .post(url)
        .body("{}")
        .send()
        .await;
    assert!(result.expect_err("should time out").is_timeout());
    // The request was recorded even though it was never answered.
    assert_eq!(sink.count(), 1);
    // Dropping the sink must not wait for the hanging handler.
    drop(sink);
}

#[tokio::test]
async fn held_replies_go_out_once_released() {
    let sink = Sink::http().await;
    sink.respond_with(vec![Reply::status(202).held()]);
    let url = sink.url();
    let request = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .body("{}")
            .send()
            .await
            .expect("answered once released")
            .status()
            .as_u16()
    });
    sink.wait_for(1, WAIT).await;
    // Recorded, and still unanswered however long it waits.
    tokio::task::yield_now().await;
    assert!(!request.is_finished());
    sink.release();
    assert_eq!(request.await.expect("request task"), 202);
    // Released for good: the next one goes out at once.
    let status = reqwest::Client::new()
        .post(sink.url())
        .body("{}")
        .send()
        .await
        .expect("send")
        .status();
    assert_eq!(status, 202);
}

#[tokio::test]
async fn https_sink_works_when_client_trusts_the_ca() {
    let pki = TestPki::generate();
    let sink = Sink::https(&pki).await;
    assert!(sink.url().starts_with("https://127.0.0.1:"));
    let client = client_trusting(&pki).build().unwrap();

    let resp = client.post(sink.url()).json(&json!({"a": 1})).send().await;
    assert_eq!(resp.expect("https via IP SAN").status(), 200);
    let resp = client
        .post(sink.localhost_url())
        .json(&json!({"a": 2}))
        .send()
        .await;
    assert_eq!(resp.expect("https via DNS SAN").status(), 200);

    let got = sink.wait_for(2, WAIT).await;
    assert_eq!(got[0].json(), json!({"a": 1}));
    assert_eq!(got[1].json(), json!({"a": 2}));
}

#[tokio::test]
async fn https_sink_fails_when_client_does_not_trust_the_ca() {
    let pki = TestPki::generate();
    let sink = Sink::https(&pki).await;

    // Default roots only.
    let err = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(WAIT)
        .build()
        .unwrap()
        .post(sink.url())
        .body("{}")
        .send()
        .await
        .expect_err("untrusted CA must fail");
    assert!(err.is_connect(), "{err:?}");

    // Trusting a different test CA.
    let other = TestPki::generate();
    let err = client_trusting(&other)
        .build()
        .unwrap()
        .post(sink.url())
        .body("{}")
        .send()
        .await
        .expect_err("foreign CA must fail");
    assert!(err.is_connect(), "{err:?}");

    sink.assert_none_within(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn mtls_sink_requires_a_client_certificate_from_the_ca() {
    let pki = TestPki::generate();
    let sink = Sink::https_mtls(&pki).await;

    // No client certificate: rejected.
    let err = client_trusting(&pki)
        .build()
        .unwrap()
        .post(sink.url())
        .body("{}")
        .send()
        .await
        .expect_err("no client cert must fail");
    // TLS 1.3: the server's alert surfaces on the client's first read.
    assert!(
        format!("{err:?}").contains("CertificateRequired"),
        "{err:?}"
    );

    // Client certificate from an unrelated CA: rejected.
    let foreign = TestPki::other_ca_client();
    let err = client_trusting(&pki)
        .identity(reqwest::Identity::from_pem(foreign.identity_pem().as_bytes()).unwrap())
        .build()
        .unwrap()
        .post(sink.url())
        .body("{}")
        .send()
        .await
        .expect_err("foreign client cert must fail");
    assert!(format!("{err:?}").contains("UnknownCA"), "{err:?}");

    sink.assert_none_within(Duration::from_millis(100)).await;

    // The right client certificate: accepted.
    let resp = client_trusting(&pki)
        .identity(reqwest::Identity::from_pem(pki.client_identity_pem().as_bytes()).unwrap())
        .build()
        .unwrap()
        .post(sink.url())
        .json(&json!({"ok": true}))
        .send()
        .await
        .expect("valid client cert");
    assert_eq!(resp.status(), 200);
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].json(), json!({"ok": true}));
}

#[tokio::test]
#[should_panic(expected = "expected at least 1 request(s) within 200ms, but only 0 arrived")]
async fn wait_for_panics_after_timeout() {
    let sink = Sink::http().await;
    let started = Instant::now();
    // Bounded: if wait_for did not give up, the outer timeout would fire
    // with a different panic message and the test would fail.
    let _ = tokio::time::timeout(
        Duration::from_secs(3),
        sink.wait_for(1, Duration::from_millis(200)),
    )
    .await;
    panic!("wait_for returned after {:?}", started.elapsed());
}

#[tokio::test]
#[should_panic(expected = "expected 0 request(s) during")]
async fn assert_none_within_panics_when_something_arrives() {
    let sink = Sink::http().await;
    reqwest::Client::new()
        .post(sink.url())
        .body("{}")
        .send()
        .await
        .unwrap();
    sink.assert_none_within(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn dropping_the_sink_stops_the_server() {
    let sink = Sink::http().await;
    let url = sink.url();
    drop(sink);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .unwrap()
        .post(url)
        .body("{}")
        .send()
        .await
        .expect_err("server should be gone");
    assert!(err.is_connect(), "{err:?}");
}
