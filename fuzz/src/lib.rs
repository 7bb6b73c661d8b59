//! The fuzz harnesses, shared by the cargo-fuzz targets (`fuzz_targets/`) and by
//! `tests/fuzz_corpus.rs`, which replays every corpus file on stable Rust. Each function takes
//! arbitrary bytes, must never panic, and asserts properties that hold for every input.

use std::collections::BTreeMap;

use herald::alert::{AlertBatch, AlertStatus, PayloadLimits};
use herald::crd::{BodyFormat, Language, NotificationConditionSpec, WebhookSpec, WebhookType};
use herald::object::{NotReady, NotReadyReason, ObjectKey};
use herald::render::{self, Content};
use herald::routing::{ConditionInput, Subject, Table, WebhookInput};
use serde_json::{Value, json};

/// Renders only batches up to this size (rendering is linear; keeps each run fast).
const MAX_RENDERED_ALERTS: usize = 64;

/// `POST /api/v1/alerts`: parse, check against the default limits, and for what passes, render
/// every body format in both languages.
pub fn parse_alertmanager(data: &[u8]) {
    let Ok(batch) = herald::alert::parse_alertmanager(data) else {
        return;
    };
    accepted(&batch);
}

/// `POST /api/v2/alerts`, at a fixed "now" so that runs are reproducible.
pub fn parse_v2(data: &[u8]) {
    let now: k8s_openapi::jiff::Timestamp = "2026-06-01T00:00:00Z".parse().expect("timestamp");
    let Ok(batch) = herald::alert::parse_v2(data, now) else {
        return;
    };
    for alert in &batch.alerts {
        // v2 alerts always get a start time, and a status that follows endsAt.
        assert!(!alert.starts_at.is_empty());
        if alert.status == AlertStatus::Resolved {
            assert!(!alert.ends_at.is_empty());
        }
    }
    accepted(&batch);
}

/// What holds for every parsed batch.
fn accepted(batch: &AlertBatch) {
    for alert in &batch.alerts {
        assert!(
            !alert.fingerprint.is_empty(),
            "every alert has a fingerprint"
        );
    }
    // Parsing either shape through `parse_any` gives the same batch as the endpoint's parser
    // (checked by the callers' inputs: here, the batch must at least survive a JSON round trip).
    let json = serde_json::to_vec(batch).expect("a batch serialises");
    let again: AlertBatch = serde_json::from_slice(&json).expect("a serialised batch parses");
    assert_eq!(&again, batch, "JSON round trip");
    // What the receiver would take of it.
    let mut admitted = batch.clone();
    if admitted.admit(&PayloadLimits::default(), "alerts").is_err() {
        return;
    }
    let batch = &admitted;
    if batch.alerts.len() > MAX_RENDERED_ALERTS {
        return;
    }
    let webhook = ObjectKey::new("monitoring", "fuzz");
    let alerts: Vec<std::sync::Arc<_>> = batch.alerts.iter().cloned().map(Into::into).collect();
    let group_labels = std::sync::Arc::new(batch.group_labels.clone());
    let external_url: std::sync::Arc<str> = std::sync::Arc::from(batch.external_url.as_str());
    for kind in [WebhookType::Alarms, WebhookType::Events] {
        for language in [Language::En, Language::ZhCn] {
            let notification = render::notification(
                Content {
                    webhook: &webhook,
                    kind,
                    test: false,
                    alerts: &alerts,
                    group_labels: &group_labels,
                    external_url: &external_url,
                    source: &batch.source,
                },
                language,
            );
            for format in [
                BodyFormat::Herald,
                BodyFormat::Alertmanager,
                BodyFormat::Slack,
                BodyFormat::Dingtalk,
                BodyFormat::Feishu,
                BodyFormat::Wecom,
            ] {
                let body =
                    render::body(&notification, format, None).expect("built-in formats render");
                let value: Value = serde_json::from_slice(&body).expect("bodies are JSON");
                if format == BodyFormat::Alertmanager {
                    // What Herald sends in Alertmanager's shape, Herald parses back unchanged.
                    let back = herald::alert::parse_alertmanager(&body)
                        .expect("Herald parses its own Alertmanager body");
                    assert_eq!(
                        back.alerts, batch.alerts,
                        "alerts survive the Alertmanager format"
                    );
                    assert_eq!(
                        value["alerts"].as_array().map(Vec::len),
                        Some(batch.alerts.len())
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

/// A tiny reader of fuzz bytes (no `arbitrary` dependency, so the corpus test builds on stable
/// with the main crate's dependencies only). Reads past the end yield zeros.
struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            usize::from(self.byte()) % n
        }
    }

    fn flag(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    fn pick<'b>(&mut self, items: &'b [&'b str]) -> &'b str {
        items[self.below(items.len())]
    }

    /// Up to `max` picks.
    fn some(&mut self, items: &[&str], max: usize) -> Vec<String> {
        (0..self.below(max + 1))
            .map(|_| self.pick(items).to_string())
            .collect()
    }

    /// A length-prefixed slice of the remaining bytes.
    fn slice(&mut self) -> &'a [u8] {
        let len = usize::from(self.byte()).min(self.data.len());
        let (head, rest) = self.data.split_at(len);
        self.data = rest;
        head
    }
}

const NAMESPACES: &[&str] = &["default", "monitoring", "team-a", "team-b"];
const WEBHOOKS: &[&str] = &["w0", "w1", "w2", "w3"];
const CONDITIONS: &[&str] = &["c0", "c1", "c2"];
const KEYS: &[&str] = &["alertname", "severity", "namespace", "team", "reason", "x"];
const VALUES: &[&str] = &[
    "A",
    "B",
    "critical",
    "warning",
    "default",
    "monitoring",
    "team-a",
    "team-b",
    "",
    "ops",
];
const OPERATORS: &[&str] = &["In", "NotIn", "Exists", "DoesNotExist", "in", "Bogus"];

fn labels(input: &mut Input<'_>, max: usize) -> BTreeMap<String, String> {
    (0..input.below(max + 1))
        .map(|_| (input.pick(KEYS).to_string(), input.pick(VALUES).to_string()))
        .collect()
}

fn webhook(input: &mut Input<'_>) -> WebhookInput {
    let key = ObjectKey::new(input.pick(NAMESPACES), input.pick(WEBHOOKS));
    let kind = if input.flag() { "Events" } else { "Alarms" };
    let spec: WebhookSpec = serde_json::from_value(json!({
        "type": kind,
        "url": "http://127.0.0.1:9/hook",
        "enabled": input.below(4) != 0,
        "sendResolved": input.flag(),
        "eventTypes": input.some(&["A", "B", "critical", ""], 2),
        "conditions": input.some(CONDITIONS, 2),
    }))
    .expect("a valid webhook spec");
    let credentials = match input.below(6) {
        0 => Err(NotReady::new(NotReadyReason::SecretNotFound, "fuzz")),
        _ => Ok(()),
    };
    WebhookInput {
        key,
        labels: labels(input, 2).into(),
        spec: spec.into(),
        credentials,
    }
}

/// A condition spec built as JSON and deserialised the way manifests are; `None` when it does
/// not deserialise (unknown operators, for one).
fn condition_spec(input: &mut Input<'_>) -> Option<NotificationConditionSpec> {
    let expressions: Vec<Value> = (0..input.below(4))
        .map(|_| {
            let mut req = json!({"key": input.pick(KEYS), "operator": input.pick(OPERATORS)});
            let values = input.some(VALUES, 3);
            if !values.is_empty() || input.flag() {
                req["values"] = json!(values);
            }
            req
        })
        .collect();
    let mut spec = json!({"matchExpressions": expressions});
    match input.below(4) {
        0 => spec["webhookSelector"] = json!({}),
        1 => spec["webhookSelector"] = json!({"matchLabels": labels(input, 2)}),
        2 => {
            spec["webhookSelector"] = json!({"matchExpressions": [{
                "key": input.pick(KEYS),
                "operator": input.pick(OPERATORS),
                "values": input.some(VALUES, 2),
            }]})
        }
        _ => {}
    }
    serde_json::from_value(spec).ok()
}

/// Applies a random sequence of table changes; after each, for random alerts and events,
/// `resolve` (the indexed fast path) must name exactly the webhooks `explain` accepts.
pub fn route(data: &[u8]) {
    let mut input = Input { data };
    let cluster: Vec<String> = NAMESPACES
        .iter()
        .filter(|_| input.flag())
        .map(|s| s.to_string())
        .collect();
    let mut model = Model {
        cluster: cluster.iter().cloned().collect(),
        ..Model::default()
    };
    let mut table = Table::new(cluster);
    let mut steps = 0;
    while !input.is_empty() && steps < 64 {
        steps += 1;
        match input.below(7) {
            0 | 1 => {
                let webhook = webhook(&mut input);
                model.webhooks.insert(webhook.key.clone(), webhook.clone());
                table.apply_webhook(webhook);
            }
            2 => {
                let key = ObjectKey::new(input.pick(NAMESPACES), input.pick(WEBHOOKS));
                model.webhooks.remove(&key);
                table.delete_webhook(&key);
            }
            3 => {
                let key = ObjectKey::new(input.pick(NAMESPACES), input.pick(CONDITIONS));
                if let Some(spec) = condition_spec(&mut input) {
                    model.conditions.insert(key.clone(), spec.clone());
                    table.apply_condition(ConditionInput { key, spec });
                }
            }
            4 => {
                let key = ObjectKey::new(input.pick(NAMESPACES), input.pick(CONDITIONS));
                model.conditions.remove(&key);
                table.delete_condition(&key);
            }
            5 => {
                // A condition straight from fuzz bytes as JSON.
                let key = ObjectKey::new(input.pick(NAMESPACES), input.pick(CONDITIONS));
                if let Ok(spec) = serde_json::from_slice::<NotificationConditionSpec>(input.slice())
                {
                    model.conditions.insert(key.clone(), spec.clone());
                    table.apply_condition(ConditionInput { key, spec });
                }
            }
            _ => agree(&table, &model, &mut input),
        }
    }
    for _ in 0..4 {
        agree(&table, &model, &mut input);
    }
}

/// The routing rules of the README, written the slow and obvious way, as an oracle.
#[derive(Default)]
struct Model {
    cluster: std::collections::BTreeSet<String>,
    webhooks: BTreeMap<ObjectKey, WebhookInput>,
    conditions: BTreeMap<ObjectKey, NotificationConditionSpec>,
}

impl Model {
    fn resolve(&self, subject: Subject<'_>) -> Vec<ObjectKey> {
        self.webhooks
            .values()
            .filter(|w| self.gets(w, subject))
            .map(|w| w.key.clone())
            .collect()
    }

    fn gets(&self, webhook: &WebhookInput, subject: Subject<'_>) -> bool {
        // The model reads the labels from a plain map of its own.
        let labels: BTreeMap<String, String> = subject
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let spec = &webhook.spec;
        let namespace = &webhook.key.namespace;
        let condition = |name: &str| {
            self.conditions
                .get(&ObjectKey::new(namespace.clone(), name))
        };
        // Fail closed: a missing named condition means nothing is delivered.
        if !spec.enabled
            || spec.kind != subject.kind
            || webhook.credentials.is_err()
            || spec.conditions.iter().any(|c| condition(c).is_none())
        {
            return false;
        }
        if !self.cluster.contains(&**namespace)
            && labels.get("namespace").map(String::as_str) != Some(&**namespace)
        {
            return false;
        }
        let type_label = match subject.kind {
            WebhookType::Alarms => "alertname",
            WebhookType::Events => "reason",
        };
        let event_type = labels.get(type_label).map_or("", String::as_str);
        if !spec.event_types.is_empty() && !spec.event_types.iter().any(|t| t == event_type) {
            return false;
        }
        if subject.status == AlertStatus::Resolved && !spec.send_resolved {
            return false;
        }
        let selected = self.conditions.iter().filter(|(key, c)| {
            &key.namespace == namespace
                && c.webhook_selector.as_ref().is_some_and(|s| {
                    let labels: BTreeMap<String, String> = webhook
                        .labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    selects(s, &labels)
                })
        });
        spec.conditions
            .iter()
            .filter_map(|name| condition(name))
            .chain(selected.map(|(_, c)| c))
            .all(|c| {
                c.match_expressions
                    .iter()
                    .all(|r| holds(&r.operator, &r.key, &r.values, &labels))
            })
    }
}

/// A label requirement (NotIn and DoesNotExist hold when the label is absent).
fn holds(
    operator: &herald::crd::LabelOperator,
    key: &str,
    values: &[String],
    labels: &BTreeMap<String, String>,
) -> bool {
    use herald::crd::LabelOperator::*;
    let value = labels.get(key);
    match operator {
        In => value.is_some_and(|v| values.contains(v)),
        NotIn => !value.is_some_and(|v| values.contains(v)),
        Exists => value.is_some(),
        DoesNotExist => value.is_none(),
    }
}

/// A Kubernetes label selector; an unknown operator selects nothing.
fn selects(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    use herald::crd::LabelOperator;
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|r| {
        let operator = match r.operator.as_str() {
            "In" => LabelOperator::In,
            "NotIn" => LabelOperator::NotIn,
            "Exists" => LabelOperator::Exists,
            "DoesNotExist" => LabelOperator::DoesNotExist,
            _ => return false,
        };
        holds(
            &operator,
            &r.key,
            r.values.as_deref().unwrap_or_default(),
            labels,
        )
    });
    by_labels && by_expressions
}

fn agree(table: &Table, model: &Model, input: &mut Input<'_>) {
    let alert = herald::alert::Alert {
        status: if input.flag() {
            AlertStatus::Resolved
        } else {
            AlertStatus::Firing
        },
        labels: labels(input, 4).into_iter().collect(),
        ..Default::default()
    };
    for subject in [Subject::alert(&alert), Subject::event(&alert)] {
        let resolved = table.resolve(subject);
        let verdicts = table.explain(subject);
        let accepted: Vec<ObjectKey> = verdicts
            .iter()
            .filter(|v| v.outcome.is_ok())
            .map(|v| v.webhook.clone())
            .collect();
        assert_eq!(
            resolved, accepted,
            "resolve and explain disagree for {subject:?}: {verdicts:?}"
        );
        assert_eq!(
            resolved,
            model.resolve(subject),
            "the table and the README's rules disagree for {subject:?}: {verdicts:?}"
        );
        assert_eq!(
            verdicts.len(),
            table.len(),
            "explain gives every webhook a verdict"
        );
        for key in &resolved {
            assert_eq!(
                table.readiness(key),
                Some(Ok(())),
                "{key} gets {subject:?} but is not ready"
            );
            let input = table.webhook(key).expect("resolved webhooks exist");
            assert_eq!(input.spec.kind, subject.kind);
            // Tenancy: outside the cluster namespaces, only alerts of the webhook's own namespace.
            if !table.cluster_namespaces().contains(&*key.namespace) {
                assert_eq!(
                    subject.labels.get("namespace"),
                    Some(&*key.namespace),
                    "{key} got an alert of another namespace"
                );
            }
        }
    }
}
