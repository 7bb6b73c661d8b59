//! The admin listener (loopback by default): delivery records and replay.
//!
//! Locked against callers that merely reach it: an optional bearer token (`--admin-token-file`),
//! a `Host` that must be an address, `localhost` or a name the admin listed (so a DNS-rebound
//! page in an admin's browser is refused), no `Origin` (no browser page at all), no form or
//! text bodies, and never a request that Herald itself sent.

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::delivery::{Engine, ReplayError};

use crate::outgoing::ReportOutcome;
use crate::store::RecordFilter;

/// Query of `GET /api/v1/deliveries`.
#[derive(Debug, Default, Deserialize)]
pub struct DeliveriesQuery {
    /// `NAMESPACE/NAME`.
    pub webhook: Option<String>,
    /// Succeeded, Failed or Dropped.
    pub outcome: Option<String>,
    /// At most this many (default 100).
    pub limit: Option<usize>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// Who may call the admin API.
#[derive(Clone, Debug, Default)]
pub struct AdminAccess {
    /// The bearer token callers must send, when set.
    pub token: Option<crate::secret::Sensitive<String>>,
    /// Host names callers may use besides addresses and `localhost` (e.g. a Service name).
    pub hosts: Vec<String>,
}

impl AdminAccess {
    /// Why a request is refused, if it is.
    fn refusal(&self, headers: &HeaderMap) -> Option<(StatusCode, String)> {
        use subtle::ConstantTimeEq as _;
        if headers.contains_key(crate::delivery::LOOP_HEADER) {
            return Some((
                StatusCode::FORBIDDEN,
                "this request was sent by Herald; the admin API does not serve it".into(),
            ));
        }
        if headers.contains_key(header::ORIGIN) {
            return Some((
                StatusCode::FORBIDDEN,
                "requests from web pages (with an Origin header) are refused".into(),
            ));
        }
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !self.host_allowed(host) {
            return Some((
                StatusCode::FORBIDDEN,
                format!(
                    "Host {:?} is not an address, localhost or a host allowed by --admin-host",
                    crate::secret::escape_controls(host)
                ),
            ));
        }
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        if content_type.is_some_and(|t| t != "application/json") {
            return Some((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "only application/json bodies (or none) are accepted".into(),
            ));
        }
        if let Some(token) = &self.token {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if given.is_empty() || !bool::from(given.as_bytes().ct_eq(token.expose().as_bytes())) {
                return Some((
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token".into(),
                ));
            }
        }
        None
    }

    fn host_allowed(&self, host: &str) -> bool {
        let Ok(authority) = host.parse::<http::uri::Authority>() else {
            return false;
        };
        let name = authority.host();
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<std::net::IpAddr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || self.hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
    }
}

/// The admin router.
pub fn router(engine: Engine, access: AdminAccess) -> Router {
    let access = std::sync::Arc::new(access);
    Router::new()
        .route("/api/v1/deliveries", get(list))
        .route("/api/v1/deliveries/{id}", get(one))
        .route("/api/v1/deliveries/{id}/replay", post(replay))
        .layer(axum::middleware::from_fn(
            move |request: Request, next: axum::middleware::Next| {
                let access = access.clone();
                async move {
                    match access.refusal(request.headers()) {
                        Some((status, message)) => error(status, message),
                        None => next.run(request).await,
                    }
                }
            },
        ))
        .with_state(engine)
}

fn outcome(text: &str) -> Option<ReportOutcome> {
    match text.to_ascii_lowercase().as_str() {
        "succeeded" => Some(ReportOutcome::Succeeded),
        "failed" => Some(ReportOutcome::Failed),
        "dropped" => Some(ReportOutcome::Dropped),
        _ => None,
    }
}

async fn list(State(engine): State<Engine>, Query(query): Query<DeliveriesQuery>) -> Response {
    let webhook = match query.webhook.as_deref().map(str::parse) {
        None => None,
        Some(Ok(key)) => Some(key),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    let outcome = match query.outcome.as_deref() {
        None => None,
        Some(text) => match outcome(text) {
            Some(o) => Some(o),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("outcome must be Succeeded, Failed or Dropped, not {text:?}"),
                );
            }
        },
    };
    let filter = RecordFilter {
        webhook,
        outcome,
        limit: query.limit.unwrap_or(100),
    };
    match engine.store().records(&filter).await {
        Ok(records) => axum::Json(json!({ "deliveries": records })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn one(State(engine): State<Engine>, Path(id): Path<String>) -> Response {
    match engine.store().record(&id).await {
        Ok(Some(record)) => axum::Json(record).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no delivery record {id}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn replay(State(engine): State<Engine>, Path(id): Path<String>) -> Response {
    match engine.replay(&id).await {
        Ok(()) => (StatusCode::ACCEPTED, axum::Json(json!({ "replayed": id }))).into_response(),
        Err(e @ ReplayError::NotFound(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ (ReplayError::NoContent(_) | ReplayError::NotReady(_))) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        Err(e @ ReplayError::Submit(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}
