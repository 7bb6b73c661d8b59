//! The custom resources Herald serves: `Webhook` and `NotificationCondition` (group `herald.dev`).
//!
//! These types are the single source of the CRD schemas in `crds/` (see `herald crdgen`),
//! including defaults and the CEL rules that the API server enforces.

mod condition;
mod webhook;

pub use condition::{
    LabelOperator, LabelRequirement, NotificationCondition, NotificationConditionSpec,
    NotificationConditionStatus,
};
pub use webhook::{
    AuthSpec, AuthType, BodyFormat, DeliveryOutcome, DeliveryResult, Language, RESERVED_HEADERS,
    SecretKeyRef, SecretRef, SigningSpec, TEST_ANNOTATION, TestResult, TlsSpec, Webhook,
    WebhookSpec, WebhookStatus, WebhookType, is_reserved_header,
};

use kube::CustomResourceExt;

/// The API group of every Herald resource.
pub const GROUP: &str = "herald.dev";

/// Every CRD Herald owns, in the order `herald crdgen` prints them.
pub fn all()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![Webhook::crd(), NotificationCondition::crd()]
}

/// The YAML that `herald crdgen` prints and `crds/` holds: every CRD as one multi-document stream.
pub fn render_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::new();
    for crd in all() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
