//! Human text for notifications: titles and messages in English and Simplified Chinese, and
//! the JSON body a webhook receives.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use std::sync::Arc;

mod shared;

use crate::alert::{Alert, AlertStatus, CachedAlerts, GroupSource, LabelSet};
use crate::chat::Robot;
use crate::crd::{BodyFormat, Language, WebhookType};
use crate::object::ObjectKey;
use crate::outgoing::Delivery;
use crate::template::SandboxedTemplate;

pub use shared::{HeraldHead, RenderedBody};

/// The Herald body format's version.
const VERSION: &str = "1";

/// Names of the webhook inside the body.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct WebhookRef<'a> {
    /// Namespace of the Webhook resource.
    pub namespace: &'a str,
    /// Name of the Webhook resource.
    pub name: &'a str,
}

/// The JSON body of every Herald notification (`version` "1").
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification<'a> {
    /// Body format version.
    pub version: &'static str,
    /// Alarms or Events.
    #[serde(rename = "type")]
    pub kind: WebhookType,
    /// A test message (synthetic alert).
    pub test: bool,
    /// The webhook this was sent to.
    pub webhook: WebhookRef<'a>,
    /// Language of `title` and `message`.
    pub language: &'static str,
    /// "firing" when any alert fires, else "resolved".
    pub status: &'static str,
    /// One-line summary.
    pub title: Cow<'a, str>,
    /// Human-readable details.
    pub message: Cow<'a, str>,
    /// The alerts that matched this webhook.
    pub alerts: &'a [Arc<Alert>],
    /// Alertmanager's group labels.
    pub group_labels: &'a LabelSet,
    /// Labels every alert shares.
    pub common_labels: Common<'a>,
    /// Annotations every alert shares.
    pub common_annotations: Common<'a>,
    /// Alertmanager's URL.
    #[serde(rename = "externalURL")]
    pub external_url: &'a str,
    /// The rest of what Alertmanager said about the group (`format: alertmanager` passes it on).
    #[serde(skip)]
    pub source: &'a GroupSource,
}

/// Labels (or annotations) every alert of a notification shares. With one alert these are its
/// own, borrowed (and written from the JSON the alert keeps for all its deliveries); with
/// several, their intersection. Written as a JSON object either way.
#[derive(Clone, Debug, PartialEq)]
pub enum Common<'a> {
    /// The only alert's labels or annotations.
    Only {
        /// The alert.
        alert: &'a Alert,
        /// Its annotations rather than its labels.
        annotations: bool,
    },
    /// What several alerts (or none) share.
    Shared(BTreeMap<&'a str, &'a str>),
}

/// An alert's labels, or its annotations.
fn label_set(alert: &Alert, annotations: bool) -> &LabelSet {
    if annotations {
        &alert.annotations
    } else {
        &alert.labels
    }
}

impl<'a> Common<'a> {
    fn of(alerts: &'a [Arc<Alert>], annotations: bool) -> Self {
        if let [alert] = alerts {
            return Common::Only { alert, annotations };
        }
        Common::Shared(common(alerts.iter().map(|a| label_set(a, annotations))))
    }

    /// The shared names and values.
    pub fn to_map(&self) -> BTreeMap<&'a str, &'a str> {
        match self {
            Common::Only { alert, annotations } => label_set(alert, *annotations).iter().collect(),
            Common::Shared(map) => map.clone(),
        }
    }

    /// The JSON the only alert keeps for this set, if this is one alert's set.
    fn cached_json(&self) -> Option<&'a serde_json::value::RawValue> {
        match self {
            Common::Only {
                alert,
                annotations: false,
            } => alert.labels_json(),
            Common::Only {
                alert,
                annotations: true,
            } => alert.annotations_json(),
            Common::Shared(_) => None,
        }
    }
}

impl Serialize for Common<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Common::Only { alert, annotations } => {
                label_set(alert, *annotations).serialize(serializer)
            }
            Common::Shared(map) => map.serialize(serializer),
        }
    }
}

/// A common set written from the alert's shared JSON when there is one.
struct CommonJson<'c, 'a>(&'c Common<'a>);

impl Serialize for CommonJson<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.cached_json() {
            Some(json) => json.serialize(serializer),
            None => self.0.serialize(serializer),
        }
    }
}

/// What one delivery carries, before rendering.
#[derive(Clone, Copy, Debug)]
pub struct Content<'a> {
    /// The webhook.
    pub webhook: &'a ObjectKey,
    /// Alarms or Events.
    pub kind: WebhookType,
    /// Whether this is a test message.
    pub test: bool,
    /// The alerts.
    pub alerts: &'a [Arc<Alert>],
    /// Group labels from Alertmanager (the batch's own, shared by its deliveries).
    pub group_labels: &'a Arc<LabelSet>,
    /// Alertmanager's URL (the batch's own).
    pub external_url: &'a Arc<str>,
    /// The rest of what Alertmanager said about the batch's group.
    pub source: &'a GroupSource,
}

impl<'a> Content<'a> {
    /// What a delivery carries, for a webhook of `kind`.
    pub fn of(delivery: &'a Delivery, kind: WebhookType) -> Self {
        Content {
            webhook: &delivery.webhook,
            kind,
            test: delivery.test,
            alerts: &delivery.alerts,
            group_labels: &delivery.group_labels,
            external_url: &delivery.external_url,
            source: &delivery.source,
        }
    }
}

/// How a webhook's bodies are rendered: its format and language, its chat robot, its custom
/// template, and the start of its one-alert Herald bodies (see [`HeraldHead`]).
#[derive(Clone, Copy, Debug)]
pub struct BodyStyle<'a> {
    /// Body format.
    pub format: BodyFormat,
    /// Language of titles and messages.
    pub language: Language,
    /// A chat robot's keyword, mentions and signing secret.
    pub robot: &'a Robot,
    /// The custom template, which replaces the format.
    pub template: Option<&'a Arc<SandboxedTemplate>>,
    /// The start of the webhook's Herald bodies, for the one-alert fast path.
    pub herald_head: Option<&'a HeraldHead>,
}

/// The request body of a delivery: from the webhook's custom template (rendered in the template
/// pool, within the template's limits), else a one-alert Herald body from parts shared with the
/// alert's other deliveries (see [`HeraldHead`]), else the webhook's format (chat formats signed
/// at the current time).
pub async fn request_body(
    content: Content<'_>,
    style: &BodyStyle<'_>,
) -> Result<RenderedBody, RenderError> {
    if let Some(template) = style.template {
        let context = template_context(&notification(content, style.language));
        let body =
            crate::template::render(template.clone(), &content.webhook.namespace, context).await?;
        return Ok(RenderedBody::from(body));
    }
    if let Some(head) = style.herald_head
        && let Some(body) = shared::one_alert_herald_body(&content, style.language, head)
    {
        return Ok(body);
    }
    body_for_robot(
        &notification(content, style.language),
        style.format,
        None,
        style.robot,
        k8s_openapi::jiff::Timestamp::now().as_second(),
    )
    .map(RenderedBody::from)
}

/// Why a body could not be rendered (a custom template failing at run time).
#[derive(Debug, thiserror::Error)]
#[error("template: {0}")]
pub struct RenderError(String);

impl From<crate::template::TemplateError> for RenderError {
    fn from(e: crate::template::TemplateError) -> Self {
        RenderError(e.to_string())
    }
}

/// Compiles a custom body template under the default limits; errors name the line.
pub fn compile_template(source: &str) -> Result<SandboxedTemplate, String> {
    SandboxedTemplate::compile(source, crate::template::TemplateLimits::default())
        .map_err(|e| e.to_string())
}

/// What a custom template sees: the notification as a template value, owned (so that it can
/// be rendered on another thread).
pub fn template_context(notification: &Notification<'_>) -> minijinja::Value {
    minijinja::Value::from_serialize(notification)
}

/// The request body for a notification in a webhook's format, or from its template (rendered
/// here, within its step and output bounds; deliveries render templates in the pool instead,
/// see [`crate::template::render`]), for a robot without keyword, mentions or secret.
pub fn body(
    notification: &Notification<'_>,
    format: BodyFormat,
    template: Option<&SandboxedTemplate>,
) -> Result<Vec<u8>, RenderError> {
    body_for_robot(notification, format, template, &Robot::default(), 0)
}

/// The request body for a notification in a webhook's format, or from its template; chat
/// formats with the robot's keyword, mentions and (Feishu) signature made at `now` (seconds).
pub fn body_for_robot(
    notification: &Notification<'_>,
    format: BodyFormat,
    template: Option<&SandboxedTemplate>,
    robot: &Robot,
    now: i64,
) -> Result<Vec<u8>, RenderError> {
    if let Some(template) = template {
        return Ok(template.render_here(&template_context(notification))?);
    }
    let bytes = match format {
        BodyFormat::Herald => herald_body(notification),
        BodyFormat::Alertmanager => serde_json::to_vec(&AlertmanagerMessage::of(notification)),
        chat => {
            let language = match notification.language {
                "zh-CN" => Language::ZhCn,
                _ => Language::En,
            };
            let value = crate::chat::body(
                chat,
                &notification.title,
                &notification.message,
                language,
                robot,
                now,
            )
            .unwrap_or_default();
            serde_json::to_vec(&value)
        }
    };
    bytes.map_err(|e| RenderError(e.to_string()))
}

/// Alertmanager's webhook message (`notify/webhook.Message` with its `template.Data`), field
/// for field: what Alertmanager said about the group is passed on (its receiver, group key,
/// truncated alerts, notification reason and route labels); what depends on the alerts this
/// webhook gets (status, common labels and annotations) is Herald's own.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AlertmanagerMessage<'n, 'a> {
    version: &'static str,
    group_key: Cow<'n, str>,
    truncated_alerts: u64,
    status: &'static str,
    receiver: &'n str,
    group_labels: &'a LabelSet,
    common_labels: &'n Common<'a>,
    common_annotations: &'n Common<'a>,
    #[serde(rename = "externalURL")]
    external_url: &'a str,
    #[serde(
        rename = "notification_reason",
        skip_serializing_if = "Option::is_none"
    )]
    notification_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route_labels: Option<&'a LabelSet>,
    alerts: CachedAlerts<'a>,
}

impl<'n, 'a> AlertmanagerMessage<'n, 'a> {
    fn of(n: &'n Notification<'a>) -> Self {
        let source = n.source;
        AlertmanagerMessage {
            version: "4",
            group_key: if source.group_key.is_empty() {
                Cow::Owned(format!("{}/{}", n.webhook.namespace, n.webhook.name))
            } else {
                Cow::Borrowed(source.group_key.as_str())
            },
            truncated_alerts: source.truncated_alerts,
            status: n.status,
            receiver: if source.receiver.is_empty() {
                n.webhook.name
            } else {
                &source.receiver
            },
            group_labels: n.group_labels,
            common_labels: &n.common_labels,
            common_annotations: &n.common_annotations,
            external_url: n.external_url,
            notification_reason: source.notification_reason.as_deref(),
            route_labels: source.route_labels.as_ref(),
            alerts: CachedAlerts(n.alerts),
        }
    }
}

/// A notification as Herald's JSON body: the same as its derived `Serialize`, except that each
/// alert is copied from the JSON the alert wrote once for all its deliveries. (A one-alert
/// delivery outside tests does not come here: it sends its webhook's start and the end its
/// alert shares, see [`HeraldHead`].)
fn herald_body(n: &Notification<'_>) -> serde_json::Result<Vec<u8>> {
    let tail = serde_json::to_vec(&HeraldTail(n))?;
    let head = HeadFields {
        kind: n.kind,
        test: n.test,
        webhook: &n.webhook,
    };
    join_head_and_tail(&head, &tail)
}

/// Writes `{head` + `,`: the start of a body whose tail (`{...}` without its `{`) follows.
fn write_head(body: &mut Vec<u8>, head: &HeadFields<'_>) -> serde_json::Result<()> {
    serde_json::to_writer(&mut *body, head)?;
    body.pop();
    body.push(b',');
    Ok(())
}

/// `{head}` + `{tail}` → `{head,tail}`.
fn join_head_and_tail(head: &HeadFields<'_>, tail: &[u8]) -> serde_json::Result<Vec<u8>> {
    let mut body = Vec::with_capacity(128 + tail.len());
    write_head(&mut body, head)?;
    body.extend_from_slice(tail.get(1..).unwrap_or_default());
    Ok(body)
}

/// The start of a Herald body: what depends on the webhook and the delivery.
struct HeadFields<'a> {
    kind: WebhookType,
    test: bool,
    webhook: &'a WebhookRef<'a>,
}

impl Serialize for HeadFields<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut head = serializer.serialize_struct("Notification", 4)?;
        head.serialize_field("version", VERSION)?;
        head.serialize_field("type", &self.kind)?;
        head.serialize_field("test", &self.test)?;
        head.serialize_field("webhook", self.webhook)?;
        head.end()
    }
}

/// The rest of a Herald body: what depends on the alerts, the batch and the language.
struct HeraldTail<'n, 'a>(pub(super) &'n Notification<'a>);

impl Serialize for HeraldTail<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let n = self.0;
        let mut tail = serializer.serialize_struct("Notification", 9)?;
        tail.serialize_field("language", n.language)?;
        tail.serialize_field("status", n.status)?;
        tail.serialize_field("title", &n.title)?;
        tail.serialize_field("message", &n.message)?;
        tail.serialize_field("alerts", &CachedAlerts(n.alerts))?;
        tail.serialize_field("groupLabels", n.group_labels)?;
        tail.serialize_field("commonLabels", &CommonJson(&n.common_labels))?;
        tail.serialize_field("commonAnnotations", &CommonJson(&n.common_annotations))?;
        tail.serialize_field("externalURL", n.external_url)?;
        tail.end()
    }
}

/// Renders a notification in a language.
pub fn notification<'a>(content: Content<'a>, language: Language) -> Notification<'a> {
    let firing = content
        .alerts
        .iter()
        .filter(|a| a.status == AlertStatus::Firing)
        .count();
    let (title, message) = match content.alerts {
        _ if content.test => {
            let (title, message) = test_text(content.webhook, language);
            (Cow::Owned(title), Cow::Owned(message))
        }
        // One alert: its title and message block are written once per language and shared by
        // all its deliveries.
        [alert] => (
            shared::title(alert, firing, language),
            shared::message_block(alert, language),
        ),
        _ => (
            Cow::Owned(title(content.alerts, firing, language)),
            Cow::Owned(message(content.alerts, language)),
        ),
    };
    Notification {
        version: VERSION,
        kind: content.kind,
        test: content.test,
        webhook: WebhookRef {
            namespace: &content.webhook.namespace,
            name: &content.webhook.name,
        },
        language: language.as_str(),
        status: if firing > 0 || content.alerts.is_empty() {
            "firing"
        } else {
            "resolved"
        },
        title,
        message,
        alerts: content.alerts,
        group_labels: content.group_labels,
        common_labels: Common::of(content.alerts, false),
        common_annotations: Common::of(content.alerts, true),
        external_url: content.external_url,
        source: content.source,
    }
}

/// The labels every set shares, borrowed from the alerts.
fn common<'a>(mut sets: impl Iterator<Item = &'a LabelSet>) -> BTreeMap<&'a str, &'a str> {
    let Some(first) = sets.next() else {
        return BTreeMap::new();
    };
    let mut shared: BTreeMap<&str, &str> = first.iter().collect();
    for set in sets {
        shared.retain(|k, v| set.get(k) == Some(*v));
    }
    shared
}

fn subject_name(alert: &Alert) -> &str {
    ["alertname", "reason"]
        .iter()
        .find_map(|k| alert.labels.get(k))
        .unwrap_or("")
}

fn names(alerts: &[Arc<Alert>], language: Language) -> String {
    if let [alert] = alerts {
        return subject_name(alert).to_string();
    }
    let unique: BTreeSet<&str> = alerts
        .iter()
        .map(|alert| subject_name(alert))
        .filter(|n| !n.is_empty())
        .collect();
    let shown: Vec<&str> = unique.iter().take(3).copied().collect();
    let rest = unique.len().saturating_sub(shown.len());
    let joined = shown.join(", ");
    match (rest, language) {
        (0, _) => joined,
        (n, Language::En) => format!("{joined} and {n} more"),
        (n, Language::ZhCn) => format!("{joined} 等 {} 项", n + shown.len()),
    }
}

fn title(alerts: &[Arc<Alert>], firing: usize, language: Language) -> String {
    let resolved = alerts.len() - firing;
    let names = names(alerts, language);
    match language {
        Language::En => match (firing, resolved) {
            (f, 0) => format!("[FIRING:{f}] {names}"),
            (0, r) => format!("[RESOLVED:{r}] {names}"),
            (f, r) => format!("[FIRING:{f}, RESOLVED:{r}] {names}"),
        },
        Language::ZhCn => match (firing, resolved) {
            (f, 0) => format!("【告警中】{f} 条告警：{names}"),
            (0, r) => format!("【已恢复】{r} 条告警：{names}"),
            (f, r) => format!("【告警中 {f} 条，已恢复 {r} 条】{names}"),
        },
    }
}

fn severity_zh(severity: &str) -> &str {
    match severity {
        "critical" => "严重",
        "error" => "错误",
        "warning" => "警告",
        "info" => "提示",
        "none" => "无",
        other => other,
    }
}

/// Alerts shown in full in a message of many (a digest); the rest are counted.
pub const DIGEST_SHOWN: usize = 10;

/// How severe an alert is, for ordering a digest (most severe first, firing before resolved).
fn severity_rank(alert: &Alert) -> (u8, u8) {
    let firing = u8::from(alert.status != AlertStatus::Firing);
    let severity = match alert.labels.get("severity") {
        Some("critical") => 0,
        Some("error") => 1,
        Some("warning") => 2,
        Some("info") => 3,
        Some(_) => 4,
        None => 5,
    };
    (firing, severity)
}

fn message(alerts: &[Arc<Alert>], language: Language) -> String {
    if alerts.len() <= DIGEST_SHOWN {
        // Blocks separated by a blank line.
        let blocks: Vec<Cow<'_, str>> = alerts
            .iter()
            .map(|alert| shared::message_block(alert, language))
            .collect();
        return blocks.join("\n\n");
    }
    digest(alerts, language)
}

/// A message of many alerts: counts by status and severity, the most severe alerts in full,
/// and how many more there are.
fn digest(alerts: &[Arc<Alert>], language: Language) -> String {
    let mut ordered: Vec<&Arc<Alert>> = alerts.iter().collect();
    ordered.sort_by_key(|alert| severity_rank(alert));
    let mut by_severity: BTreeMap<(u8, &str), usize> = BTreeMap::new();
    for alert in &ordered {
        if alert.status == AlertStatus::Firing {
            let severity = alert.labels.get("severity").unwrap_or("none");
            *by_severity
                .entry((severity_rank(alert).1, severity))
                .or_default() += 1;
        }
    }
    let firing: usize = by_severity.values().sum();
    let resolved = alerts.len() - firing;
    let counts: Vec<String> = by_severity
        .iter()
        .map(|((_, severity), n)| match language {
            Language::En => format!("{n} {severity}"),
            Language::ZhCn => format!("{}{n} 条", severity_zh(severity)),
        })
        .collect();
    let mut out = match language {
        Language::En => format!(
            "{} alerts: {firing} firing ({}), {resolved} resolved",
            alerts.len(),
            counts.join(", ")
        ),
        Language::ZhCn => format!(
            "共 {} 条告警：告警中 {firing} 条（{}），已恢复 {resolved} 条",
            alerts.len(),
            counts.join("，")
        ),
    };
    for alert in ordered.iter().take(DIGEST_SHOWN) {
        out.push_str("\n\n");
        out.push_str(&shared::message_block(alert, language));
    }
    let rest = alerts.len().saturating_sub(DIGEST_SHOWN);
    out.push_str(&match language {
        Language::En => format!("\n\n… and {rest} more"),
        Language::ZhCn => format!("\n\n…… 另有 {rest} 条"),
    });
    out
}

/// One alert's part of a message: lines separated by a newline.
fn write_message_block(alert: &Alert, language: Language) -> String {
    let mut out = String::with_capacity(256);
    {
        let mut lines = Lines::new(&mut out);
        let name = subject_name(alert);
        let label = |k: &str| alert.labels.get(k);
        let note = ["summary", "description", "message"]
            .iter()
            .find_map(|k| alert.annotations.get(k));
        match language {
            Language::En => {
                let state = match alert.status {
                    AlertStatus::Firing => "is firing",
                    AlertStatus::Resolved => "is resolved",
                };
                lines.push(format_args!("{name} {state}"));
                if let Some(s) = label("severity") {
                    lines.push(format_args!("Severity: {s}"));
                }
                if let Some(ns) = label("namespace") {
                    lines.push(format_args!("Namespace: {ns}"));
                }
                for (k, title) in [("pod", "Pod"), ("node", "Node"), ("instance", "Instance")] {
                    if let Some(v) = label(k) {
                        lines.push(format_args!("{title}: {v}"));
                    }
                }
                if let Some(note) = note {
                    lines.push(format_args!("Summary: {note}"));
                }
                if !crate::alert::is_unset_time(&alert.starts_at) {
                    lines.push(format_args!("Started: {}", alert.starts_at));
                }
                if alert.status == AlertStatus::Resolved
                    && !crate::alert::is_unset_time(&alert.ends_at)
                {
                    lines.push(format_args!("Ended: {}", alert.ends_at));
                }
            }
            Language::ZhCn => {
                let state = match alert.status {
                    AlertStatus::Firing => "告警中",
                    AlertStatus::Resolved => "已恢复",
                };
                lines.push(format_args!("告警名称：{name}"));
                lines.push(format_args!("状态：{state}"));
                if let Some(s) = label("severity") {
                    lines.push(format_args!("级别：{}", severity_zh(s)));
                }
                if let Some(ns) = label("namespace") {
                    lines.push(format_args!("命名空间：{ns}"));
                }
                for (k, title) in [("pod", "容器组"), ("node", "节点"), ("instance", "实例")]
                {
                    if let Some(v) = label(k) {
                        lines.push(format_args!("{title}：{v}"));
                    }
                }
                if let Some(note) = note {
                    lines.push(format_args!("摘要：{note}"));
                }
                if !crate::alert::is_unset_time(&alert.starts_at) {
                    lines.push(format_args!("开始时间：{}", alert.starts_at));
                }
                if alert.status == AlertStatus::Resolved
                    && !crate::alert::is_unset_time(&alert.ends_at)
                {
                    lines.push(format_args!("结束时间：{}", alert.ends_at));
                }
            }
        }
    }
    out
}

/// Appends lines to a message block, newline-separated.
struct Lines<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> Lines<'a> {
    fn new(out: &'a mut String) -> Self {
        Lines { out, first: true }
    }

    fn push(&mut self, line: std::fmt::Arguments<'_>) {
        use std::fmt::Write as _;
        if !self.first {
            self.out.push('\n');
        }
        self.first = false;
        // Writing to a String cannot fail.
        let _ = self.out.write_fmt(line);
    }
}

fn test_text(webhook: &ObjectKey, language: Language) -> (String, String) {
    match language {
        Language::En => (
            "Herald test notification".to_string(),
            format!(
                "This is a test message from Herald for webhook {webhook}. If you can read it, delivery to this endpoint works."
            ),
        ),
        Language::ZhCn => (
            "Herald 测试通知".to_string(),
            format!(
                "这是 Herald 为 Webhook {webhook} 发送的测试消息。收到此消息说明该地址的通知投递正常。"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(name: &str, status: AlertStatus, severity: &str) -> Arc<Alert> {
        Arc::new(Alert {
            status,
            labels: LabelSet::from([
                ("alertname".into(), name.into()),
                ("severity".into(), severity.into()),
                ("namespace".into(), "prod".into()),
            ]),
            annotations: LabelSet::from([("summary".into(), "CPU above 90%".into())]),
            starts_at: "2026-11-25T10:00:00Z".into(),
            ..Alert::default()
        })
    }

    #[test]
    fn the_herald_body_equals_the_derived_serialization_byte_for_byte() {
        let two = vec![
            alert("CPUHigh", AlertStatus::Firing, "critical"),
            alert("DiskFull \"quoted\" ✓", AlertStatus::Resolved, "warning"),
        ];
        let one = vec![alert("Only \\ one", AlertStatus::Firing, "critical")];
        // The first delivery of an alert writes the shared end itself.
        let first = vec![alert("First", AlertStatus::Firing, "critical")];
        for language in [Language::En, Language::ZhCn] {
            let (start, end) = shared_herald_body(&content(&first, false), language)
                .expect("one alert")
                .expect("shared body");
            let derived = serde_json::to_vec(&render(&first, language, false)).expect("derived");
            assert_eq!(
                String::from_utf8_lossy(&[&start[..], &end[..]].concat()),
                String::from_utf8_lossy(&derived)
            );
        }
        for (alerts, language) in [
            (&two, Language::En),
            (&two, Language::ZhCn),
            (&one, Language::En),
            (&one, Language::ZhCn),
        ] {
            for test in [false, true] {
                let n = render(alerts, language, test);
                let derived = serde_json::to_vec(&n).expect("derived");
                // Twice: once writing each alert's JSON, once reusing it.
                for _ in 0..2 {
                    let body = body(&n, BodyFormat::Herald, None).expect("body");
                    assert_eq!(
                        String::from_utf8_lossy(&body),
                        String::from_utf8_lossy(&derived)
                    );
                }
                // A one-alert delivery: its webhook's start and the end its alert shares.
                let shared = shared_herald_body(&content(alerts, test), language);
                assert_eq!(shared.is_some(), alerts.len() == 1 && !test);
                if let Some(shared) = shared {
                    let (start, end) = shared.expect("shared body");
                    assert_eq!(
                        String::from_utf8_lossy(&[&start[..], &end[..]].concat()),
                        String::from_utf8_lossy(&derived)
                    );
                }
                // The same alerts for another webhook, and in a batch with other group labels
                // and URL: what was written for the first must not leak into these.
                let other_key = ObjectKey::new("team-a", "pager");
                let group = Arc::new(LabelSet::from([(
                    "alertname".to_string(),
                    "Grouped".to_string(),
                )]));
                // Equal to the first batch's values but other objects: compared by value.
                let (no_group, no_url) = (Arc::new(LabelSet::new()), Arc::from(""));
                let url = Arc::from("http://alertmanager:9093");
                for (webhook, group_labels, external_url) in
                    [(&other_key, &no_group, &no_url), (&other_key, &group, &url)]
                {
                    let content = Content {
                        webhook,
                        kind: WebhookType::Events,
                        test,
                        alerts,
                        group_labels,
                        external_url,
                        source: &NO_SOURCE,
                    };
                    let n = notification(content, language);
                    let derived = serde_json::to_vec(&n).expect("derived");
                    // A shared end written for another batch is not used: the usual rendering.
                    if let Some(shared) = shared_herald_body(&content, language) {
                        let (start, end) = shared.expect("shared body");
                        assert_eq!(
                            String::from_utf8_lossy(&[&start[..], &end[..]].concat()),
                            String::from_utf8_lossy(&derived)
                        );
                    }
                    let body = body(&n, BodyFormat::Herald, None).expect("body");
                    assert_eq!(
                        String::from_utf8_lossy(&body),
                        String::from_utf8_lossy(&derived)
                    );
                }
            }
        }
    }

    /// A one-alert body as a delivery sends it: its target's head, then the shared end.
    fn shared_herald_body(
        content: &Content<'_>,
        language: Language,
    ) -> Option<Result<(bytes::Bytes, bytes::Bytes), RenderError>> {
        let head = match HeraldHead::for_webhook(content.kind, content.webhook) {
            Ok(head) => head,
            Err(e) => return Some(Err(e)),
        };
        let [start, end] = shared::one_alert_herald_body(content, language, &head)?.into_parts();
        Some(Ok((start, end)))
    }

    fn content(alerts: &[Arc<Alert>], test: bool) -> Content<'_> {
        static KEY: std::sync::LazyLock<ObjectKey> =
            std::sync::LazyLock::new(|| ObjectKey::new("monitoring", "ops"));
        static EMPTY: std::sync::LazyLock<(Arc<LabelSet>, Arc<str>)> =
            std::sync::LazyLock::new(|| (Arc::default(), Arc::from("")));
        Content {
            webhook: &KEY,
            kind: WebhookType::Alarms,
            test,
            alerts,
            group_labels: &EMPTY.0,
            external_url: &EMPTY.1,
            source: &NO_SOURCE,
        }
    }

    static NO_SOURCE: GroupSource = GroupSource {
        receiver: String::new(),
        group_key: String::new(),
        truncated_alerts: 0,
        notification_reason: None,
        route_labels: None,
    };

    fn render(alerts: &[Arc<Alert>], language: Language, test: bool) -> Notification<'_> {
        notification(content(alerts, test), language)
    }

    #[test]
    fn english_firing_and_resolved() {
        let alerts = [alert("HighCPU", AlertStatus::Firing, "critical")];
        let n = render(&alerts, Language::En, false);
        assert_eq!(n.title, "[FIRING:1] HighCPU");
        assert!(n.message.contains("HighCPU is firing"));
        assert!(n.message.contains("Severity: critical"));
        assert_eq!(n.status, "firing");
        let alerts = [alert("HighCPU", AlertStatus::Resolved, "critical")];
        let n = render(&alerts, Language::En, false);
        assert_eq!(n.title, "[RESOLVED:1] HighCPU");
        assert_eq!(n.status, "resolved");
    }

    #[test]
    fn chinese_is_real_chinese() {
        let alerts = [
            alert("HighCPU", AlertStatus::Firing, "critical"),
            alert("DiskFull", AlertStatus::Resolved, "warning"),
        ];
        let n = render(&alerts, Language::ZhCn, false);
        assert_eq!(n.title, "【告警中 1 条，已恢复 1 条】DiskFull, HighCPU");
        assert!(n.message.contains("级别：严重"));
        assert!(n.message.contains("状态：已恢复"));
        assert!(n.message.contains("命名空间：prod"));
        assert!(!n.message.contains("Severity"));
        assert_eq!(n.language, "zh-CN");
    }

    #[test]
    fn test_messages_in_both_languages() {
        let en = render(&[], Language::En, true);
        assert_eq!(en.title, "Herald test notification");
        assert!(en.message.contains("monitoring/ops"));
        let zh = render(&[], Language::ZhCn, true);
        assert_eq!(zh.title, "Herald 测试通知");
        assert!(zh.message.contains("测试消息"));
    }

    #[test]
    fn common_labels_are_the_intersection() {
        let alerts = [
            alert("A", AlertStatus::Firing, "critical"),
            alert("B", AlertStatus::Firing, "critical"),
        ];
        let n = render(&alerts, Language::En, false);
        assert_eq!(
            n.common_labels.to_map(),
            BTreeMap::from([("namespace", "prod"), ("severity", "critical")])
        );
        assert_eq!(n.title, "[FIRING:2] A, B");
        let one = [alert("A", AlertStatus::Firing, "critical")];
        let n = render(&one, Language::En, false);
        assert_eq!(
            n.common_labels.to_map(),
            BTreeMap::from([
                ("alertname", "A"),
                ("namespace", "prod"),
                ("severity", "critical")
            ]),
            "one alert: all of its labels"
        );
        assert_eq!(
            n.common_annotations.to_map(),
            BTreeMap::from([("summary", "CPU above 90%")])
        );
    }

    #[test]
    fn chat_formats_have_their_documented_shapes() {
        let alerts = [alert("HighCPU", AlertStatus::Firing, "critical")];
        let n = render(&alerts, Language::ZhCn, false);
        let json = |format| -> serde_json::Value {
            serde_json::from_slice(&body(&n, format, None).expect("render")).expect("json")
        };
        let slack = json(BodyFormat::Slack);
        assert_eq!(slack["blocks"][0]["type"], "header");
        assert!(
            slack["text"]
                .as_str()
                .expect("text")
                .starts_with("【告警中】")
        );
        let ding = json(BodyFormat::Dingtalk);
        assert_eq!(ding["msgtype"], "markdown");
        assert_eq!(ding["markdown"]["title"], n.title.as_ref());
        let feishu = json(BodyFormat::Feishu);
        assert_eq!(feishu["msg_type"], "text");
        assert!(
            feishu["content"]["text"]
                .as_str()
                .expect("text")
                .contains("级别：严重")
        );
        let wecom = json(BodyFormat::Wecom);
        assert_eq!(wecom["msgtype"], "markdown");
        let am = json(BodyFormat::Alertmanager);
        assert_eq!(am["version"], "4");
        assert_eq!(am["receiver"], "ops");
        assert_eq!(am["alerts"][0]["labels"]["alertname"], "HighCPU");
    }

    #[test]
    fn templates_render_and_fail_cleanly() {
        let alerts = [alert("HighCPU", AlertStatus::Firing, "critical")];
        let n = render(&alerts, Language::En, false);
        let env = compile_template(r#"{"text": {{ title | tojson }}, "n": {{ alerts | length }}}"#)
            .expect("compiles");
        let out: serde_json::Value =
            serde_json::from_slice(&body(&n, BodyFormat::Herald, Some(&env)).expect("render"))
                .expect("json");
        assert_eq!(
            out,
            serde_json::json!({"text": "[FIRING:1] HighCPU", "n": 1})
        );
        assert!(compile_template("{{ unclosed").is_err());
        let env = compile_template("{{ no_such_field.x }}").expect("compiles");
        let err = body(&n, BodyFormat::Herald, Some(&env)).expect_err("undefined");
        assert!(err.to_string().starts_with("template:"), "{err}");
    }

    #[test]
    fn a_digest_counts_and_shows_the_most_severe_first() {
        let mut alerts: Vec<Arc<Alert>> = (0..30)
            .map(|i| alert(&format!("W{i:02}"), AlertStatus::Firing, "warning"))
            .collect();
        alerts.push(alert("Crit", AlertStatus::Firing, "critical"));
        alerts.push(alert("Gone", AlertStatus::Resolved, "critical"));
        let n = render(&alerts, Language::En, false);
        assert!(
            n.message.starts_with(
                "32 alerts: 31 firing (1 critical, 30 warning), 1 resolved\n\nCrit is firing"
            ),
            "{}",
            n.message
        );
        assert!(n.message.ends_with("… and 22 more"), "{}", n.message);
        let zh = render(&alerts, Language::ZhCn, false);
        assert!(zh.message.ends_with("另有 22 条"), "{}", zh.message);
    }

    #[test]
    fn many_names_are_shortened() {
        let alerts: Vec<Arc<Alert>> = ["A", "B", "C", "D", "E"]
            .iter()
            .map(|n| alert(n, AlertStatus::Firing, "info"))
            .collect();
        assert_eq!(
            render(&alerts, Language::En, false).title,
            "[FIRING:5] A, B, C and 2 more"
        );
        assert_eq!(
            render(&alerts, Language::ZhCn, false).title,
            "【告警中】5 条告警：A, B, C 等 5 项"
        );
    }
}
