//! One HTTP attempt: render, sign, send, classify the answer.

use std::pin::Pin;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use super::client::{RequestBody, describe_error};
use super::target::{Target, USER_AGENT};
use crate::chat::Answer;
use crate::crd::BodyFormat;
use crate::outgoing::Delivery;
use crate::render;

/// The header every request Herald sends carries (the delivery id); Herald's receiver and
/// admin listener refuse requests that carry it.
pub const LOOP_HEADER: &str = "herald-delivery";

/// How much of a successful answer's body is read (a longer one closes its connection).
const SUCCESS_BODY_READ: usize = 64 * 1024;
/// How much of an error answer's body is read for the record.
const ERROR_BODY_READ: usize = 1024;

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptClass {
    /// 2xx.
    Success,
    /// Connection error, timeout, 408, 429 or 5xx: try again.
    Retryable,
    /// Any other answer: do not try again.
    Final,
}

/// The result of one attempt.
#[derive(Clone, Debug)]
pub struct AttemptResult {
    /// Success, retryable or final.
    pub class: AttemptClass,
    /// The HTTP status, when the endpoint answered.
    pub status: Option<u16>,
    /// Time from sending to the answer (or the error).
    pub latency: Duration,
    /// What went wrong, for humans (never a URL or credential).
    pub error: Option<String>,
    /// The endpoint's `Retry-After`, when it gave one.
    pub retry_after: Option<Duration>,
}

impl AttemptResult {
    /// An attempt that got no answer from the endpoint (it was not sent, or failed on the way).
    fn unanswered(class: AttemptClass, latency: Duration, error: String) -> Self {
        AttemptResult {
            class,
            status: None,
            latency,
            error: Some(error),
            retry_after: None,
        }
    }
}

/// The `webhook-signature` value for a body: one `v1,<base64 HMAC-SHA256>` per key, space-separated
/// (Standard Webhooks v1, signing `"{id}.{timestamp}.{body}"`).
pub fn sign<'a>(
    keys: impl Iterator<Item = &'a [u8]>,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    sign_parts(keys, id, timestamp, &[body])
}

/// [`sign`] for a body sent in parts.
fn sign_parts<'a>(
    keys: impl Iterator<Item = &'a [u8]>,
    id: &str,
    timestamp: i64,
    body: &[&[u8]],
) -> String {
    let mut signatures = Vec::new();
    for key in keys {
        // HMAC accepts keys of any length.
        let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(key) else {
            continue;
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        for part in body {
            mac.update(part);
        }
        let digest = mac.finalize().into_bytes();
        signatures.push(format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(digest)
        ));
    }
    signatures.join(" ")
}

/// Reads at most `limit` bytes of a response body, until the deadline fires. Reading a small
/// body to its end lets the connection go back to the pool.
async fn read_prefix(
    mut body: Incoming,
    limit: usize,
    mut deadline: Pin<&mut tokio::time::Sleep>,
) -> Vec<u8> {
    let mut bytes = Vec::new();
    while bytes.len() < limit {
        let frame = tokio::select! {
            biased;
            frame = body.frame() => frame,
            () = &mut deadline => break,
        };
        match frame {
            Some(Ok(frame)) => {
                if let Some(chunk) = frame.data_ref() {
                    let take = chunk.len().min(limit - bytes.len());
                    bytes.extend_from_slice(&chunk[..take]);
                }
            }
            _ => break,
        }
    }
    bytes
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(text).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// Sends one attempt of a delivery to a target.
pub async fn send(target: &Target, delivery: &Delivery) -> AttemptResult {
    let request = match request(target, delivery).await {
        Ok(request) => request,
        Err(error) => {
            return AttemptResult::unanswered(AttemptClass::Final, Duration::ZERO, error);
        }
    };
    let started = Instant::now();
    // One timer for the whole attempt: the answer's head, then as much of its body as is read.
    let deadline = tokio::time::sleep(target.timeout);
    tokio::pin!(deadline);
    let answer = tokio::select! {
        biased;
        answer = target.client().send(request) => Some(answer),
        () = &mut deadline => None,
    };
    match answer {
        Some(Ok(response)) => read_answer(target, response, started, deadline.as_mut()).await,
        Some(Err(err)) => {
            // A destination the policy refuses stays refused: no retries.
            let class = if super::client::is_policy_refusal(&err) {
                AttemptClass::Final
            } else {
                AttemptClass::Retryable
            };
            AttemptResult::unanswered(class, started.elapsed(), describe_error(&err))
        }
        None => AttemptResult::unanswered(
            AttemptClass::Retryable,
            started.elapsed(),
            format!("timed out: no answer within {}s", target.timeout.as_secs()),
        ),
    }
}

/// The request of one attempt: the body rendered for the target, its headers (id, credentials,
/// signature) and its URI; or why it cannot be sent (a final failure).
async fn request(target: &Target, delivery: &Delivery) -> Result<Request<RequestBody>, String> {
    let rendered = render::request_body(
        render::Content::of(delivery, target.kind),
        &target.body_style(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let body = RequestBody::from_parts(rendered.into_parts());
    let mut id_buffer = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = delivery.id.encode(&mut id_buffer);
    let headers = request_headers(target, id, &body);
    let uri = request_uri(target)?;
    let mut request = Request::new(body);
    *request.method_mut() = Method::POST;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(request)
}

/// The headers of a request: content type, agent, the delivery id (as `Idempotency-Key` and
/// Herald's mark), the target's credentials and headers, and the Standard Webhooks signature
/// of `body` when the target signs.
fn request_headers(target: &Target, id: &str, body: &RequestBody) -> HeaderMap {
    let mut keys = target.signing_keys().peekable();
    let signs = keys.peek().is_some();
    // Sized for what is inserted, and the `Content-Length` hyper adds: a map that never grows
    // allocates once.
    let capacity = 6
        + usize::from(target.host().is_some())
        + usize::from(target.authorization().is_some())
        + target.headers().map_or(0, HeaderMap::len)
        + if signs { 3 } else { 0 };
    let mut headers = HeaderMap::with_capacity(capacity);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
    headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
    if let Some(host) = target.host() {
        headers.insert(header::HOST, host.clone());
    }
    // A hyphenated UUID is always a valid header value. Each header gets its own copy: two
    // copies of 36 bytes cost less than sharing one.
    if let (Ok(key), Ok(mark)) = (HeaderValue::from_str(id), HeaderValue::from_str(id)) {
        headers.insert(HeaderName::from_static("idempotency-key"), key);
        // Herald's mark: a Herald receiver refuses what a Herald sent (no delivery loops).
        headers.insert(HeaderName::from_static(LOOP_HEADER), mark);
    }
    if let Some(auth) = target.authorization() {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    for (name, value) in target.headers().into_iter().flatten() {
        headers.append(name, value.clone());
    }
    if signs {
        let timestamp = k8s_openapi::jiff::Timestamp::now().as_second();
        let parts: Vec<&[u8]> = body.parts().collect();
        let signature = sign_parts(keys, id, timestamp, &parts);
        if let Ok(value) = HeaderValue::from_str(id) {
            headers.insert(HeaderName::from_static("webhook-id"), value);
        }
        headers.insert(
            HeaderName::from_static("webhook-timestamp"),
            HeaderValue::from(timestamp),
        );
        if let Ok(signature) = HeaderValue::try_from(signature) {
            headers.insert(HeaderName::from_static("webhook-signature"), signature);
        }
    }
    headers
}

/// The URI a request goes to: the target's, signed now for a DingTalk robot with a secret.
fn request_uri(target: &Target) -> Result<http::Uri, String> {
    match (&target.robot().secret, target.format) {
        (Some(secret), BodyFormat::Dingtalk) => {
            let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
            crate::chat::dingtalk_signed_uri(&target.uri, secret.expose(), now)
                .map_err(|e| format!("cannot sign the DingTalk URL: {e}"))
        }
        _ => Ok(target.uri.clone()),
    }
}

/// How an answer's status ends an attempt.
fn class_of(status: StatusCode) -> AttemptClass {
    if status.is_success() {
        AttemptClass::Success
    } else if status == StatusCode::LOOP_DETECTED {
        // A Herald refusing what a Herald sent: trying again would loop again.
        AttemptClass::Final
    } else if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        AttemptClass::Retryable
    } else {
        AttemptClass::Final
    }
}

/// The result of an attempt the endpoint answered: its status, its `Retry-After`, and (for an
/// error or a chat robot) as much of its body as says what happened, read before the deadline.
async fn read_answer(
    target: &Target,
    response: http::Response<Incoming>,
    started: Instant,
    deadline: Pin<&mut tokio::time::Sleep>,
) -> AttemptResult {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(parse_retry_after);
    let class = class_of(status);
    let latency = started.elapsed();
    let chat = crate::chat::default_pace(target.format).is_some();
    if class == AttemptClass::Success && !chat {
        // Read a short answer to its end so that the connection can be used again.
        read_prefix(response.into_body(), SUCCESS_BODY_READ, deadline).await;
        return AttemptResult {
            class,
            status: Some(status.as_u16()),
            latency,
            error: None,
            retry_after,
        };
    }
    // A little of an error body helps users; more could be anything, even an echo of our own
    // credentials, so read at most 1 KiB and mask secret values. A chat robot's answer is read
    // whole (it says whether the message was taken).
    let limit = if class == AttemptClass::Success {
        SUCCESS_BODY_READ
    } else {
        ERROR_BODY_READ
    };
    let bytes = read_prefix(response.into_body(), limit, deadline).await;
    if let Some(answer) = crate::chat::read_answer(target.format, status.as_u16(), &bytes) {
        let (answer_class, error, wait) = match answer {
            Answer::Taken => (AttemptClass::Success, None, None),
            Answer::RateLimited { wait, reason } => {
                (AttemptClass::Retryable, Some(reason), Some(wait))
            }
            Answer::Busy(reason) => (AttemptClass::Retryable, Some(reason), None),
            Answer::Refused(reason) => (AttemptClass::Final, Some(reason), None),
        };
        return AttemptResult {
            class: answer_class,
            status: Some(status.as_u16()),
            latency,
            error: error.map(|e| target.answer_excerpt(e.as_bytes())),
            // The endpoint's own Retry-After comes first.
            retry_after: retry_after.or(wait),
        };
    }
    let error = (class != AttemptClass::Success).then(|| {
        let snippet = target.answer_excerpt(&bytes);
        if snippet.is_empty() {
            format!("HTTP {}", status.as_u16())
        } else {
            format!("HTTP {}: {snippet}", status.as_u16())
        }
    });
    AttemptResult {
        class,
        status: Some(status.as_u16()),
        latency,
        error,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks specification's reference implementation.
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .expect("base64");
        let body = br#"{"test": 2432232314}"#;
        let signature = sign(
            std::iter::once(key.as_slice()),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("7")),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
    }
}
