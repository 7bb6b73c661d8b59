//! Who is asking: sessions (cookies), bearer tokens, CSRF tokens and the same-site check.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use http::{HeaderMap, header};
use rand::RngCore as _;
use sha2::Sha256;

use crate::secret::Sensitive;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "herald_console_session";
/// The language cookie's name.
pub const LANG_COOKIE: &str = "herald_console_lang";
/// How long a session lasts after sign-in.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// Most sessions held at once (the oldest go first).
const MAX_SESSIONS: usize = 10_000;

/// The credential of the person behind a request: what the backend acts with.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The bearer token (a Kubernetes token in a cluster, the console token in `herald run`).
    pub token: Sensitive<String>,
    /// The CSRF token forms must carry for this identity.
    pub csrf: String,
    /// The session id, when the identity comes from a session cookie.
    pub session: Option<String>,
}

struct Session {
    token: Sensitive<String>,
    expires: Instant,
}

/// Signed-in sessions, in memory (a restart signs everyone out), and the key CSRF tokens are
/// derived with.
pub struct Sessions {
    sessions: Mutex<HashMap<String, Session>>,
    key: [u8; 32],
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sessions(..)")
    }
}

impl Default for Sessions {
    fn default() -> Self {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Sessions {
            sessions: Mutex::new(HashMap::new()),
            key,
        }
    }
}

fn random_id() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    /// Opens a session for a token that was accepted; returns its id.
    pub fn open(&self, token: Sensitive<String>) -> String {
        let id = random_id();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            id.clone(),
            Session {
                token,
                expires: now + SESSION_LIFETIME,
            },
        );
        id
    }

    /// Ends a session.
    pub fn close(&self, id: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// The CSRF token bound to a session id or a bearer token.
    pub fn csrf_for(&self, binding: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("any key length");
        mac.update(b"herald-console-csrf\0");
        mac.update(binding.as_bytes());
        hex(&mac.finalize().into_bytes())
    }

    /// The identity of a request: its `Authorization: Bearer` header (from a script or an
    /// authenticating proxy), else its session cookie.
    pub fn identify(&self, headers: &HeaderMap) -> Option<Identity> {
        if let Some(token) = bearer(headers) {
            return Some(Identity {
                csrf: self.csrf_for(&format!("bearer:{token}")),
                token: Sensitive::new(token),
                session: None,
            });
        }
        let id = cookie(headers, SESSION_COOKIE)?;
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let session = sessions.get(&id).filter(|s| s.expires > Instant::now())?;
        Some(Identity {
            token: session.token.clone(),
            csrf: self.csrf_for(&format!("session:{id}")),
            session: Some(id),
        })
    }
}

/// The token of an `Authorization: Bearer` header.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// A cookie's value.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Whether the request came over TLS (directly or, as a proxy says, to it).
pub fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, Secure over TLS; `max_age` 0 removes it.
pub fn set_cookie(name: &str, value: &str, max_age: Duration, tls: bool) -> String {
    format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        max_age.as_secs(),
        if tls { "; Secure" } else { "" }
    )
}

/// Why a state-changing request is refused before its CSRF token is even read: it comes from
/// another site (`Sec-Fetch-Site`, or an `Origin` that is not this host).
pub fn cross_site(headers: &HeaderMap) -> Option<&'static str> {
    // Browsers that send Sec-Fetch-Site say it best (their Origin may be `null` under a strict
    // referrer policy); others are judged by Origin.
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return (!matches!(site, "same-origin" | "none"))
            .then_some("the request comes from another site");
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let origin_host = origin
            .split_once("://")
            .map_or("", |(_, rest)| rest.trim_end_matches('/'));
        if origin == "null" || origin_host != host {
            return Some("the request's Origin is not this console");
        }
    }
    None
}

/// Compares a form's CSRF token with the identity's, in constant time.
pub fn csrf_matches(identity: &Identity, given: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    !given.is_empty() && bool::from(given.as_bytes().ct_eq(identity.csrf.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, v.parse().expect("header"));
        }
        map
    }

    #[test]
    fn a_session_is_found_by_its_cookie_and_binds_its_own_csrf_token() {
        let sessions = Sessions::default();
        let id = sessions.open(Sensitive::new("t0ken".into()));
        let found = sessions
            .identify(&headers(&[(
                "cookie",
                &format!("a=b; {SESSION_COOKIE}={id}"),
            )]))
            .expect("session");
        assert_eq!(found.token.expose(), "t0ken");
        assert!(csrf_matches(&found, &found.csrf));
        assert!(!csrf_matches(&found, ""));
        assert!(!csrf_matches(&found, &sessions.csrf_for("session:other")));
        sessions.close(&id);
        assert!(
            sessions
                .identify(&headers(&[("cookie", &format!("{SESSION_COOKIE}={id}"))]))
                .is_none()
        );
    }

    #[test]
    fn cross_site_requests_are_recognised() {
        assert!(cross_site(&headers(&[("sec-fetch-site", "cross-site")])).is_some());
        assert!(cross_site(&headers(&[("sec-fetch-site", "same-site")])).is_some());
        assert!(
            cross_site(&headers(&[
                ("host", "console.local:8443"),
                ("origin", "https://evil.example")
            ]))
            .is_some()
        );
        assert!(
            cross_site(&headers(&[
                ("host", "127.0.0.1:9000"),
                ("origin", "http://127.0.0.1:9000"),
                ("sec-fetch-site", "same-origin")
            ]))
            .is_none()
        );
        assert!(cross_site(&headers(&[])).is_none());
    }
}
