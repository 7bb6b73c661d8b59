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
    AuthSpec, AuthType, BatchingSpec, BodyFormat, ChatSpec, DeliveryOutcome, DeliveryResult,
    Language, PaceSpec, RESERVED_HEADERS, SecretKeyRef, SecretRef, SigningSpec, TEST_ANNOTATION,
    TestResult, TlsSpec, Webhook, WebhookSpec, WebhookStatus, WebhookType, is_reserved_header,
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

fn compiled_schema<T: CustomResourceExt>() -> kube::core::cel::CompiledSchema {
    let schema = T::crd()
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or_default();
    kube::core::cel::compile_schema(&schema)
}

thread_local! {
    static WEBHOOK_SCHEMA: kube::core::cel::CompiledSchema = compiled_schema::<Webhook>();
    static CONDITION_SCHEMA: kube::core::cel::CompiledSchema = compiled_schema::<NotificationCondition>();
}

fn validate_with(
    schema: &'static std::thread::LocalKey<kube::core::cel::CompiledSchema>,
    object: &impl serde::Serialize,
) -> Result<(), kube::core::cel::ValidationErrors> {
    let value = serde_json::to_value(object).unwrap_or_default();
    schema.with(|compiled| kube::core::cel::validate_compiled(compiled, &value, None))
}

/// Checks a Webhook against its CRD's CEL rules offline, as the API server would. The rules are
/// compiled once per thread (the derived `validate_cel` rebuilds the whole CRD on every call).
pub fn validate_webhook(webhook: &Webhook) -> Result<(), kube::core::cel::ValidationErrors> {
    validate_with(&WEBHOOK_SCHEMA, webhook)
}

/// Checks a NotificationCondition against its CRD's CEL rules offline, as the API server would.
pub fn validate_condition(
    condition: &NotificationCondition,
) -> Result<(), kube::core::cel::ValidationErrors> {
    validate_with(&CONDITION_SCHEMA, condition)
}
