//! The `Webhook` resource: where and how Herald delivers notifications.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Annotation whose every new value asks Herald to send one test message.
pub const TEST_ANNOTATION: &str = "herald.dev/send-test";

/// Header names that Herald sets itself and that neither `headers` nor `headersSecretRef` may set.
/// Any header starting with `webhook-` is reserved as well (Standard Webhooks signing).
pub const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "content-type",
    "user-agent",
    "idempotency-key",
    "host",
    "herald-delivery",
];

/// Whether a header name is one Herald reserves for itself (case-insensitive).
pub fn is_reserved_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("webhook-")
}

/// A destination for notifications: an HTTP(S) endpoint plus how to authenticate, which
/// alerts or events it wants, and how to render them.
// Each printcolumn(...) repeats the same keys, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "herald.dev",
    version = "v1alpha1",
    kind = "Webhook",
    namespaced,
    status = "WebhookStatus",
    shortname = "wh",
    category = "herald",
    cel,
    doc = "A destination for Herald notifications: an HTTP(S) endpoint, its credentials and filters.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.url"),
    printcolumn(name = "Enabled", type_ = "boolean", json_path = ".spec.enabled"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Last delivery",
        type_ = "string",
        json_path = ".status.lastDelivery.outcome"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// What this webhook receives: Alertmanager alerts (`Alarms`) or Kubernetes Events (`Events`).
    #[serde(default, rename = "type")]
    pub kind: WebhookType,

    /// The endpoint, an absolute http or https URL.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''").message("url must be an absolute http or https URL"))]
    pub url: String,

    /// Language of the rendered title and message.
    #[serde(default)]
    pub language: Language,

    /// Shape of the request body: Herald's own JSON, Alertmanager's webhook JSON, or a chat
    /// tool's incoming-webhook JSON.
    #[serde(default)]
    pub format: BodyFormat,

    /// A custom body: a MiniJinja template whose context is the Herald notification
    /// (`title`, `message`, `alerts`, `status`, ...). Overrides `format`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub template: Option<String>,

    /// A disabled webhook receives nothing, test messages included.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Alarms: `alertname` values; Events: Event reasons. Empty means every type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 253)))]
    pub event_types: Vec<String>,

    /// How Herald authenticates to the endpoint.
    #[serde(default)]
    pub auth: AuthSpec,

    /// TLS settings for https endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// Extra request headers. Reserved names (Authorization, Content-Type, User-Agent,
    /// Idempotency-Key, Host, webhook-*) are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64), inner(length(max = 4096)))]
    #[x_kube(validation = Rule::new("self.all(k, size(k) <= 256 && !(k.lowerAscii() in ['authorization', 'content-type', 'user-agent', 'idempotency-key', 'host', 'herald-delivery']) && !k.lowerAscii().startsWith('webhook-'))").message("headers may not set Authorization, Content-Type, User-Agent, Idempotency-Key, Host, Herald-Delivery or any webhook-* header, and names are at most 256 characters"))]
    pub headers: BTreeMap<String, String>,

    /// A Secret in this namespace whose every key is sent as a header (API keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_secret_ref: Option<SecretRef>,

    /// Sign every request the Standard Webhooks way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing: Option<SigningSpec>,

    /// An HTTP(S) proxy for this webhook's requests.
    #[serde(default, rename = "proxyURL", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() in ['http', 'https']").message("proxyURL must be an http or https URL"))]
    pub proxy_url: Option<String>,

    /// A Secret in this namespace with the proxy's `username` and `password` (Basic
    /// authentication to the proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_secret_ref: Option<SecretRef>,

    /// NotificationCondition names in this namespace; every one must hold for an alert to be sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 253)))]
    pub conditions: Vec<String>,

    /// Also deliver resolved alerts.
    #[serde(default = "default_true")]
    pub send_resolved: bool,

    /// Timeout of each request, in seconds.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 1, max = 300))]
    pub timeout_seconds: u32,
}

fn default_true() -> bool {
    true
}

fn default_timeout_seconds() -> u32 {
    10
}

/// What a webhook receives.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WebhookType {
    /// Alertmanager alerts.
    #[default]
    Alarms,
    /// Kubernetes Events.
    Events,
}

/// Language of rendered titles and messages.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Language {
    /// English.
    #[default]
    #[serde(rename = "en")]
    En,
    /// Simplified Chinese.
    #[serde(rename = "zh-CN")]
    ZhCn,
}

impl Language {
    /// The language tag as written in the resource.
    pub fn as_str(self) -> &'static str {
        match self {
            Language::En => "en",
            Language::ZhCn => "zh-CN",
        }
    }
}

/// Shapes of the request body.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum BodyFormat {
    /// Herald's JSON (see the README).
    #[default]
    Herald,
    /// Alertmanager's `webhook_configs` JSON (version 4), for existing consumers.
    Alertmanager,
    /// Slack incoming webhook (`text` and `blocks`).
    Slack,
    /// DingTalk custom robot (`msgtype: markdown`).
    Dingtalk,
    /// Feishu / Lark custom bot (`msg_type: text`).
    Feishu,
    /// WeCom (WeChat Work) group robot (`msgtype: markdown`).
    Wecom,
}

/// How Herald authenticates to a webhook endpoint.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type == 'None' || has(self.secretRef)").message("auth.secretRef is required for Bearer and Basic auth").field_path(".secretRef").reason(Reason::FieldValueRequired))]
pub struct AuthSpec {
    /// None, Bearer (Secret key `token`) or Basic (Secret keys `username` and `password`).
    #[serde(default, rename = "type")]
    pub kind: AuthType,
    /// The Secret, in the Webhook's namespace, holding the credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
}

/// Authentication schemes.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthType {
    /// No `Authorization` header.
    #[default]
    None,
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// `Authorization: Basic <base64 username:password>`.
    Basic,
}

/// A reference to a Secret in the referring resource's namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A reference to one key of a Secret in the referring resource's namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// TLS settings of a webhook.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Skip certificate verification (for self-signed endpoints).
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// An extra CA bundle (PEM) to trust, from a Secret key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`) for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_secret_ref: Option<SecretRef>,
}

/// Standard Webhooks signing.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SigningSpec {
    /// The Secret key holding one or more `whsec_` secrets, separated by spaces.
    pub secret_ref: SecretKeyRef,
}

/// What Herald observed about a webhook.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookStatus {
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` tells whether the webhook can deliver, and why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The outcome of the most recent delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivery: Option<DeliveryResult>,
    /// The outcome of the most recent test message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_test: Option<TestResult>,
}

/// Final outcome of one delivery or test.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The endpoint answered 2xx.
    Succeeded,
    /// Retries were exhausted or the endpoint refused it for good.
    Failed,
}

/// The outcome of a delivery, as shown in status.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryResult {
    /// When the delivery ended.
    pub time: Time,
    /// Succeeded or Failed.
    pub outcome: DeliveryOutcome,
    /// The last HTTP status, when the endpoint answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// A human readable summary.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The outcome of a test message, as shown in status.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TestResult {
    /// The value of the `herald.dev/send-test` annotation that asked for this test.
    pub token: String,
    /// When the test ended.
    pub time: Time,
    /// Succeeded or Failed.
    pub outcome: DeliveryOutcome,
    /// The HTTP status, when the endpoint answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// A human readable summary.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}
