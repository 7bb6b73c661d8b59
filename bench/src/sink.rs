//! The loopback sinks every system under test delivers to: one HTTP/1.1 listener, any path
//! (`/wh-N` per webhook), answering 200 at once. For every alert in a delivered body it reads
//! the `bench_sent_ns` annotation the load generator stamped (`PHASE.NANOS` since the bench
//! started) and records the end-to-end latency.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Latencies kept per phase at most (bounded memory).
const MAX_SAMPLES: usize = 4_000_000;

/// Nanoseconds since the bench started: the clock of the `bench_sent_ns` stamps.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// What the sinks saw in the current phase.
#[derive(Default)]
pub struct SinkStats {
    phase: AtomicU32,
    /// POSTs carrying at least one alert of the current phase.
    pub posts: AtomicU64,
    /// Alert deliveries (an alert in a POST to a webhook) of the current phase.
    pub alerts: AtomicU64,
    /// Alert deliveries that arrived before `window_end_ns`.
    pub alerts_in_window: AtomicU64,
    /// POSTs that arrived before `window_end_ns`.
    pub posts_in_window: AtomicU64,
    window_end_ns: AtomicU64,
    /// Alerts of an earlier phase (a late delivery) or without a stamp.
    pub stale: AtomicU64,
    /// Bodies that were not a webhook payload.
    pub unparsable: AtomicU64,
    /// When the last alert of the current phase arrived.
    pub last_arrival_ns: AtomicU64,
    /// TCP connections the sink accepted in the current phase (connection reuse shows here).
    pub connections: AtomicU64,
    latencies: Mutex<Vec<u64>>,
}

impl SinkStats {
    /// Starts counting phase `phase` from zero.
    pub fn begin(&self, phase: u32) {
        self.phase.store(phase, Ordering::SeqCst);
        self.window_end_ns.store(u64::MAX, Ordering::SeqCst);
        for counter in [
            &self.posts,
            &self.alerts,
            &self.alerts_in_window,
            &self.posts_in_window,
            &self.stale,
            &self.unparsable,
            &self.last_arrival_ns,
            &self.connections,
        ] {
            counter.store(0, Ordering::SeqCst);
        }
        self.latencies.lock().expect("latencies").clear();
    }

    /// Arrivals from now on no longer count as inside the load window.
    pub fn end_window(&self) {
        self.window_end_ns.store(now_ns(), Ordering::SeqCst);
    }

    /// The latencies (ns) recorded in the current phase, sorted.
    pub fn sorted_latencies(&self) -> Vec<u64> {
        let mut latencies = self.latencies.lock().expect("latencies").clone();
        latencies.sort_unstable();
        latencies
    }

    fn record(&self, body: &[u8]) {
        let now = now_ns();
        let phase = self.phase.load(Ordering::Relaxed);
        let mut mine = Vec::new();
        let mut stamps = 0usize;
        for (sent_phase, sent) in stamps_in(body) {
            stamps += 1;
            if sent_phase == phase {
                mine.push(now.saturating_sub(sent));
            } else {
                self.stale.fetch_add(1, Ordering::Relaxed);
            }
        }
        if stamps == 0 {
            self.unparsable.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if mine.is_empty() {
            return;
        }
        let n = mine.len() as u64;
        self.posts.fetch_add(1, Ordering::Relaxed);
        self.alerts.fetch_add(n, Ordering::Relaxed);
        if now <= self.window_end_ns.load(Ordering::Relaxed) {
            self.posts_in_window.fetch_add(1, Ordering::Relaxed);
            self.alerts_in_window.fetch_add(n, Ordering::Relaxed);
        }
        self.last_arrival_ns.fetch_max(now, Ordering::Relaxed);
        let mut latencies = self.latencies.lock().expect("latencies");
        if latencies.len() + mine.len() <= MAX_SAMPLES {
            latencies.extend(mine);
        }
    }
}

/// The `bench_sent_ns` stamps (`PHASE.NANOS`) of the alerts in a delivered body, one per alert,
/// found by a substring search rather than by parsing the JSON: the sinks share the cores with
/// the system under test, so their cost per delivery should not grow with how much else a
/// system writes into its bodies. Every system here writes compact JSON
/// (`"bench_sent_ns":"1.234"`) with its `alerts` before `commonAnnotations` (Herald's and
/// Alertmanager's formats; the forwarder has no common annotations), so the search stops there:
/// a one-alert delivery repeats the stamp among its common annotations.
fn stamps_in(body: &[u8]) -> impl Iterator<Item = (u32, u64)> + '_ {
    static STAMP: OnceLock<memchr::memmem::Finder<'static>> = OnceLock::new();
    static COMMON: OnceLock<memchr::memmem::Finder<'static>> = OnceLock::new();
    let stamp = STAMP.get_or_init(|| memchr::memmem::Finder::new(br#""bench_sent_ns":""#));
    let common = COMMON.get_or_init(|| memchr::memmem::Finder::new(br#""commonAnnotations":"#));
    let alerts = &body[..common.find(body).unwrap_or(body.len())];
    stamp.find_iter(alerts).filter_map(move |at| {
        let rest = &alerts[at + stamp.needle().len()..];
        let end = memchr::memchr(b'"', rest)?;
        let text = std::str::from_utf8(&rest[..end]).ok()?;
        let (phase, sent) = text.split_once('.')?;
        Some((phase.parse().ok()?, sent.parse().ok()?))
    })
}

/// A running sink listener.
pub struct Sink {
    pub addr: SocketAddr,
    pub stats: Arc<SinkStats>,
}

impl Sink {
    /// Binds a loopback port and serves until the runtime stops.
    pub async fn start() -> Result<Sink> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the sink")?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(SinkStats::default());
        let shared = stats.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                shared.connections.fetch_add(1, Ordering::Relaxed);
                let stats = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let stats = stats.clone();
                        async move {
                            if let Ok(body) = request.into_body().collect().await {
                                stats.record(&body.to_bytes());
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Sink { addr, stats })
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

#[cfg(test)]
mod tests {
    fn stamps(body: &str) -> Vec<(u32, u64)> {
        super::stamps_in(body.as_bytes()).collect()
    }

    #[test]
    fn one_stamp_per_alert_in_every_format() {
        let herald = r#"{"version":"1","message":"x","alerts":[{"labels":{"a":"b"},"annotations":{"bench_sent_ns":"3.17","summary":"x"}}],"groupLabels":{},"commonLabels":{"a":"b"},"commonAnnotations":{"bench_sent_ns":"3.17"},"externalURL":""}"#;
        assert_eq!(stamps(herald), vec![(3, 17)]);
        let forwarder = r#"{"alerts":[{"annotations":{"bench_sent_ns":"2.5"},"labels":{}}]}"#;
        assert_eq!(stamps(forwarder), vec![(2, 5)]);
        let alertmanager = r#"{"receiver":"wh-1","status":"firing","alerts":[{"annotations":{"bench_sent_ns":"1.9"}},{"annotations":{"bench_sent_ns":"1.10"}}],"commonAnnotations":{}}"#;
        assert_eq!(stamps(alertmanager), vec![(1, 9), (1, 10)]);
        assert!(stamps(r#"{"alerts":[]}"#).is_empty());
        assert!(stamps(r#"{"alerts":[{"annotations":{"bench_sent_ns":"bad"}}]}"#).is_empty());
    }
}
