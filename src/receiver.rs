//! The HTTP receiver: Alertmanager's webhook payload and API v2 alerts in, one 200 per batch
//! that Herald now owns; health, readiness and metrics.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::alert::{self, AlertBatch, DEFAULT_BODY_LIMIT, ParseError};
use crate::crd::WebhookType;
use crate::dispatch::Dispatcher;
use crate::secret::Sensitive;

/// Receiver settings.
#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    /// Largest accepted body, in bytes.
    pub body_limit: usize,
    /// When set, callers must send `Authorization: Bearer <token>`.
    pub token: Option<Sensitive<String>>,
    /// A file holding that token, read again whenever it changes (a mounted Secret rotates
    /// without a restart). Takes precedence over `token`.
    pub token_file: Option<std::path::PathBuf>,
    /// Seconds to put in `Retry-After` when Herald is full.
    pub retry_after_seconds: u64,
    /// How long a request waits for room when Herald holds as many pending deliveries as it
    /// may, before the 503 (zero: answer at once).
    pub overload_wait: Duration,
    /// Longest time one request may take, body included.
    pub request_timeout: Duration,
    /// Bounds on alerts and labels per request.
    pub payload: alert::PayloadLimits,
    /// Serve `/metrics` here (off when metrics have a listener of their own).
    pub serve_metrics: bool,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            body_limit: DEFAULT_BODY_LIMIT,
            token: None,
            token_file: None,
            retry_after_seconds: 10,
            overload_wait: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            payload: alert::PayloadLimits::default(),
            serve_metrics: true,
        }
    }
}

#[derive(Clone)]
struct AppState {
    dispatcher: Dispatcher,
    config: ReceiverConfig,
    token_file: std::sync::Arc<std::sync::Mutex<TokenFile>>,
}

/// The last token read from `token_file`, and the file's modification time then.
#[derive(Default)]
struct TokenFile {
    modified: Option<std::time::SystemTime>,
    token: Option<Sensitive<String>>,
}

impl AppState {
    /// The token callers must present now, if any.
    fn expected_token(&self) -> Option<Sensitive<String>> {
        let Some(path) = &self.config.token_file else {
            return self.config.token.clone();
        };
        let mut cache = self.token_file.lock().unwrap_or_else(|e| e.into_inner());
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified.is_none() || modified != cache.modified {
            match std::fs::read_to_string(path) {
                Ok(text) if !text.trim().is_empty() => {
                    cache.token = Some(Sensitive::new(text.trim().to_string()));
                    cache.modified = modified;
                }
                // Keep the last good token while the file is missing or empty (mid-rotation).
                Ok(_) => {
                    tracing::warn!(file = %path.display(), "receiver token file is empty; keeping the last token");
                    cache.modified = modified;
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), "cannot read the receiver token file: {e}")
                }
            }
        }
        // Fail closed: with a token file configured, no readable token means nobody gets in.
        Some(
            cache
                .token
                .clone()
                .unwrap_or_else(|| Sensitive::new(String::new())),
        )
    }
}

/// The receiver's router.
pub fn router(dispatcher: Dispatcher, config: ReceiverConfig) -> Router {
    let timeout = config.request_timeout;
    let router = Router::new()
        .route("/api/v1/alerts", post(alertmanager_v1))
        .route("/api/v2/alerts", post(alerts_v2))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz));
    let router = if config.serve_metrics {
        router.route("/metrics", get(metrics))
    } else {
        router
    };
    router
        .layer(axum::middleware::from_fn(refuse_own_requests))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(AppState {
            dispatcher,
            config,
            token_file: Default::default(),
        })
}

/// A router serving only `/metrics` (for a listener of its own).
pub fn metrics_router(dispatcher: Dispatcher) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(AppState {
            dispatcher,
            config: ReceiverConfig::default(),
            token_file: Default::default(),
        })
}

/// Refuses requests that a Herald sent (they carry its mark): a webhook pointed at Herald's own
/// listeners, directly or through another Herald, would otherwise turn one alert into an
/// endless loop.
pub async fn refuse_own_requests(request: Request, next: axum::middleware::Next) -> Response {
    if request.headers().contains_key(crate::delivery::LOOP_HEADER) {
        return error(
            StatusCode::LOOP_DETECTED,
            "this request was sent by Herald; Herald does not receive its own deliveries",
        );
    }
    next.run(request).await
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    if !state.dispatcher.engine().store().is_healthy() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the delivery store's database does not answer",
        )
            .into_response()
    } else if state.dispatcher.is_ready() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "routing table not synced yet",
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    let metrics = state.dispatcher.metrics();
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            metrics.encode(),
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            metrics.encode_prometheus_text(),
        )
            .into_response()
    }
}

async fn alertmanager_v1(State(state): State<AppState>, request: Request) -> Response {
    receive(
        state,
        request,
        "/api/v1/alerts",
        "alerts",
        alert::parse_alertmanager,
    )
    .await
}

async fn alerts_v2(State(state): State<AppState>, request: Request) -> Response {
    receive(state, request, "/api/v2/alerts", "", |body| {
        alert::parse_v2(body, k8s_openapi::jiff::Timestamp::now())
    })
    .await
}

fn authorized(headers: &HeaderMap, token: &Sensitive<String>) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    !token.expose().is_empty() && bool::from(given.as_bytes().ct_eq(token.expose().as_bytes()))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// A request the receiver refuses: the reason it is counted under, and the answer (boxed:
/// refusals are rare, and a small error keeps the steps' results small).
struct Refusal {
    reason: &'static str,
    response: Box<Response>,
}

impl Refusal {
    fn new(reason: &'static str, status: StatusCode, message: impl Into<String>) -> Self {
        Refusal {
            reason,
            response: Box::new(error(status, message)),
        }
    }

    fn too_large(limit: usize) -> Self {
        Refusal::new(
            "too_large",
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than {limit} bytes"),
        )
    }
}

/// Receives a batch of alerts: checks the request, reads and parses its body within the
/// limits, and hands the batch to the dispatcher, answering once its deliveries are kept.
async fn receive(
    state: AppState,
    request: Request,
    endpoint: &'static str,
    root: &'static str,
    parse: impl FnOnce(&[u8]) -> Result<AlertBatch, ParseError>,
) -> Response {
    let (parts, body): (_, Body) = request.into_parts();
    let received = async {
        check_request(&state, &parts.headers)?;
        let bytes = read_body(body, state.config.body_limit).await?;
        let (batch, refused) = parse(&bytes)
            .and_then(|mut batch| {
                let refused = batch.admit(&state.config.payload, root)?;
                Ok((batch, refused))
            })
            .map_err(|err| Refusal {
                reason: "invalid_payload",
                response: Box::new(
                    (
                        StatusCode::BAD_REQUEST,
                        axum::Json(json!({ "error": err.message, "path": err.path })),
                    )
                        .into_response(),
                ),
            })?;
        dispatch(&state, batch, endpoint, &refused).await
    };
    match received.await {
        Ok(response) => response,
        Err(Refusal { reason, response }) => {
            state.dispatcher.metrics().rejected(reason);
            *response
        }
    }
}

/// Refuses a request without the bearer token (when one is required), that is not JSON, or
/// that says its body is over the limit.
fn check_request(state: &AppState, headers: &HeaderMap) -> Result<(), Refusal> {
    if let Some(token) = state.expected_token()
        && !authorized(headers, &token)
    {
        let mut refusal = Refusal::new(
            "unauthorized",
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        );
        refusal.response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return Err(refusal);
    }
    if !is_json(headers) {
        return Err(Refusal::new(
            "unsupported_media_type",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        ));
    }
    let limit = state.config.body_limit;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Refusal::too_large(limit));
    }
    Ok(())
}

/// Reads a request body of at most `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, Refusal> {
    axum::body::to_bytes(body, limit).await.map_err(|err| {
        let too_large = std::error::Error::source(&err)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            Refusal::too_large(limit)
        } else {
            Refusal::new(
                "body_read",
                StatusCode::BAD_REQUEST,
                format!("cannot read body: {err}"),
            )
        }
    })
}

/// Hands a parsed batch to the dispatcher (waiting a little for room when Herald is full) and
/// answers for it: 200 with the deliveries made, 400 naming the alerts refused while parsing
/// (the others are taken), or 503 when none of it could be kept.
async fn dispatch(
    state: &AppState,
    batch: AlertBatch,
    endpoint: &'static str,
    refused: &[ParseError],
) -> Result<Response, Refusal> {
    let accepted = batch.alerts.len();
    let summary = state
        .dispatcher
        .dispatch_within(batch, WebhookType::Alarms, state.config.overload_wait)
        .await
        .map_err(|refused| {
            let reason = match &refused {
                crate::delivery::SubmitError::Overloaded(_) => "overloaded",
                crate::delivery::SubmitError::Store(e) => {
                    tracing::error!("cannot accept alerts: {e}");
                    "store"
                }
            };
            let mut refusal =
                Refusal::new(reason, StatusCode::SERVICE_UNAVAILABLE, refused.to_string());
            refusal.response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(state.config.retry_after_seconds),
            );
            refusal
        })?;
    let metrics = state.dispatcher.metrics();
    metrics
        .alerts_received
        .get_or_create(&crate::metrics::EndpointLabels {
            endpoint: endpoint.to_string(),
        })
        .inc_by(accepted as u64);
    if !refused.is_empty() {
        // As Alertmanager's API v2 answers: the valid alerts are taken, and the answer is 400
        // naming each refused one (a sender does not retry a 4xx, and sending the taken alerts
        // again would only repeat them).
        metrics.rejected("invalid_alert");
        return Ok(refused_alerts(accepted, summary, refused));
    }
    Ok((
        StatusCode::OK,
        axum::Json(json!({
            "accepted": accepted,
            "deliveries": summary.queued + summary.dead_letters,
        })),
    )
        .into_response())
}

/// The 400 for a request some of whose alerts were refused: how many were taken, and each
/// refused alert's path and reason.
fn refused_alerts(
    accepted: usize,
    summary: crate::delivery::SubmitSummary,
    refused: &[ParseError],
) -> Response {
    let first = refused.first().map(|e| e.to_string()).unwrap_or_default();
    let first_path = refused.first().map(|e| e.path.clone()).unwrap_or_default();
    let error = match refused.len() {
        1 => format!("1 alert refused ({first}); {accepted} taken"),
        n => format!("{n} alerts refused (first: {first}); {accepted} taken"),
    };
    let refused: Vec<_> = refused
        .iter()
        .map(|e| json!({ "path": e.path, "error": e.message }))
        .collect();
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({
            "error": error,
            "path": first_path,
            "accepted": accepted,
            "deliveries": summary.queued + summary.dead_letters,
            "refused": refused,
        })),
    )
        .into_response()
}

/// Waits until the client has sent enough to tell its protocol: the whole HTTP/2 preface, or
/// a first byte that cannot start one. False when the connection closes or time runs out.
async fn preface_arrives(stream: &tokio::net::TcpStream, timeout: Duration) -> bool {
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; 24];
    loop {
        let seen = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return false,
            Ok(Ok(n)) => n,
        };
        if seen >= H2_PREFACE.len() || !H2_PREFACE.starts_with(&buf[..seen]) {
            return true;
        }
        // Part of the preface is there; peek returns at once until more arrives.
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Limits of the HTTP server itself.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Time a client has to send the request head (slow clients are cut off).
    pub header_read_timeout: Duration,
    /// Connections served at once; more are closed right away.
    pub max_connections: usize,
    /// Time given to open connections to finish after shutdown starts.
    pub drain_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves the router on a bound listener until `shutdown` completes, with default limits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_limits(listener, router, ServerLimits::default(), shutdown).await
}

/// Serves the router until `shutdown` completes: a header read timeout and a connection limit
/// keep slow or numerous clients from holding the server; on shutdown it stops accepting and
/// lets open connections finish within `drain_timeout`.
pub async fn serve_with_limits(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt as _;

    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(
            router
                .clone()
                .map_request(|req: hyper::Request<hyper::body::Incoming>| req.map(Body::new)),
        );
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let header_read_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            // hyper's header timeout starts with the first byte of HTTP/1; a client that sends
            // nothing, or trickles the HTTP/2 preface, is cut off here instead.
            if preface_arrives(&stream, header_read_timeout).await {
                let connection = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let _ = watcher.watch(connection).await;
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open after {:?}; closing them",
            limits.drain_timeout
        );
    }
    Ok(())
}
