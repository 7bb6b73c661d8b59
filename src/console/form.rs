//! The Add / Modify form: parsing what the browser posts, checking it, and turning it into the
//! Webhook, its credentials Secret and its NotificationCondition. Pure: nothing here talks to
//! the API server or the folder.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::json;

use crate::crd::{AuthType, LabelOperator, NotificationCondition, Webhook};

/// A field name and what is wrong with it (`_` for the form as a whole).
pub type FieldErrors = BTreeMap<String, String>;

/// One row of the notification conditions table.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ConditionRow {
    /// The label.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    /// Comma-separated values (In and NotIn).
    pub values: String,
}

/// The form's fields as typed. Credentials typed here are never rendered back into a page.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WebhookForm {
    /// The namespace (fixed on Modify).
    pub namespace: String,
    /// The name (fixed on Modify).
    pub name: String,
    /// `Alarms` or `Events`.
    pub kind: String,
    /// The endpoint.
    pub url: String,
    /// `en` or `zh-CN`.
    pub language: String,
    /// `None`, `Bearer` or `Basic`.
    pub auth: String,
    /// Basic auth user name, when typed.
    #[serde(skip)]
    pub username: String,
    /// Basic auth password or bearer token, when typed.
    #[serde(skip)]
    pub secret: String,
    /// Skip TLS verification.
    pub skip_tls: bool,
    /// Enabled.
    pub enabled: bool,
    /// Alertnames or Event reasons, one per line.
    pub event_types: String,
    /// Notification condition rows.
    pub rows: Vec<ConditionRow>,
    /// Conditions the webhook uses besides the one this form edits (kept as they are).
    pub other_conditions: Vec<String>,
}

/// Name of the Secret that holds the credentials typed into the console for a webhook.
pub fn secret_name(webhook: &str) -> String {
    format!("{webhook}-auth")
}

/// Name of the NotificationCondition that holds the condition rows of a webhook's form.
pub fn condition_name(webhook: &str) -> String {
    format!("{webhook}-conditions")
}

/// Whether a name is a valid Kubernetes object name (RFC 1123 subdomain, as the API server says).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric())
}

fn operator(text: &str) -> Option<LabelOperator> {
    match text {
        "In" => Some(LabelOperator::In),
        "NotIn" => Some(LabelOperator::NotIn),
        "Exists" => Some(LabelOperator::Exists),
        "DoesNotExist" => Some(LabelOperator::DoesNotExist),
        _ => None,
    }
}

fn operator_name(op: LabelOperator) -> &'static str {
    match op {
        LabelOperator::In => "In",
        LabelOperator::NotIn => "NotIn",
        LabelOperator::Exists => "Exists",
        LabelOperator::DoesNotExist => "DoesNotExist",
    }
}

/// What the browser posted, as pairs (a field may repeat).
pub fn parse_pairs(body: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The first value of a field.
pub fn field<'a>(pairs: &'a [(String, String)], name: &str) -> &'a str {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

fn all<'a>(pairs: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    pairs
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

impl WebhookForm {
    /// An empty form for a new webhook.
    pub fn new_webhook(namespace: &str) -> Self {
        WebhookForm {
            namespace: namespace.to_string(),
            kind: "Alarms".into(),
            language: "en".into(),
            auth: "None".into(),
            enabled: true,
            ..WebhookForm::default()
        }
    }

    /// The form for an existing webhook; `condition` is its console-made condition, if any.
    /// Stored credentials stay out of it.
    pub fn from_webhook(webhook: &Webhook, condition: Option<&NotificationCondition>) -> Self {
        let spec = &webhook.spec;
        let name = webhook.metadata.name.clone().unwrap_or_default();
        let own = condition_name(&name);
        WebhookForm {
            namespace: webhook.metadata.namespace.clone().unwrap_or_default(),
            kind: format!("{:?}", spec.kind),
            url: spec.url.clone(),
            language: spec.language.as_str().to_string(),
            auth: format!("{:?}", spec.auth.kind),
            username: String::new(),
            secret: String::new(),
            skip_tls: spec.tls.as_ref().is_some_and(|t| t.insecure_skip_verify),
            enabled: spec.enabled,
            event_types: spec.event_types.join("\n"),
            rows: condition
                .map(|c| {
                    c.spec
                        .match_expressions
                        .iter()
                        .map(|r| ConditionRow {
                            key: r.key.clone(),
                            operator: operator_name(r.operator).to_string(),
                            values: r.values.join(", "),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            other_conditions: spec
                .conditions
                .iter()
                .filter(|c| **c != own)
                .cloned()
                .collect(),
            name,
        }
    }

    /// The form as posted.
    pub fn from_pairs(pairs: &[(String, String)]) -> Self {
        let keys = all(pairs, "row_key");
        let ops = all(pairs, "row_operator");
        let values = all(pairs, "row_values");
        let rows = keys
            .iter()
            .enumerate()
            .map(|(i, key)| ConditionRow {
                key: key.trim().to_string(),
                operator: ops.get(i).copied().unwrap_or("In").to_string(),
                values: values.get(i).copied().unwrap_or("").trim().to_string(),
            })
            .filter(|row| !(row.key.is_empty() && row.values.is_empty()))
            .collect();
        WebhookForm {
            namespace: field(pairs, "namespace").trim().to_string(),
            name: field(pairs, "name").trim().to_string(),
            kind: field(pairs, "kind").to_string(),
            url: field(pairs, "url").trim().to_string(),
            language: field(pairs, "language").to_string(),
            auth: field(pairs, "auth").to_string(),
            username: field(pairs, "username").to_string(),
            secret: field(pairs, "secret").to_string(),
            skip_tls: !field(pairs, "skip_tls").is_empty(),
            enabled: !field(pairs, "enabled").is_empty(),
            event_types: {
                let mut types = field(pairs, "event_types").trim().to_string();
                for picked in all(pairs, "event_type_pick") {
                    if !types.lines().any(|l| l.trim() == picked) {
                        if !types.is_empty() {
                            types.push('\n');
                        }
                        types.push_str(picked);
                    }
                }
                types
            },
            rows,
            other_conditions: all(pairs, "other_condition")
                .into_iter()
                .map(str::to_string)
                .collect(),
        }
    }

    fn auth_type(&self) -> AuthType {
        match self.auth.as_str() {
            "Bearer" => AuthType::Bearer,
            "Basic" => AuthType::Basic,
            _ => AuthType::None,
        }
    }

    /// The credentials typed into the form, as Secret keys (None when nothing was typed).
    pub fn credentials(&self) -> Option<BTreeMap<String, String>> {
        match self.auth_type() {
            AuthType::None => None,
            AuthType::Bearer if !self.secret.is_empty() => {
                Some(BTreeMap::from([("token".to_string(), self.secret.clone())]))
            }
            AuthType::Basic if !self.secret.is_empty() => Some(BTreeMap::from([
                ("username".to_string(), self.username.clone()),
                ("password".to_string(), self.secret.clone()),
            ])),
            _ => None,
        }
    }

    /// Checks what can be checked without the API server. `existing` is the stored webhook on
    /// Modify (its credentials may be kept).
    pub fn check(&self, existing: Option<&Webhook>) -> FieldErrors {
        let mut errors = FieldErrors::new();
        if !valid_name(&self.namespace) {
            errors.insert("namespace".into(), "a valid namespace is required".into());
        }
        if !valid_name(&self.name) {
            errors.insert(
                "name".into(),
                "a name of lower case letters, digits, '-' and '.' is required".into(),
            );
        }
        match url::Url::parse(&self.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {}
            _ => {
                errors.insert(
                    "url".into(),
                    "an absolute http:// or https:// URL is required".into(),
                );
            }
        }
        let kept = existing.is_some_and(|w| {
            w.spec.auth.kind == self.auth_type() && w.spec.auth.secret_ref.is_some()
        });
        match self.auth_type() {
            AuthType::Bearer if self.secret.is_empty() && !kept => {
                errors.insert("secret".into(), "a token is required".into());
            }
            AuthType::Basic if self.secret.is_empty() && !kept => {
                errors.insert("secret".into(), "a password is required".into());
            }
            AuthType::Basic if !self.secret.is_empty() && self.username.is_empty() => {
                errors.insert("username".into(), "a user name is required".into());
            }
            _ => {}
        }
        for (i, row) in self.rows.iter().enumerate() {
            if row.key.is_empty() {
                errors.insert(format!("row.{i}.key"), "a label is required".into());
            }
            match operator(&row.operator) {
                None => {
                    errors.insert(format!("row.{i}.operator"), "unknown operator".into());
                }
                Some(LabelOperator::In | LabelOperator::NotIn) if row.values.is_empty() => {
                    errors.insert(format!("row.{i}.values"), "at least one value".into());
                }
                _ => {}
            }
        }
        errors
    }

    /// The Webhook this form describes, starting from `existing` (whose other settings stay).
    /// `secret_ref` is the Secret to reference for credentials.
    pub fn webhook(
        &self,
        existing: Option<&Webhook>,
        secret_ref: Option<String>,
    ) -> Result<Webhook, String> {
        let mut spec = match existing {
            Some(w) => serde_json::to_value(&w.spec).map_err(|e| e.to_string())?,
            None => json!({}),
        };
        let event_types: Vec<String> = self
            .event_types
            .split(['\n', ','])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let mut conditions = self.other_conditions.clone();
        if !self.rows.is_empty() {
            conditions.push(condition_name(&self.name));
        }
        spec["type"] = json!(self.kind);
        spec["url"] = json!(self.url);
        spec["language"] = json!(self.language);
        spec["enabled"] = json!(self.enabled);
        spec["eventTypes"] = json!(event_types);
        spec["conditions"] = json!(conditions);
        spec["auth"] = match (self.auth_type(), secret_ref) {
            (AuthType::None, _) => json!({"type": "None"}),
            (kind, Some(name)) => json!({"type": format!("{kind:?}"), "secretRef": {"name": name}}),
            (kind, None) => json!({"type": format!("{kind:?}")}),
        };
        let mut tls = spec.get("tls").cloned().unwrap_or_else(|| json!({}));
        tls["insecureSkipVerify"] = json!(self.skip_tls);
        spec["tls"] = tls;
        let mut metadata = match existing {
            Some(w) => serde_json::to_value(&w.metadata).map_err(|e| e.to_string())?,
            None => json!({}),
        };
        if let Some(meta) = metadata.as_object_mut() {
            meta.remove("managedFields");
        }
        metadata["name"] = json!(self.name);
        metadata["namespace"] = json!(self.namespace);
        let mut webhook: Webhook = serde_json::from_value(json!({
            "apiVersion": "herald.dev/v1alpha1",
            "kind": "Webhook",
            "metadata": metadata,
            "spec": spec,
        }))
        .map_err(|e| e.to_string())?;
        webhook.status = None;
        Ok(webhook)
    }

    /// The NotificationCondition of the rows, when there are any.
    pub fn condition(&self) -> Result<Option<NotificationCondition>, String> {
        if self.rows.is_empty() {
            return Ok(None);
        }
        let expressions: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|row| {
                let values: Vec<&str> = match operator(&row.operator) {
                    Some(LabelOperator::In | LabelOperator::NotIn) => row
                        .values
                        .split(',')
                        .map(str::trim)
                        .filter(|v| !v.is_empty())
                        .collect(),
                    _ => Vec::new(),
                };
                json!({"key": row.key, "operator": row.operator, "values": values})
            })
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "herald.dev/v1alpha1",
            "kind": "NotificationCondition",
            "metadata": {"name": condition_name(&self.name), "namespace": self.namespace},
            "spec": {"matchExpressions": expressions},
        }))
        .map(Some)
        .map_err(|e| e.to_string())
    }
}

/// The form field an API server or CEL field path points at (`spec.url` → `url`).
pub fn form_field(path: &str) -> String {
    let path = path.trim_start_matches('.');
    let path = path.strip_prefix("spec.").unwrap_or(path);
    if let Some(rest) = path.strip_prefix("matchExpressions[")
        && let Some((index, tail)) = rest.split_once(']')
    {
        let part = tail.trim_start_matches('.');
        let part = if part.starts_with("values") {
            "values"
        } else if part.starts_with("operator") {
            "operator"
        } else {
            "key"
        };
        return format!("row.{index}.{part}");
    }
    match path {
        "metadata.name" | "name" => "name",
        "metadata.namespace" => "namespace",
        "url" => "url",
        "eventTypes" => "event_types",
        "language" => "language",
        "type" => "kind",
        p if p.starts_with("auth") => "auth",
        p if p.starts_with("eventTypes") => "event_types",
        p if p.starts_with("tls") => "skip_tls",
        _ => "_",
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_posted_form_becomes_a_webhook_its_secret_and_its_condition() {
        let form = WebhookForm::from_pairs(&pairs(&[
            ("namespace", "team-a"),
            ("name", "ops"),
            ("kind", "Alarms"),
            ("url", "https://hooks.example/x"),
            ("language", "zh-CN"),
            ("auth", "Bearer"),
            ("secret", "s3cret"),
            ("enabled", "on"),
            ("event_types", "KubePodCrashLooping\nNodeDown"),
            ("row_key", "severity"),
            ("row_operator", "In"),
            ("row_values", "critical, warning"),
            ("row_key", ""),
            ("row_operator", "In"),
            ("row_values", ""),
        ]));
        assert!(form.check(None).is_empty(), "{:?}", form.check(None));
        let webhook = form
            .webhook(None, Some(secret_name("ops")))
            .expect("webhook");
        assert_eq!(webhook.spec.url, "https://hooks.example/x");
        assert_eq!(
            webhook.spec.event_types,
            ["KubePodCrashLooping", "NodeDown"]
        );
        assert_eq!(webhook.spec.conditions, ["ops-conditions"]);
        assert_eq!(
            webhook
                .spec
                .auth
                .secret_ref
                .as_ref()
                .map(|s| s.name.as_str()),
            Some("ops-auth")
        );
        crate::crd::validate_webhook(&webhook).expect("valid");
        let condition = form.condition().expect("condition").expect("some");
        assert_eq!(condition.spec.match_expressions.len(), 1);
        assert_eq!(
            condition.spec.match_expressions[0].values,
            ["critical", "warning"]
        );
        assert_eq!(
            form.credentials().expect("typed")["token"],
            "s3cret".to_string()
        );
    }

    #[test]
    fn missing_fields_are_reported_next_to_their_field() {
        let form = WebhookForm::from_pairs(&pairs(&[
            ("namespace", "default"),
            ("name", "Bad Name"),
            ("url", "ftp://x"),
            ("auth", "Bearer"),
            ("row_key", ""),
            ("row_operator", "In"),
            ("row_values", "x"),
        ]));
        let errors = form.check(None);
        for field in ["name", "url", "secret", "row.0.key"] {
            assert!(errors.contains_key(field), "{field}: {errors:?}");
        }
    }

    #[test]
    fn a_modify_without_a_password_keeps_the_stored_secret() {
        let form = WebhookForm::from_pairs(&pairs(&[
            ("namespace", "default"),
            ("name", "ops"),
            ("kind", "Alarms"),
            ("url", "https://hooks.example/x"),
            ("language", "en"),
            ("auth", "Bearer"),
            ("secret", ""),
        ]));
        let existing = form
            .webhook(None, Some("custom-secret".into()))
            .expect("webhook");
        assert!(form.check(Some(&existing)).is_empty());
        assert!(form.credentials().is_none());
    }

    #[test]
    fn api_field_paths_point_at_form_fields() {
        assert_eq!(form_field("spec.url"), "url");
        assert_eq!(form_field(".url"), "url");
        assert_eq!(form_field("metadata.name"), "name");
        assert_eq!(
            form_field("spec.matchExpressions[2].values"),
            "row.2.values"
        );
        assert_eq!(form_field("spec.somethingElse"), "_");
    }
}
