//! The `NotificationCondition` resource: label rules that an alert or event must meet.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A named set of label requirements that Webhooks refer to (by name, or by `webhookSelector`).
// Each printcolumn(...) repeats the same keys, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "herald.dev",
    version = "v1alpha1",
    kind = "NotificationCondition",
    namespaced,
    status = "NotificationConditionStatus",
    shortname = "nc",
    category = "herald",
    cel,
    doc = "Label conditions that an alert or event must meet to reach the Webhooks that use them.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Used by",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NotificationConditionSpec {
    /// Requirements that must all hold.
    #[schemars(length(min = 1, max = 32))]
    pub match_expressions: Vec<LabelRequirement>,
    /// The condition also applies to every Webhook in this namespace that this selector matches,
    /// as if each listed it in `spec.conditions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_selector: Option<LabelSelector>,
}

/// One requirement on one label.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("(self.operator == 'In' || self.operator == 'NotIn') ? (has(self.values) && size(self.values) > 0) : (!has(self.values) || size(self.values) == 0)").message("In and NotIn need at least one value; Exists and DoesNotExist take none").field_path(".values"))]
pub struct LabelRequirement {
    /// The label: alertname, severity, namespace, node, pod or any custom label.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    /// How the label is tested.
    pub operator: LabelOperator,
    /// The values for In and NotIn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 1024)))]
    pub values: Vec<String>,
}

/// Label operators, as in Kubernetes label selectors.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelOperator {
    /// The label is present and its value is one of `values`.
    In,
    /// The label is absent or its value is none of `values`.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// What Herald observed about a condition: `Ready` (with the Webhooks that use it in its
/// message) for the generation it applied.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NotificationConditionStatus {
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
