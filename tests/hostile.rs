//! Hostile clients against an in-process receiver, over real loopback HTTP: slow heads, trickled
//! bodies, deep nesting, oversized payloads, bad encodings, wrong types, connection floods. Each
//! test asserts a clear refusal (a 4xx with a JSON error, or a closed connection where HTTP has
//! no better answer) and that the server still answers a good request afterwards.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use herald::alert::PayloadLimits;
use herald_testkit::core;

use crate::core::post_json as post;
use herald::receiver::{ReceiverConfig, ServerLimits};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const V1: &str = "/api/v1/alerts";
const V2: &str = "/api/v2/alerts";

/// Serves a fresh core's receiver on a free loopback port for the rest of the test.
async fn start(config: ReceiverConfig, limits: ServerLimits) -> SocketAddr {
    let (dispatcher, _) = core::core();
    dispatcher.set_ready(true);
    core::serve_receiver(dispatcher, config, limits).await
}

async fn start_default() -> SocketAddr {
    start(ReceiverConfig::default(), ServerLimits::default()).await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("client")
}

fn good_payload() -> String {
    json!({"version": "4", "status": "firing", "alerts": [
        {"status": "firing", "labels": {"alertname": "StillServing", "severity": "info"}}
    ]})
    .to_string()
}

/// The server still answers a good request from a fresh client (the client's own timeout
/// fails a server that no longer answers).
async fn assert_still_serves(addr: SocketAddr) {
    let (status, body) = post(addr, V1, good_payload()).await;
    assert_eq!(status, 200, "a good request after the hostile one: {body}");
    assert_eq!(body["accepted"], 1, "{body}");
    let response = client()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(response.status().as_u16(), 200);
}

/// A 400 whose JSON reply carries an error message (and returns the reply).
fn assert_400(status: u16, body: &Value, what: &str) {
    assert_eq!(status, 400, "{what}: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: the 400 carries an error message: {body}"
    );
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 over TCP, for what reqwest will not send.
// ---------------------------------------------------------------------------------------------

/// What the server did with a raw connection.
#[derive(Debug)]
struct RawOutcome {
    /// Everything the server sent before closing (or before `deadline`).
    bytes: Vec<u8>,
    /// Whether the server closed the connection (EOF or reset) before the deadline.
    closed: bool,
    /// When the connection closed or the reply was complete, since the start.
    elapsed: Duration,
}

impl RawOutcome {
    fn status(&self) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.bytes);
        let line = text.lines().next()?;
        line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Reads until the server closes the connection, or `deadline` passes.
async fn read_until_closed(
    reader: &mut (impl AsyncReadExt + Unpin),
    started: Instant,
    deadline: Duration,
) -> RawOutcome {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, reader.read(&mut buf)).await {
            Err(_) => {
                return RawOutcome {
                    bytes,
                    closed: false,
                    elapsed: started.elapsed(),
                };
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                return RawOutcome {
                    bytes,
                    closed: true,
                    elapsed: started.elapsed(),
                };
            }
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// A kept-alive raw connection that sends complete requests and reads complete replies.
struct KeepAlive {
    stream: TcpStream,
    buffered: Vec<u8>,
}

impl KeepAlive {
    async fn connect(addr: SocketAddr) -> KeepAlive {
        KeepAlive {
            stream: TcpStream::connect(addr).await.expect("connect"),
            buffered: Vec::new(),
        }
    }

    /// Sends one request and reads its reply: `None` if the server closed the connection
    /// without answering (or did not answer within [`NEVER`]).
    async fn request(&mut self, method: &str, path: &str, body: &str) -> Option<u16> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        if self.stream.write_all(head.as_bytes()).await.is_err()
            || self.stream.write_all(body.as_bytes()).await.is_err()
        {
            return None;
        }
        tokio::time::timeout(NEVER, self.read_reply())
            .await
            .ok()
            .flatten()
    }

    async fn read_reply(&mut self) -> Option<u16> {
        let mut buf = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = find(&self.buffered, b"\r\n\r\n") {
                break i + 4;
            }
            match self.stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buffered.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&self.buffered[..head_end]).to_ascii_lowercase();
        let status: u16 = head.get(9..12)?.parse().ok()?;
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while self.buffered.len() < head_end + length {
            match self.stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buffered.extend_from_slice(&buf[..n]),
            }
        }
        self.buffered.drain(..head_end + length);
        Some(status)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Sends `request` on a fresh connection and reads until the server closes it.
async fn raw_exchange(addr: SocketAddr, request: &[u8], deadline: Duration) -> RawOutcome {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may answer (and close) before it has read everything: ignore write errors.
    let _ = stream.write_all(request).await;
    read_until_closed(&mut stream, started, deadline).await
}

// ---------------------------------------------------------------------------------------------
// Slow clients
// ---------------------------------------------------------------------------------------------

/// Longer than any test waits for a server to act on its own, and shorter than any trickled
/// request takes to complete: a connection still open after it was never cut off.
const NEVER: Duration = Duration::from_secs(20);

#[tokio::test]
async fn slow_loris_heads_are_cut_off_while_other_clients_are_served() {
    // Long enough that the normal clients below are served while every slow one is still
    // connected, even on a busy machine.
    let header_read_timeout = Duration::from_secs(8);
    let addr = start(
        ReceiverConfig::default(),
        ServerLimits {
            header_read_timeout,
            ..ServerLimits::default()
        },
    )
    .await;

    // Twenty slow-loris clients, each sending its request head (170 bytes, so 34 s in all) one
    // byte every 200 ms.
    let head = b"POST /api/v1/alerts HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    assert!(Duration::from_millis(200) * head.len() as u32 > NEVER);
    let mut lorises = Vec::new();
    for _ in 0..20 {
        let stream = TcpStream::connect(addr).await.expect("connect");
        lorises.push(tokio::spawn(async move {
            let started = Instant::now();
            let (mut reader, mut writer) = stream.into_split();
            let writing = tokio::spawn(async move {
                let mut sent = 0usize;
                for byte in head.iter() {
                    if writer.write_all(&[*byte]).await.is_err() {
                        break;
                    }
                    sent += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                sent
            });
            let outcome = read_until_closed(&mut reader, started, NEVER).await;
            writing.abort();
            outcome
        }));
    }

    // Meanwhile, normal clients are served, while every slow one is still connected.
    for _ in 0..3 {
        let (status, body) = post(addr, V1, good_payload()).await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(
        lorises.iter().all(|loris| !loris.is_finished()),
        "the normal requests were served only once slow clients had been cut off"
    );

    let mut slowest = Duration::ZERO;
    for loris in lorises {
        let outcome = loris.await.expect("loris task");
        assert!(
            outcome.closed,
            "a slow-loris connection was still open after {NEVER:?}: {outcome:?}"
        );
        // Closed, possibly after a 408: never served as a request.
        assert!(
            outcome.bytes.is_empty() || outcome.status() == Some(408),
            "unexpected reply to a slow head: {}",
            outcome.text()
        );
        slowest = slowest.max(outcome.elapsed);
    }
    eprintln!("slow-loris: the slowest head was cut off after {slowest:?}");
    assert_still_serves(addr).await;
}

#[tokio::test]
async fn connections_that_send_nothing_or_trickle_the_http2_preface_are_cut_off() {
    let header_read_timeout = Duration::from_millis(500);
    let addr = start(
        ReceiverConfig::default(),
        ServerLimits {
            header_read_timeout,
            ..ServerLimits::default()
        },
    )
    .await;
    // Idle after one served request (keep-alive).
    let kept_alive = tokio::spawn(async move {
        let mut connection = KeepAlive::connect(addr).await;
        assert_eq!(connection.request("GET", "/healthz", "").await, Some(200));
        let started = Instant::now();
        read_until_closed(&mut connection.stream, started, NEVER).await
    });
    // Connected, never sends a byte.
    let silent = tokio::spawn(async move {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        read_until_closed(&mut stream, started, NEVER).await
    });
    // Sends the HTTP/2 prior-knowledge preface one byte every 200 ms.
    let preface = tokio::spawn(async move {
        let started = Instant::now();
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut reader, mut writer) = stream.into_split();
        let writing = tokio::spawn(async move {
            for byte in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
                if writer.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // Then nothing: hold the connection.
            tokio::time::sleep(NEVER * 2).await;
        });
        let outcome = read_until_closed(&mut reader, started, NEVER).await;
        writing.abort();
        outcome
    });
    let kept_alive = kept_alive.await.expect("task");
    let silent = silent.await.expect("task");
    let preface = preface.await.expect("task");
    eprintln!(
        "idle connections: kept-alive closed={} after {:?}; silent closed={} after {:?}; \
         preface trickle closed={} after {:?}",
        kept_alive.closed,
        kept_alive.elapsed,
        silent.closed,
        silent.elapsed,
        preface.closed,
        preface.elapsed
    );
    // Each would stay open for good without the header timeout.
    assert!(
        kept_alive.closed,
        "an idle kept-alive connection: {kept_alive:?}"
    );
    assert!(
        silent.closed,
        "a connection that never sends a byte holds a connection slot: {silent:?}"
    );
    assert!(
        preface.closed,
        "a connection trickling the HTTP/2 preface holds a connection slot: {preface:?}"
    );
    assert_still_serves(addr).await;
}

#[tokio::test]
async fn silent_connections_cannot_take_every_connection_slot() {
    let max_connections = 16;
    let header_read_timeout = Duration::from_millis(500);
    let addr = start(
        ReceiverConfig::default(),
        ServerLimits {
            max_connections,
            header_read_timeout,
            ..ServerLimits::default()
        },
    )
    .await;
    // An attacker opens as many connections as the limit allows and sends nothing.
    let mut silent = Vec::new();
    for _ in 0..max_connections {
        silent.push(TcpStream::connect(addr).await.expect("connect"));
    }
    // Once the server has cut them off, a real client must get through again.
    for mut stream in silent.drain(..) {
        let outcome = read_until_closed(&mut stream, Instant::now(), NEVER).await;
        assert!(outcome.closed, "a silent connection was never closed");
    }
    let mut connection = KeepAlive::connect(addr).await;
    let status = connection.request("POST", V1, &good_payload()).await;
    assert_eq!(
        status,
        Some(200),
        "{max_connections} silent connections still hold every slot after the header timeout"
    );
}

#[tokio::test]
async fn a_body_trickled_slower_than_the_request_timeout_gets_408_or_is_closed() {
    let request_timeout = Duration::from_secs(1);
    let addr = start(
        ReceiverConfig {
            request_timeout,
            ..ReceiverConfig::default()
        },
        ServerLimits::default(),
    )
    .await;
    let body = good_payload();
    // At one byte every 200 ms, the body would take longer than `NEVER`.
    assert!(Duration::from_millis(200) * body.len() as u32 > NEVER);
    let head = format!(
        "POST /api/v1/alerts HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(head.as_bytes()).await.expect("head");
    let trickle = tokio::spawn(async move {
        for byte in body.into_bytes() {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let outcome = read_until_closed(&mut reader, started, NEVER).await;
    trickle.abort();
    eprintln!(
        "trickled body: status {:?}, closed {} after {:?}",
        outcome.status(),
        outcome.closed,
        outcome.elapsed
    );
    assert!(
        outcome.status() == Some(408) || (outcome.closed && outcome.bytes.is_empty()),
        "a trickled body got neither 408 nor a closed connection before it was complete: {}",
        outcome.text()
    );
    assert_still_serves(addr).await;
}

// ---------------------------------------------------------------------------------------------
// Bad JSON
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn json_nested_100k_levels_deep_is_400() {
    let addr = start_default().await;
    let depth = 100_000;
    let cases = [
        (
            V1,
            format!("{{\"alerts\": {}{}}}", "[".repeat(depth), "]".repeat(depth)),
        ),
        (
            V1,
            // Unclosed: the parser must give up before it runs out of input.
            format!("{{\"alerts\": {}", "[".repeat(depth)),
        ),
        (
            V1,
            // Unclosed, inside a field Herald does not know.
            format!(
                "{{\"alerts\": [{{\"labels\": {{}}, \"extra\": {}",
                "{\"x\":".repeat(depth)
            ),
        ),
        (V2, format!("{}{}", "[".repeat(depth), "]".repeat(depth))),
        (
            V2,
            // Unclosed, inside a field Herald does not know.
            format!("[{{\"labels\": {{}}, \"extra\": {}", "[".repeat(depth)),
        ),
    ];
    for (path, body) in cases {
        let (status, reply) = post(addr, path, body.clone()).await;
        assert_400(status, &reply, &format!("100k levels: {}", &body[..40]));
        assert!(reply["path"].is_string(), "{reply}");
    }
    // Well-formed nesting inside a field Herald does not know is skipped (serde_json skips
    // ignored values without recursing), so the payload is valid: no stack overflow, a 200.
    let body = format!(
        "{{\"alerts\": [{{\"labels\": {{\"alertname\": \"A\"}}, \"extra\": {}1{}}}]}}",
        "{\"x\":".repeat(depth),
        "}".repeat(depth)
    );
    let (status, reply) = post(addr, V1, body).await;
    assert_eq!(status, 200, "{reply}");
    assert_still_serves(addr).await;
}

#[tokio::test]
async fn payload_limits_refuse_with_the_json_path() {
    let limits = PayloadLimits {
        max_alerts: 5,
        max_labels: 4,
        max_name_bytes: 32,
        max_value_bytes: 256,
    };
    let addr = start(
        ReceiverConfig {
            payload: limits,
            ..ReceiverConfig::default()
        },
        ServerLimits::default(),
    )
    .await;
    let v1 = |alerts: Value| json!({"version": "4", "alerts": alerts}).to_string();
    let ok_alert = json!({"labels": {"alertname": "A"}});
    let labels = |n: usize| -> Value {
        (0..n)
            .map(|i| (format!("l{i}"), json!("v")))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };

    // Exactly at every limit: accepted.
    let at_limit: Vec<Value> = (0..5)
        .map(|i| {
            json!({"labels": {
                "alertname": format!("A{i}"),
                "n".repeat(32): "v".repeat(256),
                "b": "v", "c": "v"
            }, "annotations": labels(4)})
        })
        .collect();
    let (status, body) = post(addr, V1, v1(json!(at_limit))).await;
    assert_eq!(status, 200, "at the limits: {body}");

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "a huge label value",
            v1(json!([ok_alert, {"labels": {"alertname": "B", "big": "x".repeat(100_000)}}])),
            "alerts[1].labels.big",
        ),
        (
            "a value one byte over",
            v1(json!([{"labels": {"alertname": "B", "big": "x".repeat(257)}}])),
            "alerts[0].labels.big",
        ),
        (
            "a huge annotation value",
            v1(json!([{"labels": {}, "annotations": {"description": "x".repeat(10_000)}}])),
            "alerts[0].annotations.description",
        ),
        (
            "too many labels",
            v1(json!([ok_alert, ok_alert, {"labels": labels(5)}])),
            "alerts[2].labels",
        ),
        (
            "too many annotations",
            v1(json!([{"labels": {}, "annotations": labels(1000)}])),
            "alerts[0].annotations",
        ),
        (
            "a label name too long",
            v1(json!([{"labels": {"n".repeat(33): "v"}}])),
            "alerts[0].labels",
        ),
        (
            "too many alerts",
            v1(json!(vec![ok_alert.clone(); 6])),
            "alerts",
        ),
    ];
    for (what, body, path) in cases {
        let (status, reply) = post(addr, V1, body).await;
        assert_400(status, &reply, what);
        assert_eq!(reply["path"], path, "{what}: {reply}");
    }

    // API v2 gets the same limits.
    let too_many = json!(vec![json!({"labels": {"alertname": "A"}}); 6]).to_string();
    let (status, reply) = post(addr, V2, too_many).await;
    assert_400(status, &reply, "v2: too many alerts");
    assert!(reply["path"].is_string(), "{reply}");
    let huge = json!([{"labels": {"alertname": "A", "big": "x".repeat(1000)}}]).to_string();
    let (status, reply) = post(addr, V2, huge).await;
    assert_400(status, &reply, "v2: a huge label value");
    assert!(
        reply["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("labels.big")),
        "{reply}"
    );
    assert_still_serves(addr).await;
}

#[tokio::test]
async fn default_payload_limits_hold_below_the_body_limit() {
    let addr = start_default().await;
    // 10,001 tiny alerts fit in 4 MiB of body but exceed the default 10,000 alerts.
    let alerts = vec![json!({}); 10_001];
    let (status, reply) = post(addr, V1, json!({"alerts": alerts}).to_string()).await;
    assert_400(status, &reply, "10,001 alerts");
    assert_eq!(reply["path"], "alerts");
    // One label value of 1 MiB: values are limited by the body limit alone by default.
    let body = json!({"alerts": [{"labels": {"alertname": "A", "blob": "x".repeat(1 << 20)}}]});
    let (status, reply) = post(addr, V1, body.to_string()).await;
    assert_eq!(
        (status, &reply["accepted"]),
        (200, &json!(1)),
        "a 1 MiB label value: {reply}"
    );
    // 300 labels (default limit 256).
    let labels: serde_json::Map<String, Value> =
        (0..300).map(|i| (format!("l{i}"), json!("v"))).collect();
    let body = json!({"alerts": [{"labels": labels}]});
    let (status, reply) = post(addr, V1, body.to_string()).await;
    assert_400(status, &reply, "300 labels");
    assert_eq!(reply["path"], "alerts[0].labels");
    assert_still_serves(addr).await;
}

#[tokio::test]
async fn invalid_utf8_is_400() {
    let addr = start_default().await;
    let with = |bad: &[u8]| -> Vec<u8> {
        let mut body = br#"{"alerts": [{"labels": {"alertname": ""#.to_vec();
        body.extend_from_slice(bad);
        body.extend_from_slice(br#""}}]}"#);
        body
    };
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("a stray 0xff byte", V1, with(&[0xff])),
        ("an overlong encoding of '/'", V1, with(&[0xc0, 0xaf])),
        ("a truncated sequence", V1, with(&[0xe2, 0x82])),
        ("an encoded surrogate", V1, with(&[0xed, 0xa0, 0x80])),
        ("a lone surrogate escape", V1, with(br"\ud800")),
        (
            "a byte order mark of UTF-16",
            V1,
            vec![0xff, 0xfe, b'{', 0, b'}', 0],
        ),
        ("a bad label name", V2, {
            let mut body = br#"[{"labels": {""#.to_vec();
            body.extend_from_slice(&[0xfe, 0xff]);
            body.extend_from_slice(br#"": "v"}}]"#);
            body
        }),
    ];
    for (what, path, body) in cases {
        let (status, reply) = post(addr, path, body).await;
        assert_400(status, &reply, what);
    }
    assert_still_serves(addr).await;
}

#[tokio::test]
async fn wrong_types_are_400_with_the_json_path() {
    let addr = start_default().await;
    let cases: [(&str, &str, &str); 12] = [
        (
            V1,
            r#"{"alerts": [{"labels": {"a": 1}}]}"#,
            "alerts[0].labels.a",
        ),
        (V1, r#"{"alerts": {}}"#, "alerts"),
        (V1, r#"{"alerts": "many"}"#, "alerts"),
        (
            V1,
            r#"{"alerts": [{}, {"status": "burning"}]}"#,
            "alerts[1].status",
        ),
        (V1, r#"{"alerts": [{"labels": null}]}"#, "alerts[0].labels"),
        (
            V1,
            r#"{"alerts": [{"annotations": {"x": ["a"]}}]}"#,
            "alerts[0].annotations.x",
        ),
        (
            V1,
            r#"{"alerts": [], "truncatedAlerts": -1}"#,
            "truncatedAlerts",
        ),
        (V1, r#"{"alerts": [], "version": 4}"#, "version"),
        (V1, r#"{"alerts": [], "groupLabels": []}"#, "groupLabels"),
        (V2, r#"[{"labels": {"x": true}}]"#, "[0].labels.x"),
        (
            V2,
            r#"[{"labels": {}}, {"labels": {}, "startsAt": 5}]"#,
            "[1].startsAt",
        ),
        (V2, r#"{"labels": {}}"#, "."),
    ];
    for (endpoint, body, path) in cases {
        let (status, reply) = post(addr, endpoint, body).await;
        assert_400(status, &reply, body);
        assert_eq!(reply["path"], path, "{endpoint} {body}: {reply}");
    }
    assert_still_serves(addr).await;
}

#[tokio::test]
async fn missing_alerts_and_non_payloads_are_400() {
    let addr = start_default().await;
    for body in [
        r#"{}"#,
        r#"{"version": "4", "status": "firing"}"#,
        r#"{"Alerts": []}"#,
    ] {
        let (status, reply) = post(addr, V1, body).await;
        assert_400(status, &reply, body);
        assert!(
            reply["error"]
                .as_str()
                .is_some_and(|e| e.contains("missing field `alerts`")),
            "{body}: {reply}"
        );
    }
    for (endpoint, body) in [
        (V1, ""),
        (V1, "null"),
        (V1, "[]"),
        (V1, r#""alerts""#),
        (V1, r#"{"alerts": [], "alerts": []}"#),
        (V2, ""),
        (V2, "null"),
        (V2, r#"[{"annotations": {}}]"#),
    ] {
        let (status, reply) = post(addr, endpoint, body).await;
        assert_400(status, &reply, body);
    }
    assert_still_serves(addr).await;
}

#[tokio::test]
async fn bytes_after_the_payload_are_400() {
    let addr = start_default().await;
    for (endpoint, body) in [
        (V1, r#"{"alerts": []} trailing"#),
        (V1, r#"{"alerts": []}{"alerts": []}"#),
        (V1, r#"{"alerts": [{"labels": {"alertname": "A"}}]}]"#),
        (V2, r#"[] []"#),
        (V2, r#"[{"labels": {"alertname": "A"}}],"#),
    ] {
        let (status, reply) = post(addr, endpoint, body).await;
        assert_400(status, &reply, body);
    }
    // Whitespace after the document is fine.
    let (status, reply) = post(addr, V1, format!("{}\n\r\n \t", good_payload())).await;
    assert_eq!(status, 200, "{reply}");
    assert_still_serves(addr).await;
}

// ---------------------------------------------------------------------------------------------
// Oversized bodies
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn bodies_over_the_limit_get_413_with_and_without_content_length() {
    let limit = 64 * 1024;
    let addr = start(
        ReceiverConfig {
            body_limit: limit,
            ..ReceiverConfig::default()
        },
        ServerLimits::default(),
    )
    .await;
    // A valid payload, four times the limit.
    let big = json!({"alerts": [{"labels": {"alertname": "A"},
                                  "annotations": {"d": "x".repeat(4 * limit)}}]})
    .to_string();

    // With Content-Length.
    let (status, reply) = post(addr, V1, big.clone()).await;
    assert_eq!(status, 413, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|e| e.contains(&limit.to_string())),
        "{reply}"
    );

    // Chunked, without Content-Length.
    let chunks: Vec<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>> = big
        .as_bytes()
        .chunks(4096)
        .map(|c| Ok(hyper::body::Frame::data(bytes::Bytes::copy_from_slice(c))))
        .collect();
    let response = client()
        .post(format!("http://{addr}{V2}"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap(http_body_util::StreamBody::new(
            futures::stream::iter(chunks),
        )))
        .send()
        .await
        .expect("chunked request");
    assert_eq!(response.status().as_u16(), 413);

    // Chunked and endless: the server answers 413 once the limit is passed, without waiting
    // for an end that never comes.
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let endless = tokio::spawn(async move {
        let head = "POST /api/v1/alerts HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        if writer.write_all(head.as_bytes()).await.is_err() {
            return 0usize;
        }
        let chunk = format!("1000\r\n{}\r\n", "[".repeat(0x1000));
        let mut sent = 0usize;
        // Bounded: at most 64 MiB, well past the limit.
        while sent < 64 << 20 {
            if writer.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
            sent += 0x1000;
        }
        sent
    });
    let outcome = read_until_closed(&mut reader, started, NEVER).await;
    let sent = endless.await.expect("endless writer");
    eprintln!(
        "endless chunked body: status {:?} after {:?}, {sent} bytes sent",
        outcome.status(),
        outcome.elapsed
    );
    assert_eq!(outcome.status(), Some(413), "{}", outcome.text());
    assert!(sent < 64 << 20, "the server read the whole endless body");

    // A Content-Length over the limit, with the body complete: 413.
    let head = format!(
        "POST /api/v1/alerts HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        big.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(big.as_bytes());
    let outcome = raw_exchange(addr, &request, NEVER).await;
    assert_eq!(outcome.status(), Some(413), "{}", outcome.text());

    assert_still_serves(addr).await;
}

#[tokio::test]
async fn a_declared_content_length_over_the_limit_is_refused_before_the_body_arrives() {
    let limit = 64 * 1024;
    let addr = start(
        ReceiverConfig {
            body_limit: limit,
            ..ReceiverConfig::default()
        },
        ServerLimits::default(),
    )
    .await;
    // A client announces 5 GiB and sends a few bytes: the server knows the answer already.
    let request = "POST /api/v1/alerts HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\nContent-Length: 5368709120\r\n\r\n{\"alerts\": [";
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(NEVER, stream.read(&mut buf)).await;
    let reply = match read {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        other => format!("no reply: {other:?}"),
    };
    eprintln!(
        "declared 5 GiB body: {:?} after {:?}",
        reply.lines().next(),
        started.elapsed()
    );
    assert!(
        reply.starts_with("HTTP/1.1 413"),
        "a declared Content-Length of 5 GiB over a 64 KiB limit: {reply}"
    );
    assert_still_serves(addr).await;
}

// ---------------------------------------------------------------------------------------------
// Malformed HTTP
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_http_is_refused_and_the_server_keeps_serving() {
    let addr = start_default().await;
    let huge_header = format!(
        "POST /api/v1/alerts HTTP/1.1\r\nHost: herald\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\n{{}}",
        "a".repeat(1 << 20)
    );
    let many_headers = format!(
        "POST /api/v1/alerts HTTP/1.1\r\nHost: herald\r\n{}Content-Length: 2\r\n\r\n{{}}",
        (0..500)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    // Each is answered with its 4xx before the connection is closed: a server that closes
    // silently leaves the client guessing.
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n".to_vec(), 400),
        ("a bad request line", b"HELLO WORLD\r\n\r\n".to_vec(), 400),
        ("a header of 1 MiB", huge_header.into_bytes(), 431),
        ("500 headers", many_headers.into_bytes(), 431),
        (
            "both Content-Length and Transfer-Encoding",
            b"POST /api/v1/alerts HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (
            "two different Content-Lengths",
            b"POST /api/v1/alerts HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 13\r\n\r\n{}".to_vec(),
            400,
        ),
        (
            "a negative Content-Length",
            b"POST /api/v1/alerts HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\nContent-Length: -1\r\n\r\n{}".to_vec(),
            400,
        ),
        (
            "a bad chunk size",
            b"POST /api/v1/alerts HTTP/1.1\r\nHost: herald\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".to_vec(),
            400,
        ),
    ];
    for (what, request, expected) in cases {
        let outcome = raw_exchange(addr, &request, NEVER).await;
        let status = outcome.status();
        eprintln!("malformed HTTP, {what}: {status:?}");
        assert!(
            outcome.closed,
            "{what}: the connection stays open: {outcome:?}"
        );
        assert_eq!(status, Some(expected), "{what}: {}", outcome.text());
        assert_still_serves(addr).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Connection floods
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_while_open_ones_keep_working() {
    let max_connections = 8;
    let addr = start(
        ReceiverConfig::default(),
        ServerLimits {
            max_connections,
            header_read_timeout: Duration::from_secs(30),
            ..ServerLimits::default()
        },
    )
    .await;
    let payload = good_payload();

    // Fill every slot with a kept-alive connection that has been served once.
    let mut open = Vec::new();
    for i in 0..max_connections {
        let mut connection = KeepAlive::connect(addr).await;
        assert_eq!(
            connection.request("POST", V1, &payload).await,
            Some(200),
            "connection {i} within the limit"
        );
        open.push(connection);
    }

    // Thirty more: accepted by the kernel, then closed by the server without an answer (not
    // held open until the 30 s header timeout).
    let mut extra = Vec::new();
    for _ in 0..30 {
        extra.push(tokio::spawn(raw_exchange(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: herald\r\n\r\n",
            NEVER,
        )));
    }
    for task in extra {
        let outcome = task.await.expect("extra connection");
        assert!(
            outcome.closed && outcome.bytes.is_empty(),
            "a connection beyond the limit was served or held open: {outcome:?}"
        );
    }

    // The open ones keep working, several requests each.
    for round in 0..3 {
        for (i, connection) in open.iter_mut().enumerate() {
            assert_eq!(
                connection.request("POST", V1, &payload).await,
                Some(200),
                "open connection {i}, round {round}"
            );
        }
    }

    // Closing some frees their slots for new clients.
    open.truncate(max_connections / 2);
    let deadline = Instant::now() + NEVER;
    loop {
        let mut connection = KeepAlive::connect(addr).await;
        if connection.request("GET", "/healthz", "").await == Some(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no slot freed after closing connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(open);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_still_serves(addr).await;
}
