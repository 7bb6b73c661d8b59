//! The minimal forwarder, the ceiling Herald is measured against: the same HTTP work with
//! nothing else. It receives Alertmanager's webhook payload, answers 200 at once, and re-posts
//! each alert as `{"alerts": [alert]}` to the same sink URLs Herald would deliver it to
//! (`/wh-N` for the webhooks of the alert's team, looked up by the `team` label: no
//! conditions, no rendering, no records, no retries, no metrics). Like Herald it has one
//! sequential worker and connection pool per destination, and refuses a batch with 503 when
//! `--max-pending` deliveries are waiting.
//!
//! It runs as its own process (`herald-bench forwarder ...`) so that its CPU time and memory
//! are measured the way Herald's are.

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Settings of the forwarder process.
#[derive(Clone, Debug, clap::Args)]
pub struct ForwarderArgs {
    /// Address to receive on.
    #[arg(long)]
    pub listen: String,
    /// Base URL of the sink (`http://127.0.0.1:PORT`).
    #[arg(long)]
    pub sink: String,
    /// Destinations `/wh-0` .. `/wh-{webhooks-1}`; webhook `i` takes team `i / per_team`.
    #[arg(long, default_value_t = 100)]
    pub webhooks: usize,
    /// Webhooks per team.
    #[arg(long, default_value_t = crate::fixture::PER_TEAM)]
    pub per_team: usize,
    /// Deliveries waiting before batches are refused with 503.
    #[arg(long, default_value_t = 20_000)]
    pub max_pending: usize,
    /// How long a batch waits for room before the 503 (Herald's `--overload-wait`).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub overload_wait: std::time::Duration,
}

struct Job {
    body: Bytes,
    _permit: OwnedSemaphorePermit,
}

struct State {
    /// Destination queues by team.
    by_team: Vec<Vec<mpsc::UnboundedSender<Job>>>,
    pending: Arc<Semaphore>,
    overload_wait: std::time::Duration,
}

/// Runs the forwarder until killed.
pub async fn run(args: ForwarderArgs) -> Result<()> {
    let per_team = args.per_team.max(1);
    let teams = args.webhooks.div_ceil(per_team);
    let mut by_team: Vec<Vec<mpsc::UnboundedSender<Job>>> = vec![Vec::new(); teams];
    for i in 0..args.webhooks {
        let (tx, rx) = mpsc::unbounded_channel();
        by_team[i / per_team].push(tx);
        tokio::spawn(worker(format!("{}/wh-{i}", args.sink), rx));
    }
    let state = Arc::new(State {
        by_team,
        pending: Arc::new(Semaphore::new(args.max_pending)),
        overload_wait: args.overload_wait,
    });
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

async fn handle(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() == "/healthz" {
        return reply(StatusCode::OK, "ok");
    }
    let Ok(body) = request.into_body().collect().await else {
        return reply(StatusCode::BAD_REQUEST, "body");
    };
    let Ok(mut payload) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return reply(StatusCode::BAD_REQUEST, "json");
    };
    let alerts = match payload.get_mut("alerts").map(Value::take) {
        Some(Value::Array(alerts)) => alerts,
        _ => return reply(StatusCode::BAD_REQUEST, "alerts"),
    };
    let mut outgoing = Vec::new();
    for alert in alerts {
        let team = alert["labels"]["team"]
            .as_str()
            .and_then(|t| t.strip_prefix("team-"))
            .and_then(|t| t.parse::<usize>().ok());
        let Some(queues) = team.and_then(|t| state.by_team.get(t)) else {
            continue;
        };
        let body = Bytes::from(serde_json::to_vec(&json!({ "alerts": [alert] })).expect("json"));
        for queue in queues {
            outgoing.push((queue, body.clone()));
        }
    }
    // Like Herald: wait a while for room before refusing the batch.
    let count = outgoing.len() as u32;
    let permits = match state.pending.clone().try_acquire_many_owned(count) {
        Ok(permits) => Ok(permits),
        Err(_) => tokio::time::timeout(
            state.overload_wait,
            state.pending.clone().acquire_many_owned(count),
        )
        .await
        .map_err(|_| ())
        .and_then(|acquired| acquired.map_err(|_| ())),
    };
    let Ok(mut permits) = permits else {
        return reply(StatusCode::SERVICE_UNAVAILABLE, "full");
    };
    for (queue, body) in outgoing {
        let Some(permit) = permits.split(1) else {
            break;
        };
        let _ = queue.send(Job {
            body,
            _permit: permit,
        });
    }
    reply(StatusCode::OK, "{}")
}

async fn worker(url: String, mut queue: mpsc::UnboundedReceiver<Job>) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    while let Some(job) = queue.recv().await {
        let request = hyper::Request::post(&url)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(job.body))
            .expect("request");
        if let Ok(response) = client.request(request).await {
            let _ = response.into_body().collect().await;
        }
    }
}
