//! The admin listener (loopback by default): delivery records and replay.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::delivery::{Engine, ReplayError, ReportOutcome};
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

/// The admin router.
pub fn router(engine: Engine) -> Router {
    Router::new()
        .route("/api/v1/deliveries", get(list))
        .route("/api/v1/deliveries/{id}", get(one))
        .route("/api/v1/deliveries/{id}/replay", post(replay))
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
