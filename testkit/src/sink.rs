//! A real loopback webhook sink for integration tests.
//!
//! The sink is an axum server bound to `127.0.0.1:0` (plain HTTP, HTTPS, or
//! HTTPS requiring a client certificate). Every request is recorded as soon as
//! its body has been read (before any scripted delay), and answered from a
//! script of [`Reply`]s. The server stops when the [`Sink`] is dropped.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{HeaderMap, StatusCode};
use rustls::RootCertStore;
use rustls::crypto::{CryptoProvider, ring};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::task::JoinHandle;

/// How often `wait_for` / `assert_none_within` look at the recorded requests.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------
// Recorded requests
// ---------------------------------------------------------------------------

/// One request as received by the sink.
#[derive(Clone)]
pub struct Received {
    pub method: String,
    /// Path only (no query string), e.g. `/hook`.
    pub path: String,
    /// Raw query string, if any (without the leading `?`).
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When the request (head and body) had been read by the sink.
    pub at: Instant,
}

impl Received {
    /// The body parsed as JSON; panics with the raw body if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "sink: body of {} {} is not valid JSON ({e}): {:?}",
                self.method,
                self.path,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as (lossy) UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// First value of header `name` (case-insensitive), if present and valid text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

impl fmt::Debug for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Received")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Scripted replies
// ---------------------------------------------------------------------------

/// A scripted response. Default: `200` with body `{}`.
#[derive(Clone, Debug)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: serde_json::Value,
    /// A plain-text body instead of the JSON one.
    text: Option<String>,
    delay: Option<Duration>,
    /// Answer only once [`Sink::release`] was called.
    held: bool,
}

impl Default for Reply {
    fn default() -> Self {
        Reply::status(200)
    }
}

impl Reply {
    /// Reply with `code` and a `{}` JSON body.
    pub fn status(code: u16) -> Self {
        Reply {
            status: code,
            headers: Vec::new(),
            body: serde_json::json!({}),
            text: None,
            delay: None,
            held: false,
        }
    }

    /// Add a `Retry-After: <secs>` header.
    pub fn retry_after(self, secs: u64) -> Self {
        self.header(RETRY_AFTER.as_str(), &secs.to_string())
    }

    /// Add an arbitrary response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Wait this long (after recording the request) before answering, to
    /// simulate a slow or hanging endpoint.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Hold the answer until [`Sink::release`] (or the sink is dropped): an endpoint that
    /// stays busy for exactly as long as the test needs.
    pub fn held(mut self) -> Self {
        self.held = true;
        self
    }

    /// Use this JSON value as the response body.
    pub fn body(mut self, body: serde_json::Value) -> Self {
        self.body = body;
        self
    }

    /// Use this plain text as the response body (as Slack answers).
    pub fn text(mut self, text: &str) -> Self {
        self.text = Some(text.to_owned());
        self
    }

    fn into_response(self) -> Response {
        let plain = self.text.is_some();
        let mut resp = Response::new(Body::from(
            self.text.unwrap_or_else(|| self.body.to_string()),
        ));
        *resp.status_mut() = StatusCode::from_u16(self.status)
            .unwrap_or_else(|e| panic!("sink: invalid status {}: {e}", self.status));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(if plain {
                "text/plain"
            } else {
                "application/json"
            }),
        );
        for (name, value) in self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .unwrap_or_else(|e| panic!("sink: invalid header name {name:?}: {e}"));
            let value = HeaderValue::from_str(&value)
                .unwrap_or_else(|e| panic!("sink: invalid header value {value:?}: {e}"));
            resp.headers_mut().append(name, value);
        }
        resp
    }
}

// ---------------------------------------------------------------------------
// The sink server
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    /// Replies consumed front to back; the last one repeats forever.
    script: Mutex<VecDeque<Reply>>,
    /// Opened by [`Sink::release`]: held replies go out.
    released: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    fn next_reply(&self) -> Reply {
        let mut script = lock(&self.script);
        if script.len() > 1 {
            script.pop_front().expect("non-empty")
        } else {
            script.front().cloned().unwrap_or_default()
        }
    }
}

/// Locks ignoring poisoning: a panicking test must not cascade into the server.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            let mut resp = Response::new(Body::from(format!("sink: reading body: {e}")));
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            return resp;
        }
    };
    lock(&shared.received).push(Received {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        body,
        at: Instant::now(),
    });
    let reply = shared.next_reply();
    if reply.held {
        let _ = shared.released.subscribe().wait_for(|open| *open).await;
    }
    if let Some(delay) = reply.delay {
        tokio::time::sleep(delay).await;
    }
    reply.into_response()
}

/// A running loopback webhook endpoint. Dropping it stops the server and
/// closes all its connections (including ones stuck in a scripted delay).
pub struct Sink {
    addr: SocketAddr,
    scheme: &'static str,
    shared: Arc<Shared>,
    handle: Handle,
    task: JoinHandle<()>,
}

impl Sink {
    /// Plain HTTP sink.
    pub async fn http() -> Sink {
        Sink::start(None).await
    }

    /// Plain HTTP sink on `ip` (a free port), e.g. an address pods can reach.
    pub async fn http_on(ip: std::net::IpAddr) -> Sink {
        Sink::start_on(ip, None).await
    }

    /// HTTPS sink presenting `pki.server_cert_pem` (signed by `pki.ca_pem`).
    /// Clients must trust `pki.ca_pem`.
    pub async fn https(pki: &TestPki) -> Sink {
        Sink::start(Some(pki.server_config(false))).await
    }

    /// HTTPS sink that additionally requires a client certificate signed by
    /// `pki.ca_pem`; handshakes without one (or with a foreign one) fail.
    pub async fn https_mtls(pki: &TestPki) -> Sink {
        Sink::start(Some(pki.server_config(true))).await
    }

    async fn start(tls: Option<rustls::ServerConfig>) -> Sink {
        Sink::start_on(std::net::Ipv4Addr::LOCALHOST.into(), tls).await
    }

    async fn start_on(ip: std::net::IpAddr, tls: Option<rustls::ServerConfig>) -> Sink {
        let shared = Arc::new(Shared::default());
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let listener = std::net::TcpListener::bind((ip, 0))
            .unwrap_or_else(|e| panic!("sink: bind {ip} port 0: {e}"));
        listener
            .set_nonblocking(true)
            .expect("sink: set_nonblocking");
        let addr = listener.local_addr().expect("sink: local_addr");
        let handle = Handle::new();
        let scheme;
        let task = match tls {
            None => {
                scheme = "http";
                let server = axum_server::from_tcp(listener).handle(handle.clone());
                tokio::spawn(async move {
                    if let Err(e) = server.serve(app.into_make_service()).await {
                        eprintln!("sink: http server error: {e}");
                    }
                })
            }
            Some(config) => {
                scheme = "https";
                let config = RustlsConfig::from_config(Arc::new(config));
                let server = axum_server::from_tcp_rustls(listener, config).handle(handle.clone());
                tokio::spawn(async move {
                    if let Err(e) = server.serve(app.into_make_service()).await {
                        eprintln!("sink: https server error: {e}");
                    }
                })
            }
        };
        // The socket is already bound and listening, so connections queue up
        // even before the server task starts accepting; still wait for it so
        // that a failed start surfaces here rather than as a client timeout.
        tokio::time::timeout(Duration::from_secs(10), handle.listening())
            .await
            .expect("sink: server did not start within 10s")
            .expect("sink: server failed to start");
        Sink {
            addr,
            scheme,
            shared,
            handle,
            task,
        }
    }

    /// The bound address (`127.0.0.1:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT` (no trailing slash).
    /// The test server certificate has SANs `localhost` and `127.0.0.1`, so
    /// the IP form verifies and avoids any `localhost` resolution ambiguity.
    pub fn base(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// `base()` + `/hook`.
    pub fn url(&self) -> String {
        self.url_for("/hook")
    }

    /// `base()` + `path` (which should start with `/`).
    pub fn url_for(&self, path: &str) -> String {
        format!("{}{}", self.base(), path)
    }

    /// Same as `url()` but with host `localhost` instead of `127.0.0.1`.
    pub fn localhost_url(&self) -> String {
        format!("{}://localhost:{}/hook", self.scheme, self.addr.port())
    }

    /// Replace the reply script. Replies are used in order for subsequent
    /// requests; the last one repeats forever. An empty script means the
    /// default `200 {}`.
    pub fn respond_with(&self, replies: Vec<Reply>) {
        *lock(&self.shared.script) = replies.into();
    }

    /// Snapshot of all requests received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }

    /// Sends every held reply ([`Reply::held`]), now and from now on.
    pub fn release(&self) {
        self.shared.released.send_replace(true);
    }

    /// Number of requests received so far.
    pub fn count(&self) -> usize {
        lock(&self.shared.received).len()
    }

    /// Forget all recorded requests (the reply script is left untouched).
    pub fn clear(&self) {
        lock(&self.shared.received).clear();
    }

    /// Wait until at least `n` requests have arrived and return all received
    /// so far. Panics, reporting how many did arrive, after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            {
                let received = lock(&self.shared.received);
                if received.len() >= n {
                    return received.clone();
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let received = self.received();
                panic!(
                    "sink {}: expected at least {n} request(s) within {timeout:?}, \
                     but only {} arrived: {}",
                    self.base(),
                    received.len(),
                    summarize(&received),
                );
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
        }
    }

    /// Wait `window` and assert that no request at all has arrived at this
    /// sink (panics as soon as one does).
    pub async fn assert_none_within(&self, window: Duration) {
        self.assert_count_stays(0, window).await;
    }

    /// Wait `window` and assert that no request arrives beyond those already
    /// received (panics as soon as one does).
    pub async fn assert_no_more_within(&self, window: Duration) {
        let n = self.count();
        self.assert_count_stays(n, window).await;
    }

    async fn assert_count_stays(&self, n: usize, window: Duration) {
        let deadline = Instant::now() + window;
        loop {
            let received = self.received();
            if received.len() > n {
                panic!(
                    "sink {}: expected {n} request(s) during {window:?}, got {}: {}",
                    self.base(),
                    received.len(),
                    summarize(&received),
                );
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.handle.shutdown();
        self.task.abort();
    }
}

fn summarize(received: &[Received]) -> String {
    if received.is_empty() {
        return "[]".to_owned();
    }
    let items: Vec<String> = received
        .iter()
        .map(|r| {
            let mut body = r.text();
            if body.len() > 200 {
                let mut cut = 200;
                while !body.is_char_boundary(cut) {
                    cut -= 1;
                }
                body.truncate(cut);
                body.push('…');
            }
            format!("{} {} {}", r.method, r.path, body)
        })
        .collect();
    format!("[{}]", items.join("; "))
}

// ---------------------------------------------------------------------------
// Test PKI
// ---------------------------------------------------------------------------

/// A throwaway CA with a server certificate (SANs `localhost`, `127.0.0.1`)
/// and a client certificate (CN `herald-client`, EKU clientAuth), all PEM.
#[derive(Clone, Debug)]
pub struct TestPki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

/// A client certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl ClientCert {
    /// Certificate followed by key, the form `reqwest::Identity::from_pem` wants.
    pub fn identity_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }
}

struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(cn: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.distinguished_name = dn(cn);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("ca self-sign");
        Ca { cert, key }
    }

    fn issue(&self, cn: &str, sans: &[&str], eku: rcgen::ExtendedKeyUsagePurpose) -> ClientCert {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name = dn(cn);
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![eku];
        params.use_authority_key_identifier_extension = true;
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf sign");
        ClientCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

fn dn(cn: &str) -> rcgen::DistinguishedName {
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, cn);
    dn
}

impl TestPki {
    /// Fresh CA, server certificate and client certificate.
    pub fn generate() -> TestPki {
        let ca = Ca::new("herald-test-ca");
        let server = ca.issue(
            "localhost",
            &["localhost", "127.0.0.1"],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = ca.issue(
            "herald-client",
            &[],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        TestPki {
            ca_pem: ca.cert.pem(),
            server_cert_pem: server.cert_pem,
            server_key_pem: server.key_pem,
            client_cert_pem: client.cert_pem,
            client_key_pem: client.key_pem,
        }
    }

    /// The (trusted) client certificate of this PKI.
    pub fn client(&self) -> ClientCert {
        ClientCert {
            cert_pem: self.client_cert_pem.clone(),
            key_pem: self.client_key_pem.clone(),
        }
    }

    /// `client_cert_pem` followed by `client_key_pem`.
    pub fn client_identity_pem(&self) -> String {
        self.client().identity_pem()
    }

    /// A client certificate that looks like ours (CN `herald-client`,
    /// clientAuth) but is signed by an unrelated CA: an mTLS sink built
    /// from any `TestPki` must reject it.
    pub fn other_ca_client() -> ClientCert {
        Ca::new("unrelated-test-ca").issue(
            "herald-client",
            &[],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    /// The server side of this PKI: its server certificate, optionally requiring a client one.
    pub fn server_config(&self, require_client_cert: bool) -> rustls::ServerConfig {
        let provider: Arc<CryptoProvider> = Arc::new(ring::default_provider());
        let certs = vec![parse_cert(&self.server_cert_pem)];
        let key = PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes())
            .expect("sink: parse server key PEM");
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("sink: protocol versions");
        let builder = if require_client_cert {
            let mut roots = RootCertStore::empty();
            roots
                .add(parse_cert(&self.ca_pem))
                .expect("sink: add CA to client roots");
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("sink: client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .expect("sink: server certificate");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }
}

fn parse_cert(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("sink: parse certificate PEM")
}
