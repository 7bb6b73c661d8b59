//! Delivery features proven against third-party parts nobody here wrote:
//!
//! - Standard Webhooks signing, checked by the `standardwebhooks` PyPI package
//!   (`tests/peers/standardwebhooks_sink.py`, run in the venv made by `hack/python-peers.sh`);
//! - `proxyURL`, through Debian's `tinyproxy` (plain HTTP forwarding and https `CONNECT`);
//! - mutual TLS against a sink that requires a client certificate;
//! - `headers` / `headersSecretRef`, and the reserved-header rule as enforced by a real
//!   kube-apiserver (CEL), by `herald check`, and for Secrets by the core (`InvalidHeader`).
//!
//! Missing peers (the venv, tinyproxy, the control plane) fail the tests with the command that
//! installs them; nothing here is skipped.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use herald::crd::WebhookType;
use herald::object::NotReadyReason;
use herald::outgoing::ReportOutcome;
use herald_testkit::process::{Process, free_port};
use herald_testkit::{cli, cluster, core, sink, tinyproxy, tools};
use serde_json::Value;
use sink::{Sink, TestPki};
use tinyproxy::Tinyproxy;

use crate::core::{apply, batch, core, secret};

const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// The standardwebhooks peer
// ---------------------------------------------------------------------------

/// The venv interpreter made by `hack/python-peers.sh`.
fn peer_python() -> PathBuf {
    tools::require_all();
    let root = tools::tools_root();
    let python = root.join("py-venv/bin/python");
    assert!(
        python.is_file(),
        "{} not found: run hack/python-peers.sh to create the Python venv with the \
         standardwebhooks verifier (into $HERALD_TOOLS_DIR/py-venv, default \
         ~/.cache/herald-tools/py-venv)",
        python.display()
    );
    python
}

/// A fresh Standard Webhooks secret: `whsec_` + base64 of 32 random bytes.
fn whsec() -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
    )
}

/// `tests/peers/standardwebhooks_sink.py` as a process; stopped when dropped. Every request
/// it records (one JSON object per line) is read back from its output.
struct VerifyingSink {
    process: Process,
    port: u16,
    _dir: tempfile::TempDir,
}

impl VerifyingSink {
    /// A sink with one independent verifier per secret, answering 500 to the first
    /// `fail_first` requests.
    fn start(secrets: &[&str], fail_first: usize) -> VerifyingSink {
        let python = peer_python();
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/standardwebhooks_sink.py");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut command = Command::new(&python);
        command
            .arg(&script)
            .args(["--port", "0", "--fail-first", &fail_first.to_string()]);
        for s in secrets {
            command.args(["--secret", s]);
        }
        let mut process = Process::spawn("standardwebhooks_sink", command, &dir.path().join("out"))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let announced = json_lines(&process.log())
                .find_map(|line| line["listening"].as_u64().map(|p| p as u16));
            if let Some(port) = announced {
                return VerifyingSink {
                    process,
                    port,
                    _dir: dir,
                };
            }
            if let Some(status) = process.exit_status() {
                panic!(
                    "standardwebhooks_sink exited with {status} (run hack/python-peers.sh?):\n{}",
                    process.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "standardwebhooks_sink did not announce its port:\n{}",
                process.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Every request recorded so far.
    fn records(&self) -> Vec<Value> {
        json_lines(&self.process.log())
            .filter(|line| line.get("listening").is_none())
            .collect()
    }

    /// Waits (bounded) until `n` requests were recorded and returns them all.
    async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.records();
            if records.len() >= n {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "standardwebhooks_sink: {} of {n} request(s) within {timeout:?}: {records:#?}\n{}",
                records.len(),
                self.process.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The JSON objects among a peer's output lines (the rest is its own logging).
fn json_lines(output: &str) -> impl Iterator<Item = Value> + '_ {
    output
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(Value::is_object)
}

fn signed_webhook(name: &str, url: &str) -> String {
    format!(
        "metadata: {{name: {name}}}\nspec: {{url: '{url}', signing: {{secretRef: {{name: signing, key: secret}}}}}}"
    )
}

fn dispatch_one(dispatcher: &herald::dispatch::Dispatcher, alertname: &str) {
    dispatcher
        .dispatch(batch(&[&[("alertname", alertname)]]), WebhookType::Alarms)
        .expect("accepted");
}

// ---------------------------------------------------------------------------
// 1. Signing
// ---------------------------------------------------------------------------

#[tokio::test]
async fn signed_requests_verify_with_the_standardwebhooks_library() {
    let key = whsec();
    let verifier = VerifyingSink::start(&[&key], 0);
    let (dispatcher, reports) = core();
    // Two webhooks get the alert: the second body is sent in two parts (its own start, then
    // the end it shares with the first), and its signature covers both.
    for name in ["signed", "signed-too"] {
        apply(
            &dispatcher,
            &signed_webhook(name, &verifier.url()),
            &[("signing", secret(&[("secret", &format!("{key}\n"))]))],
        )
        .expect("ready");
    }
    dispatch_one(&dispatcher, "HighCPU");

    let report = reports.wait_for("monitoring/signed", WAIT).await;
    let records = verifier.wait_for(2, WAIT).await;
    let mut names = Vec::new();
    for r in &records {
        assert_eq!(
            r["verified"], true,
            "the library rejected Herald's signature: {r:#}"
        );
        let body: Value = serde_json::from_str(r["body"].as_str().expect("body")).expect("JSON");
        names.push(body["webhook"]["name"].as_str().expect("name").to_string());
    }
    names.sort();
    assert_eq!(names, ["signed", "signed-too"]);
    let r = records
        .iter()
        .find(|r| r["webhook_id"] == report.delivery_id.to_string())
        .expect("the record of monitoring/signed");
    assert_eq!(report.outcome, ReportOutcome::Succeeded, "{report:?}");
    assert_eq!(report.http_status, Some(200));
    // webhook-id is the delivery's Idempotency-Key.
    assert_eq!(r["webhook_id"], report.delivery_id.to_string());
    assert_eq!(
        r["headers"]["idempotency-key"],
        report.delivery_id.to_string()
    );
    let signature = r["webhook_signature"].as_str().expect("signature");
    assert_eq!(signature.split(' ').count(), 1, "{signature}");
    assert!(signature.starts_with("v1,"), "{signature}");
    let timestamp: i64 = r["webhook_timestamp"]
        .as_str()
        .expect("timestamp")
        .parse()
        .expect("Unix seconds");
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    assert!((now - timestamp).abs() < 60, "{timestamp} vs now {now}");
    let body: Value = serde_json::from_str(r["body"].as_str().expect("body")).expect("JSON");
    assert_eq!(body["alerts"][0]["labels"]["alertname"], "HighCPU");
}

#[tokio::test]
async fn during_rotation_holders_of_either_secret_accept_and_others_reject() {
    let (a, b, other) = (whsec(), whsec(), whsec());
    // One verifier per secret, each holding only that secret.
    let both = VerifyingSink::start(&[&a, &b], 0);
    let stranger = VerifyingSink::start(&[&other], 0);
    let (dispatcher, reports) = core();
    let rotating = secret(&[("secret", &format!("{a} {b}"))]);
    apply(
        &dispatcher,
        &signed_webhook("rotating", &both.url()),
        &[("signing", rotating.clone())],
    )
    .expect("ready");
    apply(
        &dispatcher,
        &signed_webhook("stranger", &stranger.url()),
        &[("signing", rotating)],
    )
    .expect("ready");
    dispatch_one(&dispatcher, "X");

    let records = both.wait_for(1, WAIT).await;
    let r = &records[0];
    assert_eq!(
        r["results"][0]["verified"], true,
        "holder of A rejected: {r:#}"
    );
    assert_eq!(
        r["results"][1]["verified"], true,
        "holder of B rejected: {r:#}"
    );
    let signature = r["webhook_signature"].as_str().expect("signature");
    let parts: Vec<_> = signature.split(' ').collect();
    assert_eq!(parts.len(), 2, "one signature per secret: {signature}");
    assert!(parts.iter().all(|p| p.starts_with("v1,")), "{signature}");
    assert_ne!(parts[0], parts[1]);
    assert_eq!(
        reports.wait_for("monitoring/rotating", WAIT).await.outcome,
        ReportOutcome::Succeeded
    );

    // A verifier holding neither secret must refuse: the signatures are not just any v1 value.
    let records = stranger.wait_for(1, WAIT).await;
    assert_eq!(records[0]["verified"], false, "{:#}", records[0]);
    assert!(
        records[0]["error"]
            .as_str()
            .expect("error")
            .contains("No matching signature"),
        "{:#}",
        records[0]
    );
    let report = reports.wait_for("monitoring/stranger", WAIT).await;
    assert_eq!(report.outcome, ReportOutcome::Failed);
    assert_eq!(report.http_status, Some(401), "401 is final: {report:?}");
}

#[tokio::test]
async fn a_tampered_body_or_header_is_rejected_by_the_verifier() {
    let key = whsec();
    let verifier = VerifyingSink::start(&[&key], 0);
    let (dispatcher, reports) = core();
    apply(
        &dispatcher,
        &signed_webhook("signed", &verifier.url()),
        &[("signing", secret(&[("secret", &key)]))],
    )
    .expect("ready");
    dispatch_one(&dispatcher, "DiskFull");
    assert_eq!(
        reports.wait_for("monitoring/signed", WAIT).await.outcome,
        ReportOutcome::Succeeded
    );
    let original = verifier.wait_for(1, WAIT).await[0].clone();
    assert_eq!(original["verified"], true, "{original:#}");
    let body = original["body"].as_str().expect("body").to_string();
    let header = |name: &str| original[name].as_str().expect(name).to_string();
    let (id, timestamp, signature) = (
        header("webhook_id"),
        header("webhook_timestamp"),
        header("webhook_signature"),
    );

    let client = reqwest::Client::new();
    let send = |id: String, timestamp: String, body: String| {
        let request = client
            .post(verifier.url())
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature.clone())
            .body(body);
        async move { request.send().await.expect("send").status().as_u16() }
    };

    // Control: the recorded request replayed byte for byte still verifies, so a rejection
    // below is caused by the tampering alone.
    assert_eq!(send(id.clone(), timestamp.clone(), body.clone()).await, 200);

    let tampered_body = body.replacen("DiskFull", "DiskFine", 1);
    assert_ne!(tampered_body, body);
    assert_eq!(
        send(id.clone(), timestamp.clone(), tampered_body).await,
        401
    );
    let other_id = format!("{id}x");
    assert_eq!(send(other_id, timestamp.clone(), body.clone()).await, 401);
    let other_timestamp = (timestamp.parse::<i64>().expect("ts") - 1).to_string();
    assert_eq!(send(id, other_timestamp, body).await, 401);

    let records = verifier.wait_for(5, WAIT).await;
    let verdicts: Vec<_> = records.iter().map(|r| r["verified"].clone()).collect();
    assert_eq!(
        verdicts,
        [true, true, false, false, false].map(Value::Bool),
        "{records:#?}"
    );
    for r in &records[2..] {
        assert!(
            r["error"]
                .as_str()
                .expect("error")
                .contains("No matching signature found"),
            "{r:#}"
        );
    }
}

#[tokio::test]
async fn retries_keep_the_webhook_id_and_each_attempt_verifies() {
    let key = whsec();
    let verifier = VerifyingSink::start(&[&key], 2);
    let (dispatcher, reports) = core();
    apply(
        &dispatcher,
        &signed_webhook("flaky", &verifier.url()),
        &[("signing", secret(&[("secret", &key)]))],
    )
    .expect("ready");
    dispatch_one(&dispatcher, "X");

    let report = reports.wait_for("monitoring/flaky", WAIT).await;
    assert_eq!(report.outcome, ReportOutcome::Succeeded, "{report:?}");
    assert_eq!(report.attempts, 3);
    let records = verifier.wait_for(3, WAIT).await;
    assert_eq!(records.len(), 3, "{records:#?}");
    let statuses: Vec<_> = records.iter().map(|r| r["status"].clone()).collect();
    assert_eq!(statuses, [500, 500, 200].map(Value::from));
    for r in &records {
        assert_eq!(r["verified"], true, "attempt not verifiable: {r:#}");
        assert_eq!(r["webhook_id"], report.delivery_id.to_string(), "{r:#}");
        assert_eq!(
            r["headers"]["idempotency-key"],
            report.delivery_id.to_string()
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Proxy
// ---------------------------------------------------------------------------

#[tokio::test]
async fn http_deliveries_go_through_the_proxy() {
    let sink = Sink::http().await;
    let proxy = Tinyproxy::start();
    let (dispatcher, reports) = core();
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: proxied}}\nspec: {{url: '{}', proxyURL: '{}'}}",
            sink.url(),
            proxy.url()
        ),
        &[],
    )
    .expect("ready");
    dispatch_one(&dispatcher, "X");

    let report = reports.wait_for("monitoring/proxied", WAIT).await;
    assert_eq!(report.outcome, ReportOutcome::Succeeded, "{report:?}");
    let got = sink.wait_for(1, WAIT).await;
    let via = got[0].header("via").unwrap_or_default();
    assert!(
        via.contains("tinyproxy"),
        "the sink saw no Via header from tinyproxy ({via:?}): the request bypassed the proxy"
    );
    assert_eq!(got[0].json()["webhook"]["name"], "proxied");
    let line = format!("POST http://127.0.0.1:{}/hook HTTP/1.1", sink.addr().port());
    proxy.wait_log(&line, WAIT).await;
    assert_eq!(proxy.requests(), [line]);
}

#[tokio::test]
async fn https_deliveries_tunnel_through_the_proxy_with_connect() {
    let pki = TestPki::generate();
    let sink = Sink::https(&pki).await;
    let proxy = Tinyproxy::start();
    let (dispatcher, reports) = core();
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: tunnelled}}\nspec: {{url: '{}', proxyURL: '{}', tls: {{caSecretRef: {{name: ca, key: ca.crt}}}}}}",
            sink.url(),
            proxy.url()
        ),
        &[("ca", secret(&[("ca.crt", &pki.ca_pem)]))],
    )
    .expect("ready");
    dispatch_one(&dispatcher, "X");

    let report = reports.wait_for("monitoring/tunnelled", WAIT).await;
    assert_eq!(report.outcome, ReportOutcome::Succeeded, "{report:?}");
    let got = sink.wait_for(1, WAIT).await;
    // The proxy only relays the TLS bytes: it cannot add a header inside the tunnel.
    assert_eq!(got[0].header("via"), None);
    let line = format!("CONNECT 127.0.0.1:{} HTTP/1.1", sink.addr().port());
    proxy.wait_log(&line, WAIT).await;
    assert_eq!(proxy.requests(), [line]);
}

#[tokio::test]
async fn proxy_credentials_from_a_secret_are_used_and_never_reported() {
    let sink = Sink::http().await;
    let proxy = Tinyproxy::with_basic_auth("herald", "pr0xy-pa55");
    let (dispatcher, reports) = core();
    // Credentials in proxyURL itself are refused: anyone who reads the Webhook would see them.
    let err = apply(
        &dispatcher,
        &format!(
            "metadata: {{name: inline}}\nspec: {{url: '{}', proxyURL: '{}'}}",
            sink.url_for("/inline"),
            proxy.url_with_credentials("herald", "pr0xy-pa55")
        ),
        &[],
    )
    .expect_err("credentials in proxyURL");
    assert!(err.message.contains("proxySecretRef"), "{err}");
    assert!(!err.message.contains("pr0xy-pa55"), "{err}");
    let secrets = [
        (
            "proxy-good",
            secret(&[("username", "herald"), ("password", "pr0xy-pa55")]),
        ),
        (
            "proxy-wrong",
            secret(&[("username", "herald"), ("password", "wr0ng-pa55")]),
        ),
    ];
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: good}}\nspec: {{url: '{}', proxyURL: '{}', proxySecretRef: {{name: proxy-good}}}}",
            sink.url_for("/good"),
            proxy.url()
        ),
        &secrets,
    )
    .expect("ready");
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: wrong}}\nspec: {{url: '{}', proxyURL: '{}', proxySecretRef: {{name: proxy-wrong}}}}",
            sink.url_for("/wrong"),
            proxy.url()
        ),
        &secrets,
    )
    .expect("ready");
    dispatch_one(&dispatcher, "X");

    let good = reports.wait_for("monitoring/good", WAIT).await;
    assert_eq!(good.outcome, ReportOutcome::Succeeded, "{good:?}");
    let wrong = reports.wait_for("monitoring/wrong", WAIT).await;
    assert_eq!(wrong.outcome, ReportOutcome::Failed, "{wrong:?}");
    // tinyproxy answers 407 to a request without credentials and 401 to wrong ones; either
    // way the proxy's refusal is final, not retried.
    assert!(matches!(wrong.http_status, Some(401 | 407)), "{wrong:?}");
    assert_eq!(wrong.attempts, 1, "{wrong:?}");
    assert!(
        !wrong.message.contains("wr0ng-pa55") && !good.message.contains("pr0xy-pa55"),
        "a proxy password leaked into a report: {wrong:?} / {good:?}"
    );
    let got = sink.wait_for(1, WAIT).await;
    sink.assert_no_more_within(Duration::from_millis(200)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/good");
    // The proxy consumed the credentials; they are not forwarded to the endpoint.
    assert_eq!(got[0].header("proxy-authorization"), None);
}

/// An `https://` proxy: TLS terminated on loopback in front of tinyproxy, counting handshakes.
struct TlsProxyFront {
    port: u16,
    handshakes: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxyFront {
    async fn start(pki: &TestPki, backend: u16) -> TlsProxyFront {
        let mut config = pki.server_config(false);
        config.alpn_protocols.clear();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = handshakes.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Ok(mut plain) =
                        tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsProxyFront {
            port,
            handshakes,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for TlsProxyFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn an_https_proxy_is_reached_over_tls_for_http_and_https_destinations() {
    let pki = TestPki::generate();
    let http_sink = Sink::http().await;
    let https_sink = Sink::https(&pki).await;
    let proxy = Tinyproxy::start();
    let front = TlsProxyFront::start(&pki, proxy.port()).await;
    let (dispatcher, reports) = core();
    let ca = ("ca", secret(&[("ca.crt", pki.ca_pem.as_str())]));
    for (name, url) in [("plain", http_sink.url()), ("tunnelled", https_sink.url())] {
        apply(
            &dispatcher,
            &format!(
                "metadata: {{name: {name}}}\nspec: {{url: '{url}', proxyURL: '{}', tls: {{caSecretRef: {{name: ca, key: ca.crt}}}}}}",
                front.url()
            ),
            std::slice::from_ref(&ca),
        )
        .expect("ready");
    }
    dispatch_one(&dispatcher, "X");

    for name in ["plain", "tunnelled"] {
        let report = reports.wait_for(&format!("monitoring/{name}"), WAIT).await;
        assert_eq!(
            report.outcome,
            ReportOutcome::Succeeded,
            "{name}: {report:?}"
        );
    }
    let plain = http_sink.wait_for(1, WAIT).await;
    assert!(
        plain[0]
            .header("via")
            .unwrap_or_default()
            .contains("tinyproxy"),
        "the http request bypassed the proxy: {:?}",
        plain[0].header("via")
    );
    assert_eq!(https_sink.wait_for(1, WAIT).await.len(), 1);
    let post = format!(
        "POST http://127.0.0.1:{}/hook HTTP/1.1",
        http_sink.addr().port()
    );
    let connect = format!("CONNECT 127.0.0.1:{} HTTP/1.1", https_sink.addr().port());
    proxy.wait_log(&connect, WAIT).await;
    proxy.wait_log(&post, WAIT).await;
    let mut requests = proxy.requests();
    requests.sort();
    assert_eq!(requests, [connect, post]);
    // Each request reached tinyproxy through a TLS connection to the front.
    assert_eq!(front.handshakes(), 2);
}

#[tokio::test]
async fn a_dead_proxy_fails_the_delivery_instead_of_going_direct() {
    let sink = Sink::http().await;
    let dead = free_port();
    let (dispatcher, reports) = core();
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: dead-proxy}}\nspec: {{url: '{}', proxyURL: 'http://127.0.0.1:{dead}'}}",
            sink.url()
        ),
        &[],
    )
    .expect("ready");
    dispatch_one(&dispatcher, "X");
    let report = reports
        .wait_for("monitoring/dead-proxy", Duration::from_secs(30))
        .await;
    assert_eq!(report.outcome, ReportOutcome::Failed, "{report:?}");
    assert!(
        report.message.contains("connection failed"),
        "{}",
        report.message
    );
    assert_eq!(sink.count(), 0, "the request went around the proxy");
}

// ---------------------------------------------------------------------------
// 3. Mutual TLS
// ---------------------------------------------------------------------------

fn mtls_webhook(name: &str, url: &str, client_cert: bool) -> String {
    let client = if client_cert {
        ", clientCertSecretRef: {name: client}"
    } else {
        ""
    };
    format!(
        "metadata: {{name: {name}}}\nspec: {{url: '{url}', tls: {{caSecretRef: {{name: ca, key: ca.crt}}{client}}}}}"
    )
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() {
    let pki = TestPki::generate();
    let sink = Sink::https_mtls(&pki).await;
    let (dispatcher, reports) = core();
    let ca = ("ca", secret(&[("ca.crt", &pki.ca_pem)]));
    // A kubernetes.io/tls Secret: keys tls.crt and tls.key.
    let client = (
        "client",
        secret(&[
            ("tls.crt", &pki.client_cert_pem),
            ("tls.key", &pki.client_key_pem),
        ]),
    );
    let foreign = TestPki::other_ca_client();
    let foreign = (
        "client",
        secret(&[
            ("tls.crt", &foreign.cert_pem),
            ("tls.key", &foreign.key_pem),
        ]),
    );
    apply(
        &dispatcher,
        &mtls_webhook("anonymous", &sink.url_for("/anonymous"), false),
        std::slice::from_ref(&ca),
    )
    .expect("ready");
    apply(
        &dispatcher,
        &mtls_webhook("with-cert", &sink.url_for("/with-cert"), true),
        &[ca.clone(), client],
    )
    .expect("ready");
    apply(
        &dispatcher,
        &mtls_webhook("foreign-cert", &sink.url_for("/foreign-cert"), true),
        &[ca, foreign],
    )
    .expect("ready");
    dispatch_one(&dispatcher, "X");

    let ok = reports.wait_for("monitoring/with-cert", WAIT).await;
    assert_eq!(ok.outcome, ReportOutcome::Succeeded, "{ok:?}");
    assert_eq!(ok.http_status, Some(200));
    // The server's TLS alert must reach the report: `CertificateRequired` when Herald sent no
    // certificate, `UnknownCA` when it sent one the server does not trust.
    for (name, alert) in [
        ("anonymous", "certificaterequired"),
        ("foreign-cert", "unknownca"),
    ] {
        let report = reports
            .wait_for(&format!("monitoring/{name}"), Duration::from_secs(30))
            .await;
        eprintln!("{name}: {}", report.message);
        assert_eq!(report.outcome, ReportOutcome::Failed, "{name}: {report:?}");
        assert_eq!(report.http_status, None, "{name}: {report:?}");
        let message = report.message.to_lowercase();
        assert!(
            message.contains(alert),
            "{name}: the failure should name the TLS alert {alert:?}: {}",
            report.message
        );
    }
    let got = sink.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].path, "/with-cert");
}

#[tokio::test]
async fn unusable_client_certificates_make_the_webhook_not_ready() {
    let pki = TestPki::generate();
    let other = TestPki::other_ca_client();
    let (dispatcher, _) = core();
    let spec = mtls_webhook("mtls", "https://127.0.0.1:1/hook", true);
    let ca = ("ca", secret(&[("ca.crt", pki.ca_pem.as_str())]));
    let cases: [(&str, Vec<(&str, &str)>); 4] = [
        (
            "cert and key of different pairs",
            vec![
                ("tls.crt", &pki.client_cert_pem),
                ("tls.key", &other.key_pem),
            ],
        ),
        (
            "garbage",
            vec![("tls.crt", "not a certificate"), ("tls.key", "not a key")],
        ),
        (
            "key in place of the certificate",
            vec![
                ("tls.crt", &pki.client_key_pem),
                ("tls.key", &pki.client_key_pem),
            ],
        ),
        (
            "certificate without its key",
            vec![
                ("tls.crt", &pki.client_cert_pem),
                ("tls.key", &pki.client_cert_pem),
            ],
        ),
    ];
    for (what, pairs) in cases {
        let err = apply(
            &dispatcher,
            &spec,
            &[ca.clone(), ("client", secret(&pairs))],
        )
        .expect_err(what);
        assert_eq!(
            err.reason,
            NotReadyReason::InvalidClientCertificate,
            "{what}: {err:?}"
        );
        assert!(
            !err.message.contains("PRIVATE KEY") && !err.message.contains("BEGIN"),
            "{what}: key material in the message: {}",
            err.message
        );
    }
    // The good pair is accepted, so the refusals above are about the pairs alone.
    apply(
        &dispatcher,
        &spec,
        &[
            ca,
            (
                "client",
                secret(&[
                    ("tls.crt", &pki.client_cert_pem),
                    ("tls.key", &pki.client_key_pem),
                ]),
            ),
        ],
    )
    .expect("a matching pair is ready");
}

// ---------------------------------------------------------------------------
// 4. Headers
// ---------------------------------------------------------------------------

#[tokio::test]
async fn spec_headers_and_every_key_of_the_headers_secret_arrive() {
    let sink = Sink::http().await;
    let (dispatcher, reports) = core();
    apply(
        &dispatcher,
        &format!(
            "metadata: {{name: headers}}\nspec: {{url: '{}', auth: {{type: Bearer, secretRef: {{name: tok}}}}, headers: {{X-Team: ops, X-Trace-Mode: 'a b;c=d'}}, headersSecretRef: {{name: api-keys}}}}",
            sink.url()
        ),
        &[
            ("tok", secret(&[("token", "t0ken")])),
            (
                "api-keys",
                secret(&[
                    ("X-Api-Key", "k3y-123\n"),
                    ("x-tenant-id", "tenant-42"),
                    ("X-Signature-Ref", "ref/1"),
                ]),
            ),
        ],
    )
    .expect("ready");
    dispatch_one(&dispatcher, "X");
    assert_eq!(
        reports.wait_for("monitoring/headers", WAIT).await.outcome,
        ReportOutcome::Succeeded
    );
    let got = sink.wait_for(1, WAIT).await;
    let r = &got[0];
    for (name, value) in [
        ("x-team", "ops"),
        ("x-trace-mode", "a b;c=d"),
        ("x-api-key", "k3y-123"),
        ("x-tenant-id", "tenant-42"),
        ("x-signature-ref", "ref/1"),
        // Herald's own headers are still there.
        ("authorization", "Bearer t0ken"),
        ("content-type", "application/json"),
    ] {
        assert_eq!(r.header(name).as_deref(), Some(value), "{name}: {r:?}");
        assert_eq!(r.headers.get_all(name).iter().count(), 1, "{name}: {r:?}");
    }
}

#[tokio::test]
async fn a_reserved_key_in_the_headers_secret_makes_the_webhook_not_ready() {
    let (dispatcher, _) = core();
    let spec =
        "metadata: {name: h}\nspec: {url: 'http://127.0.0.1:1/hook', headersSecretRef: {name: hs}}";
    for reserved in [
        "Authorization",
        "content-type",
        "User-Agent",
        "Idempotency-Key",
        "HOST",
        "webhook-signature",
        "Webhook-Id",
    ] {
        let err = apply(
            &dispatcher,
            spec,
            &[("hs", secret(&[("X-Fine", "1"), (reserved, "x")]))],
        )
        .expect_err(reserved);
        assert_eq!(
            err.reason,
            NotReadyReason::InvalidHeader,
            "{reserved}: {err:?}"
        );
        assert!(
            err.message
                .to_lowercase()
                .contains(&reserved.to_lowercase()),
            "{reserved}: {}",
            err.message
        );
    }
    apply(&dispatcher, spec, &[("hs", secret(&[("X-Fine", "1")]))]).expect("ready");
}

const RESERVED_MESSAGE: &str = "headers may not set Authorization, Content-Type, User-Agent, Idempotency-Key, Host, Herald-Delivery or any webhook-* header";

fn header_webhook(namespace: &str, name: &str, header: &str) -> String {
    format!(
        "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  url: https://hooks.example.com/h\n  headers:\n    {header}: x\n"
    )
}

#[test]
fn the_api_server_rejects_reserved_headers() {
    cluster::plane();
    let ns = "delivery-features-headers";
    cluster::apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"
    ));
    for (i, header) in ["Authorization", "content-type", "HOST", "webhook-id"]
        .into_iter()
        .enumerate()
    {
        let yaml = header_webhook(ns, &format!("reserved-{i}"), header);
        let out = cluster::kubectl_stdin(&["apply", "-f", "-"], Some(&yaml));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{header} was accepted:\n{yaml}");
        assert!(stderr.contains(RESERVED_MESSAGE), "{header}: {stderr}");
        assert!(stderr.contains("spec.headers"), "{header}: {stderr}");
    }
    let yaml = header_webhook(ns, "allowed", "X-Team");
    let out = cluster::kubectl_stdin(&["apply", "-f", "-"], Some(&yaml));
    assert!(
        out.status.success(),
        "a plain header was refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn herald_check_rejects_reserved_headers_like_the_api_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("reserved.yaml");
    std::fs::write(
        &file,
        header_webhook("monitoring", "reserved", "Authorization"),
    )
    .expect("write");
    let path = dir.path().to_str().expect("utf-8");
    let out = cli::herald(&["check", path]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check accepted a reserved header");
    assert!(stderr.contains("reserved.yaml"), "{stderr}");
    assert!(stderr.contains("spec.headers"), "{stderr}");
    assert!(stderr.contains(RESERVED_MESSAGE), "{stderr}");

    // A reserved key in the headers Secret is not a schema error but a not-ready webhook.
    std::fs::write(
        &file,
        "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {name: secret-headers, namespace: monitoring}\nspec: {url: 'https://hooks.example.com/h', headersSecretRef: {name: hs}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: hs, namespace: monitoring}\nstringData: {Idempotency-Key: x}\n",
    )
    .expect("write");
    let out = cli::herald(&["check", path]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("monitoring/secret-headers") && stdout.contains("InvalidHeader"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
