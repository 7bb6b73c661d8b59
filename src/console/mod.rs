//! The web console: the WebHook settings page, served by `herald controller` and `herald run`
//! on `--console-listen`.
//!
//! Server-rendered HTML (MiniJinja with HTML autoescape: every value from an alert, an Event or
//! an object is escaped) with a small vendored script library (htmx) and the console's own
//! script, both embedded; a Content-Security-Policy without inline script. In a cluster every
//! read and write is made with the signed-in user's own token ([`cluster`]); in `herald run`
//! the console edits the config folder ([`folder`]). Sessions are cookies (HttpOnly,
//! SameSite=Strict, Secure over TLS) and every state-changing request carries a CSRF token.

pub mod auth;
pub mod backend;
pub mod cluster;
pub mod folder;
pub mod form;
pub mod i18n;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::json;

use crate::crd::{NotificationCondition, Webhook};
use crate::delivery::{ReplayError, Target};
use crate::dispatch::Dispatcher;
use crate::object::ObjectKey;
use crate::outgoing::{Delivery, ReportOutcome};
use crate::routing::Subject;
use crate::secret::{SecretData, Sensitive};
use crate::store::RecordFilter;

use auth::{Identity, LANG_COOKIE, SESSION_COOKIE, SESSION_LIFETIME, Sessions};
use backend::{Backend, ConsoleError, Permissions, Save, TestRequested};
use form::{FieldErrors, WebhookForm};
use i18n::Lang;

pub use cluster::ClusterBackend;
pub use folder::FolderBackend;

/// The Content-Security-Policy of every answer: only the console's own files, no inline script.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The outcome of one test message, as a page shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TestView {
    /// Succeeded or Failed.
    pub outcome: String,
    /// The HTTP status, or `-`.
    pub status: String,
    /// Latency in milliseconds.
    pub latency_ms: u64,
    /// What went wrong.
    pub error: String,
}

/// Which backend the console edits (shown on the sign-in page).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A cluster, as the signed-in user.
    Cluster,
    /// The `herald run` config folder.
    Folder,
}

struct Console<B: Backend> {
    backend: B,
    dispatcher: Dispatcher,
    sessions: Sessions,
    templates: minijinja::Environment<'static>,
    mode: Mode,
}

type Shared<B> = Arc<Console<B>>;

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("sign_in.html", include_str!("templates/sign_in.html")),
    ("webhooks.html", include_str!("templates/webhooks.html")),
    ("form.html", include_str!("templates/form.html")),
    ("detail.html", include_str!("templates/detail.html")),
    ("delete.html", include_str!("templates/delete.html")),
    ("conditions.html", include_str!("templates/conditions.html")),
    ("routing.html", include_str!("templates/routing.html")),
    ("error.html", include_str!("templates/error.html")),
    (
        "test_result.html",
        include_str!("templates/test_result.html"),
    ),
];

fn templates() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    // Path segments and query values: everything but letters, digits and `-._~` percent-encoded.
    env.add_filter("urlencode", |text: String| path_segment(&text));
    // `.html` names autoescape HTML (MiniJinja's default), so every value is escaped.
    for (name, source) in TEMPLATES {
        if let Err(e) = env.add_template(name, source) {
            // The templates are part of the binary and checked by the unit tests.
            tracing::error!("console template {name}: {e}");
        }
    }
    env
}

/// The console router for a cluster: reads and writes as each signed-in user.
pub fn cluster_router(config: kube::Config, dispatcher: Dispatcher) -> Router {
    router(ClusterBackend::new(config), dispatcher, Mode::Cluster)
}

/// The console router for `herald run`: edits `dir`, for holders of `token`.
pub fn folder_router(
    dir: std::path::PathBuf,
    token: Sensitive<String>,
    dispatcher: Dispatcher,
) -> Router {
    router(
        FolderBackend::new(dir, token, dispatcher.clone()),
        dispatcher,
        Mode::Folder,
    )
}

fn router<B: Backend>(backend: B, dispatcher: Dispatcher, mode: Mode) -> Router {
    let console = Arc::new(Console {
        backend,
        dispatcher,
        sessions: Sessions::default(),
        templates: templates(),
        mode,
    });
    Router::new()
        .route("/", get(home::<B>))
        .route("/sign-in", get(home::<B>).post(sign_in::<B>))
        .route("/sign-out", post(sign_out::<B>))
        .route("/lang/{tag}", get(switch_language))
        .route("/assets/{file}", get(asset))
        .route("/webhooks", get(list::<B>))
        .route("/webhooks/new", get(new_form::<B>).post(submit_new::<B>))
        .route("/webhooks/{namespace}/{name}", get(detail::<B>))
        .route(
            "/webhooks/{namespace}/{name}/edit",
            get(edit_form::<B>).post(submit_edit::<B>),
        )
        .route("/webhooks/{namespace}/{name}/enable", post(enable::<B>))
        .route("/webhooks/{namespace}/{name}/disable", post(disable::<B>))
        .route("/webhooks/{namespace}/{name}/test", post(test_saved::<B>))
        .route(
            "/webhooks/{namespace}/{name}/delete",
            get(delete_page::<B>).post(delete::<B>),
        )
        .route("/deliveries/{id}/replay", post(replay::<B>))
        .route("/conditions", get(conditions::<B>))
        .route("/routing", get(routing::<B>).post(routing_preview::<B>))
        .layer(axum::middleware::map_response(secure_headers))
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .with_state(console)
}

async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

const HTMX: &[u8] = include_bytes!("assets/htmx.min.js");
const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");

async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind): (&'static [u8], &str) = match file.as_str() {
        "htmx.min.js" => (HTMX, "text/javascript; charset=utf-8"),
        "console.js" => (SCRIPT.as_bytes(), "text/javascript; charset=utf-8"),
        "console.css" => (STYLE.as_bytes(), "text/css; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

fn language(headers: &HeaderMap) -> Lang {
    auth::cookie(headers, LANG_COOKIE)
        .and_then(|tag| Lang::from_tag(&tag))
        .unwrap_or_else(|| {
            Lang::from_accept_language(
                headers
                    .get(header::ACCEPT_LANGUAGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or(""),
            )
        })
}

/// A local path to go back to (never another site).
fn local_path(next: Option<&str>) -> String {
    match next {
        Some(p) if p.starts_with('/') && !p.starts_with("//") && !p.contains('\\') => p.to_string(),
        _ => "/webhooks".into(),
    }
}

async fn switch_language(
    headers: HeaderMap,
    Path(tag): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let lang = Lang::from_tag(&tag).unwrap_or(Lang::En);
    let cookie = auth::set_cookie(
        LANG_COOKIE,
        lang.tag(),
        std::time::Duration::from_secs(365 * 86400),
        auth::over_tls(&headers),
    );
    (
        [(header::SET_COOKIE, cookie)],
        Redirect::to(&local_path(query.get("next").map(String::as_str))),
    )
        .into_response()
}

impl<B: Backend> Console<B> {
    fn page(
        &self,
        status: StatusCode,
        template: &str,
        headers: &HeaderMap,
        who: Option<&Identity>,
        path: &str,
        context: serde_json::Value,
    ) -> Response {
        let lang = language(headers);
        let mut ctx = json!({
            "t": lang.words(),
            "lang": lang.tag(),
            "other_lang": if lang == Lang::En { "zh-CN" } else { "en" },
            "path": path,
            "signed_in": who.is_some(),
            "csrf": who.map(|w| w.csrf.clone()).unwrap_or_default(),
            "folder": self.mode == Mode::Folder,
        });
        if let (Some(target), Some(source)) = (ctx.as_object_mut(), context.as_object()) {
            for (k, v) in source {
                target.insert(k.clone(), v.clone());
            }
        }
        let rendered = self
            .templates
            .get_template(template)
            .and_then(|t| t.render(&ctx));
        match rendered {
            Ok(html) => (
                status,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                html,
            )
                .into_response(),
            Err(e) => {
                tracing::error!("console page {template}: {e:#}");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the page could not be rendered",
                )
                    .into_response()
            }
        }
    }

    fn error(&self, headers: &HeaderMap, who: Option<&Identity>, error: &ConsoleError) -> Response {
        let lang = language(headers);
        let words = lang.words();
        let message = match error {
            ConsoleError::Forbidden(m) => format!("{} ({m})", words["not_allowed"]),
            ConsoleError::NotFound(m) => format!("{} ({m})", words["not_found"]),
            ConsoleError::Invalid(errors) => {
                errors.values().cloned().collect::<Vec<_>>().join("; ")
            }
            other => other.to_string(),
        };
        self.page(
            error.status(),
            "error.html",
            headers,
            who,
            "",
            json!({"message": message, "code": error.status().as_u16()}),
        )
    }

    /// A stored webhook, or the page saying why there is none.
    async fn stored(
        &self,
        headers: &HeaderMap,
        who: &Identity,
        namespace: &str,
        name: &str,
    ) -> Result<Webhook, Box<Response>> {
        let problem = match self.backend.webhook(who, namespace, name).await {
            Ok(Some(webhook)) => return Ok(webhook),
            Ok(None) => ConsoleError::NotFound(format!("{namespace}/{name}")),
            Err(e) => e,
        };
        Err(Box::new(self.error(headers, Some(who), &problem)))
    }

    /// The identity of a page request, or the way to the sign-in page.
    fn reader(&self, headers: &HeaderMap) -> Result<Identity, Box<Response>> {
        let who = self
            .sessions
            .identify(headers)
            .ok_or_else(|| Box::new(Redirect::to("/").into_response()))?;
        if !self.backend.admits(&who) {
            return Err(Box::new(
                (StatusCode::UNAUTHORIZED, "the token was refused").into_response(),
            ));
        }
        Ok(who)
    }

    /// The identity of a state-changing request that came from this console's own form.
    fn writer(
        &self,
        headers: &HeaderMap,
        pairs: &[(String, String)],
    ) -> Result<Identity, Box<Response>> {
        if let Some(why) = auth::cross_site(headers) {
            return Err(Box::new(
                (StatusCode::FORBIDDEN, format!("refused: {why}")).into_response(),
            ));
        }
        let who = self
            .sessions
            .identify(headers)
            .ok_or_else(|| Box::new((StatusCode::UNAUTHORIZED, "sign in first").into_response()))?;
        if !self.backend.admits(&who) {
            return Err(Box::new(
                (StatusCode::UNAUTHORIZED, "the token was refused").into_response(),
            ));
        }
        if !auth::csrf_matches(&who, form::field(pairs, "csrf")) {
            return Err(Box::new(
                (
                    StatusCode::FORBIDDEN,
                    "refused: the form's CSRF token is missing or wrong",
                )
                    .into_response(),
            ));
        }
        Ok(who)
    }
}

async fn home<B: Backend>(State(console): State<Shared<B>>, headers: HeaderMap) -> Response {
    if console
        .sessions
        .identify(&headers)
        .is_some_and(|who| console.backend.admits(&who))
    {
        return Redirect::to("/webhooks").into_response();
    }
    console.page(
        StatusCode::OK,
        "sign_in.html",
        &headers,
        None,
        "/",
        json!({}),
    )
}

async fn sign_in<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(why) = auth::cross_site(&headers) {
        return (StatusCode::FORBIDDEN, format!("refused: {why}")).into_response();
    }
    let pairs = form::parse_pairs(&body);
    let token = form::field(&pairs, "token").trim().to_string();
    if let Err(e) = console.backend.sign_in(&token).await {
        let unauthorized = matches!(e, ConsoleError::Unauthorized(_));
        if !unauthorized {
            tracing::warn!("console sign-in failed: {e}");
        }
        return console.page(
            StatusCode::UNAUTHORIZED,
            "sign_in.html",
            &headers,
            None,
            "/",
            json!({"failed": true}),
        );
    }
    let id = console.sessions.open(Sensitive::new(token));
    let cookie = auth::set_cookie(
        SESSION_COOKIE,
        &id,
        SESSION_LIFETIME,
        auth::over_tls(&headers),
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/webhooks")).into_response()
}

async fn sign_out<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let pairs = form::parse_pairs(&body);
    let who = match console.writer(&headers, &pairs) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    if let Some(id) = &who.session {
        console.sessions.close(id);
    }
    let cookie = auth::set_cookie(
        SESSION_COOKIE,
        "",
        std::time::Duration::ZERO,
        auth::over_tls(&headers),
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

/// One row of the webhooks list.
#[derive(Debug, Serialize)]
struct WebhookRow {
    namespace: String,
    name: String,
    kind: String,
    url: String,
    language: String,
    auth: String,
    enabled: bool,
    ready: String,
    ready_reason: String,
    ready_message: String,
    last_delivery: Option<OutcomeView>,
    last_test: Option<OutcomeView>,
    conditions: Vec<String>,
    can: Permissions,
}

#[derive(Debug, Serialize)]
struct OutcomeView {
    time: String,
    outcome: String,
    status: String,
    message: String,
}

fn row(webhook: &Webhook, can: Permissions) -> WebhookRow {
    let status = webhook.status.clone().unwrap_or_default();
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
    let status_text = |s: Option<u16>| s.map_or_else(|| "-".to_string(), |s| s.to_string());
    WebhookRow {
        namespace: webhook.metadata.namespace.clone().unwrap_or_default(),
        name: webhook.metadata.name.clone().unwrap_or_default(),
        kind: format!("{:?}", webhook.spec.kind),
        url: webhook.spec.url.clone(),
        language: webhook.spec.language.as_str().to_string(),
        auth: format!("{:?}", webhook.spec.auth.kind),
        enabled: webhook.spec.enabled,
        ready: ready.map_or_else(|| "Unknown".to_string(), |c| c.status.clone()),
        ready_reason: ready.map(|c| c.reason.clone()).unwrap_or_default(),
        ready_message: ready.map(|c| c.message.clone()).unwrap_or_default(),
        last_delivery: status.last_delivery.map(|d| OutcomeView {
            time: d.time.0.to_string(),
            outcome: format!("{:?}", d.outcome),
            status: status_text(d.http_status),
            message: d.message,
        }),
        last_test: status.last_test.map(|d| OutcomeView {
            time: d.time.0.to_string(),
            outcome: format!("{:?}", d.outcome),
            status: status_text(d.http_status),
            message: d.message,
        }),
        conditions: webhook.spec.conditions.clone(),
        can,
    }
}

/// Permissions per namespace, asked once each.
async fn permissions_of<B: Backend>(
    console: &Console<B>,
    who: &Identity,
    namespaces: Vec<String>,
) -> BTreeMap<String, Permissions> {
    let mut out = BTreeMap::new();
    for ns in namespaces {
        if let std::collections::btree_map::Entry::Vacant(slot) = out.entry(ns) {
            let can = console.backend.permissions(who, slot.key()).await;
            slot.insert(can);
        }
    }
    out
}

/// The cookie that remembers the namespace last filtered by (for users of some namespaces only).
const NAMESPACE_COOKIE: &str = "herald_console_namespace";

/// The namespace of the query, else the one last filtered by.
fn chosen_namespace(query: &BTreeMap<String, String>, headers: &HeaderMap) -> Option<String> {
    filter_value(query, "namespace").or_else(|| {
        auth::cookie(headers, NAMESPACE_COOKIE).filter(|ns| {
            !ns.is_empty()
                && ns
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        })
    })
}

fn filter_value(query: &BTreeMap<String, String>, name: &str) -> Option<String> {
    query
        .get(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

async fn list<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let who = match console.reader(&headers) {
        Ok(who) => who,
        Err(to_sign_in) => return *to_sign_in,
    };
    let namespace = filter_value(&query, "namespace");
    let kind = filter_value(&query, "type");
    let ready = filter_value(&query, "ready");
    let mut problem = None;
    let webhooks = match console.backend.webhooks(&who, namespace.as_deref()).await {
        Ok(webhooks) => webhooks,
        // A user of some namespaces only picks one with the filter.
        Err(ConsoleError::Forbidden(message)) if namespace.is_none() => {
            problem = Some(message);
            Vec::new()
        }
        Err(e) => return console.error(&headers, Some(&who), &e),
    };
    let mut namespaces: Vec<String> = Vec::new();
    for webhook in &webhooks {
        namespaces.extend(webhook.metadata.namespace.clone());
    }
    namespaces.extend(namespace.clone());
    let permissions = permissions_of(&console, &who, namespaces).await;
    let mut rows: Vec<WebhookRow> = webhooks
        .iter()
        .map(|w| {
            let ns = w.metadata.namespace.clone().unwrap_or_default();
            row(w, permissions.get(&ns).copied().unwrap_or_default())
        })
        .filter(|r| kind.as_ref().is_none_or(|k| &r.kind == k))
        .filter(|r| ready.as_ref().is_none_or(|s| &r.ready == s))
        .collect();
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let can_create = match &namespace {
        Some(ns) => permissions.get(ns).is_some_and(|p| p.create),
        None => console.mode == Mode::Folder || permissions.values().any(|p| p.create),
    };
    let mut here = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in [
        ("namespace", &namespace),
        ("type", &kind),
        ("ready", &ready),
    ] {
        if let Some(value) = value {
            here.append_pair(name, value);
        }
    }
    let here = match here.finish() {
        query if query.is_empty() => "/webhooks".to_string(),
        query => format!("/webhooks?{query}"),
    };
    let remember = namespace.as_ref().map(|ns| {
        auth::set_cookie(
            NAMESPACE_COOKIE,
            ns,
            std::time::Duration::from_secs(30 * 86400),
            auth::over_tls(&headers),
        )
    });
    let page = console.page(
        StatusCode::OK,
        "webhooks.html",
        &headers,
        Some(&who),
        &here,
        json!({
            "rows": rows,
            "filter": {"namespace": namespace, "type": kind, "ready": ready},
            "can_create": can_create,
            "problem": problem,
            "done": query.get("done"),
            "test": query.get("test").map(|_| json!({
                "outcome": query.get("outcome"), "status": query.get("status"),
                "latency_ms": query.get("latency"), "error": query.get("error"),
            })),
        }),
    );
    match remember.and_then(|c| HeaderValue::from_str(&c).ok()) {
        Some(cookie) => {
            let mut page = page;
            page.headers_mut().append(header::SET_COOKIE, cookie);
            page
        }
        None => page,
    }
}

/// Alertnames and Event reasons from recent delivery records that kept their content.
async fn recently_seen(dispatcher: &Dispatcher) -> Vec<String> {
    let records = dispatcher
        .engine()
        .store()
        .records(&RecordFilter {
            webhook: None,
            outcome: None,
            limit: 500,
        })
        .await
        .unwrap_or_default();
    let mut seen = BTreeSet::new();
    for record in &records {
        for alert in record.delivery.iter().flat_map(|d| d.alerts.iter()) {
            for label in ["alertname", "reason"] {
                if let Some(value) = alert.labels.get(label) {
                    seen.insert(value.to_string());
                }
            }
        }
    }
    seen.into_iter().take(200).collect()
}

struct FormPage<'a> {
    form: &'a WebhookForm,
    creating: bool,
    errors: &'a FieldErrors,
    test: Option<TestView>,
    kept_credentials: bool,
}

async fn render_form<B: Backend>(
    console: &Console<B>,
    headers: &HeaderMap,
    who: &Identity,
    page: FormPage<'_>,
) -> Response {
    let status = if page.errors.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    let action = if page.creating {
        "/webhooks/new".to_string()
    } else {
        format!(
            "/webhooks/{}/{}/edit",
            path_segment(&page.form.namespace),
            path_segment(&page.form.name)
        )
    };
    console.page(
        status,
        "form.html",
        headers,
        Some(who),
        &action,
        json!({
            "form": page.form,
            "creating": page.creating,
            "errors": page.errors,
            "test": page.test,
            "kept_credentials": page.kept_credentials,
            "action": action,
            "seen": recently_seen(&console.dispatcher).await,
        }),
    )
}

/// What a path segment or query value leaves as it is: letters, digits and `-._~`.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn path_segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, SEGMENT).to_string()
}

async fn new_form<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let who = match console.reader(&headers) {
        Ok(who) => who,
        Err(to_sign_in) => return *to_sign_in,
    };
    let namespace = filter_value(&query, "namespace").unwrap_or_else(|| "default".into());
    let form = WebhookForm::new_webhook(&namespace);
    render_form(
        &console,
        &headers,
        &who,
        FormPage {
            form: &form,
            creating: true,
            errors: &FieldErrors::new(),
            test: None,
            kept_credentials: false,
        },
    )
    .await
}

async fn own_condition<B: Backend>(
    console: &Console<B>,
    who: &Identity,
    webhook: &Webhook,
) -> Option<NotificationCondition> {
    let ns = webhook.metadata.namespace.as_deref()?;
    let name = form::condition_name(webhook.metadata.name.as_deref()?);
    if !webhook.spec.conditions.contains(&name) {
        return None;
    }
    console
        .backend
        .conditions(who, Some(ns))
        .await
        .ok()?
        .into_iter()
        .find(|c| c.metadata.name.as_deref() == Some(name.as_str()))
}

async fn edit_form<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let who = match console.reader(&headers) {
        Ok(who) => who,
        Err(to_sign_in) => return *to_sign_in,
    };
    let webhook = match console.stored(&headers, &who, &namespace, &name).await {
        Ok(webhook) => webhook,
        Err(page) => return *page,
    };
    let condition = own_condition(&console, &who, &webhook).await;
    let form = WebhookForm::from_webhook(&webhook, condition.as_ref());
    render_form(
        &console,
        &headers,
        &who,
        FormPage {
            form: &form,
            creating: false,
            errors: &FieldErrors::new(),
            test: None,
            kept_credentials: webhook.spec.auth.secret_ref.is_some(),
        },
    )
    .await
}

async fn submit_new<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    submit(console, headers, body, None).await
}

async fn submit_edit<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    submit(console, headers, body, Some((namespace, name))).await
}

/// Sends a test message for a form that is not saved, with the delivery code Herald uses for
/// test messages, under Herald's destination policy.
async fn test_unsaved<B: Backend>(
    console: &Console<B>,
    who: &Identity,
    form: &WebhookForm,
    existing: Option<&Webhook>,
) -> TestView {
    let kept_ref = existing
        .and_then(|w| w.spec.auth.secret_ref.as_ref())
        .map(|r| r.name.clone());
    let typed = form.credentials();
    let secret_ref = if typed.is_some() {
        Some(form::secret_name(&form.name))
    } else {
        kept_ref
    };
    let webhook = match form.webhook(existing, secret_ref.clone()) {
        Ok(webhook) => webhook,
        Err(e) => {
            return TestView {
                outcome: "Failed".into(),
                status: "-".into(),
                latency_ms: 0,
                error: e,
            };
        }
    };
    let mut spec = webhook.spec;
    // A test is sent whatever the Enable switch says.
    spec.enabled = true;
    let secret: Option<SecretData> = match (typed, &secret_ref) {
        (Some(values), _) => Some(
            SecretData::from_pairs(values.into_iter().map(|(k, v)| (k, v.into_bytes())))
                .with_consent(true),
        ),
        (None, Some(name)) => console
            .backend
            .secret(who, &form.namespace, name)
            .await
            .ok()
            .flatten(),
        (None, None) => None,
    };
    let key = ObjectKey::new(form.namespace.as_str(), form.name.as_str());
    let target = Target::build(key.clone(), &spec, console.dispatcher.policy(), |name| {
        secret
            .as_ref()
            .filter(|_| secret_ref.as_deref() == Some(name))
    });
    let target = match target {
        Ok(target) => target,
        Err(not_ready) => {
            return TestView {
                outcome: "Failed".into(),
                status: "-".into(),
                latency_ms: 0,
                error: format!("{}: {}", not_ready.reason.as_str(), not_ready.message),
            };
        }
    };
    let result = crate::delivery::send(&target, &Delivery::test(key)).await;
    TestView {
        outcome: if result.class == crate::delivery::AttemptClass::Success {
            "Succeeded".into()
        } else {
            "Failed".into()
        },
        status: result.status.map_or_else(|| "-".into(), |s| s.to_string()),
        latency_ms: u64::try_from(result.latency.as_millis()).unwrap_or(u64::MAX),
        error: result.error.unwrap_or_default(),
    }
}

async fn submit<B: Backend>(
    console: Shared<B>,
    headers: HeaderMap,
    body: Bytes,
    editing: Option<(String, String)>,
) -> Response {
    let pairs = form::parse_pairs(&body);
    let who = match console.writer(&headers, &pairs) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    let mut form = WebhookForm::from_pairs(&pairs);
    let existing = match &editing {
        Some((namespace, name)) => {
            // Namespace and name are fixed on Modify.
            form.namespace = namespace.clone();
            form.name = name.clone();
            match console.stored(&headers, &who, namespace, name).await {
                Ok(webhook) => Some(webhook),
                Err(page) => return *page,
            }
        }
        None => None,
    };
    let kept_credentials = existing
        .as_ref()
        .is_some_and(|w| w.spec.auth.secret_ref.is_some());
    let action = form::field(&pairs, "action").to_string();
    let mut errors = form.check(existing.as_ref());
    let mut test = None;
    match action.as_str() {
        "add-row" => {
            form.rows.push(form::ConditionRow {
                operator: "In".into(),
                ..Default::default()
            });
            errors.clear();
        }
        "test" => {
            // Only what a test needs must be right; the rest is checked on Submit.
            errors.retain(|field, _| {
                matches!(
                    field.as_str(),
                    "url" | "secret" | "username" | "name" | "namespace"
                )
            });
            if errors.is_empty() {
                test = Some(test_unsaved(&console, &who, &form, existing.as_ref()).await);
            }
            if headers.contains_key("hx-request") {
                return console.page(
                    StatusCode::OK,
                    "test_result.html",
                    &headers,
                    Some(&who),
                    "",
                    json!({"test": test, "errors": errors}),
                );
            }
        }
        _ => {
            if errors.is_empty() {
                let secret_ref = if form.credentials().is_some() {
                    Some(form::secret_name(&form.name))
                } else {
                    existing
                        .as_ref()
                        .filter(|w| w.spec.auth.kind == form_auth(&form))
                        .and_then(|w| w.spec.auth.secret_ref.as_ref())
                        .map(|r| r.name.clone())
                };
                let saved = match (
                    form.webhook(existing.as_ref(), secret_ref),
                    form.condition(),
                ) {
                    (Ok(webhook), Ok(condition)) => {
                        console
                            .backend
                            .save(
                                &who,
                                Save {
                                    webhook,
                                    credentials: form.credentials(),
                                    condition,
                                    create: existing.is_none(),
                                },
                            )
                            .await
                    }
                    (Err(e), _) | (_, Err(e)) => Err(ConsoleError::Invalid(FieldErrors::from([(
                        "_".to_string(),
                        e,
                    )]))),
                };
                match saved {
                    Ok(()) => {
                        return Redirect::to(&format!(
                            "/webhooks/{}/{}?done=saved",
                            path_segment(&form.namespace),
                            path_segment(&form.name)
                        ))
                        .into_response();
                    }
                    Err(ConsoleError::Invalid(api)) => errors = api,
                    Err(ConsoleError::Forbidden(message)) => {
                        let words = language(&headers).words();
                        errors.insert("_".into(), format!("{} {message}", words["not_allowed"]));
                        let mut page = render_form(
                            &console,
                            &headers,
                            &who,
                            FormPage {
                                form: &form,
                                creating: existing.is_none(),
                                errors: &errors,
                                test,
                                kept_credentials,
                            },
                        )
                        .await;
                        *page.status_mut() = StatusCode::FORBIDDEN;
                        return page;
                    }
                    Err(e) => {
                        errors.insert("_".into(), e.to_string());
                    }
                }
            }
        }
    }
    render_form(
        &console,
        &headers,
        &who,
        FormPage {
            form: &form,
            creating: existing.is_none(),
            errors: &errors,
            test,
            kept_credentials,
        },
    )
    .await
}

fn form_auth(form: &WebhookForm) -> crate::crd::AuthType {
    match form.auth.as_str() {
        "Bearer" => crate::crd::AuthType::Bearer,
        "Basic" => crate::crd::AuthType::Basic,
        _ => crate::crd::AuthType::None,
    }
}

/// One delivery record, as the detail page shows it.
#[derive(Debug, Serialize)]
struct RecordView {
    id: String,
    time: String,
    alerts: usize,
    attempts: u32,
    outcome: String,
    status: String,
    latency_ms: u64,
    error: String,
    test: bool,
    replayable: bool,
}

async fn detail<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let who = match console.reader(&headers) {
        Ok(who) => who,
        Err(to_sign_in) => return *to_sign_in,
    };
    let webhook = match console.stored(&headers, &who, &namespace, &name).await {
        Ok(webhook) => webhook,
        Err(page) => return *page,
    };
    let can = console.backend.permissions(&who, &namespace).await;
    let key = ObjectKey::new(namespace.as_str(), name.as_str());
    let records = console
        .dispatcher
        .engine()
        .store()
        .records(&RecordFilter {
            webhook: Some(key),
            outcome: None,
            limit: 100,
        })
        .await
        .unwrap_or_default();
    let (dead, delivered): (Vec<_>, Vec<_>) = records
        .into_iter()
        .map(|r| RecordView {
            id: r.id.to_string(),
            time: r.time.to_string(),
            alerts: r.alerts,
            attempts: r.attempts,
            outcome: format!("{:?}", r.outcome),
            status: r.http_status.map_or_else(|| "-".into(), |s| s.to_string()),
            latency_ms: r.latency_ms,
            error: r.error,
            test: r.test,
            replayable: r.delivery.is_some(),
        })
        .partition(|r| r.outcome != format!("{:?}", ReportOutcome::Succeeded));
    let events = console
        .backend
        .events(&who, &namespace, &name)
        .await
        .unwrap_or_default();
    let mut spec = serde_json::to_value(&webhook.spec).unwrap_or_default();
    // Only names of Secrets appear, never their values; drop the custom template's body.
    if let Some(obj) = spec.as_object_mut()
        && obj.contains_key("template")
    {
        obj.insert("template".into(), json!("(custom template)"));
    }
    let spec_yaml = serde_saphyr::to_string(&spec).unwrap_or_default();
    let conditions: Vec<serde_json::Value> = webhook
        .status
        .iter()
        .flat_map(|s| s.conditions.iter())
        .map(|c| json!({"type": c.type_, "status": c.status, "reason": c.reason, "message": c.message, "time": c.last_transition_time.0.to_string()}))
        .collect();
    console.page(
        StatusCode::OK,
        "detail.html",
        &headers,
        Some(&who),
        &format!(
            "/webhooks/{}/{}",
            path_segment(&namespace),
            path_segment(&name)
        ),
        json!({
            "row": row(&webhook, can),
            "spec_yaml": spec_yaml,
            "conditions": conditions,
            "delivered": delivered,
            "dead": dead,
            "events": events,
            "done": query.get("done"),
            "test": query.get("outcome").map(|o| json!({
                "outcome": o, "status": query.get("status"),
                "latency_ms": query.get("latency"), "error": query.get("error"),
            })),
        }),
    )
}

async fn set_enabled<B: Backend>(
    console: Shared<B>,
    headers: HeaderMap,
    namespace: String,
    name: String,
    body: Bytes,
    enabled: bool,
) -> Response {
    let pairs = form::parse_pairs(&body);
    let who = match console.writer(&headers, &pairs) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    match console
        .backend
        .set_enabled(&who, &namespace, &name, enabled)
        .await
    {
        Ok(()) => Redirect::to(&local_path(Some(form::field(&pairs, "next")))).into_response(),
        Err(e) => console.error(&headers, Some(&who), &e),
    }
}

async fn enable<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    set_enabled(console, headers, namespace, name, body, true).await
}

async fn disable<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    set_enabled(console, headers, namespace, name, body, false).await
}

async fn test_saved<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let pairs = form::parse_pairs(&body);
    let who = match console.writer(&headers, &pairs) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    let next = local_path(Some(form::field(&pairs, "next")));
    let separator = if next.contains('?') { '&' } else { '?' };
    match console.backend.send_test(&who, &namespace, &name).await {
        Ok(TestRequested::Requested) => {
            Redirect::to(&format!("{next}{separator}done=test_requested")).into_response()
        }
        Ok(TestRequested::Sent(view)) => {
            let query = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("test", "1")
                .append_pair("outcome", &view.outcome)
                .append_pair("status", &view.status)
                .append_pair("latency", &view.latency_ms.to_string())
                .append_pair("error", &view.error)
                .finish();
            Redirect::to(&format!("{next}{separator}{query}")).into_response()
        }
        Err(e) => console.error(&headers, Some(&who), &e),
    }
}

async fn delete_page<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let who = match console.reader(&headers) {
        Ok(who) => who,
        Err(to_sign_in) => return *to_sign_in,
    };
    let can = console.backend.permissions(&who, &namespace).await;
    console.page(
        StatusCode::OK,
        "delete.html",
        &headers,
        Some(&who),
        "",
        json!({"namespace": namespace, "name": name, "can": can}),
    )
}

async fn delete<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let pairs = form::parse_pairs(&body);
    let who = match console.writer(&headers, &pairs) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    match console.backend.delete(&who, &namespace, &name).await {
        Ok(()) => Redirect::to("/webhooks?done=deleted").into_response(),
        Err(e) => console.error(&headers, Some(&who), &e),
    }
}

async fn replay<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let pairs = form::parse_pairs(&body);
    let who = match console.writer(&headers, &pairs) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    let record = match console.dispatcher.engine().store().record(&id).await {
        Ok(Some(record)) => record,
        Ok(None) => return console.error(&headers, Some(&who), &ConsoleError::NotFound(id)),
        Err(e) => return console.error(&headers, Some(&who), &ConsoleError::Failed(e.to_string())),
    };
    // Replaying is Herald's own act: allowed to those who may change the webhook.
    let namespace = record.webhook.namespace.to_string();
    let name = record.webhook.name.to_string();
    if !console.backend.permissions(&who, &namespace).await.update {
        return console.error(
            &headers,
            Some(&who),
            &ConsoleError::Forbidden(format!("update webhooks in namespace {namespace}")),
        );
    }
    match console.dispatcher.engine().replay(&id).await {
        Ok(()) => Redirect::to(&format!(
            "/webhooks/{}/{}?done=replayed",
            path_segment(&namespace),
            path_segment(&name)
        ))
        .into_response(),
        Err(e @ ReplayError::NotFound(_)) => {
            console.error(&headers, Some(&who), &ConsoleError::NotFound(e.to_string()))
        }
        Err(e) => console.error(&headers, Some(&who), &ConsoleError::Failed(e.to_string())),
    }
}

async fn conditions<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let who = match console.reader(&headers) {
        Ok(who) => who,
        Err(to_sign_in) => return *to_sign_in,
    };
    let namespace = chosen_namespace(&query, &headers);
    let mut problem = None;
    let (conditions, webhooks) = match tokio::join!(
        console.backend.conditions(&who, namespace.as_deref()),
        console.backend.webhooks(&who, namespace.as_deref())
    ) {
        (Ok(c), Ok(w)) => (c, w),
        (Err(ConsoleError::Forbidden(message)), _) | (_, Err(ConsoleError::Forbidden(message)))
            if namespace.is_none() =>
        {
            problem = Some(message);
            (Vec::new(), Vec::new())
        }
        (Err(e), _) | (_, Err(e)) => return console.error(&headers, Some(&who), &e),
    };
    let views: Vec<serde_json::Value> = conditions
        .iter()
        .map(|c| {
            let ns = c.metadata.namespace.clone().unwrap_or_default();
            let name = c.metadata.name.clone().unwrap_or_default();
            let key = ObjectKey::new(ns.as_str(), name.as_str());
            let table = console.dispatcher.table();
            let used_by: Vec<String> = webhooks
                .iter()
                .filter(|w| w.metadata.namespace.as_deref() == Some(ns.as_str()))
                .filter(|w| {
                    w.spec.conditions.contains(&name)
                        || table
                            .conditions_of(&ObjectKey::new(
                                ns.as_str(),
                                w.metadata.name.clone().unwrap_or_default(),
                            ))
                            .iter()
                            .any(|c| c == &name || c == &key.to_string())
                })
                .filter_map(|w| w.metadata.name.clone())
                .collect();
            json!({
                "namespace": ns,
                "name": name,
                "requirements": c.spec.match_expressions.iter().map(|r| json!({
                    "key": r.key, "operator": format!("{:?}", r.operator), "values": r.values.join(", "),
                })).collect::<Vec<_>>(),
                "selector": c.spec.webhook_selector.as_ref().map(|s| serde_json::to_string(s).unwrap_or_default()),
                "used_by": used_by,
            })
        })
        .collect();
    console.page(
        StatusCode::OK,
        "conditions.html",
        &headers,
        Some(&who),
        "/conditions",
        json!({"conditions": views, "filter": {"namespace": namespace}, "problem": problem}),
    )
}

/// Recent alerts (from records that kept their content), as JSON arrays to paste.
async fn recent_alerts(dispatcher: &Dispatcher) -> Vec<serde_json::Value> {
    let records = dispatcher
        .engine()
        .store()
        .records(&RecordFilter {
            webhook: None,
            outcome: None,
            limit: 200,
        })
        .await
        .unwrap_or_default();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for alert in records
        .iter()
        .filter(|r| !r.test)
        .flat_map(|r| r.delivery.iter().flat_map(|d| d.alerts.iter()))
    {
        let labels: BTreeMap<&str, &str> = alert.labels.iter().collect();
        let text = serde_json::to_string(&labels).unwrap_or_default();
        if seen.insert(text.clone()) && out.len() < 20 {
            out.push(json!({
                "label": labels.get("alertname").copied().unwrap_or("alert"),
                "payload": serde_json::to_string_pretty(&json!([{"labels": labels}])).unwrap_or_default(),
            }));
        }
    }
    out
}

async fn routing<B: Backend>(State(console): State<Shared<B>>, headers: HeaderMap) -> Response {
    let who = match console.reader(&headers) {
        Ok(who) => who,
        Err(to_sign_in) => return *to_sign_in,
    };
    let recent = recent_alerts(&console.dispatcher).await;
    console.page(
        StatusCode::OK,
        "routing.html",
        &headers,
        Some(&who),
        "/routing",
        json!({"payload": "", "recent": recent}),
    )
}

async fn routing_preview<B: Backend>(
    State(console): State<Shared<B>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let pairs = form::parse_pairs(&body);
    let who = match console.writer(&headers, &pairs) {
        Ok(who) => who,
        Err(refused) => return *refused,
    };
    let payload = form::field(&pairs, "payload").to_string();
    let recent = recent_alerts(&console.dispatcher).await;
    // Only the webhooks this user may list are shown.
    let mut listed = console.backend.webhooks(&who, None).await;
    if matches!(listed, Err(ConsoleError::Forbidden(_)))
        && let Some(namespace) = chosen_namespace(&BTreeMap::new(), &headers)
    {
        listed = console.backend.webhooks(&who, Some(&namespace)).await;
    }
    let visible: BTreeSet<String> = match listed {
        Ok(webhooks) => webhooks
            .iter()
            .map(|w| {
                format!(
                    "{}/{}",
                    w.metadata.namespace.clone().unwrap_or_default(),
                    w.metadata.name.clone().unwrap_or_default()
                )
            })
            .collect(),
        Err(e) => return console.error(&headers, Some(&who), &e),
    };
    let (alerts, problem) = match preview(&console.dispatcher, payload.as_bytes(), &visible) {
        Ok(alerts) => (alerts, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    console.page(
        StatusCode::OK,
        "routing.html",
        &headers,
        Some(&who),
        "/routing",
        json!({"payload": payload, "recent": recent, "alerts": alerts, "problem": problem}),
    )
}

/// What `herald route` prints for a payload: per alert, who gets it and why not the others.
fn preview(
    dispatcher: &Dispatcher,
    payload: &[u8],
    visible: &BTreeSet<String>,
) -> Result<Vec<serde_json::Value>, String> {
    let mut batch = crate::alert::parse_any(payload, k8s_openapi::jiff::Timestamp::now())
        .map_err(|e| e.to_string())?;
    let refused = batch
        .admit(&crate::alert::PayloadLimits::default(), "")
        .map_err(|e| e.to_string())?;
    let table = dispatcher.table();
    let mut out: Vec<serde_json::Value> = refused
        .iter()
        .map(|r| json!({"refused": r.to_string()}))
        .collect();
    for alert in &batch.alerts {
        let labels: Vec<String> = alert
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let verdicts: Vec<serde_json::Value> = table
            .explain(Subject::alert(alert))
            .into_iter()
            .filter(|v| visible.contains(&v.webhook.to_string()))
            .map(|v| match v.outcome {
                Ok(()) => json!({"webhook": v.webhook.to_string(), "reached": true}),
                Err(why) => json!({"webhook": v.webhook.to_string(), "reached": false, "why": why.to_string()}),
            })
            .collect();
        out.push(json!({"status": alert.status.as_str(), "labels": labels.join(", "), "verdicts": verdicts}));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses() {
        let env = templates();
        for (name, _) in TEMPLATES {
            env.get_template(name)
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }

    #[test]
    fn values_are_escaped_in_pages() {
        let env = templates();
        let html = env
            .get_template("error.html")
            .and_then(|t| {
                t.render(json!({
                    "t": Lang::En.words(), "lang": "en", "code": 400,
                    "message": "<script>alert(1)</script>\"><img onerror=x>",
                }))
            })
            .expect("render");
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img onerror"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
    }

    #[test]
    fn only_local_paths_are_followed() {
        assert_eq!(local_path(Some("/webhooks?x=1")), "/webhooks?x=1");
        assert_eq!(local_path(Some("//evil.example/")), "/webhooks");
        assert_eq!(local_path(Some("https://evil.example/")), "/webhooks");
        assert_eq!(local_path(None), "/webhooks");
    }
}
