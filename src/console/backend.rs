//! What the console reads and writes, behind one trait with two implementations: the cluster
//! (as the signed-in user) and the `herald run` config folder.

use std::collections::BTreeMap;
use std::future::Future;

use crate::crd::{NotificationCondition, Webhook};
use crate::secret::SecretData;

use super::auth::Identity;
use super::form::FieldErrors;

/// Why the console could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The token was refused (401).
    #[error("the token was refused: {0}")]
    Unauthorized(String),
    /// RBAC (or the console token) does not allow it (403), with the API server's message.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// No such object.
    #[error("not found: {0}")]
    NotFound(String),
    /// The object was refused, with a message per form field.
    #[error("invalid: {0:?}")]
    Invalid(FieldErrors),
    /// The API server or the folder failed.
    #[error("{0}")]
    Failed(String),
}

impl ConsoleError {
    /// The HTTP status a page shows this error with.
    pub fn status(&self) -> http::StatusCode {
        match self {
            ConsoleError::Unauthorized(_) => http::StatusCode::UNAUTHORIZED,
            ConsoleError::Forbidden(_) => http::StatusCode::FORBIDDEN,
            ConsoleError::NotFound(_) => http::StatusCode::NOT_FOUND,
            ConsoleError::Invalid(_) => http::StatusCode::UNPROCESSABLE_ENTITY,
            ConsoleError::Failed(_) => http::StatusCode::BAD_GATEWAY,
        }
    }
}

/// What the signed-in user may do in one namespace.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Permissions {
    /// Create webhooks.
    pub create: bool,
    /// Modify, enable, disable and test webhooks; replay their deliveries.
    pub update: bool,
    /// Delete webhooks.
    pub delete: bool,
}

impl Permissions {
    /// Everything (the config folder, whose token holder owns it).
    pub fn all() -> Self {
        Permissions {
            create: true,
            update: true,
            delete: true,
        }
    }
}

/// A webhook to write, with what goes along with it.
#[derive(Clone, Debug)]
pub struct Save {
    /// The webhook (its `spec.auth.secretRef` already names the Secret below when there is one).
    pub webhook: Webhook,
    /// Credentials typed into the form, for the Secret the webhook owns (None: keep what is stored).
    pub credentials: Option<BTreeMap<String, String>>,
    /// The condition of the form's rows (None: the webhook's console-made condition goes away).
    pub condition: Option<NotificationCondition>,
    /// A new webhook (fails if one exists) rather than a change.
    pub create: bool,
}

/// The outcome of asking for a test message of a saved webhook.
#[derive(Clone, Debug)]
pub enum TestRequested {
    /// Asked for (the controller sends it and writes `status.lastTest`).
    Requested,
    /// Sent now: the outcome.
    Sent(super::TestView),
}

/// One Kubernetes Event about a webhook.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EventRow {
    /// When it was last seen.
    pub time: String,
    /// Normal or Warning.
    pub kind: String,
    /// Its reason.
    pub reason: String,
    /// Its message.
    pub message: String,
    /// How many times it happened.
    pub count: i32,
}

/// Where the console's webhooks live. Every call names the user it acts for.
pub trait Backend: Clone + Send + Sync + 'static {
    /// Whether an identity may use the console at all, before any call (the API server checks
    /// a Kubernetes token on every call itself).
    fn admits(&self, who: &Identity) -> bool;
    /// Checks a token at sign-in.
    fn sign_in(&self, token: &str) -> impl Future<Output = Result<(), ConsoleError>> + Send;
    /// What `who` may do in `namespace`.
    fn permissions(
        &self,
        who: &Identity,
        namespace: &str,
    ) -> impl Future<Output = Permissions> + Send;
    /// Webhooks, of one namespace or all.
    fn webhooks(
        &self,
        who: &Identity,
        namespace: Option<&str>,
    ) -> impl Future<Output = Result<Vec<Webhook>, ConsoleError>> + Send;
    /// One webhook.
    fn webhook(
        &self,
        who: &Identity,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<Webhook>, ConsoleError>> + Send;
    /// Conditions, of one namespace or all.
    fn conditions(
        &self,
        who: &Identity,
        namespace: Option<&str>,
    ) -> impl Future<Output = Result<Vec<NotificationCondition>, ConsoleError>> + Send;
    /// Creates or changes a webhook with its Secret and condition.
    fn save(
        &self,
        who: &Identity,
        save: Save,
    ) -> impl Future<Output = Result<(), ConsoleError>> + Send;
    /// Turns a webhook on or off.
    fn set_enabled(
        &self,
        who: &Identity,
        namespace: &str,
        name: &str,
        enabled: bool,
    ) -> impl Future<Output = Result<(), ConsoleError>> + Send;
    /// Deletes a webhook (and what it owns).
    fn delete(
        &self,
        who: &Identity,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), ConsoleError>> + Send;
    /// Asks for a test message to a saved webhook.
    fn send_test(
        &self,
        who: &Identity,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<TestRequested, ConsoleError>> + Send;
    /// A Secret's values, to send a test from a form whose credentials were left as stored.
    fn secret(
        &self,
        who: &Identity,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<SecretData>, ConsoleError>> + Send;
    /// The Events about a webhook, newest first.
    fn events(
        &self,
        who: &Identity,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Vec<EventRow>, ConsoleError>> + Send;
}
