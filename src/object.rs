//! Which object a thing belongs to, and whether a webhook can deliver: the identity and
//! readiness types routing, delivery, the store, metrics and status writers all share.

use std::fmt;
use std::sync::Arc;

/// Identifies a namespaced resource: `namespace/name`. The parts are shared (`Arc<str>`) so
/// that the copies each delivery takes (delivery, report, record, store index) cost no
/// allocation; they hash, compare and serialize as the strings do.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ObjectKey {
    /// The namespace.
    pub namespace: Arc<str>,
    /// The name.
    pub name: Arc<str>,
}

impl ObjectKey {
    /// Builds a key from its parts (`&str`, `String` or an `Arc<str>` to share).
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl std::str::FromStr for ObjectKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok(ObjectKey::new(ns, name)),
            _ => Err(format!("expected NAMESPACE/NAME, got {s:?}")),
        }
    }
}

/// Why a webhook cannot deliver: the `reason` of its `Ready=False` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum NotReadyReason {
    /// `spec.enabled` is false.
    Disabled,
    /// A referenced Secret does not exist.
    SecretNotFound,
    /// A referenced Secret lacks a required key.
    SecretKeyMissing,
    /// A referenced Secret could not be read (the read is retried).
    SecretUnreadable,
    /// A NotificationCondition named in `spec.conditions` does not exist.
    ConditionNotFound,
    /// The CA bundle does not parse.
    #[serde(rename = "InvalidCA")]
    InvalidCa,
    /// The client certificate or key does not parse or do not match.
    InvalidClientCertificate,
    /// A signing secret is not a valid `whsec_` secret.
    InvalidSigningSecret,
    /// A header from `headersSecretRef` is reserved or not a valid header.
    InvalidHeader,
    /// A referenced Secret may not be used (a ServiceAccount token, or no consent mark).
    SecretRefused,
    /// `spec.template` does not compile.
    InvalidTemplate,
    /// The URL or proxy points at a link-local or cloud metadata address.
    ForbiddenAddress,
    /// The spec fails validation (for sources that do not validate on admission).
    InvalidSpec,
}

impl NotReadyReason {
    /// The reason as written in the condition.
    pub fn as_str(self) -> &'static str {
        match self {
            NotReadyReason::Disabled => "Disabled",
            NotReadyReason::SecretNotFound => "SecretNotFound",
            NotReadyReason::SecretKeyMissing => "SecretKeyMissing",
            NotReadyReason::SecretUnreadable => "SecretUnreadable",
            NotReadyReason::ConditionNotFound => "ConditionNotFound",
            NotReadyReason::InvalidCa => "InvalidCA",
            NotReadyReason::InvalidClientCertificate => "InvalidClientCertificate",
            NotReadyReason::InvalidSigningSecret => "InvalidSigningSecret",
            NotReadyReason::InvalidHeader => "InvalidHeader",
            NotReadyReason::SecretRefused => "SecretRefused",
            NotReadyReason::InvalidTemplate => "InvalidTemplate",
            NotReadyReason::ForbiddenAddress => "ForbiddenAddress",
            NotReadyReason::InvalidSpec => "InvalidSpec",
        }
    }
}

impl fmt::Display for NotReadyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A webhook that cannot deliver, and a message for humans (never holding secret material).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NotReady {
    /// Machine-readable reason.
    pub reason: NotReadyReason,
    /// Human-readable explanation.
    pub message: String,
}

impl NotReady {
    /// Builds a `NotReady` from a reason and message.
    pub fn new(reason: NotReadyReason, message: impl Into<String>) -> Self {
        NotReady {
            reason,
            message: message.into(),
        }
    }
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}
